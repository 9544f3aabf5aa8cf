//! The `asymlora` command line. The same entry point serves the standalone binary
//! and the Python console script (through the binding crate), so both behave alike.

use std::ffi::OsString;
use std::path::PathBuf;

use asymlora_core::adapter::{render_inspect, AdapterFile};
use clap::{Parser, Subcommand};

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
    let cli = match Cli::try_parse_from(args) {
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
            print!("{}", render_inspect(&file));
            Ok(())
        }
    }
}
