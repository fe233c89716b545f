//! `kvpress_rs._native.QuantConfig`, `QuantizedStore`, `QuantizedTensor` and `quantize`:
//! the quantized cache (see `crate::quant`).
//!
//! Thread safety: a `QuantizedStore` locks itself per call (concurrent calls are
//! serialised); `QuantConfig` and `QuantizedTensor` are immutable.

use super::conversion::PyTensor;
use super::errors::{detached, to_pyerr};
use crate::error::{KvError, Result};
use crate::python::rope::PyRope;
use crate::quant::{Grouping, QuantConfig, QuantizedStore, QuantizedTensor, TensorLayout};
use crate::rope::table::{self, SharedAngleTable};
use pyo3::prelude::*;
use std::sync::{Mutex, MutexGuard};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyQuantConfig>()?;
    m.add_class::<PyQuantizedStore>()?;
    m.add_class::<PyRopeTable>()?;
    m.add_class::<PyQuantizedTensor>()?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    Ok(())
}

fn non_negative(value: i64, argument: &str) -> Result<usize> {
    usize::try_from(value)
        .map_err(|_| KvError::invalid(argument, format!("got {value}, expected >= 0")))
}

/// The options of a quantized KV cache, validated on construction.
///
/// Parameters
/// ----------
/// bits : int
///     Bits per code: 2, 3, 4 or 8 (asymmetric min/max, float16 scale and zero per group).
/// group_size : int
///     Elements per group: 32, 64 or 128.
/// residual_length : int
///     Most recent tokens kept in full precision (>= 0, a multiple of ``group_size``).
///     The window holds fewer than ``max(residual_length, group_size)`` tokens
///     (``window_tokens``); when it fills, its oldest ``block_length`` tokens are quantized
///     once and appended.
/// block_length : int or None
///     Tokens quantized per flush: a multiple of ``group_size`` no larger than the window;
///     None (default) flushes the whole window, as KIVI and quanto do. A shorter block
///     keeps ``window_tokens - block_length`` recent tokens in full precision after every
///     flush, at the same peak bytes (2-bit keys of recent tokens cost most accuracy).
/// key_grouping, value_grouping : str
///     ``"channel"`` (a group is one channel over ``group_size`` tokens) or ``"token"`` (a
///     group is ``group_size`` channels of one token; must divide head_dim). KIVI: keys per
///     channel, values per token.
/// hadamard : bool
///     Rotate key and value vectors by the orthonormal Walsh–Hadamard matrix before
///     quantizing (head_dim a power of two); attention is unchanged up to quantization error.
/// outlier_fraction : float
///     In [0, 0.25]: the ``ceil(outlier_fraction * group_size)`` largest-magnitude elements
///     of each group are kept exactly in a sparse side store.
/// sink_tokens : int
///     The first tokens of the sequence, kept in full precision.
/// pre_rope_keys : bool
///     Quantize keys before RoPE (KVQuant); a store then needs the model's ``Rope`` and
///     re-applies it to every dequantized tile.
///
/// Examples
/// --------
/// >>> import kvpress_rs
/// >>> kvpress_rs.QuantConfig(bits=2, group_size=64).bits_per_element(64, 64)
/// 2.5
/// >>> c = kvpress_rs.QuantConfig(bits=2, group_size=64, residual_length=128, block_length=64)
/// >>> (c.window_tokens, c.block_tokens)
/// (128, 64)
#[pyclass(name = "QuantConfig", module = "kvpress_rs._native", frozen, eq)]
#[derive(PartialEq)]
pub struct PyQuantConfig {
    pub(crate) inner: QuantConfig,
}

