//! A press decides which tokens of a layer to keep: a [`Scorer`] ranks them, a [`Budget`]
//! says how many survive on average, a [`LayerBudget`] how many in this layer, and a
//! [`HeadBudget`] how the layer's tokens are split among its KV heads. It acts on a
//! [`LayerStore`] right after the layer's prefill attention.

use crate::budget::{Budget, HeadBudget, LayerBudget};
use crate::error::{KvError, Result};
use crate::policies::{
    cake_preference, previous_ranking_order, score_layer, score_layer_with, QueryStats,
    QueryWindow, ScoreContext, ScoreSources, Scorer,
};
use crate::quant::QuantizedStore;
use crate::rope::Rope;
use crate::select::{adakv_rows, top_k_indices};
use crate::store::LayerStore;
use crate::tensor::{check_finite, in_pool};
use tch::{Kind, Tensor};

/// One layer's scores, kept until every layer's budget is known (CAKE).
#[derive(Debug)]
pub struct LayerScores {
    /// Scores (batch, kv_heads, tokens), higher = keep.
    pub scores: Tensor,
    /// The layer's preference for the CAKE layer budget (0 for other budgets).
    pub preference: f64,
}

/// One decoding-time compression of a layer: what [`Press::compress_to`] needs besides
/// the store.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodingStep<'a> {
    pub layer_idx: usize,
    /// Tokens kept per row.
    pub n_kept: usize,
    /// Tokens seen: the position of the next token.
    pub next_position: usize,
    /// The first stored tokens never evicted (a protected prompt).
    pub protect_first: usize,
    /// The last stored tokens never evicted (those since the previous compression).
    pub protect_last: usize,
    /// Post-RoPE queries of the last q stored tokens (those seen since the previous
    /// compression), for scorers that read queries.
    pub queries: Option<&'a Tensor>,
    /// Pre-RoPE query statistics from elsewhere (TriAttention).
    pub query_stats: Option<&'a QueryStats>,
    /// What the previous compression returned as [`Compressed::kept_scores`], for a
    /// scorer that remembers; the caller keeps it aligned with the store (the first m
    /// stored tokens).
    pub previous_scores: Option<&'a Tensor>,
}

impl DecodingStep<'_> {
    fn protected(&self) -> (usize, usize) {
        (self.protect_first, self.protect_last)
    }
}

/// What a decoding-time compression did.
#[derive(Debug, Default)]
pub struct Compressed {
    /// Whether it evicted (false: the store was within its budget, and is untouched).
    pub evicted: bool,
    /// For a scorer that [remembers](Scorer::remembers_scores): the scores of the kept
    /// tokens (float (batch, kv_heads, n_kept), in storage order; −inf for the ones the
    /// scorer kept without ranking them), to pass as the next step's `previous_scores`.
    pub kept_scores: Option<Tensor>,
}

/// The tokens a press keeps in one layer.
#[derive(Debug)]
pub enum Kept {
    /// int64 (batch, kv_heads, n) ascending indices, every head the same count.
    Uniform(Tensor),
    /// int64 (n_r,) ascending indices per row r = b * kv_heads + h (head budgets).
    Rows(Vec<Tensor>),
}

/// A scorer plus budgets (and the model's RoPE, for scorers that need it).
///
/// ```
/// use kvpress_rs::{Budget, LayerStore, Press};
/// use kvpress_rs::policies::Knorm;
/// use tch::{Kind, Tensor};
///
/// let press = Press::new(Box::new(Knorm), Budget::ratio(0.5).unwrap());
/// let keys = Tensor::randn([1, 2, 8, 4], (Kind::Float, tch::Device::Cpu));
/// let mut store = LayerStore::new();
/// store.append(&keys, &keys).unwrap();
/// press.compress(&mut store, 0, None).unwrap();
/// assert_eq!((store.len(), store.seen()), (4, 8));
/// ```
#[derive(Debug)]
pub struct Press {
    scorer: Box<dyn Scorer>,
    budget: Budget,
    layer_budget: LayerBudget,
    head_budget: HeadBudget,
    n_layers: usize,
    rope: Option<Rope>,
}

