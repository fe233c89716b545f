//! Attention over a quantized store with libtorch ops (devices other than the CPU, and the
//! CPU with the Rust kernels switched off). Blocks are dequantized one at a time (keys for
//! the scores, then values for the weighted sum), never all at once; the tokens kept by
//! evictions (ragged tiles) are dequantized as one more block; softmax in f32.

use super::AttendInputs;
use crate::error::Result;
use crate::quant::hadamard::fwht_tensor;
use crate::quant::libtorch::decode_f32;
use crate::quant::store::QuantizedStore;
use tch::{Kind, Tensor};

/// As the CPU kernel: the f32 output (batch, q_len, q_heads, value head_dim) and the
/// log-sum-exp of each query row's scores (batch, q_len, q_heads).
pub(super) fn attend(
    store: &QuantizedStore,
    inputs: &AttendInputs<'_>,
) -> Result<(Tensor, Tensor)> {
    let inp = &inputs.dims;
    let (b, h, rep, qn) = (
        inp.batch as i64,
        inp.kv_heads as i64,
        inp.n_rep as i64,
        inp.q_len as i64,
    );
    let rows = rep * qn;
    let (dk, dv, seen) = (inp.key_dim as i64, inp.value_dim as i64, inp.seen as i64);
    let hadamard = store.config().hadamard;
    let rotated_keys = store.scores_keys_in_hadamard_basis();
    // Hadamard-rotated pre-RoPE keys: rotated back before RoPE, scored against the plain query.
    let unrotate_keys = hadamard && !rotated_keys;
    // (b, q_heads, q, dk) -> (b, kv_heads, rows, dk) with row j·q + i.
    let q = inputs
        .query
        .f_to_kind(Kind::Float)?
        .f_mul_scalar(inputs.scaling as f64)?
        .f_view([b, h, rep, qn, dk])?
        .f_reshape([b, h, rows, dk])?;
    let q_rot = if rotated_keys {
        fwht_tensor(&q)?
    } else {
        q.shallow_clone()
    };

    let mut scores = Vec::new();
    if let Some(s) = store.sinks().filter(|s| s.len > 0) {
        let k = s.view()?.0.f_to_kind(Kind::Float)?;
        scores.push(q.f_matmul(&k.f_transpose(-1, -2)?)?);
    }
    // Tokens kept by evictions: one dequantized tensor (like one block).
    let ragged = match store.ragged() {
        Some(r) => {
            let (k, v) = store.ragged_keys_values(r, false)?;
            let k = if unrotate_keys { fwht_tensor(&k)? } else { k };
            let k = store.rotate_ragged_keys(&k, r)?;
            scores.push(q_rot.f_matmul(&k.f_transpose(-1, -2)?)?);
            Some((v, r.len as i64))
        }
        None => None,
    };
    for block in store.blocks() {
        let k = store.rotate_block_keys(&decode_f32(&block.keys, unrotate_keys)?, block)?;
        scores.push(q_rot.f_matmul(&k.f_transpose(-1, -2)?)?);
    }
    if let Some(r) = store.residual().filter(|r| r.len > 0) {
        let k = r.view()?.0.f_to_kind(Kind::Float)?;
        scores.push(q.f_matmul(&k.f_transpose(-1, -2)?)?);
    }
    let scores = Tensor::f_cat(&scores, -1)?;

    let device = scores.device();
    let allowed = match inputs.mask {
        Some(m) => Some(m.f_repeat([1, rep, 1])?.f_unsqueeze(1)?),
        None if qn > 1 => {
            let t = Tensor::f_arange(seen, (Kind::Int64, device))?.f_view([1, seen])?;
            let limit = Tensor::f_arange_start(seen - qn + 1, seen + 1, (Kind::Int64, device))?
                .f_view([qn, 1])?;
            Some(
                t.f_lt_tensor(&limit)?
                    .f_repeat([rep, 1])?
                    .f_view([1, 1, rows, seen])?,
            )
        }
        None => None,
    };
    let scores = match &allowed {
        Some(a) => scores.f_masked_fill(&a.f_logical_not()?, f64::NEG_INFINITY)?,
        None => scores,
    };
    let lse = scores
        .f_logsumexp(&[-1i64][..], false)?
        .f_view([b, h, rep, qn])?
        .f_permute([0, 3, 1, 2])?
        .f_reshape([b, qn, h * rep])?;
    // Rows that may see nothing give NaN in softmax: they output zeros instead.
    let p = scores
        .f_softmax(-1, Kind::Float)?
        .f_nan_to_num(0.0, None, None)?;

    let mut out_full = Tensor::f_zeros([b, h, rows, dv], (Kind::Float, device))?;
    let mut out_quant = Tensor::f_zeros([b, h, rows, dv], (Kind::Float, device))?;
    let mut offset = 0i64;
    if let Some(s) = store.sinks().filter(|s| s.len > 0) {
        let v = s.view()?.1.f_to_kind(Kind::Float)?;
        let n = s.len as i64;
        out_full = out_full.f_add(&p.f_narrow(-1, offset, n)?.f_matmul(&v)?)?;
        offset += n;
    }
    if let Some((v, n)) = &ragged {
        out_quant = out_quant.f_add(&p.f_narrow(-1, offset, *n)?.f_matmul(v)?)?;
        offset += n;
    }
    for block in store.blocks() {
        let v = decode_f32(&block.values, false)?;
        let n = block.values.tokens() as i64;
        out_quant = out_quant.f_add(&p.f_narrow(-1, offset, n)?.f_matmul(&v)?)?;
        offset += n;
    }
    if let Some(r) = store.residual().filter(|r| r.len > 0) {
        let v = r.view()?.1.f_to_kind(Kind::Float)?;
        let n = r.len as i64;
        out_full = out_full.f_add(&p.f_narrow(-1, offset, n)?.f_matmul(&v)?)?;
    }
    if hadamard {
        out_quant = fwht_tensor(&out_quant)?;
    }
    let out = out_quant.f_add(&out_full)?;
    let out = out
        .f_view([b, h, rep, qn, dv])?
        .f_permute([0, 3, 1, 2, 4])?
        .f_reshape([b, qn, h * rep, dv])?;
    Ok((out, lse))
}
