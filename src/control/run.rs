//! Foreground lifecycle: announce `ready`, then wait for SIGINT or SIGTERM (stop) and
//! SIGHUP (reload the configuration).

use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::control::notify;

/// Where `EBPF_NET_TIMING=1` measures from: the first [`phase`] (main's first line).
static STARTED: OnceLock<(Instant, bool)> = OnceLock::new();

/// With `EBPF_NET_TIMING=1`, logs the milliseconds since the process began and `what` has
/// just finished: where a slow run spends its time, without a profiler.
pub fn phase(what: &str) {
    let (start, on) = STARTED.get_or_init(|| {
        (
            Instant::now(),
            std::env::var_os("EBPF_NET_TIMING").is_some_and(|v| v == "1"),
        )
    });
    if *on {
        // CPU time too: on a busy machine the wall clock says more about the neighbours
        let cpu = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
            .map_or(0.0, |t| t.tv_sec() as f64 * 1e3 + t.tv_nsec() as f64 / 1e6);
        eprintln!(
            "ebpf-net: timing: {:7.1} ms ({cpu:6.1} ms CPU) {what}",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// The line tests and scripts wait for: every program attached, every map filled; and
/// systemd's `READY=1` under `Type=notify`.
pub fn announce_ready(subcommand: &str, what: &str) {
    let line = format!("{subcommand}: ready: {what}");
    eprintln!("{line}");
    notify::ready(&line);
}

/// What a signal asks a foreground run to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGINT or SIGTERM: detach and exit.
    Stop,
    /// SIGHUP: re-read the configuration and apply the difference.
    Reload,
    /// A health check changed a backend's state: apply the running plan again.
    Health,
}

/// Signals, delivered as messages so a run can also wake on a timer.
pub struct Shutdown {
    requests: mpsc::Receiver<Request>,
    sender: mpsc::Sender<Request>,
}

impl Shutdown {
    /// Installs the handlers; once per process.
    pub fn install() -> Result<Self> {
        let (tx, requests) = mpsc::channel();
        let sender = tx.clone();
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
            .context("installing the SIGINT/SIGTERM/SIGHUP handlers")?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    // told to systemd at once; the run says READY=1 when the reload is done
                    let request = if signal == SIGHUP {
                        notify::reloading();
                        Request::Reload
                    } else {
                        notify::stopping();
                        Request::Stop
                    };
                    if tx.send(request).is_err() {
                        break;
                    }
                }
            })
            .context("starting the signal thread")?;
        Ok(Self { requests, sender })
    }

    /// Where other threads of the run send their requests (health changes).
    pub fn sender(&self) -> mpsc::Sender<Request> {
        self.sender.clone()
    }

    /// Blocks until the next signal.
    pub fn next(&self) -> Request {
        self.requests.recv().unwrap_or(Request::Stop)
    }

    /// Sleeps up to `timeout`; the signal that cut it short, if any.
    pub fn next_timeout(&self, timeout: Duration) -> Option<Request> {
        match self.requests.recv_timeout(timeout) {
            Ok(request) => Some(request),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Request::Stop),
        }
    }

    /// Serves requests until one asks to stop: each SIGHUP or health change runs `reload`,
    /// whose outcome is logged in one line; a failed reload keeps what runs.
    pub fn serve(&self, subcommand: &str, mut reload: impl FnMut(Request) -> Result<String>) {
        loop {
            match self.next() {
                Request::Stop => return,
                request => log_reload(subcommand, request, reload(request)),
            }
        }
    }
}

/// The one line a reload leaves in the log (a health change's own line was logged already:
/// only a failure to apply it is); a SIGHUP's ends systemd's reload with `READY=1` either way,
/// as the run goes on serving.
pub fn log_reload(subcommand: &str, request: Request, outcome: Result<String>) {
    let line = match (request, outcome) {
        (Request::Health, Ok(_)) => return,
        (Request::Health, Err(err)) => {
            eprintln!("{subcommand}: applying a health change failed, kept the tables: {err:#}");
            return;
        }
        (_, Ok(what)) => format!("{subcommand}: reloaded: {what}"),
        (_, Err(err)) => format!("{subcommand}: reload failed, kept the running configuration: {err:#}"),
    };
    eprintln!("{line}");
    notify::ready(&line);
}
