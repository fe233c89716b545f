//! A press decides which tokens of a layer to keep. It is a pipeline of stages, each a
//! trait with one job:
//!
//! ```text
//! scorer (policies/) → score transforms → layer budget → head budget → selector → eviction → the store
//! ```
//!
//! - a [`Scorer`] gives every token of every (batch, KV head) row a score, higher = keep;
//! - [`ScoreTransform`]s change the scores (averaging over heads; protected ends);
//! - a [`Budget`] says how many tokens survive on average, a [`LayerBudget`] how many in
//!   this layer (uniform, PyramidKV, CAKE, explicit), a [`HeadBudget`] how the layer's
//!   tokens are split among its heads (uniform, AdaKV);
//! - a [`Selector`] picks the tokens of a row (top-k);
//! - an [`Eviction`] keeps them in the [`Target`] (a [`LayerStore`] or a quantized store)
//!   and drops the rest or sets them aside (low bits).
//!
//! One entry point, [`Press::compress`], takes a [`Plan`]: which step (a prompt's
//! compression, scoring only and selecting later with the counts a cross-layer budget
//! allocated, or a decoding-time compression to a given count), the layer, and what the
//! scorer may read (queries, query statistics, the previous compression's scores). Every
//! stage is registered by name in [`crate::registry`].
//!
//! Padded batches: a plan names, per batch row, the hidden slots at the front of every
//! head of that row (left padding, and slots that pad rows to a common length). Each row is
//! then scored alone over its visible tokens, as if it had been run by itself, and keeps
//! its own count; rows that keep fewer tokens are padded with hidden slots — the row's
//! pads, or filler slots (index −1) where the target takes them.

mod eviction;
mod head_budget;
mod layer_budget;
mod selector;
mod transform;

pub use eviction::{Drop, Eviction, SetAside};
pub use head_budget::{AdaKv, HeadBudget, UniformHeads};
pub use layer_budget::{Cake, Explicit, LayerBudget, Pyramid, Uniform};
pub use selector::{
    chunk_selection, entropy_chunk_selection, Chunks, EntropyChunks, Selector, TopK,
};
pub use transform::{HeadMean, ProtectEnds, ScoreTransform};

use crate::budget::Budget;
use crate::error::{KvError, Result};
use crate::policies::{
    previous_ranking_order, score_layer_with, QueryStats, QueryWindow, ScoreContext, ScoreSources,
    Scorer,
};
use crate::quant::QuantizedStore;
use crate::registry::Stage;
use crate::rope::Rope;
use crate::store::LayerStore;
use crate::tensor::{check_finite, in_pool};
use tch::{Device, Kind, Tensor};

/// The registry entries of every stage kind but scorers (those are in `policies`).
pub fn stages() -> impl Iterator<Item = &'static Stage> {
    transform::STAGES
        .iter()
        .chain(layer_budget::STAGES.iter())
        .chain(head_budget::STAGES.iter())
        .chain(selector::STAGES.iter())
        .chain(eviction::STAGES.iter())
}

/// The tokens a press keeps in one layer.
#[derive(Debug)]
pub enum Kept {
    /// int64 (batch, kv_heads, n) ascending indices, every head the same count; −1 marks a
    /// filler slot (a hidden slot that pads a row of a padded batch), always first.
    Uniform(Tensor),
    /// int64 (n_r,) ascending indices per row r = b * kv_heads + h (head budgets).
    Rows(Vec<Tensor>),
}

/// What a press compresses: a store that can show its tokens for scoring and keep a subset.
pub trait Target {
    /// Tokens stored per (batch, head) row (uniform rows).
    fn stored(&self) -> usize;

    /// KV heads per batch row.
    fn heads(&self) -> usize;

    /// Where the stored tokens live.
    fn device(&self) -> Device;

    /// Keys and values (batch, kv_heads, stored, head_dim) to score: views of the stored
    /// tokens, or dequantized copies.
    fn scoring_view(&self) -> Result<(Tensor, Tensor)>;

    /// Stored tokens at the start and at the end of every row that are never evicted (a
    /// quantized store's full-precision sinks and residual window), and why, for errors.
    fn fixed_ends(&self) -> (usize, usize, &'static str) {
        (0, 0, "")
    }

    /// Whether [`Kept::Uniform`] may hold filler slots (−1).
    fn takes_fillers(&self) -> bool;

    /// Keeps only the tokens of `kept`.
    fn retain(&mut self, kept: &Kept) -> Result<()>;

    /// [`retain`](Self::retain), returning the evicted tokens' keys and values instead of
    /// dropping them.
    fn retain_split(&mut self, kept: &Kept) -> Result<(Tensor, Tensor)>;
}

impl Target for LayerStore {
    fn stored(&self) -> usize {
        self.len()
    }

    fn heads(&self) -> usize {
        self.batch_heads().map_or(0, |(_, h)| h)
    }

    fn device(&self) -> Device {
        self.layout_device().unwrap_or(Device::Cpu)
    }

    fn scoring_view(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.keys_view()?, self.values_view()?))
    }

    fn takes_fillers(&self) -> bool {
        true
    }

    fn retain(&mut self, kept: &Kept) -> Result<()> {
        match kept {
            Kept::Uniform(indices) => LayerStore::retain(self, indices),
            Kept::Rows(rows) => self.retain_rows(rows),
        }
    }

    fn retain_split(&mut self, kept: &Kept) -> Result<(Tensor, Tensor)> {
        match kept {
            Kept::Uniform(indices) => LayerStore::retain_split(self, indices),
            Kept::Rows(_) => Err(KvError::Unsupported(
                "keeping evicted tokens at low precision (low_bits) with a per-head budget \
                 (head_budget='adakv') is not supported"
                    .into(),
            )),
        }
    }
}

