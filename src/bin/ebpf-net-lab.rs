//! `ebpf-net-lab`: the small servers and clients of the lab (`scripts/lab`).
//!
//! `serve` runs, on one name, an HTTP-like server, a TCP echo server and a UDP echo server,
//! each dual-stack. Every answer says who answered and whom it saw:
//! `backend NAME at LOCAL saw you as PEER`. The client commands (`http`, `tcp`, `udp`) send
//! requests, check the answers, print one line per request (or with `--quiet` only the
//! tally) and exit non-zero when a request fails, so scripts can rely on them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

/// Servers and clients for trying ebpf-net on the lab topology of `scripts/lab`.
#[derive(Parser, Debug)]
#[command(name = "ebpf-net-lab", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// HTTP-like, TCP echo and UDP echo servers on every address (IPv4 and IPv6)
    Serve {
        /// the name every answer carries
        #[arg(long)]
        name: String,
        /// port of the HTTP-like server
        #[arg(long, default_value_t = 80)]
        http: u16,
        /// port of the TCP and UDP echo servers
        #[arg(long, default_value_t = 7)]
        echo: u16,
        /// answer UDP on these addresses, one socket each, so every answer leaves from the
        /// address asked (default: one socket on every address)
        #[arg(long = "addr", value_name = "IP")]
        addrs: Vec<IpAddr>,
    },
    /// GET / from an HTTP-like server, COUNT times
    Http(Request),
    /// talk to a TCP echo server: read its greeting, check the echo
    Tcp(Request),
    /// send a datagram to a UDP echo server and check the answer
    Udp(Request),
    /// keep one TCP echo connection and one UDP socket busy for a while: a message on each
    /// every interval, every echo checked; fails on any loss, reset or change of backend
    Stream {
        /// TCP echo server ADDR:PORT
        tcp: SocketAddr,
        /// UDP echo server ADDR:PORT [default: the TCP one]
        #[arg(long)]
        udp: Option<SocketAddr>,
        /// how long
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// milliseconds between messages
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
}

#[derive(clap::Args, Debug)]
struct Request {
    /// ADDR:PORT (IPv6 in brackets: [fd77::100]:80)
    target: SocketAddr,
    /// how many requests, each on a new connection (new source port)
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// print only the tally of answering backends
    #[arg(long)]
    quiet: bool,
    /// seconds to wait for each answer
    #[arg(long, default_value_t = 3.0)]
    timeout: f64,
    /// bytes of each message the echo servers send back (tcp, udp)
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1400))]
    size: u16,
}

/// One answer: which backend, where it listened, whom it saw; and what this end saw.
struct Answer {
    backend: String,
    server: String,
    seen_as: String,
    local: SocketAddr,
    peer: SocketAddr,
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn describe(name: &str, local: SocketAddr, peer: SocketAddr) -> String {
    format!(
        "backend {name} at {} saw you as {}",
        canonical(local),
        canonical(peer)
    )
}

/// Parses `backend NAME at LOCAL saw you as PEER` out of an answer.
fn parse_answer(text: &str, local: SocketAddr, peer: SocketAddr) -> Result<Answer> {
    let line = text
        .lines()
        .find(|line| line.starts_with("backend "))
        .ok_or_else(|| anyhow!("no 'backend ...' line in the answer {text:?}"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["backend", name, "at", server, "saw", "you", "as", seen] => Ok(Answer {
            backend: name.to_string(),
            server: server.to_string(),
            seen_as: seen.to_string(),
            local: canonical(local),
            peer: canonical(peer),
        }),
        _ => bail!("malformed answer line {line:?}"),
    }
}

fn serve(name: String, http_port: u16, echo_port: u16, addrs: Vec<IpAddr>) -> Result<()> {
    let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    // `[::]` takes IPv4 too (bindv6only is 0 by default); peers show up v4-mapped
    let http =
        TcpListener::bind((any, http_port)).with_context(|| format!("binding TCP port {http_port}"))?;
    let tcp = TcpListener::bind((any, echo_port)).with_context(|| format!("binding TCP port {echo_port}"))?;
    let udp_addrs = if addrs.is_empty() { vec![any] } else { addrs };
    let mut threads = vec![
        spawn_accept(http, name.clone(), serve_http),
        spawn_accept(tcp, name.clone(), serve_tcp_echo),
    ];
    for addr in udp_addrs {
        let udp = UdpSocket::bind((addr, echo_port))
            .with_context(|| format!("binding UDP {}", SocketAddr::new(addr, echo_port)))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || serve_udp_echo(&udp, &name)));
    }
    eprintln!("ebpf-net-lab: {name} serving HTTP on port {http_port}, echo on TCP and UDP port {echo_port}");
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn spawn_accept(
    listener: TcpListener,
    name: String,
    handle: fn(TcpStream, &str) -> std::io::Result<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = handle(stream, &name);
            });
        }
    })
}