#[pymethods]
impl PyQuantConfig {
    #[new]
    #[pyo3(signature = (bits=4, group_size=32, residual_length=128, key_grouping="channel", value_grouping="token", hadamard=false, outlier_fraction=0.0, sink_tokens=0, pre_rope_keys=false, block_length=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        bits: i64,
        group_size: i64,
        residual_length: i64,
        key_grouping: &str,
        value_grouping: &str,
        hadamard: bool,
        outlier_fraction: f64,
        sink_tokens: i64,
        pre_rope_keys: bool,
        block_length: Option<i64>,
    ) -> PyResult<Self> {
        let build = || -> Result<QuantConfig> {
            let bad_bits =
                || KvError::invalid("bits", format!("got {bits}, expected 2, 3, 4 or 8"));
            QuantConfig {
                bits: u32::try_from(bits).map_err(|_| bad_bits())?,
                group_size: non_negative(group_size, "group_size")?,
                residual_length: non_negative(residual_length, "residual_length")?,
                block_length: block_length
                    .map(|b| non_negative(b, "block_length"))
                    .transpose()?,
                key_grouping: Grouping::parse(key_grouping, "key_grouping")?,
                value_grouping: Grouping::parse(value_grouping, "value_grouping")?,
                hadamard,
                outlier_fraction,
                sink_tokens: non_negative(sink_tokens, "sink_tokens")?,
                pre_rope_keys,
            }
            .validated()
        };
        Ok(PyQuantConfig {
            inner: build().map_err(to_pyerr)?,
        })
    }

    #[getter]
    fn bits(&self) -> u32 {
        self.inner.bits
    }

    #[getter]
    fn group_size(&self) -> usize {
        self.inner.group_size
    }

    #[getter]
    fn residual_length(&self) -> usize {
        self.inner.residual_length
    }

    #[getter]
    fn key_grouping(&self) -> &'static str {
        self.inner.key_grouping.name()
    }

    #[getter]
    fn value_grouping(&self) -> &'static str {
        self.inner.value_grouping.name()
    }

    #[getter]
    fn hadamard(&self) -> bool {
        self.inner.hadamard
    }

    #[getter]
    fn outlier_fraction(&self) -> f64 {
        self.inner.outlier_fraction
    }

    #[getter]
    fn sink_tokens(&self) -> usize {
        self.inner.sink_tokens
    }

    #[getter]
    fn pre_rope_keys(&self) -> bool {
        self.inner.pre_rope_keys
    }

    #[getter]
    fn block_length(&self) -> Option<usize> {
        self.inner.block_length
    }

    /// Capacity of the full-precision window: ``max(residual_length, group_size)``.
    #[getter]
    fn window_tokens(&self) -> usize {
        self.inner.window_tokens()
    }

    /// Tokens per quantized block: ``block_length``, or the whole window.
    #[getter]
    fn block_tokens(&self) -> usize {
        self.inner.block_tokens()
    }

    /// Outliers kept per group: ``ceil(outlier_fraction * group_size)``.
    #[getter]
    fn outliers_per_group(&self) -> usize {
        self.inner.outliers_per_group()
    }

    /// Checks the options that depend on the model's head dimensions (per-token groups
    /// must divide them; ``hadamard`` needs powers of two).
    #[pyo3(signature = (key_head_dim, value_head_dim=None))]
    fn check_head_dims(&self, key_head_dim: usize, value_head_dim: Option<usize>) -> PyResult<()> {
        let c = &self.inner;
        c.check_head_dim(key_head_dim, c.key_grouping, "keys")
            .and_then(|_| {
                c.check_head_dim(
                    value_head_dim.unwrap_or(key_head_dim),
                    c.value_grouping,
                    "values",
                )
            })
            .map_err(to_pyerr)
    }

    /// Average bits per quantized element of keys and values (codes, scales/zeros and
    /// outliers with 16-bit values), residual window and sinks excluded.
    #[pyo3(signature = (key_head_dim, value_head_dim=None))]
    fn bits_per_element(&self, key_head_dim: usize, value_head_dim: Option<usize>) -> f64 {
        let c = &self.inner;
        let g = c.group_size;
        let per = |grouping, d| {
            let l = TensorLayout::new(c, grouping, d);
            (l.bytes_per_row(g, 2) * 8) as f64 / (g * d) as f64
        };
        let vd = value_head_dim.unwrap_or(key_head_dim);
        (per(c.key_grouping, key_head_dim) * key_head_dim as f64
            + per(c.value_grouping, vd) * vd as f64)
            / (key_head_dim + vd) as f64
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        format!(
            "QuantConfig(bits={}, group_size={}, residual_length={}, block_length={}, key_grouping={:?}, value_grouping={:?}, hadamard={}, outlier_fraction={}, sink_tokens={}, pre_rope_keys={})",
            c.bits,
            c.group_size,
            c.residual_length,
            c.block_length.map_or("None".to_string(), |b| b.to_string()),
            c.key_grouping.name(),
            c.value_grouping.name(),
            if c.hadamard { "True" } else { "False" },
            c.outlier_fraction,
            c.sink_tokens,
            if c.pre_rope_keys { "True" } else { "False" },
        )
    }
}

