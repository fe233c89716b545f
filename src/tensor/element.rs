//! The float element types a KV cache may hold, with the conversions kernels need.

use half::{bf16, f16};
use tch::Kind;

/// The dtypes accepted for keys and values.
pub const FLOAT_KINDS: [Kind; 3] = [Kind::Float, Kind::Half, Kind::BFloat16];

/// An element type with its libtorch dtype. (tch's own `kind::Element` maps `half::bf16`
/// to `Kind::Half` in 0.26, so it cannot tell bf16 from f16 data.)
pub trait TorchElement: Copy + Send + Sync + 'static {
    const KIND: Kind;
}

macro_rules! torch_element {
    ($($t:ty => $k:expr),* $(,)?) => { $(impl TorchElement for $t { const KIND: Kind = $k; })* };
}

torch_element!(f32 => Kind::Float, f64 => Kind::Double, f16 => Kind::Half, bf16 => Kind::BFloat16, i32 => Kind::Int, i64 => Kind::Int64, u8 => Kind::Uint8, bool => Kind::Bool);

/// A float element of a KV tensor: f32, f16 or bf16. Kernels are generic over it and
/// accumulate in f32 (bf16 sums and norms lose too much to rank tokens reliably).
pub trait KvFloat: TorchElement {
    /// Whether `from_f32` is plain lane arithmetic, which a loop producing the values can
    /// convert in place (f32, bf16); f16's checks for F16C at every call, so its values
    /// are better produced into f32 and converted by [`KvFloat::slice_from_f32`].
    const FROM_F32_INLINE: bool = true;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn is_finite(self) -> bool;
    /// `dst[i] = src[i].to_f32()` over `min(len)` elements, exactly. A loop the compiler
    /// vectorizes for f32 and bf16; f16 overrides it because `f16::to_f32` checks for the
    /// F16C instruction set at every call (a branch per element, no vectorization).
    #[inline(always)]
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = v.to_f32();
        }
    }
    /// `dst[i] = Self::from_f32(src[i])` over `min(len)` elements, bit for bit (round to
    /// nearest even); f16 overrides it for the same reason as [`KvFloat::slice_to_f32`].
    #[inline(always)]
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = Self::from_f32(v);
        }
    }
}

impl KvFloat for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

impl KvFloat for f16 {
    const FROM_F32_INLINE: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        self.to_bits() & 0x7c00 != 0x7c00
    }
    #[inline(always)]
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        if !f16c::convert_to_f32(src, dst) {
            let n = src.len().min(dst.len());
            src[..n].convert_to_f32_slice(&mut dst[..n]);
        }
    }
    #[inline(always)]
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        if !f16c::convert_from_f32(src, dst) {
            let n = src.len().min(dst.len());
            dst[..n].convert_from_f32_slice(&src[..n]);
        }
    }
}

impl KvFloat for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: a shift, branch-free so that loops vectorize
        // (`bf16::to_f32` also quiets NaNs, which finite-checked keys never hold).
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16_round(v)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        self.to_bits() & 0x7f80 != 0x7f80
    }
}

/// f32 → bf16, round to nearest even, a NaN kept a quiet NaN: `bf16::from_f32` bit for
/// bit, without its branches on the rounding bits, so that slice conversions and row
/// loops vectorize (the branchy one cost a third of dequantizing to bf16).
#[inline(always)]
pub fn bf16_round(v: f32) -> bf16 {
    let x = v.to_bits();
    // Adding 0x7fff carries into bit 16 when the low half exceeds half an ulp; the lsb
    // breaks the tie towards even.
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let quiet_nan = (x >> 16) | 0x40;
    bf16::from_bits(if x & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    } as u16)
}

/// float16 ⇄ float32 slices with F16C, 8 values per instruction, exact (round to nearest
/// even towards float16, as `half` does, bit for bit). `#[inline(always)]` rather than
/// `#[target_feature]`: inlined into a kernel compiled with F16C (the `multiversion!`
/// copies) the instructions sit in the kernel's loop, where `half`'s slice conversion is an
/// out-of-line call per 8 values (~20% of quantizing float16). Each returns false, having
/// done nothing, on a CPU without F16C.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]
mod f16c {
    use half::f16;

