//! Every conversion between Python objects and Rust data: `torch.Tensor` <-> `tch::Tensor`
//! (same storage, no copy) and numpy arrays -> `ndarray` views (no copy).
//!
//! Version coupling: the `tch`/`torch-sys` 0.26 used here are built for libtorch 2.13.0,
//! and the extension links the libtorch of the installed `torch` package, which must be
//! that version (pinned in pyproject.toml). `kvpress_rs/__init__.py` imports torch before
//! this module so that libtorch is loaded first.

use crate::tensor::FloatView;
use numpy::{
    PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use tch::Tensor;

pub const LIBTORCH_VERSION: &str = "2.13.0";

/// A `torch.Tensor` that crossed into Rust: a new handle on the same storage.
pub struct PyTensor(pub Tensor);

impl<'a, 'py> FromPyObject<'a, 'py> for PyTensor {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let ptr = obj.as_ptr() as *mut tch::python::CPyObject;
        // SAFETY: `ptr` is a live Python object (borrowed for this call); the unpack checks
        // its type before reading it as a tensor.
        let tensor = unsafe { Tensor::pyobject_unpack(ptr) }
            .map_err(|e| PyTypeError::new_err(format!("cannot read torch.Tensor: {e}")))?;
        match tensor {
            Some(t) => Ok(PyTensor(t)),
            None => Err(PyTypeError::new_err(format!(
                "expected a torch.Tensor, got {}",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))),
        }
    }
}

impl<'py> IntoPyObject<'py> for PyTensor {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Self::Output> {
        let ptr = self
            .0
            .pyobject_wrap()
            .map_err(|e| super::errors::to_pyerr(e.into()))?;
        // SAFETY: `pyobject_wrap` returns a new (owned) reference to a torch.Tensor.
        Ok(unsafe { Bound::from_owned_ptr(py, ptr as *mut pyo3::ffi::PyObject) })
    }
}

/// An array argument of the functional API: a torch tensor or a numpy array.
pub enum ArrayArg<'py> {
    Torch(Tensor),
    Numpy(Bound<'py, PyUntypedArray>),
}

impl<'a, 'py> FromPyObject<'a, 'py> for ArrayArg<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(array) = obj.cast::<PyUntypedArray>() {
            return Ok(ArrayArg::Numpy(array.to_owned()));
        }
        match obj.extract::<PyTensor>() {
            Ok(t) => Ok(ArrayArg::Torch(t.0)),
            Err(_) => Err(PyTypeError::new_err(format!(
                "expected a torch.Tensor or a numpy.ndarray, got {}",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))),
        }
    }
}

/// The `keys`/`values` pair of a functional-API call: both torch or both numpy;
/// `values` defaults to `keys`.
pub enum KvArgs<'py> {
    Torch(Tensor, Tensor),
    Numpy(NumpyFloat<'py>, NumpyFloat<'py>),
}

impl<'py> KvArgs<'py> {
    pub fn new(keys: ArrayArg<'py>, values: Option<ArrayArg<'py>>) -> PyResult<Self> {
        match (keys, values) {
            (ArrayArg::Torch(k), None) => Ok(KvArgs::Torch(k.shallow_clone(), k)),
            (ArrayArg::Torch(k), Some(ArrayArg::Torch(v))) => Ok(KvArgs::Torch(k, v)),
            (ArrayArg::Numpy(k), None) => Ok(KvArgs::Numpy(
                NumpyFloat::new(&k, "keys")?,
                NumpyFloat::new(&k, "values")?,
            )),
            (ArrayArg::Numpy(k), Some(ArrayArg::Numpy(v))) => Ok(KvArgs::Numpy(
                NumpyFloat::new(&k, "keys")?,
                NumpyFloat::new(&v, "values")?,
            )),
            _ => Err(PyTypeError::new_err(
                "`keys` and `values` must both be torch.Tensor or both numpy.ndarray",
            )),
        }
    }
}

