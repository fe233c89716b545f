//! The per-layer compressed KV store.
//!
//! A [`LayerStore`] holds one layer's keys and values (batch, kv_heads, tokens, head_dim),
//! the original positions of the tokens it kept, and the number of tokens it has seen.
//! Tokens seen and tokens stored differ once a press evicts some: generation positions
//! continue from `seen`, attention runs over what is stored.
//!
//! The store is the unit later features extend: per-head (ragged) lengths, quantized
//! blocks appended without re-quantization, and re-rotation of kept keys all act on
//! `retain`/`append` and on the kept positions kept here.

mod buffer;

use crate::error::{KvError, Result};
use crate::tensor::{array_view, check_kv_pair, device_name, kind_name, KvShape};
use buffer::TokenBuffer;
use ndarray::Axis;
use tch::{Device, Kind, Tensor};

/// One layer's KV cache with eviction. See the module documentation.
#[derive(Debug, Default)]
pub struct LayerStore {
    keys: Option<TokenBuffer>,
    values: Option<TokenBuffer>,
    /// int32 (batch, kv_heads, capacity) original positions on the CPU; `None` while
    /// nothing was ever evicted (the stored tokens are exactly positions 0..seen).
    positions: Option<TokenBuffer>,
    seen: usize,
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

impl LayerStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens seen since the last reset (the position of the next token).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Tokens stored per (batch, head) row.
    pub fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, TokenBuffer::len)
    }

    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }

    /// Whether any token was ever evicted from this store.
    pub fn has_evicted(&self) -> bool {
        self.positions.is_some()
    }

    /// Bytes held: keys, values (spare capacity included) and kept positions.
    pub fn nbytes(&self) -> usize {
        [&self.keys, &self.values, &self.positions]
            .iter()
            .map(|b| b.as_ref().map_or(0, TokenBuffer::nbytes))
            .sum()
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            seen: self.seen,
            stored: self.len(),
            nbytes: self.nbytes(),
        }
    }

    /// Appends new keys/values (batch, kv_heads, q, head_dim) and returns the keys and
    /// values to attend over: everything stored, then the new tokens.
    ///
    /// The first append adopts the given tensors without copying them.
    pub fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        let (ks, vs) = check_kv_pair(keys, values)?;
        let kind = keys.kind();
        let device = keys.device();
        if ks.tokens == 0 {
            return Err(KvError::empty(
                "keys",
                "an update must carry at least one token",
            ));
        }
        match (&mut self.keys, &mut self.values, self.layout) {
            (Some(kb), Some(vb), Some(layout)) => {
                check_same_layout(layout, ks, vs.head_dim as i64, kind, device)?;
                kb.append(keys)?;
                vb.append(values)?;
                if let Some(pb) = &mut self.positions {
                    let new = Tensor::f_arange_start(
                        self.seen as i64,
                        (self.seen + ks.tokens) as i64,
                        (Kind::Int, Device::Cpu),
                    )?
                    .f_expand([ks.batch as i64, ks.heads as i64, ks.tokens as i64], false)?;
                    pb.append(&new)?;
                }
            }
            _ => {
                self.keys = Some(TokenBuffer::adopt(keys.shallow_clone()));
                self.values = Some(TokenBuffer::adopt(values.shallow_clone()));
                self.positions = None;
                self.layout = Some((ks, vs.head_dim as i64, kind, device));
            }
        }
        self.seen += ks.tokens;
        Ok((self.keys_view()?, self.values_view()?))
    }

    /// The stored keys (batch, kv_heads, stored, head_dim), a view without copy.
    pub fn keys_view(&self) -> Result<Tensor> {
        self.keys.as_ref().ok_or_else(empty_store)?.view()
    }

    /// The stored values (batch, kv_heads, stored, head_dim), a view without copy.
    pub fn values_view(&self) -> Result<Tensor> {
        self.values.as_ref().ok_or_else(empty_store)?.view()
    }

    /// Original positions of the stored tokens: int64 (batch, kv_heads, stored), ascending.
    pub fn kept_positions(&self) -> Result<Tensor> {
        let (shape, ..) = self.layout.ok_or_else(empty_store)?;
        match &self.positions {
            Some(p) => Ok(p.view()?.f_to_kind(Kind::Int64)?),
            None => Ok(
                Tensor::f_arange(self.len() as i64, (Kind::Int64, Device::Cpu))?
                    .f_expand(
                        [shape.batch as i64, shape.heads as i64, self.len() as i64],
                        false,
                    )?
                    .f_contiguous()?,
            ),
        }
    }

    /// Keeps only the stored tokens at `indices` (int64 (batch, kv_heads, k), ascending,
    /// indices into the stored tokens), freeing the rest: the new storage holds exactly k
    /// tokens.
    pub fn retain(&mut self, indices: &Tensor) -> Result<()> {
        let (kb, vb) = match (&self.keys, &self.values) {
            (Some(k), Some(v)) => (k, v),
            _ => return Err(empty_store()),
        };
        let keys = crate::gather::gather_tokens(&kb.view()?, indices)?;
        let values = crate::gather::gather_tokens(&vb.view()?, indices)?;
        let cpu_indices = indices.f_to(Device::Cpu)?;
        let positions = match &self.positions {
            Some(p) => crate::gather::gather_tokens(&p.view()?, &cpu_indices)?,
            // Nothing evicted before: stored token i is at position i.
            None => cpu_indices.f_to_kind(Kind::Int)?,
        };
        check_ascending(&positions)?;
        self.keys = Some(TokenBuffer::adopt(keys));
        self.values = Some(TokenBuffer::adopt(values));
        self.positions = Some(TokenBuffer::adopt(positions));
        Ok(())
    }

    /// Forgets the last `n` tokens seen (rollback for assisted decoding). Only tokens that
    /// are still stored can be removed, and every row must store the same number of them.
    pub fn crop(&mut self, n: usize) -> Result<()> {
        if n == 0 || self.keys.is_none() {
            return Ok(());
        }
        if n > self.seen {
            return Err(KvError::invalid(
                "tokens_to_remove",
                format!("{n} exceeds the {} tokens seen", self.seen),
            ));
        }
        let new_seen = self.seen - n;
        let removed = match &self.positions {
            None => n,
            Some(p) => {
                let view = p.view()?;
                let pos = array_view::<i32, ndarray::Ix3>(&view, "positions")?;
                let counts: Vec<usize> = pos
                    .lanes(Axis(2))
                    .into_iter()
                    .map(|row| row.iter().filter(|&&x| x as usize >= new_seen).count())
                    .collect();
                let first = counts.first().copied().unwrap_or(0);
                if counts.iter().any(|&c| c != first) {
                    return Err(KvError::State(
                        "cannot crop: the tokens to remove were evicted from some heads but not others".into(),
                    ));
                }
                first
            }
        };
        let keep = self.len() - removed;
        for b in [&mut self.keys, &mut self.values, &mut self.positions]
            .into_iter()
            .flatten()
        {
            b.truncate(keep)?;
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
        check_batch_indices(indices, shape.batch)?;
        self.map_batch(|t| Ok(t.f_index_select(0, &indices.f_to(t.device())?)?))
    }

    /// Repeats every batch row `repeats` times in place (row i becomes rows i*r..(i+1)*r).
    pub fn repeat_interleave_batch(&mut self, repeats: i64) -> Result<()> {
        if repeats < 1 {
            return Err(KvError::invalid(
                "repeats",
                format!("got {repeats}, expected >= 1"),
            ));
        }
        self.map_batch(|t| Ok(t.f_repeat_interleave_self_int(repeats, 0, None)?))
    }

    fn map_batch(&mut self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        if self.keys.is_none() {
            return Ok(());
        }
        for b in [&mut self.keys, &mut self.values, &mut self.positions]
            .into_iter()
            .flatten()
        {
            *b = TokenBuffer::adopt(f(&b.view()?)?);
        }
        if let (Some(kb), Some((mut shape, vd, kind, device))) = (&self.keys, self.layout) {
            shape.batch = kb.view()?.size()[0] as usize;
            self.layout = Some((shape, vd, kind, device));
        }
        Ok(())
    }

    /// Drops everything: the store is as new.
    pub fn reset(&mut self) {
        *self = LayerStore::default();
    }
}

/// Checks that `indices` is a non-empty int64 vector of batch rows in [0, batch).
pub(crate) fn check_batch_indices(indices: &Tensor, batch: usize) -> Result<()> {
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
    let (lo, hi) = (
        indices.f_min()?.f_int64_value(&[])?,
        indices.f_max()?.f_int64_value(&[])?,
    );
    if lo < 0 || hi >= batch as i64 {
        return Err(KvError::invalid(
            "indices",
            format!("batch rows must lie in [0, {}), got [{lo}, {hi}]", batch),
        ));
    }
    Ok(())
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

fn check_ascending(positions: &Tensor) -> Result<()> {
    let pos = array_view::<i32, ndarray::Ix3>(positions, "positions")?;
    let sorted = pos
        .lanes(Axis(2))
        .into_iter()
        .all(|row| row.iter().zip(row.iter().skip(1)).all(|(a, b)| a < b));
    if sorted {
        Ok(())
    } else {
        Err(KvError::invalid(
            "indices",
            "kept indices must be strictly ascending in every (batch, head) row",
        ))
    }
}
