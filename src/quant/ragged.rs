//! [`RaggedTiles`]: the quantized tokens a store keeps after an eviction (decoding-time
//! compression of a quantized cache).
//!
//! Different heads evict different tokens, so the surviving tokens of a block no longer
//! form whole tiles of `group_size` tokens per (batch, head). They are kept, never
//! re-quantized, token by token:
//!
//! - every (batch, head) row keeps the same number of tokens `len` (the budget minus the
//!   protected full-precision tokens), in their original order;
//! - each token carries its codes (`head_dim·bits/8` bytes). Token-grouped tensors (KIVI's
//!   values) keep each group's bytes as they were in the block (a group is one token's
//!   channels, so it survives or goes whole) and its float16 (scale, zero). Channel-grouped
//!   tensors (KIVI's keys: one scale/zero per channel over a tile of G tokens) keep each
//!   tile's scales/zeros once per row (`params`, (tiles, head_dim, 2)) and the kept tokens'
//!   integer codes re-packed per token (planar, `head_dim` codes; packing integers is exact);
//! - a row's tiles are listed with the count of tokens each kept (`counts`, one byte per
//!   tile), so a tile whose tokens were all evicted frees its scales/zeros too;
//! - outliers of kept tokens stay exact: (int32 flat index into (batch, heads, len,
//!   head_dim), value) pairs, ascending (4 index bytes per outlier instead of a block's 1:
//!   the position within a group no longer locates a kept token);
//! - with pre-RoPE keys, each token's position (int32 (batch, heads, len)).
//!
//! The memory of evicted tokens is freed: [`RaggedTiles::nbytes`] follows the kept counts
//! exactly. Attention reads the tiles in place (`attention/cpu.rs`: one source tile at a
//! time into the same L1 scratch as whole tiles) or dequantizes them with libtorch ops
//! ([`RaggedTiles::dequantize_f32`], any device).
//!
//! Building one ([`retain`]) goes through a token-major view of every quantized token of
//! the store (this region and the blocks after it), gathers the kept tokens' bytes, and
//! never computes a new scale, zero or code.

use super::config::Grouping;
use super::layout::TensorLayout;
use super::libtorch::{pack, unpack};
use super::store::Block;
use crate::error::{KvError, Result};
use tch::{Device, Kind, Tensor};

/// One tensor (keys or values) of the ragged tiles.
#[derive(Debug)]
pub struct RaggedPart {
    pub layout: TensorLayout,
    /// u8 (batch, heads, len, head_dim·bits/8): each token's codes (see the module docs).
    pub codes: Tensor,
    /// float16 (scale, zero): (batch, heads, len, head_dim/G, 2) for token groups,
    /// (tiles, head_dim, 2) for channel groups (row r's tiles are `tile_rows[r]..`).
    pub params: Tensor,
    /// int32 flat indices into (batch, heads, len, head_dim), ascending, and exact values
    /// in the cache dtype; `None` without outliers.
    pub outliers: Option<(Tensor, Tensor)>,
}

/// The quantized tokens kept by an eviction (see the module documentation).
#[derive(Debug)]
pub struct RaggedTiles {
    /// Tokens per (batch, head) row.
    pub len: usize,
    pub batch: usize,
    pub heads: usize,
    pub kind: Kind,
    pub keys: RaggedPart,
    pub values: RaggedPart,
    /// Row r = b·heads + h holds tiles `tile_rows[r]..tile_rows[r + 1]`, in token order.
    pub tile_rows: Vec<usize>,
    /// Tokens each tile kept (1..=group_size).
    pub counts: Vec<u8>,
    /// With pre-RoPE keys: int32 (batch, heads, len).
    pub positions: Option<Tensor>,
}

fn bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Bytes of one token's codes.
pub fn code_bytes(layout: &TensorLayout) -> usize {
    layout.head_dim * layout.bits as usize / 8
}

