//! The `asymlora` command line. The same entry point serves the standalone binary
//! and the Python console script (through the binding crate), so both behave alike.

use std::ffi::OsString;
use std::io::{ErrorKind, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use asymlora_core::adapter::{human_bytes, render_inspect, AdapterFile};
use asymlora_core::combine::{self, CombineOptions};
use asymlora_core::merge::{self, AdapterInput, MergeOptions, MergeReport, Observer, Totals};
use asymlora_core::peft::import_peft;
use asymlora_core::{Dtype, Error};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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
    /// Merge adapters into a model checkpoint: W' = W + sum_i w_i * s_i * B_i A_i.
    #[command(long_about = MERGE_ABOUT)]
    Merge(MergeArgs),
    /// Subtract adapters from a merged checkpoint: W' = W - sum_i w_i * s_i * B_i A_i.
    #[command(long_about = UNMERGE_ABOUT)]
    Unmerge(MergeArgs),
    /// Convert a PEFT LoRA directory into an asymlora adapter file (every A stored).
    #[command(name = "import-peft", long_about = IMPORT_PEFT_ABOUT)]
    ImportPeft {
        /// A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).
        peft_dir: PathBuf,
        /// The asymlora adapter file to write (atomically).
        #[arg(short, long, value_name = "OUT")]
        out: PathBuf,
        /// The adapter seed to record (every A is stored, so it does not change the factors).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Combine adapters into one whose update is sum_i w_i * s_i * B_i A_i (exact).
    #[command(long_about = COMBINE_ABOUT)]
    Combine(CombineArgs),
}

const COMBINE_ABOUT: &str = "\
Combine adapters into one adapter file whose update is sum_i w_i * s_i * B_i A_i.

Each ADAPTER is an asymlora adapter file or a PEFT LoRA directory; ADAPTER:WEIGHT
scales its update (default 1). Per module, adapters that share A (same generator,
seed, A dtype, gain, stream, rank and d_in; or the same stored A) keep that A and
sum their B: B = sum_i w_i (s_i / s) B_i, same rank, still seed-plus-B. Modules
over different A's are concatenated: A = vstack(A_i) is stored, the rank is the
sum of the ranks, s = 1 and B = hstack(w_i s_i B_i). B is computed in float64
and rounded once (float32 unless every input's B has one same dtype; see
--b-dtype). Modules of only some adapters combine over those that hold them;
full tensors (modules_to_save) are copied from the one adapter that holds them,
which must have weight 1. Spec: docs/combine.md.";

#[derive(clap::Args, Debug)]
struct CombineArgs {
    /// asymlora adapter files or PEFT LoRA directories, each optionally with :WEIGHT.
    #[arg(value_name = "ADAPTER[:WEIGHT]")]
    adapters: Vec<String>,
    /// The adapter file to write (atomically).
    #[arg(short, long, value_name = "OUT")]
    out: PathBuf,
    /// dtype of every combined B (float32, float16, bfloat16, float64); default: the inputs' common dtype, else float32.
    #[arg(long, value_name = "DTYPE")]
    b_dtype: Option<String>,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    /// No summary line (warnings and errors are still printed).
    #[arg(short, long)]
    quiet: bool,
}

const IMPORT_PEFT_ABOUT: &str = "\
Convert a PEFT LoRA directory into an asymlora adapter file (every A stored).

The directory is read by the same reader as `asymlora merge` and Python's
import_peft, so it is accepted or refused alike by all three. Ranks, alphas,
rank_pattern/alpha_pattern, use_rslora, fan_in_fan_out and modules_to_save are
kept; DoRA, other LoRA variants, quantised factors and pickle-only adapters are
refused with the reason.";

const MERGE_ABOUT: &str = "\
Merge adapters into a model checkpoint: W' = W + sum_i w_i * s_i * B_i A_i.

BASE is a .safetensors file (OUT is then a file) or a model directory with
model.safetensors, or shards and model.safetensors.index.json (OUT is then a
directory with the same files, the index, and the other files copied: config,
tokenizer). Each ADAPTER is an asymlora adapter file (A regenerated from its
seed) or a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors);
ADAPTER:WEIGHT scales its update (default 1). Several adapters merge as the
exact weighted sum of their updates.

