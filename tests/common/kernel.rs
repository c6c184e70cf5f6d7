//! What the running kernel has, for tests that need more than an older kernel gives (the
//! VMs of `make test-kernels` boot Debian's 6.1 and 5.10). A test that cannot run here says
//! so: `skipped: TEST: needs FEATURE (Linux X.Y)` on the test binary's stderr (not captured by
//! the harness) and one line appended to `$EBPF_NET_SKIP_LOG` when that is set, which
//! `scripts/test-kernels` lists in its summary. Never skip silently.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

/// A kernel feature some test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// tcx links (`--tc tcx`)
    Tcx,
    /// the conntrack NAT kfunc `bpf_ct_set_nat_info` that `lb` needs
    CtNat,
    /// the `bpf_sock_destroy` kfunc (clusterip's destroying of connected UDP sockets)
    SockDestroy,
    /// `bpf_set_retval`: a cgroup hook's refusal is ECONNREFUSED (before: EPERM)
    SetRetval,
}

impl Feature {
    pub fn describe(self) -> &'static str {
        match self {
            Feature::Tcx => "tcx links (Linux 6.6)",
            Feature::CtNat => "the conntrack NAT kfunc bpf_ct_set_nat_info for lb (Linux 6.1)",
            Feature::SockDestroy => "the bpf_sock_destroy kfunc to destroy connected UDP sockets (Linux 6.5)",
            Feature::SetRetval => "bpf_set_retval to refuse a connect() with ECONNREFUSED (Linux 5.18)",
        }
    }

    /// The first mainline release that has it.
    fn since(self) -> (u32, u32) {
        match self {
            Feature::Tcx => (6, 6),
            Feature::CtNat => (6, 1),
            Feature::SockDestroy => (6, 5),
            Feature::SetRetval => (5, 18),
        }
    }
}

/// The running kernel's release (`uname -r`).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_string())
        .unwrap_or_default()
}

/// The running kernel's major.minor.
pub fn version() -> (u32, u32) {
    static VERSION: OnceLock<(u32, u32)> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let release = release();
        let mut parts = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|part| part.parse().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    })
}

/// Whether the running kernel has `feature`: tcx by asking the kernel (ebpf-net's own
/// probe), the rest by the version that brought it (distro kernels do not backport them).
pub fn has(feature: Feature) -> bool {
    match feature {
        Feature::Tcx => ebpf_net::kernel::tc::tcx_supported(),
        _ => version() >= feature.since(),
    }
}

/// The name of the running test (libtest names each test's thread after it).
fn test_name() -> String {
    let thread = std::thread::current();
    match thread.name() {
        Some(name) if name != "main" => name.to_string(),
        _ => std::env::args()
            .next()
            .and_then(|bin| bin.rsplit('/').next().map(str::to_string))
            .unwrap_or_else(|| "a test".into()),
    }
}

/// Records that the running test is skipped, and why, where it is seen.
pub fn skip(reason: &str) {
    let line = format!("skipped: {}: {reason} (kernel {})\n", test_name(), release());
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(log) = std::env::var_os("EBPF_NET_SKIP_LOG") {
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

/// True when the kernel has `feature`; else records the skip with its reason and returns
/// false, so the test returns: `if !kernel::require(Feature::Tcx) { return; }`.
pub fn require(feature: Feature) -> bool {
    if has(feature) {
        return true;
    }
    skip(&format!("needs {}", feature.describe()));
    false
}

/// `duration` times `EBPF_NET_TEST_TIME_SCALE` (default 1): the bounds on how long a command
/// or a startup may take, for VMs in software emulation (`scripts/test-kernels` sets it).
/// Only bounds that catch hangs scale; what a test measures does not.
pub fn scaled(duration: Duration) -> Duration {
    static SCALE: OnceLock<u32> = OnceLock::new();
    let scale = *SCALE.get_or_init(|| {
        std::env::var("EBPF_NET_TEST_TIME_SCALE")
            .ok()
            .and_then(|value| value.parse().ok())
            .filter(|&scale| scale >= 1)
            .unwrap_or(1)
    });
    duration * scale
}

/// For a test that runs one part only where the kernel has `feature` (lb among other
/// datapaths): true when it has; else records that `part` is skipped and returns false.
pub fn require_for(feature: Feature, part: &str) -> bool {
    if has(feature) {
        return true;
    }
    skip(&format!("its {part} part needs {}", feature.describe()));
    false
}
