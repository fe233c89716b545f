//! `kvpress_rs._native.LayerState` and `LayerGroup`: one layer's whole state and the
//! steps of a forward through it (see `crate::layer`), and the cross-layer steps of a
//! cache. The transformers adapters in `kvpress_rs/cache.py` hold these and only
//! translate calls.
//!
//! Thread safety: each layer locks itself per call; a group locks its layers one at a time.

use super::conversion::PyTensor;
use super::decoding::{PyDecodingSchedule, PyQueryStats};
use super::errors::{detached, to_pyerr};
use super::press::PyPress;
use super::quant::{PyQuantConfig, PyQuantizedStore, PyRopeTable};
use super::rope::PyRope;
use super::store::PyLayerStore;
use crate::error::Result;
use crate::layer::group::{lock, SharedLayer};
use crate::layer::{DecodingState, HeadSplit, LayerGroup, LayerState, Quantization};
use crate::store::KeptPositions;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{Arc, Mutex, MutexGuard};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLayerState>()?;
    m.add_class::<PyLayerGroup>()?;
    Ok(())
}

fn quantization(
    config: Option<&PyQuantConfig>,
    low: Option<&PyQuantConfig>,
    rope: Option<&PyRope>,
    table: Option<&PyRopeTable>,
) -> Option<Arc<Quantization>> {
    config.map(|c| {
        Arc::new(Quantization {
            config: c.inner,
            low: low.map(|l| l.inner),
            rope: rope.map(|r| r.inner.clone()),
            table: table.map(PyRopeTable::shared),
        })
    })
}

fn positions_to_py<'py>(py: Python<'py>, positions: KeptPositions) -> PyResult<Bound<'py, PyAny>> {
    match positions {
        KeptPositions::Uniform(t) => PyTensor(t).into_pyobject(py),
        KeptPositions::Ragged(rows) => {
            let rows: Vec<PyTensor> = rows.into_iter().map(PyTensor).collect();
            Ok(rows.into_pyobject(py)?.into_any())
        }
    }
}

/// One layer's state: its stores, counts, decoding state and pending step (see
/// ``docs/ARCHITECTURE.md``). A transformers cache layer calls :meth:`append` in
/// ``update``, runs attention where :attr:`route` says, then :meth:`after_attention` with
/// the layer's queries; a :class:`LayerGroup` runs the cross-layer steps after the forward.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> press = kvpress_rs._native.Press("knorm", compression_ratio=0.5)
/// >>> layer = kvpress_rs._native.LayerState(0, press)
/// >>> k = torch.randn(1, 2, 8, 4)
/// >>> keys, values = layer.append(k, k, True)
/// >>> layer.route, keys.shape[2]
/// ('model', 8)
/// >>> layer.after_attention(torch.randn(1, 4, 8, 4))
/// >>> layer.seen, layer.stored
/// (8, 4)
#[pyclass(name = "LayerState", module = "kvpress_rs._native", frozen)]
pub struct PyLayerState {
    inner: SharedLayer,
}

impl PyLayerState {
    fn lock(&self) -> Result<MutexGuard<'_, LayerState>> {
        lock(&self.inner)
    }

    fn wrap(state: LayerState) -> Self {
        PyLayerState {
            inner: Arc::new(Mutex::new(state)),
        }
    }
}

