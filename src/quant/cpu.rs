//! The Rust CPU kernels that quantize a tensor into a [`QuantizedTensor`] and back.
//!
//! Work is split into units of one tile (G tokens of one (batch, head) = head_dim groups),
//! run in parallel with rayon; each unit writes its own contiguous slice of every output.
//! Channel groups of bfloat16/float16 rows without rotation or outliers are quantized
//! straight from the input's rows (`channel_groups`, AVX-512). Otherwise
//! a unit loads its tile as f32 (rotating each token if `hadamard`) and quantizes it:
//! channel groups packed word by word, vectorized across the head_dim channels
//! (`encode_channels`); token groups without outliers 16 lanes at a time, packed in
//! registers (`token_groups`); groups with outliers (channel groups after a transpose)
//! group by group (`encode_groups`). Both use the arithmetic of `group.rs` and
//! the layout of `pack.rs`, so they write the same bytes.

use super::channel_groups::{self, Half16};
use super::group::{
    code, code_bits_in_range, column_min_max, min_max_groups, min_max_skipping, outlier_positions,
    params_slice, NanLanes,
};
use super::hadamard::fwht;
use super::layout::TensorLayout;
use super::pack::{dequant_code_row, dequant_group, gather_words, pack, spread_words, WordPlane};
use super::qtensor::QuantizedTensor;
use super::simd::{Madd, Separate};
use super::token_groups;
use super::Grouping;
use crate::error::{KvError, Result};
use crate::multiversion;
use crate::tensor::{array_view, array_view_mut, finite_slice, float_view, KvFloat};
use crate::with_float_view;
use half::f16;
use ndarray::{ArrayView4, Ix3, Ix4};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

/// Scratch space of one worker.
struct Scratch {
    /// The tile, token-major: [t][c].
    tile: Vec<f32>,
    /// The tile with every group contiguous (channel groups: [c][t]).
    groups: Vec<f32>,
    /// Channel groups: the tile's packed groups as u32 words, word row `w` holding word
    /// `w` of every channel's group (`WordPlane`).
    words: Vec<u32>,
    mins: Vec<f32>,
    maxs: Vec<f32>,
    zeros: Vec<f32>,
    inv: Vec<f32>,
}

impl Scratch {
    fn new(g: usize, d: usize) -> Self {
        Scratch {
            tile: vec![0.0; g * d],
            groups: vec![0.0; g * d],
            // At most 8 bits: a group packs into at most g bytes, g/4 words.
            words: vec![0; g / 4 * d],
            mins: vec![0.0; d],
            maxs: vec![0.0; d],
            zeros: vec![0.0; d],
            inv: vec![0.0; d],
        }
    }
}

/// One unit's outputs.
struct EncodeOut<'a, T> {
    codes: &'a mut [u8],
    params: &'a mut [f16],
    positions: &'a mut [u8],
    values: &'a mut [T],
}

pub(crate) fn encode(x: &Tensor, layout: TensorLayout, argument: &str) -> Result<QuantizedTensor> {
    let view = float_view::<Ix4>(x, argument)?;
    with_float_view!(view, v => encode_typed(v, x.kind(), layout, argument))
}

