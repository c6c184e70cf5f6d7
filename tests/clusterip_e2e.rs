//! clusterip end to end: clients in a node namespace and in a test-made cgroup, three backend
//! namespaces, and a decoy namespace that owns the VIPs, so a connection that is not
//! translated visibly lands on the decoy instead of failing.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;

use common::affinity::moved_after_timeout;
use common::cgroup::{Client, Seen, TestCgroup, HELPER_ENV};
use common::kernel::{self, Feature};
use common::servers::{tcp_echo, EchoBackends, TcpEchoServer, UdpEchoServer};
use common::topology::{output_within, service_arg, veth, Daemon, Netns, BIN};
use serde_json::Value;

const VIP4: &str = "10.96.0.10:80";
const VIP6: &str = "[fd96::10]:80";

/// The helper process a [`Client`] runs: this binary again, serving commands.
#[test]
#[ignore = "a client process of the other tests, not a test"]
fn client_helper() {
    if std::env::var_os(HELPER_ENV).is_some() {
        common::cgroup::helper_main();
    }
}

struct Lab {
    node: Netns,
    backends4: Vec<SocketAddr>,
    backends6: Vec<SocketAddr>,
    _backends: EchoBackends,
    _servers: Vec<(TcpEchoServer, UdpEchoServer)>,
    _namespaces: Vec<Netns>,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let node = Netns::new(&format!("{tag}-n"));
        let backends = EchoBackends::start(&node, tag);
        let mut namespaces = Vec::new();
        let mut servers = Vec::new();
        let decoy = Netns::new(&format!("{tag}-d"));
        veth(&node, "decoy", &decoy, "eth0");
        node.exec(
            "ip addr add 10.2.0.1/24 dev decoy && ip addr add fd02::1/64 dev decoy nodad && \
             ip route add 10.96.0.0/16 via 10.2.0.2 && ip route add fd96::/64 via fd02::2",
        );
        decoy.exec(
            "ip addr add 10.2.0.2/24 dev eth0 && ip addr add fd02::2/64 dev eth0 nodad && \
             ip addr add 10.96.0.10/32 dev lo && ip addr add fd96::10/128 dev lo nodad && \
             ip route add default via 10.2.0.1 && ip route add default via fd02::1",
        );
        for vip in [VIP4, VIP6] {
            let vip: SocketAddr = vip.parse().unwrap();
            servers.push((
                TcpEchoServer::start(&decoy, vip),
                UdpEchoServer::start(&decoy, vip),
            ));
        }
        namespaces.push(decoy);
        Self {
            node,
            backends4: backends.v4.clone(),
            backends6: backends.v6.clone(),
            _backends: backends,
            _servers: servers,
            _namespaces: namespaces,
        }
    }

    fn service_args(&self, cgroup: &TestCgroup, backends4: &[SocketAddr]) -> Vec<String> {
        vec![
            "clusterip".into(),
            "--cgroup".into(),
            cgroup.path_str().into(),
            "--service".into(),
            service_arg(VIP4, backends4),
            "--service".into(),
            service_arg(VIP6, &self.backends6),
        ]
    }
}

