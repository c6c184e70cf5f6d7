//! Foreground lifecycle: announce `ready`, wait for SIGINT or SIGTERM.

use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};

/// The line tests and scripts wait for: every program attached, every map filled.
pub fn announce_ready(subcommand: &str, what: &str) {
    eprintln!("{subcommand}: ready: {what}");
}

/// SIGINT or SIGTERM, delivered as a message so a run can also wake on a timer.
pub struct Shutdown {
    signals: mpsc::Receiver<()>,
}

impl Shutdown {
    /// Installs the handler; once per process.
    pub fn install() -> Result<Self> {
        let (tx, signals) = mpsc::channel();
        ctrlc::set_handler(move || {
            let _ = tx.send(());
        })
        .context("installing the SIGINT/SIGTERM handler")?;
        Ok(Self { signals })
    }

    /// Blocks until a signal.
    pub fn wait(&self) {
        let _ = self.signals.recv();
    }

    /// Sleeps up to `timeout`; true when a signal cut it short.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        !matches!(
            self.signals.recv_timeout(timeout),
            Err(mpsc::RecvTimeoutError::Timeout)
        )
    }
}

/// Blocks until SIGINT or SIGTERM; attachments owned by the caller detach as it unwinds.
pub fn wait_for_shutdown() -> Result<()> {
    Shutdown::install()?.wait();
    Ok(())
}
