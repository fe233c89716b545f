//! The fused CPU attention kernel over a quantized store.
//!
//! Work: every (batch, kv head) row's tokens — sinks, quantized tiles (G tokens each, over
//! all blocks in order), residual window — are cut into *pieces* (a token range), run in
//! parallel with rayon. A piece keeps a partial online-softmax state for all the query
//! rows of its KV head (n_rep query heads × q_len queries): running max `m`, sum `l`, and
//! the un-normalised output `acc`; pieces of one row merge at the end.
//!
//! Per tile of G tokens (one group per channel or per token), the kernel dequantizes the
//! tile's keys (transposed, head_dim × G) and values (G × head_dim) into f32 scratch that
//! stays in L1 — never more than one tile: the quantized blocks are read in place — with
//! outliers restored exactly, then computes the scores of all the query rows at once and
//! their weighted sum of values as small register-blocked matrix products
//! (`simd::gemm_acc`; fused multiply-add where the CPU has it).
//!
//! With `hadamard`, quantized keys are scored against the rotated query (pre-RoPE keys
//! instead: each dequantized key tile is rotated back, `fwht_columns`, before RoPE) and
//! quantized values accumulate in the rotated basis (pieces over blocks), rotated back once after the
//! merge; sinks and the residual use the plain query and accumulate apart.

use super::{AttendInputs, Dims};
use crate::error::{KvError, Result};
use crate::multiversion;
use crate::quant::cpu::{QuantSlices, TileData};
use crate::quant::hadamard::{fwht, fwht_columns};
use crate::quant::layout::TensorLayout;
use crate::quant::pack::{dequant_group, unpack_f32};
use crate::quant::simd::{exp_neg, gemm_acc, max, sum, Madd};
use crate::quant::store::{BlockPositions, QuantizedStore};
use crate::quant::Grouping;
use crate::rope::table::AngleTable;
use crate::tensor::{array_view, float_view, KvFloat};
use crate::with_float_view;
use half::f16;
use ndarray::{ArrayView3, Ix3, Ix4};
use rayon::prelude::*;
use tch::{Kind, Tensor};

/// Multiply-adds below which the attention runs on the calling thread. It runs inside the
/// model's forward, between torch ops whose intra-op threads keep spinning on the same
/// cores: rayon's workers fight them instead of helping. Measured on 2 cores (SmolLM2,
/// 4-bit, a decode step ≈ 3·16384·128·3 = 19M multiply-adds per layer at 16k tokens): 239
/// ms/token with the pool vs 195 on the calling thread at 16k, 132–151 vs 93–101 at 6k.
/// Only work that outlasts that (many query rows, very long contexts) is split.
const PARALLEL_MACS: usize = 1 << 27;

/// Fewest quantized tiles per piece (smaller pieces cost more in scheduling than they save).
const MIN_TILES_PER_PIECE: usize = 8;

/// The attention output (batch, q_len, q_heads, value head_dim) in f32 and the log-sum-exp
/// of each query row's scores (batch, q_len, q_heads), −inf where it sees nothing.
pub(super) fn attend(store: &QuantizedStore, inp: &AttendInputs<'_>) -> Result<(Tensor, Tensor)> {
    let kind = store.shape().map(|s| s.kind).unwrap_or(Kind::Float);
    match kind {
        Kind::Float => attend_typed::<f32>(store, inp),
        Kind::Half => attend_typed::<f16>(store, inp),
        Kind::BFloat16 => attend_typed::<half::bf16>(store, inp),
        other => Err(KvError::dtype(
            "cache",
            crate::tensor::kind_name(other),
            "a float dtype",
        )),
    }
}

/// Full-precision tokens of one part (sinks or residual): (batch, heads, capacity, dim).
struct FpPart<'a, T> {
    keys: &'a [T],
    values: &'a [T],
    capacity: usize,
    len: usize,
    offset: usize,
}

/// One quantized block.
struct QuantPart<'a, T> {
    keys: QuantSlices<'a, T>,
    values: QuantSlices<'a, T>,
    tiles: usize,
    offset: usize,
    /// Pre-RoPE keys: the positions of the block's tokens.
    positions: PartPositions<'a>,
}

