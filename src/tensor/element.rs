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
        use half::slice::HalfFloatSliceExt;
        // One feature check per slice, then 8 values per F16C instruction where the CPU has
        // it (an exact conversion either way).
        let n = src.len().min(dst.len());
        src[..n].convert_to_f32_slice(&mut dst[..n]);
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
