//! One registry of every press stage: for each, its kind, name, aliases, one-line summary,
//! reference, parameters (type, default, range, one-line doc) and builder.
//!
//! Everything users can name comes from here: [`build_press`] resolves stage names and
//! routes keyword parameters to the stage that declares them (an unknown name lists every
//! name of its kind; a parameter no chosen stage takes lists the ones they do take), the
//! Python cache classes, the `.pyi` stub of `Press` and the README's methods table are
//! generated from [`stages`] and [`PRESETS`] (`python -m kvpress_rs._generate`), and a test
//! fails when a generated file is stale.
//!
//! Where the entries live: scorers in `policies/mod.rs` ([`crate::policies::SCORERS`]),
//! the other stages next to their trait in `press/` ([`crate::press::stages`]). Adding a
//! scorer is one file in `src/policies/`, one entry in that list, and its tests
//! (docs/ARCHITECTURE.md, "Adding a scorer").
//!
//! ```
//! use kvpress_rs::registry::{build_press, PressSpec};
//! use kvpress_rs::policies::{Params, ParamValue};
//! let mut params = Params::new();
//! params.insert("window_size", ParamValue::Int(32));
//! let press = build_press(PressSpec { scorer: "snapkv", params, ..PressSpec::default() }).unwrap();
//! assert_eq!(press.scorer().protected_window(), 32);
//! let err = build_press(PressSpec { scorer: "snapkvv", ..PressSpec::default() }).unwrap_err();
//! assert!(err.to_string().contains("expected one of") && err.to_string().contains("triattention"));
//! ```

use crate::budget::Budget;
use crate::error::{KvError, Result};
use crate::policies::{ParamValue, Params, Scorer};
use crate::press::{Eviction, HeadBudget, LayerBudget, Press, ScoreTransform, Selector};
use crate::rope::Rope;
use std::collections::BTreeMap;

/// What a stage does in the pipeline (scorer → transforms → layer budget → head budget →
/// selector → eviction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StageKind {
    Scorer,
    Transform,
    LayerBudget,
    HeadBudget,
    Selector,
    Eviction,
}

impl StageKind {
    /// The keyword argument that names a stage of this kind (`policy`, `layer_budget`, ...).
    pub fn argument(self) -> &'static str {
        match self {
            StageKind::Scorer => "policy",
            StageKind::Transform => "transforms",
            StageKind::LayerBudget => "layer_budget",
            StageKind::HeadBudget => "head_budget",
            StageKind::Selector => "selector",
            StageKind::Eviction => "eviction",
        }
    }

    pub fn all() -> [StageKind; 6] {
        [
            StageKind::Scorer,
            StageKind::Transform,
            StageKind::LayerBudget,
            StageKind::HeadBudget,
            StageKind::Selector,
            StageKind::Eviction,
        ]
    }
}

/// The type of a parameter, as users give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    Int,
    Float,
    Bool,
    Str,
    /// A list of floats (one per layer, say).
    Floats,
}

impl ParamType {
    /// The Python annotation.
    pub fn python(self) -> &'static str {
        match self {
            ParamType::Int => "int",
            ParamType::Float => "float",
            ParamType::Bool => "bool",
            ParamType::Str => "str",
            ParamType::Floats => "list[float]",
        }
    }
}

/// A parameter's default value (`Required`: the stage cannot be built without it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Default {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(&'static str),
    Required,
}

impl Default {
    /// The default as Python source (`64`, `20.0`, `True`, `"rank"`, `None`).
    pub fn python(self) -> String {
        match self {
            Default::Int(x) => x.to_string(),
            Default::Float(x) => format!("{x:?}"),
            Default::Bool(x) => (if x { "True" } else { "False" }).into(),
            Default::Str(s) => format!("{s:?}"),
            Default::Required => "None".into(),
        }
    }