fn encode_typed<T: KvFloat>(
    x: ArrayView4<'_, T>,
    kind: Kind,
    layout: TensorLayout,
    argument: &str,
) -> Result<QuantizedTensor> {
    let (b, h, n, d) = x.dim();
    let g = layout.group_size;
    let tiles = n / g;
    let groups = layout.groups(n);
    let no = layout.outliers;
    let size3 = [b as i64, h as i64, (groups * layout.group_bytes()) as i64];
    let mut codes = Tensor::f_empty(size3, (Kind::Uint8, Device::Cpu))?;
    let mut params_t = Tensor::f_empty(
        [b as i64, h as i64, groups as i64, 2],
        (Kind::Half, Device::Cpu),
    )?;
    let osize = [b as i64, h as i64, groups as i64, no as i64];
    let mut opos = Tensor::f_empty(osize, (Kind::Uint8, Device::Cpu))?;
    let mut oval = Tensor::f_empty(osize, (kind, Device::Cpu))?;
    let ok = AtomicBool::new(true);
    let finite = AtomicBool::new(true);
    {
        let codes_s = slice_mut::<u8, Ix3>(&mut codes)?;
        let params_s = slice_mut::<f16, Ix4>(&mut params_t)?;
        let pos_s = slice_mut::<u8, Ix4>(&mut opos)?;
        let val_s = slice_mut::<T, Ix4>(&mut oval)?;
        let units = b * h * tiles;
        let mut outs: Vec<EncodeOut<'_, T>> = Vec::with_capacity(units);
        let mut codes_it = codes_s.chunks_mut(d * layout.group_bytes());
        let mut params_it = params_s.chunks_mut(d * 2);
        let (mut pos_it, mut val_it) = (
            pos_s.chunks_mut((d * no).max(1)),
            val_s.chunks_mut((d * no).max(1)),
        );
        for _ in 0..units {
            outs.push(EncodeOut {
                codes: codes_it.next().unwrap_or_default(),
                params: params_it.next().unwrap_or_default(),
                positions: if no > 0 {
                    pos_it.next().unwrap_or_default()
                } else {
                    &mut []
                },
                values: if no > 0 {
                    val_it.next().unwrap_or_default()
                } else {
                    &mut []
                },
            });
        }
        let run = |scratch: &mut Scratch, (unit, out): (usize, EncodeOut<'_, T>)| {
            let (bh, tile) = (unit / tiles, unit % tiles);
            let (bi, hi) = (bh / h, bh % h);
            // The group size as a constant: per-group loops unroll into whole vectors.
            let encoded = match g {
                32 => encode_unit::<T, 32>(&layout, &x, bi, hi, tile * g, scratch, out),
                64 => encode_unit::<T, 64>(&layout, &x, bi, hi, tile * g, scratch, out),
                _ => encode_unit::<T, 128>(&layout, &x, bi, hi, tile * g, scratch, out),
            };
            match encoded {
                Encoded::Done => {}
                Encoded::OutOfRange => ok.store(false, Ordering::Relaxed),
                Encoded::NonFinite => finite.store(false, Ordering::Relaxed),
            }
        };
        if worth_parallel(b * h * n * d) {
            outs.into_par_iter()
                .enumerate()
                .for_each_init(|| Scratch::new(g, d), run);
        } else {
            let mut scratch = Scratch::new(g, d);
            outs.into_iter()
                .enumerate()
                .for_each(|item| run(&mut scratch, item));
        }
    }
    if !finite.load(Ordering::Relaxed) {
        return Err(non_finite_error(argument));
    }
    if !ok.load(Ordering::Relaxed) {
        return Err(range_error(argument));
    }
    Ok(QuantizedTensor {
        layout,
        batch: b,
        heads: h,
        tokens: n,
        kind,
        codes,
        params: params_t,
        outliers: (no > 0).then_some((opos, oval)),
    })
}

/// Elements below which a kernel runs on the calling thread: waking the rayon pool costs
/// more than it saves there, and idle pool threads spinning next to torch's own threads
/// slow both down on small machines.
const PARALLEL_ELEMENTS: usize = 1 << 18;

/// Whether work over `elements` values is worth the rayon pool.
pub(crate) fn worth_parallel(elements: usize) -> bool {
    elements >= PARALLEL_ELEMENTS && rayon::current_num_threads() > 1
}

/// What [`crate::tensor::check_finite`] says, for the check fused into the CPU kernel.
pub(crate) fn non_finite_error(argument: &str) -> KvError {
    KvError::non_finite(argument, "every key and value must be finite")
}

pub(crate) fn range_error(argument: &str) -> KvError {
    KvError::invalid(
        argument,
        "a quantization group spans values beyond the float16 range (|x| > 65504) of its \
         scale and zero; such values cannot be quantized",
    )
}

