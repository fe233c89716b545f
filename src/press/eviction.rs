//! What happens to the tokens a press does not select: dropped (their memory freed), or set
//! aside for a low-precision store (MiKV's mixed precision). Merging them into kept tokens
//! is a further rule of the same trait.

use super::{Kept, Target};
use crate::error::Result;
use crate::registry::{Builder, Stage};
use tch::Tensor;

/// An eviction rule: keeps the selected tokens in `target` and decides the fate of the rest.
pub trait Eviction: Send + Sync + std::fmt::Debug {
    /// The registry name (`"drop"`).
    fn name(&self) -> &'static str;

    /// Keeps `kept` in `target`; returns the evicted tokens' keys and values (batch,
    /// kv_heads, n_evicted, head_dim) when the rule keeps them elsewhere.
    fn evict(&self, target: &mut dyn Target, kept: &Kept) -> Result<Option<(Tensor, Tensor)>>;
}

/// The evicted tokens are freed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Drop;

impl Eviction for Drop {
    fn name(&self) -> &'static str {
        "drop"
    }

    fn evict(&self, target: &mut dyn Target, kept: &Kept) -> Result<Option<(Tensor, Tensor)>> {
        target.retain(kept)?;
        Ok(None)
    }
}

/// The evicted tokens are handed back, in stored order, to be kept at lower precision
/// (a cache's `low_bits`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SetAside;

impl Eviction for SetAside {
    fn name(&self) -> &'static str {
        "low_bits"
    }

    fn evict(&self, target: &mut dyn Target, kept: &Kept) -> Result<Option<(Tensor, Tensor)>> {
        target.retain_split(kept).map(Some)
    }
}

/// The registry entries of the eviction rules.
pub static STAGES: [Stage; 2] = [
    Stage {
        name: "drop",
        aliases: &[],
        summary: "evicted tokens are freed",
        reference: "",
        url: "",
        params: &[],
        build: Builder::Eviction(|_| Ok(Box::new(Drop))),
    },
    Stage {
        name: "low_bits",
        aliases: &["mikv"],
        summary: "evicted tokens are kept at low precision instead (the cache's `low_bits`, MiKV)",
        reference: "Yang et al., 2024 (MiKV)",
        url: "https://arxiv.org/abs/2402.18096",
        params: &[],
        build: Builder::Eviction(|_| Ok(Box::new(SetAside))),
    },
];