impl RaggedPart {
    fn nbytes(&self) -> usize {
        bytes(&self.codes)
            + bytes(&self.params)
            + self
                .outliers
                .as_ref()
                .map_or(0, |(i, v)| bytes(i) + bytes(v))
    }
}

impl RaggedTiles {
    /// Bytes held: codes, scales/zeros and outliers of keys and values, positions, and one
    /// byte per tile (its kept count).
    pub fn nbytes(&self) -> usize {
        self.keys.nbytes()
            + self.values.nbytes()
            + self.positions.as_ref().map_or(0, bytes)
            + self.counts.len()
    }

    pub fn device(&self) -> Device {
        self.keys.codes.device()
    }

    /// Tiles of every row.
    pub fn tiles(&self) -> usize {
        self.counts.len()
    }

    /// The tile of every token, int64 (batch·heads·len,) on `device`.
    fn tile_of_token(&self, device: Device) -> Result<Tensor> {
        let ids: Vec<i64> = self
            .counts
            .iter()
            .enumerate()
            .flat_map(|(t, &n)| std::iter::repeat_n(t as i64, n as usize))
            .collect();
        Ok(Tensor::f_from_slice(&ids)?.f_to(device)?)
    }

    /// One part dequantized as f32 (batch, heads, len, head_dim): `code·scale + zero` (two
    /// roundings, as every other path), outliers exact, still in the Hadamard basis when
    /// the config rotates (attention rotates the query instead) and before RoPE when keys
    /// are stored pre-RoPE.
    pub fn dequantize_f32(&self, part: &RaggedPart) -> Result<Tensor> {
        let l = part.layout;
        let (b, h, n, d) = (
            self.batch as i64,
            self.heads as i64,
            self.len as i64,
            l.head_dim as i64,
        );
        let g = l.group_size as i64;
        let x = match l.grouping {
            Grouping::Token => {
                let ng = d / g;
                let packed = part.codes.f_view([b, h, n, ng, l.group_bytes() as i64])?;
                let codes = unpack(&packed, l.bits, g)?.f_to_kind(Kind::Float)?;
                let params = part.params.f_to_kind(Kind::Float)?;
                let scale = params.f_select(-1, 0)?.f_unsqueeze(-1)?;
                let zero = params.f_select(-1, 1)?.f_unsqueeze(-1)?;
                codes.f_mul(&scale)?.f_add(&zero)?.f_view([b, h, n, d])?
            }
            Grouping::Channel => {
                let codes = unpack(&part.codes, l.bits, d)?.f_to_kind(Kind::Float)?;
                let tile = self.tile_of_token(part.codes.device())?;
                let params = part
                    .params
                    .f_index_select(0, &tile)?
                    .f_to_kind(Kind::Float)?
                    .f_view([b, h, n, d, 2])?;
                codes
                    .f_mul(&params.f_select(-1, 0)?)?
                    .f_add(&params.f_select(-1, 1)?)?
            }
        };
        match &part.outliers {
            Some((idx, val)) => {
                let flat = x.f_contiguous()?.f_view([-1])?;
                let idx = idx.f_to_kind(Kind::Int64)?;
                let flat = flat.f_index_put(&[Some(idx)], &val.f_to_kind(Kind::Float)?, false)?;
                Ok(flat.f_view([b, h, n, d])?)
            }
            None => Ok(x),
        }
    }

    /// Integer codes and the (scale, zero) of every element of one part: u8 (batch, heads,
    /// len, head_dim) and float16 (batch, heads, len, head_dim, 2) (inspection, tests).
    pub fn element_codes(&self, part: &RaggedPart) -> Result<(Tensor, Tensor)> {
        let l = part.layout;
        let (b, h, n, d) = (
            self.batch as i64,
            self.heads as i64,
            self.len as i64,
            l.head_dim as i64,
        );
        let g = l.group_size as i64;
        Ok(match l.grouping {
            Grouping::Token => {
                let packed = part
                    .codes
                    .f_view([b, h, n, d / g, l.group_bytes() as i64])?;
                (
                    unpack(&packed, l.bits, g)?.f_view([b, h, n, d])?,
                    part.params
                        .f_repeat_interleave_self_int(g, 3, None)?
                        .f_contiguous()?,
                )
            }
            Grouping::Channel => {
                let tile = self.tile_of_token(part.codes.device())?;
                (
                    unpack(&part.codes, l.bits, d)?,
                    part.params
                        .f_index_select(0, &tile)?
                        .f_view([b, h, n, d, 2])?,
                )
            }
        })
    }

