//! Every conversion between Python objects and Rust data: `torch.Tensor` <-> `tch::Tensor`
//! (same storage, no copy), and numpy arrays -> CPU tensors over the same memory (no copy;
//! the CPU kernels then read them through zero-copy `ndarray` views).
//!
//! Version coupling: the `tch`/`torch-sys` 0.26 used here are built for libtorch 2.13.0,
//! and the extension links the libtorch of the installed `torch` package, which must be
//! that version (pinned in pyproject.toml). `kvpress_rs/__init__.py` imports torch before
//! this module so that libtorch is loaded first.

use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
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

/// An array argument of the functional API: a torch tensor, or a numpy array viewed as a
/// tensor over the same memory (no copy). Results go back as the same kind of array.
pub struct ArrayArg<'py> {
    pub tensor: Tensor,
    /// The numpy array whose memory `tensor` views; kept alive (and borrowed) for the call.
    pub numpy: Option<Bound<'py, PyUntypedArray>>,
}

impl<'a, 'py> FromPyObject<'a, 'py> for ArrayArg<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(array) = obj.cast::<PyUntypedArray>() {
            let tensor = numpy_as_tensor(&array)?;
            return Ok(ArrayArg {
                tensor,
                numpy: Some(array.to_owned()),
            });
        }
        match obj.extract::<PyTensor>() {
            Ok(t) => Ok(ArrayArg {
                tensor: t.0,
                numpy: None,
            }),
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

impl ArrayArg<'_> {
    pub fn is_numpy(&self) -> bool {
        self.numpy.is_some()
    }
}

/// A numpy array (float32, float16, int64 or int32) as a CPU tensor over the same memory.
fn numpy_as_tensor(array: &Bound<'_, PyUntypedArray>) -> PyResult<Tensor> {
    let dtype = array.dtype();
    let (kind, item) = if dtype.is_equiv_to(&numpy::dtype::<f32>(array.py())) {
        (tch::Kind::Float, 4)
    } else if dtype.is_equiv_to(&numpy::dtype::<half::f16>(array.py())) {
        (tch::Kind::Half, 2)
    } else if dtype.is_equiv_to(&numpy::dtype::<i64>(array.py())) {
        (tch::Kind::Int64, 8)
    } else if dtype.is_equiv_to(&numpy::dtype::<i32>(array.py())) {
        (tch::Kind::Int, 4)
    } else {
        return Err(super::errors::to_pyerr(crate::error::KvError::dtype(
            "array",
            format!("numpy {dtype}"),
            "numpy float32, float16, int64 or int32",
        )));
    };
    let size: Vec<i64> = array.shape().iter().map(|&x| x as i64).collect();
    let strides: Vec<i64> = array.strides().iter().map(|&s| s as i64 / item).collect();
    if array
        .strides()
        .iter()
        .any(|&s| s < 0 || s as i64 % item != 0)
    {
        return Err(super::errors::to_pyerr(crate::error::KvError::invalid(
            "array",
            "negative or unaligned strides are not supported; pass np.ascontiguousarray(x)",
        )));
    }
    // SAFETY: the pointer, shape and element strides describe the array's own memory, which
    // the caller keeps alive (ArrayArg holds the array) for as long as the tensor is used.
    let ptr = unsafe { (*array.as_array_ptr()).fields.data } as *const u8;
    unsafe { Tensor::f_from_blob(ptr, &size, &strides, kind, tch::Device::Cpu) }
        .map_err(|e| super::errors::to_pyerr(e.into()))
}

/// A result tensor as the kind of array the caller passed in: the torch tensor itself, or
/// a numpy array sharing its memory (bfloat16, which numpy lacks, goes to float32).
pub fn to_array<'py>(
    py: Python<'py>,
    tensor: Tensor,
    like_numpy: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if !like_numpy {
        return PyTensor(tensor).into_pyobject(py);
    }
    let tensor = if tensor.kind() == tch::Kind::BFloat16 {
        tensor
            .f_to_kind(tch::Kind::Float)
            .map_err(|e| super::errors::to_pyerr(e.into()))?
    } else {
        tensor
    };
    PyTensor(tensor).into_pyobject(py)?.call_method0("numpy")
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
