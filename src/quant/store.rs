//! [`QuantizedStore`]: one layer's quantized KV cache.
//!
//! The tokens of every (batch, head) row, in order:
//!
//! ```text
//! [ sinks: first `sink_tokens`, full precision ][ blocks: quantized, append-only ][ residual: full precision, < window_tokens ]
//! ```
//!
//! New tokens fill the sinks first, then the residual window. When the window holds
//! `window_tokens` (`max(residual_length, group_size)`) tokens, its oldest `block_tokens`
//! (by default all of them) are quantized into a new block, until it holds fewer; a long
//! prompt is quantized straight from the input in one block. Blocks are never
//! re-quantized or moved (no compounding error, no O(T) flush). Keys and values share the
//! token layout; each has its own [`TensorLayout`] (grouping, head_dim).
//!
//! `nbytes` counts what is allocated: the sinks (at `sink_tokens`), the residual window at
//! exactly the tokens it holds (it is reallocated as it grows and when it is flushed or
//! cropped, so a flush frees bytes rather than leaving a slot), and every block's codes,
//! scales/zeros and outliers.
//!
//! Pre-RoPE keys (`pre_rope_keys`, KVQuant): keys arrive rotated; before a block is
//! quantized its keys are rotated back by their positions ([`Rope::invert`], exact), so the
//! codes hold pre-RoPE keys, whose channels keep their outlier structure. Every block and
//! the residual window remember each token's position (int32, counted in `nbytes`), and
//! attention re-applies s·R(p) to each dequantized tile ([`AngleTable`]). Positions are
//! given by the caller (`append_at`: kept positions after eviction, chunk offsets) or run
//! on from the tokens seen.

use super::attention::{self, AttendInputs};
use super::config::QuantConfig;
use super::layout::TensorLayout;
use super::qtensor::QuantizedTensor;
use super::ragged::{self, RaggedTiles};
use crate::error::{KvError, Result};
use crate::rope::table::{self, AngleTable, SharedAngleTable};
use crate::rope::Rope;
use crate::tensor::{check_finite, check_kv_pair, device_name, kind_name, KvShape, TOKEN_AXIS};
use std::sync::RwLockReadGuard;
use tch::{Device, Kind, Tensor};

/// The fixed shape of a store, set by its first append.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StoreShape {
    pub batch: usize,
    pub heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub kind: Kind,
    pub device: Device,
}

/// One quantized block: keys and values of the same tokens.
#[derive(Debug)]
pub struct Block {
    pub keys: QuantizedTensor,
    pub values: QuantizedTensor,
    /// With pre-RoPE keys: each token's position.
    pub positions: Option<BlockPositions>,
}

/// The positions of a pre-RoPE block's tokens.
#[derive(Debug)]
pub enum BlockPositions {
    /// `start, start + 1, …` in every row: no bytes per token. The usual case (blocks leave
    /// the residual window in order), where 4 bytes per token would add 20% to the codes
    /// of a 2-bit key.
    Run { start: i64, len: usize },
    /// int32 (batch, heads, tokens), or (1, 1, tokens) when every row has the same.
    Stored(Tensor),
}

impl BlockPositions {
    /// The compact form of int32 positions (batch, heads, n) or (1, 1, n).
    pub fn from_tensor(p: &Tensor) -> Result<Self> {
        let p = one_row_if_shared(p)?;
        let n = p.size()[2];
        if p.size()[..2] == [1, 1] && n > 0 {
            let start = p.f_min()?.f_int64_value(&[])?;
            let run = Tensor::f_arange_start(start, start + n, (Kind::Int, p.device()))?;
            if p.f_view([n])?
                .f_eq_tensor(&run)?
                .f_all()?
                .f_int64_value(&[])?
                == 1
            {
                return Ok(BlockPositions::Run {
                    start,
                    len: n as usize,
                });
            }
        }
        Ok(BlockPositions::Stored(p))
    }

    /// The positions as int32 (1, 1, tokens) or (batch, heads, tokens).
    pub fn tensor(&self, device: Device) -> Result<Tensor> {
        Ok(match self {
            BlockPositions::Run { start, len } => {
                let n = *len as i64;
                Tensor::f_arange_start(*start, start + n, (Kind::Int, device))?.f_view([1, 1, n])?
            }
            BlockPositions::Stored(p) => p.shallow_clone(),
        })
    }

    /// One past the largest position (0 when empty).
    pub fn end(&self) -> Result<usize> {
        Ok(match self {
            BlockPositions::Run { start, len } => *start as usize + len,
            BlockPositions::Stored(p) if p.numel() > 0 => {
                p.f_max()?.f_int64_value(&[])? as usize + 1
            }
            BlockPositions::Stored(_) => 0,
        })
    }

    /// The same positions moved by `d`.
    pub fn shifted(&self, d: i64) -> Result<Self> {
        Ok(match self {
            BlockPositions::Run { start, len } => BlockPositions::Run {
                start: start + d,
                len: *len,
            },
            BlockPositions::Stored(p) => {
                BlockPositions::Stored(p.f_add_scalar(d)?.f_to_kind(Kind::Int)?.f_contiguous()?)
            }
        })
    }

    pub fn nbytes(&self) -> usize {
        match self {
            BlockPositions::Run { .. } => 0,
            BlockPositions::Stored(p) => tensor_bytes(p),
        }
    }

    /// A batch operation: positions shared by every row stay as they are.
    fn map_rows(&self, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(match self {
            BlockPositions::Run { start, len } => BlockPositions::Run {
                start: *start,
                len: *len,
            },
            BlockPositions::Stored(p) => BlockPositions::Stored(map_rows(p, f)?),
        })
    }
}

