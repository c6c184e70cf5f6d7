//! End to end through a service: connection rate and connect latency at 1, 1,000 and 10,000
//! services for every path that can carry a service VIP, and bulk TCP throughput through
//! every path that rewrites one.
//!
//! One topology for all: a client netns, a load-balancer netns and three backend netns on a
//! bridge (in a switch netns of its own). Socket- and client-side paths (clusterip, nftables
//! and iptables DNAT as kube-proxy would program them on the client's node, proxy) translate
//! at the client; node paths (lb, xdp-lb, nftables DNAT + masquerade) run on the load
//! balancer, which the client routes service addresses through. Transmit checksum offload is
//! off on every veth (generic XDP on veth needs it: see the README), so every receiver
//! really verifies checksums.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Instant;

use crate::chart::line_chart;
use crate::common::bench::{connect_rate, iperf3, load_rules, median, paired_ratio, IperfServer, Sample};
use crate::common::cgroup::TestCgroup;
use crate::common::servers::{AcceptServer, TcpEchoServer};
use crate::common::topology::{veth, Daemon, Netns, BIN};
use crate::report::{table, Report};
use crate::Settings;

const PORT: u16 = 7000;
const BULK_PORT: u16 = 5201;
/// greeting-and-echo servers on every backend (the "Under attack" section's connections)
pub const ECHO_PORT: u16 = 8080;
const LB_ADDR: &str = "10.90.0.2";
const SIZES: [usize; 3] = [1, 1000, 10_000];

fn backend(i: usize) -> IpAddr {
    IpAddr::from([10, 90, 0, 21 + i as u8])
}

/// The VIP of service `i` of many; the benchmark connects to the last one.
fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// VIPs of the bulk paths: translated at the client, and balanced by the node.
const CLIENT_VIP: &str = "10.97.200.1";
const NODE_VIP: &str = "10.97.100.1";

pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    _backends: Vec<Netns>,
    _servers: Vec<AcceptServer>,
    _echo: Vec<TcpEchoServer>,
    _iperf: IperfServer,
    _switch: Netns,
}

pub fn topology() -> Topology {
    let switch = Netns::new("bench-sw");
    switch.exec("ip link add br0 type bridge && ip link set br0 up");
    let join = |ns: &Netns, port: &str| {
        veth(&switch, port, ns, "eth0");
        switch.exec(&format!("ip link set {port} master br0"));
    };
    let client = Netns::new("bench-c");
    join(&client, "pc");
    // a node forwards (the proxy then takes its bpf_fib_lookup fast path)
    client.exec(&format!(
        "ip addr add 10.90.0.11/24 dev eth0 && ip route add 10.96.0.0/12 via {LB_ADDR} && \
         sysctl -qw net.ipv4.ip_local_port_range='1024 65000' net.ipv4.ip_forward=1"
    ));
    let lb = Netns::new("bench-lb");
    join(&lb, "plb");
    lb.exec(&format!(
        "ip addr add {LB_ADDR}/24 dev eth0 && sysctl -qw net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.eth0.send_redirects=0"
    ));
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    let mut echo = Vec::new();
    for i in 0..3 {
        let ns = Netns::new(&format!("bench-b{i}"));
        join(&ns, &format!("pb{i}"));
        ns.exec(&format!(
            "ip addr add {}/24 dev eth0 && sysctl -qw net.core.somaxconn=4096 net.ipv4.tcp_max_syn_backlog=4096",
            backend(i)
        ));
        servers.push(AcceptServer::start(&ns, SocketAddr::new(backend(i), PORT)));
        echo.push(TcpEchoServer::start(&ns, SocketAddr::new(backend(i), ECHO_PORT)));
        backends.push(ns);
    }
    let iperf = IperfServer::start(&backends[0], &backend(0).to_string(), BULK_PORT);
    Topology {
        client,
        lb,
        _backends: backends,
        _servers: servers,
        _echo: echo,
        _iperf: iperf,
        _switch: switch,
    }
}

impl Topology {
    /// The greeting-and-echo server of every backend.
    pub fn echo_backends(&self) -> Vec<SocketAddr> {
        (0..3).map(|i| SocketAddr::new(backend(i), ECHO_PORT)).collect()
    }
}

/// A service: VIP, port, backends.
pub type Svc = (Ipv4Addr, u16, Vec<SocketAddr>);

fn services(count: usize) -> Vec<Svc> {
    let all: Vec<SocketAddr> = (0..3).map(|i| SocketAddr::new(backend(i), PORT)).collect();
    (0..count).map(|i| (vip(i), PORT, all.clone())).collect()
}

