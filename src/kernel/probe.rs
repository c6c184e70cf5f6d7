//! What this process and kernel can do, checked before anything is attached.

use std::ffi::CString;
use std::fs;
use std::mem::MaybeUninit;
use std::path::Path;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::ProgramInput;
use nix::mount::{mount, MsFlags};
use nix::sys::statfs::{statfs, BPF_FS_MAGIC};

use crate::kernel::netns;
use crate::kernel::skel::probe::ProbeSkelBuilder;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Loading and attaching needs CAP_NET_ADMIN plus CAP_BPF (or CAP_SYS_ADMIN before 5.8).
pub fn require_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if !has(CAP_NET_ADMIN) || !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        bail!("needs root (CAP_BPF and CAP_NET_ADMIN) to load and attach BPF programs");
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|stat| stat.filesystem_type() == BPF_FS_MAGIC)
}

/// Pins must go to the host's bpffs. Mounts it where the host has none yet (as systemd
/// or Cilium would); refuses in a private mount namespace, where `ip netns exec` has put a
/// fresh /sys whose pins would vanish with the command.
pub fn require_bpffs(path: &Path) -> Result<()> {
    if is_bpffs(path) {
        return Ok(());
    }
    if !netns::in_init_mount_ns() {
        bail!(
            "{} is not the host's BPF filesystem in this mount namespace, so pins would vanish (instead of `ip netns exec NAME ebpf-net ...` use `ebpf-net --netns NAME ...`)",
            path.display()
        );
    }
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(std::io::Error::from)
    .with_context(|| format!("mounting a BPF filesystem at {}", path.display()))?;
    eprintln!(
        "ebpf-net: mounted a BPF filesystem at {} (the host had none)",
        path.display()
    );
    Ok(())
}

/// `BPF_F_IPV6` when bpf_l4_csum_replace accepts it on this kernel, else 0: mainline 6.16,
/// but backported to 6.1.192, 6.12.117 and 5.10.262, so probed, never assumed by version.
pub fn l4_csum_ipv6_flag() -> u64 {
    probe_csum_ipv6().unwrap_or(0)
}

fn probe_csum_ipv6() -> Result<u64> {
    let mut object = MaybeUninit::uninit();
    let skel = ProbeSkelBuilder::default().open(&mut object)?.load()?;
    // An Ethernet header followed by room for the checksum field the helper touches.
    let packet = [0u8; 64];
    let input = ProgramInput {
        data_in: Some(&packet),
        ..Default::default()
    };
    let output = skel.progs.probe_csum_ipv6.test_run(input)?;
    Ok(if output.return_value == 0 {
        libbpf_sys::BPF_F_IPV6 as u64
    } else {
        0
    })
}

/// Where the kernel's BTF is read from; tests point it at a BTF without the kfuncs to play a
/// kernel that lacks them.
pub const KERNEL_BTF_ENV: &str = "EBPF_NET_KERNEL_BTF";
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Modules that may carry the conntrack and NAT kfuncs when not built in.
const KFUNC_MODULES: [&str; 2] = ["nf_conntrack", "nf_nat"];

/// Owned libbpf BTF, freed on drop.
struct Btf(*mut libbpf_sys::btf);

impl Btf {
    fn parse(path: &Path, base: Option<&Btf>) -> Option<Self> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: a valid path; base, when given, outlives the split BTF (dropped after it).
        let raw = unsafe {
            match base {
                Some(base) => libbpf_sys::btf__parse_split(c_path.as_ptr(), base.0),
                None => libbpf_sys::btf__parse(c_path.as_ptr(), std::ptr::null_mut()),
            }
        };
        (!raw.is_null()).then_some(Self(raw))
    }

    fn has_func(&self, name: &str) -> bool {
        let Ok(c_name) = CString::new(name) else {
            return false;
        };
        // SAFETY: a live BTF object and a NUL-terminated name.
        unsafe { libbpf_sys::btf__find_by_name_kind(self.0, c_name.as_ptr(), libbpf_sys::BTF_KIND_FUNC) >= 0 }
    }
}

impl Drop for Btf {
    fn drop(&mut self) {
        // SAFETY: we own the object.
        unsafe { libbpf_sys::btf__free(self.0) }
    }
}