    fn value(self) -> Option<ParamValue> {
        match self {
            Default::Int(x) => Some(ParamValue::Int(x)),
            Default::Float(x) => Some(ParamValue::Float(x)),
            Default::Bool(x) => Some(ParamValue::Bool(x)),
            Default::Str(s) => Some(ParamValue::Str(s.into())),
            Default::Required => None,
        }
    }
}

/// One parameter of a stage.
#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    pub default: Default,
    /// Bounds of numbers (of each element of a list), inclusive unless `*_open`.
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub min_open: bool,
    pub max_open: bool,
    /// The accepted strings (empty: any).
    pub choices: &'static [&'static str],
    pub doc: &'static str,
}

impl ParamSpec {
    pub const fn int(name: &'static str, default: i64, min: i64, doc: &'static str) -> Self {
        ParamSpec {
            name,
            ty: ParamType::Int,
            default: Default::Int(default),
            min: Some(min as f64),
            max: None,
            min_open: false,
            max_open: false,
            choices: &[],
            doc,
        }
    }

    pub const fn float(
        name: &'static str,
        default: f64,
        min: f64,
        max: Option<f64>,
        doc: &'static str,
    ) -> Self {
        ParamSpec {
            name,
            ty: ParamType::Float,
            default: Default::Float(default),
            min: Some(min),
            max,
            min_open: false,
            max_open: false,
            choices: &[],
            doc,
        }
    }

    pub const fn flag(name: &'static str, default: bool, doc: &'static str) -> Self {
        ParamSpec {
            name,
            ty: ParamType::Bool,
            default: Default::Bool(default),
            min: None,
            max: None,
            min_open: false,
            max_open: false,
            choices: &[],
            doc,
        }
    }

    pub const fn choice(
        name: &'static str,
        default: &'static str,
        choices: &'static [&'static str],
        doc: &'static str,
    ) -> Self {
        ParamSpec {
            name,
            ty: ParamType::Str,
            default: Default::Str(default),
            min: None,
            max: None,
            min_open: false,
            max_open: false,
            choices,
            doc,
        }
    }

    /// The range in words, for docs and errors ("an integer >= 1", "one of ...").
    pub fn expected(&self) -> String {
        let number = match self.ty {
            ParamType::Int => "an integer",
            ParamType::Float => "a number",
            ParamType::Bool => return "True or False".into(),
            ParamType::Str if self.choices.is_empty() => return "a string".into(),
            ParamType::Str => return format!("one of {:?}", self.choices),
            ParamType::Floats => "a list of numbers",
        };
        let (open, close) = (
            if self.min_open { "(" } else { "[" },
            if self.max_open { ")" } else { "]" },
        );
        let (gt, lt) = (
            if self.min_open { ">" } else { ">=" },
            if self.max_open { "<" } else { "<=" },
        );
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => format!("{number} in {open}{lo}, {hi}{close}"),
            (Some(lo), None) => format!("{number} {gt} {lo}"),
            (None, Some(hi)) => format!("{number} {lt} {hi}"),
            (None, None) => number.into(),
        }
    }

    /// The value given (or the default), checked against the type and range.
    fn resolve(&self, given: Option<ParamValue>) -> Result<Option<ParamValue>> {
        let Some(value) = given.or_else(|| self.default.value()) else {
            return Ok(None);
        };
        let bad = |got: &ParamValue| {
            KvError::invalid(
                self.name,
                format!("got {}, expected {}", got.python(), self.expected()),
            )
        };
        let in_range = |x: f64| {
            x.is_finite()
                && self
                    .min
                    .is_none_or(|lo| if self.min_open { x > lo } else { x >= lo })
                && self
                    .max
                    .is_none_or(|hi| if self.max_open { x < hi } else { x <= hi })
        };
        let value = match (self.ty, value) {
            (ParamType::Int, ParamValue::Int(x)) if in_range(x as f64) => ParamValue::Int(x),
            (ParamType::Float, ParamValue::Float(x)) if in_range(x) => ParamValue::Float(x),
            (ParamType::Float, ParamValue::Int(x)) if in_range(x as f64) => {
                ParamValue::Float(x as f64)
            }
            (ParamType::Bool, ParamValue::Bool(x)) => ParamValue::Bool(x),
            (ParamType::Str, ParamValue::Str(s))
                if self.choices.is_empty() || self.choices.contains(&s.as_str()) =>
            {
                ParamValue::Str(s)
            }
            (ParamType::Floats, ParamValue::Floats(xs)) if xs.iter().all(|&x| in_range(x)) => {
                ParamValue::Floats(xs)
            }
            (_, other) => return Err(bad(&other)),
        };
        Ok(Some(value))
    }
}