Each merged weight is computed in float32 (float64 for float32/float64 outputs)
from its stored dtype and rounded once to the output dtype; every other tensor
is copied bit for bit. Everything is checked before anything is written; the
output appears under its name only when complete (Ctrl-C leaves nothing).";

const UNMERGE_ABOUT: &str = "\
Subtract adapters from a merged checkpoint: W' = W - sum_i w_i * s_i * B_i A_i.

The inverse of `asymlora merge` with the same adapters and weights, up to the
rounding of the merged weights (a merge rounds once; unmerging rounds again).
Adapters with full tensors (PEFT modules_to_save) cannot be unmerged.";

#[derive(clap::Args, Debug)]
struct MergeArgs {
    /// Base model: a .safetensors file, or a model directory.
    base: PathBuf,
    /// asymlora adapter files or PEFT LoRA directories, each optionally with :WEIGHT.
    #[arg(required = true, value_name = "ADAPTER[:WEIGHT]", value_parser = parse_adapter)]
    adapters: Vec<AdapterInput>,
    /// Output file (single-file BASE) or directory (model directory BASE).
    #[arg(short, long, value_name = "OUT")]
    out: PathBuf,
    /// Output dtype of every floating-point tensor (float32, float16, bfloat16); default: each keeps its own.
    #[arg(long, value_name = "DTYPE", value_parser = parse_dtype)]
    dtype: Option<Dtype>,
    /// Worker threads (default: all cores). The result is the same for any number.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Replace OUT if it exists (a file, or a directory holding only a model).
    #[arg(long)]
    force: bool,
    /// Look adapter module names starting with OLD up as NEW in BASE (repeatable; first match applies).
    #[arg(long = "prefix-map", value_name = "OLD=NEW", value_parser = parse_prefix)]
    prefix_map: Vec<(String, String)>,
    /// Merge adapters holding NaN/Inf values, and keep weights that overflow, instead of refusing.
    #[arg(long)]
    allow_nonfinite: bool,
    /// No progress bar and no summary (warnings and errors are still printed).
    #[arg(short, long)]
    quiet: bool,
    /// Skip the fsync of each output file before the final rename (faster; not durable on power loss).
    #[arg(long)]
    no_fsync: bool,
}

fn parse_adapter(s: &str) -> Result<AdapterInput, String> {
    AdapterInput::parse(s).map_err(|e| e.to_string())
}

fn parse_dtype(s: &str) -> Result<Dtype, String> {
    s.parse::<Dtype>().map_err(|e| e.to_string())
}

fn parse_prefix(s: &str) -> Result<(String, String), String> {
    merge::parse_prefix_map(s).map_err(|e| e.to_string())
}

/// Signal numbers (POSIX, the same on every Unix) that stop a long command cleanly.
pub const SIGHUP: i32 = 1;
pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;

/// The exit code of a command stopped by `signal`: 128 + its number, as a shell reports
/// a process killed by it.
pub fn exit_code_for(signal: i32) -> i32 {
    128 + signal
}

