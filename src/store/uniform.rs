//! Rows of equal length: every (batch, kv_head) row of a layer holds the same number of
//! tokens, in one (batch, kv_heads, tokens, head_dim) tensor that attention reads as is.

use super::buffer::TokenBuffer;
use crate::error::{KvError, Result};
use crate::gather::gather_tokens;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub(crate) struct UniformRows {
    pub keys: TokenBuffer,
    pub values: TokenBuffer,
    /// int32 (batch, kv_heads, capacity) positions on the CPU: where each key is rotated
    /// now; `None` while the stored tokens are exactly positions 0..len (nothing evicted).
    pub positions: Option<TokenBuffer>,
    /// int32 original positions, once a re-rotation moved keys away from them (`None`:
    /// the same as `positions`).
    pub original: Option<TokenBuffer>,
}

impl UniformRows {
    /// Adopts the first keys/values without copying.
    pub fn adopt(keys: &Tensor, values: &Tensor) -> Self {
        UniformRows {
            keys: TokenBuffer::adopt(keys.shallow_clone()),
            values: TokenBuffer::adopt(values.shallow_clone()),
            positions: None,
            original: None,
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn nbytes(&self) -> usize {
        self.keys.nbytes()
            + self.values.nbytes()
            + self.positions.as_ref().map_or(0, TokenBuffer::nbytes)
            + self.original.as_ref().map_or(0, TokenBuffer::nbytes)
    }

    /// Appends q new tokens at positions first_position..first_position + q, whose
    /// original positions are `shift` further on.
    pub fn append(
        &mut self,
        keys: &Tensor,
        values: &Tensor,
        first_position: usize,
        shift: i64,
    ) -> Result<()> {
        self.keys.append(keys)?;
        self.values.append(values)?;
        let size = keys.size();
        let range = |start: i64| -> Result<Tensor> {
            Ok(position_range(start.max(0) as usize, size[2] as usize)?
                .f_expand([size[0], size[1], size[2]], false)?)
        };
        if let Some(p) = &mut self.positions {
            p.append(&range(first_position as i64)?)?;
        }
        if let Some(o) = &mut self.original {
            o.append(&range(first_position as i64 + shift)?)?;
        }
        Ok(())
    }

    /// int32 (batch, kv_heads, len) original positions.
    pub fn original_positions(&self) -> Result<Tensor> {
        match &self.original {
            Some(o) => o.view(),
            None => self.positions(),
        }
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

    /// The rows keeping only `indices` (int64 (batch, kv_heads, k), ascending). An index
    /// of −1 is a filler slot (a row of a padded batch that keeps fewer tokens): it holds a
    /// copy of the row's first token at position −1, and no attention sees it.
    pub fn gathered(&self, indices: &Tensor) -> Result<UniformRows> {
        let cpu_indices = indices.f_to(Device::Cpu)?;
        if indices.numel() > 0 && cpu_indices.f_min()?.f_int64_value(&[])? < -1 {
            return Err(KvError::invalid(
                "indices",
                "expected stored token indices >= 0, or -1 for a padded row's filler slot",
            ));
        }
        let fillers = cpu_indices.f_lt(0)?;
        let has_fillers = indices.numel() > 0 && fillers.f_any()?.f_int64_value(&[])? != 0;
        let (indices, cpu_indices) = if has_fillers {
            (indices.f_clamp_min(0)?, cpu_indices.f_clamp_min(0)?)
        } else {
            (indices.shallow_clone(), cpu_indices)
        };
        let positions = match &self.positions {
            // nothing evicted yet: the stored tokens are positions 0..len, so the kept
            // positions are the kept indices themselves
            // (the keys' gather below checks that they lie within the stored tokens)
            None => cpu_indices.f_to_kind(Kind::Int)?.f_contiguous()?,
            Some(p) => gather_tokens(&p.view()?, &cpu_indices)?,
        };
        let mark = |p: Tensor| -> Result<Tensor> {
            Ok(if has_fillers {
                p.f_masked_fill(&fillers, -1)?
            } else {
                p
            })
        };
        let original = match &self.original {
            Some(o) => Some(TokenBuffer::adopt(mark(gather_tokens(
                &o.view()?,
                &cpu_indices,
            )?)?)),
            None => None,
        };
        Ok(UniformRows {
            keys: TokenBuffer::adopt(gather_tokens(&self.keys.view()?, &indices)?),
            values: TokenBuffer::adopt(gather_tokens(&self.values.view()?, &indices)?),
            positions: Some(TokenBuffer::adopt(mark(positions)?)),
            original,
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
            original: match &self.original {
                Some(o) => Some(TokenBuffer::adopt(f(&o.view()?)?)),
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
        if let Some(o) = &mut self.original {
            o.truncate(len)?;
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