/// A stage's parameters after defaults and checks: what its builder reads.
#[derive(Debug, Default)]
pub struct Args(BTreeMap<&'static str, ParamValue>);

impl Args {
    fn get(&self, name: &str) -> Result<&ParamValue> {
        self.0.get(name).ok_or_else(|| {
            KvError::invalid(
                name,
                "is required by this stage but was not given".to_string(),
            )
        })
    }

    pub fn usize(&self, name: &str) -> Result<usize> {
        match self.get(name)? {
            ParamValue::Int(x) if *x >= 0 => Ok(*x as usize),
            other => Err(KvError::invalid(
                name,
                format!("got {}, expected an integer >= 0", other.python()),
            )),
        }
    }

    pub fn i64(&self, name: &str) -> Result<i64> {
        match self.get(name)? {
            ParamValue::Int(x) => Ok(*x),
            other => Err(KvError::invalid(
                name,
                format!("got {}, expected an integer", other.python()),
            )),
        }
    }

    pub fn f64(&self, name: &str) -> Result<f64> {
        match self.get(name)? {
            ParamValue::Float(x) => Ok(*x),
            ParamValue::Int(x) => Ok(*x as f64),
            other => Err(KvError::invalid(
                name,
                format!("got {}, expected a number", other.python()),
            )),
        }
    }

    pub fn bool(&self, name: &str) -> Result<bool> {
        match self.get(name)? {
            ParamValue::Bool(x) => Ok(*x),
            other => Err(KvError::invalid(
                name,
                format!("got {}, expected True or False", other.python()),
            )),
        }
    }

    pub fn str(&self, name: &str) -> Result<&str> {
        match self.get(name)? {
            ParamValue::Str(s) => Ok(s),
            other => Err(KvError::invalid(
                name,
                format!("got {}, expected a string", other.python()),
            )),
        }
    }

    pub fn floats(&self, name: &str) -> Result<&[f64]> {
        match self.get(name)? {
            ParamValue::Floats(xs) => Ok(xs),
            other => Err(KvError::invalid(
                name,
                format!("got {}, expected a list of numbers", other.python()),
            )),
        }
    }

    /// Whether the parameter has a value (given, or a default that is not `Required`).
    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// What a builder may know besides its own parameters.
#[derive(Clone, Copy, Debug)]
pub struct BuildContext {
    /// Layers of the model.
    pub n_layers: usize,
    /// Tokens the scorer always keeps at the end of the prompt (SnapKV's window).
    pub scorer_window: usize,
    /// Whether `compression_ratio` or `max_tokens` was given.
    pub budget_given: bool,
}

/// How a stage is built from its checked parameters.
#[derive(Clone, Copy)]
pub enum Builder {
    Scorer(fn(&Args) -> Result<Box<dyn Scorer>>),
    Transform(fn(&Args) -> Result<Box<dyn ScoreTransform>>),
    LayerBudget(fn(&Args, &BuildContext) -> Result<Box<dyn LayerBudget>>),
    HeadBudget(fn(&Args) -> Result<Box<dyn HeadBudget>>),
    Selector(fn(&Args) -> Result<Box<dyn Selector>>),
    Eviction(fn(&Args) -> Result<Box<dyn Eviction>>),
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Builder")
    }
}

/// One registry entry.
#[derive(Clone, Copy, Debug)]
pub struct Stage {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    /// One line: what it does.
    pub summary: &'static str,
    /// The paper or project it comes from (`"Li et al., 2024"`), with a link.
    pub reference: &'static str,
    pub url: &'static str,
    pub params: &'static [ParamSpec],
    pub build: Builder,
}

impl Stage {
    pub fn kind(&self) -> StageKind {
        match self.build {
            Builder::Scorer(_) => StageKind::Scorer,
            Builder::Transform(_) => StageKind::Transform,
            Builder::LayerBudget(_) => StageKind::LayerBudget,
            Builder::HeadBudget(_) => StageKind::HeadBudget,
            Builder::Selector(_) => StageKind::Selector,
            Builder::Eviction(_) => StageKind::Eviction,
        }
    }

    fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.contains(&name)
    }

    /// Takes this stage's parameters out of `params`, with defaults and checks.
    fn args(&self, params: &mut Params) -> Result<Args> {
        let mut args = Args::default();
        for spec in self.params {
            if let Some(v) = spec.resolve(params.take(spec.name))? {
                args.0.insert(spec.name, v);
            }
        }
        Ok(args)
    }
}

