//! Quantization through libtorch ops: the path of tensors on CUDA and other devices (and of
//! CPU tensors when the Rust kernels are switched off). Every step mirrors `group.rs`
//! operation by operation, so the codes equal the CPU kernels' bit for bit.

use super::cpu::range_error;
use super::hadamard::fwht_tensor;
use super::layout::TensorLayout;
use super::qtensor::QuantizedTensor;
use super::Grouping;
use crate::error::Result;
use tch::{Kind, Tensor};

pub(crate) fn encode(x: &Tensor, layout: TensorLayout, argument: &str) -> Result<QuantizedTensor> {
    let size = x.size();
    let (b, h, n, d) = (size[0], size[1], size[2], size[3]);
    let g = layout.group_size as i64;
    let groups = layout.groups(n as usize) as i64;
    let mut xf = x.f_to_kind(Kind::Float)?;
    if layout.hadamard {
        xf = fwht_tensor(&xf)?;
    }
    // Every group contiguous along the last axis: (b, h, groups, g).
    let grouped = match layout.grouping {
        Grouping::Token => xf.f_contiguous()?.f_view([b, h, groups, g])?,
        Grouping::Channel => xf
            .f_view([b, h, n / g, g, d])?
            .f_transpose(3, 4)?
            .f_contiguous()?
            .f_view([b, h, groups, g])?,
    };
    let no = layout.outliers as i64;
    let (mn, mx, outliers) = if no > 0 {
        let (_, order) = grouped.f_abs()?.f_sort_stable(true, -1, true)?;
        let (positions, _) = order.f_narrow(-1, 0, no)?.f_sort(-1, false)?;
        let values = grouped.f_gather(-1, &positions, false)?;
        let mask = grouped
            .f_zeros_like()?
            .f_to_kind(Kind::Bool)?
            .f_scatter_value(-1, &positions, 1)?;
        let mn = grouped
            .f_masked_fill(&mask, f64::INFINITY)?
            .f_amin(-1, false)?;
        let mx = grouped
            .f_masked_fill(&mask, f64::NEG_INFINITY)?
            .f_amax(-1, false)?;
        (mn, mx, Some((positions, values, mask)))
    } else {
        (grouped.f_amin(-1, false)?, grouped.f_amax(-1, false)?, None)
    };
    let levels = layout.levels();
    let zero = f16_down(&mn)?;
    let zf = zero.f_to_kind(Kind::Float)?;
    let scale = f16_up(&mx.f_sub(&zf)?.f_mul_scalar((1.0 / levels) as f64)?)?;
    let finite = zero
        .f_isfinite()?
        .f_logical_and(&scale.f_isfinite()?)?
        .f_all()?;
    if finite.f_int64_value(&[])? == 0 {
        return Err(range_error(argument));
    }
    let sf = scale.f_to_kind(Kind::Float)?;
    let inv = sf
        .f_reciprocal()?
        .f_where_self(&sf.f_gt(0.0)?, &sf.f_zeros_like()?)?;
    let mut codes = grouped
        .f_sub(&zf.f_unsqueeze(-1)?)?
        .f_mul(&inv.f_unsqueeze(-1)?)?
        .f_round()?
        .f_clamp(0.0, levels as f64)?;
    if let Some((_, _, mask)) = &outliers {
        codes = codes.f_masked_fill(mask, 0.0)?;
    }
    let codes = pack(&codes.f_to_kind(Kind::Uint8)?, layout.bits)?
        .f_contiguous()?
        .f_view([b, h, groups * layout.group_bytes() as i64])?;
    let params = Tensor::f_stack(&[scale, zero], -1)?;
    let outliers = match outliers {
        Some((positions, values, _)) => Some((
            positions.f_to_kind(Kind::Uint8)?,
            values.f_to_kind(x.kind())?,
        )),
        None => None,
    };
    Ok(QuantizedTensor {
        layout,
        batch: b as usize,
        heads: h as usize,
        tokens: n as usize,
        kind: x.kind(),
        codes,
        params,
        outliers,
    })
}

/// The dequantized tensor as f32 (batch, heads, tokens, head_dim); with `unrotate` false
/// a Hadamard-rotated tensor stays rotated (attention rotates the query instead).
pub(crate) fn decode_f32(q: &QuantizedTensor, unrotate: bool) -> Result<Tensor> {
    let layout = q.layout;
    let (b, h, n) = (q.batch as i64, q.heads as i64, q.tokens as i64);
    let (g, d) = (layout.group_size as i64, layout.head_dim as i64);
    let groups = layout.groups(q.tokens) as i64;
    let packed = q
        .codes
        .f_view([b, h, groups, layout.group_bytes() as i64])?;
    let codes = unpack(&packed, layout.bits, g)?.f_to_kind(Kind::Float)?;
    let params = q.params.f_to_kind(Kind::Float)?;
    let scale = params.f_select(-1, 0)?.f_unsqueeze(-1)?;
    let zero = params.f_select(-1, 1)?.f_unsqueeze(-1)?;
    let mut x = codes.f_mul(&scale)?.f_add(&zero)?;
    if let Some((positions, values)) = &q.outliers {
        x = x.f_scatter(
            -1,
            &positions.f_to_kind(Kind::Int64)?,
            &values.f_to_kind(Kind::Float)?,
        )?;
    }
    let mut x = match layout.grouping {
        Grouping::Token => x.f_view([b, h, n, d])?,
        Grouping::Channel => x
            .f_view([b, h, n / g, d, g])?
            .f_transpose(3, 4)?
            .f_contiguous()?
            .f_view([b, h, n, d])?,
    };
    if layout.hadamard && unrotate {
        x = fwht_tensor(&x)?;
    }
    Ok(x)
}