    /// These tiles with their batch rows taken from `sources` (new row b ← old row
    /// `sources[b]`): beam search, batch selection, repeat_interleave.
    pub fn select_batch(&self, sources: &[usize]) -> Result<Self> {
        let device = self.device();
        let nb = sources.len();
        let index = Tensor::f_from_slice(&sources.iter().map(|&s| s as i64).collect::<Vec<_>>())?
            .f_to(device)?;
        let rows_of = |t: &Tensor| -> Result<Tensor> { Ok(t.f_index_select(0, &index)?) };
        // Tiles of the new rows, in order.
        let mut tile_ids = Vec::new();
        let mut tile_rows = vec![0usize];
        let mut counts = Vec::new();
        for &src in sources {
            for hh in 0..self.heads {
                let r = src * self.heads + hh;
                for t in self.tile_rows[r]..self.tile_rows[r + 1] {
                    tile_ids.push(t as i64);
                    counts.push(self.counts[t]);
                }
                tile_rows.push(tile_ids.len());
            }
        }
        let tiles = Tensor::f_from_slice(&tile_ids)?.f_to(device)?;
        let row_elems = (self.heads * self.len) as i64;
        let part = |p: &RaggedPart| -> Result<RaggedPart> {
            let d = p.layout.head_dim as i64;
            let outliers = match &p.outliers {
                Some((idx, val)) => {
                    // Entries of batch row src move to every new row taking it.
                    let idx = idx.f_to_kind(Kind::Int64)?;
                    let per_batch = row_elems * d;
                    let src_batch = idx.f_div_scalar_mode(per_batch, "floor")?;
                    let rest = idx.f_remainder(per_batch)?;
                    let mut idxs = Vec::new();
                    let mut vals = Vec::new();
                    for (nbi, &src) in sources.iter().enumerate() {
                        let sel = src_batch.f_eq(src as i64)?.f_nonzero()?.f_view([-1])?;
                        idxs.push(
                            rest.f_index_select(0, &sel)?
                                .f_add_scalar(nbi as i64 * per_batch)?,
                        );
                        vals.push(val.f_index_select(0, &sel)?);
                    }
                    Some((
                        Tensor::f_cat(&idxs, 0)?.f_to_kind(Kind::Int)?,
                        Tensor::f_cat(&vals, 0)?,
                    ))
                }
                None => None,
            };
            Ok(RaggedPart {
                layout: p.layout,
                codes: rows_of(&p.codes)?,
                params: match p.layout.grouping {
                    Grouping::Token => rows_of(&p.params)?,
                    Grouping::Channel => p.params.f_index_select(0, &tiles)?,
                },
                outliers,
            })
        };
        Ok(RaggedTiles {
            len: self.len,
            batch: nb,
            heads: self.heads,
            kind: self.kind,
            keys: part(&self.keys)?,
            values: part(&self.values)?,
            tile_rows,
            counts,
            positions: self.positions.as_ref().map(rows_of).transpose()?,
        })
    }
}

/// Outlier entries: flat indices and exact values.
type Outliers = (Tensor, Tensor);

/// One tensor token-major: codes, params, outliers.
type PartPieces = (Tensor, Tensor, Option<Outliers>);

