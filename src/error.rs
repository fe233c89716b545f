//! The one error type of the core. Every fallible function returns [`Result`]; the Python
//! bindings map each variant once, in `python::errors`, to a named `kvpress_rs` exception.

use thiserror::Error;

/// Errors raised by the kvpress-rs core.
///
/// Each variant names the offending argument and what was expected, because these messages
/// reach users unchanged as Python exceptions.
#[derive(Debug, Error)]
pub enum KvError {
    /// An argument has an out-of-range or otherwise invalid value (a ratio outside [0, 1), a
    /// non-positive budget, an unknown policy name).
    #[error("invalid `{argument}`: {message}")]
    InvalidArgument { argument: String, message: String },

    /// A tensor has the wrong rank or the wrong size along some dimension.
    #[error("`{argument}` has shape {actual:?}, expected {expected}")]
    Shape {
        argument: String,
        actual: Vec<i64>,
        expected: String,
    },

    /// A tensor has an unsupported dtype, or one that differs from the cache's dtype.
    #[error("`{argument}` has dtype {actual}, expected {expected}")]
    Dtype {
        argument: String,
        actual: String,
        expected: String,
    },

    /// A tensor lives on a different device than the data it must be combined with.
    #[error("`{argument}` is on device {actual}, expected {expected}")]
    Device {
        argument: String,
        actual: String,
        expected: String,
    },

    /// A tensor holds NaN or infinite values where finite values are required.
    #[error("`{argument}` contains non-finite values (NaN or inf): {message}")]
    NonFinite { argument: String, message: String },

    /// An empty sequence (zero tokens) was given where at least one token is required.
    #[error("`{argument}` is empty: {message}")]
    Empty { argument: String, message: String },

    /// An operation is not valid in the cache's current state (for example, reusing a
    /// cache for an unrelated prompt without `reset()`).
    #[error("{0}")]
    State(String),

    /// An option or feature that is recognised but not implemented (yet).
    #[error("not supported: {0}")]
    Unsupported(String),

    /// The model cannot serve what was asked of it (its attention does not go through
    /// kvpress_rs, so a policy that reads queries gets none).
    #[error("{0}")]
    UnsupportedModel(String),

    /// libtorch reported an error.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}

impl KvError {
    pub fn invalid(argument: impl Into<String>, message: impl Into<String>) -> Self {
        KvError::InvalidArgument {
            argument: argument.into(),
            message: message.into(),
        }
    }

    pub fn shape(argument: impl Into<String>, actual: &[i64], expected: impl Into<String>) -> Self {
        KvError::Shape {
            argument: argument.into(),
            actual: actual.to_vec(),
            expected: expected.into(),
        }
    }

    pub fn dtype(
        argument: impl Into<String>,
        actual: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        KvError::Dtype {
            argument: argument.into(),
            actual: actual.into(),
            expected: expected.into(),
        }
    }

    pub fn device(
        argument: impl Into<String>,
        actual: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        KvError::Device {
            argument: argument.into(),
            actual: actual.into(),
            expected: expected.into(),
        }
    }

    pub fn non_finite(argument: impl Into<String>, message: impl Into<String>) -> Self {
        KvError::NonFinite {
            argument: argument.into(),
            message: message.into(),
        }
    }

    pub fn empty(argument: impl Into<String>, message: impl Into<String>) -> Self {
        KvError::Empty {
            argument: argument.into(),
            message: message.into(),
        }
    }
}

/// Result alias used throughout the core.
pub type Result<T> = std::result::Result<T, KvError>;
