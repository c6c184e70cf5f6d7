//! ipv6-hp end to end: a prober netns owning the Azure link-local address talks TCP, UDP and
//! ICMPv6 to a node netns through veth with checksum offload off, driven through the real binary.

mod common;

use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use common::topology::{veth, Netns};
use socket2::{Domain, Protocol, Socket, Type};

const LINK_LOCAL: &str = "fe80::1234:5678:9abc";
const GLOBAL: &str = "2603:1062:0:1:fe80:1234:5678:9abc";
const NODE: &str = "fd00:1::2";
const TIMEOUT: Duration = Duration::from_secs(5);

/// prober(probe0, fe80::1234:5678:9abc) <-> node(eth0, fd00:1::2)
struct ProbeLab {
    node: Netns,
    prober: Netns,
    probe_ifindex: u32,
}

fn lab(tag: &str) -> ProbeLab {
    let prober = Netns::new(&format!("{tag}-p"));
    let node = Netns::new(&format!("{tag}-n"));
    veth(&prober, "probe0", &node, "eth0");
    prober.exec(&format!(
        "ip -6 addr add {LINK_LOCAL}/64 dev probe0 nodad && ip -6 route add fd00:1::/64 dev probe0"
    ));
    node.exec(&format!(
        "ip -6 addr add {NODE}/64 dev eth0 nodad && ip -6 route add {GLOBAL}/128 via {LINK_LOCAL} dev eth0"
    ));
    let probe_ifindex = prober.enter(|| {
        ebpf_net::kernel::addr::Interface::by_name("probe0")
            .unwrap()
            .index
    });
    ProbeLab {
        node,
        prober,
        probe_ifindex,
    }
}

impl ProbeLab {
    fn probe_source(&self) -> SocketAddr {
        SocketAddrV6::new(LINK_LOCAL.parse().unwrap(), 0, 0, self.probe_ifindex).into()
    }

    fn node_addr(port: u16) -> SocketAddr {
        SocketAddr::new(NODE.parse::<Ipv6Addr>().unwrap().into(), port)
    }

    /// A TCP request/response from the probe address; returns the peer the node's server saw.
    fn tcp_exchange(&self) -> Ipv6Addr {
        let listener = self.node.enter(|| TcpListener::bind("[::]:0").unwrap());
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let deadline = Instant::now() + TIMEOUT;
            let (mut stream, peer) = loop {
                match listener.accept() {
                    Ok(accepted) => break accepted,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    Err(err) => panic!("no TCP connection arrived: {err}"),
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut request = [0u8; 4];
            stream.read_exact(&mut request).unwrap();
            assert_eq!(&request, b"ping");
            stream.write_all(b"pong").unwrap();
            peer
        });
        let source = self.probe_source();
        self.prober.enter(|| {
            let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).unwrap();
            socket.bind(&source.into()).unwrap();
            socket
                .connect_timeout(&Self::node_addr(port).into(), TIMEOUT)
                .expect("TCP connect from probe address");
            let mut stream: std::net::TcpStream = socket.into();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            stream.write_all(b"ping").unwrap();
            let mut reply = [0u8; 4];
            stream.read_exact(&mut reply).expect("TCP reply to probe address");
            assert_eq!(&reply, b"pong");
        });
        match server.join().expect("TCP server").ip() {
            std::net::IpAddr::V6(peer) => peer,
            other => panic!("IPv4 peer {other}"),
        }
    }

    /// A UDP request/response; returns the peer the node saw.
    fn udp_exchange(&self) -> Ipv6Addr {
        let server = self.node.enter(|| UdpSocket::bind("[::]:0").unwrap());
        server.set_read_timeout(Some(TIMEOUT)).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = self
            .prober
            .enter(|| UdpSocket::bind(self.probe_source()).unwrap());
        client.set_read_timeout(Some(TIMEOUT)).unwrap();
        client.send_to(b"ping", Self::node_addr(port)).unwrap();
        let mut buf = [0u8; 16];
        let (len, peer) = server.recv_from(&mut buf).expect("UDP request at node");
        assert_eq!(&buf[..len], b"ping");
        server.send_to(b"pong", peer).unwrap();
        let (len, from) = client.recv_from(&mut buf).expect("UDP reply at prober");
        assert_eq!(&buf[..len], b"pong");
        let std::net::IpAddr::V6(peer) = peer.ip() else {
            panic!("IPv4 peer {peer}")
        };
        if peer != link_local() {
            // answering a global peer, the node replies from its global address too
            assert_eq!(from, Self::node_addr(port));
        }
        peer
    }

    /// An ICMPv6 echo from the probe address; returns the source the node's raw socket saw.
    fn ping(&self) -> Ipv6Addr {
        let watcher = self
            .node
            .enter(|| Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).unwrap());
        watcher.set_read_timeout(Some(TIMEOUT)).unwrap();
        let source = self.probe_source();
        let pinger = self.prober.enter(|| {
            let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).unwrap();
            socket.bind(&source.into()).unwrap();
            socket
        });
        pinger.set_read_timeout(Some(TIMEOUT)).unwrap();
        let id = (std::process::id() & 0xffff) as u16;
        let mut echo = vec![128u8, 0, 0, 0];
        echo.extend_from_slice(&id.to_be_bytes());
        echo.extend_from_slice(&[0, 1]);
        echo.extend_from_slice(b"probe");
        pinger.send_to(&echo, &Self::node_addr(0).into()).unwrap();
        let seen = recv_icmp(&watcher, 128, id).expect("echo request at node");
        recv_icmp(&pinger, 129, id).expect("echo reply at prober (the kernel drops bad checksums)");
        seen
    }
}

