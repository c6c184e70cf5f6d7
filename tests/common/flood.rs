//! Floods for the flood tests and the "Under attack" benchmark, bounded in count and time: a
//! spoofed-SYN flood through AF_PACKET (random sources in a test subnet), established
//! connections that keep talking through it, and new connections tried while it runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::topology::Netns;

/// The MAC of `iface` in `netns`.
pub fn mac_of(netns: &Netns, iface: &str) -> [u8; 6] {
    let text = netns.exec(&format!("cat /sys/class/net/{iface}/address"));
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN frame from `src` to `dst`, with correct checksums.
pub fn syn_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(54);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let ip_check = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.ip().octets());
    pseudo[4..8].copy_from_slice(&dst.ip().octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let tcp_check = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&tcp_check.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp);
    frame
}

/// Frames a flood hands the kernel in one system call.
const FLOOD_BATCH: usize = 32;

/// What a flood sent.
#[derive(Debug, Clone, Copy)]
pub struct FloodReport {
    pub sent: u64,
    pub elapsed: Duration,
}

/// Sends up to `count` SYNs to `vip` out of `iface` of `netns` (to `dst_mac`), from random
/// addresses of `subnet`/16 and random ports, as fast as it can, and stops at `limit`
/// whatever it sent.
pub fn syn_flood(
    netns: &Netns,
    iface: &str,
    dst_mac: [u8; 6],
    vip: SocketAddrV4,
    subnet: [u8; 2],
    count: u64,
    limit: Duration,
) -> FloodReport {
    syn_flood_paced(netns, iface, dst_mac, vip, subnet, count, limit, None)
}

/// As `syn_flood`, spread evenly over `spread` when given (a flood slower than a detector's
/// rate); it still stops at `limit`.
#[allow(clippy::too_many_arguments)]
pub fn syn_flood_paced(
    netns: &Netns,
    iface: &str,
    dst_mac: [u8; 6],
    vip: SocketAddrV4,
    subnet: [u8; 2],
    count: u64,
    limit: Duration,
    spread: Option<Duration>,
) -> FloodReport {
    let src_mac = mac_of(netns, iface);
    netns.enter(|| {
        // SAFETY: plain socket calls on a descriptor we own; the buffers outlive each call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor, owned from here on.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let index = std::ffi::CString::new(iface).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(index.as_ptr()) };
        assert!(ifindex > 0, "no {iface}");
        let one: libc::c_int = 1;
        // SAFETY: an int option.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        // SAFETY: zeroed sockaddr_ll filled with the interface.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst_mac);
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
        let start = Instant::now();
        let mut sent = 0;
        // in batches of sendmmsg: a system call a frame holds the flood to a third of the
        // rate on hosts whose kernel pays for every return (AMD with SRSO's safe RET)
        let mut frames: Vec<Vec<u8>> = Vec::with_capacity(FLOOD_BATCH);
        while sent < count && start.elapsed() < limit {
            let mut room = (count - sent).min(FLOOD_BATCH as u64);
            if let Some(spread) = spread {
                let due = (count as f64 * start.elapsed().as_secs_f64() / spread.as_secs_f64()) as u64;
                if sent > due + 200 {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                room = room.min(due + 201 - sent);
            }
            frames.clear();
            for _ in 0..room {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let src = SocketAddrV4::new(
                    Ipv4Addr::new(subnet[0], subnet[1], (rng >> 8) as u8, (rng >> 16) as u8 | 1),
                    1024 + (rng >> 24) as u16 % 60000,
                );
                frames.push(syn_frame(src_mac, dst_mac, src, vip, (rng >> 32) as u32));
            }
            let mut iovecs: Vec<libc::iovec> = frames
                .iter_mut()
                .map(|frame| libc::iovec {
                    iov_base: frame.as_mut_ptr().cast(),
                    iov_len: frame.len(),
                })
                .collect();
            let mut messages: Vec<libc::mmsghdr> = iovecs
                .iter_mut()
                .map(|iov| {
                    // SAFETY: a zeroed msghdr is a valid empty one; filled in below.
                    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
                    header.msg_name = (&mut addr as *mut libc::sockaddr_ll).cast();
                    header.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    header.msg_iov = iov;
                    header.msg_iovlen = 1;
                    libc::mmsghdr {
                        msg_hdr: header,
                        msg_len: 0,
                    }
                })
                .collect();
            // SAFETY: the headers point at the frames, iovecs and address, which live across
            // the call.
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    messages.as_mut_ptr(),
                    messages.len() as u32,
                    0,
                )
            };
            if n > 0 {
                sent += n as u64;
            }
        }
        FloodReport {
            sent,
            elapsed: start.elapsed(),
        }
    })
}

