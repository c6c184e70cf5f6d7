//! Connect rate and bulk TCP throughput from a client netns to a server netns: direct, through
//! an nftables DNAT rule, and through `ebpf-net proxy`, in interleaved rounds of one run.
//! Prints a Markdown table with medians and ratios to direct.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;

use common::bench::{connect_rate, iperf3, median, IperfServer};
use common::servers::AcceptServer;
use common::topology::{veth, Netns};

const ROUNDS: usize = 5;
const CONNECT_SECS: f64 = 1.5;
const WARMUP_SECS: f64 = 0.3;
const IPERF_SECS: u32 = 2;
const SERVER: &str = "10.70.0.2";

/// What a path sends to, for the connect server (port 7000) and iperf3 (5201).
struct Path {
    name: &'static str,
    addr: &'static str,
}

const PATHS: [Path; 3] = [
    Path {
        name: "direct",
        addr: SERVER,
    },
    Path {
        name: "nftables DNAT",
        addr: "10.97.0.1",
    },
    Path {
        name: "ebpf-net proxy",
        addr: "10.96.0.1",
    },
];

/// Runs `measure` with the path's rewrite in place, and takes it away again.
fn with_path<T>(client: &Netns, path: &Path, measure: impl FnOnce() -> T) -> T {
    match path.name {
        "nftables DNAT" => {
            client.exec(&format!(
                "nft add table ip ebnbench && \
                 nft add chain ip ebnbench out {{ type nat hook output priority -100 \\; }} && \
                 nft add rule ip ebnbench out ip daddr {0} tcp dport {{ 7000, 5201 }} dnat to {SERVER}",
                path.addr
            ));
            let result = measure();
            client.exec("nft delete table ip ebnbench");
            result
        }
        "ebpf-net proxy" => {
            let map7000 = format!("{}:7000={SERVER}:7000", path.addr);
            let map5201 = format!("{}:5201={SERVER}:5201", path.addr);
            let daemon = client.ebpf_net_daemon(&["proxy", "-i", "c0", "--map", &map7000, "--map", &map5201]);
            let result = measure();
            drop(daemon);
            result
        }
        _ => measure(),
    }
}

fn main() {
    let client = Netns::new("bench-c");
    let server = Netns::new("bench-s");
    veth(&client, "c0", &server, "s0");
    // offloads back on: the benchmark measures the path as a node would run it
    client.exec("ethtool -K c0 tx on >/dev/null && ip addr add 10.70.0.1/24 dev c0 && ip route add default via 10.70.0.2");
    // a node forwards: the proxy then takes its bpf_fib_lookup fast path
    client.exec("sysctl -qw net.ipv4.ip_local_port_range='1024 65000' net.ipv4.ip_forward=1");
    server.exec(&format!(
        "ethtool -K s0 tx on >/dev/null && ip addr add {SERVER}/24 dev s0 && \
         sysctl -qw net.core.somaxconn=4096 net.ipv4.tcp_max_syn_backlog=4096"
    ));
    let _accept = AcceptServer::start(&server, format!("{SERVER}:7000").parse().unwrap());
    let _iperf = IperfServer::start(&server, SERVER, 5201);

    let mut rates = vec![Vec::new(); PATHS.len()];
    let mut latencies = vec![Vec::new(); PATHS.len()];
    let mut gbits = vec![Vec::new(); PATHS.len()];
    for round in 0..ROUNDS {
        // each path goes first once: whatever runs first after a change runs cold
        for i in (0..PATHS.len()).map(|k| (k + round) % PATHS.len()) {
            let path = &PATHS[i];
            let (rate, latency, bulk) = with_path(&client, path, || {
                let target: SocketAddr = format!("{}:7000", path.addr).parse().unwrap();
                connect_rate(&client, target, WARMUP_SECS); // discarded
                let sample = connect_rate(&client, target, CONNECT_SECS);
                (
                    sample.rate,
                    sample.p50,
                    iperf3(&client, path.addr, 5201, IPERF_SECS),
                )
            });
            rates[i].push(rate);
            latencies[i].push(latency);
            gbits[i].push(bulk);
        }
    }

    println!("## proxy vs nftables DNAT vs direct (client netns with forwarding on -> server netns over veth, median of {ROUNDS} rounds, order rotated)\n");
    println!("| path | connections/s | per round | vs direct | vs nftables | connect p50 (µs) | TCP Gbit/s | vs direct | vs nftables |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    let rate_of = |i: usize| median(rates[i].clone());
    let gbits_of = |i: usize| median(gbits[i].clone());
    for (i, path) in PATHS.iter().enumerate() {
        let per_round: Vec<String> = rates[i]
            .iter()
            .map(|rate| format!("{:.1}k", rate / 1000.0))
            .collect();
        println!(
            "| {} | {:.0} | {} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2} |",
            path.name,
            rate_of(i),
            per_round.join(" "),
            rate_of(i) / rate_of(0),
            rate_of(i) / rate_of(1),
            median(latencies[i].clone()),
            gbits_of(i),
            gbits_of(i) / gbits_of(0),
            gbits_of(i) / gbits_of(1),
        );
    }
}