/// Whether every name is one of the strings of a BTF file (a raw BTF blob: header, types,
/// strings), in one pass over its strings without parsing its types.
fn named_in_btf(path: &Path, names: &[&str]) -> bool {
    let Ok(blob) = std::fs::read(path) else {
        return false;
    };
    let word = |at: usize| -> Option<usize> {
        Some(u32::from_ne_bytes(blob.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let (Some(hdr_len), Some(str_off), Some(str_len)) = (word(4), word(16), word(20)) else {
        return false;
    };
    let start = hdr_len + str_off;
    let Some(strings) = blob.get(start..start + str_len) else {
        return false;
    };
    let mut missing: Vec<&[u8]> = names.iter().map(|name| name.as_bytes()).collect();
    for string in strings.split(|&byte| byte == 0) {
        missing.retain(|name| *name != string);
        if missing.is_empty() {
            return true;
        }
    }
    false
}

/// The running kernel's release, as `uname -r` says it, for messages.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The modprobe to run: the one the kernel itself runs, else the usual places.
fn modprobe_binary() -> Option<std::path::PathBuf> {
    let from_kernel = fs::read_to_string("/proc/sys/kernel/modprobe")
        .ok()
        .map(|path| std::path::PathBuf::from(path.trim()));
    from_kernel
        .into_iter()
        .chain(
            [
                "/sbin/modprobe",
                "/usr/sbin/modprobe",
                "/bin/modprobe",
                "/usr/bin/modprobe",
            ]
            .map(std::path::PathBuf::from),
        )
        .find(|path| path.is_file())
}

/// Loads the kernel modules in `modules` that are neither built in nor loaded yet (a distro
/// kernel builds nf_conntrack and nf_nat as modules and loads them only on first use; their
/// BTF, and so their kfuncs, appears only once loaded). Errors say which module and why.
pub fn load_modules(modules: &[&str]) -> Result<()> {
    let absent: Vec<&str> = modules
        .iter()
        .copied()
        .filter(|module| !Path::new("/sys/module").join(module).exists())
        .collect();
    if absent.is_empty() {
        return Ok(());
    }
    let Some(modprobe) = modprobe_binary() else {
        bail!(
            "the kernel modules {} are not loaded and there is no modprobe to load them (install kmod, or `modprobe` them first)",
            absent.join(" and ")
        );
    };
    let output = std::process::Command::new(&modprobe)
        .arg("-a")
        .args(&absent)
        .output()
        .with_context(|| format!("running {}", modprobe.display()))?;
    if !output.status.success() {
        bail!(
            "loading the kernel modules {} failed ({} -a {}: {})",
            absent.join(" and "),
            modprobe.display(),
            absent.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Fails with one clear line unless the kernel's BTF (vmlinux, or the conntrack and NAT
/// modules, loaded first when they are modules) has every kfunc in `names`: a program calling
/// a missing one cannot load.
pub fn require_kfuncs(subcommand: &str, names: &[&str]) -> Result<()> {
    let overridden = std::env::var_os(KERNEL_BTF_ENV);
    let path = overridden
        .as_deref()
        .map(Path::new)
        .unwrap_or(Path::new(VMLINUX_BTF));
    if overridden.is_none() && named_in_btf(path, names) {
        // the names are there: a full parse (50 ms of vmlinux) would only confirm it, and a
        // program calling a kfunc that is not one still fails to load
        return Ok(());
    }
    let Some(vmlinux) = Btf::parse(path, None) else {
        bail!(
            "cannot read the kernel's BTF at {}: {subcommand} needs it (CONFIG_DEBUG_INFO_BTF) to find the conntrack kfuncs",
            path.display()
        );
    };
    let modules: Vec<Btf> = if overridden.is_some() {
        Vec::new()
    } else {
        if !names.iter().all(|name| vmlinux.has_func(name)) {
            load_modules(&KFUNC_MODULES).with_context(|| {
                format!("{subcommand} needs the conntrack kfuncs of nf_conntrack and nf_nat")
            })?;
        }
        KFUNC_MODULES
            .iter()
            .filter_map(|module| Btf::parse(&Path::new("/sys/kernel/btf").join(module), Some(&vmlinux)))
            .collect()
    };
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| !vmlinux.has_func(name) && !modules.iter().any(|btf| btf.has_func(name)))
        .collect();
    drop(modules);
    if !missing.is_empty() {
        bail!(
            "{subcommand} needs Linux 6.1 or later (bpf_ct_set_nat_info) with conntrack and NAT (CONFIG_NF_CONNTRACK, CONFIG_NF_NAT): this kernel ({}) lacks the conntrack kfuncs {}",
            kernel_release(),
            missing.join(", ")
        );
    }
    Ok(())
}