impl Target for QuantizedStore {
    fn stored(&self) -> usize {
        self.seen()
    }

    fn heads(&self) -> usize {
        self.shape().map_or(0, |s| s.heads)
    }

    fn device(&self) -> Device {
        self.shape().map_or(Device::Cpu, |s| s.device)
    }

    /// Every stored token dequantized (scoring reads every token anyway; never stored).
    fn scoring_view(&self) -> Result<(Tensor, Tensor)> {
        self.dequantize()
    }

    fn fixed_ends(&self) -> (usize, usize, &'static str) {
        (
            self.sink_len(),
            self.residual_len(),
            " (the protected prompt and sink tokens, and the last max(decoding_interval, tokens \
             in the full-precision residual window)); raise decoding_budget above \
             max(decoding_interval, residual_length or group_size) plus the protected prompt",
        )
    }

    fn takes_fillers(&self) -> bool {
        false
    }

    fn retain(&mut self, kept: &Kept) -> Result<()> {
        match kept {
            Kept::Uniform(indices) => QuantizedStore::retain(self, indices),
            Kept::Rows(_) => Err(KvError::Unsupported(
                "a quantized cache keeps the same count per head: head_budget='adakv' is not \
                 supported with quantization"
                    .into(),
            )),
        }
    }

    fn retain_split(&mut self, _: &Kept) -> Result<(Tensor, Tensor)> {
        Err(KvError::Unsupported(
            "evicted tokens of a quantized store cannot be set aside at lower precision \
             (that would re-quantize them)"
                .into(),
        ))
    }
}

/// A decoding-time compression of one row (or of every row alike).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decoding {
    /// Tokens kept (the row's visible tokens, in a padded batch).
    pub n_kept: usize,
    /// Tokens seen (the row's visible tokens): the position of the next token.
    pub next_position: usize,
    /// The first stored (visible) tokens never evicted (a protected prompt).
    pub protect_first: usize,
    /// The last stored tokens never evicted (those since the previous compression).
    pub protect_last: usize,
}

/// Which step of a compression a [`Plan`] asks for.
#[derive(Debug)]
pub enum Step {
    /// A prompt's compression: score, then keep the layer's budget.
    Prefill,
    /// Score only, for a layer budget that needs every layer first: the outcome carries
    /// the scores and the layer's preference ([`LayerScores`]).
    Score,
    /// Keep the `n_kept` best tokens of earlier `scores` (from [`Step::Score`]); `n_kept`
    /// per batch row, or one count for every row.
    Select { scores: Tensor, n_kept: Vec<usize> },
    /// A decoding-time compression of every row alike.
    Decoding(Decoding),
    /// A decoding-time compression per batch row (a padded batch); `None`: the row keeps
    /// every visible token.
    DecodingRows(Vec<Option<Decoding>>),
}

/// One call of [`Press::compress`]: the step, the layer, and what the scorer may read.
/// Owns shallow copies of its tensors, so that it can move to the compute pool.
///
/// ```
/// use kvpress_rs::{policies::Knorm, press::Plan, Budget, LayerStore, Press};
/// let press = Press::new(Box::new(Knorm), Budget::ratio(0.5).unwrap());
/// let keys = tch::Tensor::randn([1, 2, 8, 4], (tch::Kind::Float, tch::Device::Cpu));
/// let mut store = LayerStore::new();
/// store.append(&keys, &keys).unwrap();
/// let done = press.compress(&mut store, Plan::prefill(0)).unwrap();
/// assert!(done.evicted && (store.len(), store.seen()) == (4, 8));
/// ```
#[derive(Debug)]
pub struct Plan {
    pub layer_idx: usize,
    pub step: Step,
    /// Post-RoPE queries (batch, q_heads, q, head_dim) of the last q stored tokens.
    pub queries: Option<Tensor>,
    /// Pre-RoPE query statistics from elsewhere (TriAttention).
    pub query_stats: Option<QueryStats>,
    /// What the previous decoding-time compression returned as [`Outcome::kept_scores`],
    /// aligned with the first stored tokens.
    pub previous_scores: Option<Tensor>,
    /// Per batch row, hidden slots at the front of every head of that row (padding);
    /// empty: none.
    pub hidden: Vec<usize>,
}

impl Plan {
    fn new(layer_idx: usize, step: Step) -> Self {
        Plan {
            layer_idx,
            step,
            queries: None,
            query_stats: None,
            previous_scores: None,
            hidden: vec![],
        }
    }

    pub fn prefill(layer_idx: usize) -> Self {
        Self::new(layer_idx, Step::Prefill)
    }

    pub fn score(layer_idx: usize) -> Self {
        Self::new(layer_idx, Step::Score)
    }

    pub fn select(layer_idx: usize, scores: &Tensor, n_kept: Vec<usize>) -> Self {
        Self::new(
            layer_idx,
            Step::Select {
                scores: scores.shallow_clone(),
                n_kept,
            },
        )
    }

    pub fn decoding(layer_idx: usize, step: Decoding) -> Self {
        Self::new(layer_idx, Step::Decoding(step))
    }

    pub fn decoding_rows(layer_idx: usize, rows: Vec<Option<Decoding>>) -> Self {
        Self::new(layer_idx, Step::DecodingRows(rows))
    }

    pub fn with_queries(mut self, queries: Option<&Tensor>) -> Self {
        self.queries = queries.map(Tensor::shallow_clone);
        self
    }

