//! Non-linear skbs end to end: the tc datapaths (proxy, lb, ipv6-hp, monitor) see packets
//! whose headers are not in the linear area, and GSO super-packets whose payload is in page
//! fragments, and still translate and count them, with every checksum verified by its
//! receiver.
//!
//! Over veth, even with TSO, GSO and GRO on, the headers of every skb are linear (measured:
//! super-packets of up to 64 KiB, payload in frags, but eth + IP + TCP in the head). Headers
//! outside the linear area come from drivers that build page-only skbs (napi_gro_frags), as
//! many NICs do. A tap opened with IFF_NAPI | IFF_NAPI_FRAGS builds them that way: written as
//! an empty first iovec and the frame in page-sized pieces, the skb holds nothing but the
//! frame's pages, and with GRO off on the tap (GRO would pull the headers it parses) tc
//! ingress sees 14 linear bytes: the Ethernet header, IP and L4 header in a fragment. A node
//! forwarding such a packet with early demux off (as routers run) pulls the IP header only:
//! tc egress on the way out sees eth + IP linear, the L4 header in a fragment.
//!
//! ```text
//!  A  eth0 (tap) ==relay== eth0 (tap)  M  eth1 (veth: TSO, GSO, GRO) ---- eth0  B
//!  10.88.0.1 fd88::1     10.88.0.2 fd88::2   10.89.0.1 fd89::1     10.89.0.2 fd89::2
//! ```
//!
//! The relay is a thread of this test: it reads each frame from one tap and writes it to the
//! other as [empty, pages...]. Every link has MTU 9000, so a TCP segment or an 8000-byte UDP
//! datagram spans three pages.
//!
//! Checksums: the taps have no checksum offload, so what crosses the relay carries checksums
//! computed in software (a GSO super-packet of B's is segmented and checksummed as it leaves M
//! towards A, from the pseudo-header seed our programs adjusted) and arrives CHECKSUM_NONE:
//! A and M verify every checksum in software. Forwarded on by M to B, a packet stays
//! CHECKSUM_NONE and B verifies it, because GRO is off on M's tap: with GRO on, GRO would
//! validate the checksum on arrival and mark the skb CHECKSUM_UNNECESSARY, veth keeps that
//! mark, and a checksum a program broke after validation would reach B unverified.
//! `nstat` must show no checksum error in A, M or B; `paged_link_receivers_verify_checksums`
//! shows that one flipped byte is counted.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::kernel::{self, Feature};
use common::topology::{sh, Daemon, Netns};
use serde_json::Value;

const SIZE: usize = 4 << 20;
const DATAGRAM: usize = 8000;
const DATAGRAMS: usize = 20;
const LIMIT: Duration = Duration::from_secs(10);
const MTU: u32 = 9000;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NAPI: libc::c_short = 0x0010;
const IFF_NAPI_FRAGS: libc::c_short = 0x0020;
const IFF_NO_PI: libc::c_short = 0x1000;

/// A tap that builds page-only skbs, in `netns`; the device goes when the fd closes.
fn paged_tap(netns: &Netns, name: &str) -> OwnedFd {
    let fd = netns.enter(|| {
        // SAFETY: plain open(2) of a NUL-terminated path.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(raw >= 0, "open /dev/net/tun: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd we own.
        unsafe { OwnedFd::from_raw_fd(raw) }
    });
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_NAPI | IFF_NAPI_FRAGS,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    fd
}

