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

use super::simd::Madd;
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

/// [`code_u32`] of an `x` inside its group's range (`zero ≤ x ≤ max`, with `zero` and
/// `inv` from [`params`] of that range), as the rounded float's bits: the code is their low
/// byte. No clamp is needed there: `(x − zero)·inv` lies in `[0, levels·(1 + 4ε)]`, which
/// rounds into `0..=levels`, so the code equals the clamped one.
#[inline(always)]
pub fn code_bits_in_range(x: f32, zero: f32, inv: f32) -> u32 {
    const ROUND: f32 = 12_582_912.0;
    ((x - zero) * inv + ROUND).to_bits()
}

/// [`params`] for many groups at once: writes `scale, zero` pairs into `out`, each zero and
/// [`inverse_scale`] of each scale as f32 into `zeros` and `inv`, and returns false if any
/// does not fit float16. With F16C, float16's directed roundings are the conversion's own
/// rounding modes (towards −∞ for the zero, +∞ for the scale), 8 groups per instruction;
/// IEEE rounding makes them equal to [`f16_down`] and [`f16_up`] bit for bit.
#[inline(always)]
pub fn params_slice(
    min: &[f32],
    max: &[f32],
    inv_levels: f32,
    out: &mut [f16],
    zeros: &mut [f32],
    inv: &mut [f32],
) -> bool {
    let n = min.len();
    let (max, out, zeros, inv) = (&max[..n], &mut out[..2 * n], &mut zeros[..n], &mut inv[..n]);
    let mut done = 0;
    let mut ok = true;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        use std::arch::x86_64::*;
        done = n - n % 8;
        // SAFETY: the CPU has F16C and AVX (checked above); every pointer is offset within
        // its slice (i + 8 ≤ done ≤ n for min, max, zeros, inv; 2i + 16 ≤ 2n for out);
        // unaligned loads and stores.
        unsafe {
            let mut bad = _mm_setzero_si128();
            let exponent = _mm_set1_epi16(0x7c00);
            for i in (0..done).step_by(8) {
                let zh =
                    _mm256_cvtps_ph::<_MM_FROUND_TO_NEG_INF>(_mm256_loadu_ps(min.as_ptr().add(i)));
                let zf = _mm256_cvtph_ps(zh);
                let range = _mm256_sub_ps(_mm256_loadu_ps(max.as_ptr().add(i)), zf);
                let raw = _mm256_mul_ps(range, _mm256_set1_ps(inv_levels));
                let sh = _mm256_cvtps_ph::<_MM_FROUND_TO_POS_INF>(raw);
                let sf = _mm256_cvtph_ps(sh);
                let pairs = out.as_mut_ptr().add(2 * i) as *mut __m128i;
                _mm_storeu_si128(pairs, _mm_unpacklo_epi16(sh, zh));
                _mm_storeu_si128(pairs.add(1), _mm_unpackhi_epi16(sh, zh));
                _mm256_storeu_ps(zeros.as_mut_ptr().add(i), zf);
                let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(sf, _mm256_setzero_ps());
                let iv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0), sf), positive);
                _mm256_storeu_ps(inv.as_mut_ptr().add(i), iv);
                for h in [sh, zh] {
                    let e = _mm_and_si128(h, exponent);
                    bad = _mm_or_si128(bad, _mm_cmpeq_epi16(e, exponent));
                }
            }
            ok = _mm_testz_si128(bad, bad) == 1;
        }
    }
    for i in done..n {
        let Some((scale, zero)) = params(min[i], max[i], inv_levels) else {
            ok = false;
            continue;
        };
        (out[2 * i], out[2 * i + 1]) = (scale, zero);
        zeros[i] = zero.to_f32();
        inv[i] = inverse_scale(scale.to_f32());
    }
    ok
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