/// The pieces of one part (keys or values) collected region by region before
/// concatenation: codes, params, outlier indices, outlier values.
#[derive(Default)]
struct Pieces {
    codes: Vec<Tensor>,
    params: Vec<Tensor>,
    idx: Vec<Tensor>,
    val: Vec<Tensor>,
}

/// One part of every quantized token of a store, token-major (see [`TokenMajor`]).
struct PartTokens {
    layout: TensorLayout,
    /// u8 (b, h, q, code bytes).
    codes: Tensor,
    /// Token groups: (b, h, q, head_dim/G, 2); channel groups: (all tiles, head_dim, 2).
    params: Tensor,
    /// int64 flat indices into (b, h, q, head_dim) and values.
    outliers: Option<(Tensor, Tensor)>,
}

/// Every quantized token of a store (ragged tiles first, then each block), token-major,
/// with the tile each token came from: what an eviction selects from.
struct TokenMajor {
    q: usize,
    keys: PartTokens,
    values: PartTokens,
    /// int64 (b, h, q): a tile id unique across rows (ragged tiles, then block tiles).
    tile: Tensor,
    positions: Option<Tensor>,
}

/// A block's tensor token-major, its outliers re-indexed into (b, h, q_total, head_dim)
/// at token offset `offset`, and its channel-group params as a tile table (b·h·tiles, d, 2).
fn block_part(q: &super::QuantizedTensor, offset: i64, q_total: i64) -> Result<PartPieces> {
    let l = q.layout;
    let (b, h, n) = (q.batch as i64, q.heads as i64, q.tokens as i64);
    let (g, d) = (l.group_size as i64, l.head_dim as i64);
    let gb = l.group_bytes() as i64;
    let groups = l.groups(q.tokens) as i64;
    let device = q.codes.device();
    let (codes, params) = match l.grouping {
        Grouping::Token => (
            q.codes.f_view([b, h, n, (d / g) * gb])?,
            q.params.f_view([b, h, n, d / g, 2])?,
        ),
        Grouping::Channel => {
            let tiles = n / g;
            let unpacked = unpack(&q.codes.f_view([b, h, tiles, d, gb])?, l.bits, g)?
                .f_transpose(3, 4)?
                .f_contiguous()?
                .f_view([b, h, n, d])?;
            (
                pack(&unpacked, l.bits)?.f_contiguous()?,
                q.params.f_view([b * h * tiles, d, 2])?,
            )
        }
    };
    let outliers = match &q.outliers {
        Some((pos, val)) => {
            let no = pos.size()[3];
            // Group index of every entry, (groups, 1) → token and channel.
            let gi = Tensor::f_arange(groups, (Kind::Int64, device))?.f_view([1, 1, groups, 1])?;
            let p = pos.f_to_kind(Kind::Int64)?;
            let (t, c) = match l.grouping {
                Grouping::Token => {
                    let per = d / g;
                    (
                        gi.f_div_scalar_mode(per, "floor")?
                            .f_expand([b, h, groups, no], false)?,
                        gi.f_remainder(per)?.f_mul_scalar(g)?.f_add(&p)?,
                    )
                }
                Grouping::Channel => (
                    gi.f_div_scalar_mode(d, "floor")?
                        .f_mul_scalar(g)?
                        .f_add(&p)?,
                    gi.f_remainder(d)?.f_expand([b, h, groups, no], false)?,
                ),
            };
            let bh = Tensor::f_arange(b * h, (Kind::Int64, device))?.f_view([b, h, 1, 1])?;
            let flat = bh
                .f_mul_scalar(q_total)?
                .f_add(&t.f_add_scalar(offset)?)?
                .f_mul_scalar(d)?
                .f_add(&c)?;
            Some((flat.f_reshape([-1])?, val.f_reshape([-1])?))
        }
        None => None,
    };
    Ok((codes, params, outliers))
}

