//! `kvpress_rs.ops`: the functional API over torch tensors or numpy arrays.
//! Torch in, torch out (same device); numpy in (viewed without copy), numpy out.

use super::conversion::{to_array, ArrayArg};
use super::errors::{detached, to_pyerr};
use super::press::params_from_kwargs;
use crate::budget::Budget;
use crate::policies::{score_layer, scorer_from_name, ScoreContext};
use crate::press::Kept;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(score, m)?)?;
    m.add_function(wrap_pyfunction!(top_k, m)?)?;
    m.add_function(wrap_pyfunction!(gather, m)?)?;
    m.add_function(wrap_pyfunction!(kept_indices, m)?)?;
    m.add_function(wrap_pyfunction!(n_kept, m)?)?;
    m.add_function(wrap_pyfunction!(set_cpu_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_kernels_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(native_bf16_matmul, m)?)?;
    Ok(())
}

/// Enables (default) or disables the fused Rust CPU kernels for calls from this thread.
/// Disabled, CPU tensors go through the same libtorch ops as CUDA tensors (for tests and
/// benchmarks).
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

/// Whether this CPU multiplies bfloat16 natively (AVX512-BF16). There, the fused
/// ExpectedAttention kernel takes its covariance term's matrix products in bf16 for bf16
/// models (several times faster than float32); elsewhere it keeps them in float32.
///
/// Examples
/// --------
/// >>> import kvpress_rs
/// >>> isinstance(kvpress_rs.ops.native_bf16_matmul(), bool)
/// True
#[pyfunction]
fn native_bf16_matmul() -> bool {
    crate::quant::simd::native_bf16_matmul()
}

fn same_library(args: &[&ArrayArg<'_>]) -> PyResult<bool> {
    let numpy = args[0].is_numpy();
    if args.iter().any(|a| a.is_numpy() != numpy) {
        return Err(PyTypeError::new_err(
            "array arguments must all be torch.Tensor or all numpy.ndarray",
        ));
    }
    Ok(numpy)
}

/// Scores every token of one layer; higher = keep.
///
/// Parameters
/// ----------
/// policy : str
///     A policy name (``kvpress_rs.POLICIES``), e.g. "knorm", "snapkv".
/// keys, values : torch.Tensor or numpy.ndarray
///     Post-RoPE keys and values, shape (batch, kv_heads, tokens, head_dim). ``values``
///     defaults to ``keys``.
/// queries : torch.Tensor or numpy.ndarray, optional
///     Post-RoPE queries (batch, q_heads, q, head_dim) of the last q prompt tokens, for the
///     policies that need them (SnapKV, TOVA, ObservedAttention, ...).
/// n_kept : int, optional
///     Tokens that will be kept (positional policies such as StreamingLLM need it);
///     defaults to all tokens.
/// layer_idx : int
///     Layer index (mixed into the Random policy's stream).
/// rope : kvpress_rs.Rope, optional
///     The model's RoPE (ExpectedAttention, TriAttention).
/// **params
///     The policy's parameters (``n_sink``, ``window_size``, ...).
///
/// Returns
/// -------
/// Scores of shape (batch, kv_heads, tokens), same library and device as ``keys``.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> keys = torch.randn(1, 2, 16, 8)
/// >>> kvpress_rs.ops.score("knorm", keys).shape
/// torch.Size([1, 2, 16])
#[pyfunction]
#[pyo3(signature = (policy, keys, values=None, queries=None, *, n_kept=None, layer_idx=0, rope=None, **params))]
#[allow(clippy::too_many_arguments)]
fn score<'py>(
    py: Python<'py>,
    policy: &str,
    keys: ArrayArg<'py>,
    values: Option<ArrayArg<'py>>,
    queries: Option<ArrayArg<'py>>,
    n_kept: Option<usize>,
    layer_idx: usize,
    rope: Option<Bound<'py, super::rope::PyRope>>,
    params: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let scorer = scorer_from_name(policy, params_from_kwargs(params)?).map_err(to_pyerr)?;
    let rope = rope.map(|r| r.get().inner.clone());
    let values = values.unwrap_or(ArrayArg {
        tensor: keys.tensor.shallow_clone(),
        numpy: keys.numpy.clone(),
    });
    let mut all = vec![&keys, &values];
    all.extend(queries.as_ref());
    let numpy = same_library(&all)?;
    let (k, v, q) = (
        keys.tensor.shallow_clone(),
        values.tensor.shallow_clone(),
        queries.as_ref().map(|q| q.tensor.shallow_clone()),
    );
    let out = detached(py, move || {
        let tokens = crate::tensor::check_kv(&k, "keys")?.tokens;
        let ctx = ScoreContext::prefill(layer_idx, n_kept.unwrap_or(tokens));
        score_layer(scorer.as_ref(), &k, &v, q.as_ref(), rope.as_ref(), &ctx)
    })?;
    to_array(py, out, numpy)
}

