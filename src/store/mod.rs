//! The per-layer compressed KV store.
//!
//! A [`LayerStore`] holds one layer's keys and values (batch, kv_heads, tokens, head_dim),
//! the original positions of the tokens it kept, and the number of tokens it has seen.
//! Tokens seen and tokens stored differ once a press evicts some: generation positions
//! continue from `seen`, attention runs over what is stored.
//!
//! Rows (one per (batch, kv_head)) are either uniform — every row the same length, one
//! tensor ([`uniform`]) — or ragged — each row its own length and buffer, after a head
//! budget ([`ragged`]; attention over them in [`attention`]).

mod attention;
mod buffer;
mod ragged;
mod uniform;

use crate::error::{KvError, Result};
use crate::rope::Rope;
use crate::tensor::{array_view, check_kv_pair, device_name, kind_name, KvShape};
use ndarray::Axis;
use ragged::RaggedRows;
use tch::{Device, Kind, Tensor};
use uniform::UniformRows;

#[derive(Debug)]
enum Rows {
    Uniform(UniformRows),
    Ragged(RaggedRows),
}

/// One layer's KV cache with eviction. See the module documentation.
#[derive(Debug, Default)]
pub struct LayerStore {
    rows: Option<Rows>,
    seen: usize,
    /// Original position of the next token minus its position now (re-rotation moves
    /// positions back; 0 until then).
    shift: i64,
    /// (batch, kv_heads, key head_dim, value head_dim, dtype, device) fixed at the first append.
    layout: Option<(KvShape, i64, Kind, Device)>,
}

/// A summary of a store, for `stats()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreStats {
    pub seen: usize,
    pub stored: usize,
    pub nbytes: usize,
}

/// Original positions of the kept tokens.
#[derive(Debug)]
pub enum KeptPositions {
    /// int64 (batch, kv_heads, n), every row the same length.
    Uniform(Tensor),
    /// int64 (n_r,) per row r = b * kv_heads + h.
    Ragged(Vec<Tensor>),
}

impl KeptPositions {
    /// The (batch, kv_heads, n) tensor of uniform rows; an error for ragged rows.
    pub fn into_uniform(self) -> Result<Tensor> {
        match self {
            KeptPositions::Uniform(t) => Ok(t),
            KeptPositions::Ragged(_) => Err(KvError::State("rows have different lengths".into())),
        }
    }
}

