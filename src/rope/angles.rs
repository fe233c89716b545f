//! Rotation angles p·θ_f: computed in f64 and reduced modulo 2π before any cos/sin, so that
//! large positions keep their relative-position exactness whatever the tensor dtype.
//!
//! In f64 the product p·θ_f carries a relative error of about 1e-16, i.e. 1e-10 rad at
//! p = 10⁶; an f32 angle (what transformers computes) is off by up to |p·θ_f|·6e-8 rad
//! (0.06 rad at p = 10⁶), and a bf16 one by |p·θ_f|·4e-3.

use super::Layout;
use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// 2π in f64.
pub const TWO_PI: f64 = std::f64::consts::TAU;

/// p·θ reduced to [−π, π], in f64.
#[inline(always)]
pub fn reduced_angle(p: i64, theta: f64) -> f64 {
    let a = p as f64 * theta;
    a - (a / TWO_PI).round() * TWO_PI
}

/// The channel of a rotary slot j (0 ≤ j < rotary_dim) pairs with frequency
/// `frequency_of(j)`: j mod F for rotate-half, j / 2 for interleaved (F = rotary_dim / 2).
#[inline(always)]
pub fn frequency_of(layout: Layout, j: usize, n_freq: usize) -> usize {
    match layout {
        Layout::RotateHalf => j % n_freq,
        Layout::Interleaved => j / 2,
    }
}

/// cos and sin of the reduced angles, times `scale`, as float32 tensors of shape
/// positions.shape + (rotary_dim,), laid out per channel as the rotation uses them
/// (transformers' layout for rotate-half: `cat(freqs, freqs)`). CPU tensors are computed
/// here in Rust; others with libtorch ops on their device.
pub fn cos_sin(
    positions: &Tensor,
    inv_freq: &[f64],
    scale: f64,
    layout: Layout,
    on_cpu: bool,
) -> Result<(Tensor, Tensor)> {
    if on_cpu {
        cos_sin_cpu(positions, inv_freq, scale, layout)
    } else {
        cos_sin_libtorch(positions, inv_freq, scale, layout)
    }
}

fn cos_sin_cpu(
    positions: &Tensor,
    inv_freq: &[f64],
    scale: f64,
    layout: Layout,
) -> Result<(Tensor, Tensor)> {
    use rayon::prelude::*;
    let flat = positions
        .f_to_kind(Kind::Int64)?
        .f_contiguous()?
        .f_reshape([-1])?;
    let p = Vec::<i64>::try_from(&flat)?;
    let f = inv_freq.len();
    let d = 2 * f;
    let mut cos = vec![0f32; p.len() * d];
    let mut sin = vec![0f32; p.len() * d];
    cos.par_chunks_mut(d.max(1))
        .zip(sin.par_chunks_mut(d.max(1)))
        .zip(p.par_iter())
        .for_each(|((c, s), &pos)| {
            for j in 0..d {
                let (sj, cj) = reduced_angle(pos, inv_freq[frequency_of(layout, j, f)]).sin_cos();
                c[j] = (cj * scale) as f32;
                s[j] = (sj * scale) as f32;
            }
        });
    let mut shape = positions.size();
    shape.push(d as i64);
    Ok((
        Tensor::from_slice(&cos).f_reshape(&shape)?,
        Tensor::from_slice(&sin).f_reshape(&shape)?,
    ))
}

/// The device angles are computed on: the tensor's own, except MPS (no float64 there).
pub fn angle_device(device: Device) -> Device {
    match device {
        Device::Mps => Device::Cpu,
        other => other,
    }
}

/// Reduced angles p·θ_f as a float64 tensor of shape positions.shape + (F,), computed on
/// `angle_device(device)` with libtorch ops.
pub fn angles_libtorch(positions: &Tensor, inv_freq: &[f64], device: Device) -> Result<Tensor> {
    let dev = angle_device(device);
    let theta = Tensor::from_slice(inv_freq).f_to_device(dev)?;
    let a = positions
        .f_to_device(dev)?
        .f_to_kind(Kind::Double)?
        .f_unsqueeze(-1)?
        .f_mul(&theta)?;
    let turns = a.f_div_scalar(TWO_PI)?.f_round()?;
    Ok(a.f_sub(&turns.f_mul_scalar(TWO_PI)?)?)
}

fn cos_sin_libtorch(
    positions: &Tensor,
    inv_freq: &[f64],
    scale: f64,
    layout: Layout,
) -> Result<(Tensor, Tensor)> {
    let device = positions.device();
    let a = angles_libtorch(positions, inv_freq, device)?;
    let a = match layout {
        Layout::RotateHalf => Tensor::f_cat(&[&a, &a], -1)?,
        Layout::Interleaved => a.f_repeat_interleave_self_int(2, -1, None)?,
    };
    let finish = |t: Tensor| -> Result<Tensor> {
        Ok(t.f_mul_scalar(scale)?
            .f_to_kind(Kind::Float)?
            .f_to_device(device)?)
    };
    Ok((finish(a.f_cos()?)?, finish(a.f_sin()?)?))
}
