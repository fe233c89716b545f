//! Which tokens of a row survive, given its scores and its count: the `k` best (top-k), or
//! whole chunks of consecutive tokens (ChunkKV). Threshold selection is a further selector
//! of the same trait.

use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use crate::select::top_k_indices;
use tch::{Device, Kind, Tensor};

/// A selection rule over scores (batch, heads, T).
pub trait Selector: Send + Sync + std::fmt::Debug {
    /// The registry name (`"topk"`).
    fn name(&self) -> &'static str;

    /// int64 (batch, heads, k) ascending indices of the tokens kept in every row.
    fn select(&self, scores: &Tensor, k: usize) -> Result<Tensor>;

    /// Whether the selection depends on where tokens sit, not only on their scores: then
    /// the scores may not be permuted before selecting (a decoding step breaks ties by a
    /// previous ranking that way for top-k only).
    fn reads_token_order(&self) -> bool {
        false
    }
}

/// The `k` highest scores of every row; ties go to the earlier token, on every device.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TopK;

impl Selector for TopK {
    fn name(&self) -> &'static str {
        "topk"
    }

    fn select(&self, scores: &Tensor, k: usize) -> Result<Tensor> {
        top_k_indices(scores, k)
    }
}

/// ChunkKV's selection: the sequence is cut into chunks of `chunk_length` consecutive
/// tokens (the last one may be shorter), each chunk is ranked by the mean over its tokens
/// of the scores summed over the row's KV heads, and the best chunks are kept whole, the
/// same chunks in every head of a batch row.
///
/// Unlike kvpress's `ChunkKVPress`, which keeps `int(n_chunks · (1 − ratio))` whole chunks
/// (so the count drifts from the budget by up to a chunk), the count is exactly `k`: whole
/// chunks in rank order while they fit, then the best-scored tokens of the next chunk. It
/// composes with every layer budget; it needs one count for every head of a row.
///
/// ```
/// use kvpress_rs::press::{Chunks, Selector};
/// // chunks of 2: [0,1] mean 1, [2,3] mean 5, [4,5] mean 3 → keep [2,3] then [4,5]
/// let scores = tch::Tensor::from_slice(&[1.0f32, 1.0, 5.0, 5.0, 3.0, 3.0]).view([1, 1, 6]);
/// let kept = Chunks { chunk_length: 2 }.select(&scores, 4).unwrap();
/// assert_eq!(Vec::<i64>::try_from(kept.view(-1)).unwrap(), vec![2, 3, 4, 5]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chunks {
    pub chunk_length: usize,
}

impl Selector for Chunks {
    fn name(&self) -> &'static str {
        "chunks"
    }

    fn select(&self, scores: &Tensor, k: usize) -> Result<Tensor> {
        let size = scores.size();
        if size.len() != 3 {
            return Err(KvError::shape(
                "scores",
                &size,
                "rank 3: (batch, heads, tokens)",
            ));
        }
        let (batch, heads, n) = (size[0], size[1], size[2] as usize);
        if k == 0 || k > n {
            return Err(KvError::invalid(
                "k",
                format!("got {k}, expected 1 <= k <= {n} (tokens)"),
            ));
        }
        if scores.f_isnan()?.f_any()?.f_int64_value(&[])? != 0 {
            return Err(KvError::non_finite("scores", "a scorer produced NaN"));
        }
        // One score per token of a batch row: tiny (batch × T), ranked on the host.
        let per_token = scores
            .f_to_kind(Kind::Double)?
            .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?
            .f_view([-1])?;
        let per_token = Vec::<f64>::try_from(&per_token)?;
        let mut kept = Vec::with_capacity(batch as usize * k);
        for row in per_token.chunks(n.max(1)) {
            kept.extend(chunk_selection(row, k, self.chunk_length));
        }
        Ok(Tensor::from_slice(&kept)
            .f_view([batch, 1, k as i64])?
            .f_expand([batch, heads, k as i64], false)?
            .f_contiguous()?
            .f_to_device(scores.device())?)
    }

    fn reads_token_order(&self) -> bool {
        true
    }
}

/// The `k` ascending indices ChunkKV keeps of one row's per-token `scores` (see [`Chunks`]).
/// Chunks of equal score go to the earlier chunk, tokens of equal score to the earlier token.
pub fn chunk_selection(scores: &[f64], k: usize, chunk_length: usize) -> Vec<i64> {
    let (n, len) = (scores.len(), chunk_length.max(1));
    let span = |c: usize| c * len..((c + 1) * len).min(n);
    let means: Vec<f64> = (0..n.div_ceil(len))
        .map(|c| {
            let r = span(c);
            let count = r.len() as f64;
            scores[r].iter().sum::<f64>() / count
        })
        .collect();
    let mut order: Vec<usize> = (0..means.len()).collect();
    // +inf + -inf (a protected token beside a hidden one) sums to NaN; total_cmp ranks it
    // first, as the protected token asks.
    order.sort_by(|&a, &b| means[b].total_cmp(&means[a]).then(a.cmp(&b)));
    let mut kept: Vec<i64> = Vec::with_capacity(k);
    for c in order {
        let left = k - kept.len();
        if left == 0 {
            break;
        }
        let r = span(c);
        if r.len() <= left {
            kept.extend(r.map(|i| i as i64));
        } else {
            let mut tokens: Vec<usize> = r.collect();
            tokens.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            kept.extend(tokens[..left].iter().map(|&i| i as i64));
        }
    }
    kept.sort_unstable();
    kept
}

/// The registry entries of the selectors.
pub static STAGES: [Stage; 2] = [
    Stage {
        name: "topk",
        aliases: &["top_k"],
        summary: "the k highest scores of every row (ties to the earlier token)",
        reference: "",
        url: "",
        params: &[],
        build: Builder::Selector(|_| Ok(Box::new(TopK))),
    },
    Stage {
        name: "chunks",
        aliases: &["chunkkv"],
        summary: "whole chunks of consecutive tokens ranked by their mean score over the heads, \
                  the same chunks in every head; exactly k tokens",
        reference: "ChunkKV, Liu et al., 2025",
        url: "https://arxiv.org/abs/2502.00299",
        params: &[ParamSpec::int(
            "chunk_length",
            20,
            1,
            "consecutive tokens per chunk",
        )],
        build: Builder::Selector(|a| {
            Ok(Box::new(Chunks {
                chunk_length: a.usize("chunk_length")?,
            }))
        }),
    },
];
