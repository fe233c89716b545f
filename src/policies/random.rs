//! Random: uniform scores from a counter-based generator, so that the same seed gives the
//! same kept tokens for a given (layer, batch row, head, token) on every device and thread
//! count.

use super::{KeyValueScorer, ScoreContext};
use crate::error::Result;
use crate::registry::{Builder, ParamSpec, Stage};
use crate::tensor::FloatView4;
use ndarray::ArrayViewMut3;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct Random {
    seed: u64,
}

/// SplitMix64's finaliser: a bijective mix with full avalanche, enough for sampling scores.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Random {
    pub fn new(seed: u64) -> Self {
        Random { seed }
    }

    fn fill(&self, layer: usize, mut out: ArrayViewMut3<'_, f32>) {
        out.indexed_iter_mut()
            .for_each(|((b, h, t), o)| *o = self.uniform(layer, b, h, t));
    }

    /// A uniform number in [0, 1) for one token.
    fn uniform(&self, layer: usize, b: usize, h: usize, t: usize) -> f32 {
        let mut z = mix64(self.seed);
        for x in [layer, b, h, t] {
            z = mix64(z ^ x as u64);
        }
        // 24 random bits: exactly representable in f32.
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

impl KeyValueScorer for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn score_cpu(
        &self,
        _keys: &FloatView4<'_>,
        _values: &FloatView4<'_>,
        ctx: &ScoreContext,
        out: ArrayViewMut3<'_, f32>,
    ) -> Result<()> {
        self.fill(ctx.layer_idx, out);
        Ok(())
    }

    fn score_libtorch(&self, keys: &Tensor, values: &Tensor, ctx: &ScoreContext) -> Result<Tensor> {
        // The scores do not depend on the data: compute them on the CPU, then move them.
        let size = keys.size();
        let _ = values;
        let mut out = Tensor::f_empty([size[0], size[1], size[2]], (Kind::Float, Device::Cpu))?;
        self.fill(
            ctx.layer_idx,
            crate::tensor::array_view_mut(&mut out, "scores")?,
        );
        Ok(out.f_to(keys.device())?)
    }
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "random",
    aliases: &[],
    summary: "uniform random scores from a seeded counter-based generator (a baseline)",
    reference: "a baseline",
    url: "",
    params: &[ParamSpec {
        min: None,
        ..ParamSpec::int(
            "seed",
            0,
            0,
            "seed of the generator (scores per seed, layer, row, head, token)",
        )
    }],
    build: Builder::Scorer(|a| Ok(Box::new(Random::new(a.i64("seed")? as u64)))),
};
