//! Safe to run on a node: the metrics endpoint stays bounded under abusive clients, `status`
//! and the CLI survive odd state and input, `down` removes only what it is asked to, and what
//! cannot work is refused in one line. Traffic stays on loopback of namespaces made here.

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cgroup::TestCgroup;
use common::kernel::{self, Feature};
use common::servers::http;
use common::topology::{output_within, Netns, BIN};

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn ebpf_net(args: &[&str]) -> Output {
    output_within(Command::new(BIN).args(args))
}

/// A namespace with a veth pair, `veth0` holding 10.0.0.1/24.
fn node(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.exec("ip link add veth0 type veth peer name veth1 && ip link set veth1 up && ip link set veth0 up && ip addr add 10.0.0.1/24 dev veth0");
    ns
}

/// A line of /proc/PID/status in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

#[test]
fn metrics_endpoint_stays_bounded_under_abusive_clients() {
    let ns = node("met");
    let daemon = ns.ebpf_net_daemon(&["ipv6-hp", "-i", "veth0", "--metrics", "127.0.0.1:9481"]);
    assert!(
        !daemon.stderr().iter().any(|l| l.contains("warning")),
        "loopback needs no warning: {:?}",
        daemon.stderr()
    );
    let pid = daemon.pid();
    let rss_before = proc_kib(pid, "VmRSS:");
    ns.enter(|| {
        // a 100 MiB request line: answered (or cut) after 8 KiB, never buffered
        let mut stream = TcpStream::connect("127.0.0.1:9481").unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let chunk = vec![b'a'; 1 << 20];
        let mut sent = stream.write_all(b"GET /").map(|_| 0);
        for _ in 0..100 {
            match stream.write_all(&chunk) {
                Ok(()) => sent = sent.map(|n| n + 1),
                Err(err) => {
                    sent = Err(err);
                    break;
                }
            }
        }
        // whatever the client managed to send, the server's peak stays small
        std::thread::sleep(Duration::from_millis(300));
        let grown = proc_kib(pid, "VmHWM:").saturating_sub(rss_before);
        assert!(grown < 32 * 1024, "RSS grew by {grown} KiB (sent: {sent:?})");
        drop(stream);

        // a slow client holding a connection: a byte every 4 s
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut slow = TcpStream::connect("127.0.0.1:9481").unwrap();
                for byte in b"GET /metrics HTTP/1.1\r\n" {
                    let _ = slow.write_all(&[*byte]);
                    let next = Instant::now() + Duration::from_secs(4);
                    while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(300));
            let scrapes: Vec<_> = (0..3)
                .map(|_| {
                    let start = Instant::now();
                    let answer = http(
                        "127.0.0.1:9481",
                        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                        Duration::from_secs(3),
                    );
                    (start.elapsed(), answer)
                })
                .collect();
            stop.store(true, Ordering::Relaxed);
            for (took, answer) in scrapes {
                let answer = answer.unwrap_or_else(|err| panic!("a scrape beside the slow client: {err}"));
                assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
                assert!(took < Duration::from_secs(3), "{took:?}");
            }
        });

        // HEAD: the headers of GET, no body
        let head = http(
            "127.0.0.1:9481",
            b"HEAD /metrics HTTP/1.1\r\n\r\n",
            Duration::from_secs(3),
        )
        .unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(
            head.contains("Content-Length: ") && head.ends_with("\r\n\r\n"),
            "{head:?}"
        );
        // `/` points to /metrics
        let index = http(
            "127.0.0.1:9481",
            b"GET / HTTP/1.0\r\n\r\n",
            Duration::from_secs(3),
        )
        .unwrap();
        assert!(
            index.starts_with("HTTP/1.1 200 OK") && index.contains("href=\"/metrics\""),
            "{index}"
        );
        let post = http(
            "127.0.0.1:9481",
            b"POST /metrics HTTP/1.0\r\n\r\n",
            Duration::from_secs(3),
        )
        .unwrap();
        assert!(
            post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD"),
            "{post}"
        );
    });
    let (code, _) = daemon.stop();
    assert_eq!(code, Some(0));

    // `:PORT`: every address, with a warning
    let daemon = ns.ebpf_net_daemon(&["ipv6-hp", "-i", "veth0", "--metrics", ":9482"]);
    assert!(
        daemon
            .stderr()
            .iter()
            .any(|l| l.starts_with("ebpf-net: warning: --metrics :9482 listens on")),
        "{:?}",
        daemon.stderr()
    );
    ns.enter(|| {
        for addr in ["127.0.0.1:9482", "10.0.0.1:9482", "[::1]:9482"] {
            let answer = http(addr, b"GET /metrics HTTP/1.0\r\n\r\n", Duration::from_secs(3)).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200 OK"), "{addr}: {answer}");
        }
    });
}

