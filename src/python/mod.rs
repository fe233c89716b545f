//! The PyO3 bindings: the private native module `kvpress_rs._native`.
//!
//! Nothing here computes anything: each function converts its arguments (one crossing
//! point, `conversion`), releases the GIL, calls the core, and maps errors (`errors`).

mod chunks;
mod conversion;
mod decoding;
mod errors;
mod layer;
mod ops;
mod press;
mod quant;
mod registry;
mod rope;
mod store;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("TORCH_VERSION", conversion::LIBTORCH_VERSION)?;
    m.add_class::<press::PyPress>()?;
    m.add_class::<press::PyPlan>()?;
    m.add_class::<press::PyOutcome>()?;
    m.add_class::<store::PyLayerStore>()?;
    ops::register(m)?;
    quant::register(m)?;
    rope::register(m)?;
    chunks::register(m)?;
    decoding::register(m)?;
    layer::register(m)?;
    registry::register(m)?;
    Ok(())
}
