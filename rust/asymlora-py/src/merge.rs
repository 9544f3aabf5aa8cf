//! The offline merge: `asymlora.merge_files` / `unmerge_files` call `merge` here, with
//! the GIL released while the core streams the checkpoint.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use asymlora_core::merge::{merge as core_merge, AdapterInput, MergeOptions, MergeReport, Observer, Totals};
use asymlora_core::{Dtype, Error};
use pyo3::exceptions::PyRuntimeWarning;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::errors::to_py;

/// Reports progress to an optional Python callable (at most ~10 times a second, and
/// at the end) and checks Python's signal handlers, so Ctrl-C stops the merge.
struct PyObserver {
    callback: Option<Py<PyAny>>,
    totals: Totals,
    done: (u64, usize),
    last: Option<Instant>,
    error: Option<PyErr>,
}

impl PyObserver {
    fn report(&mut self, force: bool) {
        let Some(callback) = &self.callback else { return };
        if self.error.is_some() || (!force && self.last.is_some_and(|t| t.elapsed() < Duration::from_millis(100))) {
            return;
        }
        self.last = Some(Instant::now());
        let args = (self.done.0, self.totals.bytes, self.done.1, self.totals.modules);
        if let Err(e) = Python::attach(|py| callback.call1(py, args).map(drop)) {
            self.error = Some(e);
        }
    }
}

impl Observer for PyObserver {
    fn start(&mut self, totals: &Totals) {
        self.totals = totals.clone();
        self.report(true);
    }

    fn advance(&mut self, bytes: u64, modules: usize) {
        self.done.0 += bytes;
        self.done.1 += modules;
        let finished = self.done.0 >= self.totals.bytes;
        self.report(finished);
    }

    fn cancelled(&mut self) -> bool {
        if self.error.is_none() {
            if let Err(e) = Python::attach(|py| py.check_signals()) {
                self.error = Some(e);
            }
        }
        self.error.is_some()
    }
}

/// Merges `adapters` ((path, weight) pairs) into `base` and writes `out`; returns the
/// report. Raises what the core raises, or the exception a signal handler
/// or the `progress` callable raised (the merge then stops and writes nothing).
#[pyfunction]
#[allow(clippy::too_many_arguments)] // mirrors the Python signature, keyword arguments
#[pyo3(signature = (
    base, adapters, out, *, dtype = None, threads = None, force = false, prefix_map = Vec::new(),
    allow_nonfinite = false, subtract = false, fsync = true, progress = None
))]
fn merge(
    py: Python<'_>,
    base: PathBuf,
    adapters: Vec<(PathBuf, f64)>,
    out: PathBuf,
    dtype: Option<&str>,
    threads: Option<usize>,
    force: bool,
    prefix_map: Vec<(String, String)>,
    allow_nonfinite: bool,
    subtract: bool,
    fsync: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<PyMergeReport> {
    let dtype = dtype.map(str::parse::<Dtype>).transpose().map_err(to_py)?;
    let inputs: Vec<AdapterInput> = adapters.into_iter().map(|(p, w)| AdapterInput::new(p, w)).collect();
    let opts = MergeOptions {
        dtype,
        threads,
        force,
        prefix_map,
        allow_nonfinite,
        subtract,
        fsync,
    };
    let mut observer = PyObserver {
        callback: progress,
        totals: Totals::default(),
        done: (0, 0),
        last: None,
        error: None,
    };
    let result = py.detach(|| core_merge(&base, &inputs, &out, &opts, &mut observer));
    let report = match (result, observer.error.take()) {
        (Err(Error::Cancelled), Some(e)) => return Err(e),
        (Err(e), _) => return Err(to_py(e)),
        (Ok(report), None) => report,
        (Ok(report), Some(e)) => {
            // The callback failed after the last poll: the output is complete and in place.
            let message = format!("the progress callback raised {e}; the merge completed");
            PyErr::warn(
                py,
                &py.get_type::<PyRuntimeWarning>(),
                &std::ffi::CString::new(message)?,
                1,
            )?;
            report
        }
    };
    Ok(PyMergeReport(report))
}

/// What a merge did (frozen). See the attribute docs in `asymlora.MergeReport`.
#[pyclass(name = "MergeReport", module = "asymlora", frozen)]
pub struct PyMergeReport(MergeReport);

#[pymethods]
impl PyMergeReport {
    /// The output file or directory.
    #[getter]
    fn out(&self) -> PathBuf {
        self.0.out.clone()
    }
    /// safetensors files (and the index) written, by name.
    #[getter]
    fn files<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.0.files)
    }
    /// Other files of a model directory copied as they are (config, tokenizer, ...).
    #[getter]
    fn copied_files<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.0.copied_files)
    }
    /// Entries of the base directory not copied, with the reason.
    #[getter]
    fn skipped<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.0.skipped)
    }
    /// Weights changed by LoRA updates.
    #[getter]
    fn merged(&self) -> usize {
        self.0.merged
    }
    /// Adapter modules applied (each adapter counted).
    #[getter]
    fn modules(&self) -> usize {
        self.0.modules
    }
    /// Tensors replaced by an adapter's full tensors (PEFT `modules_to_save`).
    #[getter]
    fn replaced(&self) -> usize {
        self.0.replaced
    }
    /// Tensors only converted to the output dtype.
    #[getter]
    fn converted(&self) -> usize {
        self.0.converted
    }
    /// Tensors copied bit for bit.
    #[getter]
    fn unchanged(&self) -> usize {
        self.0.unchanged
    }
    /// Bytes of safetensors written.
    #[getter]
    fn bytes(&self) -> u64 {
        self.0.bytes
    }
    /// Values that became NaN or infinite (only with `allow_nonfinite`).
    #[getter]
    fn nonfinite(&self) -> u64 {
        self.0.nonfinite
    }
    /// Values of the merged weights.
    #[getter]
    fn merged_values(&self) -> u64 {
        self.0.merged_values
    }
    /// Of those, values recomputed in float64 (every value is the exact result rounded once either way).
    #[getter]
    fn recomputed(&self) -> u64 {
        self.0.recomputed
    }
    /// The warnings also issued with `warnings.warn`.
    #[getter]
    fn warnings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.0.warnings)
    }

    fn __repr__(&self) -> String {
        let r = &self.0;
        format!(
            "MergeReport(out={:?}, files={}, merged={}, modules={}, replaced={}, converted={}, unchanged={}, \
             bytes={}, recomputed={}, warnings={})",
            r.out,
            r.files.len(),
            r.merged,
            r.modules,
            r.replaced,
            r.converted,
            r.unchanged,
            r.bytes,
            r.recomputed,
            r.warnings.len()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_class::<PyMergeReport>()?;
    Ok(())
}
