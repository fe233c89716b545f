//! Knorm: keep the keys with the smallest L2 norm (score = −‖k‖₂), computed in float32
//! because bf16 norms tie too often to rank tokens.

use super::{KeyValueScorer, ScoreContext};
use crate::error::Result;
use crate::registry::{Builder, Stage};
use crate::tensor::{FloatView4, KvFloat};
use crate::with_float_view;
use ndarray::{ArrayView4, ArrayViewMut3, Axis};
use rayon::prelude::*;
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug, Default)]
pub struct Knorm;

fn neg_norms<T: KvFloat>(keys: &ArrayView4<'_, T>, mut out: ArrayViewMut3<'_, f32>) {
    let heads = keys.dim().1;
    let t = keys.dim().2;
    let Some(out) = out.as_slice_mut() else {
        unreachable!("score outputs are allocated contiguous")
    };
    // One task per (batch, head) row; each token's channels summed in 8 interleaved f32
    // accumulators so that the loop vectorizes.
    out.par_chunks_mut(t.max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            let row = keys.index_axis(Axis(0), r / heads);
            let row = row.index_axis(Axis(0), r % heads);
            for (o, lane) in dst.iter_mut().zip(row.outer_iter()) {
                let sq = match lane.as_slice() {
                    Some(s) => sum_squares(s),
                    None => lane.iter().map(|x| x.to_f32() * x.to_f32()).sum(),
                };
                *o = -sq.sqrt();
            }
        });
}

/// Σ x² in f32 over 8 interleaved accumulators (vectorizable).
#[inline(always)]
pub(crate) fn sum_squares<T: KvFloat>(s: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = s.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            let x = x.to_f32();
            *a += x * x;
        }
    }
    let tail: f32 = rest.iter().map(|x| x.to_f32() * x.to_f32()).sum();
    acc.iter().sum::<f32>() + tail
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

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "knorm",
    aliases: &[],
    summary: "keys with the smallest L2 norm are kept (score −‖k‖₂, in float32)",
    reference: "Devoto et al., 2024",
    url: "https://arxiv.org/abs/2406.11430",
    params: &[],
    build: Builder::Scorer(|_| Ok(Box::new(Knorm))),
};
