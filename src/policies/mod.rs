//! Token scoring policies. A scorer gives every cached token of a layer a score, higher =
//! keep; [`crate::Press`] turns scores into kept indices with a [`crate::Budget`].
//!
//! Scorers that read only keys and values ([`KeyValueScorer`]: Knorm, StreamingLLM,
//! Random, KeyDiff, LagKV) have two implementations of the same math: a fused CPU kernel
//! over `ndarray` views and a libtorch path for every other device; tests check that they
//! agree. Attention-based scorers (SnapKV, TOVA, ObservedAttention, ...) are matmul-bound:
//! the product runs as a libtorch GEMM in the dtype chain kvpress uses, so that the same
//! inputs keep the same tokens, and on the CPU what follows it is one fused pass
//! (`attention_weights.rs`, ExpectedAttention's quadratic forms). One file per scorer.

mod attention_weights;
mod cake;
mod expected_attention;
mod keydiff;
mod knorm;
mod lagkv;
mod leverage;
mod observed;
mod params;
mod random;
mod snapkv;
mod streaming;
mod tova;
mod triattention;

pub use cake::{cake_preference, Cake};
pub use expected_attention::ExpectedAttention;
pub use keydiff::KeyDiff;
pub use knorm::Knorm;
pub use lagkv::LagKv;
pub use observed::ObservedAttention;
pub use params::{ParamValue, Params};
pub use random::Random;
pub(crate) use snapkv::previous_ranking_order;
pub use snapkv::SnapKv;
pub use streaming::StreamingLlm;
pub use tova::Tova;
pub use triattention::{query_stats, QueryStats, TriAttention};

use crate::error::{KvError, Result};
use crate::registry::Stage;
use crate::rope::Rope;
use crate::tensor::{
    array_view_mut, check_kv_pair, device_name, float_view, kind_name, uses_cpu_kernels, FloatView4,
};
use ndarray::ArrayViewMut3;
use tch::{Device, Kind, Tensor};

/// What a scorer may know besides the keys and values of the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreContext {
    /// Index of the model layer being compressed.
    pub layer_idx: usize,
    /// Number of tokens that will be kept (positional policies need it).
    pub n_kept: usize,
    /// The position of the next token (tokens seen) when the stored tokens are not
    /// positions 0..T — a compression during generation, after earlier evictions; `None`
    /// in a prefill, where it is the number of stored tokens. Scorers that work in pre-RoPE
    /// space invert the queries at the positions just before it.
    pub next_position: Option<usize>,
}

impl ScoreContext {
    /// The context of a prefill compression (stored tokens = positions 0..T).
    pub fn prefill(layer_idx: usize, n_kept: usize) -> Self {
        ScoreContext {
            layer_idx,
            n_kept,
            next_position: None,
        }
    }
}

/// Which of the prompt's queries a scorer needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryWindow {
    None,
    /// The queries of the last n tokens.
    Last(usize),
    /// The queries of every token.
    All,
}

/// Everything a scorer sees for one layer.
#[derive(Debug)]
pub struct ScoreInput<'a> {
    /// Post-RoPE keys (batch, kv_heads, tokens, head_dim), as cached.
    pub keys: &'a Tensor,
    /// Values (batch, kv_heads, tokens, head_dim).
    pub values: &'a Tensor,
    /// Post-RoPE queries (batch, q_heads, q, head_dim) of the LAST q tokens, q as the
    /// scorer's [`QueryWindow`] asks; `None` for scorers that need none.
    pub queries: Option<&'a Tensor>,
    /// The model's RoPE, for scorers that work in pre-RoPE space or over future distances.
    pub rope: Option<&'a Rope>,
    /// Pre-RoPE query statistics gathered elsewhere (a calibration file, or earlier
    /// forwards), for scorers that can use them instead of `queries` (TriAttention).
    pub query_stats: Option<&'a QueryStats>,
    /// During generation, for scorers that [remember](Scorer::remembers_scores): the
    /// scores (batch, kv_heads, m) the first m stored tokens had when the previous
    /// compression kept them; −inf for tokens it kept without ranking them.
    pub previous_scores: Option<&'a Tensor>,
    pub ctx: ScoreContext,
}

