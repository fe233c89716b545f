//! ExpectedAttention (kvpress): the attention a key can expect from FUTURE queries. The
//! prompt's pre-RoPE queries (after `n_sink` sinks) are summarised by their mean μ and
//! covariance Σ per query head; RoPE averaged over the next `n_future_positions` positions
//! (R̄) moves them to the future; a key's expected logit is kᵀR̄μ/√d + kᵀR̄ΣR̄ᵀk/(2d)
//! (the second term if `use_covariance`), softmaxed over the keys, averaged over each KV
//! head's group and multiplied by ‖v‖ (+ε, if `use_vnorm`). Sinks are always kept.
//!
//! Deliberate differences from kvpress: pre-RoPE queries come from the exact inverse
//! rotation of the post-RoPE queries the attention saw (not a re-projection), kept in
//! float32 (not rounded to the model dtype), and the statistics and scores are computed in
//! float32 rather than the model dtype — except that for bf16 models on CPUs that multiply
//! bf16 natively, the covariance term's two matrix products are bf16 GEMMs (float32
//! accumulation; the term they feed is divided by 2·d), where kvpress runs every step in bf16.

use super::attention_weights::{dot8, group_mean, repeat_kv};
use super::{QueryWindow, ScoreInput, Scorer};
use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use crate::rope::Rope;
use crate::tensor::{array_view, array_view_mut, uses_cpu_kernels, KvFloat};
use half::bf16;
use rayon::prelude::*;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct ExpectedAttention {
    n_future: usize,
    n_sink: usize,
    use_covariance: bool,
    use_vnorm: bool,
    epsilon: f64,
    /// The last R̄ built, with what it was built from (the RoPE's description, start,
    /// seq_len): every layer of a forward asks for the same one, and building it rotates
    /// n_future_positions · head_dim² values.
    future: Mutex<Option<(String, usize, usize, Tensor)>>,
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
            future: Mutex::new(None),
        })
    }

    /// [`mean_rotation`] over the next `n_future` positions from `start`, cached.
    fn future_rotation(&self, rope: &Rope, start: usize, seq_len: usize) -> Result<Tensor> {
        let id = format!("{rope:?}");
        let mut cached = self
            .future
            .lock()
            .map_err(|_| KvError::State("the ExpectedAttention cache is poisoned".into()))?;
        if let Some((rid, s, l, r)) = cached.as_ref() {
            if *rid == id && *s == start && *l == seq_len {
                return Ok(r.shallow_clone());
            }
        }
        let r = mean_rotation(rope, start, self.n_future, seq_len)?.f_contiguous()?;
        *cached = Some((id, start, seq_len, r.shallow_clone()));
        Ok(r)
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
        // pre-RoPE queries in float32 (the rotation's own precision, not rounded back to
        // the model dtype): a buffer of our own, centred in place for the covariance
        let pre = rope.invert_to_float(&query_window, &positions, Some(next))?;
        let observed = pre.size()[2];
        let mean = pre.f_mean_dim(2, true, Kind::Float)?; // (b, h, 1, d)
        let future = self.future_rotation(rope, next, next)?.f_to(device)?; // (d, d)
        let mean_future = mean.f_matmul(&future.f_transpose(0, 1)?)?; // R̄μ as a row
        if uses_cpu_kernels(keys) {
            let cov_future = match self.use_covariance {
                true => Some(future_covariance(
                    pre,
                    &mean,
                    &future,
                    observed,
                    product_kind(queries.kind()),
                )?),
                false => None,
            };
            let logits = expected_logits_cpu(
                &keys.f_narrow(2, sink, n)?,
                &mean_future,
                cov_future.as_ref(),
            )?;
            return self.finish(&logits, values, keys.size()[1], sink, n);
        }
        let keys_f = repeat_kv(
            &keys.f_narrow(2, sink, n)?.f_to_kind(Kind::Float)?,
            queries.size()[1] / keys.size()[1],
        )?;
        let mut logits = keys_f
            .f_matmul(&mean_future.f_transpose(-1, -2)?)?
            .f_squeeze_dim(-1)?
            .f_div_scalar((d as f64).sqrt())?;
        if self.use_covariance {
            let cov_future = future_covariance(pre, &mean, &future, observed, Kind::Float)?;
            let quad = keys_f
                .f_matmul(&cov_future)?
                .f_mul(&keys_f)?
                .f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)?;
            logits = logits.f_add(&quad.f_div_scalar(2.0 * d as f64)?)?;
        }
        self.finish(&logits, values, keys.size()[1], sink, n)
    }
}

