//! [`QuantizedTensor`]: one (batch, heads, tokens, head_dim) tensor quantized group-wise,
//! in the layout of `layout.rs`. The quantized store appends these as blocks; the
//! functional API (`kvpress_rs.ops.quantize`) hands one out.

use super::layout::TensorLayout;
use super::{cpu, libtorch};
use crate::error::{KvError, Result};
use crate::tensor::{check_finite, check_kv, uses_cpu_kernels};
use tch::{Device, Kind, Tensor};

/// A quantized tensor: codes, float16 scales/zeros and sparse outliers. See the module
/// documentation of `layout.rs` for where each element lives.
#[derive(Debug)]
pub struct QuantizedTensor {
    pub(crate) layout: TensorLayout,
    pub(crate) batch: usize,
    pub(crate) heads: usize,
    pub(crate) tokens: usize,
    /// The dtype of the tensor that was quantized (and of the outlier values).
    pub(crate) kind: Kind,
    /// u8 (batch, heads, groups · group_bytes).
    pub(crate) codes: Tensor,
    /// f16 (batch, heads, groups, 2): (scale, zero).
    pub(crate) params: Tensor,
    /// u8 (batch, heads, groups, outliers) and `kind` (batch, heads, groups, outliers);
    /// `None` without outliers.
    pub(crate) outliers: Option<(Tensor, Tensor)>,
}

impl QuantizedTensor {
    /// Quantizes `x` (batch, heads, tokens, head_dim); tokens must be a positive multiple of
    /// the group size and every value finite. CPU tensors run the Rust kernels, others the
    /// libtorch ops (same codes bit for bit).
    pub fn quantize(x: &Tensor, layout: TensorLayout, argument: &str) -> Result<Self> {
        let shape = check_kv(x, argument)?;
        layout.check(argument)?;
        if shape.head_dim != layout.head_dim {
            return Err(KvError::shape(
                argument,
                &x.size(),
                format!("head_dim {}", layout.head_dim),
            ));
        }
        if shape.tokens == 0 || shape.tokens % layout.group_size != 0 {
            return Err(KvError::shape(
                argument,
                &x.size(),
                format!(
                    "a positive multiple of group_size ({}) tokens: tokens are quantized in whole groups",
                    layout.group_size
                ),
            ));
        }
        if uses_cpu_kernels(x) {
            cpu::encode(x, layout, argument) // checks finiteness tile by tile
        } else {
            check_finite(x, argument)?;
            libtorch::encode(x, layout, argument)
        }
    }

    /// The dequantized tensor (batch, heads, tokens, head_dim) in the original dtype, on the
    /// same device (a new tensor).
    pub fn dequantize(&self) -> Result<Tensor> {
        if uses_cpu_kernels(&self.codes) {
            cpu::decode(self)
        } else {
            let x = libtorch::decode_f32(self, true)?;
            Ok(x.f_to_kind(self.kind)?)
        }
    }

    pub fn layout(&self) -> TensorLayout {
        self.layout
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.codes.device()
    }

    /// Groups per (batch, head).
    pub fn groups(&self) -> usize {
        self.layout.groups(self.tokens)
    }

    /// The packed codes, u8 (batch, heads, groups · group_bytes).
    pub fn codes(&self) -> &Tensor {
        &self.codes
    }

    /// float16 (batch, heads, groups, 2): scale and zero of every group.
    pub fn params(&self) -> &Tensor {
        &self.params
    }

    /// Outlier positions (u8) and exact values (the original dtype), each
    /// (batch, heads, groups, outliers per group), or `None`.
    pub fn outliers(&self) -> Option<&(Tensor, Tensor)> {
        self.outliers.as_ref()
    }

    /// Bytes held: codes, scales/zeros and outliers.
    pub fn nbytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        bytes(&self.codes)
            + bytes(&self.params)
            + self
                .outliers
                .as_ref()
                .map_or(0, |(p, v)| bytes(p) + bytes(v))
    }

    /// This tensor with its batch rows mapped by `f` (index_select / repeat_interleave).
    pub(crate) fn map_batch(&self, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let codes = f(&self.codes)?;
        let batch = codes.size()[0] as usize;
        Ok(QuantizedTensor {
            layout: self.layout,
            batch,
            heads: self.heads,
            tokens: self.tokens,
            kind: self.kind,
            codes,
            params: f(&self.params)?,
            outliers: match &self.outliers {
                Some((p, v)) => Some((f(p)?, f(v)?)),
                None => None,
            },
        })
    }
}
