//! Reusable chunk caches: the KV of a chunk (a document, a tool output) encoded once on its
//! own at positions 0..n, then placed anywhere in a later prompt.
//!
//! Keys are cached after RoPE, and rotations compose (R(a)·R(b) = R(a+b)), so a chunk
//! encoded at 0 moves to its global offset o with ONE delta rotation R(o) of all its keys
//! ([`Rope::shift`] with a scalar delta); values carry no position and are reused as they
//! are. [`assemble`] does this for every chunk of a prompt and concatenates the results
//! into one [`LayerStore`] per layer, so the assembled cache is an ordinary store (nbytes,
//! kept positions, crop, decoding appends) that continues at the total token count.
//!
//! What reuse loses is the attention of each chunk's tokens to the chunks before it;
//! [`recompute`] chooses the tokens whose KV deviates most, for selective recomputation.

pub mod recompute;

use crate::error::{KvError, Result};
use crate::rope::Rope;
use crate::store::LayerStore;
use crate::tensor::{check_kv_pair, device_name, kind_name, KvShape};
use tch::{Kind, Tensor};

/// One layer of one encoded chunk.
#[derive(Debug)]
pub struct ChunkLayer {
    /// (batch, kv_heads, stored, head_dim), rotated at the chunk's own positions 0..tokens.
    pub keys: Tensor,
    pub values: Tensor,
    /// Integer (batch, kv_heads, stored): the chunk-local positions of the stored tokens
    /// when a press evicted some (ascending, < tokens); `None` when all are stored.
    pub positions: Option<Tensor>,
    /// Tokens of the chunk (stored or not): the next chunk starts this far after it.
    pub tokens: usize,
}

/// Places `parts` one after the other (part i starts at the sum of the token counts of the
/// parts before it) and concatenates them into one layer store: every part's keys are
/// shifted to their offset with one rotation, kept positions are offset likewise, and the
/// store has seen the total token count, where generation continues.
///
/// Every part must have the same batch, kv_heads, head_dims, dtype and device. Frequencies
/// that depend on the sequence length (dynamic, longrope) must be the same at the total
/// length as when the chunks were encoded, or the shifted keys would not equal keys
/// computed at those positions: beyond that length assembly is refused.
pub fn assemble(rope: &Rope, parts: &[ChunkLayer]) -> Result<LayerStore> {
    let Some(first) = parts.first() else {
        return Err(KvError::empty("parts", "at least one chunk is needed"));
    };
    let (k0, v0) = check_kv_pair(&first.keys, &first.values)?;
    let total: usize = parts.iter().map(|p| p.tokens).sum();
    if rope.inv_freq(Some(total)) != rope.inv_freq(None) {
        return Err(KvError::invalid(
            "parts",
            format!(
                "{total} tokens in all: at this length the {} RoPE frequencies differ from \
                 those the chunks were encoded with, so their keys cannot be moved exactly; \
                 keep assembled prompts within the model's original context",
                rope.rope_type()
            ),
        ));
    }
    let any_evicted = parts.iter().any(|p| p.positions.is_some());
    let (mut keys, mut values, mut positions) = (vec![], vec![], vec![]);
    let mut offset = 0usize;
    for (i, part) in parts.iter().enumerate() {
        let (ks, vs) = check_kv_pair(&part.keys, &part.values)?;
        check_same(i, (k0, v0), (ks, vs), &first.keys, &part.keys)?;
        let local = chunk_positions(i, part, ks)?;
        keys.push(if offset == 0 {
            part.keys.shallow_clone()
        } else {
            rope.shift(&part.keys, &Tensor::from(offset as i64), None)?
        });
        values.push(part.values.shallow_clone());
        if any_evicted {
            positions.push(local.f_add_scalar(offset as i64)?.f_to_kind(Kind::Int)?);
        }
        offset += part.tokens;
    }
    let cat = |ts: &[Tensor]| -> Result<Tensor> {
        Ok(if ts.len() == 1 {
            ts[0].shallow_clone()
        } else {
            Tensor::f_cat(ts, 2)?
        })
    };
    let positions = if any_evicted {
        Some(cat(&positions)?)
    } else {
        None
    };
    LayerStore::from_tokens(cat(&keys)?, cat(&values)?, positions, total)
}

