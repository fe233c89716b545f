//! The options of a quantized KV cache, validated once: [`QuantConfig`].

use super::layout::TensorLayout;
use crate::error::{KvError, Result};

/// Bit widths a code may have.
pub const BITS: [u32; 4] = [2, 3, 4, 8];

/// Group sizes (elements sharing one scale and zero).
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Largest accepted `outlier_fraction`.
pub const MAX_OUTLIER_FRACTION: f64 = 0.25;

/// How the elements of one (batch, head) are grouped for quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Grouping {
    /// A group is one channel over `group_size` consecutive tokens (KIVI's keys: outlier
    /// channels get their own range). Tokens are quantized in blocks of `group_size`.
    Channel,
    /// A group is `group_size` consecutive channels of one token (KIVI's values).
    /// `group_size` must divide `head_dim`.
    Token,
}

impl Grouping {
    pub fn parse(name: &str, argument: &str) -> Result<Self> {
        match name {
            "channel" => Ok(Grouping::Channel),
            "token" => Ok(Grouping::Token),
            other => Err(KvError::invalid(
                argument,
                format!("got {other:?}, expected \"channel\" or \"token\""),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Grouping::Channel => "channel",
            Grouping::Token => "token",
        }
    }
}

/// Everything a quantized cache (or a single quantized tensor) needs to know.
///
/// - `bits` ∈ {2, 3, 4, 8}: asymmetric min/max codes, `scale = (max − min)/(2^bits − 1)`,
///   `zero = min`, both stored as float16 (zero rounded down, scale rounded up, so that every
///   value of the group lies in the representable range).
/// - `group_size` ∈ {32, 64, 128}; `key_grouping` / `value_grouping` as in [`Grouping`].
/// - `residual_length`: the most recent tokens kept in full precision. The window holds
///   fewer than `max(residual_length, group_size)` tokens ([`window_tokens`]); when it
///   fills, its oldest `block_length` tokens are quantized once and appended. A multiple
///   of `group_size` unless `block_length` is given; 0 means blocks of `group_size` tokens.
/// - `block_length`: tokens quantized per flush, a multiple of `group_size` no larger than
///   the window; `None` flushes the whole window (KIVI, quanto). A shorter block keeps the
///   `window − block` most recent tokens in full precision right after a flush (instead of
///   none) at the same peak bytes: 2-bit keys lose most where the queries look most, on
///   the most recent tokens. The window may then be any length (a memory budget in tokens,
///   e.g. one that leaves room for sink tokens).
///
/// [`window_tokens`]: QuantConfig::window_tokens
/// - `hadamard`: rotate every key and value vector by the orthonormal Walsh–Hadamard matrix
///   of size `head_dim` (a power of two) before quantizing; attention rotates the query
///   instead (q·k = Hq·Hk), and the output back.
/// - `outlier_fraction` ∈ [0, 0.25]: in each group, the `ceil(fraction × group_size)`
///   elements of largest magnitude are kept exactly (in the cache dtype) in a sparse side
///   store and excluded from the group's min/max.
/// - `sink_tokens`: the first tokens of the sequence, kept in full precision.
/// - `pre_rope_keys`: quantize keys before RoPE (KVQuant); the store needs the model's RoPE
///   (`QuantizedStore::with_rope`) and re-applies it on read.
///
/// ```
/// use kvpress_rs::quant::QuantConfig;
/// let c = QuantConfig::new(4, 32, 128).unwrap();
/// assert_eq!(c.block_tokens(), 128);
/// assert!(QuantConfig::new(5, 32, 128).is_err());
/// let sliding = QuantConfig { block_length: Some(64), ..c }.validated().unwrap();
/// assert_eq!((sliding.window_tokens(), sliding.block_tokens()), (128, 64));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantConfig {
    pub bits: u32,
    pub group_size: usize,
    pub residual_length: usize,
    pub block_length: Option<usize>,
    pub key_grouping: Grouping,
    pub value_grouping: Grouping,
    pub hadamard: bool,
    pub outlier_fraction: f64,
    pub sink_tokens: usize,
    pub pre_rope_keys: bool,
}

impl QuantConfig {
    /// The KIVI defaults for everything else: keys per channel, values per token, no
    /// rotation, outliers or sinks.
    pub fn new(bits: u32, group_size: usize, residual_length: usize) -> Result<Self> {
        QuantConfig {
            bits,
            group_size,
            residual_length,
            block_length: None,
            key_grouping: Grouping::Channel,
            value_grouping: Grouping::Token,
            hadamard: false,
            outlier_fraction: 0.0,
            sink_tokens: 0,
            pre_rope_keys: false,
        }
        .validated()
    }

    /// Checks every option that does not depend on the model; returns the config.
    pub fn validated(self) -> Result<Self> {
        if !BITS.contains(&self.bits) {
            return Err(KvError::invalid(
                "bits",
                format!("got {}, expected 2, 3, 4 or 8", self.bits),
            ));
        }
        if !GROUP_SIZES.contains(&self.group_size) {
            return Err(KvError::invalid(
                "group_size",
                format!("got {}, expected 32, 64 or 128", self.group_size),
            ));
        }
        // Whole-window flushes quantize the window: whole groups only if it is whole groups.
        if self.block_length.is_none() && !self.residual_length.is_multiple_of(self.group_size) {
            return Err(KvError::invalid(
                "residual_length",
                format!(
                    "got {}, expected a multiple of group_size ({}) (tokens are quantized in whole \
                     groups), or any length with a block_length",
                    self.residual_length, self.group_size
                ),
            ));
        }
        if let Some(block) = self.block_length {
            let window = self.window_tokens();
            if block == 0 || block % self.group_size != 0 || block > window {
                return Err(KvError::invalid(
                    "block_length",
                    format!(
                        "got {block}, expected a multiple of group_size ({}) in [{}, {window}] \
                         (whole groups, no longer than the window of max(residual_length, \
                         group_size) tokens), or None for the whole window",
                        self.group_size, self.group_size
                    ),
                ));
            }
        }
        if !self.outlier_fraction.is_finite()
            || !(0.0..=MAX_OUTLIER_FRACTION).contains(&self.outlier_fraction)
        {
            return Err(KvError::invalid(
                "outlier_fraction",
                format!(
                    "got {}, expected a number in [0, {MAX_OUTLIER_FRACTION}]",
                    self.outlier_fraction
                ),
            ));
        }
        Ok(self)
    }

    /// Checks the options that depend on the head dimension of keys or values.
    pub fn check_head_dim(
        &self,
        head_dim: usize,
        grouping: Grouping,
        argument: &str,
    ) -> Result<()> {
        TensorLayout::new(self, grouping, head_dim).check(argument)
    }

    /// Capacity of the full-precision window: `max(residual_length, group_size)`. It holds
    /// fewer tokens after every append (a full window is flushed at once).
    pub fn window_tokens(&self) -> usize {
        self.residual_length.max(self.group_size)
    }

    /// Tokens per quantized block: `block_length`, or the whole window.
    pub fn block_tokens(&self) -> usize {
        self.block_length.unwrap_or_else(|| self.window_tokens())
    }

    /// Outliers kept per group: `ceil(outlier_fraction × group_size)`.
    pub fn outliers_per_group(&self) -> usize {
        (self.outlier_fraction * self.group_size as f64 - 1e-9)
            .ceil()
            .max(0.0) as usize
    }

    /// Levels of a code: `2^bits − 1`.
    pub fn levels(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
}
