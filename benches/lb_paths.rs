//! Connection rate, connect latency and bulk throughput from a client netns through a
//! load-balancer netns to three backend netns: `ebpf-net lb` versus the same balancing done
//! by nftables DNAT (a verdict map into per-service chains that pick a backend with numgen,
//! masquerade towards the backends), with 1 and 10,000 services, and direct to one backend
//! through the same router. Paths take turns in rotated rounds; prints a Markdown table.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use common::bench::{connect_rate, iperf3, load_rules, median, paired_ratio, IperfServer, Sample};
use common::servers::AcceptServer;
use common::topology::{veth, Daemon, Netns};

const SIZES: [usize; 2] = [1, 10_000];
const ROUNDS: usize = 9;
const CONNECT_SECS: f64 = 0.4;
const WARMUP_SECS: f64 = 0.05;
const IPERF_SECS: u32 = 2;
const PORT: u16 = 7000;
/// The service the throughput runs go through: one backend (iperf3's two connections must
/// meet the same server).
const BULK_VIP: &str = "10.95.0.1";
const PATHS: [&str; 3] = [
    "direct (routed, no NAT)",
    "ebpf-net lb",
    "nftables DNAT (vmap + numgen)",
];

fn backend(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 81 + i as u8, 0, 2)
}

/// The VIP of service `i`; the benchmark connects to the last one.
fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn backend_list(port: u16) -> String {
    (0..3)
        .map(|i| format!("{}:{port}", backend(i)))
        .collect::<Vec<_>>()
        .join(",")
}

fn nft_ruleset(services: usize) -> String {
    let choice: Vec<String> = (0..3).map(|i| format!("{i} : {} . {PORT}", backend(i))).collect();
    let mut rules = String::from("table ip ebnbench {\n");
    for i in 0..services {
        let _ = writeln!(
            rules,
            " chain svc-{i} {{\n  meta l4proto tcp dnat ip to numgen random mod 3 map {{ {} }}\n }}",
            choice.join(", ")
        );
    }
    let _ = writeln!(
        rules,
        " chain svc-bulk {{\n  meta l4proto tcp dnat ip to {}:5201\n }}",
        backend(0)
    );
    rules.push_str(
        " map services {\n  type ipv4_addr . inet_proto . inet_service : verdict\n  elements = {\n",
    );
    let mut elements: Vec<String> = (0..services)
        .map(|i| format!("   {} . tcp . {PORT} : goto svc-{i}", vip(i)))
        .collect();
    elements.push(format!("   {BULK_VIP} . tcp . 5201 : goto svc-bulk"));
    rules.push_str(&elements.join(",\n"));
    rules.push_str("\n  }\n }\n}\n");
    rules
}

/// The base chains that make the ruleset live (and register conntrack and NAT hooks);
/// added and deleted per round, while the services stay loaded: loading 10,000 services
/// with a numgen map each takes tens of seconds on this kernel.
const NFT_HOOKS: &str = "table ip ebnbench {\n chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n  \
     ip daddr . meta l4proto . th dport vmap @services\n }\n chain postrouting {\n  \
     type nat hook postrouting priority srcnat; policy accept;\n  ct status dnat masquerade\n }\n}\n";

/// Runs `measure` with one path set up for `services` services; returns its result and the
/// setup time (for nftables: hooking up the services loaded before).
fn with_path<T>(lb: &Netns, path: &str, services: usize, measure: impl FnOnce() -> T) -> (T, f64) {
    let began = Instant::now();
    match path {
        "ebpf-net lb" => {
            let mut args = vec![
                "--netns".to_string(),
                lb.name.clone(),
                "lb".into(),
                "-i".into(),
                "l0".into(),
            ];
            for i in 0..services {
                args.push("--service".into());
                args.push(format!("{}:{PORT}={}", vip(i), backend_list(PORT)));
            }
            args.push("--service".into());
            args.push(format!("{BULK_VIP}:5201={}:5201", backend(0)));
            let daemon = Daemon::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
            let setup = began.elapsed().as_secs_f64();
            let result = measure();
            drop(daemon);
            (result, setup)
        }
        "nftables DNAT (vmap + numgen)" => {
            load_rules(lb, "nft", NFT_HOOKS);
            let setup = began.elapsed().as_secs_f64();
            let result = measure();
            lb.exec("nft delete chain ip ebnbench prerouting && nft delete chain ip ebnbench postrouting");
            (result, setup)
        }
        _ => (measure(), 0.0),
    }
}

