//! TriAttention (Mao et al., 2026; the seed paper): pre-RoPE queries concentrate around a
//! fixed center per head, so the logit a future query gives a key is a trigonometric
//! series in their distance. A key is scored by that series — the mean query's center q̄
//! times the key, rotated to the future query positions t0 + δ (δ = 1, 2, 4, …, 2^(n−1))
//! and averaged over δ — plus a norm term Σ_f (mean |q_f| − |q̄_f|)·|k_f| that credits
//! the key where queries are not concentrated. Per query head, z-normalised over the
//! keys; each KV head takes the max (or mean) over its group.
//!
//! The cheap form of the reference runtime: with post-RoPE keys k̃, the series is one dot
//! product ⟨k̃, u⟩ with u_f = q̄_f · mean_δ e^{iω_f (t0 + δ)}, so no key is un-rotated and
//! key positions are not needed — only t0, the next position. Query statistics come from
//! the prompt's queries here (inverse-rotated exactly); `src/policies/triattention.rs` is
//! also the scorer decoding-time compression uses with calibrated statistics.

use super::{QueryWindow, ScoreInput, Scorer};
use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use crate::rope::{Layout, Rope};
use std::f64::consts::TAU;
use tch::{Kind, Tensor};

/// How a KV head combines the scores of its group of query heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupAggregation {
    Max,
    Mean,
}

#[derive(Clone, Copy, Debug)]
pub struct TriAttention {
    n_offsets: usize,
    normalize: bool,
    aggregation: GroupAggregation,
}

/// Pre-RoPE query statistics of one layer: per query head, the center q̄ and the mean
/// magnitude m of every frequency pair (rotated channels) and channel (the rest).
#[derive(Debug)]
pub struct QueryStats {
    /// (batch, q_heads, F) real and imaginary parts of q̄_f, and mean |q_f|.
    pub center_re: Tensor,
    pub center_im: Tensor,
    pub magnitude: Tensor,
    /// (batch, q_heads, head_dim − rotary_dim): mean and mean |·| of unrotated channels.
    pub rest_mean: Tensor,
    pub rest_magnitude: Tensor,
    /// How many queries the means are over (to merge statistics).
    pub count: usize,
}

impl QueryStats {
    /// The statistics of both query sets: means weighted by their counts.
    pub fn merge(&self, other: &QueryStats) -> Result<QueryStats> {
        let total = self.count + other.count;
        if total == 0 {
            return Err(KvError::empty("query_stats", "no queries on either side"));
        }
        let (a, b) = (
            self.count as f64 / total as f64,
            other.count as f64 / total as f64,
        );
        let mix = |x: &Tensor, y: &Tensor| -> Result<Tensor> {
            Ok(x.f_mul_scalar(a)?.f_add(&y.f_mul_scalar(b)?)?)
        };
        Ok(QueryStats {
            center_re: mix(&self.center_re, &other.center_re)?,
            center_im: mix(&self.center_im, &other.center_im)?,
            magnitude: mix(&self.magnitude, &other.magnitude)?,
            rest_mean: mix(&self.rest_mean, &other.rest_mean)?,
            rest_magnitude: mix(&self.rest_magnitude, &other.rest_magnitude)?,
            count: total,
        })
    }

    /// The same statistics, sharing the tensors (no copy).
    pub fn shallow(&self) -> QueryStats {
        QueryStats {
            center_re: self.center_re.shallow_clone(),
            center_im: self.center_im.shallow_clone(),
            magnitude: self.magnitude.shallow_clone(),
            rest_mean: self.rest_mean.shallow_clone(),
            rest_magnitude: self.rest_magnitude.shallow_clone(),
            count: self.count,
        }
    }

    /// The statistics of batch row `b` alone (views).
    pub fn row(&self, b: usize) -> Result<QueryStats> {
        let row = |t: &Tensor| -> Result<Tensor> {
            let n = t.size()[0];
            // statistics shared by every row (one calibration row) serve each row as they are
            Ok(if n == 1 {
                t.shallow_clone()
            } else {
                t.f_narrow(0, b as i64, 1)?
            })
        };
        Ok(QueryStats {
            center_re: row(&self.center_re)?,
            center_im: row(&self.center_im)?,
            magnitude: row(&self.magnitude)?,
            rest_mean: row(&self.rest_mean)?,
            rest_magnitude: row(&self.rest_magnitude)?,
            count: self.count,
        })
    }

    /// An independent copy (tensors are not shared).
    pub fn copy(&self) -> QueryStats {
        QueryStats {
            center_re: self.center_re.copy(),
            center_im: self.center_im.copy(),
            magnitude: self.magnitude.copy(),
            rest_mean: self.rest_mean.copy(),
            rest_magnitude: self.rest_magnitude.copy(),
            count: self.count,
        }
    }
}