/// Min and max of `vals`, in lanes the compiler vectorizes; finiteness accumulates in
/// `nan` (see [`NanLanes`]) for the caller to check once per tile, not once per group.
#[inline(always)]
pub fn min_max<M: Madd>(vals: &[f32], nan: &mut NanLanes) -> (f32, f32) {
    const L: usize = NAN_LANES;
    let mut lo = [f32::INFINITY; L];
    let mut hi = [f32::NEG_INFINITY; L];
    let nan = &mut nan.0;
    let chunks = vals.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
            nan[i] = M::madd(c[i], 0.0, nan[i]);
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
        nan[i] = M::madd(v, 0.0, nan[i]);
    }
    // Halve the lanes in a tree (a chain of 16 dependent scalar min/max was a sizeable
    // share of quantizing). After the first halving, the mins and the negated maxes share
    // one vector, so each further level is one shuffle and one min for both.
    let mut m = [0f32; L];
    for i in 0..L / 2 {
        let (a, b) = (lo[i], lo[i + L / 2]);
        m[i] = if b < a { b } else { a };
        let (a, b) = (-hi[i], -hi[i + L / 2]);
        m[i + L / 2] = if b < a { b } else { a };
    }
    let mut w = L / 4;
    while w > 0 {
        for half in [0, L / 2] {
            for i in half..half + w {
                m[i] = if m[i + w] < m[i] { m[i + w] } else { m[i] };
            }
        }
        w /= 2;
    }
    (m[0], -m[L / 2])
}

