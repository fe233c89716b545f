//! Knorm: keep the keys with the smallest L2 norm (score = −‖k‖₂), computed in float32
//! because bf16 norms tie too often to rank tokens.

use super::{KeyValueScorer, ScoreContext};
use crate::error::Result;
use crate::tensor::{FloatView4, KvFloat};
use crate::with_float_view;
use ndarray::{ArrayView4, ArrayViewMut3, Axis, Zip};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug, Default)]
pub struct Knorm;

fn neg_norms<T: KvFloat>(keys: &ArrayView4<'_, T>, mut out: ArrayViewMut3<'_, f32>) {
    Zip::from(&mut out)
        .and(keys.lanes(Axis(3)))
        .par_for_each(|o, lane| {
            let sq: f32 = match lane.as_slice() {
                Some(s) => s.iter().map(|x| x.to_f32() * x.to_f32()).sum(),
                None => lane.iter().map(|x| x.to_f32() * x.to_f32()).sum(),
            };
            *o = -sq.sqrt();
        });
}

impl KeyValueScorer for Knorm {
    fn name(&self) -> &'static str {
        "knorm"
    }

    fn score_cpu(
        &self,
        keys: &FloatView4<'_>,
        _values: &FloatView4<'_>,
        _ctx: &ScoreContext,
        out: ArrayViewMut3<'_, f32>,
    ) -> Result<()> {
        with_float_view!(keys, k => neg_norms(k, out));
        Ok(())
    }

    fn score_libtorch(
        &self,
        keys: &Tensor,
        _values: &Tensor,
        _ctx: &ScoreContext,
    ) -> Result<Tensor> {
        let k = keys.f_to_kind(Kind::Float)?;
        Ok(k.f_norm_scalaropt_dim(2.0, [-1i64], false)?.f_neg()?)
    }
}
