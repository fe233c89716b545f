//! The rotation itself: y = scale · R(sign · p) x on the rotary channels of every
//! (batch, head, token) row, the other channels copied. Two implementations of the same
//! math: a fused CPU kernel over strided `ndarray` views (no copy of the input, one pass,
//! one output allocation) and libtorch ops for every other device.
//!
//! Precision: angles in f64, reduced modulo 2π ([`super::angles`]); the rotation of f32
//! tensors in f64, of f16/bf16 tensors in f32; the result cast to the tensor's dtype once.
//!
//! Speed: when the positions take fewer distinct values than there are rows (one delta for a
//! whole chunk, positions shared by heads, re-rotation deltas i − p_i, which span at most the
//! sequence), cos/sin are tabulated once per value in [min, max]; otherwise they are
//! computed per row with a branch-free polynomial. The row loops run over slices so that
//! they vectorize.

use super::angles::{angle_device, angles_libtorch, reduce, sin_cos_reduced, MAX_ANGLE};
use super::Layout;
use crate::error::{KvError, Result};
use crate::tensor::{array_view, array_view_mut, bf16_round, kind_name, kind_of, KvFloat};
use half::{bf16, f16};
use ndarray::{ArrayView3, ArrayView4};
use rayon::prelude::*;
use std::ops::{Add, Mul, Neg, Sub};
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

/// The arithmetic type a rotation runs in (f64 for f32 tensors, f32 for halves).
pub trait Accumulator:
    Copy
    + Send
    + Sync
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Neg<Output = Self>
{
    fn from_f64(v: f64) -> Self;
}

impl Accumulator for f64 {
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
}

impl Accumulator for f32 {
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
}

/// A tensor element with the type its rotation is computed in.
pub trait RotElement: KvFloat + StoreFrom<Self::Acc> {
    type Acc: Accumulator;
    fn load(self) -> Self::Acc;
    /// Rounds once to the element type (to nearest, ties to even).
    fn store(v: Self::Acc) -> Self {
        Self::store_from(v)
    }
}

/// An output element that rotations computed in `A` are written as: the input's own type,
/// or float32 for halves (their rotation's precision, unrounded).
pub trait StoreFrom<A>: KvFloat {
    fn store_from(v: A) -> Self;
}

impl StoreFrom<f64> for f32 {
    #[inline(always)]
    fn store_from(v: f64) -> f32 {
        v as f32
    }
}

impl StoreFrom<f32> for f32 {
    #[inline(always)]
    fn store_from(v: f32) -> f32 {
        v
    }
}

impl StoreFrom<f32> for f16 {
    #[inline(always)]
    fn store_from(v: f32) -> f16 {
        f16::from_f32(v)
    }
}

impl StoreFrom<f32> for bf16 {
    #[inline(always)]
    fn store_from(v: f32) -> bf16 {
        bf16_round(v)
    }
}

impl RotElement for f32 {
    type Acc = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self as f64
    }
}

impl RotElement for f16 {
    type Acc = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
}

impl RotElement for bf16 {
    type Acc = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        // bf16 is the upper half of an f32: exact for every value (NaN payloads included),
        // and a plain shift, so the loops vectorize.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Rotates one row given the (c, s) of each frequency.
#[inline(always)]
fn rotate_row<T: RotElement, O: StoreFrom<T::Acc>>(
    xs: &[T],
    out: &mut [O],
    c: &[T::Acc],
    s: &[T::Acc],
    layout: Layout,
) {
    let n = c.len();
    let (rot_out, pass_out) = out.split_at_mut(2 * n);
    let (rot_in, pass_in) = xs.split_at(2 * n);
    match layout {
        Layout::RotateHalf => {
            let (o1, o2) = rot_out.split_at_mut(n);
            let (x1, x2) = rot_in.split_at(n);
            for ((((o1, o2), (&a, &b)), &c), &s) in o1
                .iter_mut()
                .zip(o2.iter_mut())
                .zip(x1.iter().zip(x2))
                .zip(c)
                .zip(s)
            {
                let (a, b) = (a.load(), b.load());
                *o1 = O::store_from(a * c - b * s);
                *o2 = O::store_from(b * c + a * s);
            }
        }
        Layout::Interleaved => {
            for (((o, x), &c), &s) in rot_out
                .chunks_exact_mut(2)
                .zip(rot_in.chunks_exact(2))
                .zip(c)
                .zip(s)
            {
                let (a, b) = (x[0].load(), x[1].load());
                o[0] = O::store_from(a * c - b * s);
                o[1] = O::store_from(b * c + a * s);
            }
        }
    }
    // exact: a load widens, and storing to the input's type or float32 rounds nothing
    for (o, &x) in pass_out.iter_mut().zip(pass_in) {
        *o = O::store_from(x.load());
    }
}

/// Fills `c`, `s` with (scale·cos, sign·scale·sin) of every frequency at position `p`:
/// a loop without branches or libm calls, so it vectorizes.
#[inline(always)]
fn fill_cis<A: Accumulator>(p: i64, rot: &Rotation<'_>, c: &mut [A], s: &mut [A]) {
    let p = p as f64;
    let (scale, sin_scale) = (rot.scale, rot.sign * rot.scale);
    for ((c, s), &theta) in c.iter_mut().zip(s.iter_mut()).zip(rot.inv_freq) {
        let (sn, cs) = sin_cos_reduced(reduce(p * theta));
        *c = A::from_f64(cs * scale);
        *s = A::from_f64(sn * sin_scale);
    }
}

/// Rows handled by one parallel task.
const ROWS_PER_TASK: usize = 64;

/// The instruction set the row loops are compiled for, chosen once per call at run time
/// (the crate is built for baseline x86-64; AVX2 doubles the vector width). Both versions
/// run the same code without fused multiply-adds, so results are bit-identical.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Simd {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Simd::Avx2;
        }
        Simd::Baseline
    }
}