/// [`min_max`] of every group of `G` values side by side in `vals` into `mins` and `maxs`
/// (one per group). With AVX-512, 16 groups at a time (see `avx512::min_max_16_groups`).
#[inline(always)]
pub fn min_max_groups<M: Madd, const G: usize>(
    vals: &[f32],
    nan: &mut NanLanes,
    mins: &mut [f32],
    maxs: &mut [f32],
) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 && G.is_multiple_of(16) && G >= 32 {
        let batches = vals.chunks_exact(16 * G);
        for ((batch, mn), mx) in batches
            .zip(mins.chunks_exact_mut(16))
            .zip(maxs.chunks_exact_mut(16))
        {
            // SAFETY: `level()` detected AVX-512F on this CPU.
            unsafe { avx512::min_max_16_groups::<G>(batch, nan, mn, mx) };
            done += 16;
        }
    }
    let rest = vals
        .chunks_exact(G)
        .zip(mins.iter_mut().zip(maxs.iter_mut()));
    for (group, (mn, mx)) in rest.skip(done) {
        (*mn, *mx) = min_max::<M>(group, nan);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{NanLanes, NAN_LANES};
    use std::arch::x86_64::*;

    const L: usize = NAN_LANES;

    /// Mins and maxes of 16 groups of `G` values side by side in `vals` (`mins[i]`,
    /// `maxs[i]` of `vals[i·G..(i+1)·G]`; slices too short are left alone), finiteness
    /// into `nan`. Each group is folded lane-wise to one vector, then the 16 vectors are
    /// reduced together in a butterfly ([`reduce`]): 15 combinations of two vectors for
    /// 16 groups, where a reduction tree per group takes four dependent shuffle steps and
    /// a scalar extraction each. Comparisons are ordered as in [`super::min_max`].
    #[target_feature(enable = "avx512f")]
    pub(super) fn min_max_16_groups<const G: usize>(
        vals: &[f32],
        nan: &mut NanLanes,
        mins: &mut [f32],
        maxs: &mut [f32],
    ) {
        let (Some(mins), Some(maxs)) = (mins.first_chunk_mut::<L>(), maxs.first_chunk_mut::<L>())
        else {
            return;
        };
        // Two vectors a group at least: the NaN comparisons pair each with the first.
        if vals.len() < L * G || !G.is_multiple_of(L) || G < 2 * L {
            return;
        }
        let zero = _mm512_setzero_ps();
        // SAFETY (every load): group g's vector k lies at g·G + k·L + 0..L < 16·G ≤ len.
        let at = |g: usize, k: usize| unsafe { _mm512_loadu_ps(vals.as_ptr().add(g * G + k * L)) };
        // Finiteness without a chain through every vector (a `madd` per vector into one
        // accumulator was this function's critical path): NaNs by unordered comparisons
        // OR-ed into a mask, infinities from the ranges themselves (min/max keep them).
        let mut unordered: __mmask16 = 0;
        let mut lo = [zero; L];
        let mut hi = [zero; L];
        for g in 0..L {
            let first = at(g, 0);
            let (mut l, mut h) = (first, first);
            for k in 1..G / L {
                let v = at(g, k);
                l = _mm512_min_ps(v, l);
                h = _mm512_max_ps(v, h);
                unordered |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, first);
            }
            (lo[g], hi[g]) = (l, h);
        }
        let (lo, hi) = (reduce(lo, false), reduce(hi, true));
        // SAFETY: `nan.0` holds 16 f32.
        let mut finite = unsafe { _mm512_loadu_ps(nan.0.as_ptr()) };
        finite = _mm512_fmadd_ps(hi, zero, _mm512_fmadd_ps(lo, zero, finite));
        if unordered != 0 {
            finite = _mm512_set1_ps(f32::NAN);
        }
        // SAFETY: `nan.0` holds 16 f32.
        unsafe { _mm512_storeu_ps(nan.0.as_mut_ptr(), finite) };
        // Lane i holds group bitreverse(i) (see `reduce`): one permute puts the groups in
        // order. (A loop storing lane by lane compiled to two scatters, slow on AMD: a
        // sixth of this function's samples in a profile.)
        // SAFETY: `BIT_REVERSED` holds 16 i32; `mins` and `maxs` hold 16 f32.
        unsafe {
            let order = _mm512_loadu_si512(BIT_REVERSED.as_ptr() as *const _);
            _mm512_storeu_ps(mins.as_mut_ptr(), _mm512_permutexvar_ps(order, lo));
            _mm512_storeu_ps(maxs.as_mut_ptr(), _mm512_permutexvar_ps(order, hi));
        }
    }

    /// [`super::column_min_max`] of the first columns, in blocks of 128, 64 or 16 (8, 4
    /// or 1 vectors), all of whose running min, max and finiteness sums stay in registers
    /// across the rows: with 32 columns a block, one row's few independent operations
    /// waited on the previous row's (the loop ran at the operations' latency). Returns
    /// the columns done (`mins.len()` rounded down to 16) and whether all were finite.
    /// Comparisons are ordered as in the portable loop (`min(row, lo)`), so the results
    /// are the same bit for bit.
    #[target_feature(enable = "avx512f")]
    pub(super) fn column_min_max(
        rows: &[f32],
        mins: &mut [f32],
        maxs: &mut [f32],
    ) -> (usize, bool) {
        let d = mins.len().min(maxs.len());
        if d == 0 {
            return (0, true);
        }
        let n = rows.len() / d;
        let mut c0 = 0;
        let mut finite = true;
        while c0 + L <= d {
            let (ok, vectors) = match d - c0 {
                left if left >= 8 * L => (column_block::<8>(rows, d, n, c0, mins, maxs), 8),
                left if left >= 4 * L => (column_block::<4>(rows, d, n, c0, mins, maxs), 4),
                _ => (column_block::<1>(rows, d, n, c0, mins, maxs), 1),
            };
            finite &= ok;
            c0 += vectors * L;
        }
        (c0, finite)
    }

    /// Columns `c0..c0 + 16·V` of the `n` rows of `d` values: min, max into `mins`,
    /// `maxs`; returns whether every value was finite.
    #[inline(always)]
    fn column_block<const V: usize>(
        rows: &[f32],
        d: usize,
        n: usize,
        c0: usize,
        mins: &mut [f32],
        maxs: &mut [f32],
    ) -> bool {
        if c0 + V * L > d || rows.len() < n * d {
            return true;
        }
        // SAFETY (every intrinsic): inlined into `column_min_max`, an AVX-512F function;
        // row t's vector j lies at t·d + c0 + 16j + 0..16 < n·d ≤ rows.len() (checked
        // above), and the stores at c0 + 16j + 0..16 ≤ d ≤ both lengths.
        unsafe {
            let zero = _mm512_setzero_ps();
            let mut lo = [_mm512_set1_ps(f32::INFINITY); V];
            let mut hi = [_mm512_set1_ps(f32::NEG_INFINITY); V];
            let mut nan = [zero; V];
            for t in 0..n {
                let row = rows.as_ptr().add(t * d + c0);
                for j in 0..V {
                    let v = _mm512_loadu_ps(row.add(j * L));
                    lo[j] = _mm512_min_ps(v, lo[j]);
                    hi[j] = _mm512_max_ps(v, hi[j]);
                    nan[j] = _mm512_fmadd_ps(v, zero, nan[j]);
                }
            }
            let mut sum = zero;
            for j in 0..V {
                _mm512_storeu_ps(mins.as_mut_ptr().add(c0 + j * L), lo[j]);
                _mm512_storeu_ps(maxs.as_mut_ptr().add(c0 + j * L), hi[j]);
                sum = _mm512_add_ps(sum, nan[j]);
            }
            _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(sum, zero) == 0
        }
    }

    /// `BIT_REVERSED[i]` is `i` with its 4 bits reversed.
    const BIT_REVERSED: [i32; L] = [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15];

    /// The butterfly: at width `w` = 8, 4, 2, 1, vectors `2p` and `2p+1` become vector `p`,
    /// whose lanes with bit `w` clear are `op(a[i], a[i+w])` and the others
    /// `op(b[i−w], b[i])` (two two-source permutes and one min or max). Each level halves
    /// the lanes per group; at the end lane i holds the group whose index is i's bits
    /// reversed. Always inlined into [`min_max_16_groups`] (whose AVX-512F it relies on),
    /// where the levels unroll and the 16 vectors stay in registers.
    #[inline(always)]
    fn reduce(mut v: [__m512; L], max: bool) -> __m512 {
        let (mut n, mut w) = (L, L / 2);
        while w > 0 {
            // SAFETY: inlined into an AVX-512F function (see above); the index arrays hold
            // 16 i32.
            unsafe {
                let x = _mm512_loadu_si512(index(w, false).as_ptr() as *const _);
                let y = _mm512_loadu_si512(index(w, true).as_ptr() as *const _);
                for p in 0..n / 2 {
                    let (a, b) = (v[2 * p], v[2 * p + 1]);
                    let (xs, ys) = (
                        _mm512_permutex2var_ps(a, x, b),
                        _mm512_permutex2var_ps(a, y, b),
                    );
                    // `op(first, second)` keeps `first` unless `second` is beyond it.
                    v[p] = if max {
                        _mm512_max_ps(ys, xs)
                    } else {
                        _mm512_min_ps(ys, xs)
                    };
                }
            }
            n /= 2;
            w /= 2;
        }
        v[0]
    }

    /// Permute indices of [`reduce`] at width `w`: the first operand's lanes (`second`
    /// false) or the second's (0..16 picks from a, 16..32 from b).
    #[inline(always)]
    const fn index(w: usize, second: bool) -> [i32; L] {
        let mut idx = [0i32; L];
        let mut i = 0;
        while i < L {
            let clear = i & w == 0;
            idx[i] = match (clear, second) {
                (true, false) => i,
                (false, false) => 16 + i - w,
                (true, true) => i + w,
                (false, true) => 16 + i,
            } as i32;
            i += 1;
        }
        idx
    }
}

