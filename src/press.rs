//! A press decides which tokens of a layer to keep: a [`Scorer`] ranks them, a [`Budget`]
//! says how many survive on average, a [`LayerBudget`] how many in this layer, and a
//! [`HeadBudget`] how the layer's tokens are split among its KV heads. It acts on a
//! [`LayerStore`] right after the layer's prefill attention.

use crate::budget::{Budget, HeadBudget, LayerBudget};
use crate::error::Result;
use crate::policies::{score_layer, QueryWindow, ScoreContext, Scorer};
use crate::select::{adakv_rows, top_k_indices};
use crate::store::LayerStore;
use crate::tensor::check_finite;
use tch::Tensor;

/// The tokens a press keeps in one layer.
#[derive(Debug)]
pub enum Kept {
    /// int64 (batch, kv_heads, n) ascending indices, every head the same count.
    Uniform(Tensor),
    /// int64 (n_r,) ascending indices per row r = b * kv_heads + h (head budgets).
    Rows(Vec<Tensor>),
}

/// A scorer plus budgets.
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
}

impl Press {
    /// A press with uniform layer and head budgets.
    pub fn new(scorer: Box<dyn Scorer>, budget: Budget) -> Self {
        Press {
            scorer,
            budget,
            layer_budget: LayerBudget::Uniform,
            head_budget: HeadBudget::Uniform,
            n_layers: 1,
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
        }
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

    /// The prompt queries the scorer needs (none, the last n, or all).
    pub fn query_window(&self) -> QueryWindow {
        self.scorer.query_window()
    }

    /// Whether this press can never evict (ratio 0).
    pub fn keeps_everything(&self) -> bool {
        self.budget.keeps_everything()
    }

    /// Tokens kept (on average per KV head) by layer `layer_idx` out of `n_tokens`.
    pub fn n_kept(&self, n_tokens: usize, layer_idx: usize) -> Result<usize> {
        self.layer_budget
            .n_kept(&self.budget, n_tokens, layer_idx, self.n_layers)
    }

    /// The tokens kept out of `keys`/`values` (batch, kv_heads, tokens, head_dim) of layer
    /// `layer_idx`, given the post-RoPE `queries` (batch, q_heads, q, head_dim) of the last
    /// q prompt tokens when the scorer needs them.
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
        let ctx = ScoreContext { layer_idx, n_kept };
        let scores = score_layer(self.scorer.as_ref(), keys, values, queries, &ctx)?;
        match self.head_budget {
            HeadBudget::Uniform => Ok(Kept::Uniform(top_k_indices(&scores, n_kept)?)),
            HeadBudget::AdaKv { alpha } => Ok(Kept::Rows(adakv_rows(&scores, n_kept, alpha)?)),
        }
    }

    /// Indices (int64 (batch, kv_heads, n_kept), ascending) kept by a uniform-head press
    /// from a scorer that needs no queries.
    pub fn kept_indices(&self, keys: &Tensor, values: &Tensor, layer_idx: usize) -> Result<Tensor> {
        match self.kept(keys, values, None, layer_idx)? {
            Kept::Uniform(t) => Ok(t),
            Kept::Rows(_) => Err(crate::error::KvError::State(
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
        let (keys, values) = (store.keys_view()?, store.values_view()?);
        let n_kept = self.n_kept(store.len(), layer_idx)?;
        if n_kept >= store.len() {
            check_finite(&keys, "keys")?;
            return check_finite(&values, "values");
        }
        match self.kept(&keys, &values, queries, layer_idx)? {
            Kept::Uniform(indices) => store.retain(&indices),
            Kept::Rows(rows) => store.retain_rows(&rows),
        }
    }
}