/// Every stage: scorers first, then the other kinds.
pub fn stages() -> impl Iterator<Item = &'static Stage> {
    crate::policies::SCORERS
        .iter()
        .chain(crate::press::stages())
}

/// The stage of `kind` called `name` (or one of its aliases).
pub fn stage(kind: StageKind, name: &str) -> Result<&'static Stage> {
    stages()
        .find(|s| s.kind() == kind && s.answers_to(name))
        .ok_or_else(|| {
            KvError::invalid(
                kind.argument(),
                format!(
                    "unknown {} {name:?}; expected one of {:?}",
                    kind_words(kind),
                    names(kind)
                ),
            )
        })
}

/// The names (not aliases) of every stage of `kind`, in registry order.
pub fn names(kind: StageKind) -> Vec<&'static str> {
    stages()
        .filter(|s| s.kind() == kind)
        .map(|s| s.name)
        .collect()
}

fn kind_words(kind: StageKind) -> &'static str {
    match kind {
        StageKind::Scorer => "policy",
        StageKind::Transform => "score transform",
        StageKind::LayerBudget => "layer budget",
        StageKind::HeadBudget => "head budget",
        StageKind::Selector => "selector",
        StageKind::Eviction => "eviction",
    }
}

/// A named cache class (`SnapKVCache`): a scorer with some stages fixed.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    /// The method's short name (`kvpress_rs.policies.CACHES` key, benchmark specs).
    pub name: &'static str,
    /// The Python class name.
    pub class: &'static str,
    /// The scorer, or `None` when the class takes it as its `scorer` argument (AdaKV).
    pub scorer: Option<&'static str>,
    /// The scorer an argument-taking class defaults to.
    pub default_scorer: &'static str,
    pub layer_budget: Option<&'static str>,
    pub head_budget: Option<&'static str>,
    pub selector: Option<&'static str>,
    /// Parameters whose default is another parameter's value: (parameter, source).
    pub ties: &'static [(&'static str, &'static str)],
    /// What the scorer reads besides the keys ("queries", "keys, values", ...).
    pub reads: &'static str,
    /// kvpress 0.5.5's press of the same method, if any.
    pub kvpress: &'static str,
    /// The paper, for the class docstring and the README.
    pub title: &'static str,
    pub url: &'static str,
    /// What the class does (docstring paragraph).
    pub doc: &'static str,
}

