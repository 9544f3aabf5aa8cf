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
/// Python's signal handlers, so Ctrl-C stops it cleanly (exit code 130).
#[pyfunction]
#[pyo3(signature = (argv, python_commands = ""))]
fn cli_main(py: Python<'_>, argv: Vec<String>, python_commands: &str) -> i32 {
    let cancelled = || Python::attach(|py| py.check_signals().is_err());
    py.detach(|| asymlora_cli::run_cancellable(argv, python_commands, &cancelled))
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