const NAN_LANES: usize = 16;

/// Whether every value seen was finite, accumulated lane-wise as `madd(x, 0, lane)`:
/// `x·0` is NaN exactly for a NaN or infinite `x`, and a NaN stays in the sum (one
/// instruction per vector in the FMA copies, rather than a pass of its own over the tile).
#[derive(Default)]
pub struct NanLanes([f32; NAN_LANES]);

impl NanLanes {
    #[inline(always)]
    pub fn new() -> Self {
        Self::default()
    }

    #[inline(always)]
    pub fn all_finite(&self) -> bool {
        self.0.iter().all(|&v| v == 0.0)
    }
}

/// Per column `c` of the row-major `rows` (rows of `mins.len()` values), the min and max
/// over the rows, and whether every value is finite (as in [`NanLanes`]): channel groups'
/// ranges straight from token rows, vectorized across channels (no transpose).
#[inline(always)]
pub fn column_min_max<M: Madd>(rows: &[f32], mins: &mut [f32], maxs: &mut [f32]) -> bool {
    // Blocks of B columns whose running min/max stay in registers across the rows (a
    // whole-row pass would store both rows to memory after every token).
    const B: usize = 32;
    let d = mins.len();
    let maxs = &mut maxs[..d];
    let mut nan = [0f32; B];
    #[allow(unused_mut)]
    let mut c0 = 0;
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: `level()` detected AVX-512F on this CPU.
        let (done, finite) = unsafe { avx512::column_min_max(rows, mins, maxs) };
        if !finite {
            return false;
        }
        c0 = done;
    }
    while c0 < d {
        let w = (d - c0).min(B);
        let mut lo = [f32::INFINITY; B];
        let mut hi = [f32::NEG_INFINITY; B];
        for row in rows.chunks_exact(d) {
            let row = &row[c0..c0 + w];
            if let Some(row) = row.first_chunk::<B>() {
                for i in 0..B {
                    lo[i] = if row[i] < lo[i] { row[i] } else { lo[i] };
                    hi[i] = if row[i] > hi[i] { row[i] } else { hi[i] };
                    nan[i] = M::madd(row[i], 0.0, nan[i]);
                }
            } else {
                for (i, &v) in row.iter().enumerate() {
                    lo[i] = if v < lo[i] { v } else { lo[i] };
                    hi[i] = if v > hi[i] { v } else { hi[i] };
                    nan[i] = M::madd(v, 0.0, nan[i]);
                }
            }
        }
        mins[c0..c0 + w].copy_from_slice(&lo[..w]);
        maxs[c0..c0 + w].copy_from_slice(&hi[..w]);
        c0 += w;
    }
    nan.iter().all(|&v| v == 0.0)
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
    use crate::quant::simd::{Fused, Separate};

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
        // Whole vectors of 8 and a tail; signs, zeros, subnormal and overflowing ranges.
        let mut min = vec![-1.3f32, 0.0, 2.0, -1e-9, 5.0, -0.0, 6e-8, -65504.0, 1e-9];
        let mut max = vec![2.7f32, 0.0, 2.0001, 1e-9, 5.0, 0.0, 1e-7, 65504.0, 3.0];
        for i in 0..40 {
            let a = ((i * 37 % 101) as f32 - 50.0) * 0.173;
            min.push(a);
            max.push(a + (i * 13 % 17) as f32 * 0.61);
        }
        let n = min.len();
        let check = |min: &[f32], max: &[f32]| {
            let n = min.len();
            let mut out = vec![f16::ZERO; 2 * n];
            let (mut zeros, mut inv) = (vec![0f32; n], vec![0f32; n]);
            let ok = params_slice(min, max, 1.0 / 7.0, &mut out, &mut zeros, &mut inv);
            for i in 0..n {
                let (s, z) = params(min[i], max[i], 1.0 / 7.0).unwrap();
                let got = (out[2 * i].to_bits(), out[2 * i + 1].to_bits());
                assert_eq!(got, (s.to_bits(), z.to_bits()), "{i}");
                assert_eq!(zeros[i].to_bits(), z.to_f32().to_bits(), "{i}");
                assert_eq!(inv[i].to_bits(), inverse_scale(s.to_f32()).to_bits(), "{i}");
            }
            ok
        };
        assert!(check(&min, &max));
        // A range beyond float16, in a whole vector and in the tail.
        for at in [3, n - 1] {
            let mut min = min.clone();
            min[at] = -70000.0;
            let mut out = vec![f16::ZERO; 2 * n];
            let (mut zeros, mut inv) = (vec![0f32; n], vec![0f32; n]);
            let ok = params_slice(&min, &max, 1.0 / 7.0, &mut out, &mut zeros, &mut inv);
            assert!(!ok, "-70000 does not fit float16 (group {at})");
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
        let mut nan = NanLanes::new();
        assert_eq!(min_max::<Separate>(&v, &mut nan), (-20.0, 16.0));
        assert_eq!(min_max::<Separate>(&v[..5], &mut nan), (-20.0, 14.0));
        assert!(nan.all_finite());
        // 3 rows of 4 columns.
        let rows = [
            1.0, -2.0, 3.0, 0.5, -1.0, 5.0, 3.0, 0.25, 2.0, 0.0, -3.0, 0.75,
        ];
        let (mut mins, mut maxs) = ([0.0; 4], [0.0; 4]);
        assert!(column_min_max::<Separate>(&rows, &mut mins, &mut maxs));
        assert_eq!(mins, [-1.0, -2.0, -3.0, 0.25]);
        assert_eq!(maxs, [2.0, 5.0, 3.0, 0.75]);
        // A NaN or an infinity anywhere is reported, whatever the column or lane.
        let wide: Vec<f32> = (0..3 * 40).map(|i| (i % 7) as f32).collect();
        let (mut mins, mut maxs) = ([0.0; 40], [0.0; 40]);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 37, 45, 100, 119] {
                let mut rows = wide.clone();
                rows[at] = bad;
                assert!(!column_min_max::<Separate>(&rows, &mut mins, &mut maxs));
                assert!(!column_min_max::<Fused>(&rows, &mut mins, &mut maxs));
                let mut nan = NanLanes::new();
                min_max::<Separate>(&rows, &mut nan);
                assert!(!nan.all_finite(), "{bad} at {at}");
            }
        }
        assert!(column_min_max::<Fused>(&wide, &mut mins, &mut maxs));
        // 16-column blocks of 128, 64 and 16 (AVX-512) and a tail, against a plain fold.
        for d in [16, 40, 64, 128, 200, 256] {
            let rows: Vec<f32> = (0..5 * d)
                .map(|i| ((i * 7919) % 1009) as f32 * 0.37 - 150.0)
                .collect();
            let (mut mins, mut maxs) = (vec![0.0; d], vec![0.0; d]);
            assert!(column_min_max::<Fused>(&rows, &mut mins, &mut maxs));
            for c in 0..d {
                let column = rows.iter().skip(c).step_by(d);
                assert_eq!(
                    mins[c],
                    column.clone().copied().fold(f32::INFINITY, f32::min)
                );
                assert_eq!(maxs[c], column.copied().fold(f32::NEG_INFINITY, f32::max));
            }
        }
        let mut nan = NanLanes::new();
        min_max::<Fused>(&wide, &mut nan);
        assert!(nan.all_finite());
    }

    #[test]
    fn groups_at_once_equal_one_at_a_time() {
        fn check<const G: usize>() {
            // 40 groups: two batches of 16 and a remainder of 8.
            let n = 40;
            let vals: Vec<f32> = (0..n * G)
                .map(|i| ((i * 7919 % 1009) as f32 - 500.0) * 0.013)
                .collect();
            let (mut mins, mut maxs) = (vec![0f32; n], vec![0f32; n]);
            let mut nan = NanLanes::new();
            min_max_groups::<Fused, G>(&vals, &mut nan, &mut mins, &mut maxs);
            assert!(nan.all_finite());
            for (i, group) in vals.chunks_exact(G).enumerate() {
                let mn = group.iter().cloned().fold(f32::INFINITY, f32::min);
                let mx = group.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!((mins[i], maxs[i]), (mn, mx), "G {G} group {i}");
            }
            for at in [3, 16 * G + 5, n * G - 1] {
                for bad in [f32::NAN, f32::INFINITY] {
                    let mut vals = vals.clone();
                    vals[at] = bad;
                    let mut nan = NanLanes::new();
                    min_max_groups::<Fused, G>(&vals, &mut nan, &mut mins, &mut maxs);
                    assert!(!nan.all_finite(), "G {G}: {bad} at {at}");
                }
            }
        }
        check::<32>();
        check::<64>();
        check::<128>();
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