fn bulk_services() -> Vec<Svc> {
    let all: Vec<SocketAddr> = (0..3).map(|i| SocketAddr::new(backend(i), PORT)).collect();
    let vip: Ipv4Addr = NODE_VIP.parse().unwrap();
    // iperf3's control and data connections must meet the same server: one backend
    vec![
        (vip, PORT, all),
        (vip, BULK_PORT, vec![SocketAddr::new(backend(0), BULK_PORT)]),
    ]
}

/// Where kube-proxy's rules hook in: a client node's OUTPUT, or a node's PREROUTING with
/// masquerade towards the backends.
#[derive(Clone, Copy, PartialEq)]
pub enum NftHook {
    Output,
    Prerouting,
}

/// kube-proxy's nftables layout: a verdict map from VIP . protocol . port to a chain per
/// service, which picks an endpoint chain with `numgen random`; each endpoint chain DNATs.
/// Without base chains: nothing sees a packet until [`nft_hooks`] adds them.
pub fn kube_proxy_nft_services(table: &str, services: &[Svc]) -> String {
    let mut rules = format!("table ip {table} {{\n");
    for (i, (_, _, backends)) in services.iter().enumerate() {
        let mut picks = Vec::new();
        for (k, backend) in backends.iter().enumerate() {
            let _ = writeln!(
                rules,
                " chain sep-{i}-{k} {{\n  meta l4proto tcp dnat to {backend}\n }}"
            );
            picks.push(format!("{k} : goto sep-{i}-{k}"));
        }
        let _ = writeln!(
            rules,
            " chain svc-{i} {{\n  numgen random mod {} vmap {{ {} }}\n }}",
            backends.len(),
            picks.join(", ")
        );
    }
    rules.push_str(
        " map services {\n  type ipv4_addr . inet_proto . inet_service : verdict\n  elements = {\n",
    );
    let elements: Vec<String> = services
        .iter()
        .enumerate()
        .map(|(i, (vip, port, _))| format!("   {vip} . tcp . {port} : goto svc-{i}"))
        .collect();
    rules.push_str(&elements.join(",\n"));
    rules.push_str("\n  }\n }\n}\n");
    rules
}

/// The base chains that make [`kube_proxy_nft_services`] live (and register conntrack and
/// NAT hooks): a client node's OUTPUT, or a node's PREROUTING plus masquerade.
pub fn nft_hooks(table: &str, hook: NftHook) -> String {
    let chains = match hook {
        NftHook::Output => {
            " chain output {\n  type nat hook output priority -100; policy accept;\n  ip daddr . meta l4proto . th dport vmap @services\n }\n"
        }
        NftHook::Prerouting => {
            " chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n  ip daddr . meta l4proto . th dport vmap @services\n }\n \
             chain postrouting {\n  type nat hook postrouting priority srcnat; policy accept;\n  ct status dnat masquerade\n }\n"
        }
    };
    format!("table ip {table} {{\n{chains}}}\n")
}

/// Both, as one load from nothing.
pub fn kube_proxy_nft(table: &str, hook: NftHook, services: &[Svc]) -> String {
    kube_proxy_nft_services(table, services) + &nft_hooks(table, hook)
}

/// kube-proxy's iptables layout: one rule per service in KUBE-SERVICES, matched in order,
/// a service chain choosing an endpoint chain with `statistic`, an endpoint chain that DNATs.
fn kube_proxy_iptables(services: &[Svc]) -> String {
    let mut rules = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for (i, (_, _, backends)) in services.iter().enumerate() {
        let _ = writeln!(rules, ":KUBE-SVC-{i} - [0:0]");
        for k in 0..backends.len() {
            let _ = writeln!(rules, ":KUBE-SEP-{i}-{k} - [0:0]");
        }
    }
    rules.push_str("-A OUTPUT -j KUBE-SERVICES\n");
    for (i, (vip, port, _)) in services.iter().enumerate() {
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport {port} -j KUBE-SVC-{i}"
        );
    }
    for (i, (_, _, backends)) in services.iter().enumerate() {
        let n = backends.len();
        for (k, backend) in backends.iter().enumerate() {
            let pick = if k + 1 < n {
                format!(
                    "-m statistic --mode random --probability {:.5} ",
                    1.0 / (n - k) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A KUBE-SVC-{i} {pick}-j KUBE-SEP-{i}-{k}\n-A KUBE-SEP-{i}-{k} -p tcp -m tcp -j DNAT --to-destination {backend}"
            );
        }
    }
    rules.push_str("COMMIT\n");
    rules
}