/// Where a block's pre-RoPE keys are (see `store::BlockPositions`).
#[derive(Clone, Copy)]
enum PartPositions<'a> {
    /// Not pre-RoPE keys.
    None,
    /// `start + t` for token t of every row.
    Run(usize),
    /// Stored positions (b·heads rows, or one shared row), tokens contiguous per row.
    Rows { data: &'a [i32], per_row: bool },
}

/// One tensor of the tokens kept by evictions (see `quant/ragged.rs`).
struct RaggedSlices<'a, T> {
    codes: &'a [u8],
    params: &'a [f16],
    outlier_idx: &'a [i32],
    outlier_val: &'a [T],
    code_bytes: usize,
}

/// The tokens kept by evictions: `len` per row, tile by tile.
struct RaggedCtx<'a, T> {
    len: usize,
    /// Stored index of a row's first ragged token.
    offset: usize,
    keys: RaggedSlices<'a, T>,
    values: RaggedSlices<'a, T>,
    counts: &'a [u8],
    /// Where each tile's tokens start within its row.
    tile_token: Vec<usize>,
    positions: Option<&'a [i32]>,
}

enum Span {
    /// Ragged tiles `[tile0, tile1)` of the piece's row.
    Ragged {
        tile0: usize,
        tile1: usize,
    },
    Fp {
        part: usize,
        t0: usize,
        t1: usize,
    },
    /// Quantized tiles `[tile0, tile1)` counted over all blocks in order.
    Quant {
        tile0: usize,
        tile1: usize,
    },
}

struct Piece {
    bh: usize,
    span: Span,
}

/// Everything the pieces read.
struct Ctx<'a, T> {
    inp: Dims,
    key_layout: TensorLayout,
    value_layout: TensorLayout,
    /// Scaled query rows (b·kv_heads, rows, key_dim), f32.
    q: Vec<f32>,
    /// The same rotated (Hadamard) when quantized keys are scored in the Hadamard basis,
    /// or empty.
    q_rot: Vec<f32>,
    /// Hadamard-rotated pre-RoPE keys: each dequantized key tile is rotated back before RoPE.
    unrotate_keys: bool,
    mask: Option<ArrayView3<'a, bool>>,
    fp: Vec<FpPart<'a, T>>,
    ragged: Option<RaggedCtx<'a, T>>,
    quant: Vec<QuantPart<'a, T>>,
    /// First global tile of each block.
    tile_starts: Vec<usize>,
    /// Pre-RoPE keys: the cos/sin table that rotates dequantized key tiles.
    angles: Option<&'a AngleTable>,
}

/// A piece's partial softmax state.
struct State {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    quantized: bool,
}

fn fp_part<'a, T: KvFloat>(
    part: &'a crate::quant::store::FullPrecision,
    offset: usize,
) -> Result<FpPart<'a, T>> {
    let internal = || KvError::State("internal: full-precision tokens are not contiguous".into());
    Ok(FpPart {
        keys: array_view::<T, Ix4>(&part.keys, "keys")?
            .to_slice()
            .ok_or_else(internal)?,
        values: array_view::<T, Ix4>(&part.values, "values")?
            .to_slice()
            .ok_or_else(internal)?,
        capacity: part.capacity(),
        len: part.len,
        offset,
    })
}

fn ragged_slices<'a, T: KvFloat>(
    part: &'a crate::quant::ragged::RaggedPart,
) -> Result<RaggedSlices<'a, T>> {
    let internal = || KvError::State("internal: ragged tiles are not contiguous".into());
    let contiguous = |t: &Tensor| t.is_contiguous();
    if !contiguous(&part.codes) || !contiguous(&part.params) {
        return Err(internal());
    }
    let codes = array_view::<u8, ndarray::IxDyn>(&part.codes, "codes")?;
    let params = array_view::<f16, ndarray::IxDyn>(&part.params, "params")?;
    let (outlier_idx, outlier_val): (&[i32], &[T]) = match &part.outliers {
        Some((i, v)) => (
            array_view::<i32, ndarray::Ix1>(i, "outlier indices")?
                .to_slice()
                .ok_or_else(internal)?,
            array_view::<T, ndarray::Ix1>(v, "outlier values")?
                .to_slice()
                .ok_or_else(internal)?,
        ),
        None => (&[], &[]),
    };
    Ok(RaggedSlices {
        codes: codes.to_slice().ok_or_else(internal)?,
        params: params.to_slice().ok_or_else(internal)?,
        outlier_idx,
        outlier_val,
        code_bytes: crate::quant::ragged::code_bytes(&part.layout),
    })
}