impl ScoreInput<'_> {
    /// The queries, or an error naming the policy that needs them.
    pub fn require_queries(&self, policy: &str) -> Result<&Tensor> {
        self.queries.ok_or_else(|| {
            KvError::invalid(
                "queries",
                format!("policy {policy:?} scores with the prompt's queries, but none were given (the model's attention must go through kvpress_rs)"),
            )
        })
    }

    /// The RoPE, or an error naming the policy that needs it.
    pub fn require_rope(&self, policy: &str) -> Result<&Rope> {
        self.rope.ok_or_else(|| {
            KvError::invalid(
                "rope",
                format!(
                    "policy {policy:?} needs the model's RoPE (build the cache from the model)"
                ),
            )
        })
    }
}

/// A per-token scoring rule. Scores have shape (batch, kv_heads, tokens), higher = keep,
/// in any float dtype.
pub trait Scorer: Send + Sync + std::fmt::Debug {
    /// The policy's name as users spell it (`"knorm"`).
    fn name(&self) -> &'static str;

    /// The prompt queries this scorer needs.
    fn query_window(&self) -> QueryWindow {
        QueryWindow::None
    }

    /// Tokens at the end of the prompt this scorer always keeps (SnapKV's window); layer
    /// budgets never go below it.
    fn protected_window(&self) -> usize {
        0
    }

    /// Whether a decoding-time compression should hand this scorer the scores the kept
    /// tokens had at the previous compression ([`ScoreInput::previous_scores`]).
    fn remembers_scores(&self) -> bool {
        false
    }

    /// Whether the scorer needs the model's RoPE.
    fn needs_rope(&self) -> bool {
        false
    }

    /// Whether the scorer can score from pre-RoPE query statistics instead of queries
    /// ([`ScoreInput::query_stats`]): decoding-time compression then keeps statistics of
    /// every query the layer has seen.
    fn uses_query_stats(&self) -> bool {
        false
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor>;
}

/// A scorer that reads only keys and values, with a fused CPU kernel and a libtorch path.
pub trait KeyValueScorer: Send + Sync + std::fmt::Debug {
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

impl<S: KeyValueScorer> Scorer for S {
    fn name(&self) -> &'static str {
        KeyValueScorer::name(self)
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor> {
        let shape = check_kv_pair(input.keys, input.values)?.0;
        if !uses_cpu_kernels(input.keys) {
            return self.score_libtorch(input.keys, input.values, &input.ctx);
        }
        let mut out = Tensor::f_empty(
            [shape.batch as i64, shape.heads as i64, shape.tokens as i64],
            (Kind::Float, Device::Cpu),
        )?;
        let k = float_view(input.keys, "keys")?;
        let v = float_view(input.values, "values")?;
        self.score_cpu(&k, &v, &input.ctx, array_view_mut(&mut out, "scores")?)?;
        Ok(out)
    }
}

/// Scores one layer: checks the inputs, slices the queries the scorer needs, and runs it.
/// `queries` (batch, q_heads, q, head_dim) are the post-RoPE queries of the last q prompt
/// tokens (all of them in a prefill).
pub fn score_layer(
    scorer: &dyn Scorer,
    keys: &Tensor,
    values: &Tensor,
    queries: Option<&Tensor>,
    rope: Option<&Rope>,
    ctx: &ScoreContext,
) -> Result<Tensor> {
    let sources = ScoreSources {
        queries,
        ..ScoreSources::default()
    };
    score_layer_with(scorer, keys, values, sources, rope, ctx)
}

/// What a caller has for a scorer besides keys and values; [`score_layer_with`] hands each
/// scorer the part it uses (see the fields of [`ScoreInput`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ScoreSources<'a> {
    /// Post-RoPE queries of the last q stored tokens (q ≥ the scorer's window).
    pub queries: Option<&'a Tensor>,
    pub query_stats: Option<&'a QueryStats>,
    pub previous_scores: Option<&'a Tensor>,
}

/// [`score_layer`] with everything a decoding-time compression may have
/// ([`ScoreSources`]).
pub fn score_layer_with(
    scorer: &dyn Scorer,
    keys: &Tensor,
    values: &Tensor,
    sources: ScoreSources<'_>,
    rope: Option<&Rope>,
    ctx: &ScoreContext,
) -> Result<Tensor> {
    let (shape, _) = check_kv_pair(keys, values)?;
    if shape.tokens == 0 {
        return Err(KvError::empty(
            "keys",
            "cannot score a sequence of zero tokens",
        ));
    }
    let window = match (scorer.query_window(), sources.queries) {
        (QueryWindow::None, _) | (_, None) => None,
        (need, Some(q)) => Some(slice_queries(q, need, &shape)?),
    };
    let previous_scores = match sources.previous_scores {
        Some(p) if scorer.remembers_scores() => Some(check_previous_scores(p, keys, &shape)?),
        _ => None,
    };
    scorer.score(&ScoreInput {
        keys,
        values,
        queries: window.as_ref(),
        rope,
        query_stats: sources.query_stats,
        previous_scores,
        ctx: *ctx,
    })
}

/// Previous scores must be floats (batch, kv_heads, m ≤ stored tokens) on the keys' device.
fn check_previous_scores<'a>(
    p: &'a Tensor,
    keys: &Tensor,
    shape: &crate::tensor::KvShape,
) -> Result<&'a Tensor> {
    let size = p.size();
    if size.len() != 3
        || size[0] != shape.batch as i64
        || size[1] != shape.heads as i64
        || size[2] > shape.tokens as i64
    {
        return Err(KvError::shape(
            "previous_scores",
            &size,
            format!(
                "({}, {}, at most the {} stored tokens)",
                shape.batch, shape.heads, shape.tokens
            ),
        ));
    }
    if !p.is_floating_point() {
        return Err(KvError::dtype(
            "previous_scores",
            kind_name(p.kind()),
            "a floating-point dtype",
        ));
    }
    if p.device() != keys.device() {
        return Err(KvError::device(
            "previous_scores",
            device_name(p.device()),
            device_name(keys.device()),
        ));
    }
    Ok(p)
}

