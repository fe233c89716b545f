//! `kvpress_rs._native.Rope`, `BaseBounds` and `base_bounds`: the RoPE core
//! (`crate::rope`) for Python. The public class `kvpress_rs.rope.Rope` subclasses `Rope` and
//! adds `from_config` (reading a transformers config is the Python adapter's job).

use super::conversion::{DtypeName, IntOrTensor, PyTensor};
use super::errors::{detached, to_pyerr};
use crate::error::KvError;
use crate::rope::{
    base_bounds as core_base_bounds, BaseBounds, Layout, Precision, Rope, RopeSpec, ScalingParams,
};
use pyo3::prelude::*;
use tch::Tensor;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRope>()?;
    m.add_class::<PyBaseBounds>()?;
    m.add_function(wrap_pyfunction!(base_bounds, m)?)?;
    Ok(())
}

/// A non-negative count from a Python int, or an `InvalidArgumentError` naming it.
fn count(argument: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| {
        to_pyerr(KvError::invalid(
            argument,
            format!("got {v}, expected a non-negative integer"),
        ))
    })
}

/// A bool as Python spells it, for reprs.
fn py_bool(v: bool) -> &'static str {
    if v {
        "True"
    } else {
        "False"
    }
}

fn opt_count(argument: &str, v: Option<i64>) -> PyResult<Option<usize>> {
    v.map(|v| count(argument, v)).transpose()
}

/// Rotary position embedding of one model: frequencies, scaling and channel layout, with
/// the operations a KV cache needs. Build it with ``kvpress_rs.rope.Rope.from_config``;
/// this constructor takes the parameters as plain values.
///
/// Parameters
/// ----------
/// head_dim : int
///     Channels per attention head.
/// rope_type : str
///     "default", "linear", "dynamic", "yarn", "llama3" or "longrope".
/// theta : float
///     The RoPE base (``rope_theta``).
/// partial_rotary_factor : float
///     Fraction of each head that rotates: rotary_dim = int(head_dim * factor).
/// rotary_dim : int, optional
///     Rotated channels (overrides ``partial_rotary_factor``).
/// interleaved : bool
///     Pair channels (2i, 2i+1) (GPT-J) instead of (i, i + rotary_dim/2) (Llama, NeoX).
/// max_position_embeddings, factor, original_max_position_embeddings, attention_factor,
/// beta_fast, beta_slow, mscale, mscale_all_dim, truncate, low_freq_factor,
/// high_freq_factor, short_factor, long_factor
///     The rope type's parameters, as in transformers' ``rope_parameters``.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> rope = kvpress_rs._native.Rope(8, theta=10000.0)
/// >>> x = torch.randn(1, 2, 4, 8)
/// >>> torch.allclose(rope.invert(rope.apply(x, torch.arange(4)), torch.arange(4)), x, atol=1e-6)
/// True
#[pyclass(name = "Rope", module = "kvpress_rs._native", frozen, subclass)]
pub struct PyRope {
    pub(crate) inner: Rope,
}

