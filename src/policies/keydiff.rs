//! KeyDiff (Park et al. 2025): keep the keys least similar to the layer's mean key
//! direction: score = −cos(k, mean of the normalised keys), per KV head.
//!
//! Computed in float32 for every input dtype (kvpress rounds the normalised keys and their
//! mean to the model dtype; near-ties in bf16 may therefore rank differently). The CPU
//! kernel is two passes over each (batch, head) row — normalised-key sum, then cosines —
//! instead of libtorch's chain of six ops and four temporaries of the keys' size.

use super::attention_weights::dot8;
use super::knorm::sum_squares;
use super::{KeyValueScorer, ScoreContext};
use crate::error::{KvError, Result};
use crate::registry::{Builder, Stage};
use crate::tensor::{FloatView4, KvFloat};
use crate::with_float_view;
use ndarray::{ArrayView4, ArrayViewMut3, Axis};
use rayon::prelude::*;
use tch::{Kind, Tensor};

/// F.normalize's floor on a norm, and cosine_similarity's.
const NORM_EPS: f32 = 1e-12;
const COS_EPS: f32 = 1e-8;

#[derive(Clone, Copy, Debug, Default)]
pub struct KeyDiff;

fn keydiff_rows<T: KvFloat>(
    keys: &ArrayView4<'_, T>,
    mut out: ArrayViewMut3<'_, f32>,
) -> Result<()> {
    let (heads, t, d) = (keys.dim().1, keys.dim().2, keys.dim().3);
    let out = out
        .as_slice_mut()
        .ok_or_else(|| KvError::invalid("scores", "the output must be contiguous"))?;
    out.par_chunks_mut(t.max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            let row = keys.index_axis(Axis(0), r / heads);
            let row = row.index_axis(Axis(0), r % heads);
            // pass 1: each key's norm (kept in `dst`) and the sum of the normalised keys
            let mut anchor = vec![0f32; d];
            let mut lane_buf = vec![0f32; d];
            for (norm, lane) in dst.iter_mut().zip(row.outer_iter()) {
                let x: &[f32] = match lane.as_slice() {
                    Some(s) => {
                        for (b, v) in lane_buf.iter_mut().zip(s) {
                            *b = v.to_f32();
                        }
                        &lane_buf
                    }
                    None => {
                        for (b, v) in lane_buf.iter_mut().zip(lane.iter()) {
                            *b = v.to_f32();
                        }
                        &lane_buf
                    }
                };
                *norm = sum_squares(x).sqrt();
                let inv = 1.0 / norm.max(NORM_EPS);
                for (a, v) in anchor.iter_mut().zip(x) {
                    *a += v * inv;
                }
            }
            for a in anchor.iter_mut() {
                *a /= t as f32;
            }
            let anchor_norm = sum_squares(&anchor).sqrt().max(COS_EPS);
            // pass 2: −cos(k, anchor)
            for (o, lane) in dst.iter_mut().zip(row.outer_iter()) {
                let dot = match lane.as_slice() {
                    Some(s) => dot8(s, &anchor),
                    None => lane.iter().zip(&anchor).map(|(v, a)| v.to_f32() * a).sum(),
                };
                *o = -dot / (o.max(COS_EPS) * anchor_norm);
            }
        });
    Ok(())
}

impl KeyValueScorer for KeyDiff {
    fn name(&self) -> &'static str {
        "keydiff"
    }

    fn score_cpu(
        &self,
        keys: &FloatView4<'_>,
        _values: &FloatView4<'_>,
        _ctx: &ScoreContext,
        out: ArrayViewMut3<'_, f32>,
    ) -> Result<()> {
        with_float_view!(keys, k => keydiff_rows(k, out))
    }

    fn score_libtorch(
        &self,
        keys: &Tensor,
        _values: &Tensor,
        _ctx: &ScoreContext,
    ) -> Result<Tensor> {
        let keys = keys.f_to_kind(Kind::Float)?;
        let norms = keys
            .f_norm_scalaropt_dim(2.0, [-1i64], true)?
            .f_clamp_min(NORM_EPS as f64)?;
        let anchor = keys.f_div(&norms)?.f_mean_dim(2, true, Kind::Float)?;
        let cos = Tensor::f_cosine_similarity(&keys, &anchor, -1, COS_EPS as f64)?;
        Ok(cos.f_neg()?)
    }
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "keydiff",
    aliases: &[],
    summary: "keys least similar (cosine) to the mean normalised key of their head",
    reference: "Park et al., 2025",
    url: "https://arxiv.org/abs/2504.15364",
    params: &[],
    build: Builder::Scorer(|_| Ok(Box::new(KeyDiff))),
};
