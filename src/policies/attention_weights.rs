//! Shared pieces of the attention-based scorers, in the dtype chain of transformers'
//! attention (and of kvpress, so that the same inputs keep the same tokens): logits in
//! the model dtype, softmax in float32, weights cast back to the model dtype.

use crate::error::{KvError, Result};
use crate::multiversion;
use crate::quant::simd::Madd;
use crate::tensor::bf16_round;
use crate::tensor::{array_view, array_view_mut, float_view, uses_cpu_kernels, KvFloat};
use crate::with_float_view;
use half::{bf16, f16};
use ndarray::{Axis, Ix3, Ix4};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Keys (batch, kv_heads, t, d) repeated for a GQA group of `group` query heads per KV
/// head: (batch, kv_heads * group, t, d), KV head h serving query heads h*group..(h+1)*group.
pub fn repeat_kv(keys: &Tensor, group: i64) -> Result<Tensor> {
    if group == 1 {
        return Ok(keys.shallow_clone());
    }
    let s = keys.size();
    Ok(keys
        .f_unsqueeze(2)?
        .f_expand([s[0], s[1], group, s[2], s[3]], false)?
        .f_reshape([s[0], s[1] * group, s[2], s[3]])?)
}

/// Query heads per KV head, checked.
pub fn group_size(queries: &Tensor, keys: &Tensor) -> Result<i64> {
    let (qh, kh) = (queries.size()[1], keys.size()[1]);
    if qh % kh != 0 {
        return Err(KvError::shape(
            "queries",
            &queries.size(),
            format!("a multiple of the {kh} KV heads"),
        ));
    }
    Ok(qh / kh)
}

/// Softmax attention weights of `queries` (batch, q_heads, w, d), the queries of the last
/// w of T tokens, over all T `keys` (batch, kv_heads, T, d), causally: query i (at
/// position T − w + i) sees keys 0..=T − w + i. Logits = q·k / √d in the model dtype;
/// softmax in float32, cast back. Returns (batch, q_heads, w, T).
pub fn window_attention(queries: &Tensor, keys: &Tensor) -> Result<Tensor> {
    let (w, t, d) = (queries.size()[2], keys.size()[2], keys.size()[3]);
    let logits = grouped_logits(queries, keys)?.f_div_scalar((d as f64).sqrt())?;
    // Only the window's own w columns can lie in a query's future: mask that block alone.
    let mask = causal_mask(w, w, queries.device())?;
    let _ = logits
        .f_narrow(-1, t - w, w)?
        .f_masked_fill_(&mask, f64::NEG_INFINITY)?;
    Ok(logits
        .f_softmax(-1, Kind::Float)?
        .f_to_kind(queries.kind())?)
}

/// The mean over the window's queries of [`window_attention`]: (batch, q_heads, T) in the
/// queries' dtype — what SnapKV and TOVA read. On the CPU, everything after the float32
/// product runs as one fused pass per head (rounding to the model dtype where the op chain
/// rounds, so the result is the chain's up to summation order) instead of six passes over
/// the (w × T) weights.
pub fn window_attention_mean(queries: &Tensor, keys: &Tensor) -> Result<Tensor> {
    let kind = queries.kind();
    if !uses_cpu_kernels(keys) || !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
        let weights = window_attention(queries, keys)?;
        return Ok(weights.f_mean_dim(2, false, kind)?);
    }
    let (q, t, d) = (queries.size(), keys.size()[2], keys.size()[3]);
    let mut out = Tensor::f_empty([q[0], q[1], t], (kind, Device::Cpu))?;
    let scale = (d as f64).sqrt() as f32;
    let rows_per_kv_head = q[1] / keys.size()[1].max(1) * q[2];
    if rows_per_kv_head <= SMALL_WINDOW_ROWS {
        // a few queries (TOVA's one): a GEMM would first copy the token-major keys
        let logits = small_window_products(queries, keys)?;
        match kind {
            Kind::Half => mean_kernel::<f32, f16>(&logits, &mut out, scale)?,
            Kind::BFloat16 => mean_kernel::<f32, bf16>(&logits, &mut out, scale)?,
            _ => mean_kernel::<f32, f32>(&logits, &mut out, scale)?,
        }
        return Ok(out);
    }
    match kind {
        Kind::Half => {
            let logits = grouped_products(queries, keys)?.f_contiguous()?;
            mean_kernel::<f32, f16>(&logits, &mut out, scale)?
        }
        Kind::BFloat16 => {
            // libtorch's bf16 matmul (f32 accumulation, rounded once: the chain's first
            // rounding) runs on the CPU's bf16 units at twice the float32 GEMM's speed,
            // and its result is half the bytes for the kernel to read.
            let logits = grouped_products_native(queries, keys)?.f_contiguous()?;
            mean_kernel::<bf16, bf16>(&logits, &mut out, scale)?
        }
        _ => {
            let logits = grouped_products(queries, keys)?.f_contiguous()?;
            mean_kernel::<f32, f32>(&logits, &mut out, scale)?
        }
    }
    Ok(out)
}