/// Waits for an ICMPv6 message of a type and echo id; returns its source.
fn recv_icmp(socket: &Socket, icmp_type: u8, id: u16) -> Option<Ipv6Addr> {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
        let (len, from) = socket.recv_from(&mut buf).ok()?;
        // SAFETY: recv_from initialised `len` bytes.
        let bytes: Vec<u8> = buf[..len].iter().map(|b| unsafe { b.assume_init() }).collect();
        if len >= 8 && bytes[0] == icmp_type && bytes[4..6] == id.to_be_bytes() {
            return from.as_socket_ipv6().map(|addr| *addr.ip());
        }
    }
    None
}

/// Checksum errors the kernel counted in a namespace, by counter name.
fn checksum_errors(netns: &Netns) -> Vec<String> {
    netns
        .exec("nstat -az")
        .lines()
        .filter(|line| line.contains("CsumErrors"))
        .filter(|line| line.split_whitespace().nth(1) != Some("0"))
        .map(str::to_string)
        .collect()
}

fn exchange_all(lab: &ProbeLab) -> [Ipv6Addr; 3] {
    [lab.tcp_exchange(), lab.udp_exchange(), lab.ping()]
}

fn global() -> Ipv6Addr {
    GLOBAL.parse().unwrap()
}

fn link_local() -> Ipv6Addr {
    LINK_LOCAL.parse().unwrap()
}

#[test]
fn node_sees_global_address_only_while_attached() {
    let lab = lab("hp-fg");
    assert_eq!(
        exchange_all(&lab),
        [link_local(); 3],
        "without ebpf-net the node sees the link-local prober"
    );

    let daemon = lab.node.ebpf_net_daemon(&["ipv6-hp", "-i", "eth0"]);
    assert_eq!(
        exchange_all(&lab),
        [global(); 3],
        "TCP, UDP and ICMPv6 peers through ipv6-hp"
    );
    // status reads a foreground run's counters from its maps (it pins no links)
    let status = lab.node.ebpf_net(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    let run = text
        .lines()
        .find(|l| l.contains("ipv6-hp") && l.contains("foreground"));
    assert!(
        run.is_some_and(|line| !line.contains("unreadable") && line.contains("rewrote")),
        "{text}"
    );
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log:?}");
    let summary = log
        .iter()
        .find(|line| line.contains("detached"))
        .expect("exit summary");
    for direction in ["ingress", "egress"] {
        let rewrote: u64 = summary
            .split(&format!("{direction} rewrote "))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {direction} count in {summary}"));
        assert!(rewrote >= 3, "{direction} rewrote {rewrote}: {summary}");
    }

    assert_eq!(exchange_all(&lab), [link_local(); 3], "detached on exit");
    assert_eq!(checksum_errors(&lab.node), Vec::<String>::new());
    assert_eq!(checksum_errors(&lab.prober), Vec::<String>::new());
}

