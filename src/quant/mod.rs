//! KV-cache quantization (bit-packed, append-only blocks; see `docs/ARCHITECTURE.md`).
//!
//! Not implemented yet: this module reserves the place of the quantized store, whose
//! blocks `store::LayerStore` will hold next to (or instead of) full-precision tokens.