impl Press {
    /// Scorers that work in pre-RoPE space need the model's RoPE.
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

    /// A press with uniform layer and head budgets.
    pub fn new(scorer: Box<dyn Scorer>, budget: Budget) -> Self {
        Press {
            scorer,
            budget,
            layer_budget: LayerBudget::Uniform,
            head_budget: HeadBudget::Uniform,
            n_layers: 1,
            rope: None,
        }
    }

    /// A press whose budget varies across the `n_layers` layers and/or the heads.
    pub fn with_budgets(
        scorer: Box<dyn Scorer>,
        budget: Budget,
        layer_budget: LayerBudget,
        head_budget: HeadBudget,
        n_layers: usize,
    ) -> Self {
        Press {
            scorer,
            budget,
            layer_budget,
            head_budget,
            n_layers: n_layers.max(1),
            rope: None,
        }
    }

    /// The same press, with the model's RoPE (for scorers that need it).
    pub fn with_rope(mut self, rope: Rope) -> Self {
        self.rope = Some(rope);
        self
    }

    pub fn scorer(&self) -> &dyn Scorer {
        self.scorer.as_ref()
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    pub fn layer_budget(&self) -> LayerBudget {
        self.layer_budget
    }

    pub fn head_budget(&self) -> HeadBudget {
        self.head_budget
    }

    pub fn rope(&self) -> Option<&Rope> {
        self.rope.as_ref()
    }

    /// Whether this press can never evict (ratio 0).
    pub fn keeps_everything(&self) -> bool {
        self.budget.keeps_everything()
    }

    /// The prompt queries the scorer (and a CAKE layer budget) need.
    pub fn query_window(&self) -> QueryWindow {
        match (self.scorer.query_window(), self.layer_budget) {
            (QueryWindow::All, _) => QueryWindow::All,
            (QueryWindow::Last(n), LayerBudget::Cake { window, .. }) => {
                QueryWindow::Last(n.max(window))
            }
            (QueryWindow::None, LayerBudget::Cake { window, .. }) => QueryWindow::Last(window),
            (need, _) => need,
        }
    }

    /// Whether layer budgets need every layer's scores first (CAKE): then compression is
    /// [`Press::score`] per layer, [`Press::allocate`] once, [`Press::select`] per layer.
    pub fn needs_all_layers(&self) -> bool {
        self.layer_budget.needs_all_layers()
    }

    /// Tokens kept (on average per KV head) by layer `layer_idx` out of `n_tokens`.
    pub fn n_kept(&self, n_tokens: usize, layer_idx: usize) -> Result<usize> {
        self.layer_budget
            .n_kept(&self.budget, n_tokens, layer_idx, self.n_layers)
    }

    /// Scores one layer (and, for CAKE, measures its preference): `keys`/`values`
    /// (batch, kv_heads, tokens, head_dim), the post-RoPE `queries` (batch, q_heads, q,
    /// head_dim) of the last q prompt tokens when the scorer needs them.
    pub fn score(
        &self,
        keys: &Tensor,
        values: &Tensor,
        queries: Option<&Tensor>,
        layer_idx: usize,
    ) -> Result<LayerScores> {
        let (k, v) = (keys.shallow_clone(), values.shallow_clone());
        let queries = queries.map(Tensor::shallow_clone);
        in_pool(move || self.score_here(&k, &v, queries.as_ref(), layer_idx))
    }

    fn score_here(
        &self,
        keys: &Tensor,
        values: &Tensor,
        queries: Option<&Tensor>,
        layer_idx: usize,
    ) -> Result<LayerScores> {
        let n_tokens = crate::tensor::check_kv_pair(keys, values)?.0.tokens;
        let n_kept = self.n_kept(n_tokens, layer_idx)?;
        check_finite(keys, "keys")?;
        check_finite(values, "values")?;
        self.check_rope()?;
        let ctx = ScoreContext::prefill(layer_idx, n_kept);
        let scores = score_layer(
            self.scorer.as_ref(),
            keys,
            values,
            queries,
            self.rope.as_ref(),
            &ctx,
        )?;
        let preference = match (self.layer_budget, queries) {
            (LayerBudget::Cake { tau1, tau2, window }, Some(q)) => {
                cake_preference(q, keys, window, tau1, tau2)?
            }
            (LayerBudget::Cake { .. }, None) => {
                return Err(KvError::invalid(
                    "queries",
                    "the CAKE layer budget measures each layer's attention: queries are needed",
                ))
            }
            _ => 0.0,
        };
        Ok(LayerScores { scores, preference })
    }

    /// Per-layer token counts from every layer's token count and preference.
    pub fn allocate(&self, n_tokens: &[usize], preferences: &[f64]) -> Result<Vec<usize>> {
        let floor = self.scorer.protected_window().max(match self.layer_budget {
            LayerBudget::Cake { window, .. } => window,
            _ => 1,
        });
        self.layer_budget
            .allocate(&self.budget, n_tokens, preferences, floor)
    }

    /// The `n_kept` tokens (per head on average) kept from a layer's `scores`.
    pub fn select(&self, scores: &Tensor, n_kept: usize) -> Result<Kept> {
        match self.head_budget {
            HeadBudget::Uniform => Ok(Kept::Uniform(top_k_indices(scores, n_kept)?)),
            HeadBudget::AdaKv { alpha } => Ok(Kept::Rows(adakv_rows(scores, n_kept, alpha)?)),
        }
    }

    /// The tokens kept out of `keys`/`values` (batch, kv_heads, tokens, head_dim) of layer
    /// `layer_idx`.
    pub fn kept(
        &self,
        keys: &Tensor,
        values: &Tensor,
        queries: Option<&Tensor>,
        layer_idx: usize,
    ) -> Result<Kept> {
        let n_tokens = crate::tensor::check_kv_pair(keys, values)?.0.tokens;
        let n_kept = self.n_kept(n_tokens, layer_idx)?;
        let scored = self.score_here(keys, values, queries, layer_idx)?;
        self.select(&scored.scores, n_kept)
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

    /// Compresses the store in place: scores its tokens and frees all but the kept ones.
    /// A layer budget that keeps every token leaves the storage untouched (no copy).
    pub fn compress(
        &self,
        store: &mut LayerStore,
        layer_idx: usize,
        queries: Option<&Tensor>,
    ) -> Result<()> {
        let queries = queries.map(Tensor::shallow_clone);
        in_pool(move || self.compress_here(store, layer_idx, queries.as_ref()))
    }

    fn compress_here(
        &self,
        store: &mut LayerStore,
        layer_idx: usize,
        queries: Option<&Tensor>,
    ) -> Result<()> {
        let (keys, values) = (store.keys_view()?, store.values_view()?);
        let n_kept = self.n_kept(store.len(), layer_idx)?;
        if n_kept >= store.len() {
            check_finite(&keys, "keys")?;
            return check_finite(&values, "values");
        }
        let kept = self.kept(&keys, &values, queries, layer_idx)?;
        retain(store, kept)
    }

    /// Compresses a store that has grown (during generation, or after a prompt block) to
    /// exactly `step.n_kept` tokens per row: the scorer ranks every stored token, the first
    /// `protect_first` and the last `protect_last` stored tokens are never evicted, and the
    /// best of the rest fill the budget (see [`DecodingStep`]). The same `n_kept` for every
    /// layer: layer budgets (pyramid, CAKE) shape the prefill compression only.
    ///
    /// ```
    /// use kvpress_rs::{press::DecodingStep, policies::Knorm, Budget, LayerStore, Press};
    /// let press = Press::new(Box::new(Knorm), Budget::ratio(0.0).unwrap());
    /// let keys = tch::Tensor::randn([1, 2, 40, 8], (tch::Kind::Float, tch::Device::Cpu));
    /// let mut store = LayerStore::new();
    /// store.append(&keys, &keys).unwrap();
    /// let step = DecodingStep { n_kept: 24, next_position: 40, protect_last: 8, ..Default::default() };
    /// let done = press.compress_to(&mut store, &step).unwrap();
    /// assert!(done.evicted && store.len() == 24);
    /// ```
    pub fn compress_to(
        &self,
        store: &mut LayerStore,
        step: &DecodingStep<'_>,
    ) -> Result<Compressed> {
        let stored = store.len();
        check_decoding_budget(step.n_kept, step.protected(), stored, "")?;
        if step.n_kept >= stored {
            return Ok(Compressed::default());
        }
        let (keys, values) = (store.keys_view()?, store.values_view()?);
        let (kept, kept_scores) = self.decoding_kept(&keys, &values, step, step.protected())?;
        retain(store, kept)?;
        Ok(Compressed {
            evicted: true,
            kept_scores,
        })
    }

    /// The tokens a decoding-time compression keeps out of `keys`/`values`: scored with
    /// the scorer, the protected ends raised to +inf, the top `n_kept` per row; and, for a
    /// scorer that remembers, the scores of the kept tokens.
    fn decoding_kept(
        &self,
        keys: &Tensor,
        values: &Tensor,
        step: &DecodingStep<'_>,
        (protect_first, protect_last): (usize, usize),
    ) -> Result<(Kept, Option<Tensor>)> {
        self.check_rope()?;
        let ctx = ScoreContext {
            layer_idx: step.layer_idx,
            n_kept: step.n_kept,
            next_position: Some(step.next_position),
        };
        let sources = ScoreSources {
            queries: step.queries,
            query_stats: step.query_stats,
            previous_scores: step.previous_scores,
        };
        let scores = score_layer_with(
            self.scorer.as_ref(),
            keys,
            values,
            sources,
            self.rope.as_ref(),
            &ctx,
        )?;
        let protected = protect_ends(&scores, protect_first, protect_last)?;
        let kept = match self.head_budget {
            HeadBudget::Uniform if self.scorer.remembers_scores() => {
                // Equal scores (window attention that underflowed to zero) go to the token
                // the previous compression ranked higher, not to the earlier one.
                let s = protected.size();
                let order = previous_ranking_order(
                    step.previous_scores,
                    s[0],
                    s[1],
                    s[2],
                    protected.device(),
                )?;
                let best = top_k_indices(&protected.f_gather(-1, &order, false)?, step.n_kept)?;
                let (kept, _) = order.f_gather(-1, &best, false)?.f_sort(-1, false)?;
                Kept::Uniform(kept)
            }
            _ => self.select(&protected, step.n_kept)?,
        };
        let kept_scores =
            match &kept {
                Kept::Uniform(indices) if self.scorer.remembers_scores() => Some(
                    remembered_scores(&scores, indices, self.scorer.protected_window())?,
                ),
                _ => None,
            };
        Ok((kept, kept_scores))
    }

    /// [`compress_to`](Self::compress_to) for a quantized store (a
    /// `KVCache(quantization=...)` with a decoding budget): every stored token is scored
    /// from a dequantized temporary (scoring reads every token anyway), and the store keeps
    /// the selected ones with their exact codes ([`QuantizedStore::retain`]: nothing is
    /// re-quantized). The full-precision sinks and residual window are protected as well
    /// (the protected ends are raised to cover them), so they stay whole.
    pub fn compress_quantized_to(
        &self,
        store: &mut QuantizedStore,
        step: &DecodingStep<'_>,
    ) -> Result<Compressed> {
        let stored = store.seen();
        let protect_first = step.protect_first.max(store.sink_len());
        let protect_last = step.protect_last.max(store.residual_len());
        check_decoding_budget(
            step.n_kept,
            (protect_first, protect_last),
            stored,
            " (the protected prompt and sink tokens, and the last max(decoding_interval, tokens in \
             the full-precision residual window)); raise decoding_budget above \
             max(decoding_interval, residual_length or group_size) plus the protected prompt",
        )?;
        if step.n_kept >= stored {
            return Ok(Compressed::default());
        }
        let (keys, values) = store.dequantize()?;
        let (kept, kept_scores) =
            self.decoding_kept(&keys, &values, step, (protect_first, protect_last))?;
        drop((keys, values));
        match kept {
            Kept::Uniform(indices) => store.retain(&indices)?,
            Kept::Rows(_) => {
                return Err(KvError::Unsupported(
                    "a quantized cache keeps the same count per head: head_budget='adakv' is \
                     not supported with quantization"
                        .into(),
                ))
            }
        }
        Ok(Compressed {
            evicted: true,
            kept_scores,
        })
    }

    /// [`compress`](Self::compress) that returns the tokens it evicts — keys and values
    /// (batch, kv_heads, n_evicted, head_dim) — instead of dropping them (mixed precision);
    /// None when it keeps every token. Uniform head budgets only.
    pub fn compress_split(
        &self,
        store: &mut LayerStore,
        layer_idx: usize,
        queries: Option<&Tensor>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let queries = queries.map(Tensor::shallow_clone);
        in_pool(move || self.compress_split_here(store, layer_idx, queries.as_ref()))
    }

    fn compress_split_here(
        &self,
        store: &mut LayerStore,
        layer_idx: usize,
        queries: Option<&Tensor>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let (keys, values) = (store.keys_view()?, store.values_view()?);
        let n_kept = self.n_kept(store.len(), layer_idx)?;
        if n_kept >= store.len() {
            check_finite(&keys, "keys")?;
            check_finite(&values, "values")?;
            return Ok(None);
        }
        let kept = self.kept(&keys, &values, queries, layer_idx)?;
        retain_split(store, kept).map(Some)
    }

    /// [`compress_scored`](Self::compress_scored) that returns the evicted tokens (see
    /// [`compress_split`](Self::compress_split)).
    pub fn compress_scored_split(
        &self,
        store: &mut LayerStore,
        scores: &Tensor,
        n_kept: usize,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if n_kept >= store.len() {
            return Ok(None);
        }
        let scores = scores.shallow_clone();
        in_pool(move || {
            let kept = self.select(&scores, n_kept)?;
            retain_split(store, kept).map(Some)
        })
    }

    /// Keeps, in `store`, the `n_kept` best tokens of earlier `scores` (the second half of a
    /// compression whose budgets needed every layer).
    pub fn compress_scored(
        &self,
        store: &mut LayerStore,
        scores: &Tensor,
        n_kept: usize,
    ) -> Result<()> {
        if n_kept >= store.len() {
            return Ok(());
        }
        let scores = scores.shallow_clone();
        in_pool(move || {
            let kept = self.select(&scores, n_kept)?;
            retain(store, kept)
        })
    }
}

/// `scores` (batch, heads, T) with the first `first` and last `last` tokens raised to +inf,
/// so that top-k always keeps them (ties among them go to the earlier token, irrelevant:
/// all of them fit the budget).
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

fn protect_ends(scores: &Tensor, first: usize, last: usize) -> Result<Tensor> {
    let t = scores.size()[2];
    let (first, last) = ((first as i64).min(t), (last as i64).min(t));
    if first == 0 && last == 0 {
        return Ok(scores.shallow_clone());
    }
    // a copy: the caller may still read the scores (a remembering scorer's kept scores)
    let scores = scores.f_to_dtype(Kind::Float, false, true)?;
    if first > 0 {
        let _ = scores.f_narrow(2, 0, first)?.f_fill_(f64::INFINITY)?;
    }
    if last > 0 {
        let _ = scores.f_narrow(2, t - last, last)?.f_fill_(f64::INFINITY)?;
    }
    Ok(scores)
}

fn retain_split(store: &mut LayerStore, kept: Kept) -> Result<(Tensor, Tensor)> {
    match kept {
        Kept::Uniform(indices) => store.retain_split(&indices),
        Kept::Rows(_) => Err(KvError::Unsupported(
            "keeping evicted tokens at low precision (low_bits) with a per-head budget \
             (head_budget='adakv') is not supported"
                .into(),
        )),
    }
}

fn retain(store: &mut LayerStore, kept: Kept) -> Result<()> {
    match kept {
        Kept::Uniform(indices) => store.retain(&indices),
        Kept::Rows(rows) => store.retain_rows(&rows),
    }
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
