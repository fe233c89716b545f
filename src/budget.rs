//! How many tokens a layer keeps: a compression ratio or a fixed token budget.

use crate::error::{KvError, Result};

/// The per-layer token budget of a compressing cache.
///
/// `Ratio(r)` removes the fraction `r` of the tokens (kvpress's `compression_ratio`, in
/// [0, 1)); `MaxTokens(n)` keeps at most `n` tokens per layer and head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    Ratio(f64),
    MaxTokens(usize),
}

impl Budget {
    /// Builds a budget from the two user-facing keyword arguments, of which at most one may
    /// be given. Neither means ratio 0 (keep everything).
    ///
    /// ```
    /// use kvpress_rs::Budget;
    /// assert_eq!(Budget::from_args(Some(0.5), None).unwrap().n_kept(10).unwrap(), 5);
    /// assert_eq!(Budget::from_args(None, Some(4)).unwrap().n_kept(10).unwrap(), 4);
    /// assert!(Budget::from_args(Some(1.0), None).is_err());
    /// ```
    pub fn from_args(compression_ratio: Option<f64>, max_tokens: Option<i64>) -> Result<Self> {
        match (compression_ratio, max_tokens) {
            (Some(_), Some(_)) => Err(KvError::invalid(
                "max_tokens",
                "give either `compression_ratio` or `max_tokens`, not both",
            )),
            (None, Some(n)) => Self::max_tokens(n),
            (Some(r), None) => Self::ratio(r),
            (None, None) => Ok(Budget::Ratio(0.0)),
        }
    }

    /// A compression ratio in [0, 1): the fraction of tokens removed.
    pub fn ratio(r: f64) -> Result<Self> {
        if !r.is_finite() || !(0.0..1.0).contains(&r) {
            return Err(KvError::invalid(
                "compression_ratio",
                format!("got {r}, expected a number in [0, 1) (the fraction of tokens removed)"),
            ));
        }
        Ok(Budget::Ratio(r))
    }

    /// A fixed per-layer budget of `n` > 0 tokens.
    pub fn max_tokens(n: i64) -> Result<Self> {
        if n <= 0 {
            return Err(KvError::invalid(
                "max_tokens",
                format!("got {n}, expected a positive token count"),
            ));
        }
        Ok(Budget::MaxTokens(n as usize))
    }

    /// Number of tokens kept out of `n_tokens`: `int(n_tokens * (1 - ratio))` (the same
    /// float arithmetic as Python's, hence the same counts as kvpress) or
    /// `min(n_tokens, max_tokens)`.
    ///
    /// Unlike kvpress, which silently keeps one token when the ratio would keep none, a
    /// ratio that keeps zero tokens is an error: a cache with nothing in it cannot answer.
    pub fn n_kept(&self, n_tokens: usize) -> Result<usize> {
        if n_tokens == 0 {
            return Err(KvError::empty(
                "keys",
                "cannot compress a sequence of zero tokens",
            ));
        }
        // The variants are public: re-validate in case one was built without the checks.
        match *self {
            Budget::Ratio(r) => Self::ratio(r).map(|_| ())?,
            Budget::MaxTokens(n) => Self::max_tokens(n as i64).map(|_| ())?,
        }
        match *self {
            Budget::Ratio(r) => {
                let kept = (n_tokens as f64 * (1.0 - r)) as usize;
                if kept == 0 {
                    return Err(KvError::invalid(
                        "compression_ratio",
                        format!(
                            "ratio {r} keeps int({n_tokens} * (1 - {r})) = 0 of {n_tokens} tokens; \
                             lower the ratio so that at least one token is kept"
                        ),
                    ));
                }
                Ok(kept)
            }
            Budget::MaxTokens(n) => Ok(n.min(n_tokens)),
        }
    }

    /// Whether this budget can never remove a token.
    pub fn keeps_everything(&self) -> bool {
        matches!(*self, Budget::Ratio(r) if r == 0.0)
    }
}

/// How a layer's budget follows from the mean budget: the same for every layer,
/// PyramidKV's linear decrease with depth (kvpress's formula), or CAKE's split by layer
/// preference. The mean over layers stays the requested budget (up to rounding).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LayerBudget {
    Uniform,
    /// PyramidKV: layer 0 keeps most, the last layer least. `beta` (>= 1) sets the ratio
    /// of the smallest budget to the mean; `window` tokens (the scorer's protected
    /// window) are the floor of every layer's budget.
    Pyramid {
        beta: f64,
        window: usize,
    },
    /// CAKE: the model's total budget is split across layers in proportion to each layer's
    /// preference (attention dispersion^(1/tau1) × shift^(1/tau2), measured on the last
    /// `window` queries). Needs every layer's preference, so it is allocated after the
    /// whole prefill forward ([`LayerBudget::allocate`]).
    Cake {
        tau1: f64,
        tau2: f64,
        window: usize,
    },
}