fn slice_mut<T: crate::tensor::TorchElement, D: ndarray::Dimension>(
    t: &mut Tensor,
) -> Result<&mut [T]> {
    array_view_mut::<T, D>(t, "output")?
        .into_slice()
        .ok_or_else(|| KvError::State("internal: output tensor is not contiguous".into()))
}

/// Tokens `t0..t0+g` of (b, h) as one slice, token-major, when its rows are contiguous
/// (the usual case). Found from the strides: an ndarray `slice` per tile was about a tenth
/// of the samples of quantizing 32-token tiles in a profile.
#[inline(always)]
fn contiguous_tile<'a, T>(
    x: &ArrayView4<'a, T>,
    b: usize,
    h: usize,
    t0: usize,
    g: usize,
) -> Option<&'a [T]> {
    let (nb, nh, n, d) = x.dim();
    let strides = x.strides();
    if !(strides[3] == 1 && strides[2] == d as isize && b < nb && h < nh && t0 + g <= n) {
        return None;
    }
    let at = b as isize * strides[0] + h as isize * strides[1] + t0 as isize * strides[2];
    // SAFETY: (b, h, t0, 0) is inside the view (checked above) and its next g·d elements
    // are (b, h, t0..t0+g, 0..d), also inside it: rows follow each other (row stride d)
    // and a row's elements are adjacent (stride 1). The view borrows its data for 'a.
    Some(unsafe { std::slice::from_raw_parts(x.as_ptr().offset(at), g * d) })
}

/// Loads tokens `t0..t0+g` of (b, h) as f32, token-major: one vectorized conversion of the
/// whole tile when its rows are contiguous (the usual case), row by row otherwise.
#[inline(always)]
fn load_tile<T: KvFloat>(
    x: &ArrayView4<'_, T>,
    b: usize,
    h: usize,
    t0: usize,
    g: usize,
    out: &mut [f32],
) {
    let d = x.dim().3;
    if let Some(src) = contiguous_tile(x, b, h, t0, g) {
        T::slice_to_f32(src, &mut out[..g * d]);
        return;
    }
    let tile = x.slice(ndarray::s![b, h, t0..t0 + g, ..]);
    for (t, row) in tile.outer_iter().enumerate() {
        let dst = &mut out[t * d..(t + 1) * d];
        match row.as_slice() {
            Some(src) => T::slice_to_f32(src, dst),
            None => {
                for (o, &v) in dst.iter_mut().zip(row.iter()) {
                    *o = v.to_f32();
                }
            }
        }
    }
}

multiversion!(fn encode_unit<T: KvFloat; const G: usize>(layout: &TensorLayout, x: &ArrayView4<'_, T>, b: usize, h: usize, t0: usize, scratch: &mut Scratch, out: EncodeOut<'_, T>) -> Encoded => encode_unit_body);

/// How one unit's quantization ended.
enum Encoded {
    Done,
    /// A group's range does not fit float16.
    OutOfRange,
    /// The tile holds a NaN or an infinity (nothing was written).
    NonFinite,
}

/// Quantizes tokens `t0..t0+G` of (b, h) into `out`. The finiteness check is fused into
/// the pass over the f32 tile in L1 that finds the groups' ranges (see [`NanLanes`]) rather
/// than a separate pass over the input: that pass read the whole tensor from memory once
/// more (~12% of quantizing). Hadamard and outliers check the tile first: the rotation
/// could overflow a finite input, and outlier selection ranks magnitudes.
#[inline(always)]
fn encode_unit_body<M: Madd, T: KvFloat, const G: usize>(
    layout: &TensorLayout,
    x: &ArrayView4<'_, T>,
    b: usize,
    h: usize,
    t0: usize,
    scratch: &mut Scratch,
    out: EncodeOut<'_, T>,
) -> Encoded {
    let (g, d) = (layout.group_size, layout.head_dim);
    let plain_channels =
        layout.grouping == Grouping::Channel && !layout.hadamard && layout.outliers == 0;
    if plain_channels && channel_groups::supported(d) {
        let rows = contiguous_tile(x, b, h, t0, g).and_then(channel_groups::as_bits);
        if let Some((rows, format)) = rows {
            return encode_channels::<M, T, G>(
                layout,
                ChannelRows::Bits(rows, format),
                scratch,
                out,
            );
        }
    }
    load_tile(x, b, h, t0, g, &mut scratch.tile);
    if layout.hadamard || layout.outliers > 0 {
        if !finite_slice(&scratch.tile[..g * d]) {
            return Encoded::NonFinite;
        }
        if layout.hadamard {
            for row in scratch.tile.chunks_exact_mut(d) {
                fwht(row);
            }
        }
    }
    if layout.grouping == Grouping::Channel && layout.outliers == 0 {
        encode_channels::<M, T, G>(layout, ChannelRows::Tile, scratch, out)
    } else {
        encode_groups::<M, T, G>(layout, scratch, out)
    }
}

