//! How many tokens a layer keeps on average: a compression ratio or a fixed token budget.
//! How that varies across layers and heads is a press stage (`crate::press`).

use crate::error::{KvError, Result};

/// The per-layer token budget of a compressing cache.
///
/// `Ratio(r)` removes the fraction `r` of the tokens (kvpress's `compression_ratio`, in
/// [0, 1)); `MaxTokens(n)` keeps at most `n` tokens per layer and head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    Ratio(f64),
    MaxTokens(usize),
}

impl Budget {
    /// Builds a budget from the two user-facing keyword arguments, of which at most one may
    /// be given. Neither means ratio 0 (keep everything).
    ///
    /// ```
    /// use kvpress_rs::Budget;
    /// assert_eq!(Budget::from_args(Some(0.5), None).unwrap().n_kept(10).unwrap(), 5);
    /// assert_eq!(Budget::from_args(None, Some(4)).unwrap().n_kept(10).unwrap(), 4);
    /// assert!(Budget::from_args(Some(1.0), None).is_err());
    /// ```
    pub fn from_args(compression_ratio: Option<f64>, max_tokens: Option<i64>) -> Result<Self> {
        match (compression_ratio, max_tokens) {
            (Some(_), Some(_)) => Err(KvError::invalid(
                "max_tokens",
                "give either `compression_ratio` or `max_tokens`, not both",
            )),
            (None, Some(n)) => Self::max_tokens(n),
            (Some(r), None) => Self::ratio(r),
            (None, None) => Ok(Budget::Ratio(0.0)),
        }
    }

    /// A compression ratio in [0, 1): the fraction of tokens removed.
    pub fn ratio(r: f64) -> Result<Self> {
        if !r.is_finite() || !(0.0..1.0).contains(&r) {
            return Err(KvError::invalid(
                "compression_ratio",
                format!("got {r}, expected a number in [0, 1) (the fraction of tokens removed)"),
            ));
        }
        Ok(Budget::Ratio(r))
    }

    /// A fixed per-layer budget of `n` > 0 tokens.
    pub fn max_tokens(n: i64) -> Result<Self> {
        if n <= 0 {
            return Err(KvError::invalid(
                "max_tokens",
                format!("got {n}, expected a positive token count"),
            ));
        }
        Ok(Budget::MaxTokens(n as usize))
    }

    /// Number of tokens kept out of `n_tokens`: `int(n_tokens * (1 - ratio))` (the same
    /// float arithmetic as Python's, hence the same counts as kvpress) or
    /// `min(n_tokens, max_tokens)`.
    ///
    /// Unlike kvpress, which silently keeps one token when the ratio would keep none, a
    /// ratio that keeps zero tokens is an error: a cache with nothing in it cannot answer.
    pub fn n_kept(&self, n_tokens: usize) -> Result<usize> {
        if n_tokens == 0 {
            return Err(KvError::empty(
                "keys",
                "cannot compress a sequence of zero tokens",
            ));
        }
        // The variants are public: re-validate in case one was built without the checks.
        match *self {
            Budget::Ratio(r) => Self::ratio(r).map(|_| ())?,
            Budget::MaxTokens(n) => Self::max_tokens(n as i64).map(|_| ())?,
        }
        match *self {
            Budget::Ratio(r) => {
                let kept = (n_tokens as f64 * (1.0 - r)) as usize;
                if kept == 0 {
                    return Err(KvError::invalid(
                        "compression_ratio",
                        format!(
                            "ratio {r} keeps int({n_tokens} * (1 - {r})) = 0 of {n_tokens} tokens; \
                             lower the ratio so that at least one token is kept"
                        ),
                    ));
                }
                Ok(kept)
            }
            Budget::MaxTokens(n) => Ok(n.min(n_tokens)),
        }
    }

    /// Whether this budget can never remove a token.
    pub fn keeps_everything(&self) -> bool {
        matches!(*self, Budget::Ratio(r) if r == 0.0)
    }
}
