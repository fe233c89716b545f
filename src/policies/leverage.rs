//! Leverage scores (Chari & Van Durme, 2025, "Compactor"; kvpress's `LeverageScorePress`):
//! a key that points where few others do is an outlier of its head's geometry, and keeping
//! it preserves what attention can still tell apart. Per (batch row, KV head): the pre-RoPE
//! keys centred over the sequence, X (T × d); the leverage of token i,
//! xᵢᵀ (XᵀX + ridge·I)⁻¹ xᵢ, from a Cholesky factor of the d × d Gram matrix; then the
//! layer's scores z-normalised (over every row and token, as kvpress does).
//!
//! kvpress multiplies X by a random Gaussian sketch (d → 48) to cut the Gram matrix; at
//! head_dim 64 to 128 the exact d × d matrix costs no more and needs no random draw, so the
//! scores are exact and reproducible. Prompt compression only: keys must sit at positions
//! 0..T to be rotated back exactly.

use super::{ScoreInput, Scorer};
use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct Leverage {
    ridge: f64,
}

impl Leverage {
    /// `ridge` (≥ 0) is added to the Gram matrix's diagonal (kvpress's Cholesky jitter).
    pub fn new(ridge: f64) -> Result<Self> {
        if !(ridge >= 0.0 && ridge.is_finite()) {
            return Err(KvError::invalid(
                "ridge",
                format!("got {ridge}, expected a number >= 0"),
            ));
        }
        Ok(Leverage { ridge })
    }
}

impl Scorer for Leverage {
    fn name(&self) -> &'static str {
        "leverage"
    }

    fn needs_rope(&self) -> bool {
        true
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor> {
        if input.ctx.next_position.is_some() {
            return Err(KvError::Unsupported(
                "policy \"leverage\" scores pre-RoPE keys at positions 0..T: it compresses prompts, \
                 not during generation (decoding_budget)"
                    .into(),
            ));
        }
        let rope = input.require_rope(self.name())?;
        let (t, d) = (input.keys.size()[2], input.keys.size()[3]);
        let positions = Tensor::f_arange(t, (Kind::Int64, input.keys.device()))?;
        let pre = rope
            .invert(input.keys, &positions, Some(t as usize))?
            .f_to_kind(Kind::Float)?;
        let x = pre.f_sub(&pre.f_mean_dim(2, true, Kind::Float)?)?;
        let xt = x.f_transpose(-2, -1)?;
        let eye = Tensor::f_eye(d, (Kind::Float, x.device()))?.f_mul_scalar(self.ridge)?;
        let gram = xt.f_matmul(&x)?.f_add(&eye)?;
        let (lower, info) = gram.f_linalg_cholesky_ex(false, false)?;
        if info.f_ne(0)?.f_any()?.f_int64_value(&[])? != 0 {
            return Err(KvError::invalid(
                "ridge",
                "the keys' Gram matrix is singular: use a ridge > 0",
            ));
        }
        // (XᵀX + ridge·I)⁻¹ Xᵀ without forming the inverse: one Cholesky solve
        let solved = xt.f_cholesky_solve(&lower, false)?;
        let leverage = x
            .f_mul(&solved.f_transpose(-2, -1)?)?
            .f_sum_dim_intlist(Some([-1i64].as_slice()), false, Kind::Float)?
            .f_clamp_min(0.0)?;
        let std = leverage.f_std(true)?.f_clamp_min(1e-6)?;
        Ok(leverage
            .f_sub(&leverage.f_mean(Kind::Float)?)?
            .f_div(&std)?)
    }
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "leverage",
    aliases: &["leverage_score"],
    summary: "statistical leverage of each pre-RoPE key in its head's centred keys (geometric outliers kept)",
    reference: "Chari & Van Durme, 2025 (Compactor)",
    url: "https://arxiv.org/abs/2507.08143",
    params: &[ParamSpec::float(
        "ridge",
        0.01,
        0.0,
        None,
        "added to the diagonal of the keys' Gram matrix",
    )],
    build: Builder::Scorer(|a| Ok(Box::new(Leverage::new(a.f64("ridge")?)?))),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_ridge_is_refused_naming_it() {
        assert!(Leverage::new(-1.0)
            .unwrap_err()
            .to_string()
            .contains("ridge"));
        assert!(Leverage::new(f64::NAN).is_err());
    }
}
