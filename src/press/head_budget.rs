//! How a layer's budget is shared among its KV heads: equally, or AdaKV's adaptive split
//! (each head keeps at least `alpha` of the mean as a safeguard, the rest goes to the
//! highest scores across the layer's heads; heads then hold different counts).

use super::{Kept, Selector};
use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use crate::select::adakv_rows;
use tch::Tensor;

/// A head budget: the kept tokens of every (batch, head) row from the layer's scores.
pub trait HeadBudget: Send + Sync + std::fmt::Debug {
    /// The registry name (`"adakv"`).
    fn name(&self) -> &'static str;

    /// Whether every head keeps the same count (rows stay one tensor).
    fn is_uniform(&self) -> bool;

    /// The kept tokens of `scores` (batch, heads, T) when the layer keeps `n_kept` per head
    /// on average, chosen by `selector` where the rule leaves the choice to it.
    fn split(&self, scores: &Tensor, n_kept: usize, selector: &dyn Selector) -> Result<Kept>;
}

/// Every head keeps the same count, chosen by the selector.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UniformHeads;

impl HeadBudget for UniformHeads {
    fn name(&self) -> &'static str {
        "uniform"
    }

    fn is_uniform(&self) -> bool {
        true
    }

    fn split(&self, scores: &Tensor, n_kept: usize, selector: &dyn Selector) -> Result<Kept> {
        Ok(Kept::Uniform(selector.select(scores, n_kept)?))
    }
}

/// AdaKV: a per-head safeguard of `alpha` × the mean, the rest chosen across the heads of
/// each batch row by score (`select.rs: adakv_rows`). It selects tokens itself, by score:
/// only with the top-k selector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaKv {
    pub alpha: f64,
}

impl HeadBudget for AdaKv {
    fn name(&self) -> &'static str {
        "adakv"
    }

    fn is_uniform(&self) -> bool {
        false
    }

    fn split(&self, scores: &Tensor, n_kept: usize, selector: &dyn Selector) -> Result<Kept> {
        if selector.name() != "topk" {
            return Err(KvError::Unsupported(format!(
                "head_budget='adakv' chooses tokens by score across heads; it does not combine \
                 with selector {:?}",
                selector.name()
            )));
        }
        Ok(Kept::Rows(adakv_rows(scores, n_kept, self.alpha)?))
    }
}

/// The registry entries of the head budgets.
pub static STAGES: [Stage; 2] = [
    Stage {
        name: "uniform",
        aliases: &[],
        summary: "every KV head keeps the same number of tokens",
        reference: "",
        url: "",
        params: &[],
        build: Builder::HeadBudget(|_| Ok(Box::new(UniformHeads))),
    },
    Stage {
        name: "adakv",
        aliases: &[],
        summary: "heads share the layer's budget by score, each keeping at least alpha_safeguard of the mean (memory freed)",
        reference: "Feng et al., 2024",
        url: "https://arxiv.org/abs/2407.11550",
        params: &[ParamSpec::float(
            "alpha_safeguard",
            0.2,
            0.0,
            Some(1.0),
            "fraction of the mean budget every head keeps whatever its scores",
        )],
        build: Builder::HeadBudget(|a| {
            Ok(Box::new(AdaKv {
                alpha: a.f64("alpha_safeguard")?,
            }))
        }),
    },
];