#[pymethods]
impl PyRope {
    #[new]
    #[pyo3(signature = (
        head_dim, *, rope_type="default", theta=10000.0, partial_rotary_factor=1.0,
        rotary_dim=None, interleaved=false, max_position_embeddings=None, factor=None,
        original_max_position_embeddings=None, attention_factor=None, beta_fast=None,
        beta_slow=None, mscale=None, mscale_all_dim=None, truncate=None, low_freq_factor=None,
        high_freq_factor=None, short_factor=None, long_factor=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        head_dim: i64,
        rope_type: &str,
        theta: f64,
        partial_rotary_factor: f64,
        rotary_dim: Option<i64>,
        interleaved: bool,
        max_position_embeddings: Option<i64>,
        factor: Option<f64>,
        original_max_position_embeddings: Option<i64>,
        attention_factor: Option<f64>,
        beta_fast: Option<f64>,
        beta_slow: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: Option<bool>,
        low_freq_factor: Option<f64>,
        high_freq_factor: Option<f64>,
        short_factor: Option<Vec<f64>>,
        long_factor: Option<Vec<f64>>,
    ) -> PyResult<Self> {
        let spec = RopeSpec {
            rope_type: rope_type.to_owned(),
            head_dim: count("head_dim", head_dim)?,
            theta,
            partial_rotary_factor,
            rotary_dim: opt_count("rotary_dim", rotary_dim)?,
            layout: if interleaved {
                Layout::Interleaved
            } else {
                Layout::RotateHalf
            },
            params: ScalingParams {
                factor,
                max_position_embeddings: opt_count(
                    "max_position_embeddings",
                    max_position_embeddings,
                )?,
                original_max_position_embeddings: opt_count(
                    "original_max_position_embeddings",
                    original_max_position_embeddings,
                )?,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
                low_freq_factor,
                high_freq_factor,
                short_factor,
                long_factor,
            },
        };
        Ok(PyRope {
            inner: Rope::new(spec).map_err(to_pyerr)?,
        })
    }

    /// The rope type ("default", "linear", "dynamic", "yarn", "llama3", "longrope").
    #[getter]
    fn rope_type(&self) -> &'static str {
        self.inner.rope_type()
    }

    /// Channels per head.
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.head_dim()
    }

    /// Rotated channels per head (the first ``rotary_dim``; the rest pass through).
    #[getter]
    fn rotary_dim(&self) -> usize {
        self.inner.rotary_dim()
    }

    /// The RoPE base.
    #[getter]
    fn theta(&self) -> f64 {
        self.inner.theta()
    }

    /// Whether channels pair as (2i, 2i+1) (GPT-J) rather than (i, i + rotary_dim/2).
    #[getter]
    fn interleaved(&self) -> bool {
        self.inner.layout() == Layout::Interleaved
    }

    /// The factor ``apply`` multiplies the rotated channels by (yarn, longrope; else 1.0).
    #[getter]
    fn attention_scaling(&self) -> f64 {
        self.inner.attention_scaling()
    }

    /// Whether the frequencies depend on ``seq_len`` (dynamic, longrope).
    #[getter]
    fn depends_on_seq_len(&self) -> bool {
        self.inner.scaling().depends_on_seq_len()
    }

    /// The rotation frequencies θ_f, f = 0 .. rotary_dim/2, computed in float64.
    ///
    /// Parameters
    /// ----------
    /// seq_len : int, optional
    ///     Length of the sequence being processed (transformers: ``max(position_ids) + 1``).
    ///     Changes the frequencies of "dynamic" (beyond max_position_embeddings) and
    ///     "longrope" (long factors beyond original_max_position_embeddings) only; None: the
    ///     configured frequencies.
    ///
    /// Returns
    /// -------
    /// float64 tensor of shape (rotary_dim / 2,).
    #[pyo3(signature = (seq_len=None))]
    fn inv_freq(&self, seq_len: Option<i64>) -> PyResult<PyTensor> {
        let seq_len = opt_count("seq_len", seq_len)?;
        Ok(PyTensor(Tensor::from_slice(&self.inner.inv_freq(seq_len))))
    }

    /// cos and sin of the rotation angles, times the attention scaling, as transformers'
    /// rotary embedding returns them (angles in float64, reduced modulo 2π).
    ///
    /// Parameters
    /// ----------
    /// positions : torch.Tensor
    ///     Integer positions of any shape.
    /// seq_len : int, optional
    ///     See ``inv_freq``.
    ///
    /// Returns
    /// -------
    /// (cos, sin): float32 tensors of shape positions.shape + (rotary_dim,), on the device
    /// of ``positions``; rotate-half layout ``cat(freqs, freqs)``, interleaved
    /// ``repeat_interleave(freqs, 2)``.
    #[pyo3(signature = (positions, seq_len=None))]
    fn cos_sin(
        slf: Bound<'_, Self>,
        positions: PyTensor,
        seq_len: Option<i64>,
    ) -> PyResult<(PyTensor, PyTensor)> {
        let seq_len = opt_count("seq_len", seq_len)?;
        let me = slf.get();
        let (c, s) = detached(slf.py(), move || me.inner.cos_sin(&positions.0, seq_len))?;
        Ok((PyTensor(c), PyTensor(s)))
    }

    /// Applies RoPE to pre-RoPE ``x``: y = s · R(p) · x on the rotary channels.
    ///
    /// Parameters
    /// ----------
    /// x : torch.Tensor
    ///     Shape (batch, heads, tokens, head_dim); float32, float16 or bfloat16; any device
    ///     and strides.
    /// positions : torch.Tensor
    ///     Integer positions of shape (), (tokens,), (batch, tokens) or
    ///     (batch, heads, tokens); any size may be 1.
    /// seq_len : int, optional
    ///     See ``inv_freq``.
    ///
    /// Returns
    /// -------
    /// A new tensor like ``x`` (same shape, dtype and device, contiguous).
    #[pyo3(signature = (x, positions, seq_len=None))]
    fn apply(
        slf: Bound<'_, Self>,
        x: PyTensor,
        positions: PyTensor,
        seq_len: Option<i64>,
    ) -> PyResult<PyTensor> {
        let seq_len = opt_count("seq_len", seq_len)?;
        let me = slf.get();
        detached(slf.py(), move || {
            me.inner.apply(&x.0, &positions.0, seq_len)
        })
        .map(PyTensor)
    }

    /// Inverts RoPE exactly: x rotated at ``positions`` → R(−p) · x / s (pre-RoPE space).
    ///
    /// Parameters and result as for ``apply``.
    #[pyo3(signature = (x, positions, seq_len=None))]
    fn invert(
        slf: Bound<'_, Self>,
        x: PyTensor,
        positions: PyTensor,
        seq_len: Option<i64>,
    ) -> PyResult<PyTensor> {
        let seq_len = opt_count("seq_len", seq_len)?;
        let me = slf.get();
        detached(slf.py(), move || {
            me.inner.invert(&x.0, &positions.0, seq_len)
        })
        .map(PyTensor)
    }

    /// Moves rotated ``x`` by ``delta`` positions: R(δ) · x, so that a key rotated at p
    /// becomes the key rotated at p + δ. The attention scaling is not applied again.
    ///
    /// Parameters
    /// ----------
    /// x : torch.Tensor
    ///     Shape (batch, heads, tokens, head_dim), rotated keys or queries.
    /// delta : int or torch.Tensor
    ///     One delta for every token, or integer deltas of shape (tokens,),
    ///     (batch, tokens) or (batch, heads, tokens) (e.g. ``i - p_i`` per kept key).
    /// seq_len : int, optional
    ///     See ``inv_freq``.
    ///
    /// Returns
    /// -------
    /// A new tensor like ``x``.
    #[pyo3(signature = (x, delta, seq_len=None))]
    fn shift(
        slf: Bound<'_, Self>,
        x: PyTensor,
        delta: IntOrTensor,
        seq_len: Option<i64>,
    ) -> PyResult<PyTensor> {
        let seq_len = opt_count("seq_len", seq_len)?;
        let me = slf.get();
        detached(slf.py(), move || me.inner.shift(&x.0, &delta.0, seq_len)).map(PyTensor)
    }

    /// The feasible region of the RoPE base for this rope's rotary dimension (see
    /// ``base_bounds``); ``feasible`` tells whether this rope's ``theta`` lies in it.
    #[pyo3(signature = (context_length, depth, dtype=DtypeName("float32".to_owned())))]
    fn base_bounds(
        &self,
        context_length: i64,
        depth: i64,
        dtype: DtypeName,
    ) -> PyResult<PyBaseBounds> {
        base_bounds(
            self.inner.rotary_dim() as i64,
            context_length,
            depth,
            dtype,
            Some(self.inner.theta()),
        )
    }

    fn __repr__(&self) -> String {
        let r = &self.inner;
        format!(
            "Rope(rope_type={:?}, head_dim={}, rotary_dim={}, theta={}, interleaved={}, attention_scaling={})",
            r.rope_type(),
            r.head_dim(),
            r.rotary_dim(),
            r.theta(),
            py_bool(r.layout() == Layout::Interleaved),
            r.attention_scaling()
        )
    }
}