/// Full-precision tokens: (batch, heads, capacity, dim) keys and values, of which the first
/// `len` are held. The sinks are allocated at their final length; the residual window is
/// kept at exactly the tokens it holds ([`extend`](Self::extend), [`truncate`](Self::truncate)),
/// so that its bytes are what it holds, as a `DynamicCache`'s are.
#[derive(Debug)]
pub struct FullPrecision {
    pub keys: Tensor,
    pub values: Tensor,
    /// With pre-RoPE keys (residual window only): int32 (batch, heads, capacity).
    pub positions: Option<Tensor>,
    pub len: usize,
}

impl FullPrecision {
    fn new(shape: &StoreShape, capacity: usize, with_positions: bool) -> Result<Self> {
        let options = (shape.kind, shape.device);
        let (b, h, c) = (shape.batch as i64, shape.heads as i64, capacity as i64);
        let positions = if with_positions {
            Some(Tensor::f_zeros([b, h, c], (Kind::Int, shape.device))?)
        } else {
            None
        };
        Ok(FullPrecision {
            keys: Tensor::f_zeros([b, h, c, shape.key_dim as i64], options)?,
            values: Tensor::f_zeros([b, h, c, shape.value_dim as i64], options)?,
            positions,
            len: 0,
        })
    }

    fn write_positions_at(&mut self, at: usize, positions: &Tensor) -> Result<()> {
        if let Some(p) = &mut self.positions {
            let q = positions.size()[2];
            p.f_narrow(2, at as i64, q)?.f_copy_(positions)?;
        }
        Ok(())
    }

    /// Positions of the valid tokens (a view), with pre-RoPE keys.
    pub fn positions_view(&self) -> Result<Option<Tensor>> {
        Ok(match &self.positions {
            Some(p) => Some(p.f_narrow(2, 0, self.len as i64)?),
            None => None,
        })
    }

    pub fn capacity(&self) -> usize {
        self.keys.size()[TOKEN_AXIS as usize] as usize
    }

    fn write(&mut self, keys: &Tensor, values: &Tensor) -> Result<()> {
        let q = keys.size()[TOKEN_AXIS as usize];
        self.keys
            .f_narrow(TOKEN_AXIS, self.len as i64, q)?
            .f_copy_(keys)?;
        self.values
            .f_narrow(TOKEN_AXIS, self.len as i64, q)?
            .f_copy_(values)?;
        self.len += q as usize;
        Ok(())
    }

    /// Appends tokens (and their positions, if kept), reallocating to exactly `len + q`
    /// tokens: one concatenation, as `DynamicCache` does per step.
    fn extend(&mut self, keys: &Tensor, values: &Tensor, positions: Option<&Tensor>) -> Result<()> {
        let q = keys.size()[TOKEN_AXIS as usize] as usize;
        let n = self.len as i64;
        self.keys = Tensor::f_cat(&[&self.keys.f_narrow(TOKEN_AXIS, 0, n)?, keys], TOKEN_AXIS)?;
        self.values = Tensor::f_cat(
            &[&self.values.f_narrow(TOKEN_AXIS, 0, n)?, values],
            TOKEN_AXIS,
        )?;
        if let (Some(p), Some(new)) = (&mut self.positions, positions) {
            *p = Tensor::f_cat(&[&p.f_narrow(2, 0, n)?, new], 2)?;
        }
        self.len += q;
        Ok(())
    }

    /// Keeps the first `len` tokens, reallocated to exactly those (the bytes of the rest
    /// are freed).
    fn truncate(&mut self, len: usize) -> Result<()> {
        let keep = |t: &Tensor, axis: i64| own(&t.f_narrow(axis, 0, len as i64)?);
        self.keys = keep(&self.keys, TOKEN_AXIS)?;
        self.values = keep(&self.values, TOKEN_AXIS)?;
        if let Some(p) = &mut self.positions {
            *p = keep(p, 2)?;
        }
        self.len = len;
        Ok(())
    }

    /// The valid keys and values (views).
    pub fn view(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.keys.f_narrow(TOKEN_AXIS, 0, self.len as i64)?,
            self.values.f_narrow(TOKEN_AXIS, 0, self.len as i64)?,
        ))
    }

    fn nbytes(&self) -> usize {
        tensor_bytes(&self.keys)
            + tensor_bytes(&self.values)
            + self.positions.as_ref().map_or(0, tensor_bytes)
    }

    fn map_batch(&self, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(FullPrecision {
            keys: f(&self.keys)?,
            values: f(&self.values)?,
            positions: self.positions.as_ref().map(f).transpose()?,
            len: self.len,
        })
    }
}

/// A contiguous copy of `t` in memory of its own (a narrowed view would keep the whole
/// tensor it views alive).
fn own(t: &Tensor) -> Result<Tensor> {
    let mut out = Tensor::f_empty(t.size(), (t.kind(), t.device()))?;
    out.f_copy_(t)?;
    Ok(out)
}

/// One layer's quantized KV cache. See the module documentation.
#[derive(Debug)]
pub struct QuantizedStore {
    config: QuantConfig,
    shape: Option<StoreShape>,
    layouts: Option<(TensorLayout, TensorLayout)>,
    sinks: Option<FullPrecision>,
    /// The quantized tokens kept by evictions (decoding-time compression), between the
    /// sinks and the blocks: every row keeps the same count, not the same tokens.
    ragged: Option<RaggedTiles>,
    blocks: Vec<Block>,
    residual: Option<FullPrecision>,
    /// Tokens stored (appended and not evicted nor cropped).
    seen: usize,
    /// Tokens evicted (or skipped by re-rotation): the default position of the next
    /// appended token is `seen + evicted`.
    evicted: usize,
    /// With pre-RoPE keys: the model's RoPE and its cos/sin tables.
    pre_rope: Option<PreRope>,
}

