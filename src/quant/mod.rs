//! KV-cache quantization: bit-packed, append-only blocks and attention that reads them in
//! place (see `docs/ARCHITECTURE.md`).
//!
//! One concept per file:
//! - [`config`]: the options ([`QuantConfig`], [`Grouping`]) and their validation;
//! - [`pack`]: bit packing of one group of 2/3/4/8-bit codes (planar layout);
//! - [`group`]: the arithmetic of one group (float16 scale/zero with directed rounding,
//!   codes, outlier selection), shared by every path;
//! - [`channel_groups`]: channel groups quantized straight from bfloat16/float16 rows,
//!   and dequantized straight into float16 rows (converted in registers, no float32 tile);
//! - [`token_groups`]: codes of token groups packed straight into their bytes (AVX-512
//!   folds of the byte planes in registers);
//! - [`hadamard`]: the orthonormal fast Walsh–Hadamard rotation;
//! - [`layout`]: where each group of a quantized tensor lives;
//! - [`qtensor`]: [`QuantizedTensor`], a quantized (batch, heads, tokens, head_dim) tensor;
//! - [`cpu`] / [`libtorch`]: quantize and dequantize with Rust kernels (CPU) or libtorch ops
//!   (other devices), identical codes;
//! - [`store`]: [`QuantizedStore`], one layer's cache (sinks, blocks, residual window);
//! - [`ragged`]: the quantized tokens an eviction keeps (per-row counts per tile, exact
//!   codes and scales/zeros; decoding-time compression of a quantized cache);
//! - [`parts`]: a store as named tensors, and one store assembled from several stores'
//!   parts at offsets (quantized chunk caches);
//! - [`attention`]: attention over a store (fused CPU kernel, libtorch path);
//! - [`union`]: attention over several stores of one layer (mixed precision), merged by
//!   log-sum-exp;
//! - [`simd`]: CPU feature dispatch and vectorizable math.

pub mod attention;
pub(crate) mod channel_groups;
pub mod config;
pub(crate) mod cpu;
pub mod group;
pub mod hadamard;
pub mod layout;
pub(crate) mod libtorch;
pub mod pack;
pub mod parts;
pub mod qtensor;
pub mod ragged;
pub mod simd;
pub mod store;
pub(crate) mod token_groups;
pub mod union;

pub use config::{Grouping, QuantConfig};
pub use layout::TensorLayout;
pub use qtensor::QuantizedTensor;
pub use store::QuantizedStore;
