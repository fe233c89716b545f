//! The attention masks of a layer whose stored tokens differ from what the model's mask
//! describes: after evictions (the model builds one mask for every layer, from the first
//! layer's sizes) and in padded batches (the first `hidden[b]` stored slots of batch row b
//! are padding: the row's pads, or filler slots of a row that keeps fewer tokens).
//!
//! The rebuilt mask covers the stored tokens, then the q new ones: a stored token is
//! visible unless hidden (every stored token precedes every new one); the new tokens'
//! columns are the model's own (causal among themselves, with their padding), or causal
//! when the model gave no mask.

use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// Visible stored slots (batch, stored) as bool: slot j of row b unless j < hidden[b].
fn visible_slots(hidden: &[usize], stored: usize, device: Device) -> Result<Tensor> {
    let h = Tensor::f_from_slice(&hidden.iter().map(|&h| h as i64).collect::<Vec<_>>())?
        .f_to(device)?
        .f_view([-1, 1])?;
    let slots = Tensor::f_arange(stored as i64, (Kind::Int64, device))?.f_view([1, -1])?;
    Ok(slots.f_ge_tensor(&h)?)
}

/// The new tokens' columns (b or 1, 1, q, q): causal among themselves, with their own
/// padding when `new_visible` (batch, q) says which are real; else the model's last q
/// columns, or causal.
fn new_columns(
    mask: Option<&Tensor>,
    new_visible: Option<&Tensor>,
    q: usize,
    device: Device,
) -> Result<Tensor> {
    let causal = || -> Result<Tensor> {
        Ok(Tensor::f_ones([q as i64, q as i64], (Kind::Bool, device))?
            .f_tril(0)?
            .f_view([1, 1, q as i64, q as i64])?)
    };
    let tail = match (new_visible, mask) {
        // the model indexes its 2-D mask by positions that re-rotation moved: not its columns
        (Some(v), _) => causal()?.f_logical_and(&v.f_to(device)?.f_view([-1, 1, 1, q as i64])?)?,
        (None, Some(m)) => {
            let k = m.size()[3];
            return Ok(m.f_narrow(3, k - q as i64, q as i64)?);
        }
        (None, None) => causal()?,
    };
    Ok(match mask {
        Some(m) if m.kind() != Kind::Bool => Tensor::f_zeros([1], (m.kind(), device))?
            .f_masked_fill(&tail.f_logical_not()?, finfo_min(m.kind()))?,
        _ => tail,
    })
}

/// The model's 4-D mask (b or 1, 1, q, k) refitted to `total` stored keys (the q new
/// ones last), with row b's first `hidden[b]` slots masked; in the model mask's dtype (bool,
/// or additive float with the dtype's minimum where masked). `hidden` empty or all zero:
/// every stored token visible. `new_visible` (batch, q): which new tokens are real, when
/// the forward's 2-D mask said so.
pub fn refit(
    mask: Option<&Tensor>,
    hidden: &[usize],
    new_visible: Option<&Tensor>,
    total: usize,
    q: usize,
    device: Device,
) -> Result<Tensor> {
    let stored = total - q;
    let tail = new_columns(mask, new_visible, q, device)?;
    let padded = hidden.iter().any(|&h| h > 0);
    let batch = if padded {
        hidden.len() as i64
    } else {
        tail.size()[0]
    };
    let head = if padded {
        visible_slots(hidden, stored, device)?
            .f_view([batch, 1, 1, stored as i64])?
            .f_expand([batch, 1, q as i64, stored as i64], false)?
    } else {
        Tensor::f_ones([batch, 1, q as i64, stored as i64], (Kind::Bool, device))?
    };
    let tail = tail.f_expand([batch, 1, q as i64, q as i64], false)?;
    let kind = tail.kind();
    let head = if kind == Kind::Bool {
        head
    } else {
        let zeros = Tensor::f_zeros([1], (kind, device))?;
        zeros.f_masked_fill(&head.f_logical_not()?, finfo_min(kind))?
    };
    Ok(Tensor::f_cat(&[head, tail], 3)?)
}

/// A 4-D model mask as the quantized kernels' bool (b or 1, q, k) mask of visible keys.
pub fn visible_keys(mask: &Tensor) -> Result<Tensor> {
    let visible = if mask.kind() == Kind::Bool {
        mask.shallow_clone()
    } else {
        mask.f_gt(finfo_min(mask.kind()))?
    };
    Ok(if visible.dim() == 4 {
        visible.f_select(1, 0)?
    } else {
        visible
    })
}

/// The most negative finite value of a float dtype (`torch.finfo(dtype).min`): what
/// transformers writes where an additive mask hides a key.
pub fn finfo_min(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}