fn status_json(netns: &Netns) -> serde_json::Value {
    let output = netns.ebpf_net(&["status", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn persisted_here(netns: &Netns) -> Vec<serde_json::Value> {
    let status = status_json(netns);
    status["persisted"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["netns"] == netns.name.as_str())
        .cloned()
        .collect()
}

#[test]
fn persist_survives_exit_updates_in_place_and_goes_down() {
    let lab = lab("hp-pin");
    let output = lab.node.ebpf_net(&["ipv6-hp", "-i", "eth0", "--persist"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("ready"));
    assert_eq!(
        exchange_all(&lab),
        [global(); 3],
        "pinned programs keep translating after the command exits"
    );

    let persisted = persisted_here(&lab.node);
    assert_eq!(persisted.len(), 1, "{persisted:?}");
    let entry = &persisted[0];
    assert_eq!(
        (entry["subcommand"].as_str(), entry["target"].as_str()),
        (Some("ipv6-hp"), Some("eth0"))
    );
    assert_eq!(entry["state"], "active");
    assert_eq!(entry["details"]["global"], GLOBAL);
    assert!(
        entry["details"]["ingress"]["rewritten_packets"].as_u64().unwrap() >= 3,
        "{entry}"
    );
    let old_prog = entry["details"]["ingress"]["prog_id"].as_u64().unwrap();

    // a changed global address replaces the programs inside the same links
    let new_global: Ipv6Addr = "2001:db8:99::1".parse().unwrap();
    lab.node.exec(&format!(
        "ip -6 route add {new_global}/128 via {LINK_LOCAL} dev eth0"
    ));
    let output = lab.node.ebpf_net(&[
        "ipv6-hp",
        "-i",
        "eth0",
        "--persist",
        "--global",
        &new_global.to_string(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("updated in place"));
    assert_eq!(lab.udp_exchange(), new_global);
    let entry = &persisted_here(&lab.node)[0];
    assert_eq!(entry["details"]["global"], new_global.to_string());
    assert_ne!(entry["details"]["ingress"]["prog_id"].as_u64().unwrap(), old_prog);
    assert!(
        entry["details"]["ingress"]["rewritten_packets"].as_u64().unwrap() >= 4,
        "counters carried over: {entry}"
    );

    // a foreground run on the same interface refuses instead of fighting the pinned one
    let output = lab.node.ebpf_net(&["ipv6-hp", "-i", "eth0"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("persisted"));

    let output = lab.node.ebpf_net(&["down", "ipv6-hp", "-i", "eth0"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(persisted_here(&lab.node).is_empty());
    assert_eq!(status_json(&lab.node)["attached"], serde_json::json!([]));
    assert_eq!(exchange_all(&lab), [link_local(); 3], "down detaches");
}

#[test]
fn leaves_an_existing_clsact_qdisc_and_filters_alone() {
    let lab = lab("hp-tc");
    let noop = concat!(env!("CARGO_MANIFEST_DIR"), "/build/bpf/noop.o");
    assert!(std::path::Path::new(noop).exists(), "run `make` first: {noop}");
    lab.node.exec(&format!(
        "tc qdisc add dev eth0 clsact && tc filter add dev eth0 ingress bpf da obj {noop} sec tc && tc filter add dev eth0 egress bpf da obj {noop} sec tc"
    ));
    let filters = || {
        lab.node
            .exec("tc filter show dev eth0 ingress; tc filter show dev eth0 egress")
    };
    let before = filters();
    assert_eq!(before.matches("noop_tc").count(), 2, "{before}");

    let daemon = lab.node.ebpf_net_daemon(&["ipv6-hp", "-i", "eth0"]);
    assert_eq!(
        exchange_all(&lab),
        [global(); 3],
        "translated with the clsact filters in place"
    );
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log:?}");

    assert_eq!(filters(), before, "the filters that were there stay");
    assert!(lab.node.exec("tc qdisc show dev eth0").contains("clsact"));
    assert_eq!(exchange_all(&lab), [link_local(); 3]);
}

#[test]
fn remove_nft_table_deletes_the_table_it_replaces() {
    let lab = lab("hp-nft");
    lab.node.exec(&format!(
        "nft add table ip6 azureSLBProbe && nft add chain ip6 azureSLBProbe prerouting {{ type filter hook prerouting priority -300 \\; }} && nft add rule ip6 azureSLBProbe prerouting ip6 saddr {LINK_LOCAL} ip6 saddr set {GLOBAL}"
    ));
    let daemon = lab
        .node
        .ebpf_net_daemon(&["ipv6-hp", "-i", "eth0", "--remove-nft-table"]);
    assert!(
        daemon
            .stderr()
            .iter()
            .any(|line| line.contains("removed nft table ip6 azureSLBProbe")),
        "{:?}",
        daemon.stderr()
    );
    let tables = lab.node.exec("nft list tables");
    assert!(!tables.contains("azureSLBProbe"), "{tables}");
    assert_eq!(exchange_all(&lab), [global(); 3]);
    drop(daemon);

    // absent table: said so, not an error
    let daemon = lab
        .node
        .ebpf_net_daemon(&["ipv6-hp", "-i", "eth0", "--remove-nft-table"]);
    assert!(
        daemon.stderr().iter().any(|line| line.contains("not present")),
        "{:?}",
        daemon.stderr()
    );
}

/// A router advertisement (lifetime 1800 s, no options) from the probe's link-local address
/// to all nodes, hop limit 255 as ND requires; the kernel fills in the checksum.
fn send_router_advertisement(lab: &ProbeLab) {
    let source = lab.probe_source();
    let all_nodes: SocketAddr = SocketAddrV6::new("ff02::1".parse().unwrap(), 0, 0, lab.probe_ifindex).into();
    lab.prober.enter(|| {
        let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).unwrap();
        socket.bind(&source.into()).unwrap();
        socket.set_multicast_hops_v6(255).unwrap();
        socket.set_unicast_hops_v6(255).unwrap();
        let ra = [134u8, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
        socket.send_to(&ra, &all_nodes.into()).unwrap();
    });
}

/// Polls `cmd` in `netns` until its output contains `needle` (3 s at most).
fn wait_for(netns: &Netns, cmd: &str, needle: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = netns.exec(cmd);
        if out.contains(needle) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("`{cmd}` never showed {needle}: {out}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Azure's rules accept ND before they rewrite: the node must learn its default route from the
/// probe address's router advertisement (the kernel drops one from a global source) and answer
/// its neighbour solicitations as link-local ones, while probes still arrive from the global
/// address.
#[test]
fn neighbour_discovery_of_the_probe_address_stays_link_local() {
    let lab = lab("hp-nd");
    lab.node.exec("sysctl -qw net.ipv6.conf.eth0.accept_ra=2");
    let daemon = lab.node.ebpf_net_daemon(&["ipv6-hp", "-i", "eth0"]);
    send_router_advertisement(&lab);
    let route = wait_for(
        &lab.node,
        "ip -6 route show default",
        &format!("via {LINK_LOCAL}"),
    );
    // the prober solicits the node from its link-local address before its probe goes out
    lab.prober.exec("ip -6 neigh flush dev probe0");
    let seen = lab.tcp_exchange();
    let answered = wait_for(
        &lab.prober,
        "ip -6 neigh show dev probe0",
        &format!("{NODE} lladdr"),
    );
    let node_neighbours = lab.node.exec("ip -6 neigh show dev eth0");
    let (code, lines) = daemon.stop();
    assert_eq!(code, Some(0), "{lines:?}");
    route.unwrap();
    answered.unwrap();
    assert_eq!(seen, global(), "the probe no longer seen from the global address");
    assert!(
        !node_neighbours.contains(GLOBAL),
        "the node took a solicitation from the global address: {node_neighbours}"
    );
    // the exit summary: "ingress rewrote ..., neighbour discovery left alone N; egress ..."
    let ingress_nd = lines
        .iter()
        .find_map(|line| line.split("neighbour discovery left alone ").nth(1))
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(ingress_nd.is_some_and(|n| n > 0), "no ND counted: {lines:?}");
    assert!(
        checksum_errors(&lab.node).is_empty(),
        "{:?}",
        checksum_errors(&lab.node)
    );
}