/// `--service VIP:PORT=B1,B2,...` per service.
pub fn service_args(services: &[Svc]) -> Vec<String> {
    services
        .iter()
        .flat_map(|(vip, port, backends)| {
            let list: Vec<String> = backends.iter().map(SocketAddr::to_string).collect();
            [
                "--service".to_string(),
                format!("{vip}:{port}={}", list.join(",")),
            ]
        })
        .collect()
}

pub fn ebpf_net(netns: &Netns, args: &[String]) {
    let out = Command::new(BIN)
        .args(["--netns", &netns.name])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ebpf-net {:?}: {}",
        args.first(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Path {
    Direct,
    Clusterip,
    Proxy,
    NftClient,
    IptablesClient,
    Lb,
    XdpLb,
    NftNode,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct (no service)",
            Path::Clusterip => "ebpf-net clusterip",
            Path::Proxy => "ebpf-net proxy",
            Path::NftClient => "nftables DNAT, verdict map (client node)",
            Path::IptablesClient => "iptables DNAT, linear chain (client node)",
            Path::Lb => "ebpf-net lb",
            Path::XdpLb => "ebpf-net xdp-lb",
            Path::NftNode => "nftables DNAT + masquerade (LB node)",
        }
    }
}

/// What a path set up; `teardown` undoes it.
struct Setup {
    secs: f64,
    daemon: Option<Daemon>,
}

impl Topology {
    fn setup(&self, path: Path, services: &[Svc], cgroup: &TestCgroup) -> Setup {
        let began = Instant::now();
        let mut daemon = None;
        match path {
            Path::Direct => {}
            Path::Clusterip => {
                let mut args = vec![
                    "clusterip".to_string(),
                    "--cgroup".into(),
                    cgroup.path_str().into(),
                ];
                args.extend(service_args(services));
                daemon = Some(Daemon::start(
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                ));
            }
            Path::Proxy => {
                let maps: Vec<String> = services
                    .iter()
                    .flat_map(|(vip, port, backends)| {
                        ["--map".to_string(), format!("{vip}:{port}={}", backends[0])]
                    })
                    .collect();
                let mut args = vec![
                    "--netns".to_string(),
                    self.client.name.clone(),
                    "proxy".into(),
                    "-i".into(),
                    "eth0".into(),
                ];
                args.extend(maps);
                daemon = Some(Daemon::start(
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                ));
            }
            // the services were loaded before the rounds (see `preload_nft`): hook them up
            Path::NftClient => load_rules(&self.client, "nft", &nft_hooks("ebnbench", NftHook::Output)),
            Path::IptablesClient => load_rules(&self.client, "iptables", &kube_proxy_iptables(services)),
            // in the foreground, as an operator runs it: the run answers established TCP
            // flows' asks (their segments then go past the stack: bpf/lb.c)
            Path::Lb => {
                let mut args = vec![
                    "--netns".to_string(),
                    self.lb.name.clone(),
                    "lb".into(),
                    "-i".into(),
                    "eth0".into(),
                ];
                args.extend(service_args(services));
                daemon = Some(Daemon::start(
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                ));
            }
            // persisted: no event reader competes with the traffic
            Path::XdpLb => {
                let mut args = vec![
                    "xdp-lb".to_string(),
                    "-i".into(),
                    "eth0".into(),
                    "--persist".into(),
                ];
                args.extend(service_args(services));
                ebpf_net(&self.lb, &args);
            }
            Path::NftNode => {
                self.lb.exec("sysctl -qw net.ipv4.ip_forward=1");
                load_rules(&self.lb, "nft", &nft_hooks("ebnbench", NftHook::Prerouting));
            }
        }
        Setup {
            secs: began.elapsed().as_secs_f64(),
            daemon,
        }
    }

    fn teardown(&self, path: Path, setup: Setup) {
        drop(setup.daemon);
        match path {
            Path::NftClient => {
                self.client.exec("nft delete chain ip ebnbench output");
            }
            // iptables-nft keeps the nat table's base chains (and so conntrack) after -F/-X
            Path::IptablesClient => {
                self.client
                    .exec("iptables -t nat -F && iptables -t nat -X && nft delete table ip nat");
            }
            Path::XdpLb => ebpf_net(&self.lb, &["down".into(), "xdp-lb".into()]),
            Path::NftNode => {
                self.lb.exec(
                    "nft delete chain ip ebnbench prerouting && nft delete chain ip ebnbench postrouting && \
                     sysctl -qw net.ipv4.ip_forward=0",
                );
            }
            _ => {}
        }
        // every path starts from empty connection tracking on both nodes: entries of the
        // previous path (NATed or not) must not decide what happens to this one's packets
        for netns in [&self.client, &self.lb] {
            netns.exec("conntrack -F >/dev/null 2>&1 || true");
        }
    }

