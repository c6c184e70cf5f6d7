//! Measuring helpers shared by the benchmarks: connection rate with latency percentiles,
//! iperf3 throughput, medians.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::topology::Netns;

/// One timed run of connections.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// connections per second
    pub rate: f64,
    /// connect latency percentiles and worst case, µs
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Connects to `target` from `client` over and over for `secs` (at most 200,000 times) and
/// returns the rate and connect latencies. The client thread stays on one CPU (fewer
/// migrations, less noise between rounds); each connection is torn down by RST (SO_LINGER
/// 0), as load generators do, so TIME_WAIT does not run out of ports.
pub fn connect_rate(client: &Netns, target: SocketAddr, secs: f64) -> Sample {
    client.enter(|| {
        super::pin_this_thread(0);
        let domain = if target.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let start = Instant::now();
        let mut latencies = Vec::new();
        while start.elapsed().as_secs_f64() < secs && latencies.len() < 200_000 {
            let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).unwrap();
            socket.set_linger(Some(Duration::ZERO)).unwrap();
            let began = Instant::now();
            socket
                .connect_timeout(&target.into(), Duration::from_secs(2))
                .unwrap_or_else(|err| panic!("connect {target}: {err}"));
            latencies.push(began.elapsed().as_secs_f64() * 1e6);
        }
        let rate = latencies.len() as f64 / start.elapsed().as_secs_f64();
        latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Sample {
            rate,
            p50: latencies[latencies.len() / 2],
            p99: latencies[latencies.len() * 99 / 100],
            max: latencies[latencies.len() - 1],
        }
    })
}

/// Gbit/s the server received over one iperf3 run of `secs` from `client` to `addr`.
/// Gbit/s of one iperf3 run from `client`; `download`: the server sends (`-R`).
pub fn iperf3(client: &Netns, addr: &str, port: u16, secs: u32, download: bool) -> f64 {
    let output = Command::new("ip")
        .args(["netns", "exec", &client.name, "iperf3", "-c", addr, "-p"])
        .arg(port.to_string())
        .args(["-t", &secs.to_string(), "-J"])
        .args(download.then_some("-R"))
        .output()
        .expect("iperf3");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("iperf3 JSON");
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 to {addr}:{port}: {report}"))
        / 1e9
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

/// The median over rounds of a path's value divided by the reference path's value in the
/// same round: drift between rounds cancels.
pub fn paired_ratio(path: &[f64], reference: &[f64]) -> f64 {
    median(path.iter().zip(reference).map(|(p, r)| p / r).collect())
}

/// `iperf3 -s` in a namespace, killed on drop.
pub struct IperfServer(std::process::Child);

impl IperfServer {
    pub fn start(netns: &Netns, bind: &str, port: u16) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.name, "iperf3", "-s", "-B", bind, "-p"])
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 -s");
        std::thread::sleep(Duration::from_millis(200));
        Self(child)
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Loads a ruleset into a namespace through a file, as `nft -f` (tool "nft") or
/// `iptables-restore` (tool "iptables") read it.
pub fn load_rules(netns: &Netns, tool: &str, rules: &str) {
    let file = std::env::temp_dir().join(format!("ebpf-net-bench-{}-{tool}", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let load = match tool {
        "nft" => format!("nft -f {}", file.display()),
        "iptables" => format!("iptables-restore < {}", file.display()),
        other => panic!("no loader for {other}"),
    };
    netns.exec(&load);
    let _ = std::fs::remove_file(file);
}

/// Median kernel-measured nanoseconds of `runs` single test_runs of `prog`, cycling through
/// `frames`: a program that rewrites its packet cannot be timed with `repeat` (every run
/// after the first would see the rewritten packet).
pub fn test_run_median_ns(prog: &libbpf_rs::ProgramMut<'_>, frames: &[Vec<u8>], runs: usize) -> f64 {
    let mut samples: Vec<Duration> = (0..runs)
        .map(|i| {
            let input = libbpf_rs::ProgramInput {
                data_in: Some(&frames[i % frames.len()]),
                repeat: 1,
                ..Default::default()
            };
            prog.test_run(input).expect("test_run").duration
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2].as_nanos() as f64
}

/// BPF_ENABLE_STATS: the kernel counts every program's run time while this is held (and
/// nothing else asked for it).
pub struct RunTimeStats(#[allow(dead_code)] std::os::fd::OwnedFd);

impl RunTimeStats {
    pub fn enable() -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: a plain system call; a non-negative result is a descriptor we own.
        let fd =
            unsafe { libbpf_rs::libbpf_sys::bpf_enable_stats(libbpf_rs::libbpf_sys::BPF_STATS_RUN_TIME) };
        assert!(fd >= 0, "BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
        // SAFETY: see above.
        Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }
}

/// The kernel's information about a loaded program (its name, run time and runs, ...).
pub fn prog_info(prog: std::os::fd::BorrowedFd<'_>) -> libbpf_rs::libbpf_sys::bpf_prog_info {
    use std::os::fd::AsRawFd;
    let mut info = libbpf_rs::libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: a program fd and a buffer of `len` bytes.
    let ret =
        unsafe { libbpf_rs::libbpf_sys::bpf_prog_get_info_by_fd(prog.as_raw_fd(), &mut info, &mut len) };
    assert_eq!(ret, 0, "bpf_prog_get_info_by_fd");
    info
}

/// (run_time_ns, run_cnt) of a program so far.
pub fn run_stats(prog: std::os::fd::BorrowedFd<'_>) -> (u64, u64) {
    let info = prog_info(prog);
    (info.run_time_ns, info.run_cnt)
}
