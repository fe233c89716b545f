//! A press decides which tokens of a layer to keep: a [`Scorer`] ranks them and a
//! [`Budget`] says how many survive. It acts on a [`LayerStore`] right after the layer's
//! prefill attention.

use crate::budget::Budget;
use crate::error::KvError;
use crate::error::Result;
use crate::policies::{score, ScoreContext, Scorer};
use crate::select::top_k_indices;
use crate::store::LayerStore;
use crate::tensor::{check_finite, FloatView4};
use ndarray::Array3;
use tch::Tensor;

/// A scorer plus a budget.
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
/// press.compress(&mut store, 0).unwrap();
/// assert_eq!((store.len(), store.seen()), (4, 8));
/// ```
#[derive(Debug)]
pub struct Press {
    scorer: Box<dyn Scorer>,
    budget: Budget,
}

impl Press {
    pub fn new(scorer: Box<dyn Scorer>, budget: Budget) -> Self {
        Press { scorer, budget }
    }

    pub fn scorer(&self) -> &dyn Scorer {
        self.scorer.as_ref()
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Indices (int64 (batch, kv_heads, n_kept), ascending) of the tokens this press keeps
    /// out of `keys`/`values` (batch, kv_heads, tokens, head_dim) of layer `layer_idx`.
    pub fn kept_indices(&self, keys: &Tensor, values: &Tensor, layer_idx: usize) -> Result<Tensor> {
        let n_tokens = crate::tensor::check_kv_pair(keys, values)?.0.tokens;
        let n_kept = self.budget.n_kept(n_tokens)?;
        check_finite(keys, "keys")?;
        check_finite(values, "values")?;
        let ctx = ScoreContext { layer_idx, n_kept };
        let scores = score(self.scorer.as_ref(), keys, values, &ctx)?;
        top_k_indices(&scores, n_kept)
    }

    /// [`Press::kept_indices`] on CPU views (numpy arrays through the bindings): int64
    /// (batch, kv_heads, n_kept) ascending.
    pub fn kept_indices_views(
        &self,
        keys: &FloatView4<'_>,
        values: &FloatView4<'_>,
        layer_idx: usize,
    ) -> Result<Array3<i64>> {
        let ks = keys.shape().to_vec();
        let vs = values.shape().to_vec();
        if ks[..3] != vs[..3] {
            let vs64: Vec<i64> = vs.iter().map(|&x| x as i64).collect();
            return Err(KvError::shape(
                "values",
                &vs64,
                format!("({}, {}, {}, head_dim) to match keys", ks[0], ks[1], ks[2]),
            ));
        }
        if !keys.all_finite() {
            return Err(KvError::non_finite("keys", "every key must be finite"));
        }
        if !values.all_finite() {
            return Err(KvError::non_finite("values", "every value must be finite"));
        }
        let n_kept = self.budget.n_kept(ks[2])?;
        let ctx = ScoreContext { layer_idx, n_kept };
        let mut scores = Array3::<f32>::zeros((ks[0], ks[1], ks[2]));
        self.scorer
            .score_cpu(keys, values, &ctx, scores.view_mut())?;
        let mut kept = Array3::<i64>::zeros((ks[0], ks[1], n_kept));
        crate::select::top_k_indices_cpu(scores.view(), kept.view_mut())?;
        Ok(kept)
    }

    /// Compresses the store in place: scores its tokens and frees all but the kept ones.
    /// A budget that keeps every token leaves the storage untouched (no copy).
    pub fn compress(&self, store: &mut LayerStore, layer_idx: usize) -> Result<()> {
        let (keys, values) = (store.keys_view()?, store.values_view()?);
        let n_kept = self.budget.n_kept(store.len())?;
        if n_kept >= store.len() {
            check_finite(&keys, "keys")?;
            return check_finite(&values, "values");
        }
        let indices = self.kept_indices(&keys, &values, layer_idx)?;
        store.retain(&indices)
    }
}