fn token_major(ragged: Option<&RaggedTiles>, blocks: &[Block]) -> Result<TokenMajor> {
    let first = blocks
        .first()
        .map(|b| (b.keys.batch, b.keys.heads, b.keys.codes.device()));
    let (b, h, device) = match (ragged, first) {
        (Some(r), _) => (r.batch, r.heads, r.device()),
        (None, Some(f)) => f,
        (None, None) => return Err(KvError::State("internal: no quantized tokens".into())),
    };
    let (bi, hi) = (b as i64, h as i64);
    let q_total =
        ragged.map_or(0, |r| r.len) + blocks.iter().map(|bl| bl.keys.tokens).sum::<usize>();
    let qt = q_total as i64;
    let mut tile_parts = Vec::new();
    let mut pos_parts = Vec::new();
    let mut tile_base = 0i64;
    let mut parts: [Pieces; 2] = Default::default();
    let mut layouts = None;
    let mut offset = 0i64;
    if let Some(r) = ragged {
        let n = r.len as i64;
        tile_parts.push(r.tile_of_token(device)?.f_view([bi, hi, n])?);
        tile_base += r.tiles() as i64;
        if let Some(p) = &r.positions {
            pos_parts.push(p.shallow_clone());
        }
        for (k, part) in [&r.keys, &r.values].into_iter().enumerate() {
            let pieces = &mut parts[k];
            pieces.codes.push(part.codes.shallow_clone());
            pieces.params.push(part.params.shallow_clone());
            if let Some((idx, val)) = &part.outliers {
                // (row, token, channel) of a ragged row of n tokens → of q_total tokens.
                let d = part.layout.head_dim as i64;
                let idx = idx.f_to_kind(Kind::Int64)?;
                let bh = idx.f_div_scalar_mode(n * d, "floor")?;
                let rest = idx.f_remainder(n * d)?;
                pieces.idx.push(bh.f_mul_scalar(qt * d)?.f_add(&rest)?);
                pieces.val.push(val.shallow_clone());
            }
        }
        layouts = Some((r.keys.layout, r.values.layout));
        offset += n;
    }
    for block in blocks {
        let n = block.keys.tokens as i64;
        let g = block.keys.layout.group_size as i64;
        let tiles = n / g;
        let t = Tensor::f_arange(n, (Kind::Int64, device))?
            .f_div_scalar_mode(g, "floor")?
            .f_view([1, 1, n])?;
        let bh = Tensor::f_arange(bi * hi, (Kind::Int64, device))?.f_view([bi, hi, 1])?;
        tile_parts.push(bh.f_mul_scalar(tiles)?.f_add(&t)?.f_add_scalar(tile_base)?);
        tile_base += bi * hi * tiles;
        if let Some(p) = &block.positions {
            pos_parts.push(
                p.tensor(device)?
                    .f_expand([bi, hi, n], false)?
                    .f_contiguous()?,
            );
        }
        for (k, q) in [&block.keys, &block.values].into_iter().enumerate() {
            let (codes, params, outl) = block_part(q, offset, qt)?;
            parts[k].codes.push(codes);
            parts[k].params.push(params);
            if let Some((idx, val)) = outl {
                parts[k].idx.push(idx);
                parts[k].val.push(val);
            }
        }
        layouts = Some((block.keys.layout, block.values.layout));
        offset += n;
    }
    let (kl, vl) = layouts.ok_or_else(|| KvError::State("internal: no quantized tokens".into()))?;
    let mut built = Vec::new();
    for (k, layout) in [kl, vl].into_iter().enumerate() {
        let Pieces {
            codes,
            params,
            idx,
            val,
        } = &parts[k];
        let params_axis = match layout.grouping {
            Grouping::Token => 2,
            Grouping::Channel => 0,
        };
        built.push(PartTokens {
            layout,
            codes: Tensor::f_cat(codes, 2)?,
            params: Tensor::f_cat(params, params_axis)?,
            outliers: if idx.is_empty() {
                None
            } else {
                Some((Tensor::f_cat(idx, 0)?, Tensor::f_cat(val, 0)?))
            },
        });
    }
    let values = built
        .pop()
        .ok_or_else(|| KvError::State("internal".into()))?;
    let keys = built
        .pop()
        .ok_or_else(|| KvError::State("internal".into()))?;
    Ok(TokenMajor {
        q: q_total,
        keys,
        values,
        tile: Tensor::f_cat(&tile_parts, 2)?,
        positions: if pos_parts.is_empty() {
            None
        } else {
            Some(Tensor::f_cat(&pos_parts, 2)?)
        },
    })
}

