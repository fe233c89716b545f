//! `kvpress_rs._native.Press`: a scorer and its budgets (see `crate::press`).

use super::conversion::PyTensor;
use super::decoding::PyQueryStats;
use super::errors::{detached, to_pyerr};
use super::quant::PyQuantizedStore;
use super::rope::PyRope;
use super::store::PyLayerStore;
use crate::budget::Budget;
use crate::error::KvError;
use crate::policies::{ParamValue, Params, QueryWindow};
use crate::press::Press;
use crate::press::{Decoding, Outcome, Plan};
use crate::registry::{build_press as build_press_from, PressSpec};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};
use std::sync::Arc;

/// Keyword arguments from Python into [`Params`] (ints, floats, bools, strings, lists of
/// numbers).
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
        } else if let Ok(numbers) = value.extract::<Vec<f64>>() {
            ParamValue::Floats(numbers)
        } else {
            return Err(to_pyerr(KvError::invalid(
                name.as_str(),
                format!(
                    "got a {}, expected an int, float, bool, str or a list of numbers",
                    value.get_type().name()?
                ),
            )));
        };
        params.insert(&name, parsed);
    }
    Ok(params)
}

/// Builds a press from the user-facing arguments, through the registry.
#[allow(clippy::too_many_arguments)]
pub fn build_press(
    policy: &str,
    compression_ratio: Option<f64>,
    max_tokens: Option<i64>,
    layer_budget: &str,
    head_budget: &str,
    selector: &str,
    eviction: &str,
    transforms: Vec<String>,
    n_layers: usize,
    rope: Option<&PyRope>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<Press> {
    let spec = PressSpec {
        scorer: policy,
        transforms: transforms.iter().map(String::as_str).collect(),
        layer_budget,
        head_budget,
        selector,
        eviction,
        compression_ratio,
        max_tokens,
        n_layers,
        rope: rope.map(|r| r.inner.clone()),
        params: params_from_kwargs(kwargs)?,
    };
    build_press_from(spec).map_err(to_pyerr)
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
///     "uniform", "pyramid" (PyramidKV; ``beta``), "cake" (CAKE; ``tau1``, ``tau2``,
///     ``cake_window``) or "explicit" (``layer_ratios``, one per layer).
/// head_budget : str
///     "uniform" or "adakv" (AdaKV; ``alpha_safeguard``).
/// selector : str
///     "topk".
/// eviction : str
///     "drop", or "low_bits" (evicted tokens are handed back to be kept at low precision).
/// transforms : list of str
///     Score transforms applied in order, e.g. ["head_mean"].
/// n_layers : int
///     Layers of the model (layer budgets depend on depth).
/// rope : kvpress_rs.Rope, optional
///     The model's RoPE, for policies that score in pre-RoPE space or over future
///     distances (ExpectedAttention, TriAttention).
/// **params
///     The stages' parameters, e.g. ``n_sink`` (StreamingLLM), ``window_size`` and
///     ``kernel_size`` (SnapKV), ``beta`` (pyramid); every name, default and range is in
///     ``kvpress_rs.registry`` (and in the generated signatures of the cache classes).
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> press = kvpress_rs._native.Press("knorm", compression_ratio=0.5)
/// >>> press.kept_indices(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), 0).shape
/// torch.Size([1, 2, 4])
#[pyclass(name = "Press", module = "kvpress_rs._native", frozen)]
pub struct PyPress {
    pub(crate) inner: Arc<Press>,
}

impl PyPress {
    /// The press, shared (the layers of a cache hold it).
    pub(crate) fn shared(&self) -> Arc<Press> {
        Arc::clone(&self.inner)
    }
}

#[pymethods]
impl PyPress {
    #[new]
    #[pyo3(signature = (policy, *, compression_ratio=None, max_tokens=None, layer_budget="uniform",
        head_budget="uniform", selector="topk", eviction="drop", transforms=vec![], n_layers=1,
        rope=None, **params))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        policy: &str,
        compression_ratio: Option<f64>,
        max_tokens: Option<i64>,
        layer_budget: &str,
        head_budget: &str,
        selector: &str,
        eviction: &str,
        transforms: Vec<String>,
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
            selector,
            eviction,
            transforms,
            n_layers,
            rope,
            params,
        )?;
        Ok(PyPress {
            inner: Arc::new(inner),
        })
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

    /// The layer budget's name ("uniform", "pyramid", "cake", "explicit").
    #[getter]
    fn layer_budget(&self) -> &'static str {
        self.inner.layer_budget().name()
    }

    /// The head budget's name ("uniform", "adakv").
    #[getter]
    fn head_budget(&self) -> &'static str {
        self.inner.head_budget().name()
    }

    /// The selector's name ("topk").
    #[getter]
    fn selector(&self) -> &'static str {
        self.inner.selector().name()
    }

    /// The eviction rule's name ("drop", "low_bits").
    #[getter]
    fn eviction(&self) -> &'static str {
        self.inner.eviction().name()
    }

    /// The score transforms' names, in order.
    #[getter]
    fn transforms(&self) -> Vec<&'static str> {
        self.inner.transforms().map(|t| t.name()).collect()
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

    /// Carries out ``plan`` (a :class:`Plan`) on ``store`` (a LayerStore, or a
    /// QuantizedStore for a decoding step) — the one entry point of every compression.
    fn compress(
        slf: Bound<'_, Self>,
        store: Bound<'_, PyAny>,
        plan: Bound<'_, PyPlan>,
    ) -> PyResult<PyOutcome> {
        let me = slf.get();
        let plan = plan.get().plan().map_err(to_pyerr)?;
        let outcome = if let Ok(s) = store.cast::<PyLayerStore>() {
            let s = s.get();
            detached(slf.py(), move || me.inner.compress(&mut *s.lock()?, plan))?
        } else if let Ok(s) = store.cast::<PyQuantizedStore>() {
            let s = s.get();
            detached(slf.py(), move || {
                s.with_store(|q| me.inner.compress(q, plan))
            })?
        } else {
            return Err(to_pyerr(KvError::invalid(
                "store",
                format!(
                    "got a {}, expected a kvpress_rs._native.LayerStore or QuantizedStore",
                    store.get_type().name()?
                ),
            )));
        };
        Ok(PyOutcome {
            inner: std::sync::Mutex::new(outcome),
        })
    }

    fn __repr__(&self) -> String {
        let budget = match self.inner.budget() {
            Budget::Ratio(r) => format!("compression_ratio={r}"),
            Budget::MaxTokens(n) => format!("max_tokens={n}"),
        };
        format!(
            "Press({:?}, {budget}, layer_budget={:?}, head_budget={:?}, selector={:?})",
            self.policy(),
            self.inner.layer_budget().name(),
            self.inner.head_budget().name(),
            self.inner.selector().name()
        )
    }
}