/// The named cache classes, in the order of the README's table.
pub static PRESETS: &[Preset] = &[
    Preset {
        name: "streaming_llm",
        class: "StreamingLLMCache",
        reads: "positions",
        kvpress: "StreamingLLMPress",
        scorer: Some("streaming_llm"),
        default_scorer: "streaming_llm",
        layer_budget: None,
        head_budget: None,
        selector: None,
        ties: &[],
        title: "StreamingLLM (Xiao et al., 2023)",
        url: "https://arxiv.org/abs/2309.17453",
        doc: "Keeps the first ``n_sink`` tokens (attention sinks) and the most recent ones.",
    },
    Preset {
        name: "knorm",
        class: "KnormCache",
        reads: "keys",
        kvpress: "KnormPress",
        scorer: Some("knorm"),
        default_scorer: "knorm",
        layer_budget: None,
        head_budget: None,
        selector: None,
        ties: &[],
        title: "Knorm (Devoto et al., 2024)",
        url: "https://arxiv.org/abs/2406.11430",
        doc: "Keeps the keys with the smallest L2 norm (score −‖k‖₂, in float32).",
    },
    Preset {
        name: "random",
        class: "RandomCache",
        reads: "—",
        kvpress: "RandomPress",
        scorer: Some("random"),
        default_scorer: "random",
        layer_budget: None,
        head_budget: None,
        selector: None,
        ties: &[],
        title: "Random eviction (a baseline)",
        url: "",
        doc: "Uniform scores from a seeded counter-based generator, reproducible per (seed, \
              layer, batch row, head, token).",
    },
    Preset {
        name: "snapkv",
        class: "SnapKVCache",
        reads: "queries",
        kvpress: "SnapKVPress",
        scorer: Some("snapkv"),
        default_scorer: "snapkv",
        layer_budget: None,
        head_budget: None,
        selector: None,
        ties: &[],
        title: "SnapKV (Li et al., 2024)",
        url: "https://arxiv.org/abs/2404.14469",
        doc: "The attention of the last ``window_size`` prompt queries to each earlier token, \
              averaged, pooled over ``kernel_size`` neighbours and over each KV head's group; \
              the window itself is kept. Append the question to the context before \
              compressing to make it query-aware. During generation (``decoding_budget``), \
              ``decoding_pooling=\"rank\"`` pools each token's score over the tokens the \
              previous compression ranked next to it.",
    },
    Preset {
        name: "pyramidkv",
        class: "PyramidKVCache",
        reads: "queries",
        kvpress: "PyramidKVPress",
        scorer: Some("snapkv"),
        default_scorer: "snapkv",
        layer_budget: Some("pyramid"),
        head_budget: None,
        selector: None,
        ties: &[],
        title: "PyramidKV (Cai et al., 2024)",
        url: "https://arxiv.org/abs/2406.02069",
        doc: "SnapKV scores with a per-layer budget that decreases linearly with depth \
              (``beta`` sets the smallest budget; the mean stays the requested ratio).",
    },
    Preset {
        name: "tova",
        class: "TOVACache",
        reads: "queries",
        kvpress: "TOVAPress",
        scorer: Some("tova"),
        default_scorer: "tova",
        layer_budget: None,
        head_budget: None,
        selector: None,
        ties: &[],
        title: "TOVA (Oren et al., 2024)",
        url: "https://arxiv.org/abs/2401.06104",
        doc: "The attention of the last prompt token, averaged over all query heads and \
              shared by every KV head; the last token is kept.",
    },
    Preset {
        name: "observed_attention",
        class: "ObservedAttentionCache",
        reads: "queries",
        kvpress: "ObservedAttentionPress",
        scorer: Some("observed_attention"),
        default_scorer: "observed_attention",
        layer_budget: None,
        head_budget: None,
        selector: None,
        ties: &[],
        title: "H2O / ObservedAttention (Zhang et al., 2023)",
        url: "https://arxiv.org/abs/2306.14048",
        doc: "The attention each token received from all prompt queries, divided by how many \
              queries could see it; computed from the queries in chunks of ``chunk_size`` \
              (the model need not run eager attention).",
    },
    Preset {
        name: "keydiff",
        class: "KeyDiffCache",
        reads: "keys",
        kvpress: "KeyDiffPress",
        scorer: Some("keydiff"),
        default_scorer: "keydiff",
        layer_budget: None,
        head_budget: None,
        selector: None,
        ties: &[],
        title: "KeyDiff (Park et al., 2025)",
        url: "https://arxiv.org/abs/2504.15364",
        doc: "Keeps the keys least similar (cosine) to the mean normalised key of their head.",
    },
    Preset {
        name: "lagkv",
        class: "LagKVCache",
        reads: "keys, values",
        kvpress: "LagKVPress",
        scorer: Some("lagkv"),
        default_scorer: "lagkv",
        layer_budget: None,
        head_budget: None,
        selector: None,
        ties: &[],
        title: "LagKV (Liang et al., 2025)",
        url: "https://arxiv.org/abs/2504.04704",
        doc: "Tokens ranked within partitions of ``lag_size`` by the spread of their keys and \
              values normalised with the next partition's statistics; sinks and the last \
              partition are kept.",
    },
    Preset {
        name: "expected_attention",
        class: "ExpectedAttentionCache",
        reads: "queries, values",
        kvpress: "ExpectedAttentionPress",
        scorer: Some("expected_attention"),
        default_scorer: "expected_attention",
        layer_budget: None,
        head_budget: None,
        selector: None,
        ties: &[],
        title: "ExpectedAttention (NVIDIA kvpress)",
        url: "https://arxiv.org/abs/2510.00636",
        doc: "The attention a key can expect from future queries, from the mean and \
              covariance of the prompt's pre-RoPE queries moved ``n_future_positions`` ahead \
              by averaged RoPE, times ‖v‖; ``n_sink`` sinks are kept.",
    },
    Preset {
        name: "triattention",
        class: "TriAttentionCache",
        reads: "queries",
        kvpress: "",
        scorer: Some("triattention"),
        default_scorer: "triattention",
        layer_budget: None,
        head_budget: None,
        selector: None,
        ties: &[],
        title: "TriAttention (Mao et al., 2026)",
        url: "https://arxiv.org/abs/2604.04921",
        doc: "Keys scored by the trigonometric series of their distance to future queries, \
              from the center of the pre-RoPE queries (over offsets 1, 2, 4, … \
              2^(``n_offsets``−1)), plus a norm term; z-normalised per query head, max over \
              each KV head's group.",
    },
    Preset {
        name: "cake",
        class: "CAKECache",
        reads: "queries",
        kvpress: "",
        scorer: Some("cake"),
        default_scorer: "cake",
        layer_budget: Some("cake"),
        head_budget: None,
        selector: None,
        ties: &[("cake_window", "window_size")],
        title: "CAKE (Qin et al., 2025)",
        url: "https://arxiv.org/abs/2503.12491",
        doc: "The CAKE eviction indicator (mean + ``gamma`` × variance of the last \
              ``window_size`` queries' attention, pooled) with the CAKE layer budget: after \
              the prefill forward, the model's total budget is split across layers in \
              proportion to each layer's preference (attention dispersion^(1/``tau1``) × \
              shift^(1/``tau2``)).",
    },
    Preset {
        name: "adakv",
        class: "AdaKVCache",
        reads: "as the scorer",
        kvpress: "AdaKVPress",
        scorer: None,
        default_scorer: "snapkv",
        layer_budget: None,
        head_budget: Some("adakv"),
        selector: None,
        ties: &[],
        title: "AdaKV (Feng et al., 2024)",
        url: "https://arxiv.org/abs/2407.11550",
        doc: "Any scorer with an adaptive split of each layer's budget among its KV heads \
              (each head keeps at least ``alpha_safeguard`` of the mean, the rest goes to the \
              highest scores across heads). Heads then hold different counts and the evicted \
              tokens' memory is freed (kvpress only masks them).",
    },
    Preset {
        name: "chunkkv",
        class: "ChunkKVCache",
        reads: "as the scorer",
        kvpress: "ChunkKVPress",
        scorer: None,
        default_scorer: "snapkv",
        layer_budget: None,
        head_budget: None,
        selector: Some("chunks"),
        ties: &[],
        title: "ChunkKV (Liu et al., 2025)",
        url: "https://arxiv.org/abs/2502.00299",
        doc: "Any scorer with chunk-wise selection: the prompt is cut into chunks of \
              ``chunk_length`` consecutive tokens, ranked by their mean score summed over the \
              KV heads, and the best chunks are kept whole, the same in every head, so that \
              what survives is whole phrases rather than scattered tokens. The count is \
              exactly the budget (the last chunk taken may be cut to its best tokens).",
    },
];

