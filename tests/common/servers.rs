//! Echo servers that tell the client which peer address they saw; stopped and joined on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::topology::Netns;

pub const TIMEOUT: Duration = Duration::from_secs(10);

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

/// TCP: on accept writes "<peer>\n", then echoes everything until the client shuts down.
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
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(format!("{peer}\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// A TCP exchange: connects, reads the peer the server saw, sends `data`, reads it back.
/// Returns (peer the server saw, the client's own address, the peer the client sees).
pub fn tcp_echo(netns: &Netns, target: SocketAddr, data: &[u8]) -> (SocketAddr, SocketAddr, SocketAddr) {
    let stream = netns.enter(|| TcpStream::connect_timeout(&target, TIMEOUT).expect("TCP connect"));
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (local, peer) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).expect("server greeting");
    let seen: SocketAddr = line.trim().parse().expect("peer address");
    let mut writer = stream.try_clone().unwrap();
    let to_send = data.to_vec();
    let sender = std::thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::with_capacity(data.len());
    reader.read_to_end(&mut echoed).expect("echo");
    sender.join().unwrap();
    assert!(
        echoed.len() == data.len() && echoed == data,
        "echo of {} bytes came back as {}",
        data.len(),
        echoed.len()
    );
    (seen, local, peer)
}

/// UDP: answers each datagram with "<peer>|<datagram>".
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
                    let mut reply = format!("{peer}|").into_bytes();
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

/// A UDP request/response from an unconnected socket. Returns (peer the server saw, where the
/// reply came from, the client's own address).
pub fn udp_echo(netns: &Netns, target: SocketAddr) -> (SocketAddr, SocketAddr, SocketAddr) {
    let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    let socket = netns.enter(|| UdpSocket::bind(any).unwrap());
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = [0u8; 2048];
    loop {
        socket.send_to(b"hello", target).unwrap();
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (seen, payload) = text.split_once('|').expect("reply format");
                assert_eq!(payload, "hello");
                let local = socket.local_addr().unwrap();
                return (seen.parse().unwrap(), from, local);
            }
            Err(_) if Instant::now() < deadline => continue, // first packet may wait for ARP/ND
            Err(err) => panic!("no UDP reply from {target}: {err}"),
        }
    }
}
