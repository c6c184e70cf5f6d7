//! Throwaway topologies: network namespaces and veth pairs that remove themselves on drop
//! (also when a test panics), and the real `ebpf-net` binary run inside them.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ebpf-net");

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Runs a command and panics with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let output = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("running sh");
    assert!(
        output.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace named uniquely for this test process; deleted on drop together with
/// its interfaces and any state ebpf-net persisted for it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `tag` goes into the name to tell which test left something behind, were it to.
    pub fn new(tag: &str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("ebn-{tag}-{}-{id}", std::process::id());
        sh(&format!("ip netns add {name}"));
        let netns = Self { name };
        // no duplicate address detection: addresses are usable at once
        netns.exec("sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0");
        netns.exec("ip link set lo up");
        netns
    }

    /// Runs a shell command inside; panics on failure.
    pub fn exec(&self, cmd: &str) -> String {
        sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            cmd.replace('\'', "'\\''")
        ))
    }

    /// Runs `f` on a thread that entered this namespace: sockets it makes live here.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.move_this_thread();
                    f()
                })
                .join()
                .expect("thread in netns panicked")
        })
    }

    /// Moves the calling thread into this namespace (for a thread that switches between
    /// several; [`Netns::enter`] is the scoped form).
    pub fn move_this_thread(&self) {
        let file = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        // SAFETY: setns on a valid fd affects only this thread.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns {}",
            self.name
        );
    }

    /// Runs `ebpf-net --netns NAME ARGS` to completion (bounded, see [`output_within`]).
    pub fn ebpf_net(&self, args: &[&str]) -> Output {
        output_within(Command::new(BIN).arg("--netns").arg(&self.name).args(args))
    }

    /// Starts `ebpf-net --netns NAME ARGS` in the foreground and waits for `ready`.
    pub fn ebpf_net_daemon(&self, args: &[&str]) -> Daemon {
        let mut full = vec!["--netns", &self.name];
        full.extend_from_slice(args);
        Daemon::start(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(BIN).args(["--netns", &self.name, "down"]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair between two namespaces, addresses up, transmit checksum offload off on both
/// ends so every checksum is computed by the sender and verified by the receiver.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    sh(&format!(
        "ip -n {} link add {a_if} type veth peer name {b_if} netns {}",
        a.name, b.name
    ));
    for (ns, dev) in [(a, a_if), (b, b_if)] {
        ns.exec(&format!(
            "ip link set {dev} up && ethtool -K {dev} tx off >/dev/null"
        ));
    }
}

/// A running `ebpf-net` in the foreground; SIGTERM and reaped on drop.
pub struct Daemon {
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// read as it comes, so a chatty daemon never blocks on a full pipe
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ebpf-net");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let lines = Arc::clone(&stderr);
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                // recorded before announced: whoever waits for ready can read the line
                let ready = line.contains(": ready: ");
                lines.lock().unwrap().push(line);
                if ready {
                    let _ = ready_tx.send(());
                }
            }
        });
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&stdout);
        let pipe = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut daemon = Self {
            child: Some(child),
            stderr,
            stdout,
        };
        let deadline = Instant::now() + super::kernel::scaled(Duration::from_secs(30));
        while ready_rx.recv_timeout(Duration::from_millis(50)).is_err() {
            let exited = daemon.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "ebpf-net {args:?} never became ready ({exited:?}): {:?}",
                    daemon.stderr()
                );
            }
        }
        daemon
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// The lines it printed to stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Sends a signal (SIGHUP to reload, SIGKILL to leave state behind).
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits (bounded) for a stderr line containing `needle`, printed after the first
    /// `skip` lines.
    pub fn wait_stderr(&self, needle: &str, skip: usize, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(line) = self.stderr().into_iter().skip(skip).find(|l| l.contains(needle)) {
                return Some(line);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits (bounded) until its stdout so far satisfies `done`; returns the lines then.
    pub fn wait_stdout(&self, done: impl Fn(&[String]) -> bool, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.stdout();
            if done(&lines) || Instant::now() >= deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it has exited by now (without waiting).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_some(),
            None => true,
        }
    }

    /// Waits (bounded) for it to exit on its own; returns the exit code, stdout and stderr.
    pub fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String, Vec<String>) {
        let mut child = self.child.take().unwrap();
        let code = reap_within(&mut child, timeout);
        std::thread::sleep(Duration::from_millis(50));
        let mut stdout = self.stdout().join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        (code, stdout, self.stderr())
    }

    /// SIGTERM, wait (bounded), and return the exit code, stdout and stderr lines.
    pub fn stop_with_output(mut self) -> (Option<i32>, Vec<String>, Vec<String>) {
        let code = self.terminate();
        std::thread::sleep(Duration::from_millis(50));
        (code, self.stdout(), self.stderr())
    }

    /// SIGTERM, wait (bounded), and return the exit code and everything it logged.
    pub fn stop(mut self) -> (Option<i32>, Vec<String>) {
        let code = self.terminate();
        std::thread::sleep(Duration::from_millis(50));
        (code, self.stderr())
    }

    fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        // 5 s here; scaled in a VM in emulation, where lb's cleanup (nft, sysctls) takes longer
        reap_within(&mut child, super::kernel::scaled(Duration::from_secs(5)))
    }
}

