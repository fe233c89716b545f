//! `kvpress_rs._native.registry()` and `presets()`: the registry of press stages as plain
//! Python data, from which `kvpress_rs._generate` writes the cache classes, the stub of
//! `Press` and the README's methods table (see `crate::registry`).

use crate::registry::{stages, Default, ParamType, PRESETS};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(registry, m)?)?;
    m.add_function(wrap_pyfunction!(presets, m)?)?;
    Ok(())
}

fn default<'py>(py: Python<'py>, d: Default) -> PyResult<Bound<'py, PyAny>> {
    Ok(match d {
        Default::Int(x) => x.into_pyobject(py)?.into_any(),
        Default::Float(x) => x.into_pyobject(py)?.into_any(),
        Default::Bool(x) => pyo3::types::PyBool::new(py, x).to_owned().into_any(),
        Default::Str(s) => s.into_pyobject(py)?.into_any(),
        Default::Required => py.None().into_bound(py),
    })
}

/// Every press stage: a list of dicts with ``kind`` ("scorer", "transform",
/// "layer_budget", "head_budget", "selector", "eviction"), ``name``, ``aliases``,
/// ``summary``, ``reference``, ``url`` and ``params`` (dicts with ``name``, ``type``,
/// ``default``, ``expected`` — the range in words — and ``doc``).
///
/// Examples
/// --------
/// >>> import kvpress_rs
/// >>> [s["name"] for s in kvpress_rs._native.registry() if s["kind"] == "layer_budget"]
/// ['uniform', 'pyramid', 'cake', 'explicit']
#[pyfunction]
fn registry(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let out = PyList::empty(py);
    for s in stages() {
        let d = PyDict::new(py);
        let kind = match s.kind() {
            crate::registry::StageKind::Scorer => "scorer",
            crate::registry::StageKind::Transform => "transform",
            crate::registry::StageKind::LayerBudget => "layer_budget",
            crate::registry::StageKind::HeadBudget => "head_budget",
            crate::registry::StageKind::Selector => "selector",
            crate::registry::StageKind::Eviction => "eviction",
        };
        d.set_item("kind", kind)?;
        d.set_item("name", s.name)?;
        d.set_item("aliases", s.aliases.to_vec())?;
        d.set_item("summary", s.summary)?;
        d.set_item("reference", s.reference)?;
        d.set_item("url", s.url)?;
        let params = PyList::empty(py);
        for p in s.params {
            let pd = PyDict::new(py);
            pd.set_item("name", p.name)?;
            pd.set_item(
                "type",
                match p.ty {
                    ParamType::Floats => "list[float]",
                    other => other.python(),
                },
            )?;
            pd.set_item("default", default(py, p.default)?)?;
            pd.set_item("default_source", p.default.python())?;
            pd.set_item("expected", p.expected())?;
            pd.set_item("doc", p.doc)?;
            params.append(pd)?;
        }
        d.set_item("params", params)?;
        out.append(d)?;
    }
    Ok(out)
}

/// The named cache classes: dicts with ``name`` (the method's short name), ``class``, ``scorer`` (None: the class takes a
/// ``scorer`` argument), ``default_scorer``, ``layer_budget``, ``head_budget`` (None: not
/// fixed), ``ties`` (parameter, source) pairs, ``reads``, ``kvpress`` (kvpress's twin press),
/// ``title``, ``url`` and ``doc``.
///
/// Examples
/// --------
/// >>> import kvpress_rs
/// >>> [p["class"] for p in kvpress_rs._native.presets()][:2]
/// ['StreamingLLMCache', 'KnormCache']
#[pyfunction]
fn presets(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let out = PyList::empty(py);
    for p in PRESETS {
        let d = PyDict::new(py);
        d.set_item("name", p.name)?;
        d.set_item("class", p.class)?;
        d.set_item("scorer", p.scorer)?;
        d.set_item("default_scorer", p.default_scorer)?;
        d.set_item("layer_budget", p.layer_budget)?;
        d.set_item("head_budget", p.head_budget)?;
        d.set_item("selector", p.selector)?;
        d.set_item("ties", p.ties.to_vec())?;
        d.set_item("reads", p.reads)?;
        d.set_item("kvpress", p.kvpress)?;
        d.set_item("title", p.title)?;
        d.set_item("url", p.url)?;
        d.set_item("doc", p.doc)?;
        out.append(d)?;
    }
    Ok(out)
}
