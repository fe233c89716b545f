//! Rows of their own lengths: after a head budget (AdaKV), each (batch, kv_head) row keeps
//! its own number of tokens in its own buffer, so the bytes held follow the per-head
//! counts. Attention over such a layer goes head by head (`attention.rs`).

use super::buffer::TokenBuffer;
use super::uniform::position_range;
use crate::error::{KvError, Result};
use crate::gather::gather_tokens;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub(crate) struct RaggedRows {
    pub heads: usize,
    /// Row r = b * heads + h: keys (1, 1, len_r, head_dim).
    pub keys: Vec<TokenBuffer>,
    pub values: Vec<TokenBuffer>,
    /// int32 (1, 1, len_r) positions (where each key is rotated now), on the CPU.
    pub positions: Vec<TokenBuffer>,
    /// int32 (1, 1, len_r) original positions, once a re-rotation moved keys (empty: the
    /// same as `positions`).
    pub original: Vec<TokenBuffer>,
}

impl RaggedRows {
    /// One row per (batch, head), keeping `rows[r]` (int64 (k_r,), ascending) of the
    /// tokens of `keys`/`values`/`positions` (batch, kv_heads, tokens[, dim]); `None`
    /// positions: the tokens are positions 0..tokens (the kept ones are their indices).
    pub fn from_rows(
        keys: &Tensor,
        values: &Tensor,
        positions: Option<&Tensor>,
        original: Option<&Tensor>,
        rows: &[Tensor],
    ) -> Result<Self> {
        let size = keys.size();
        let (batch, heads) = (size[0] as usize, size[1] as usize);
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
        let mut out = RaggedRows {
            heads,
            keys: vec![],
            values: vec![],
            positions: vec![],
            original: vec![],
        };
        for (r, idx) in rows.iter().enumerate() {
            let (b, h) = ((r / heads) as i64, (r % heads) as i64);
            let row =
                |t: &Tensor| -> Result<Tensor> { Ok(t.f_narrow(0, b, 1)?.f_narrow(1, h, 1)?) };
            let idx = idx.f_view([1, 1, -1])?;
            out.keys
                .push(TokenBuffer::adopt(gather_tokens(&row(keys)?, &idx)?));
            out.values
                .push(TokenBuffer::adopt(gather_tokens(&row(values)?, &idx)?));
            let kept_positions = match positions {
                Some(p) => gather_tokens(&row(p)?, &idx.f_to(Device::Cpu)?)?,
                None => idx
                    .f_to(Device::Cpu)?
                    .f_to_kind(Kind::Int)?
                    .f_contiguous()?,
            };
            out.positions.push(TokenBuffer::adopt(kept_positions));
            if let Some(o) = original {
                out.original.push(TokenBuffer::adopt(gather_tokens(
                    &row(o)?,
                    &idx.f_to(Device::Cpu)?,
                )?));
            }
        }
        Ok(out)
    }

    pub fn lengths(&self) -> Vec<usize> {
        self.keys.iter().map(TokenBuffer::len).collect()
    }

    pub fn nbytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .chain(&self.positions)
            .chain(&self.original)
            .map(TokenBuffer::nbytes)
            .sum()
    }

    /// Appends q new tokens to every row, at positions first_position..first_position + q,
    /// whose original positions are `shift` further on.
    pub fn append(
        &mut self,
        keys: &Tensor,
        values: &Tensor,
        first_position: usize,
        shift: i64,
    ) -> Result<()> {
        let q = keys.size()[2] as usize;
        let new_positions = position_range(first_position, q)?;
        let new_original = position_range((first_position as i64 + shift).max(0) as usize, q)?;
        for r in 0..self.keys.len() {
            let (b, h) = ((r / self.heads) as i64, (r % self.heads) as i64);
            self.keys[r].append(&keys.f_narrow(0, b, 1)?.f_narrow(1, h, 1)?)?;
            self.values[r].append(&values.f_narrow(0, b, 1)?.f_narrow(1, h, 1)?)?;
            self.positions[r].append(&new_positions)?;
            if let Some(o) = self.original.get_mut(r) {
                o.append(&new_original)?;
            }
        }
        Ok(())
    }

    /// Row r's original positions (1, 1, len_r).
    pub fn original_row(&self, r: usize) -> Result<Tensor> {
        match self.original.get(r) {
            Some(o) => o.view(),
            None => self.positions[r].view(),
        }
    }

    /// Row r's keys, values (1, 1, len_r, dim) and int32 positions (1, 1, len_r): views.
    pub fn row(&self, r: usize) -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            self.keys[r].view()?,
            self.values[r].view()?,
            self.positions[r].view()?,
        ))
    }

    /// Keeps the first `lens[r]` tokens of each row, in fresh storage.
    pub fn truncate(&mut self, lens: &[usize]) -> Result<()> {
        for (r, &len) in lens.iter().enumerate() {
            self.keys[r].truncate(len)?;
            self.values[r].truncate(len)?;
            self.positions[r].truncate(len)?;
            if let Some(o) = self.original.get_mut(r) {
                o.truncate(len)?;
            }
        }
        Ok(())
    }

    /// The rows of batch rows `order` (each a batch index), copied into fresh storage so
    /// that no two rows share a buffer that later appends write into.
    pub fn select_batch(&self, order: &[usize]) -> Result<RaggedRows> {
        let mut out = RaggedRows {
            heads: self.heads,
            keys: vec![],
            values: vec![],
            positions: vec![],
            original: vec![],
        };
        for &b in order {
            for h in 0..self.heads {
                let r = b * self.heads + h;
                out.keys.push(self.keys[r].copy_exact()?);
                out.values.push(self.values[r].copy_exact()?);
                out.positions.push(self.positions[r].copy_exact()?);
                if let Some(o) = self.original.get(r) {
                    out.original.push(o.copy_exact()?);
                }
            }
        }
        Ok(out)
    }
}
