//! `kvpress_rs._native.assemble_layer` and `select_deviating`: chunk placement and the
//! choice of tokens to recompute (`crate::chunks`) for Python.

use super::conversion::DtypeName;
use super::conversion::PyTensor;
use super::errors::detached;
use super::quant::{PyQuantConfig, PyQuantizedStore};
use super::rope::PyRope;
use super::store::PyLayerStore;
use crate::chunks::{self, ChunkLayer};
use crate::quant::parts::{self, NamedParts};
use crate::quant::store::StoreShape;
use pyo3::prelude::*;
use std::collections::HashMap;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(assemble_layer, m)?)?;
    m.add_function(wrap_pyfunction!(select_deviating, m)?)?;
    m.add_function(wrap_pyfunction!(assemble_quantized_layer, m)?)?;
    Ok(())
}

/// One layer of an assembled cache: the chunks of ``parts`` placed one after the other,
/// each chunk's keys shifted to its offset with one rotation, concatenated into a new
/// ``LayerStore`` that has seen the total token count.
///
/// Parameters
/// ----------
/// rope : Rope
///     The model's RoPE.
/// parts : list of (keys, values, positions, tokens)
///     keys/values (batch, kv_heads, stored, head_dim) encoded at positions 0..tokens;
///     positions: int (batch, kv_heads, stored) chunk-local kept positions, or None when
///     every token is stored; tokens: the chunk's token count.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> rope = kvpress_rs._native.Rope(8)
/// >>> k = torch.randn(1, 2, 3, 8)
/// >>> store = kvpress_rs._native.assemble_layer(rope, [(k, k, None, 3), (k, k, None, 3)])
/// >>> store.seen, torch.allclose(store.keys()[:, :, 3:], rope.shift(k, 3))
/// (6, True)
#[pyfunction]
fn assemble_layer(
    py: Python<'_>,
    rope: Bound<'_, PyRope>,
    parts: Vec<(PyTensor, PyTensor, Option<PyTensor>, usize)>,
) -> PyResult<PyLayerStore> {
    let rope = rope.get();
    let parts: Vec<ChunkLayer> = parts
        .into_iter()
        .map(|(k, v, p, tokens)| ChunkLayer {
            keys: k.0,
            values: v.0,
            positions: p.map(|p| p.0),
            tokens,
        })
        .collect();
    let store = detached(py, move || chunks::assemble(&rope.inner, &parts))?;
    Ok(PyLayerStore::from_store(store))
}

/// The ``n`` tokens among ``candidates`` (bool (tokens,)) whose values deviate most between
/// ``reused`` and ``fresh`` ((batch, kv_heads, tokens, head_dim), one layer): by
/// Σ_{batch, head, channel} (fresh − reused)², computed in float64. Returns int64 token
/// indices, ascending; ties go to the earlier token.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> reused = torch.zeros(1, 1, 4, 2)
/// >>> fresh = torch.tensor([0.0, 3.0, 1.0, 2.0]).view(1, 1, 4, 1).expand(1, 1, 4, 2)
/// >>> kvpress_rs._native.select_deviating(reused, fresh, torch.ones(4, dtype=torch.bool), 2)
/// tensor([1, 3])
#[pyfunction]
fn select_deviating(
    py: Python<'_>,
    reused: PyTensor,
    fresh: PyTensor,
    candidates: PyTensor,
    n: usize,
) -> PyResult<PyTensor> {
    detached(py, move || {
        chunks::recompute::select_deviating(&reused.0, &fresh.0, &candidates.0, n)
    })
    .map(PyTensor)
}

/// One layer of an assembled QUANTIZED cache: the parts of quantized chunk stores (as
/// ``QuantizedStore.parts()`` gives them) placed one after the other. Blocks move by
/// their offset (positions only: codes are reused as they are); each chunk's
/// full-precision tokens are shifted to their global positions with one rotation and held
/// in front; the residual window is empty. Every tensor is checked (shape, dtype, device,
/// positions within the chunk); a bad one raises naming it.
///
/// Parameters
/// ----------
/// config : QuantConfig
///     With ``pre_rope_keys=True`` and ``sink_tokens=0``; its residual window takes the
///     tokens appended later.
/// rope : Rope
///     The model's RoPE.
/// shape : (batch, kv_heads, key_head_dim, value_head_dim)
/// dtype : torch.dtype
///     The cache dtype (of full-precision tokens and outlier values).
/// parts : list of (dict of name -> tensor, tokens)
///     Each chunk's parts and its token count.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> rope = kvpress_rs._native.Rope(64)
/// >>> cfg = kvpress_rs.QuantConfig(bits=8, residual_length=0, pre_rope_keys=True)
/// >>> chunk = kvpress_rs._native.QuantizedStore(cfg, rope)
/// >>> chunk.append(torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64))
/// >>> parts = chunk.parts()
/// >>> store = kvpress_rs._native.assemble_quantized_layer(cfg, rope, (1, 2, 64, 64), torch.float32, [(parts, 40), (parts, 40)])
/// >>> store.seen, store.sink_tokens, store.quantized_tokens
/// (80, 16, 64)
#[pyfunction]
fn assemble_quantized_layer(
    py: Python<'_>,
    config: &PyQuantConfig,
    rope: Bound<'_, PyRope>,
    shape: (usize, usize, usize, usize),
    dtype: DtypeName,
    parts: Vec<(HashMap<String, PyTensor>, usize)>,
) -> PyResult<PyQuantizedStore> {
    let rope = rope.get();
    let config = config.inner;
    let parts: Vec<NamedParts> = parts
        .into_iter()
        .map(|(tensors, tokens)| NamedParts {
            tensors: tensors.into_iter().map(|(n, t)| (n, t.0)).collect(),
            tokens,
        })
        .collect();
    let store = detached(py, move || {
        let (batch, heads, key_dim, value_dim) = shape;
        let shape = StoreShape {
            batch,
            heads,
            key_dim,
            value_dim,
            kind: parts::float_kind(&dtype.0)?,
            device: tch::Device::Cpu,
        };
        parts::assemble(config, &rope.inner, shape, &parts)
    })?;
    Ok(PyQuantizedStore::from_store(store))
}