/// One layer's quantized KV cache: full-precision sinks, append-only quantized blocks and
/// a full-precision residual window (see ``QuantConfig``).
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> store = kvpress_rs._native.QuantizedStore(kvpress_rs.QuantConfig(bits=4, residual_length=32))
/// >>> k = torch.randn(1, 2, 100, 64)
/// >>> store.append(k, k)
/// >>> store.quantized_tokens, store.residual_tokens
/// (96, 4)
/// >>> store.attend(torch.randn(1, 4, 1, 64), None, 0.125).shape
/// torch.Size([1, 1, 4, 64])
#[pyclass(name = "QuantizedStore", module = "kvpress_rs._native", frozen)]
pub struct PyQuantizedStore {
    inner: Mutex<QuantizedStore>,
}

impl PyQuantizedStore {
    pub(crate) fn from_store(store: QuantizedStore) -> Self {
        PyQuantizedStore {
            inner: Mutex::new(store),
        }
    }

    /// Runs `f` on the locked store.
    pub(crate) fn with_store<T>(
        &self,
        f: impl FnOnce(&mut QuantizedStore) -> Result<T>,
    ) -> Result<T> {
        f(&mut *self.lock()?)
    }

    /// Takes the store out, leaving an empty one with the same config.
    pub(crate) fn take(&self) -> Result<QuantizedStore> {
        let mut g = self.lock()?;
        let empty = g.emptied();
        Ok(std::mem::replace(&mut *g, empty))
    }

    fn lock(&self) -> Result<MutexGuard<'_, QuantizedStore>> {
        self.inner.lock().map_err(|_| {
            KvError::State(
                "the quantized store is poisoned by an earlier internal error; reset the cache"
                    .into(),
            )
        })
    }
}

/// The cos/sin table of a ``Rope`` that quantized stores with ``pre_rope_keys`` read, one
/// for the stores of every layer of a cache; its bytes are counted once, here, not in the
/// stores' ``nbytes``.
///
/// >>> table = kvpress_rs._native.RopeTable(kvpress_rs.Rope(64))  # doctest: +SKIP
/// >>> store = QuantizedStore(config, rope, rope_table=table)  # doctest: +SKIP
#[pyclass(name = "RopeTable", module = "kvpress_rs._native", frozen)]
pub struct PyRopeTable {
    inner: SharedAngleTable,
}

impl PyRopeTable {
    /// The table, shared.
    pub(crate) fn shared(&self) -> SharedAngleTable {
        self.inner.clone()
    }
}

#[pymethods]
impl PyRopeTable {
    #[new]
    fn new(rope: PyRef<'_, PyRope>) -> PyResult<Self> {
        Ok(PyRopeTable {
            inner: table::shared(&rope.inner).map_err(to_pyerr)?,
        })
    }

    /// Bytes of the cos/sin tables (they grow with the positions covered).
    #[getter]
    fn nbytes(&self) -> usize {
        table::read(&self.inner).nbytes()
    }
}

#[pymethods]
impl PyQuantizedStore {
    /// ``rope``: the model's ``Rope``, required with ``pre_rope_keys=True``; ``rope_table``:
    /// a ``RopeTable`` of the same RoPE shared with other stores (default: one of its own).
    #[new]
    #[pyo3(signature = (config, rope=None, rope_table=None))]
    fn new(
        config: &PyQuantConfig,
        rope: Option<PyRef<'_, PyRope>>,
        rope_table: Option<PyRef<'_, PyRopeTable>>,
    ) -> PyResult<Self> {
        let rope = rope.as_ref().map(|r| &r.inner);
        let table = rope_table.map(|t| t.inner.clone());
        Ok(PyQuantizedStore {
            inner: Mutex::new(
                QuantizedStore::with_rope_table(config.inner, rope, table).map_err(to_pyerr)?,
            ),
        })
    }

