//! Adapter-file bindings. Tensors cross as (dtype name, shape, bytearray); the
//! Python layer wraps them as numpy arrays.

use std::path::PathBuf;

use asymlora_core::adapter::{
    render_inspect, write_adapter as core_write, AdapterConfig, AdapterFile, FactorA, TensorInfo,
};
use asymlora_core::Error;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyByteArray;
use safetensors::Dtype as StDtype;

use crate::errors::to_py;
use crate::safetensors_io::owned_tensors;

type RawTensor = (String, Vec<usize>, Py<PyByteArray>);

fn dtype_name(dtype: StDtype) -> String {
    format!("{dtype:?}")
}

fn parse_st_dtype(name: &str, tensor: &str) -> PyResult<StDtype> {
    match name {
        "F64" => Ok(StDtype::F64),
        "F32" => Ok(StDtype::F32),
        "F16" => Ok(StDtype::F16),
        "BF16" => Ok(StDtype::BF16),
        other => Err(to_py(Error::invalid(
            "tensors",
            format!("tensor {tensor:?}: dtype {other:?} cannot be stored in an adapter (F64, F32, F16, BF16)"),
        ))),
    }
}

fn raw(py: Python<'_>, info: &TensorInfo, bytes: &[u8]) -> RawTensor {
    (
        dtype_name(info.dtype),
        info.shape.clone(),
        PyByteArray::new(py, bytes).unbind(),
    )
}

/// An open, validated adapter file (memory-mapped; tensors are read on request).
#[pyclass(name = "AdapterFile", module = "asymlora._native", frozen)]
struct PyAdapterFile {
    inner: AdapterFile,
}

#[pymethods]
impl PyAdapterFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| AdapterFile::open(&path)).map_err(to_py)?;
        Ok(PyAdapterFile { inner })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    #[getter]
    fn config_json(&self) -> String {
        self.inner.config().to_json()
    }

    #[getter]
    fn file_size(&self) -> u64 {
        self.inner.file_size()
    }

    #[getter]
    fn classic_lora_size(&self) -> u64 {
        self.inner.classic_lora_size()
    }

    fn tensor_names(&self) -> Vec<String> {
        self.inner.tensor_names().map(str::to_string).collect()
    }

    /// (dtype, shape, bytes) of tensor `name`.
    fn tensor(&self, py: Python<'_>, name: &str) -> PyResult<RawTensor> {
        let (info, bytes) = self.inner.tensor(name).map_err(to_py)?;
        Ok(raw(py, info, bytes))
    }

    /// (dtype, shape, bytes) of `module`'s A: stored, or regenerated from the seed.
    fn lora_a(&self, py: Python<'_>, module: &str) -> PyResult<RawTensor> {
        match py.detach(|| self.inner.lora_a(module)).map_err(to_py)? {
            FactorA::Stored { info, bytes } => Ok(raw(py, info, bytes)),
            FactorA::Generated(m) => {
                let spec = self.inner.config().a_spec(self.inner.module(module).map_err(to_py)?);
                let info = TensorInfo {
                    dtype: m.dtype().to_safetensors(),
                    shape: vec![spec.rank, spec.d_in],
                };
                Ok(raw(py, &info, &m.to_le_bytes()))
            }
        }
    }

    /// The report `asymlora inspect` prints.
    fn inspect(&self) -> String {
        render_inspect(&self.inner)
    }

    fn __repr__(&self) -> String {
        format!("AdapterFile({:?})", self.inner.path())
    }
}

/// Validates and writes an adapter atomically. `tensors`: (name, dtype, shape, bytes).
#[pyfunction]
fn write_adapter(
    py: Python<'_>,
    path: PathBuf,
    config_json: &str,
    tensors: Vec<(String, String, Vec<usize>, PyBackedBytes)>,
) -> PyResult<()> {
    let config = AdapterConfig::from_json(config_json).map_err(|message| {
        to_py(Error::AdapterFormat {
            path: path.display().to_string(),
            location: "config".into(),
            message,
        })
    })?;
    let owned = owned_tensors(tensors, parse_st_dtype)?;
    py.detach(|| core_write(&path, &config, &owned)).map_err(to_py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyAdapterFile>()?;
    m.add_function(wrap_pyfunction!(write_adapter, m)?)?;
    Ok(())
}
