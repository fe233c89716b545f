//! `kvpress_rs._native.assemble_layer` and `select_deviating`: chunk placement and the
//! choice of tokens to recompute (`crate::chunks`) for Python.

use super::conversion::PyTensor;
use super::errors::detached;
use super::rope::PyRope;
use super::store::PyLayerStore;
use crate::chunks::{self, ChunkLayer};
use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(assemble_layer, m)?)?;
    m.add_function(wrap_pyfunction!(select_deviating, m)?)?;
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
