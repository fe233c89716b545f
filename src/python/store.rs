//! `kvpress_rs._native.LayerStore`: one layer's compressed KV store (see `crate::store`).
//!
//! Thread safety: every method locks the store, so concurrent calls from several Python
//! threads are serialised, never interleaved.

use super::conversion::PyTensor;
use super::errors::{detached, to_pyerr};
use super::rope::PyRope;
use crate::error::{KvError, Result};
use crate::store::{KeptPositions, LayerStore};
use pyo3::prelude::*;
use std::sync::{Mutex, MutexGuard};

/// One layer's KV cache with eviction: keys/values (batch, kv_heads, tokens, head_dim), the
/// original positions of the kept tokens, and the number of tokens seen.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> store = kvpress_rs._native.LayerStore()
/// >>> k = torch.randn(1, 2, 8, 4)
/// >>> keys, values = store.append(k, k)
/// >>> kvpress_rs._native.Press("knorm", compression_ratio=0.5).compress(store, kvpress_rs._native.Plan.prefill(0)).evicted
/// True
/// >>> store.seen, store.stored
/// (8, 4)
#[pyclass(name = "LayerStore", module = "kvpress_rs._native", frozen)]
pub struct PyLayerStore {
    inner: Mutex<LayerStore>,
}

impl PyLayerStore {
    /// Wraps a store built in the core (an assembled cache's layer).
    pub(crate) fn from_store(store: LayerStore) -> Self {
        PyLayerStore {
            inner: Mutex::new(store),
        }
    }

    /// Takes the store out, leaving an empty one.
    pub(crate) fn take(&self) -> Result<LayerStore> {
        Ok(std::mem::take(&mut *self.lock()?))
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, LayerStore>> {
        // A poisoned lock means an earlier call panicked mid-update: refuse to go on.
        self.inner.lock().map_err(|_| {
            KvError::State(
                "the layer store is poisoned by an earlier internal error; reset the cache".into(),
            )
        })
    }
}

#[pymethods]
impl PyLayerStore {
    #[new]
    fn new() -> Self {
        PyLayerStore {
            inner: Mutex::new(LayerStore::new()),
        }
    }

    /// Appends (batch, kv_heads, q, head_dim) keys/values and returns all stored keys and
    /// values followed by the new ones (views, no copy). The first append adopts the given
    /// tensors without copying them.
    fn append(
        slf: Bound<'_, Self>,
        keys: PyTensor,
        values: PyTensor,
    ) -> PyResult<(PyTensor, PyTensor)> {
        let me = slf.get();
        let (k, v) = detached(slf.py(), move || me.lock()?.append(&keys.0, &values.0))?;
        Ok((PyTensor(k), PyTensor(v)))
    }

    /// Re-rotates the kept keys to compact positions ending right before ``next_position``
    /// (each row's kept token i of n goes to next_position − n + i); the store then
    /// continues at ``next_position``; ``kept_positions`` stays the original positions,
    /// ``key_positions`` gives the new ones.
    fn rerotate(
        slf: Bound<'_, Self>,
        rope: Bound<'_, PyRope>,
        next_position: usize,
    ) -> PyResult<()> {
        let me = slf.get();
        let rope = rope.get();
        detached(slf.py(), move || {
            me.lock()?.rerotate(&rope.inner, next_position, &[], &[])
        })
    }