/// Where [`encode_channels`] reads a tile's values.
enum ChannelRows<'a> {
    /// The f32 tile in the scratch space.
    Tile,
    /// The input's own 16-bit rows, converted in registers (`channel_groups`): a whole
    /// tile's G·head_dim values, built only where `channel_groups::supported(head_dim)`,
    /// so both of its passes run (neither returns "not done").
    Bits(&'a [u16], Half16),
}

/// Channel groups without outliers, straight from the token-major rows: ranges are
/// column min/max over the G rows; then, per block of channels, each packed word of their
/// groups is built in registers from the token rows its codes come from (`WordPlane`),
/// vectorized across the channels. The only per-group step left is spreading the word
/// rows to their groups.
#[inline(always)]
fn encode_channels<M: Madd, T: KvFloat, const G: usize>(
    layout: &TensorLayout,
    rows: ChannelRows<'_>,
    scratch: &mut Scratch,
    out: EncodeOut<'_, T>,
) -> Encoded {
    let (g, d) = (G, layout.head_dim);
    let gb = layout.group_bytes();
    let Scratch {
        tile,
        words,
        mins,
        maxs,
        zeros,
        inv,
        ..
    } = scratch;
    let tile = &tile[..g * d];
    let (mins, maxs) = (&mut mins[..d], &mut maxs[..d]);
    let finite = match rows {
        ChannelRows::Tile => column_min_max::<M>(tile, mins, maxs),
        ChannelRows::Bits(rows, format) => {
            channel_groups::column_min_max::<G>(rows, format, mins, maxs) == Some(true)
        }
    };
    if !finite {
        return Encoded::NonFinite;
    }
    let fits = params_slice(mins, maxs, 1.0 / layout.levels(), out.params, zeros, inv);
    let (words, zeros, inv) = (&mut words[..gb / 4 * d], &zeros[..d], &inv[..d]);
    // Bits and group size as constants: a word's fields unroll into immediate shifts.
    match (rows, layout.bits) {
        (ChannelRows::Tile, 2) => encode_channel_blocks::<2, G>(tile, zeros, inv, words),
        (ChannelRows::Tile, 3) => encode_channel_blocks::<3, G>(tile, zeros, inv, words),
        (ChannelRows::Tile, 4) => encode_channel_blocks::<4, G>(tile, zeros, inv, words),
        (ChannelRows::Tile, _) => encode_channel_blocks::<8, G>(tile, zeros, inv, words),
        (ChannelRows::Bits(rows, format), bits) => {
            // `column_min_max` above ran, so the rows are supported: every word is written.
            let _ = match bits {
                2 => channel_groups::encode_words::<2, G>(rows, format, zeros, inv, words),
                3 => channel_groups::encode_words::<3, G>(rows, format, zeros, inv, words),
                4 => channel_groups::encode_words::<4, G>(rows, format, zeros, inv, words),
                _ => channel_groups::encode_words::<8, G>(rows, format, zeros, inv, words),
            };
        }
    }
    // Word w of group c is words[w·d + c]: interleave the word rows into group order.
    spread_words(gb / 4, words, &mut out.codes[..d * gb]);
    if fits {
        Encoded::Done
    } else {
        Encoded::OutOfRange
    }
}

