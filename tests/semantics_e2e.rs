//! Service semantics end to end on lb and xdp-lb (issue 19): weights, protocol per service,
//! refusal of a service without a usable backend (RST / ICMP port unreachable), session
//! affinity, draining and health checks. Each test runs on both datapaths, each in the
//! topology its own end-to-end tests use: lb routes between a client netns and three backend
//! netns (the VIPs exist nowhere); xdp-lb is one arm on a bridge with the clients and the
//! backends (the VIPs are the load balancer's own addresses, where nothing listens).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::affinity::moved_after_timeout;
use common::bench::IperfServer;
use common::kernel::{self, Feature};
use common::servers::{udp_request, Greeting, TcpEchoServer, UdpEchoServer};
use common::topology::{veth, Daemon, Netns};
use socket2::{Domain, Socket, Type};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Lb,
    XdpLb,
}

struct Lab {
    kind: Kind,
    clients: Netns,
    lb: Netns,
    /// client source addresses per family; the first is "the" client
    clients4: Vec<String>,
    clients6: Vec<String>,
    vip4: IpAddr,
    vip6: IpAddr,
    /// per backend: its v4 and v6 echo address (port 8080)
    backends4: Vec<SocketAddr>,
    backends6: Vec<SocketAddr>,
    /// per backend: its echo servers; emptied to kill them
    servers: Vec<Vec<(TcpEchoServer, UdpEchoServer)>>,
    backend_ns: Vec<Netns>,
    _switch: Option<Netns>,
}

const EXTRA_CLIENTS: usize = 12;

/// Runs one of the shared tests with lb, where the kernel has what lb needs (6.1); elsewhere
/// skipped with the reason printed.
fn lb_test(tag: &str, test: fn(Kind, &str)) {
    if kernel::require(Feature::CtNat) {
        test(Kind::Lb, tag);
    }
}