    #[inline(always)]
    pub(super) fn convert_to_f32(src: &[f16], dst: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") {
            use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
            // SAFETY: the CPU has F16C and AVX (checked above); `by_eights` hands over 8
            // readable and 8 writable elements; unaligned loads and stores.
            by_eights(
                src,
                dst,
                |s, d| unsafe {
                    _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(s as *const __m128i)));
                },
                f16::to_f32,
            );
            return true;
        }
        false
    }

    #[inline(always)]
    pub(super) fn convert_from_f32(src: &[f32], dst: &mut [f16]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") {
            use std::arch::x86_64::{
                __m128i, _mm256_cvtps_ph, _mm256_loadu_ps, _mm_storeu_si128,
                _MM_FROUND_TO_NEAREST_INT,
            };
            let n = src.len().min(dst.len());
            // Long slices (a dequantized tile) through the register form; a row of a few
            // hundred values is quicker inlined where it is produced, intrinsics and all
            // (measured: 2-bit token dequantize 14.0–14.6 → 17.0–18.3 GB/s with the first,
            // 4-bit channel rows 13.6–14.8 → 12.3–13.4 when they took it too).
            let whole = if n >= 1024 {
                // SAFETY: the CPU has F16C and AVX (checked above).
                unsafe { sixteens_from_f32(&src[..n], &mut dst[..n]) }
            } else {
                0
            };
            // SAFETY: as in `convert_to_f32`.
            by_eights(
                &src[whole..n],
                &mut dst[whole..n],
                |s, d| unsafe {
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s));
                    _mm_storeu_si128(d as *mut __m128i, h);
                },
                f16::from_f32,
            );
            return true;
        }
        false
    }

    /// The whole runs of 16 of `src` into `dst` (equal lengths); returns how many values
    /// that is. Each half of a run goes through `vcvtps2ph` in its register form (inline
    /// assembly: from the intrinsic, the compiler folds the store into the instruction's
    /// memory form, which was half of dequantizing to float16 in a profile on Zen 4; the
    /// register form made 2-bit token dequantize 1.3× faster), then the run is stored at
    /// once.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx,f16c")]
    fn sixteens_from_f32(src: &[f32], dst: &mut [f16]) -> usize {
        use std::arch::x86_64::{
            __m128i, __m256i, _mm256_loadu_ps, _mm256_set_m128i, _mm256_storeu_si256,
        };
        let whole = src.len().min(dst.len()) / 16 * 16;
        for (s, d) in src[..whole]
            .chunks_exact(16)
            .zip(dst[..whole].chunks_exact_mut(16))
        {
            // SAFETY: 16 readable f32 and 16 writable f16, unaligned loads and store; the
            // assembly converts one register into another (imm 0: to nearest even).
            unsafe {
                let (a, b) = (
                    _mm256_loadu_ps(s.as_ptr()),
                    _mm256_loadu_ps(s.as_ptr().add(8)),
                );
                let (lo, hi): (__m128i, __m128i);
                std::arch::asm!(
                    "vcvtps2ph {lo}, {a}, 0",
                    "vcvtps2ph {hi}, {b}, 0",
                    a = in(ymm_reg) a,
                    b = in(ymm_reg) b,
                    lo = out(xmm_reg) lo,
                    hi = out(xmm_reg) hi,
                    options(pure, nomem, nostack, preserves_flags),
                );
                _mm256_storeu_si256(d.as_mut_ptr() as *mut __m256i, _mm256_set_m128i(hi, lo));
            }
        }
        whole
    }

    /// `eight(src + i, dst + i)` for every whole run of 8 elements of the shorter slice,
    /// `one` for the rest.
    #[inline(always)]
    fn by_eights<S: Copy, D>(
        src: &[S],
        dst: &mut [D],
        eight: impl Fn(*const S, *mut D),
        one: impl Fn(S) -> D,
    ) {
        let n = src.len().min(dst.len());
        let whole = n - n % 8;
        for (s, d) in src[..whole]
            .chunks_exact(8)
            .zip(dst[..whole].chunks_exact_mut(8))
        {
            eight(s.as_ptr(), d.as_mut_ptr());
        }
        for (o, &v) in dst[whole..n].iter_mut().zip(&src[whole..n]) {
            *o = one(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// float16 slice conversion (F16C: register form for long slices, intrinsics for
    /// short ones) equals `half`'s rounding value by value, ragged lengths included, with
    /// ties, subnormals, overflow to infinity and NaN among the values.
    #[test]
    fn f16_slice_conversion_equals_half() {
        let src: Vec<f32> = (0..2100u32)
            .map(|i| match i % 97 {
                0 => f32::NAN,
                1 => 1e6,
                2 => -3e-6,
                3 => f32::from_bits(0x3f80_1000), // a tie of float16's rounding
                _ => f32::from_bits(0x3f00_0000 ^ (i.wrapping_mul(0x9e37_79b9) >> 8)),
            })
            .collect();
        for n in [7, 16, 100, 1023, 1024, 1040, 2100] {
            let mut dst = vec![f16::ZERO; n];
            f16::slice_from_f32(&src[..n], &mut dst);
            for (k, (&o, &v)) in dst.iter().zip(&src).enumerate() {
                let want = f16::from_f32(v);
                assert!(
                    o.to_bits() == want.to_bits() || (o.is_nan() && want.is_nan()),
                    "n {n}, value {k}: {v} -> {o} vs {want}"
                );
            }
        }
    }

    #[test]
    fn bf16_rounding_equals_half_bit_for_bit() {
        let check = |x: u32| {
            let v = f32::from_bits(x);
            assert_eq!(
                bf16_round(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "bits {x:#010x}"
            );
        };
        // Every low half (ties, carries into the exponent, into infinity) under high
        // halves of both signs: zero, denormal, normal, max finite, infinity, NaN.
        for high in [
            0x0000u32, 0x0001, 0x3f80, 0x3f81, 0x7f7f, 0x7f80, 0x7fc0, 0x7f81,
        ] {
            for sign in [0u32, 0x8000] {
                for low in 0..=0xffffu32 {
                    check(((high | sign) << 16) | low);
                }
            }
        }
        // A stride through all 2^32 patterns.
        let mut x = 0u32;
        for _ in 0..1 << 20 {
            check(x);
            x = x.wrapping_add(4093 * 1021);
        }
    }
}