    /// Appends keys/values (batch, kv_heads, q, head_dim); blocks that fill are quantized.
    /// ``positions`` (integer (q,) or (batch, kv_heads, q)): where the keys were rotated,
    /// used with pre-RoPE keys (default: right after the tokens seen). Non-finite values
    /// raise ``NonFiniteError``; on any error the store is unchanged.
    #[pyo3(signature = (keys, values, positions=None))]
    fn append(
        slf: Bound<'_, Self>,
        keys: PyTensor,
        values: PyTensor,
        positions: Option<PyTensor>,
    ) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || {
            me.lock()?
                .append_at(&keys.0, &values.0, positions.as_ref().map(|p| &p.0))
        })
    }

    /// Attention of ``query`` (batch, q_heads, q_len, head_dim) over every stored token,
    /// reading the quantized codes in place. ``mask``: optional bool (batch or 1, q_len,
    /// stored) of visible tokens (default: causal among the last q_len tokens).
    /// Returns (batch, q_len, q_heads, value head_dim) in the query's dtype.
    #[pyo3(signature = (query, mask, scaling))]
    fn attend(
        slf: Bound<'_, Self>,
        query: PyTensor,
        mask: Option<PyTensor>,
        scaling: f64,
    ) -> PyResult<PyTensor> {
        let me = slf.get();
        detached(slf.py(), move || {
            me.lock()?
                .attend(&query.0, mask.as_ref().map(|m| &m.0), scaling)
        })
        .map(PyTensor)
    }

    /// Attention of ``query`` over the union of this store's tokens and those of the
    /// ``past`` stores (mixed precision: tokens kept at other bits), one softmax over all.
    /// This store holds the most recent tokens (``mask`` as in :meth:`attend`); the
    /// ``past`` stores only tokens that precede every query. Returns (batch, q_len,
    /// q_heads, value head_dim) in the query's dtype.
    #[pyo3(signature = (past, query, mask, scaling))]
    fn attend_union(
        slf: Bound<'_, Self>,
        past: Vec<Bound<'_, PyQuantizedStore>>,
        query: PyTensor,
        mask: Option<PyTensor>,
        scaling: f64,
    ) -> PyResult<PyTensor> {
        let me = slf.get();
        let others: Vec<&PyQuantizedStore> = past.iter().map(|p| p.get()).collect();
        if others.iter().any(|&p| std::ptr::eq(p, me)) {
            return Err(to_pyerr(KvError::invalid(
                "past",
                "a store cannot be both the recent store and a past one",
            )));
        }
        detached(slf.py(), move || {
            let recent = me.lock()?;
            let guards = others
                .iter()
                .map(|p| p.lock())
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<(&QuantizedStore, Option<&tch::Tensor>)> =
                guards.iter().map(|g| (&**g, None)).collect();
            crate::quant::union::attend_union(
                &recent,
                &refs,
                &query.0,
                mask.as_ref().map(|m| &m.0),
                scaling,
            )
        })
        .map(PyTensor)
    }

    /// The store's parts as named tensors (copies): full-precision ``front.k/v`` and
    /// ``residual.k/v/pos``, and per block ``block.<i>.pos`` and
    /// ``block.<i>.<k|v>.<codes|params|outlier_pos|outlier_val>`` (see
    /// ``kvpress_rs._native.assemble_quantized_layer`` for the reverse). Needs
    /// ``pre_rope_keys=True``.
    ///
    /// Examples
    /// --------
    /// >>> import torch, kvpress_rs
    /// >>> rope = kvpress_rs._native.Rope(64)
    /// >>> store = kvpress_rs._native.QuantizedStore(kvpress_rs.QuantConfig(bits=4, residual_length=0, pre_rope_keys=True), rope)
    /// >>> store.append(torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64))
    /// >>> sorted(store.parts())[:3], store.parts()["residual.pos"][0, 0].tolist()
    /// (['block.0.k.codes', 'block.0.k.params', 'block.0.pos'], [32, 33, 34, 35, 36, 37, 38, 39])
    fn parts(slf: Bound<'_, Self>) -> PyResult<std::collections::HashMap<String, PyTensor>> {
        let me = slf.get();
        let parts = detached(slf.py(), move || crate::quant::parts::export(&*me.lock()?))?;
        Ok(parts.into_iter().map(|(n, t)| (n, PyTensor(t))).collect())
    }

    /// Every stored token dequantized: (keys, values), each (batch, kv_heads, seen,
    /// head_dim) in the cache dtype (new tensors).
    fn dequantize(slf: Bound<'_, Self>) -> PyResult<(PyTensor, PyTensor)> {
        let me = slf.get();
        let (k, v) = detached(slf.py(), move || me.lock()?.dequantize())?;
        Ok((PyTensor(k), PyTensor(v)))
    }

    /// Keeps the stored tokens at ``kept`` (int64 (batch, kv_heads, n), strictly ascending
    /// per row, indices in storage order: sinks, tokens kept by earlier evictions, blocks,
    /// residual window) and frees the others. Sinks and the residual window must be kept
    /// whole; quantized tokens keep their exact codes and scales/zeros.
    fn retain(slf: Bound<'_, Self>, kept: PyTensor) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.retain(&kept.0))
    }

    /// With ``pre_rope_keys``: moves the stored tokens to the compact positions
    /// ``next_position - stored .. next_position`` (re-rotation after evictions).
    fn rerotate(slf: Bound<'_, Self>, next_position: usize) -> PyResult<()> {
        let me = slf.get();
        detached(slf.py(), move || me.lock()?.rerotate(next_position))
    }

    /// Integer codes and (scale, zero) of every quantized element, for inspection: a list
    /// ``[keys, values]`` of ``(codes, params, outliers)`` — codes uint8 (batch, kv_heads,
    /// q, head_dim), params float16 (batch, kv_heads, q, head_dim, 2), outliers None or
    /// (int64 flat indices into (batch, kv_heads, q, head_dim), exact values). ``q`` counts
    /// the tokens kept by evictions, then the blocks' tokens, in storage order.
    #[allow(clippy::type_complexity)]
    fn element_codes(
        slf: Bound<'_, Self>,
    ) -> PyResult<Vec<(PyTensor, PyTensor, Option<(PyTensor, PyTensor)>)>> {
        let me = slf.get();
        let parts = detached(slf.py(), move || me.lock()?.element_codes())?;
        Ok(parts
            .into_iter()
            .map(|(c, p, o)| {
                (
                    PyTensor(c),
                    PyTensor(p),
                    o.map(|(i, v)| (PyTensor(i), PyTensor(v))),
                )
            })
            .collect())
    }

    /// Tokens evicted since the last reset (decoding-time compression).
    #[getter]
    fn evicted(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.evicted())
    }

    /// Tiles (of ``group_size`` tokens when quantized) with at least one token kept by an
    /// eviction, over every (batch, kv_head) row; 0 before any eviction.
    #[getter]
    fn ragged_tiles(&self) -> PyResult<usize> {
        Ok(self
            .lock()
            .map_err(to_pyerr)?
            .ragged()
            .map_or(0, |r| r.tiles()))
    }

    /// Quantized tokens per row kept by evictions (before the blocks quantized since).
    #[getter]
    fn ragged_tokens(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.ragged().map_or(0, |r| r.len))
    }

    /// Forgets the last ``n`` tokens (only full-precision ones can be removed).
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

    /// The configuration.
    #[getter]
    fn config(&self) -> PyResult<PyQuantConfig> {
        Ok(PyQuantConfig {
            inner: *self.lock().map_err(to_pyerr)?.config(),
        })
    }

    /// Tokens stored since the last reset (all of them, unless evicted by
    /// :meth:`compress_to`/:meth:`retain`).
    #[getter]
    fn seen(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.seen())
    }

    /// ``(batch, kv_heads)`` of the stored tensors; None before the first append.
    #[getter]
    fn batch_heads(&self) -> PyResult<Option<(usize, usize)>> {
        Ok(self
            .lock()
            .map_err(to_pyerr)?
            .shape()
            .map(|s| (s.batch, s.heads)))
    }

    /// Tokens kept in full precision as attention sinks.
    #[getter]
    fn sink_tokens(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.sink_len())
    }

    /// Tokens held quantized (kept by evictions, and in blocks).
    #[getter]
    fn quantized_tokens(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.quantized_len())
    }

    /// Tokens in the full-precision residual window.
    #[getter]
    fn residual_tokens(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.residual_len())
    }

    /// Quantized blocks held.
    #[getter]
    fn blocks(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.blocks().len())
    }

    /// Bytes allocated: sinks, the residual window's tokens, codes, scales/zeros
    /// and outliers of every block.
    #[getter]
    fn nbytes(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.nbytes())
    }

    fn __repr__(&self) -> PyResult<String> {
        let s = self.lock().map_err(to_pyerr)?;
        Ok(format!(
            "QuantizedStore(seen={}, sinks={}, quantized={}, residual={}, nbytes={})",
            s.seen(),
            s.sink_len(),
            s.quantized_len(),
            s.residual_len(),
            s.nbytes()
        ))
    }
}