/// What pre-RoPE keys need: the RoPE, and the cos/sin table attention reads — this
/// store's own, or one shared by the stores of every layer of a cache (which counts its
/// bytes once: per layer it would cost as much as 10% of a 2-bit cache at 2k tokens).
#[derive(Debug, Clone)]
struct PreRope {
    rope: Rope,
    table: SharedAngleTable,
    shared: bool,
}

impl QuantizedStore {
    /// A new, empty store without RoPE: `pre_rope_keys` is refused (it needs the model's
    /// RoPE, see [`with_rope`](Self::with_rope)).
    pub fn new(config: QuantConfig) -> Result<Self> {
        Self::with_rope(config, None)
    }

    /// A new, empty store. `rope` is the model's RoPE, required by `pre_rope_keys` (and
    /// ignored without it).
    pub fn with_rope(config: QuantConfig, rope: Option<&Rope>) -> Result<Self> {
        Self::with_rope_table(config, rope, None)
    }

    /// A new, empty store whose pre-RoPE keys use `table` (shared with other stores; built
    /// from the same RoPE) instead of a table of its own. Its bytes are not in
    /// [`nbytes`](Self::nbytes): whoever shares it counts them once.
    pub fn with_rope_table(
        config: QuantConfig,
        rope: Option<&Rope>,
        table: Option<SharedAngleTable>,
    ) -> Result<Self> {
        let config = config.validated()?;
        let pre_rope = if config.pre_rope_keys {
            let rope = rope.ok_or_else(|| {
                KvError::invalid(
                    "pre_rope_keys",
                    "True needs the model's RoPE to rotate keys back before quantizing and \
                     again when reading them: build the cache from the model (not a config)",
                )
            })?;
            let shared = table.is_some();
            let table = match table {
                Some(t) => t,
                None => table::shared(rope)?,
            };
            Some(PreRope {
                rope: rope.clone(),
                table,
                shared,
            })
        } else {
            None
        };
        Ok(QuantizedStore {
            config,
            shape: None,
            layouts: None,
            sinks: None,
            ragged: None,
            blocks: Vec::new(),
            residual: None,
            seen: 0,
            evicted: 0,
            pre_rope,
        })
    }

    /// A store made of given pieces (validated by [`crate::quant::parts`]): `front`
    /// full-precision keys/values (batch, heads, n, dim), already rotated at their final
    /// positions, held in the sinks region; then `blocks` (pre-RoPE keys, positions given);
    /// an empty residual window that takes the tokens appended next. It has seen every
    /// token it holds. Attention ignores the order of stored tokens except for the causal
    /// mask among the last `q_len`, which are always the newest (appended at the end).
    pub(crate) fn from_pieces(
        config: QuantConfig,
        rope: &Rope,
        shape: StoreShape,
        front: Option<(Tensor, Tensor)>,
        blocks: Vec<Block>,
    ) -> Result<Self> {
        let mut store = Self::with_rope(config, Some(rope))?;
        let layouts = (
            TensorLayout::new(&store.config, store.config.key_grouping, shape.key_dim),
            TensorLayout::new(&store.config, store.config.value_grouping, shape.value_dim),
        );
        let mut seen = 0usize;
        if let Some((k, v)) = front {
            let n = k.size()[TOKEN_AXIS as usize] as usize;
            if n > 0 {
                let mut sinks = FullPrecision::new(&shape, n, false)?;
                sinks.write(&k, &v)?;
                store.sinks = Some(sinks);
                seen += n;
            }
        }
        let mut end = 0usize;
        for block in &blocks {
            seen += block.keys.tokens();
            if let Some(p) = &block.positions {
                end = end.max(p.end()?);
            }
        }
        if let Some(pre) = &store.pre_rope {
            table::write(&pre.table).cover(end);
        }
        store.blocks = blocks;
        store.shape = Some(shape);
        store.layouts = Some(layouts);
        store.seen = seen;
        Ok(store)
    }

    /// An empty store with this one's config and RoPE (a shared table stays shared).
    pub fn emptied(&self) -> Self {
        QuantizedStore {
            config: self.config,
            shape: None,
            layouts: None,
            sinks: None,
            ragged: None,
            blocks: Vec::new(),
            residual: None,
            seen: 0,
            evicted: 0,
            pre_rope: self.pre_rope.clone(),
        }
    }

