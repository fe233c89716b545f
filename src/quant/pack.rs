//! Bit packing of one quantization group: `g` codes of `bits` bits into `g·bits/8` bytes.
//!
//! The layout is *planar*, chosen so that unpacking is a handful of shift-and-mask loops
//! over contiguous bytes that the compiler vectorizes (no code straddles a byte):
//!
//! - 8 bits: byte `i` is code `i`.
//! - 4 bits: with `n = g/2`, byte `i` holds code `i` in its low nibble and code `i + n`
//!   in its high nibble.
//! - 2 bits: with `n = g/4`, byte `i` holds codes `i, i+n, i+2n, i+3n` in bits 0–1, 2–3,
//!   4–5, 6–7.
//! - 3 bits (8 codes per 3 bytes): the low two bits of every code in a 2-bit plane as
//!   above (`g/4` bytes), followed by the high bit of every code in a 1-bit plane of `g/8`
//!   bytes, where bit `k` of byte `i` is the high bit of code `i + k·g/8`.
//!
//! Group sizes are multiples of 8, so every plane is whole bytes.

use super::simd::Madd;
use crate::tensor::KvFloat;

/// Bytes of a packed group of `g` codes.
#[inline(always)]
pub const fn packed_bytes(g: usize, bits: u32) -> usize {
    g * bits as usize / 8
}

/// Packs `codes` (each < 2^bits; `codes.len()` a multiple of 8) into `out`
/// (`packed_bytes(codes.len(), bits)` bytes).
#[inline(always)]
pub fn pack(codes: &[u8], bits: u32, out: &mut [u8]) {
    let g = codes.len();
    debug_assert_eq!(g % 8, 0);
    debug_assert_eq!(out.len(), packed_bytes(g, bits));
    match bits {
        8 => out.copy_from_slice(codes),
        4 => {
            // Zipped planes, not indices: no bounds checks, so the loop is whole vectors.
            let (low, high) = codes.split_at(g / 2);
            for ((o, &l), &h) in out.iter_mut().zip(low).zip(high) {
                *o = l | (h << 4);
            }
        }
        2 => pack2(codes, out),
        3 => {
            let (low, high) = out.split_at_mut(g / 4);
            let mut low_codes = [0u8; 128];
            for (l, &c) in low_codes.iter_mut().zip(codes) {
                *l = c & 3;
            }
            pack2(&low_codes[..g], low);
            high.fill(0);
            for (k, plane) in codes.chunks_exact(g / 8).enumerate() {
                for (byte, &c) in high.iter_mut().zip(plane) {
                    *byte |= ((c >> 2) & 1) << k;
                }
            }
        }
        _ => unreachable!("bits validated by QuantConfig"),
    }
}

#[inline(always)]
fn pack2(codes: &[u8], out: &mut [u8]) {
    let n = codes.len() / 4;
    let (c0, rest) = codes.split_at(n);
    let (c1, rest) = rest.split_at(n);
    let (c2, c3) = rest.split_at(n);
    for ((((o, &a), &b), &c), &d) in out.iter_mut().zip(c0).zip(c1).zip(c2).zip(c3) {
        *o = a | (b << 2) | (c << 4) | (d << 6);
    }
}

/// Lays out the packed groups of `d` channels one after the other in `out` (group `c` =
/// its `wpg` little-endian words), from word rows (`rows[w·d + c]` = word `w` of group
/// `c`, as [`WordPlane`] builds them, `rows.len() = wpg·d`): a transpose of a wpg × d
/// matrix of words. With AVX-512, 2 and 4 words per group (2 and 4 bits in groups of 32,
/// 2 bits in groups of 64) go 16 channels at a time through register shuffles: word by
/// word, this was a fifth of quantizing.
#[inline(always)]
pub fn spread_words(wpg: usize, rows: &[u32], out: &mut [u8]) {
    let d = rows.len() / wpg;
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: `level()` detected AVX-512F on this CPU.
        done = unsafe { avx512::spread_words(wpg, rows, out) };
    }
    for c in done..d {
        for w in 0..wpg {
            let at = 4 * (wpg * c + w);
            out[at..at + 4].copy_from_slice(&rows[w * d + c].to_le_bytes());
        }
    }
}