/// A quantized (batch, heads, tokens, head_dim) tensor (from ``kvpress_rs.ops.quantize``).
#[pyclass(name = "QuantizedTensor", module = "kvpress_rs._native", frozen)]
pub struct PyQuantizedTensor {
    // Immutable; the mutex only makes it shareable (tch tensors are Send, not Sync).
    inner: Mutex<QuantizedTensor>,
}

impl PyQuantizedTensor {
    fn get(&self) -> MutexGuard<'_, QuantizedTensor> {
        // Nothing mutates the tensor, so a poisoned lock still guards valid data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl PyQuantizedTensor {
    /// The dequantized tensor in the original dtype (a new tensor).
    fn dequantize(slf: Bound<'_, Self>) -> PyResult<PyTensor> {
        let me = slf.get();
        detached(slf.py(), move || me.get().dequantize()).map(PyTensor)
    }

    /// (batch, heads, tokens, head_dim).
    #[getter]
    fn shape(&self) -> (usize, usize, usize, usize) {
        let q = self.get();
        (q.batch(), q.heads(), q.tokens(), q.layout().head_dim)
    }

    #[getter]
    fn bits(&self) -> u32 {
        self.get().layout().bits
    }

    #[getter]
    fn group_size(&self) -> usize {
        self.get().layout().group_size
    }

