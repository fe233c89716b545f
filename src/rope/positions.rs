//! Positions (or position deltas) as the rotation kernels take them: an int64 tensor of
//! rank 3 that broadcasts against (batch, heads, tokens).

use crate::error::{KvError, Result};
use crate::tensor::{kind_name, kind_of, KvShape};
use tch::{Kind, Tensor};

const INTEGER_KINDS: [Kind; 5] = [Kind::Int64, Kind::Int, Kind::Int16, Kind::Int8, Kind::Uint8];

/// Checks that `positions` is a defined tensor of an integer dtype; returns the dtype.
pub fn check_integer(positions: &Tensor, argument: &str) -> Result<Kind> {
    if !positions.defined() {
        return Err(KvError::invalid(argument, "the tensor is undefined"));
    }
    let kind = kind_of(positions, argument)?;
    if !INTEGER_KINDS.contains(&kind) {
        return Err(KvError::dtype(
            argument,
            kind_name(kind),
            "an integer dtype (torch.int64 or torch.int32): positions are token indices",
        ));
    }
    Ok(kind)
}

/// Checks `positions` against the shape of the tensor it rotates and returns it as an
/// int64 tensor of shape (B|1, H|1, T|1) on its own device (a view when it already is
/// int64). Accepted shapes: () one value for every token; (T,) one per token, shared by
/// batch rows and heads; (B, T) per batch row and token (transformers' `position_ids`);
/// (B, H, T) per batch row, head and token. Any size may also be 1 (broadcast).
pub fn broadcastable_positions(positions: &Tensor, x: KvShape, argument: &str) -> Result<Tensor> {
    let kind = check_integer(positions, argument)?;
    let size = positions.size();
    let (b, h, t) = (x.batch as i64, x.heads as i64, x.tokens as i64);
    let expected = format!("(), ({t},), ({b}, {t}) or ({b}, {h}, {t}) (any size may be 1)");
    let target: [i64; 3] = match size.as_slice() {
        [] => [1, 1, 1],
        [nt] => [1, 1, *nt],
        [nb, nt] => [*nb, 1, *nt],
        [nb, nh, nt] => [*nb, *nh, *nt],
        _ => return Err(KvError::shape(argument, &size, expected)),
    };
    let fits = |n: i64, full: i64| n == full || n == 1;
    if !(fits(target[0], b) && fits(target[1], h) && fits(target[2], t)) {
        return Err(KvError::shape(argument, &size, expected));
    }
    let p = positions.f_reshape(target)?;
    Ok(if kind == Kind::Int64 {
        p
    } else {
        p.f_to_kind(Kind::Int64)?
    })
}