fn main() {
    let client = Netns::new("lbbench-c");
    let lb = Netns::new("lbbench-lb");
    veth(&client, "c0", &lb, "l0");
    client.exec(
        "ethtool -K c0 tx on >/dev/null && ip addr add 10.80.0.1/24 dev c0 && ip route add default via 10.80.0.2 && \
         sysctl -qw net.ipv4.ip_local_port_range='1024 65000'",
    );
    lb.exec("ethtool -K l0 tx on >/dev/null && ip addr add 10.80.0.2/24 dev l0 && sysctl -qw net.ipv4.ip_forward=1");
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for i in 0..3 {
        let ns = Netns::new(&format!("lbbench-b{i}"));
        veth(&lb, &format!("b{i}"), &ns, "eth0");
        lb.exec(&format!(
            "ethtool -K b{i} tx on >/dev/null && ip addr add 10.8{}.0.1/24 dev b{i}",
            i + 1
        ));
        ns.exec(&format!(
            "ethtool -K eth0 tx on >/dev/null && ip addr add {}/24 dev eth0 && ip route add default via 10.8{}.0.1 && \
             sysctl -qw net.core.somaxconn=4096 net.ipv4.tcp_max_syn_backlog=4096",
            backend(i),
            i + 1
        ));
        servers.push(AcceptServer::start(&ns, SocketAddr::new(backend(i).into(), PORT)));
        backends.push(ns);
    }
    let _iperf = IperfServer::start(&backends[0], &backend(0).to_string(), 5201);

    println!(
        "## lb vs nftables DNAT vs direct (client netns -> load balancer netns -> 3 backend netns over veth, median of {ROUNDS} rounds, order rotated)\n"
    );
    println!("| services | path | connections/s | vs nftables (paired) | connect p50 (µs) | connect p99 (µs) | TCP Gbit/s | vs nftables (paired) | programming (s) |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut verdicts = Vec::new();
    for &services in &SIZES {
        let target = SocketAddr::new(vip(services - 1).into(), PORT);
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); PATHS.len()];
        let mut gbits: Vec<Vec<f64>> = vec![Vec::new(); PATHS.len()];
        let mut setups = vec![0.0f64; PATHS.len()];
        let began = Instant::now();
        load_rules(&lb, "nft", &nft_ruleset(services));
        let nft_load = began.elapsed().as_secs_f64();
        for round in 0..ROUNDS {
            for i in (0..PATHS.len()).map(|k| (k + round) % PATHS.len()) {
                let (addr, bulk) = if i == 0 {
                    (SocketAddr::new(backend(0).into(), PORT), backend(0).to_string())
                } else {
                    (target, BULK_VIP.to_string())
                };
                let ((sample, bulk), setup) = with_path(&lb, PATHS[i], services, || {
                    connect_rate(&client, addr, WARMUP_SECS);
                    let sample = connect_rate(&client, addr, CONNECT_SECS);
                    (sample, iperf3(&client, &bulk, 5201, IPERF_SECS))
                });
                samples[i].push(sample);
                gbits[i].push(bulk);
                setups[i] = setups[i].max(setup);
            }
        }
        lb.exec("nft delete table ip ebnbench");
        setups[2] += nft_load;
        let rates = |i: usize| samples[i].iter().map(|s| s.rate).collect::<Vec<_>>();
        for (i, path) in PATHS.iter().enumerate() {
            println!(
                "| {services} | {path} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} |",
                median(rates(i)),
                paired_ratio(&rates(i), &rates(2)),
                median(samples[i].iter().map(|s| s.p50).collect()),
                median(samples[i].iter().map(|s| s.p99).collect()),
                median(gbits[i].clone()),
                paired_ratio(&gbits[i], &gbits[2]),
                setups[i],
            );
        }
        verdicts.push((
            services,
            paired_ratio(&rates(1), &rates(2)),
            paired_ratio(&gbits[1], &gbits[2]),
        ));
    }
    println!();
    for (services, rate, bulk) in verdicts {
        let met = |ratio: f64| match ratio {
            r if r >= 1.0 => "met",
            r if r >= 0.97 => "equal within the run-to-run spread",
            _ => "NOT met",
        };
        println!(
            "- goal lb at least as fast as nftables at {services} services: connection rate {rate:.2}x ({}), throughput {bulk:.2}x ({})",
            met(rate),
            met(bulk)
        );
    }
    drop(servers);
}
