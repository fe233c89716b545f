//! Which tokens of a row survive, given its scores and its count: the `k` best (top-k), or
//! whole chunks of consecutive tokens (ChunkKV, and its entropy-gated variant). Threshold
//! selection is a further selector of the same trait.

use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use crate::select::{check_selection, top_k_indices};
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
        shared_by_heads(scores, k, |row, k| {
            chunk_selection(row, k, self.chunk_length)
        })
    }

    fn reads_token_order(&self) -> bool {
        true
    }
}

/// kvpress's EntropyGatedChunkKV: ChunkKV whose important but spiky chunks — score at or
/// above the median chunk's, entropy of their token scores below the median — keep only
/// their `low_entropy_length` best tokens, the budget freed going to further chunks, then
/// to the best remaining tokens; exactly `k` tokens, the same in every head of a row.
///
/// ```
/// use kvpress_rs::press::{EntropyChunks, Selector};
/// // chunks of 4: [0..4) one spike (score 6, entropy low), [4..8) flat 1.0, [8..12) flat 0.5
/// let s = [0.0f32, 0.0, 6.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5];
/// let scores = tch::Tensor::from_slice(&s).view([1, 1, 12]);
/// let sel = EntropyChunks { chunk_length: 4, low_entropy_length: 1 };
/// let kept = sel.select(&scores, 6).unwrap();
/// // the spike alone, then chunk [4..8) whole, then the best remaining token (8)
/// assert_eq!(Vec::<i64>::try_from(kept.view(-1)).unwrap(), vec![2, 4, 5, 6, 7, 8]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EntropyChunks {
    pub chunk_length: usize,
    pub low_entropy_length: usize,
}

impl Selector for EntropyChunks {
    fn name(&self) -> &'static str {
        "entropy_chunks"
    }

    fn select(&self, scores: &Tensor, k: usize) -> Result<Tensor> {
        shared_by_heads(scores, k, |row, k| {
            entropy_chunk_selection(row, k, self.chunk_length, self.low_entropy_length)
        })
    }

    fn reads_token_order(&self) -> bool {
        true
    }
}

/// A selection made once per batch row from the scores summed over its heads, the same
/// for every head: int64 (batch, heads, k).
fn shared_by_heads(
    scores: &Tensor,
    k: usize,
    select_row: impl Fn(&[f64], usize) -> Vec<i64>,
) -> Result<Tensor> {
    let size = check_selection(scores, k)?;
    let (batch, heads, n) = (size[0], size[1], size[2] as usize);
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
        kept.extend(with_protected_first(row, k, &select_row));
    }
    Ok(Tensor::from_slice(&kept)
        .f_view([batch, 1, k as i64])?
        .f_expand([batch, heads, k as i64], false)?
        .f_contiguous()?
        .f_to_device(scores.device())?)
}

/// Tokens scored +inf (those a decoding step protects) are kept before any chunk is
/// chosen, so that a chunk cut to fit the budget never drops one; `select_row` then
/// chooses the rest among the other tokens, chunked as they follow each other.
fn with_protected_first(
    scores: &[f64],
    k: usize,
    select_row: &impl Fn(&[f64], usize) -> Vec<i64>,
) -> Vec<i64> {
    let (protected, others): (Vec<usize>, Vec<usize>) =
        (0..scores.len()).partition(|&i| scores[i] == f64::INFINITY);
    if protected.is_empty() {
        return select_row(scores, k);
    }
    let mut kept: Vec<i64> = protected.iter().rev().take(k).map(|&i| i as i64).collect();
    if kept.len() < k {
        let rest: Vec<f64> = others.iter().map(|&i| scores[i]).collect();
        let chosen = select_row(&rest, k - kept.len());
        kept.extend(chosen.into_iter().map(|j| others[j as usize] as i64));
    }
    kept.sort_unstable();
    kept
}

/// The `k` ascending indices ChunkKV keeps of one row's per-token `scores` (see [`Chunks`]).
/// Chunks of equal score go to the earlier chunk, tokens of equal score to the earlier token.
pub fn chunk_selection(scores: &[f64], k: usize, chunk_length: usize) -> Vec<i64> {
    let chunks = Chunking::new(scores, chunk_length);
    let mut kept: Vec<i64> = Vec::with_capacity(k);
    for c in chunks.by_mean() {
        let left = k - kept.len();
        if left == 0 {
            break;
        }
        kept.extend(chunks.best(c, left));
    }
    kept.sort_unstable();
    kept
}

