//! Path MTU through the translating datapaths: a 2 MiB upload and a 2 MiB download across a
//! hop of MTU 1200 between the load balancer (or the proxying client) and the backend, which
//! only complete when the router's "fragmentation needed" / "packet too big" reaches the
//! sender's socket about its own packet. Without translation the error names a flow the
//! sender does not know and the upload stalls.
//!
//! client --- r1 --- lb          client: 10.71.0.1  (proxy runs here)
//!            |                  lb: 10.71.1.2, VIPs 10.71.9.100 / fd71:9::100 (xdp-lb, lb)
//!            r1 ===== r2 --- backend 10.71.3.2 / fd71:3::2 (MTU 1500 on its own link)
//!
//! The r1 = r2 link has MTU 1280, the least IPv6 runs on, and IPv4 routes over it MTU 1200.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::kernel::{self, Feature};
use common::topology::{veth, Daemon, Netns};

const SIZE: usize = 2 << 20;
const LIMIT: Duration = Duration::from_secs(10);
const BACKEND4: &str = "10.71.3.2";
const BACKEND6: &str = "fd71:3::2";

/// Per connection, a 9-byte request: b'U' + length (the client uploads that much and gets
/// b"ok" back) or b'D' + length (the server sends that much and closes).
struct BulkServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BulkServer {
    fn start(netns: &Netns, binds: &[SocketAddr]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &bind in binds {
            let listener = netns.enter(|| TcpListener::bind(bind).expect("binding bulk server"));
            listener.set_nonblocking(true).unwrap();
            let stopping = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            std::thread::spawn(move || {
                                let _ = serve(stream);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        Self { stop, threads }
    }
}

impl Drop for BulkServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(LIMIT))?;
    stream.set_write_timeout(Some(LIMIT))?;
    let mut request = [0u8; 9];
    stream.read_exact(&mut request)?;
    let len = u64::from_be_bytes(request[1..].try_into().unwrap()) as usize;
    let mut buf = vec![0x5au8; 64 * 1024];
    let mut done = 0;
    match request[0] {
        b'U' => {
            while done < len {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            if done == len {
                stream.write_all(b"ok")?;
            }
        }
        _ => {
            while done < len {
                let n = buf.len().min(len - done);
                stream.write_all(&buf[..n])?;
                done += n;
            }
        }
    }
    Ok(())
}

/// Uploads (`up`) or downloads SIZE bytes through `target` from `client`; the time it took,
/// or an error naming how far it got within LIMIT.
fn transfer(client: &Netns, target: SocketAddr, up: bool) -> Result<Duration, String> {
    client.enter(|| transfer_here(target, up))
}

/// `transfer` from this thread's namespace.
fn transfer_here(target: SocketAddr, up: bool) -> Result<Duration, String> {
    let start = Instant::now();
    let mut stream =
        TcpStream::connect_timeout(&target, LIMIT).map_err(|err| format!("connecting to {target}: {err}"))?;
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.set_write_timeout(Some(LIMIT)).unwrap();
    let mut request = vec![if up { b'U' } else { b'D' }];
    request.extend_from_slice(&(SIZE as u64).to_be_bytes());
    stream
        .write_all(&request)
        .map_err(|err| format!("request: {err}"))?;
    let mut buf = vec![0xa5u8; 64 * 1024];
    let mut done = 0;
    let result = (|| -> std::io::Result<()> {
        if up {
            while done < SIZE && start.elapsed() < LIMIT {
                let n = buf.len().min(SIZE - done);
                stream.write_all(&buf[..n])?;
                done += n;
            }
            let mut ok = [0u8; 2];
            stream.read_exact(&mut ok)?;
        } else {
            while done < SIZE && start.elapsed() < LIMIT {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
        }
        Ok(())
    })();
    let took = start.elapsed();
    match result {
        Ok(()) if done == SIZE && took < LIMIT => Ok(took),
        Ok(()) => Err(format!("{done} of {SIZE} bytes in {took:?}")),
        Err(err) => Err(format!("{err} after {done} of {SIZE} bytes in {took:?}")),
    }
}

/// The five namespaces and their routes; a bulk server on the backend, ports 8080 and 8081.
struct Path {
    client: Netns,
    lb: Netns,
    _routers: [Netns; 2],
    _backend: Netns,
    _server: BulkServer,
}

impl Path {
    fn new(tag: &str) -> Self {
        let client = Netns::new(&format!("{tag}-c"));
        let lb = Netns::new(&format!("{tag}-lb"));
        let r1 = Netns::new(&format!("{tag}-r1"));
        let r2 = Netns::new(&format!("{tag}-r2"));
        let backend = Netns::new(&format!("{tag}-b"));
        veth(&client, "eth0", &r1, "c0");
        veth(&lb, "eth0", &r1, "l0");
        veth(&r1, "r0", &r2, "r0");
        veth(&r2, "b0", &backend, "eth0");
        client.exec(
            "ip addr add 10.71.0.1/24 dev eth0 && ip addr add fd71::1/64 dev eth0 nodad && \
             ip route add default via 10.71.0.254 && ip -6 route add default via fd71::fe",
        );
        lb.exec(
            "ip addr add 10.71.1.2/24 dev eth0 && ip addr add fd71:1::2/64 dev eth0 nodad && \
             ip addr add 10.71.9.100/32 dev eth0 && ip addr add fd71:9::100/128 dev eth0 nodad && \
             ip route add default via 10.71.1.254 && ip -6 route add default via fd71:1::fe",
        );
        r1.exec(
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && \
             ip addr add 10.71.0.254/24 dev c0 && ip addr add fd71::fe/64 dev c0 nodad && \
             ip addr add 10.71.1.254/24 dev l0 && ip addr add fd71:1::fe/64 dev l0 nodad && \
             ip link set r0 mtu 1280 && \
             ip addr add 10.71.2.1/24 dev r0 && ip addr add fd71:2::1/64 dev r0 nodad && \
             ip route add 10.71.9.0/24 via 10.71.1.2 && ip -6 route add fd71:9::/64 via fd71:1::2 && \
             ip route add 10.71.3.0/24 via 10.71.2.2 mtu lock 1200 && ip -6 route add fd71:3::/64 via fd71:2::2",
        );
        r2.exec(
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && \
             ip link set r0 mtu 1280 && \
             ip addr add 10.71.2.2/24 dev r0 && ip addr add fd71:2::2/64 dev r0 nodad && \
             ip addr add 10.71.3.254/24 dev b0 && ip addr add fd71:3::fe/64 dev b0 nodad && \
             ip route add default via 10.71.2.1 mtu lock 1200 && ip -6 route add default via fd71:2::1",
        );
        backend.exec(&format!(
            "ip addr add {BACKEND4}/24 dev eth0 && ip addr add {BACKEND6}/64 dev eth0 nodad && \
             ip route add default via 10.71.3.254 && ip -6 route add default via fd71:3::fe"
        ));
        let binds: Vec<SocketAddr> = [BACKEND4, BACKEND6]
            .iter()
            .flat_map(|ip| [8080, 8081].map(|port| SocketAddr::new(ip.parse().unwrap(), port)))
            .collect();
        let server = BulkServer::start(&backend, &binds);
        Self {
            client,
            lb,
            _routers: [r1, r2],
            _backend: backend,
            _server: server,
        }
    }

    /// Uploads to `upload` and downloads from `download` in both families; every transfer
    /// must finish within LIMIT. Returns the times, for the log.
    fn transfers(&self, name: &str, targets: [(SocketAddr, SocketAddr); 2]) {
        let mut failures = Vec::new();
        for (upload, download) in targets {
            for (what, target, up) in [("upload", upload, true), ("download", download, false)] {
                match transfer(&self.client, target, up) {
                    Ok(took) => eprintln!("{name}: 2 MiB {what} via {target} in {took:?}"),
                    Err(err) => failures.push(format!("{name}: {what} via {target}: {err}")),
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

fn sock(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

const SERVICES: [&str; 8] = [
    "--service",
    "10.71.9.100:80=10.71.3.2:8080",
    "--service",
    "10.71.9.100:81=10.71.3.2:8081",
    "--service",
    "[fd71:9::100]:80=[fd71:3::2]:8080",
    "--service",
    "[fd71:9::100]:81=[fd71:3::2]:8081",
];

const VIPS: [(&str, &str); 2] = [
    ("10.71.9.100:80", "10.71.9.100:81"),
    ("[fd71:9::100]:80", "[fd71:9::100]:81"),
];

fn vip_targets() -> [(SocketAddr, SocketAddr); 2] {
    VIPS.map(|(up, down)| (sock(up), sock(down)))
}

/// The counter line a foreground run prints when it stops.
fn exit_summary(daemon: Daemon) -> String {
    let (code, lines) = daemon.stop();
    assert_eq!(code, Some(0), "{lines:?}");
    lines.join("\n")
}

#[test]
fn xdp_lb_transfers_cross_a_smaller_mtu() {
    let path = Path::new("pmtu-x");
    let mut args = vec!["xdp-lb", "-i", "eth0"];
    args.extend(SERVICES);
    let daemon = path.lb.ebpf_net_daemon(&args);
    path.transfers("xdp-lb", vip_targets());
    let summary = exit_summary(daemon);
    let translated = summary
        .split("ICMP errors translated ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        translated.is_some_and(|n| n > 0),
        "no ICMP error counted: {summary}"
    );
}

#[test]
fn proxy_transfers_cross_a_smaller_mtu() {
    let path = Path::new("pmtu-p");
    let daemon = path.client.ebpf_net_daemon(&[
        "proxy",
        "-i",
        "eth0",
        "--map",
        "10.71.8.80:80=10.71.3.2:8080",
        "--map",
        "10.71.8.80:81=10.71.3.2:8081",
        "--map",
        "[fd71:8::80]:80=[fd71:3::2]:8080",
        "--map",
        "[fd71:8::80]:81=[fd71:3::2]:8081",
    ]);
    path.transfers(
        "proxy",
        [
            (sock("10.71.8.80:80"), sock("10.71.8.80:81")),
            (sock("[fd71:8::80]:80"), sock("[fd71:8::80]:81")),
        ],
    );
    let summary = exit_summary(daemon);
    assert!(
        summary
            .lines()
            .any(|line| line.contains(" ICMP errors translated") && !line.contains(", 0 ICMP errors")),
        "no ICMP error counted: {summary}"
    );
}

/// lb leaves ICMP errors to conntrack, which translates them (RELATED): a guard.
#[test]
fn lb_transfers_cross_a_smaller_mtu() {
    if !kernel::require(Feature::CtNat) {
        return;
    }
    let path = Path::new("pmtu-l");
    let mut args = vec!["lb", "-i", "eth0"];
    args.extend(SERVICES);
    let daemon = path.lb.ebpf_net_daemon(&args);
    path.transfers("lb", vip_targets());
    exit_summary(daemon);
}

/// Set for the helper process of the clusterip test: "up TARGET" or "down TARGET".
const HELPER_ENV: &str = "EBPF_NET_PMTU_TRANSFER";

/// The clusterip test's transfer, run as this binary again in the cgroup and the client's
/// namespace (moving the test process itself would also move the daemons other tests start
/// meanwhile into the cgroup, which is emptied with SIGKILL when dropped).
#[test]
#[ignore = "the helper process of clusterip_transfers_cross_a_smaller_mtu, not a test"]
fn transfer_helper() {
    let Ok(request) = std::env::var(HELPER_ENV) else {
        return;
    };
    let (direction, target) = request.split_once(' ').unwrap();
    match transfer_here(sock(target), direction == "up") {
        Ok(took) => println!("\n@ok {took:?}"),
        Err(err) => println!("\n@error {err}"),
    }
}

/// `transfer` from a process of `cgroup` in `client`'s namespace.
fn transfer_in_cgroup(
    cgroup: &common::cgroup::TestCgroup,
    client: &Netns,
    target: SocketAddr,
    up: bool,
) -> Result<String, String> {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} \"$0\" \"$@\"",
        cgroup.path_str(),
        client.name
    );
    // bounded: the transfer gives up after LIMIT, the command is killed after a minute
    let output = common::topology::output_within(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(std::env::current_exe().unwrap())
            .args([
                "transfer_helper",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, format!("{} {target}", if up { "up" } else { "down" })),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().find_map(|line| line.strip_prefix('@')) {
        Some(line) if line.starts_with("ok ") => Ok(line[3..].to_string()),
        Some(line) => Err(line.to_string()),
        None => Err(format!("no result from the transfer process: {stdout}")),
    }
}

/// clusterip translates at the socket: on the wire the client talks to the backend itself,
/// so the router's "fragmentation needed" / "packet too big" names a flow the client's
/// kernel knows and reaches the socket without any translation: a guard.
#[test]
fn clusterip_transfers_cross_a_smaller_mtu() {
    let path = Path::new("pmtu-ci");
    let cgroup = common::cgroup::TestCgroup::new("pmtu");
    let daemon = Daemon::start(&[
        "clusterip",
        "--cgroup",
        cgroup.path_str(),
        "--service",
        "10.71.7.70:80=10.71.3.2:8080",
        "--service",
        "10.71.7.70:81=10.71.3.2:8081",
        "--service",
        "[fd71:7::70]:80=[fd71:3::2]:8080",
        "--service",
        "[fd71:7::70]:81=[fd71:3::2]:8081",
    ]);
    let mut failures = Vec::new();
    for (upload, download) in [
        ("10.71.7.70:80", "10.71.7.70:81"),
        ("[fd71:7::70]:80", "[fd71:7::70]:81"),
    ] {
        for (what, target, up) in [("upload", upload, true), ("download", download, false)] {
            match transfer_in_cgroup(&cgroup, &path.client, sock(target), up) {
                Ok(took) => eprintln!("clusterip: 2 MiB {what} via {target} in {took}"),
                Err(err) => failures.push(format!("clusterip: {what} via {target}: {err}")),
            }
        }
    }
    exit_summary(daemon);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
