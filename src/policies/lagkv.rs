//! LagKV (Liang et al. 2025): after `n_sink` sinks, the prompt is cut into partitions of
//! `lag_size` tokens; each partition's keys and values are min–max normalised with the
//! statistics of the NEXT partition, and a token scores the spread (std over channels) of
//! its normalised key and value, softmaxed within the partition and turned into a rank
//! within it. Sinks and the last (unscorable) partition plus the tail are always kept.
//!
//! Statistics run in float32 for every input dtype (kvpress rounds each step to the model
//! dtype; near-ties in bf16 may therefore rank differently). The CPU kernel fuses the
//! whole chain per partition; other devices run the same steps as libtorch ops.

use super::{KeyValueScorer, ScoreContext};
use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use crate::tensor::{FloatView4, KvFloat};
use crate::with_float_view;
use ndarray::{ArrayView2, ArrayView4, ArrayViewMut3, Axis};
use rayon::prelude::*;
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct LagKv {
    n_sink: usize,
    lag: usize,
    cross_scoring: bool,
}

impl LagKv {
    pub fn new(n_sink: usize, lag_size: usize, cross_scoring: bool) -> Result<Self> {
        if lag_size < 2 {
            return Err(KvError::invalid(
                "lag_size",
                format!("got {lag_size}, expected at least 2"),
            ));
        }
        Ok(LagKv {
            n_sink,
            lag: lag_size,
            cross_scoring,
        })
    }

    /// Softmax over each partition of the std of x normalised by the next partition's
    /// per-channel min and max: (b, h, P − 1, lag).
    fn partition_scores(&self, x: &Tensor, end: i64) -> Result<Tensor> {
        let s = x.size();
        let (lag, sink) = (self.lag as i64, self.n_sink as i64);
        let parts = (end - sink) / lag;
        let blocks = x
            .f_narrow(2, sink, end - sink)?
            .f_reshape([s[0], s[1], parts, lag, s[3]])?;
        let current = blocks.f_narrow(2, 0, parts - 1)?;
        let reference = blocks.f_narrow(2, 1, parts - 1)?;
        let (lo, _) = reference.f_min_dim(-2, true)?;
        let (hi, _) = reference.f_max_dim(-2, true)?;
        let normalised = current.f_sub(&lo)?.f_div(&hi.f_sub(&lo)?)?;
        let spread = normalised.f_std_correction(-1, 1, false)?;
        Ok(spread.f_softmax(-1, spread.kind())?)
    }
}

impl LagKv {
    /// The whole score row of one (batch, head): sinks and tail 1, partitions ranked.
    fn score_row<K: KvFloat, V: KvFloat>(
        &self,
        keys: ArrayView2<'_, K>,
        values: ArrayView2<'_, V>,
        row: &mut [f32],
    ) {
        let (t, lag) = (row.len(), self.lag);
        let sink = self.n_sink.min(t);
        row[..sink].fill(1.0);
        if t < self.n_sink + 2 * lag {
            // too short to partition: a ramp that prefers the most recent tokens
            let rest = t - sink;
            for (i, o) in row[sink..].iter_mut().enumerate() {
                *o = (i as f64 / rest.max(1) as f64) as f32;
            }
            return;
        }
        let parts = (t - sink) / lag;
        let scored = (parts - 1) * lag;
        row[sink + scored..].fill(1.0);
        row[sink..sink + scored]
            .par_chunks_mut(lag)
            .enumerate()
            .for_each_init(
                || (vec![0f32; lag], vec![0f32; lag], Vec::with_capacity(lag)),
                |(spread_v, scratch, order): &mut (Vec<f32>, Vec<f32>, Vec<usize>), (p, out)| {
                    let (cur, next) = (sink + p * lag, sink + (p + 1) * lag);
                    partition_softmax(keys, cur, next, lag, out);
                    partition_softmax(values, cur, next, lag, spread_v);
                    for (o, v) in out.iter_mut().zip(spread_v.iter()) {
                        *o = (*o + v) / 2.0;
                    }
                    if !self.cross_scoring {
                        // rank within the partition, ascending, ties by position (a
                        // stable argsort of a stable argsort)
                        order.clear();
                        order.extend(0..lag);
                        order.sort_by(|&a, &b| out[a].total_cmp(&out[b]).then(a.cmp(&b)));
                        for (rank, &i) in order.iter().enumerate() {
                            scratch[i] = rank as f32 / lag as f32;
                        }
                        out.copy_from_slice(scratch);
                    }
                },
            );
    }

    fn score_all<K: KvFloat, V: KvFloat>(
        &self,
        keys: &ArrayView4<'_, K>,
        values: &ArrayView4<'_, V>,
        mut out: ArrayViewMut3<'_, f32>,
    ) -> Result<()> {
        let (heads, t) = (keys.dim().1, keys.dim().2);
        let out = out
            .as_slice_mut()
            .ok_or_else(|| KvError::invalid("scores", "the output must be contiguous"))?;
        out.par_chunks_mut(t.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let (b, h) = (r / heads, r % heads);
                let k = keys.index_axis(Axis(0), b);
                let v = values.index_axis(Axis(0), b);
                self.score_row(k.index_axis(Axis(0), h), v.index_axis(Axis(0), h), row);
            });
        Ok(())
    }
}

