//! `kvpress_rs._native.Press`: a scorer and a budget (see `crate::press`).

use super::conversion::PyTensor;
use super::errors::{detached, to_pyerr};
use crate::budget::Budget;
use crate::policies::{scorer_from_name, ScorerParams};
use crate::press::Press;
use pyo3::prelude::*;

/// A token-eviction rule: a policy that scores tokens and a budget that says how many a
/// layer keeps. Immutable and shareable across layers and threads.
///
/// Parameters
/// ----------
/// policy : str
///     "knorm", "streaming_llm" or "random".
/// compression_ratio : float, optional
///     Fraction of tokens removed, in [0, 1).
/// max_tokens : int, optional
///     A fixed per-layer token budget instead of a ratio.
/// n_sink : int
///     StreamingLLM: initial tokens always kept.
/// seed : int
///     Random: the seed.
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
    #[pyo3(signature = (policy, *, compression_ratio=None, max_tokens=None, n_sink=4, seed=0))]
    fn new(
        policy: &str,
        compression_ratio: Option<f64>,
        max_tokens: Option<i64>,
        n_sink: i64,
        seed: u64,
    ) -> PyResult<Self> {
        let scorer = scorer_from_name(policy, &ScorerParams { n_sink, seed }).map_err(to_pyerr)?;
        let budget = Budget::from_args(compression_ratio, max_tokens).map_err(to_pyerr)?;
        Ok(PyPress {
            inner: Press::new(scorer, budget),
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

    /// Whether this press can never evict (ratio 0).
    #[getter]
    fn keeps_everything(&self) -> bool {
        self.inner.budget().keeps_everything()
    }

    /// Tokens kept out of ``n_tokens`` under this press's budget.
    fn n_kept(&self, n_tokens: usize) -> PyResult<usize> {
        self.inner.budget().n_kept(n_tokens).map_err(to_pyerr)
    }

    /// int64 (batch, kv_heads, n_kept) ascending indices of the tokens kept out of
    /// ``keys``/``values`` (batch, kv_heads, tokens, head_dim).
    fn kept_indices(
        slf: Bound<'_, Self>,
        keys: PyTensor,
        values: PyTensor,
        layer_idx: usize,
    ) -> PyResult<PyTensor> {
        let py = slf.py();
        let me = slf.get();
        detached(py, move || {
            me.inner.kept_indices(&keys.0, &values.0, layer_idx)
        })
        .map(PyTensor)
    }

    fn __repr__(&self) -> String {
        match self.inner.budget() {
            Budget::Ratio(r) => format!("Press({:?}, compression_ratio={r})", self.policy()),
            Budget::MaxTokens(n) => format!("Press({:?}, max_tokens={n})", self.policy()),
        }
    }
}
