//! `kvpress_rs._native.DecodingSchedule` and `QueryStats`: decoding-time compression's
//! schedule (`crate::decoding`) and TriAttention's pre-RoPE query statistics
//! (`crate::policies::QueryStats`) for Python.

use super::conversion::PyTensor;
use super::errors::{detached, to_pyerr};
use super::rope::PyRope;
use crate::decoding::{DecodingBudget, DecodingSchedule};
use crate::error::{KvError, Result};
use crate::policies::{query_stats, QueryStats};
use pyo3::prelude::*;
use std::sync::{Mutex, MutexGuard};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDecodingSchedule>()?;
    m.add_class::<PyQueryStats>()?;
    Ok(())
}

/// When a growing cache compresses, and to how many tokens (see ``KVCache``'s
/// ``decoding_budget``).
///
/// Examples
/// --------
/// >>> from kvpress_rs._native import DecodingSchedule
/// >>> s = DecodingSchedule(decoding_budget=100, decoding_interval=16)
/// >>> s.plan(116, 116, 1, 0)
/// 100
#[pyclass(name = "DecodingSchedule", module = "kvpress_rs._native", frozen)]
pub struct PyDecodingSchedule {
    pub(crate) inner: DecodingSchedule,
}

#[pymethods]
impl PyDecodingSchedule {
    #[new]
    #[pyo3(signature = (*, decoding_budget=None, decoding_ratio=None, decoding_interval=None, protect_prompt=false))]
    fn new(
        decoding_budget: Option<i64>,
        decoding_ratio: Option<f64>,
        decoding_interval: Option<i64>,
        protect_prompt: bool,
    ) -> PyResult<Self> {
        DecodingSchedule::from_args(
            decoding_budget,
            decoding_ratio,
            decoding_interval,
            protect_prompt,
        )
        .map(|inner| PyDecodingSchedule { inner })
        .map_err(to_pyerr)
    }

    /// Tokens kept per layer, or None with a ratio.
    #[getter]
    fn decoding_budget(&self) -> Option<usize> {
        match self.inner.budget() {
            DecodingBudget::Tokens(n) => Some(n),
            DecodingBudget::Ratio(_) => None,
        }
    }

    /// Fraction of the tokens seen kept, or None with a token budget.
    #[getter]
    fn decoding_ratio(&self) -> Option<f64> {
        match self.inner.budget() {
            DecodingBudget::Ratio(r) => Some(r),
            DecodingBudget::Tokens(_) => None,
        }
    }

    #[getter]
    fn decoding_interval(&self) -> usize {
        self.inner.interval()
    }

    #[getter]
    fn protect_prompt(&self) -> bool {
        self.inner.protect_prompt()
    }

    /// After a forward of ``new_tokens`` tokens, a layer holding ``stored`` tokens (having
    /// seen ``seen``, ``protected_prompt`` of them protected): the token count to compress
    /// to now, or None.
    fn plan(
        &self,
        stored: usize,
        seen: usize,
        new_tokens: usize,
        protected_prompt: usize,
    ) -> PyResult<Option<usize>> {
        self.inner
            .plan(stored, seen, new_tokens, protected_prompt)
            .map_err(to_pyerr)
    }

