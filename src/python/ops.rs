//! `kvpress_rs.ops`: the functional API over torch tensors or numpy arrays.
//! Torch in, torch out (same device); numpy in, numpy out.

use super::conversion::{numpy_view, ArrayArg, KvArgs, NumpyFloat, PyTensor};
use super::errors::{detached, to_pyerr};
use crate::budget::Budget;
use crate::policies::{scorer_from_name, ScoreContext, ScorerParams};
use crate::press::Press;
use crate::with_float_view;
use ndarray::{Axis, Ix3, Ix4};
use numpy::IntoPyArray;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(score, m)?)?;
    m.add_function(wrap_pyfunction!(top_k, m)?)?;
    m.add_function(wrap_pyfunction!(gather, m)?)?;
    m.add_function(wrap_pyfunction!(kept_indices, m)?)?;
    m.add_function(wrap_pyfunction!(n_kept, m)?)?;
    m.add_function(wrap_pyfunction!(set_cpu_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_kernels_enabled, m)?)?;
    Ok(())
}

/// Enables (default) or disables the fused Rust CPU kernels, process-wide. Disabled, CPU
/// tensors go through the same libtorch ops as CUDA tensors (for tests and benchmarks).
///
/// Examples
/// --------
/// >>> import kvpress_rs
/// >>> kvpress_rs.ops.set_cpu_kernels(False); kvpress_rs.ops.set_cpu_kernels(True)
#[pyfunction]
fn set_cpu_kernels(enabled: bool) {
    crate::tensor::set_cpu_kernels(enabled);
}

/// Whether the fused Rust CPU kernels are enabled.
#[pyfunction]
fn cpu_kernels_enabled() -> bool {
    crate::tensor::cpu_kernels_enabled()
}

/// Scores every token of one layer; higher = keep.
///
/// Parameters
/// ----------
/// policy : str
///     "knorm", "streaming_llm" or "random".
/// keys, values : torch.Tensor or numpy.ndarray
///     Shape (batch, kv_heads, tokens, head_dim); float32/float16/bfloat16 (numpy:
///     float32/float16). ``values`` defaults to ``keys``.
/// n_kept : int, optional
///     Tokens that will be kept (positional policies such as StreamingLLM need it);
///     defaults to all tokens.
/// layer_idx : int
///     Layer index (mixed into the Random policy's stream).
///
/// Returns
/// -------
/// float32 scores of shape (batch, kv_heads, tokens), same library and device as ``keys``.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> keys = torch.randn(1, 2, 16, 8)
/// >>> kvpress_rs.ops.score("knorm", keys).shape
/// torch.Size([1, 2, 16])
#[pyfunction]
#[pyo3(signature = (policy, keys, values=None, *, n_kept=None, layer_idx=0, n_sink=4, seed=0))]
#[allow(clippy::too_many_arguments)]
fn score<'py>(
    py: Python<'py>,
    policy: &str,
    keys: ArrayArg<'py>,
    values: Option<ArrayArg<'py>>,
    n_kept: Option<usize>,
    layer_idx: usize,
    n_sink: i64,
    seed: u64,
) -> PyResult<Bound<'py, PyAny>> {
    let scorer = scorer_from_name(policy, &ScorerParams { n_sink, seed }).map_err(to_pyerr)?;
    match KvArgs::new(keys, values)? {
        KvArgs::Torch(k, v) => {
            let out = detached(py, move || {
                let tokens = crate::tensor::check_kv(&k, "keys")?.tokens;
                let ctx = ScoreContext {
                    layer_idx,
                    n_kept: n_kept.unwrap_or(tokens),
                };
                crate::policies::score(scorer.as_ref(), &k, &v, &ctx)
            })?;
            PyTensor(out).into_pyobject(py)
        }
        KvArgs::Numpy(k, v) => {
            let (k, v) = (k.view::<Ix4>("keys")?, v.view::<Ix4>("values")?);
            let out = detached(py, move || {
                crate::policies::score_views(scorer.as_ref(), &k, &v, n_kept, layer_idx)
            })?;
            Ok(out.into_pyarray(py).into_any())
        }
    }
}

/// Indices of the ``k`` highest scores of every (batch, head) row, in ascending order;
/// ties go to the earlier token.
///
/// Parameters
/// ----------
/// scores : torch.Tensor or numpy.ndarray
///     Shape (batch, heads, tokens); numpy: float32.
/// k : int
///     Tokens to keep, 1 <= k <= tokens.
///
/// Returns
/// -------
/// int64 indices of shape (batch, heads, k).
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> kvpress_rs.ops.top_k(torch.tensor([[[0.1, 0.9, 0.5, 0.9]]]), 2)
/// tensor([[[1, 3]]])
#[pyfunction]
fn top_k<'py>(py: Python<'py>, scores: ArrayArg<'py>, k: usize) -> PyResult<Bound<'py, PyAny>> {
    match scores {
        ArrayArg::Torch(s) => {
            let out = detached(py, move || crate::select::top_k_indices(&s, k))?;
            PyTensor(out).into_pyobject(py)
        }
        ArrayArg::Numpy(s) => {
            let s = numpy_view::<f32, Ix3>(&s, "scores", "numpy float32")?;
            let view = s.as_array();
            let out = detached(py, move || crate::select::top_k_array(view, k))?;
            Ok(out.into_pyarray(py).into_any())
        }
    }
}

