//! Which tokens of an assembled cache to recompute.
//!
//! A reused chunk's KV lacks the attention of its tokens to the chunks before it. At layer
//! 0 nothing is lost (a token's layer-0 KV depends on the token and its position only, and
//! the shift restores the position exactly); from layer 1 on, the KV of each token drifts
//! from what a full prefill computes, by how much that token would have attended across
//! chunks. CacheBlend (Yao et al., 2024) measures this drift at an early layer, after
//! recomputing that layer for every token, and recomputes the tokens with the largest
//! deviation in the deeper layers; we do the same with the value deviation
//! Σ_{batch, head, channel} (v_fresh − v_reused)² of each token at one probe layer.

use crate::error::{KvError, Result};
use crate::tensor::check_kv_pair;
use tch::{Kind, Tensor};

/// The `n` tokens among `candidates` whose values deviate most between `reused` and
/// `fresh` (both (batch, kv_heads, tokens, head_dim), the same layer), as int64 token
/// indices in ascending order; ties go to the earlier token. `candidates` is a bool
/// (tokens,) mask of the tokens that may be chosen (tokens whose KV is exact, such as the
/// first segment's, are left out).
pub fn select_deviating(
    reused: &Tensor,
    fresh: &Tensor,
    candidates: &Tensor,
    n: usize,
) -> Result<Tensor> {
    let (rs, fs) = check_kv_pair(reused, fresh)?;
    if fs.head_dim != rs.head_dim {
        return Err(KvError::shape(
            "fresh",
            &fresh.size(),
            format!("{:?} like reused", reused.size()),
        ));
    }
    if candidates.kind() != Kind::Bool || candidates.size() != [rs.tokens as i64] {
        return Err(KvError::invalid(
            "candidates",
            format!(
                "got a {:?} tensor of shape {:?}, expected a bool mask of shape ({},)",
                candidates.kind(),
                candidates.size(),
                rs.tokens
            ),
        ));
    }
    let candidates = candidates.f_to(tch::Device::Cpu)?;
    let available = candidates.f_sum(Kind::Int64)?.f_int64_value(&[])? as usize;
    if n > available {
        return Err(KvError::invalid(
            "n",
            format!("{n} tokens to recompute but only {available} are candidates"),
        ));
    }
    let deviation = deviation(reused, fresh)?;
    let masked = deviation.f_masked_fill(&candidates.f_logical_not()?, f64::NEG_INFINITY)?;
    // A stable descending sort keeps ties in token order.
    let (_, order) = masked.f_sort_stable(true, 0, true)?;
    let (chosen, _) = order.f_narrow(0, 0, n as i64)?.f_sort(0, false)?;
    Ok(chosen)
}

/// The value deviation of each token: Σ over batch, heads and channels of
/// (fresh − reused)², in float64 on the CPU, shape (tokens,).
pub fn deviation(reused: &Tensor, fresh: &Tensor) -> Result<Tensor> {
    let diff = fresh
        .f_to_kind(Kind::Double)?
        .f_sub(&reused.f_to_kind(Kind::Double)?)?;
    Ok(diff
        .f_square()?
        .f_sum_dim_intlist(&[0i64, 1, 3][..], false, Kind::Double)?
        .f_to(tch::Device::Cpu)?)
}
