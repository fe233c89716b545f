//! Where the codes of one quantized (batch, heads, tokens, head_dim) tensor live.
//!
//! Tokens are quantized in *tiles* of `group_size` tokens. A tile of one (batch, head) is
//! exactly `head_dim` groups, whatever the grouping, stored one after the other:
//!
//! - channel grouping: group `c` of the tile is channel `c` over the tile's G tokens;
//! - token grouping: group `t·(head_dim/G) + j` is channels `j·G .. (j+1)·G` of token `t`.
//!
//! Each group has G codes packed into `G·bits/8` bytes (`pack.rs`), a float16
//! (scale, zero) pair, and `outliers` sparse entries (u8 position in the group, exact
//! value in the cache dtype). Per (batch, head) the groups of successive tiles follow each
//! other, so a quantized tensor is four dense arrays:
//! codes u8 (B, H, groups·bytes), params f16 (B, H, groups, 2),
//! outlier positions u8 (B, H, groups, n) and outlier values (B, H, groups, n).

use super::config::{Grouping, QuantConfig};
use super::pack::packed_bytes;
use crate::error::{KvError, Result};

/// How one tensor (keys or values) is quantized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorLayout {
    pub grouping: Grouping,
    pub bits: u32,
    pub group_size: usize,
    pub head_dim: usize,
    /// Outliers per group.
    pub outliers: usize,
    pub hadamard: bool,
}

impl TensorLayout {
    pub fn new(config: &QuantConfig, grouping: Grouping, head_dim: usize) -> Self {
        TensorLayout {
            grouping,
            bits: config.bits,
            group_size: config.group_size,
            head_dim,
            outliers: config.outliers_per_group(),
            hadamard: config.hadamard,
        }
    }

    /// Checks what the layout needs of the head dimension (tensors of `argument`): token
    /// groups must tile it, and the Walsh–Hadamard rotation needs a power of two.
    pub fn check(&self, argument: &str) -> Result<()> {
        let head_dim = self.head_dim;
        if self.grouping == Grouping::Token && !head_dim.is_multiple_of(self.group_size) {
            return Err(KvError::invalid(
                "group_size",
                format!(
                    "{} does not divide the {argument} head_dim {head_dim}; per-token groups span \
                     group_size channels (use a smaller group_size or \"channel\" grouping)",
                    self.group_size
                ),
            ));
        }
        if self.hadamard && !head_dim.is_power_of_two() {
            return Err(KvError::invalid(
                "hadamard",
                format!("the Walsh–Hadamard rotation needs a power-of-two head_dim, the {argument} have {head_dim}"),
            ));
        }
        Ok(())
    }

    /// Bytes of one packed group.
    pub fn group_bytes(&self) -> usize {
        packed_bytes(self.group_size, self.bits)
    }

    /// Groups per (batch, head) for `tokens` tokens (a multiple of the group size).
    pub fn groups(&self, tokens: usize) -> usize {
        tokens / self.group_size * self.head_dim
    }

    /// `2^bits − 1` as f32.
    pub fn levels(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    /// Bytes per (batch, head) of `tokens` quantized tokens with outlier values of
    /// `value_bytes` bytes each: codes + scales/zeros + outliers.
    pub fn bytes_per_row(&self, tokens: usize, value_bytes: usize) -> usize {
        let g = self.groups(tokens);
        g * (self.group_bytes() + 4 + self.outliers * (1 + value_bytes))
    }

    /// (group within the tile, position within the group) of element (token `t` of the
    /// tile, channel `c`).
    #[inline(always)]
    pub fn locate(&self, t: usize, c: usize) -> (usize, usize) {
        match self.grouping {
            Grouping::Channel => (c, t),
            Grouping::Token => {
                let per_token = self.head_dim / self.group_size;
                (t * per_token + c / self.group_size, c % self.group_size)
            }
        }
    }
}
