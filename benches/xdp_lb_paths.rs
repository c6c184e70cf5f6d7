//! xdp-lb, measured in one run:
//! 1. per-packet cost by BPF_PROG_TEST_RUN of its paths beside the least an XDP load
//!    balancer does (swap the MACs, XDP_TX) and a do-nothing XDP program;
//! 2. connection rate, connect latency and bulk throughput in the one-arm topology (a
//!    bridge joining a client netns, the load balancer's netns and three backend netns)
//!    through `xdp-lb`, through `lb` and through nftables DNAT on the same node, and direct
//!    to a backend. Paths take turns in rotated rounds; prints Markdown tables.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};

use common::bench::{
    connect_rate, iperf3, load_rules, median, paired_ratio, test_run_median_ns, IperfServer, Sample,
};
use common::servers::AcceptServer;
use common::topology::{veth, Netns, BIN};
use etherparse::PacketBuilder;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ProgramInput, ProgramMut};

use ebpf_net::service::parse_services;
use ebpf_net::skel::noop::NoopSkelBuilder;
use ebpf_net::xdp_lb::{self, Backend, Options};

const RUNS: usize = 20_000;
const ROUNDS: usize = 5;
const NET_ROUNDS: usize = 7;
const CONNECT_SECS: f64 = 0.4;
const WARMUP_SECS: f64 = 0.05;
const IPERF_SECS: u32 = 2;
const VIP: &str = "10.90.1.100";
const BULK_VIP: &str = "10.90.1.101";
const PORT: u16 = 7000;
const PATHS: [&str; 4] = ["direct", "ebpf-net xdp-lb", "ebpf-net lb", "nftables DNAT"];

fn tcp4(src: SocketAddr, dst: SocketAddr, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        unreachable!()
    };
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(s.octets(), d.octets(), 64)
        .tcp(src.port(), dst.port(), 1, 64240)
        .ack(1)
        .write(&mut frame, &[0u8; 64])
        .unwrap();
    frame
}

fn per_packet() -> f64 {
    let netns = Netns::new("xlbbench-unit");
    netns.enter(|| {
        let services = parse_services(
            &["10.96.0.10:80=10.1.0.2:8080,10.1.0.3:8080,10.1.0.4:8080".to_string()],
            xdp_lb::LIMITS,
        )
        .unwrap();
        let backends: HashMap<SocketAddr, Backend> = services[0]
            .backends
            .iter()
            .map(|b| {
                (
                    *b,
                    Backend {
                        lb_addr: "10.1.0.1".parse().unwrap(),
                        mac: [2, 0, 0, 0, 0xbb, 1],
                    },
                )
            })
            .collect();
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let (client_mac, lb_mac) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 0x10]);
        let options = Options {
            events: 0,
            max_flows: xdp_lb::DEFAULT_MAX_FLOWS,
            ports: (1024, 31744),
            seed: Some(1),
        };
        let mut object = MaybeUninit::uninit();
        let skel = xdp_lb::load_with_services(&mut object, &options, &services, &backends).unwrap();
        let mut noop_object = MaybeUninit::uninit();
        let noop = NoopSkelBuilder::default()
            .open(&mut noop_object)
            .unwrap()
            .load()
            .unwrap();
        let request = tcp4(client, vip, client_mac, lb_mac);
        let prog = &skel.progs.xdp_lb;
        prog.test_run(ProgramInput {
            data_in: Some(&request),
            ..Default::default()
        })
        .unwrap();
        let flow = xdp_lb::flows(&skel.maps.xdp_lb_flows).unwrap().remove(0);
        let reply = tcp4(
            flow.backend,
            SocketAddr::new(flow.lb_addr, flow.lb_port),
            [2, 0, 0, 0, 0xbb, 1],
            lb_mac,
        );
        let other = tcp4(client, "10.0.0.2:80".parse().unwrap(), client_mac, lb_mac);
        // a new flow per run: a fresh client port each time (and a fresh table per round)
        let fresh: Vec<Vec<u8>> = (0..RUNS)
            .map(|i| {
                let client = SocketAddr::new(
                    IpAddr::from([10, 2, (i / 250) as u8, (i % 250) as u8 + 1]),
                    30000 + (i % 20000) as u16,
                );
                tcp4(client, vip, client_mac, lb_mac)
            })
            .collect();
        let rows: Vec<(&str, &ProgramMut<'_>, Vec<Vec<u8>>)> = vec![
            ("noop_xdp (XDP_PASS)", &noop.progs.noop_xdp, vec![other.clone()]),
            (
                "xdp_mac_swap (MACs swapped, XDP_TX): baseline",
                &noop.progs.xdp_mac_swap,
                vec![request.clone()],
            ),
            (
                "xdp_lb, client -> backend (known flow)",
                prog,
                vec![request.clone()],
            ),
            ("xdp_lb, backend -> client", prog, vec![reply]),
            ("xdp_lb, other traffic (XDP_PASS)", prog, vec![other]),
        ];
        let mut results = vec![Vec::new(); rows.len() + 1];
        for _ in 0..ROUNDS {
            for (i, (_, prog, frames)) in rows.iter().enumerate() {
                results[i].push(test_run_median_ns(prog, frames, RUNS));
            }
            let mut object = MaybeUninit::uninit();
            let fresh_skel = xdp_lb::load_with_services(&mut object, &options, &services, &backends).unwrap();
            results[rows.len()].push(test_run_median_ns(&fresh_skel.progs.xdp_lb, &fresh, RUNS));
        }
        let baseline = median(results[1].clone());
        println!(
            "## xdp-lb per-packet cost (BPF_PROG_TEST_RUN, median of {ROUNDS} rounds x {RUNS} single runs)\n"
        );
        println!("| program, path | ns/packet | vs MAC swap |");
        println!("|---|---:|---:|");
        let names: Vec<&str> = rows
            .iter()
            .map(|row| row.0)
            .chain(["xdp_lb, client -> backend (new flow: pick, claim a port)"])
            .collect();
        let mut worst: f64 = 0.0;
        for (i, (name, samples)) in names.iter().zip(&results).enumerate() {
            let ns = median(samples.clone());
            println!("| {name} | {ns:.0} | {:.2}x |", ns / baseline);
            if i == 2 || i == 3 {
                worst = worst.max(ns / baseline);
            }
        }
        println!();
        worst
    })
}

