//! The PyO3 bindings: the private native module `kvpress_rs._native`.
//!
//! Nothing here computes anything: each function converts its arguments (one crossing
//! point, `conversion`), releases the GIL, calls the core, and maps errors (`errors`).

mod chunks;
mod conversion;
mod decoding;
mod errors;
mod ops;
mod press;
mod quant;
mod rope;
mod store;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("TORCH_VERSION", conversion::LIBTORCH_VERSION)?;
    m.add_class::<press::PyPress>()?;
    m.add_class::<store::PyLayerStore>()?;
    ops::register(m)?;
    quant::register(m)?;
    rope::register(m)?;
    chunks::register(m)?;
    decoding::register(m)?;
    Ok(())
}
