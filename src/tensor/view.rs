//! Zero-copy `ndarray` views over the memory of CPU `tch::Tensor`s.
//!
//! A view borrows the tensor handle, so the storage outlives it. Strides are taken from
//! the tensor, so non-contiguous inputs (transposes, narrows, expands) are read correctly
//! without a copy; only mutable views require a contiguous tensor (a strided or expanded
//! tensor could alias its own elements).

use super::element::{KvFloat, TorchElement};
use super::{kind_name, kind_of};
use crate::error::{KvError, Result};
use half::{bf16, f16};
use ndarray::{ArrayView, ArrayViewMut, Dimension, IntoDimension, ShapeBuilder};
use rayon::prelude::*;
use std::ptr::NonNull;
use tch::{Device, Kind, Tensor};

/// A read-only view of a float tensor whose element type is known only at run time.
pub enum FloatView<'a, D: Dimension> {
    F32(ArrayView<'a, f32, D>),
    F16(ArrayView<'a, f16, D>),
    Bf16(ArrayView<'a, bf16, D>),
}

pub type FloatView3<'a> = FloatView<'a, ndarray::Ix3>;
pub type FloatView4<'a> = FloatView<'a, ndarray::Ix4>;

impl<'a, D: Dimension> FloatView<'a, D> {
    pub fn shape(&self) -> &[usize] {
        match self {
            FloatView::F32(v) => v.shape(),
            FloatView::F16(v) => v.shape(),
            FloatView::Bf16(v) => v.shape(),
        }
    }

    /// Whether every element is finite (a parallel scan).
    pub fn all_finite(&self) -> bool {
        match self {
            FloatView::F32(v) => all_finite(v),
            FloatView::F16(v) => all_finite(v),
            FloatView::Bf16(v) => all_finite(v),
        }
    }
}

/// Runs `$body` with `$v` bound to the typed view inside a [`FloatView`].
#[macro_export]
macro_rules! with_float_view {
    ($view:expr, $v:ident => $body:expr) => {
        match $view {
            $crate::tensor::FloatView::F32($v) => $body,
            $crate::tensor::FloatView::F16($v) => $body,
            $crate::tensor::FloatView::Bf16($v) => $body,
        }
    };
}

fn layout<D: Dimension>(t: &Tensor, argument: &str) -> Result<(D, D)> {
    let size = t.size();
    if let Some(n) = D::NDIM {
        if size.len() != n {
            return Err(KvError::shape(argument, &size, format!("rank {n}")));
        }
    }
    let stride = t.stride();
    if stride.iter().any(|&s| s < 0) {
        return Err(KvError::invalid(
            argument,
            "negative strides are not supported",
        ));
    }
    let to_dim = |v: &[i64]| -> Result<D> {
        let dyn_dim = v
            .iter()
            .map(|&x| x as usize)
            .collect::<Vec<_>>()
            .into_dimension();
        D::from_dimension(&dyn_dim)
            .ok_or_else(|| KvError::shape(argument, &size, "a supported rank"))
    };
    Ok((to_dim(&size)?, to_dim(&stride)?))
}

fn check_cpu_kind(t: &Tensor, expected: Kind, argument: &str) -> Result<()> {
    if t.device() != Device::Cpu {
        return Err(KvError::device(
            argument,
            super::device_name(t.device()),
            "cpu",
        ));
    }
    let kind = kind_of(t, argument)?;
    if kind != expected {
        return Err(KvError::dtype(
            argument,
            kind_name(kind),
            kind_name(expected),
        ));
    }
    Ok(())
}

/// A read-only view of a CPU tensor's data with element type `T` and rank `D`.
pub fn array_view<'a, T: TorchElement, D: Dimension>(
    t: &'a Tensor,
    argument: &str,
) -> Result<ArrayView<'a, T, D>> {
    check_cpu_kind(t, T::KIND, argument)?;
    let (shape, strides) = layout::<D>(t, argument)?;
    let ptr = if t.numel() == 0 {
        NonNull::<T>::dangling().as_ptr()
    } else {
        t.data_ptr() as *mut T
    };
    // SAFETY: the tensor is a CPU tensor of element type T (checked) whose sizes and
    // strides describe valid, in-bounds memory starting at data_ptr (which already includes
    // the storage offset). The view borrows the handle, which keeps the storage alive.
    Ok(unsafe { ArrayView::from_shape_ptr(shape.strides(strides), ptr as *const T) })
}

/// A mutable view of a contiguous CPU tensor's data.
pub fn array_view_mut<'a, T: TorchElement, D: Dimension>(
    t: &'a mut Tensor,
    argument: &str,
) -> Result<ArrayViewMut<'a, T, D>> {
    check_cpu_kind(t, T::KIND, argument)?;
    if !t.is_contiguous() {
        return Err(KvError::invalid(
            argument,
            "an output tensor must be contiguous",
        ));
    }
    let (shape, strides) = layout::<D>(t, argument)?;
    let ptr = if t.numel() == 0 {
        NonNull::<T>::dangling().as_ptr()
    } else {
        t.data_ptr() as *mut T
    };
    // SAFETY: as in `array_view`; contiguity guarantees that no two indices alias, and the
    // `&mut` borrow of the handle stands for exclusive access during the view's life.
    Ok(unsafe { ArrayViewMut::from_shape_ptr(shape.strides(strides), ptr) })
}

/// A read-only view of a CPU float tensor (f32, f16 or bf16).
pub fn float_view<'a, D: Dimension>(t: &'a Tensor, argument: &str) -> Result<FloatView<'a, D>> {
    match kind_of(t, argument)? {
        Kind::Float => Ok(FloatView::F32(array_view(t, argument)?)),
        Kind::Half => Ok(FloatView::F16(array_view(t, argument)?)),
        Kind::BFloat16 => Ok(FloatView::Bf16(array_view(t, argument)?)),
        other => Err(KvError::dtype(
            argument,
            kind_name(other),
            "torch.float32, torch.float16 or torch.bfloat16",
        )),
    }
}

/// Whether every element of the view is finite; a parallel scan.
pub(crate) fn all_finite<T: KvFloat, D: Dimension>(v: &ArrayView<'_, T, D>) -> bool {
    match v.as_slice_memory_order() {
        Some(s) if s.len() <= 1 << 20 => finite_slice(s),
        Some(s) => s.par_chunks(1 << 18).all(finite_slice),
        None => v.view().into_dyn().into_par_iter().all(|x| x.is_finite()),
    }
}

/// A non-short-circuiting fold per block (branch-free, so it vectorizes) that stops at the
/// first block holding a non-finite element. Small tensors are not split: a parallel task
/// costs more than scanning a megabyte. Always inlined: the quantize kernel calls it on
/// each tile inside its CPU-feature-specific versions.
#[inline(always)]
pub(crate) fn finite_slice<T: KvFloat>(s: &[T]) -> bool {
    s.chunks(1 << 12)
        .all(|c| c.iter().fold(true, |ok, x| ok & x.is_finite()))
}