/// Every packed word of every channel group of the tile, 16 channels at a time.
#[inline(always)]
fn encode_channel_blocks<const BITS: u32, const G: usize>(
    tile: &[f32],
    zeros: &[f32],
    inv: &[f32],
    words: &mut [u32],
) {
    const L: usize = 16;
    let d = zeros.len();
    let whole = d - d % L;
    for c0 in (0..whole).step_by(L) {
        encode_channel_words::<L, BITS, G>(tile, c0, zeros, inv, words);
    }
    for c0 in whole..d {
        encode_channel_words::<1, BITS, G>(tile, c0, zeros, inv, words);
    }
}

/// Every packed word of the groups of channels `c0..c0+L` (`words[w·d + c]`, `d` =
/// `zeros.len()`): each code is computed from its token row of the tile and shifted into
/// its word in registers, never stored on its own.
#[inline(always)]
fn encode_channel_words<const L: usize, const BITS: u32, const G: usize>(
    tile: &[f32],
    c0: usize,
    zeros: &[f32],
    inv: &[f32],
    words: &mut [u32],
) {
    let d = zeros.len();
    let (Some(&z), Some(&iv)) = (zeros[c0..].first_chunk::<L>(), inv[c0..].first_chunk::<L>())
    else {
        return;
    };
    // Every row a word takes codes from, checked once: no bounds check in the loops.
    let tile = &tile[..G * d];
    if c0 + L > d {
        return;
    }
    for w in 0..words.len() / d {
        let mut acc = [0u32; L];
        let plane = WordPlane::of(G, BITS, w);
        let (from, mask) = (plane.from, plane.mask());
        for b in 0..4 {
            for k in 0..plane.per_byte() {
                let (t, at) = plane.field(w, b, k);
                if let Some(row) = tile[t * d + c0..].first_chunk::<L>() {
                    for i in 0..L {
                        let code = code_bits_in_range(row[i], z[i], iv[i]);
                        acc[i] |= ((code >> from) & mask) << at;
                    }
                }
            }
        }
        if let Some(dst) = words[w * d + c0..].first_chunk_mut::<L>() {
            *dst = acc;
        }
    }
}

/// Every other case, group by group: token groups are contiguous in the tile; channel
/// groups (with outliers) are laid out contiguously by a transpose first.
#[inline(always)]
fn encode_groups<M: Madd, T: KvFloat, const G: usize>(
    layout: &TensorLayout,
    scratch: &mut Scratch,
    out: EncodeOut<'_, T>,
) -> Encoded {
    let (g, d) = (G, layout.head_dim);
    let grouped: &[f32] = match layout.grouping {
        Grouping::Token => &scratch.tile,
        Grouping::Channel => {
            transpose(&scratch.tile, g, d, &mut scratch.groups);
            &scratch.groups
        }
    };
    let gb = layout.group_bytes();
    let no = layout.outliers;
    let levels = layout.levels();
    let Scratch {
        mins,
        maxs,
        zeros,
        inv,
        ..
    } = scratch;
    let mut codes = [0u8; G];
    let mut nan = NanLanes::new();
    // Ranges of all the tile's groups, then their float16 scale/zero in one batch.
    if no == 0 {
        min_max_groups::<M, G>(grouped, &mut nan, &mut mins[..d], &mut maxs[..d]);
    } else {
        for (i, vals) in grouped.chunks_exact(G).enumerate() {
            let pos = &mut out.positions[i * no..(i + 1) * no];
            outlier_positions(vals, no, pos);
            for (k, &p) in pos.iter().enumerate() {
                out.values[i * no + k] = T::from_f32(vals[p as usize]);
            }
            (mins[i], maxs[i]) = min_max_skipping(vals, pos);
        }
    }
    if !nan.all_finite() {
        return Encoded::NonFinite;
    }
    let fits = params_slice(&mins[..d], &maxs[..d], 1.0 / levels, out.params, zeros, inv);
    if no == 0 {
        // Bits and group size as constants: each group's codes stay 32-bit lanes in
        // registers and are shifted into their bytes there (a byte array packed per group,
        // with the bit width matched at run time, was most of this kernel).
        let (zeros, inv, codes) = (&zeros[..d], &inv[..d], &mut out.codes[..d * gb]);
        match layout.bits {
            2 => token_groups::encode::<2, G>(grouped, zeros, inv, codes),
            3 => token_groups::encode::<3, G>(grouped, zeros, inv, codes),
            4 => token_groups::encode::<4, G>(grouped, zeros, inv, codes),
            _ => token_groups::encode::<8, G>(grouped, zeros, inv, codes),
        }
        return if fits {
            Encoded::Done
        } else {
            Encoded::OutOfRange
        };
    }
    for (i, vals) in grouped.chunks_exact(G).enumerate() {
        let (z, iv) = (zeros[i], inv[i]);
        let vals: &[f32; G] = match vals.first_chunk::<G>() {
            Some(v) => v,
            None => break,
        };
        for k in 0..G {
            codes[k] = code(vals[k], z, iv, levels);
        }
        for &p in &out.positions[i * no..(i + 1) * no] {
            codes[p as usize] = 0;
        }
        pack(
            &codes[..],
            layout.bits,
            &mut out.codes[i * gb..(i + 1) * gb],
        );
    }
    if fits {
        Encoded::Done
    } else {
        Encoded::OutOfRange
    }
}

