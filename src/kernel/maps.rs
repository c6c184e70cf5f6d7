//! The C structs of include/*.h in and out of BPF maps: as bytes, from bytes, and per-CPU
//! counters summed.

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags};

/// The bytes of a plain C struct, as a map key or value.
pub fn as_bytes<T: plain::Plain>(value: &T) -> &[u8] {
    // SAFETY: Plain types are plain old data.
    unsafe { plain::as_bytes(value) }
}

/// A plain C struct read back from map bytes; `what` names it in the error.
pub fn from_bytes<T: plain::Plain + Default>(what: &str, bytes: &[u8]) -> Result<T> {
    let mut value = T::default();
    plain::copy_from_bytes(&mut value, bytes)
        .map_err(|err| anyhow::anyhow!("{what}: layout mismatch ({err:?})"))?;
    Ok(value)
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
    from_bytes("per-CPU counters", &bytes)
}
