//! cgroups made by a test (never the machine's root cgroup) and client processes running in
//! them: cgroup membership is per process, so a client is this test binary run again as a
//! helper that takes commands on stdin.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::servers::{tcp_talk, udp_request, udp_socket_for, TIMEOUT};
use super::topology::{Netns, BIN};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
/// Set in the environment of a helper process: the test named `client_helper` then serves
/// commands instead of returning.
pub const HELPER_ENV: &str = "EBPF_NET_CLIENT_HELPER";

/// The cgroup v2 mount, from /proc/mounts.
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.len() > 2 && fields[2] == "cgroup2")
        .map(|fields| PathBuf::from(fields[1]))
        .expect("cgroup v2 is mounted")
}

/// A child cgroup of the cgroup2 root; on drop its clusterip state is removed, its
/// processes killed and the directory deleted.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let path = cgroup2_root().join(format!("ebn-{tag}-{}-{id}", std::process::id()));
        std::fs::create_dir(&path).expect("creating a test cgroup");
        Self { path }
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Runs a shell command in this cgroup and `netns` to its end (bounded by the caller's
    /// command, e.g. iperf3 -t); its output.
    pub fn run_in(&self, netns: &Netns, cmd: &str) -> std::process::Output {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec ip netns exec {} {cmd}",
                self.path_str(),
                netns.name
            ))
            .output()
            .expect("running a command in the test cgroup")
    }

    fn procs(&self) -> String {
        std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = Command::new(BIN)
            .args(["down", "clusterip", "--cgroup", self.path_str()])
            .output();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.procs().trim().is_empty() && Instant::now() < deadline {
            for pid in self.procs().split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A client process in a cgroup and a network namespace, driven line by line.
pub struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    pub fn start(cgroup: &TestCgroup, netns: &Netns) -> Self {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} \"$0\" \"$@\"",
            cgroup.path_str(),
            netns.name
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(std::env::current_exe().unwrap())
            .args([
                "client_helper",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting a client process");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut client = Self { child, stdin, stdout };
        assert_eq!(client.run("hello"), vec!["hello".to_string()]);
        client
    }

    /// Sends one command and returns its result lines.
    pub fn run(&mut self, command: &str) -> Vec<String> {
        writeln!(self.stdin, "{command}").expect("client process is gone");
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("reading the client");
            assert!(n > 0, "client process ended during '{command}': {lines:?}");
            // the test harness prints its own lines too; ours start with '@'
            let Some(line) = line.trim_end().strip_prefix('@') else {
                continue;
            };
            if line == "end" {
                return lines;
            }
            assert!(!line.starts_with("error"), "client '{command}': {line}");
            lines.push(line.to_string());
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One exchange as the client process reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// the address that answered (the backend, or the VIP itself when untranslated)
    pub server: SocketAddr,
    /// the client address the server saw
    pub seen: SocketAddr,
    /// getpeername() for TCP and connected UDP; recvfrom()'s source for UDP
    pub peer: SocketAddr,
}

impl Seen {
    pub fn parse(line: &str) -> Self {
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {name} in '{line}'"))
                .parse()
                .unwrap()
        };
        Self {
            server: field("server"),
            seen: field("seen"),
            peer: field("peer"),
        }
    }
}

fn reply(line: &str) {
    println!("@{line}");
}

fn addr_and_count(args: &[&str]) -> Result<(SocketAddr, usize), String> {
    let addr = args
        .first()
        .ok_or("no address")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let count = args
        .get(1)
        .map_or(Ok(1), |n| n.parse())
        .map_err(|e| format!("{e}"))?;
    Ok((addr, count))
}

/// Commands of the helper process, one exchange per result line:
/// `tcp ADDR [N]`, `udp ADDR [N]` (unconnected), `udpc ADDR [N]` (connected) print
/// `server= seen= peer=`; `try tcp|udp ADDR` one timed attempt; `hold ADDR` keeps a TCP
/// connection open and `ping` uses it.
/// What a client keeps between commands: a TCP connection (`hold`) and a connected UDP
/// socket (`udphold`), like a resolver's.
#[derive(Default)]
struct Held {
    tcp: Option<TcpStream>,
    udp: Option<UdpSocket>,
}

fn serve(command: &str, held: &mut Held) -> Result<(), String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["hello"] => reply("hello"),
        ["tcp", args @ ..] => {
            let (addr, count) = addr_and_count(args)?;
            for _ in 0..count {
                let stream =
                    TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
                let peer = stream.peer_addr().map_err(|e| e.to_string())?;
                let greeting = tcp_talk(&stream, b"ping");
                reply(&format!(
                    "server={} seen={} peer={peer}",
                    greeting.server, greeting.seen
                ));
            }
        }
        ["udp", args @ ..] => {
            let (addr, count) = addr_and_count(args)?;
            for _ in 0..count {
                let socket = udp_socket_for(addr);
                let (greeting, from) = udp_request(&socket, Some(addr));
                reply(&format!(
                    "server={} seen={} peer={from}",
                    greeting.server, greeting.seen
                ));
            }
        }
        ["udpc", args @ ..] => {
            let (addr, count) = addr_and_count(args)?;
            for _ in 0..count {
                let socket: UdpSocket = udp_socket_for(addr);
                socket.connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
                let (greeting, from) = udp_request(&socket, None);
                let peer = socket.peer_addr().map_err(|e| e.to_string())?;
                if from != peer {
                    return Err(format!("recvfrom says {from}, getpeername says {peer}"));
                }
                reply(&format!(
                    "server={} seen={} peer={peer}",
                    greeting.server, greeting.seen
                ));
            }
        }
        // one connect (tcp) or one datagram (udp), timed: `ok us=N` or `err=KIND errno=N us=N`
        ["try", protocol, addr] => {
            let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
            let start = std::time::Instant::now();
            let result = match *protocol {
                "tcp" => TcpStream::connect_timeout(&addr, TIMEOUT).map(drop),
                "udp" => udp_socket_for(addr).send_to(b"ping", addr).map(drop),
                other => return Err(format!("try: {other}? tcp or udp")),
            };
            let us = start.elapsed().as_micros();
            match result {
                Ok(()) => reply(&format!("ok us={us}")),
                Err(err) => reply(&format!(
                    "err={:?} errno={} us={us}",
                    err.kind(),
                    err.raw_os_error().unwrap_or(0)
                )),
            }
        }
        ["hold", args @ ..] => {
            let (addr, _) = addr_and_count(args)?;
            let stream =
                TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).map_err(|e| e.to_string())?;
            let (seen, server) = line.trim().split_once(' ').ok_or("greeting")?;
            let peer = stream.peer_addr().map_err(|e| e.to_string())?;
            reply(&format!("server={server} seen={seen} peer={peer}"));
            held.tcp = Some(stream);
        }
        // a connected UDP socket kept for `udpping`
        ["udphold", args @ ..] => {
            let (addr, _) = addr_and_count(args)?;
            let socket: UdpSocket = udp_socket_for(addr);
            socket.connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
            let (greeting, _) = udp_request(&socket, None);
            let peer = socket.peer_addr().map_err(|e| e.to_string())?;
            reply(&format!(
                "server={} seen={} peer={peer}",
                greeting.server, greeting.seen
            ));
            held.udp = Some(socket);
        }
        // one request on the kept UDP socket: `server=...` or `err errno=N`
        ["udpping"] => {
            let socket = held.udp.as_ref().ok_or("no held UDP socket")?;
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let sent = socket.send(b"ping");
            let mut buffer = [0u8; 512];
            match sent.and_then(|_| socket.recv(&mut buffer)) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buffer[..n]);
                    let server = text
                        .split('|')
                        .next()
                        .unwrap_or_default()
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or_default()
                        .to_string();
                    reply(&format!("ok server={server}"))
                }
                Err(err) => reply(&format!("err errno={}", err.raw_os_error().unwrap_or(0))),
            }
        }
        ["ping"] => {
            let stream = held.tcp.as_mut().ok_or("no held connection")?;
            stream.write_all(b"ping\n").map_err(|e| format!("send: {e}"))?;
            let mut echo = [0u8; 5];
            std::io::Read::read_exact(stream, &mut echo).map_err(|e| format!("echo: {e}"))?;
            reply(&format!("ok {}", String::from_utf8_lossy(&echo).trim()));
        }
        _ => return Err(format!("unknown command '{command}'")),
    }
    Ok(())
}

/// The helper process's main loop: a command per stdin line, results then `@end`.
pub fn helper_main() {
    // the harness has printed "test client_helper ... " without a newline
    println!();
    let mut held = Held::default();
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        if let Err(err) = serve(&line, &mut held) {
            reply(&format!("error {err}"));
        }
        reply("end");
    }
}
