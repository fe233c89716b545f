//! Codes of token groups (G consecutive channels of one token) packed straight into their
//! planar bytes (`pack.rs`), for groups without outliers whose scale and zero are known.
//!
//! With AVX-512 a group's codes are computed 16 lanes at a time and its byte planes are
//! OR-ed together in registers ("folds", below), then narrowed to bytes on the store. With a
//! portable loop over a byte array per group, token-group quantize ran 1.6–1.9× slower;
//! written as one unrolled function per group, the compiler vectorized across groups with
//! gathers, 1.8–2.3× slower than that.

use super::group::code_bits_in_range;
use super::pack::{pack, packed_bytes};

/// Packs the codes of every group of `G` values side by side in `grouped` (group `i` with
/// `zeros[i]` and `inv[i]`; every value inside its group's range, so no clamp: see
/// [`code_bits_in_range`]) into `codes`, group after group (`packed_bytes(G, BITS)` each).
/// Groups past the shortest of the four slices are left alone.
#[inline(always)]
pub fn encode<const BITS: u32, const G: usize>(
    grouped: &[f32],
    zeros: &[f32],
    inv: &[f32],
    codes: &mut [u8],
) {
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: `level()` detected AVX-512F on this CPU.
        done = unsafe { avx512::encode::<BITS, G>(grouped, zeros, inv, codes) };
    }
    let gb = packed_bytes(G, BITS);
    let mut group = [0u8; G];
    let mask = (1u32 << BITS) - 1;
    for (((vals, &z), &iv), out) in grouped
        .chunks_exact(G)
        .zip(zeros)
        .zip(inv)
        .zip(codes.chunks_exact_mut(gb))
        .skip(done)
    {
        for (c, &x) in group.iter_mut().zip(vals) {
            *c = (code_bits_in_range(x, z, iv) & mask) as u8;
        }
        pack(&group, BITS, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::packed_bytes;
    use std::arch::x86_64::*;

    /// Vectors of one group (G ≤ 128).
    const MAX_VECTORS: usize = 8;

    /// [`super::encode`] with AVX-512F; returns how many groups it packed (all of them).
    #[target_feature(enable = "avx512f")]
    pub(super) fn encode<const BITS: u32, const G: usize>(
        grouped: &[f32],
        zeros: &[f32],
        inv: &[f32],
        codes: &mut [u8],
    ) -> usize {
        let gb = packed_bytes(G, BITS);
        if !G.is_multiple_of(16) || G / 16 > MAX_VECTORS {
            return 0;
        }
        let groups = (grouped.len() / G)
            .min(zeros.len())
            .min(inv.len())
            .min(codes.len() / gb);
        let round = _mm512_set1_ps(12_582_912.0);
        let mask = _mm512_set1_epi32((1 << BITS) - 1);
        for i in 0..groups {
            let (z, iv) = (_mm512_set1_ps(zeros[i]), _mm512_set1_ps(inv[i]));
            let mut c = [_mm512_setzero_si512(); MAX_VECTORS];
            for (j, lanes) in c.iter_mut().enumerate().take(G / 16) {
                // SAFETY: i < groups ≤ grouped.len()/G and j < G/16: 16 floats inside.
                let x = unsafe { _mm512_loadu_ps(grouped.as_ptr().add(i * G + 16 * j)) };
                // `code_bits_in_range`, lane-wise.
                let q = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(x, z), iv), round);
                *lanes = _mm512_and_si512(_mm512_castps_si512(q), mask);
            }
            let out = &mut codes[i * gb..(i + 1) * gb];
            match BITS {
                8 => store(&c, G, out),
                4 => {
                    let n = fold::<4>(&mut c, G);
                    store(&c, n, out)
                }
                2 => {
                    let n = fold::<4>(&mut c, G);
                    let n = fold::<2>(&mut c, n);
                    store(&c, n, out)
                }
                3 => {
                    // Low two bits as a 2-bit plane, then the high bit as a 1-bit plane.
                    let (low, high) = out.split_at_mut(G / 4);
                    let three = _mm512_set1_epi32(3);
                    let one = _mm512_set1_epi32(1);
                    let mut l = c;
                    let mut h = c;
                    for j in 0..G / 16 {
                        l[j] = _mm512_and_si512(c[j], three);
                        h[j] = _mm512_and_si512(_mm512_srli_epi32::<2>(c[j]), one);
                    }
                    let n = fold::<4>(&mut l, G);
                    let n = fold::<2>(&mut l, n);
                    store(&l, n, low);
                    let n = fold::<4>(&mut h, G);
                    let n = fold::<2>(&mut h, n);
                    let n = fold::<1>(&mut h, n);
                    store(&h, n, high);
                }
                _ => unreachable!("bits validated by QuantConfig"),
            }
        }
        groups
    }

    /// Of the `n` lanes held in `c` (in order, 16 per vector), lane `i` of the first half
    /// becomes `lane i | lane (i + n/2) << SHIFT`; returns `n/2`. The planar layout is
    /// exactly these folds: a byte of 4-bit codes is `c[i] | c[i + G/2] << 4`, one of
    /// 2-bit codes folds with 4 and then 2.
    #[inline(always)]
    fn fold<const SHIFT: u32>(c: &mut [__m512i; MAX_VECTORS], n: usize) -> usize {
        let half = n / 2;
        // SAFETY (every intrinsic): inlined into `encode`, an AVX-512F function.
        unsafe {
            if half >= 16 {
                let v = half / 16;
                for j in 0..v {
                    c[j] = _mm512_or_si512(c[j], _mm512_slli_epi32::<SHIFT>(c[j + v]));
                }
            } else {
                // Within one vector: bring lane i + half down to lane i.
                let down = _mm512_and_si512(
                    _mm512_add_epi32(
                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                        _mm512_set1_epi32(half as i32),
                    ),
                    _mm512_set1_epi32(15),
                );
                let moved = _mm512_permutexvar_epi32(down, c[0]);
                c[0] = _mm512_or_si512(c[0], _mm512_slli_epi32::<SHIFT>(moved));
            }
        }
        half
    }

    /// The low byte of each of the first `n` lanes of `c` into `out` (`n` bytes: a multiple
    /// of 16, or 8, or 4).
    #[inline(always)]
    fn store(c: &[__m512i; MAX_VECTORS], n: usize, out: &mut [u8]) {
        // SAFETY (every intrinsic): inlined into `encode`, an AVX-512F function; each
        // store writes `out[16j..16j + 16]` with 16j + 16 ≤ n, or the first 8 or 4 bytes,
        // all within `out` (checked by the slice below).
        unsafe {
            let out = &mut out[..n];
            if n >= 16 {
                for (j, bytes) in out.chunks_exact_mut(16).enumerate() {
                    _mm_storeu_si128(
                        bytes.as_mut_ptr() as *mut __m128i,
                        _mm512_cvtepi32_epi8(c[j]),
                    );
                }
            } else if n == 8 {
                _mm_storel_epi64(out.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(c[0]));
            } else {
                let word = _mm_cvtsi128_si32(_mm512_cvtepi32_epi8(c[0])).to_le_bytes();
                out.copy_from_slice(&word[..n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::group::{inverse_scale, params};

    /// Every bit width and group size against the codes computed one by one and packed by
    /// [`pack`]; the groups span different ranges, one is constant (scale 0).
    #[test]
    fn packed_codes_equal_the_group_by_group_reference() {
        fn check<const BITS: u32, const G: usize>() {
            let n = 11;
            let grouped: Vec<f32> = (0..n * G)
                .map(|i| {
                    let (g, k) = (i / G, i % G);
                    if g == 3 {
                        1.5
                    } else {
                        ((k * 37 + g * 11) % 101) as f32 * (0.01 + g as f32 * 0.3) - g as f32
                    }
                })
                .collect();
            let inv_levels = 1.0 / ((1u32 << BITS) - 1) as f32;
            let (mut zeros, mut inv) = (vec![0f32; n], vec![0f32; n]);
            for (i, vals) in grouped.chunks_exact(G).enumerate() {
                let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (scale, zero) = params(lo, hi, inv_levels).unwrap();
                (zeros[i], inv[i]) = (zero.to_f32(), inverse_scale(scale.to_f32()));
            }
            let gb = packed_bytes(G, BITS);
            let mut expected = vec![0u8; n * gb];
            for (i, vals) in grouped.chunks_exact(G).enumerate() {
                let codes: Vec<u8> = vals
                    .iter()
                    .map(|&x| {
                        let v = ((x - zeros[i]) * inv[i]).round_ties_even();
                        v.clamp(0.0, ((1u32 << BITS) - 1) as f32) as u8
                    })
                    .collect();
                pack(&codes, BITS, &mut expected[i * gb..(i + 1) * gb]);
            }
            let mut packed = vec![0u8; n * gb];
            encode::<BITS, G>(&grouped, &zeros, &inv, &mut packed);
            assert_eq!(packed, expected, "bits {BITS} G {G}");
        }
        check::<2, 32>();
        check::<3, 32>();
        check::<4, 32>();
        check::<8, 32>();
        check::<2, 64>();
        check::<3, 64>();
        check::<4, 64>();
        check::<8, 64>();
        check::<2, 128>();
        check::<3, 128>();
        check::<4, 128>();
        check::<8, 128>();
    }
}
