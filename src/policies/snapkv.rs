//! SnapKV (Li et al. 2024): the attention the last `window_size` prompt queries pay to
//! each earlier token, averaged over the window, smoothed by average pooling
//! (`kernel_size`), averaged over each KV head's group; the window itself is always kept.
//!
//! During generation the cache is compressed again and again, and the tokens kept last time
//! are no longer neighbours in the text. With `decoding_pooling="rank"` (the default), a
//! decoding-time compression pools each token's score over `decoding_kernel_size`
//! neighbours in the PREVIOUS compression's ranking instead of its neighbours in storage: a
//! token's standing is then smoothed over tokens that were as important as it last time, a
//! memory of earlier windows that keeps a token from being evicted for one window that
//! happened to ignore it. Tokens that ranking did not hold (those stored since, the window)
//! come after it, in position order; with no previous ranking (the first compression) the
//! order is the positions. A prompt's compression pools over positions with `kernel_size`,
//! as the paper does. Measured in the README ("Compression during generation vs kvpress").

use super::attention_weights::{append_protected, group_mean, window_attention_mean};
use super::{QueryWindow, ScoreInput, Scorer};
use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct SnapKv {
    window: usize,
    kernel: usize,
    /// The kernel of decoding-time compressions pooling over the previous ranking; None:
    /// they pool over storage positions with `kernel`, as kvpress does.
    rank_kernel: Option<usize>,
}

/// The default `decoding_kernel_size` (measured in the README).
pub const DEFAULT_RANK_KERNEL: usize = 7;

impl SnapKv {
    /// SnapKV with position pooling only (as in the paper and kvpress).
    pub fn new(window_size: usize, kernel_size: usize) -> Result<Self> {
        Self::with_decoding_pooling(window_size, kernel_size, "position", kernel_size)
    }

    /// SnapKV whose decoding-time compressions pool over the previous ranking with
    /// `decoding_kernel_size` (`decoding_pooling = "rank"`) or over storage neighbours with
    /// `kernel_size` (`"position"`).
    pub fn with_decoding_pooling(
        window_size: usize,
        kernel_size: usize,
        decoding_pooling: &str,
        decoding_kernel_size: usize,
    ) -> Result<Self> {
        let rank_kernel = match decoding_pooling {
            "rank" => Some(odd_kernel("decoding_kernel_size", decoding_kernel_size)?),
            "position" => None,
            other => {
                return Err(KvError::invalid(
                    "decoding_pooling",
                    format!("got {other:?}, expected \"rank\" or \"position\""),
                ))
            }
        };
        if window_size == 0 {
            return Err(KvError::invalid(
                "window_size",
                "got 0, expected at least 1 query",
            ));
        }
        Ok(SnapKv {
            window: window_size,
            kernel: odd_kernel("kernel_size", kernel_size)?,
            rank_kernel,
        })
    }
}

fn odd_kernel(argument: &str, k: usize) -> Result<usize> {
    if k == 0 || k.is_multiple_of(2) {
        return Err(KvError::invalid(
            argument,
            format!("got {k}, expected an odd number >= 1"),
        ));
    }
    Ok(k)
}

/// Scores of the tokens before the window from the window's mean attention (batch,
/// q_heads, T): the first T − w, average pooling, group mean → (batch, kv_heads, T − w).
pub(crate) fn pooled_window_scores(
    mean: &Tensor,
    window: i64,
    kv_heads: i64,
    kernel: usize,
) -> Result<Tensor> {
    let t = mean.size()[2];
    let prefix = mean.f_narrow(-1, 0, t - window)?;
    let k = kernel as i64;
    let pooled = prefix.f_avg_pool1d([k], [1], [k / 2], false, true)?;
    group_mean(&pooled, kv_heads)
}

/// [`pooled_window_scores`] pooled over the previous ranking (see the module
/// documentation): `previous` (batch, kv_heads, m) are the scores the first m stored tokens
/// had when they were last kept (None: no ranking yet). The pooling order of each row is
/// those m tokens by decreasing previous score (ties in position order), then the tokens
/// stored since.
fn rank_pooled_window_scores(
    mean: &Tensor,
    window: i64,
    kv_heads: i64,
    kernel: usize,
    previous: Option<&Tensor>,
) -> Result<Tensor> {
    let n = mean.size()[2] - window;
    // in float32: the ranking this pooling leaves behind is the next one's order, and bf16
    // scores (a bf16 model's) would tie by the hundred
    let scores = group_mean(&mean.f_narrow(-1, 0, n)?, kv_heads)?.f_to_kind(Kind::Float)?;
    let order = previous_ranking_order(previous, scores.size()[0], kv_heads, n, scores.device())?;
    let k = kernel as i64;
    let pooled =
        scores
            .f_gather(-1, &order, false)?
            .f_avg_pool1d([k], [1], [k / 2], false, true)?;
    Ok(scores.f_scatter(-1, &order, &pooled)?)
}

/// Each row's tokens 0..n in the order of the previous compression's ranking: the first m
/// stored tokens by decreasing `previous` score (ties in position order; m = its length,
/// at most n), then tokens m..n in position order. int64 (batch, kv_heads, n).
pub(crate) fn previous_ranking_order(
    previous: Option<&Tensor>,
    batch: i64,
    kv_heads: i64,
    n: i64,
    device: tch::Device,
) -> Result<Tensor> {
    let m = previous.map_or(0, |p| p.size()[2].min(n));
    let since = Tensor::f_arange_start(m, n, (Kind::Int64, device))?
        .f_expand([batch, kv_heads, n - m], false)?;
    Ok(match previous {
        Some(p) if m > 0 => {
            let (_, ranked) = p
                .f_narrow(-1, 0, m)?
                .f_to_kind(Kind::Float)?
                .f_sort_stable(true, -1, true)?;
            Tensor::f_cat(&[ranked, since], -1)?
        }
        _ => since.f_contiguous()?,
    })
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

    fn remembers_scores(&self) -> bool {
        self.rank_kernel.is_some_and(|k| k > 1)
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
        let mean = window_attention_mean(queries, input.keys)?;
        let kv_heads = input.keys.size()[1];
        // decoding-time compressions (through the schedule) know the tokens seen
        let decoding = input.ctx.next_position.is_some();
        let scores = match self.rank_kernel {
            Some(k) if decoding => {
                rank_pooled_window_scores(&mean, w, kv_heads, k, input.previous_scores)?
            }
            _ => pooled_window_scores(&mean, w, kv_heads, self.kernel)?,
        };
        append_protected(&scores, w)
    }
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "snapkv",
    aliases: &[],
    summary: "attention of the last `window_size` queries, pooled over `kernel_size` neighbours; the window is kept",
    reference: "Li et al., 2024",
    url: "https://arxiv.org/abs/2404.14469",
    params: &[
        ParamSpec::int("window_size", 64, 1, "last prompt queries that score the tokens (the window is always kept)"),
        ParamSpec::int("kernel_size", 5, 1, "odd width of the average pooling of scores over neighbours"),
        ParamSpec::choice("decoding_pooling", "rank", &["rank", "position"],
            "decoding-time compressions pool over the previous ranking (\"rank\") or over storage neighbours"),
        ParamSpec::int("decoding_kernel_size", DEFAULT_RANK_KERNEL as i64, 1,
            "odd width of the pooling over the previous ranking"),
    ],
    build: Builder::Scorer(|a| {
        Ok(Box::new(SnapKv::with_decoding_pooling(
            a.usize("window_size")?,
            a.usize("kernel_size")?,
            a.str("decoding_pooling")?,
            a.usize("decoding_kernel_size")?,
        )?))
    }),
};
