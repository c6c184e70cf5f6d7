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

/// Every entry of a map, as read by batches: keys and values each in one buffer.
pub struct Entries {
    key_size: usize,
    value_size: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
}

impl Entries {
    pub fn len(&self) -> usize {
        self.keys.len() / self.key_size.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// (key, value) in the map's order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.keys
            .chunks_exact(self.key_size)
            .zip(self.values.chunks_exact(self.value_size))
    }
}

/// Reads every entry of a map (hash or array) by batches. A hash table's batch stops short
/// at a bucket that does not fit and says ENOSPC when the first one does not: libbpf-rs's
/// iterator takes a short batch for the end (8,191 of 20,000 services), so this goes on until
/// the kernel says ENOENT and grows the batch past a large bucket. 10,000 services are a
/// few system calls rather than 20,000 (key by key).
pub fn read_all(map: &impl MapCore) -> Result<Entries> {
    read_first(map, usize::MAX)
}

/// The first `wanted` entries of a map (or all it has), by batches as [`read_all`]: an
/// array's slots 0 to `wanted - 1`.
pub fn read_first(map: &impl MapCore, wanted: usize) -> Result<Entries> {
    use std::os::fd::AsRawFd;
    let key_size = map.key_size() as usize;
    let value_size = if map.map_type().is_percpu() {
        // per-CPU values come as one 8-byte-aligned slot per possible CPU
        let cpus = libbpf_rs::num_possible_cpus().context("counting possible CPUs")?;
        (map.value_size() as usize).next_multiple_of(8) * cpus
    } else {
        map.value_size() as usize
    };
    let mut entries = Entries {
        key_size,
        value_size,
        keys: Vec::new(),
        values: Vec::new(),
    };
    let mut batch = (map.max_entries() as usize).min(wanted).clamp(1, 16384);
    // the position between calls: a bucket index for hash tables, a key for arrays
    let token_size = key_size.max(8);
    let (mut token_in, mut token_out) = (vec![0u8; token_size], vec![0u8; token_size]);
    let mut first = true;
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags: 0,
        flags: 0,
    };
    let fd = map.as_fd().as_raw_fd();
    loop {
        let (have_keys, have_values) = (entries.keys.len(), entries.values.len());
        entries.keys.resize(have_keys + batch * key_size, 0);
        entries.values.resize(have_values + batch * value_size, 0);
        let mut count = batch as u32;
        // SAFETY: the buffers hold `count` keys and values past what is read so far, and the
        // batch tokens `token_size` bytes (at least a key, at least a u32 bucket index).
        let ret = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                fd,
                if first {
                    std::ptr::null_mut()
                } else {
                    token_in.as_mut_ptr().cast()
                },
                token_out.as_mut_ptr().cast(),
                entries.keys[have_keys..].as_mut_ptr().cast(),
                entries.values[have_values..].as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let err = (ret < 0).then(std::io::Error::last_os_error);
        let raw = err.as_ref().and_then(std::io::Error::raw_os_error);
        if raw == Some(libc::EINTR) || raw == Some(libc::ENOSPC) {
            entries.keys.truncate(have_keys);
            entries.values.truncate(have_values);
            if raw == Some(libc::ENOSPC) {
                anyhow::ensure!(
                    batch <= map.max_entries() as usize,
                    "reading map {}: the kernel found no batch large enough",
                    map.name().to_string_lossy()
                );
                batch *= 2;
            }
            continue;
        }
        let got = if err.is_none() || raw == Some(libc::ENOENT) {
            count as usize
        } else {
            0
        };
        entries.keys.truncate(have_keys + got * key_size);
        entries.values.truncate(have_values + got * value_size);
        match (err, raw) {
            (None, _) if got == 0 || entries.len() >= wanted => return Ok(entries),
            (None, _) => {}
            (Some(_), Some(libc::ENOENT)) => return Ok(entries),
            (Some(err), _) => {
                return Err(err)
                    .with_context(|| format!("reading map {} by batches", map.name().to_string_lossy()))
            }
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

/// An array map made with `BPF_F_MMAPABLE`, mapped into this process: its values are read
/// and written as memory, without a system call or a kernel copy per entry (100,000 backend
/// slots in well under a millisecond rather than tens of them by batches).
pub struct MappedArray {
    base: std::ptr::NonNull<u8>,
    len: usize,
    /// bytes between two values: the value size rounded up to 8, as the kernel lays them out
    stride: usize,
    value_size: usize,
    entries: u32,
}

// SAFETY: the mapping is plain shared memory, valid until dropped; every access copies.
unsafe impl Send for MappedArray {}
unsafe impl Sync for MappedArray {}

impl MappedArray {
    /// Maps `map` when it is an array made mmapable; None for any other map (its values
    /// then go through the bpf system call).
    pub fn new(map: &impl MapCore) -> Result<Option<Self>> {
        use std::os::fd::AsRawFd;
        let info = libbpf_rs::MapInfo::new(map.as_fd()).context("reading a map's flags")?;
        if map.map_type() != libbpf_rs::MapType::Array
            || info.info.map_flags & libbpf_sys::BPF_F_MMAPABLE == 0
        {
            return Ok(None);
        }
        let value_size = map.value_size() as usize;
        let stride = value_size.next_multiple_of(8);
        let entries = map.max_entries();
        let len = stride * entries as usize;
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: a shared read-write mapping of the map's values, `len` bytes as the kernel
        // sized them; no other Rust object aliases it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping map {} into memory", map.name().to_string_lossy()));
        }
        Ok(Some(Self {
            base: std::ptr::NonNull::new(base.cast()).expect("mmap returned a mapping"),
            len,
            stride,
            value_size,
            entries,
        }))
    }

    pub fn value_size(&self) -> usize {
        self.value_size
    }

    /// Copies the values of slots `0..count` out, back to back (`value_size` bytes each).
    pub fn read_first(&self, count: u32) -> Vec<u8> {
        let count = count.min(self.entries) as usize;
        let mut out = vec![0u8; count * self.value_size];
        for (index, value) in out.chunks_exact_mut(self.value_size.max(1)).enumerate() {
            // SAFETY: index < entries, so the value lies inside the mapping
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.base.as_ptr().add(index * self.stride),
                    value.as_mut_ptr(),
                    self.value_size,
                )
            };
        }
        out
    }

    /// The value of one slot.
    pub fn read(&self, index: u32) -> Result<Vec<u8>> {
        anyhow::ensure!(
            index < self.entries,
            "slot {index} past the array's {}",
            self.entries
        );
        let mut out = vec![0u8; self.value_size];
        // SAFETY: index < entries, so the value lies inside the mapping
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(index as usize * self.stride),
                out.as_mut_ptr(),
                self.value_size,
            )
        };
        Ok(out)
    }

    /// Writes values to slots: `keys` (u32 each) and `values` back to back, as a batch
    /// update takes them.
    pub fn write(&self, keys: &[u8], values: &[u8]) -> Result<()> {
        for (key, value) in keys
            .chunks_exact(4)
            .zip(values.chunks_exact(self.value_size.max(1)))
        {
            let index = u32::from_ne_bytes(key.try_into().expect("4 bytes"));
            anyhow::ensure!(
                index < self.entries,
                "slot {index} past the array's {}",
                self.entries
            );
            // SAFETY: index < entries, so the value lies inside the mapping
            unsafe {
                std::ptr::copy_nonoverlapping(
                    value.as_ptr(),
                    self.base.as_ptr().add(index as usize * self.stride),
                    self.value_size,
                )
            };
        }
        Ok(())
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new(), unmapped once
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