fn backend(i: usize) -> IpAddr {
    format!("10.90.0.2{}", i + 1).parse().unwrap()
}

fn backend_list(port: u16) -> String {
    (0..3)
        .map(|i| format!("{}:{port}", backend(i)))
        .collect::<Vec<_>>()
        .join(",")
}

fn ebpf_net(lb: &Netns, args: &[&str]) {
    let out = std::process::Command::new(BIN)
        .args(["--netns", &lb.name])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ebpf-net {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets a path up (persisted datapaths: nobody reads events), runs `measure`, tears it down.
fn with_path<T>(lb: &Netns, path: &str, measure: impl FnOnce() -> T) -> T {
    let services = [
        format!("{VIP}:{PORT}={}", backend_list(PORT)),
        format!("{BULK_VIP}:5201={}:5201", backend(0)),
    ];
    let mut args = vec!["-i", "eth0", "--persist"];
    for service in &services {
        args.extend(["--service", service.as_str()]);
    }
    let sub = match path {
        "ebpf-net xdp-lb" => Some("xdp-lb"),
        "ebpf-net lb" => Some("lb"),
        _ => None,
    };
    if let Some(sub) = sub {
        let mut full = vec![sub];
        full.extend(&args);
        ebpf_net(lb, &full);
    }
    if path == "nftables DNAT" {
        // the hairpin through this node is forwarding (lb turns it on and off itself)
        lb.exec("sysctl -qw net.ipv4.ip_forward=1");
        let choice: Vec<String> = (0..3).map(|i| format!("{i} : {}", backend(i))).collect();
        load_rules(
            lb,
            "nft",
            &format!(
                "table ip ebnbench {{\n chain prerouting {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
                 ip daddr {VIP} tcp dport {PORT} dnat to numgen random mod 3 map {{ {} }}\n  \
                 ip daddr {BULK_VIP} tcp dport 5201 dnat to {}\n }}\n chain postrouting {{\n  \
                 type nat hook postrouting priority srcnat; policy accept;\n  ct status dnat masquerade\n }}\n}}\n",
                choice.join(", "),
                backend(0)
            ),
        );
    }
    eprintln!("measuring {path}");
    let result = measure();
    if let Some(sub) = sub {
        ebpf_net(lb, &["down", sub]);
    }
    if path == "nftables DNAT" {
        lb.exec("nft delete table ip ebnbench && sysctl -qw net.ipv4.ip_forward=0");
    }
    result
}