impl Lab {
    fn new(kind: Kind, tag: &str) -> Self {
        let (clients, lb, switch, clients4, clients6, backend_ns, backends4, backends6, vip4, vip6) =
            match kind {
                Kind::Lb => {
                    let clients = Netns::new(&format!("{tag}-c"));
                    let lb = Netns::new(&format!("{tag}-lb"));
                    veth(&clients, "eth0", &lb, "eth0");
                    lb.exec("ip addr add 10.10.0.2/24 dev eth0 && ip addr add fd10::2/64 dev eth0 nodad");
                    let mut c4 = vec!["10.10.0.1".to_string()];
                    let mut c6 = vec!["fd10::1".to_string()];
                    for k in 0..EXTRA_CLIENTS {
                        c4.push(format!("10.10.0.{}", 10 + k));
                        c6.push(format!("fd10::{}", 10 + k));
                    }
                    for (a, b) in c4.iter().zip(&c6) {
                        clients.exec(&format!(
                            "ip addr add {a}/24 dev eth0 && ip addr add {b}/64 dev eth0 nodad"
                        ));
                    }
                    clients.exec("ip route add default via 10.10.0.2 && ip route add default via fd10::2");
                    let (mut ns, mut b4, mut b6) = (Vec::new(), Vec::new(), Vec::new());
                    for i in 0..3 {
                        let backend = Netns::new(&format!("{tag}-b{i}"));
                        veth(&lb, &format!("b{i}"), &backend, "eth0");
                        lb.exec(&format!(
                            "ip addr add 10.2{i}.0.1/24 dev b{i} && ip addr add fd2{i}::1/64 dev b{i} nodad"
                        ));
                        backend.exec(&format!(
                        "ip addr add 10.2{i}.0.2/24 dev eth0 && ip addr add fd2{i}::2/64 dev eth0 nodad && \
                         ip route add default via 10.2{i}.0.1 && ip route add default via fd2{i}::1"
                    ));
                        b4.push(format!("10.2{i}.0.2:8080").parse().unwrap());
                        b6.push(format!("[fd2{i}::2]:8080").parse().unwrap());
                        ns.push(backend);
                    }
                    let vip4: IpAddr = "10.96.0.1".parse().unwrap();
                    let vip6: IpAddr = "fd96::1".parse().unwrap();
                    (clients, lb, None, c4, c6, ns, b4, b6, vip4, vip6)
                }
                Kind::XdpLb => {
                    let switch = Netns::new(&format!("{tag}-sw"));
                    switch.exec("ip link add br0 type bridge && ip link set br0 up");
                    let attach = |ns: &Netns, port: &str| {
                        veth(&switch, port, ns, "eth0");
                        switch.exec(&format!("ip link set {port} master br0"));
                    };
                    let clients = Netns::new(&format!("{tag}-c"));
                    attach(&clients, "pc");
                    let mut c4 = vec!["10.70.0.11".to_string()];
                    let mut c6 = vec!["fd70::11".to_string()];
                    for k in 0..EXTRA_CLIENTS {
                        c4.push(format!("10.70.0.{}", 30 + k));
                        c6.push(format!("fd70::{}", 30 + k));
                    }
                    for (a, b) in c4.iter().zip(&c6) {
                        clients.exec(&format!(
                            "ip addr add {a}/24 dev eth0 && ip addr add {b}/64 dev eth0 nodad"
                        ));
                    }
                    clients.exec("ip route add 10.70.1.0/24 dev eth0 && ip route add fd70:1::/64 dev eth0");
                    let lb = Netns::new(&format!("{tag}-lb"));
                    attach(&lb, "plb");
                    lb.exec(
                        "ip addr add 10.70.0.2/24 dev eth0 && ip addr add fd70::2/64 dev eth0 nodad && \
                     ip addr add 10.70.1.100/32 dev eth0 && ip addr add fd70:1::100/128 dev eth0 nodad",
                    );
                    let (mut ns, mut b4, mut b6) = (Vec::new(), Vec::new(), Vec::new());
                    for k in 1..=3 {
                        let backend = Netns::new(&format!("{tag}-b{k}"));
                        attach(&backend, &format!("pb{k}"));
                        backend.exec(&format!(
                        "ip addr add 10.70.0.2{k}/24 dev eth0 && ip addr add fd70::2{k}/64 dev eth0 nodad"
                    ));
                        b4.push(format!("10.70.0.2{k}:8080").parse().unwrap());
                        b6.push(format!("[fd70::2{k}]:8080").parse().unwrap());
                        ns.push(backend);
                    }
                    let vip4: IpAddr = "10.70.1.100".parse().unwrap();
                    let vip6: IpAddr = "fd70:1::100".parse().unwrap();
                    (clients, lb, Some(switch), c4, c6, ns, b4, b6, vip4, vip6)
                }
            };
        let mut lab = Self {
            kind,
            clients,
            lb,
            clients4,
            clients6,
            vip4,
            vip6,
            backends4,
            backends6,
            servers: Vec::new(),
            backend_ns,
            _switch: switch,
        };
        for i in 0..3 {
            lab.servers.push(Vec::new());
            lab.start_servers(i);
        }
        lab
    }

    fn start_servers(&mut self, i: usize) {
        for addr in [self.backends4[i], self.backends6[i]] {
            self.servers[i].push((
                TcpEchoServer::start(&self.backend_ns[i], addr),
                UdpEchoServer::start(&self.backend_ns[i], addr),
            ));
        }
    }

    fn kill_servers(&mut self, i: usize) {
        self.servers[i].clear();
    }