    /// Replaces the stored tokens at ``indices`` (int64 (n,), the same in every row) by
    /// ``keys``/``values`` (batch, kv_heads, n, head_dim), in fresh storage (recomputed
    /// tokens of an assembled cache).
    fn overwrite_tokens(
        slf: Bound<'_, Self>,
        indices: PyTensor,
        keys: PyTensor,
        values: PyTensor,
    ) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || {
            me.lock()?.overwrite_tokens(&indices.0, &keys.0, &values.0)
        })
    }

    /// Keeps only the stored tokens at ``indices``: int64 (batch, kv_heads, k), ascending.
    fn retain(slf: Bound<'_, Self>, indices: PyTensor) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.retain(&indices.0))
    }

    /// The stored keys (batch, kv_heads, stored, head_dim), a view.
    fn keys(slf: Bound<'_, Self>) -> PyResult<PyTensor> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.keys_view()).map(PyTensor)
    }

    /// The stored values (batch, kv_heads, stored, head_dim), a view.
    fn values(slf: Bound<'_, Self>) -> PyResult<PyTensor> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.values_view()).map(PyTensor)
    }

    /// Where the stored keys are rotated now: original positions, or compact ones after
    /// :meth:`rerotate` (int64 (batch, kv_heads, stored), or a list per row).
    fn key_positions<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let me = slf.get();
        let py = slf.py();
        match detached(py, move || me.lock()?.key_positions())? {
            KeptPositions::Uniform(t) => PyTensor(t).into_pyobject(py),
            KeptPositions::Ragged(rows) => {
                let rows: Vec<PyTensor> = rows.into_iter().map(PyTensor).collect();
                Ok(rows.into_pyobject(py)?.into_any())
            }
        }
    }

    /// Original positions of the stored tokens, ascending: an int64 tensor
    /// (batch, kv_heads, stored) when rows are uniform, else a list of int64 (n_r,)
    /// tensors, one per row r = b * kv_heads + h.
    fn kept_positions<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let me = slf.get();
        let py = slf.py();
        match detached(py, move || me.lock()?.kept_positions())? {
            KeptPositions::Uniform(t) => PyTensor(t).into_pyobject(py),
            KeptPositions::Ragged(rows) => {
                let rows: Vec<PyTensor> = rows.into_iter().map(PyTensor).collect();
                Ok(rows.into_pyobject(py)?.into_any())
            }
        }
    }

    /// Tokens stored in each (batch, kv_head) row, row-major.
    fn lengths(&self) -> PyResult<Vec<usize>> {
        Ok(self.lock().map_err(to_pyerr)?.lengths())
    }

    /// Row (b, h)'s keys and values (1, 1, len, head_dim), views.
    fn row(slf: Bound<'_, Self>, b: usize, h: usize) -> PyResult<(PyTensor, PyTensor)> {
        let me = slf.get();
        let (k, v) = detached(slf.py(), move || me.lock()?.row_views(b, h))?;
        Ok((PyTensor(k), PyTensor(v)))
    }

    /// Keeps, in row r = b * kv_heads + h, only the stored tokens at ``rows[r]`` (int64,
    /// ascending); rows may keep different counts.
    fn retain_rows(slf: Bound<'_, Self>, rows: Vec<PyTensor>) -> PyResult<()> {
        let me = slf.get();
        let rows: Vec<_> = rows.into_iter().map(|t| t.0).collect();
        detached(slf.py(), move || me.lock()?.retain_rows(&rows))
    }

    /// Attention of ``query`` (batch, q_heads, q, head_dim) — the q newest tokens, already
    /// appended — over every row; returns (batch, q, q_heads, head_dim).
    fn attend_rows(slf: Bound<'_, Self>, query: PyTensor, scaling: f64) -> PyResult<PyTensor> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.attend_rows(&query.0, scaling)).map(PyTensor)
    }

    /// (batch, kv_heads) of the stored rows, or None while empty.
    #[getter]
    fn batch_heads(&self) -> PyResult<Option<(usize, usize)>> {
        Ok(self.lock().map_err(to_pyerr)?.batch_heads())
    }

    /// Whether rows have their own lengths (a head budget was applied).
    #[getter]
    fn is_ragged(&self) -> PyResult<bool> {
        Ok(self.lock().map_err(to_pyerr)?.is_ragged())
    }

    /// Forgets the last ``n`` tokens seen (only tokens still stored can be removed).
    fn crop(slf: Bound<'_, Self>, n: usize) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.crop(n))
    }

    /// Keeps and reorders batch rows (beam search, batch selection).
    fn index_batch(slf: Bound<'_, Self>, indices: PyTensor) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.index_batch(&indices.0))
    }

    /// Repeats each batch row ``repeats`` times.
    fn repeat_interleave_batch(slf: Bound<'_, Self>, repeats: i64) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || {
            me.lock()?.repeat_interleave_batch(repeats)
        })
    }

    /// Drops everything: the store is as new.
    fn reset(&self) -> PyResult<()> {
        self.lock().map_err(to_pyerr)?.reset();
        Ok(())
    }

    /// Tokens seen since the last reset.
    #[getter]
    fn seen(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.seen())
    }

    /// Tokens stored per (batch, head) row.
    #[getter]
    fn stored(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.len())
    }

    /// Whether any token was ever evicted.
    #[getter]
    fn has_evicted(&self) -> PyResult<bool> {
        Ok(self.lock().map_err(to_pyerr)?.has_evicted())
    }

    /// Bytes held: keys, values (spare capacity included) and kept positions.
    #[getter]
    fn nbytes(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.nbytes())
    }

    fn __repr__(&self) -> PyResult<String> {
        let s = self.lock().map_err(to_pyerr)?.stats();
        Ok(format!(
            "LayerStore(seen={}, stored={}, nbytes={})",
            s.seen, s.stored, s.nbytes
        ))
    }
}
