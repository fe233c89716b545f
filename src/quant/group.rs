//! The arithmetic of one quantization group, shared by every path so that the Rust CPU
//! kernels and the libtorch ops produce identical codes:
//!
//! 1. the `n_out` elements of largest magnitude (ties to the lower index) are outliers,
//!    kept exactly and left out of the range;
//! 2. `zero = f16_down(min)` (the largest float16 ≤ min) and
//!    `scale = f16_up((max − zero) · (1/(2^bits − 1)))` (the smallest float16 ≥ that, in f32
//!    arithmetic), so that `[zero, zero + scale·(2^bits − 1)]` covers every element (up to
//!    f32 rounding);
//! 3. `code = clamp(round_half_even((x − zero) · (1/scale)), 0, 2^bits − 1)`, 0 when
//!    `scale` is 0, and 0 at outlier positions (whose exact value replaces it);
//! 4. `x̂ = code · scale + zero` in f32.
//!
//! Hence `|x − x̂| ≤ scale/2` up to f32 rounding, for every non-outlier element.

use half::f16;

/// The largest float16 that is ≤ `v` (−inf below the float16 range).
#[inline(always)]
pub fn f16_down(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() <= v {
        return h;
    }
    let bits = h.to_bits();
    f16::from_bits(if h.to_f32() > 0.0 {
        bits - 1
    } else if h.to_f32() < 0.0 {
        bits + 1
    } else {
        0x8001 // the smallest negative subnormal
    })
}

/// The smallest float16 that is ≥ `v` (+inf above the float16 range).
#[inline(always)]
pub fn f16_up(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() >= v {
        return h;
    }
    let bits = h.to_bits();
    f16::from_bits(if h.to_f32() > 0.0 {
        bits + 1
    } else if h.to_f32() < 0.0 {
        bits - 1
    } else {
        0x0001 // the smallest positive subnormal
    })
}

/// Scale and zero of a group whose (non-outlier) elements span [min, max]; `None` when
/// they do not fit float16.
#[inline(always)]
pub fn params(min: f32, max: f32, inv_levels: f32) -> Option<(f16, f16)> {
    let zero = f16_down(min);
    let scale = f16_up((max - zero.to_f32()) * inv_levels);
    (zero.is_finite() && scale.is_finite()).then_some((scale, zero))
}

/// `1/scale` (0 for a zero scale: every code is then 0).
#[inline(always)]
pub fn inverse_scale(scale: f32) -> f32 {
    if scale > 0.0 {
        1.0 / scale
    } else {
        0.0
    }
}

/// The code of `x` for a group with `zero` and `inv = inverse_scale(scale)`.
#[inline(always)]
pub fn code(x: f32, zero: f32, inv: f32, levels: f32) -> u8 {
    ((x - zero) * inv).round_ties_even().clamp(0.0, levels) as u8
}

/// Positions of the `n` elements of largest magnitude, ties to the lower index, in
/// ascending position order. `n` is small (a few per group): repeated scans.
pub fn outlier_positions(vals: &[f32], n: usize, out: &mut [u8]) {
    debug_assert!(n <= out.len() && n < vals.len());
    let mut taken = [false; 128];
    for slot in out.iter_mut().take(n) {
        let mut best = usize::MAX;
        let mut best_mag = -1.0f32;
        for (i, &v) in vals.iter().enumerate() {
            if !taken[i] && v.abs() > best_mag {
                best = i;
                best_mag = v.abs();
            }
        }
        taken[best] = true;
        *slot = best as u8;
    }
    out[..n].sort_unstable();
}

/// Min and max of `vals`, in lanes the compiler vectorizes.
#[inline(always)]
pub fn min_max(vals: &[f32]) -> (f32, f32) {
    const L: usize = 16;
    let mut lo = [f32::INFINITY; L];
    let mut hi = [f32::NEG_INFINITY; L];
    let chunks = vals.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
    }
    let mut mn = f32::INFINITY;
    let mut mx = f32::NEG_INFINITY;
    for i in 0..L {
        mn = mn.min(lo[i]);
        mx = mx.max(hi[i]);
    }
    (mn, mx)
}

/// Min and max of `vals` leaving out the (sorted) positions `skip`.
pub fn min_max_skipping(vals: &[f32], skip: &[u8]) -> (f32, f32) {
    let mut mn = f32::INFINITY;
    let mut mx = f32::NEG_INFINITY;
    let mut next = skip.iter().peekable();
    for (i, &v) in vals.iter().enumerate() {
        if next.peek().is_some_and(|&&s| s as usize == i) {
            next.next();
            continue;
        }
        mn = mn.min(v);
        mx = mx.max(v);
    }
    (mn, mx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directed_rounding_brackets_the_value() {
        for v in [
            0.0f32, 1.0, -1.0, 0.1, -0.1, 3.14159, -2.71828, 1e-6, -1e-6, 6e-8, 65504.0, 1e-9,
            -1e-9,
        ] {
            let (d, u) = (f16_down(v).to_f32(), f16_up(v).to_f32());
            assert!(d <= v && v <= u, "{v}: {d} {u}");
            if f16::from_f32(v).to_f32() == v {
                assert_eq!((d, u), (v, v));
            } else {
                assert_eq!(f16_up(d).to_f32(), d);
                assert!(u > d);
            }
        }
        assert!(f16_up(70000.0).is_infinite());
    }

    #[test]
    fn codes_cover_the_range() {
        let (s, z) = params(-1.3, 2.7, 1.0 / 15.0).unwrap();
        let (s, z) = (s.to_f32(), z.to_f32());
        assert!(z <= -1.3 && z + 15.0 * s >= 2.7);
        let inv = inverse_scale(s);
        assert_eq!(code(-1.3, z, inv, 15.0), 0);
        assert_eq!(code(2.7, z, inv, 15.0), 15);
    }

    #[test]
    fn outliers_are_the_largest_magnitudes_ties_first() {
        let v = [0.5, -3.0, 3.0, 1.0, -0.1, 2.0, 0.0, 0.0];
        let mut out = [0u8; 2];
        outlier_positions(&v, 2, &mut out);
        assert_eq!(out, [1, 2]);
        assert_eq!(min_max_skipping(&v, &out), (-0.1, 2.0));
    }
}
