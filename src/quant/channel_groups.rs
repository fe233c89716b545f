//! Channel groups (one channel over G tokens) quantized straight from a tile's 16-bit
//! rows, with no float32 copy of the tile, and dequantized straight into float16 rows
//! ([`dequant_row_f16`]).
//!
//! The general path converts a tile to float32 first and reads that copy twice (ranges,
//! then codes); for bfloat16 keys that conversion pass was ~40% of the kernel's samples in
//! a profile (about a quarter of them on its stores of the copy), and quantize went from
//! 12–15 to 22–24 GB/s without it. Here both passes read the bfloat16 or float16
//! rows and convert in registers. A bfloat16 value is the top half of a float32, so 32
//! bfloat16 channels (one 64-byte load) split into two float32 vectors with one shift
//! (even channels) and one mask (odd channels); the passes work in that even/odd order and
//! put their results back in channel order with a permute. float16 rows convert with
//! `vcvtph2ps`, 16 channels per instruction, already in order.
//!
//! AVX-512 only, for head_dim a multiple of 32; [`supported`] says when the caller may
//! use it instead of the float32 tile.

use super::pack::WordPlane;
use half::{bf16, f16};
use std::any::TypeId;

/// The 16-bit element formats this path reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half16 {
    BFloat16,
    Float16,
}

/// `values` as their 16-bit patterns and format, if `T` is bfloat16 or float16.
pub fn as_bits<T: 'static>(values: &[T]) -> Option<(&[u16], Half16)> {
    let format = if TypeId::of::<T>() == TypeId::of::<bf16>() {
        Half16::BFloat16
    } else if TypeId::of::<T>() == TypeId::of::<f16>() {
        Half16::Float16
    } else {
        return None;
    };
    // SAFETY: T is `half::bf16` or `half::f16` (checked above), both `repr(transparent)`
    // over a u16: same size, alignment and validity, so the slice reinterprets as u16s.
    let bits = unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u16, values.len()) };
    Some((bits, format))
}

/// [`as_bits`] for a mutable slice.
pub fn as_bits_mut<T: 'static>(values: &mut [T]) -> Option<(&mut [u16], Half16)> {
    let (_, format) = as_bits(&values[..0])?;
    // SAFETY: as in `as_bits` (T is bf16 or f16, `repr(transparent)` over u16); the
    // mutable borrow of `values` moves into the result.
    let bits =
        unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr() as *mut u16, values.len()) };
    Some((bits, format))
}

/// Channels one step of either pass covers.
pub const STEP: usize = 32;

