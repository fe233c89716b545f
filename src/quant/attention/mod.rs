//! Attention over a [`QuantizedStore`](super::QuantizedStore): scores, softmax and the
//! weighted sum of values for a chunk of queries, reading the quantized blocks where they
//! are.
//!
//! - `cpu.rs`: the fused Rust kernel. It dequantizes codes on the fly inside the score and
//!   value loops (no full-precision copy of any block), f32 accumulation, online (stable)
//!   softmax, parallel over (batch, kv head, token range) with the query heads of one KV
//!   head handled together.
//! - `libtorch.rs`: the path of other devices: one block at a time is dequantized (never
//!   the whole cache), scores and weighted sums are libtorch matmuls.

mod cpu;
mod libtorch;

use super::store::{QuantizedStore, StoreShape};
use crate::error::{KvError, Result};
use crate::tensor::{device_name, kind_name, kind_of, uses_cpu_kernels, FLOAT_KINDS};
use tch::{Kind, Tensor};

/// Validated arguments of one attention call.
pub(crate) struct AttendInputs<'a> {
    pub query: &'a Tensor,
    pub mask: Option<&'a Tensor>,
    pub scaling: f32,
    pub dims: Dims,
}

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub batch: usize,
    pub kv_heads: usize,
    pub q_heads: usize,
    pub q_len: usize,
    /// Query heads per KV head.
    pub n_rep: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    /// Tokens stored (the keys attended to).
    pub seen: usize,
}

impl<'a> AttendInputs<'a> {
    pub fn new(
        store: &QuantizedStore,
        shape: &StoreShape,
        query: &'a Tensor,
        mask: Option<&'a Tensor>,
        scaling: f64,
    ) -> Result<Self> {
        let size = query.size();
        if size.len() != 4 {
            return Err(KvError::shape(
                "query",
                &size,
                "rank 4: (batch, q_heads, q_len, head_dim)",
            ));
        }
        let kind = kind_of(query, "query")?;
        if !FLOAT_KINDS.contains(&kind) {
            return Err(KvError::dtype(
                "query",
                kind_name(kind),
                "torch.float32, torch.float16 or torch.bfloat16",
            ));
        }
        if query.device() != shape.device {
            return Err(KvError::device(
                "query",
                device_name(query.device()),
                device_name(shape.device),
            ));
        }
        let (batch, q_heads, q_len, dim) = (
            size[0] as usize,
            size[1] as usize,
            size[2] as usize,
            size[3] as usize,
        );
        let seen = store.seen();
        if batch != shape.batch
            || q_heads == 0
            || q_heads % shape.heads != 0
            || dim != shape.key_dim
            || q_len == 0
            || q_len > seen
        {
            return Err(KvError::shape(
                "query",
                &size,
                format!(
                    "({}, a multiple of {} heads, 1..={seen} queries, {})",
                    shape.batch, shape.heads, shape.key_dim
                ),
            ));
        }
        if !scaling.is_finite() {
            return Err(KvError::invalid(
                "scaling",
                format!("got {scaling}, expected a finite number"),
            ));
        }
        if let Some(m) = mask {
            let ms = m.size();
            let mkind = kind_of(m, "mask")?;
            if mkind != Kind::Bool {
                return Err(KvError::dtype("mask", kind_name(mkind), "torch.bool"));
            }
            if ms.len() != 3
                || !(ms[0] == 1 || ms[0] == batch as i64)
                || ms[1] != q_len as i64
                || ms[2] != seen as i64
            {
                return Err(KvError::shape(
                    "mask",
                    &ms,
                    format!("(1 or {batch}, {q_len}, {seen}): which stored tokens each query may attend to"),
                ));
            }
            if m.device() != shape.device {
                return Err(KvError::device(
                    "mask",
                    device_name(m.device()),
                    device_name(shape.device),
                ));
            }
        }
        Ok(AttendInputs {
            query,
            mask,
            scaling: scaling as f32,
            dims: Dims {
                batch,
                kv_heads: shape.heads,
                q_heads,
                q_len,
                n_rep: q_heads / shape.heads,
                key_dim: shape.key_dim,
                value_dim: shape.value_dim,
                seen,
            },
        })
    }
}

impl Dims {
    /// Query rows handled together per KV head: n_rep heads × q_len queries, row
    /// `r = j·q_len + i` for query head `kv_head·n_rep + j` and query `i`.
    pub fn rows(&self) -> usize {
        self.n_rep * self.q_len
    }

    /// How many stored tokens query `i` sees without a mask (causal among the new tokens).
    pub fn causal_limit(&self, i: usize) -> usize {
        self.seen - self.q_len + i + 1
    }
}

/// The f32 output (batch, q_len, q_heads, value head_dim) and the log-sum-exp of every
/// query row's scores (batch, q_len, q_heads): what merging with other stores needs.
pub(crate) fn attend(
    store: &QuantizedStore,
    inputs: &AttendInputs<'_>,
) -> Result<(Tensor, Tensor)> {
    if uses_cpu_kernels(inputs.query) {
        cpu::attend(store, inputs)
    } else {
        libtorch::attend(store, inputs)
    }
}
