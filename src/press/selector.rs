//! Which tokens of a row survive, given its scores and its count: the `k` best (top-k).
//! Chunk-wise and threshold selection are further selectors of the same trait.

use crate::error::Result;
use crate::registry::{Builder, Stage};
use crate::select::top_k_indices;
use tch::Tensor;

/// A selection rule over scores (batch, heads, T).
pub trait Selector: Send + Sync + std::fmt::Debug {
    /// The registry name (`"topk"`).
    fn name(&self) -> &'static str;

    /// int64 (batch, heads, k) ascending indices of the tokens kept in every row.
    fn select(&self, scores: &Tensor, k: usize) -> Result<Tensor>;
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

/// The registry entries of the selectors.
pub static STAGES: [Stage; 1] = [Stage {
    name: "topk",
    aliases: &["top_k"],
    summary: "the k highest scores of every row (ties to the earlier token)",
    reference: "",
    url: "",
    params: &[],
    build: Builder::Selector(|_| Ok(Box::new(TopK))),
}];