    /// Loads the services into nftables on the client and on the node, without hooks:
    /// loading 10,000 services in kube-proxy's layout takes tens of seconds here, too long to
    /// repeat every round. Returns how long each load took.
    fn preload_nft(&self, client: &[Svc], node: &[Svc]) -> (f64, f64) {
        let began = Instant::now();
        load_rules(&self.client, "nft", &kube_proxy_nft_services("ebnbench", client));
        let client_secs = began.elapsed().as_secs_f64();
        let began = Instant::now();
        load_rules(&self.lb, "nft", &kube_proxy_nft_services("ebnbench", node));
        (client_secs, began.elapsed().as_secs_f64())
    }

    fn unload_nft(&self) {
        self.client.exec("nft delete table ip ebnbench");
        self.lb.exec("nft delete table ip ebnbench");
    }

    fn measure_connect(&self, target: SocketAddr, settings: &Settings) -> Sample {
        connect_rate(&self.client, target, settings.warmup_secs);
        connect_rate(&self.client, target, settings.connect_secs)
    }
}

const SERVICE_PATHS: [Path; 7] = [
    Path::Direct,
    Path::Clusterip,
    Path::NftClient,
    Path::IptablesClient,
    Path::Lb,
    Path::XdpLb,
    Path::NftNode,
];

fn idx(paths: &[Path], path: Path) -> usize {
    paths.iter().position(|p| *p == path).unwrap()
}