fn shape_error<D: ndarray::Dimension>(argument: &str, shape: &[usize]) -> PyErr {
    super::errors::to_pyerr(crate::error::KvError::shape(
        argument,
        &shape.iter().map(|&x| x as i64).collect::<Vec<_>>(),
        format!("rank {}", D::NDIM.unwrap_or(0)),
    ))
}

/// A typed readonly view of a numpy array of element `T` and rank `D`, or a dtype/shape
/// error naming `argument`.
pub fn numpy_view<'py, T: numpy::Element, D: ndarray::Dimension>(
    array: &Bound<'py, PyUntypedArray>,
    argument: &str,
    expected_dtype: &str,
) -> PyResult<numpy::PyReadonlyArray<'py, T, D>> {
    let typed = array.cast::<PyArrayDyn<T>>().map_err(|_| {
        super::errors::to_pyerr(crate::error::KvError::dtype(
            argument,
            format!("numpy {}", array.dtype()),
            expected_dtype,
        ))
    })?;
    let ranked = typed
        .clone()
        .cast_into::<numpy::PyArray<T, D>>()
        .map_err(|_| shape_error::<D>(argument, array.shape()))?;
    Ok(ranked.try_readonly()?)
}

/// A readonly numpy float array (float32 or float16), borrowed for the duration of a call.
pub enum NumpyFloat<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, half::f16>),
}

impl<'py> NumpyFloat<'py> {
    pub fn new(array: &Bound<'py, PyUntypedArray>, argument: &str) -> PyResult<Self> {
        if let Ok(a) = array.cast::<PyArrayDyn<f32>>() {
            return Ok(NumpyFloat::F32(a.try_readonly()?));
        }
        if let Ok(a) = array.cast::<PyArrayDyn<half::f16>>() {
            return Ok(NumpyFloat::F16(a.try_readonly()?));
        }
        Err(super::errors::to_pyerr(crate::error::KvError::dtype(
            argument,
            format!("numpy {}", array.dtype()),
            "numpy float32 or float16",
        )))
    }

    pub fn ndim(&self) -> usize {
        match self {
            NumpyFloat::F32(a) => a.ndim(),
            NumpyFloat::F16(a) => a.ndim(),
        }
    }

    /// A view of rank `D`, or a shape error naming `argument`.
    pub fn view<D: ndarray::Dimension>(&self, argument: &str) -> PyResult<FloatView<'_, D>> {
        Ok(match self {
            NumpyFloat::F32(a) => {
                let v = a.as_array();
                FloatView::F32(
                    v.clone()
                        .into_dimensionality::<D>()
                        .map_err(|_| shape_error::<D>(argument, v.shape()))?,
                )
            }
            NumpyFloat::F16(a) => {
                let v = a.as_array();
                FloatView::F16(
                    v.clone()
                        .into_dimensionality::<D>()
                        .map_err(|_| shape_error::<D>(argument, v.shape()))?,
                )
            }
        })
    }
}

/// An argument that is either a Python int or an integer `torch.Tensor` (a position delta).
/// An int becomes a 0-d int64 CPU tensor.
pub struct IntOrTensor(pub Tensor);

impl<'a, 'py> FromPyObject<'a, 'py> for IntOrTensor {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(t) = obj.extract::<PyTensor>() {
            return Ok(IntOrTensor(t.0));
        }
        match obj.extract::<i64>() {
            Ok(v) => Ok(IntOrTensor(Tensor::from(v))),
            Err(_) => Err(PyTypeError::new_err(format!(
                "expected an int or an integer torch.Tensor, got {}",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))),
        }
    }
}

/// A dtype argument given as a `torch.dtype` or a string: its name ("torch.float32",
/// "bfloat16"); the core parses it.
pub struct DtypeName(pub String);

impl<'a, 'py> FromPyObject<'a, 'py> for DtypeName {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(s) = obj.extract::<String>() {
            return Ok(DtypeName(s));
        }
        let is_dtype = obj.get_type().name().map(|n| n == "dtype").unwrap_or(false);
        if is_dtype {
            return Ok(DtypeName(obj.str()?.to_string()));
        }
        Err(PyTypeError::new_err(format!(
            "expected a torch.dtype or a dtype name, got {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        )))
    }
}