    fn subcommand(&self) -> &'static str {
        match self.kind {
            Kind::Lb => "lb",
            Kind::XdpLb => "xdp-lb",
        }
    }

    fn vip(&self, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(if v6 { self.vip6 } else { self.vip4 }, port)
    }

    fn backends(&self, v6: bool) -> &[SocketAddr] {
        if v6 {
            &self.backends6
        } else {
            &self.backends4
        }
    }

    fn client(&self, v6: bool, k: usize) -> &str {
        if v6 {
            &self.clients6[k]
        } else {
            &self.clients4[k]
        }
    }

    /// `ebpf-net SUBCOMMAND -i eth0 --service S...` with `extra` flags.
    fn args(&self, services: &[String], extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![self.subcommand().into(), "-i".into(), "eth0".into()];
        for service in services {
            args.push("--service".into());
            args.push(service.clone());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn start(&self, services: &[String]) -> Daemon {
        let args = self.args(services, &[]);
        self.lb
            .ebpf_net_daemon(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn persist(&self, services: &[String]) {
        let args = self.args(services, &["--persist"]);
        let output = self
            .lb
            .ebpf_net(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A TCP connection from client address `source`.
    fn connect_from(&self, source: &str, target: SocketAddr) -> std::io::Result<TcpStream> {
        let source: IpAddr = source.parse().unwrap();
        self.clients.enter(|| {
            let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(source, 0).into())?;
            socket.connect_timeout(&target.into(), Duration::from_secs(3))?;
            Ok(socket.into())
        })
    }

    /// The backend a new TCP connection from `source` reaches (its greeting).
    fn which(&self, source: &str, target: SocketAddr) -> std::io::Result<SocketAddr> {
        let stream = self.connect_from(source, target)?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        let greeting: Greeting = line
            .parse()
            .map_err(|err| std::io::Error::new(ErrorKind::InvalidData, err))?;
        Ok(greeting.server)
    }

    /// A UDP socket of client address `source` connected to `target`.
    fn udp_from(&self, source: &str, target: SocketAddr) -> UdpSocket {
        let source: IpAddr = source.parse().unwrap();
        self.clients.enter(|| {
            let socket = UdpSocket::bind(SocketAddr::new(source, 0)).unwrap();
            socket.connect(target).unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            socket
        })
    }
}

fn service(vip: SocketAddr, options: &str, backends: &[String]) -> String {
    format!("{vip}{options}={}", backends.join(","))
}

fn plain(backends: &[SocketAddr]) -> Vec<String> {
    backends.iter().map(SocketAddr::to_string).collect()
}

/// Counts per backend of `n` new connections from the clients `sources` take turns with.
fn spread(lab: &Lab, sources: &[&str], target: SocketAddr, n: usize) -> HashMap<SocketAddr, usize> {
    let mut seen = HashMap::new();
    for i in 0..n {
        let source = sources[i % sources.len()];
        let backend = lab
            .which(source, target)
            .unwrap_or_else(|err| panic!("connection {i} from {source} to {target}: {err}"));
        *seen.entry(backend).or_insert(0) += 1;
    }
    seen
}

// ---------------------------------------------------------------------------------------
// weights 1:2:1 give 25/50/25 % +- 5 over 2,000 connections

fn weights(kind: Kind, tag: &str) {
    let lab = Lab::new(kind, tag);
    let mut services = Vec::new();
    for v6 in [false, true] {
        let b = lab.backends(v6);
        let list = vec![
            format!("{};weight=1", b[0]),
            format!("{};weight=2", b[1]),
            format!("{};weight=1", b[2]),
        ];
        services.push(service(lab.vip(v6, 80), "", &list));
    }
    let _daemon = lab.start(&services);
    let n = 2000;
    let sources: Vec<&str> = lab.clients4.iter().map(String::as_str).collect();
    let seen = spread(&lab, &sources, lab.vip(false, 80), n);
    for (i, want) in [(0, 25.0), (1, 50.0), (2, 25.0)] {
        let got = *seen.get(&lab.backends4[i]).unwrap_or(&0) as f64 * 100.0 / n as f64;
        eprintln!("{kind:?} weights: backend {i} got {got:.1} % (want {want} +- 5)");
        assert!(
            (got - want).abs() <= 5.0,
            "{kind:?}: backend {i} got {got:.1} % of {n} connections, want {want} +- 5: {seen:?}"
        );
    }
    // IPv6: the same service table; a smaller sample only shows every weighted backend is used
    let sources6: Vec<&str> = lab.clients6.iter().map(String::as_str).collect();
    let seen6 = spread(&lab, &sources6, lab.vip(true, 80), 200);
    assert!(
        seen6.get(&lab.backends6[1]).copied().unwrap_or(0)
            > seen6.get(&lab.backends6[0]).copied().unwrap_or(0),
        "{kind:?} IPv6: weight 2 got fewer than weight 1: {seen6:?}"
    );
}

#[test]
fn lb_weights_1_2_1() {
    lb_test("swl", weights);
}

#[test]
fn xdp_lb_weights_1_2_1() {
    weights(Kind::XdpLb, "swx");
}

// ---------------------------------------------------------------------------------------
// a TCP-only and a UDP-only service on the same VIP:PORT reach different backends

fn protocols(kind: Kind, tag: &str) {
    let lab = Lab::new(kind, tag);
    let mut services = Vec::new();
    for v6 in [false, true] {
        let b = lab.backends(v6);
        services.push(format!(
            "tcp:{}",
            service(lab.vip(v6, 53), "", &[b[0].to_string()])
        ));
        services.push(format!(
            "udp:{}",
            service(lab.vip(v6, 53), "", &[b[1].to_string()])
        ));
    }
    let _daemon = lab.start(&services);
    for v6 in [false, true] {
        let target = lab.vip(v6, 53);
        for k in 0..3 {
            let source = lab.client(v6, k);
            let tcp = lab
                .which(source, target)
                .unwrap_or_else(|err| panic!("TCP {target}: {err}"));
            assert_eq!(tcp, lab.backends(v6)[0], "{kind:?}: TCP {target} from {source}");
            let socket = lab.udp_from(source, target);
            let (greeting, from) = udp_request(&socket, None);
            assert_eq!(
                greeting.server,
                lab.backends(v6)[1],
                "{kind:?}: UDP {target} from {source}"
            );
            assert_eq!(from, target);
        }
    }
}

#[test]
fn lb_tcp_and_udp_services_on_one_vip_port() {
    lb_test("spl", protocols);
}

#[test]
fn xdp_lb_tcp_and_udp_services_on_one_vip_port() {
    protocols(Kind::XdpLb, "spx");
}

// ---------------------------------------------------------------------------------------
// no usable backend: RST (TCP) and ICMP / ICMPv6 port unreachable (UDP) in < 10 ms

const REFUSAL_LIMIT: Duration = Duration::from_millis(10);

/// The median of `times`, and all of them for the message.
fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn refusal(kind: Kind, tag: &str) {
    let lab = Lab::new(kind, tag);
    let mut services = Vec::new();
    for v6 in [false, true] {
        services.push(format!("{}=reject", lab.vip(v6, 80)));
        // every backend down: no usable backend either
        let down: Vec<String> = lab
            .backends(v6)
            .iter()
            .map(|b| format!("{b};state=down"))
            .collect();
        services.push(service(lab.vip(v6, 81), "", &down));
    }
    let _daemon = lab.start(&services);
    for v6 in [false, true] {
        for port in [80, 81] {
            let target = lab.vip(v6, port);
            let source = lab.client(v6, 0);
            let mut tcp_times = Vec::new();
            let mut udp_times = Vec::new();
            for round in 0..6 {
                let began = Instant::now();
                match lab.connect_from(source, target) {
                    Err(err) if err.kind() == ErrorKind::ConnectionRefused => {}
                    other => panic!("{kind:?}: TCP {target} round {round}: {other:?}, want refused"),
                }
                tcp_times.push(began.elapsed());

                let socket = lab.udp_from(source, target);
                let payload = vec![0x5au8; if round % 2 == 0 { 32 } else { 1400 }];
                let began = Instant::now();
                socket.send(&payload).unwrap();
                let mut buf = [0u8; 2048];
                match socket.recv(&mut buf) {
                    Err(err) if err.kind() == ErrorKind::ConnectionRefused => {}
                    other => panic!(
                        "{kind:?}: UDP {target} round {round} ({} bytes): {other:?}, want refused",
                        payload.len()
                    ),
                }
                udp_times.push(began.elapsed());
            }
            eprintln!("{kind:?} {target}: TCP refused in {tcp_times:?}, UDP in {udp_times:?}");
            // the first round may wait for ARP / neighbour discovery
            let (tcp, udp) = (median(tcp_times[1..].to_vec()), median(udp_times[1..].to_vec()));
            assert!(
                tcp < REFUSAL_LIMIT,
                "{kind:?}: TCP {target} refused after {tcp:?} (median)"
            );
            assert!(
                udp < REFUSAL_LIMIT,
                "{kind:?}: UDP {target} refused after {udp:?} (median)"
            );
        }
    }
    // counted, in this namespace's entry (status lists every namespace's)
    let status = lab.lb.ebpf_net(&["status", "--json"]);
    let text = String::from_utf8_lossy(&status.stdout);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    let refused = ["persisted", "runs"]
        .iter()
        .flat_map(|key| json[key].as_array().cloned().unwrap_or_default())
        .filter(|entry| entry["netns"] == lab.lb.name.as_str())
        .map(|entry| find_counter(&entry, "refused"))
        .max()
        .unwrap_or(0);
    // 2 families x 2 services x 6 rounds x (one SYN + one datagram)
    assert!(
        refused >= 48,
        "{kind:?}: refused counter {refused}, want every refusal counted: {text}"
    );
}

/// The largest value of a counter named `name` anywhere in a status document.
fn find_counter(json: &serde_json::Value, name: &str) -> u64 {
    match json {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(key, value)| {
                let own = if key == name {
                    value.as_u64().unwrap_or(0)
                } else {
                    0
                };
                own.max(find_counter(value, name))
            })
            .max()
            .unwrap_or(0),
        serde_json::Value::Array(items) => items.iter().map(|v| find_counter(v, name)).max().unwrap_or(0),
        _ => 0,
    }
}

#[test]
fn lb_refuses_without_usable_backend() {
    lb_test("srl", refusal);
}

#[test]
fn xdp_lb_refuses_without_usable_backend() {
    refusal(Kind::XdpLb, "srx");
}

// ---------------------------------------------------------------------------------------
// affinity: 1,000 connections from one client reach one backend, other clients spread;
// iperf3 (a control and a data connection) through a 3-backend service completes

fn affinity(kind: Kind, tag: &str) {
    let lab = Lab::new(kind, tag);
    let mut services = Vec::new();
    for v6 in [false, true] {
        services.push(service(
            lab.vip(v6, 80),
            ";affinity=client",
            &plain(lab.backends(v6)),
        ));
        services.push(service(
            lab.vip(v6, 5201),
            ";affinity=client",
            &lab.backends(v6)
                .iter()
                .map(|b| SocketAddr::new(b.ip(), 5201).to_string())
                .collect::<Vec<_>>(),
        ));
    }
    let _daemon = lab.start(&services);
    for v6 in [false, true] {
        let target = lab.vip(v6, 80);
        let n = if v6 { 200 } else { 1000 };
        let one = spread(&lab, &[lab.client(v6, 0)], target, n);
        assert_eq!(
            one.len(),
            1,
            "{kind:?}: {n} connections from one client to {target}: {one:?}"
        );
        let mut others = HashMap::new();
        for k in 1..=EXTRA_CLIENTS {
            let seen = spread(&lab, &[lab.client(v6, k)], target, 5);
            assert_eq!(seen.len(), 1, "{kind:?}: client {k} to {target}: {seen:?}");
            let backend = *seen.keys().next().unwrap();
            *others.entry(backend).or_insert(0) += 1;
        }
        eprintln!("{kind:?} {target}: one client {one:?}; {EXTRA_CLIENTS} others {others:?}");
        assert!(
            others.len() >= 2,
            "{kind:?}: {EXTRA_CLIENTS} clients all on one backend: {others:?}"
        );
    }
    // iperf3 through the 3-backend service: its control and data connections must meet
    let _iperf: Vec<IperfServer> = (0..3)
        .map(|i| IperfServer::start(&lab.backend_ns[i], &lab.backends4[i].ip().to_string(), 5201))
        .collect();
    for k in 0..4 {
        let source = lab.client(false, k);
        let output = Command::new("timeout")
            .args(["20", "ip", "netns", "exec", &lab.clients.name, "iperf3", "-c"])
            .arg(lab.vip4.to_string())
            .args(["-p", "5201", "-B", source, "-t", "1", "--connect-timeout", "3000"])
            .output()
            .expect("iperf3");
        assert!(
            output.status.success(),
            "{kind:?}: iperf3 from {source}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn lb_affinity_by_client_address() {
    lb_test("sal", affinity);
}

#[test]
fn xdp_lb_affinity_by_client_address() {
    affinity(Kind::XdpLb, "sax");
}

// ---------------------------------------------------------------------------------------
// a draining backend's open connection keeps working for 30 s; new connections avoid it

const DRAIN_FOR: Duration = Duration::from_secs(30);

fn draining(kind: Kind, tag: &str) {
    let lab = Lab::new(kind, tag);
    let target = lab.vip(false, 80);
    let all = plain(&lab.backends4);
    lab.persist(&[service(target, "", &all)]);
    let source = lab.client(false, 0);
    let stream = lab.connect_from(source, target).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let greeting: Greeting = line.parse().unwrap();
    let held = lab.backends4.iter().position(|b| *b == greeting.server).unwrap();
    // that backend drains
    let list: Vec<String> = lab
        .backends4
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if i == held {
                format!("{b};state=draining")
            } else {
                b.to_string()
            }
        })
        .collect();
    lab.persist(&[service(target, "", &list)]);
    let began = Instant::now();
    let mut writer = stream.try_clone().unwrap();
    let mut rounds = 0;
    let sources: Vec<&str> = lab.clients4.iter().map(String::as_str).collect();
    while began.elapsed() < DRAIN_FOR {
        let message = format!("still there {rounds}\n");
        writer
            .write_all(message.as_bytes())
            .unwrap_or_else(|err| panic!("{kind:?}: write after {:?}: {err}", began.elapsed()));
        let mut echoed = vec![0u8; message.len()];
        reader.read_exact(&mut echoed).unwrap_or_else(|err| {
            panic!(
                "{kind:?}: open connection to the draining backend broke after {:?}: {err}",
                began.elapsed()
            )
        });
        assert_eq!(echoed, message.as_bytes());
        let seen = spread(&lab, &sources, target, 6);
        assert!(
            !seen.contains_key(&lab.backends4[held]),
            "{kind:?}: a new connection reached the draining backend {}: {seen:?}",
            lab.backends4[held]
        );
        rounds += 1;
        std::thread::sleep(Duration::from_millis(700));
    }
    eprintln!(
        "{kind:?}: open connection to draining backend {held} worked for {:?} ({rounds} rounds)",
        began.elapsed()
    );
    drop(writer);
    drop(stream);
    let down = lab.lb.ebpf_net(&["down"]);
    assert!(down.status.success());
}

#[test]
fn lb_draining_backend_keeps_its_connection() {
    lb_test("sdl", draining);
}

#[test]
fn xdp_lb_draining_backend_keeps_its_connection() {
    draining(Kind::XdpLb, "sdx");
}

// ---------------------------------------------------------------------------------------
// health checks: a backend whose server dies gets no new connections within interval x fall,
// and gets them again once it is back (interval x rise)

const CHECK: &str = ";check=tcp;check-interval=0.5;check-timeout=0.4;check-fall=2;check-rise=2";
/// what the checker's own timing adds to interval x fall: a check in flight, the sync
const CHECK_SLACK: Duration = Duration::from_millis(300);

fn health(kind: Kind, tag: &str) {
    let mut lab = Lab::new(kind, tag);
    let target = lab.vip(false, 80);
    let services = vec![service(target, CHECK, &plain(&lab.backends4))];
    let daemon = lab.start(&services);
    let sources: Vec<String> = lab.clients4.clone();
    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    let seen = spread(&lab, &sources, target, 30);
    assert_eq!(
        seen.len(),
        3,
        "{kind:?}: every backend healthy at first: {seen:?}"
    );
    let victim = lab.backends4[1];
    lab.kill_servers(1);
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(1000) + CHECK_SLACK);
    let mut refused = 0;
    let mut reached = HashMap::new();
    for i in 0..60 {
        match lab.which(sources[i % sources.len()], target) {
            Ok(backend) => *reached.entry(backend).or_insert(0) += 1,
            Err(_) => refused += 1,
        }
    }
    eprintln!(
        "{kind:?}: {:?} after the kill: {reached:?}, {refused} failed",
        killed.elapsed()
    );
    assert!(
        refused == 0 && !reached.contains_key(&victim),
        "{kind:?}: {:?} after its server died, backend {victim} still got new connections ({refused} failed): {reached:?}\n{}",
        killed.elapsed(),
        daemon.stderr().join("\n")
    );
    lab.start_servers(1);
    std::thread::sleep(Duration::from_millis(1000) + CHECK_SLACK);
    let back = spread(&lab, &sources, target, 60);
    assert!(
        back.contains_key(&victim),
        "{kind:?}: backend {victim} back, but got no new connection: {back:?}\n{}",
        daemon.stderr().join("\n")
    );
}

#[test]
fn lb_health_check_takes_a_dead_backend_out_and_back() {
    lb_test("shl", health);
}

#[test]
fn xdp_lb_health_check_takes_a_dead_backend_out_and_back() {
    health(Kind::XdpLb, "shx");
}

// ---------------------------------------------------------------------------------------
// affinity across --persist re-runs (the same command again; another service changed), and
// affinity that expires: after its timeout a client may get another backend

/// The backend each client address (every v4 client) reaches with a new connection; two
/// connections each, which must agree (affinity holds within a run).
fn backend_per_client(lab: &Lab, target: SocketAddr) -> Vec<SocketAddr> {
    lab.clients4
        .iter()
        .map(|source| {
            let first = lab
                .which(source, target)
                .unwrap_or_else(|err| panic!("{source} to {target}: {err}"));
            let again = lab.which(source, target).unwrap();
            assert_eq!(first, again, "{:?}: {source} moved within its affinity", lab.kind);
            first
        })
        .collect()
}

fn distinct(backends: &[SocketAddr]) -> usize {
    let mut seen = backends.to_vec();
    seen.sort();
    seen.dedup();
    seen.len()
}

fn affinity_across_persist(kind: Kind, tag: &str) {
    let lab = Lab::new(kind, tag);
    let target = lab.vip(false, 80);
    let sticky = service(target, ";affinity=client", &plain(&lab.backends4));
    let other = |backends: &[SocketAddr]| service(lab.vip(false, 81), "", &plain(backends));
    lab.persist(&[sticky.clone(), other(&lab.backends4[..2])]);
    let first = backend_per_client(&lab, target);
    // 13 clients on one of 3 backends each: were they all on one, a client that lost its
    // backend could not be told from one that kept it
    assert!(
        distinct(&first) >= 2,
        "{kind:?}: every client on one backend: {first:?}"
    );
    lab.persist(&[sticky.clone(), other(&lab.backends4[..2])]);
    let rerun = backend_per_client(&lab, target);
    assert_eq!(
        rerun, first,
        "{kind:?}: clients moved after re-running the same --persist command"
    );
    lab.persist(&[sticky, other(&lab.backends4)]);
    let changed = backend_per_client(&lab, target);
    assert_eq!(
        changed, first,
        "{kind:?}: clients moved after a --persist re-run that changed another service"
    );
    let down = lab.lb.ebpf_net(&["down"]);
    assert!(down.status.success());
}

#[test]
fn lb_affinity_is_kept_across_persist_re_runs() {
    lb_test("sapl", affinity_across_persist);
}

#[test]
fn xdp_lb_affinity_is_kept_across_persist_re_runs() {
    affinity_across_persist(Kind::XdpLb, "sapx");
}

const AFFINITY_TIMEOUT: Duration = Duration::from_secs(2);

fn affinity_expiry(kind: Kind, tag: &str) {
    let lab = Lab::new(kind, tag);
    let target = lab.vip(false, 80);
    let services = vec![service(
        target,
        &format!(";affinity=client;affinity-timeout={}", AFFINITY_TIMEOUT.as_secs()),
        &plain(&lab.backends4),
    )];
    let daemon = lab.start(&services);
    let before = backend_per_client(&lab, target);
    // past the timeout each client's next connection is a new choice: one of 3 backends, so
    // of 13 clients some move (all staying: (1/3)^13 per try)
    let moved = moved_after_timeout(AFFINITY_TIMEOUT, before, || backend_per_client(&lab, target));
    assert!(
        moved > 0,
        "{kind:?}: no client of {} moved after {:?} without a connection (affinity-timeout {:?})\n{}",
        lab.clients4.len(),
        AFFINITY_TIMEOUT + Duration::from_millis(500),
        AFFINITY_TIMEOUT,
        daemon.stderr().join("\n")
    );
    eprintln!(
        "{kind:?}: {moved} of {} clients moved after the timeout",
        lab.clients4.len()
    );
}

#[test]
fn lb_affinity_expires_after_its_timeout() {
    lb_test("sael", affinity_expiry);
}

#[test]
fn xdp_lb_affinity_expires_after_its_timeout() {
    affinity_expiry(Kind::XdpLb, "saex");
}