    pub fn with_query_stats(mut self, stats: Option<&QueryStats>) -> Self {
        self.query_stats = stats.map(QueryStats::shallow);
        self
    }

    pub fn with_previous_scores(mut self, scores: Option<&Tensor>) -> Self {
        self.previous_scores = scores.map(Tensor::shallow_clone);
        self
    }

    pub fn with_hidden(mut self, hidden: Vec<usize>) -> Self {
        self.hidden = hidden;
        self
    }

    fn padded(&self) -> bool {
        self.hidden.iter().any(|&h| h > 0) || matches!(self.step, Step::DecodingRows(_))
    }

    fn hidden_of(&self, b: usize) -> usize {
        self.hidden.get(b).copied().unwrap_or(0)
    }
}

/// A layer's scores, kept until every layer's budget is known (CAKE).
#[derive(Debug)]
pub struct LayerScores {
    /// Scores (batch, kv_heads, tokens), higher = keep; −inf at hidden slots.
    pub scores: Tensor,
    /// The layer's preference for a cross-layer budget (0 for others): one for the whole
    /// batch, or one per batch row in a padded batch.
    pub preferences: Vec<f64>,
}

/// What one [`Press::compress`] did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Whether tokens left the target (false: it is untouched).
    pub evicted: bool,
    /// The evicted tokens' keys and values, when the eviction rule sets them aside.
    pub set_aside: Option<(Tensor, Tensor)>,
    /// For a scorer that [remembers](Scorer::remembers_scores): the scores of the kept
    /// tokens (float (batch, kv_heads, n_kept), in storage order; −inf for the ones the
    /// scorer kept without ranking them and for hidden slots), to pass as the next
    /// decoding step's `previous_scores`.
    pub kept_scores: Option<Tensor>,
    /// [`Step::Score`]'s result.
    pub scored: Option<LayerScores>,
    /// The new hidden slots per batch row, when the plan had padding.
    pub hidden: Option<Vec<usize>>,
}

/// A press: a scorer and the stages after it (see the module documentation).
///
/// ```
/// use kvpress_rs::{Budget, LayerStore, Press};
/// use kvpress_rs::policies::Knorm;
/// use kvpress_rs::press::Plan;
/// use tch::{Kind, Tensor};
///
/// let press = Press::new(Box::new(Knorm), Budget::ratio(0.5).unwrap());
/// let keys = Tensor::randn([1, 2, 8, 4], (Kind::Float, tch::Device::Cpu));
/// let mut store = LayerStore::new();
/// store.append(&keys, &keys).unwrap();
/// press.compress(&mut store, Plan::prefill(0)).unwrap();
/// assert_eq!((store.len(), store.seen()), (4, 8));
/// ```
#[derive(Debug)]
pub struct Press {
    scorer: Box<dyn Scorer>,
    transforms: Vec<Box<dyn ScoreTransform>>,
    budget: Budget,
    layer_budget: Box<dyn LayerBudget>,
    head_budget: Box<dyn HeadBudget>,
    selector: Box<dyn Selector>,
    eviction: Box<dyn Eviction>,
    n_layers: usize,
    rope: Option<Rope>,
}

impl Press {
    /// A press with uniform layer and head budgets, top-k selection, dropped evictions.
    pub fn new(scorer: Box<dyn Scorer>, budget: Budget) -> Self {
        Press {
            scorer,
            transforms: vec![],
            budget,
            layer_budget: Box::new(Uniform),
            head_budget: Box::new(UniformHeads),
            selector: Box::new(TopK),
            eviction: Box::new(Drop),
            n_layers: 1,
            rope: None,
        }
    }

    /// A press from its stages (as [`crate::registry::build_press`] makes them); refuses
    /// combinations that cannot work together.
    #[allow(clippy::too_many_arguments)]
    pub fn from_stages(
        scorer: Box<dyn Scorer>,
        transforms: Vec<Box<dyn ScoreTransform>>,
        budget: Budget,
        layer_budget: Box<dyn LayerBudget>,
        head_budget: Box<dyn HeadBudget>,
        selector: Box<dyn Selector>,
        eviction: Box<dyn Eviction>,
        n_layers: usize,
    ) -> Result<Self> {
        if !head_budget.is_uniform() && eviction.name() != Drop.name() {
            return Err(KvError::Unsupported(format!(
                "eviction {:?} keeps evicted tokens in uniform rows; it does not combine with \
                 head_budget={:?}",
                eviction.name(),
                head_budget.name()
            )));
        }
        if !head_budget.is_uniform() && selector.name() != TopK.name() {
            return Err(KvError::Unsupported(format!(
                "head_budget={:?} chooses tokens by score across heads; it does not combine with \
                 selector {:?}",
                head_budget.name(),
                selector.name()
            )));
        }
        Ok(Press {
            scorer,
            transforms,
            budget,
            layer_budget,
            head_budget,
            selector,
            eviction,
            n_layers: n_layers.max(1),
            rope: None,
        })
    }

    /// The same press, with the model's RoPE (for scorers that need it).
    pub fn with_rope(mut self, rope: Rope) -> Self {
        self.rope = Some(rope);
        self
    }

    pub fn scorer(&self) -> &dyn Scorer {
        self.scorer.as_ref()
    }