/// Query rows per KV head up to which [`small_window_products`] replaces the GEMM.
const SMALL_WINDOW_ROWS: i64 = 8;

/// [`grouped_products`] for a few queries per KV head: float32 dot products read straight
/// from the keys' memory (any token stride), one pass over each KV head's keys for all its
/// query rows. (batch, q_heads, w, T) float32.
fn small_window_products(queries: &Tensor, keys: &Tensor) -> Result<Tensor> {
    let group = group_size(queries, keys)? as usize;
    let qf = queries.f_to_kind(Kind::Float)?.f_contiguous()?;
    let (q, k) = (qf.size(), keys.size());
    let (w, t, d) = (q[2] as usize, k[2] as usize, k[3] as usize);
    let mut out = Tensor::f_empty([q[0], q[1], q[2], k[2]], (Kind::Float, Device::Cpu))?;
    let qv = array_view::<f32, Ix4>(&qf, "queries")?;
    let qs = qv
        .as_slice()
        .ok_or_else(|| KvError::invalid("queries", "expected contiguous queries"))?;
    let mut ov = array_view_mut::<f32, Ix4>(&mut out, "logits")?;
    let os = ov
        .as_slice_mut()
        .ok_or_else(|| KvError::invalid("logits", "the output must be contiguous"))?;
    let heads = k[1] as usize;
    let kview = float_view::<Ix4>(keys, "keys")?;
    with_float_view!(&kview, kv => {
        os.par_chunks_mut((group * w * t).max(1))
            .zip(qs.par_chunks((group * w * d).max(1)))
            .enumerate()
            .for_each_init(
                || vec![0f32; d],
                |kbuf, (r, (dst, qrows))| {
                    let row = kv.index_axis(Axis(0), r / heads);
                    small_rows(row.index_axis(Axis(0), r % heads), qrows, dst, kbuf)
                },
            )
    });
    Ok(out)
}