#[pymethods]
impl PyLayerState {
    /// A layer of a compressing cache: ``press`` compresses the prompt right after its
    /// attention (None: append only); with ``quantization`` the kept tokens are then
    /// quantized once (``low_bits``: the config of the tokens the press sets aside); with
    /// ``decoding`` (a DecodingSchedule) the layer keeps compressing as it grows, scoring
    /// with calibrated ``query_stats`` when given (TriAttention).
    #[new]
    #[pyo3(signature = (layer_idx, press=None, *, quantization=None, low_bits=None, rope=None,
        rope_table=None, decoding=None, query_stats=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        layer_idx: usize,
        press: Option<Bound<'_, PyPress>>,
        quantization: Option<Bound<'_, PyQuantConfig>>,
        low_bits: Option<Bound<'_, PyQuantConfig>>,
        rope: Option<Bound<'_, PyRope>>,
        rope_table: Option<Bound<'_, PyRopeTable>>,
        decoding: Option<Bound<'_, PyDecodingSchedule>>,
        query_stats: Option<Bound<'_, PyQueryStats>>,
    ) -> PyResult<Self> {
        let press = press.map(|p| p.get().shared());
        let q = self::quantization(
            quantization.as_ref().map(|c| c.get()),
            low_bits.as_ref().map(|c| c.get()),
            rope.as_ref().map(|r| r.get()),
            rope_table.as_ref().map(|t| t.get()),
        );
        let decoding = match (decoding, &press) {
            (Some(schedule), Some(press)) => {
                let stats = query_stats
                    .map(|s| s.get().lock().map(|g| g.copy()))
                    .transpose()
                    .map_err(to_pyerr)?;
                Some(DecodingState::new(schedule.get().inner, press, stats))
            }
            (Some(_), None) => {
                return Err(to_pyerr(crate::KvError::invalid(
                    "decoding",
                    "decoding-time compression needs a press",
                )))
            }
            (None, _) => None,
        };
        Ok(Self::wrap(LayerState::compressed(
            layer_idx, press, q, decoding,
        )))
    }

    /// A layer quantized from its first token, with no press (``QuantizedKVCache``).
    #[staticmethod]
    #[pyo3(signature = (layer_idx, config, rope=None, rope_table=None))]
    fn quantized(
        layer_idx: usize,
        config: Bound<'_, PyQuantConfig>,
        rope: Option<Bound<'_, PyRope>>,
        rope_table: Option<Bound<'_, PyRopeTable>>,
    ) -> PyResult<Self> {
        let q = self::quantization(
            Some(config.get()),
            None,
            rope.as_ref().map(|r| r.get()),
            rope_table.as_ref().map(|t| t.get()),
        );
        let q = q.ok_or_else(|| to_pyerr(crate::KvError::State("no config".into())))?;
        LayerState::quantized(layer_idx, q)
            .map(Self::wrap)
            .map_err(to_pyerr)
    }

    /// A layer whose KV heads are split: ``retrieval[h]`` keeps every token (quantized
    /// with ``quantization``), the other heads ``sink_tokens`` + ``heavy_hitters`` (chosen
    /// by SnapKV over the prompt's last ``observation_window`` queries) + ``window`` recent
    /// tokens (``RetrievalHeadsCache``).
    #[staticmethod]
    #[pyo3(signature = (layer_idx, retrieval, *, window, sink_tokens, heavy_hitters,
        observation_window, quantization=None, rope=None, rope_table=None))]
    #[allow(clippy::too_many_arguments)]
    fn heads(
        layer_idx: usize,
        retrieval: Vec<bool>,
        window: usize,
        sink_tokens: usize,
        heavy_hitters: usize,
        observation_window: usize,
        quantization: Option<Bound<'_, PyQuantConfig>>,
        rope: Option<Bound<'_, PyRope>>,
        rope_table: Option<Bound<'_, PyRopeTable>>,
    ) -> PyResult<Self> {
        let q = self::quantization(
            quantization.as_ref().map(|c| c.get()),
            None,
            rope.as_ref().map(|r| r.get()),
            rope_table.as_ref().map(|t| t.get()),
        );
        let split = HeadSplit::new(
            &retrieval,
            window,
            sink_tokens,
            heavy_hitters,
            observation_window,
            q,
        )
        .map_err(to_pyerr)?;
        Ok(Self::wrap(LayerState::heads(layer_idx, split)))
    }

    /// A layer holding ``store`` (taken: the LayerStore is left empty), as an assembled
    /// cache of reused chunks does; it appends without compressing.
    #[staticmethod]
    fn assembled(layer_idx: usize, store: Bound<'_, PyLayerStore>) -> PyResult<Self> {
        let store = store.get().take().map_err(to_pyerr)?;
        Ok(Self::wrap(LayerState::from_store(layer_idx, store)))
    }

    /// A layer holding quantized ``store`` (taken) after ``seen`` tokens, as a quantizing
    /// cache's layer is after its prompt.
    #[staticmethod]
    #[pyo3(signature = (layer_idx, store, seen, rope=None))]
    fn assembled_quantized(
        layer_idx: usize,
        store: Bound<'_, PyQuantizedStore>,
        seen: usize,
        rope: Option<Bound<'_, PyRope>>,
    ) -> PyResult<Self> {
        let store = store.get().take().map_err(to_pyerr)?;
        let q = Arc::new(Quantization {
            config: *store.config(),
            low: None,
            rope: rope.map(|r| r.get().inner.clone()),
            table: None,
        });
        LayerState::from_quantized(layer_idx, store, seen, q)
            .map(Self::wrap)
            .map_err(to_pyerr)
    }

    #[getter]
    fn layer_idx(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.layer_idx())
    }

    /// Appends the forward's keys/values (batch, kv_heads, q, head_dim); returns what the
    /// model's attention should see when :attr:`route` is "model". ``served``: whether the
    /// model's attention goes through kvpress_rs (so :meth:`after_attention` follows).
    fn append(
        slf: Bound<'_, Self>,
        keys: PyTensor,
        values: PyTensor,
        served: bool,
    ) -> PyResult<(PyTensor, PyTensor)> {
        let me = slf.get();
        let (k, v) = detached(slf.py(), move || {
            me.lock()?.append(&keys.0, &values.0, served)
        })?;
        Ok((PyTensor(k), PyTensor(v)))
    }

    /// Where this forward's attention runs: "model" (the model's attention over what
    /// :meth:`append` returned, with :meth:`model_mask`), "rows" (:meth:`attend_rows`),
    /// "kernel" (:meth:`attend_kernel`) or "heads" (:meth:`head_parts`).
    #[getter]
    fn route(&self) -> PyResult<&'static str> {
        Ok(self.lock().map_err(to_pyerr)?.route().name())
    }

    /// The 4-D mask for the model's attention over this layer's tokens and the ``q`` new
    /// ones: the model's ``mask`` when it describes them, else rebuilt (padding masked).
    #[pyo3(signature = (mask, q))]
    fn model_mask(
        slf: Bound<'_, Self>,
        mask: Option<PyTensor>,
        q: usize,
    ) -> PyResult<Option<PyTensor>> {
        let me = slf.get();
        let out = detached(slf.py(), move || {
            me.lock()?.model_mask(mask.as_ref().map(|m| &m.0), q)
        })?;
        Ok(out.map(PyTensor))
    }

    /// Fused-kernel attention of ``query`` (batch, q_heads, q, head_dim) over the quantized
    /// tokens (both precisions with mixed precision); ``mask``: the model's 4-D mask.
    /// Returns (batch, q, q_heads, head_dim).
    #[pyo3(signature = (query, mask, scaling))]
    fn attend_kernel(
        slf: Bound<'_, Self>,
        query: PyTensor,
        mask: Option<PyTensor>,
        scaling: f64,
    ) -> PyResult<PyTensor> {
        let me = slf.get();
        detached(slf.py(), move || {
            me.lock()?
                .attend_kernel(&query.0, mask.as_ref().map(|m| &m.0), scaling)
        })
        .map(PyTensor)
    }

    /// Attention over rows of their own lengths (a head budget), row by row.
    fn attend_rows(slf: Bound<'_, Self>, query: PyTensor, scaling: f64) -> PyResult<PyTensor> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.attend_rows(&query.0, scaling)).map(PyTensor)
    }

    /// A retrieval-heads layer's attention parts: (query_heads, keys, values, mask,
    /// kernel) each; ``kernel`` parts attend through :meth:`attend_retrieval`.
    #[allow(clippy::type_complexity)]
    fn head_parts(
        slf: Bound<'_, Self>,
        mask: Option<PyTensor>,
        q: usize,
        q_heads: usize,
    ) -> PyResult<
        Vec<(
            PyTensor,
            Option<PyTensor>,
            Option<PyTensor>,
            Option<PyTensor>,
            bool,
        )>,
    > {
        let me = slf.get();
        let parts = detached(slf.py(), move || {
            me.lock()?
                .head_parts(mask.as_ref().map(|m| &m.0), q, q_heads)
        })?;
        Ok(parts
            .into_iter()
            .map(|p| {
                (
                    PyTensor(p.query_heads),
                    p.keys.map(PyTensor),
                    p.values.map(PyTensor),
                    p.mask.map(PyTensor),
                    p.kernel,
                )
            })
            .collect())
    }

    /// Kernel attention of the retrieval heads' queries over their quantized store.
    #[pyo3(signature = (query, mask, scaling))]
    fn attend_retrieval(
        slf: Bound<'_, Self>,
        query: PyTensor,
        mask: Option<PyTensor>,
        scaling: f64,
    ) -> PyResult<PyTensor> {
        let me = slf.get();
        detached(slf.py(), move || {
            me.lock()?
                .attend_retrieval(&query.0, mask.as_ref().map(|m| &m.0), scaling)
        })
        .map(PyTensor)
    }

    /// After this layer's attention: the prompt's compression with the layer's post-RoPE
    /// ``query`` (batch, q_heads, q, head_dim), then the decoding-time schedule.
    fn after_attention(slf: Bound<'_, Self>, query: PyTensor) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.after_attention(&query.0))
    }

    /// Every stored token dequantized (or the full-precision views): (keys, values).
    fn dequantized(slf: Bound<'_, Self>) -> PyResult<(PyTensor, PyTensor)> {
        let me = slf.get();
        let (k, v) = detached(slf.py(), move || me.lock()?.dequantized())?;
        Ok((PyTensor(k), PyTensor(v)))
    }

    /// (kv_length, kv_offset) of the mask for a forward of ``query_length`` tokens.
    fn mask_sizes(&self, query_length: usize) -> PyResult<(usize, usize)> {
        Ok(self.lock().map_err(to_pyerr)?.mask_sizes(query_length))
    }

    /// Tokens seen (the position of the next token).
    #[getter]
    fn seen(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.seen())
    }

    /// Tokens stored per (batch, head) row (the longest row).
    #[getter]
    fn stored(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.stored())
    }

    /// Tokens stored in each (batch, kv head) row, row-major.
    fn lengths(&self) -> PyResult<Vec<usize>> {
        Ok(self.lock().map_err(to_pyerr)?.lengths())
    }

    /// Bytes held by the layer's stores.
    #[getter]
    fn nbytes(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.nbytes())
    }

    /// Per batch row, the hidden slots at the front of the stored tokens (padding).
    #[getter]
    fn hidden(&self) -> PyResult<Vec<usize>> {
        Ok(self.lock().map_err(to_pyerr)?.hidden().to_vec())
    }

    #[getter]
    fn is_quantized(&self) -> PyResult<bool> {
        Ok(self.lock().map_err(to_pyerr)?.is_quantized())
    }

    #[getter]
    fn is_ragged(&self) -> PyResult<bool> {
        Ok(self.lock().map_err(to_pyerr)?.is_ragged())
    }

    /// Whether the full-precision store ever evicted a token.
    #[getter]
    fn has_evicted(&self) -> PyResult<bool> {
        let g = self.lock().map_err(to_pyerr)?;
        Ok(g.store().is_some_and(|s| s.has_evicted()))
    }

    /// (batch, kv_heads) of the stored rows, or None while empty.
    #[getter]
    fn batch_heads(&self) -> PyResult<Option<(usize, usize)>> {
        let g = self.lock().map_err(to_pyerr)?;
        Ok(match (g.store(), g.quantized_store()) {
            (Some(s), _) => s.batch_heads(),
            (_, Some(q)) => q.shape().map(|s| (s.batch, s.heads)),
            _ => None,
        })
    }

    /// The stored keys (batch, kv_heads, stored, head_dim): views of a full-precision
    /// store, dequantized copies of a quantized one; None for rows of their own lengths.
    fn keys(slf: Bound<'_, Self>) -> PyResult<Option<PyTensor>> {
        let me = slf.get();
        let out = detached(slf.py(), move || {
            let g = me.lock()?;
            match g.store() {
                Some(s) if s.seen() == 0 || s.is_ragged() => Ok(None),
                _ if g.head_split().is_some() => Ok(None),
                _ => g.dequantized().map(|(k, _)| Some(k)),
            }
        })?;
        Ok(out.map(PyTensor))
    }

    /// The stored values, as :meth:`keys`.
    fn values(slf: Bound<'_, Self>) -> PyResult<Option<PyTensor>> {
        let me = slf.get();
        let out = detached(slf.py(), move || {
            let g = me.lock()?;
            match g.store() {
                Some(s) if s.seen() == 0 || s.is_ragged() => Ok(None),
                _ if g.head_split().is_some() => Ok(None),
                _ => g.dequantized().map(|(_, v)| Some(v)),
            }
        })?;
        Ok(out.map(PyTensor))
    }

    /// Row (b, h)'s keys and values (1, 1, len, head_dim), views.
    fn row(slf: Bound<'_, Self>, b: usize, h: usize) -> PyResult<(PyTensor, PyTensor)> {
        let me = slf.get();
        let (k, v) = detached(slf.py(), move || {
            let g = me.lock()?;
            g.store()
                .ok_or_else(|| crate::KvError::State("no full-precision store".into()))?
                .row_views(b, h)
        })?;
        Ok((PyTensor(k), PyTensor(v)))
    }

    /// Original positions of the kept tokens: int64 (batch, kv_heads, n) with −1 at
    /// hidden slots (padding), or a list of int64 (n_r,) per row r = b * kv_heads + h.
    fn kept_positions<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let me = slf.get();
        let py = slf.py();
        positions_to_py(py, detached(py, move || me.lock()?.kept_positions())?)
    }

    /// The positions the kept keys are rotated at now (compact ones after re-rotation).
    fn key_positions<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let me = slf.get();
        let py = slf.py();
        positions_to_py(py, detached(py, move || me.lock()?.key_positions())?)
    }

    /// Forgets the last ``n`` tokens seen.
    fn crop(slf: Bound<'_, Self>, n: usize) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.crop(n))
    }

    /// Keeps and reorders batch rows (beam search, batch selection): int64 ``indices``.
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

    /// Drops everything: the layer is as new.
    fn reset(slf: Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.reset())
    }

    /// Replaces the stored tokens at ``indices`` (int64 (n,)) by ``keys``/``values``
    /// (recomputed tokens of an assembled cache).
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

    /// The quantized store's parts as named tensors (a chunk entry's layer).
    fn quantized_parts(
        slf: Bound<'_, Self>,
    ) -> PyResult<std::collections::HashMap<String, PyTensor>> {
        let me = slf.get();
        let parts = detached(slf.py(), move || me.lock()?.quantized_parts())?;
        Ok(parts.into_iter().map(|(n, t)| (n, PyTensor(t))).collect())
    }

    /// TriAttention's statistics of every query this layer has seen (calibration), or None.
    fn query_statistics(slf: Bound<'_, Self>) -> PyResult<Option<PyQueryStats>> {
        let me = slf.get();
        let stats = detached(slf.py(), move || me.lock()?.query_statistics())?;
        Ok(stats.map(PyQueryStats::wrap))
    }

    /// The previous decoding-time compression's kept scores (a remembering scorer), or None.
    #[getter]
    fn kept_scores(&self) -> PyResult<Option<PyTensor>> {
        let g = self.lock().map_err(to_pyerr)?;
        Ok(g.decoding()
            .and_then(|d| d.kept_scores())
            .map(|t| PyTensor(t.shallow_clone())))
    }

    /// The quantized store's counts, or None before quantization: a dict with
    /// ``sink_tokens``, ``quantized_tokens``, ``residual_tokens``, ``evicted`` (tokens a
    /// decoding-time compression removed from it), ``nbytes``, and for mixed precision
    /// ``low_bits``, ``low_bits_tokens`` and ``low_bits_nbytes`` (0 without).
    fn quantized_stats<'py>(slf: Bound<'py, Self>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let g = slf.get().lock().map_err(to_pyerr)?;
        let Some(s) = g.quantized_store() else {
            return Ok(None);
        };
        let d = PyDict::new(slf.py());
        d.set_item("sink_tokens", s.sink_len())?;
        d.set_item("quantized_tokens", s.quantized_len())?;
        d.set_item("residual_tokens", s.residual_len())?;
        d.set_item("evicted", s.evicted())?;
        d.set_item("nbytes", s.nbytes())?;
        let low = g.low_store();
        d.set_item("low_bits", low.map_or(0, |l| l.config().bits))?;
        d.set_item("low_bits_tokens", low.map_or(0, |l| l.seen()))?;
        d.set_item("low_bits_nbytes", low.map_or(0, |l| l.nbytes()))?;
        Ok(Some(d))
    }

    /// A retrieval-heads layer's counts: retrieval_heads, streaming_heads, tokens_seen,
    /// streaming_tokens_kept, streaming_tokens_dropped.
    fn head_stats<'py>(slf: Bound<'py, Self>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let g = slf.get().lock().map_err(to_pyerr)?;
        let Some(h) = g.head_split() else {
            return Ok(None);
        };
        let d = PyDict::new(slf.py());
        d.set_item("retrieval_heads", h.retrieval_heads().len())?;
        d.set_item("streaming_heads", h.streaming_heads().len())?;
        d.set_item("tokens_seen", h.seen())?;
        d.set_item("streaming_tokens_kept", h.streaming_kept())?;
        d.set_item("streaming_tokens_dropped", h.streaming_dropped())?;
        Ok(Some(d))
    }

    fn __repr__(&self) -> PyResult<String> {
        let g = self.lock().map_err(to_pyerr)?;
        Ok(format!(
            "LayerState(layer_idx={}, seen={}, stored={}, nbytes={}, quantized={})",
            g.layer_idx(),
            g.seen(),
            g.stored(),
            g.nbytes(),
            g.is_quantized()
        ))
    }
}