    /// The cos/sin table attention re-applies RoPE with, when keys are stored pre-RoPE
    /// (read-locked while the guard lives).
    pub fn angle_table(&self) -> Option<RwLockReadGuard<'_, AngleTable>> {
        self.pre_rope.as_ref().map(|pre| table::read(&pre.table))
    }

    pub fn config(&self) -> &QuantConfig {
        &self.config
    }

    /// Whether attention scores quantized keys in the Hadamard basis (against the rotated
    /// query). Pre-RoPE keys are not: RoPE acts in the plain basis, so each dequantized key
    /// tile is rotated back first.
    pub fn scores_keys_in_hadamard_basis(&self) -> bool {
        self.config.hadamard && !self.config.pre_rope_keys
    }

    /// Tokens stored since the last reset (appended, minus those evicted by
    /// [`retain`](Self::retain) or cropped).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Tokens evicted since the last reset (0 without decoding-time compression).
    pub fn evicted(&self) -> usize {
        self.evicted
    }

    /// The quantized tokens kept by evictions, if any.
    pub fn ragged(&self) -> Option<&RaggedTiles> {
        self.ragged.as_ref()
    }

    pub fn shape(&self) -> Option<StoreShape> {
        self.shape
    }

    /// (keys, values) layouts, fixed at the first append.
    pub fn layouts(&self) -> Option<(TensorLayout, TensorLayout)> {
        self.layouts
    }

    pub fn sinks(&self) -> Option<&FullPrecision> {
        self.sinks.as_ref()
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    pub fn residual(&self) -> Option<&FullPrecision> {
        self.residual.as_ref()
    }

    /// Tokens held in full precision as attention sinks.
    pub fn sink_len(&self) -> usize {
        self.sinks.as_ref().map_or(0, |s| s.len)
    }

    /// Tokens held quantized (kept by evictions, and in blocks).
    pub fn quantized_len(&self) -> usize {
        self.ragged.as_ref().map_or(0, |r| r.len)
            + self.blocks.iter().map(|b| b.keys.tokens()).sum::<usize>()
    }

    /// Tokens in the full-precision residual window.
    pub fn residual_len(&self) -> usize {
        self.residual.as_ref().map_or(0, |r| r.len)
    }

    /// Bytes allocated: sinks, the tokens of the residual window, the tokens kept by
    /// evictions ([`RaggedTiles::nbytes`]), every block, and with pre-RoPE keys the
    /// positions and the cos/sin table.
    pub fn nbytes(&self) -> usize {
        self.sinks.as_ref().map_or(0, FullPrecision::nbytes)
            + self.ragged.as_ref().map_or(0, RaggedTiles::nbytes)
            + self.residual.as_ref().map_or(0, FullPrecision::nbytes)
            + self
                .blocks
                .iter()
                .map(|b| {
                    b.keys.nbytes()
                        + b.values.nbytes()
                        + b.positions.as_ref().map_or(0, BlockPositions::nbytes)
                })
                .sum::<usize>()
            + self
                .pre_rope
                .as_ref()
                .filter(|pre| !pre.shared)
                .map_or(0, |pre| table::read(&pre.table).nbytes())
    }

    /// Appends keys/values (batch, kv_heads, q, head_dim) at the positions that follow
    /// the tokens seen. Every value must be finite (`NonFinite` otherwise). On any error
    /// the store is unchanged.
    pub fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<()> {
        self.append_at(keys, values, None)
    }

    /// [`append`](Self::append) with each token's position given: an integer tensor of
    /// shape (q,) or (batch, kv_heads, q), positions ≥ 0 (what the keys were rotated at).
    /// Only pre-RoPE keys use positions; without them the argument is checked and ignored.
    pub fn append_at(
        &mut self,
        keys: &Tensor,
        values: &Tensor,
        positions: Option<&Tensor>,
    ) -> Result<()> {
        let (ks, vs) = check_kv_pair(keys, values)?;
        if ks.tokens == 0 {
            return Err(KvError::empty(
                "keys",
                "an update must carry at least one token",
            ));
        }
        let shape = match self.shape {
            Some(shape) => {
                check_same_shape(&shape, ks, vs.head_dim, keys.kind(), keys.device())?;
                shape
            }
            None => {
                self.config
                    .check_head_dim(ks.head_dim, self.config.key_grouping, "keys")?;
                self.config
                    .check_head_dim(vs.head_dim, self.config.value_grouping, "values")?;
                StoreShape {
                    batch: ks.batch,
                    heads: ks.heads,
                    key_dim: ks.head_dim,
                    value_dim: vs.head_dim,
                    kind: keys.kind(),
                    device: keys.device(),
                }
            }
        };
        check_finite(keys, "keys")?;
        check_finite(values, "values")?;
        let positions = self.token_positions(positions, ks, keys.device())?;
        let layouts = self.layouts.unwrap_or((
            TensorLayout::new(&self.config, self.config.key_grouping, shape.key_dim),
            TensorLayout::new(&self.config, self.config.value_grouping, shape.value_dim),
        ));

        // Plan: sinks take the first tokens; the rest joins the residual window. While the
        // window would hold `window` tokens or more, its oldest `block` are quantized.
        // Quantize first (the only step that can fail on valid input), commit after.
        let q = ks.tokens;
        let (window, block) = (self.config.window_tokens(), self.config.block_tokens());
        let to_sinks = self
            .config
            .sink_tokens
            .saturating_sub(self.sink_len())
            .min(q);
        let residual_len = self.residual_len();
        let pending = residual_len + (q - to_sinks);
        let flushed = if pending >= window {
            ((pending - window) / block + 1) * block
        } else {
            0
        };
        let span = |t: &Tensor, axis: i64, from: usize, n: usize| -> Result<Tensor> {
            Ok(t.f_narrow(axis, from as i64, n as i64)?)
        };
        let fresh = |t: &Tensor, axis: i64| span(t, axis, to_sinks, q - to_sinks);
        // The tokens after the sinks, oldest first: the window's, then the new ones (a copy
        // only when a flush takes tokens from the window).
        let (new_k, new_v) = (fresh(keys, TOKEN_AXIS)?, fresh(values, TOKEN_AXIS)?);
        let new_p = match &positions {
            Some(p) => Some(fresh(p, 2)?.f_expand(
                [
                    shape.batch as i64,
                    shape.heads as i64,
                    (q - to_sinks) as i64,
                ],
                false,
            )?),
            None => None,
        };
        let (waiting, keep_window) = if flushed > 0 && residual_len > 0 {
            let window_now = self.residual.as_ref().ok_or_else(internal)?;
            let (old_k, old_v) = window_now.view()?;
            let p = match (&new_p, window_now.positions_view()?) {
                (Some(new), Some(old)) => Some(Tensor::f_cat(&[&old, new], 2)?),
                _ => None,
            };
            let k = Tensor::f_cat(&[&old_k, &new_k], TOKEN_AXIS)?;
            let v = Tensor::f_cat(&[&old_v, &new_v], TOKEN_AXIS)?;
            ((k, v, p), false)
        } else {
            ((new_k, new_v, new_p), true)
        };
        let mut new_block = None;
        if flushed > 0 {
            let (k, v, p) = &waiting;
            let p = p.as_ref().map(|p| span(p, 2, 0, flushed)).transpose()?;
            new_block = Some(self.quantize_block(
                &span(k, TOKEN_AXIS, 0, flushed)?,
                &span(v, TOKEN_AXIS, 0, flushed)?,
                p,
                layouts,
            )?);
        }

        // Commit.
        if to_sinks > 0 {
            if self.sinks.is_none() {
                self.sinks = Some(FullPrecision::new(&shape, self.config.sink_tokens, false)?);
            }
            let sinks = self.sinks.as_mut().ok_or_else(internal)?;
            sinks.write(
                &keys.f_narrow(TOKEN_AXIS, 0, to_sinks as i64)?,
                &values.f_narrow(TOKEN_AXIS, 0, to_sinks as i64)?,
            )?;
        }
        self.blocks.extend(new_block);
        // What stays in full precision: the window's tokens (unless the flush took them,
        // then the window is rebuilt from `waiting`) and the new tokens not flushed.
        let (k, v, p) = &waiting;
        let rest = k.size()[TOKEN_AXIS as usize] as usize - flushed;
        if !keep_window {
            self.residual = None;
        }
        if rest > 0 {
            let (k, v) = (
                span(k, TOKEN_AXIS, flushed, rest)?,
                span(v, TOKEN_AXIS, flushed, rest)?,
            );
            let p = p.as_ref().map(|p| span(p, 2, flushed, rest)).transpose()?;
            match &mut self.residual {
                Some(residual) => residual.extend(&k, &v, p.as_ref())?,
                None => {
                    self.residual = Some(FullPrecision {
                        keys: own(&k)?,
                        values: own(&v)?,
                        positions: p.as_ref().map(own).transpose()?,
                        len: rest,
                    })
                }
            }
        }
        if let (Some(pre), Some(p)) = (&self.pre_rope, &positions) {
            table::write(&pre.table).cover(p.f_max()?.f_int64_value(&[])? as usize + 1);
        }
        self.shape = Some(shape);
        self.layouts = Some(layouts);
        self.seen += q;
        Ok(())
    }

    /// With pre-RoPE keys, the int32 (batch, heads, q) positions of the tokens of an
    /// append: the given ones, or those after the tokens seen. None otherwise.
    fn token_positions(
        &self,
        given: Option<&Tensor>,
        ks: KvShape,
        device: Device,
    ) -> Result<Option<Tensor>> {
        let (b, h, q) = (ks.batch as i64, ks.heads as i64, ks.tokens as i64);
        if let Some(p) = given {
            crate::rope::positions::check_integer(p, "positions")?;
            let size = p.size();
            if !(size == [q] || size == [b, h, q]) {
                return Err(KvError::shape(
                    "positions",
                    &size,
                    format!("({q},) or ({b}, {h}, {q}): one position per appended token"),
                ));
            }
            if p.numel() > 0 && p.f_min()?.f_int64_value(&[])? < 0 {
                return Err(KvError::invalid("positions", "expected positions >= 0"));
            }
        }
        if self.pre_rope.is_none() {
            return Ok(None);
        }
        let p = match given {
            Some(p) => p.f_to_device(device)?.f_to_kind(Kind::Int)?,
            None => {
                let next = (self.seen + self.evicted) as i64;
                Tensor::f_arange_start(next, next + q, (Kind::Int, device))?
            }
        };
        // Positions shared by every row stay one row: 4 bytes per token, not per head.
        Ok(Some(match p.dim() {
            1 => p.f_view([1, 1, q])?,
            _ => p.f_contiguous()?,
        }))
    }

    fn quantize_block(
        &self,
        keys: &Tensor,
        values: &Tensor,
        positions: Option<Tensor>,
        layouts: (TensorLayout, TensorLayout),
    ) -> Result<Block> {
        let keys = match (&self.pre_rope, &positions) {
            (Some(pre), Some(p)) => pre.rope.invert(keys, &p.f_to_kind(Kind::Int64)?, None)?,
            _ => keys.shallow_clone(),
        };
        Ok(Block {
            keys: QuantizedTensor::quantize(&keys, layouts.0, "keys")?,
            values: QuantizedTensor::quantize(values, layouts.1, "values")?,
            positions: positions
                .map(|p| BlockPositions::from_tensor(&p))
                .transpose()?,
        })
    }

    /// A block's keys dequantized (in the cache dtype), with RoPE re-applied when they are
    /// stored pre-RoPE.
    pub fn block_keys(&self, block: &Block) -> Result<Tensor> {
        self.rotate_block_keys(&block.keys.dequantize()?, block)
    }

    /// `keys` (a block's dequantized keys, any float dtype) with RoPE re-applied at the
    /// block's positions when keys are stored pre-RoPE; unchanged otherwise.
    pub fn rotate_block_keys(&self, keys: &Tensor, block: &Block) -> Result<Tensor> {
        match (&self.pre_rope, &block.positions) {
            (Some(pre), Some(p)) => pre.rope.apply(
                keys,
                &p.tensor(keys.device())?.f_to_kind(Kind::Int64)?,
                None,
            ),
            _ => Ok(keys.shallow_clone()),
        }
    }

    /// Attention of `query` (batch, q_heads, q_len, key head_dim) over every stored token,
    /// reading the quantized blocks in place: (batch, q_len, q_heads, value head_dim) in the
    /// query's dtype. Query head `h` reads KV head `h / (q_heads / kv_heads)`.
    ///
    /// `mask`, if given, is a bool (batch or 1, q_len, stored) tensor of the key positions
    /// each query may attend to; without one, the last `q_len` stored tokens are the
    /// queries' own and are causal among themselves. `scaling` multiplies the scores.
    pub fn attend(&self, query: &Tensor, mask: Option<&Tensor>, scaling: f64) -> Result<Tensor> {
        let shape = self.shape.ok_or_else(empty_store)?;
        let inputs = AttendInputs::new(self, &shape, query, mask, scaling)?;
        let (out, _) = attention::attend(self, &inputs)?;
        Ok(out.f_to_kind(query.kind())?)
    }

    /// [`attend`](Self::attend) in f32, with the log-sum-exp of every query row's scores
    /// (batch, q_len, q_heads; −inf for a row that sees nothing): attention over several
    /// stores merges these ([`attend_union`](super::union::attend_union)).
    pub fn attend_with_lse(
        &self,
        query: &Tensor,
        mask: Option<&Tensor>,
        scaling: f64,
    ) -> Result<(Tensor, Tensor)> {
        let shape = self.shape.ok_or_else(empty_store)?;
        let inputs = AttendInputs::new(self, &shape, query, mask, scaling)?;
        attention::attend(self, &inputs)
    }

    /// Every stored token, dequantized: keys and values (batch, kv_heads, seen, head_dim)
    /// in the cache dtype (new tensors; for inspection and for attention paths that need
    /// full tensors).
    pub fn dequantize(&self) -> Result<(Tensor, Tensor)> {
        if self.shape.is_none() {
            return Err(empty_store());
        }
        let mut keys = Vec::new();
        let mut values = Vec::new();
        if let Some(s) = &self.sinks {
            let (k, v) = s.view()?;
            keys.push(k);
            values.push(v);
        }
        if let Some(r) = &self.ragged {
            let (k, v) = self.ragged_keys_values(r, true)?;
            let kind = self.shape.ok_or_else(empty_store)?.kind;
            keys.push(self.rotate_ragged_keys(&k.f_to_kind(kind)?, r)?);
            values.push(v.f_to_kind(kind)?);
        }
        for b in &self.blocks {
            keys.push(self.block_keys(b)?);
            values.push(b.values.dequantize()?);
        }
        if let Some(r) = &self.residual {
            let (k, v) = r.view()?;
            keys.push(k);
            values.push(v);
        }
        Ok((
            Tensor::f_cat(&keys, TOKEN_AXIS)?,
            Tensor::f_cat(&values, TOKEN_AXIS)?,
        ))
    }

    /// Forgets the last `n` tokens. Only full-precision tokens can be removed: those of the
    /// residual window, and the sinks while no block exists.
    pub fn crop(&mut self, n: usize) -> Result<()> {
        if n == 0 || self.shape.is_none() {
            return Ok(());
        }
        if n > self.seen {
            return Err(KvError::invalid(
                "tokens_to_remove",
                format!("{n} exceeds the {} tokens seen", self.seen),
            ));
        }
        let residual = self.residual_len();
        let croppable = if self.blocks.is_empty() && self.ragged.is_none() {
            residual + self.sink_len()
        } else {
            residual
        };
        if n > croppable {
            return Err(KvError::State(format!(
                "cannot crop {n} tokens: only the last {croppable} are in full precision; \
                 quantized blocks are never rewritten"
            )));
        }
        let from_residual = n.min(residual);
        if from_residual == residual {
            self.residual = None;
        } else if let Some(r) = &mut self.residual {
            r.truncate(residual - from_residual)?;
        }
        if let Some(s) = &mut self.sinks {
            s.len -= n - from_residual;
        }
        self.seen -= n;
        Ok(())
    }

    /// Selects (and reorders) batch rows: beam search and batch selection. `indices` is a
    /// non-empty int64 vector of rows in [0, batch).
    pub fn index_batch(&mut self, indices: &Tensor) -> Result<()> {
        let Some(shape) = self.shape else {
            return Ok(());
        };
        crate::store::check_batch_indices(indices, shape.batch)?;
        self.map_batch(&|t: &Tensor| Ok(t.f_index_select(0, &indices.f_to(t.device())?)?))
    }

    /// Repeats every batch row `repeats` times (row i becomes rows i·r..(i+1)·r).
    pub fn repeat_interleave_batch(&mut self, repeats: i64) -> Result<()> {
        if repeats < 1 {
            return Err(KvError::invalid(
                "repeats",
                format!("got {repeats}, expected >= 1"),
            ));
        }
        self.map_batch(&|t: &Tensor| Ok(t.f_repeat_interleave_self_int(repeats, 0, None)?))
    }

    fn map_batch(&mut self, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        let Some(mut shape) = self.shape else {
            return Ok(());
        };
        let sources: Vec<i64> = Vec::<i64>::try_from(
            f(&Tensor::f_arange(
                shape.batch as i64,
                (Kind::Int64, shape.device),
            )?)?
            .f_to(Device::Cpu)?,
        )?;
        let ragged = match &self.ragged {
            Some(r) => {
                Some(r.select_batch(&sources.iter().map(|&s| s as usize).collect::<Vec<_>>())?)
            }
            None => None,
        };
        let sinks = self.sinks.as_ref().map(|s| s.map_batch(f)).transpose()?;
        let residual = self.residual.as_ref().map(|r| r.map_batch(f)).transpose()?;
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    keys: b.keys.map_batch(f)?,
                    values: b.values.map_batch(f)?,
                    positions: b.positions.as_ref().map(|p| p.map_rows(f)).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let probe = f(&Tensor::f_zeros(
            [shape.batch as i64, 1],
            (Kind::Uint8, shape.device),
        )?)?;
        shape.batch = probe.size()[0] as usize;
        self.sinks = sinks;
        self.ragged = ragged;
        self.residual = residual;
        self.blocks = blocks;
        self.shape = Some(shape);
        Ok(())
    }

    /// Drops everything: the store is as new (same configuration).
    pub fn reset(&mut self) {
        self.shape = None;
        self.layouts = None;
        self.sinks = None;
        self.ragged = None;
        self.blocks.clear();
        self.residual = None;
        self.seen = 0;
        self.evicted = 0;
    }

    /// The ragged tiles' keys and values as f32 (batch, heads, len, head_dim), keys before
    /// RoPE when stored pre-RoPE; rotated back from the Hadamard basis when `unrotate`.
    pub fn ragged_keys_values(&self, r: &RaggedTiles, unrotate: bool) -> Result<(Tensor, Tensor)> {
        let mut k = r.dequantize_f32(&r.keys)?;
        let mut v = r.dequantize_f32(&r.values)?;
        if self.config.hadamard && unrotate {
            k = super::hadamard::fwht_tensor(&k)?;
            v = super::hadamard::fwht_tensor(&v)?;
        }
        Ok((k, v))
    }

    /// `keys` (the ragged tiles' dequantized keys) with RoPE re-applied at their positions
    /// when keys are stored pre-RoPE; unchanged otherwise.
    pub fn rotate_ragged_keys(&self, keys: &Tensor, r: &RaggedTiles) -> Result<Tensor> {
        match (&self.pre_rope, &r.positions) {
            (Some(pre), Some(p)) => pre.rope.apply(keys, &p.f_to_kind(Kind::Int64)?, None),
            _ => Ok(keys.shallow_clone()),
        }
    }

    /// Keeps the stored tokens at `kept` and frees the others (decoding-time compression).
    /// `kept`: int64 (batch, heads, n), strictly ascending per row, indices into the stored
    /// tokens in storage order (sinks, tokens kept by earlier evictions, blocks, residual
    /// window). Every row keeps the same count, not the same tokens. The full-precision
    /// sinks and residual window must be kept whole (they are few, and every row then
    /// holds them at the same place); of the quantized tokens, the kept ones keep their
    /// exact codes, scales/zeros, outliers and positions ([`ragged::retain`]): nothing is
    /// re-quantized. On any error the store is unchanged.
    pub fn retain(&mut self, kept: &Tensor) -> Result<()> {
        let shape = self.shape.ok_or_else(empty_store)?;
        let stored = self.seen;
        let size = kept.size();
        let kind = crate::tensor::kind_of(kept, "kept")?;
        if kind != Kind::Int64 {
            return Err(KvError::dtype("kept", kind_name(kind), "torch.int64"));
        }
        if size.len() != 3
            || size[0] != shape.batch as i64
            || size[1] != shape.heads as i64
            || size[2] > stored as i64
        {
            return Err(KvError::shape(
                "kept",
                &size,
                format!(
                    "({}, {}, n <= {stored}): the indices of the stored tokens each row keeps",
                    shape.batch, shape.heads
                ),
            ));
        }
        let n = size[2] as usize;
        let (s, r) = (self.sink_len(), self.residual_len());
        let kept = kept.f_to(shape.device)?;
        if n > 0 {
            let min = kept.f_min()?.f_int64_value(&[])?;
            let max = kept.f_max()?.f_int64_value(&[])?;
            let ascending = n < 2
                || kept
                    .f_narrow(2, 1, n as i64 - 1)?
                    .f_gt_tensor(&kept.f_narrow(2, 0, n as i64 - 1)?)?
                    .f_all()?
                    .f_int64_value(&[])?
                    == 1;
            if min < 0 || max >= stored as i64 || !ascending {
                return Err(KvError::invalid(
                    "kept",
                    format!("expected strictly ascending indices in [0, {stored}) per row"),
                ));
            }
        }
        let whole = |from: usize, at: usize, count: usize| -> Result<bool> {
            if count == 0 {
                return Ok(true);
            }
            let want = Tensor::f_arange_start(
                from as i64,
                (from + count) as i64,
                (Kind::Int64, shape.device),
            )?;
            Ok(kept
                .f_narrow(2, at as i64, count as i64)?
                .f_eq_tensor(&want)?
                .f_all()?
                .f_int64_value(&[])?
                == 1)
        };
        if n < s + r || !whole(0, 0, s)? || !whole(stored - r, n - r, r)? {
            return Err(KvError::invalid(
                "kept",
                format!(
                    "every row must keep the {s} sink tokens and the {r} tokens of the                      full-precision residual window (only quantized tokens are evicted)"
                ),
            ));
        }
        if n == stored {
            return Ok(());
        }
        let middle = kept
            .f_narrow(2, s as i64, (n - s - r) as i64)?
            .f_sub_scalar(s as i64)?;
        let kept_tiles = ragged::retain(self.ragged.as_ref(), &self.blocks, &middle, shape.kind)?;
        self.ragged = kept_tiles;
        self.blocks.clear();
        self.evicted += stored - n;
        self.seen = n;
        Ok(())
    }

    /// Re-rotation after an eviction, with pre-RoPE keys: the stored tokens move to the
    /// compact positions `next_position − stored .. next_position` (in storage order, which
    /// is position order). Quantized tokens only change their recorded positions (their
    /// codes hold pre-RoPE keys); the residual window's full-precision keys are rotated by
    /// the difference (`Rope::shift`). Refused without pre-RoPE keys (packed post-RoPE keys
    /// cannot be rotated without re-quantizing) and with sink tokens (their positions are
    /// not recorded).
    pub fn rerotate(&mut self, next_position: usize) -> Result<()> {
        let shape = self.shape.ok_or_else(empty_store)?;
        let Some(PreRope { rope, .. }) = &self.pre_rope else {
            return Err(KvError::Unsupported(
                "rerotate=True with a quantized cache that evicts during generation needs \
                 pre_rope_keys=True: packed post-RoPE keys cannot be re-rotated without \
                 re-quantizing them"
                    .into(),
            ));
        };
        let rope = rope.clone();
        if self.sink_len() > 0 {
            return Err(KvError::Unsupported(
                "rerotate=True with quantization sink_tokens > 0 is not supported: sink                  positions are not recorded"
                    .into(),
            ));
        }
        let stored = self.seen;
        if next_position < stored {
            return Err(KvError::invalid(
                "next_position",
                format!("{next_position} leaves no room for the {stored} stored tokens"),
            ));
        }
        let (b, h) = (shape.batch as i64, shape.heads as i64);
        let device = shape.device;
        let mut at = (next_position - stored) as i64;
        let compact = |from: i64, n: i64| -> Result<Tensor> {
            Ok(Tensor::f_arange_start(from, from + n, (Kind::Int, device))?.f_view([1, 1, n])?)
        };
        if let Some(r) = &mut self.ragged {
            let n = r.len as i64;
            r.positions = Some(compact(at, n)?.f_expand([b, h, n], false)?.f_contiguous()?);
            at += n;
        }
        for block in &mut self.blocks {
            let n = block.keys.tokens();
            block.positions = Some(BlockPositions::Run { start: at, len: n });
            at += n as i64;
        }
        if let Some(res) = &mut self.residual {
            let n = res.len as i64;
            if n > 0 {
                let new = compact(at, n)?.f_expand([b, h, n], false)?;
                if let Some(old) = res.positions_view()? {
                    let delta = new.f_sub(&old)?.f_to_kind(Kind::Int64)?;
                    let mut keys = res.keys.f_narrow(TOKEN_AXIS, 0, n)?;
                    let rotated = rope.shift(&keys, &delta, None)?;
                    keys.f_copy_(&rotated)?;
                    res.write_positions_at(0, &new)?;
                }
            }
        }
        self.evicted = next_position - stored;
        Ok(())
    }

    /// Integer codes and (scale, zero) of every quantized element (tokens kept by
    /// evictions, then blocks), for keys and values: codes u8 (batch, heads, q, head_dim),
    /// params float16 (batch, heads, q, head_dim, 2), and the outliers (int64 flat indices
    /// into (batch, heads, q, head_dim), ascending; values). For inspection and tests.
    #[allow(clippy::type_complexity)]
    pub fn element_codes(&self) -> Result<Vec<(Tensor, Tensor, Option<(Tensor, Tensor)>)>> {
        if self.quantized_len() == 0 {
            return Err(KvError::State("the store holds no quantized token".into()));
        }
        ragged::element_codes(self.ragged.as_ref(), &self.blocks)
    }
}