fn main() {
    let worst = per_packet();

    let switch = Netns::new("xlbbench-sw");
    switch.exec("ip link add br0 type bridge && ip link set br0 up");
    let join = |ns: &Netns, port: &str| {
        veth(&switch, port, ns, "eth0");
        switch.exec(&format!("ip link set {port} master br0"));
    };
    let client = Netns::new("xlbbench-c");
    join(&client, "pc");
    client.exec(
        "ip addr add 10.90.0.11/24 dev eth0 && ip route add 10.90.1.0/24 dev eth0 && \
         sysctl -qw net.ipv4.ip_local_port_range='1024 65000'",
    );
    let lb = Netns::new("xlbbench-lb");
    join(&lb, "plb");
    // a one-arm router does not tell clients to go around it
    lb.exec(&format!(
        "ip addr add 10.90.0.2/24 dev eth0 && ip addr add {VIP}/32 dev eth0 && ip addr add {BULK_VIP}/32 dev eth0 && \
         sysctl -qw net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.eth0.send_redirects=0"
    ));
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for i in 0..3 {
        let ns = Netns::new(&format!("xlbbench-b{i}"));
        join(&ns, &format!("pb{i}"));
        ns.exec(&format!(
            "ip addr add {}/24 dev eth0 && sysctl -qw net.core.somaxconn=4096 net.ipv4.tcp_max_syn_backlog=4096",
            backend(i)
        ));
        servers.push(AcceptServer::start(&ns, SocketAddr::new(backend(i), PORT)));
        backends.push(ns);
    }
    let _iperf = IperfServer::start(&backends[0], &backend(0).to_string(), 5201);

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); PATHS.len()];
    let mut gbits: Vec<Vec<f64>> = vec![Vec::new(); PATHS.len()];
    for round in 0..NET_ROUNDS {
        for i in (0..PATHS.len()).map(|k| (k + round) % PATHS.len()) {
            let (addr, bulk) = if i == 0 {
                (SocketAddr::new(backend(0), PORT), backend(0).to_string())
            } else {
                (SocketAddr::new(VIP.parse().unwrap(), PORT), BULK_VIP.to_string())
            };
            let (sample, bulk) = with_path(&lb, PATHS[i], || {
                connect_rate(&client, addr, WARMUP_SECS);
                let sample = connect_rate(&client, addr, CONNECT_SECS);
                (sample, iperf3(&client, &bulk, 5201, IPERF_SECS))
            });
            samples[i].push(sample);
            gbits[i].push(bulk);
        }
    }
    println!(
        "## xdp-lb vs lb vs nftables DNAT vs direct (one arm: client, load balancer and 3 backends on a bridge, generic XDP on veth, median of {NET_ROUNDS} rounds, order rotated)\n"
    );
    println!("| path | connections/s | vs nftables (paired) | connect p50 (µs) | connect p99 (µs) | TCP Gbit/s | vs nftables (paired) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let rates = |i: usize| samples[i].iter().map(|s| s.rate).collect::<Vec<_>>();
    for (i, path) in PATHS.iter().enumerate() {
        println!(
            "| {path} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} |",
            median(rates(i)),
            paired_ratio(&rates(i), &rates(3)),
            median(samples[i].iter().map(|s| s.p50).collect()),
            median(samples[i].iter().map(|s| s.p99).collect()),
            median(gbits[i].clone()),
            paired_ratio(&gbits[i], &gbits[3]),
        );
    }
    println!();
    println!(
        "- goal xdp-lb's full path within 2x of the MAC-swap program: worst path {worst:.2}x ({})",
        if worst <= 2.0 { "met" } else { "NOT met" }
    );
    println!(
        "- connection rate xdp-lb vs lb {:.2}x, vs nftables {:.2}x",
        paired_ratio(&rates(1), &rates(2)),
        paired_ratio(&rates(1), &rates(3))
    );
    drop(servers);
}