pub fn services_section(report: &mut Report, settings: &Settings, topo: &Topology, cgroup: &TestCgroup) {
    let paths = &SERVICE_PATHS;
    let mut rows = Vec::new();
    // per size: median rate per path, for the chart and the goals
    let mut rates_by_size: Vec<Vec<f64>> = Vec::new();
    let mut paired_direct: Vec<Vec<f64>> = Vec::new();
    let mut lb_vs_nft = Vec::new();
    for &count in &SIZES {
        let svcs = services(count);
        let target = SocketAddr::new(vip(count - 1).into(), PORT);
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); paths.len()];
        let mut setups = vec![0.0f64; paths.len()];
        eprintln!("services {count}: loading nftables");
        let (nft_client, nft_node) = topo.preload_nft(&svcs, &svcs);
        for round in 0..settings.net_rounds {
            for k in 0..paths.len() {
                let i = (k + round) % paths.len();
                let path = paths[i];
                eprintln!("services {count}, round {round}: {}", path.name());
                let setup = topo.setup(path, &svcs, cgroup);
                setups[i] = setups[i].max(setup.secs);
                let to = if path == Path::Direct {
                    SocketAddr::new(backend(0), PORT)
                } else {
                    target
                };
                samples[i].push(topo.measure_connect(to, settings));
                topo.teardown(path, setup);
            }
        }
        topo.unload_nft();
        setups[idx(paths, Path::NftClient)] += nft_client;
        setups[idx(paths, Path::NftNode)] += nft_node;
        let rates = |i: usize| samples[i].iter().map(|s| s.rate).collect::<Vec<_>>();
        let nft_node = idx(paths, Path::NftNode);
        for (i, path) in paths.iter().enumerate() {
            rows.push(vec![
                count.to_string(),
                path.name().to_string(),
                format!("{:.0}", median(rates(i))),
                format!("{:.2}", paired_ratio(&rates(i), &rates(0))),
                format!("{:.1}", median(samples[i].iter().map(|s| s.p50).collect())),
                format!("{:.1}", median(samples[i].iter().map(|s| s.p99).collect())),
                format!("{:.2}", setups[i]),
            ]);
        }
        rates_by_size.push((0..paths.len()).map(|i| median(rates(i))).collect());
        paired_direct.push(
            (0..paths.len())
                .map(|i| paired_ratio(&rates(i), &rates(0)))
                .collect(),
        );
        lb_vs_nft.push((
            count,
            paired_ratio(&rates(idx(paths, Path::Lb)), &rates(nft_node)),
            paired_ratio(&rates(idx(paths, Path::XdpLb)), &rates(nft_node)),
        ));
    }
    let mut md = format!(
        "## Connection rate through a service VIP at 1, 1,000 and 10,000 services\n\n\
         Client netns, load-balancer netns and 3 backend netns on one bridge. Every service has the 3 backends; the client connects to the last service configured (the worst case for a linear chain), {} rounds of {} s per path and size, order rotated; each connection is opened and reset. \
         clusterip, nftables and iptables translate on the client (as kube-proxy does on the client's node); lb, xdp-lb and nftables DNAT + masquerade run on the load-balancer node (one arm). nftables and iptables rulesets have kube-proxy's layout (verdict map + numgen into endpoint chains; KUBE-SERVICES linear chain + statistic). \
         \"setup\" is the longest time a round took to program the path (starting the daemon, `--persist`, `iptables-restore`); for nftables it is the one load of the services (`nft -f`, done once per size because it takes tens of seconds at 10,000 services) plus hooking the base chains in.\n\n",
        settings.net_rounds, settings.connect_secs
    );
    md.push_str(&table(
        &[
            "services",
            "path",
            "connections/s",
            "vs direct (paired)",
            "connect p50 µs",
            "connect p99 µs",
            "setup s",
        ],
        &rows,
    ));
    report.section(md + "\n");
    let categories: Vec<String> = SIZES.iter().map(|n| format!("{n} services")).collect();
    let series: Vec<(String, Vec<f64>)> = paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            (
                path.name().to_string(),
                rates_by_size.iter().map(|r| r[i]).collect(),
            )
        })
        .collect();
    report.chart(
        "conn-rate-vs-services.svg",
        "Connection rate against the number of services, per path",
        line_chart(
            "Connections/s through a service VIP vs number of services",
            "services configured (the client connects to the last one)",
            "connections per second (median)",
            &categories,
            &series,
        ),
    );
    let cip = idx(paths, Path::Clusterip);
    let worst = paired_direct.iter().map(|r| r[cip]).fold(f64::INFINITY, f64::min);
    let listing: Vec<String> = paired_direct.iter().map(|r| format!("{:.2}", r[cip])).collect();
    report.goal(
        "clusterip",
        "connection rate at least 0.90x direct at 1, 1k and 10k services",
        format!("{} of direct", listing.join(" / ")),
        Some(worst >= 0.90),
    );
    // against direct in the same rounds: the machine's drift between sizes cancels
    let flat = paired_direct[2][cip] / paired_direct[0][cip];
    report.goal(
        "clusterip",
        "flat as services grow (10k services within 10% of 1 service)",
        format!("its ratio to direct at 10k services is {flat:.2}x that at 1 service"),
        Some(flat >= 0.90),
    );
    for (count, lb, _) in &lb_vs_nft {
        report.goal(
            "lb",
            &format!("connection rate at least that of nftables DNAT (same node) at {count} services"),
            format!("{lb:.2}x"),
            Some(*lb >= 1.0),
        );
    }
    let xdp: Vec<String> = lb_vs_nft.iter().map(|(_, _, x)| format!("{x:.2}")).collect();
    report.goal(
        "xdp-lb",
        "connection rate vs nftables DNAT on the same node (1 / 1k / 10k; no goal set, reported)",
        format!("{}x", xdp.join(" / ")),
        None,
    );
}

const BULK_PATHS: [Path; 6] = [
    Path::Direct,
    Path::Proxy,
    Path::NftClient,
    Path::Lb,
    Path::XdpLb,
    Path::NftNode,
];

