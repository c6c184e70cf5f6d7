//! clusterip end to end: clients in a node namespace and in a test-made cgroup, three backend
//! namespaces, and a decoy namespace that owns the VIPs, so a connection that is not
//! translated visibly lands on the decoy instead of failing.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;

use common::cgroup::{Client, Seen, TestCgroup, HELPER_ENV};
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

    let output = ebpf_net(&[
        "down".into(),
        "clusterip".into(),
        "--cgroup".into(),
        cgroup.path_str().into(),
    ]);
    assert!(output.status.success());
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
