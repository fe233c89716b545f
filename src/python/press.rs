//! `kvpress_rs._native.Press`: a scorer and its budgets (see `crate::press`).

use super::conversion::PyTensor;
use super::errors::{detached, to_pyerr};
use super::rope::PyRope;
use crate::budget::{Budget, HeadBudget, LayerBudget};
use crate::error::KvError;
use crate::policies::{scorer_from_name, ParamValue, Params, QueryWindow};
use crate::press::Press;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};

/// Policy keyword arguments from Python into [`Params`] (ints, floats, bools, strings).
pub fn params_from_kwargs(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Params> {
    let mut params = Params::new();
    let Some(kwargs) = kwargs else {
        return Ok(params);
    };
    for (key, value) in kwargs.iter() {
        let name: String = key.extract()?;
        let parsed = if value.is_instance_of::<PyBool>() {
            ParamValue::Bool(value.extract()?)
        } else if value.is_instance_of::<PyInt>() {
            ParamValue::Int(value.extract()?)
        } else if value.is_instance_of::<PyFloat>() {
            ParamValue::Float(value.extract()?)
        } else if value.is_instance_of::<PyString>() {
            ParamValue::Str(value.extract()?)
        } else {
            return Err(to_pyerr(KvError::invalid(
                name.as_str(),
                format!(
                    "got a {}, expected an int, float, bool or str",
                    value.get_type().name()?
                ),
            )));
        };
        params.insert(&name, parsed);
    }
    Ok(params)
}

/// Builds a press from the user-facing arguments.
#[allow(clippy::too_many_arguments)]
pub fn build_press(
    policy: &str,
    compression_ratio: Option<f64>,
    max_tokens: Option<i64>,
    layer_budget: &str,
    head_budget: &str,
    n_layers: usize,
    rope: Option<&PyRope>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<Press> {
    let mut params = params_from_kwargs(kwargs)?;
    let build = |params: &mut Params| -> crate::error::Result<Press> {
        let beta = params.take_f64("beta", 20.0)?;
        let alpha = params.take_f64("alpha_safeguard", 0.2)?;
        let cake = (
            params.take_f64("tau1", 1.6)?,
            params.take_f64("tau2", 0.6)?,
            params.take_usize("cake_window", 32)?,
        );
        let scorer = scorer_from_name(policy, std::mem::take(params))?;
        let layer_budget =
            LayerBudget::from_name(layer_budget, beta, scorer.protected_window(), cake)?;
        let head_budget = HeadBudget::from_name(head_budget, alpha)?;
        let budget = Budget::from_args(compression_ratio, max_tokens)?;
        let press = Press::with_budgets(scorer, budget, layer_budget, head_budget, n_layers);
        Ok(match rope {
            Some(r) => press.with_rope(r.inner.clone()),
            None => press,
        })
    };
    build(&mut params).map_err(to_pyerr)
}

/// A token-eviction rule: a policy that scores tokens, a budget that says how many a
/// layer keeps on average, and how that budget varies across layers and heads. Immutable
/// and shareable across layers and threads.
///
/// Parameters
/// ----------
/// policy : str
///     "knorm", "streaming_llm", "random", "snapkv", "tova", "observed_attention",
///     "keydiff", "lagkv", ...
/// compression_ratio : float, optional
///     Fraction of tokens removed, in [0, 1).
/// max_tokens : int, optional
///     A fixed per-layer token budget instead of a ratio.
/// layer_budget : str
///     "uniform", "pyramid" (PyramidKV; ``beta``, default 20) or "cake" (CAKE; ``tau1``
///     1.6, ``tau2`` 0.6, ``cake_window`` 32).
/// head_budget : str
///     "uniform" or "adakv" (AdaKV; ``alpha_safeguard``, default 0.2).
/// n_layers : int
///     Layers of the model (layer budgets depend on depth).
/// rope : kvpress_rs.Rope, optional
///     The model's RoPE, for policies that score in pre-RoPE space or over future
///     distances (ExpectedAttention, TriAttention).
/// **params
///     The policy's parameters, e.g. ``n_sink`` (StreamingLLM), ``window_size`` and
///     ``kernel_size`` (SnapKV), ``seed`` (Random).
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> press = kvpress_rs._native.Press("knorm", compression_ratio=0.5)
/// >>> press.kept_indices(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), 0).shape
/// torch.Size([1, 2, 4])
#[pyclass(name = "Press", module = "kvpress_rs._native", frozen)]
pub struct PyPress {
    pub(crate) inner: Press,
}

#[pymethods]
impl PyPress {
    #[new]
    #[pyo3(signature = (policy, *, compression_ratio=None, max_tokens=None, layer_budget="uniform",
        head_budget="uniform", n_layers=1, rope=None, **params))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        policy: &str,
        compression_ratio: Option<f64>,
        max_tokens: Option<i64>,
        layer_budget: &str,
        head_budget: &str,
        n_layers: usize,
        rope: Option<Bound<'_, PyRope>>,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let rope = rope.as_ref().map(|r| r.get());
        let inner = build_press(
            policy,
            compression_ratio,
            max_tokens,
            layer_budget,
            head_budget,
            n_layers,
            rope,
            params,
        )?;
        Ok(PyPress { inner })
    }

    /// The policy name.
    #[getter]
    fn policy(&self) -> &'static str {
        self.inner.scorer().name()
    }

    /// The compression ratio, or None for a token budget.
    #[getter]
    fn compression_ratio(&self) -> Option<f64> {
        match self.inner.budget() {
            Budget::Ratio(r) => Some(r),
            Budget::MaxTokens(_) => None,
        }
    }

    /// The per-layer token budget, or None for a ratio.
    #[getter]
    fn max_tokens(&self) -> Option<usize> {
        match self.inner.budget() {
            Budget::MaxTokens(n) => Some(n),
            Budget::Ratio(_) => None,
        }
    }

    /// "uniform" or "pyramid".
    #[getter]
    fn layer_budget(&self) -> &'static str {
        match self.inner.layer_budget() {
            LayerBudget::Uniform => "uniform",
            LayerBudget::Pyramid { .. } => "pyramid",
            LayerBudget::Cake { .. } => "cake",
        }
    }

    /// "uniform" or "adakv".
    #[getter]
    fn head_budget(&self) -> &'static str {
        match self.inner.head_budget() {
            HeadBudget::Uniform => "uniform",
            HeadBudget::AdaKv { .. } => "adakv",
        }
    }

    /// Which prompt queries the policy needs: None, an int n (the last n), or "all".
    #[getter]
    fn query_window<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self.inner.query_window() {
            QueryWindow::None => Ok(py.None().into_bound(py)),
            QueryWindow::Last(n) => Ok(n.into_pyobject(py)?.into_any()),
            QueryWindow::All => Ok("all".into_pyobject(py)?.into_any()),
        }
    }

    /// Whether layer budgets need every layer's scores before any layer is compressed
    /// (the CAKE layer budget).
    #[getter]
    fn needs_all_layers(&self) -> bool {
        self.inner.needs_all_layers()
    }

    /// Per-layer token counts from every layer's token count and preference (CAKE).
    fn allocate(&self, n_tokens: Vec<usize>, preferences: Vec<f64>) -> PyResult<Vec<usize>> {
        self.inner
            .allocate(&n_tokens, &preferences)
            .map_err(to_pyerr)
    }

    /// Whether decoding-time compressions of this policy take the previous compression's
    /// kept scores (``compress_to(previous_scores=...)``: SnapKV's rank pooling).
    #[getter]
    fn remembers_scores(&self) -> bool {
        self.inner.scorer().remembers_scores()
    }

    /// Whether the policy needs the model's RoPE.
    #[getter]
    fn needs_rope(&self) -> bool {
        self.inner.scorer().needs_rope()
    }

    /// Whether this press can never evict (ratio 0).
    #[getter]
    fn keeps_everything(&self) -> bool {
        self.inner.keeps_everything()
    }

    /// Tokens kept (per KV head, on average) by layer ``layer_idx`` out of ``n_tokens``.
    #[pyo3(signature = (n_tokens, layer_idx=0))]
    fn n_kept(&self, n_tokens: usize, layer_idx: usize) -> PyResult<usize> {
        self.inner.n_kept(n_tokens, layer_idx).map_err(to_pyerr)
    }

    /// int64 (batch, kv_heads, n_kept) ascending indices of the tokens kept out of
    /// ``keys``/``values`` (batch, kv_heads, tokens, head_dim), for a policy that needs no
    /// queries and a uniform head budget.
    fn kept_indices(
        slf: Bound<'_, Self>,
        keys: PyTensor,
        values: PyTensor,
        layer_idx: usize,
    ) -> PyResult<PyTensor> {
        let me = slf.get();
        detached(slf.py(), move || {
            me.inner.kept_indices(&keys.0, &values.0, layer_idx)
        })
        .map(PyTensor)
    }

    fn __repr__(&self) -> String {
        let budget = match self.inner.budget() {
            Budget::Ratio(r) => format!("compression_ratio={r}"),
            Budget::MaxTokens(n) => format!("max_tokens={n}"),
        };
        format!(
            "Press({:?}, {budget}, layer_budget={:?}, head_budget={:?})",
            self.policy(),
            self.layer_budget(),
            self.head_budget()
        )
    }
}
