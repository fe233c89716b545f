//! The one place where core errors become Python exceptions.
//!
//! The exception classes live in `kvpress_rs/errors.py` (so that they can subclass both
//! `KVPressError` and `ValueError`/`TypeError`); each `KvError` variant maps to one of them.

use crate::error::KvError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// The name of the `kvpress_rs.errors` class raised for each variant.
fn exception_name(err: &KvError) -> &'static str {
    match err {
        KvError::InvalidArgument { .. } => "InvalidArgumentError",
        KvError::Shape { .. } => "ShapeError",
        KvError::Dtype { .. } => "DtypeError",
        KvError::Device { .. } => "DeviceError",
        KvError::NonFinite { .. } => "NonFiniteError",
        KvError::Empty { .. } => "EmptySequenceError",
        KvError::State(_) => "CacheStateError",
        KvError::Unsupported(_) => "UnsupportedError",
        KvError::UnsupportedModel(_) => "UnsupportedModelError",
        KvError::Torch(_) => "TorchError",
    }
}

/// Builds the Python exception for a core error.
pub fn to_pyerr(err: KvError) -> PyErr {
    let message = err.to_string();
    Python::attach(|py| {
        let class = py
            .import("kvpress_rs.errors")
            .and_then(|m| m.getattr(exception_name(&err)));
        match class {
            Ok(class) => match class.call1((message.clone(),)) {
                Ok(instance) => PyErr::from_value(instance),
                Err(e) => e,
            },
            Err(_) => PyRuntimeError::new_err(message),
        }
    })
}

/// An internal failure (a bug): raised as `kvpress_rs.errors.InternalError`.
pub fn internal(message: String) -> PyErr {
    Python::attach(|py| {
        match py
            .import("kvpress_rs.errors")
            .and_then(|m| m.getattr("InternalError"))
        {
            Ok(class) => match class.call1((message.clone(),)) {
                Ok(instance) => PyErr::from_value(instance),
                Err(e) => e,
            },
            Err(_) => PyRuntimeError::new_err(message),
        }
    })
}

/// Runs core work with the GIL released, turning errors and (should one ever happen) a
/// panic into Python exceptions. Every binding that does real work goes through here.
pub fn detached<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    F: FnOnce() -> crate::error::Result<T> + Send,
    T: Send,
{
    let outcome = py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)));
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(to_pyerr(err)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(internal(format!(
                "internal error in kvpress_rs (please report): {what}"
            )))
        }
    }
}