/// The inverse of [`spread_words`]: word rows from groups laid out one after another.
#[inline(always)]
pub fn gather_words(wpg: usize, groups: &[u8], rows: &mut [u32]) {
    let d = rows.len() / wpg;
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: `level()` detected AVX-512F on this CPU.
        done = unsafe { avx512::gather_words(wpg, groups, rows) };
    }
    for c in done..d {
        for w in 0..wpg {
            let at = 4 * (wpg * c + w);
            let bytes = [groups[at], groups[at + 1], groups[at + 2], groups[at + 3]];
            rows[w * d + c] = u32::from_le_bytes(bytes);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const L: usize = 16;

    /// The 128-bit lanes of four vectors as a 4×4 matrix, transposed.
    #[target_feature(enable = "avx512f")]
    fn transpose_lanes(x: [__m512i; 4]) -> [__m512i; 4] {
        let a = _mm512_shuffle_i32x4::<0b01_00_01_00>(x[0], x[1]);
        let b = _mm512_shuffle_i32x4::<0b01_00_01_00>(x[2], x[3]);
        let c = _mm512_shuffle_i32x4::<0b11_10_11_10>(x[0], x[1]);
        let e = _mm512_shuffle_i32x4::<0b11_10_11_10>(x[2], x[3]);
        [
            _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b),
            _mm512_shuffle_i32x4::<0b10_00_10_00>(c, e),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(c, e),
        ]
    }

    /// Word `i` of lane `j` of vector `m` to word `m` of lane `j` of vector `i`: the 4×4
    /// word matrices of each lane, transposed.
    #[target_feature(enable = "avx512f")]
    fn transpose_in_lanes(u: [__m512i; 4]) -> [__m512i; 4] {
        let t0 = _mm512_unpacklo_epi32(u[0], u[1]);
        let t1 = _mm512_unpackhi_epi32(u[0], u[1]);
        let t2 = _mm512_unpacklo_epi32(u[2], u[3]);
        let t3 = _mm512_unpackhi_epi32(u[2], u[3]);
        [
            _mm512_unpacklo_epi64(t0, t2),
            _mm512_unpackhi_epi64(t0, t2),
            _mm512_unpacklo_epi64(t1, t3),
            _mm512_unpackhi_epi64(t1, t3),
        ]
    }

    /// Word indices that interleave two rows of 16 words into 16 groups of two
    /// (`_mm512_permutex2var_epi32`: index bit 4 picks the second row).
    const INTERLEAVE: [[i32; L]; 2] = [
        [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23],
        [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31],
    ];
    /// ... and that take two rows back out of 16 groups of two.
    const DEINTERLEAVE: [[i32; L]; 2] = [
        [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30],
        [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31],
    ];

    /// `super::spread_words` for the whole blocks of 16 channels, for 2 or 4 words per
    /// group (others: nothing). Returns the channels done.
    #[target_feature(enable = "avx512f")]
    pub(super) fn spread_words(wpg: usize, rows: &[u32], out: &mut [u8]) -> usize {
        let d = rows.len() / wpg;
        let whole = d - d % L;
        if !(wpg == 2 || wpg == 4) || out.len() < 4 * wpg * d {
            return 0;
        }
        // SAFETY (loads, stores): row w's block c0 is rows[w·d + c0 .. +16] with c0 + 16 ≤
        // d; the groups of channels c0..c0+16 are out[4·wpg·c0 .. 4·wpg·(c0+16)], inside
        // the 4·wpg·d bytes checked above.
        let row = |w: usize, c0: usize| unsafe {
            _mm512_loadu_epi32(rows.as_ptr().add(w * d + c0) as *const i32)
        };
        let put = |at: usize, v: __m512i, out: &mut [u8]| unsafe {
            _mm512_storeu_epi32(out.as_mut_ptr().add(at) as *mut i32, v)
        };
        for c0 in (0..whole).step_by(L) {
            let base = 4 * wpg * c0;
            if wpg == 2 {
                let (r0, r1) = (row(0, c0), row(1, c0));
                for (k, idx) in INTERLEAVE.iter().enumerate() {
                    // SAFETY: 16 i32 indices.
                    let idx = unsafe { _mm512_loadu_epi32(idx.as_ptr()) };
                    put(base + 64 * k, _mm512_permutex2var_epi32(r0, idx, r1), out);
                }
            } else {
                // Group 4k + l is lane l of output k: words into their lanes, then lanes.
                let rows = [row(0, c0), row(1, c0), row(2, c0), row(3, c0)];
                let groups = transpose_lanes(transpose_in_lanes(rows));
                for (k, v) in groups.into_iter().enumerate() {
                    put(base + 64 * k, v, out);
                }
            }
        }
        whole
    }

    /// `super::gather_words` for the whole blocks of 16 channels, for 2 or 4 words per
    /// group (others: nothing). Returns the channels done.
    #[target_feature(enable = "avx512f")]
    pub(super) fn gather_words(wpg: usize, groups: &[u8], rows: &mut [u32]) -> usize {
        let d = rows.len() / wpg;
        let whole = d - d % L;
        if !(wpg == 2 || wpg == 4) || groups.len() < 4 * wpg * d {
            return 0;
        }
        // SAFETY (loads, stores): as in `spread_words`, the other way round.
        let load = |at: usize| unsafe { _mm512_loadu_epi32(groups.as_ptr().add(at) as *const i32) };
        let put = |w: usize, c0: usize, v: __m512i, rows: &mut [u32]| unsafe {
            _mm512_storeu_epi32(rows.as_mut_ptr().add(w * d + c0) as *mut i32, v)
        };
        for c0 in (0..whole).step_by(L) {
            let base = 4 * wpg * c0;
            if wpg == 2 {
                let (g0, g1) = (load(base), load(base + 64));
                for (w, idx) in DEINTERLEAVE.iter().enumerate() {
                    // SAFETY: 16 i32 indices.
                    let idx = unsafe { _mm512_loadu_epi32(idx.as_ptr()) };
                    put(w, c0, _mm512_permutex2var_epi32(g0, idx, g1), rows);
                }
            } else {
                let loaded = [
                    load(base),
                    load(base + 64),
                    load(base + 128),
                    load(base + 192),
                ];
                for (w, v) in transpose_in_lanes(transpose_lanes(loaded))
                    .into_iter()
                    .enumerate()
                {
                    put(w, c0, v, rows);
                }
            }
        }
        whole
    }
}

