//! Rows of equal length: every (batch, kv_head) row of a layer holds the same number of
//! tokens, in one (batch, kv_heads, tokens, head_dim) tensor that attention reads as is.

use super::buffer::TokenBuffer;
use crate::error::Result;
use crate::gather::gather_tokens;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub(crate) struct UniformRows {
    pub keys: TokenBuffer,
    pub values: TokenBuffer,
    /// int32 (batch, kv_heads, capacity) original positions on the CPU; `None` while the
    /// stored tokens are exactly positions 0..len (nothing evicted).
    pub positions: Option<TokenBuffer>,
}

impl UniformRows {
    /// Adopts the first keys/values without copying.
    pub fn adopt(keys: &Tensor, values: &Tensor) -> Self {
        UniformRows {
            keys: TokenBuffer::adopt(keys.shallow_clone()),
            values: TokenBuffer::adopt(values.shallow_clone()),
            positions: None,
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn nbytes(&self) -> usize {
        self.keys.nbytes()
            + self.values.nbytes()
            + self.positions.as_ref().map_or(0, TokenBuffer::nbytes)
    }

    /// Appends q new tokens at positions first_position..first_position + q.
    pub fn append(&mut self, keys: &Tensor, values: &Tensor, first_position: usize) -> Result<()> {
        self.keys.append(keys)?;
        self.values.append(values)?;
        if let Some(p) = &mut self.positions {
            let size = keys.size();
            p.append(
                &position_range(first_position, size[2] as usize)?
                    .f_expand([size[0], size[1], size[2]], false)?,
            )?;
        }
        Ok(())
    }

    /// int32 (batch, kv_heads, len) original positions.
    pub fn positions(&self) -> Result<Tensor> {
        match &self.positions {
            Some(p) => p.view(),
            None => {
                let size = self.keys.view()?.size();
                Ok(position_range(0, self.len())?
                    .f_expand([size[0], size[1], self.len() as i64], false)?
                    .f_contiguous()?)
            }
        }
    }

    /// The rows keeping only `indices` (int64 (batch, kv_heads, k), ascending).
    pub fn gathered(&self, indices: &Tensor) -> Result<UniformRows> {
        let positions = match &self.positions {
            // nothing evicted yet: the stored tokens are positions 0..len, so the kept
            // positions are the kept indices themselves
            // (the keys' gather below checks that they lie within the stored tokens)
            None => indices
                .f_to(Device::Cpu)?
                .f_to_kind(Kind::Int)?
                .f_contiguous()?,
            Some(p) => gather_tokens(&p.view()?, &indices.f_to(Device::Cpu)?)?,
        };
        Ok(UniformRows {
            keys: TokenBuffer::adopt(gather_tokens(&self.keys.view()?, indices)?),
            values: TokenBuffer::adopt(gather_tokens(&self.values.view()?, indices)?),
            positions: Some(TokenBuffer::adopt(positions)),
        })
    }

    /// Applies `f` (a batch reordering) to every tensor, into fresh storage.
    pub fn map_batch(&self, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<UniformRows> {
        Ok(UniformRows {
            keys: TokenBuffer::adopt(f(&self.keys.view()?)?),
            values: TokenBuffer::adopt(f(&self.values.view()?)?),
            positions: match &self.positions {
                Some(p) => Some(TokenBuffer::adopt(f(&p.view()?)?)),
                None => None,
            },
        })
    }

    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.keys.truncate(len)?;
        self.values.truncate(len)?;
        if let Some(p) = &mut self.positions {
            p.truncate(len)?;
        }
        Ok(())
    }
}

/// int32 positions start..start + n on the CPU, shaped (1, 1, n).
pub(crate) fn position_range(start: usize, n: usize) -> Result<Tensor> {
    Ok(
        Tensor::f_arange_start(start as i64, (start + n) as i64, (Kind::Int, Device::Cpu))?
            .f_view([1, 1, n as i64])?,
    )
}