/// Two paged taps and the thread that carries frames between them; stopped on drop.
struct PagedLink {
    stop: Arc<AtomicBool>,
    /// the checksum canary: flip a byte of the next UDP frame from the first tap (1) or from
    /// the second (2); 0 when none is due
    corrupt_udp: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

impl PagedLink {
    fn new(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Self {
        let fds = [paged_tap(a, a_if), paged_tap(b, b_if)];
        let stop = Arc::new(AtomicBool::new(false));
        let corrupt_udp = Arc::new(AtomicU32::new(0));
        let (stopping, corrupting) = (Arc::clone(&stop), Arc::clone(&corrupt_udp));
        let thread = std::thread::spawn(move || relay(&fds, &stopping, &corrupting));
        for (ns, dev) in [(a, a_if), (b, b_if)] {
            // GRO off: it would pull the headers into the linear area (and validate checksums)
            ns.exec(&format!(
                "ip link set {dev} mtu {MTU} up && ethtool -K {dev} gro off >/dev/null"
            ));
        }
        Self {
            stop,
            corrupt_udp,
            thread: Some(thread),
        }
    }
}

impl Drop for PagedLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Each frame read from one tap is written to the other as an empty first iovec (nothing
/// linear) and page-sized pieces (page fragments). Polls `stop` every 50 ms.
fn relay(fds: &[OwnedFd; 2], stop: &AtomicBool, corrupt_udp: &AtomicU32) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut polls = fds.each_ref().map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(polls.as_mut_ptr(), 2, 50) } <= 0 {
            continue;
        }
        for (i, poll) in polls.iter().enumerate() {
            if poll.revents & libc::POLLIN == 0 {
                continue;
            }
            // SAFETY: reading into our buffer.
            let n = unsafe { libc::read(poll.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            let frame = &mut buf[..n as usize];
            if is_udp(frame)
                && frame.len() > 200
                && corrupt_udp
                    .compare_exchange(i as u32 + 1, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                let last = frame.len() - 1;
                frame[last] ^= 0x40;
            }
            let mut iov = vec![libc::iovec {
                iov_base: frame.as_mut_ptr().cast(),
                iov_len: 0,
            }];
            iov.extend(frame.chunks_mut(4096).map(|chunk| libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            }));
            // SAFETY: iovecs into `buf`; a tap takes or drops a whole frame.
            unsafe { libc::writev(fds[1 - i].as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        }
    }
}

fn is_udp(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.get(23) == Some(&17),
        Some([0x86, 0xdd]) => frame.get(20) == Some(&17),
        _ => false,
    }
}

/// A (client or prober) and M joined by the paged link.
struct Pair {
    a: Netns,
    m: Netns,
    link: PagedLink,
}

impl Pair {
    fn new(tag: &str) -> Self {
        let a = Netns::new(&format!("{tag}-a"));
        let m = Netns::new(&format!("{tag}-m"));
        let link = PagedLink::new(&a, "eth0", &m, "eth0");
        Self { a, m, link }
    }
}

/// A -- M -- B; M forwards with early demux off, B routes through M.
struct Chain {
    pair: Pair,
    b: Netns,
}

impl Chain {
    fn new(tag: &str) -> Self {
        let pair = Pair::new(tag);
        let b = Netns::new(&format!("{tag}-b"));
        let (a, m) = (&pair.a, &pair.m);
        sh(&format!(
            "ip -n {} link add eth1 type veth peer name eth0 netns {}",
            m.name, b.name
        ));
        for ns in [m, &b] {
            let dev = if std::ptr::eq(ns, m) { "eth1" } else { "eth0" };
            // big segments both ways: TSO/GSO on send, GRO on receive
            ns.exec(&format!(
                "ip link set {dev} mtu {MTU} up && ethtool -K {dev} tx on tso on gso on gro on >/dev/null"
            ));
        }
        a.exec(
            "ip addr add 10.88.0.1/24 dev eth0 && ip addr add fd88::1/64 dev eth0 nodad && \
             ip route add default via 10.88.0.2 && ip -6 route add default via fd88::2",
        );
        m.exec(
            "ip addr add 10.88.0.2/24 dev eth0 && ip addr add fd88::2/64 dev eth0 nodad && \
             ip addr add 10.89.0.1/24 dev eth1 && ip addr add fd89::1/64 dev eth1 nodad && \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 net.ipv4.ip_early_demux=0",
        );
        b.exec(
            "ip addr add 10.89.0.2/24 dev eth0 && ip addr add fd89::2/64 dev eth0 nodad && \
             ip route add default via 10.89.0.1 && ip -6 route add default via fd89::1",
        );
        Self { pair, b }
    }