/// Reads a request head (up to the empty line), answers 200 with who answered, closes.
fn serve_http(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 && line.len() < 8192 {
        if line.ends_with("\r\n\r\n") || line.ends_with("\n\n") {
            break;
        }
    }
    let body = format!("{}\n", describe(name, stream.local_addr()?, stream.peer_addr()?));
    // one write: one segment, as a real server's buffered response
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nX-Backend: {name}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    (&stream).write_all(response.as_bytes())
}

/// Greets with who answered, then echoes every byte back until the client closes.
fn serve_tcp_echo(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    let greeting = describe(name, stream.local_addr()?, stream.peer_addr()?);
    stream.write_all(format!("{greeting}\n").as_bytes())?;
    let mut buf = [0u8; 16384];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// Answers each datagram with who answered, then the datagram itself.
fn serve_udp_echo(socket: &UdpSocket, name: &str) {
    let mut buf = [0u8; 65536];
    let local = socket.local_addr().expect("bound socket");
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let mut answer = format!("{}\n", describe(name, local, peer)).into_bytes();
        answer.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&answer, peer);
    }
}

fn http_request(target: SocketAddr, timeout: Duration, _size: u16) -> Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    let request = format!("GET / HTTP/1.0\r\nHost: {target}\r\nUser-Agent: ebpf-net-lab\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.0 200 ") {
        bail!("unexpected response {response:?}");
    }
    parse_answer(&response, local, peer)
}

/// A message of `size` bytes ending in a newline (tcp) or not (udp).
fn message(size: u16) -> Vec<u8> {
    let mut bytes: Vec<u8> = b"ping".iter().copied().cycle().take(size as usize).collect();
    if let Some(last) = bytes.last_mut() {
        *last = b'\n';
    }
    bytes
}

fn tcp_request(target: SocketAddr, timeout: Duration, size: u16) -> Result<Answer> {
    let stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    let message = message(size);
    (&stream).write_all(&message)?;
    let mut echo = vec![0u8; message.len()];
    reader.read_exact(&mut echo)?;
    if echo != message {
        bail!("the echo differs from the {size} bytes sent");
    }
    parse_answer(&greeting, local, peer)
}

fn udp_request(target: SocketAddr, timeout: Duration, size: u16) -> Result<Answer> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(timeout))?;
    // unconnected: the answer's source address shows who really answered
    let message = message(size);
    socket.send_to(&message, target)?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket
        .recv_from(&mut buf)
        .map_err(|err| anyhow!("no answer within {timeout:?}: {err}"))?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let (first, echo) = text.split_once('\n').unwrap_or((&text, ""));
    if echo.as_bytes() != message {
        bail!("the answer does not echo the datagram: {text:?}");
    }
    parse_answer(first, socket.local_addr()?, from)
}

