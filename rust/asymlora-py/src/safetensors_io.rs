//! Plain safetensors files (PEFT adapters, checkpoints): the core's mapped reader and
//! atomic, reproducible writer. Tensors cross as (dtype name, shape, bytearray).

use std::collections::BTreeMap;
use std::path::PathBuf;

use asymlora_core::io::{write_safetensors as core_write, OwnedTensor, SafetensorsFile};
use asymlora_core::Error;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyByteArray;
use safetensors::Dtype as StDtype;

use crate::errors::to_py;

type RawTensor = (String, Vec<usize>, Py<PyByteArray>);

fn parse_dtype(name: &str, tensor: &str) -> PyResult<StDtype> {
    let dtype = match name {
        "F64" => StDtype::F64,
        "F32" => StDtype::F32,
        "F16" => StDtype::F16,
        "BF16" => StDtype::BF16,
        "I64" => StDtype::I64,
        "I32" => StDtype::I32,
        "I16" => StDtype::I16,
        "I8" => StDtype::I8,
        "U64" => StDtype::U64,
        "U32" => StDtype::U32,
        "U16" => StDtype::U16,
        "U8" => StDtype::U8,
        "BOOL" => StDtype::BOOL,
        other => {
            return Err(to_py(Error::invalid(
                "tensors",
                format!("tensor {tensor:?}: unsupported dtype {other:?}"),
            )))
        }
    };
    Ok(dtype)
}

/// An open safetensors file (memory-mapped; tensors are read on request).
#[pyclass(name = "SafetensorsFile", module = "asymlora._native", frozen)]
struct PySafetensorsFile {
    inner: SafetensorsFile,
}

#[pymethods]
impl PySafetensorsFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| SafetensorsFile::open(&path)).map_err(to_py)?;
        Ok(PySafetensorsFile { inner })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    #[getter]
    fn metadata(&self) -> BTreeMap<String, String> {
        self.inner.metadata().clone()
    }

    /// {name: (dtype, shape)} of every tensor.
    fn infos(&self) -> BTreeMap<String, (String, Vec<usize>)> {
        self.inner
            .infos()
            .into_iter()
            .map(|(k, i)| (k, (format!("{:?}", i.dtype), i.shape)))
            .collect()
    }

    /// (dtype, shape, bytes) of tensor `name`.
    fn tensor(&self, py: Python<'_>, name: &str) -> PyResult<RawTensor> {
        let (info, bytes) = self.inner.tensor(name).map_err(to_py)?;
        Ok((
            format!("{:?}", info.dtype),
            info.shape.clone(),
            PyByteArray::new(py, bytes).unbind(),
        ))
    }
}

/// Writes a safetensors file atomically; `tensors`: (name, dtype, shape, bytes).
#[pyfunction]
fn write_safetensors(
    py: Python<'_>,
    path: PathBuf,
    metadata: BTreeMap<String, String>,
    tensors: Vec<(String, String, Vec<usize>, PyBackedBytes)>,
) -> PyResult<()> {
    let owned = owned_tensors(tensors, parse_dtype)?;
    py.detach(|| core_write(&path, &owned, &metadata)).map_err(to_py)
}

/// Tensors given as (name, dtype code, shape, bytes), checked and keyed by name.
pub fn owned_tensors(
    tensors: Vec<(String, String, Vec<usize>, PyBackedBytes)>,
    parse_dtype: impl Fn(&str, &str) -> PyResult<StDtype>,
) -> PyResult<BTreeMap<String, OwnedTensor>> {
    let mut owned = BTreeMap::new();
    for (name, dtype, shape, data) in tensors {
        let dtype = parse_dtype(&dtype, &name)?;
        let tensor = OwnedTensor::new(&name, dtype, shape, data.to_vec()).map_err(to_py)?;
        if owned.insert(name.clone(), tensor).is_some() {
            return Err(to_py(Error::invalid(
                "tensors",
                format!("tensor {name:?} is given twice"),
            )));
        }
    }
    Ok(owned)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySafetensorsFile>()?;
    m.add_function(wrap_pyfunction!(write_safetensors, m)?)?;
    Ok(())
}