/// What a press is made of, by name, with every stage's parameters mixed in `params`.
#[derive(Debug)]
pub struct PressSpec<'a> {
    pub scorer: &'a str,
    pub transforms: Vec<&'a str>,
    pub layer_budget: &'a str,
    pub head_budget: &'a str,
    pub selector: &'a str,
    pub eviction: &'a str,
    pub compression_ratio: Option<f64>,
    pub max_tokens: Option<i64>,
    pub n_layers: usize,
    pub rope: Option<Rope>,
    pub params: Params,
}

impl std::default::Default for PressSpec<'_> {
    fn default() -> Self {
        PressSpec {
            scorer: "knorm",
            transforms: vec![],
            layer_budget: "uniform",
            head_budget: "uniform",
            selector: "topk",
            eviction: "drop",
            compression_ratio: None,
            max_tokens: None,
            n_layers: 1,
            rope: None,
            params: Params::new(),
        }
    }
}

/// Builds a press: resolves every stage, gives each the parameters it declares, and fails
/// on a parameter none of them takes.
pub fn build_press(spec: PressSpec<'_>) -> Result<Press> {
    let mut params = spec.params;
    let scorer_stage = stage(StageKind::Scorer, spec.scorer)?;
    let Builder::Scorer(build_scorer) = scorer_stage.build else {
        return Err(KvError::State(
            "registry: a scorer entry without a scorer builder".into(),
        ));
    };
    let mut chosen = vec![scorer_stage];
    let scorer = build_scorer(&scorer_stage.args(&mut params)?)?;
    let ctx = BuildContext {
        n_layers: spec.n_layers.max(1),
        scorer_window: scorer.protected_window(),
        budget_given: spec.compression_ratio.is_some() || spec.max_tokens.is_some(),
    };
    let mut transforms = Vec::new();
    for name in &spec.transforms {
        let s = stage(StageKind::Transform, name)?;
        chosen.push(s);
        if let Builder::Transform(b) = s.build {
            transforms.push(b(&s.args(&mut params)?)?);
        }
    }
    let lb = stage(StageKind::LayerBudget, spec.layer_budget)?;
    chosen.push(lb);
    let layer_budget = match lb.build {
        Builder::LayerBudget(b) => b(&lb.args(&mut params)?, &ctx)?,
        _ => {
            return Err(KvError::State(
                "registry: layer budget entry mismatch".into(),
            ))
        }
    };
    let hb = stage(StageKind::HeadBudget, spec.head_budget)?;
    chosen.push(hb);
    let head_budget = match hb.build {
        Builder::HeadBudget(b) => b(&hb.args(&mut params)?)?,
        _ => {
            return Err(KvError::State(
                "registry: head budget entry mismatch".into(),
            ))
        }
    };
    let sel = stage(StageKind::Selector, spec.selector)?;
    chosen.push(sel);
    let selector = match sel.build {
        Builder::Selector(b) => b(&sel.args(&mut params)?)?,
        _ => return Err(KvError::State("registry: selector entry mismatch".into())),
    };
    let ev = stage(StageKind::Eviction, spec.eviction)?;
    chosen.push(ev);
    let eviction = match ev.build {
        Builder::Eviction(b) => b(&ev.args(&mut params)?)?,
        _ => return Err(KvError::State("registry: eviction entry mismatch".into())),
    };
    if let Some(left) = params.first_name() {
        return Err(unexpected_param(&left, &chosen));
    }
    let budget = Budget::from_args(spec.compression_ratio, spec.max_tokens)?;
    let press = Press::from_stages(
        scorer,
        transforms,
        budget,
        layer_budget,
        head_budget,
        selector,
        eviction,
        ctx.n_layers,
    )?;
    Ok(match spec.rope {
        Some(r) => press.with_rope(r),
        None => press,
    })
}