/// Indices of the ``k`` highest scores of every (batch, head) row, in ascending order;
/// ties go to the earlier token.
///
/// Parameters
/// ----------
/// scores : torch.Tensor or numpy.ndarray
///     Shape (batch, heads, tokens).
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
    let numpy = scores.is_numpy();
    let s = scores.tensor.shallow_clone();
    let out = detached(py, move || crate::select::top_k_indices(&s, k))?;
    to_array(py, out, numpy)
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
    let numpy = same_library(&[&x, &indices])?;
    let (x, i) = (x.tensor.shallow_clone(), indices.tensor.shallow_clone());
    let out = detached(py, move || crate::gather::gather_tokens(&x, &i))?;
    to_array(py, out, numpy)
}

/// The tokens a policy keeps under a budget: scores, then top-k (or AdaKV's head split).
/// Exactly what a cache keeps for that layer.
///
/// Parameters
/// ----------
/// policy : str
///     A policy name, e.g. "knorm", "snapkv".
/// keys, values : torch.Tensor or numpy.ndarray
///     Shape (batch, kv_heads, tokens, head_dim). ``values`` defaults to ``keys``.
/// queries : torch.Tensor or numpy.ndarray, optional
///     Post-RoPE queries (batch, q_heads, q, head_dim) of the last q tokens.
/// compression_ratio : float, optional
///     Fraction of tokens removed, in [0, 1): keeps ``int(tokens * (1 - ratio))``.
/// max_tokens : int, optional
///     Keep at most this many tokens instead.
/// layer_budget, head_budget : str
///     "uniform" | "pyramid"; "uniform" | "adakv".
/// n_layers : int
///     Layers of the model (for layer budgets).
///
/// Returns
/// -------
/// int64 indices (batch, kv_heads, n_kept), ascending; with ``head_budget="adakv"`` a list
/// of int64 vectors, one per row b * kv_heads + h.
///
/// Examples
/// --------
/// >>> import torch, kvpress_rs
/// >>> keys = torch.randn(1, 2, 10, 8)
/// >>> kvpress_rs.ops.kept_indices("streaming_llm", keys, compression_ratio=0.5, n_sink=2)[0, 0]
/// tensor([0, 1, 7, 8, 9])
#[pyfunction]
#[pyo3(signature = (policy, keys, values=None, queries=None, *, compression_ratio=None, max_tokens=None,
    layer_budget="uniform", head_budget="uniform", n_layers=1, layer_idx=0, rope=None, **params))]
#[allow(clippy::too_many_arguments)]
fn kept_indices<'py>(
    py: Python<'py>,
    policy: &str,
    keys: ArrayArg<'py>,
    values: Option<ArrayArg<'py>>,
    queries: Option<ArrayArg<'py>>,
    compression_ratio: Option<f64>,
    max_tokens: Option<i64>,
    layer_budget: &str,
    head_budget: &str,
    n_layers: usize,
    layer_idx: usize,
    rope: Option<Bound<'py, super::rope::PyRope>>,
    params: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let rope = rope.as_ref().map(|r| r.get());
    let press = super::press::build_press(
        policy,
        compression_ratio,
        max_tokens,
        layer_budget,
        head_budget,
        "topk",
        "drop",
        vec![],
        n_layers,
        rope,
        params,
    )?;
    let values = values.unwrap_or(ArrayArg {
        tensor: keys.tensor.shallow_clone(),
        numpy: keys.numpy.clone(),
    });
    let mut all = vec![&keys, &values];
    all.extend(queries.as_ref());
    let numpy = same_library(&all)?;
    let (k, v, q) = (
        keys.tensor.shallow_clone(),
        values.tensor.shallow_clone(),
        queries.as_ref().map(|q| q.tensor.shallow_clone()),
    );
    match detached(py, move || press.kept(&k, &v, q.as_ref(), layer_idx))? {
        Kept::Uniform(t) => to_array(py, t, numpy),
        Kept::Rows(rows) => {
            let rows = rows
                .into_iter()
                .map(|t| to_array(py, t, numpy))
                .collect::<PyResult<Vec<_>>>()?;
            Ok(rows.into_pyobject(py)?.into_any())
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
