//! How a layer's budget follows from the mean budget: the same for every layer, PyramidKV's
//! linear decrease with depth, CAKE's split by layer preference, or an explicit ratio per
//! layer. One trait, one struct per rule; the mean over layers stays the requested budget
//! (up to rounding) for the first three.

use crate::budget::Budget;
use crate::error::{KvError, Result};
use crate::policies::cake_preference;
use crate::registry::{Args, BuildContext, Builder, ParamSpec, ParamType, Stage};
use tch::Tensor;

/// A layer budget: how many tokens layer `layer_idx` of `n_layers` keeps.
pub trait LayerBudget: Send + Sync + std::fmt::Debug {
    /// The registry name (`"pyramid"`).
    fn name(&self) -> &'static str;

    /// Tokens kept by layer `layer_idx` of `n_layers` out of `n_tokens`, for the mean
    /// per-layer budget `budget`.
    fn n_kept(
        &self,
        budget: &Budget,
        n_tokens: usize,
        layer_idx: usize,
        n_layers: usize,
    ) -> Result<usize>;

    /// Whether this rule can never evict a token under `budget`.
    fn keeps_everything(&self, budget: &Budget) -> bool {
        budget.keeps_everything()
    }

    /// Whether every layer must be scored before any layer's count is known (CAKE): then
    /// compression is scoring per layer, [`allocate`](Self::allocate) once, selection per
    /// layer.
    fn needs_all_layers(&self) -> bool {
        false
    }

    /// The last prompt queries this rule reads (CAKE's window), if any.
    fn query_window(&self) -> Option<usize> {
        None
    }

    /// The layer's preference (CAKE) from its post-RoPE `queries` (the last ones) and
    /// `keys`; 0 for rules that do not need one.
    fn preference(&self, _queries: Option<&Tensor>, _keys: &Tensor) -> Result<f64> {
        Ok(0.0)
    }

    /// Per-layer counts once every layer's token count and preference are known; each
    /// layer keeps at least `floor` (its protected window). The per-layer means by default.
    fn allocate(
        &self,
        budget: &Budget,
        n_tokens: &[usize],
        preferences: &[f64],
        _floor: usize,
    ) -> Result<Vec<usize>> {
        if n_tokens.len() != preferences.len() {
            return Err(KvError::invalid(
                "preferences",
                "one preference per layer is needed",
            ));
        }
        n_tokens.iter().map(|&t| budget.n_kept(t)).collect()
    }
}

/// Every layer keeps the mean budget.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Uniform;

impl LayerBudget for Uniform {
    fn name(&self) -> &'static str {
        "uniform"
    }

    fn n_kept(&self, budget: &Budget, n_tokens: usize, _: usize, _: usize) -> Result<usize> {
        budget.n_kept(n_tokens)
    }
}

/// PyramidKV: layer 0 keeps most, the last layer least. `beta` (>= 1) sets the ratio of the
/// mean to the smallest budget; `window` tokens (the scorer's protected window) are the
/// floor of every layer's budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pyramid {
    pub beta: f64,
    pub window: usize,
}

impl LayerBudget for Pyramid {
    fn name(&self) -> &'static str {
        "pyramid"
    }

    /// With N the mean budget as a float and w the window: the budgets run linearly from
    /// `max = 2N − N/β` (clamped to T − w, the smallest then rising to keep the mean N)
    /// down to `min = N/β`, rounded half to even; when that sequence does not fit in [w, T]
    /// every layer keeps round(N), like a uniform budget.
    ///
    /// ```
    /// use kvpress_rs::budget::Budget;
    /// use kvpress_rs::press::{LayerBudget, Pyramid};
    /// let p = Pyramid { beta: 20.0, window: 64 };
    /// let b = Budget::ratio(0.5).unwrap();
    /// let per_layer: Vec<usize> = (0..32).map(|l| p.n_kept(&b, 4096, l, 32).unwrap()).collect();
    /// assert_eq!((per_layer[0], per_layer[31]), (3994, 102));
    /// assert_eq!(per_layer.iter().sum::<usize>(), 32 * 2048);
    /// ```
    fn n_kept(
        &self,
        budget: &Budget,
        n_tokens: usize,
        layer_idx: usize,
        n_layers: usize,
    ) -> Result<usize> {
        budget.n_kept(n_tokens)?; // validates the budget and the sequence
        let t = n_tokens as f64;
        let w = self.window as f64;
        let mean = match *budget {
            Budget::Ratio(r) => t * (1.0 - r),
            Budget::MaxTokens(n) => (n as f64).min(t),
        };
        let mut min = mean / self.beta;
        let mut max = 2.0 * mean - min;
        if max >= t - w {
            max = t - w;
            min = 2.0 * mean - max;
        }
        let kept = if !(t >= max && max >= min && min >= w) {
            mean.round_ties_even().max(1.0)
        } else {
            let step = if n_layers > 1 {
                (max - min) / (n_layers - 1) as f64
            } else {
                0.0
            };
            (max - layer_idx as f64 * step).round_ties_even()
        };
        Ok((kept as usize).clamp(1, n_tokens))
    }
}