/// One compression step for :meth:`Press.compress`: build it with :meth:`prefill`,
/// :meth:`score`, :meth:`select` or :meth:`decoding`.
///
/// Examples
/// --------
/// >>> import kvpress_rs
/// >>> kvpress_rs._native.Plan.decoding(0, n_kept=60, next_position=100, protect_last=8)
/// Plan(step='decoding', layer_idx=0)
#[pyclass(name = "Plan", module = "kvpress_rs._native", frozen)]
pub struct PyPlan {
    // frozen classes are shared across threads: the tensors sit behind a lock
    inner: std::sync::Mutex<PlanFields>,
}

struct PlanFields {
    layer_idx: usize,
    step: &'static str,
    decoding: Decoding,
    scores: Option<tch::Tensor>,
    n_kept: Vec<usize>,
    queries: Option<tch::Tensor>,
    query_stats: Option<Py<PyQueryStats>>,
    previous_scores: Option<tch::Tensor>,
    hidden: Vec<usize>,
}

impl PlanFields {
    fn with(layer_idx: usize, step: &'static str) -> Self {
        PlanFields {
            layer_idx,
            step,
            decoding: Decoding::default(),
            scores: None,
            n_kept: vec![],
            queries: None,
            query_stats: None,
            previous_scores: None,
            hidden: vec![],
        }
    }
}

impl PyPlan {
    fn plan(&self) -> crate::error::Result<Plan> {
        self.inner
            .lock()
            .map_err(|_| KvError::State("the plan is poisoned".into()))?
            .plan()
    }

    fn wrap(fields: PlanFields) -> Self {
        PyPlan {
            inner: std::sync::Mutex::new(fields),
        }
    }
}

impl PlanFields {
    fn plan(&self) -> crate::error::Result<Plan> {
        let plan = match self.step {
            "prefill" => Plan::prefill(self.layer_idx),
            "score" => Plan::score(self.layer_idx),
            "select" => {
                let scores = self
                    .scores
                    .as_ref()
                    .ok_or_else(|| KvError::invalid("scores", "missing"))?;
                Plan::select(self.layer_idx, scores, self.n_kept.clone())
            }
            _ => Plan::decoding(self.layer_idx, self.decoding),
        };
        let stats = match &self.query_stats {
            Some(s) => Some(Python::attach(|py| {
                s.bind(py).get().lock().map(|g| g.shallow())
            })?),
            None => None,
        };
        Ok(plan
            .with_queries(self.queries.as_ref())
            .with_query_stats(stats.as_ref())
            .with_previous_scores(self.previous_scores.as_ref())
            .with_hidden(self.hidden.clone()))
    }
}

#[pymethods]
impl PyPlan {
    /// A prompt's compression of layer ``layer_idx``: score, keep the layer's budget.
    /// ``queries`` (batch, q_heads, q, head_dim): post-RoPE queries of the last q tokens;
    /// ``hidden``: per batch row, hidden (padding) slots at the front of every row.
    #[staticmethod]
    #[pyo3(signature = (layer_idx, queries=None, hidden=None))]
    fn prefill(layer_idx: usize, queries: Option<PyTensor>, hidden: Option<Vec<usize>>) -> Self {
        Self::wrap(PlanFields {
            queries: queries.map(|q| q.0),
            hidden: hidden.unwrap_or_default(),
            ..PlanFields::with(layer_idx, "prefill")
        })
    }

