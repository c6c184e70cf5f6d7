//! How much of the verifier's budget each big program takes on the running kernel.
//!
//! The verifier gives up on a program after processing 1,000,000 instructions (paths through
//! loops and branches counted each time), and older kernels prune fewer paths than this
//! machine's: a change to xdp_lb that this kernel verified in a fraction of the budget took
//! Debian's 6.1 and bullseye's 5.10 over it ("BPF program is too large"), which only the VMs
//! of `make test-kernels` showed. This test prints every count and fails above 75%, so the
//! VMs show the margin shrinking before it is gone. Kernels before 5.16 do not report the
//! count (bpf_prog_info.verified_insns); there the test only checks that the programs load.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};

use common::kernel::{self, Feature};
use ebpf_net::datapath::{clusterip, lb, xdp_lb};

const LIMIT: u32 = 1_000_000;
/// the share of LIMIT a program may take here
const BUDGET: u32 = 750_000;

/// The verifier's instruction count for a loaded program; None where the kernel does not say.
fn verified_insns(prog: &libbpf_rs::ProgramMut<'_>) -> Option<u32> {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: `info` is a bpf_prog_info of `len` bytes; no pointer fields are set.
    let ret = unsafe {
        libbpf_sys::bpf_obj_get_info_by_fd(
            prog.as_fd().as_raw_fd(),
            (&mut info as *mut libbpf_sys::bpf_prog_info).cast(),
            &mut len,
        )
    };
    assert_eq!(
        ret,
        0,
        "bpf_obj_get_info_by_fd of {}",
        prog.name().to_string_lossy()
    );
    (info.verified_insns > 0).then_some(info.verified_insns)
}

/// One line on the test binary's stderr, not captured by the harness: the counts are what a
/// VM run is read for, passing or not.
fn say(line: String) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// Prints the count of `prog` and returns a complaint when it is over the budget.
fn check(what: &str, prog: &libbpf_rs::ProgramMut<'_>) -> Option<String> {
    let release = kernel::release();
    match verified_insns(prog) {
        Some(count) => {
            say(format!(
                "verifier: {what}: {count} instructions processed, {:.0}% of {LIMIT} (kernel {release})",
                f64::from(count) * 100.0 / f64::from(LIMIT),
            ));
            (count > BUDGET).then(|| format!("{what}: {count} > {BUDGET}"))
        }
        None => {
            say(format!(
                "verifier: {what}: loads; this kernel ({release}) does not report the count (Linux 5.16)"
            ));
            None
        }
    }
}

/// xdp-lb as a node runs it by default (flood detector on) with every event on: the event
/// level and flood rate are constants the verifier prunes by, and these keep the most code.
fn xdp_lb_options() -> xdp_lb::Options {
    xdp_lb::Options {
        events: 2,
        max_flows: 262_144,
        flood_rate: 40_000,
        ports: (1024, 31_744),
        seed: Some(1),
    }
}

#[test]
fn the_big_programs_leave_the_verifier_a_quarter_of_its_budget() {
    let mut over = Vec::new();

    // xdp_lb where the kernel has bpf_loop (5.17), and xdp_lb_compat, which every kernel loads
    // (the environment is read by the loader; this test is the binary's only one)
    let compat_choices: &[bool] = if xdp_lb::needs_compat() {
        &[true]
    } else {
        &[false, true]
    };
    for &compat in compat_choices {
        if compat {
            std::env::set_var(xdp_lb::COMPAT_ENV, "1");
        }
        let mut object = MaybeUninit::uninit();
        let skel = xdp_lb::load_with_services(&mut object, &xdp_lb_options(), &[], &HashMap::new())
            .unwrap_or_else(|err| panic!("loading xdp-lb (compat: {compat}): {err:#}"));
        let name = if compat { "xdp_lb_compat" } else { "xdp_lb" };
        over.extend(check(name, xdp_lb::program(&skel)));
        std::env::remove_var(xdp_lb::COMPAT_ENV);
    }

    if kernel::require_for(Feature::CtNat, "lb") {
        // lb's own check, which loads the conntrack modules where they are modules
        ebpf_net::kernel::probe::require_kfuncs(lb::SUBCOMMAND, &lb::KFUNCS).expect("lb's kfuncs");
        let mut object = MaybeUninit::uninit();
        let skel = lb::load_with_services(&mut object, &[], true).expect("loading lb");
        over.extend(check("lb_ingress", &skel.progs.lb_ingress));
    }

    let mut object = MaybeUninit::uninit();
    let skel = clusterip::load_with_services(&mut object, &[]).expect("loading clusterip");
    over.extend(check("cip_connect4", &skel.progs.cip_connect4));
    over.extend(check("cip_connect6", &skel.progs.cip_connect6));
    over.extend(check("cip_sendmsg6", &skel.progs.cip_sendmsg6));

    assert!(
        over.is_empty(),
        "over {BUDGET} of the verifier's {LIMIT} instructions: {over:?}"
    );
}