impl ExpectedAttention {
    /// Scores from the expected logits (batch, q_heads, n) of the tokens after the sinks:
    /// softmax, group mean, value norms, sinks on top.
    fn finish(
        &self,
        logits: &Tensor,
        values: &Tensor,
        kv_heads: i64,
        sink: i64,
        n: i64,
    ) -> Result<Tensor> {
        let device = logits.device();
        let weights = logits.f_softmax(-1, Kind::Float)?;
        let mut scores = group_mean(&weights, kv_heads)?;
        if self.use_vnorm {
            let vnorm = values.f_narrow(2, sink, n)?.f_norm_scalaropt_dim_dtype(
                2.0,
                [-1i64],
                false,
                Kind::Float,
            )?;
            scores = scores.f_add_scalar(self.epsilon)?.f_mul(&vnorm)?;
        }
        let top = scores.f_max()?.f_double_value(&[])? + 1.0;
        let s = scores.size();
        let sinks = Tensor::f_full([s[0], s[1], sink], top, (Kind::Float, device))?;
        Ok(Tensor::f_cat(&[sinks, scores], -1)?)
    }
}

/// R̄ Σ R̄ᵀ: the covariance (batch, q_heads, d, d) of the float32 pre-RoPE queries `pre`
/// (batch, q_heads, observed, d) around their `mean`, moved to the future positions.
/// `pre` is centred in place. `products` is the dtype of the d × d products (float32, or
/// bfloat16 where the CPU multiplies it natively, see [`product_kind`]).
fn future_covariance(
    mut pre: Tensor,
    mean: &Tensor,
    future: &Tensor,
    observed: i64,
    products: Kind,
) -> Result<Tensor> {
    let _ = pre.f_sub_(mean)?;
    let centered = pre.f_to_kind(products)?;
    let cov = centered
        .f_transpose(-1, -2)?
        .f_matmul(&centered)?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(observed as f64)?;
    Ok(future
        .f_matmul(&cov)?
        .f_matmul(&future.f_transpose(0, 1)?)?)
}