/// How long a command that should finish may run: a foreground ebpf-net that was expected to
/// refuse but started instead runs until killed, and must fail its test rather than hang it.
/// Scaled by `EBPF_NET_TEST_TIME_SCALE` (see [`super::kernel::scaled`]).
pub fn command_timeout() -> Duration {
    super::kernel::scaled(Duration::from_secs(60))
}

/// Runs a command to completion like `Command::output`, killing it after [`command_timeout`].
pub fn output_within(command: &mut Command) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting a command");
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    reap_within(&mut child, command_timeout());
    Output {
        status: child.wait().expect("reaping a command"),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The `--service` argument for `vip` and its backends: VIP:PORT=BACKEND:PORT,...
pub fn service_arg(vip: &str, backends: &[std::net::SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    format!("{vip}={}", list.join(","))
}

/// Waits for a child's exit code; kills it (and returns None) once `timeout` has passed.
fn reap_within(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// An XDP program that passes every frame, in the driver of veth `dev` in `ns`; detached on
/// drop. What a veth peer needs for frames a native XDP program on the other end sends back
/// (`XDP_TX`) to arrive: veth wakes the peer's NAPI for them only when the peer runs XDP in
/// its driver (GRO on the peer gives it a ring nobody polls). See
/// `ebpf_net::kernel::attach::veth_xdp_tx_blocker`.
pub struct NativeXdpPass {
    _attachment: ebpf_net::kernel::attach::XdpAttachment,
}

impl NativeXdpPass {
    pub fn attach(ns: &Netns, dev: &str) -> Self {
        use ebpf_net::kernel::attach::{XdpAttachment, XdpMode};
        use ebpf_net::kernel::skel::noop::NoopSkelBuilder;
        use libbpf_rs::skel::{OpenSkel, SkelBuilder};
        let attachment = ns.enter(|| {
            let mut object = std::mem::MaybeUninit::uninit();
            let skel = NoopSkelBuilder::default()
                .open(&mut object)
                .expect("opening noop")
                .load()
                .expect("loading noop");
            let iface = ebpf_net::kernel::addr::Interface::by_name(dev).unwrap();
            // the link keeps the program once the skeleton is gone
            XdpAttachment::attach(&skel.progs.noop_xdp, &iface, XdpMode::Native)
                .expect("XDP_PASS in the peer's driver")
        });
        Self {
            _attachment: attachment,
        }
    }
}

/// How the XDP program on `dev` in `ns` is attached, as `ip -d link` shows it: `xdp` (in the
/// driver), `xdpgeneric`, or None when there is none.
pub fn xdp_hook(ns: &Netns, dev: &str) -> Option<String> {
    let link = ns.exec(&format!("ip -d link show {dev}"));
    link.split_whitespace()
        .find(|word| matches!(*word, "xdp" | "xdpgeneric" | "xdpoffload" | "xdpmulti"))
        .map(str::to_string)
}

/// A counter of `ethtool -S DEV` in `ns` (0 when absent).
pub fn ethtool_stat(ns: &Netns, dev: &str, name: &str) -> u64 {
    ns.exec(&format!("ethtool -S {dev}"))
        .lines()
        .filter_map(|line| line.trim().split_once(": "))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}
