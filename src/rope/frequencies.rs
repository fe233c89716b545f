//! The rotary frequencies θ_f (`inv_freq`) and the attention scaling of every rope type
//! transformers knows, computed in f64 from plain parameters.
//!
//! Frequency f (0 ≤ f < rotary_dim/2) of the unscaled rotation is θ_f = base^(−2f/rotary_dim).
//! The types differ in how they rescale θ_f:
//!
//! | type | θ_f | attention scaling |
//! |---|---|---|
//! | `default` | base^(−2f/d) | 1 |
//! | `linear` | θ_f / factor | 1 |
//! | `dynamic` | same formula with base' = base·(factor·L/M − factor + 1)^(d/(d−2)), L = max(seq_len, M) | 1 |
//! | `yarn` | blend of θ_f and θ_f/factor by a linear ramp over f between the correction dims of `beta_fast`/`beta_slow` | `attention_factor`, else 0.1·ln(factor)+1 (mscale ratio) |
//! | `llama3` | θ_f if wavelength < M₀/high, θ_f/factor if > M₀/low, smooth blend in between | 1 |
//! | `longrope` | θ_f / ext_f, ext = `long_factor` if seq_len > M₀ else `short_factor` | `attention_factor`, else √(1 + ln(factor)/ln M₀) |
//!
//! (d = rotary_dim, M = max_position_embeddings, M₀ = original_max_position_embeddings.)
//! These follow the semantics of transformers' `modeling_rope_utils`; the tests compare
//! against it.

use crate::error::{KvError, Result};
use std::f64::consts::PI;

/// The plain unscaled frequencies base^(−2f/dim), f = 0..dim/2.
pub fn default_inv_freq(base: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|f| 1.0 / base.powf((2 * f) as f64 / dim as f64))
        .collect()
}

/// How a rope type rescales the default frequencies; every parameter resolved and checked.
#[derive(Clone, Debug, PartialEq)]
pub enum Scaling {
    Default,
    Linear {
        factor: f64,
    },
    /// NTK-aware scaling whose base grows with the sequence length.
    Dynamic {
        factor: f64,
        max_position_embeddings: usize,
    },
    Yarn(Yarn),
    Llama3(Llama3),
    LongRope(LongRope),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub truncate: bool,
    pub attention_factor: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Llama3 {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f64,
}

/// The names of the supported rope types, as transformers spells them.
pub const ROPE_TYPES: [&str; 6] = ["default", "linear", "dynamic", "yarn", "llama3", "longrope"];

impl Scaling {
    /// The transformers name of this type.
    pub fn name(&self) -> &'static str {
        match self {
            Scaling::Default => "default",
            Scaling::Linear { .. } => "linear",
            Scaling::Dynamic { .. } => "dynamic",
            Scaling::Yarn(_) => "yarn",
            Scaling::Llama3(_) => "llama3",
            Scaling::LongRope(_) => "longrope",
        }
    }

    /// The factor cos/sin are multiplied by (1 except for yarn and longrope).
    pub fn attention_scaling(&self) -> f64 {
        match self {
            Scaling::Yarn(y) => y.attention_factor,
            Scaling::LongRope(l) => l.attention_factor,
            _ => 1.0,
        }
    }

    /// Whether the frequencies depend on the sequence length.
    pub fn depends_on_seq_len(&self) -> bool {
        matches!(self, Scaling::Dynamic { .. } | Scaling::LongRope(_))
    }

    /// θ_f for f = 0..dim/2. `seq_len` (the length of the sequence being processed; None =
    /// the configured length) only matters for `dynamic` and `longrope`.
    pub fn inv_freq(&self, base: f64, dim: usize, seq_len: Option<usize>) -> Vec<f64> {
        match self {
            Scaling::Default => default_inv_freq(base, dim),
            Scaling::Linear { factor } => default_inv_freq(base, dim)
                .into_iter()
                .map(|t| t / factor)
                .collect(),
            Scaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                let m = *max_position_embeddings as f64;
                let len = seq_len.map_or(m, |s| (s as f64).max(m));
                let d = dim as f64;
                let grown = base * (factor * len / m - (factor - 1.0)).powf(d / (d - 2.0));
                default_inv_freq(grown, dim)
            }
            Scaling::Yarn(y) => y.inv_freq(base, dim),
            Scaling::Llama3(l) => l.inv_freq(base, dim),
            Scaling::LongRope(l) => {
                let long = seq_len.is_some_and(|s| s > l.original_max_position_embeddings);
                let ext = if long {
                    &l.long_factor
                } else {
                    &l.short_factor
                };
                default_inv_freq(base, dim)
                    .into_iter()
                    .zip(ext)
                    .map(|(t, e)| t / e)
                    .collect()
            }
        }
    }
}

