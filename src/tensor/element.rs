//! The float element types a KV cache may hold, with the conversions kernels need.

use half::{bf16, f16};
use tch::Kind;

/// The dtypes accepted for keys and values.
pub const FLOAT_KINDS: [Kind; 3] = [Kind::Float, Kind::Half, Kind::BFloat16];

/// A float element of a KV tensor: f32, f16 or bf16. Kernels are generic over it and
/// accumulate in f32 (bf16 sums and norms lose too much to rank tokens reliably).
pub trait KvFloat: tch::kind::Element + Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn is_finite(self) -> bool;
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
        f16::is_finite(self)
    }
}

impl KvFloat for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        bf16::is_finite(self)
    }
}