/// Which codes make up word `w` (bytes `4w .. 4w+4`, little-endian) of a group of `g`
/// codes packed by [`pack`]: they lie in one plane of `n` bytes starting at byte `first`,
/// whose every byte holds `8/width` fields of `width` bits (bits `from..` of their codes;
/// `from` is 2 only for the high bit of a 3-bit code); field k of the plane's byte j is
/// code j + k·n, at bit width·k of the byte. `packed_bytes(g, bits)` is a multiple of 4
/// for the group sizes 32, 64, 128, and a 3-bit group's two planes split at a word
/// boundary. Channel groups are quantized word by word this way: a word's codes come from
/// `32/width` token rows of the tile, each code computed and shifted into place in
/// registers, vectorized across the channels (x86 has no byte shifts, so words are 32-bit
/// lanes).
#[derive(Clone, Copy, Debug)]
pub struct WordPlane {
    first: usize,
    n: usize,
    pub width: u32,
    pub from: u32,
}

impl WordPlane {
    #[inline(always)]
    pub fn of(g: usize, bits: u32, w: usize) -> Self {
        let plane = |first, n, width, from| WordPlane {
            first,
            n,
            width,
            from,
        };
        match bits {
            2 | 4 | 8 => plane(0, g * bits as usize / 8, bits, 0),
            3 if 4 * w < g / 4 => plane(0, g / 4, 2, 0),
            3 => plane(g / 4, g / 8, 1, 2),
            _ => unreachable!("bits validated by QuantConfig"),
        }
    }

