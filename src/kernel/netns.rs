//! Network namespaces: entering one by name (`--netns`) and naming the current one for pinned state.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Where `ip netns add` keeps its named namespaces.
pub const NAMED_NETNS_DIR: &str = "/run/netns";
/// The key of the initial network namespace in pinned state paths.
pub const HOST_KEY: &str = "host";

/// Moves this thread (call it before any other thread exists) into the named network
/// namespace, keeping the mount namespace and so the host's /sys/fs/bpf.
pub fn enter(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("invalid network namespace name '{name}'");
    }
    let path = Path::new(NAMED_NETNS_DIR).join(name);
    let file = File::open(&path)
        .with_context(|| format!("network namespace '{name}' not found ({})", path.display()))?;
    // it changes only the calling thread's namespace
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(std::io::Error::from)
        .with_context(|| format!("entering network namespace '{name}'"))
}

fn netns_id(path: &str) -> Result<(u64, u64)> {
    let meta = fs::metadata(path).with_context(|| format!("reading {path}"))?;
    Ok((meta.dev(), meta.ino()))
}

/// The initial namespace of a kind, seen through kthreadd (pid 2): kernel threads never
/// leave the initial namespaces, and unlike pid 1 their links are readable in sandboxes.
fn init_ns_path(kind: &str) -> String {
    format!("/proc/2/ns/{kind}")
}

/// Whether this thread shares the host's mount namespace (it does not under `ip netns exec`).
pub fn in_init_mount_ns() -> bool {
    match (
        netns_id("/proc/thread-self/ns/mnt"),
        netns_id(&init_ns_path("mnt")),
    ) {
        (Ok(ours), Ok(init)) => ours == init,
        _ => false,
    }
}

/// A stable name for the namespace this thread is in: its `ip netns` name when it has
/// one, `host` for the initial namespace, else `netns-<inode>`.
pub fn current_key() -> Result<String> {
    let current = netns_id("/proc/thread-self/ns/net")?;
    if netns_id(&init_ns_path("net")).ok() == Some(current) {
        return Ok(HOST_KEY.to_string());
    }
    if let Ok(entries) = fs::read_dir(NAMED_NETNS_DIR) {
        for entry in entries.flatten() {
            let path = entry.path();
            if netns_id(&path.to_string_lossy()).ok() == Some(current) {
                return Ok(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    Ok(format!("netns-{}", current.1))
}

/// Whether the namespace a key names still exists (unnamed ones cannot be checked).
pub fn key_exists(key: &str) -> Option<bool> {
    if key == HOST_KEY {
        Some(true)
    } else if key.starts_with("netns-") {
        None
    } else {
        Some(Path::new(NAMED_NETNS_DIR).join(key).exists())
    }
}

/// Runs `f` in the network namespace `key` names (see [`current_key`]): here when this thread
/// is in it, else on a thread that entered it. None when it cannot be entered (gone, or an
/// unnamed namespace other than this thread's).
pub fn in_key<T: Send>(key: &str, f: impl FnOnce() -> T + Send) -> Option<T> {
    if current_key().ok().as_deref() == Some(key) {
        return Some(f());
    }
    let path = if key == HOST_KEY {
        init_ns_path("net")
    } else if key.is_empty() || key.contains('/') || key.starts_with("netns-") {
        return None;
    } else {
        format!("{NAMED_NETNS_DIR}/{key}")
    };
    let file = File::open(path).ok()?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
                Some(f())
            })
            .join()
            .ok()
            .flatten()
    })
}