    #[getter]
    fn grouping(&self) -> &'static str {
        self.get().layout().grouping.name()
    }

    #[getter]
    fn hadamard(&self) -> bool {
        self.get().layout().hadamard
    }

    /// Packed codes: uint8 (batch, heads, groups * group_size * bits / 8).
    #[getter]
    fn codes(&self) -> PyTensor {
        PyTensor(self.get().codes().shallow_clone())
    }

    /// float16 (batch, heads, groups): the scale of every group.
    #[getter]
    fn scales(&self) -> PyResult<PyTensor> {
        self.get()
            .params()
            .f_select(-1, 0)
            .map(PyTensor)
            .map_err(|e| to_pyerr(e.into()))
    }

    /// float16 (batch, heads, groups): the zero (minimum) of every group.
    #[getter]
    fn zeros(&self) -> PyResult<PyTensor> {
        self.get()
            .params()
            .f_select(-1, 1)
            .map(PyTensor)
            .map_err(|e| to_pyerr(e.into()))
    }

    /// uint8 (batch, heads, groups, outliers per group): outlier positions within their
    /// group, or None.
    #[getter]
    fn outlier_positions(&self) -> Option<PyTensor> {
        self.get()
            .outliers()
            .map(|(p, _)| PyTensor(p.shallow_clone()))
    }

    /// The outliers' exact values (original dtype), or None.
    #[getter]
    fn outlier_values(&self) -> Option<PyTensor> {
        self.get()
            .outliers()
            .map(|(_, v)| PyTensor(v.shallow_clone()))
    }

    /// Bytes held: codes, scales/zeros and outliers.
    #[getter]
    fn nbytes(&self) -> usize {
        self.get().nbytes()
    }

    fn __repr__(&self) -> String {
        let (b, h, t, d) = self.shape();
        format!(
            "QuantizedTensor(shape=({b}, {h}, {t}, {d}), bits={}, group_size={}, grouping={:?}, nbytes={})",
            self.bits(),
            self.group_size(),
            self.grouping(),
            self.nbytes()
        )
    }
}

/// Quantizes ``x`` (batch, heads, tokens, head_dim); tokens must be a multiple of
/// ``group_size``. CPU tensors run the Rust kernels, others libtorch ops (same codes).
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> x = torch.randn(1, 2, 64, 64)
/// >>> q = kvpress_rs.ops.quantize(x, bits=4, grouping="token")
/// >>> q.nbytes, bool((q.dequantize() - x).abs().max() < 0.5)
/// (4608, True)
#[pyfunction]
#[pyo3(signature = (x, *, bits=4, group_size=32, grouping="token", hadamard=false, outlier_fraction=0.0))]
fn quantize(
    py: Python<'_>,
    x: PyTensor,
    bits: i64,
    group_size: i64,
    grouping: &str,
    hadamard: bool,
    outlier_fraction: f64,
) -> PyResult<PyQuantizedTensor> {
    let grouping = Grouping::parse(grouping, "grouping").map_err(to_pyerr)?;
    let config = PyQuantConfig::new(
        bits,
        group_size,
        0,
        grouping.name(),
        grouping.name(),
        hadamard,
        outlier_fraction,
        0,
        false,
        None,
    )?
    .inner;
    let d = crate::tensor::check_kv(&x.0, "x")
        .map_err(to_pyerr)?
        .head_dim;
    config.check_head_dim(d, grouping, "x").map_err(to_pyerr)?;
    let layout = TensorLayout::new(&config, grouping, d);
    let inner = detached(py, move || QuantizedTensor::quantize(&x.0, layout, "x"))?;
    Ok(PyQuantizedTensor {
        inner: Mutex::new(inner),
    })
}