    /// Fields per byte.
    #[inline(always)]
    pub fn per_byte(&self) -> usize {
        8 / self.width as usize
    }

    #[inline(always)]
    pub fn mask(&self) -> u32 {
        (1 << self.width) - 1
    }

    /// The code of field `k` of byte `b` of word `w`, and the field's bit in the word.
    #[inline(always)]
    pub fn field(&self, w: usize, b: usize, k: usize) -> (usize, u32) {
        (
            4 * w + b - self.first + k * self.n,
            8 * b as u32 + self.width * k as u32,
        )
    }
}

/// Where code `t` of a group lies in its packed words (see [`WordPlane`]): the word
/// row and bit of its low field and that field's mask, and for 3 bits the word row and
/// bit of its high bit.
#[inline(always)]
fn code_fields(t: usize, g: usize, bits: u32) -> ((usize, u32, u32), Option<(usize, u32)>) {
    let at = |j: usize, shift: u32| (j / 4, 8 * (j % 4) as u32 + shift);
    let low = |j: usize, mask: u32, shift: u32| {
        let (row, bit) = at(j, shift);
        (row, bit, mask)
    };
    match bits {
        8 => (low(t, 0xff, 0), None),
        4 => (low(t % (g / 2), 15, 4 * (t / (g / 2)) as u32), None),
        2 => (low(t % (g / 4), 3, 2 * (t / (g / 4)) as u32), None),
        3 => {
            let (n4, n8) = (g / 4, g / 8);
            (
                low(t % n4, 3, 2 * (t / n4) as u32),
                Some(at(n4 + t % n8, (t / n8) as u32)),
            )
        }
        _ => unreachable!("bits validated by QuantConfig"),
    }
}

/// The word rows holding code `t` of every group whose packed words sit side by side in
/// rows of `n` words (`words[w·n + i]` = word `w` of group `i`): the low field's row, bit
/// and mask, and for 3 bits the high bit's row and bit.
pub(crate) struct CodeRows<'a> {
    pub low: &'a [u32],
    pub bit: u32,
    pub mask: u32,
    pub high: Option<(&'a [u32], u32)>,
}

/// [`CodeRows`] of code `t` of groups of `g` codes of `bits` bits.
#[inline(always)]
pub(crate) fn code_rows(words: &[u32], n: usize, t: usize, g: usize, bits: u32) -> CodeRows<'_> {
    let ((row, bit, mask), high) = code_fields(t, g, bits);
    let at = |row: usize| &words[row * n..(row + 1) * n];
    CodeRows {
        low: at(row),
        bit,
        mask,
        high: high.map(|(row, hbit)| (at(row), hbit)),
    }
}

/// The inverse of packing by [`WordPlane`], dequantized in the same pass: code `t` of every group
/// whose packed words sit side by side in `words` (`words[w·n + i]` = word `w` of group
/// `i`, `n = out.len()`), shifted and masked out of whole word rows (vectorized across
/// groups), then `out[i] = code·scales[i] + zeros[i]` (two roundings, as the libtorch path
/// computes it). Channel
/// groups are dequantized this way, one token row at a time, with no transpose of the
/// tile and no row of codes stored in between.
/// The values are written as `O` (f32, or straight to the output dtype when its
/// conversion is lane arithmetic: no f32 row stored and read back).
#[inline(always)]
pub fn dequant_code_row<O: KvFloat>(
    words: &[u32],
    t: usize,
    g: usize,
    bits: u32,
    scales: &[f32],
    zeros: &[f32],
    out: &mut [O],
) {
    let CodeRows {
        low,
        bit,
        mask,
        high,
    } = code_rows(words, out.len(), t, g, bits);
    match high {
        None => {
            for (((o, &w), &s), &z) in out.iter_mut().zip(low).zip(scales).zip(zeros) {
                *o = O::from_f32(((w >> bit) & mask) as f32 * s + z);
            }
        }
        Some((high, hbit)) => {
            let pairs = low.iter().zip(high);
            for (((o, (&l, &h)), &s), &z) in out.iter_mut().zip(pairs).zip(scales).zip(zeros) {
                *o = O::from_f32((((l >> bit) & mask) | (((h >> hbit) & 1) << 2)) as f32 * s + z);
            }
        }
    }
}