fn attend_typed<T: KvFloat>(
    store: &QuantizedStore,
    inputs: &AttendInputs<'_>,
) -> Result<(Tensor, Tensor)> {
    let inp = &inputs.dims;
    let (key_layout, value_layout) = store
        .layouts()
        .ok_or_else(crate::quant::store::empty_store)?;
    let (bh_count, rows, dk, dv) = (
        inp.batch * inp.kv_heads,
        inp.rows(),
        inp.key_dim,
        inp.value_dim,
    );

    // Query rows, scaled, f32: row r = j·q_len + i of kv head h is query head h·n_rep + j.
    let mut q = vec![0f32; bh_count * rows * dk];
    let qview = float_view::<Ix4>(inputs.query, "query")?;
    with_float_view!(qview, v => {
        for b in 0..inp.batch {
            for h in 0..inp.kv_heads {
                for j in 0..inp.n_rep {
                    for i in 0..inp.q_len {
                        let r = j * inp.q_len + i;
                        let dst = &mut q[((b * inp.kv_heads + h) * rows + r) * dk..][..dk];
                        let src = v.slice(ndarray::s![b, h * inp.n_rep + j, i, ..]);
                        for (o, &x) in dst.iter_mut().zip(src.iter()) {
                            *o = x.to_f32() * inputs.scaling;
                        }
                    }
                }
            }
        }
    });
    let q_rot = if store.scores_keys_in_hadamard_basis() {
        let mut r = q.clone();
        for row in r.chunks_exact_mut(dk) {
            fwht(row);
        }
        r
    } else {
        Vec::new()
    };
    let mask = inputs
        .mask
        .map(|m| array_view::<bool, Ix3>(m, "mask"))
        .transpose()?;

    let mut fp = Vec::new();
    let sink_len = store.sink_len();
    if let Some(s) = store.sinks().filter(|s| s.len > 0) {
        fp.push(fp_part::<T>(s, 0)?);
    }
    let angles_guard = store.angle_table();
    let angles = angles_guard.as_deref();
    let ragged = match store.ragged() {
        Some(r) => {
            let mut tile_token = Vec::with_capacity(r.counts.len());
            for row in r.tile_rows.windows(2) {
                let mut t = 0usize;
                for &n in &r.counts[row[0]..row[1]] {
                    tile_token.push(t);
                    t += n as usize;
                }
            }
            let positions = match (angles, &r.positions) {
                (Some(_), Some(p)) => Some(
                    array_view::<i32, Ix3>(p, "positions")?
                        .to_slice()
                        .ok_or_else(|| {
                            KvError::State("internal: positions are not contiguous".into())
                        })?,
                ),
                _ => None,
            };
            Some(RaggedCtx {
                len: r.len,
                offset: sink_len,
                keys: ragged_slices::<T>(&r.keys)?,
                values: ragged_slices::<T>(&r.values)?,
                counts: &r.counts,
                tile_token,
                positions,
            })
        }
        None => None,
    };
    let mut quant = Vec::new();
    let mut tile_starts = Vec::new();
    let (mut offset, mut tiles) = (sink_len + ragged.as_ref().map_or(0, |r| r.len), 0usize);
    for block in store.blocks() {
        let n = block.keys.tokens();
        tile_starts.push(tiles);
        let positions = match (angles, &block.positions) {
            (Some(_), Some(BlockPositions::Run { start, .. })) => {
                PartPositions::Run(*start as usize)
            }
            (Some(_), Some(BlockPositions::Stored(p))) => PartPositions::Rows {
                data: array_view::<i32, Ix3>(p, "positions")?
                    .to_slice()
                    .ok_or_else(|| {
                        KvError::State("internal: positions are not contiguous".into())
                    })?,
                per_row: p.size()[..2] != [1, 1],
            },
            _ => PartPositions::None,
        };
        quant.push(QuantPart {
            keys: QuantSlices::<T>::new(&block.keys)?,
            values: QuantSlices::<T>::new(&block.values)?,
            tiles: n / key_layout.group_size,
            offset,
            positions,
        });
        offset += n;
        tiles += n / key_layout.group_size;
    }
    if let Some(r) = store.residual().filter(|r| r.len > 0) {
        fp.push(fp_part::<T>(r, offset)?);
    }

    // Pieces: enough for every thread, none too small (one per row on the calling thread).
    let threads = rayon::current_num_threads().max(1);
    let parallel = bh_count * inp.seen * (dk + dv) * rows >= PARALLEL_MACS && threads > 1;
    let per_row = if parallel {
        (4 * threads).div_ceil(bh_count).max(1)
    } else {
        1
    };
    let tiles_per_piece = tiles.div_ceil(per_row).max(MIN_TILES_PER_PIECE);
    let mut pieces = Vec::new();
    for bh in 0..bh_count {
        for (part, f) in fp.iter().enumerate() {
            pieces.push(Piece {
                bh,
                span: Span::Fp {
                    part,
                    t0: 0,
                    t1: f.len,
                },
            });
        }
        if let Some(r) = store.ragged() {
            let (first, last) = (r.tile_rows[bh], r.tile_rows[bh + 1]);
            let mut t = first;
            while t < last {
                let end = (t + MIN_TILES_PER_PIECE).min(last);
                pieces.push(Piece {
                    bh,
                    span: Span::Ragged {
                        tile0: t,
                        tile1: end,
                    },
                });
                t = end;
            }
        }
        let mut t = 0;
        while t < tiles {
            let end = (t + tiles_per_piece).min(tiles);
            pieces.push(Piece {
                bh,
                span: Span::Quant {
                    tile0: t,
                    tile1: end,
                },
            });
            t = end;
        }
    }

    let ctx = Ctx {
        inp: *inp,
        key_layout,
        value_layout,
        q,
        unrotate_keys: key_layout.hadamard && !store.scores_keys_in_hadamard_basis(),
        q_rot,
        mask,
        fp,
        ragged,
        quant,
        tile_starts,
        angles,
    };
    let run = |piece: &Piece| match key_layout.bits {
        2 => run_piece::<T, 2>(&ctx, piece),
        3 => run_piece::<T, 3>(&ctx, piece),
        4 => run_piece::<T, 4>(&ctx, piece),
        _ => run_piece::<T, 8>(&ctx, piece),
    };
    let states: Vec<State> = if parallel {
        pieces.par_iter().map(run).collect()
    } else {
        pieces.iter().map(run).collect()
    };

    // Merge the pieces of each (batch, kv head) and write (batch, q_len, q_heads, dv).
    let mut out = vec![0f32; inp.batch * inp.q_len * inp.q_heads * dv];
    let mut lse = vec![f32::NEG_INFINITY; inp.batch * inp.q_len * inp.q_heads];
    let mut by_row: Vec<Vec<&State>> = (0..bh_count).map(|_| Vec::new()).collect();
    for (piece, state) in pieces.iter().zip(&states) {
        by_row[piece.bh].push(state);
    }
    for (bh, parts) in by_row.iter().enumerate() {
        let (b, h) = (bh / inp.kv_heads, bh % inp.kv_heads);
        for r in 0..rows {
            let m = parts
                .iter()
                .map(|s| s.m[r])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut l = 0f32;
            let mut acc_q = vec![0f32; dv];
            let mut acc_f = vec![0f32; dv];
            if m > f32::NEG_INFINITY {
                for s in parts {
                    if s.m[r] == f32::NEG_INFINITY {
                        continue;
                    }
                    let f = (s.m[r] - m).exp();
                    l += f * s.l[r];
                    let acc = if s.quantized { &mut acc_q } else { &mut acc_f };
                    for (a, &x) in acc.iter_mut().zip(&s.acc[r * dv..(r + 1) * dv]) {
                        *a += f * x;
                    }
                }
            }
            if value_layout.hadamard {
                fwht(&mut acc_q);
            }
            let (j, i) = (r / inp.q_len, r % inp.q_len);
            let head = h * inp.n_rep + j;
            let dst = &mut out[((b * inp.q_len + i) * inp.q_heads + head) * dv..][..dv];
            if l > 0.0 {
                lse[(b * inp.q_len + i) * inp.q_heads + head] = m + l.ln();
                let inv = 1.0 / l;
                for (o, (a, c)) in dst.iter_mut().zip(acc_q.iter().zip(&acc_f)) {
                    *o = (a + c) * inv;
                }
            }
        }
    }
    let shape = [
        inp.batch as i64,
        inp.q_len as i64,
        inp.q_heads as i64,
        dv as i64,
    ];
    let lse_shape = [inp.batch as i64, inp.q_len as i64, inp.q_heads as i64];
    Ok((
        Tensor::f_from_slice(&out)?.f_view(shape)?,
        Tensor::f_from_slice(&lse)?.f_view(lse_shape)?,
    ))
}

