//! CPU feature dispatch and vector-friendly math for the quantization kernels.
//!
//! The kernels are written as plain loops over f32 slices that LLVM vectorizes. The crate
//! is compiled for baseline x86-64 (SSE2), so each hot entry point also exists in copies
//! compiled with AVX2+FMA and AVX-512 enabled (`#[target_feature]` wrappers around one
//! `#[inline(always)]` body, see [`multiversion!`](crate::multiversion)); [`level`] picks
//! one at run time. No code uses fused multiply-add explicitly, so every copy computes the
//! same bits: results do not depend on the machine.

use std::sync::OnceLock;

/// The instruction sets a kernel copy may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2,
    Baseline,
}

/// The best level this CPU supports (detected once).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    if std::env::var_os("KVPRESS_RS_BASELINE_KERNELS").is_some() {
        return Level::Baseline;
    }
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        Level::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Level::Avx2
    } else {
        Level::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Baseline
}

/// Whether this CPU multiplies bfloat16 natively (AVX512-BF16; AMX CPUs have it too):
/// then libtorch's bf16 matrix products run several times faster than float32 ones, where
/// elsewhere they are emulated and slower. Kernels that may choose pick bf16 products for
/// bf16 data only here.
pub fn native_bf16_matmul() -> bool {
    static NATIVE: OnceLock<bool> = OnceLock::new();
    *NATIVE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("KVPRESS_RS_BASELINE_KERNELS").is_none()
                && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Defines `$name`, which runs the `#[inline(always)]` function `$body` compiled for the
/// best instruction set of this CPU. `$body`'s first generic parameter is the
/// [`Madd`] flavour: fused multiply-add in the AVX copies, `a·b + c` in the baseline one;
/// the other generic parameters are passed through.
#[macro_export]
macro_rules! multiversion {
    (
        $vis:vis fn $name:ident < $($gen:ident : $bound:path),* ; $(const $cgen:ident : $cty:ty),* >
        ( $($arg:ident : $ty:ty),* $(,)? ) -> $ret:ty => $body:ident
    ) => {
        $vis fn $name<$($gen: $bound),* $(, const $cgen: $cty)*>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                unsafe fn avx512<$($gen: $bound),* $(, const $cgen: $cty)*>($($arg: $ty),*) -> $ret {
                    $body::<$crate::quant::simd::Fused, $($gen),* $(, $cgen)*>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2<$($gen: $bound),* $(, const $cgen: $cty)*>($($arg: $ty),*) -> $ret {
                    $body::<$crate::quant::simd::Fused, $($gen),* $(, $cgen)*>($($arg),*)
                }
                match $crate::quant::simd::level() {
                    // SAFETY: `level()` detected these instruction sets on this CPU.
                    $crate::quant::simd::Level::Avx512 => unsafe { avx512::<$($gen),* $(, $cgen)*>($($arg),*) },
                    $crate::quant::simd::Level::Avx2 => unsafe { avx2::<$($gen),* $(, $cgen)*>($($arg),*) },
                    $crate::quant::simd::Level::Baseline => $body::<$crate::quant::simd::Separate, $($gen),* $(, $cgen)*>($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                $body::<$crate::quant::simd::Separate, $($gen),* $(, $cgen)*>($($arg),*)
            }
        }
    };
}

/// `a·b + c`, fused (one rounding) or not. Kernels whose results must match the libtorch
/// path bit for bit (quantize, dequantize) use [`Separate`] in every copy; the attention
/// kernel uses whichever its copy has ([`Fused`] needs the FMA instruction set: in a copy
/// without it, `mul_add` would be a slow library call).
pub trait Madd: Copy + Send + Sync + 'static {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

#[derive(Clone, Copy, Debug)]
pub struct Fused;

#[derive(Clone, Copy, Debug)]
pub struct Separate;

impl Madd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl Madd for Separate {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `out[r][i] += Σ_k a[r][k] · b[k][n0 + i]` for `i < 16` and `r < R`: a register-blocked
/// block of a small matrix product (`a`: R rows of `k` values, `b`: `k` rows of stride
/// `b_stride`). The accumulators stay in registers across the `k` loop.
#[inline(always)]
pub fn gemm16<M: Madd, const R: usize>(
    a: [&[f32]; R],
    b: &[f32],
    b_stride: usize,
    k: usize,
    n0: usize,
    out: &mut [[f32; 16]; R],
) {
    let mut acc = *out;
    let a: [&[f32]; R] = std::array::from_fn(|r| &a[r][..k]);
    for kk in 0..k {
        let row: &[f32; 16] = match b[kk * b_stride + n0..].first_chunk::<16>() {
            Some(row) => row,
            None => return,
        };
        for r in 0..R {
            let av = a[r][kk];
            for i in 0..16 {
                acc[r][i] = M::madd(av, row[i], acc[r][i]);
            }
        }
    }
    *out = acc;
}

/// `c[r][n] += Σ_k a[r][k] · b[k][n]` for `r < rows`, `n < n_cols`: `a` is rows × k with
/// stride `a_stride`, `b` is k × n_cols with stride `b_stride`, `c` has stride `c_stride`.
/// Blocks of 4 rows × 16 columns through [`gemm16`], a plain loop for leftover columns.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn gemm_acc<M: Madd>(
    a: &[f32],
    a_stride: usize,
    rows: usize,
    k: usize,
    b: &[f32],
    b_stride: usize,
    n_cols: usize,
    c: &mut [f32],
    c_stride: usize,
) {
    let mut r0 = 0;
    while r0 < rows {
        let n = (rows - r0).min(4);
        match n {
            4 => gemm_rows::<M, 4>(a, a_stride, r0, k, b, b_stride, n_cols, c, c_stride),
            3 => gemm_rows::<M, 3>(a, a_stride, r0, k, b, b_stride, n_cols, c, c_stride),
            2 => gemm_rows::<M, 2>(a, a_stride, r0, k, b, b_stride, n_cols, c, c_stride),
            _ => gemm_rows::<M, 1>(a, a_stride, r0, k, b, b_stride, n_cols, c, c_stride),
        }
        r0 += n;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_rows<M: Madd, const R: usize>(
    a: &[f32],
    a_stride: usize,
    r0: usize,
    k: usize,
    b: &[f32],
    b_stride: usize,
    n_cols: usize,
    c: &mut [f32],
    c_stride: usize,
) {
    let arows: [&[f32]; R] = std::array::from_fn(|r| &a[(r0 + r) * a_stride..][..k]);
    let mut n0 = 0;
    while n0 + 16 <= n_cols {
        let mut out: [[f32; 16]; R] = std::array::from_fn(|r| {
            let mut v = [0f32; 16];
            v.copy_from_slice(&c[(r0 + r) * c_stride + n0..][..16]);
            v
        });
        gemm16::<M, R>(arows, b, b_stride, k, n0, &mut out);
        for (r, v) in out.iter().enumerate() {
            c[(r0 + r) * c_stride + n0..][..16].copy_from_slice(v);
        }
        n0 += 16;
    }
    for n in n0..n_cols {
        for (r, arow) in arows.iter().enumerate() {
            let mut s = c[(r0 + r) * c_stride + n];
            for (kk, &av) in arow.iter().enumerate() {
                s = M::madd(av, b[kk * b_stride + n], s);
            }
            c[(r0 + r) * c_stride + n] = s;
        }
    }
}

/// `e^x` for x ≤ 0 (softmax weights), as straight-line f32 arithmetic that vectorizes:
/// `x = n·ln2 + r` with `n` an integer (exponent bits) and |r| ≤ ln2/2 (ln2 in two parts
/// so that `r` is exact), then Cephes' degree-7 polynomial for `e^r`. Relative error about
/// 2e-7; 0 below −87 (and for −inf).
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    let below = x < -87.0;
    let x = if below { -87.0 } else { x };
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    if below {
        0.0
    } else {
        e * scale
    }
}

/// Σ a[i]·b[i] over equal-length slices, in 16 lanes (vectorizable; fixed order).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    for (i, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[i] += x * y;
    }
    sum_lanes(&acc)
}

/// Σ of 16 lanes in a fixed tree order.
#[inline(always)]
pub fn sum_lanes(acc: &[f32; 16]) -> f32 {
    let mut s8 = [0.0f32; 8];
    for i in 0..8 {
        s8[i] = acc[i] + acc[i + 8];
    }
    let mut s4 = [0.0f32; 4];
    for i in 0..4 {
        s4[i] = s8[i] + s8[i + 4];
    }
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// Σ x[i], in 16 lanes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let c = x.chunks_exact(L);
    let r = c.remainder();
    for v in c {
        for i in 0..L {
            acc[i] += v[i];
        }
    }
    for (i, v) in r.iter().enumerate() {
        acc[i] += v;
    }
    sum_lanes(&acc)
}

/// max x[i] (−inf for an empty slice), in 16 lanes.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [f32::NEG_INFINITY; L];
    let c = x.chunks_exact(L);
    let r = c.remainder();
    for v in c {
        for i in 0..L {
            acc[i] = if v[i] > acc[i] { v[i] } else { acc[i] };
        }
    }
    for (i, &v) in r.iter().enumerate() {
        acc[i] = if v > acc[i] { v } else { acc[i] };
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_on_the_softmax_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let rel = ((exp_neg(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg(-100.0), 0.0);
        assert_eq!(exp_neg(0.0), 1.0);
    }

    #[test]
    fn reductions() {
        let v: Vec<f32> = (0..37).map(|i| i as f32 - 3.0).collect();
        assert_eq!(sum(&v), v.iter().sum::<f32>());
        assert_eq!(max(&v), 33.0);
        assert_eq!(dot(&v, &v), v.iter().map(|x| x * x).sum::<f32>());
    }
}