impl Yarn {
    /// The (fractional) frequency index whose wavelength fits `rotations` times into the
    /// original context.
    fn correction_dim(&self, rotations: f64, dim: usize, base: f64) -> f64 {
        let m0 = self.original_max_position_embeddings as f64;
        dim as f64 * (m0 / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln())
    }

    fn inv_freq(&self, base: f64, dim: usize) -> Vec<f64> {
        let mut low = self.correction_dim(self.beta_fast, dim, base);
        let mut high = self.correction_dim(self.beta_slow, dim, base);
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min((dim - 1) as f64);
        if low == high {
            high += 0.001; // a zero-width ramp would divide by zero
        }
        default_inv_freq(base, dim)
            .into_iter()
            .enumerate()
            .map(|(f, t)| {
                let ramp = ((f as f64 - low) / (high - low)).clamp(0.0, 1.0);
                // ramp 0: keep θ_f (extrapolate); ramp 1: θ_f / factor (interpolate).
                let keep = 1.0 - ramp;
                t / self.factor * (1.0 - keep) + t * keep
            })
            .collect()
    }
}

impl Llama3 {
    fn inv_freq(&self, base: f64, dim: usize) -> Vec<f64> {
        let m0 = self.original_max_position_embeddings as f64;
        let low_wavelen = m0 / self.low_freq_factor;
        let high_wavelen = m0 / self.high_freq_factor;
        default_inv_freq(base, dim)
            .into_iter()
            .map(|t| {
                let wavelen = 2.0 * PI / t;
                if wavelen < high_wavelen {
                    t
                } else if wavelen > low_wavelen {
                    t / self.factor
                } else {
                    let smooth = (m0 / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    (1.0 - smooth) * t / self.factor + smooth * t
                }
            })
            .collect()
    }
}

/// YaRN's magnitude correction 0.1·m·ln(s) + 1 (1 for s ≤ 1).
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// The parameters of a rope type as read from a model config, before validation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScalingParams {
    pub factor: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub original_max_position_embeddings: Option<usize>,
    pub attention_factor: Option<f64>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub truncate: Option<bool>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub short_factor: Option<Vec<f64>>,
    pub long_factor: Option<Vec<f64>>,
}

fn missing(rope_type: &str, name: &str, what: &str) -> KvError {
    KvError::invalid(
        name,
        format!("rope_type {rope_type:?} requires `{name}` ({what}), which is missing"),
    )
}

fn positive(name: &str, v: f64) -> Result<f64> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(KvError::invalid(
            name,
            format!("got {v}, expected a finite number > 0"),
        ))
    }
}

fn positive_len(name: &str, v: usize) -> Result<usize> {
    if v > 0 {
        Ok(v)
    } else {
        Err(KvError::invalid(name, "got 0, expected a length >= 1"))
    }
}

impl ScalingParams {
    fn factor(&self, rope_type: &str) -> Result<f64> {
        let f = self.factor.ok_or_else(|| {
            missing(
                rope_type,
                "factor",
                "the context extension factor, e.g. 8.0",
            )
        })?;
        positive("factor", f)
    }

    fn max_len(&self, rope_type: &str) -> Result<usize> {
        let m = self.max_position_embeddings.ok_or_else(|| {
            missing(
                rope_type,
                "max_position_embeddings",
                "the model's context length",
            )
        })?;
        positive_len("max_position_embeddings", m)
    }

    /// `original_max_position_embeddings`, defaulting to `max_position_embeddings` as
    /// transformers does.
    fn original_len(&self, rope_type: &str) -> Result<usize> {
        let m = self
            .original_max_position_embeddings
            .or(self.max_position_embeddings)
            .ok_or_else(|| {
                missing(
                    rope_type,
                    "original_max_position_embeddings",
                    "the pretraining context length",
                )
            })?;
        positive_len("original_max_position_embeddings", m)
    }

