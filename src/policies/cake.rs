//! CAKE (Qin et al., ICLR 2025): an eviction indicator that keeps tokens with sustained
//! and shifting importance — mean plus `gamma` × variance of the attention the last
//! `window_size` queries pay to each token, pooled and averaged over each KV head's group —
//! and a layer preference (attention dispersion in space and shift in time) from which the
//! CAKE layer budget splits the model's total budget across layers.

use super::attention_weights::{append_protected, group_mean, window_attention};
use super::{QueryWindow, ScoreInput, Scorer};
use crate::error::{KvError, Result};
use crate::registry::{Builder, ParamSpec, Stage};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct Cake {
    window: usize,
    kernel: usize,
    gamma: f64,
}

impl Cake {
    pub fn new(window_size: usize, kernel_size: usize, gamma: f64) -> Result<Self> {
        if window_size < 2 {
            return Err(KvError::invalid(
                "window_size",
                format!("got {window_size}, expected at least 2 queries (a variance over them)"),
            ));
        }
        if kernel_size == 0 || kernel_size.is_multiple_of(2) {
            return Err(KvError::invalid(
                "kernel_size",
                format!("got {kernel_size}, expected an odd number >= 1"),
            ));
        }
        if !(gamma >= 0.0 && gamma.is_finite()) {
            return Err(KvError::invalid(
                "gamma",
                format!("got {gamma}, expected a number >= 0"),
            ));
        }
        Ok(Cake {
            window: window_size,
            kernel: kernel_size,
            gamma,
        })
    }
}

/// Window attention over the tokens before the window: (batch, q_heads, w, T − w).
fn prefix_attention(queries: &Tensor, keys: &Tensor, window: usize) -> Result<Tensor> {
    let t = keys.size()[2];
    let w = window as i64;
    if t <= w {
        return Err(KvError::invalid(
            "window_size",
            format!("the window ({w} tokens) must be shorter than the prompt ({t} tokens)"),
        ));
    }
    let q = queries.f_narrow(2, queries.size()[2] - w, w)?;
    Ok(window_attention(&q, keys)?.f_narrow(-1, 0, t - w)?)
}

/// CAKE's layer preference from the attention of the last `window` queries to the tokens
/// before them: dispersion^(1/τ1) · shift^(1/τ2), where dispersion = −Σ A·log(A + 1e−10)
/// (entropy of all weights, in float32) and shift = Σ over heads and tokens of the
/// variance of A over the window's queries. Higher = the layer needs more cache.
pub fn cake_preference(
    queries: &Tensor,
    keys: &Tensor,
    window: usize,
    tau1: f64,
    tau2: f64,
) -> Result<f64> {
    let a = prefix_attention(queries, keys, window)?.f_to_kind(Kind::Float)?;
    let dispersion = a
        .f_mul(&a.f_add_scalar(1e-10)?.f_log()?)?
        .f_sum(Kind::Double)?
        .f_neg()?
        .f_double_value(&[])?;
    let shift = a
        .f_var_correction(Some([2i64].as_slice()), 1, false)?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?;
    let preference = dispersion.max(0.0).powf(1.0 / tau1) * shift.max(0.0).powf(1.0 / tau2);
    Ok(if preference.is_finite() {
        preference
    } else {
        0.0
    })
}

impl Scorer for Cake {
    fn name(&self) -> &'static str {
        "cake"
    }

    fn query_window(&self) -> QueryWindow {
        QueryWindow::Last(self.window)
    }

    fn protected_window(&self) -> usize {
        self.window
    }

    fn score(&self, input: &ScoreInput<'_>) -> Result<Tensor> {
        let queries = input.require_queries(self.name())?;
        let a = prefix_attention(queries, input.keys, self.window)?;
        let mean = a.f_mean_dim(2, false, a.kind())?;
        let var = a.f_var_correction(Some([2i64].as_slice()), 1, false)?;
        let indicator = mean.f_add(&var.f_mul_scalar(self.gamma)?)?;
        let k = self.kernel as i64;
        let pooled = indicator.f_avg_pool1d([k], [1], [k / 2], false, true)?;
        let scores = group_mean(&pooled, input.keys.size()[1])?;
        append_protected(&scores, self.window as i64)
    }
}

/// The registry entry (`crate::registry`).
pub const STAGE: Stage = Stage {
    name: "cake",
    aliases: &[],
    summary: "CAKE's indicator: mean + gamma × variance of the window's attention, pooled",
    reference: "Qin et al., 2025",
    url: "https://arxiv.org/abs/2503.12491",
    params: &[
        ParamSpec::int(
            "window_size",
            32,
            2,
            "last prompt queries whose attention is measured (always kept)",
        ),
        ParamSpec::int("kernel_size", 5, 1, "odd width of the average pooling"),
        ParamSpec::float(
            "gamma",
            200.0,
            0.0,
            None,
            "weight of the variance over the window",
        ),
    ],
    build: Builder::Scorer(|a| {
        Ok(Box::new(Cake::new(
            a.usize("window_size")?,
            a.usize("kernel_size")?,
            a.f64("gamma")?,
        )?))
    }),
};