/// Softmax over the `lag` tokens from `cur` of their spread: the std (correction 1) over
/// channels of each token min–max normalised by the next partition's per-channel range.
fn partition_softmax<T: KvFloat>(
    x: ArrayView2<'_, T>,
    cur: usize,
    next: usize,
    lag: usize,
    out: &mut [f32],
) {
    let d = x.dim().1;
    let mut scratch = vec![0f32; 3 * d];
    let (lo, rest) = scratch.split_at_mut(d);
    let (hi, normalised) = rest.split_at_mut(d);
    lo.fill(f32::INFINITY);
    hi.fill(f32::NEG_INFINITY);
    // Each token's channels as one slice when they are contiguous (also in the token-major
    // layout that transformers hands over): the channel loops vectorize.
    let slices: Option<Vec<&[T]>> = (cur..next + lag)
        .map(|i| x.index_axis_move(Axis(0), i).to_slice())
        .collect();
    match slices {
        Some(rows) => {
            partition_spread(|i| rows[i - cur], cur, next, lag, (lo, hi, normalised), out)
        }
        None => {
            let rows: Vec<f32> = x
                .slice(ndarray::s![cur..next + lag, ..])
                .iter()
                .map(|v| v.to_f32())
                .collect();
            partition_spread(
                |i| &rows[(i - cur) * d..(i - cur + 1) * d],
                cur,
                next,
                lag,
                (lo, hi, normalised),
                out,
            )
        }
    }
    let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for o in out.iter_mut() {
        *o = (*o - max).exp();
        total += *o;
    }
    for o in out.iter_mut() {
        *o /= total;
    }
}

/// The spread of tokens cur..cur + lag (into `out`) given `row(i)`, token i's channels.
#[inline(always)]
fn partition_spread<'r, E: KvFloat + 'r>(
    row: impl Fn(usize) -> &'r [E],
    cur: usize,
    next: usize,
    lag: usize,
    (lo, hi, normalised): (&mut [f32], &mut [f32], &mut [f32]),
    out: &mut [f32],
) {
    let d = lo.len() as f32;
    for token in next..next + lag {
        for ((l, h), v) in lo.iter_mut().zip(hi.iter_mut()).zip(row(token)) {
            let v = v.to_f32();
            *l = if v < *l { v } else { *l };
            *h = if v > *h { v } else { *h };
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        for ((n, v), (l, h)) in normalised
            .iter_mut()
            .zip(row(cur + i))
            .zip(lo.iter().zip(hi.iter()))
        {
            *n = (v.to_f32() - l) / (h - l);
        }
        let mean = normalised.iter().sum::<f32>() / d;
        let var = normalised
            .iter()
            .map(|n| (n - mean) * (n - mean))
            .sum::<f32>()
            / (d - 1.0);
        *o = var.sqrt();
    }
}

impl KeyValueScorer for LagKv {
    fn name(&self) -> &'static str {
        "lagkv"
    }

    fn score_cpu(
        &self,
        keys: &FloatView4<'_>,
        values: &FloatView4<'_>,
        _ctx: &ScoreContext,
        out: ArrayViewMut3<'_, f32>,
    ) -> Result<()> {
        with_float_view!(keys, k => with_float_view!(values, v => self.score_all(k, v, out)))
    }

    fn score_libtorch(
        &self,
        keys: &Tensor,
        values: &Tensor,
        _ctx: &ScoreContext,
    ) -> Result<Tensor> {
        let (keys, values) = (keys.f_to_kind(Kind::Float)?, values.f_to_kind(Kind::Float)?);
        let s = keys.size();
        let (b, h, t) = (s[0], s[1], s[2]);
        let (lag, sink) = (self.lag as i64, self.n_sink as i64);
        let (kind, device) = (Kind::Float, keys.device());
        let sinks = Tensor::f_ones([b, h, sink.min(t)], (kind, device))?;
        if t < sink + 2 * lag {
            let rest = t - sink.min(t);
            let ramp = Tensor::f_arange(rest, (Kind::Double, device))?
                .f_div_scalar(rest.max(1) as f64)?
                .f_to_kind(kind)?;
            return Ok(Tensor::f_cat(
                &[sinks, ramp.f_expand([b, h, rest], false)?],
                -1,
            )?);
        }
        let end = sink + (t - sink) / lag * lag;
        let scores = self
            .partition_scores(&keys, end)?
            .f_add(&self.partition_scores(&values, end)?)?
            .f_div_scalar(2.0)?;
        let scores = if self.cross_scoring {
            scores
        } else {
            let order = scores.f_argsort_stable(true, -1, false)?;
            order
                .f_argsort_stable(true, -1, false)?
                .f_to_kind(kind)?
                .f_div_scalar(lag as f64)?
        };
        let middle = scores.f_reshape([b, h, -1])?;
        let tail = Tensor::f_ones([b, h, lag + (t - end)], (kind, device))?;
        Ok(Tensor::f_cat(&[sinks, middle, tail], -1)?)
    }
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "lagkv",
    aliases: &[],
    summary: "spread of keys and values normalised by the next partition's statistics, ranked per partition",
    reference: "Liang et al., 2025",
    url: "https://arxiv.org/abs/2504.04704",
    params: &[
        ParamSpec::int("n_sink", 4, 0, "first tokens always kept"),
        ParamSpec::int("lag_size", 128, 2, "tokens per partition (the last one is kept)"),
        ParamSpec::flag("cross_scoring", false, "score keys and values against each other's statistics"),
    ],
    build: Builder::Scorer(|a| {
        Ok(Box::new(LagKv::new(a.usize("n_sink")?, a.usize("lag_size")?, a.bool("cross_scoring")?)?))
    }),
};