/// Unpacks a group of `out.len()` codes as f32 (the form kernels consume).
#[inline(always)]
pub fn unpack_f32<const BITS: u32>(bytes: &[u8], out: &mut [f32]) {
    let g = out.len();
    match BITS {
        8 => {
            for (o, &b) in out.iter_mut().zip(&bytes[..g]) {
                *o = b as f32;
            }
        }
        4 => {
            let n = g / 2;
            let (lo, hi) = out.split_at_mut(n);
            let bytes = &bytes[..n];
            for (o, &b) in lo.iter_mut().zip(bytes) {
                *o = (b & 15) as f32;
            }
            for (o, &b) in hi.iter_mut().zip(bytes) {
                *o = (b >> 4) as f32;
            }
        }
        2 => unpack2_f32(&bytes[..g / 4], out),
        3 => {
            let n4 = g / 4;
            let n8 = g / 8;
            unpack2_f32(&bytes[..n4], out);
            let high = &bytes[n4..n4 + n8];
            for k in 0..8 {
                let part = &mut out[k * n8..(k + 1) * n8];
                for (o, &b) in part.iter_mut().zip(high) {
                    *o += (((b >> k) & 1) << 2) as f32;
                }
            }
        }
        _ => unreachable!("bits validated by QuantConfig"),
    }
}

#[inline(always)]
fn unpack2_f32(bytes: &[u8], out: &mut [f32]) {
    let n = bytes.len();
    // Fields cut from the byte widened to 32 bits (see `dequant_group`).
    let (p0, rest) = out[..4 * n].split_at_mut(n);
    let (p1, rest) = rest.split_at_mut(n);
    let (p2, p3) = rest.split_at_mut(n);
    let planes = p0.iter_mut().zip(p1).zip(p2).zip(p3);
    for ((((o0, o1), o2), o3), &b) in planes.zip(bytes) {
        let v = b as u32;
        *o0 = (v & 3) as f32;
        *o1 = ((v >> 2) & 3) as f32;
        *o2 = ((v >> 4) & 3) as f32;
        *o3 = (v >> 6) as f32;
    }
}

/// Dequantizes one packed group of `G` codes: `out[i] = code_i · scale + zero` (through
/// `M::madd`), written as `O` (see [`dequant_code_row`]). `G` and `BITS` are constants, so every loop is unrolled and vectorized
/// (codes are unpacked in registers, never stored as integers).
#[inline(always)]
pub fn dequant_group<M: Madd, const BITS: u32, const G: usize, O: KvFloat>(
    bytes: &[u8],
    scale: f32,
    zero: f32,
    out: &mut [O],
) {
    let out: &mut [O; G] = match out.first_chunk_mut::<G>() {
        Some(o) => o,
        None => return,
    };
    let f = |c: u8| O::from_f32(M::madd(c as f32, scale, zero));
    let fw = |c: u32| O::from_f32(M::madd(c as f32, scale, zero));
    match BITS {
        8 => {
            let Some(b) = bytes.first_chunk::<G>() else {
                return;
            };
            for i in 0..G {
                out[i] = f(b[i]);
            }
        }
        4 => {
            let b = &bytes[..G / 2];
            for i in 0..G / 2 {
                out[i] = f(b[i] & 15);
                out[i + G / 2] = f(b[i] >> 4);
            }
        }
        // 2 and 3 bits: every field is cut from the byte widened to 32 bits, one plane per
        // statement. x86 has no byte shifts: byte-wide fields of a loop-carried shift were
        // unpacked one at a time (2-bit G64 decode attention ran 4.4x slower than 4-bit).
        2 => {
            let n = G / 4;
            let b = &bytes[..n];
            for i in 0..n {
                let v = b[i] as u32;
                out[i] = fw(v & 3);
                out[n + i] = fw((v >> 2) & 3);
                out[2 * n + i] = fw((v >> 4) & 3);
                out[3 * n + i] = fw(v >> 6);
            }
        }
        3 => {
            let (n4, n8) = (G / 4, G / 8);
            let low = &bytes[..n4];
            let high = &bytes[n4..n4 + n8];
            for k in 0..4 {
                for half in 0..2 {
                    for (i, &h) in high.iter().enumerate() {
                        let j = half * n8 + i;
                        let m = (2 * k + half) as u32;
                        let c =
                            ((low[j] as u32 >> (2 * k as u32)) & 3) | (((h as u32 >> m) & 1) << 2);
                        out[k * n4 + j] = fw(c);
                    }
                }
            }
        }
        _ => unreachable!("bits validated by QuantConfig"),
    }
}