impl TriAttention {
    pub fn new(n_offsets: usize, normalize: bool, aggregation: String) -> Result<Self> {
        if n_offsets == 0 || n_offsets > 40 {
            return Err(KvError::invalid(
                "n_offsets",
                format!("got {n_offsets}, expected 1..=40 (offsets 1, 2, 4, … 2^(n−1))"),
            ));
        }
        let aggregation = match aggregation.as_str() {
            "max" => GroupAggregation::Max,
            "mean" => GroupAggregation::Mean,
            other => {
                return Err(KvError::invalid(
                    "aggregation",
                    format!("got {other:?}, expected \"max\" or \"mean\""),
                ))
            }
        };
        Ok(TriAttention {
            n_offsets,
            normalize,
            aggregation,
        })
    }

    /// The scores of `keys` (batch, kv_heads, T, d), post-RoPE, for queries after
    /// position `t0` − 1 with statistics `stats`.
    pub fn score_with_stats(
        &self,
        keys: &Tensor,
        stats: &QueryStats,
        rope: &Rope,
        t0: usize,
    ) -> Result<Tensor> {
        let (b, kv_heads, t, d) = {
            let s = keys.size();
            (s[0], s[1], s[2], s[3])
        };
        let q_heads = stats.center_re.size()[1];
        if q_heads % kv_heads != 0 {
            return Err(KvError::shape(
                "queries",
                &stats.center_re.size(),
                format!("a multiple of the {kv_heads} KV heads"),
            ));
        }
        let group = q_heads / kv_heads;
        let device = keys.device();
        // statistics of one sequence (a calibration file) serve every batch row
        let per_row = |x: &Tensor| -> Result<Tensor> {
            let mut shape = x.size();
            shape[0] = b;
            Ok(x.f_to(device)?.f_expand(shape.as_slice(), false)?)
        };
        let stats = &QueryStats {
            center_re: per_row(&stats.center_re)?,
            center_im: per_row(&stats.center_im)?,
            magnitude: per_row(&stats.magnitude)?,
            rest_mean: per_row(&stats.rest_mean)?,
            rest_magnitude: per_row(&stats.rest_magnitude)?,
            count: stats.count,
        };
        let rotary = rope.rotary_dim() as i64;
        let f = rotary / 2;
        // W_f = mean over δ of e^{iω_f (t0 + δ)}, angles in f64 reduced modulo 2π.
        let omega = rope.inv_freq(Some(t0.max(1)));
        let (mut w_re, mut w_im) = (vec![0f32; f as usize], vec![0f32; f as usize]);
        for (i, &w) in omega.iter().enumerate() {
            let (mut re, mut im) = (0f64, 0f64);
            for k in 0..self.n_offsets {
                let angle = ((w * ((t0 as f64) + (1u64 << k) as f64)) % TAU + TAU) % TAU;
                re += angle.cos();
                im += angle.sin();
            }
            w_re[i] = (re / self.n_offsets as f64) as f32;
            w_im[i] = (im / self.n_offsets as f64) as f32;
        }
        let w_re = Tensor::f_from_slice(&w_re)?.f_to(device)?;
        let w_im = Tensor::f_from_slice(&w_im)?.f_to(device)?;
        // u_f = q̄_f · W_f (complex product): (b, q_heads, F)
        let u_re = stats
            .center_re
            .f_mul(&w_re)?
            .f_sub(&stats.center_im.f_mul(&w_im)?)?;
        let u_im = stats
            .center_re
            .f_mul(&w_im)?
            .f_add(&stats.center_im.f_mul(&w_re)?)?;
        let (k_re, k_im) = split_pairs(&keys.f_to_kind(Kind::Float)?, rope.layout(), rotary)?; // (b, hk, T, F)
        let k_abs = k_re.f_square()?.f_add(&k_im.f_square()?)?.f_sqrt()?;
        let s = rope.attention_scaling();
        let center_abs = stats
            .center_re
            .f_square()?
            .f_add(&stats.center_im.f_square()?)?
            .f_sqrt()?;
        let spread = stats.magnitude.f_sub(&center_abs)?; // m_f − |q̄_f| >= 0
                                                          // per query head: Σ_f (u_re k_re + u_im k_im + spread |k|) / s, grouped by KV head
        let grouped = |x: &Tensor| -> Result<Tensor> { Ok(x.f_reshape([b, kv_heads, group, -1])?) };
        let per_pair = grouped(&u_re)?
            .f_matmul(&k_re.f_transpose(-1, -2)?)?
            .f_add(&grouped(&u_im)?.f_matmul(&k_im.f_transpose(-1, -2)?)?)?
            .f_add(&grouped(&spread)?.f_matmul(&k_abs.f_transpose(-1, -2)?)?)?
            .f_div_scalar(s)?; // (b, hk, g, T)
        let mut scores = per_pair;
        if d > rotary {
            let rest = keys
                .f_narrow(-1, rotary, d - rotary)?
                .f_to_kind(Kind::Float)?;
            let rest_spread = stats.rest_magnitude.f_sub(&stats.rest_mean.f_abs()?)?;
            let unrotated = grouped(&stats.rest_mean)?
                .f_matmul(&rest.f_transpose(-1, -2)?)?
                .f_add(&grouped(&rest_spread)?.f_matmul(&rest.f_abs()?.f_transpose(-1, -2)?)?)?;
            scores = scores.f_add(&unrotated)?;
        }
        if self.normalize {
            let mean = scores.f_mean_dim(-1, true, Kind::Float)?;
            let std = scores.f_std_correction(-1, 0, true)?.f_clamp_min(1e-6)?;
            scores = scores.f_sub(&mean)?.f_div(&std)?;
        }
        let _ = t;
        Ok(match self.aggregation {
            GroupAggregation::Max => scores.f_amax([2i64].as_slice(), false)?,
            GroupAggregation::Mean => scores.f_mean_dim(2, false, Kind::Float)?,
        })
    }
}

