//! Stages between the scorer and the selection that change scores (batch, heads, T):
//! averaging over the KV heads of a layer, and the press's own transforms — ends that are
//! never evicted (decoding-time compression).

use crate::error::Result;
use crate::registry::{Builder, Stage};
use tch::{Kind, Tensor};

/// A change to a layer's scores before selection.
pub trait ScoreTransform: Send + Sync + std::fmt::Debug {
    /// The registry name (`"head_mean"`).
    fn name(&self) -> &'static str;

    /// The transformed scores, the same shape as `scores`.
    fn apply(&self, scores: &Tensor) -> Result<Tensor>;
}

/// Every KV head of a row gets the mean score of the row's heads: the heads keep the same
/// tokens (as TOVA does with its query heads).
///
/// ```
/// use kvpress_rs::press::{HeadMean, ScoreTransform};
/// let s = tch::Tensor::from_slice(&[1.0f32, 3.0, 3.0, 1.0]).reshape([1, 2, 2]);
/// let m = HeadMean.apply(&s).unwrap();
/// assert_eq!(Vec::<f32>::try_from(m.flatten(0, -1)).unwrap(), [2.0, 2.0, 2.0, 2.0]);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HeadMean;

impl ScoreTransform for HeadMean {
    fn name(&self) -> &'static str {
        "head_mean"
    }

    fn apply(&self, scores: &Tensor) -> Result<Tensor> {
        let s = scores.size();
        let mean = scores
            .f_to_kind(Kind::Float)?
            .f_mean_dim(1, true, Kind::Float)?;
        Ok(mean.f_expand(&s, false)?.f_contiguous()?)
    }
}

/// The first `first` and last `last` tokens of every row raised to +inf, so that a
/// selection always keeps them (decoding-time compression's protected prompt and recent
/// tokens). A copy in float32: the caller may still read the scores.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProtectEnds {
    pub first: usize,
    pub last: usize,
}

impl ScoreTransform for ProtectEnds {
    fn name(&self) -> &'static str {
        "protect_ends"
    }

    fn apply(&self, scores: &Tensor) -> Result<Tensor> {
        let t = scores.size()[2];
        let (first, last) = ((self.first as i64).min(t), (self.last as i64).min(t));
        if first == 0 && last == 0 {
            return Ok(scores.shallow_clone());
        }
        let scores = scores.f_to_dtype(Kind::Float, false, true)?;
        if first > 0 {
            let _ = scores.f_narrow(2, 0, first)?.f_fill_(f64::INFINITY)?;
        }
        if last > 0 {
            let _ = scores.f_narrow(2, t - last, last)?.f_fill_(f64::INFINITY)?;
        }
        Ok(scores)
    }
}

/// The registry entries of the score transforms users can name.
pub static STAGES: [Stage; 1] = [Stage {
    name: "head_mean",
    aliases: &[],
    summary:
        "every KV head of a layer takes the mean score of its heads (they keep the same tokens)",
    reference: "",
    url: "",
    params: &[],
    build: Builder::Transform(|_| Ok(Box::new(HeadMean))),
}];
