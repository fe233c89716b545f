//! Shared pieces of the attention-based scorers, in the dtype chain of transformers'
//! attention (and of kvpress, so that the same inputs keep the same tokens): logits in
//! the model dtype, softmax in float32, weights cast back to the model dtype.

use crate::error::{KvError, Result};
use tch::{Kind, Tensor};

/// Keys (batch, kv_heads, t, d) repeated for a GQA group of `group` query heads per KV
/// head: (batch, kv_heads * group, t, d), KV head h serving query heads h*group..(h+1)*group.
pub fn repeat_kv(keys: &Tensor, group: i64) -> Result<Tensor> {
    if group == 1 {
        return Ok(keys.shallow_clone());
    }
    let s = keys.size();
    Ok(keys
        .f_unsqueeze(2)?
        .f_expand([s[0], s[1], group, s[2], s[3]], false)?
        .f_reshape([s[0], s[1] * group, s[2], s[3]])?)
}

/// Query heads per KV head, checked.
pub fn group_size(queries: &Tensor, keys: &Tensor) -> Result<i64> {
    let (qh, kh) = (queries.size()[1], keys.size()[1]);
    if qh % kh != 0 {
        return Err(KvError::shape(
            "queries",
            &queries.size(),
            format!("a multiple of the {kh} KV heads"),
        ));
    }
    Ok(qh / kh)
}

/// Softmax attention weights of `queries` (batch, q_heads, w, d), the queries of the last
/// w of T tokens, over all T `keys` (batch, kv_heads, T, d), causally: query i (at
/// position T − w + i) sees keys 0..=T − w + i. Logits = q·k / √d in the model dtype;
/// softmax in float32, cast back. Returns (batch, q_heads, w, T).
pub fn window_attention(queries: &Tensor, keys: &Tensor) -> Result<Tensor> {
    let group = group_size(queries, keys)?;
    let (w, t, d) = (queries.size()[2], keys.size()[2], keys.size()[3]);
    let logits = queries
        .f_matmul(&repeat_kv(keys, group)?.f_transpose(-1, -2)?)?
        .f_div_scalar((d as f64).sqrt())?;
    let mask = causal_mask(w, t, queries.device())?;
    let logits = logits.f_masked_fill(&mask, f64::NEG_INFINITY)?;
    Ok(logits
        .f_softmax(-1, Kind::Float)?
        .f_to_kind(queries.kind())?)
}

/// True where query i of the last w (of T) tokens must not see key j: j > T − w + i.
pub fn causal_mask(w: i64, t: i64, device: tch::Device) -> Result<Tensor> {
    let cols = Tensor::f_arange(t, (Kind::Int64, device))?;
    let last_visible = Tensor::f_arange_start(t - w, t, (Kind::Int64, device))?;
    Ok(cols
        .f_unsqueeze(0)?
        .f_gt_tensor(&last_visible.f_unsqueeze(1)?)?)
}

/// Mean over each KV head's group of query heads: (batch, q_heads, …) → (batch, kv_heads, …).
pub fn group_mean(x: &Tensor, kv_heads: i64) -> Result<Tensor> {
    let s = x.size();
    let mut grouped = vec![s[0], kv_heads, s[1] / kv_heads];
    grouped.extend_from_slice(&s[2..]);
    Ok(x.f_reshape(grouped.as_slice())?
        .f_mean_dim(2, false, x.kind())?)
}

/// Appends `n` tokens that every selection keeps first: they score the global maximum + 1
/// (kvpress's convention; they tie with each other).
pub fn append_protected(scores: &Tensor, n: i64) -> Result<Tensor> {
    let top = scores.f_max()?.f_double_value(&[])? + 1.0;
    let s = scores.size();
    let protected = Tensor::f_full([s[0], s[1], n], top, (scores.kind(), scores.device()))?;
    Ok(Tensor::f_cat(&[scores, &protected], -1)?)
}
