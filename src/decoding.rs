//! When and how far a cache compresses while it grows: during generation (decoding-time
//! compression) and during a block-wise prefill.
//!
//! A [`DecodingSchedule`] holds the budget N (a token count, or a fraction of the tokens
//! seen) and the interval M. After a forward, a layer holding `stored` tokens compresses
//! back to N when it has grown M past it (`stored >= N + M`), so it never holds more than
//! N + M tokens; a multi-token forward (a prompt block, a chat turn) compresses as soon as
//! it is over N, so that a block-wise prefill never holds more than N + one block. The
//! last M tokens (the ones added since the previous compression, in decoding) and, on
//! request, the prompt are protected: never evicted. Scoring is never per step — only
//! once every M tokens.

use crate::error::{KvError, Result};

/// The per-layer budget during generation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DecodingBudget {
    /// Keep N tokens per layer and head.
    Tokens(usize),
    /// Keep the fraction r in (0, 1] of the tokens seen (at least the protected ones).
    Ratio(f64),
}

/// The schedule of decoding-time compression (see the module documentation).
///
/// ```
/// use kvpress_rs::decoding::DecodingSchedule;
/// let s = DecodingSchedule::from_args(Some(100), None, Some(16), false).unwrap();
/// assert_eq!(s.plan(115, 115, 1, 0).unwrap(), None);
/// assert_eq!(s.plan(116, 116, 1, 0).unwrap(), Some(100)); // grew 16 past 100
/// assert_eq!(s.plan(140, 140, 40, 0).unwrap(), Some(100)); // a prompt block: at once
/// assert!(DecodingSchedule::from_args(Some(0), None, None, false).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodingSchedule {
    budget: DecodingBudget,
    interval: usize,
    protect_prompt: bool,
}

/// The default interval: compress every 128 tokens (TriAttention's `divide_length`).
pub const DEFAULT_INTERVAL: usize = 128;

impl DecodingSchedule {
    /// From the user-facing keyword arguments: exactly one of `decoding_budget` (> 0
    /// tokens) and `decoding_ratio` (in (0, 1]); `decoding_interval` > 0 (default 128).
    pub fn from_args(
        decoding_budget: Option<i64>,
        decoding_ratio: Option<f64>,
        decoding_interval: Option<i64>,
        protect_prompt: bool,
    ) -> Result<Self> {
        let budget = match (decoding_budget, decoding_ratio) {
            (Some(_), Some(_)) => {
                return Err(KvError::invalid(
                    "decoding_ratio",
                    "give either `decoding_budget` or `decoding_ratio`, not both",
                ))
            }
            (None, None) => return Err(KvError::invalid(
                "decoding_budget",
                "decoding-time compression needs `decoding_budget` (tokens) or `decoding_ratio`",
            )),
            (Some(n), None) if n <= 0 => {
                return Err(KvError::invalid(
                    "decoding_budget",
                    format!("got {n}, expected a positive number of tokens kept per layer"),
                ))
            }
            (Some(n), None) => DecodingBudget::Tokens(n as usize),
            (None, Some(r)) if !(r > 0.0 && r <= 1.0) => {
                return Err(KvError::invalid(
                    "decoding_ratio",
                    format!("got {r}, expected a fraction of the tokens seen in (0, 1]"),
                ))
            }
            (None, Some(r)) => DecodingBudget::Ratio(r),
        };
        let interval = match decoding_interval {
            None => DEFAULT_INTERVAL,
            Some(m) if m <= 0 => {
                return Err(KvError::invalid(
                    "decoding_interval",
                    format!("got {m}, expected a positive number of tokens"),
                ))
            }
            Some(m) => m as usize,
        };
        if let DecodingBudget::Tokens(n) = budget {
            if n < interval {
                return Err(KvError::invalid(
                    "decoding_budget",
                    format!(
                        "got {n}, smaller than the {interval} most recent tokens it always keeps \
                         (decoding_interval); expected decoding_budget >= decoding_interval"
                    ),
                ));
            }
        }
        Ok(DecodingSchedule {
            budget,
            interval,
            protect_prompt,
        })
    }

    pub fn budget(&self) -> DecodingBudget {
        self.budget
    }

    pub fn interval(&self) -> usize {
        self.interval
    }

    pub fn protect_prompt(&self) -> bool {
        self.protect_prompt
    }

    /// The budget N after `seen` tokens, before protection: the token budget, or
    /// `int(seen * r)` (at least 1).
    pub fn target(&self, seen: usize) -> usize {
        match self.budget {
            DecodingBudget::Tokens(n) => n,
            DecodingBudget::Ratio(r) => ((seen as f64 * r) as usize).max(1),
        }
    }

    /// What a layer holding `stored` tokens does after a forward of `new_tokens` tokens,
    /// having seen `seen`, with `protected_prompt` prompt tokens protected: `Some(n)` —
    /// compress to n tokens now — or `None`. One-token forwards (decoding) compress once
    /// they have grown `interval` past the budget; multi-token forwards as soon as they
    /// exceed it.
    pub fn plan(
        &self,
        stored: usize,
        seen: usize,
        new_tokens: usize,
        protected_prompt: usize,
    ) -> Result<Option<usize>> {
        let target = self.target(seen);
        let due = if new_tokens > 1 {
            stored > target
        } else {
            stored >= target + self.interval
        };
        if !due {
            return Ok(None);
        }
        let n_kept = self.n_kept(seen, protected_prompt)?;
        Ok((n_kept < stored).then_some(n_kept))
    }

    /// Tokens kept by a compression after `seen` tokens with `protected_prompt` prompt
    /// tokens protected (0 unless `protect_prompt`): the budget, which must leave room for
    /// the protected prompt and the last `interval` tokens. A ratio grows to that room
    /// instead of failing.
    pub fn n_kept(&self, seen: usize, protected_prompt: usize) -> Result<usize> {
        let protected = protected_prompt + self.interval;
        match self.budget {
            DecodingBudget::Tokens(n) if n < protected => Err(KvError::invalid(
                "decoding_budget",
                format!(
                    "got {n}, smaller than the {protected} protected tokens ({protected_prompt} \
                     prompt tokens with protect_prompt=True + decoding_interval={}); raise \
                     decoding_budget or set protect_prompt=False",
                    self.interval
                ),
            )),
            DecodingBudget::Tokens(n) => Ok(n),
            DecodingBudget::Ratio(_) => Ok(self.target(seen).max(protected)),
        }
    }
}