multiversion!(fn small_rows<K: KvFloat;>(keys: ndarray::ArrayView2<'_, K>, qrows: &[f32], dst: &mut [f32], kbuf: &mut [f32]) -> () => small_rows_body);

/// One KV head of [`small_window_products`]: `keys` (T, d), `qrows` its query rows (n, d),
/// `dst` (n, T).
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn small_rows_body<M: Madd, K: KvFloat>(
    keys: ndarray::ArrayView2<'_, K>,
    qrows: &[f32],
    dst: &mut [f32],
    kbuf: &mut [f32],
) {
    let (t, d) = keys.dim();
    for (ti, lane) in keys.outer_iter().enumerate() {
        match lane.to_slice() {
            Some(s) => kbuf.iter_mut().zip(s).for_each(|(b, x)| *b = x.to_f32()),
            None => kbuf
                .iter_mut()
                .zip(lane.iter())
                .for_each(|(b, x)| *b = x.to_f32()),
        }
        for (qi, qrow) in qrows.chunks_exact(d).enumerate() {
            dst[qi * t + ti] = dot8(qrow, kbuf);
        }
    }
}

/// Σ a·b in f32 over 8 interleaved accumulators (vectorizable), either side f32, f16 or
/// bf16 (widened to f32 as it is read).
#[inline(always)]
pub(crate) fn dot8<A: KvFloat, B: KvFloat>(a: &[A], b: &[B]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x.to_f32() * y.to_f32())
        .sum();
    for (x, y) in ac.zip(bc) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x.to_f32() * y.to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// e^x for x ≤ 0 (softmax after subtracting the maximum) within 2 float32 ulps, written
/// without branches or calls so that loops over it vectorize (a scalar `expf` per weight
/// costs more than the whole product): x = n·ln2 + r with |r| ≤ ln2/2, e^r by its
/// degree-7 Taylor polynomial, 2^n by building the exponent bits.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0); // e^-87 is still a normal float; below, 0 would be as good
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // n as an integer, read from the bits of `shifted` (whose ulp is 1 there) instead of
    // a float-to-int cast: Rust's saturating cast keeps the loop from vectorizing
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// A reduction over 8 interleaved accumulators (vectorizable), then over the lanes.
#[inline(always)]
fn lanes_fold(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = f(*l, v);
        }
    }
    let mut acc = rest.iter().fold(init, |a, &v| f(a, v));
    for l in lanes {
        acc = f(acc, l);
    }
    acc
}

/// `logits` (batch, q_heads, w, T) products, float32 unrounded or already in the model
/// dtype (rounding them again changes nothing); `out` (batch, q_heads, T) in the model
/// dtype `T`, whose rounding the chain applies after each step. Query i of the window sees
/// keys 0..=T − w + i.
fn mean_kernel<L: KvFloat, T: Rounding>(
    logits: &Tensor,
    out: &mut Tensor,
    scale: f32,
) -> Result<()> {
    let logits = array_view::<L, Ix4>(logits, "logits")?;
    let (_, _, w, t) = logits.dim();
    let rows = logits
        .as_slice()
        .ok_or_else(|| KvError::invalid("logits", "expected contiguous products"))?;
    let mut out = array_view_mut::<T, Ix3>(out, "scores")?;
    let out = out
        .as_slice_mut()
        .ok_or_else(|| KvError::invalid("scores", "the output must be contiguous"))?;
    out.par_chunks_mut(t.max(1))
        .zip(rows.par_chunks(w * t.max(1)))
        .for_each_init(
            || (vec![0f32; t], vec![0f32; t]),
            |(acc, x), (dst, head)| mean_head::<L, T>(head, dst, acc, x, scale),
        );
    Ok(())
}

/// The model dtypes of the attention chain, each with its rounding of an f32.
pub(crate) trait Rounding: KvFloat {
    fn round(x: f32) -> f32;
}

impl Rounding for f32 {
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }
}

impl Rounding for bf16 {
    #[inline(always)]
    fn round(x: f32) -> f32 {
        f32::from_bits((bf16_round(x).to_bits() as u32) << 16)
    }
}