/// `dst[c·rows + r] = src[r·cols + c]` for a rows×cols matrix, in cache-friendly blocks.
#[inline(always)]
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const B: usize = 8;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

pub(crate) fn decode(q: &QuantizedTensor) -> Result<Tensor> {
    let (b, h, n, d) = (q.batch, q.heads, q.tokens, q.layout.head_dim);
    let mut out = Tensor::f_empty(
        [b as i64, h as i64, n as i64, d as i64],
        (q.kind, Device::Cpu),
    )?;
    match q.kind {
        Kind::Float => decode_typed::<f32>(q, &mut out)?,
        Kind::Half => decode_typed::<f16>(q, &mut out)?,
        Kind::BFloat16 => decode_typed::<half::bf16>(q, &mut out)?,
        other => {
            return Err(KvError::dtype(
                "quantized tensor",
                crate::tensor::kind_name(other),
                "a float dtype",
            ))
        }
    }
    Ok(out)
}

/// The read-only data of one quantized tensor on the CPU.
pub(crate) struct QuantSlices<'a, T> {
    pub codes: &'a [u8],
    pub params: &'a [f16],
    pub positions: &'a [u8],
    pub values: &'a [T],
}

impl<'a, T: KvFloat> QuantSlices<'a, T> {
    pub fn new(q: &'a QuantizedTensor) -> Result<Self> {
        let codes = array_view::<u8, Ix3>(&q.codes, "codes")?;
        let params = array_view::<f16, Ix4>(&q.params, "params")?;
        let internal = || KvError::State("internal: quantized data is not contiguous".into());
        let (positions, values): (&[u8], &[T]) = match &q.outliers {
            Some((p, v)) => (
                array_view::<u8, Ix4>(p, "outlier positions")?
                    .to_slice()
                    .ok_or_else(internal)?,
                array_view::<T, Ix4>(v, "outlier values")?
                    .to_slice()
                    .ok_or_else(internal)?,
            ),
            None => (&[], &[]),
        };
        Ok(QuantSlices {
            codes: codes.to_slice().ok_or_else(internal)?,
            params: params.to_slice().ok_or_else(internal)?,
            positions,
            values,
        })
    }
}

