//! `make bench`: every benchmark of ebpf-net in one run, written as docs/BENCHMARKS.md with
//! charts under docs/bench/.
//!
//!   cargo bench --bench suite                      everything, writes the report
//!   cargo bench --bench suite -- SECTION...        only these (per-packet, services, bulk,
//!                                                  rate, control, attack, kube; per-packet includes
//!                                                  before: issue 19's cost against 6e0cd5a); prints, writes
//!                                                  the report under target/bench-partial
//!   cargo bench --bench suite -- kube              the Kubernetes agent at 10,000 services
//!                                                  (only when named: it loads a real API
//!                                                  server for minutes; scripts/bench-kube)
//!   cargo bench --bench suite -- --quick ...       fewer and shorter rounds (a smoke run)

#[path = "../../tests/common/mod.rs"]
mod common;

mod attack;
mod before;
mod chart;
mod control;
mod kube;
mod paths;
mod per_packet;
mod rate;
mod report;

use std::path::Path;
use std::time::Instant;

use common::cgroup::TestCgroup;

/// Rounds and durations of every section.
pub struct Settings {
    pub rounds: usize,
    pub runs: usize,
    pub net_rounds: usize,
    pub bulk_rounds: usize,
    pub control_rounds: usize,
    /// the packet-rate section's rounds: its paths drift apart by up to 30% between rounds on
    /// a shared VM, and its verdicts (lb vs nftables) sit close to the line
    pub rate_rounds: usize,
    pub connect_secs: f64,
    pub warmup_secs: f64,
    pub iperf_secs: u32,
}

impl Settings {
    fn full() -> Self {
        Self {
            rounds: 5,
            runs: 20_000,
            net_rounds: 7,
            bulk_rounds: 5,
            control_rounds: 3,
            rate_rounds: 9,
            connect_secs: 0.3,
            warmup_secs: 0.05,
            iperf_secs: 2,
        }
    }

    fn quick() -> Self {
        Self {
            rounds: 2,
            runs: 2_000,
            net_rounds: 1,
            bulk_rounds: 1,
            control_rounds: 1,
            rate_rounds: 2,
            connect_secs: 0.1,
            warmup_secs: 0.02,
            iperf_secs: 1,
        }
    }
}

/// Moves this whole process into a cgroup (socket hooks act per process) and back on drop.
pub struct InCgroup {
    home: String,
}

impl InCgroup {
    pub fn enter(cgroup: &TestCgroup) -> Self {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let relative = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .expect("a cgroup v2 line in /proc/self/cgroup")
            .to_string();
        let home = format!("{}{relative}", common::cgroup::cgroup2_root().display());
        std::fs::write(cgroup.path.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        Self { home }
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            format!("{}/cgroup.procs", self.home),
            std::process::id().to_string(),
        );
    }
}

const SECTIONS: [&str; 8] = [
    "per-packet",
    "rate",
    "before",
    "services",
    "bulk",
    "control",
    "attack",
    "kube",
];

fn main() {
    // `cargo bench` passes --bench; anything else is ours
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let quick = args.iter().any(|a| a == "--quick");
    let chosen: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--quick")
        .collect();
    for section in &chosen {
        if !SECTIONS.contains(section) {
            eprintln!(
                "suite: no section '{section}' (sections: {})",
                SECTIONS.join(", ")
            );
            std::process::exit(2);
        }
    }
    let all = chosen.is_empty();
    // kube only when named: it starts and loads a real API server for minutes
    let wants = |section: &str| (all && section != "kube") || chosen.contains(&section);
    let settings = if quick {
        Settings::quick()
    } else {
        Settings::full()
    };
    let began = Instant::now();
    let mut report = report::Report::default();
    let cgroup = TestCgroup::new("bench");
    let inside = InCgroup::enter(&cgroup);

    if wants("per-packet") {
        per_packet::run(&mut report, &settings, &cgroup);
    }
    if wants("rate") {
        rate::run(&mut report, &settings);
    }
    if wants("per-packet") || wants("before") {
        before::run(&mut report, &settings, &cgroup);
    }
    if wants("services") || wants("bulk") || wants("attack") {
        let topology = paths::topology();
        if wants("services") {
            paths::services_section(&mut report, &settings, &topology, &cgroup);
        }
        if wants("bulk") {
            paths::bulk_section(&mut report, &settings, &topology, &cgroup);
        }
        // last on the topology: the flood leaves backlogs and conntrack entries behind
        if wants("attack") {
            attack::run(&mut report, &topology);
        }
    }
    if wants("control") {
        control::run(&mut report, &settings, &cgroup);
    }
    if wants("kube") {
        kube::run(&mut report, &settings);
    }
    drop(inside);

    let elapsed = began.elapsed().as_secs_f64();
    if all && !quick {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        report.write(&docs, elapsed).expect("writing docs/BENCHMARKS.md");
        println!(
            "\nwrote {} ({elapsed:.0} s)",
            docs.join("BENCHMARKS.md").display()
        );
    } else {
        let scratch = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-partial");
        report
            .write(&scratch, elapsed)
            .expect("writing the partial report");
        println!(
            "\npartial run: report in {} ({elapsed:.0} s)",
            scratch.join("BENCHMARKS.md").display()
        );
    }
}
