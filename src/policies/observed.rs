//! ObservedAttention / H2O (Zhang et al. 2023): the attention each token received from
//! every prompt query, divided by the number of queries that could see it (T − j), averaged
//! over each KV head's group. Computed here from the queries, chunk by chunk, so the model
//! need not run eager attention nor materialise the full T × T weights.

use super::attention_weights::{group_mean, grouped_logits};
use super::{QueryWindow, ScoreInput, Scorer};
use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct ObservedAttention {
    chunk: usize,
}

impl ObservedAttention {
    /// `chunk_size` queries are processed at a time (memory: chunk × T weights per head).
    pub fn new(chunk_size: usize) -> Result<Self> {
        if chunk_size == 0 {
            return Err(KvError::invalid("chunk_size", "got 0, expected at least 1"));
        }
        Ok(ObservedAttention { chunk: chunk_size })
    }
}

impl Scorer for ObservedAttention {
    fn name(&self) -> &'static str {
        "observed_attention"
    }

    fn query_window(&self) -> QueryWindow {
        QueryWindow::All
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor> {
        let queries = input.require_queries(self.name())?;
        let keys = input.keys;
        let (t, d) = (keys.size()[2], keys.size()[3]);
        // The queries of the last q stored tokens: all of them in a prefill, those seen
        // since the previous compression during generation.
        let q_len = queries.size()[2];
        if q_len == 0 || q_len > t {
            return Err(KvError::shape(
                "queries",
                &queries.size(),
                format!("the queries of the last 1..={t} stored tokens"),
            ));
        }
        let first = t - q_len; // stored index of the first query's token
                               // converted once, not per chunk (grouped_logits multiplies in float32)
        let keys_f32 = keys.f_to_kind(Kind::Float)?;
        let scaling = 1.0 / (d as f64).sqrt();
        let cols = Tensor::f_arange(t, (Kind::Int64, keys.device()))?;
        let mut received: Option<Tensor> = None;
        let mut start = 0;
        while start < q_len {
            let n = (self.chunk as i64).min(q_len - start);
            // eager attention's chain: logits in the model dtype, softmax in float32, weights
            // cast back to the model dtype; accumulated in float32 across chunks.
            let logits = grouped_logits(&queries.f_narrow(2, start, n)?, &keys_f32)?
                .f_mul_scalar(scaling)?;
            let rows = Tensor::f_arange_start(
                first + start,
                first + start + n,
                (Kind::Int64, keys.device()),
            )?;
            let future = cols.f_unsqueeze(0)?.f_gt_tensor(&rows.f_unsqueeze(1)?)?;
            let weights = logits
                .f_masked_fill(&future, f64::NEG_INFINITY)?
                .f_softmax(-1, Kind::Float)?
                .f_to_kind(keys.kind())?;
            let part = weights.f_sum_dim_intlist([2i64].as_slice(), false, Kind::Float)?;
            received = Some(match received {
                None => part,
                Some(acc) => acc.f_add(&part)?,
            });
            start += n;
        }
        let received = received
            .ok_or_else(|| KvError::empty("keys", "no tokens to score"))?
            .f_to_kind(keys.kind())?;
        // token j is seen by the queries at stored indices >= j: min(q, t − j) of them
        let observers = Tensor::f_arange(t, (Kind::Int64, keys.device()))?
            .f_neg()?
            .f_add_scalar(t)?
            .f_clamp_max(q_len)?
            .f_to_kind(keys.kind())?;
        group_mean(&received.f_div(&observers)?, keys.size()[1])
    }
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "observed_attention",
    aliases: &["h2o"],
    summary: "attention received from every prompt query, divided by how many could see the token",
    reference: "Zhang et al., 2023 (H2O)",
    url: "https://arxiv.org/abs/2306.14048",
    params: &[ParamSpec::int(
        "chunk_size",
        512,
        1,
        "queries processed at a time (memory: chunk × tokens per head)",
    )],
    build: Builder::Scorer(|a| Ok(Box::new(ObservedAttention::new(a.usize("chunk_size")?)?))),
};
