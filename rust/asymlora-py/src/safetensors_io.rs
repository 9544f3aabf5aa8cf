//! Plain safetensors files (PEFT adapters, checkpoints): the core's mapped reader and
//! atomic, reproducible writer. Tensors cross as (dtype name, shape, bytearray).

use std::collections::BTreeMap;
use std::path::PathBuf;

use asymlora_core::io::{write_safetensors as core_write, SafetensorsFile};
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::tensors::{owned_tensors, raw, RawTensor, TensorArg};

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
            .map(|(k, i)| (k, (i.dtype.to_string(), i.shape)))
            .collect()
    }

    /// (dtype, shape, bytes) of tensor `name`.
    fn tensor(&self, py: Python<'_>, name: &str) -> PyResult<RawTensor> {
        let (info, bytes) = self.inner.tensor(name).map_err(to_py)?;
        Ok(raw(py, info, bytes))
    }
}

/// Writes a safetensors file atomically; `tensors`: (name, dtype, shape, bytes).
#[pyfunction]
fn write_safetensors(
    py: Python<'_>,
    path: PathBuf,
    metadata: BTreeMap<String, String>,
    tensors: Vec<TensorArg>,
) -> PyResult<()> {
    let owned = owned_tensors(tensors)?;
    py.detach(|| core_write(&path, &owned, &metadata)).map_err(to_py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySafetensorsFile>()?;
    m.add_function(wrap_pyfunction!(write_safetensors, m)?)?;
    Ok(())
}