/// Whether rows of `d` channels can be quantized here on this CPU.
#[inline(always)]
pub fn supported(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        d > 0 && d.is_multiple_of(STEP) && super::simd::level() == super::simd::Level::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// Per channel `c` of the `G` rows of `d = mins.len()` values in `rows`, the min and max
/// over the rows (as [`super::group::column_min_max`] computes them from the float32 rows,
/// bit for bit), and whether every value was finite; `None`, having done nothing, unless
/// [`supported`]`(d)` and `rows` holds `G·d` values.
#[inline(always)]
pub fn column_min_max<const G: usize>(
    rows: &[u16],
    format: Half16,
    mins: &mut [f32],
    maxs: &mut [f32],
) -> Option<bool> {
    let d = mins.len();
    if !supported(d) || maxs.len() != d || rows.len() < G * d {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supported` detected AVX-512F on this CPU.
    return Some(unsafe {
        match format {
            Half16::BFloat16 => avx512::column_min_max::<true, G>(rows, mins, maxs),
            Half16::Float16 => avx512::column_min_max::<false, G>(rows, mins, maxs),
        }
    });
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = format;
        None
    }
}

/// Every packed word of every channel group of the tile into `words` (word `w` of channel
/// `c` at `words[w·d + c]`, as `WordPlane` lays them out), from the `G` rows of
/// `d = zeros.len()` values with each channel's `zeros` and `inv` (every value inside its
/// group's range: see `code_bits_in_range`). Returns false, having done nothing, unless
/// [`supported`]`(d)` and the slices hold a whole tile.
#[inline(always)]
pub fn encode_words<const BITS: u32, const G: usize>(
    rows: &[u16],
    format: Half16,
    zeros: &[f32],
    inv: &[f32],
    words: &mut [u32],
) -> bool {
    let d = zeros.len();
    let whole = inv.len() == d
        && rows.len() >= G * d
        && words.len() >= super::pack::packed_bytes(G, BITS) / 4 * d;
    if !supported(d) || !whole {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supported` detected AVX-512F on this CPU.
    unsafe {
        match format {
            Half16::BFloat16 => avx512::encode_words::<true, BITS, G>(rows, zeros, inv, words),
            Half16::Float16 => avx512::encode_words::<false, BITS, G>(rows, zeros, inv, words),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = format;
    cfg!(target_arch = "x86_64")
}

/// Token row `t` of a tile of channel groups straight into float16 `out`: the mirror of
/// `pack::dequant_code_row` (code `t` of each channel's group from the word rows `words`,
/// `code·scale + zero` with two roundings), converted to float16 in registers (round to
/// nearest even, as `half`) and stored 32 channels at a time. Through an f32 row and a
/// slice conversion, the f32 row's stores and `vcvtps2ph`'s memory form were ~60% of
/// dequantizing float16 channel groups. Returns false, having done nothing, unless
/// [`supported`]`(out.len())` and the slices hold the row.
#[inline(always)]
pub fn dequant_row_f16(
    words: &[u32],
    t: usize,
    g: usize,
    bits: u32,
    scales: &[f32],
    zeros: &[f32],
    out: &mut [u16],
) -> bool {
    let n = out.len();
    let wpg = super::pack::packed_bytes(g, bits) / 4;
    if !supported(n) || scales.len() < n || zeros.len() < n || words.len() < wpg * n || t >= g {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supported` detected AVX-512F on this CPU.
    unsafe {
        avx512::dequant_row_f16(words, t, g, bits, scales, zeros, out)
    }
    cfg!(target_arch = "x86_64")
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{WordPlane, STEP};
    use crate::quant::pack::packed_bytes;
    use crate::quant::pack::{code_rows, CodeRows};
    use std::arch::x86_64::*;

    /// Lanes of a vector.
    const L: usize = 16;

    /// `i` of the even/odd order ↔ channel: bfloat16 vectors hold channels 2i (first) and
    /// 2i + 1 (second). Indices of a two-source permute (16.. picks from the second).
    const INTERLEAVE_LO: [i32; L] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
    const INTERLEAVE_HI: [i32; L] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];
    const EVENS: [i32; L] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
    const ODDS: [i32; L] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];

    #[inline(always)]
    fn indices(i: &[i32; L]) -> __m512i {
        // SAFETY: 16 i32; inlined into AVX-512F functions only.
        unsafe { _mm512_loadu_si512(i.as_ptr() as *const _) }
    }

    /// 32 channels at `p` as two float32 vectors: bfloat16 as (even, odd) channels,
    /// float16 as (first 16, last 16).
    ///
    /// SAFETY: 32 u16 readable at `p`; inlined into AVX-512F functions only.
    #[inline(always)]
    unsafe fn load<const BF16: bool>(p: *const u16) -> (__m512, __m512) {
        if BF16 {
            let v = _mm512_loadu_si512(p as *const _);
            let even = _mm512_slli_epi32::<16>(v);
            let odd = _mm512_and_si512(v, _mm512_set1_epi32(0xffff_0000_u32 as i32));
            (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
        } else {
            let lo = _mm256_loadu_si256(p as *const __m256i);
            let hi = _mm256_loadu_si256(p.add(L) as *const __m256i);
            (_mm512_cvtph_ps(lo), _mm512_cvtph_ps(hi))
        }
    }

    /// Two vectors of [`load`]'s order back in channel order (`back`), or two vectors in
    /// channel order in [`load`]'s order: for bfloat16 one two-source permute each.
    #[inline(always)]
    fn reorder<const BF16: bool>(a: __m512i, b: __m512i, back: bool) -> (__m512i, __m512i) {
        if !BF16 {
            return (a, b);
        }
        let (first, second) = if back {
            (&INTERLEAVE_LO, &INTERLEAVE_HI)
        } else {
            (&EVENS, &ODDS)
        };
        // SAFETY: inlined into AVX-512F functions only.
        unsafe {
            (
                _mm512_permutex2var_epi32(a, indices(first), b),
                _mm512_permutex2var_epi32(a, indices(second), b),
            )
        }
    }

    /// `reorder(.., false)` of two float vectors in channel order.
    #[inline(always)]
    fn from_channels<const BF16: bool>(lo: __m512, hi: __m512) -> (__m512, __m512) {
        // SAFETY: casts only; inlined into AVX-512F functions only.
        unsafe {
            let (a, b) = reorder::<BF16>(_mm512_castps_si512(lo), _mm512_castps_si512(hi), false);
            (_mm512_castsi512_ps(a), _mm512_castsi512_ps(b))
        }
    }

    /// [`super::column_min_max`]: blocks of 128, 64 or 32 channels whose running mins,
    /// maxes and finiteness sums stay in registers across the rows.
    #[target_feature(enable = "avx512f")]
    pub(super) fn column_min_max<const BF16: bool, const G: usize>(
        rows: &[u16],
        mins: &mut [f32],
        maxs: &mut [f32],
    ) -> bool {
        let d = mins.len().min(maxs.len());
        if rows.len() < G * d || !d.is_multiple_of(STEP) {
            return false;
        }
        let mut c0 = 0;
        let mut finite = true;
        while c0 < d {
            let (ok, steps) = match d - c0 {
                left if left >= 4 * STEP => (block::<BF16, G, 4>(rows, d, c0, mins, maxs), 4),
                left if left >= 2 * STEP => (block::<BF16, G, 2>(rows, d, c0, mins, maxs), 2),
                _ => (block::<BF16, G, 1>(rows, d, c0, mins, maxs), 1),
            };
            finite &= ok;
            c0 += steps * STEP;
        }
        finite
    }

    /// Channels `c0..c0 + 32·S`: mins and maxes into `mins`, `maxs`; whether all were
    /// finite (`x·0` summed per pair of vectors: NaN exactly for a NaN or an infinity).
    /// `min(x, lo)` in that operand order, as the float32 path, so ties of signed zeros
    /// resolve the same way.
    #[inline(always)]
    fn block<const BF16: bool, const G: usize, const S: usize>(
        rows: &[u16],
        d: usize,
        c0: usize,
        mins: &mut [f32],
        maxs: &mut [f32],
    ) -> bool {
        if c0 + S * STEP > d || rows.len() < G * d || mins.len() < d || maxs.len() < d {
            return true;
        }
        // SAFETY (every intrinsic): inlined into `column_min_max`, an AVX-512F function;
        // row t's step s lies at t·d + c0 + 32s + 0..32 < G·d ≤ rows.len(), and the
        // stores at c0 + 32s + 0..32 ≤ d ≤ both lengths (checked above).
        unsafe {
            let zero = _mm512_setzero_ps();
            let mut lo = [[_mm512_set1_ps(f32::INFINITY); 2]; S];
            let mut hi = [[_mm512_set1_ps(f32::NEG_INFINITY); 2]; S];
            let mut nan = [zero; S];
            for t in 0..G {
                let row = rows.as_ptr().add(t * d + c0);
                for s in 0..S {
                    let (a, b) = load::<BF16>(row.add(s * STEP));
                    lo[s][0] = _mm512_min_ps(a, lo[s][0]);
                    lo[s][1] = _mm512_min_ps(b, lo[s][1]);
                    hi[s][0] = _mm512_max_ps(a, hi[s][0]);
                    hi[s][1] = _mm512_max_ps(b, hi[s][1]);
                    nan[s] = _mm512_fmadd_ps(a, zero, _mm512_fmadd_ps(b, zero, nan[s]));
                }
            }
            let mut sum = zero;
            for s in 0..S {
                let at = c0 + s * STEP;
                for (v, out) in [(lo[s], mins.as_mut_ptr()), (hi[s], maxs.as_mut_ptr())] {
                    let (first, second) =
                        reorder::<BF16>(_mm512_castps_si512(v[0]), _mm512_castps_si512(v[1]), true);
                    _mm512_storeu_si512(out.add(at) as *mut _, first);
                    _mm512_storeu_si512(out.add(at + L) as *mut _, second);
                }
                sum = _mm512_add_ps(sum, nan[s]);
            }
            _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(sum, zero) == 0
        }
    }

    /// [`super::encode_words`], 32 channels at a time: each word's codes are computed
    /// from the rows their fields come from (`WordPlane`) and shifted into place in
    /// registers, `code_bits_in_range` lane-wise.
    #[target_feature(enable = "avx512f")]
    pub(super) fn encode_words<const BF16: bool, const BITS: u32, const G: usize>(
        rows: &[u16],
        zeros: &[f32],
        inv: &[f32],
        words: &mut [u32],
    ) {
        let d = zeros.len().min(inv.len());
        let wpg = packed_bytes(G, BITS) / 4;
        if rows.len() < G * d || words.len() < wpg * d || !d.is_multiple_of(STEP) {
            return;
        }
        let round = _mm512_set1_ps(12_582_912.0);
        for c0 in (0..d).step_by(STEP) {
            // SAFETY: c0 + 32 ≤ d ≤ both lengths.
            let (za, zb) = unsafe {
                from_channels::<BF16>(
                    _mm512_loadu_ps(zeros.as_ptr().add(c0)),
                    _mm512_loadu_ps(zeros.as_ptr().add(c0 + L)),
                )
            };
            // SAFETY: as above.
            let (ia, ib) = unsafe {
                from_channels::<BF16>(
                    _mm512_loadu_ps(inv.as_ptr().add(c0)),
                    _mm512_loadu_ps(inv.as_ptr().add(c0 + L)),
                )
            };
            for w in 0..wpg {
                let plane = WordPlane::of(G, BITS, w);
                let (from, mask) = (plane.from, _mm512_set1_epi32(plane.mask() as i32));
                let mut acc = [_mm512_setzero_si512(); 2];
                for byte in 0..4 {
                    for k in 0..plane.per_byte() {
                        let (t, at) = plane.field(w, byte, k);
                        // SAFETY: t < G (a field of a group of G codes), so row t's
                        // channels c0..c0 + 32 lie inside rows[..G·d].
                        let (a, b) = unsafe { load::<BF16>(rows.as_ptr().add(t * d + c0)) };
                        for (lane, (x, (z, iv))) in
                            acc.iter_mut().zip([(a, (za, ia)), (b, (zb, ib))])
                        {
                            let bits = _mm512_castps_si512(_mm512_add_ps(
                                _mm512_mul_ps(_mm512_sub_ps(x, z), iv),
                                round,
                            ));
                            let field = _mm512_and_si512(
                                _mm512_srl_epi32(bits, _mm_cvtsi32_si128(from as i32)),
                                mask,
                            );
                            *lane = _mm512_or_si512(
                                *lane,
                                _mm512_sll_epi32(field, _mm_cvtsi32_si128(at as i32)),
                            );
                        }
                    }
                }
                let (first, second) = reorder::<BF16>(acc[0], acc[1], true);
                // SAFETY: w·d + c0 + 32 ≤ wpg·d ≤ words.len() (checked above).
                unsafe {
                    let out = words.as_mut_ptr().add(w * d + c0);
                    _mm512_storeu_si512(out as *mut _, first);
                    _mm512_storeu_si512(out.add(L) as *mut _, second);
                }
            }
        }
    }

    /// [`super::dequant_row_f16`] (the caller checked every length).
    #[target_feature(enable = "avx512f")]
    pub(super) fn dequant_row_f16(
        words: &[u32],
        t: usize,
        g: usize,
        bits: u32,
        scales: &[f32],
        zeros: &[f32],
        out: &mut [u16],
    ) {
        let n = out.len();
        let CodeRows {
            low,
            bit,
            mask,
            high,
        } = code_rows(words, n, t, g, bits);
        let (shift, mask) = (
            _mm_cvtsi32_si128(bit as i32),
            _mm512_set1_epi32(mask as i32),
        );
        let one = _mm512_set1_epi32(1);
        for c in (0..n - n % STEP).step_by(STEP) {
            let mut halves = [_mm256_setzero_si256(); 2];
            for (j, half) in halves.iter_mut().enumerate() {
                let i = c + j * L;
                // SAFETY (every load and the store): i + 16 ≤ c + 32 ≤ n, and every slice
                // holds n values (the caller checked `scales`, `zeros` and `out`; the
                // word rows are cut to n above).
                unsafe {
                    let w = _mm512_loadu_si512(low.as_ptr().add(i) as *const _);
                    let mut code = _mm512_and_si512(_mm512_srl_epi32(w, shift), mask);
                    if let Some((high, hbit)) = high {
                        let h = _mm512_loadu_si512(high.as_ptr().add(i) as *const _);
                        let h = _mm512_srl_epi32(h, _mm_cvtsi32_si128(hbit as i32));
                        code =
                            _mm512_or_si512(code, _mm512_slli_epi32::<2>(_mm512_and_si512(h, one)));
                    }
                    let scaled = _mm512_mul_ps(
                        _mm512_cvtepi32_ps(code),
                        _mm512_loadu_ps(scales.as_ptr().add(i)),
                    );
                    let v = _mm512_add_ps(scaled, _mm512_loadu_ps(zeros.as_ptr().add(i)));
                    *half = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                }
            }
            // One 64-byte store of both halves: stored one by one, the conversions were
            // folded into `vcvtps2ph`'s memory form.
            let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(halves[0]), halves[1]);
            // SAFETY: c + 32 ≤ n = out.len().
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(c) as *mut _, both) };
        }
    }
}