/// The element codes and (scale, zero) of every quantized token of a store (ragged tiles,
/// then blocks) and their outliers: keys and values as
/// (codes u8 (b, h, q, d), params f16 (b, h, q, d, 2), outliers (flat int64, values)).
pub fn element_codes(ragged: Option<&RaggedTiles>, blocks: &[Block]) -> Result<Vec<PartPieces>> {
    let tm = token_major(ragged, blocks)?;
    let (b, h) = {
        let s = tm.tile.size();
        (s[0], s[1])
    };
    let q = tm.q as i64;
    let tiles = tm.tile.f_reshape([-1])?;
    let mut out = Vec::new();
    for part in [&tm.keys, &tm.values] {
        let l = part.layout;
        let (g, d) = (l.group_size as i64, l.head_dim as i64);
        let (codes, params) = match l.grouping {
            Grouping::Token => (
                unpack(
                    &part
                        .codes
                        .f_view([b, h, q, d / g, l.group_bytes() as i64])?,
                    l.bits,
                    g,
                )?
                .f_view([b, h, q, d])?,
                part.params.f_repeat_interleave_self_int(g, 3, None)?,
            ),
            Grouping::Channel => (
                unpack(&part.codes, l.bits, d)?,
                part.params
                    .f_index_select(0, &tiles)?
                    .f_view([b, h, q, d, 2])?,
            ),
        };
        let outliers = part
            .outliers
            .as_ref()
            .map(|(i, v)| -> Result<(Tensor, Tensor)> {
                let (sorted, order) = i.f_sort(0, false)?;
                Ok((sorted, v.f_index_select(0, &order)?))
            })
            .transpose()?;
        out.push((codes, params, outliers));
    }
    Ok(out)
}