    /// Scoring only (a cross-layer budget); the outcome has ``scores`` and ``preferences``.
    #[staticmethod]
    #[pyo3(signature = (layer_idx, queries=None, hidden=None))]
    fn score(layer_idx: usize, queries: Option<PyTensor>, hidden: Option<Vec<usize>>) -> Self {
        Self::wrap(PlanFields {
            queries: queries.map(|q| q.0),
            hidden: hidden.unwrap_or_default(),
            ..PlanFields::with(layer_idx, "score")
        })
    }

    /// Keeps the ``n_kept`` best of earlier ``scores`` (one count, or one per batch row).
    #[staticmethod]
    #[pyo3(signature = (layer_idx, scores, n_kept, hidden=None))]
    fn select(
        layer_idx: usize,
        scores: PyTensor,
        n_kept: Vec<usize>,
        hidden: Option<Vec<usize>>,
    ) -> Self {
        Self::wrap(PlanFields {
            scores: Some(scores.0),
            n_kept,
            hidden: hidden.unwrap_or_default(),
            ..PlanFields::with(layer_idx, "select")
        })
    }

    /// A decoding-time compression to ``n_kept`` tokens per row; ``next_position``: tokens
    /// seen; the first ``protect_first`` and last ``protect_last`` stored tokens are kept;
    /// ``query_stats``: TriAttention's statistics; ``previous_scores``: the previous
    /// compression's ``kept_scores`` (a scorer that remembers).
    #[staticmethod]
    #[pyo3(signature = (layer_idx, *, n_kept, next_position, protect_first=0, protect_last=0,
        queries=None, query_stats=None, previous_scores=None))]
    #[allow(clippy::too_many_arguments)]
    fn decoding(
        layer_idx: usize,
        n_kept: usize,
        next_position: usize,
        protect_first: usize,
        protect_last: usize,
        queries: Option<PyTensor>,
        query_stats: Option<Py<PyQueryStats>>,
        previous_scores: Option<PyTensor>,
    ) -> Self {
        Self::wrap(PlanFields {
            decoding: Decoding {
                n_kept,
                next_position,
                protect_first,
                protect_last,
            },
            queries: queries.map(|q| q.0),
            query_stats,
            previous_scores: previous_scores.map(|p| p.0),
            ..PlanFields::with(layer_idx, "decoding")
        })
    }

    fn __repr__(&self) -> PyResult<String> {
        let f = self
            .inner
            .lock()
            .map_err(|_| to_pyerr(KvError::State("the plan is poisoned".into())))?;
        Ok(format!(
            "Plan(step='{}', layer_idx={})",
            f.step, f.layer_idx
        ))
    }
}

/// What :meth:`Press.compress` did.
#[pyclass(name = "Outcome", module = "kvpress_rs._native", frozen)]
pub struct PyOutcome {
    // frozen classes are shared across threads: the tensors sit behind a lock
    inner: std::sync::Mutex<Outcome>,
}

impl PyOutcome {
    fn get(&self) -> PyResult<std::sync::MutexGuard<'_, Outcome>> {
        self.inner
            .lock()
            .map_err(|_| to_pyerr(KvError::State("the outcome is poisoned".into())))
    }
}

#[pymethods]
impl PyOutcome {
    /// Whether tokens left the store.
    #[getter]
    fn evicted(&self) -> PyResult<bool> {
        Ok(self.get()?.evicted)
    }

    /// The evicted tokens' (keys, values) when the press sets them aside (low bits).
    #[getter]
    fn set_aside(&self) -> PyResult<Option<(PyTensor, PyTensor)>> {
        Ok(self
            .get()?
            .set_aside
            .as_ref()
            .map(|(k, v)| (PyTensor(k.shallow_clone()), PyTensor(v.shallow_clone()))))
    }

    /// The kept tokens' scores (float (batch, kv_heads, n_kept)) for a scorer that
    /// remembers, to pass as the next decoding step's ``previous_scores``.
    #[getter]
    fn kept_scores(&self) -> PyResult<Option<PyTensor>> {
        Ok(self
            .get()?
            .kept_scores
            .as_ref()
            .map(|t| PyTensor(t.shallow_clone())))
    }

    /// A scoring step's scores (batch, kv_heads, tokens).
    #[getter]
    fn scores(&self) -> PyResult<Option<PyTensor>> {
        Ok(self
            .get()?
            .scored
            .as_ref()
            .map(|s| PyTensor(s.scores.shallow_clone())))
    }

    /// A scoring step's layer preferences (one, or one per batch row).
    #[getter]
    fn preferences(&self) -> PyResult<Option<Vec<f64>>> {
        Ok(self.get()?.scored.as_ref().map(|s| s.preferences.clone()))
    }

    /// The new hidden slots per batch row (padded batches).
    #[getter]
    fn hidden(&self) -> PyResult<Option<Vec<usize>>> {
        Ok(self.get()?.hidden.clone())
    }

    fn __repr__(&self) -> PyResult<String> {
        let evicted = if self.get()?.evicted { "True" } else { "False" };
        Ok(format!("Outcome(evicted={evicted})"))
    }
}