impl LayerStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `keys`/`values` (batch, kv_heads, stored, head_dim) as they are (no
    /// copy), having seen `seen` tokens: how an assembled cache of reused chunks is built
    /// (`crate::chunks`). `positions`: integer (batch, kv_heads, stored) original positions,
    /// ascending and < `seen`, when tokens were evicted; `None` means the stored tokens are
    /// exactly positions 0..stored, which then must equal `seen`.
    pub fn from_tokens(
        keys: Tensor,
        values: Tensor,
        positions: Option<Tensor>,
        seen: usize,
    ) -> Result<Self> {
        let (ks, vs) = check_kv_pair(&keys, &values)?;
        let positions = match positions {
            None if ks.tokens != seen => {
                return Err(KvError::invalid(
                    "seen",
                    format!(
                        "{seen} tokens seen but {} stored and no positions given",
                        ks.tokens
                    ),
                ))
            }
            None => None,
            Some(p) => {
                crate::rope::positions::check_integer(&p, "positions")?;
                let expected = [ks.batch as i64, ks.heads as i64, ks.tokens as i64];
                if p.size() != expected {
                    return Err(KvError::shape(
                        "positions",
                        &p.size(),
                        format!("{expected:?}: one position per stored key"),
                    ));
                }
                let p = p.f_to_kind(Kind::Int)?.f_to(Device::Cpu)?.f_contiguous()?;
                check_ascending(&p)?;
                if ks.tokens > 0 && p.f_max()?.f_int64_value(&[])? >= seen as i64 {
                    return Err(KvError::invalid(
                        "positions",
                        format!("a position is >= the {seen} tokens seen"),
                    ));
                }
                Some(buffer::TokenBuffer::adopt(p))
            }
        };
        let layout = (ks, vs.head_dim as i64, keys.kind(), keys.device());
        Ok(LayerStore {
            rows: Some(Rows::Uniform(UniformRows {
                keys: buffer::TokenBuffer::adopt(keys),
                values: buffer::TokenBuffer::adopt(values),
                positions,
                original: None,
            })),
            seen,
            shift: 0,
            layout: Some(layout),
        })
    }

    /// Replaces the stored tokens at `indices` (int64 (n,), indices into the stored tokens,
    /// the same in every row) by `keys`/`values` (batch, kv_heads, n, head_dim): how
    /// selectively recomputed tokens enter an assembled cache. Uniform rows only. The new
    /// tokens go into fresh storage; views handed out earlier keep the old ones.
    pub fn overwrite_tokens(
        &mut self,
        indices: &Tensor,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<()> {
        let (ks, vs) = check_kv_pair(keys, values)?;
        let layout = self.layout.ok_or_else(empty_store)?;
        check_same_layout(layout, ks, vs.head_dim as i64, keys.kind(), keys.device())?;
        crate::rope::positions::check_integer(indices, "indices")?;
        if indices.size() != [ks.tokens as i64] {
            return Err(KvError::shape(
                "indices",
                &indices.size(),
                format!("({},): one index per new token", ks.tokens),
            ));
        }
        let stored = self.len() as i64;
        let u = match self.rows.as_mut().ok_or_else(empty_store)? {
            Rows::Uniform(u) => u,
            Rows::Ragged(_) => {
                return Err(KvError::State(
                    "cannot overwrite tokens of rows with different lengths (head budget)".into(),
                ))
            }
        };
        if ks.tokens > 0 {
            let idx = indices.f_to_kind(Kind::Int64)?;
            let (lo, hi) = (
                idx.f_min()?.f_int64_value(&[])?,
                idx.f_max()?.f_int64_value(&[])?,
            );
            if lo < 0 || hi >= stored {
                return Err(KvError::invalid(
                    "indices",
                    format!("indices span [{lo}, {hi}], expected indices into the {stored} stored tokens"),
                ));
            }
            let idx = idx.f_to(keys.device())?;
            let k = u.keys.view()?.f_index_copy(2, &idx, keys)?;
            let v = u.values.view()?.f_index_copy(2, &idx, values)?;
            u.keys = buffer::TokenBuffer::adopt(k);
            u.values = buffer::TokenBuffer::adopt(v);
        }
        Ok(())
    }

    /// Tokens seen since the last reset (the position of the next token).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Tokens stored per (batch, head) row; for ragged rows, the longest row.
    pub fn len(&self) -> usize {
        self.lengths().into_iter().max().unwrap_or(0)
    }

    /// Tokens stored in each (batch, kv_head) row, row-major.
    pub fn lengths(&self) -> Vec<usize> {
        match (&self.rows, self.layout) {
            (Some(Rows::Uniform(u)), Some((shape, ..))) => vec![u.len(); shape.batch * shape.heads],
            (Some(Rows::Ragged(r)), _) => r.lengths(),
            _ => vec![],
        }
    }

    /// No token stored (none seen yet, or every one evicted).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether rows have their own lengths (a head budget was applied).
    pub fn is_ragged(&self) -> bool {
        matches!(self.rows, Some(Rows::Ragged(_)))
    }

    /// Whether any token was ever evicted from this store.
    pub fn has_evicted(&self) -> bool {
        match &self.rows {
            Some(Rows::Uniform(u)) => u.positions.is_some(),
            Some(Rows::Ragged(_)) => true,
            None => false,
        }
    }

    /// The device of the stored tokens, once something is stored.
    pub fn layout_device(&self) -> Option<Device> {
        self.layout.map(|(.., device)| device)
    }

    /// (batch, kv_heads) of the stored rows.
    pub fn batch_heads(&self) -> Option<(usize, usize)> {
        self.layout.map(|(s, ..)| (s.batch, s.heads))
    }

    /// Bytes held: keys, values (spare capacity included) and kept positions.
    pub fn nbytes(&self) -> usize {
        match &self.rows {
            Some(Rows::Uniform(u)) => u.nbytes(),
            Some(Rows::Ragged(r)) => r.nbytes(),
            None => 0,
        }
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            seen: self.seen,
            stored: self.len(),
            nbytes: self.nbytes(),
        }
    }

    /// Appends new keys/values (batch, kv_heads, q, head_dim) and returns the keys and
    /// values to attend over: everything stored, then the new tokens. For ragged rows,
    /// which no single tensor can hold, it returns the new tokens only; attention over
    /// them goes through [`LayerStore::attend_rows`].
    ///
    /// The first append adopts the given tensors without copying them when they are
    /// contiguous (a strided view is copied once into contiguous storage).
    pub fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        let (ks, vs) = check_kv_pair(keys, values)?;
        let (kind, device) = (keys.kind(), keys.device());
        if ks.tokens == 0 {
            return Err(KvError::empty(
                "keys",
                "an update must carry at least one token",
            ));
        }
        match (&mut self.rows, self.layout) {
            (Some(rows), Some(layout)) => {
                check_same_layout(layout, ks, vs.head_dim as i64, kind, device)?;
                match rows {
                    Rows::Uniform(u) => u.append(keys, values, self.seen, self.shift)?,
                    Rows::Ragged(r) => r.append(keys, values, self.seen, self.shift)?,
                }
            }
            _ => {
                // A projection's transposed view is copied once into contiguous storage, as
                // DynamicCache's concatenation does: SDPA runs 3–12% slower on the view.
                let (keys, values) = (keys.f_contiguous()?, values.f_contiguous()?);
                self.rows = Some(Rows::Uniform(UniformRows::adopt(&keys, &values)));
                self.layout = Some((ks, vs.head_dim as i64, kind, device));
            }
        }
        self.seen += ks.tokens;
        match &self.rows {
            Some(Rows::Ragged(_)) => Ok((keys.shallow_clone(), values.shallow_clone())),
            _ => Ok((self.keys_view()?, self.values_view()?)),
        }
    }

    fn uniform(&self) -> Result<&UniformRows> {
        match &self.rows {
            Some(Rows::Uniform(u)) => Ok(u),
            Some(Rows::Ragged(_)) => Err(KvError::State(
                "this layer's rows have different lengths (head budget): read them per row".into(),
            )),
            None => Err(empty_store()),
        }
    }

    /// The stored keys (batch, kv_heads, stored, head_dim), a view without copy. Uniform
    /// rows only.
    pub fn keys_view(&self) -> Result<Tensor> {
        self.uniform()?.keys.view()
    }

    /// The stored values (batch, kv_heads, stored, head_dim), a view without copy.
    /// Uniform rows only.
    pub fn values_view(&self) -> Result<Tensor> {
        self.uniform()?.values.view()
    }

    /// Row (b, h)'s keys and values (1, 1, len, head_dim), views without copy.
    pub fn row_views(&self, b: usize, h: usize) -> Result<(Tensor, Tensor)> {
        let (batch, heads) = self.batch_heads().ok_or_else(empty_store)?;
        if b >= batch || h >= heads {
            return Err(KvError::invalid(
                "row",
                format!("({b}, {h}) is outside (batch {batch}, kv_heads {heads})"),
            ));
        }
        match self.rows.as_ref().ok_or_else(empty_store)? {
            Rows::Uniform(u) => {
                let row = |t: Tensor| -> Result<Tensor> {
                    Ok(t.f_narrow(0, b as i64, 1)?.f_narrow(1, h as i64, 1)?)
                };
                Ok((row(u.keys.view()?)?, row(u.values.view()?)?))
            }
            Rows::Ragged(r) => {
                let (k, v, _) = r.row(b * heads + h)?;
                Ok((k, v))
            }
        }
    }

    /// Original positions of the stored tokens (where they were in the sequence seen),
    /// ascending in every row; −1 for filler slots.
    pub fn kept_positions(&self) -> Result<KeptPositions> {
        self.positions_of(true)
    }

    /// The positions the stored keys are rotated at now: the original ones, or after a
    /// re-rotation the compact ones.
    pub fn key_positions(&self) -> Result<KeptPositions> {
        self.positions_of(false)
    }

    fn positions_of(&self, original: bool) -> Result<KeptPositions> {
        match self.rows.as_ref().ok_or_else(empty_store)? {
            Rows::Uniform(u) => {
                let p = if original {
                    u.original_positions()?
                } else {
                    u.positions()?
                };
                Ok(KeptPositions::Uniform(p.f_to_kind(Kind::Int64)?))
            }
            Rows::Ragged(r) => {
                let rows = (0..r.keys.len())
                    .map(|i| {
                        let p = if original {
                            r.original_row(i)?
                        } else {
                            r.row(i)?.2
                        };
                        Ok(p.f_flatten(0, -1)?.f_to_kind(Kind::Int64)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(KeptPositions::Ragged(rows))
            }
        }
    }

    /// Keeps only the stored tokens at `indices` (int64 (batch, kv_heads, k), ascending,
    /// indices into the stored tokens of every row), freeing the rest: the new storage
    /// holds exactly k tokens per row.
    pub fn retain(&mut self, indices: &Tensor) -> Result<()> {
        match self.rows.as_ref().ok_or_else(empty_store)? {
            Rows::Uniform(u) => {
                let kept = u.gathered(indices)?;
                check_ascending(&kept.positions()?)?;
                self.rows = Some(Rows::Uniform(kept));
                Ok(())
            }
            Rows::Ragged(r) => {
                let k = indices.size().last().copied().unwrap_or(0);
                let rows = (0..r.keys.len())
                    .map(|i| Ok(indices.f_view([-1, k])?.f_get(i as i64)?))
                    .collect::<Result<Vec<_>>>()?;
                self.retain_rows(&rows)
            }
        }
    }

    /// [`retain`](Self::retain), returning the tokens it frees instead of dropping them:
    /// keys and values (batch, kv_heads, n − k, head_dim), each row's in stored order
    /// (mixed precision keeps them elsewhere, at lower precision). Uniform rows only.
    pub fn retain_split(&mut self, indices: &Tensor) -> Result<(Tensor, Tensor)> {
        let Some(Rows::Uniform(u)) = self.rows.as_ref() else {
            return Err(match self.rows {
                None => empty_store(),
                Some(_) => KvError::Unsupported(
                    "keeping evicted tokens of ragged rows (a per-head budget) is not supported"
                        .into(),
                ),
            });
        };
        let (n, k) = (
            self.len() as i64,
            indices.size().last().copied().unwrap_or(0),
        );
        let keys = u.keys.view()?;
        let (b, h) = (keys.size()[0], keys.size()[1]);
        // The complement of `indices` per row, ascending: a stable sort puts the zeros
        // (evicted) first, in index order.
        let kept = Tensor::f_zeros([b, h, n], (Kind::Int8, keys.device()))?.f_scatter_value(
            2,
            &indices.f_to(keys.device())?,
            1i64,
        )?;
        let (_, order) = kept.f_sort_stable(true, 2, false)?;
        let evicted = order.f_narrow(2, 0, n - k)?;
        let split = u.gathered(&evicted)?;
        let out = (split.keys.view()?, split.values.view()?);
        self.retain(indices)?;
        Ok(out)
    }

    /// Keeps, in row r = b * kv_heads + h, only the stored tokens at `rows[r]` (int64
    /// (k_r,), ascending): rows may keep different counts, and the bytes held follow them.
    /// When every row keeps the same count the rows stay uniform.
    pub fn retain_rows(&mut self, rows: &[Tensor]) -> Result<()> {
        let (batch, heads) = self.batch_heads().ok_or_else(empty_store)?;
        if rows.len() != batch * heads {
            return Err(KvError::invalid(
                "indices",
                format!(
                    "expected {} rows (batch x kv_heads), got {}",
                    batch * heads,
                    rows.len()
                ),
            ));
        }
        let counts: Vec<i64> = rows.iter().map(|r| r.numel() as i64).collect();
        if counts.iter().all(|&c| c == counts[0]) {
            let stacked =
                Tensor::f_stack(rows, 0)?.f_view([batch as i64, heads as i64, counts[0]])?;
            if let Some(Rows::Uniform(_)) = self.rows {
                return self.retain(&stacked);
            }
        }
        let kept = match self.rows.as_ref().ok_or_else(empty_store)? {
            Rows::Uniform(u) => {
                let positions = u.positions.as_ref().map(|p| p.view()).transpose()?;
                let original = u.original.as_ref().map(|p| p.view()).transpose()?;
                RaggedRows::from_rows(
                    &u.keys.view()?,
                    &u.values.view()?,
                    positions.as_ref(),
                    original.as_ref(),
                    rows,
                )?
            }
            Rows::Ragged(old) => {
                let mut out = RaggedRows {
                    heads,
                    keys: vec![],
                    values: vec![],
                    positions: vec![],
                    original: vec![],
                };
                for (i, idx) in rows.iter().enumerate() {
                    let (k, v, p) = old.row(i)?;
                    let o = (!old.original.is_empty())
                        .then(|| old.original_row(i))
                        .transpose()?;
                    let one = RaggedRows::from_rows(
                        &k,
                        &v,
                        Some(&p),
                        o.as_ref(),
                        std::slice::from_ref(idx),
                    )?;
                    out.keys.extend(one.keys);
                    out.values.extend(one.values);
                    out.positions.extend(one.positions);
                    out.original.extend(one.original);
                }
                out
            }
        };
        for p in &kept.positions {
            check_ascending(&p.view()?)?;
        }
        self.rows = Some(Rows::Ragged(kept));
        Ok(())
    }

    /// Forgets the last `n` tokens seen (rollback for assisted decoding). Only tokens that
    /// are still stored can be removed; in uniform rows every row must store the same
    /// number of them.
    pub fn crop(&mut self, n: usize) -> Result<()> {
        if n == 0 || self.rows.is_none() {
            return Ok(());
        }
        if n > self.seen {
            return Err(KvError::invalid(
                "tokens_to_remove",
                format!("{n} exceeds the {} tokens seen", self.seen),
            ));
        }
        let new_seen = self.seen - n;
        let count_from = |positions: &Tensor| -> Result<Vec<usize>> {
            let pos = array_view::<i32, ndarray::Ix3>(positions, "positions")?;
            Ok(pos
                .lanes(Axis(2))
                .into_iter()
                .map(|row| row.iter().filter(|&&x| x as usize >= new_seen).count())
                .collect())
        };
        match self.rows.as_mut().ok_or_else(empty_store)? {
            Rows::Uniform(u) => {
                let removed = match &u.positions {
                    None => n,
                    Some(p) => {
                        let counts = count_from(&p.view()?)?;
                        let first = counts.first().copied().unwrap_or(0);
                        if counts.iter().any(|&c| c != first) {
                            return Err(KvError::State(
                                "cannot crop: the tokens to remove were evicted from some heads but not others".into(),
                            ));
                        }
                        first
                    }
                };
                let keep = u.len() - removed;
                u.truncate(keep)?;
            }
            Rows::Ragged(r) => {
                let mut lens = vec![];
                for i in 0..r.keys.len() {
                    let removed = count_from(&r.row(i)?.2)?[0];
                    lens.push(r.keys[i].len() - removed);
                }
                r.truncate(&lens)?;
            }
        }
        if new_seen == 0 {
            // nothing left: the next append starts a fresh store, as after a reset
            self.reset();
            return Ok(());
        }
        self.seen = new_seen;
        Ok(())
    }

    /// Selects (and reorders) batch rows: beam-search reordering and batch selection.
    /// `indices` is a non-empty int64 vector of rows in [0, batch).
    pub fn index_batch(&mut self, indices: &Tensor) -> Result<()> {
        let Some((shape, ..)) = self.layout else {
            return Ok(());
        };
        let order = check_batch_indices(indices, shape.batch)?;
        self.reorder_batch(&order)
    }

    /// Repeats every batch row `repeats` times in place (row i becomes rows i*r..(i+1)*r).
    pub fn repeat_interleave_batch(&mut self, repeats: i64) -> Result<()> {
        if repeats < 1 {
            return Err(KvError::invalid(
                "repeats",
                format!("got {repeats}, expected >= 1"),
            ));
        }
        let Some((shape, ..)) = self.layout else {
            return Ok(());
        };
        let order: Vec<usize> = (0..shape.batch)
            .flat_map(|b| std::iter::repeat_n(b, repeats as usize))
            .collect();
        self.reorder_batch(&order)
    }

    fn reorder_batch(&mut self, order: &[usize]) -> Result<()> {
        let Some(rows) = &self.rows else {
            return Ok(());
        };
        let new_rows = match rows {
            Rows::Uniform(u) => {
                let idx =
                    Tensor::f_from_slice(&order.iter().map(|&b| b as i64).collect::<Vec<_>>())?;
                Rows::Uniform(
                    u.map_batch(&|t: &Tensor| Ok(t.f_index_select(0, &idx.f_to(t.device())?)?))?,
                )
            }
            Rows::Ragged(r) => Rows::Ragged(r.select_batch(order)?),
        };
        self.rows = Some(new_rows);
        if let Some((mut shape, vd, kind, device)) = self.layout {
            shape.batch = order.len();
            self.layout = Some((shape, vd, kind, device));
        }
        Ok(())
    }

    /// Re-rotates the kept keys to compact positions ending right before `next_position`:
    /// in every row, kept token i of n moves to position next_position − n + i with one
    /// delta rotation (`rope.shift`), and the store continues at `next_position`. Rows
    /// with fewer tokens leave a gap before their first token, never after their last.
    /// The first `hidden[b]` slots of batch row b (padding) take no position (−1) and are
    /// not counted in n; the keys of row b were rotated `pads[b]` positions before their
    /// stored position (a left-padded row counts its positions from its first real token).
    /// Original positions are kept ([`kept_positions`](Self::kept_positions)).
    pub fn rerotate(
        &mut self,
        rope: &Rope,
        next_position: usize,
        hidden: &[usize],
        pads: &[usize],
    ) -> Result<()> {
        let seen = self.seen;
        let (batch, heads) = self.batch_heads().ok_or_else(empty_store)?;
        let hidden_of = |b: usize| hidden.get(b).copied().unwrap_or(0);
        let pads_of = |b: usize| pads.get(b).copied().unwrap_or(0) as i64;
        if next_position < self.len() {
            return Err(KvError::invalid(
                "next_position",
                format!(
                    "{next_position} leaves no room for the {} tokens of the longest row",
                    self.len()
                ),
            ));
        }
        // row positions: hidden slots −1, then the compact run ending before next_position
        let compact = |n: usize, h: usize| -> Result<Tensor> {
            let visible = Tensor::f_arange_start(
                (next_position - (n - h)) as i64,
                next_position as i64,
                (Kind::Int, Device::Cpu),
            )?;
            let front = Tensor::f_full([h as i64], -1, (Kind::Int, Device::Cpu))?;
            Ok(Tensor::f_cat(&[front, visible], 0)?.f_view([1, 1, n as i64])?)
        };
        let shift = |new: &Tensor, old: &Tensor, keys: &Tensor| -> Result<Tensor> {
            // hidden slots stay where they are (no attention sees them)
            let delta = new.f_sub(old)?.f_masked_fill(&new.f_lt(0)?, 0)?;
            rope.shift(
                keys,
                &delta.f_to_kind(Kind::Int64)?.f_to(keys.device())?,
                Some(seen),
            )
        };
        // where row b's keys were rotated: their positions, less the row's pads
        let rotated_at = |old: Tensor, b: i64| -> Result<Tensor> {
            let p = pads_of(b as usize);
            Ok(if p > 0 { old.f_sub_scalar(p)? } else { old })
        };
        match self.rows.as_mut().ok_or_else(empty_store)? {
            Rows::Uniform(u) => {
                let n = u.len();
                let rows = (0..batch)
                    .map(|b| {
                        Ok(compact(n, hidden_of(b).min(n))?
                            .f_expand([1, heads as i64, n as i64], false)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let new = Tensor::f_cat(&rows, 0)?.f_contiguous()?;
                let old = u.positions()?;
                if u.original.is_none() {
                    u.original = Some(buffer::TokenBuffer::adopt(old.f_contiguous()?));
                }
                let at = (0..batch as i64)
                    .map(|b| rotated_at(old.f_narrow(0, b, 1)?, b))
                    .collect::<Result<Vec<_>>>()?;
                let rotated = shift(&new, &Tensor::f_cat(&at, 0)?, &u.keys.view()?)?;
                u.keys = buffer::TokenBuffer::adopt(rotated);
                u.positions = Some(buffer::TokenBuffer::adopt(new));
            }
            Rows::Ragged(r) => {
                let keep_original = r.original.is_empty();
                for i in 0..r.keys.len() {
                    let (keys, _, old) = r.row(i)?;
                    let n = keys.size()[2] as usize;
                    let new = compact(n, hidden_of(i / heads).min(n))?;
                    if keep_original {
                        r.original
                            .push(buffer::TokenBuffer::adopt(old.f_contiguous()?));
                    }
                    let at = rotated_at(old, (i / heads) as i64)?;
                    r.keys[i] = buffer::TokenBuffer::adopt(shift(&new, &at, &keys)?);
                    r.positions[i] = buffer::TokenBuffer::adopt(new.f_contiguous()?);
                }
            }
        }
        self.shift += seen as i64 - next_position as i64;
        self.seen = next_position;
        Ok(())
    }

    /// Attention of `query` (batch, q_heads, q, head_dim) over every row of this layer —
    /// the way to attend over ragged rows — after the q newest tokens were appended.
    /// Returns (batch, q, q_heads, head_dim), as transformers' attention functions do.
    pub fn attend_rows(&self, query: &Tensor, scaling: f64) -> Result<Tensor> {
        let (batch, heads) = self.batch_heads().ok_or_else(empty_store)?;
        attention::attend_rows(query, batch, heads, scaling, |b, h| self.row_views(b, h))
    }

    /// Drops everything: the store is as new.
    pub fn reset(&mut self) {
        *self = LayerStore::default();
    }

    /// Whether a re-rotation moved keys away from their original positions.
    pub fn has_rerotated(&self) -> bool {
        self.shift != 0
    }
}

/// Checks that `indices` is a non-empty int64 vector of batch rows in [0, batch) and
/// returns them as the new row order.
pub(crate) fn check_batch_indices(indices: &Tensor, batch: usize) -> Result<Vec<usize>> {
    let size = indices.size();
    if size.len() != 1 || size[0] == 0 {
        return Err(KvError::shape(
            "indices",
            &size,
            "a non-empty vector of batch rows",
        ));
    }
    let kind = crate::tensor::kind_of(indices, "indices")?;
    if kind != Kind::Int64 {
        return Err(KvError::dtype("indices", kind_name(kind), "torch.int64"));
    }
    let order: Vec<i64> = Vec::<i64>::try_from(indices.f_to(Device::Cpu)?)?;
    if let Some(&bad) = order.iter().find(|&&b| b < 0 || b >= batch as i64) {
        return Err(KvError::invalid(
            "indices",
            format!("batch rows must lie in [0, {batch}), got {bad}"),
        ));
    }
    Ok(order.into_iter().map(|b| b as usize).collect())
}

fn empty_store() -> KvError {
    KvError::State(
        "the layer store is empty: nothing has been appended since the last reset".into(),
    )
}

fn check_same_layout(
    layout: (KvShape, i64, Kind, Device),
    ks: KvShape,
    v_head_dim: i64,
    kind: Kind,
    device: Device,
) -> Result<()> {
    let (held, held_vd, held_kind, held_device) = layout;
    let reuse = "; call reset() before reusing the cache for another batch or model";
    if (ks.batch, ks.heads, ks.head_dim) != (held.batch, held.heads, held.head_dim) {
        return Err(KvError::shape(
            "keys",
            &ks.as_i64(),
            format!(
                "({}, {}, tokens, {}) like the keys already cached{reuse}",
                held.batch, held.heads, held.head_dim
            ),
        ));
    }
    if v_head_dim != held_vd {
        return Err(KvError::invalid(
            "values",
            format!("head_dim {v_head_dim} differs from the cached {held_vd}{reuse}"),
        ));
    }
    if kind != held_kind {
        return Err(KvError::dtype(
            "keys",
            kind_name(kind),
            format!("{} like the cached keys{reuse}", kind_name(held_kind)),
        ));
    }
    if device != held_device {
        return Err(KvError::device(
            "keys",
            device_name(device),
            format!("{} like the cached keys{reuse}", device_name(held_device)),
        ));
    }
    Ok(())
}

/// Positions ascend strictly in every row, after a run of filler slots (−1) in front.
fn check_ascending(positions: &Tensor) -> Result<()> {
    let pos = array_view::<i32, ndarray::Ix3>(positions, "positions")?;
    let sorted = pos.lanes(Axis(2)).into_iter().all(|row| {
        let real = row.iter().skip_while(|&&p| p == -1);
        real.clone().zip(real.skip(1)).all(|(a, b)| a < b) && row.iter().all(|&p| p >= -1)
    });
    if sorted {
        Ok(())
    } else {
        Err(KvError::invalid(
            "indices",
            "kept indices must be strictly ascending in every (batch, head) row",
        ))
    }
}
