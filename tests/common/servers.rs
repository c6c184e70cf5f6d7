//! Echo servers that tell the client which peer address they saw and which address they
//! answer on; stopped and joined on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::topology::Netns;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How long a TCP echo server waits for a connection's next bytes before it closes it: a
/// bound that only ends connections a test leaked, so scaled like every such bound (in an
/// emulated VM a `--persist` re-run between two messages took over 10 s, and the server's
/// close, not the datapath, broke the tests' long connections).
fn idle_timeout() -> Duration {
    super::kernel::scaled(TIMEOUT)
}

/// A server thread that polls `stop`; raised and joined on drop.
struct ServerThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    fn spawn(serve: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        Self {
            stop,
            thread: Some(std::thread::spawn(move || serve(stopping))),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// TCP: on accept writes "<peer> <own address>\n", then echoes everything until the client
/// shuts down (or is silent for [`idle_timeout`]).
pub struct TcpEchoServer {
    pub addr: SocketAddr,
    _thread: ServerThread,
}

impl TcpEchoServer {
    pub fn start(netns: &Netns, bind: SocketAddr) -> Self {
        let listener = netns.enter(|| TcpListener::bind(bind).expect("binding TCP echo server"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = ServerThread::spawn(move |stopping| {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        std::thread::spawn(move || {
                            let _ = serve_tcp(stream, peer);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            addr,
            _thread: thread,
        }
    }
}

fn serve_tcp(mut stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(idle_timeout()))?;
    let own = stream.local_addr()?;
    stream.write_all(format!("{peer} {own}\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// What an echo server said about a request: the peer it saw and the address it answered on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub seen: SocketAddr,
    pub server: SocketAddr,
}

impl std::str::FromStr for Greeting {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (seen, server) = text.trim().split_once(' ').ok_or(format!("greeting '{text}'"))?;
        Ok(Self {
            seen: seen.parse().map_err(|_| format!("peer in '{text}'"))?,
            server: server.parse().map_err(|_| format!("server in '{text}'"))?,
        })
    }
}

/// Reads the greeting of a connected stream, sends `data` and checks it comes back.
pub fn tcp_talk(stream: &TcpStream, data: &[u8]) -> Greeting {
    let greeting = read_greeting(stream);
    echo_to_the_end(stream, data);
    greeting
}

/// The greeting an echo server writes first on a connected stream.
pub fn read_greeting(stream: &TcpStream) -> Greeting {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    // byte by byte: nothing after the line is read here
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        (&*stream).read_exact(&mut byte).expect("server greeting");
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap().parse().expect("greeting format")
}

/// Echoes `chunk` over a stream whose greeting was read, a round at a time, until `done`
/// says so after a round or `within` has passed; returns whether `done` said so.
pub fn echo_until(
    stream: &TcpStream,
    chunk: &[u8],
    within: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let began = Instant::now();
    let mut back = vec![0u8; chunk.len()];
    while began.elapsed() < within {
        // a chunk the socket buffers hold both ways: written whole, then read back
        (&*stream).write_all(chunk).expect("echo round");
        (&*stream).read_exact(&mut back).expect("echo round back");
        assert!(back == chunk, "an echo round came back changed");
        if done() {
            return true;
        }
    }
    false
}

/// Sends `data` on a stream whose greeting was read, shuts its writing down and checks the
/// echo comes back whole before the server's end.
pub fn echo_to_the_end(stream: &TcpStream, data: &[u8]) {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let to_send = data.to_vec();
    let sender = std::thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::with_capacity(data.len());
    (&*stream).read_to_end(&mut echoed).expect("echo");
    sender.join().unwrap();
    assert!(
        echoed.len() == data.len() && echoed == data,
        "echo of {} bytes came back as {}",
        data.len(),
        echoed.len()
    );
}

/// A TCP exchange: connects, reads the peer the server saw, sends `data`, reads it back.
/// Returns (peer the server saw, the client's own address, the peer the client sees).
pub fn tcp_echo(netns: &Netns, target: SocketAddr, data: &[u8]) -> (SocketAddr, SocketAddr, SocketAddr) {
    let stream = netns.enter(|| TcpStream::connect_timeout(&target, TIMEOUT).expect("TCP connect"));
    let (local, peer) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
    (tcp_talk(&stream, data).seen, local, peer)
}

/// UDP: answers each datagram with "<peer> <own address>|<datagram>".
pub struct UdpEchoServer {
    pub addr: SocketAddr,
    _thread: ServerThread,
}

impl UdpEchoServer {
    pub fn start(netns: &Netns, bind: SocketAddr) -> Self {
        let socket = netns.enter(|| UdpSocket::bind(bind).expect("binding UDP echo server"));
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = socket.local_addr().unwrap();
        let thread = ServerThread::spawn(move |stopping| {
            let mut buf = [0u8; 2048];
            while !stopping.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let mut reply = format!("{peer} {addr}|").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        Self {
            addr,
            _thread: thread,
        }
    }
}

/// One UDP request/response on `socket`, to `target` or, connected, to its peer; retried
/// while the first packets may wait for ARP/ND. Returns the greeting and where the reply
/// came from as recvfrom() reports it.
pub fn udp_request(socket: &UdpSocket, target: Option<SocketAddr>) -> (Greeting, SocketAddr) {
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = [0u8; 2048];
    loop {
        match target {
            Some(target) => socket.send_to(b"hello", target).unwrap(),
            None => socket.send(b"hello").unwrap(),
        };
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (greeting, payload) = text.split_once('|').expect("reply format");
                assert_eq!(payload, "hello");
                return (greeting.parse().expect("greeting format"), from);
            }
            Err(_) if Instant::now() < deadline => continue,
            Err(err) => panic!("no UDP reply from {target:?}: {err}"),
        }
    }
}

/// An unbound UDP socket of `target`'s family, on all addresses.
pub fn udp_socket_for(target: SocketAddr) -> UdpSocket {
    let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    UdpSocket::bind(any).unwrap()
}

/// A UDP request/response from an unconnected socket. Returns (peer the server saw, where the
/// reply came from, the client's own address).
pub fn udp_echo(netns: &Netns, target: SocketAddr) -> (SocketAddr, SocketAddr, SocketAddr) {
    let socket = netns.enter(|| udp_socket_for(target));
    let (greeting, from) = udp_request(&socket, Some(target));
    (greeting.seen, from, socket.local_addr().unwrap())
}

/// Accepts and closes at once until dropped, for connection-rate benchmarks. The accept
/// queue is deep (also raise net.core.somaxconn in its namespace): an overflow drops a SYN
/// and costs a 1 s retransmit, which would swamp any rate.
pub struct AcceptServer {
    pub addr: SocketAddr,
    _thread: ServerThread,
}

impl AcceptServer {
    pub fn start(netns: &Netns, bind: SocketAddr) -> Self {
        let listener: TcpListener = netns.enter(|| {
            let domain = if bind.is_ipv4() {
                socket2::Domain::IPV4
            } else {
                socket2::Domain::IPV6
            };
            let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
            socket.set_reuse_address(true).unwrap();
            socket.bind(&bind.into()).unwrap();
            socket.listen(4096).unwrap();
            socket.into()
        });
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = ServerThread::spawn(move |stopping| {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => drop(stream),
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        Self {
            addr,
            _thread: thread,
        }
    }
}

/// Three backend namespaces behind `router`, each on a veth `b{i}` of its own: the router
/// has 10.2{i}.0.1 and fd2{i}::1 there, the backend 10.2{i}.0.2 and fd2{i}::2 with its
/// default routes back through the router, and TCP and UDP echo servers on port 8080.
/// Everything goes on drop.
pub struct EchoBackends {
    pub v4: Vec<SocketAddr>,
    pub v6: Vec<SocketAddr>,
    _servers: Vec<(TcpEchoServer, UdpEchoServer)>,
    /// The backends' namespaces, in the order of `v4` and `v6`.
    pub namespaces: Vec<Netns>,
}

impl EchoBackends {
    pub fn start(router: &Netns, tag: &str) -> Self {
        let (mut v4, mut v6, mut servers, mut namespaces) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..3 {
            let backend = Netns::new(&format!("{tag}-b{i}"));
            super::topology::veth(router, &format!("b{i}"), &backend, "eth0");
            router.exec(&format!(
                "ip addr add 10.2{i}.0.1/24 dev b{i} && ip addr add fd2{i}::1/64 dev b{i} nodad"
            ));
            backend.exec(&format!(
                "ip addr add 10.2{i}.0.2/24 dev eth0 && ip addr add fd2{i}::2/64 dev eth0 nodad && \
                 ip route add default via 10.2{i}.0.1 && ip route add default via fd2{i}::1"
            ));
            for bind in [format!("10.2{i}.0.2:8080"), format!("[fd2{i}::2]:8080")] {
                let bind: SocketAddr = bind.parse().unwrap();
                servers.push((
                    TcpEchoServer::start(&backend, bind),
                    UdpEchoServer::start(&backend, bind),
                ));
                if bind.is_ipv4() { &mut v4 } else { &mut v6 }.push(bind);
            }
            namespaces.push(backend);
        }
        Self {
            v4,
            v6,
            _servers: servers,
            namespaces,
        }
    }
}

/// One request to `addr` (from the calling thread's namespace), the whole answer, within
/// `timeout`.
pub fn http(addr: &str, request: &[u8], timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr.parse().unwrap(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}
