//! The rotation itself: y = scale · R(sign · p) x on the rotary channels of every
//! (batch, head, token) row, the other channels copied. Two implementations of the same
//! math: a fused CPU kernel over strided `ndarray` views (no copy of the input, one pass,
//! one output allocation) and libtorch ops for every other device.
//!
//! Precision: angles in f64, reduced modulo 2π ([`super::angles`]); the rotation of f32
//! tensors in f64, of f16/bf16 tensors in f32; the result cast to the tensor's dtype once.

use super::angles::{angle_device, angles_libtorch, reduced_angle};
use super::Layout;
use crate::error::Result;
use crate::tensor::{array_view, array_view_mut, kind_of, KvFloat};
use half::{bf16, f16};
use ndarray::{ArrayView3, ArrayView4, ArrayViewMut4, Axis, Zip};
use rayon::prelude::*;
use std::ops::{Add, Mul, Sub};
use tch::{Device, Kind, Tensor};

/// One rotation to perform: by angle sign·p·θ_f, then the rotary channels times `scale`.
#[derive(Clone, Copy, Debug)]
pub struct Rotation<'a> {
    /// θ_f, f = 0..rotary_dim/2.
    pub inv_freq: &'a [f64],
    /// +1: rotate forward (apply, shift); −1: backward (invert).
    pub sign: f64,
    /// Multiplies the rotated channels: attention scaling for apply, its inverse for
    /// invert, 1 for shift.
    pub scale: f64,
    pub layout: Layout,
}

impl Rotation<'_> {
    pub fn rotary_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }
}

/// The arithmetic type a rotation runs in.
pub trait Accumulator:
    Copy + Send + Sync + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self>
{
    /// (scale·cos, sign·scale·sin) of a reduced angle.
    fn cis(angle: f64, sign: f64, scale: f64) -> (Self, Self);
}

impl Accumulator for f64 {
    #[inline(always)]
    fn cis(angle: f64, sign: f64, scale: f64) -> (f64, f64) {
        let (s, c) = angle.sin_cos();
        (c * scale, s * sign * scale)
    }
}

impl Accumulator for f32 {
    #[inline(always)]
    fn cis(angle: f64, sign: f64, scale: f64) -> (f32, f32) {
        // The angle is already reduced to [−π, π]: its f32 rounding costs < 2.4e-7 rad,
        // far below the bf16/f16 resolution of the result.
        let (s, c) = (angle as f32).sin_cos();
        (c * scale as f32, s * (sign * scale) as f32)
    }
}

/// A tensor element with the type its rotation is computed in.
pub trait RotElement: KvFloat {
    type Acc: Accumulator;
    fn load(self) -> Self::Acc;
    fn store(v: Self::Acc) -> Self;
}

impl RotElement for f32 {
    type Acc = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn store(v: f64) -> f32 {
        v as f32
    }
}

