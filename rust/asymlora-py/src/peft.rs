//! PEFT interop: the core's one PEFT reader (through `import_peft`), PEFT's pattern
//! rule, and the names of a PEFT adapter directory.

use std::path::PathBuf;

use asymlora_core::peft::{self, PatternRule};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::to_py;

/// Converts the PEFT LoRA directory `peft_dir` into the adapter file `path`; returns
/// the warnings to show (skipped integer tensors, base-rewriting initialisations).
#[pyfunction]
fn import_peft(py: Python<'_>, peft_dir: PathBuf, path: PathBuf, seed: u64) -> PyResult<Vec<String>> {
    let report = py.detach(|| peft::import_peft(&peft_dir, &path, seed)).map_err(to_py)?;
    Ok(report.warnings)
}

/// PEFT's `rank_pattern` / `alpha_pattern` rule over `keys` (in their order).
#[pyclass(name = "PatternRule", module = "asymlora._native", frozen)]
struct PyPatternRule {
    inner: PatternRule,
}

#[pymethods]
impl PyPatternRule {
    /// Compiles `keys`; a key that is not a usable regex raises `ValueError` naming `what`.
    #[new]
    #[pyo3(signature = (keys, what = "pattern"))]
    fn new(keys: Vec<String>, what: &str) -> PyResult<Self> {
        let inner = PatternRule::new(keys)
            .map_err(|e| PyValueError::new_err(format!("{what} key {:?} is {}", e.key, e.message)))?;
        Ok(PyPatternRule { inner })
    }

    /// Index of the first key that selects `module`, or `None`.
    fn first_match(&self, module: &str) -> Option<usize> {
        self.inner.first_match(module)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(import_peft, m)?)?;
    m.add_class::<PyPatternRule>()?;
    m.add("PEFT_CONFIG_NAME", peft::CONFIG_NAME)?;
    m.add("PEFT_WEIGHTS_NAME", peft::WEIGHTS_NAME)?;
    m.add("PEFT_PICKLE_WEIGHTS_NAME", peft::PICKLE_WEIGHTS_NAME)?;
    m.add("PEFT_KEY_PREFIX", peft::KEY_PREFIX)?;
    m.add("PEFT_PARAMETER_ORDER", peft::PARAMETER_ORDER.to_vec())?;
    Ok(())
}
