//! Routes, source addresses and neighbours over rtnetlink (src/kernel/neigh.rs), checked in a
//! namespace of their own against a real peer and against what `ip -j route get` says.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::topology::{veth, Netns};
use ebpf_net::kernel::addr::Interface;
use ebpf_net::kernel::neigh::{self, Route, Routes};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// `lab`: veth0 10.77.0.1/24 and 2001:db8:77::1/64, with 10.78.0.0/16 and 2001:db8:78::/64
/// behind the peer (.2 / ::2) and 10.81.0.0/16 behind its IPv6 address; bench0 (one end of a
/// veth pair) 10.80.0.1/16, for batches. No default route: 192.0.2.0/24 and 2001:db8:99::/64
/// are unreachable.
struct Lab {
    lab: Netns,
    peer: Netns,
}

fn lab() -> Lab {
    let lab = Netns::new("nl");
    let peer = Netns::new("nlpeer");
    veth(&lab, "veth0", &peer, "veth1");
    lab.exec(
        "ip addr add 10.77.0.1/24 dev veth0 && ip addr add 2001:db8:77::1/64 dev veth0 nodad && \
         ip route add 10.78.0.0/16 via 10.77.0.2 && ip route add 2001:db8:78::/64 via 2001:db8:77::2 && \
         ip route add 10.81.0.0/16 via inet6 2001:db8:77::2 dev veth0 && \
         ip link add bench0 type veth peer name bench1 && ip addr add 10.80.0.1/16 dev bench0 && \
         ip link set bench0 up && ip link set bench1 up",
    );
    peer.exec("ip addr add 10.77.0.2/24 dev veth1 && ip addr add 2001:db8:77::2/64 dev veth1 nodad");
    Lab { lab, peer }
}

fn route(dev: &str, next_hop: &str, source: &str) -> Route {
    Route {
        dev: dev.into(),
        next_hop: ip(next_hop),
        source: ip(source),
    }
}

/// What `ip -j route get` answers, read the way the subprocess version of neigh.rs read it.
fn ip_route_get(netns: &Netns, target: IpAddr) -> Route {
    let text = netns.exec(&format!("ip -j route get {target}"));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let field = |name: &str| json[0][name].as_str().map(str::to_string);
    Route {
        dev: field("dev").unwrap(),
        next_hop: field("gateway")
            .or_else(|| json[0]["via"]["host"].as_str().map(str::to_string))
            .map_or(target, |gateway| ip(&gateway)),
        source: ip(&field("prefsrc").unwrap()),
    }
}

#[test]
fn routes_are_what_the_kernel_and_ip_route_get_say() {
    let Lab { lab, peer: _peer } = lab();
    // what, address, then the route expected: device, next hop, source
    #[rustfmt::skip]
    let table = [
        ("on the link", "10.77.0.2", "veth0", "10.77.0.2", "10.77.0.1"),
        ("via a gateway", "10.78.3.4", "veth0", "10.77.0.2", "10.77.0.1"),
        ("IPv4 via an IPv6 gateway", "10.81.0.9", "veth0", "2001:db8:77::2", "10.77.0.1"),
        ("IPv6 on the link", "2001:db8:77::2", "veth0", "2001:db8:77::2", "2001:db8:77::1"),
        ("IPv6 via a gateway", "2001:db8:78::5", "veth0", "2001:db8:77::2", "2001:db8:77::1"),
        // the kernel answers a local address with a route through lo, sent from itself
        ("own address", "10.77.0.1", "lo", "10.77.0.1", "10.77.0.1"),
        ("own IPv6 address", "2001:db8:77::1", "lo", "2001:db8:77::1", "2001:db8:77::1"),
        ("a second link", "10.80.1.2", "bench0", "10.80.1.2", "10.80.0.1"),
    ]
    .map(|(what, target, dev, next_hop, source)| (what, target, route(dev, next_hop, source)));
    lab.enter(|| {
        let mut routes = Routes::new().unwrap();
        for (what, target, expected) in &table {
            let got = neigh::route_to(ip(target)).unwrap_or_else(|err| panic!("{what}: {err:#}"));
            assert_eq!(&got, expected, "{what}: route_to({target})");
            assert_eq!(
                &routes.route_to(ip(target)).unwrap(),
                expected,
                "{what}: Routes::route_to"
            );
            assert_eq!(
                routes.source_towards(ip(target)).unwrap(),
                expected.source,
                "{what}"
            );
            assert_eq!(
                &ip_route_get(&lab, ip(target)),
                expected,
                "{what}: ip -j route get {target}"
            );
        }
    });
}

#[test]
fn no_route_is_an_error_naming_the_address() {
    let Lab { lab, peer: _peer } = lab();
    lab.enter(|| {
        for target in ["192.0.2.1", "2001:db8:99::1"] {
            let err = neigh::route_to(ip(target)).unwrap_err();
            assert_eq!(err.to_string(), format!("no route to {target}"));
            assert!(format!("{err:#}").contains("unreachable"), "{err:#}");
            let err = format!("{:#}", Routes::new().unwrap().source_towards(ip(target)).unwrap_err());
            assert_eq!(
                err,
                format!("no route to backend {target} from this network namespace: Network is unreachable (os error 101)")
            );
            assert_eq!(
                neigh::source_towards(ip(target)).unwrap_err().to_string(),
                format!("no route to backend {target} from this network namespace")
            );
        }
    });
}

fn peer_mac(peer: &Netns) -> [u8; 6] {
    let text = peer.exec("ip -j link show veth1");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    neigh::parse_mac(json[0]["address"].as_str().unwrap()).unwrap()
}

