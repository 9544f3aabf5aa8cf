//! The `asymlora` command line. The same entry point serves the standalone binary
//! and the Python console script (through the binding crate), so both behave alike.

use std::ffi::OsString;
use std::io::{ErrorKind, Write};
use std::path::PathBuf;

use asymlora_core::adapter::{render_inspect, AdapterFile};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "asymlora", version, about = "Asymmetric (seed-plus-B) LoRA adapters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show an adapter's modules, shapes, rank, seed, generator and size.
    Inspect {
        /// Path to an asymlora adapter (.safetensors).
        adapter: PathBuf,
    },
}

/// Runs the command line on `args` (program name first) and returns the exit code.
/// Errors go to stderr as one line; clap handles `--help` and usage errors.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    run_with_help(args, "")
}

/// Like [`run`], with `extra_help` appended to `--help` (the Python front end lists
/// the commands it implements itself there).
pub fn run_with_help<I, T>(args: I, extra_help: &str) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut command = Cli::command();
    if !extra_help.is_empty() {
        command = command.after_help(extra_help.to_string());
    }
    let parsed = command
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match execute(cli.command) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("asymlora: error: {message}");
            1
        }
    }
}

fn execute(command: Command) -> Result<(), String> {
    match command {
        Command::Inspect { adapter } => {
            let file = AdapterFile::open(&adapter).map_err(|e| e.to_string())?;
            write_stdout(&render_inspect(&file))
        }
    }
}

/// Prints `text`; a closed pipe (`asymlora inspect x | head`) is not an error.
fn write_stdout(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != ErrorKind::BrokenPipe => Err(format!("cannot write to stdout: {e}")),
        _ => Ok(()),
    }
}