/// cos and sin per position value, `rotary_dim/2` entries per value.
struct CisTable<A> {
    cos: Vec<A>,
    sin: Vec<A>,
}

/// The rows of one rotation: input view, positions, cos/sin table (if any).
struct Rows<'a, T: RotElement> {
    x: ArrayView4<'a, T>,
    pos: ArrayView3<'a, i64>,
    rot: &'a Rotation<'a>,
    /// cos/sin per position value in lo..=hi.
    table: Option<&'a CisTable<T::Acc>>,
    lo: i64,
}

/// Per-task buffers: cos/sin of the current row (without a table), a copied input row
/// (when head_dim is strided).
struct Scratch<T: RotElement> {
    c: Vec<T::Acc>,
    s: Vec<T::Acc>,
    x: Vec<T>,
}

impl<T: RotElement> Rows<'_, T> {
    /// Rotates the rows first_row.. into `chunk` (whole rows of the contiguous output).
    #[inline(always)]
    fn run<O: StoreFrom<T::Acc>>(
        &self,
        first_row: usize,
        chunk: &mut [O],
        scratch: &mut Scratch<T>,
    ) {
        let (_, h, t, d) = self.x.dim();
        let (pb, ph, pt) = self.pos.dim();
        let n = self.rot.inv_freq.len();
        let xs = self.x.strides();
        let (s0, s1, s2, s3) = (xs[0], xs[1], xs[2], xs[3]);
        for (k, orow) in chunk.chunks_exact_mut(d).enumerate() {
            let row = first_row + k;
            let (bi, hi, ti) = (row / (h * t), (row / t) % h, row % t);
            let at = (
                if pb == 1 { 0 } else { bi },
                if ph == 1 { 0 } else { hi },
                if pt == 1 { 0 } else { ti },
            );
            // SAFETY: each index is below the corresponding size of `pos` (0 when the size
            // is 1, else below b, h or t, which that size equals).
            let p = unsafe { *self.pos.uget(at) };
            let (c, s): (&[T::Acc], &[T::Acc]) = match self.table {
                Some(table) => {
                    let at = (p - self.lo) as usize * n;
                    (&table.cos[at..at + n], &table.sin[at..at + n])
                }
                None => {
                    fill_cis(p, self.rot, &mut scratch.c, &mut scratch.s);
                    (&scratch.c, &scratch.s)
                }
            };
            let first = bi as isize * s0 + hi as isize * s1 + ti as isize * s2;
            // SAFETY: (bi, hi, ti, j) is in bounds of `x` for every j < d, and the view
            // (which borrows the tensor) describes valid memory with these strides.
            let xrow: &[T] = unsafe {
                let start = self.x.as_ptr().offset(first);
                if s3 == 1 {
                    std::slice::from_raw_parts(start, d)
                } else {
                    scratch.x.clear();
                    scratch
                        .x
                        .extend((0..d).map(|j| *start.offset(j as isize * s3)));
                    &scratch.x
                }
            };
            rotate_row(xrow, orow, c, s, self.rot.layout);
        }
    }

    fn run_with<O: StoreFrom<T::Acc>>(
        &self,
        simd: Simd,
        first_row: usize,
        chunk: &mut [O],
        scratch: &mut Scratch<T>,
    ) {
        match simd {
            Simd::Baseline => self.run(first_row, chunk, scratch),
            // SAFETY: AVX2 was detected on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { run_avx2(self, first_row, chunk, scratch) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2<T: RotElement, O: StoreFrom<T::Acc>>(
    rows: &Rows<'_, T>,
    first_row: usize,
    chunk: &mut [O],
    scratch: &mut Scratch<T>,
) {
    rows.run(first_row, chunk, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_cis_avx2<A: Accumulator>(p: i64, rot: &Rotation<'_>, c: &mut [A], s: &mut [A]) {
    fill_cis(p, rot, c, s)
}

fn fill_cis_with<A: Accumulator>(simd: Simd, p: i64, rot: &Rotation<'_>, c: &mut [A], s: &mut [A]) {
    match simd {
        Simd::Baseline => fill_cis(p, rot, c, s),
        // SAFETY: AVX2 was detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { fill_cis_avx2(p, rot, c, s) },
    }
}

/// The CPU kernel: `out[b, h, t] = rotation of x[b, h, t]` by the angle of
/// `pos[b|0, h|0, t|0]` (`pos` sizes are full or 1); `out` is contiguous.
fn rotate_view<T: RotElement, O: StoreFrom<T::Acc>>(
    x: ArrayView4<'_, T>,
    pos: ArrayView3<'_, i64>,
    out: &mut [O],
    rot: &Rotation<'_>,
) -> Result<()> {
    rotate_view_with(Simd::detect(), x, pos, out, rot)
}

fn rotate_view_with<T: RotElement, O: StoreFrom<T::Acc>>(
    simd: Simd,
    x: ArrayView4<'_, T>,
    pos: ArrayView3<'_, i64>,
    out: &mut [O],
    rot: &Rotation<'_>,
) -> Result<()> {
    let (b, h, t, d) = x.dim();
    let rows = b * h * t;
    let n = rot.inv_freq.len();
    if rows == 0 {
        return Ok(());
    }
    let (lo, hi) = pos
        .iter()
        .fold((i64::MAX, i64::MIN), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    let theta_max = rot.inv_freq.iter().fold(0.0f64, |m, &t| m.max(t.abs()));
    let largest = (lo as f64).abs().max((hi as f64).abs());
    if largest * theta_max > MAX_ANGLE {
        return Err(KvError::invalid(
            "positions",
            format!(
                "|position| up to {largest:e} times θ_max {theta_max} exceeds {MAX_ANGLE:e} rad: \
                 beyond that, float64 angles lose integer exactness"
            ),
        ));
    }
    // Tabulate cos/sin per distinct position value when there are far fewer values than rows.
    let span = hi as i128 - lo as i128 + 1;
    let table = (2 * span <= rows as i128).then(|| {
        let span = span as usize;
        let mut cos = vec![T::Acc::default(); span * n];
        let mut sin = vec![T::Acc::default(); span * n];
        cos.par_chunks_mut(n)
            .zip(sin.par_chunks_mut(n))
            .enumerate()
            .for_each(|(v, (c, s))| fill_cis_with(simd, lo + v as i64, rot, c, s));
        CisTable { cos, sin }
    });
    let job = Rows {
        x,
        pos,
        rot,
        table: table.as_ref(),
        lo,
    };
    let strided = job.x.strides()[3] != 1;
    out.par_chunks_mut(d * ROWS_PER_TASK)
        .enumerate()
        .for_each_init(
            || {
                let buffers = if job.table.is_some() { 0 } else { n };
                Scratch {
                    c: vec![T::Acc::default(); buffers],
                    s: vec![T::Acc::default(); buffers],
                    x: Vec::with_capacity(if strided { d } else { 0 }),
                }
            },
            |scratch, (task, chunk)| job.run_with(simd, task * ROWS_PER_TASK, chunk, scratch),
        );
    Ok(())
}

fn rotate_cpu_typed<T: RotElement, O: StoreFrom<T::Acc>>(
    x: &Tensor,
    pos: &Tensor,
    rot: &Rotation<'_>,
) -> Result<Tensor> {
    let mut out = Tensor::f_empty(x.size(), (O::KIND, Device::Cpu))?;
    let xv = array_view::<T, ndarray::Ix4>(x, "x")?;
    let pv = array_view::<i64, ndarray::Ix3>(pos, "positions")?;
    let mut ov = array_view_mut::<O, ndarray::Ix4>(&mut out, "out")?;
    let slice = ov
        .as_slice_mut()
        .ok_or_else(|| KvError::invalid("out", "an output tensor must be contiguous"))?;
    rotate_view(xv, pv, slice, rot)?;
    Ok(out)
}

/// The CPU kernel over tensors: `x` a float CPU tensor (batch, heads, tokens, head_dim),
/// any strides; `pos` int64 (B|1, H|1, T|1). Returns a new contiguous tensor of `x`'s
/// dtype, or float32 when `float32_out` (halves' rotation then is not rounded).
pub fn rotate_cpu(
    x: &Tensor,
    pos: &Tensor,
    rot: &Rotation<'_>,
    float32_out: bool,
) -> Result<Tensor> {
    let pos = pos.f_to_device(Device::Cpu)?;
    match (kind_of(x, "x")?, float32_out) {
        (Kind::Float, _) => rotate_cpu_typed::<f32, f32>(x, &pos, rot),
        (Kind::Half, false) => rotate_cpu_typed::<f16, f16>(x, &pos, rot),
        (Kind::Half, true) => rotate_cpu_typed::<f16, f32>(x, &pos, rot),
        (Kind::BFloat16, false) => rotate_cpu_typed::<bf16, bf16>(x, &pos, rot),
        (Kind::BFloat16, true) => rotate_cpu_typed::<bf16, f32>(x, &pos, rot),
        (other, _) => Err(KvError::dtype(
            "x",
            kind_name(other),
            "torch.float32, torch.float16 or torch.bfloat16",
        )),
    }
}

/// The same rotation with libtorch ops on the device of `x` (what CUDA tensors take).
pub fn rotate_libtorch(
    x: &Tensor,
    pos: &Tensor,
    rot: &Rotation<'_>,
    float32_out: bool,
) -> Result<Tensor> {
    let device = x.device();
    let kind = kind_of(x, "x")?;
    // f32 tensors rotate in f64 (except on MPS, which has no f64), halves in f32.
    let acc = if kind == Kind::Float && angle_device(device) == device {
        Kind::Double
    } else {
        Kind::Float
    };
    let n = rot.inv_freq.len() as i64;
    let rd = 2 * n;
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
        Layout::RotateHalf => (xr.f_narrow(-1, 0, n)?, xr.f_narrow(-1, n, n)?),
        Layout::Interleaved => {
            let pairs = xr.f_unflatten(-1, [n, 2])?;
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
    let out = if float32_out { Kind::Float } else { kind };
    Ok(y.f_to_kind(out)?.f_contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomial_sin_cos_matches_libm() {
        let mut worst: f64 = 0.0;
        for i in 0..=200_000 {
            let a = -3.2 + 6.4 * i as f64 / 200_000.0;
            let (s, c) = sin_cos_reduced(a);
            worst = worst.max((s - a.sin()).abs()).max((c - a.cos()).abs());
        }
        assert!(worst < 1e-13, "{worst:e}");
        // Large products reduce exactly as far as f64 allows.
        for &(p, theta) in &[(1_000_003i64, 1.0), (123_456_789, 0.316), (-77, 0.5)] {
            let a = super::super::angles::reduced_angle(p, theta);
            assert!(a.abs() <= std::f64::consts::PI);
            assert!((a.sin() - (p as f64 * theta).sin()).abs() < 1e-9);
        }
    }

    /// The AVX2 build of the loops gives bit-identical results to the baseline build.
    #[test]
    fn simd_variants_agree_bitwise() {
        let simd = Simd::detect();
        let inv: Vec<f64> = (0..8).map(|f| 1e4f64.powf(-(f as f64) / 8.0)).collect();
        for layout in [Layout::RotateHalf, Layout::Interleaved] {
            let rot = Rotation {
                inv_freq: &inv,
                sign: -1.0,
                scale: 1.3,
                layout,
            };
            let x: Vec<f32> = (0..2 * 3 * 50 * 20)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let x = ndarray::ArrayView4::from_shape((2, 3, 50, 20), &x).unwrap();
            let xb = ndarray::ArrayView4::from_shape((2, 3, 50, 20), &xb).unwrap();
            let shared = ndarray::Array3::from_shape_fn((1, 1, 50), |(_, _, t)| t as i64 * 1000);
            let per_row = ndarray::Array3::from_shape_fn((2, 3, 50), |(b, h, t)| {
                (b * 7919 + h * 104_729 + t * 1_299_709) as i64 - 500_000
            });
            for pos in [shared.view(), per_row.view()] {
                let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
                rotate_view_with(Simd::Baseline, x, pos, &mut a, &rot).unwrap();
                rotate_view_with(simd, x, pos, &mut b, &rot).unwrap();
                assert_eq!(a, b);
                let (mut a, mut b) = (vec![bf16::ZERO; x.len()], vec![bf16::ZERO; x.len()]);
                rotate_view_with(Simd::Baseline, xb, pos, &mut a, &rot).unwrap();
                rotate_view_with(simd, xb, pos, &mut b, &rot).unwrap();
                assert_eq!(a, b);
            }
        }
    }
}