fn decode_typed<T: KvFloat>(q: &QuantizedTensor, out: &mut Tensor) -> Result<()> {
    let layout = q.layout;
    let (g, d) = (layout.group_size, layout.head_dim);
    let src = QuantSlices::<T>::new(q)?;
    let dst = slice_mut::<T, Ix4>(out)?;
    let tile_groups = d;
    let gb = layout.group_bytes();
    let no = layout.outliers;
    let run = |scratch: &mut Scratch, (unit, dst): (usize, &mut [T])| {
        let first = unit * tile_groups;
        let tile = TileData {
            codes: &src.codes[first * gb..(first + tile_groups) * gb],
            params: &src.params[2 * first..2 * (first + tile_groups)],
            positions: if no > 0 {
                &src.positions[first * no..(first + tile_groups) * no]
            } else {
                &[]
            },
            values: if no > 0 {
                &src.values[first * no..(first + tile_groups) * no]
            } else {
                &[]
            },
        };
        match (layout.bits, g) {
            (2, 32) => decode_unit::<T, 2, 32>(&layout, &tile, scratch, dst),
            (2, 64) => decode_unit::<T, 2, 64>(&layout, &tile, scratch, dst),
            (2, _) => decode_unit::<T, 2, 128>(&layout, &tile, scratch, dst),
            (3, 32) => decode_unit::<T, 3, 32>(&layout, &tile, scratch, dst),
            (3, 64) => decode_unit::<T, 3, 64>(&layout, &tile, scratch, dst),
            (3, _) => decode_unit::<T, 3, 128>(&layout, &tile, scratch, dst),
            (4, 32) => decode_unit::<T, 4, 32>(&layout, &tile, scratch, dst),
            (4, 64) => decode_unit::<T, 4, 64>(&layout, &tile, scratch, dst),
            (4, _) => decode_unit::<T, 4, 128>(&layout, &tile, scratch, dst),
            (_, 32) => decode_unit::<T, 8, 32>(&layout, &tile, scratch, dst),
            (_, 64) => decode_unit::<T, 8, 64>(&layout, &tile, scratch, dst),
            (_, _) => decode_unit::<T, 8, 128>(&layout, &tile, scratch, dst),
        }
    };
    if worth_parallel(dst.len()) {
        dst.par_chunks_mut(g * d)
            .enumerate()
            .for_each_init(|| Scratch::new(g, d), run);
    } else {
        let mut scratch = Scratch::new(g, d);
        dst.chunks_mut(g * d)
            .enumerate()
            .for_each(|item| run(&mut scratch, item));
    }
    Ok(())
}

/// Channel groups without outliers straight into `dst` (token-major), row by row (the
/// mirror of [`encode_channels`]): the groups' packed words are first laid side by side
/// (word `w` of every channel's group in one row, a transpose of gb/4 words per group
/// rather than of G floats), then each token's codes are shifted out of those rows and
/// scaled across all channels at once, rotated back (`hadamard`) and converted to `T`
/// (float16 rows without rotation in registers: `channel_groups::dequant_row_f16`).
/// Exact `code·scale + zero` (two roundings), as the libtorch path computes it.
/// (Bits and group size as constants: the words' transpose and the rows unroll.)
#[inline(always)]
fn decode_channels<T: KvFloat, const BITS: u32, const G: usize>(
    d: usize,
    hadamard: bool,
    tile: &TileData<'_, T>,
    scratch: &mut Scratch,
    dst: &mut [T],
) {
    let gb = G * BITS as usize / 8;
    let wpg = gb / 4;
    let Scratch {
        tile: rows,
        groups: pairs,
        words,
        zeros,
        inv: scales,
        ..
    } = scratch;
    let words = &mut words[..wpg * d];
    gather_words(wpg, &tile.codes[..d * gb], words);
    // (scale, zero) pairs converted as one slice (F16C, 8 at a time), then split.
    let pairs = &mut pairs[..2 * d];
    f16::slice_to_f32(&tile.params[..2 * d], pairs);
    let (scales, zeros) = (&mut scales[..d], &mut zeros[..d]);
    for ((s, z), pair) in scales
        .iter_mut()
        .zip(zeros.iter_mut())
        .zip(pairs.chunks_exact(2))
    {
        *s = pair[0];
        *z = pair[1];
    }
    let (scales, zeros) = (&scales[..d], &zeros[..d]);
    let dst = &mut dst[..G * d];
    if !hadamard && T::FROM_F32_INLINE {
        for (t, out) in dst.chunks_exact_mut(d).enumerate() {
            dequant_code_row(words, t, G, BITS, scales, zeros, out);
        }
        return;
    }
    if let (false, Some((dst, Half16::Float16))) = (hadamard, channel_groups::as_bits_mut(dst)) {
        if channel_groups::supported(d) {
            // Supported, t < G, and `words`, `scales`, `zeros` cut to this tile's rows
            // above: every row is written.
            for (t, out) in dst.chunks_exact_mut(d).enumerate() {
                channel_groups::dequant_row_f16(words, t, G, BITS, scales, zeros, out);
            }
            return;
        }
    }
    // One row at a time, converted while it is in registers/L1: a pass over a whole f32
    // tile in between cost ~15% of dequantizing.
    let row = &mut rows[..d];
    for (t, out) in dst.chunks_exact_mut(d).enumerate() {
        dequant_code_row(words, t, G, BITS, scales, zeros, row);
        if hadamard {
            fwht(row);
        }
        T::slice_from_f32(row, out);
    }
}