#[test]
fn neighbours_resolve_against_a_real_peer() {
    let Lab { lab, peer } = lab();
    let mac = peer_mac(&peer);
    lab.exec(
        "ip neigh add 10.77.0.50 lladdr 02:00:00:00:00:50 dev veth0 nud permanent && \
         ip neigh add 10.77.0.51 lladdr 02:00:00:00:00:51 dev veth0 nud noarp",
    );
    lab.enter(|| {
        for target in ["10.77.0.2", "2001:db8:77::2"] {
            assert_eq!(
                neigh::neighbour(ip(target), "veth0").unwrap(),
                None,
                "{target} before asking"
            );
            let got = neigh::resolve(ip(target), "veth0", Duration::from_secs(5)).unwrap();
            assert_eq!(got, mac, "{target}");
            assert_eq!(
                neigh::neighbour(ip(target), "veth0").unwrap(),
                Some(mac),
                "{target} after"
            );
        }
        assert_eq!(
            neigh::neighbour(ip("10.77.0.50"), "veth0").unwrap(),
            Some([2, 0, 0, 0, 0, 0x50]),
            "a permanent entry"
        );
        // `ip neigh show` hides NOARP entries: nothing learnt from a peer
        assert_eq!(neigh::neighbour(ip("10.77.0.51"), "veth0").unwrap(), None);
        let err = neigh::resolve(ip("10.77.0.99"), "veth0", Duration::from_millis(1500)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no MAC address for 10.77.0.99 on veth0"),
            "{err:#}"
        );
        let err = neigh::neighbour(ip("10.77.0.2"), "nosuch0").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown interface 'nosuch0' in this network namespace"
        );
    });
    // the unanswered address has an entry, INCOMPLETE or FAILED, that must not count as a MAC
    let entry = lab.exec("ip neigh show 10.77.0.99 dev veth0");
    assert!(
        entry.contains("INCOMPLETE") || entry.contains("FAILED"),
        "{entry}"
    );
    lab.enter(|| assert_eq!(neigh::neighbour(ip("10.77.0.99"), "veth0").unwrap(), None));
}

/// 10,000 distinct addresses of 10.80.0.0/16 (bench0), skipping the network and our own.
fn distinct_backends() -> Vec<IpAddr> {
    (2..10_002u32)
        .map(|n| IpAddr::from([10, 80, (n >> 8) as u8, n as u8]))
        .collect()
}

#[test]
fn batches_ask_each_address_once_and_start_no_process() {
    let Lab { lab, peer: _peer } = lab();
    lab.enter(|| {
        let backends = distinct_backends();
        let started = Instant::now();
        let mut routes = Routes::new().unwrap();
        for backend in &backends {
            assert_eq!(routes.source_towards(*backend).unwrap(), ip("10.80.0.1"));
        }
        let distinct = started.elapsed();
        // a process per address takes a millisecond or more each: 10 s and up
        assert!(
            distinct < Duration::from_secs(2),
            "10,000 distinct addresses took {distinct:?}"
        );

        let few: Vec<IpAddr> = backends.iter().copied().take(16).collect();
        let started = Instant::now();
        let mut routes = Routes::new().unwrap();
        for n in 0..100_000 {
            routes.source_towards(few[n % few.len()]).unwrap();
        }
        let repeated = started.elapsed();
        assert!(
            repeated < Duration::from_millis(200),
            "100,000 lookups of 16 addresses took {repeated:?}"
        );
        eprintln!("10,000 distinct: {distinct:?}; 100,000 over 16 distinct: {repeated:?}");
    });
}

/// The numbers for the change: `cargo test --release --test netlink -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, about 30 s: run by hand"]
fn measure_old_and_new_lookups_of_10000_backends() {
    let Lab { lab, peer: _peer } = lab();
    let backends = distinct_backends();
    lab.enter(|| {
        let started = Instant::now();
        let mut routes = Routes::new().unwrap();
        for backend in &backends {
            routes.route_to(*backend).unwrap();
        }
        eprintln!("netlink, one socket: {:?}", started.elapsed());

        let started = Instant::now();
        for backend in &backends {
            neigh::route_to(*backend).unwrap();
        }
        eprintln!("netlink, a socket per lookup: {:?}", started.elapsed());

        // lb's old way: a UDP connect per backend
        let started = Instant::now();
        for backend in &backends {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect((*backend, 9)).unwrap();
            socket.local_addr().unwrap();
        }
        eprintln!("UDP connect per backend: {:?}", started.elapsed());

        // xdp-lb's old way: `ip -j route get` per backend
        let started = Instant::now();
        for backend in &backends {
            let output = Command::new("ip")
                .args(["-j", "route", "get", &backend.to_string()])
                .output()
                .unwrap();
            assert!(output.status.success());
            let _: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        }
        eprintln!("ip -j route get per backend: {:?}", started.elapsed());
    });
}

/// The interface calls behind `-i` (src/kernel/addr.rs), in a namespace whose links are known.
#[test]
fn interfaces_are_found_by_name_and_index() {
    let Lab { lab, peer: _peer } = lab();
    lab.enter(|| {
        let veth0 = Interface::by_name("veth0").unwrap();
        let mut names: Vec<String> = Interface::all().into_iter().map(|iface| iface.name).collect();
        names.sort();
        assert_eq!(names, ["bench0", "bench1", "lo", "veth0"]);
        assert_eq!(Interface::name_of(veth0.index).as_deref(), Some("veth0"));
        assert_eq!(Interface::name_of(1).as_deref(), Some("lo"));
        assert_eq!(Interface::name_of(999_999), None);
        assert_eq!(veth0.driver().as_deref(), Some("veth"));
        let err = Interface::by_name("eth0").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown interface 'eth0' in this network namespace"
        );
    });
}