#[test]
fn status_reports_foreign_pins_and_stray_entries_and_goes_on() {
    let root = std::path::Path::new("/sys/fs/bpf/ebpf-net");
    let stray = root.join(format!("ebn-stray-{}", std::process::id()));
    let cgroup_target = format!("%2Febn-foreign-{}", std::process::id());
    let foreign = root.join("clusterip/host").join(&cgroup_target);
    /// Removes what the test made, also when it fails.
    struct Cleanup(Vec<std::path::PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for path in &self.0 {
                let _ = std::fs::remove_dir_all(path);
            }
            for dir in [
                "/sys/fs/bpf/ebpf-net/clusterip/host",
                "/sys/fs/bpf/ebpf-net/clusterip",
            ] {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
    let _cleanup = Cleanup(vec![stray.clone(), foreign.clone()]);
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::create_dir_all(&foreign).unwrap();
    // a clusterip service table with another value size, holding one entry
    let pin = foreign.join("services_v1");
    let created = output_within(Command::new("bpftool").args(["map", "create"]).arg(&pin).args([
        "type", "hash", "key", "20", "value", "64", "entries", "4", "name", "foreign",
    ]));
    assert!(created.status.success(), "{}", text(&created));
    let mut update = vec!["map", "update", "pinned", pin.to_str().unwrap(), "key", "hex"];
    update.extend(["0a", "00", "00", "01"]);
    update.extend(["00"; 16]);
    update.extend(["value", "hex"]);
    update.extend(["01"; 64]);
    let updated = output_within(Command::new("bpftool").args(&update));
    assert!(updated.status.success(), "{}", text(&updated));

    for args in [&["status"][..], &["status", "--json"][..]] {
        let output = ebpf_net(args);
        let shown = text(&output);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {shown}");
        assert!(!shown.contains("panicked"), "{shown}");
        assert!(
            shown.lines().any(|l| l.contains(&stray.display().to_string())
                && l.contains("a directory named after no datapath")),
            "{args:?}: the stray directory in one line: {shown}"
        );
    }
    let shown = text(&ebpf_net(&["status"]));
    let line = shown
        .lines()
        .find(|l| l.contains("ebn-foreign-"))
        .unwrap_or_else(|| panic!("the foreign pin: {shown}"));
    assert!(line.contains("unreadable: "), "{line}");
}

#[test]
fn non_utf8_arguments_give_one_line_or_just_work() {
    // where the CLI wants text: one line, exit 2, no panic
    let output = output_within(
        Command::new(BIN)
            .args(["clusterip", "--service"])
            .arg(OsStr::from_bytes(b"10.96.0.10:80=\xff")),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("UTF-8") && !stderr.contains("panicked"),
        "{stderr}"
    );

    // where it wants a path (the run record keeps the command line): works
    let ns = node("utf");
    let dir = std::env::temp_dir();
    let mut name = b"ebn-\xff-".to_vec();
    name.extend_from_slice(format!("{}.toml", std::process::id()).as_bytes());
    let config = dir.join(OsStr::from_bytes(&name));
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(config.clone());
    std::fs::write(&config, "[ipv6-hp]\ninterface = \"veth0\"\n").unwrap();
    let output = output_within(
        Command::new(BIN)
            .args(["-n", &ns.name, "ipv6-hp", "--persist", "--config"])
            .arg(&config),
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains("panicked"), "{}", text(&output));
}

#[test]
fn down_clusterip_acts_on_the_root_cgroup_unless_told_otherwise() {
    let (a, b) = (TestCgroup::new("dna"), TestCgroup::new("dnb"));
    let root_target = "netns host         cgroup / ";
    let before = text(&ebpf_net(&["status"]));
    assert!(
        !before
            .lines()
            .any(|l| l.contains("clusterip") && l.contains(root_target)),
        "a clusterip is persisted on the root cgroup of this machine; this test would remove it: {before}"
    );
    for cgroup in [&a, &b] {
        let output = ebpf_net(&[
            "clusterip",
            "--cgroup",
            cgroup.path_str(),
            "--service",
            "10.96.7.1:80=10.1.7.1:80",
            "--persist",
        ]);
        assert!(output.status.success(), "{}", text(&output));
    }
    let relative =
        |cgroup: &TestCgroup| format!("cgroup /{}", cgroup.path.file_name().unwrap().to_string_lossy());
    let listed = |cgroup: &TestCgroup| {
        text(&ebpf_net(&["status"]))
            .lines()
            .any(|l| l.starts_with("  clusterip") && l.contains(&format!("{} ", relative(cgroup))))
    };
    assert!(listed(&a) && listed(&b));

    // the root cgroup's clusterip (there is none): both others stay, and are named
    let down = ebpf_net(&["down", "clusterip"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(
        listed(&a) && listed(&b),
        "down clusterip removed another cgroup's: {}",
        text(&down)
    );
    for cgroup in [&a, &b] {
        assert!(
            text(&down).contains(&format!("down: left clusterip on {}", relative(cgroup))),
            "{}",
            text(&down)
        );
    }
    let down = ebpf_net(&["down", "clusterip", "--cgroup", a.path_str()]);
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(
        String::from_utf8_lossy(&down.stderr).trim(),
        format!("down: removed clusterip on {} (netns host)", relative(&a))
    );
    assert!(!listed(&a) && listed(&b));
}

#[test]
fn what_cannot_work_is_refused_in_one_line() {
    let ns = node("ref");
    // proxy: FROM without a route
    let output = ns.ebpf_net(&["proxy", "-i", "veth0", "--map", "10.96.1.1:80=10.0.0.2:80"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--map 10.96.1.1:80=10.0.0.2:80: FROM 10.96.1.1 has no route"),
        "{stderr}"
    );
    // ... or routed through another interface (here: lo, it is ours)
    let output = ns.ebpf_net(&["proxy", "-i", "veth0", "--map", "10.0.0.1:80=10.0.0.2:80"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(stderr.contains("routed through lo, not veth0"), "{stderr}");
    // with a route it runs
    ns.exec("ip route add 10.96.0.0/16 via 10.0.0.254 dev veth0");
    let proxy = ns.ebpf_net_daemon(&["proxy", "-i", "veth0", "--map", "10.96.1.1:80=10.0.0.2:80"]);
    assert_eq!(proxy.stop().0, Some(0));

    // a VIP:PORT lb serves on veth0 is refused to xdp-lb there, and the other way round
    if !kernel::require_for(Feature::CtNat, "lb and xdp-lb sharing VIPs") {
        return;
    }
    let lb = ns.ebpf_net(&[
        "lb",
        "-i",
        "veth0",
        "--service",
        "10.0.0.100:80=10.0.0.2:80",
        "--persist",
    ]);
    assert!(lb.status.success(), "{}", text(&lb));
    let xdp = [
        "xdp-lb",
        "-i",
        "veth0",
        "--service",
        "10.0.0.100:80=10.0.0.3:80@02:00:00:00:00:03",
    ];
    let output = ns.ebpf_net(&xdp);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(
        stderr.contains("10.0.0.100:80 is already served by ebpf-net lb on veth0"),
        "{stderr}"
    );
    // another port is fine
    let other = ns.ebpf_net_daemon(&[
        "xdp-lb",
        "-i",
        "veth0",
        "--service",
        "10.0.0.100:81=10.0.0.3:81@02:00:00:00:00:03",
        "--service",
        "10.0.0.101:80=10.0.0.3:80@02:00:00:00:00:03",
    ]);
    let output = ns.ebpf_net(&[
        "lb",
        "-i",
        "veth0",
        "--service",
        "10.0.0.101:80=10.0.0.2:80",
        "--persist",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(
        stderr.contains("10.0.0.101:80 is already served by ebpf-net xdp-lb on veth0"),
        "{stderr}"
    );
    assert_eq!(other.stop().0, Some(0));
    let down = ns.ebpf_net(&["down"]);
    assert!(down.status.success(), "{}", text(&down));
}