/// The layers of one cache, and the steps that need all of them after a forward: a
/// cross-layer budget's allocation (CAKE), re-rotation to one shared next position
/// (``rerotate``: the model's Rope), and quantizing the kept tokens.
///
/// Examples
/// --------
/// >>> import kvpress_rs
/// >>> layers = [kvpress_rs._native.LayerState(i) for i in range(2)]
/// >>> group = kvpress_rs._native.LayerGroup(layers)
/// >>> group.begin_forward(None); group.finish_forward(); len(group)
/// 2
#[pyclass(name = "LayerGroup", module = "kvpress_rs._native", frozen)]
pub struct PyLayerGroup {
    inner: LayerGroup,
}

#[pymethods]
impl PyLayerGroup {
    #[new]
    #[pyo3(signature = (layers, rerotate=None))]
    fn new(layers: Vec<Bound<'_, PyLayerState>>, rerotate: Option<Bound<'_, PyRope>>) -> Self {
        let shared = layers.iter().map(|l| Arc::clone(&l.get().inner)).collect();
        PyLayerGroup {
            inner: LayerGroup::from_shared(shared, rerotate.map(|r| r.get().inner.clone())),
        }
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// A forward starts: ``visible`` (batch, q) bool, its 2-D attention mask's last q
    /// columns (which new tokens are real), or None.
    fn begin_forward(slf: Bound<'_, Self>, visible: Option<PyTensor>) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || {
            me.inner.begin_forward(visible.as_ref().map(|v| &v.0))
        })
    }

    /// The forward is done: each layer's own end, then the cross-layer steps.
    fn finish_forward(slf: Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || me.inner.finish_forward())
    }
}