    /// `factor`, or the ratio max/original context length when it is not given (as
    /// transformers does for yarn and longrope).
    fn factor_or_ratio(&self, rope_type: &str, original: usize) -> Result<f64> {
        match (self.factor, self.max_position_embeddings) {
            (Some(f), _) => positive("factor", f),
            (None, Some(m)) => positive("factor", m as f64 / original as f64),
            (None, None) => Err(missing(
                rope_type,
                "factor",
                "the context extension factor; or give max_position_embeddings",
            )),
        }
    }

    fn attention_factor(&self) -> Result<Option<f64>> {
        self.attention_factor
            .map(|a| positive("attention_factor", a))
            .transpose()
    }

    fn list(&self, rope_type: &str, name: &str, n_freq: usize) -> Result<Vec<f64>> {
        let list = match name {
            "short_factor" => &self.short_factor,
            _ => &self.long_factor,
        };
        let list = list.as_ref().ok_or_else(|| {
            missing(
                rope_type,
                name,
                "a list of rotary_dim/2 per-frequency factors",
            )
        })?;
        if list.len() != n_freq {
            return Err(KvError::invalid(
                name,
                format!(
                    "has {} entries, expected rotary_dim/2 = {n_freq}",
                    list.len()
                ),
            ));
        }
        for &v in list {
            positive(name, v)?;
        }
        Ok(list.clone())
    }

    /// Validates the parameters of `rope_type` and resolves its defaults.
    pub fn resolve(&self, rope_type: &str, rotary_dim: usize) -> Result<Scaling> {
        Ok(match rope_type {
            "default" => Scaling::Default,
            "linear" => Scaling::Linear {
                factor: self.factor(rope_type)?,
            },
            "dynamic" => Scaling::Dynamic {
                factor: self.factor(rope_type)?,
                max_position_embeddings: self.max_len(rope_type)?,
            },
            "yarn" => {
                let original = self.original_len(rope_type)?;
                let factor = self.factor_or_ratio(rope_type, original)?;
                let attention_factor = match self.attention_factor()? {
                    Some(a) => a,
                    None => match (self.mscale, self.mscale_all_dim) {
                        // transformers tests these for truthiness: 0 counts as unset.
                        (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                            yarn_mscale(factor, m) / yarn_mscale(factor, ma)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    },
                };
                let beta = |v: Option<f64>, default: f64, name: &str| -> Result<f64> {
                    match v {
                        // transformers: `beta_fast or 32` — a 0 falls back to the default.
                        Some(b) if b != 0.0 => positive(name, b),
                        _ => Ok(default),
                    }
                };
                Scaling::Yarn(Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: beta(self.beta_fast, 32.0, "beta_fast")?,
                    beta_slow: beta(self.beta_slow, 1.0, "beta_slow")?,
                    truncate: self.truncate.unwrap_or(true),
                    attention_factor,
                })
            }
            "llama3" => {
                let low = self
                    .low_freq_factor
                    .ok_or_else(|| missing(rope_type, "low_freq_factor", "e.g. 1.0"))?;
                let high = self
                    .high_freq_factor
                    .ok_or_else(|| missing(rope_type, "high_freq_factor", "e.g. 4.0"))?;
                let (low, high) = (
                    positive("low_freq_factor", low)?,
                    positive("high_freq_factor", high)?,
                );
                if high <= low {
                    return Err(KvError::invalid(
                        "high_freq_factor",
                        format!(
                            "got {high}, expected a value greater than low_freq_factor = {low}"
                        ),
                    ));
                }
                Scaling::Llama3(Llama3 {
                    factor: self.factor(rope_type)?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: self
                        .original_max_position_embeddings
                        .ok_or_else(|| {
                            missing(
                                rope_type,
                                "original_max_position_embeddings",
                                "the pretraining context length, e.g. 8192",
                            )
                        })
                        .and_then(|m| positive_len("original_max_position_embeddings", m))?,
                })
            }
            "longrope" => {
                let n_freq = rotary_dim / 2;
                let original = self.original_len(rope_type)?;
                let factor = self.factor_or_ratio(rope_type, original)?;
                let attention_factor = match self.attention_factor()? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                Scaling::LongRope(LongRope {
                    short_factor: self.list(rope_type, "short_factor", n_freq)?,
                    long_factor: self.list(rope_type, "long_factor", n_freq)?,
                    original_max_position_embeddings: original,
                    attention_factor,
                })
            }
            other => {
                return Err(KvError::invalid(
                    "rope_type",
                    format!("unknown rope type {other:?}; expected one of {ROPE_TYPES:?}"),
                ))
            }
        })
    }
}