/// Packs u8 codes (…, g) into (…, g·bits/8) bytes, in the planar layout of `pack.rs`.
pub(crate) fn pack(codes: &Tensor, bits: u32) -> Result<Tensor> {
    let g = *codes.size().last().unwrap_or(&0);
    Ok(match bits {
        8 => codes.shallow_clone(),
        4 => {
            let lo = codes.f_narrow(-1, 0, g / 2)?;
            let hi = codes.f_narrow(-1, g / 2, g / 2)?;
            lo.f_add(&hi.f_mul_scalar(16)?)?
        }
        2 => pack_planes(codes, 4, 2)?,
        3 => {
            let high = codes.f_ge(4)?.f_to_kind(Kind::Uint8)?;
            let low = codes.f_sub(&high.f_mul_scalar(4)?)?;
            Tensor::f_cat(&[pack_planes(&low, 4, 2)?, pack_planes(&high, 8, 1)?], -1)?
        }
        _ => unreachable!("bits validated by QuantConfig"),
    })
}

/// Σ_k plane_k · 2^(k·width) over `planes` planes of the last axis.
fn pack_planes(codes: &Tensor, planes: i64, width: i64) -> Result<Tensor> {
    let size = codes.size();
    let g = *size.last().unwrap_or(&0);
    let mut shape = size[..size.len() - 1].to_vec();
    shape.extend_from_slice(&[planes, g / planes]);
    let v = codes.f_view(shape.as_slice())?;
    let mut out = v.f_select(-2, 0)?.f_contiguous()?;
    for k in 1..planes {
        out = out.f_add(&v.f_select(-2, k)?.f_mul_scalar(1i64 << (k * width))?)?;
    }
    Ok(out)
}

/// Unpacks (…, g·bits/8) bytes into u8 codes (…, g).
pub(crate) fn unpack(packed: &Tensor, bits: u32, g: i64) -> Result<Tensor> {
    Ok(match bits {
        8 => packed.shallow_clone(),
        4 => Tensor::f_cat(
            &[
                packed.f_bitwise_and(15)?,
                packed.f_bitwise_right_shift_tensor_scalar(4)?,
            ],
            -1,
        )?,
        2 => unpack_planes(packed, 4, 2)?,
        3 => {
            let low = unpack_planes(&packed.f_narrow(-1, 0, g / 4)?, 4, 2)?;
            let high = unpack_planes(&packed.f_narrow(-1, g / 4, g / 8)?, 8, 1)?;
            low.f_add(&high.f_mul_scalar(4)?)?
        }
        _ => unreachable!("bits validated by QuantConfig"),
    })
}

fn unpack_planes(packed: &Tensor, planes: i64, width: i64) -> Result<Tensor> {
    let mask = (1i64 << width) - 1;
    let parts = (0..planes)
        .map(|k| {
            Ok(packed
                .f_bitwise_right_shift_tensor_scalar(k * width)?
                .f_bitwise_and(mask)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_cat(&parts, -1)?)
}

/// The largest float16 ≤ each element of an f32 tensor (`group::f16_down`).
fn f16_down(v: &Tensor) -> Result<Tensor> {
    directed(v, true)
}

/// The smallest float16 ≥ each element of an f32 tensor (`group::f16_up`).
fn f16_up(v: &Tensor) -> Result<Tensor> {
    directed(v, false)
}

fn directed(v: &Tensor, down: bool) -> Result<Tensor> {
    let h = v.f_to_kind(Kind::Half)?;
    let hf = h.f_to_kind(Kind::Float)?;
    let bits = h.f_view_dtype(Kind::Int16)?;
    // One float16 step down (up) is −1 (+1) in bit space for positive values, +1 (−1) for
    // negative ones, and the smallest subnormal of the right sign from zero.
    let (need, positive_step, negative_step, at_zero) = if down {
        (hf.f_gt_tensor(v)?, -1i64, 1i64, 0x8001u16 as i16 as i64)
    } else {
        (hf.f_lt_tensor(v)?, 1, -1, 1)
    };
    let positive = bits.f_add_scalar(positive_step)?;
    let negative = bits.f_add_scalar(negative_step)?;
    let zero = bits.f_full_like(at_zero)?;
    let stepped = positive.f_where_self(
        &hf.f_gt(0.0)?,
        &negative.f_where_self(&hf.f_lt(0.0)?, &zero)?,
    )?;
    Ok(stepped
        .f_where_self(&need, &bits)?
        .f_view_dtype(Kind::Half)?)
}
