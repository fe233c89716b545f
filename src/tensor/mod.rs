//! Tensors as the core sees them: validation of KV tensors, and zero-copy `ndarray` views
//! over the raw data of CPU tensors so that fused kernels can run on them in parallel.
//!
//! Every KV tensor has the layout (batch, kv_heads, tokens, head_dim). Tensors on other
//! devices (CUDA, MPS) are never viewed raw: the code that owns them goes through libtorch
//! ops instead, which run on that device.

mod element;
mod view;

pub use element::{bf16_round, KvFloat, TorchElement, FLOAT_KINDS};
pub(crate) use view::finite_slice;
pub use view::{array_view, array_view_mut, float_view, FloatView, FloatView3, FloatView4};

use crate::error::{KvError, Result};
use std::cell::Cell;
use tch::{Device, Kind, Tensor};

thread_local! {
    /// Whether CPU tensors go through the fused Rust kernels (the default) or through the
    /// libtorch ops that every other device uses. The libtorch path is what CUDA runs;
    /// switching it on for CPU tensors lets tests and benchmarks exercise and compare it on
    /// a machine without a GPU. Per thread, so that one caller's choice never changes the
    /// path another thread's work takes.
    static CPU_KERNELS: Cell<bool> = const { Cell::new(true) };
}

/// Enables (default) or disables the fused CPU kernels for work started from this thread.
pub fn set_cpu_kernels(enabled: bool) {
    CPU_KERNELS.with(|c| c.set(enabled));
}

pub fn cpu_kernels_enabled() -> bool {
    CPU_KERNELS.with(Cell::get)
}

/// Whether work on `t` runs in the Rust CPU kernels (else: libtorch ops on its device).
pub fn uses_cpu_kernels(t: &Tensor) -> bool {
    t.device() == Device::Cpu && cpu_kernels_enabled()
}

/// Runs `f` on a thread of rayon's pool, so that the parallel kernels it starts run there
/// without each crossing threads again: one compression calls a dozen kernels, and every
/// call from outside the pool wakes a worker and blocks the caller (tens of microseconds
/// each, more than the work of a short prompt's kernels). Inside the pool, `f` runs as is.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Axis of the token (sequence) dimension in KV tensors.
pub const TOKEN_AXIS: i64 = 2;

/// The shape of a KV tensor: (batch, kv_heads, tokens, head_dim).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub batch: usize,
    pub heads: usize,
    pub tokens: usize,
    pub head_dim: usize,
}

impl KvShape {
    pub fn as_i64(&self) -> [i64; 4] {
        [
            self.batch as i64,
            self.heads as i64,
            self.tokens as i64,
            self.head_dim as i64,
        ]
    }
}

/// The name PyTorch users know for a dtype (`torch.bfloat16`), for error messages.
pub fn kind_name(kind: Kind) -> String {
    let name = match kind {
        Kind::Float => "float32",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Double => "float64",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        Kind::Int16 => "int16",
        Kind::Int8 => "int8",
        Kind::Uint8 => "uint8",
        Kind::Bool => "bool",
        other => return format!("{other:?}"),
    };
    format!("torch.{name}")
}

/// The name PyTorch users know for a device (`cuda:0`), for error messages.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".to_owned(),
        Device::Vulkan => "vulkan".to_owned(),
    }
}

/// The element kind of a tensor, as an error instead of a panic for kinds tch cannot name.
pub fn kind_of(t: &Tensor, argument: &str) -> Result<Kind> {
    t.f_kind()
        .map_err(|_| KvError::dtype(argument, "an unsupported dtype", "a float dtype"))
}

/// Checks that `t` is a KV tensor: rank 4, (batch, kv_heads, tokens, head_dim), dtype
/// float32/float16/bfloat16, dense. Returns its shape.
pub fn check_kv(t: &Tensor, argument: &str) -> Result<KvShape> {
    if !t.defined() {
        return Err(KvError::invalid(argument, "the tensor is undefined"));
    }
    let size = t.size();
    if size.len() != 4 {
        return Err(KvError::shape(
            argument,
            &size,
            "rank 4: (batch, kv_heads, tokens, head_dim)",
        ));
    }
    if t.is_sparse() {
        return Err(KvError::invalid(
            argument,
            "sparse tensors are not supported; pass a dense tensor",
        ));
    }
    let kind = kind_of(t, argument)?;
    if !FLOAT_KINDS.contains(&kind) {
        return Err(KvError::dtype(
            argument,
            kind_name(kind),
            "torch.float32, torch.float16 or torch.bfloat16",
        ));
    }
    if size[0] == 0 || size[1] == 0 || size[3] == 0 {
        return Err(KvError::shape(
            argument,
            &size,
            "non-zero batch, kv_heads and head_dim: (batch, kv_heads, tokens, head_dim)",
        ));
    }
    Ok(KvShape {
        batch: size[0] as usize,
        heads: size[1] as usize,
        tokens: size[2] as usize,
        head_dim: size[3] as usize,
    })
}

/// Checks that a keys/values pair is consistent: same batch, heads and tokens, same dtype
/// and device. Values may have a different head_dim than keys (some models do).
pub fn check_kv_pair(keys: &Tensor, values: &Tensor) -> Result<(KvShape, KvShape)> {
    let k = check_kv(keys, "keys")?;
    let v = check_kv(values, "values")?;
    if (k.batch, k.heads, k.tokens) != (v.batch, v.heads, v.tokens) {
        return Err(KvError::shape(
            "values",
            &values.size(),
            format!(
                "({}, {}, {}, head_dim) to match keys",
                k.batch, k.heads, k.tokens
            ),
        ));
    }
    let (kk, vk) = (kind_of(keys, "keys")?, kind_of(values, "values")?);
    if kk != vk {
        return Err(KvError::dtype(
            "values",
            kind_name(vk),
            format!("{} to match keys", kind_name(kk)),
        ));
    }
    if keys.device() != values.device() {
        return Err(KvError::device(
            "values",
            device_name(values.device()),
            format!("{} to match keys", device_name(keys.device())),
        ));
    }
    Ok((k, v))
}

/// Checks that every element of a float tensor is finite. On CPU the check is a parallel
/// scan of the raw data (no temporary); elsewhere a libtorch reduction on the device.
pub fn check_finite(t: &Tensor, argument: &str) -> Result<()> {
    let finite = if uses_cpu_kernels(t) {
        float_view::<ndarray::IxDyn>(t, argument)?.all_finite()
    } else {
        t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0
    };
    if finite {
        Ok(())
    } else {
        Err(KvError::non_finite(
            argument,
            "every key and value must be finite",
        ))
    }
}