/// The `k` ascending indices EntropyGatedChunkKV keeps (see [`EntropyChunks`]).
pub fn entropy_chunk_selection(
    scores: &[f64],
    k: usize,
    chunk_length: usize,
    low_entropy_length: usize,
) -> Vec<i64> {
    let chunks = Chunking::new(scores, chunk_length);
    let entropy: Vec<f64> = (0..chunks.means.len())
        .map(|c| normalized_entropy(&scores[chunks.span(c)]))
        .collect();
    let (score_cut, entropy_cut) = (lower_median(&chunks.means), lower_median(&entropy));
    let mut keep = vec![false; scores.len()];
    let mut left = k;
    for c in chunks.by_mean() {
        if left == 0 {
            break;
        }
        let spiky = chunks.means[c] >= score_cut && entropy[c] < entropy_cut;
        let n = if spiky {
            left.min(low_entropy_length)
        } else {
            left
        };
        for i in chunks.best(c, n) {
            keep[i as usize] = true;
            left -= 1;
        }
    }
    if left > 0 {
        let mut rest: Vec<usize> = (0..scores.len()).filter(|&i| !keep[i]).collect();
        rest.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        for &i in rest.iter().take(left) {
            keep[i] = true;
        }
    }
    (0..scores.len())
        .filter(|&i| keep[i])
        .map(|i| i as i64)
        .collect()
}

/// A row cut into chunks of `len` consecutive tokens (the last may be shorter).
struct Chunking<'a> {
    scores: &'a [f64],
    len: usize,
    means: Vec<f64>,
}

impl<'a> Chunking<'a> {
    fn new(scores: &'a [f64], chunk_length: usize) -> Self {
        let len = chunk_length.max(1);
        let means = (0..scores.len().div_ceil(len))
            .map(|c| {
                let r = c * len..((c + 1) * len).min(scores.len());
                let count = r.len() as f64;
                scores[r].iter().sum::<f64>() / count
            })
            .collect();
        Chunking { scores, len, means }
    }

    fn span(&self, c: usize) -> std::ops::Range<usize> {
        c * self.len..((c + 1) * self.len).min(self.scores.len())
    }

    /// Chunks by decreasing mean score, ties to the earlier chunk.
    fn by_mean(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.means.len()).collect();
        order.sort_by(|&a, &b| self.means[b].total_cmp(&self.means[a]).then(a.cmp(&b)));
        order
    }

    /// Chunk `c` whole if it has at most `n` tokens, else its `n` best (ties to the earlier).
    fn best(&self, c: usize, n: usize) -> Vec<i64> {
        let r = self.span(c);
        if r.len() <= n {
            return r.map(|i| i as i64).collect();
        }
        let mut tokens: Vec<usize> = r.collect();
        tokens.sort_by(|&a, &b| self.scores[b].total_cmp(&self.scores[a]).then(a.cmp(&b)));
        tokens[..n].iter().map(|&i| i as i64).collect()
    }
}

/// The entropy of a chunk's token scores as a distribution (rebased to be non-negative
/// when some are negative), over the log of its length: 0 for one token.
fn normalized_entropy(chunk: &[f64]) -> f64 {
    const EPSILON: f64 = 1e-8;
    if chunk.len() < 2 {
        return 0.0;
    }
    let low = chunk.iter().copied().fold(f64::INFINITY, f64::min).min(0.0);
    let total: f64 = chunk.iter().map(|s| s - low).sum::<f64>() + EPSILON;
    let h: f64 = chunk
        .iter()
        .map(|s| {
            let p = (s - low) / total;
            -p * (p + EPSILON).ln()
        })
        .sum();
    (h / (chunk.len() as f64).ln()).clamp(0.0, 1.0)
}

/// torch.median's convention: the lower of the two middle values of an even count.
fn lower_median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[(sorted.len() - 1) / 2]
}

/// The registry entries of the selectors.
pub static STAGES: [Stage; 3] = [
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
    Stage {
        name: "entropy_chunks",
        aliases: &["entropy_gated_chunkkv"],
        summary: "ChunkKV whose important but spiky chunks (score above the median, token-score \
                  entropy below it) keep only their best tokens, the budget freed going to \
                  further chunks",
        reference: "kvpress EntropyGatedChunkKVPress",
        url: "https://github.com/NVIDIA/kvpress",
        params: &[
            ParamSpec::int(
                "entropy_chunk_length",
                10,
                2,
                "consecutive tokens per chunk of the entropy-gated selection",
            ),
            ParamSpec::int(
                "low_entropy_chunk_length",
                4,
                1,
                "tokens kept of a spiky chunk (fewer than entropy_chunk_length)",
            ),
        ],
        build: Builder::Selector(|a| {
            let (chunk_length, low_entropy_length) = (
                a.usize("entropy_chunk_length")?,
                a.usize("low_entropy_chunk_length")?,
            );
            if low_entropy_length >= chunk_length {
                return Err(KvError::invalid(
                    "low_entropy_chunk_length",
                    format!(
                        "got {low_entropy_length}, expected fewer than entropy_chunk_length \
                         ({chunk_length})"
                    ),
                ));
            }
            Ok(Box::new(EntropyChunks {
                chunk_length,
                low_entropy_length,
            }))
        }),
    },
];
