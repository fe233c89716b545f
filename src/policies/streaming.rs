//! StreamingLLM: keep the first `n_sink` tokens (attention sinks) and the most recent ones.
//!
//! Scores rank sinks first (2, 2, ...) and the other tokens by recency (t / T in (0, 1)),
//! so that the top k are the sinks and the last k − n_sink tokens whatever k a budget
//! picks — per layer (pyramid, CAKE) or per head (AdaKV) alike. Ties among the sinks go
//! to the earlier ones when k < n_sink.

use super::{KeyValueScorer, ScoreContext};
use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use crate::tensor::FloatView4;
use ndarray::{ArrayViewMut3, Axis};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct StreamingLlm {
    n_sink: usize,
}

impl StreamingLlm {
    pub fn new(n_sink: i64) -> Result<Self> {
        if n_sink < 0 {
            return Err(KvError::invalid(
                "n_sink",
                format!("got {n_sink}, expected a count >= 0"),
            ));
        }
        Ok(StreamingLlm {
            n_sink: n_sink as usize,
        })
    }

    pub fn n_sink(&self) -> usize {
        self.n_sink
    }

    /// The score of token `t` of `n_tokens`.
    fn score_of(&self, t: usize, n_tokens: usize) -> f32 {
        if t < self.n_sink {
            2.0
        } else {
            t as f32 / n_tokens as f32
        }
    }
}

impl KeyValueScorer for StreamingLlm {
    fn name(&self) -> &'static str {
        "streaming_llm"
    }

    fn score_cpu(
        &self,
        _keys: &FloatView4<'_>,
        _values: &FloatView4<'_>,
        _ctx: &ScoreContext,
        mut out: ArrayViewMut3<'_, f32>,
    ) -> Result<()> {
        let n_tokens = out.dim().2;
        for mut row in out.lanes_mut(Axis(2)) {
            for (t, o) in row.iter_mut().enumerate() {
                *o = self.score_of(t, n_tokens);
            }
        }
        Ok(())
    }

    fn score_libtorch(
        &self,
        keys: &Tensor,
        _values: &Tensor,
        _ctx: &ScoreContext,
    ) -> Result<Tensor> {
        let size = keys.size();
        let n_tokens = size[2] as usize;
        let row: Vec<f32> = (0..n_tokens).map(|t| self.score_of(t, n_tokens)).collect();
        let row = Tensor::f_from_slice(&row)?.f_to(keys.device())?;
        Ok(row
            .f_expand([size[0], size[1], size[2]], false)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?)
    }
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "streaming_llm",
    aliases: &["streamingllm", "streaming"],
    summary: "the first `n_sink` tokens (attention sinks) and the most recent ones",
    reference: "Xiao et al., 2023",
    url: "https://arxiv.org/abs/2309.17453",
    params: &[ParamSpec::int(
        "n_sink",
        4,
        0,
        "first tokens always kept (attention sinks)",
    )],
    build: Builder::Scorer(|a| Ok(Box::new(StreamingLlm::new(a.i64("n_sink")?)?))),
};
