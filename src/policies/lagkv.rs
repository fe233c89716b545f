//! LagKV (Liang et al. 2025): after `n_sink` sinks, the prompt is cut into partitions of
//! `lag_size` tokens; each partition's keys and values are min–max normalised with the
//! statistics of the NEXT partition, and a token scores the spread (std over channels) of
//! its normalised key and value, softmaxed within the partition and turned into a rank
//! within it. Sinks and the last (unscorable) partition plus the tail are always kept.

use super::{ScoreInput, Scorer};
use crate::error::{KvError, Result};
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

impl Scorer for LagKv {
    fn name(&self) -> &'static str {
        "lagkv"
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor> {
        let (keys, values) = (input.keys, input.values);
        let s = keys.size();
        let (b, h, t) = (s[0], s[1], s[2]);
        let (lag, sink) = (self.lag as i64, self.n_sink as i64);
        let (kind, device) = (keys.kind(), keys.device());
        let sinks = Tensor::f_ones([b, h, sink.min(t)], (kind, device))?;
        if t < sink + 2 * lag {
            // Too short to partition: sinks, then a ramp that keeps the most recent tokens.
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
            .partition_scores(keys, end)?
            .f_add(&self.partition_scores(values, end)?)?
            .f_div_scalar(2.0)?;
        let scores = if self.cross_scoring {
            scores
        } else {
            // rank within the partition, 0 = lowest; a stable sort breaks exact ties by position
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
