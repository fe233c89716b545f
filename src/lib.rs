//! kvpress-rs: KV-cache compression for transformer inference.
//!
//! The core is pure Rust over `tch` tensors; `cargo test` exercises all of it without
//! Python. The `python` feature adds the PyO3 bindings in [`python`] (built by maturin into
//! `kvpress_rs._native`), which convert arguments and delegate here.
//!
//! Layers, from the bottom:
//! - [`tensor`]: KV tensor validation and zero-copy `ndarray` views of CPU tensors.
//! - [`policies`]: scorers (one file each), [`select`] top-k, [`gather`] of kept tokens.
//! - [`budget`]: how many tokens a layer keeps.
//! - [`press`]: the pipeline of stages (scorer → transforms → budgets → selector →
//!   eviction) applied to a layer, with one entry point; [`registry`]: every stage by name.
//! - [`decoding`]: when a growing cache compresses (generation, block-wise prefill).
//! - [`store`]: the per-layer compressed KV store.
//! - [`layer`]: one layer's whole state (stores, counts, decoding state, pending step) and
//!   the steps of a forward through it; [`layer::LayerGroup`] runs the cross-layer ones.
//! - [`rope`]: RoPE math (apply, invert and shift rotary embeddings; feasible bases).
//! - [`chunks`]: reusable chunk caches placed at new positions (one shift per chunk), and
//!   the choice of tokens to recompute.
//! - [`quant`]: quantized KV caches (bit-packed blocks, fused attention).

pub mod budget;
pub mod chunks;
pub mod decoding;
pub mod error;
pub mod gather;
pub mod layer;
pub mod policies;
pub mod press;
pub mod quant;
pub mod registry;
pub mod rope;
pub mod select;
pub mod store;
pub mod tensor;

#[cfg(feature = "python")]
pub mod python;

pub use budget::Budget;
pub use error::{KvError, Result};
pub use press::Press;
pub use store::{KeptPositions, LayerStore, StoreStats};
