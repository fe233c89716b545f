//! KeyDiff (Park et al. 2025): keep the keys least similar to the layer's mean key
//! direction: score = −cos(k, mean of the normalised keys), per KV head.

use super::{ScoreInput, Scorer};
use crate::error::Result;
use tch::Tensor;

#[derive(Clone, Copy, Debug, Default)]
pub struct KeyDiff;

impl Scorer for KeyDiff {
    fn name(&self) -> &'static str {
        "keydiff"
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor> {
        let keys = input.keys;
        let norms = keys
            .f_norm_scalaropt_dim(2.0, [-1i64], true)?
            .f_clamp_min(1e-12)?;
        let anchor = keys.f_div(&norms)?.f_mean_dim(2, true, keys.kind())?;
        let cos = Tensor::f_cosine_similarity(keys, &anchor, -1, 1e-8)?;
        Ok(cos.f_neg()?)
    }
}
