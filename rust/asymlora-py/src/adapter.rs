//! Adapter-file bindings: the v1 file, its config checks and the scaling rule.

use std::path::PathBuf;

use asymlora_core::adapter::{
    render_inspect, validate_config, write_adapter as core_write, AdapterConfig, AdapterFile, FactorA, ModuleKind,
    Scaling, TensorInfo,
};
use asymlora_core::Error;
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::tensors::{owned_tensors, raw, RawTensor, TensorArg};

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

    /// (dtype, shape, bytes) of `module`'s A (`[E, r, d_in]` for experts): stored, or
    /// regenerated from the seed.
    fn lora_a(&self, py: Python<'_>, module: &str) -> PyResult<RawTensor> {
        match py.detach(|| self.inner.lora_a(module)).map_err(to_py)? {
            FactorA::Stored { info, bytes } => Ok(raw(py, info, bytes)),
            FactorA::Generated(m) => {
                let config = self.inner.config();
                let module = self.inner.module(module).map_err(to_py)?;
                let info = TensorInfo {
                    dtype: m.dtype().to_safetensors(),
                    shape: module.a_shape(config.module_rank(module)),
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
fn write_adapter(py: Python<'_>, path: PathBuf, config_json: &str, tensors: Vec<TensorArg>) -> PyResult<()> {
    let config = AdapterConfig::from_json(config_json).map_err(|message| {
        to_py(Error::AdapterFormat {
            path: path.display().to_string(),
            location: "config".into(),
            message,
        })
    })?;
    let owned = owned_tensors(tensors)?;
    py.detach(|| core_write(&path, &config, &owned)).map_err(to_py)
}

/// Checks an adapter config on its own (ranges, generator, streams; not tensors):
/// the same checks every read and write makes. Raises `AdapterFormatError`.
#[pyfunction]
fn check_config(config_json: &str) -> PyResult<()> {
    let config = AdapterConfig::from_json(config_json).map_err(|message| {
        to_py(Error::AdapterFormat {
            path: "<config>".into(),
            location: "config".into(),
            message,
        })
    })?;
    validate_config("<config>", &config).map_err(to_py)
}

/// `s` in `W + s * B @ A` under the scaling rule named `scaling`.
#[pyfunction]
fn scale(scaling: &str, alpha: f64, rank: usize) -> PyResult<f64> {
    Ok(scaling.parse::<Scaling>().map_err(to_py)?.scale(alpha, rank))
}

/// The name of the scaling rule: `alpha/sqrt(r)` with rank-stabilised LoRA, else `alpha/r`.
#[pyfunction]
fn scaling_name(rslora: bool) -> &'static str {
    Scaling::from_rslora(rslora).name()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyAdapterFile>()?;
    m.add_function(wrap_pyfunction!(write_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(check_config, m)?)?;
    m.add_function(wrap_pyfunction!(scale, m)?)?;
    m.add_function(wrap_pyfunction!(scaling_name, m)?)?;
    m.add("SCALINGS", Scaling::ALL.map(Scaling::name).to_vec())?;
    m.add("KINDS", ModuleKind::ALL.map(ModuleKind::name).to_vec())?;
    Ok(())
}
