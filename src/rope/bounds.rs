//! The feasible region of the RoPE base for a context length, a depth and a dtype, after
//! the reading of RoPE as phase modulation of a bank of oscillators ("Rotary Positional
//! Embeddings as Phase Modulation: Theoretical Bounds on the RoPE Base for Long-Context
//! Transformers"). The abstract names three bounds — an aliasing (Nyquist-like) lower
//! bound, a DC-component stability lower bound that tightens with depth, and an upper bound
//! from floating-point resolution; the formulas below are our own derivation of them.
//!
//! Notation: d = rotary dimension, b = base, L = context length, N = depth (layers),
//! κ = (d − 2)/d. The slowest channel turns by θ_min = b^(−κ) per token and sweeps the
//! phase Φ = L·θ_min over the context. Its DC component over the context (the magnitude of
//! the mean of e^(iθ_min·p), p ∈ [0, L]) is D(Φ) = |sin(Φ/2) / (Φ/2)|.
//!
//! - **Aliasing**: the slowest channel must not complete a turn within the context
//!   (Φ < 2π, the first null of D: beyond it two positions L apart share every slow
//!   phase): b > (L / 2π)^(1/κ).
//! - **Stability (DC component, depth N)**: every layer reads position-independent content
//!   through the slow channels, whose coherence D(Φ) compounds multiplicatively over the N
//!   layers. We require D(Φ)^N ≥ 2/π — what one layer keeps when its slowest channel sweeps
//!   half a turn (D(π) = 2/π) — so Φ ≤ Φ_N (Φ_1 = π, Φ_N ≈ √(24·ln(π/2)/N) for large N):
//!   b ≥ (L / Φ_N)^(1/κ).
//! - **Precision**: one token turns a unit phasor of the slowest channel by ≈ θ_min; a
//!   dtype with p significand bits resolves relative changes down to u = 2^(−p) (f64 2^−53,
//!   f32 2^−24, f16 2^−11, bf16 2^−8), below which the increment rounds away: θ_min ≥ u,
//!   b ≤ u^(−1/κ).

use crate::error::{KvError, Result};
use std::f64::consts::PI;

/// The floating-point type phases are computed or stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F64,
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// From a dtype name as PyTorch users write it ("float32", "bfloat16", "fp16", ...).
    pub fn from_name(name: &str) -> Result<Self> {
        let n = name.trim().to_ascii_lowercase();
        let n = n.strip_prefix("torch.").unwrap_or(&n);
        Ok(match n {
            "float64" | "double" | "fp64" | "f64" => Precision::F64,
            "float32" | "float" | "fp32" | "f32" => Precision::F32,
            "float16" | "half" | "fp16" | "f16" => Precision::F16,
            "bfloat16" | "bf16" => Precision::Bf16,
            _ => {
                return Err(KvError::invalid(
                    "dtype",
                    format!(
                        "unknown dtype {name:?}; expected float64, float32, float16 or bfloat16"
                    ),
                ))
            }
        })
    }

    /// Significand bits, the implicit leading bit included.
    pub fn significand_bits(self) -> i32 {
        match self {
            Precision::F64 => 53,
            Precision::F32 => 24,
            Precision::F16 => 11,
            Precision::Bf16 => 8,
        }
    }

    /// Unit roundoff u = 2^(−p): half the spacing of the numbers just below 1.
    pub fn unit_roundoff(self) -> f64 {
        2f64.powi(-self.significand_bits())
    }
}

/// The three bounds on the RoPE base, for one (rotary_dim, context, depth, precision).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BaseBounds {
    /// Aliasing lower bound (L / 2π)^(1/κ).
    pub aliasing: f64,
    /// DC-stability lower bound (L / Φ_N)^(1/κ).
    pub stability: f64,
    /// Precision upper bound u^(−1/κ).
    pub precision: f64,
    /// The largest phase the slowest channel may sweep at this depth, Φ_N.
    pub max_phase: f64,
}

impl BaseBounds {
    /// The larger of the two lower bounds.
    pub fn lower(&self) -> f64 {
        self.aliasing.max(self.stability)
    }

    /// The upper bound.
    pub fn upper(&self) -> f64 {
        self.precision
    }

    /// Whether the region is non-empty.
    pub fn is_empty(&self) -> bool {
        self.lower() > self.upper()
    }

    /// Whether `base` lies in the feasible region.
    pub fn contains(&self, base: f64) -> bool {
        base >= self.lower() && base <= self.upper()
    }
}

/// D(Φ) = sin(Φ/2)/(Φ/2), the DC component of a channel sweeping phase Φ.
fn dc(phase: f64) -> f64 {
    let h = phase / 2.0;
    if h == 0.0 {
        1.0
    } else {
        (h.sin() / h).abs()
    }
}

/// Φ_N: the largest Φ in (0, π] with D(Φ)^N ≥ 2/π (bisection; D decreases on (0, 2π)).
pub fn max_phase(depth: usize) -> f64 {
    let target = (2.0 / PI).ln();
    let ok = |phase: f64| depth as f64 * dc(phase).ln() >= target;
    let (mut lo, mut hi) = (0.0, PI);
    if ok(hi) {
        return hi;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The feasible region of the RoPE base. See the module documentation for the formulas.
///
/// ```
/// use kvpress_rs::rope::{base_bounds, Precision};
/// // Llama-2 7B: head_dim 128, 4096 tokens, 32 layers; phases in float32.
/// let b = base_bounds(128, 4096, 32, Precision::F32).unwrap();
/// assert!(b.contains(10_000.0));
/// ```
pub fn base_bounds(
    rotary_dim: usize,
    context_length: usize,
    depth: usize,
    precision: Precision,
) -> Result<BaseBounds> {
    if rotary_dim < 4 || rotary_dim % 2 == 1 {
        return Err(KvError::invalid(
            "head_dim",
            format!(
                "got {rotary_dim}, expected an even rotary dimension >= 4 (with 2 channels the \
                 only frequency is 1 whatever the base)"
            ),
        ));
    }
    if context_length == 0 {
        return Err(KvError::invalid("context_length", "got 0, expected >= 1"));
    }
    if depth == 0 {
        return Err(KvError::invalid("depth", "got 0, expected >= 1 layer"));
    }
    let d = rotary_dim as f64;
    let inv_kappa = d / (d - 2.0);
    let l = context_length as f64;
    let phase = max_phase(depth);
    Ok(BaseBounds {
        aliasing: (l / (2.0 * PI)).powf(inv_kappa),
        stability: (l / phase).powf(inv_kappa),
        precision: (1.0 / precision.unit_roundoff()).powf(inv_kappa),
        max_phase: phase,
    })
}