/// The ragged tiles that keep, of every quantized token of a store (the current ragged
/// tiles, then `blocks`), those at `kept` — int64 (batch, heads, n), ascending per row,
/// indices into that quantized region. Codes, scales/zeros and outliers of kept tokens are
/// copied, never recomputed. `None` when n = 0.
pub fn retain(
    ragged: Option<&RaggedTiles>,
    blocks: &[Block],
    kept: &Tensor,
    kind: Kind,
) -> Result<Option<RaggedTiles>> {
    let size = kept.size();
    let (b, h, n) = (size[0], size[1], size[2]);
    if n == 0 {
        return Ok(None);
    }
    for part in blocks
        .first()
        .map(|bl| [bl.keys.layout, bl.values.layout])
        .into_iter()
        .flatten()
    {
        if part.grouping == Grouping::Channel && part.head_dim % 8 != 0 {
            return Err(KvError::Unsupported(format!(
                "evicting tokens from channel-grouped blocks needs a head_dim that is a multiple \
                 of 8 (each token's codes are re-packed as one group), got {}",
                part.head_dim
            )));
        }
    }
    let tm = token_major(ragged, blocks)?;
    for part in [&tm.keys, &tm.values] {
        if part.outliers.is_some() && b * h * n * part.layout.head_dim as i64 > i32::MAX as i64 {
            return Err(KvError::Unsupported(
                "evicting tokens of a quantized store with outliers: the kept tokens of one layer \
                 exceed 2^31 elements (outlier indices are int32)"
                    .into(),
            ));
        }
    }
    let device = tm.tile.device();
    let kept = kept.f_to(device)?;
    let q = tm.q as i64;
    let gather_tokens = |t: &Tensor| -> Result<Tensor> {
        let s = t.size();
        let mut shape = vec![b, h, n];
        shape.extend_from_slice(&s[3..]);
        let mut idx = kept.shallow_clone();
        for _ in 3..s.len() {
            idx = idx.f_unsqueeze(-1)?;
        }
        Ok(t.f_gather(2, &idx.f_expand(shape.as_slice(), false)?, false)?)
    };

    // Surviving tiles: runs of equal tile ids along each row (ids never repeat across rows).
    let kept_tiles = tm.tile.f_gather(2, &kept, false)?;
    let ids: Vec<i64> = Vec::<i64>::try_from(kept_tiles.f_reshape([-1])?.f_to(Device::Cpu)?)?;
    let mut tile_ids = Vec::new();
    let mut counts: Vec<u8> = Vec::new();
    let mut tile_rows = vec![0usize];
    for row in ids.chunks(n as usize) {
        let mut last = None;
        for &id in row {
            if last == Some(id) {
                *counts
                    .last_mut()
                    .ok_or_else(|| KvError::State("internal".into()))? += 1;
            } else {
                tile_ids.push(id);
                counts.push(1);
                last = Some(id);
            }
        }
        tile_rows.push(tile_ids.len());
    }
    let tiles = Tensor::f_from_slice(&tile_ids)?.f_to(device)?;

    // Where each old token went: -1 if evicted.
    let new_index = Tensor::f_full([b * h * q], -1i64, (Kind::Int64, device))?;
    let rows = Tensor::f_arange(b * h, (Kind::Int64, device))?.f_view([b, h, 1])?;
    let flat_kept = rows.f_mul_scalar(q)?.f_add(&kept)?.f_reshape([-1])?;
    let ranks = Tensor::f_arange(n, (Kind::Int64, device))?
        .f_view([1, 1, n])?
        .f_expand([b, h, n], false)?
        .f_reshape([-1])?;
    let new_index = new_index.f_index_put(&[Some(&flat_kept)], &ranks, false)?;

    let part = |p: &PartTokens| -> Result<RaggedPart> {
        let d = p.layout.head_dim as i64;
        let outliers = match &p.outliers {
            Some((idx, val)) => {
                let row = idx.f_div_scalar_mode(q * d, "floor")?;
                let t = idx.f_div_scalar_mode(d, "floor")?.f_remainder(q)?;
                let c = idx.f_remainder(d)?;
                let nt = new_index.f_index_select(0, &row.f_mul_scalar(q)?.f_add(&t)?)?;
                let keep = nt.f_ge(0)?.f_nonzero()?.f_view([-1])?;
                let new_flat = row
                    .f_mul_scalar(n)?
                    .f_add(&nt)?
                    .f_mul_scalar(d)?
                    .f_add(&c)?
                    .f_index_select(0, &keep)?;
                let (sorted, order) = new_flat.f_sort(0, false)?;
                Some((
                    sorted.f_to_kind(Kind::Int)?,
                    val.f_index_select(0, &keep)?.f_index_select(0, &order)?,
                ))
            }
            None => None,
        };
        Ok(RaggedPart {
            layout: p.layout,
            codes: gather_tokens(&p.codes)?.f_contiguous()?,
            params: match p.layout.grouping {
                Grouping::Token => gather_tokens(&p.params)?.f_contiguous()?,
                Grouping::Channel => p.params.f_index_select(0, &tiles)?,
            },
            outliers,
        })
    };
    Ok(Some(RaggedTiles {
        len: n as usize,
        batch: b as usize,
        heads: h as usize,
        kind,
        keys: part(&tm.keys)?,
        values: part(&tm.values)?,
        tile_rows,
        counts,
        positions: tm
            .positions
            .as_ref()
            .map(|p| -> Result<Tensor> { Ok(p.f_gather(2, &kept, false)?.f_contiguous()?) })
            .transpose()?,
    }))
}
