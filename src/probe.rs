//! What this process and kernel can do, checked before anything is attached.

use std::ffi::{CStr, CString};
use std::fs;
use std::mem::MaybeUninit;
use std::path::Path;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::ProgramInput;

use crate::netns;
use crate::skel::probe::ProbeSkelBuilder;

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

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 but not on every arch
fn is_bpffs(c_path: &CStr) -> bool {
    let mut stat = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid path and a buffer of the right type.
    let ok = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } == 0;
    // SAFETY: statfs filled it when it returned 0.
    ok && unsafe { stat.assume_init() }.f_type as i64 == BPF_FS_MAGIC
}

/// Pins must go to the host's bpffs. Mounts it where the host has none yet (as systemd
/// or Cilium would); refuses in a private mount namespace, where `ip netns exec` has put a
/// fresh /sys whose pins would vanish with the command.
pub fn require_bpffs(path: &Path) -> Result<()> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())?;
    if is_bpffs(&c_path) {
        return Ok(());
    }
    if !netns::in_init_mount_ns() {
        bail!(
            "{} is not the host's BPF filesystem in this mount namespace, so pins would vanish (instead of `ip netns exec NAME ebpf-net ...` use `ebpf-net --netns NAME ...`)",
            path.display()
        );
    }
    let fstype = CString::new("bpf")?;
    let mode = CString::new("mode=0700")?;
    // SAFETY: valid NUL-terminated strings; mounting a bpffs has no other effect.
    let ret = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c_path.as_ptr(),
            fstype.as_ptr(),
            0,
            mode.as_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting a BPF filesystem at {}", path.display()));
    }
    eprintln!(
        "ebpf-net: mounted a BPF filesystem at {} (the host had none)",
        path.display()
    );
    Ok(())
}

/// `BPF_F_IPV6` when bpf_l4_csum_replace accepts it on this kernel (6.16+), else 0.
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
