//! Exact adapter algebra: `asymlora.combine_adapters` calls `combine` here, with the
//! GIL released while the core reads, sums and writes.

use std::path::PathBuf;

use asymlora_core::combine::{combine as core_combine, parse_b_dtype, CombineOptions, CombineReport};
use asymlora_core::merge::AdapterInput;
use pyo3::prelude::*;

use crate::errors::to_py;

/// Combines `adapters` ((path, weight) pairs) into the adapter file `out`; returns the
/// report. Raises what the core raises.
#[pyfunction]
#[pyo3(signature = (adapters, out, *, b_dtype = None, force = false))]
fn combine(
    py: Python<'_>,
    adapters: Vec<(PathBuf, f64)>,
    out: PathBuf,
    b_dtype: Option<&str>,
    force: bool,
) -> PyResult<PyCombineReport> {
    let b_dtype = b_dtype.map(parse_b_dtype).transpose().map_err(to_py)?;
    let inputs: Vec<AdapterInput> = adapters.into_iter().map(|(p, w)| AdapterInput::new(p, w)).collect();
    let opts = CombineOptions { b_dtype, force };
    let report = py.detach(|| core_combine(&inputs, &out, &opts)).map_err(to_py)?;
    Ok(report.into())
}

/// What a combination did (frozen). Attributes are documented in
/// `asymlora.CombineReport`; `warnings` comes out as a fresh list each time.
#[pyclass(name = "CombineReport", module = "asymlora", frozen, get_all)]
pub struct PyCombineReport {
    out: PathBuf,
    adapters: usize,
    modules: usize,
    shared: usize,
    concatenated: usize,
    stored_a: usize,
    full_tensors: usize,
    warnings: Vec<String>,
}

impl From<CombineReport> for PyCombineReport {
    fn from(r: CombineReport) -> Self {
        PyCombineReport {
            out: r.out,
            adapters: r.adapters,
            modules: r.modules,
            shared: r.shared,
            concatenated: r.concatenated,
            stored_a: r.stored_a,
            full_tensors: r.full_tensors,
            warnings: r.warnings,
        }
    }
}

#[pymethods]
impl PyCombineReport {
    fn __repr__(&self) -> String {
        format!(
            "CombineReport(out={:?}, adapters={}, modules={}, shared={}, concatenated={}, stored_a={}, \
             full_tensors={}, warnings={})",
            self.out,
            self.adapters,
            self.modules,
            self.shared,
            self.concatenated,
            self.stored_a,
            self.full_tensors,
            self.warnings.len()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(combine, m)?)?;
    m.add_class::<PyCombineReport>()?;
    Ok(())
}