impl LayerBudget {
    /// Parses `"uniform"`, `"pyramid"` (PyramidKV's β, 20 by default) or `"cake"` (CAKE's
    /// temperatures τ1, τ2 and window). `window` is the scorer's protected window.
    pub fn from_name(
        name: &str,
        beta: f64,
        window: usize,
        cake: (f64, f64, usize),
    ) -> Result<Self> {
        match name {
            "uniform" => Ok(LayerBudget::Uniform),
            "cake" => {
                let (tau1, tau2, cake_window) = cake;
                for (argument, tau) in [("tau1", tau1), ("tau2", tau2)] {
                    if !(tau > 0.0 && tau.is_finite()) {
                        return Err(KvError::invalid(
                            argument,
                            format!("got {tau}, expected a number > 0"),
                        ));
                    }
                }
                if cake_window < 2 {
                    return Err(KvError::invalid(
                        "cake_window",
                        format!("got {cake_window}, expected at least 2"),
                    ));
                }
                Ok(LayerBudget::Cake {
                    tau1,
                    tau2,
                    window: cake_window,
                })
            }
            "pyramid" => {
                if !(beta >= 1.0 && beta.is_finite()) {
                    return Err(KvError::invalid(
                        "beta",
                        format!("got {beta}, expected a number >= 1"),
                    ));
                }
                Ok(LayerBudget::Pyramid { beta, window })
            }
            other => Err(KvError::invalid(
                "layer_budget",
                format!(
                    "unknown layer budget {other:?}; expected \"uniform\", \"pyramid\" or \"cake\""
                ),
            )),
        }
    }

    /// Tokens kept by layer `layer_idx` of `n_layers` out of `n_tokens`, for the mean
    /// per-layer budget `budget`.
    ///
    /// Pyramid (with N the mean budget as a float and w the window): the budgets run
    /// linearly from `max = 2N − N/β` (clamped to T − w, the smallest then rising to keep
    /// the mean N) down to `min = N/β`, rounded half to even; when that sequence does not
    /// fit in [w, T] every layer keeps round(N), like a uniform budget.
    ///
    /// ```
    /// use kvpress_rs::budget::{Budget, LayerBudget};
    /// let p = LayerBudget::Pyramid { beta: 20.0, window: 64 };
    /// let b = Budget::ratio(0.5).unwrap();
    /// let per_layer: Vec<usize> = (0..32).map(|l| p.n_kept(&b, 4096, l, 32).unwrap()).collect();
    /// assert_eq!((per_layer[0], per_layer[31]), (3994, 102));
    /// assert_eq!(per_layer.iter().sum::<usize>(), 32 * 2048);
    /// ```
    pub fn n_kept(
        &self,
        budget: &Budget,
        n_tokens: usize,
        layer_idx: usize,
        n_layers: usize,
    ) -> Result<usize> {
        match *self {
            // CAKE's share is only known once every layer is scored; alone, a layer keeps the mean.
            LayerBudget::Uniform | LayerBudget::Cake { .. } => budget.n_kept(n_tokens),
            LayerBudget::Pyramid { beta, window } => {
                budget.n_kept(n_tokens)?; // validates the budget and the sequence
                let t = n_tokens as f64;
                let w = window as f64;
                let mean = match *budget {
                    Budget::Ratio(r) => t * (1.0 - r),
                    Budget::MaxTokens(n) => (n as f64).min(t),
                };
                let mut min = mean / beta;
                let mut max = 2.0 * mean - min;
                if max >= t - w {
                    max = t - w;
                    min = 2.0 * mean - max;
                }
                let kept = if !(t >= max && max >= min && min >= w) {
                    round_half_even(mean).max(1.0)
                } else {
                    let step = if n_layers > 1 {
                        (max - min) / (n_layers - 1) as f64
                    } else {
                        0.0
                    };
                    round_half_even(max - layer_idx as f64 * step)
                };
                Ok((kept as usize).clamp(1, n_tokens))
            }
        }
    }
}

impl LayerBudget {
    /// Whether budgets need every layer's preference first (CAKE).
    pub fn needs_all_layers(&self) -> bool {
        matches!(self, LayerBudget::Cake { .. })
    }