impl Rounding for f16 {
    #[inline(always)]
    fn round(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
}

multiversion!(fn mean_head<L: KvFloat, T: Rounding;>(head: &[L], dst: &mut [T], acc: &mut [f32], x: &mut [f32], scale: f32) -> () => mean_head_body);

/// One query head of [`mean_kernel`]: `head` holds its w rows of T logits. Compiled per
/// instruction set (`multiversion!`); no fused multiply-add, so every copy gives the same
/// bits.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn mean_head_body<M: Madd, L: KvFloat, T: Rounding>(
    head: &[L],
    dst: &mut [T],
    acc: &mut [f32],
    x: &mut [f32],
    scale: f32,
) {
    let t = dst.len();
    let w = head.len() / t.max(1);
    acc.fill(0.0);
    for (i, row) in head.chunks_exact(t).enumerate() {
        let visible = t - w + i + 1;
        let x = &mut x[..visible];
        for (xj, &l) in x.iter_mut().zip(row) {
            *xj = T::round(T::round(l.to_f32()) / scale);
        }
        let max = lanes_fold(x, f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
        for xj in x.iter_mut() {
            *xj = exp_nonpositive(*xj - max);
        }
        // softmax's normalisation: times the reciprocal of the sum, as libtorch
        let inv_total = 1.0 / lanes_fold(x, 0.0, |a, b| a + b);
        for (a, xj) in acc.iter_mut().zip(x.iter()) {
            *a += T::round(xj * inv_total);
        }
    }
    for (o, a) in dst.iter_mut().zip(acc.iter()) {
        *o = T::from_f32(a / w as f32);
    }
}

/// `queries · keysᵀ` (batch, q_heads, w, T) for queries (batch, q_heads, w, d) against
/// their group's keys (batch, kv_heads, T, d), in the queries' dtype. The product runs in
/// float32 and is rounded once to that dtype — what a reduced-precision matmul returns up
/// to summation order — because libtorch's bf16/f16 CPU matmul is an order of magnitude
/// slower than its float32 one. Query heads are folded into rows of their KV head's
/// product, so keys are never repeated per query head.
pub fn grouped_logits(queries: &Tensor, keys: &Tensor) -> Result<Tensor> {
    Ok(grouped_products(queries, keys)?.f_to_kind(queries.kind())?)
}

/// [`grouped_logits`] as one matmul in the queries' dtype (libtorch accumulates reduced
/// precision products in float32 and rounds the result once).
fn grouped_products_native(queries: &Tensor, keys: &Tensor) -> Result<Tensor> {
    let group = group_size(queries, keys)?;
    let (q, k) = (queries.size(), keys.size());
    let rows = queries.f_reshape([q[0], k[1], group * q[2], q[3]])?;
    Ok(rows
        .f_matmul(&keys.f_transpose(-1, -2)?)?
        .f_reshape([q[0], q[1], q[2], k[2]])?)
}

/// [`grouped_logits`] before the rounding: float32.
fn grouped_products(queries: &Tensor, keys: &Tensor) -> Result<Tensor> {
    let group = group_size(queries, keys)?;
    let (q, k) = (queries.size(), keys.size());
    let rows = queries
        .f_to_kind(Kind::Float)?
        .f_reshape([q[0], k[1], group * q[2], q[3]])?;
    Ok(rows
        .f_matmul(&keys.f_to_kind(Kind::Float)?.f_transpose(-1, -2)?)?
        .f_reshape([q[0], q[1], q[2], k[2]])?)
}

/// True where query i of the last w (of T) tokens must not see key j: j > T − w + i.
pub fn causal_mask(w: i64, t: i64, device: tch::Device) -> Result<Tensor> {
    let cols = Tensor::f_arange(t, (Kind::Int64, device))?;
    let last_visible = Tensor::f_arange_start(t - w, t, (Kind::Int64, device))?;
    Ok(cols
        .f_unsqueeze(0)?
        .f_gt_tensor(&last_visible.f_unsqueeze(1)?)?)
}

/// Mean over each KV head's group of query heads: (batch, q_heads, …) → (batch, kv_heads, …).
pub fn group_mean(x: &Tensor, kv_heads: i64) -> Result<Tensor> {
    let s = x.size();
    let mut grouped = vec![s[0], kv_heads, s[1] / kv_heads];
    grouped.extend_from_slice(&s[2..]);
    Ok(x.f_reshape(grouped.as_slice())?
        .f_mean_dim(2, false, x.kind())?)
}

/// Appends `n` tokens that every selection keeps first: they score the global maximum + 1
/// (kvpress's convention; they tie with each other).
pub fn append_protected(scores: &Tensor, n: i64) -> Result<Tensor> {
    let top = scores.f_max()?.f_double_value(&[])? + 1.0;
    let s = scores.size();
    let protected = Tensor::f_full([s[0], s[1], n], top, (scores.kind(), scores.device()))?;
    Ok(Tensor::f_cat(&[scores, &protected], -1)?)
}