/// Positions (b, h, n) as (1, 1, n) when every row holds the same ones.
fn one_row_if_shared(p: &Tensor) -> Result<Tensor> {
    let first = p.f_narrow(0, 0, 1)?.f_narrow(1, 0, 1)?;
    if p.size()[..2] != [1, 1] && p.f_eq_tensor(&first)?.f_all()?.f_int64_value(&[])? == 1 {
        return Ok(first.f_contiguous()?);
    }
    Ok(p.f_contiguous()?)
}

/// A batch operation on positions: rows shared by the whole batch stay as they are.
fn map_rows(p: &Tensor, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if p.size()[0] == 1 {
        Ok(p.shallow_clone())
    } else {
        f(p)
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

fn internal() -> KvError {
    KvError::State("internal: quantized store state is inconsistent".into())
}

pub(crate) fn empty_store() -> KvError {
    KvError::State(
        "the quantized store is empty: nothing has been appended since the last reset".into(),
    )
}

fn check_same_shape(
    held: &StoreShape,
    ks: KvShape,
    value_dim: usize,
    kind: Kind,
    device: Device,
) -> Result<()> {
    let reuse = "; call reset() before reusing the cache for another batch or model";
    if (ks.batch, ks.heads, ks.head_dim) != (held.batch, held.heads, held.key_dim) {
        return Err(KvError::shape(
            "keys",
            &ks.as_i64(),
            format!(
                "({}, {}, tokens, {}) like the keys already cached{reuse}",
                held.batch, held.heads, held.key_dim
            ),
        ));
    }
    if value_dim != held.value_dim {
        return Err(KvError::invalid(
            "values",
            format!(
                "head_dim {value_dim} differs from the cached {}{reuse}",
                held.value_dim
            ),
        ));
    }
    if kind != held.kind {
        return Err(KvError::dtype(
            "keys",
            kind_name(kind),
            format!("{} like the cached keys{reuse}", kind_name(held.kind)),
        ));
    }
    if device != held.device {
        return Err(KvError::device(
            "keys",
            device_name(device),
            format!("{} like the cached keys{reuse}", device_name(held.device)),
        ));
    }
    Ok(())
}