/// The feasible region of the RoPE base (see ``base_bounds``): two lower bounds, one upper
/// bound, and whether a given base lies inside.
#[pyclass(name = "BaseBounds", module = "kvpress_rs._native", frozen)]
pub struct PyBaseBounds {
    inner: BaseBounds,
    base: Option<f64>,
}

#[pymethods]
impl PyBaseBounds {
    /// Aliasing lower bound (L / 2π)^(d/(d−2)).
    #[getter]
    fn aliasing(&self) -> f64 {
        self.inner.aliasing
    }

    /// DC-stability lower bound (L / Φ_N)^(d/(d−2)), tightening with depth N.
    #[getter]
    fn stability(&self) -> f64 {
        self.inner.stability
    }

    /// Precision upper bound u^(−d/(d−2)), u the dtype's unit roundoff.
    #[getter]
    fn precision(&self) -> f64 {
        self.inner.precision
    }

    /// max(aliasing, stability).
    #[getter]
    fn lower(&self) -> f64 {
        self.inner.lower()
    }

    /// The precision bound.
    #[getter]
    fn upper(&self) -> f64 {
        self.inner.upper()
    }

    /// Φ_N: the largest phase the slowest channel may sweep over the context at this depth.
    #[getter]
    fn max_phase(&self) -> f64 {
        self.inner.max_phase
    }

