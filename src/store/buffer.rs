//! A tensor that grows along the token axis with spare capacity, so that decoding appends
//! one token in place instead of copying the whole cache every step (as `torch.cat` does).

use crate::error::Result;
use crate::tensor::TOKEN_AXIS;
use tch::Tensor;

/// Spare tokens reserved when a buffer grows: an eighth of the length, between 16 and 64.
/// Small and bounded, so that what `nbytes` reports stays close to what is stored, while
/// the regrowth copy happens once per that many decoded tokens instead of every step.
fn reserve_tokens(len: usize) -> usize {
    (len / 8).clamp(16, 64)
}

/// A (batch, heads, capacity[, dim]) tensor of which the first `len` tokens are valid.
#[derive(Debug)]
pub(crate) struct TokenBuffer {
    data: Tensor,
    len: usize,
}

impl TokenBuffer {
    /// Takes `t` as the buffer's storage without copying; capacity = its token count.
    pub fn adopt(t: Tensor) -> Self {
        let len = t.size()[TOKEN_AXIS as usize] as usize;
        TokenBuffer { data: t, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn capacity(&self) -> usize {
        self.data.size()[TOKEN_AXIS as usize] as usize
    }

    /// The valid tokens, a view of the storage (the storage itself when full).
    pub fn view(&self) -> Result<Tensor> {
        if self.len == self.capacity() {
            return Ok(self.data.shallow_clone());
        }
        Ok(self.data.f_narrow(TOKEN_AXIS, 0, self.len as i64)?)
    }

    /// Bytes of storage held, spare capacity included.
    pub fn nbytes(&self) -> usize {
        self.data.numel() * self.data.kind().elt_size_in_bytes()
    }

    /// Appends `x` (same shape but for the token axis) after the valid tokens. Tokens
    /// already handed out through `view` are never overwritten.
    pub fn append(&mut self, x: &Tensor) -> Result<()> {
        let q = x.size()[TOKEN_AXIS as usize] as usize;
        let needed = self.len + q;
        if needed > self.capacity() {
            self.reallocate(needed + reserve_tokens(needed))?;
        }
        let mut slot = self.data.f_narrow(TOKEN_AXIS, self.len as i64, q as i64)?;
        slot.f_copy_(x)?;
        self.len = needed;
        Ok(())
    }

    /// A copy of the valid tokens in fresh storage of exactly that size.
    pub fn copy_exact(&self) -> Result<TokenBuffer> {
        let view = self.view()?;
        let mut fresh = Tensor::f_empty(view.size().as_slice(), (view.kind(), view.device()))?;
        fresh.f_copy_(&view)?;
        Ok(TokenBuffer::adopt(fresh))
    }

    /// Keeps the first `len` tokens, in fresh storage of exactly that size (so that later
    /// appends cannot write into memory that earlier views still show).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let mut size = self.data.size();
        size[TOKEN_AXIS as usize] = len as i64;
        let mut kept = Tensor::f_empty(size.as_slice(), (self.data.kind(), self.data.device()))?;
        kept.f_copy_(&self.data.f_narrow(TOKEN_AXIS, 0, len as i64)?)?;
        *self = TokenBuffer::adopt(kept);
        Ok(())
    }

    fn reallocate(&mut self, capacity: usize) -> Result<()> {
        let mut size = self.data.size();
        size[TOKEN_AXIS as usize] = capacity as i64;
        let grown = Tensor::f_empty(size.as_slice(), (self.data.kind(), self.data.device()))?;
        if self.len > 0 {
            let mut head = grown.f_narrow(TOKEN_AXIS, 0, self.len as i64)?;
            head.f_copy_(&self.data.f_narrow(TOKEN_AXIS, 0, self.len as i64)?)?;
        }
        self.data = grown;
        Ok(())
    }
}
