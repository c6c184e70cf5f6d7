//! proxy end to end: a client, an on-link server and a router on one bridge, and a remote
//! server behind the router; rules send service addresses to both servers.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::servers::{tcp_echo, udp_echo, TcpEchoServer, UdpEchoServer};
use common::topology::{veth, Netns};
use serde_json::Value;

/// The namespaces and servers of one test; everything goes on drop.
struct ProxyLab {
    client: Netns,
    servers: Vec<(TcpEchoServer, UdpEchoServer)>,
    _others: Vec<Netns>,
}

const CLIENT4: &str = "10.60.0.1";
const CLIENT6: &str = "fd60::1";
/// TCP and UDP echo servers: on-link v4, remote v4, on-link v6, remote v6.
const SERVERS: [&str; 4] = ["10.60.0.2", "10.61.0.2", "fd60::2", "fd61::2"];
/// The service address clients use for each server (routed towards the router).
const SERVICES: [&str; 4] = ["10.96.0.1", "10.96.0.2", "fd96::1", "fd96::2"];

fn lab(tag: &str) -> ProxyLab {
    let lan = Netns::new(&format!("{tag}-lan"));
    let client = Netns::new(&format!("{tag}-c"));
    let local = Netns::new(&format!("{tag}-l"));
    let router = Netns::new(&format!("{tag}-r"));
    let remote = Netns::new(&format!("{tag}-x"));
    lan.exec("ip link add br0 type bridge && ip link set br0 up");
    for (ns, port) in [(&client, "pc"), (&local, "pl"), (&router, "pr")] {
        veth(ns, "eth0", &lan, port);
        lan.exec(&format!("ip link set {port} master br0"));
    }
    veth(&router, "eth1", &remote, "eth0");
    client.exec(&format!(
        "ip addr add {CLIENT4}/24 dev eth0 && ip -6 addr add {CLIENT6}/64 dev eth0 nodad && \
         ip route add default via 10.60.0.254 && ip -6 route add default via fd60::254"
    ));
    local.exec("ip addr add 10.60.0.2/24 dev eth0 && ip -6 addr add fd60::2/64 dev eth0 nodad");
    router.exec(
        "ip addr add 10.60.0.254/24 dev eth0 && ip -6 addr add fd60::254/64 dev eth0 nodad && \
         ip addr add 10.61.0.254/24 dev eth1 && ip -6 addr add fd61::254/64 dev eth1 nodad && \
         sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
    );
    remote.exec(
        "ip addr add 10.61.0.2/24 dev eth0 && ip -6 addr add fd61::2/64 dev eth0 nodad && \
         ip route add default via 10.61.0.254 && ip -6 route add default via fd61::254",
    );
    let mut servers = Vec::new();
    for (i, server) in SERVERS.iter().enumerate() {
        let ns = if i % 2 == 0 { &local } else { &remote };
        let bind = SocketAddr::new(server.parse().unwrap(), 8080);
        servers.push((TcpEchoServer::start(ns, bind), UdpEchoServer::start(ns, bind)));
    }
    ProxyLab {
        client,
        servers,
        _others: vec![lan, local, router, remote],
    }
}

fn service(i: usize) -> SocketAddr {
    SocketAddr::new(SERVICES[i].parse().unwrap(), 80)
}

fn map_args() -> Vec<String> {
    (0..4)
        .map(|i| {
            format!(
                "{}={}",
                service(i),
                SocketAddr::new(SERVERS[i].parse().unwrap(), 8080)
            )
        })
        .collect()
}

fn proxy_args(iface: &str, maps: &[String]) -> Vec<String> {
    let mut args = vec!["proxy".to_string(), "-i".into(), iface.into()];
    for map in maps {
        args.push("--map".into());
        args.push(map.clone());
    }
    args
}

fn client_ip(i: usize) -> IpAddr {
    if i < 2 { CLIENT4 } else { CLIENT6 }.parse().unwrap()
}

