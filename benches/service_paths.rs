//! Connect rate and connect latency from a client netns to a service VIP with 1, 1,000 and
//! 10,000 services configured: `ebpf-net clusterip`, nftables DNAT through a verdict map (as
//! kube-proxy's nftables mode does), iptables DNAT through a linear chain (kube-proxy's
//! iptables mode), and direct to the backend. Paths take turns in rotated rounds of one run;
//! prints a Markdown table with medians and ratios to direct.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use common::bench::{connect_rate, load_rules, median, paired_ratio, Sample};
use common::cgroup::TestCgroup;
use common::servers::AcceptServer;
use common::topology::{veth, Daemon, Netns};

const SIZES: [usize; 3] = [1, 1000, 10_000];
const ROUNDS: usize = 15;
const CONNECT_SECS: f64 = 0.3;
const WARMUP_SECS: f64 = 0.05;
const BACKEND: &str = "10.70.0.2";
const PORT: u16 = 7000;
const PATHS: [&str; 4] = [
    "direct",
    "ebpf-net clusterip",
    "nftables DNAT (verdict map)",
    "iptables DNAT (linear chain)",
];

/// The VIP of service `i`; the benchmark connects to the last one, the worst case for a
/// linear chain.
fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Moves this whole process into a cgroup (socket hooks act per process) and back on drop.
struct InCgroup {
    home: String,
}