pub fn bulk_section(report: &mut Report, settings: &Settings, topo: &Topology, cgroup: &TestCgroup) {
    let paths = &BULK_PATHS;
    let node_services = bulk_services();
    let client_vip: Ipv4Addr = CLIENT_VIP.parse().unwrap();
    let client_services: Vec<Svc> = vec![
        (client_vip, PORT, vec![SocketAddr::new(backend(0), PORT)]),
        (
            client_vip,
            BULK_PORT,
            vec![SocketAddr::new(backend(0), BULK_PORT)],
        ),
    ];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); paths.len()];
    let mut gbits: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    // the backend sending (iperf3 -R): its data is the flow's reply direction
    let mut gbits_down: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    topo.preload_nft(&client_services, &node_services);
    for round in 0..settings.bulk_rounds {
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let path = paths[i];
            eprintln!("bulk round {round}: {}", path.name());
            let (svcs, addr) = match path {
                Path::Direct => (Vec::new(), backend(0)),
                Path::Proxy | Path::NftClient => (client_services.clone(), IpAddr::V4(client_vip)),
                _ => (node_services.clone(), NODE_VIP.parse().unwrap()),
            };
            let setup = topo.setup(path, &svcs, cgroup);
            samples[i].push(topo.measure_connect(SocketAddr::new(addr, PORT), settings));
            gbits[i].push(iperf3(
                &topo.client,
                &addr.to_string(),
                BULK_PORT,
                settings.iperf_secs,
                false,
            ));
            gbits_down[i].push(iperf3(
                &topo.client,
                &addr.to_string(),
                BULK_PORT,
                settings.iperf_secs,
                true,
            ));
            topo.teardown(path, setup);
        }
    }
    topo.unload_nft();
    let rates = |i: usize| samples[i].iter().map(|s| s.rate).collect::<Vec<_>>();
    let reference = |path: Path| match path {
        Path::Proxy | Path::NftClient => idx(paths, Path::NftClient),
        _ => idx(paths, Path::NftNode),
    };
    let mut rows = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let r = reference(*path);
        rows.push(vec![
            path.name().to_string(),
            format!("{:.0}", median(rates(i))),
            format!("{:.1}", median(samples[i].iter().map(|s| s.p50).collect())),
            format!("{:.2}", median(gbits[i].clone())),
            format!("{:.2}", median(gbits_down[i].clone())),
            format!("{:.2}", paired_ratio(&gbits[i], &gbits[0])),
            if *path == Path::Direct {
                "-".into()
            } else {
                format!(
                    "{:.2} / {:.2} / {:.2} ({})",
                    paired_ratio(&rates(i), &rates(r)),
                    paired_ratio(&gbits[i], &gbits[r]),
                    paired_ratio(&gbits_down[i], &gbits_down[r]),
                    if r == idx(paths, Path::NftClient) {
                        "client-node nft"
                    } else {
                        "LB-node nft"
                    }
                )
            },
        ]);
    }
    let mut md = format!(
        "## Bulk TCP throughput through one service\n\n\
         Same topology; iperf3 for {} s each way (one backend behind the VIP: iperf3's two connections must meet one server; \"down\": the backend sends, `iperf3 -R`, its data the flow's reply direction) and the connection rate to a 3-backend service on the same path, {} rounds, order rotated. \
         proxy and its nftables twin rewrite on the client; lb, xdp-lb and nftables DNAT + masquerade on the load-balancer node. Ratios are paired per round against the nftables path in the same place.\n\n",
        settings.iperf_secs, settings.bulk_rounds
    );
    md.push_str(&table(
        &[
            "path",
            "connections/s",
            "connect p50 µs",
            "TCP Gbit/s",
            "TCP Gbit/s down",
            "Gbit/s vs direct",
            "vs nftables: conn/s / Gbit/s / down",
        ],
        &rows,
    ));
    report.section(md + "\n");
    let ratio = |path: Path, values: &dyn Fn(usize) -> Vec<f64>| {
        paired_ratio(&values(idx(paths, path)), &values(reference(path)))
    };
    let gbit_of = |i: usize| gbits[i].clone();
    let down_of = |i: usize| gbits_down[i].clone();
    let proxy_rate = ratio(Path::Proxy, &rates);
    let proxy_bulk = ratio(Path::Proxy, &gbit_of);
    report.goal(
        "proxy",
        "at least as fast as nftables DNAT: connection rate and throughput",
        format!("{proxy_rate:.2}x connections/s, {proxy_bulk:.2}x Gbit/s"),
        Some(proxy_rate >= 1.0 && proxy_bulk >= 1.0),
    );
    let lb_bulk = ratio(Path::Lb, &gbit_of);
    report.goal(
        "lb",
        "throughput at least that of nftables DNAT (same node)",
        format!("{lb_bulk:.2}x Gbit/s"),
        Some(lb_bulk >= 1.0),
    );
    let lb_down = ratio(Path::Lb, &down_of);
    report.goal(
        "lb",
        "throughput with the backend sending vs nftables DNAT (same node; no goal set, reported)",
        format!("{lb_down:.2}x Gbit/s"),
        None,
    );
    let xdp_bulk = ratio(Path::XdpLb, &gbit_of);
    report.goal(
        "xdp-lb",
        "throughput vs nftables DNAT on the same node (no goal set, reported)",
        format!("{xdp_bulk:.2}x Gbit/s"),
        None,
    );
}