#[test]
fn tcp_and_udp_through_the_proxy_v4_and_v6_on_link_and_behind_a_router() {
    let lab = lab("px");
    let args = proxy_args("eth0", &map_args());
    let daemon = lab
        .client
        .ebpf_net_daemon(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for (i, server) in SERVERS.iter().enumerate() {
        let (seen, local, peer) = tcp_echo(&lab.client, service(i), b"request");
        assert_eq!(peer, service(i), "the client's peer is FROM");
        assert_eq!(seen, local, "the server sees the client ({server})");
        assert_eq!(seen.ip(), client_ip(i));

        let (seen, from, local) = udp_echo(&lab.client, service(i));
        assert_eq!(from, service(i), "UDP reply comes from FROM");
        assert_eq!(seen.port(), local.port());
        assert_eq!(seen.ip(), client_ip(i));
    }

    // 10 MB through the router and back
    let bulk: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (_, _, peer) = tcp_echo(&lab.client, service(1), &bulk);
    assert_eq!(peer, service(1));

    // 50 clients at once, each its own connection
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..50)
            .map(|n| {
                let client = &lab.client;
                scope.spawn(move || {
                    let target = service(n % 4);
                    let (seen, local, peer) = tcp_echo(client, target, format!("client {n}").as_bytes());
                    assert_eq!((peer, seen), (target, local));
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("a concurrent client failed");
        }
    });

    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log:?}");
    // on-link TO behind a routed FROM: the next hop (MAC) had to change
    let local_rule = log
        .iter()
        .find(|line| line.contains("10.96.0.1:80 -> 10.60.0.2:8080: "))
        .expect("exit summary of the on-link rule");
    assert!(!local_rule.contains("(0 re-routed)"), "{local_rule}");
    drop(lab.servers);
}

#[test]
fn without_the_proxy_the_service_addresses_go_nowhere() {
    let lab = lab("px-off");
    let target = service(0);
    let result = lab
        .client
        .enter(|| std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(1)));
    assert!(result.is_err(), "{target} answered without ebpf-net");
}

fn status(netns: &Netns) -> Value {
    serde_json::from_slice(&netns.ebpf_net(&["status", "--json"]).stdout).unwrap()
}

#[test]
fn persisted_rules_show_in_status_and_update_in_place() {
    let lab = lab("px-pin");
    let maps = map_args();
    let args = proxy_args("eth0", &maps[..2]);
    let mut with_persist: Vec<&str> = args.iter().map(String::as_str).collect();
    with_persist.push("--persist");
    let output = lab.client.ebpf_net(&with_persist);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // a connection that stays open across the update
    let long_lived = lab
        .client
        .enter(|| std::net::TcpStream::connect(service(0)).unwrap());
    let (seen, _, _) = tcp_echo(&lab.client, service(0), b"before");
    assert_eq!(seen.ip(), client_ip(0));
    let status_now = status(&lab.client);
    let entry = status_now["persisted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["netns"] == lab.client.name.as_str())
        .expect("persisted proxy")
        .clone();
    let rules = entry["details"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    let first = rules
        .iter()
        .find(|rule| rule["from"] == service(0).to_string())
        .unwrap();
    assert!(
        first["packets"].as_u64().unwrap() > 0 && first["replies"].as_u64().unwrap() > 0,
        "{first}"
    );

    // replace rule 1 by rules 2 and 3; rule 0 stays
    let args = proxy_args("eth0", &[maps[0].clone(), maps[2].clone(), maps[3].clone()]);
    let mut with_persist: Vec<&str> = args.iter().map(String::as_str).collect();
    with_persist.push("--persist");
    let output = lab.client.ebpf_net(&with_persist);
    assert!(String::from_utf8_lossy(&output.stderr).contains("updated in place"));
    let mut stream = long_lived;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut line = [0u8; 1];
    use std::io::Read;
    stream
        .read_exact(&mut line)
        .expect("the open connection still gets its greeting");
    assert_eq!(tcp_echo(&lab.client, service(2), b"new rule").2, service(2));
    let gone = service(1);
    let result = lab
        .client
        .enter(|| std::net::TcpStream::connect_timeout(&gone, std::time::Duration::from_secs(1)));
    assert!(result.is_err(), "removed rule still answers");

    let output = lab.client.ebpf_net(&["down", "proxy"]);
    assert!(output.status.success());
    assert_eq!(status(&lab.client)["attached"], serde_json::json!([]));
}

#[test]
fn proxy_bad_input_fails_cleanly() {
    let node = Netns::new("px-bad");
    node.exec("ip link add eth0 type veth peer name eth1");
    for (args, needle) in [
        (
            vec!["proxy", "-i", "eth0", "--map", "10.0.0.1:80"],
            "expected FROM_IP:PORT=TO_IP:PORT",
        ),
        (
            vec!["proxy", "-i", "eth0", "--map", "10.0.0.1:80=[fd00::1]:80"],
            "different address families",
        ),
        (
            vec![
                "proxy",
                "-i",
                "eth0",
                "--map",
                "10.0.0.1:80=10.0.0.2:80",
                "--map",
                "10.0.0.1:80=10.0.0.3:80",
            ],
            "mapped twice",
        ),
        (
            vec!["proxy", "-i", "nope0", "--map", "10.0.0.1:80=10.0.0.2:80"],
            "unknown interface 'nope0'",
        ),
        (vec!["proxy", "-i", "eth0"], "--map"),
    ] {
        let output = node.ebpf_net(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        assert_eq!(status(&node)["attached"], serde_json::json!([]));
    }
}