    pub fn transforms(&self) -> impl Iterator<Item = &dyn ScoreTransform> {
        self.transforms.iter().map(|t| t.as_ref())
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    pub fn layer_budget(&self) -> &dyn LayerBudget {
        self.layer_budget.as_ref()
    }

    pub fn head_budget(&self) -> &dyn HeadBudget {
        self.head_budget.as_ref()
    }

    pub fn selector(&self) -> &dyn Selector {
        self.selector.as_ref()
    }

    pub fn eviction(&self) -> &dyn Eviction {
        self.eviction.as_ref()
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    pub fn rope(&self) -> Option<&Rope> {
        self.rope.as_ref()
    }

    /// Whether this press can never evict (ratio 0).
    pub fn keeps_everything(&self) -> bool {
        self.layer_budget.keeps_everything(&self.budget)
    }

    /// Whether the eviction rule sets evicted tokens aside (low bits) instead of dropping them.
    pub fn sets_aside(&self) -> bool {
        self.eviction.name() != Drop.name()
    }

    /// The prompt queries the scorer and the layer budget need.
    pub fn query_window(&self) -> QueryWindow {
        match (self.scorer.query_window(), self.layer_budget.query_window()) {
            (QueryWindow::All, _) => QueryWindow::All,
            (QueryWindow::Last(n), Some(w)) => QueryWindow::Last(n.max(w)),
            (QueryWindow::None, Some(w)) => QueryWindow::Last(w),
            (need, None) => need,
        }
    }

    /// Whether the layer budget needs every layer's scores first (CAKE): then compression is
    /// [`Step::Score`] per layer, [`allocate`](Self::allocate) once, [`Step::Select`] per layer.
    pub fn needs_all_layers(&self) -> bool {
        self.layer_budget.needs_all_layers()
    }

    /// Tokens kept (on average per KV head) by layer `layer_idx` out of `n_tokens`.
    pub fn n_kept(&self, n_tokens: usize, layer_idx: usize) -> Result<usize> {
        self.layer_budget
            .n_kept(&self.budget, n_tokens, layer_idx, self.n_layers)
    }

    /// Per-layer token counts from every layer's token count and preference (CAKE).
    pub fn allocate(&self, n_tokens: &[usize], preferences: &[f64]) -> Result<Vec<usize>> {
        let floor = self
            .scorer
            .protected_window()
            .max(self.layer_budget.query_window().unwrap_or(1));
        self.layer_budget
            .allocate(&self.budget, n_tokens, preferences, floor)
    }

    fn check_rope(&self) -> Result<()> {
        if self.scorer.needs_rope() && self.rope.is_none() {
            return Err(KvError::invalid(
                "rope",
                format!(
                    "policy {:?} needs the model's RoPE: build the press from the model",
                    self.scorer.name()
                ),
            ));
        }
        Ok(())
    }

    /// The scorer's scores of `keys`/`values`, through the transforms.
    fn scores(
        &self,
        keys: &Tensor,
        values: &Tensor,
        sources: ScoreSources<'_>,
        ctx: &ScoreContext,
    ) -> Result<Tensor> {
        self.check_rope()?;
        let mut scores = score_layer_with(
            self.scorer.as_ref(),
            keys,
            values,
            sources,
            self.rope.as_ref(),
            ctx,
        )?;
        for t in &self.transforms {
            scores = t.apply(&scores)?;
        }
        Ok(scores)
    }

    /// The tokens kept out of `keys`/`values` (batch, kv_heads, tokens, head_dim) of layer
    /// `layer_idx` by a prompt's compression (no store involved: `ops.kept_indices`).
    pub fn kept(
        &self,
        keys: &Tensor,
        values: &Tensor,
        queries: Option<&Tensor>,
        layer_idx: usize,
    ) -> Result<Kept> {
        let n_tokens = crate::tensor::check_kv_pair(keys, values)?.0.tokens;
        let n_kept = self.n_kept(n_tokens, layer_idx)?;
        check_finite(keys, "keys")?;
        check_finite(values, "values")?;
        let sources = ScoreSources {
            queries,
            ..ScoreSources::default()
        };
        let scores = self.scores(
            keys,
            values,
            sources,
            &ScoreContext::prefill(layer_idx, n_kept),
        )?;
        self.head_budget
            .split(&scores, n_kept, self.selector.as_ref())
    }

    /// Indices (int64 (batch, kv_heads, n_kept), ascending) kept by a uniform-head press
    /// from a scorer that needs no queries.
    pub fn kept_indices(&self, keys: &Tensor, values: &Tensor, layer_idx: usize) -> Result<Tensor> {
        match self.kept(keys, values, None, layer_idx)? {
            Kept::Uniform(t) => Ok(t),
            Kept::Rows(_) => Err(KvError::State(
                "this press splits its budget per head: use Press::kept".into(),
            )),
        }
    }

    /// The one entry point: carries out `plan` on `target` (see [`Step`]). A step that
    /// would keep every token leaves the target untouched (no copy).
    pub fn compress(&self, target: &mut (dyn Target + Send), plan: Plan) -> Result<Outcome> {
        in_pool(move || {
            if plan.padded() {
                self.compress_rows(target, &plan)
            } else {
                self.compress_batch(target, &plan)
            }
        })
    }

    /// Every row alike, in one call of each stage.
    fn compress_batch(&self, target: &mut (dyn Target + Send), plan: &Plan) -> Result<Outcome> {
        let layer = plan.layer_idx;
        let (keys, values) = target.scoring_view()?;
        let stored = target.stored();
        let sources = ScoreSources {
            queries: plan.queries.as_ref(),
            query_stats: plan.query_stats.as_ref(),
            previous_scores: plan.previous_scores.as_ref(),
        };
        match &plan.step {
            Step::Prefill => {
                let n_kept = self.n_kept(stored, layer)?;
                check_finite(&keys, "keys")?;
                check_finite(&values, "values")?;
                if n_kept >= stored {
                    return Ok(Outcome::default());
                }
                let scores = self.scores(
                    &keys,
                    &values,
                    sources,
                    &ScoreContext::prefill(layer, n_kept),
                )?;
                drop((keys, values));
                let kept = self
                    .head_budget
                    .split(&scores, n_kept, self.selector.as_ref())?;
                self.evict(target, kept)
            }
            Step::Score => {
                let n_kept = self.n_kept(stored, layer)?;
                check_finite(&keys, "keys")?;
                check_finite(&values, "values")?;
                let scores = self.scores(
                    &keys,
                    &values,
                    sources,
                    &ScoreContext::prefill(layer, n_kept),
                )?;
                let preference = self.layer_budget.preference(plan.queries.as_ref(), &keys)?;
                Ok(Outcome {
                    scored: Some(LayerScores {
                        scores,
                        preferences: vec![preference],
                    }),
                    ..Outcome::default()
                })
            }
            Step::Select { scores, n_kept } => {
                let n_kept = one_count(n_kept)?;
                if n_kept >= stored {
                    return Ok(Outcome::default());
                }
                drop((keys, values));
                let kept = self
                    .head_budget
                    .split(scores, n_kept, self.selector.as_ref())?;
                self.evict(target, kept)
            }
            Step::Decoding(step) => {
                let (sinks, residual, why) = target.fixed_ends();
                let protect = (
                    step.protect_first.max(sinks),
                    step.protect_last.max(residual),
                );
                check_decoding_budget(step.n_kept, protect, stored, why)?;
                if step.n_kept >= stored {
                    return Ok(Outcome::default());
                }
                let ctx = ScoreContext {
                    layer_idx: layer,
                    n_kept: step.n_kept,
                    next_position: Some(step.next_position),
                };
                let scores = self.scores(&keys, &values, sources, &ctx)?;
                let (kept, kept_scores) =
                    self.decoding_select(&scores, sources.previous_scores, step, protect)?;
                drop((keys, values));
                let mut outcome = self.evict(target, kept)?;
                outcome.kept_scores = kept_scores;
                Ok(outcome)
            }
            Step::DecodingRows(_) => Err(KvError::State(
                "a per-row decoding step is compressed row by row".into(),
            )),
        }
    }

    fn evict(&self, target: &mut (dyn Target + Send), kept: Kept) -> Result<Outcome> {
        let set_aside = self.eviction.evict(target, &kept)?;
        Ok(Outcome {
            evicted: true,
            set_aside,
            ..Outcome::default()
        })
    }

    /// A padded batch: every row scored and selected alone over its visible tokens (the
    /// tokens after its hidden slots), as if it had been run by itself.
    fn compress_rows(&self, target: &mut (dyn Target + Send), plan: &Plan) -> Result<Outcome> {
        let stored = target.stored();
        let (fixed, fillers) = (target.fixed_ends(), target.takes_fillers());
        let (rows, counts, visible, remembered) = {
            let (keys, values) = target.scoring_view()?;
            let inputs = RowInputs {
                plan,
                keys: &keys,
                values: &values,
                stored,
                visible: (0..keys.size()[0] as usize)
                    .map(|b| stored.saturating_sub(plan.hidden_of(b)))
                    .collect(),
            };
            match &plan.step {
                Step::Score => return self.score_rows(&inputs),
                Step::Prefill | Step::Select { .. } => {
                    check_finite(&keys, "keys")?;
                    check_finite(&values, "values")?;
                    match self.select_rows(&inputs, fillers)? {
                        None => return Ok(Outcome::default()),
                        Some((rows, counts)) => (rows, counts, inputs.visible, None),
                    }
                }
                Step::Decoding(step) => {
                    let steps = vec![Some(*step); inputs.visible.len()];
                    match self.decoding_rows(&inputs, &steps, fixed, fillers)? {
                        None => return Ok(Outcome::default()),
                        Some((rows, counts, remembered)) => {
                            (rows, counts, inputs.visible, remembered)
                        }
                    }
                }
                Step::DecodingRows(steps) => match self
                    .decoding_rows(&inputs, steps, fixed, fillers)?
                {
                    None => return Ok(Outcome::default()),
                    Some((rows, counts, remembered)) => (rows, counts, inputs.visible, remembered),
                },
            }
        };
        let (heads, device) = (target.heads() as i64, target.device());
        let kept_scores = remembered
            .map(|r| join_remembered(r, &counts, &visible, heads, device))
            .transpose()?;
        let (kept, hidden) = join_rows(rows, &counts, plan, stored, &visible, heads)?;
        let mut outcome = self.evict(target, kept)?;
        outcome.hidden = Some(hidden);
        outcome.kept_scores = kept_scores;
        Ok(outcome)
    }

    /// [`Step::Score`] per row: scores (−inf at hidden slots) and a preference per row.
    fn score_rows(&self, inputs: &RowInputs<'_>) -> Result<Outcome> {
        check_finite(inputs.keys, "keys")?;
        check_finite(inputs.values, "values")?;
        let (batch, heads) = (inputs.visible.len(), inputs.keys.size()[1]);
        let layer = inputs.plan.layer_idx;
        let mut scores = Vec::with_capacity(batch);
        let mut preferences = Vec::with_capacity(batch);
        for b in 0..batch {
            let h = inputs.plan.hidden_of(b) as i64;
            let mut parts = vec![Tensor::f_full(
                [1, heads, h],
                f64::NEG_INFINITY,
                (Kind::Float, inputs.keys.device()),
            )?];
            if inputs.visible[b] > 0 {
                let ctx = ScoreContext::prefill(layer, self.n_kept(inputs.visible[b], layer)?);
                parts.push(inputs.score(self, b, &ctx)?.f_to_kind(Kind::Float)?);
                let q = inputs.queries(b)?;
                preferences.push(
                    self.layer_budget
                        .preference(q.as_ref(), &inputs.row(inputs.keys, b)?)?,
                );
            } else {
                preferences.push(0.0);
            }
            scores.push(Tensor::f_cat(&parts, 2)?);
        }
        Ok(Outcome {
            scored: Some(LayerScores {
                scores: Tensor::f_cat(&scores, 0)?,
                preferences,
            }),
            ..Outcome::default()
        })
    }

    /// [`Step::Prefill`] or [`Step::Select`] per row: each row's count and selection;
    /// `None` when no row evicts a visible token.
    fn select_rows(
        &self,
        inputs: &RowInputs<'_>,
        fillers: bool,
    ) -> Result<Option<(Vec<RowKept>, Vec<usize>)>> {
        let layer = inputs.plan.layer_idx;
        let visible = &inputs.visible;
        let counts: Vec<usize> = match &inputs.plan.step {
            Step::Select { n_kept, .. } => (0..visible.len())
                .map(|b| {
                    n_kept
                        .get(b)
                        .or(n_kept.first())
                        .copied()
                        .unwrap_or(0)
                        .min(visible[b])
                })
                .collect(),
            _ => visible
                .iter()
                .map(|&v| if v == 0 { Ok(0) } else { self.n_kept(v, layer) })
                .collect::<Result<_>>()?,
        };
        if counts.iter().zip(visible).all(|(n, v)| n >= v) {
            return Ok(None);
        }
        let counts = self.fit_counts(counts, visible, inputs.plan, fillers);
        let mut rows = Vec::with_capacity(visible.len());
        for (b, &n) in counts.iter().enumerate() {
            if n >= visible[b] {
                rows.push(RowKept::All);
                continue;
            }
            let scores = match &inputs.plan.step {
                Step::Select { scores, .. } => inputs.row(scores, b)?,
                _ => inputs.score(self, b, &ScoreContext::prefill(layer, n))?,
            };
            rows.push(RowKept::Some(self.head_budget.split(
                &scores,
                n,
                self.selector.as_ref(),
            )?));
        }
        Ok(Some((rows, counts)))
    }

    /// Counts per row that the target can hold: without filler slots, a row may pad with
    /// its hidden slots only, so it keeps more visible tokens where those are too few.
    fn fit_counts(
        &self,
        counts: Vec<usize>,
        visible: &[usize],
        plan: &Plan,
        fillers: bool,
    ) -> Vec<usize> {
        if fillers || !self.head_budget.is_uniform() {
            return counts;
        }
        let widest = counts.iter().copied().max().unwrap_or(0);
        counts
            .iter()
            .enumerate()
            .map(|(b, &n)| {
                n.max(widest.saturating_sub(plan.hidden_of(b)))
                    .min(visible[b])
            })
            .collect()
    }

    /// A decoding-time compression per row: each row's count, selection and (for a
    /// remembering scorer) kept scores; `None` when no row evicts.
    #[allow(clippy::type_complexity)]
    fn decoding_rows(
        &self,
        inputs: &RowInputs<'_>,
        steps: &[Option<Decoding>],
        (sinks, residual, why): (usize, usize, &'static str),
        fillers: bool,
    ) -> Result<Option<(Vec<RowKept>, Vec<usize>, Option<Vec<Option<Tensor>>>)>> {
        let plan = inputs.plan;
        let visible = &inputs.visible;
        let protect = |b: usize, step: &Decoding| {
            (
                step.protect_first
                    .max(sinks.saturating_sub(plan.hidden_of(b))),
                step.protect_last.max(residual),
            )
        };
        let mut counts = Vec::with_capacity(visible.len());
        for (b, &v) in visible.iter().enumerate() {
            counts.push(match steps.get(b).copied().flatten() {
                None => v,
                Some(step) => {
                    check_decoding_budget(step.n_kept, protect(b, &step), v, why)?;
                    step.n_kept.min(v)
                }
            });
        }
        if counts.iter().zip(visible).all(|(n, v)| n >= v) {
            return Ok(None);
        }
        let counts = self.fit_counts(counts, visible, plan, fillers);
        let remembers = self.scorer.remembers_scores() && self.head_budget.is_uniform();
        let mut rows = Vec::with_capacity(visible.len());
        let mut remembered = Vec::with_capacity(visible.len());
        for (b, &n) in counts.iter().enumerate() {
            match steps.get(b).copied().flatten() {
                Some(step) if n < visible[b] => {
                    let ctx = ScoreContext {
                        layer_idx: plan.layer_idx,
                        n_kept: n,
                        next_position: Some(step.next_position),
                    };
                    let scores = inputs.score(self, b, &ctx)?;
                    let previous = inputs.previous(b)?;
                    let row_step = Decoding { n_kept: n, ..step };
                    let (kept, kept_scores) = self.decoding_select(
                        &scores,
                        previous.as_ref(),
                        &row_step,
                        protect(b, &step),
                    )?;
                    rows.push(RowKept::Some(kept));
                    remembered.push(kept_scores);
                }
                _ => {
                    // the row keeps its tokens, and the ranking it remembered: the tokens
                    // stored since follow it, in position order (as unranked, −inf)
                    rows.push(RowKept::All);
                    remembered.push(
                        inputs
                            .previous(b)?
                            .map(|p| extend_unranked(&p, visible[b]))
                            .transpose()?,
                    );
                }
            }
        }
        Ok(Some((rows, counts, remembers.then_some(remembered))))
    }

    /// The tokens a decoding-time compression keeps out of `scores` (one row of a padded
    /// batch, or every row): the protected ends raised to +inf, the top `n_kept`, ties by
    /// the previous ranking for a remembering scorer; and that scorer's kept scores.
    fn decoding_select(
        &self,
        scores: &Tensor,
        previous_scores: Option<&Tensor>,
        step: &Decoding,
        (first, last): (usize, usize),
    ) -> Result<(Kept, Option<Tensor>)> {
        let protected = ProtectEnds { first, last }.apply(scores)?;
        let remembers = self.scorer.remembers_scores();
        let by_previous_rank =
            self.head_budget.is_uniform() && remembers && !self.selector.reads_token_order();
        let kept = if by_previous_rank {
            // Equal scores (window attention that underflowed to zero) go to the token
            // the previous compression ranked higher, not to the earlier one.
            let s = protected.size();
            let order =
                previous_ranking_order(previous_scores, s[0], s[1], s[2], protected.device())?;
            let best = self
                .selector
                .select(&protected.f_gather(-1, &order, false)?, step.n_kept)?;
            let (kept, _) = order.f_gather(-1, &best, false)?.f_sort(-1, false)?;
            Kept::Uniform(kept)
        } else {
            self.head_budget
                .split(&protected, step.n_kept, self.selector.as_ref())?
        };
        let kept_scores = match &kept {
            Kept::Uniform(indices) if remembers => Some(remembered_scores(
                scores,
                indices,
                self.scorer.protected_window(),
            )?),
            _ => None,
        };
        Ok((kept, kept_scores))
    }
}

/// One padded batch's inputs, sliced per row: each row's visible tokens are those after
/// its hidden slots.
struct RowInputs<'a> {
    plan: &'a Plan,
    keys: &'a Tensor,
    values: &'a Tensor,
    stored: usize,
    visible: Vec<usize>,
}

impl RowInputs<'_> {
    /// Row `b`'s visible tokens of `t` (batch, heads, stored, ...): (1, heads, visible, ...).
    fn row(&self, t: &Tensor, b: usize) -> Result<Tensor> {
        let h = self.plan.hidden_of(b) as i64;
        Ok(t.f_narrow(0, b as i64, 1)?
            .f_narrow(2, h, self.stored as i64 - h)?)
    }

    /// Row `b`'s queries: the last ones, as many as it has visible tokens at most.
    fn queries(&self, b: usize) -> Result<Option<Tensor>> {
        let Some(q) = &self.plan.queries else {
            return Ok(None);
        };
        let n = q.size()[2];
        let real = n.min(self.visible[b] as i64);
        Ok(Some(q.f_narrow(0, b as i64, 1)?.f_narrow(
            2,
            n - real,
            real,
        )?))
    }

    /// Row `b`'s previous scores over its visible tokens.
    fn previous(&self, b: usize) -> Result<Option<Tensor>> {
        let Some(p) = &self.plan.previous_scores else {
            return Ok(None);
        };
        let (m, h) = (p.size()[2], self.plan.hidden_of(b) as i64);
        Ok((m > h)
            .then(|| p.f_narrow(0, b as i64, 1)?.f_narrow(2, h, m - h))
            .transpose()?)
    }

    /// Row `b`'s scores (1, heads, visible), scored alone.
    fn score(&self, press: &Press, b: usize, ctx: &ScoreContext) -> Result<Tensor> {
        let queries = self.queries(b)?;
        let stats = self
            .plan
            .query_stats
            .as_ref()
            .map(|s| s.row(b))
            .transpose()?;
        let previous = self.previous(b)?;
        let sources = ScoreSources {
            queries: queries.as_ref(),
            query_stats: stats.as_ref(),
            previous_scores: previous.as_ref(),
        };
        press.scores(
            &self.row(self.keys, b)?,
            &self.row(self.values, b)?,
            sources,
            ctx,
        )
    }
}

/// One row's selection in a padded batch: indices into its visible tokens, or all of them.
enum RowKept {
    All,
    Some(Kept),
}

/// The rows' selections as one [`Kept`] over the stored tokens: visible indices shifted
/// past the row's hidden slots; uniform rows padded to the widest row with the row's
/// first hidden slots, then filler slots (−1), in front. Returns the new hidden count per
/// row (0 for rows of different lengths per head, which keep no hidden slot).
fn join_rows(
    rows: Vec<RowKept>,
    counts: &[usize],
    plan: &Plan,
    stored: usize,
    visible: &[usize],
    heads: i64,
) -> Result<(Kept, Vec<usize>)> {
    let batch = rows.len();
    let per_head = rows
        .iter()
        .any(|r| matches!(r, RowKept::Some(Kept::Rows(_))));
    let all_of = |b: usize, heads: i64| -> Result<Tensor> {
        let h = plan.hidden_of(b) as i64;
        Ok(
            Tensor::f_arange_start(h, stored as i64, (Kind::Int64, Device::Cpu))?
                .f_view([1, 1, stored as i64 - h])?
                .f_expand([1, heads, stored as i64 - h], false)?,
        )
    };
    if per_head {
        let mut out = Vec::new();
        for (b, r) in rows.into_iter().enumerate() {
            let h = plan.hidden_of(b) as i64;
            match r {
                RowKept::All => {
                    let all = all_of(b, heads)?;
                    for i in 0..heads {
                        out.push(all.f_get(0)?.f_get(i)?.f_contiguous()?);
                    }
                }
                RowKept::Some(Kept::Rows(r)) => {
                    for t in r {
                        out.push(t.f_add_scalar(h)?);
                    }
                }
                RowKept::Some(Kept::Uniform(t)) => {
                    for i in 0..heads {
                        out.push(t.f_get(0)?.f_get(i)?.f_add_scalar(h)?);
                    }
                }
            }
        }
        return Ok((Kept::Rows(out), vec![0; batch]));
    }
    let width = (0..batch)
        .map(|b| counts[b].min(visible[b]))
        .max()
        .unwrap_or(0);
    let mut joined = Vec::with_capacity(batch);
    let mut hidden = Vec::with_capacity(batch);
    for (b, r) in rows.into_iter().enumerate() {
        let h = plan.hidden_of(b);
        let own = match r {
            RowKept::All => all_of(b, heads)?,
            RowKept::Some(Kept::Uniform(t)) => t.f_to(Device::Cpu)?.f_add_scalar(h as i64)?,
            RowKept::Some(Kept::Rows(_)) => unreachable_rows()?,
        };
        let fill = width - own.size()[2] as usize;
        let reused = fill.min(h);
        let mut parts = Vec::new();
        if fill > reused {
            parts.push(Tensor::f_full(
                [1, heads, (fill - reused) as i64],
                -1,
                (Kind::Int64, Device::Cpu),
            )?);
        }
        if reused > 0 {
            parts.push(
                Tensor::f_arange(reused as i64, (Kind::Int64, Device::Cpu))?
                    .f_view([1, 1, reused as i64])?
                    .f_expand([1, heads, reused as i64], false)?,
            );
        }
        parts.push(own);
        joined.push(Tensor::f_cat(&parts, 2)?);
        hidden.push(fill);
    }
    Ok((Kept::Uniform(Tensor::f_cat(&joined, 0)?), hidden))
}

fn unreachable_rows() -> Result<Tensor> {
    Err(KvError::State(
        "rows of different lengths per head among uniform rows".into(),
    ))
}

/// The rows' remembered scores as one (batch, heads, width) tensor aligned with the kept
/// storage: −inf for hidden and filler slots, and for rows that kept every token.
fn join_remembered(
    remembered: Vec<Option<Tensor>>,
    counts: &[usize],
    visible: &[usize],
    heads: i64,
    device: Device,
) -> Result<Tensor> {
    let kept = |b: usize| counts[b].min(visible[b]) as i64;
    let width = (0..counts.len()).map(kept).max().unwrap_or(0);
    let mut out = Vec::with_capacity(counts.len());
    for (b, r) in remembered.into_iter().enumerate() {
        let row = match r {
            Some(s) => s.f_to_kind(Kind::Float)?.f_to(device)?,
            None => Tensor::f_full(
                [1, heads, kept(b)],
                f64::NEG_INFINITY,
                (Kind::Float, device),
            )?,
        };
        let fill = width - row.size()[2];
        out.push(if fill > 0 {
            let front = Tensor::f_full([1, heads, fill], f64::NEG_INFINITY, (Kind::Float, device))?;
            Tensor::f_cat(&[front, row], 2)?
        } else {
            row
        });
    }
    Ok(Tensor::f_cat(&out, 0)?)
}

/// Scores (1, heads, m) extended with −inf to `n` tokens.
fn extend_unranked(scores: &Tensor, n: usize) -> Result<Tensor> {
    let s = scores.size();
    let more = n as i64 - s[2];
    if more <= 0 {
        return Ok(scores.f_narrow(2, 0, n as i64)?);
    }
    let tail = Tensor::f_full(
        [s[0], s[1], more],
        f64::NEG_INFINITY,
        (Kind::Float, scores.device()),
    )?;
    Ok(Tensor::f_cat(&[scores.f_to_kind(Kind::Float)?, tail], 2)?)
}

fn one_count(n_kept: &[usize]) -> Result<usize> {
    match n_kept {
        [n] => Ok(*n),
        [first, rest @ ..] if rest.iter().all(|n| n == first) => Ok(*first),
        _ => Err(KvError::invalid(
            "n_kept",
            "rows without padding keep one count for the whole batch",
        )),
    }
}

/// The scores of the kept tokens, as float; the last `unranked` scored tokens (a window
/// the scorer keeps by convention, scored +max) become −inf: they were not ranked.
fn remembered_scores(scores: &Tensor, kept: &Tensor, unranked: usize) -> Result<Tensor> {
    let kept_scores = scores.f_to_kind(Kind::Float)?.f_gather(2, kept, false)?;
    if unranked == 0 {
        return Ok(kept_scores);
    }
    let first_unranked = (scores.size()[2] - unranked as i64).max(0);
    let mask = kept.f_ge(first_unranked)?;
    Ok(kept_scores.f_masked_fill(&mask, f64::NEG_INFINITY)?)
}

/// A decoding compression keeps at least one token and every protected one (the first
/// and last `protect` of `stored`); `why` says what the protected tokens are.
fn check_decoding_budget(
    n_kept: usize,
    protect: (usize, usize),
    stored: usize,
    why: &str,
) -> Result<()> {
    if n_kept == 0 {
        return Err(KvError::invalid(
            "decoding_budget",
            "a compression must keep at least one token",
        ));
    }
    let protected = protect.0 + protect.1;
    if n_kept < protected.min(stored) {
        return Err(KvError::invalid(
            "decoding_budget",
            format!("keeps {n_kept} tokens, fewer than the {protected} protected ones{why}"),
        ));
    }
    Ok(())
}
