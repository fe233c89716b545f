//! SnapKV (Li et al. 2024): the attention the last `window_size` prompt queries pay to
//! each earlier token, averaged over the window, smoothed by average pooling
//! (`kernel_size`), averaged over each KV head's group; the window itself is always kept.

use super::attention_weights::{append_protected, group_mean, window_attention};
use super::{QueryWindow, ScoreInput, Scorer};
use crate::error::{KvError, Result};
use tch::Tensor;

#[derive(Clone, Copy, Debug)]
pub struct SnapKv {
    window: usize,
    kernel: usize,
}

impl SnapKv {
    pub fn new(window_size: usize, kernel_size: usize) -> Result<Self> {
        if window_size == 0 {
            return Err(KvError::invalid(
                "window_size",
                "got 0, expected at least 1 query",
            ));
        }
        if kernel_size == 0 || kernel_size % 2 == 0 {
            return Err(KvError::invalid(
                "kernel_size",
                format!("got {kernel_size}, expected an odd number >= 1"),
            ));
        }
        Ok(SnapKv {
            window: window_size,
            kernel: kernel_size,
        })
    }
}

/// Scores of the tokens before the window from window attention weights (batch,
/// q_heads, w, T): mean over the window, average pooling, group mean → (batch,
/// kv_heads, T − w). Shared with the pyramid and CAKE variants.
pub(crate) fn pooled_window_scores(
    weights: &Tensor,
    kv_heads: i64,
    kernel: usize,
) -> Result<Tensor> {
    let (w, t) = (weights.size()[2], weights.size()[3]);
    let prefix = weights.f_narrow(-1, 0, t - w)?;
    let mean = prefix.f_mean_dim(2, false, prefix.kind())?;
    let k = kernel as i64;
    let pooled = mean.f_avg_pool1d([k], [1], [k / 2], false, true)?;
    group_mean(&pooled, kv_heads)
}

impl Scorer for SnapKv {
    fn name(&self) -> &'static str {
        "snapkv"
    }

    fn query_window(&self) -> QueryWindow {
        QueryWindow::Last(self.window)
    }

    fn protected_window(&self) -> usize {
        self.window
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor> {
        let t = input.keys.size()[2];
        let w = self.window as i64;
        if t <= w {
            return Err(KvError::invalid(
                "window_size",
                format!("the window ({w} tokens) must be shorter than the prompt ({t} tokens)"),
            ));
        }
        let queries = input.require_queries(self.name())?;
        let weights = window_attention(queries, input.keys)?;
        let scores = pooled_window_scores(&weights, input.keys.size()[1], self.kernel)?;
        append_protected(&scores, w)
    }
}