/// Real and imaginary parts of the rotated channel pairs of x (…, d): pair f is
/// (x[f], x[f + F]) in rotate-half layout, (x[2f], x[2f + 1]) interleaved.
fn split_pairs(x: &Tensor, layout: Layout, rotary: i64) -> Result<(Tensor, Tensor)> {
    let f = rotary / 2;
    Ok(match layout {
        Layout::RotateHalf => (x.f_narrow(-1, 0, f)?, x.f_narrow(-1, f, f)?),
        Layout::Interleaved => {
            let pairs = x.f_narrow(-1, 0, rotary)?;
            let mut shape = pairs.size();
            shape.pop();
            shape.extend([f, 2]);
            let pairs = pairs.f_reshape(shape.as_slice())?;
            (pairs.f_select(-1, 0)?, pairs.f_select(-1, 1)?)
        }
    })
}

/// Query statistics from post-RoPE queries (batch, q_heads, q, d) at positions
/// `start`..`start` + q, inverse-rotated exactly.
pub fn query_stats(queries: &Tensor, rope: &Rope, start: usize) -> Result<QueryStats> {
    let t = queries.size()[2];
    let d = queries.size()[3];
    let start = start as i64;
    let positions = Tensor::f_arange_start(start, start + t, (Kind::Int64, queries.device()))?;
    let pre = rope
        .invert(queries, &positions, Some((start + t) as usize))?
        .f_to_kind(Kind::Float)?;
    let rotary = rope.rotary_dim() as i64;
    let (re, im) = split_pairs(&pre, rope.layout(), rotary)?;
    let magnitude = re
        .f_square()?
        .f_add(&im.f_square()?)?
        .f_sqrt()?
        .f_mean_dim(2, false, Kind::Float)?;
    let rest = pre.f_narrow(-1, rotary, d - rotary)?;
    Ok(QueryStats {
        center_re: re.f_mean_dim(2, false, Kind::Float)?,
        center_im: im.f_mean_dim(2, false, Kind::Float)?,
        magnitude,
        rest_mean: rest.f_mean_dim(2, false, Kind::Float)?,
        rest_magnitude: rest.f_abs()?.f_mean_dim(2, false, Kind::Float)?,
        count: t as usize,
    })
}

impl Scorer for TriAttention {
    fn name(&self) -> &'static str {
        "triattention"
    }

    fn query_window(&self) -> QueryWindow {
        QueryWindow::All
    }

    fn needs_rope(&self) -> bool {
        true
    }

    fn uses_query_stats(&self) -> bool {
        true
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor> {
        let rope = input.require_rope(self.name())?;
        let t = input.keys.size()[2];
        // t0, the next token's position: tokens seen (stored tokens in a prefill).
        let t0 = input.ctx.next_position.unwrap_or(t as usize);
        if let Some(stats) = input.query_stats {
            // calibrated (or accumulated) statistics: no live query needed
            return self.score_with_stats(input.keys, stats, rope, t0);
        }
        let queries = input.require_queries(self.name())?;
        let q_len = queries.size()[2];
        if input.ctx.next_position.is_none() && q_len != t {
            return Err(KvError::shape(
                "queries",
                &queries.size(),
                format!("the queries of all {t} prompt tokens"),
            ));
        }
        if q_len as usize > t0 {
            return Err(KvError::shape(
                "queries",
                &queries.size(),
                format!("at most the queries of the {t0} tokens seen"),
            ));
        }
        // the queries of the last q tokens seen, at positions t0 − q .. t0
        let stats = query_stats(queries, rope, t0 - q_len as usize)?;
        self.score_with_stats(input.keys, &stats, rope, t0)
    }
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "triattention",
    aliases: &[],
    summary: "trigonometric series of the distance to future queries from the pre-RoPE query center, plus a norm term",
    reference: "Mao et al., 2026",
    url: "https://arxiv.org/abs/2604.04921",
    params: &[
        ParamSpec { max: Some(40.0), ..ParamSpec::int("n_offsets", 17, 1, "future offsets 1, 2, 4, … 2^(n−1) the series is averaged over") },
        ParamSpec::flag("normalize", true, "z-normalise each query head's scores over the keys"),
        ParamSpec::choice("aggregation", "max", &["max", "mean"], "how a KV head combines its query heads"),
    ],
    build: Builder::Scorer(|a| {
        Ok(Box::new(TriAttention::new(
            a.usize("n_offsets")?,
            a.bool("normalize")?,
            a.str("aggregation")?.to_string(),
        )?))
    }),
};