/// Established connections through a service that exchange a message every 50 ms until
/// stopped; each reports how many exchanges it made or how it broke.
pub struct Chatters {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<u64, String>>>,
}

impl Chatters {
    pub fn start(netns: &Netns, target: SocketAddr, connections: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..connections)
            .map(|i| {
                let stream = netns
                    .enter(|| TcpStream::connect_timeout(&target, Duration::from_secs(5)))
                    .unwrap_or_else(|err| panic!("connection {i} to {target}: {err}"));
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || chat(stream, &stop))
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops them: exchanges made per connection, or what broke it.
    pub fn finish(self) -> Vec<Result<u64, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    }
}

fn chat(stream: TcpStream, stop: &AtomicBool) -> Result<u64, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut greeting = String::new();
    reader
        .read_line(&mut greeting)
        .map_err(|e| format!("greeting: {e}"))?;
    let mut writer = stream;
    let mut exchanges = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let message = format!("exchange {exchanges:08}\n");
        writer
            .write_all(message.as_bytes())
            .map_err(|e| format!("after {exchanges} exchanges, write: {e}"))?;
        let mut echo = vec![0u8; message.len()];
        reader
            .read_exact(&mut echo)
            .map_err(|e| format!("after {exchanges} exchanges, read: {e}"))?;
        if echo != message.as_bytes() {
            return Err(format!("after {exchanges} exchanges: wrong echo"));
        }
        exchanges += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(exchanges)
}

/// One new connection through `target` from `netns`: connect, read the greeting, get an echo,
/// all within `timeout` each.
pub fn try_connection(netns: &Netns, target: SocketAddr, timeout: Duration) -> bool {
    netns
        .enter(|| -> std::io::Result<()> {
            let stream = TcpStream::connect_timeout(&target, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut greeting = String::new();
            reader.read_line(&mut greeting)?;
            (&stream).write_all(b"hello\n")?;
            let mut echo = [0u8; 6];
            reader.read_exact(&mut echo)?;
            Ok(())
        })
        .is_ok()
}

/// New connections tried one after another every `spacing` for `window`, each given
/// `timeout` to connect and echo: (succeeded, tried).
pub fn new_connections(
    netns: &Netns,
    target: SocketAddr,
    window: Duration,
    spacing: Duration,
    timeout: Duration,
) -> (usize, usize) {
    let start = Instant::now();
    let (mut ok, mut tried) = (0, 0);
    while start.elapsed() < window {
        let began = Instant::now();
        tried += 1;
        if try_connection(netns, target, timeout) {
            ok += 1;
        }
        if let Some(rest) = spacing.checked_sub(began.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    (ok, tried)
}

/// New connections started every `spacing` while `running` holds (at most `max` of them),
/// each in a thread of its own with `timeout`: (succeeded, tried) once all are done.
pub fn new_connections_while(
    netns: &Netns,
    target: SocketAddr,
    running: &AtomicBool,
    spacing: Duration,
    timeout: Duration,
    max: usize,
) -> (usize, usize) {
    std::thread::scope(|scope| {
        let mut attempts = Vec::new();
        while running.load(Ordering::Relaxed) && attempts.len() < max {
            attempts.push(scope.spawn(|| try_connection(netns, target, timeout)));
            std::thread::sleep(spacing);
        }
        let tried = attempts.len();
        let ok = attempts
            .into_iter()
            .map(|attempt| attempt.join().unwrap_or(false))
            .filter(|ok| *ok)
            .count();
        (ok, tried)
    })
}