multiversion!(fn run_piece<T: KvFloat; const BITS: u32>(ctx: &Ctx<'_, T>, piece: &Piece) -> State => run_piece_body);

/// Scratch space of one piece.
struct Scratch {
    /// Scores, then weights, of the current tile: rows × G.
    sc: Vec<f32>,
    /// The tile's keys, transposed: key_dim × G.
    kt: Vec<f32>,
    /// The tile's values: G × value_dim.
    v: Vec<f32>,
    /// One unpacked group.
    group: Vec<f32>,
    /// One token's unpacked codes (ragged tiles).
    token: Vec<f32>,
}

#[inline(always)]
fn run_piece_body<M: Madd, T: KvFloat, const BITS: u32>(ctx: &Ctx<'_, T>, piece: &Piece) -> State {
    let inp = &ctx.inp;
    let rows = inp.rows();
    let (dk, dv) = (inp.key_dim, inp.value_dim);
    let g = ctx.key_layout.group_size;
    let bh = piece.bh;
    let mut st = State {
        m: vec![f32::NEG_INFINITY; rows],
        l: vec![0.0; rows],
        acc: vec![0.0; rows * dv],
        quantized: matches!(piece.span, Span::Quant { .. } | Span::Ragged { .. }),
    };
    let mut scr = Scratch {
        sc: vec![0f32; rows * g],
        kt: vec![0f32; dk * g],
        v: vec![0f32; g * dv],
        group: vec![0f32; g],
        token: vec![0f32; dk.max(dv)],
    };
    let q = &ctx.q[bh * rows * dk..(bh + 1) * rows * dk];
    match piece.span {
        Span::Ragged { tile0, tile1 } => {
            let qk = if !ctx.q_rot.is_empty() {
                &ctx.q_rot[bh * rows * dk..(bh + 1) * rows * dk]
            } else {
                q
            };
            if let Some(r) = &ctx.ragged {
                for tile in tile0..tile1 {
                    let n = r.counts[tile] as usize;
                    let t0 = r.tile_token[tile];
                    let at = RaggedAt {
                        len: r.len,
                        bh,
                        tile,
                        t0,
                        n,
                        stride: g,
                    };
                    dequantize_ragged::<M, T, BITS>(
                        &ctx.key_layout,
                        &r.keys,
                        &at,
                        true,
                        &mut scr.token,
                        &mut scr.kt,
                    );
                    dequantize_ragged::<M, T, BITS>(
                        &ctx.value_layout,
                        &r.values,
                        &at,
                        false,
                        &mut scr.token,
                        &mut scr.v,
                    );
                    if ctx.unrotate_keys {
                        fwht_columns(&mut scr.kt, dk, g, n);
                    }
                    if let (Some(table), Some(positions)) = (ctx.angles, r.positions) {
                        let row = &positions[bh * r.len + t0..][..n];
                        table.apply_transposed(&mut scr.kt, g, row, n);
                    }
                    attend_tile::<M>(ctx, &mut st, &mut scr, qk, bh, r.offset + t0, n);
                }
            }
        }
        Span::Fp { part, t0, t1 } => {
            let f = &ctx.fp[part];
            let mut t = t0;
            while t < t1 {
                let len = g.min(t1 - t);
                for k in 0..len {
                    let krow = &f.keys[(bh * f.capacity + t + k) * dk..][..dk];
                    for (c, &x) in krow.iter().enumerate() {
                        scr.kt[c * g + k] = x.to_f32();
                    }
                    let vrow = &f.values[(bh * f.capacity + t + k) * dv..][..dv];
                    for (o, &x) in scr.v[k * dv..(k + 1) * dv].iter_mut().zip(vrow) {
                        *o = x.to_f32();
                    }
                }
                attend_tile::<M>(ctx, &mut st, &mut scr, q, bh, f.offset + t, len);
                t += len;
            }
        }
        Span::Quant { tile0, tile1 } => {
            let qk = if !ctx.q_rot.is_empty() {
                &ctx.q_rot[bh * rows * dk..(bh + 1) * rows * dk]
            } else {
                q
            };
            let mut block = ctx.tile_starts.partition_point(|&s| s <= tile0) - 1;
            for tile in tile0..tile1 {
                while block + 1 < ctx.quant.len() && ctx.tile_starts[block + 1] <= tile {
                    block += 1;
                }
                let part = &ctx.quant[block];
                let local = tile - ctx.tile_starts[block];
                let key_tile = tile_data(&part.keys, &ctx.key_layout, part.tiles, bh, local);
                let value_tile = tile_data(&part.values, &ctx.value_layout, part.tiles, bh, local);
                match g {
                    32 => {
                        dequantize_tile::<M, T, BITS, 32>(
                            &ctx.key_layout,
                            &key_tile,
                            true,
                            &mut scr.group,
                            &mut scr.kt,
                        );
                        dequantize_tile::<M, T, BITS, 32>(
                            &ctx.value_layout,
                            &value_tile,
                            false,
                            &mut scr.group,
                            &mut scr.v,
                        );
                    }
                    64 => {
                        dequantize_tile::<M, T, BITS, 64>(
                            &ctx.key_layout,
                            &key_tile,
                            true,
                            &mut scr.group,
                            &mut scr.kt,
                        );
                        dequantize_tile::<M, T, BITS, 64>(
                            &ctx.value_layout,
                            &value_tile,
                            false,
                            &mut scr.group,
                            &mut scr.v,
                        );
                    }
                    _ => {
                        dequantize_tile::<M, T, BITS, 128>(
                            &ctx.key_layout,
                            &key_tile,
                            true,
                            &mut scr.group,
                            &mut scr.kt,
                        );
                        dequantize_tile::<M, T, BITS, 128>(
                            &ctx.value_layout,
                            &value_tile,
                            false,
                            &mut scr.group,
                            &mut scr.v,
                        );
                    }
                }
                if ctx.unrotate_keys {
                    fwht_columns(&mut scr.kt, dk, g, g);
                }
                if let Some(table) = ctx.angles {
                    match part.positions {
                        PartPositions::Run(start) => {
                            table.apply_run_transposed(&mut scr.kt, g, start + local * g, g);
                        }
                        PartPositions::Rows { data, per_row } => {
                            let row0 = if per_row { bh * part.tiles * g } else { 0 };
                            let row = &data[row0 + local * g..][..g];
                            table.apply_transposed(&mut scr.kt, g, row, g);
                        }
                        PartPositions::None => {}
                    }
                }
                attend_tile::<M>(ctx, &mut st, &mut scr, qk, bh, part.offset + local * g, g);
            }
        }
    }
    st
}

/// One tile of `len` tokens starting at stored position `abs0`, whose keys are in
/// `scr.kt` (transposed) and values in `scr.v`: scores, mask, online softmax, weighted sum.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_tile<M: Madd>(
    ctx: &Ctx<'_, impl KvFloat>,
    st: &mut State,
    scr: &mut Scratch,
    q: &[f32],
    bh: usize,
    abs0: usize,
    len: usize,
) {
    let rows = ctx.inp.rows();
    let (dk, dv) = (ctx.inp.key_dim, ctx.inp.value_dim);
    let g = ctx.key_layout.group_size;
    for row in scr.sc.chunks_exact_mut(g) {
        row.fill(0.0);
    }
    gemm_acc::<M>(q, dk, rows, dk, &scr.kt, g, len, &mut scr.sc, g);
    mask_scores(ctx, bh, abs0, len, g, &mut scr.sc);
    softmax_step(st, &mut scr.sc, len, g, dv);
    gemm_acc::<M>(&scr.sc, g, rows, len, &scr.v, dv, dv, &mut st.acc, dv);
}

/// Dequantizes one tile (head_dim groups) into f32: keys transposed (`head_dim × G`,
/// `transposed`), values as they are (`G × head_dim`). Outliers get their exact values.
#[inline(always)]
fn dequantize_tile<M: Madd, T: KvFloat, const BITS: u32, const G: usize>(
    layout: &TensorLayout,
    tile: &TileData<'_, T>,
    transposed: bool,
    group: &mut [f32],
    out: &mut [f32],
) {
    let (g, d) = (G, layout.head_dim);
    let gb = layout.group_bytes();
    let no = layout.outliers;
    for i in 0..d {
        let (s, z) = (tile.params[2 * i].to_f32(), tile.params[2 * i + 1].to_f32());
        // Channel groups are (channel i, G tokens); token groups (token t, channels j·G..).
        let (contiguous, dst_start): (bool, usize) = match (layout.grouping, transposed) {
            (Grouping::Channel, true) => (true, i * g),
            (Grouping::Token, false) => (true, i * g),
            _ => (false, 0),
        };
        let vals: &mut [f32] = if contiguous {
            &mut out[dst_start..dst_start + g]
        } else {
            &mut group[..g]
        };
        dequant_group::<M, BITS, G, _>(&tile.codes[i * gb..(i + 1) * gb], s, z, vals);
        for k in 0..no {
            vals[tile.positions[i * no + k] as usize] = tile.values[i * no + k].to_f32();
        }
        if !contiguous {
            match layout.grouping {
                // Channel group i of values: value[t][i] for t < G.
                Grouping::Channel => {
                    for (t, &x) in group[..g].iter().enumerate() {
                        out[t * d + i] = x;
                    }
                }
                // Token group i = (t, j) of keys: keyᵀ[j·G + c][t].
                Grouping::Token => {
                    let per = d / g;
                    let (t, j) = (i / per, i % per);
                    for (c, &x) in group[..g].iter().enumerate() {
                        out[(j * g + c) * g + t] = x;
                    }
                }
            }
        }
    }
}

/// Which tokens of the ragged tiles one call dequantizes: row `bh` (of `len` tokens), tile
/// `tile` (global index, for channel-group scales/zeros), its `n` tokens from `t0`;
/// transposed keys are written with row stride `stride`.
struct RaggedAt {
    len: usize,
    bh: usize,
    tile: usize,
    t0: usize,
    n: usize,
    stride: usize,
}

/// Dequantizes the `at.n` tokens of one ragged tile into f32: keys transposed
/// (`head_dim × stride`, first n columns), values as they are (`n × head_dim`). Each token's
/// codes are unpacked once into `token`; outliers get their exact values.
#[inline(always)]
fn dequantize_ragged<M: Madd, T: KvFloat, const BITS: u32>(
    layout: &TensorLayout,
    s: &RaggedSlices<'_, T>,
    at: &RaggedAt,
    transposed: bool,
    token: &mut [f32],
    out: &mut [f32],
) {
    let d = layout.head_dim;
    let cb = s.code_bytes;
    let mut write = |k: usize, c: usize, x: f32| {
        if transposed {
            out[c * at.stride + k] = x;
        } else {
            out[k * d + c] = x;
        }
    };
    for k in 0..at.n {
        let tok = at.bh * at.len + at.t0 + k;
        let bytes = &s.codes[tok * cb..(tok + 1) * cb];
        match layout.grouping {
            Grouping::Channel => {
                unpack_f32::<BITS>(bytes, &mut token[..d]);
                let p = &s.params[at.tile * d * 2..(at.tile + 1) * d * 2];
                for c in 0..d {
                    write(
                        k,
                        c,
                        M::madd(token[c], p[2 * c].to_f32(), p[2 * c + 1].to_f32()),
                    );
                }
            }
            Grouping::Token => {
                let (gs, gb) = (layout.group_size, layout.group_bytes());
                let ng = d / gs;
                for j in 0..ng {
                    unpack_f32::<BITS>(
                        &bytes[j * gb..(j + 1) * gb],
                        &mut token[j * gs..(j + 1) * gs],
                    );
                    let (sc, z) = (
                        s.params[(tok * ng + j) * 2].to_f32(),
                        s.params[(tok * ng + j) * 2 + 1].to_f32(),
                    );
                    for (c, &code) in token.iter().enumerate().skip(j * gs).take(gs) {
                        write(k, c, M::madd(code, sc, z));
                    }
                }
            }
        }
    }
    if !s.outlier_idx.is_empty() {
        let lo = ((at.bh * at.len + at.t0) * d) as i32;
        let hi = lo + (at.n * d) as i32;
        let a = s.outlier_idx.partition_point(|&i| i < lo);
        let b = s.outlier_idx.partition_point(|&i| i < hi);
        for e in a..b {
            let rel = (s.outlier_idx[e] - lo) as usize;
            write(rel / d, rel % d, s.outlier_val[e].to_f32());
        }
    }
}

/// The slices of tile `local` of row `bh` in one quantized tensor with `tiles` tiles per row.
#[inline(always)]
fn tile_data<'a, T>(
    q: &QuantSlices<'a, T>,
    layout: &TensorLayout,
    tiles: usize,
    bh: usize,
    local: usize,
) -> TileData<'a, T> {
    let d = layout.head_dim;
    let first = (bh * tiles + local) * d;
    let (gb, no) = (layout.group_bytes(), layout.outliers);
    TileData {
        codes: &q.codes[first * gb..(first + d) * gb],
        params: &q.params[2 * first..2 * (first + d)],
        positions: if no > 0 {
            &q.positions[first * no..(first + d) * no]
        } else {
            &[]
        },
        values: if no > 0 {
            &q.values[first * no..(first + d) * no]
        } else {
            &[]
        },
    }
}

