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

/// The code of `x` for a group with `zero` and `inv = inverse_scale(scale)`:
/// `clamp(round_half_even((x − zero)·inv), 0, levels)`. Written so that it vectorizes:
/// comparisons for the clamp (the bounds are integers, so clamping before rounding is the
/// same), and rounding by adding 1.5·2²³, whose float ulp is 1 (round-half-even is the
/// float addition's own rounding), the integer then sitting in the low mantissa bits.
#[inline(always)]
pub fn code(x: f32, zero: f32, inv: f32, levels: f32) -> u8 {
    code_u32(x, zero, inv, levels) as u8
}

/// [`code`] as a 32-bit lane (what row-wise packing shifts; no narrowing in between).
#[inline(always)]
pub fn code_u32(x: f32, zero: f32, inv: f32, levels: f32) -> u32 {
    const ROUND: f32 = 12_582_912.0;
    let v = (x - zero) * inv;
    let v = if v > 0.0 { v } else { 0.0 };
    let v = if v < levels { v } else { levels };
    (v + ROUND).to_bits() & 0xff
}

/// [`params`] for many groups at once (vectorized float16 conversions): writes
/// `scale, zero` pairs into `out` and returns false if any does not fit float16.
pub fn params_slice(
    min: &[f32],
    max: &[f32],
    inv_levels: f32,
    tmp: &mut ParamScratch,
    out: &mut [f16],
) -> bool {
    use half::slice::HalfFloatSliceExt;
    let n = min.len();
    let ParamScratch { h, back, raw } = tmp;
    let (h, back, raw) = (&mut h[..n], &mut back[..n], &mut raw[..n]);
    // zero = f16_down(min). The corrections are selects, not branches: whether float16
    // rounding went up or down is a coin flip per group, which a branch mispredicts.
    h.convert_from_f32_slice(min);
    h.convert_to_f32_slice(back);
    for i in 0..n {
        h[i] = step_if(back[i] > min[i], h[i], back[i], true);
    }
    h.convert_to_f32_slice(back);
    for i in 0..n {
        raw[i] = (max[i] - back[i]) * inv_levels;
        out[2 * i + 1] = h[i];
    }
    // scale = f16_up(raw)
    h.convert_from_f32_slice(raw);
    h.convert_to_f32_slice(back);
    let mut ok = true;
    for i in 0..n {
        h[i] = step_if(back[i] < raw[i], h[i], back[i], false);
        out[2 * i] = h[i];
        ok &= h[i].is_finite() && out[2 * i + 1].is_finite();
    }
    ok
}

/// Scratch of [`params_slice`] for up to `n` groups.
pub struct ParamScratch {
    h: Vec<f16>,
    back: Vec<f32>,
    raw: Vec<f32>,
}

impl ParamScratch {
    pub fn new(n: usize) -> Self {
        ParamScratch {
            h: vec![f16::ZERO; n],
            back: vec![0.0; n],
            raw: vec![0.0; n],
        }
    }
}

/// `h` (whose value is `value`) moved one float16 step down (`down`) or up when `cond`,
/// else `h`; written as selects so that it compiles without branches.
#[inline(always)]
fn step_if(cond: bool, h: f16, value: f32, down: bool) -> f16 {
    let bits = h.to_bits();
    // Away from zero is +1 on the magnitude bits, towards zero −1; from ±0 the smallest
    // subnormal of the direction's sign.
    let away = if down { value < 0.0 } else { value > 0.0 };
    let moved = if away {
        bits.wrapping_add(1)
    } else {
        bits.wrapping_sub(1)
    };
    let from_zero = if down { 0x8001 } else { 0x0001 };
    let moved = if value == 0.0 { from_zero } else { moved };
    f16::from_bits(if cond { moved } else { bits })
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
    // Halve the lanes (a tree the compiler turns into a few shuffles; a chain of 16
    // dependent scalar min/max was a sizeable share of quantizing).
    let mut w = L / 2;
    while w > 0 {
        for i in 0..w {
            lo[i] = if lo[i + w] < lo[i] { lo[i + w] } else { lo[i] };
            hi[i] = if hi[i + w] > hi[i] { hi[i + w] } else { hi[i] };
        }
        w /= 2;
    }
    (lo[0], hi[0])
}