/// The dtype of the fused kernel's two large products (the query covariance and the
/// keys' quadratic forms): bfloat16 for a bfloat16 model on a CPU that multiplies bf16
/// natively (float32 accumulation, results rounded to bf16: relative errors ~2⁻⁹ in the
/// covariance term, which is divided by 2·d, where kvpress computes every step in bf16),
/// float32 otherwise. The mean term kᵀR̄μ stays float32 throughout.
fn product_kind(model: Kind) -> Kind {
    if model == Kind::BFloat16 && crate::quant::simd::native_bf16_matmul() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

/// The expected logits kᵀR̄μ/√d (+ kᵀCk/(2d) with C = `cov_future`) of `keys` (batch,
/// kv_heads, n, d) for every query head (batch, q_heads, n), float32, without repeating
/// the keys per query head: one GEMM per KV head against its group's C's side by side
/// (d × g·d, in [`product_kind`]), then one pass per (batch, query head) that takes the
/// mean term's dot product and the quadratic form's.
fn expected_logits_cpu(
    keys: &Tensor,
    mean_future: &Tensor,
    cov_future: Option<&Tensor>,
) -> Result<Tensor> {
    let kind = product_kind(keys.kind());
    let keys_p = keys.f_to_kind(kind)?.f_contiguous()?;
    let (ks, qh) = (keys.size(), mean_future.size()[1]);
    let (b, kvh, n, d) = (ks[0], ks[1], ks[2], ks[3]);
    let g = qh / kvh;
    let products = match cov_future {
        // (b, kvh, d, g·d): C_j's columns for j = 0..g, side by side
        Some(c) => Some(
            keys_p
                .f_matmul(
                    &c.f_reshape([b, kvh, g, d, d])?
                        .f_permute([0, 1, 3, 2, 4])?
                        .f_reshape([b, kvh, d, g * d])?
                        .f_to_kind(kind)?,
                )?
                .f_contiguous()?,
        ),
        None => None,
    };
    let means = mean_future.f_contiguous()?;
    let mut out = Tensor::f_empty([b, qh, n], (Kind::Float, Device::Cpu))?;
    match kind {
        Kind::BFloat16 => logits_pass::<bf16>(&keys_p, &means, products.as_ref(), g, &mut out)?,
        _ => logits_pass::<f32>(&keys_p, &means, products.as_ref(), g, &mut out)?,
    }
    Ok(out)
}

/// out[b, kv·g + j, t] = k_t·m_j/√d (+ k_t·p_tj/(2d)) for the contiguous `keys` (b, kvh,
/// n, d) and `products` (b, kvh, n, g·d) of element type `E`, `means` (b, q_heads, 1, d).
fn logits_pass<E: KvFloat>(
    keys: &Tensor,
    means: &Tensor,
    products: Option<&Tensor>,
    g: i64,
    out: &mut Tensor,
) -> Result<()> {
    let d = keys.size()[3] as usize;
    let n = keys.size()[2] as usize;
    let g = g as usize;
    let kv = array_view::<E, ndarray::Ix4>(keys, "keys")?;
    let kv = kv
        .as_slice()
        .ok_or_else(|| KvError::invalid("keys", "expected contiguous keys"))?;
    let mv = array_view::<f32, ndarray::Ix4>(means, "means")?;
    let mv = mv
        .as_slice()
        .ok_or_else(|| KvError::invalid("means", "expected contiguous means"))?;
    let pv = match products {
        Some(p) => Some(array_view::<E, ndarray::Ix4>(p, "products")?),
        None => None,
    };
    let pv = match &pv {
        Some(p) => Some(
            p.as_slice()
                .ok_or_else(|| KvError::invalid("products", "expected contiguous products"))?,
        ),
        None => None,
    };
    let mut ov = array_view_mut::<f32, ndarray::Ix3>(out, "logits")?;
    let ov = ov
        .as_slice_mut()
        .ok_or_else(|| KvError::invalid("logits", "the output must be contiguous"))?;
    let (inv_sqrt_d, inv_2d) = (1.0 / (d as f32).sqrt(), 1.0 / (2.0 * d as f32));
    let width = g * d;
    ov.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(row, dst)| {
            // row = b · q_heads + kv head · g + j
            let (bk, j) = (row / g, row % g);
            let keys = &kv[bk * n * d..(bk + 1) * n * d];
            let mean = &mv[row * d..(row + 1) * d];
            match pv {
                Some(pv) => {
                    let prods = &pv[bk * n * width..(bk + 1) * n * width];
                    for ((o, k), p) in dst
                        .iter_mut()
                        .zip(keys.chunks_exact(d))
                        .zip(prods.chunks_exact(width))
                    {
                        *o = dot8(k, mean) * inv_sqrt_d + dot8(&p[j * d..(j + 1) * d], k) * inv_2d;
                    }
                }
                None => {
                    for (o, k) in dst.iter_mut().zip(keys.chunks_exact(d)) {
                        *o = dot8(k, mean) * inv_sqrt_d;
                    }
                }
            }
        });
    Ok(())
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "expected_attention",
    aliases: &[],
    summary:
        "attention expected from future queries (pre-RoPE query statistics moved ahead), times ‖v‖",
    reference: "NVIDIA kvpress (Devoto et al., 2025)",
    url: "https://arxiv.org/abs/2510.00636",
    params: &[
        ParamSpec::int(
            "n_future_positions",
            512,
            1,
            "future positions RoPE is averaged over",
        ),
        ParamSpec::int(
            "n_sink",
            4,
            0,
            "first tokens always kept, and left out of the query statistics",
        ),
        ParamSpec::flag("use_covariance", true, "add the covariance term kᵀR̄ΣR̄ᵀk/2d"),
        ParamSpec::flag(
            "use_vnorm",
            true,
            "multiply the score (+ epsilon) by the value norm ‖v‖",
        ),
        ParamSpec::float(
            "epsilon",
            0.0,
            0.0,
            None,
            "added to the score before it is multiplied by ‖v‖",
        ),
    ],
    build: Builder::Scorer(|a| {
        Ok(Box::new(ExpectedAttention::new(
            a.usize("n_future_positions")?,
            a.usize("n_sink")?,
            a.bool("use_covariance")?,
            a.bool("use_vnorm")?,
            a.f64("epsilon")?,
        )?))
    }),
};
