//! ExpectedAttention (kvpress): the attention a key can expect from FUTURE queries. The
//! prompt's pre-RoPE queries (after `n_sink` sinks) are summarised by their mean μ and
//! covariance Σ per query head; RoPE averaged over the next `n_future_positions` positions
//! (R̄) moves them to the future; a key's expected logit is kᵀR̄μ/√d + kᵀR̄ΣR̄ᵀk/(2d)
//! (the second term if `use_covariance`), softmaxed over the keys, averaged over each KV
//! head's group and multiplied by ‖v‖ (+ε, if `use_vnorm`). Sinks are always kept.
//!
//! Deliberate differences from kvpress: pre-RoPE queries come from the exact inverse
//! rotation of the post-RoPE queries the attention saw (not a re-projection), and the
//! statistics and scores are computed in float32 rather than the model dtype.

use super::attention_weights::{group_mean, repeat_kv};
use super::{QueryWindow, ScoreInput, Scorer};
use crate::error::{KvError, Result};
use crate::rope::Rope;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct ExpectedAttention {
    n_future: usize,
    n_sink: usize,
    use_covariance: bool,
    use_vnorm: bool,
    epsilon: f64,
}

impl ExpectedAttention {
    pub fn new(
        n_future_positions: usize,
        n_sink: usize,
        use_covariance: bool,
        use_vnorm: bool,
        epsilon: f64,
    ) -> Result<Self> {
        if n_future_positions == 0 {
            return Err(KvError::invalid(
                "n_future_positions",
                "got 0, expected at least 1",
            ));
        }
        if epsilon.is_nan() || epsilon < 0.0 {
            return Err(KvError::invalid(
                "epsilon",
                format!("got {epsilon}, expected a number >= 0"),
            ));
        }
        Ok(ExpectedAttention {
            n_future: n_future_positions,
            n_sink,
            use_covariance,
            use_vnorm,
            epsilon,
        })
    }
}

/// R̄ = mean over positions p in [start, start + n) of the rotation RoPE applies at p (the
/// attention scaling included): a (head_dim, head_dim) float32 matrix, built by rotating the
/// identity basis so that every rope type, layout and partial rotary is covered.
pub(crate) fn mean_rotation(rope: &Rope, start: usize, n: usize, seq_len: usize) -> Result<Tensor> {
    let d = rope.head_dim() as i64;
    let basis = Tensor::f_eye(d, (Kind::Float, Device::Cpu))?
        .f_view([1, d, 1, d])?
        .f_expand([1, d, n as i64, d], false)?;
    let positions =
        Tensor::f_arange_start(start as i64, (start + n) as i64, (Kind::Int64, Device::Cpu))?;
    let rotated = rope.apply(&basis.f_contiguous()?, &positions, Some(seq_len))?; // [0, j, t, :] = R_p e_j
    Ok(rotated
        .f_mean_dim(2, false, Kind::Float)?
        .f_squeeze_dim(0)?
        .f_transpose(0, 1)?) // columns R̄ e_j
}

impl Scorer for ExpectedAttention {
    fn name(&self) -> &'static str {
        "expected_attention"
    }

    fn query_window(&self) -> QueryWindow {
        QueryWindow::All
    }

    fn needs_rope(&self) -> bool {
        true
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor> {
        let (keys, values) = (input.keys, input.values);
        let t = keys.size()[2];
        let sink = self.n_sink as i64;
        if t <= sink {
            return Err(KvError::invalid(
                "n_sink",
                format!("the {sink} sinks leave no token to score out of {t}"),
            ));
        }
        let queries = input.require_queries(self.name())?;
        let rope = input.require_rope(self.name())?;
        let q_len = queries.size()[2];
        // A prefill gives the queries of every stored token (positions 0..t; the sinks'
        // queries are left out). During generation the queries are those of the last q
        // tokens, just before `next_position`.
        let next = input.ctx.next_position.unwrap_or(t as usize);
        let (n, d) = (t - sink, keys.size()[3]);
        let device = keys.device();
        let (query_window, first) = if input.ctx.next_position.is_none() || q_len == t {
            if q_len != t {
                return Err(KvError::shape(
                    "queries",
                    &queries.size(),
                    format!("the queries of all {t} prompt tokens"),
                ));
            }
            (queries.f_narrow(2, sink, n)?, next as i64 - n)
        } else {
            if q_len > t || q_len as usize > next {
                return Err(KvError::shape(
                    "queries",
                    &queries.size(),
                    format!("the queries of at most the last {t} tokens"),
                ));
            }
            (queries.shallow_clone(), next as i64 - q_len)
        };
        let positions = Tensor::f_arange_start(first, next as i64, (Kind::Int64, device))?;
        let pre = rope
            .invert(&query_window, &positions, Some(next))?
            .f_to_kind(Kind::Float)?;
        let observed = pre.size()[2];
        let mean = pre.f_mean_dim(2, true, Kind::Float)?; // (b, h, 1, d)
        let future = mean_rotation(rope, next, self.n_future, next)?.f_to(device)?; // (d, d)
        let mean_future = mean.f_matmul(&future.f_transpose(0, 1)?)?; // R̄μ as a row
        let keys_f = repeat_kv(
            &keys.f_narrow(2, sink, n)?.f_to_kind(Kind::Float)?,
            queries.size()[1] / keys.size()[1],
        )?;
        let mut logits = keys_f
            .f_matmul(&mean_future.f_transpose(-1, -2)?)?
            .f_squeeze_dim(-1)?
            .f_div_scalar((d as f64).sqrt())?;
        if self.use_covariance {
            let centered = pre.f_sub(&mean)?;
            let cov = centered
                .f_transpose(-1, -2)?
                .f_matmul(&centered)?
                .f_div_scalar(observed as f64)?; // (b, h, d, d)
            let cov_future = future
                .f_matmul(&cov)?
                .f_matmul(&future.f_transpose(0, 1)?)?;
            let quad = keys_f
                .f_matmul(&cov_future)?
                .f_mul(&keys_f)?
                .f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)?;
            logits = logits.f_add(&quad.f_div_scalar(2.0 * d as f64)?)?;
        }
        let weights = logits.f_softmax(-1, Kind::Float)?;
        let mut scores = group_mean(&weights, keys.size()[1])?;
        if self.use_vnorm {
            let vnorm = values
                .f_narrow(2, sink, n)?
                .f_to_kind(Kind::Float)?
                .f_norm_scalaropt_dim(2.0, [-1i64], false)?;
            scores = scores.f_add_scalar(self.epsilon)?.f_mul(&vnorm)?;
        }
        let top = scores.f_max()?.f_double_value(&[])? + 1.0;
        let s = scores.size();
        let sinks = Tensor::f_full([s[0], s[1], sink], top, (Kind::Float, device))?;
        Ok(Tensor::f_cat(&[sinks, scores], -1)?)
    }
}
