//! Gathering kept tokens: out[b, h, i, :] = x[b, h, indices[b, h, i], :].

use crate::error::{KvError, Result};
use crate::tensor::{array_view, kind_of, uses_cpu_kernels, TorchElement, TOKEN_AXIS};
use ndarray::{ArrayView3, ArrayView4, Axis};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Gathers tokens along the token axis of `x` (batch, heads, tokens, dim), or of a rank-3
/// (batch, heads, tokens) tensor, with int64 `indices` of shape (batch, heads, k).
/// Returns a new contiguous tensor (batch, heads, k[, dim]) on `x`'s device.
pub fn gather_tokens(x: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let xs = x.size();
    let is = indices.size();
    if !(xs.len() == 3 || xs.len() == 4) {
        return Err(KvError::shape(
            "x",
            &xs,
            "rank 4 (batch, heads, tokens, dim) or rank 3 (batch, heads, tokens)",
        ));
    }
    if is.len() != 3 || is[0] != xs[0] || is[1] != xs[1] {
        return Err(KvError::shape(
            "indices",
            &is,
            format!("({}, {}, k)", xs[0], xs[1]),
        ));
    }
    let ik = kind_of(indices, "indices")?;
    if ik != Kind::Int64 {
        return Err(KvError::dtype(
            "indices",
            crate::tensor::kind_name(ik),
            "torch.int64",
        ));
    }
    if uses_cpu_kernels(x) {
        let indices = indices.f_to(Device::Cpu)?;
        gather_tokens_cpu_tensor(x, &indices)
    } else {
        gather_tokens_libtorch(x, indices)
    }
}

/// The libtorch path of [`gather_tokens`] (any device).
pub fn gather_tokens_libtorch(x: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let n_tokens = x.size()[TOKEN_AXIS as usize];
    let indices = indices.f_to(x.device())?;
    if indices.numel() > 0 {
        let lo = indices.f_min()?.f_int64_value(&[])?;
        let hi = indices.f_max()?.f_int64_value(&[])?;
        if lo < 0 || hi >= n_tokens {
            return Err(KvError::invalid(
                "indices",
                format!("values must lie in [0, {n_tokens}), got [{lo}, {hi}]"),
            ));
        }
    }
    if x.dim() == 3 {
        return Ok(x.f_gather(TOKEN_AXIS, &indices, false)?);
    }
    let d = x.size()[3];
    let idx = indices.f_unsqueeze(-1)?.f_expand([-1, -1, -1, d], false)?;
    Ok(x.f_gather(TOKEN_AXIS, &idx, false)?)
}

fn gather_tokens_cpu_tensor(x: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let mut size = x.size();
    size[TOKEN_AXIS as usize] = indices.size()[2];
    let kind = kind_of(x, "x")?;
    let mut out = Tensor::f_empty(size.as_slice(), (kind, Device::Cpu))?;
    let idx = array_view::<i64, ndarray::Ix3>(indices, "indices")?;
    match kind {
        Kind::Float => gather_typed::<f32>(x, idx, &mut out),
        Kind::Half => gather_typed::<half::f16>(x, idx, &mut out),
        Kind::BFloat16 => gather_typed::<half::bf16>(x, idx, &mut out),
        Kind::Int => gather_typed::<i32>(x, idx, &mut out),
        Kind::Int64 => gather_typed::<i64>(x, idx, &mut out),
        other => Err(KvError::dtype(
            "x",
            crate::tensor::kind_name(other),
            "a float or integer dtype",
        )),
    }?;
    Ok(out)
}

fn gather_typed<T: TorchElement>(
    x: &Tensor,
    idx: ArrayView3<'_, i64>,
    out: &mut Tensor,
) -> Result<()> {
    let x4: ArrayView4<'_, T> = if x.dim() == 3 {
        array_view::<T, ndarray::Ix3>(x, "x")?.insert_axis(Axis(3))
    } else {
        array_view::<T, ndarray::Ix4>(x, "x")?
    };
    let n = out.numel();
    // SAFETY: `out` is a freshly allocated contiguous CPU tensor of element type T with
    // exactly n elements, exclusively owned here.
    let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut T, n) };
    gather_tokens_cpu(x4, idx, dst)
}

/// The CPU kernel of [`gather_tokens`]: rows (batch, head) in parallel; each kept token's
/// `dim` elements are copied with one slice copy when the last axis is contiguous.
/// `out` is the contiguous (batch, heads, k, dim) destination.
pub fn gather_tokens_cpu<T: Copy + Send + Sync>(
    x: ArrayView4<'_, T>,
    indices: ArrayView3<'_, i64>,
    out: &mut [T],
) -> Result<()> {
    let (b, h, t, d) = x.dim();
    let (ib, ih, k) = indices.dim();
    if (ib, ih) != (b, h) {
        return Err(KvError::shape(
            "indices",
            &[ib as i64, ih as i64, k as i64],
            format!("({b}, {h}, k)"),
        ));
    }
    if out.len() != b * h * k * d {
        return Err(KvError::invalid(
            "out",
            format!("expected {} elements, got {}", b * h * k * d, out.len()),
        ));
    }
    if let Some(&bad) = indices.iter().find(|&&i| i < 0 || i as usize >= t) {
        return Err(KvError::invalid(
            "indices",
            format!("index {bad} is outside [0, {t})"),
        ));
    }
    if k == 0 || d == 0 {
        return Ok(());
    }
    out.par_chunks_mut(k * d)
        .enumerate()
        .for_each(|(row, dst)| {
            let (i, j) = (row / h, row % h);
            let src = x.index_axis(Axis(0), i);
            let src = src.index_axis(Axis(0), j);
            let idx = indices.index_axis(Axis(0), i);
            let idx = idx.index_axis(Axis(0), j);
            for (slot, &tok) in dst.chunks_exact_mut(d).zip(idx.iter()) {
                let token = src.index_axis(Axis(0), tok as usize);
                match token.as_slice() {
                    Some(s) => copy_token(slot, s),
                    None => slot.iter_mut().zip(token.iter()).for_each(|(o, v)| *o = *v),
                }
            }
        });
    Ok(())
}

/// `dst.copy_from_slice(src)`, with the common head sizes as fixed-size copies the compiler
/// inlines (a `memmove` call per 128-byte token costs more than the copy).
#[inline(always)]
fn copy_token<T: Copy>(dst: &mut [T], src: &[T]) {
    fn fixed<T: Copy, const N: usize>(dst: &mut [T], src: &[T]) -> bool {
        match (<&mut [T; N]>::try_from(dst), <&[T; N]>::try_from(src)) {
            (Ok(d), Ok(s)) => {
                *d = *s;
                true
            }
            _ => false,
        }
    }
    if !(fixed::<T, 64>(dst, src) || fixed::<T, 128>(dst, src)) {
        dst.copy_from_slice(src);
    }
}
