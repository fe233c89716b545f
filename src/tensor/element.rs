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
        let n = src.len().min(dst.len());
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has F16C (checked just above).
            unsafe { f16_to_f32_f16c(&src[..n], &mut dst[..n]) };
            return;
        }
        use half::slice::HalfFloatSliceExt;
        src[..n].convert_to_f32_slice(&mut dst[..n]);
    }
    #[inline(always)]
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        let n = src.len().min(dst.len());
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has F16C (checked just above).
            unsafe { f32_to_f16_f16c(&src[..n], &mut dst[..n]) };
            return;
        }
        use half::slice::HalfFloatSliceExt;
        dst[..n].convert_from_f32_slice(&src[..n]);
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
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        self.to_bits() & 0x7f80 != 0x7f80
    }
}

/// `dst[i] = src[i]` as f32, 8 values per F16C instruction (exact). `#[inline(always)]`
/// rather than `#[target_feature]`: inlined into a kernel compiled with F16C (the
/// `multiversion!` copies) the instructions sit in the kernel's loop; `half`'s slice
/// conversion is an out-of-line call per 8 values there (~20% of quantizing float16).
///
/// # Safety
/// The CPU must support F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16_to_f32_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n = src.len().min(dst.len());
    let whole = n - n % 8;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < whole {
        // SAFETY: i + 8 <= n, within both slices; unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(s.add(i) as *const __m128i);
            _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for (o, v) in dst[whole..n].iter_mut().zip(&src[whole..n]) {
        *o = v.to_f32();
    }
}

/// `dst[i] = f16::from_f32(src[i])`, 8 values per F16C instruction, rounding to nearest
/// even as `half` does (bit for bit). Inlined like [`f16_to_f32_f16c`].
///
/// # Safety
/// The CPU must support F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [f16]) {
    use std::arch::x86_64::{
        __m128i, _mm256_cvtps_ph, _mm256_loadu_ps, _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };
    let n = src.len().min(dst.len());
    let whole = n - n % 8;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < whole {
        // SAFETY: i + 8 <= n, within both slices; unaligned loads and stores.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.add(i)));
            _mm_storeu_si128(d.add(i) as *mut __m128i, h);
        }
        i += 8;
    }
    for (o, &v) in dst[whole..n].iter_mut().zip(&src[whole..n]) {
        *o = f16::from_f32(v);
    }
}