/// `SIGTERM` for 15, and so on; `signal N` for a number without a name here.
pub fn signal_name(signal: i32) -> String {
    match signal {
        SIGHUP => "SIGHUP".into(),
        SIGINT => "SIGINT".into(),
        SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

/// A command-line process does one job, so it can choose its allocator's policy: glibc
/// raises its mmap threshold to each large block freed, after which a merge's per-tensor
/// buffers (hundreds of KiB to 8 MiB, a different size for each tensor shape) come from
/// the heap and its resident size grows with the number of tensors (measured: 71 -> 86
/// MiB for 8x the tensors of the same shapes). Fixed at 1 MiB (which also stops that
/// dynamic adjustment), it stayed at 70 MiB. The library (`merge_files`) leaves the host
/// process's allocator alone.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tunable of the allocator; no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Runs the command line on `args` (program name first) and returns the exit code.
/// Errors go to stderr as one line; clap handles `--help` and usage errors.
/// `extra_help` is appended to `--help` (the Python front end lists the commands it
/// implements itself there). Long commands (merge) call `cancelled` once before they
/// start (a caller may install its signal handlers then) and poll it while they run;
/// when it returns a signal number they stop, remove what they wrote, print one line
/// naming the signal and return [`exit_code_for`] it.
pub fn run_cancellable<I, T>(args: I, extra_help: &str, cancelled: &dyn Fn() -> Option<i32>) -> i32
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
        Ok(cli) => {
            fix_mmap_threshold();
            cli
        }
        Err(e) if !e.use_stderr() || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // --help and --version (to stdout), and the help for no command at all
            // (to stderr, exit 2): printed whole, as they are.
            let _ = e.print();
            return e.exit_code();
        }
        Err(e) => {
            eprintln!("asymlora: error: {}", one_line_usage_error(&e.render().to_string()));
            return e.exit_code();
        }
    };
    match execute(cli.command, cancelled) {
        Ok(()) => 0,
        Err(Failure::Interrupted(signal)) => {
            eprintln!("asymlora: interrupted by {}; nothing was written", signal_name(signal));
            exit_code_for(signal)
        }
        Err(Failure::Message(message)) => {
            eprintln!("asymlora: error: {message}");
            1
        }
    }
}

/// clap's usage error (several lines: the error, the arguments it concerns, the usage
/// and a pointer to --help) as one line: errors are one line, naming the argument.
fn one_line_usage_error(text: &str) -> String {
    text.lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

enum Failure {
    Message(String),
    /// Stopped by this signal.
    Interrupted(i32),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Message(message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match e {
            Error::Cancelled => Failure::Interrupted(SIGINT),
            other => Failure::Message(other.to_string()),
        }
    }
}

fn execute(command: Command, cancelled: &dyn Fn() -> Option<i32>) -> Result<(), Failure> {
    match command {
        Command::Inspect { adapter } => {
            let file = AdapterFile::open(&adapter)?;
            Ok(write_stdout(&render_inspect(&file))?)
        }
        Command::Merge(args) => run_merge(args, false, cancelled),
        Command::Unmerge(args) => run_merge(args, true, cancelled),
        Command::ImportPeft { peft_dir, out, seed } => {
            let report = import_peft(&peft_dir, &out, seed)?;
            let mut err = std::io::stderr().lock();
            for w in &report.warnings {
                let _ = writeln!(err, "asymlora: warning: {w}");
            }
            let _ = writeln!(
                err,
                "asymlora: imported {} module(s) and {} full tensor(s) into {}",
                report.modules,
                report.full_tensors,
                report.out.display()
            );
            Ok(())
        }
        Command::Combine(args) => run_combine(args),
    }
}

fn run_combine(args: CombineArgs) -> Result<(), Failure> {
    // Adapters and weights are parsed here, not by clap, so that every bad input is a
    // one-line `asymlora: error: ...` with exit code 1.
    let adapters = args
        .adapters
        .iter()
        .map(|a| AdapterInput::parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = CombineOptions {
        b_dtype: args.b_dtype.as_deref().map(combine::parse_b_dtype).transpose()?,
        force: args.force,
    };
    let report = combine::combine(&adapters, &args.out, &opts)?;
    let mut err = std::io::stderr().lock();
    for w in &report.warnings {
        let _ = writeln!(err, "asymlora: warning: {w}");
    }
    if !args.quiet {
        let _ = writeln!(
            err,
            "asymlora: combined {} adapter(s) into {}: {} module(s) ({} with a shared A, B summed; {} concatenated), \
             {} full tensor(s)",
            report.adapters,
            report.out.display(),
            report.modules,
            report.shared,
            report.concatenated,
            report.full_tensors
        );
    }
    Ok(())
}

/// Progress bar on stderr (only when it is a terminal) and cancellation.
struct CliObserver<'a> {
    quiet: bool,
    bar: Option<ProgressBar>,
    modules: (usize, usize),
    cancelled: &'a dyn Fn() -> Option<i32>,
    /// The signal that stopped the merge.
    signal: Option<i32>,
}

impl Observer for CliObserver<'_> {
    fn start(&mut self, totals: &Totals) {
        if self.quiet || !std::io::stderr().is_terminal() {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(totals.bytes), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} eta {eta}",
            )
            .expect("valid template"),
        );
        self.modules = (0, totals.modules);
        bar.set_message(format!("0/{} modules", totals.modules));
        self.bar = Some(bar);
    }

    fn advance(&mut self, bytes: u64, modules: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
            if modules > 0 {
                self.modules.0 += modules;
                bar.set_message(format!("{}/{} modules", self.modules.0, self.modules.1));
            }
        }
    }

    fn cancelled(&mut self) -> bool {
        if self.signal.is_none() {
            self.signal = (self.cancelled)();
        }
        self.signal.is_some()
    }
}