impl InCgroup {
    fn enter(cgroup: &TestCgroup) -> Self {
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

/// kube-proxy's nftables layout: a verdict map from VIP . protocol . port to a service
/// chain. The measured service goes through a numgen endpoint choice into an endpoint chain,
/// as kube-proxy does; the others jump straight to their DNAT (a numgen vmap per service
/// makes loading 10,000 of them take minutes on this kernel).
fn nft_ruleset(services: usize) -> String {
    let target = format!("{BACKEND}:{PORT}");
    let mut rules = String::from("table ip ebnbench {\n");
    for i in 0..services - 1 {
        let _ = writeln!(
            rules,
            " chain svc-{i} {{\n  meta l4proto tcp dnat to {target}\n }}"
        );
    }
    let last = services - 1;
    let _ = writeln!(
        rules,
        " chain sep-{last} {{\n  meta l4proto tcp dnat to {target}\n }}"
    );
    let _ = writeln!(
        rules,
        " chain svc-{last} {{\n  numgen random mod 1 vmap {{ 0 : goto sep-{last} }}\n }}"
    );
    rules.push_str(
        " map service-ips {\n  type ipv4_addr . inet_proto . inet_service : verdict\n  elements = {\n",
    );
    let elements: Vec<String> = (0..services)
        .map(|i| format!("   {} . tcp . {PORT} : goto svc-{i}", vip(i)))
        .collect();
    rules.push_str(&elements.join(",\n"));
    rules.push_str("\n  }\n }\n");
    rules.push_str(
        " chain output {\n  type nat hook output priority -100; policy accept;\n  ip daddr . meta l4proto . th dport vmap @service-ips\n }\n}\n",
    );
    rules
}

/// kube-proxy's iptables layout: one rule per service in KUBE-SERVICES, matched in order,
/// each jumping to a service chain and from there to an endpoint chain that DNATs.
fn iptables_ruleset(services: usize) -> String {
    let mut rules = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..services {
        let _ = writeln!(rules, ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i} - [0:0]");
    }
    rules.push_str("-A OUTPUT -j KUBE-SERVICES\n");
    for i in 0..services {
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {PORT} -j KUBE-SVC-{i}",
            vip(i)
        );
    }
    for i in 0..services {
        let _ = writeln!(
            rules,
            "-A KUBE-SVC-{i} -j KUBE-SEP-{i}\n-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {BACKEND}:{PORT}"
        );
    }
    rules.push_str("COMMIT\n");
    rules
}

/// Runs `measure` with one path set up for `services` services; returns what it measured and
/// how long the setup took.
fn with_path<T>(
    client: &Netns,
    cgroup: &TestCgroup,
    path: &str,
    services: usize,
    measure: impl FnOnce() -> T,
) -> (T, f64) {
    let began = Instant::now();
    match path {
        "ebpf-net clusterip" => {
            let mut args = vec![
                "clusterip".to_string(),
                "--cgroup".into(),
                cgroup.path_str().into(),
            ];
            for i in 0..services {
                args.push("--service".into());
                args.push(format!("{}:{PORT}={BACKEND}:{PORT}", vip(i)));
            }
            let daemon = Daemon::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
            let setup = began.elapsed().as_secs_f64();
            let result = measure();
            drop(daemon);
            (result, setup)
        }
        "nftables DNAT (verdict map)" => {
            load_rules(client, "nft", &nft_ruleset(services));
            let setup = began.elapsed().as_secs_f64();
            let result = measure();
            client.exec("nft delete table ip ebnbench");
            (result, setup)
        }
        "iptables DNAT (linear chain)" => {
            load_rules(client, "iptables", &iptables_ruleset(services));
            let setup = began.elapsed().as_secs_f64();
            let result = measure();
            // iptables-nft keeps the nat table's base chains (and so conntrack) after -F/-X
            client.exec("iptables -t nat -F && iptables -t nat -X && nft delete table ip nat");
            (result, setup)
        }
        _ => (measure(), 0.0),
    }
}

fn main() {
    let client = Netns::new("bench-c");
    let server = Netns::new("bench-s");
    veth(&client, "c0", &server, "s0");
    client.exec(
        "ethtool -K c0 tx on >/dev/null && ip addr add 10.70.0.1/24 dev c0 && ip route add default via 10.70.0.2 && \
         sysctl -qw net.ipv4.ip_local_port_range='1024 65000'",
    );
    server.exec(&format!(
        "ethtool -K s0 tx on >/dev/null && ip addr add {BACKEND}/24 dev s0 && \
         sysctl -qw net.core.somaxconn=4096 net.ipv4.tcp_max_syn_backlog=4096"
    ));
    let _server = AcceptServer::start(&server, SocketAddr::new(BACKEND.parse().unwrap(), PORT));
    let cgroup = TestCgroup::new("bench");
    let _inside = InCgroup::enter(&cgroup);

    // rows[size][path] = samples
    let mut rows: Vec<Vec<Vec<Sample>>> = Vec::new();
    let mut setups: Vec<Vec<f64>> = Vec::new();
    for &services in &SIZES {
        let target = SocketAddr::new(vip(services - 1).into(), PORT);
        let mut samples: Vec<Vec<Sample>> = (0..PATHS.len()).map(|_| Vec::new()).collect();
        let mut setup_secs = vec![0.0; PATHS.len()];
        for round in 0..ROUNDS {
            for i in (0..PATHS.len()).map(|k| (k + round) % PATHS.len()) {
                let addr = if i == 0 {
                    SocketAddr::new(BACKEND.parse().unwrap(), PORT)
                } else {
                    target
                };
                let (sample, setup) = with_path(&client, &cgroup, PATHS[i], services, || {
                    connect_rate(&client, addr, WARMUP_SECS);
                    connect_rate(&client, addr, CONNECT_SECS)
                });
                samples[i].push(sample);
                setup_secs[i] = f64::max(setup_secs[i], setup);
            }
        }
        rows.push(samples);
        setups.push(setup_secs);
    }

    println!(
        "## Service VIP connect rate: clusterip vs nftables vs iptables vs direct (client netns -> backend netns over veth, median of {ROUNDS} rounds, order rotated)\n"
    );
    println!("| services | path | connections/s | vs direct (paired) | connect p50 (µs) | connect p99 (µs) | worst (µs) | setup (s) |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for (row, &services) in SIZES.iter().enumerate() {
        let rate = |i: usize| median(rows[row][i].iter().map(|s| s.rate).collect());
        // each round's rate over the same round's direct rate: drift between rounds cancels
        let rates = |i: usize| rows[row][i].iter().map(|s| s.rate).collect::<Vec<_>>();
        let vs_direct = |i: usize| paired_ratio(&rates(i), &rates(0));
        for (i, path) in PATHS.iter().enumerate() {
            println!(
                "| {services} | {path} | {:.0} | {:.2} | {:.1} | {:.1} | {:.0} | {:.2} |",
                rate(i),
                vs_direct(i),
                median(rows[row][i].iter().map(|s| s.p50).collect()),
                median(rows[row][i].iter().map(|s| s.p99).collect()),
                rows[row][i].iter().map(|s| s.max).fold(0.0, f64::max),
                setups[row][i],
            );
        }
    }
    let clusterip = |row: usize| median(rows[row][1].iter().map(|s| s.rate).collect());
    let paired = |row: usize| {
        let rates = |i: usize| rows[row][i].iter().map(|s| s.rate).collect::<Vec<_>>();
        paired_ratio(&rates(1), &rates(0))
    };
    println!();
    for (row, &services) in SIZES.iter().enumerate() {
        let ratio = paired(row);
        println!(
            "- goal clusterip >= 0.90 x direct at {services} services: {:.2} ({})",
            ratio,
            if ratio >= 0.90 { "met" } else { "NOT met" }
        );
    }
    println!(
        "- flatness: clusterip at {} services is {:.2} x its rate at 1 service",
        SIZES[SIZES.len() - 1],
        clusterip(SIZES.len() - 1) / clusterip(0)
    );
}