/// Builds a scorer alone from its name and parameters (a parameter it does not declare is
/// an error).
pub fn build_scorer(name: &str, mut params: Params) -> Result<Box<dyn Scorer>> {
    let s = stage(StageKind::Scorer, name)?;
    let Builder::Scorer(build) = s.build else {
        return Err(KvError::State(
            "registry: a scorer entry without a scorer builder".into(),
        ));
    };
    let scorer = build(&s.args(&mut params)?)?;
    if let Some(left) = params.first_name() {
        return Err(unexpected_param(&left, &[s]));
    }
    Ok(scorer)
}

/// The error for a parameter none of the `chosen` stages declares: which stage declares
/// it, if any, and what the chosen ones accept.
fn unexpected_param(name: &str, chosen: &[&'static Stage]) -> KvError {
    let accepted: Vec<&str> = chosen
        .iter()
        .flat_map(|s| s.params.iter().map(|p| p.name))
        .collect();
    let owner = stages().find(|s| s.params.iter().any(|p| p.name == name));
    let hint = match owner {
        Some(s) => format!(
            " (it belongs to {} {:?}, which is not selected: pass {}={:?})",
            kind_words(s.kind()),
            s.name,
            s.kind().argument(),
            s.name
        ),
        None => String::new(),
    };
    let chosen_names: Vec<&str> = chosen.iter().map(|s| s.name).collect();
    KvError::invalid(
        name,
        format!(
            "is not a parameter of the selected stages {chosen_names:?}{hint}; they accept {accepted:?}"
        ),
    )
}

impl ParamValue {
    /// The value as Python source.
    pub fn python(&self) -> String {
        match self {
            ParamValue::Int(x) => x.to_string(),
            ParamValue::Float(x) => format!("{x:?}"),
            ParamValue::Bool(x) => (if *x { "True" } else { "False" }).into(),
            ParamValue::Str(s) => format!("{s:?}"),
            ParamValue::Floats(xs) => format!("{xs:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_within_a_kind_and_parameters_across_kinds() {
        for kind in StageKind::all() {
            let mut seen = std::collections::HashSet::new();
            for s in stages().filter(|s| s.kind() == kind) {
                for n in std::iter::once(s.name).chain(s.aliases.iter().copied()) {
                    assert!(seen.insert(n), "{n} twice among {kind:?}");
                }
            }
        }
        // a parameter name routes to one stage kind only
        let mut owner: BTreeMap<&str, StageKind> = BTreeMap::new();
        for s in stages() {
            for p in s.params {
                let k = *owner.entry(p.name).or_insert(s.kind());
                assert_eq!(k, s.kind(), "{} is declared by two kinds of stages", p.name);
            }
        }
    }

    #[test]
    fn every_default_is_within_its_own_range() {
        for s in stages() {
            for p in s.params {
                if p.default != Default::Required {
                    p.resolve(None)
                        .unwrap_or_else(|e| panic!("{}.{}: {e}", s.name, p.name));
                }
            }
        }
    }

    #[test]
    fn presets_name_registered_stages() {
        for p in PRESETS {
            stage(StageKind::Scorer, p.scorer.unwrap_or(p.default_scorer)).unwrap();
            if let Some(l) = p.layer_budget {
                stage(StageKind::LayerBudget, l).unwrap();
            }
            if let Some(h) = p.head_budget {
                stage(StageKind::HeadBudget, h).unwrap();
            }
            if let Some(s) = p.selector {
                stage(StageKind::Selector, s).unwrap();
            }
        }
    }
}
