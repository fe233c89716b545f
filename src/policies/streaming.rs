//! StreamingLLM: keep the first `n_sink` tokens (attention sinks) and the most recent ones.

use super::{KeyValueScorer, ScoreContext};
use crate::error::{KvError, Result};
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

    /// Whether token `t` of `n_tokens` is kept when `n_kept` tokens are kept: the first
    /// min(n_sink, n_kept) tokens and the last n_kept − that many.
    fn kept(&self, t: usize, n_tokens: usize, n_kept: usize) -> bool {
        let sinks = self.n_sink.min(n_kept);
        let recent = n_kept - sinks;
        t < sinks || t >= n_tokens - recent
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
        ctx: &ScoreContext,
        mut out: ArrayViewMut3<'_, f32>,
    ) -> Result<()> {
        let n_tokens = out.dim().2;
        let n_kept = ctx.n_kept.min(n_tokens);
        for (t, mut col) in out.axis_iter_mut(Axis(2)).enumerate() {
            col.fill(if self.kept(t, n_tokens, n_kept) {
                1.0
            } else {
                0.0
            });
        }
        Ok(())
    }

    fn score_libtorch(
        &self,
        keys: &Tensor,
        _values: &Tensor,
        ctx: &ScoreContext,
    ) -> Result<Tensor> {
        let size = keys.size();
        let n_tokens = size[2] as usize;
        let n_kept = ctx.n_kept.min(n_tokens);
        let row: Vec<f32> = (0..n_tokens)
            .map(|t| {
                if self.kept(t, n_tokens, n_kept) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let row = Tensor::f_from_slice(&row)?.f_to(keys.device())?;
        Ok(row
            .f_expand([size[0], size[1], size[2]], false)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?)
    }
}
