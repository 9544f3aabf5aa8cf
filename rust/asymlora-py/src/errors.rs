//! Core errors as typed Python exceptions.

use std::io::ErrorKind;

use asymlora_core::Error;
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyKeyboardInterrupt, PyOSError, PyPermissionError,
    PyValueError,
};
use pyo3::prelude::*;

pyo3::create_exception!(
    asymlora,
    AdapterFormatError,
    PyValueError,
    "An adapter file or config is malformed or inconsistent; the message names the module and field."
);

pyo3::create_exception!(
    asymlora,
    SafetensorsError,
    PyValueError,
    "A file is not a valid safetensors file (header, offsets or sizes are wrong)."
);

pyo3::create_exception!(
    asymlora,
    AdapterMismatchError,
    PyValueError,
    "An adapter does not fit a model or checkpoint (missing module, shape, rank, seed); nothing was changed."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("AdapterFormatError", m.py().get_type::<AdapterFormatError>())?;
    m.add("AdapterMismatchError", m.py().get_type::<AdapterMismatchError>())?;
    m.add("SafetensorsError", m.py().get_type::<SafetensorsError>())
}

/// Converts a core error into the matching Python exception.
pub fn to_py(err: Error) -> PyErr {
    let message = err.to_string();
    match err {
        Error::InvalidArgument { .. } => PyValueError::new_err(message),
        Error::AdapterFormat { .. } => AdapterFormatError::new_err(message),
        Error::Safetensors { .. } => SafetensorsError::new_err(message),
        Error::Mismatch { .. } => AdapterMismatchError::new_err(message),
        Error::Checkpoint { .. } | Error::NonFinite { .. } => PyValueError::new_err(message),
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