/// CAKE: the model's total budget is split across layers in proportion to each layer's
/// preference (attention dispersion^(1/tau1) × shift^(1/tau2), measured on the last
/// `window` queries). Needs every layer's preference, so it is allocated after the whole
/// prefill forward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cake {
    pub tau1: f64,
    pub tau2: f64,
    pub window: usize,
}

impl LayerBudget for Cake {
    fn name(&self) -> &'static str {
        "cake"
    }

    /// Alone, before the allocation, a layer keeps the mean.
    fn n_kept(&self, budget: &Budget, n_tokens: usize, _: usize, _: usize) -> Result<usize> {
        budget.n_kept(n_tokens)
    }

    fn needs_all_layers(&self) -> bool {
        true
    }

    fn query_window(&self) -> Option<usize> {
        Some(self.window)
    }

    fn preference(&self, queries: Option<&Tensor>, keys: &Tensor) -> Result<f64> {
        let queries = queries.ok_or_else(|| {
            KvError::invalid(
                "queries",
                "the CAKE layer budget measures each layer's attention: queries are needed",
            )
        })?;
        cake_preference(queries, keys, self.window, self.tau1, self.tau2)
    }

    /// CAKE's split of the total budget (the sum of every layer's mean budget) in
    /// proportion to `preferences`, each layer between `floor` (at least 1) and its token
    /// count. As in CAKE, tokens a capped layer cannot take are spread evenly over the
    /// layers below their cap (whole tokens going first to the layers with the most
    /// preference), so the total is kept exactly. With no positive preference every layer
    /// keeps its mean.
    ///
    /// ```
    /// use kvpress_rs::budget::Budget;
    /// use kvpress_rs::press::{Cake, LayerBudget};
    /// let cake = Cake { tau1: 1.0, tau2: 1.0, window: 2 };
    /// let b = Budget::ratio(0.5).unwrap();
    /// let kept = cake.allocate(&b, &[100, 100, 100, 100], &[3.0, 1.0, 1.0, 1.0], 2).unwrap();
    /// assert_eq!(kept, [100, 34, 33, 33]);
    /// assert_eq!(kept.iter().sum::<usize>(), 200);
    /// ```
    fn allocate(
        &self,
        budget: &Budget,
        n_tokens: &[usize],
        preferences: &[f64],
        floor: usize,
    ) -> Result<Vec<usize>> {
        let means = Uniform.allocate(budget, n_tokens, preferences, floor)?;
        let weight: f64 = preferences
            .iter()
            .filter(|p| p.is_finite() && **p > 0.0)
            .sum();
        if weight <= 0.0 {
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

/// An explicit compression ratio per layer (kvpress's `PerLayerCompressionPress`): layer l
/// keeps `int(T · (1 − ratios[l]))`.
#[derive(Clone, Debug, PartialEq)]
pub struct Explicit {
    pub ratios: Vec<Budget>,
}

impl Explicit {
    /// One ratio in [0, 1) per layer of the model.
    pub fn new(ratios: &[f64], n_layers: usize) -> Result<Self> {
        if ratios.len() != n_layers {
            return Err(KvError::invalid(
                "layer_ratios",
                format!(
                    "got {} ratios, expected one per layer ({n_layers})",
                    ratios.len()
                ),
            ));
        }
        let ratios = ratios
            .iter()
            .map(|&r| {
                Budget::ratio(r).map_err(|_| {
                    KvError::invalid(
                        "layer_ratios",
                        format!("got {r}, expected every ratio in [0, 1)"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Explicit { ratios })
    }
}

impl LayerBudget for Explicit {
    fn name(&self) -> &'static str {
        "explicit"
    }

    fn n_kept(&self, _: &Budget, n_tokens: usize, layer_idx: usize, _: usize) -> Result<usize> {
        let budget = self.ratios.get(layer_idx).ok_or_else(|| {
            KvError::invalid(
                "layer_idx",
                format!(
                    "layer {layer_idx} has no ratio (layer_ratios has {})",
                    self.ratios.len()
                ),
            )
        })?;
        budget.n_kept(n_tokens)
    }

    fn keeps_everything(&self, _: &Budget) -> bool {
        self.ratios.iter().all(Budget::keeps_everything)
    }
}

fn build_pyramid(a: &Args, ctx: &BuildContext) -> Result<Box<dyn LayerBudget>> {
    Ok(Box::new(Pyramid {
        beta: a.f64("beta")?,
        window: ctx.scorer_window,
    }))
}

fn build_cake(a: &Args, _: &BuildContext) -> Result<Box<dyn LayerBudget>> {
    Ok(Box::new(Cake {
        tau1: a.f64("tau1")?,
        tau2: a.f64("tau2")?,
        window: a.usize("cake_window")?,
    }))
}

fn build_explicit(a: &Args, ctx: &BuildContext) -> Result<Box<dyn LayerBudget>> {
    if ctx.budget_given {
        return Err(KvError::invalid(
            "layer_ratios",
            "give either per-layer `layer_ratios` or `compression_ratio`/`max_tokens`, not both",
        ));
    }
    Ok(Box::new(Explicit::new(
        a.floats("layer_ratios")?,
        ctx.n_layers,
    )?))
}

/// The registry entries of the layer budgets.
pub static STAGES: [Stage; 4] = [
    Stage {
        name: "uniform",
        aliases: &[],
        summary: "every layer keeps the same number of tokens",
        reference: "",
        url: "",
        params: &[],
        build: Builder::LayerBudget(|_, _| Ok(Box::new(Uniform))),
    },
    Stage {
        name: "pyramid",
        aliases: &[],
        summary: "budgets decrease linearly with depth around the requested mean (PyramidKV)",
        reference: "Cai et al., 2024",
        url: "https://arxiv.org/abs/2406.02069",
        params: &[ParamSpec::float(
            "beta",
            20.0,
            1.0,
            None,
            "the mean budget over the smallest one (the last layer's)",
        )],
        build: Builder::LayerBudget(build_pyramid),
    },
    Stage {
        name: "cake",
        aliases: &[],
        summary: "the model's total split across layers by attention dispersion and shift (CAKE)",
        reference: "Qin et al., 2025",
        url: "https://arxiv.org/abs/2503.12491",
        params: &[
            ParamSpec {
                min_open: true,
                ..ParamSpec::float("tau1", 1.6, 0.0, None, "temperature of the dispersion")
            },
            ParamSpec {
                min_open: true,
                ..ParamSpec::float("tau2", 0.6, 0.0, None, "temperature of the shift")
            },
            ParamSpec::int(
                "cake_window",
                32,
                2,
                "last prompt queries that measure each layer",
            ),
        ],
        build: Builder::LayerBudget(build_cake),
    },
    Stage {
        name: "explicit",
        aliases: &["per_layer"],
        summary: "an explicit compression ratio per layer (kvpress's PerLayerCompressionPress)",
        reference: "NVIDIA kvpress",
        url: "https://github.com/NVIDIA/kvpress",
        params: &[ParamSpec {
            name: "layer_ratios",
            ty: ParamType::Floats,
            default: crate::registry::Default::Required,
            min: Some(0.0),
            max: Some(1.0),
            min_open: false,
            max_open: true,
            choices: &[],
            doc: "the compression ratio of each layer, in [0, 1)",
        }],
        build: Builder::LayerBudget(build_explicit),
    },
];