    /// Whether no base satisfies all three bounds.
    #[getter]
    fn empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// The base that was checked, if any.
    #[getter]
    fn base(&self) -> Option<f64> {
        self.base
    }

    /// Whether ``base`` lies in the region (None when no base was given).
    #[getter]
    fn feasible(&self) -> Option<bool> {
        self.base.map(|b| self.inner.contains(b))
    }

    /// Whether ``base`` lies in the region.
    fn contains(&self, base: f64) -> bool {
        self.inner.contains(base)
    }

    fn __repr__(&self) -> String {
        let b = &self.inner;
        let tail = match self.base {
            Some(base) => format!(", base={base:.6e}, feasible={}", py_bool(b.contains(base))),
            None => String::new(),
        };
        format!(
            "BaseBounds(aliasing={:.6e}, stability={:.6e}, precision={:.6e}{tail})",
            b.aliasing, b.stability, b.precision
        )
    }
}

/// The feasible region of the RoPE base for a context length, a depth and a dtype (after
/// "RoPE as phase modulation"; formulas derived in ``kvpress_rs.rope.base_bounds``).
///
/// With d the rotary dimension, L the context, N the depth, κ = (d−2)/d and the slowest
/// channel sweeping Φ = L·b^(−κ) over the context, whose DC component is
/// D(Φ) = |sin(Φ/2)/(Φ/2)|:
///
/// - aliasing: Φ < 2π (first null of D) → b > (L/2π)^(1/κ);
/// - stability: D(Φ)^N ≥ 2/π → Φ ≤ Φ_N → b ≥ (L/Φ_N)^(1/κ);
/// - precision: b^(−κ) ≥ u = 2^(−p) (p significand bits) → b ≤ u^(−1/κ).
///
/// Parameters
/// ----------
/// head_dim : int
///     Rotary dimension (pass rotary_dim for partial rotary), even, >= 4.
/// context_length : int
///     Target context length in tokens.
/// depth : int
///     Number of layers.
/// dtype : torch.dtype or str
///     The type phases are computed in ("float32", "bfloat16", "float16", "float64").
/// base : float, optional
///     A base to check (``feasible``).
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> kvpress_rs._native.base_bounds(128, 4096, 32, torch.float32, base=1e4).feasible
/// True
#[pyfunction]
#[pyo3(signature = (head_dim, context_length, depth, dtype=DtypeName("float32".to_owned()), base=None))]
fn base_bounds(
    head_dim: i64,
    context_length: i64,
    depth: i64,
    dtype: DtypeName,
    base: Option<f64>,
) -> PyResult<PyBaseBounds> {
    let precision = Precision::from_name(&dtype.0).map_err(to_pyerr)?;
    let inner = core_base_bounds(
        count("head_dim", head_dim)?,
        count("context_length", context_length)?,
        count("depth", depth)?,
        precision,
    )
    .map_err(to_pyerr)?;
    Ok(PyBaseBounds { inner, base })
}