    fn __repr__(&self) -> String {
        let budget = match self.inner.budget() {
            DecodingBudget::Tokens(n) => format!("decoding_budget={n}"),
            DecodingBudget::Ratio(r) => format!("decoding_ratio={r}"),
        };
        format!(
            "DecodingSchedule({budget}, decoding_interval={}, protect_prompt={})",
            self.inner.interval(),
            if self.inner.protect_prompt() {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// Pre-RoPE query statistics of one layer (TriAttention): per query head, the mean query
/// as complex pairs and the mean magnitude of each pair, over ``count`` queries.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> from kvpress_rs._native import QueryStats
/// >>> rope = kvpress_rs.rope.Rope(8, theta=10000.0)
/// >>> s = QueryStats.from_queries(torch.randn(1, 2, 5, 8), rope, 0)
/// >>> s.merged(QueryStats.from_queries(torch.randn(1, 2, 3, 8), rope, 5)).count
/// 8
#[pyclass(name = "QueryStats", module = "kvpress_rs._native", frozen)]
pub struct PyQueryStats {
    inner: Mutex<QueryStats>,
}

impl PyQueryStats {
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, QueryStats>> {
        self.inner
            .lock()
            .map_err(|_| KvError::State("query statistics poisoned by an earlier error".into()))
    }

    pub(crate) fn wrap(stats: QueryStats) -> Self {
        PyQueryStats {
            inner: Mutex::new(stats),
        }
    }
}

#[pymethods]
impl PyQueryStats {
    /// The statistics of post-RoPE ``queries`` (batch, q_heads, q, head_dim) of the
    /// tokens at positions ``start`` .. ``start`` + q (inverse-rotated exactly).
    #[staticmethod]
    fn from_queries(
        py: Python<'_>,
        queries: PyTensor,
        rope: Bound<'_, PyRope>,
        start: usize,
    ) -> PyResult<Self> {
        let rope = rope.get().inner.clone();
        detached(py, move || query_stats(&queries.0, &rope, start)).map(Self::wrap)
    }

    /// Statistics from their tensors (a calibration file): ``center_re``, ``center_im``,
    /// ``magnitude`` (batch, q_heads, rotary_dim / 2), ``rest_mean``, ``rest_magnitude``
    /// (batch, q_heads, head_dim − rotary_dim), over ``count`` queries.
    #[staticmethod]
    fn from_tensors(
        center_re: PyTensor,
        center_im: PyTensor,
        magnitude: PyTensor,
        rest_mean: PyTensor,
        rest_magnitude: PyTensor,
        count: usize,
    ) -> PyResult<Self> {
        let heads = center_re.0.size();
        for (name, t) in [("center_im", &center_im.0), ("magnitude", &magnitude.0)] {
            if t.size() != heads {
                return Err(to_pyerr(KvError::shape(
                    name,
                    &t.size(),
                    format!("the shape of center_re, {heads:?}"),
                )));
            }
        }
        if heads.len() != 3 {
            return Err(to_pyerr(KvError::shape(
                "center_re",
                &heads,
                "(batch, q_heads, rotary_dim / 2)".to_string(),
            )));
        }
        Ok(Self::wrap(QueryStats {
            center_re: center_re.0,
            center_im: center_im.0,
            magnitude: magnitude.0,
            rest_mean: rest_mean.0,
            rest_magnitude: rest_magnitude.0,
            count,
        }))
    }

    /// The tensors, by name (see :meth:`from_tensors`).
    fn tensors(&self) -> PyResult<Vec<(&'static str, PyTensor)>> {
        let s = self.lock().map_err(to_pyerr)?;
        Ok(vec![
            ("center_re", PyTensor(s.center_re.shallow_clone())),
            ("center_im", PyTensor(s.center_im.shallow_clone())),
            ("magnitude", PyTensor(s.magnitude.shallow_clone())),
            ("rest_mean", PyTensor(s.rest_mean.shallow_clone())),
            ("rest_magnitude", PyTensor(s.rest_magnitude.shallow_clone())),
        ])
    }

    /// Both sets' statistics, weighted by their counts (a new object).
    fn merged(slf: Bound<'_, Self>, other: Bound<'_, PyQueryStats>) -> PyResult<Self> {
        let (me, other) = (slf.get(), other.get());
        if std::ptr::eq(me, other) {
            let s = me.lock().map_err(to_pyerr)?;
            return s.merge(&s).map(Self::wrap).map_err(to_pyerr);
        }
        detached(slf.py(), move || {
            let (a, b) = (me.lock()?, other.lock()?);
            a.merge(&b)
        })
        .map(Self::wrap)
    }

    /// How many queries the statistics are over.
    #[getter]
    fn count(&self) -> PyResult<usize> {
        Ok(self.lock().map_err(to_pyerr)?.count)
    }

    fn __repr__(&self) -> PyResult<String> {
        let s = self.lock().map_err(to_pyerr)?;
        Ok(format!(
            "QueryStats(q_heads={}, pairs={}, count={})",
            s.center_re.size().get(1).copied().unwrap_or(0),
            s.center_re.size().last().copied().unwrap_or(0),
            s.count
        ))
    }
}