macro_rules! half_rot_element {
    ($($t:ty),*) => {$(
        impl RotElement for $t {
            type Acc = f32;
            #[inline(always)]
            fn load(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn store(v: f32) -> $t {
                <$t>::from_f32(v)
            }
        }
    )*};
}
half_rot_element!(f16, bf16);

/// Rotates one row: `x(j)` reads channel j, `cs(f)` gives (c, s) of frequency f.
#[inline(always)]
fn rotate_row<T: RotElement>(
    x: impl Fn(usize) -> T,
    out: &mut [T],
    cs: impl Fn(usize) -> (T::Acc, T::Acc),
    layout: Layout,
    n_freq: usize,
) {
    let mut pair = |f: usize, j1: usize, j2: usize| {
        let (c, s) = cs(f);
        let (a, b) = (x(j1).load(), x(j2).load());
        out[j1] = T::store(a * c - b * s);
        out[j2] = T::store(b * c + a * s);
    };
    match layout {
        Layout::RotateHalf => (0..n_freq).for_each(|f| pair(f, f, f + n_freq)),
        Layout::Interleaved => (0..n_freq).for_each(|f| pair(f, 2 * f, 2 * f + 1)),
    }
    for (j, o) in out.iter_mut().enumerate().skip(2 * n_freq) {
        *o = x(j);
    }
}

/// The CPU kernel: `out[b, h, t] = rotation of x[b, h, t]` by the angle of
/// `pos[b|0, h|0, t|0]`. `pos` has sizes that are either full or 1; when some are 1 the
/// cos/sin of each distinct position are computed once into a table, else inline.
fn rotate_view<T: RotElement>(
    x: ArrayView4<'_, T>,
    pos: ArrayView3<'_, i64>,
    mut out: ArrayViewMut4<'_, T>,
    rot: &Rotation<'_>,
) {
    let (b, h, t, _) = x.dim();
    let (pb, ph, pt) = pos.dim();
    let n_freq = rot.inv_freq.len();
    let (sign, scale, layout, theta) = (rot.sign, rot.scale, rot.layout, rot.inv_freq);
    let pos_index = move |bi: usize, hi: usize, ti: usize| {
        (
            if pb == 1 { 0 } else { bi },
            if ph == 1 { 0 } else { hi },
            if pt == 1 { 0 } else { ti },
        )
    };
    let lanes = Zip::indexed(out.lanes_mut(Axis(3))).and(x.lanes(Axis(3)));
    if pb * ph * pt < b * h * t {
        // Shared positions: one table row of (c, s) per distinct position.
        let mut table = vec![T::Acc::cis(0.0, 1.0, 1.0); pb * ph * pt * n_freq];
        table
            .par_chunks_mut(n_freq.max(1))
            .enumerate()
            .for_each(|(row, cs)| {
                let p = pos[[row / (ph * pt), (row / pt) % ph, row % pt]];
                for (f, v) in cs.iter_mut().enumerate() {
                    *v = T::Acc::cis(reduced_angle(p, theta[f]), sign, scale);
                }
            });
        let table = &table;
        lanes.par_for_each(|(bi, hi, ti), mut o, xi| {
            let (qb, qh, qt) = pos_index(bi, hi, ti);
            let cs = &table[((qb * ph + qh) * pt + qt) * n_freq..][..n_freq];
            let o = o.as_slice_mut().expect("output rows are contiguous");
            match xi.as_slice() {
                Some(xs) => rotate_row(|j| xs[j], o, |f| cs[f], layout, n_freq),
                None => rotate_row(|j| xi[j], o, |f| cs[f], layout, n_freq),
            }
        });
    } else {
        lanes.par_for_each(|(bi, hi, ti), mut o, xi| {
            let p = pos[pos_index(bi, hi, ti)];
            let cs = |f: usize| T::Acc::cis(reduced_angle(p, theta[f]), sign, scale);
            let o = o.as_slice_mut().expect("output rows are contiguous");
            match xi.as_slice() {
                Some(xs) => rotate_row(|j| xs[j], o, cs, layout, n_freq),
                None => rotate_row(|j| xi[j], o, cs, layout, n_freq),
            }
        });
    }
}

fn rotate_cpu_typed<T: RotElement>(x: &Tensor, pos: &Tensor, rot: &Rotation<'_>) -> Result<Tensor> {
    let mut out = Tensor::f_empty(x.size(), (T::KIND, Device::Cpu))?;
    let xv = array_view::<T, ndarray::Ix4>(x, "x")?;
    let pv = array_view::<i64, ndarray::Ix3>(pos, "positions")?;
    let ov = array_view_mut::<T, ndarray::Ix4>(&mut out, "out")?;
    rotate_view(xv, pv, ov, rot);
    Ok(out)
}

/// The CPU kernel over tensors: `x` a float CPU tensor (batch, heads, tokens, head_dim),
/// any strides; `pos` int64 (B|1, H|1, T|1). Returns a new contiguous tensor.
pub fn rotate_cpu(x: &Tensor, pos: &Tensor, rot: &Rotation<'_>) -> Result<Tensor> {
    let pos = pos.f_to_device(Device::Cpu)?;
    match kind_of(x, "x")? {
        Kind::Float => rotate_cpu_typed::<f32>(x, &pos, rot),
        Kind::Half => rotate_cpu_typed::<f16>(x, &pos, rot),
        Kind::BFloat16 => rotate_cpu_typed::<bf16>(x, &pos, rot),
        other => Err(crate::error::KvError::dtype(
            "x",
            crate::tensor::kind_name(other),
            "torch.float32, torch.float16 or torch.bfloat16",
        )),
    }
}

/// The same rotation with libtorch ops on the device of `x` (what CUDA tensors take).
pub fn rotate_libtorch(x: &Tensor, pos: &Tensor, rot: &Rotation<'_>) -> Result<Tensor> {
    let device = x.device();
    let kind = kind_of(x, "x")?;
    // f32 tensors rotate in f64 (except on MPS, which has no f64), halves in f32.
    let acc = if kind == Kind::Float && angle_device(device) == device {
        Kind::Double
    } else {
        Kind::Float
    };
    let n_freq = rot.inv_freq.len() as i64;
    let rd = 2 * n_freq;
    let d = *x.size().last().unwrap_or(&0);
    let angles = angles_libtorch(pos, rot.inv_freq, device)?; // (B|1, H|1, T|1, F) f64
    let c = angles
        .f_cos()?
        .f_mul_scalar(rot.scale)?
        .f_to_kind(acc)?
        .f_to_device(device)?;
    let s = angles
        .f_sin()?
        .f_mul_scalar(rot.sign * rot.scale)?
        .f_to_kind(acc)?
        .f_to_device(device)?;
    let xr = x.f_narrow(-1, 0, rd)?.f_to_kind(acc)?;
    let (x1, x2) = match rot.layout {
        Layout::RotateHalf => (
            xr.f_narrow(-1, 0, n_freq)?,
            xr.f_narrow(-1, n_freq, n_freq)?,
        ),
        Layout::Interleaved => {
            let pairs = xr.f_unflatten(-1, [n_freq, 2])?;
            (pairs.f_select(-1, 0)?, pairs.f_select(-1, 1)?)
        }
    };
    let y1 = x1.f_mul(&c)?.f_sub(&x2.f_mul(&s)?)?;
    let y2 = x2.f_mul(&c)?.f_add(&x1.f_mul(&s)?)?;
    let mut y = match rot.layout {
        Layout::RotateHalf => Tensor::f_cat(&[&y1, &y2], -1)?,
        Layout::Interleaved => Tensor::f_stack(&[&y1, &y2], -1)?.f_flatten(-2, -1)?,
    };
    if rd < d {
        y = Tensor::f_cat(&[&y, &x.f_narrow(-1, rd, d - rd)?.f_to_kind(acc)?], -1)?;
    }
    Ok(y.f_to_kind(kind)?.f_contiguous()?)
}