    fn namespaces(&self) -> [&Netns; 3] {
        [&self.pair.a, &self.pair.m, &self.b]
    }
}

/// The byte at offset `i` of every transfer: a receiver checks each one.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// Per connection: the server writes "PEER\n" (the client as it sees it), then reads a
/// 9-byte request, b'U' + length (it reads and checks that much and answers b"ok") or b'D' +
/// length (it sends that much and closes).
struct BulkServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BulkServer {
    fn start(netns: &Netns, bind: SocketAddr) -> Self {
        let listener = netns.enter(|| TcpListener::bind(bind).expect("binding bulk server"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        std::thread::spawn(move || {
                            let _ = serve_bulk(stream, peer);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BulkServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_bulk(mut stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(LIMIT))?;
    stream.set_write_timeout(Some(LIMIT))?;
    stream.write_all(format!("{}\n", peer.ip()).as_bytes())?;
    let mut request = [0u8; 9];
    stream.read_exact(&mut request)?;
    let len = u64::from_be_bytes(request[1..].try_into().unwrap()) as usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0;
    if request[0] == b'U' {
        let mut intact = true;
        while done < len {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            intact &= buf[..n].iter().enumerate().all(|(i, &b)| b == pattern(done + i));
            done += n;
        }
        stream.write_all(if done == len && intact { b"ok" } else { b"no" })?;
    } else {
        while done < len {
            let n = buf.len().min(len - done);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(done + i);
            }
            stream.write_all(&buf[..n])?;
            done += n;
        }
    }
    Ok(())
}

/// What one transfer showed: the client as the server saw it, the server as the client
/// sees it, the client's own address, and how long it took.
#[derive(Debug)]
struct Transfer {
    seen: IpAddr,
    peer: SocketAddr,
    local: SocketAddr,
    took: Duration,
}

/// Uploads (`up`) or downloads SIZE bytes to or from `target`, from `netns`, bound to
/// `source` when given; every byte is checked.
fn transfer(
    netns: &Netns,
    source: Option<SocketAddr>,
    target: SocketAddr,
    up: bool,
) -> Result<Transfer, String> {
    netns.enter(|| {
        let start = Instant::now();
        let domain = socket2::Domain::for_address(target);
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
        if let Some(source) = source {
            socket
                .bind(&source.into())
                .map_err(|err| format!("bind {source}: {err}"))?;
        }
        socket
            .connect_timeout(&target.into(), LIMIT)
            .map_err(|err| format!("connecting to {target}: {err}"))?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        stream.set_write_timeout(Some(LIMIT)).unwrap();
        let (peer, local) = (stream.peer_addr().unwrap(), stream.local_addr().unwrap());
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            stream
                .read_exact(&mut byte)
                .map_err(|err| format!("greeting: {err}"))?;
            line.push(byte[0]);
        }
        let seen: IpAddr = String::from_utf8_lossy(&line).trim().parse().unwrap();
        let mut request = vec![if up { b'U' } else { b'D' }];
        request.extend_from_slice(&(SIZE as u64).to_be_bytes());
        stream
            .write_all(&request)
            .map_err(|err| format!("request: {err}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut done = 0;
        let result = (|| -> std::io::Result<bool> {
            if up {
                while done < SIZE {
                    let n = buf.len().min(SIZE - done);
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        *b = pattern(done + i);
                    }
                    stream.write_all(&buf[..n])?;
                    done += n;
                }
                let mut answer = [0u8; 2];
                stream.read_exact(&mut answer)?;
                Ok(&answer == b"ok")
            } else {
                let mut intact = true;
                while done < SIZE {
                    let n = stream.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    intact &= buf[..n].iter().enumerate().all(|(i, &b)| b == pattern(done + i));
                    done += n;
                }
                Ok(intact)
            }
        })();
        let took = start.elapsed();
        match result {
            Ok(true) if done == SIZE => Ok(Transfer {
                seen,
                peer,
                local,
                took,
            }),
            Ok(intact) => Err(format!("{done} of {SIZE} bytes in {took:?}, intact: {intact}")),
            Err(err) => Err(format!("{err} after {done} of {SIZE} bytes in {took:?}")),
        }
    })
}

/// UDP: answers each datagram with "PEER\n" and the datagram itself.
struct UdpReflector {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpReflector {
    fn start(netns: &Netns, bind: SocketAddr) -> Self {
        let socket = netns.enter(|| UdpSocket::bind(bind).expect("binding UDP reflector"));
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stopping.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let mut answer = format!("{}\n", peer.ip()).into_bytes();
                    answer.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&answer, peer);
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpReflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends DATAGRAMS datagrams of DATAGRAM bytes to `target`, one at a time; returns how many
/// came back intact from `target`, and the client address the server saw.
fn udp_exchange(netns: &Netns, source: SocketAddr, target: SocketAddr) -> (usize, Option<IpAddr>) {
    let socket = netns.enter(|| UdpSocket::bind(source).expect("binding UDP client"));
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let (mut intact, mut seen) = (0, None);
    let mut buf = vec![0u8; 65536];
    for n in 0..DATAGRAMS {
        let datagram: Vec<u8> = (0..DATAGRAM).map(|i| pattern(i + n)).collect();
        socket.send_to(&datagram, target).unwrap();
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Some(split) = buf[..len].iter().position(|&b| b == b'\n') else {
            continue;
        };
        if from == target && buf[split + 1..len] == datagram[..] {
            intact += 1;
            seen = String::from_utf8_lossy(&buf[..split]).parse().ok();
        }
    }
    (intact, seen)
}

/// Every non-zero checksum-error counter of a namespace's kernel (IP, TCP, UDP, ICMP, v4 and v6).
fn checksum_errors(netns: &Netns) -> Vec<String> {
    netns
        .exec("nstat -az")
        .lines()
        .filter(|line| line.contains("CsumErrors"))
        .filter(|line| line.split_whitespace().nth(1) != Some("0"))
        .map(|line| {
            format!(
                "{}: {}",
                netns.name,
                line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
            )
        })
        .collect()
}

fn sock(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Uploads and downloads SIZE bytes through each target; asserts every transfer completed
/// and each server saw `seen` (by family) and each client talked to its target. Returns the
/// transfers, uploads first.
fn bulk_both_ways(
    name: &str,
    client: &Netns,
    source: impl Fn(bool) -> Option<SocketAddr>,
    targets: &[(SocketAddr, IpAddr)],
) -> Vec<Transfer> {
    let mut failures = Vec::new();
    let mut done = Vec::new();
    for &(target, seen) in targets {
        for up in [true, false] {
            let what = if up { "upload" } else { "download" };
            match transfer(client, source(target.is_ipv4()), target, up) {
                Ok(t) => {
                    eprintln!(
                        "{name}: 4 MiB {what} via {target} in {:?}, server saw {}",
                        t.took, t.seen
                    );
                    if t.seen != seen || t.peer != target {
                        failures.push(format!(
                            "{name}: {what} via {target}: {t:?}, expected the server to see {seen}"
                        ));
                    }
                    done.push(t);
                }
                Err(err) => failures.push(format!("{name}: {what} via {target}: {err}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    done
}

/// DATAGRAMS UDP round trips per target, each must come back whole from the target, the
/// server seeing `seen`.
fn udp_round_trips(
    name: &str,
    client: &Netns,
    source: impl Fn(bool) -> SocketAddr,
    targets: &[(SocketAddr, IpAddr)],
) {
    for &(target, seen) in targets {
        let (intact, saw) = udp_exchange(client, source(target.is_ipv4()), target);
        eprintln!("{name}: {intact}/{DATAGRAMS} UDP round trips of {DATAGRAM} bytes via {target}, server saw {saw:?}");
        assert_eq!(intact, DATAGRAMS, "{name}: UDP via {target}");
        assert_eq!(saw, Some(seen), "{name}: UDP via {target}");
    }
}

fn assert_no_checksum_errors(namespaces: &[&Netns]) {
    let errors: Vec<String> = namespaces.iter().flat_map(|ns| checksum_errors(ns)).collect();
    assert!(errors.is_empty(), "checksum errors: {errors:?}");
}

fn any(v4: bool) -> SocketAddr {
    sock(if v4 { "0.0.0.0:0" } else { "[::]:0" })
}

fn stop(daemon: Daemon) -> Vec<String> {
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log:?}");
    log
}

/// proxy on A's paged interface: every reply arrives with its headers in a page fragment
/// (ingress), every request leaves as a GSO super-packet checksummed after the rewrite.
#[test]
fn proxy_translates_paged_replies_and_gso_requests() {
    let chain = Chain::new("nl-px");
    let _servers: Vec<_> = ["10.89.0.2:8080", "[fd89::2]:8080"]
        .iter()
        .map(|bind| {
            (
                BulkServer::start(&chain.b, sock(bind)),
                UdpReflector::start(&chain.b, sock(bind)),
            )
        })
        .collect();
    let daemon = chain.pair.a.ebpf_net_daemon(&[
        "proxy",
        "-i",
        "eth0",
        "--map",
        "10.96.8.1:80=10.89.0.2:8080",
        "--map",
        "[fd96:8::1]:80=[fd89::2]:8080",
    ]);
    let targets = [
        (sock("10.96.8.1:80"), "10.88.0.1".parse().unwrap()),
        (sock("[fd96:8::1]:80"), "fd88::1".parse().unwrap()),
    ];
    bulk_both_ways("proxy", &chain.pair.a, |_| None, &targets);
    udp_round_trips("proxy", &chain.pair.a, any, &targets);
    let log = stop(daemon);
    eprintln!("proxy: {log:?}");
    assert_no_checksum_errors(&chain.namespaces());
}

/// lb on M's paged interface: every SYN and datagram to a VIP arrives with its headers in a
/// page fragment; conntrack translates the rest, B's GSO super-packets included.
#[test]
fn lb_balances_paged_syns_and_datagrams() {
    if !kernel::require(Feature::CtNat) {
        return;
    }
    let chain = Chain::new("nl-lb");
    let _servers: Vec<_> = ["10.89.0.2:8080", "[fd89::2]:8080"]
        .iter()
        .map(|bind| {
            (
                BulkServer::start(&chain.b, sock(bind)),
                UdpReflector::start(&chain.b, sock(bind)),
            )
        })
        .collect();
    let daemon = chain.pair.m.ebpf_net_daemon(&[
        "lb",
        "-i",
        "eth0",
        "--service",
        "10.96.9.1:80=10.89.0.2:8080",
        "--service",
        "[fd96:9::1]:80=[fd89::2]:8080",
    ]);
    // source NAT: the backend sees M's address towards it
    let targets = [
        (sock("10.96.9.1:80"), "10.89.0.1".parse().unwrap()),
        (sock("[fd96:9::1]:80"), "fd89::1".parse().unwrap()),
    ];
    bulk_both_ways("lb", &chain.pair.a, |_| None, &targets);
    udp_round_trips("lb", &chain.pair.a, any, &targets);
    let log = stop(daemon);
    eprintln!("lb: {log:?}");
    assert_no_checksum_errors(&chain.namespaces());
}

const LINK_LOCAL: &str = "fe80::1234:5678:9abc";
const GLOBAL: &str = "2603:1062:0:1:fe80:1234:5678:9abc";

/// ipv6-hp on M's paged interface, M the node serving the probe: every probe packet arrives
/// with its headers in a page fragment (ingress), every answer leaves as a GSO super-packet
/// (egress) checksummed in software after the rewrite; the prober verifies.
#[test]
fn ipv6_hp_translates_paged_probes() {
    let pair = Pair::new("nl-hp");
    pair.a.exec(&format!(
        "ip -6 addr add {LINK_LOCAL}/64 dev eth0 nodad && ip -6 route add fd88::/64 dev eth0"
    ));
    pair.m.exec(&format!(
        "ip -6 addr add fd88::2/64 dev eth0 nodad && ip -6 route add {GLOBAL}/128 via {LINK_LOCAL} dev eth0"
    ));
    let _tcp = BulkServer::start(&pair.m, sock("[fd88::2]:8080"));
    let _udp = UdpReflector::start(&pair.m, sock("[fd88::2]:8080"));
    let ifindex = pair
        .a
        .enter(|| ebpf_net::kernel::addr::Interface::by_name("eth0").unwrap().index);
    let probe: SocketAddr = SocketAddrV6::new(LINK_LOCAL.parse().unwrap(), 0, 0, ifindex).into();
    let daemon = pair.m.ebpf_net_daemon(&["ipv6-hp", "-i", "eth0"]);
    let targets = [(sock("[fd88::2]:8080"), GLOBAL.parse().unwrap())];
    bulk_both_ways("ipv6-hp", &pair.a, |_| Some(probe), &targets);
    udp_round_trips("ipv6-hp", &pair.a, |_| probe, &targets);
    let log = stop(daemon);
    eprintln!("ipv6-hp: {log:?}");
    assert_no_checksum_errors(&[&pair.a, &pair.m]);
    drop(pair.link);
}

/// monitor on M's paged interface while A and B move 4 MiB each way through M: uploads
/// arrive with their headers in page fragments (ingress), downloads leave as B's GSO
/// super-packets (egress). Each flow's bytes: at least the payload, at most 5% more.
#[test]
fn monitor_counts_paged_and_gso_flows() {
    let chain = Chain::new("nl-mon");
    let _servers: Vec<_> = ["10.89.0.2:8080", "[fd89::2]:8080"]
        .iter()
        .map(|bind| BulkServer::start(&chain.b, sock(bind)))
        .collect();
    let monitor = chain.pair.m.ebpf_net_daemon(&[
        "monitor",
        "-i",
        "eth0",
        "--json",
        "--interval",
        "0.5",
        "--count",
        "100",
    ]);
    let targets = [
        (sock("10.89.0.2:8080"), "10.88.0.1".parse().unwrap()),
        (sock("[fd89::2]:8080"), "fd88::1".parse().unwrap()),
    ];
    let transfers = bulk_both_ways("monitor", &chain.pair.a, |_| None, &targets);
    // a report printed after the last transfer
    let printed = monitor.stdout().len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while monitor.stdout().len() < printed + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = monitor.stdout().last().cloned().expect("a monitor report");
    stop(monitor);
    let report: Value = serde_json::from_str(&last).unwrap();
    let flows = report["flows"].as_array().unwrap();
    for (t, up) in transfers.iter().zip([true, false, true, false]) {
        let (direction, src, dst) = if up {
            ("ingress", t.local, t.peer)
        } else {
            ("egress", t.peer, t.local)
        };
        let flow = flows
            .iter()
            .find(|f| {
                f["direction"] == direction
                    && f["proto"] == "tcp"
                    && f["src"] == src.ip().to_string()
                    && f["sport"] == src.port()
                    && f["dst"] == dst.ip().to_string()
                    && f["dport"] == dst.port()
            })
            .unwrap_or_else(|| panic!("no {direction} flow {src} -> {dst} in {flows:?}"));
        let bytes = flow["bytes"].as_u64().unwrap();
        let packets = flow["packets"].as_u64().unwrap();
        eprintln!("monitor: {direction} {src} -> {dst}: {packets} packets, {bytes} bytes");
        assert!(
            (SIZE as u64..=SIZE as u64 * 105 / 100).contains(&bytes),
            "{direction} {src} -> {dst}: {bytes} bytes for {SIZE} of payload"
        );
    }
    assert_no_checksum_errors(&chain.namespaces());
}

/// The guard of the guard: a byte flipped on the paged link, in a datagram A sends to B
/// through M and in one B sends back, is counted by B and by A, so a checksum one of the
/// programs broke would be too.
#[test]
fn paged_link_receivers_verify_checksums() {
    let chain = Chain::new("nl-csum");
    let reflector = UdpReflector::start(&chain.b, sock("10.89.0.2:8080"));
    let socket = chain.pair.a.enter(|| UdpSocket::bind("10.88.0.1:0").unwrap());
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = vec![0u8; 65536];
    let datagram = vec![7u8; DATAGRAM];
    let counter = |ns: &Netns| -> u64 {
        ns.exec("nstat -az UdpInCsumErrors")
            .lines()
            .find(|line| line.starts_with("UdpInCsumErrors"))
            .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    // A -> B flipped on its way to M, which forwards it: B drops it
    chain.pair.link.corrupt_udp.store(1, Ordering::Relaxed);
    socket.send_to(&datagram, reflector.addr).unwrap();
    assert!(
        socket.recv_from(&mut buf).is_err(),
        "a flipped datagram was answered"
    );
    assert_eq!(counter(&chain.b), 1, "B did not count the flipped datagram");
    // B's answer (checksummed by M's tap in software) flipped on its way to A: A drops it
    chain.pair.link.corrupt_udp.store(2, Ordering::Relaxed);
    socket.send_to(&datagram, reflector.addr).unwrap();
    assert!(socket.recv_from(&mut buf).is_err(), "a flipped answer arrived");
    assert_eq!(counter(&chain.pair.a), 1, "A did not count the flipped answer");
    assert_eq!(counter(&chain.pair.m), 0, "M forwards without verifying");
    // and the link works
    socket.send_to(&datagram, reflector.addr).unwrap();
    assert!(
        socket.recv_from(&mut buf).is_ok(),
        "no answer to a whole datagram"
    );
}
