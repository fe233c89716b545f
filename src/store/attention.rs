//! Attention over a layer row by row: each (batch, kv_head) row with its own keys and
//! values, attended by that head's group of query heads. This is how ragged rows (head
//! budgets) are read without padding them into one tensor.

use crate::error::{KvError, Result};
use tch::{Kind, Tensor};

/// `query` (batch, q_heads, q, head_dim): the queries of the q newest tokens, which are the
/// last q tokens of every row. `row(b, h)` gives row (b, h)'s keys and values
/// (1, 1, len, head_dim). Returns (batch, q, q_heads, head_dim) in the query's dtype.
pub(crate) fn attend_rows(
    query: &Tensor,
    batch: usize,
    heads: usize,
    scaling: f64,
    row: impl Fn(usize, usize) -> Result<(Tensor, Tensor)>,
) -> Result<Tensor> {
    let size = query.size();
    if size.len() != 4 || size[0] as usize != batch || !(size[1] as usize).is_multiple_of(heads) {
        return Err(KvError::shape(
            "query",
            &size,
            format!("({batch}, a multiple of {heads} heads, q, head_dim)"),
        ));
    }
    let (q_heads, q_len) = (size[1], size[2]);
    let group = q_heads / heads as i64;
    let mut per_batch = Vec::with_capacity(batch);
    for b in 0..batch {
        let mut per_head = Vec::with_capacity(heads);
        for h in 0..heads {
            let (keys, values) = row(b, h)?;
            let len = keys.size()[2];
            if len < q_len {
                return Err(KvError::State(format!(
                    "row ({b}, {h}) holds {len} tokens, fewer than the {q_len} queries"
                )));
            }
            // (1, group, q, d) queries of this head's group over (1, 1, len, d) keys.
            let q = query
                .f_narrow(0, b as i64, 1)?
                .f_narrow(1, h as i64 * group, group)?;
            let (k, v) = (
                keys.f_expand([1, group, len, -1], false)?,
                values.f_expand([1, group, len, -1], false)?,
            );
            let mask = if q_len > 1 {
                // The q new tokens sit at the end of the row: token j sees every stored
                // token and the new tokens up to itself.
                let cols = Tensor::f_arange(len, (Kind::Int64, keys.device()))?;
                let last_visible =
                    Tensor::f_arange_start(len - q_len, len, (Kind::Int64, keys.device()))?;
                Some(
                    cols.f_unsqueeze(0)?
                        .f_le_tensor(&last_visible.f_unsqueeze(1)?)?,
                )
            } else {
                None
            };
            per_head.push(Tensor::f_scaled_dot_product_attention(
                &q, &k, &v, mask, 0.0, false, scaling, false,
            )?);
        }
        per_batch.push(Tensor::f_cat(&per_head, 1)?);
    }
    // (batch, q_heads, q, d) -> (batch, q, q_heads, d)
    Ok(Tensor::f_cat(&per_batch, 0)?
        .f_transpose(1, 2)?
        .f_contiguous()?)
}
