//! The offline merge: `asymlora.merge_files` / `unmerge_files` call `merge` here, with
//! the GIL released while the core streams the checkpoint.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use asymlora_core::merge::{merge as core_merge, AdapterInput, MergeOptions, MergeReport, Observer, Totals};
use asymlora_core::{Dtype, Error};
use pyo3::exceptions::PyRuntimeWarning;
use pyo3::prelude::*;

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
    Ok(report.into())
}

/// What a merge did (frozen). Attributes are documented in `asymlora.MergeReport`;
/// sequences come out as fresh lists, so the report itself never changes.
#[pyclass(name = "MergeReport", module = "asymlora", frozen, get_all)]
pub struct PyMergeReport {
    out: PathBuf,
    files: Vec<String>,
    copied_files: Vec<String>,
    skipped: Vec<(String, String)>,
    merged: usize,
    modules: usize,
    replaced: usize,
    converted: usize,
    unchanged: usize,
    bytes: u64,
    nonfinite: u64,
    merged_values: u64,
    recomputed: u64,
    warnings: Vec<String>,
}

impl From<MergeReport> for PyMergeReport {
    fn from(r: MergeReport) -> Self {
        PyMergeReport {
            out: r.out,
            files: r.files,
            copied_files: r.copied_files,
            skipped: r.skipped,
            merged: r.merged,
            modules: r.modules,
            replaced: r.replaced,
            converted: r.converted,
            unchanged: r.unchanged,
            bytes: r.bytes,
            nonfinite: r.nonfinite,
            merged_values: r.merged_values,
            recomputed: r.recomputed,
            warnings: r.warnings,
        }
    }
}

#[pymethods]
impl PyMergeReport {
    fn __repr__(&self) -> String {
        format!(
            "MergeReport(out={:?}, files={}, merged={}, modules={}, replaced={}, converted={}, unchanged={}, \
             bytes={}, recomputed={}, warnings={})",
            self.out,
            self.files.len(),
            self.merged,
            self.modules,
            self.replaced,
            self.converted,
            self.unchanged,
            self.bytes,
            self.recomputed,
            self.warnings.len()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_class::<PyMergeReport>()?;
    Ok(())
}
