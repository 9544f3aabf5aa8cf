use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// What the signal handlers record: that a signal came, and which (the last one).
#[derive(Default)]
struct Received {
    any: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

fn main() {
    let received = Received::default();
    let handlers = OnceLock::new();
    // Installed by the first poll, which a long command (merge) makes before it reads or
    // writes anything: the first SIGINT, SIGTERM or SIGHUP then asks it to stop and
    // clean up; a second one ends the process at once (the next merge into the same OUT
    // removes what it left). Other commands keep the default actions: a signal ends them.
    let cancelled = || {
        handlers.get_or_init(|| install_handlers(&received));
        match received.signal.load(Ordering::SeqCst) {
            0 => None,
            n => i32::try_from(n).ok(),
        }
    };
    std::process::exit(asymlora_cli::run_cancellable(std::env::args_os(), "", &cancelled));
}

#[cfg(unix)]
fn install_handlers(received: &Received) {
    use asymlora_cli::{exit_code_for, SIGHUP, SIGINT, SIGTERM};
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        if is_ignored(signal) {
            continue; // `nohup asymlora merge ...` keeps running after a hangup
        }
        // The conditional shutdown first: it exits only if a signal came before.
        let _ =
            signal_hook::flag::register_conditional_shutdown(signal, exit_code_for(signal), Arc::clone(&received.any));
        let _ = signal_hook::flag::register_usize(signal, Arc::clone(&received.signal), signal as usize);
        let _ = signal_hook::flag::register(signal, Arc::clone(&received.any));
    }
}

/// Whether `signal` is ignored (inherited from the parent, as `nohup` sets SIGHUP).
#[cfg(unix)]
fn is_ignored(signal: i32) -> bool {
    // SAFETY: a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

#[cfg(not(unix))]
fn install_handlers(_received: &Received) {}
