//! Attention over the union of several quantized stores of one layer — mixed precision
//! (MiKV): the tokens a policy keeps in a store at `bits`, the ones it would have evicted in
//! another at `low_bits`. Softmax is over all of them together: each store's attention is
//! computed apart with the log-sum-exp of its scores, then merged exactly
//! (`out = Σ exp(lse_i − m)·out_i / Σ exp(lse_i − m)`, `m = max lse_i`).
//!
//! The first store holds the most recent tokens (the queries' own, causal among
//! themselves, at its end); every other store holds only tokens that precede every query.

use super::store::QuantizedStore;
use crate::error::{KvError, Result};
use tch::{Kind, Tensor};

/// Attention of `query` (batch, q_heads, q_len, head_dim) over every token of `recent` and
/// of `past`: (batch, q_len, q_heads, value head_dim) in the query's dtype.
///
/// `mask` (bool, (batch or 1, q_len, recent.seen())) restricts `recent` as in
/// [`QuantizedStore::attend`]; each `past` store comes with its own mask (bool, (batch or
/// 1, q_len, its seen())), or `None`: visible to every query.
pub fn attend_union(
    recent: &QuantizedStore,
    past: &[(&QuantizedStore, Option<&Tensor>)],
    query: &Tensor,
    mask: Option<&Tensor>,
    scaling: f64,
) -> Result<Tensor> {
    let (out, lse) = recent.attend_with_lse(query, mask, scaling)?;
    let (mut outs, mut lses) = (vec![out], vec![lse]);
    let q_len = query.size().get(2).copied().unwrap_or(0);
    for (i, &(store, store_mask)) in past.iter().enumerate() {
        if store.seen() == 0 {
            continue;
        }
        if store.shape() != recent.shape() {
            return Err(KvError::invalid(
                "past",
                format!(
                    "store {i} holds tensors of another shape, dtype or device than the recent store"
                ),
            ));
        }
        // Without a mask a store treats its last q_len tokens as the queries' own (causal);
        // these precede every query: all visible.
        let visible = match store_mask {
            Some(m) => Some(m.shallow_clone()),
            None if q_len > 1 => Some(Tensor::f_ones(
                [1, q_len, store.seen() as i64],
                (Kind::Bool, query.device()),
            )?),
            None => None,
        };
        let (o, l) = store.attend_with_lse(query, visible.as_ref(), scaling)?;
        outs.push(o);
        lses.push(l);
    }
    merge(&outs, &lses)?
        .f_to_kind(query.kind())
        .map_err(Into::into)
}

/// Merges partial attentions over disjoint token sets: outputs (…, d) and their
/// log-sum-exps (…); rows that see nothing anywhere give zeros.
pub fn merge(outs: &[Tensor], lses: &[Tensor]) -> Result<Tensor> {
    let lse = Tensor::f_stack(lses, 0)?;
    let out = Tensor::f_stack(outs, 0)?;
    let (m, _) = lse.f_max_dim(0, true)?;
    // A row with −inf everywhere: subtract 0 instead (its weights are all 0).
    let m = m.f_masked_fill(&m.f_isinf()?, 0.0)?;
    let w = lse.f_sub(&m)?.f_exp()?;
    let den = w.f_sum_dim_intlist(0, false, Kind::Float)?;
    let num = out
        .f_mul(&w.f_unsqueeze(-1)?)?
        .f_sum_dim_intlist(0, false, Kind::Float)?;
    // f32 (not f64) smallest normal: an f64 one would round to 0 in f32 and give 0/0.
    let den = den.f_clamp_min(f32::MIN_POSITIVE as f64)?.f_unsqueeze(-1)?;
    Ok(num.f_div(&den)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_halves_equals_softmax_over_the_whole() {
        let s = Tensor::from_slice(&[0.3f32, -1.0, 2.0, 0.5]).view([1, 4]);
        let v = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).view([1, 4, 2]);
        let weighted =
            |p: &Tensor, v: &Tensor| (p.unsqueeze(-1) * v).sum_dim_intlist(1, false, Kind::Float);
        let whole = weighted(&s.softmax(-1, Kind::Float), &v);
        let part = |a: i64| {
            let sc = s.narrow(1, a, 2);
            (
                weighted(&sc.softmax(-1, Kind::Float), &v.narrow(1, a, 2)),
                sc.logsumexp([-1i64], false),
            )
        };
        let ((o1, l1), (o2, l2)) = (part(0), part(2));
        let merged = merge(&[o1, o2], &[l1, l2]).unwrap();
        assert!(merged.allclose(&whole, 1e-6, 1e-6, false));
        let nothing = Tensor::full([1], f64::NEG_INFINITY, (Kind::Float, tch::Device::Cpu));
        let z = merge(
            &[Tensor::ones([1, 2], (Kind::Float, tch::Device::Cpu))],
            &[nothing],
        )
        .unwrap();
        assert_eq!(Vec::<f32>::try_from(z.view([-1])).unwrap(), vec![0.0, 0.0]);
    }
}