/// Sets to −inf the scores of tokens `abs0..abs0+len` that a row may not see: the mask's
/// false entries, or (without a mask) tokens after the row's query position.
#[inline(always)]
fn mask_scores<T>(
    ctx: &Ctx<'_, T>,
    bh: usize,
    abs0: usize,
    len: usize,
    stride: usize,
    sc: &mut [f32],
) {
    let inp = &ctx.inp;
    let rows = inp.rows();
    match &ctx.mask {
        Some(m) => {
            let b = if m.dim().0 == 1 { 0 } else { bh / inp.kv_heads };
            for r in 0..rows {
                let i = r % inp.q_len;
                let lane = m.slice(ndarray::s![b, i, abs0..abs0 + len]);
                for (x, &ok) in sc[r * stride..r * stride + len].iter_mut().zip(lane.iter()) {
                    if !ok {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
        None => {
            for r in 0..rows {
                let limit = inp.causal_limit(r % inp.q_len);
                if abs0 + len > limit {
                    let from = limit.saturating_sub(abs0);
                    sc[r * stride + from..r * stride + len].fill(f32::NEG_INFINITY);
                }
            }
        }
    }
}

/// Online softmax over one tile: rescales the state to the new running max and turns the
/// tile's scores into weights `exp(s − m)` in place (0 for masked tokens).
#[inline(always)]
fn softmax_step(st: &mut State, sc: &mut [f32], len: usize, stride: usize, dv: usize) {
    for r in 0..st.m.len() {
        let row = &mut sc[r * stride..r * stride + len];
        let mt = max(row);
        if mt == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let m_old = st.m[r];
        if mt > m_old {
            let f = exp_neg(m_old - mt);
            st.l[r] *= f;
            for a in &mut st.acc[r * dv..(r + 1) * dv] {
                *a *= f;
            }
            st.m[r] = mt;
        }
        let m = st.m[r];
        for x in row.iter_mut() {
            *x = exp_neg(*x - m);
        }
        st.l[r] += sum(row);
    }
}