fn run_merge(args: MergeArgs, subtract: bool, cancelled: &dyn Fn() -> Option<i32>) -> Result<(), Failure> {
    // Before anything is read or written: from here on a signal stops the merge cleanly.
    if let Some(signal) = cancelled() {
        return Err(Failure::Interrupted(signal));
    }
    let opts = MergeOptions {
        dtype: args.dtype,
        threads: args.threads.map(|n| n as usize),
        force: args.force,
        prefix_map: args.prefix_map,
        allow_nonfinite: args.allow_nonfinite,
        subtract,
        fsync: !args.no_fsync,
    };
    let mut observer = CliObserver {
        quiet: args.quiet,
        bar: None,
        modules: (0, 0),
        cancelled,
        signal: None,
    };
    let t0 = Instant::now();
    let result = merge::merge(&args.base, &args.adapters, &args.out, &opts, &mut observer);
    if let Some(bar) = &observer.bar {
        bar.finish_and_clear();
    }
    let report = match (result, observer.signal) {
        (Err(Error::Cancelled), Some(signal)) => return Err(Failure::Interrupted(signal)),
        (result, _) => result?,
    };
    print_report(
        &report,
        &args.adapters,
        subtract,
        args.quiet,
        t0.elapsed().as_secs_f64(),
    );
    Ok(())
}

fn print_report(report: &MergeReport, adapters: &[AdapterInput], subtract: bool, quiet: bool, seconds: f64) {
    let mut err = std::io::stderr().lock();
    for w in &report.warnings {
        let _ = writeln!(err, "asymlora: warning: {w}");
    }
    if !report.skipped.is_empty() {
        let items: Vec<String> = report.skipped.iter().map(|(n, why)| format!("{n} ({why})")).collect();
        let _ = writeln!(err, "asymlora: warning: not copied to the output: {}", items.join(", "));
    }
    if quiet {
        return;
    }
    let mut parts = vec![format!(
        "{} {} weight(s) ({} module(s) from {} adapter(s))",
        if subtract { "unmerged" } else { "merged" },
        report.merged,
        report.modules,
        adapters.len()
    )];
    if report.replaced > 0 {
        parts.push(format!("replaced {} tensor(s)", report.replaced));
    }
    if report.converted > 0 {
        parts.push(format!("converted {} tensor(s)", report.converted));
    }
    parts.push(format!("copied {} unchanged", report.unchanged));
    let _ = writeln!(
        err,
        "asymlora: {}; wrote {} ({} file(s){}) in {seconds:.2} s",
        parts.join(", "),
        report.out.display(),
        report.files.len() + report.copied_files.len(),
        format_args!(", {}", human_bytes(report.bytes)),
    );
}

/// Prints `text`; a closed pipe (`asymlora inspect x | head`) is not an error.
fn write_stdout(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != ErrorKind::BrokenPipe => Err(format!("cannot write to stdout: {e}")),
        _ => Ok(()),
    }
}
