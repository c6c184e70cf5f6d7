//! Per-packet cost by BPF_PROG_TEST_RUN of each program beside a do-nothing program of the
//! same hook, measured side by side in one run. Prints a Markdown table.
//!
//! A rewrite changes the packet test_run keeps reusing across `repeat`, so every program is
//! timed the same way: many single runs, the kernel's own duration of each, median.

#[path = "../tests/common/mod.rs"]
mod common;

use std::mem::MaybeUninit;

use etherparse::PacketBuilder;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ProgramInput, ProgramMut};

use ebpf_net::ipv6_hp::{load_egress, load_ingress, ProbeAddresses, DEFAULT_GLOBAL, DEFAULT_LINK_LOCAL};
use ebpf_net::skel::noop::NoopSkelBuilder;

use common::bench::{median, test_run_median_ns};

const RUNS: usize = 50_000;
const ROUNDS: usize = 5;

fn tcp6(src: &str, dst: &str) -> Vec<u8> {
    let src: std::net::Ipv6Addr = src.parse().unwrap();
    let dst: std::net::Ipv6Addr = dst.parse().unwrap();
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src.octets(), dst.octets(), 64)
        .tcp(40000, 80, 1, 64240)
        .write(&mut frame, &[0u8; 64])
        .unwrap();
    frame
}

/// Kernel-measured average over one run with `repeat`: only valid where the program leaves
/// the packet as it found it.
fn repeated_ns(prog: &ProgramMut<'_>, frame: &[u8]) -> f64 {
    let input = ProgramInput {
        data_in: Some(frame),
        repeat: 1_000_000,
        ..Default::default()
    };
    prog.test_run(input).expect("test_run").duration.as_nanos() as f64
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let addrs = ProbeAddresses {
        link_local: DEFAULT_LINK_LOCAL.parse().unwrap(),
        global: DEFAULT_GLOBAL.parse().unwrap(),
    };
    let flag = ebpf_net::probe::l4_csum_ipv6_flag();
    let (mut noop_obj, mut ingress_obj, mut egress_obj) = (
        MaybeUninit::uninit(),
        MaybeUninit::uninit(),
        MaybeUninit::uninit(),
    );
    let noop = NoopSkelBuilder::default()
        .open(&mut noop_obj)
        .unwrap()
        .load()
        .unwrap();
    let ingress = load_ingress(&mut ingress_obj, &addrs, flag, None).unwrap();
    let egress = load_egress(&mut egress_obj, &addrs, flag, None).unwrap();

    let probe = tcp6(DEFAULT_LINK_LOCAL, "2001:db8::10");
    let reply = tcp6("2001:db8::10", DEFAULT_GLOBAL);
    let other = tcp6("2001:db8::20", "2001:db8::10");
    let rows: [(&str, &ProgramMut<'_>, &[u8]); 5] = [
        ("noop_tc (baseline)", &noop.progs.noop_tc, &probe),
        (
            "ipv6_hp_ingress, probe rewritten",
            &ingress.progs.ipv6_hp_ingress,
            &probe,
        ),
        (
            "ipv6_hp_egress, reply rewritten",
            &egress.progs.ipv6_hp_egress,
            &reply,
        ),
        (
            "ipv6_hp_ingress, other traffic",
            &ingress.progs.ipv6_hp_ingress,
            &other,
        ),
        (
            "ipv6_hp_egress, other traffic",
            &egress.progs.ipv6_hp_egress,
            &other,
        ),
    ];
    // Rounds interleave the programs so machine noise hits all of them alike.
    let mut results = vec![Vec::new(); rows.len()];
    for _ in 0..ROUNDS {
        for (i, (_, prog, frame)) in rows.iter().enumerate() {
            results[i].push(test_run_median_ns(prog, &[frame.to_vec()], RUNS));
        }
    }
    let baseline = median(results[0].clone());
    println!(
        "## Per-packet cost, tc programs (BPF_PROG_TEST_RUN, median of {ROUNDS} rounds x {RUNS} runs)\n"
    );
    println!("| program, path | ns/packet | vs noop_tc |");
    println!("|---|---:|---:|");
    for ((name, _, _), samples) in rows.iter().zip(results) {
        let ns = median(samples);
        println!("| {name} | {ns:.0} | {:.2}x |", ns / baseline);
    }

    // Untouched traffic, the common case, without the timer in every sample.
    let noop_fast = median(
        (0..ROUNDS)
            .map(|_| repeated_ns(&noop.progs.noop_tc, &other))
            .collect(),
    );
    let ingress_fast = median(
        (0..ROUNDS)
            .map(|_| repeated_ns(&ingress.progs.ipv6_hp_ingress, &other))
            .collect(),
    );
    println!("\n| untouched traffic, repeat 1,000,000 | ns/packet | vs noop_tc |");
    println!("|---|---:|---:|");
    println!("| noop_tc (baseline) | {noop_fast:.1} | 1.00x |");
    println!(
        "| ipv6_hp_ingress, other traffic | {ingress_fast:.1} | {:.2}x |",
        ingress_fast / noop_fast
    );
}