/// Per column `c` of the row-major `rows` (rows of `mins.len()` values), the min and max
/// over the rows: channel groups' ranges straight from token rows, vectorized across
/// channels (no transpose). At least one row.
#[inline(always)]
pub fn column_min_max(rows: &[f32], mins: &mut [f32], maxs: &mut [f32]) {
    // Blocks of B columns whose running min/max stay in registers across the rows (a
    // whole-row pass would store both rows to memory after every token).
    const B: usize = 32;
    let d = mins.len();
    let maxs = &mut maxs[..d];
    let mut c0 = 0;
    while c0 < d {
        let w = (d - c0).min(B);
        let mut lo = [0f32; B];
        lo[..w].copy_from_slice(&rows[c0..c0 + w]);
        let mut hi = lo;
        for row in rows[d..].chunks_exact(d) {
            let row = &row[c0..c0 + w];
            if let Some(row) = row.first_chunk::<B>() {
                for i in 0..B {
                    lo[i] = if row[i] < lo[i] { row[i] } else { lo[i] };
                    hi[i] = if row[i] > hi[i] { row[i] } else { hi[i] };
                }
            } else {
                for (i, &v) in row.iter().enumerate() {
                    lo[i] = if v < lo[i] { v } else { lo[i] };
                    hi[i] = if v > hi[i] { v } else { hi[i] };
                }
            }
        }
        mins[c0..c0 + w].copy_from_slice(&lo[..w]);
        maxs[c0..c0 + w].copy_from_slice(&hi[..w]);
        c0 += w;
    }
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
            0.0f32, 1.0, -1.0, 0.1, -0.1, 3.3, -2.7, 1e-6, -1e-6, 6e-8, 65504.0, 1e-9, -1e-9,
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
    fn batched_params_equal_one_at_a_time() {
        let min = [-1.3f32, 0.0, 2.0, -1e-9, 5.0, -70000.0];
        let max = [2.7f32, 0.0, 2.0001, 1e-9, 5.0, 0.0];
        let mut out = [f16::ZERO; 12];
        let ok = params_slice(&min, &max, 1.0 / 7.0, &mut ParamScratch::new(6), &mut out);
        assert!(!ok, "-70000 does not fit float16");
        for i in 0..5 {
            let (s, z) = params(min[i], max[i], 1.0 / 7.0).unwrap();
            assert_eq!(
                (out[2 * i].to_bits(), out[2 * i + 1].to_bits()),
                (s.to_bits(), z.to_bits()),
                "{i}"
            );
        }
        for (x, expected) in [
            (-0.6f32, 0u8),
            (3.5, 4),
            (4.5, 4),
            (2.5, 2),
            (100.0, 15),
            (7.49, 7),
        ] {
            assert_eq!(code(x, 0.0, 1.0, 15.0), expected, "{x}");
        }
    }

    #[test]
    fn ranges_of_groups_and_columns() {
        let v: Vec<f32> = (0..37).map(|i| ((i * 17) % 37) as f32 - 20.0).collect();
        assert_eq!(min_max(&v), (-20.0, 16.0));
        assert_eq!(min_max(&v[..5]), (-20.0, 14.0));
        // 3 rows of 4 columns.
        let rows = [
            1.0, -2.0, 3.0, 0.5, -1.0, 5.0, 3.0, 0.25, 2.0, 0.0, -3.0, 0.75,
        ];
        let (mut mins, mut maxs) = ([0.0; 4], [0.0; 4]);
        column_min_max(&rows, &mut mins, &mut maxs);
        assert_eq!(mins, [-1.0, -2.0, -3.0, 0.25]);
        assert_eq!(maxs, [2.0, 5.0, 3.0, 0.75]);
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