fn run_requests(
    protocol: &str,
    request: &Request,
    once: fn(SocketAddr, Duration, u16) -> Result<Answer>,
) -> Result<()> {
    if request.count == 0 {
        bail!("--count must be at least 1");
    }
    let timeout = Duration::try_from_secs_f64(request.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| anyhow!("--timeout must be a positive number of seconds"))?;
    let mut tally: BTreeMap<String, u32> = BTreeMap::new();
    for i in 1..=request.count {
        let answer = once(request.target, timeout, request.size)
            .with_context(|| format!("{protocol} request {i} to {}", request.target))?;
        if !request.quiet {
            println!(
                "{protocol} {} -> {}: backend {} at {} saw {}",
                answer.local, answer.peer, answer.backend, answer.server, answer.seen_as
            );
        }
        *tally.entry(answer.backend).or_default() += 1;
    }
    let spread: Vec<String> = tally.iter().map(|(name, n)| format!("{name} {n}")).collect();
    println!(
        "{} {protocol} requests to {} answered by: {}",
        request.count,
        request.target,
        spread.join(", ")
    );
    Ok(())
}

/// One long TCP connection and one UDP socket, both echoed every `interval` for `seconds`.
fn stream(tcp: SocketAddr, udp: SocketAddr, seconds: f64, interval: Duration) -> Result<()> {
    let duration = Duration::try_from_secs_f64(seconds).map_err(|_| anyhow!("--seconds must be positive"))?;
    let timeout = Duration::from_secs(2);
    let connection =
        TcpStream::connect_timeout(&tcp, timeout).with_context(|| format!("connecting to {tcp}"))?;
    connection.set_read_timeout(Some(timeout))?;
    let mut reader = BufReader::new(connection.try_clone()?);
    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    let tcp_backend = parse_answer(&greeting, connection.local_addr()?, connection.peer_addr()?)?.backend;
    let bind: SocketAddr = if udp.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(timeout))?;
    println!("stream: started; tcp to {tcp} answered by {tcp_backend}, udp to {udp}");
    std::io::stdout().flush()?;

    let (mut echoed, mut answered, mut lost) = (0u32, 0u32, Vec::new());
    let mut udp_backends: BTreeMap<String, u32> = BTreeMap::new();
    let deadline = Instant::now() + duration;
    let mut sequence = 0u32;
    while Instant::now() < deadline {
        sequence += 1;
        let line = format!("tcp {sequence}\n");
        (&connection)
            .write_all(line.as_bytes())
            .with_context(|| format!("tcp message {sequence}: connection broken after {echoed} echoes"))?;
        let mut echo = String::new();
        reader
            .read_line(&mut echo)
            .with_context(|| format!("tcp message {sequence}: no echo after {echoed} echoes"))?;
        if echo != line {
            bail!("tcp message {sequence}: echo {echo:?} differs (connection reset or moved?)");
        }
        echoed += 1;
        let datagram = format!("udp {sequence}");
        socket.send_to(datagram.as_bytes(), udp)?;
        let mut buf = [0u8; 2048];
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let (first, body) = text.split_once('\n').unwrap_or((&text, ""));
                    if body != datagram {
                        continue; // a late answer to an earlier datagram
                    }
                    let answer = parse_answer(first, socket.local_addr()?, from)?;
                    *udp_backends.entry(answer.backend).or_default() += 1;
                    answered += 1;
                    break;
                }
                Err(_) => {
                    lost.push(sequence);
                    break;
                }
            }
        }
        std::thread::sleep(interval);
    }
    let spread: Vec<String> = udp_backends
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    println!(
        "stream: tcp {echoed}/{sequence} echoed by {tcp_backend} over one connection; udp {answered}/{sequence} answered by: {}",
        spread.join(", ")
    );
    if !lost.is_empty() {
        bail!("udp datagrams without an answer: {lost:?}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            name,
            http,
            echo,
            addrs,
        } => serve(name, http, echo, addrs),
        Command::Http(request) => run_requests("http", &request, http_request),
        Command::Tcp(request) => run_requests("tcp", &request, tcp_request),
        Command::Udp(request) => run_requests("udp", &request, udp_request),
        Command::Stream {
            tcp,
            udp,
            seconds,
            interval_ms,
        } => stream(
            tcp,
            udp.unwrap_or(tcp),
            seconds,
            Duration::from_millis(interval_ms),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ebpf-net-lab: {err:#}");
            ExitCode::FAILURE
        }
    }
}