fn start(args: &[String]) -> Daemon {
    Daemon::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn ebpf_net(args: &[String]) -> std::process::Output {
    output_within(Command::new(BIN).args(args))
}

/// `ebpf-net down clusterip --cgroup CGROUP`, which must succeed.
fn down(cgroup: &TestCgroup) {
    let output = ebpf_net(&[
        "down".into(),
        "clusterip".into(),
        "--cgroup".into(),
        cgroup.path_str().into(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn exchanges(lines: Vec<String>) -> Vec<Seen> {
    lines.iter().map(|line| Seen::parse(line)).collect()
}

fn vip(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn tcp_and_udp_to_a_vip_reach_a_backend_and_see_the_vip_v4_and_v6() {
    let lab = Lab::new("cip");
    let cgroup = TestCgroup::new("cip");
    let daemon = start(&lab.service_args(&cgroup, &lab.backends4));
    let mut client = Client::start(&cgroup, &lab.node);
    for (vip_text, backends) in [(VIP4, &lab.backends4), (VIP6, &lab.backends6)] {
        for command in ["tcp", "udpc", "udp"] {
            for exchange in exchanges(client.run(&format!("{command} {vip_text} 6"))) {
                assert!(
                    backends.contains(&exchange.server),
                    "{command} to {vip_text} answered by {} instead of a backend",
                    exchange.server
                );
                // getpeername (TCP, connected UDP) and recvfrom (UDP) show the VIP
                assert_eq!(
                    exchange.peer,
                    vip(vip_text),
                    "{command} to {vip_text}: {exchange:?}"
                );
            }
        }
    }
    // a dual-stack socket reaching the IPv4 service through an IPv4-mapped address
    for command in ["tcp", "udpc", "udp"] {
        for exchange in exchanges(client.run(&format!("{command} [::ffff:10.96.0.10]:80 3"))) {
            assert!(
                lab.backends4.contains(&exchange.server),
                "{command} mapped: {exchange:?}"
            );
            assert_eq!(exchange.peer, vip("[::ffff:10.96.0.10]:80"), "{command} mapped");
        }
    }
    drop(client);
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log:?}");
    assert!(
        log.iter().any(|line| line.contains("detached from cgroup")),
        "{log:?}"
    );
}

#[test]
fn a_thousand_connections_spread_over_three_backends() {
    let lab = Lab::new("cis");
    let cgroup = TestCgroup::new("cis");
    let daemon = start(&lab.service_args(&cgroup, &lab.backends4));
    let mut client = Client::start(&cgroup, &lab.node);
    let mut per_backend: HashMap<SocketAddr, usize> = HashMap::new();
    for exchange in exchanges(client.run(&format!("tcp {VIP4} 1000"))) {
        *per_backend.entry(exchange.server).or_default() += 1;
    }
    for backend in &lab.backends4 {
        let share = per_backend.get(backend).copied().unwrap_or(0) as f64 / 1000.0;
        assert!(
            (0.25..=0.42).contains(&share),
            "{backend}: {share:.3} of 1000 ({per_backend:?})"
        );
    }
    assert_eq!(per_backend.values().sum::<usize>(), 1000, "{per_backend:?}");
    // the exit summary counts the same connects per backend
    drop(client);
    let (_, log) = daemon.stop();
    for backend in &lab.backends4 {
        let expected = format!("{backend} ({} connects", per_backend[backend]);
        assert!(
            log.iter().any(|line| line.contains(&expected)),
            "{expected}: {log:?}"
        );
    }
}

#[test]
fn processes_outside_the_cgroup_reach_the_vip_untranslated() {
    let lab = Lab::new("cio");
    let cgroup = TestCgroup::new("cio");
    let sibling = TestCgroup::new("cio-other");
    let _daemon = start(&lab.service_args(&cgroup, &lab.backends4));
    let mut inside = Client::start(&cgroup, &lab.node);
    let mut outside = Client::start(&sibling, &lab.node);
    for vip_text in [VIP4, VIP6] {
        let translated = Seen::parse(&inside.run(&format!("tcp {vip_text}"))[0]);
        assert_ne!(
            translated.server,
            vip(vip_text),
            "the cgroup's client was not translated"
        );
        for command in ["tcp", "udp"] {
            let untouched = Seen::parse(&outside.run(&format!("{command} {vip_text}"))[0]);
            assert_eq!(
                untouched.server,
                vip(vip_text),
                "{command} from a sibling cgroup was translated"
            );
        }
    }
    // this test process sits in neither cgroup
    let (_, _, peer) = tcp_echo(&lab.node, vip(VIP4), b"outside");
    assert_eq!(peer, vip(VIP4));
}

fn status_services(cgroup: &TestCgroup) -> Vec<Value> {
    let output = ebpf_net(&["status".into(), "--json".into()]);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let entry = report["persisted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| {
            entry["subcommand"] == "clusterip"
                && entry["path"]
                    .as_str()
                    .unwrap()
                    .contains(cgroup.path.file_name().unwrap().to_str().unwrap())
        })
        .cloned()
        .unwrap_or_else(|| panic!("no clusterip entry for {} in {report}", cgroup.path_str()));
    assert_eq!(entry["state"], "active", "{entry}");
    entry["details"]["services"].as_array().unwrap().clone()
}

fn backends_of(services: &[Value], vip_text: &str) -> Vec<SocketAddr> {
    let service = services
        .iter()
        .find(|s| s["vip"] == vip_text)
        .expect("service listed");
    service["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backend"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn persisted_services_update_in_place_without_dropping_a_connection_or_a_vip() {
    let lab = Lab::new("cil");
    let cgroup = TestCgroup::new("cil");
    let all = lab.backends4.clone();
    let output = ebpf_net(&[lab.service_args(&cgroup, &all), vec!["--persist".into()]].concat());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(backends_of(&status_services(&cgroup), VIP4), all);

    let mut holder = Client::start(&cgroup, &lab.node);
    let held = Seen::parse(&holder.run(&format!("hold {VIP4}"))[0]);
    assert!(all.contains(&held.server) && held.peer == vip(VIP4), "{held:?}");
    let others: Vec<SocketAddr> = all.iter().copied().filter(|b| *b != held.server).collect();

    // clients connect all through the updates; a VIP missing for a moment would send one
    // of them to the decoy
    let mut churn = Client::start(&cgroup, &lab.node);
    let churning = std::thread::spawn(move || exchanges(churn.run(&format!("tcp {VIP4} 400"))));

    // first drop another backend, then the held connection's own
    let updates = [vec![held.server, others[1]], vec![others[1]]];
    for backends in &updates {
        let output = ebpf_net(&[lab.service_args(&cgroup, backends), vec!["--persist".into()]].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stderr.contains("updated in place"),
            "{stderr}"
        );
        assert!(stderr.contains("1 changed, 0 removed, 1 unchanged"), "{stderr}");
        assert_eq!(&backends_of(&status_services(&cgroup), VIP4), backends);
        assert_eq!(holder.run("ping"), vec!["ok ping"], "the held connection broke");
        for exchange in exchanges(holder.run(&format!("tcp {VIP4} 30"))) {
            assert!(
                backends.contains(&exchange.server),
                "a removed backend got a new connection: {exchange:?}"
            );
        }
    }
    for exchange in churning.join().unwrap() {
        assert!(
            all.contains(&exchange.server),
            "a connection missed the VIP: {exchange:?}"
        );
    }

    down(&cgroup);
    let after = Seen::parse(&holder.run(&format!("tcp {VIP4}"))[0]);
    assert_eq!(after.server, vip(VIP4), "still translated after down");
}

#[test]
fn a_second_instance_on_the_same_cgroup_is_refused() {
    let lab = Lab::new("cir");
    let cgroup = TestCgroup::new("cir");
    let _first = start(&lab.service_args(&cgroup, &lab.backends4));
    let output = ebpf_net(&lab.service_args(&cgroup, &lab.backends4));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("another ebpf-net clusterip already runs on cgroup"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn bad_input_is_one_line_and_attaches_nothing() {
    let cgroup = TestCgroup::new("cib");
    let base = [
        "clusterip".to_string(),
        "--cgroup".into(),
        cgroup.path_str().into(),
    ];
    let cases: [(&[&str], &str); 9] = [
        (&["--service", "10.96.0.1:80"], "expected VIP:PORT=BACKEND:PORT"),
        (&["--service", "10.96.0.1:80=10.0.0.1"], "is not IP:PORT"),
        (&["--service", "10.96.0.1:80=[fd00::1]:80"], "address family"),
        (&["--service", "10.96.0.1:80="], "no backends"),
        (
            &[
                "--service",
                "10.96.0.1:80=10.0.0.1:80",
                "--service",
                "10.96.0.1:80=10.0.0.2:80",
            ],
            "given twice",
        ),
        (
            &["--service", "10.96.0.1:80=10.0.0.1:80", "--cgroup", "/tmp"],
            "not a cgroup v2 directory",
        ),
        (
            &[
                "--service",
                "10.96.0.1:80=10.0.0.1:80",
                "--cgroup",
                "/sys/fs/cgroup/ebn-none",
            ],
            "No such file",
        ),
        (
            &["--service", "10.96.0.1:80=10.0.0.1:80", "--netns", "x"],
            "drop --netns",
        ),
        (&[], "--service"),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<String> = base.to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        // a later --cgroup overrides; clap keeps the last one only when told, so drop ours
        if extra.contains(&"--cgroup") {
            args.drain(1..3);
        }
        let output = ebpf_net(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
    let report: Value =
        serde_json::from_slice(&ebpf_net(&["status".into(), "--json".into()]).stdout).unwrap();
    let name = cgroup.path.file_name().unwrap().to_str().unwrap();
    assert!(
        !report.to_string().contains(name),
        "something left for {name}: {report}"
    );
}

/// How many of `lines` each backend answered.
fn shares(lines: Vec<String>) -> HashMap<SocketAddr, usize> {
    let mut per_backend: HashMap<SocketAddr, usize> = HashMap::new();
    for exchange in exchanges(lines) {
        *per_backend.entry(exchange.server).or_default() += 1;
    }
    per_backend
}

/// `(errno, microseconds)` of a `try` line; errno 0 when it worked.
fn attempt(line: &str) -> (i32, u128) {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .unwrap_or("0")
            .to_string()
    };
    (field("errno=").parse().unwrap(), field("us=").parse().unwrap())
}

#[test]
fn weights_protocols_and_services_without_a_usable_backend() {
    let lab = Lab::new("ciw");
    let cgroup = TestCgroup::new("ciw");
    let b = &lab.backends4;
    let args: Vec<String> = [
        "clusterip".to_string(),
        "--cgroup".into(),
        cgroup.path_str().into(),
        "--service".into(),
        format!("{VIP4}={};weight=1,{};weight=2,{};weight=1", b[0], b[1], b[2]),
        "--service".into(),
        format!("tcp:10.96.0.11:80={}", b[0]),
        "--service".into(),
        format!("udp:10.96.0.11:80={}", b[1]),
        "--service".into(),
        "tcp:10.96.0.12:80=reject".into(),
        "--service".into(),
        format!("10.96.0.13:80={};state=down,{};state=draining", b[0], b[1]),
    ]
    .into();
    let daemon = start(&args);
    let mut client = Client::start(&cgroup, &lab.node);

    // weights 1:2:1 over 2,000 connections: 25/50/25 % within 5 points
    let per_backend = shares(client.run(&format!("tcp {VIP4} 2000")));
    for (backend, want) in b.iter().zip([0.25, 0.50, 0.25]) {
        let share = per_backend.get(backend).copied().unwrap_or(0) as f64 / 2000.0;
        assert!(
            (share - want).abs() <= 0.05,
            "{backend}: {share:.3}, want {want} ({per_backend:?})"
        );
    }

    // a TCP-only and a UDP-only service on one VIP:PORT
    for exchange in exchanges(client.run("tcp 10.96.0.11:80 20")) {
        assert_eq!(exchange.server, b[0], "TCP to the TCP service");
    }
    for exchange in exchanges(client.run("udp 10.96.0.11:80 20")) {
        assert_eq!(exchange.server, b[1], "UDP to the UDP service");
    }

    // no usable backend: refused at once, no packet sent; ECONNREFUSED where the program can
    // say so (bpf_set_retval), EPERM before 5.18
    let refused = if kernel::has(Feature::SetRetval) {
        libc::ECONNREFUSED
    } else {
        libc::EPERM
    };
    for (protocol, vip_text) in [
        ("tcp", "10.96.0.12:80"),
        ("tcp", "10.96.0.13:80"),
        ("udp", "10.96.0.13:80"),
    ] {
        let line = client.run(&format!("try {protocol} {vip_text}")).remove(0);
        let (errno, us) = attempt(&line);
        assert_eq!(
            errno, refused,
            "{protocol} {vip_text}: {line} (errno {refused} wanted)"
        );
        assert!(us < 10_000, "{protocol} {vip_text}: refused after {us} us");
    }
    // the UDP service of .11 exists: TCP there is its own service, UDP to .12 none at all
    let line = client.run("try udp 10.96.0.12:80").remove(0);
    assert_eq!(attempt(&line).0, 0, "UDP to a TCP-only VIP is left alone: {line}");

    let json = ebpf_net(&["status".into(), "--json".into()]);
    let status: Value = serde_json::from_slice(&json.stdout).unwrap();
    let text = status.to_string();
    for needle in [
        "\"protocol\":\"tcp\"",
        "\"protocol\":\"udp\"",
        "\"weight\":2",
        "\"refused\":3",
    ] {
        assert!(text.contains(needle), "{needle} not in {text}");
    }
    drop(client);
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log:?}");
    assert!(
        log.iter().any(|l| l.contains("3 connects and datagrams refused")),
        "{log:?}"
    );
}

/// A client namespace behind the node: its own network namespace (so its own cookie) with a
/// route to the backends through the node.
fn client_namespace(lab: &Lab, index: usize) -> Netns {
    let ns = Netns::new(&format!("cia{index}"));
    veth(&lab.node, &format!("c{index}"), &ns, "eth0");
    lab.node.exec(&format!(
        "ip addr add 10.6{index}.0.1/24 dev c{index} && sysctl -qw net.ipv4.ip_forward=1"
    ));
    ns.exec(&format!(
        "ip addr add 10.6{index}.0.2/24 dev eth0 && ip route add default via 10.6{index}.0.1"
    ));
    ns
}

#[test]
fn affinity_keeps_each_namespace_on_one_backend_and_iperf3_completes() {
    let lab = Lab::new("cia");
    let cgroup = TestCgroup::new("cia");
    let b = &lab.backends4;
    // iperf3 servers on the node's own ends of the backend links
    let iperf_backends: Vec<SocketAddr> = (0..3)
        .map(|i| format!("10.2{i}.0.1:5201").parse().unwrap())
        .collect();
    let args: Vec<String> = [
        "clusterip".to_string(),
        "--cgroup".into(),
        cgroup.path_str().into(),
        "--service".into(),
        format!("{VIP4};affinity=client={},{},{}", b[0], b[1], b[2]),
        "--service".into(),
        format!(
            "tcp:10.96.0.20:5201;affinity=client;affinity-timeout=600={},{},{}",
            iperf_backends[0], iperf_backends[1], iperf_backends[2]
        ),
    ]
    .into();
    let daemon = start(&args);

    // 1,000 connections of one namespace: one backend
    let mut client = Client::start(&cgroup, &lab.node);
    let per_backend = shares(client.run(&format!("tcp {VIP4} 1000")));
    assert_eq!(per_backend.len(), 1, "{per_backend:?}");
    assert_eq!(per_backend.values().sum::<usize>(), 1000);
    drop(client);

    // other clients (namespaces) each keep theirs, and between them they spread
    let mut chosen = Vec::new();
    let namespaces: Vec<Netns> = (0..8).map(|i| client_namespace(&lab, i)).collect();
    for ns in &namespaces {
        let mut client = Client::start(&cgroup, ns);
        let per_backend = shares(client.run(&format!("tcp {VIP4} 20")));
        assert_eq!(per_backend.len(), 1, "{}: {per_backend:?}", ns.name);
        chosen.extend(per_backend.keys().copied());
    }
    chosen.sort();
    chosen.dedup();
    assert!(chosen.len() > 1, "8 namespaces all on {chosen:?}");

    // iperf3: its control and data connections must meet the same server
    let _servers: Vec<IperfServer> = iperf_backends
        .iter()
        .map(|addr| IperfServer::start(&lab.node, *addr))
        .collect();
    let output = cgroup.run_in(
        &lab.node,
        "iperf3 -c 10.96.0.20 -p 5201 -t 2 -P 2 --connect-timeout 3000 -J",
    );
    assert!(
        output.status.success(),
        "iperf3 through the affinity service failed: {}{}",
        String::from_utf8_lossy(&output.stdout)
            .chars()
            .take(600)
            .collect::<String>(),
        String::from_utf8_lossy(&output.stderr)
    );
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log:?}");
}

/// An iperf3 server bound to one address of a namespace, killed on drop.
struct IperfServer(std::process::Child);

impl IperfServer {
    fn start(netns: &Netns, addr: SocketAddr) -> Self {
        let ns = &netns.name;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "iperf3",
                "-s",
                "-B",
                &addr.ip().to_string(),
                "-p",
            ])
            .arg(addr.port().to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting iperf3 -s");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !netns.exec("ss -ltn").contains(&format!("{addr}")) {
            assert!(std::time::Instant::now() < deadline, "iperf3 -s did not listen");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self(child)
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_draining_backend_keeps_its_connection_while_new_ones_avoid_it() {
    let lab = Lab::new("cid");
    let cgroup = TestCgroup::new("cid");
    let b = lab.backends4.clone();
    let persist = |states: [&str; 3]| -> Vec<String> {
        let list: Vec<String> = b
            .iter()
            .zip(states)
            .map(|(a, s)| format!("{a};state={s}"))
            .collect();
        vec![
            "clusterip".into(),
            "--cgroup".into(),
            cgroup.path_str().into(),
            "--persist".into(),
            "--service".into(),
            format!("{VIP4}={}", list.join(",")),
        ]
    };
    let output = ebpf_net(&persist(["active"; 3]));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut holder = Client::start(&cgroup, &lab.node);
    let held = exchanges(holder.run(&format!("hold {VIP4}"))).remove(0).server;
    let index = b.iter().position(|a| *a == held).unwrap();
    let mut states = ["active"; 3];
    states[index] = "draining";
    let output = ebpf_net(&persist(states));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let mut client = Client::start(&cgroup, &lab.node);
    let start = std::time::Instant::now();
    let mut rounds = 0;
    while start.elapsed() < std::time::Duration::from_secs(30) {
        assert_eq!(
            holder.run("ping"),
            vec!["ok ping".to_string()],
            "the draining backend's connection"
        );
        let per_backend = shares(client.run(&format!("tcp {VIP4} 10")));
        assert!(
            !per_backend.contains_key(&held),
            "a new connection went to the draining {held}"
        );
        rounds += 1;
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(rounds >= 10, "only {rounds} rounds in 30 s");
    drop((client, holder));
    let down = ebpf_net(&[
        "down".into(),
        "clusterip".into(),
        "--cgroup".into(),
        cgroup.path_str().into(),
    ]);
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
}

#[test]
fn a_failing_health_check_takes_a_backend_out_and_brings_it_back() {
    let lab = Lab::new("cih");
    let cgroup = TestCgroup::new("cih");
    // servers the test stops and starts: on the node's own ends of the backend links
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|i| format!("10.2{i}.0.1:9090").parse().unwrap())
        .collect();
    let mut servers: Vec<Option<TcpEchoServer>> = addrs
        .iter()
        .map(|a| Some(TcpEchoServer::start(&lab.node, *a)))
        .collect();
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    // the checks run in the namespace ebpf-net runs in: the node's, where the clients are
    let args: Vec<String> = vec![
        "-n".into(),
        lab.node.name.clone(),
        "clusterip".into(),
        "--cgroup".into(),
        cgroup.path_str().into(),
        "--service".into(),
        format!(
            "tcp:10.96.0.30:80;check=tcp;check-interval=0.3;check-timeout=0.2;check-fall=2;check-rise=2={}",
            list.join(",")
        ),
    ];
    let daemon = start(&args);
    let mut client = Client::start(&cgroup, &lab.node);
    assert_eq!(shares(client.run("tcp 10.96.0.30:80 60")).len(), 3);

    servers[1] = None;
    // interval x fall = 0.6 s, and a check's timeout on top
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let per_backend = shares(client.run("tcp 10.96.0.30:80 60"));
    assert!(!per_backend.contains_key(&addrs[1]), "{per_backend:?}");
    assert!(
        daemon
            .stderr()
            .iter()
            .any(|l| l.contains(&format!("backend {} is unhealthy", addrs[1]))),
        "{:?}",
        daemon.stderr()
    );

    servers[1] = Some(TcpEchoServer::start(&lab.node, addrs[1]));
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let per_backend = shares(client.run("tcp 10.96.0.30:80 60"));
    assert!(
        per_backend.contains_key(&addrs[1]),
        "back after rise: {per_backend:?}"
    );
    drop(client);
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log:?}");
    assert!(log.iter().any(|l| l.contains("is healthy again")), "{log:?}");
}

/// The backend each client (its own network namespace) reaches: three connections each,
/// which must agree (affinity holds within a run).
fn backend_per_namespace(clients: &mut [Client]) -> Vec<SocketAddr> {
    clients
        .iter_mut()
        .enumerate()
        .map(|(i, client)| {
            let per_backend = shares(client.run(&format!("tcp {VIP4} 3")));
            assert_eq!(
                per_backend.len(),
                1,
                "client {i} moved within its affinity: {per_backend:?}"
            );
            *per_backend.keys().next().unwrap()
        })
        .collect()
}

/// Clients in 8 namespaces of their own, behind the node, in `cgroup`.
fn namespace_clients(lab: &Lab, cgroup: &TestCgroup) -> (Vec<Netns>, Vec<Client>) {
    let namespaces: Vec<Netns> = (0..8).map(|i| client_namespace(lab, i)).collect();
    let clients = namespaces.iter().map(|ns| Client::start(cgroup, ns)).collect();
    (namespaces, clients)
}

#[test]
fn affinity_is_kept_across_persist_re_runs() {
    let lab = Lab::new("cap");
    let cgroup = TestCgroup::new("cap");
    let b = lab.backends4.clone();
    let persist = |other: &[SocketAddr]| {
        let args: Vec<String> = vec![
            "clusterip".into(),
            "--cgroup".into(),
            cgroup.path_str().into(),
            "--service".into(),
            format!("{VIP4};affinity=client={},{},{}", b[0], b[1], b[2]),
            "--service".into(),
            service_arg("10.96.0.20:80", other),
            "--persist".into(),
        ];
        let output = ebpf_net(&args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    persist(&b[..2]);
    let (_namespaces, mut clients) = namespace_clients(&lab, &cgroup);
    let first = backend_per_namespace(&mut clients);
    let mut distinct = first.clone();
    distinct.sort();
    distinct.dedup();
    // were they all on one backend, a client that lost its own could not be told apart
    assert!(distinct.len() >= 2, "8 namespaces all on {distinct:?}");
    persist(&b[..2]);
    assert_eq!(
        backend_per_namespace(&mut clients),
        first,
        "clients moved after re-running the same --persist command"
    );
    persist(&b);
    assert_eq!(
        backend_per_namespace(&mut clients),
        first,
        "clients moved after a --persist re-run that changed another service"
    );
    down(&cgroup);
}

#[test]
fn affinity_expires_after_its_timeout() {
    let lab = Lab::new("cae");
    let cgroup = TestCgroup::new("cae");
    let b = &lab.backends4;
    let timeout = std::time::Duration::from_secs(2);
    let args: Vec<String> = vec![
        "clusterip".into(),
        "--cgroup".into(),
        cgroup.path_str().into(),
        "--service".into(),
        format!(
            "{VIP4};affinity=client;affinity-timeout={}={},{},{}",
            timeout.as_secs(),
            b[0],
            b[1],
            b[2]
        ),
    ];
    let daemon = start(&args);
    let (_namespaces, mut clients) = namespace_clients(&lab, &cgroup);
    let before = backend_per_namespace(&mut clients);
    // past the timeout each namespace's next connection is a new choice among 3 backends: of
    // 8, some move (all staying: (1/3)^8 per try)
    let moved = moved_after_timeout(timeout, before, || backend_per_namespace(&mut clients));
    assert!(
        moved > 0,
        "no namespace moved after {timeout:?} without a connection (affinity-timeout {timeout:?})\n{}",
        daemon.stderr().join("\n")
    );
    eprintln!("{moved} of 8 namespaces moved after the timeout");
    drop(clients);
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log:?}");
}