/// Part i's local positions as int64 (batch, kv_heads, stored), checked: within
/// 0..tokens and ascending, or exactly 0..tokens when it has none.
fn chunk_positions(i: usize, part: &ChunkLayer, ks: KvShape) -> Result<Tensor> {
    let argument = format!("parts[{i}].positions");
    match &part.positions {
        None => {
            if ks.tokens != part.tokens {
                return Err(KvError::invalid(
                    format!("parts[{i}].tokens"),
                    format!(
                        "{} but the chunk stores {} tokens and gives no kept positions",
                        part.tokens, ks.tokens
                    ),
                ));
            }
            Ok(
                Tensor::f_arange(ks.tokens as i64, (Kind::Int64, tch::Device::Cpu))?
                    .f_view([1, 1, ks.tokens as i64])?
                    .f_expand([ks.batch as i64, ks.heads as i64, ks.tokens as i64], false)?,
            )
        }
        Some(p) => {
            crate::rope::positions::check_integer(p, &argument)?;
            let expected = [ks.batch as i64, ks.heads as i64, ks.tokens as i64];
            if p.size() != expected {
                return Err(KvError::shape(
                    argument,
                    &p.size(),
                    format!("{expected:?}: one position per stored key"),
                ));
            }
            let p = p.f_to_kind(Kind::Int64)?.f_to(tch::Device::Cpu)?;
            let max = if p.numel() > 0 {
                p.f_max()?.f_int64_value(&[])?
            } else {
                -1
            };
            let min = if p.numel() > 0 {
                p.f_min()?.f_int64_value(&[])?
            } else {
                0
            };
            if min < 0 || max >= part.tokens as i64 {
                return Err(KvError::invalid(
                    argument,
                    format!(
                        "positions span [{min}, {max}], expected chunk-local positions in [0, {})",
                        part.tokens
                    ),
                ));
            }
            if ks.tokens > 1 {
                let steps = p.f_narrow(2, 1, ks.tokens as i64 - 1)?.f_sub(&p.f_narrow(
                    2,
                    0,
                    ks.tokens as i64 - 1,
                )?)?;
                if steps.f_min()?.f_int64_value(&[])? <= 0 {
                    return Err(KvError::invalid(
                        argument,
                        "kept positions must be strictly ascending in every (batch, head) row",
                    ));
                }
            }
            Ok(p)
        }
    }
}

/// Part i agrees with part 0 on everything but the token count.
fn check_same(
    i: usize,
    (k0, v0): (KvShape, KvShape),
    (ks, vs): (KvShape, KvShape),
    keys0: &Tensor,
    keys: &Tensor,
) -> Result<()> {
    let argument = format!("parts[{i}].keys");
    if (ks.batch, ks.heads, ks.head_dim, vs.head_dim)
        != (k0.batch, k0.heads, k0.head_dim, v0.head_dim)
    {
        return Err(KvError::shape(
            argument,
            &keys.size(),
            format!(
                "({}, {}, tokens, {}) like parts[0] (values head_dim {})",
                k0.batch, k0.heads, k0.head_dim, v0.head_dim
            ),
        ));
    }
    if keys.kind() != keys0.kind() {
        return Err(KvError::dtype(
            argument,
            kind_name(keys.kind()),
            format!("{} like parts[0]", kind_name(keys0.kind())),
        ));
    }
    if keys.device() != keys0.device() {
        return Err(KvError::device(
            argument,
            device_name(keys.device()),
            format!("{} like parts[0]", device_name(keys0.device())),
        ));
    }
    Ok(())
}
