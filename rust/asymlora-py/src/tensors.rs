//! Tensors crossing the binding: out as (dtype code, shape, bytearray), in as
//! (name, dtype code, shape, bytes). The dtype codes are safetensors' own ("F32",
//! "BF16", "I64", ...); the Python layer wraps the bytes as numpy arrays.

use std::collections::BTreeMap;

use asymlora_core::dtype::st_dtype_from_code;
use asymlora_core::io::{OwnedTensor, TensorInfo};
use asymlora_core::Error;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyByteArray;

use crate::errors::to_py;

/// (dtype code, shape, bytes) of one tensor.
pub type RawTensor = (String, Vec<usize>, Py<PyByteArray>);

/// (name, dtype code, shape, bytes) of one tensor to write.
pub type TensorArg = (String, String, Vec<usize>, PyBackedBytes);

pub fn raw(py: Python<'_>, info: &TensorInfo, bytes: &[u8]) -> RawTensor {
    (
        info.dtype.to_string(),
        info.shape.clone(),
        PyByteArray::new(py, bytes).unbind(),
    )
}

/// Tensors to write, checked (known dtype, size matching the shape, no name twice)
/// and keyed by name.
pub fn owned_tensors(tensors: Vec<TensorArg>) -> PyResult<BTreeMap<String, OwnedTensor>> {
    let mut owned = BTreeMap::new();
    for (name, code, shape, data) in tensors {
        let dtype = st_dtype_from_code(&code).ok_or_else(|| {
            Error::invalid(
                "tensors",
                format!("tensor {name:?}: unknown safetensors dtype {code:?}"),
            )
        });
        let tensor = OwnedTensor::new(&name, dtype.map_err(to_py)?, shape, data.to_vec()).map_err(to_py)?;
        if owned.insert(name.clone(), tensor).is_some() {
            return Err(to_py(Error::invalid(
                "tensors",
                format!("tensor {name:?} is given twice"),
            )));
        }
    }
    Ok(owned)
}
