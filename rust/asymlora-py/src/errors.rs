//! Core errors as typed Python exceptions, all under `asymlora.AsymloraError`.
//!
//! Each data error subclasses both `AsymloraError` and the builtin it has always been
//! (`ValueError`), so `except AsymloraError` catches everything asymlora refuses and
//! `except ValueError` keeps working. PyO3's `create_exception!` takes one base only,
//! so the subclasses are made with Python's `type(name, bases, namespace)` when the
//! module is initialised. Bad arguments stay plain `ValueError`s and file-system
//! failures the matching `OSError`s, as Python's own functions raise them.

use std::io::ErrorKind;

use asymlora_core::Error;
use pyo3::exceptions::{
    PyException, PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyKeyboardInterrupt, PyOSError,
    PyPermissionError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

pyo3::create_exception!(
    asymlora,
    AsymloraError,
    PyException,
    "Base of every error asymlora raises about adapters, checkpoints and files it refuses."
);

/// A `ValueError` subclass of `AsymloraError`, created once.
struct DataError {
    name: &'static str,
    doc: &'static str,
    class: PyOnceLock<Py<PyType>>,
}

impl DataError {
    const fn new(name: &'static str, doc: &'static str) -> DataError {
        DataError {
            name,
            doc,
            class: PyOnceLock::new(),
        }
    }

    fn class<'py>(&self, py: Python<'py>) -> PyResult<&Bound<'py, PyType>> {
        self.class
            .get_or_try_init(py, || {
                let bases = PyTuple::new(py, [py.get_type::<AsymloraError>(), py.get_type::<PyValueError>()])?;
                let namespace = PyDict::new(py);
                namespace.set_item("__doc__", self.doc)?;
                namespace.set_item("__module__", "asymlora")?;
                let class = py.get_type::<PyType>().call1((self.name, bases, namespace))?;
                Ok(class.cast_into::<PyType>()?.unbind())
            })
            .map(|c| c.bind(py))
    }

    fn err(&self, message: String) -> PyErr {
        Python::attach(|py| match self.class(py) {
            Ok(class) => PyErr::from_type(class.clone(), message),
            Err(e) => e,
        })
    }
}

static ADAPTER_FORMAT: DataError = DataError::new(
    "AdapterFormatError",
    "An adapter file, PEFT adapter directory or adapter config is malformed or unsupported; the message names the \
     file and field.",
);
static ADAPTER_MISMATCH: DataError = DataError::new(
    "AdapterMismatchError",
    "An adapter does not fit a model or checkpoint (missing module, shape, rank, seed); nothing was changed.",
);
static SAFETENSORS: DataError = DataError::new(
    "SafetensorsError",
    "A file is not a valid safetensors file (header, offsets or sizes are wrong).",
);
static CHECKPOINT: DataError = DataError::new(
    "CheckpointError",
    "A model checkpoint (file, shard set or index) cannot be used as a merge base.",
);
static NON_FINITE: DataError = DataError::new(
    "NonFiniteError",
    "NaN or infinite values where finite ones are required (adapter factors, or a merged weight that overflowed).",
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("AsymloraError", py.get_type::<AsymloraError>())?;
    for error in [
        &ADAPTER_FORMAT,
        &ADAPTER_MISMATCH,
        &SAFETENSORS,
        &CHECKPOINT,
        &NON_FINITE,
    ] {
        m.add(error.name, error.class(py)?)?;
    }
    Ok(())
}

/// Converts a core error into the matching Python exception.
pub fn to_py(err: Error) -> PyErr {
    let message = err.to_string();
    match err {
        Error::InvalidArgument { .. } => PyValueError::new_err(message),
        Error::AdapterFormat { .. } => ADAPTER_FORMAT.err(message),
        Error::Safetensors { .. } => SAFETENSORS.err(message),
        Error::Mismatch { .. } => ADAPTER_MISMATCH.err(message),
        Error::Checkpoint { .. } => CHECKPOINT.err(message),
        Error::NonFinite { .. } => NON_FINITE.err(message),
        Error::Exists { .. } => PyFileExistsError::new_err(message),
        Error::Cancelled => PyKeyboardInterrupt::new_err(message),
        Error::Io { source, .. } => match source.kind() {
            ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
            ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
            ErrorKind::IsADirectory => PyIsADirectoryError::new_err(message),
            _ => PyOSError::new_err(message),
        },
    }
}

/// A rayon pool with `threads` workers (None: rayon's default, all cores).
pub fn thread_pool(threads: Option<usize>) -> PyResult<rayon::ThreadPool> {
    if threads == Some(0) {
        return Err(PyValueError::new_err(
            "invalid argument `threads`: must be at least 1 (or None for all cores)",
        ));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .map_err(|e| PyOSError::new_err(format!("cannot start a thread pool: {e}")))
}