/// The quantized data of one tile (head_dim groups).
pub(crate) struct TileData<'a, T> {
    pub codes: &'a [u8],
    pub params: &'a [f16],
    pub positions: &'a [u8],
    pub values: &'a [T],
}

multiversion!(fn decode_unit<T: KvFloat; const BITS: u32, const G: usize>(layout: &TensorLayout, tile: &TileData<'_, T>, scratch: &mut Scratch, dst: &mut [T]) -> () => decode_unit_body);

// `M` (the CPU feature set) is unused in the body on purpose: the macro's per-feature copies
// let the compiler vectorize with those features; the arithmetic itself is exact, the same
// in every copy (`Separate` products, as the libtorch path computes them).
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn decode_unit_body<M: Madd, T: KvFloat, const BITS: u32, const G: usize>(
    layout: &TensorLayout,
    tile: &TileData<'_, T>,
    scratch: &mut Scratch,
    dst: &mut [T],
) {
    let (g, d) = (G, layout.head_dim);
    let gb = layout.group_bytes();
    let no = layout.outliers;
    if layout.grouping == Grouping::Channel && no == 0 {
        decode_channels::<T, BITS, G>(d, layout.hadamard, tile, scratch, dst);
        return;
    }
    let direct = T::FROM_F32_INLINE && BITS >= 4;
    if layout.grouping == Grouping::Token && no == 0 && !layout.hadamard && direct {
        // Token groups are contiguous in the output too: straight into it. (Not 2 and 3
        // bits: their four planes a byte, each converted and stored as it is cut, ran at
        // two thirds of the speed of the f32 tile converted in one pass.)
        for (i, out) in dst[..g * d].chunks_exact_mut(g).enumerate() {
            let (s, z) = (tile.params[2 * i].to_f32(), tile.params[2 * i + 1].to_f32());
            dequant_group::<Separate, BITS, G, T>(&tile.codes[i * gb..(i + 1) * gb], s, z, out);
        }
        return;
    }
    let target = match layout.grouping {
        Grouping::Token => &mut scratch.tile,
        Grouping::Channel => &mut scratch.groups,
    };
    for (i, vals) in target.chunks_exact_mut(g).enumerate() {
        let (s, z) = (tile.params[2 * i].to_f32(), tile.params[2 * i + 1].to_f32());
        // Exact `code·scale + zero` (two roundings), as the libtorch path computes it.
        dequant_group::<Separate, BITS, G, _>(&tile.codes[i * gb..(i + 1) * gb], s, z, vals);
        for k in 0..no {
            vals[tile.positions[i * no + k] as usize] = tile.values[i * no + k].to_f32();
        }
    }
    if layout.grouping == Grouping::Channel {
        transpose(&scratch.groups, d, g, &mut scratch.tile);
    }
    if layout.hadamard {
        for row in scratch.tile.chunks_exact_mut(d) {
            fwht(row);
        }
    }
    T::slice_from_f32(&scratch.tile, dst);
}