/// Gathers tokens: ``out[b, h, i] = x[b, h, indices[b, h, i]]``.
///
/// Parameters
/// ----------
/// x : torch.Tensor or numpy.ndarray
///     Shape (batch, heads, tokens, dim) or (batch, heads, tokens).
/// indices : torch.Tensor or numpy.ndarray
///     int64, shape (batch, heads, k), values in [0, tokens).
///
/// Returns
/// -------
/// A new contiguous array of shape (batch, heads, k[, dim]), same dtype and device as ``x``.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> x = torch.arange(8.0).reshape(1, 1, 4, 2)
/// >>> kvpress_rs.ops.gather(x, torch.tensor([[[0, 3]]]))
/// tensor([[[[0., 1.],
///           [6., 7.]]]])
#[pyfunction]
fn gather<'py>(
    py: Python<'py>,
    x: ArrayArg<'py>,
    indices: ArrayArg<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    match (x, indices) {
        (ArrayArg::Torch(x), ArrayArg::Torch(i)) => {
            let out = detached(py, move || crate::gather::gather_tokens(&x, &i))?;
            PyTensor(out).into_pyobject(py)
        }
        (ArrayArg::Numpy(x), ArrayArg::Numpy(i)) => {
            let i = numpy_view::<i64, Ix3>(&i, "indices", "numpy int64")?;
            let i = i.as_array();
            let x = NumpyFloat::new(&x, "x")?;
            let rank3 = x.ndim() == 3;
            let view = if rank3 {
                x.view::<Ix3>("x")?.with_unit_last_axis()
            } else {
                x.view::<Ix4>("x")?
            };
            with_float_view!(view, v => {
                let out = detached(py, move || crate::gather::gather_array(v, i))?;
                Ok(if rank3 { out.remove_axis(Axis(3)).into_pyarray(py).into_any() } else { out.into_pyarray(py).into_any() })
            })
        }
        _ => Err(PyTypeError::new_err(
            "`x` and `indices` must both be torch.Tensor or both numpy.ndarray",
        )),
    }
}

/// The tokens a policy keeps under a budget: scores, then top-k. Exactly what a cache
/// keeps for that layer.
///
/// Parameters
/// ----------
/// policy : str
///     "knorm", "streaming_llm" or "random".
/// keys, values : torch.Tensor or numpy.ndarray
///     Shape (batch, kv_heads, tokens, head_dim). ``values`` defaults to ``keys``.
/// compression_ratio : float, optional
///     Fraction of tokens removed, in [0, 1): keeps ``int(tokens * (1 - ratio))``.
/// max_tokens : int, optional
///     Keep at most this many tokens instead.
///
/// Returns
/// -------
/// int64 indices of shape (batch, kv_heads, n_kept), ascending.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> keys = torch.randn(1, 2, 10, 8)
/// >>> kvpress_rs.ops.kept_indices("streaming_llm", keys, compression_ratio=0.5, n_sink=2)[0, 0]
/// tensor([0, 1, 7, 8, 9])
#[pyfunction]
#[pyo3(signature = (policy, keys, values=None, *, compression_ratio=None, max_tokens=None, layer_idx=0, n_sink=4, seed=0))]
#[allow(clippy::too_many_arguments)]
fn kept_indices<'py>(
    py: Python<'py>,
    policy: &str,
    keys: ArrayArg<'py>,
    values: Option<ArrayArg<'py>>,
    compression_ratio: Option<f64>,
    max_tokens: Option<i64>,
    layer_idx: usize,
    n_sink: i64,
    seed: u64,
) -> PyResult<Bound<'py, PyAny>> {
    let scorer = scorer_from_name(policy, &ScorerParams { n_sink, seed }).map_err(to_pyerr)?;
    let budget = Budget::from_args(compression_ratio, max_tokens).map_err(to_pyerr)?;
    let press = Press::new(scorer, budget);
    match KvArgs::new(keys, values)? {
        KvArgs::Torch(k, v) => {
            let out = detached(py, move || press.kept_indices(&k, &v, layer_idx))?;
            PyTensor(out).into_pyobject(py)
        }
        KvArgs::Numpy(k, v) => {
            let (k, v) = (k.view::<Ix4>("keys")?, v.view::<Ix4>("values")?);
            let out = detached(py, move || press.kept_indices_views(&k, &v, layer_idx))?;
            Ok(out.into_pyarray(py).into_any())
        }
    }
}

/// How many of ``n_tokens`` tokens a budget keeps: ``int(n_tokens * (1 - ratio))`` or
/// ``min(n_tokens, max_tokens)``.
///
/// Examples
/// --------
/// >>> import kvpress_rs
/// >>> kvpress_rs.ops.n_kept(1000, compression_ratio=0.75)
/// 250
#[pyfunction]
#[pyo3(signature = (n_tokens, compression_ratio=None, max_tokens=None))]
fn n_kept(
    n_tokens: usize,
    compression_ratio: Option<f64>,
    max_tokens: Option<i64>,
) -> PyResult<usize> {
    Budget::from_args(compression_ratio, max_tokens)
        .and_then(|b| b.n_kept(n_tokens))
        .map_err(to_pyerr)
}
