//! `asymlora._native`: a thin binding over `asymlora-core` and `asymlora-cli`.
//! Argument conversion and error mapping only; all logic lives in the core.

mod adapter;
mod combine;
mod errors;
mod merge;
mod orthogonal;
mod peft;
mod safetensors_io;
mod tensors;

use pyo3::prelude::*;

/// Runs the `asymlora` command line with `argv` (program name first); returns the
/// exit code. `python_commands` is appended to `--help`. A long command (merge) polls
/// Python's signal handlers, so a signal whose handler raises stops it cleanly: exit
/// code 128 + the exception's `signum` (asymlora._signals), or + SIGINT for a plain
/// KeyboardInterrupt.
#[pyfunction]
#[pyo3(signature = (argv, python_commands = ""))]
fn cli_main(py: Python<'_>, argv: Vec<String>, python_commands: &str) -> i32 {
    let cancelled = || Python::attach(|py| py.check_signals().err().map(|e| signal_of(py, &e)));
    py.detach(|| asymlora_cli::run_cancellable(argv, python_commands, &cancelled))
}

fn signal_of(py: Python<'_>, raised: &PyErr) -> i32 {
    raised
        .value(py)
        .getattr("signum")
        .and_then(|n| n.extract::<i32>())
        .unwrap_or(asymlora_cli::SIGINT)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    orthogonal::register(m)?;
    adapter::register(m)?;
    safetensors_io::register(m)?;
    merge::register(m)?;
    peft::register(m)?;
    combine::register(m)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add("GENERATORS", asymlora_core::Generator::ALL.map(|g| g.name()).to_vec())?;
    m.add("FORMAT_VERSION", asymlora_core::adapter::FORMAT_VERSION)?;
    Ok(())
}
