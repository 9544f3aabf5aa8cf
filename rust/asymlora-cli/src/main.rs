use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

fn main() {
    let interrupted = Arc::new(AtomicBool::new(false));
    let handlers = OnceLock::new();
    // Polled only by long commands (merge): the first Ctrl-C (or SIGTERM) then asks
    // the merge to stop and clean up; a second one ends the process at once.
    let cancelled = || {
        handlers.get_or_init(|| install_handlers(&interrupted));
        interrupted.load(Ordering::Relaxed)
    };
    std::process::exit(asymlora_cli::run_cancellable(std::env::args_os(), "", &cancelled));
}

#[cfg(unix)]
fn install_handlers(flag: &Arc<AtomicBool>) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for signal in [SIGINT, SIGTERM] {
        // The conditional shutdown first: it exits only if the flag is already set.
        let _ =
            signal_hook::flag::register_conditional_shutdown(signal, asymlora_cli::EXIT_INTERRUPTED, Arc::clone(flag));
        let _ = signal_hook::flag::register(signal, Arc::clone(flag));
    }
}

#[cfg(not(unix))]
fn install_handlers(_flag: &Arc<AtomicBool>) {}