/// Unpacks a group of codes as integers (for tests and inspection).
pub fn unpack(bytes: &[u8], bits: u32, out: &mut [u8]) {
    let mut tmp = vec![0f32; out.len()];
    match bits {
        2 => unpack_f32::<2>(bytes, &mut tmp),
        3 => unpack_f32::<3>(bytes, &mut tmp),
        4 => unpack_f32::<4>(bytes, &mut tmp),
        8 => unpack_f32::<8>(bytes, &mut tmp),
        _ => unreachable!("bits validated by QuantConfig"),
    }
    for (o, t) in out.iter_mut().zip(tmp) {
        *o = t as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreading_word_rows_is_a_transpose_and_gathering_inverts_it() {
        for wpg in [2, 3, 4, 6, 8, 12, 16, 32] {
            for d in [16, 40, 64, 128, 7] {
                let rows: Vec<u32> = (0..wpg * d)
                    .map(|i| (i as u32).wrapping_mul(2654435761))
                    .collect();
                let mut groups = vec![0u8; 4 * wpg * d];
                spread_words(wpg, &rows, &mut groups);
                for c in 0..d {
                    for w in 0..wpg {
                        let at = 4 * (wpg * c + w);
                        let word = u32::from_le_bytes(groups[at..at + 4].try_into().unwrap());
                        assert_eq!(
                            word,
                            rows[w * d + c],
                            "wpg {wpg}, d {d}, group {c}, word {w}"
                        );
                    }
                }
                let mut back = vec![0u32; wpg * d];
                gather_words(wpg, &groups, &mut back);
                assert_eq!(back, rows, "wpg {wpg}, d {d}");
            }
        }
    }

    #[test]
    fn every_width_round_trips_every_code() {
        for bits in [2u32, 3, 4, 8] {
            for g in [8usize, 32, 64, 128] {
                let codes: Vec<u8> = (0..g).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
                let mut packed = vec![0u8; packed_bytes(g, bits)];
                pack(&codes, bits, &mut packed);
                let mut back = vec![0u8; g];
                unpack(&packed, bits, &mut back);
                assert_eq!(back, codes, "bits {bits} g {g}");
            }
        }
    }

    #[test]
    fn dequantizing_a_group_unpacks_every_code() {
        fn check<const G: usize>() {
            for bits in [2u32, 3, 4, 8] {
                let codes: Vec<u8> = (0..G).map(|i| ((i * 5 + 1) % (1 << bits)) as u8).collect();
                let mut packed = vec![0u8; packed_bytes(G, bits)];
                pack(&codes, bits, &mut packed);
                let mut out = vec![0f32; G];
                match bits {
                    2 => dequant_group::<crate::quant::simd::Separate, 2, G, _>(
                        &packed, 0.5, -1.0, &mut out,
                    ),
                    3 => dequant_group::<crate::quant::simd::Separate, 3, G, _>(
                        &packed, 0.5, -1.0, &mut out,
                    ),
                    4 => dequant_group::<crate::quant::simd::Separate, 4, G, _>(
                        &packed, 0.5, -1.0, &mut out,
                    ),
                    _ => dequant_group::<crate::quant::simd::Separate, 8, G, _>(
                        &packed, 0.5, -1.0, &mut out,
                    ),
                }
                let expected: Vec<f32> = codes.iter().map(|&c| c as f32 * 0.5 - 1.0).collect();
                assert_eq!(out, expected, "bits {bits} G {G}");
            }
        }
        check::<32>();
        check::<64>();
        check::<128>();
    }

    /// Groups packed side by side word by word, as the channel encoder does:
    /// `words[w·n + i]` is word `w` of group `i`, whose code `t` is `code(i, t)`.
    fn pack_words(code: impl Fn(usize, usize) -> u32, n: usize, g: usize, bits: u32) -> Vec<u32> {
        let wpg = packed_bytes(g, bits) / 4;
        let mut words = vec![0u32; wpg * n];
        for w in 0..wpg {
            let p = WordPlane::of(g, bits, w);
            for i in 0..n {
                for b in 0..4 {
                    for k in 0..p.per_byte() {
                        let (t, at) = p.field(w, b, k);
                        words[w * n + i] |= ((code(i, t) >> p.from) & p.mask()) << at;
                    }
                }
            }
        }
        words
    }

    #[test]
    fn packing_word_by_word_equals_packing_each_group() {
        for bits in [2u32, 3, 4, 8] {
            for g in [32usize, 64, 128] {
                let groups = 5;
                // Group i, code t: a pattern that differs per group and per position.
                let code = |i: usize, t: usize| ((i * 11 + t * 7 + 3) % (1 << bits)) as u32;
                let gb = packed_bytes(g, bits);
                let words = pack_words(code, groups, g, bits);
                for i in 0..groups {
                    let codes: Vec<u8> = (0..g).map(|t| code(i, t) as u8).collect();
                    let mut expected = vec![0u8; gb];
                    pack(&codes, bits, &mut expected);
                    let got: Vec<u8> = (0..gb / 4)
                        .flat_map(|w| words[w * groups + i].to_le_bytes())
                        .collect();
                    assert_eq!(got, expected, "bits {bits} g {g} group {i}");
                }
            }
        }
    }

    #[test]
    fn every_code_has_one_field() {
        for bits in [2u32, 3, 4, 8] {
            for g in [32usize, 64, 128] {
                // bits covered per code: each bit of each code exactly once
                let mut covered = vec![0u32; g];
                for w in 0..packed_bytes(g, bits) / 4 {
                    let p = WordPlane::of(g, bits, w);
                    for b in 0..4 {
                        for k in 0..p.per_byte() {
                            covered[p.field(w, b, k).0] += p.mask() << p.from;
                        }
                    }
                }
                assert!(
                    covered.iter().all(|&c| c == (1 << bits) - 1),
                    "bits {bits} g {g}"
                );
            }
        }
    }

    #[test]
    fn unpacking_code_rows_inverts_packing_them() {
        for bits in [2u32, 3, 4, 8] {
            for g in [32usize, 64, 128] {
                let n = 5;
                let code = |i: usize, t: usize| ((t * 7 + i * 13) % (1 << bits)) as u32;
                let words = pack_words(code, n, g, bits);
                // scale 1, zero 0: the codes themselves (exact in f32)
                let (ones, zeros) = (vec![1f32; n], vec![0f32; n]);
                let mut back = vec![0f32; n];
                for t in 0..g {
                    dequant_code_row(&words, t, g, bits, &ones, &zeros, &mut back);
                    let expected: Vec<f32> = (0..n).map(|i| code(i, t) as f32).collect();
                    assert_eq!(back, expected, "bits {bits} G {g} token {t}");
                }
            }
        }
    }

    #[test]
    fn four_bit_layout_is_planar() {
        let codes: Vec<u8> = (0..32).map(|i| (i % 16) as u8).collect();
        let mut packed = [0u8; 16];
        pack(&codes, 4, &mut packed);
        assert_eq!(packed[0], codes[0] | (codes[16] << 4));
        assert_eq!(packed[15], codes[15] | (codes[31] << 4));
    }
}