fn slice_queries(q: &Tensor, need: QueryWindow, shape: &crate::tensor::KvShape) -> Result<Tensor> {
    let size = q.size();
    if size.len() != 4
        || size[0] != shape.batch as i64
        || size[1] % shape.heads as i64 != 0
        || size[3] != shape.head_dim as i64
    {
        return Err(KvError::shape(
            "queries",
            &size,
            format!(
                "({}, a multiple of {} heads, q, {})",
                shape.batch, shape.heads, shape.head_dim
            ),
        ));
    }
    let available = size[2];
    match need {
        QueryWindow::Last(n) if (n as i64) <= available => {
            Ok(q.f_narrow(2, available - n as i64, n as i64)?)
        }
        QueryWindow::Last(n) => Err(KvError::invalid(
            "window_size",
            format!("the scorer needs the last {n} queries but only {available} are available"),
        )),
        _ => Ok(q.shallow_clone()),
    }
}

/// Scores keys and values with a scorer that needs no queries (a convenience for
/// key-value scorers). Returns scores (batch, kv_heads, tokens) on the tensors' device.
pub fn score(
    scorer: &dyn Scorer,
    keys: &Tensor,
    values: &Tensor,
    ctx: &ScoreContext,
) -> Result<Tensor> {
    score_layer(scorer, keys, values, None, None, ctx)
}

/// Every scorer of the registry (`crate::registry`), in the order users see them.
pub static SCORERS: &[Stage] = &[
    knorm::STAGE,
    streaming::STAGE,
    random::STAGE,
    snapkv::STAGE,
    tova::STAGE,
    observed::STAGE,
    keydiff::STAGE,
    lagkv::STAGE,
    expected_attention::STAGE,
    triattention::STAGE,
    cake::STAGE,
    leverage::STAGE,
];

/// Builds a scorer from its name (or alias) and keyword parameters as given by users,
/// through the registry: an unknown name lists every scorer, a parameter the scorer does
/// not declare lists the ones it does.
///
/// ```
/// use kvpress_rs::policies::{scorer_from_name, Params};
/// let s = scorer_from_name("snapkv", Params::new()).unwrap();
/// assert_eq!((s.name(), s.protected_window()), ("snapkv", 64));
/// ```
pub fn scorer_from_name(name: &str, params: Params) -> Result<Box<dyn Scorer>> {
    crate::registry::build_scorer(name, params)
}

/// The names of every scorer ([`scorer_from_name`] also accepts their aliases).
pub fn policy_names() -> Vec<&'static str> {
    SCORERS.iter().map(|s| s.name).collect()
}
