//! Token scoring policies. A scorer gives every cached token of a layer a score, higher =
//! keep; [`crate::Press`] turns scores into kept indices with a [`crate::Budget`].
//!
//! Each scorer has two implementations of the same math: a fused CPU kernel over
//! `ndarray` views (`score_cpu`, also reachable from numpy arrays) and a libtorch path for
//! every other device (`score_libtorch`). Tests check that the two agree.

mod knorm;
mod random;
mod streaming;

pub use knorm::Knorm;
pub use random::Random;
pub use streaming::StreamingLlm;

use crate::error::{KvError, Result};
use crate::tensor::{array_view_mut, check_kv_pair, float_view, uses_cpu_kernels, FloatView4};
use ndarray::ArrayViewMut3;
use tch::{Device, Kind, Tensor};

/// What a scorer may know besides the keys and values of the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreContext {
    /// Index of the model layer being compressed.
    pub layer_idx: usize,
    /// Number of tokens that will be kept (positional policies need it).
    pub n_kept: usize,
}

/// A per-token scoring rule. Scores have shape (batch, kv_heads, tokens), higher = keep.
pub trait Scorer: Send + Sync + std::fmt::Debug {
    /// The policy's name as users spell it (`"knorm"`).
    fn name(&self) -> &'static str;

    /// Writes the scores of `keys`/`values` (batch, kv_heads, tokens, head_dim) into `out`
    /// (batch, kv_heads, tokens), on the CPU.
    fn score_cpu(
        &self,
        keys: &FloatView4<'_>,
        values: &FloatView4<'_>,
        ctx: &ScoreContext,
        out: ArrayViewMut3<'_, f32>,
    ) -> Result<()>;

    /// The same scores through libtorch ops, on the device of `keys`; float32 result.
    fn score_libtorch(&self, keys: &Tensor, values: &Tensor, ctx: &ScoreContext) -> Result<Tensor>;
}

/// Scores one layer's keys and values: the CPU kernel for CPU tensors, libtorch elsewhere.
/// Returns float32 scores (batch, kv_heads, tokens) on the tensors' device.
pub fn score(
    scorer: &dyn Scorer,
    keys: &Tensor,
    values: &Tensor,
    ctx: &ScoreContext,
) -> Result<Tensor> {
    let (shape, _) = check_kv_pair(keys, values)?;
    if shape.tokens == 0 {
        return Err(KvError::empty(
            "keys",
            "cannot score a sequence of zero tokens",
        ));
    }
    if !uses_cpu_kernels(keys) {
        return scorer.score_libtorch(keys, values, ctx);
    }
    let mut out = Tensor::f_empty(
        [shape.batch as i64, shape.heads as i64, shape.tokens as i64],
        (Kind::Float, Device::Cpu),
    )?;
    let k = float_view(keys, "keys")?;
    let v = float_view(values, "values")?;
    scorer.score_cpu(&k, &v, ctx, array_view_mut(&mut out, "scores")?)?;
    Ok(out)
}

/// [`score`] for CPU views (numpy inputs through the bindings): checks that keys and
/// values agree and are non-empty, then runs the CPU kernel. `n_kept` defaults to all
/// tokens.
pub fn score_views(
    scorer: &dyn Scorer,
    keys: &FloatView4<'_>,
    values: &FloatView4<'_>,
    n_kept: Option<usize>,
    layer_idx: usize,
) -> Result<ndarray::Array3<f32>> {
    let (ks, vs) = (keys.shape(), values.shape());
    if ks[..3] != vs[..3] {
        let actual: Vec<i64> = vs.iter().map(|&x| x as i64).collect();
        return Err(KvError::shape(
            "values",
            &actual,
            format!("({}, {}, {}, head_dim) to match keys", ks[0], ks[1], ks[2]),
        ));
    }
    if ks[2] == 0 {
        return Err(KvError::empty(
            "keys",
            "cannot score a sequence of zero tokens",
        ));
    }
    let ctx = ScoreContext {
        layer_idx,
        n_kept: n_kept.unwrap_or(ks[2]),
    };
    let mut out = ndarray::Array3::<f32>::zeros((ks[0], ks[1], ks[2]));
    scorer.score_cpu(keys, values, &ctx, out.view_mut())?;
    Ok(out)
}

/// Builds a scorer from its name and keyword parameters as given by users.
///
/// ```
/// use kvpress_rs::policies::{scorer_from_name, ScorerParams};
/// let s = scorer_from_name("streaming_llm", &ScorerParams::default()).unwrap();
/// assert_eq!(s.name(), "streaming_llm");
/// ```
pub fn scorer_from_name(name: &str, params: &ScorerParams) -> Result<Box<dyn Scorer>> {
    let scorer: Box<dyn Scorer> = match name {
        "knorm" => Box::new(Knorm),
        "streaming_llm" | "streamingllm" | "streaming" => {
            Box::new(StreamingLlm::new(params.n_sink)?)
        }
        "random" => Box::new(Random::new(params.seed)),
        other => {
            return Err(KvError::invalid(
                "policy",
                format!(
                    "unknown policy {other:?}; expected one of {:?}",
                    POLICY_NAMES
                ),
            ))
        }
    };
    Ok(scorer)
}

/// The names accepted by [`scorer_from_name`].
pub const POLICY_NAMES: [&str; 3] = ["knorm", "streaming_llm", "random"];

/// Keyword parameters of the scorers (each scorer reads the ones it needs).
#[derive(Clone, Debug, PartialEq)]
pub struct ScorerParams {
    /// StreamingLLM: number of initial "attention sink" tokens always kept.
    pub n_sink: i64,
    /// Random: seed of the counter-based generator.
    pub seed: u64,
}

impl Default for ScorerParams {
    fn default() -> Self {
        ScorerParams { n_sink: 4, seed: 0 }
    }
}