    /// CAKE's split of the total budget (the sum of every layer's mean budget) in
    /// proportion to `preferences`, each layer between `floor` (its protected window, at
    /// least 1) and its token count. As in CAKE, tokens a capped layer cannot take are
    /// spread evenly over the layers below their cap (whole tokens going first to the
    /// layers with the most preference), so the total is kept exactly. `n_tokens[l]` and
    /// `preferences[l]` describe layer l; with no positive preference every layer keeps
    /// its mean.
    ///
    /// ```
    /// use kvpress_rs::budget::{Budget, LayerBudget};
    /// let cake = LayerBudget::Cake { tau1: 1.0, tau2: 1.0, window: 2 };
    /// let b = Budget::ratio(0.5).unwrap();
    /// let kept = cake.allocate(&b, &[100, 100, 100, 100], &[3.0, 1.0, 1.0, 1.0], 2).unwrap();
    /// assert_eq!(kept, [100, 34, 33, 33]);
    /// assert_eq!(kept.iter().sum::<usize>(), 200);
    /// ```
    pub fn allocate(
        &self,
        budget: &Budget,
        n_tokens: &[usize],
        preferences: &[f64],
        floor: usize,
    ) -> Result<Vec<usize>> {
        if n_tokens.len() != preferences.len() {
            return Err(KvError::invalid(
                "preferences",
                "one preference per layer is needed",
            ));
        }
        let means = n_tokens
            .iter()
            .map(|&t| budget.n_kept(t))
            .collect::<Result<Vec<_>>>()?;
        let weight: f64 = preferences
            .iter()
            .filter(|p| p.is_finite() && **p > 0.0)
            .sum();
        if weight <= 0.0 || !matches!(self, LayerBudget::Cake { .. }) {
            return Ok(means);
        }
        let total: usize = means.iter().sum();
        let lo: Vec<usize> = n_tokens.iter().map(|&t| floor.max(1).min(t)).collect();
        let share = |p: f64| {
            if p.is_finite() && p > 0.0 {
                p / weight
            } else {
                0.0
            }
        };
        let mut kept: Vec<usize> = n_tokens
            .iter()
            .zip(preferences)
            .zip(&lo)
            .map(|((&t, &p), &l)| ((share(p) * total as f64) as usize).clamp(l, t))
            .collect();
        // Layers by decreasing preference: they gain first and lose last.
        let mut order: Vec<usize> = (0..kept.len()).collect();
        order.sort_by(|&a, &b| {
            share(preferences[b])
                .total_cmp(&share(preferences[a]))
                .then(a.cmp(&b))
        });
        loop {
            let sum: usize = kept.iter().sum();
            if sum == total {
                break;
            }
            let movable: Vec<usize> = if sum < total {
                order
                    .iter()
                    .copied()
                    .filter(|&l| kept[l] < n_tokens[l])
                    .collect()
            } else {
                order
                    .iter()
                    .rev()
                    .copied()
                    .filter(|&l| kept[l] > lo[l])
                    .collect()
            };
            if movable.is_empty() {
                break;
            }
            let gap = sum.abs_diff(total);
            let each = (gap / movable.len()).max(1);
            for &l in &movable {
                let moved = kept.iter().sum::<usize>().abs_diff(total).min(each);
                if moved == 0 {
                    break;
                }
                kept[l] = if sum < total {
                    (kept[l] + moved).min(n_tokens[l])
                } else {
                    kept[l].saturating_sub(moved).max(lo[l])
                };
            }
        }
        Ok(kept)
    }
}

/// Python's `round`: to the nearest integer, ties to the even one.
fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// How a layer's budget is shared among its KV heads: equally, or AdaKV's adaptive split
/// (each head keeps at least `alpha` of the mean as a safeguard, the rest goes to the
/// highest scores across the layer's heads).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HeadBudget {
    Uniform,
    AdaKv { alpha: f64 },
}

impl HeadBudget {
    /// Parses `"uniform"` or `"adakv"` (safeguard `alpha`, 0.2 by default).
    pub fn from_name(name: &str, alpha: f64) -> Result<Self> {
        match name {
            "uniform" => Ok(HeadBudget::Uniform),
            "adakv" => {
                if !(0.0..=1.0).contains(&alpha) {
                    return Err(KvError::invalid(
                        "alpha_safeguard",
                        format!("got {alpha}, expected a number in [0, 1]"),
                    ));
                }
                Ok(HeadBudget::AdaKv { alpha })
            }
            other => Err(KvError::invalid(
                "head_budget",
                format!("unknown head budget {other:?}; expected \"uniform\" or \"adakv\""),
            )),
        }
    }
}
