//! TOVA (Oren et al. 2024): the attention of the last prompt token, averaged over all
//! query heads and shared by every KV head; the last token is always kept.

use super::attention_weights::{append_protected, window_attention_mean};
use super::{QueryWindow, ScoreInput, Scorer};
use crate::error::{KvError, Result};
use crate::registry::{Builder, Stage};
use tch::Tensor;

#[derive(Clone, Copy, Debug, Default)]
pub struct Tova;

impl Scorer for Tova {
    fn name(&self) -> &'static str {
        "tova"
    }

    fn query_window(&self) -> QueryWindow {
        QueryWindow::Last(1)
    }

    fn protected_window(&self) -> usize {
        1
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor> {
        let s = input.keys.size();
        let t = s[2];
        if t < 2 {
            return Err(KvError::invalid("keys", "TOVA needs at least 2 tokens"));
        }
        let queries = input.require_queries(self.name())?;
        let weights = window_attention_mean(queries, input.keys)?; // (b, q_heads, t)
        let prefix = weights.f_narrow(-1, 0, t - 1)?;
        // mean over every query head, one vector shared by all KV heads
        let shared = prefix.f_mean_dim(1, true, prefix.kind())?; // (b, 1, t-1)
        let scores = shared
            .f_expand([s[0], s[1], t - 1], false)?
            .f_contiguous()?;
        append_protected(&scores, 1)
    }
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "tova",
    aliases: &[],
    summary: "attention of the last query, averaged over all heads and shared by every KV head",
    reference: "Oren et al., 2024",
    url: "https://arxiv.org/abs/2401.06104",
    params: &[],
    build: Builder::Scorer(|_| Ok(Box::new(Tova))),
};
