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

/// 1.5·2^52: adding and subtracting it rounds an f64 of magnitude < 2^51 to the nearest
/// integer (ties to even) without a libm call or a branch, so that the loops vectorize.
const ROUNDER: f64 = 6_755_399_441_055_744.0;

/// The largest |p·θ| (rad) the kernels accept: `round_fast` needs |p·θ/2π| < 2^51, and the
/// f64 angle itself is only exact to ±0.5 rad beyond 2^53; 2^50 rad keeps a margin.
pub const MAX_ANGLE: f64 = 1_125_899_906_842_624.0;

/// x rounded to the nearest integer, for |x| < 2^51.
#[inline(always)]
fn round_fast(x: f64) -> f64 {
    (x + ROUNDER) - ROUNDER
}

/// 2π split for Cody–Waite reduction: `TWO_PI_HI` has 30 significant bits, so k·TWO_PI_HI
/// is exact for |k| < 2^23 turns; `TWO_PI_LO` = 2π − `TWO_PI_HI` to f64 precision.
const TWO_PI_HI: f64 = 6.283185303211212;
const TWO_PI_LO: f64 = 3.968374318722162e-9;

/// p·θ reduced to [−π, π] (|p·θ| ≤ [`MAX_ANGLE`]), in f64. The product carries its f64
/// rounding (≈ 1e-16·|p·θ|); the reduction adds almost nothing up to 5·10⁷ rad.
#[inline(always)]
pub fn reduced_angle(p: i64, theta: f64) -> f64 {
    reduce(p as f64 * theta)
}

/// An angle (|a| ≤ [`MAX_ANGLE`]) reduced to [−π, π].
#[inline(always)]
pub fn reduce(a: f64) -> f64 {
    let k = round_fast(a * (1.0 / TWO_PI));
    (a - k * TWO_PI_HI) - k * TWO_PI_LO
}

/// (sin a, cos a) for a reduced angle |a| ≤ π (up to 2.2·π/2 is fine), by quadrant
/// reduction to |r| ≤ π/4 and Taylor polynomials of degree 13 and 14 (truncation < 3e-14).
/// No branch, no libm call, no integer conversion: the loops over frequencies vectorize.
/// The tests compare it with libm.
#[inline(always)]
pub fn sin_cos_reduced(a: f64) -> (f64, f64) {
    use std::f64::consts::{FRAC_2_PI, FRAC_PI_2};
    let q = round_fast(a * FRAC_2_PI); // −2, −1, 0, 1 or 2
    let r = a - q * FRAC_PI_2;
    let r2 = r * r;
    let s = r
        * (1.0
            + r2 * (-1.0 / 6.0
                + r2 * (1.0 / 120.0
                    + r2 * (-1.0 / 5040.0
                        + r2 * (1.0 / 362_880.0
                            + r2 * (-1.0 / 39_916_800.0 + r2 * (1.0 / 6_227_020_800.0)))))));
    let c = 1.0
        + r2 * (-0.5
            + r2 * (1.0 / 24.0
                + r2 * (-1.0 / 720.0
                    + r2 * (1.0 / 40_320.0
                        + r2 * (-1.0 / 3_628_800.0
                            + r2 * (1.0 / 479_001_600.0 + r2 * (-1.0 / 87_178_291_200.0)))))));
    // Quadrant q mod 4 = 0, 1, 2, 3 → (s, c), (c, −s), (−s, −c), (−c, s).
    let swap = q.abs() == 1.0;
    let (s, c) = if swap { (c, s) } else { (s, c) };
    let sin_sign = if (-0.5..=1.5).contains(&q) { 1.0 } else { -1.0 };
    let cos_sign = if (-1.5..=0.5).contains(&q) { 1.0 } else { -1.0 };
    (s * sin_sign, c * cos_sign)
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
    let theta_max = inv_freq.iter().fold(0.0f64, |m, &t| m.max(t.abs()));
    if let Some(&far) = p
        .iter()
        .find(|&&v| (v as f64).abs() * theta_max > MAX_ANGLE)
    {
        return Err(crate::error::KvError::invalid(
            "positions",
            format!("position {far} times θ_max {theta_max} exceeds {MAX_ANGLE:e} rad"),
        ));
    }
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
