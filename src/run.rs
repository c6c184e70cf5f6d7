//! Foreground lifecycle: announce `ready`, wait for SIGINT or SIGTERM, and sum per-CPU counters.

use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags};

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

/// Sums a per-CPU value made only of u64 counters over all CPUs, field by field.
pub fn sum_percpu_counters<T: plain::Plain + Default + Copy>(map: &impl MapCore, key: u32) -> Result<T> {
    let per_cpu = map
        .lookup_percpu(&key.to_ne_bytes(), MapFlags::ANY)
        .context("reading per-CPU counters")?
        .unwrap_or_default();
    let mut sums = vec![0u64; size_of::<T>() / 8];
    for cpu in &per_cpu {
        for (sum, chunk) in sums.iter_mut().zip(cpu.chunks_exact(8)) {
            *sum += u64::from_ne_bytes(chunk.try_into().unwrap());
        }
    }
    let bytes: Vec<u8> = sums.iter().flat_map(|sum| sum.to_ne_bytes()).collect();
    let mut value = T::default();
    plain::copy_from_bytes(&mut value, &bytes).map_err(|err| anyhow::anyhow!("counter layout: {err:?}"))?;
    Ok(value)
}
