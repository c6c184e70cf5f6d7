//! Safe to run on a node (issue 17): a stop at any instant of startup leaves nothing, a
//! re-created interface is recovered by the `--persist` re-run, and an update killed midway
//! is shown by `status` and finished by the next run.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::cgroup::TestCgroup;
use common::kernel::{self, Feature};
use common::topology::{veth, Netns, BIN};
use serde_json::Value;

/// xorshift: the instants are random, the seed printed with any failure.
struct Random(u64);

impl Random {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Self((nanos as u64) | 1)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// A node namespace with eth0 to a peer namespace: 10.0.0.1/24 here, 10.0.0.2 there, a
/// default route through it.
fn node(tag: &str) -> (Netns, Netns) {
    let here = Netns::new(tag);
    let peer = Netns::new(&format!("{tag}p"));
    veth(&here, "eth0", &peer, "eth0");
    here.exec("ip addr add 10.0.0.1/24 dev eth0 && ip route add default via 10.0.0.2");
    peer.exec("ip addr add 10.0.0.2/24 dev eth0");
    (here, peer)
}

fn status_json() -> String {
    let output = Command::new(BIN).args(["status", "--json"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Sends `signal`, then waits (bounded) for the exit; what it printed.
fn stop(mut child: Child, signal: i32) -> (std::process::ExitStatus, String) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    // a hang, not a speed: longer in a VM in emulation, where a startup's verifier run
    // alone takes seconds
    let bound = kernel::scaled(Duration::from_secs(10));
    let deadline = Instant::now() + bound;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            // where each thread waits, read before the kill: what a hang is stuck on
            let stacks = thread_stacks(child.id());
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "no exit within {bound:?} of signal {signal}: {}\nits threads:\n{stacks}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every thread of `pid`: its name, state, wait channel and kernel stack.
fn thread_stacks(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(gone)".into();
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        let state = read("status")
            .lines()
            .filter(|l| l.starts_with("Name:") || l.starts_with("State:"))
            .collect::<Vec<_>>()
            .join(" ");
        out += &format!(
            "{} {state} wchan {}\n{}",
            task.file_name().to_string_lossy(),
            read("wchan"),
            read("stack")
        );
    }
    out
}

/// What a run may leave behind that names `name` (a namespace or a cgroup): nothing, or
/// the first thing found.
fn leftovers(subcommand: &str, netns: Option<&Netns>, name: &str) -> Option<String> {
    if let Some(ns) = netns {
        let tables = ns.exec("nft list tables");
        if tables.contains("ebpf_net_lb") {
            return Some(format!("nft: {tables}"));
        }
        let forwarding = ns.exec("sysctl -n net.ipv4.ip_forward net.ipv6.conf.all.forwarding");
        if forwarding.split_whitespace().any(|v| v != "0") {
            return Some(format!("forwarding: {forwarding}"));
        }
        let tc = ns.exec(
            "tc filter show dev eth0 ingress; tc filter show dev eth0 egress; ip -d link show dev eth0",
        );
        if tc.contains("bpf") && (tc.contains("prog/xdp") || tc.contains("direct-action")) {
            return Some(format!("tc/xdp: {tc}"));
        }
        let here = ns.ebpf_net(&["status", "--json"]);
        let here: Value = serde_json::from_slice(&here.stdout).unwrap_or(Value::Null);
        // cgroup hooks are seen from every namespace: only this one's interfaces count
        let attached: Vec<&Value> = here["attached"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a.get("interface").is_some())
            .collect();
        if !here["attached"].is_array() || !attached.is_empty() {
            return Some(format!("attached: {attached:?}"));
        }
    }
    for root in ["/run/ebpf-net", "/sys/fs/bpf/ebpf-net"] {
        let dir = std::path::Path::new(root).join(subcommand);
        let found = Command::new("find").arg(&dir).output().unwrap();
        let found = String::from_utf8_lossy(&found.stdout);
        if let Some(line) = found.lines().find(|l| l.contains(name)) {
            return Some(format!("file: {line}"));
        }
    }
    let status: Value = serde_json::from_str(&status_json()).unwrap_or(Value::Null);
    ["persisted", "runs", "attached"].iter().find_map(|part| {
        status[part]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry.to_string().contains(name))
            .map(|entry| {
                format!(
                    "status {part}: {}",
                    entry.to_string().chars().take(600).collect::<String>()
                )
            })
    })
}

/// Starts `args` 25 times, each stopped by SIGTERM at a random instant 0-400 ms after the
/// spawn; after each stop nothing of it may be left.
fn stop_at_random_instants(subcommand: &str, args: &[&str], netns: Option<&Netns>, name: &str) {
    let mut random = Random::new();
    let seed = random.0;
    for round in 0..25 {
        let after = Duration::from_millis(random.below(401));
        let child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(after);
        let (status, stderr) = stop(child, libc::SIGTERM);
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.code() == Some(0) || status.signal() == Some(libc::SIGTERM),
            "{subcommand} round {round} (seed {seed}), SIGTERM after {after:?}: {status:?}: {stderr}"
        );
        if let Some(left) = leftovers(subcommand, netns, name) {
            panic!(
                "{subcommand} round {round} (seed {seed}), SIGTERM after {after:?} left {left}\nits log: {stderr}"
            );
        }
    }
}

#[test]
fn a_sigterm_at_any_instant_of_startup_leaves_nothing_behind() {
    let (lb, _lb_peer) = node("stl");
    let (xdp, _xdp_peer) = node("stx");
    let (proxy, _proxy_peer) = node("stp");
    let cgroup = TestCgroup::new("stc");
    let service = "10.96.0.1:80=10.0.0.2:80";
    std::thread::scope(|scope| {
        let runs = [
            ("lb", &lb, vec!["lb", "-i", "eth0", "--service", service]),
            ("xdp-lb", &xdp, vec!["xdp-lb", "-i", "eth0", "--service", service]),
            (
                "proxy",
                &proxy,
                vec!["proxy", "-i", "eth0", "--map", "10.96.1.1:7=10.0.0.2:7"],
            ),
        ];
        let lb_runs = kernel::require_for(Feature::CtNat, "lb");
        let mut handles = Vec::new();
        for (subcommand, ns, args) in runs.into_iter().filter(|run| lb_runs || run.0 != "lb") {
            handles.push(scope.spawn(move || {
                let mut full = vec!["--netns", ns.name.as_str()];
                full.extend(args);
                stop_at_random_instants(subcommand, &full, Some(ns), &ns.name);
            }));
        }
        let cgroup_name = cgroup.path.file_name().unwrap().to_str().unwrap().to_string();
        handles.push(scope.spawn(move || {
            let args = [
                "clusterip",
                "--cgroup",
                cgroup.path_str(),
                "--service",
                "10.96.0.10:80=10.0.0.2:80",
            ];
            stop_at_random_instants("clusterip", &args, None, &cgroup_name);
        }));
        for handle in handles {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

fn pinned_map_id(dir: &str, prefix: &str) -> String {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "bpftool -j map show pinned $(ls -d {dir}/{prefix}_v* | head -1)"
        ))
        .output()
        .unwrap();
    let map: Value = serde_json::from_slice(&found.stdout).unwrap_or(Value::Null);
    map["id"].to_string()
}

#[test]
fn a_re_created_interface_is_recovered_by_the_persist_rerun() {
    let lb_runs = kernel::require_for(Feature::CtNat, "lb");
    for (subcommand, pin) in [("lb", "services"), ("xdp-lb", "flows")] {
        if subcommand == "lb" && !lb_runs {
            continue;
        }
        let (here, peer) = node(&format!("rc{}", &subcommand[..1]));
        let args = [
            subcommand,
            "-i",
            "eth0",
            "--service",
            "10.96.0.1:80=10.0.0.2:80",
            "--persist",
        ];
        let first = here.ebpf_net(&args);
        assert!(
            first.status.success(),
            "{}",
            String::from_utf8_lossy(&first.stderr)
        );
        let dir = format!("/sys/fs/bpf/ebpf-net/{subcommand}/{}/eth0", here.name);
        let map_before = pinned_map_id(&dir, pin);
        here.exec("ip link del eth0");
        veth(&here, "eth0", &peer, "eth0");
        here.exec("ip addr add 10.0.0.1/24 dev eth0 && ip route add default via 10.0.0.2");
        peer.exec("ip addr add 10.0.0.2/24 dev eth0");

        let again = here.ebpf_net(&args);
        let said = String::from_utf8_lossy(&again.stderr);
        assert!(
            again.status.success() && said.contains("re-attaching to eth0"),
            "{subcommand}: {said}"
        );
        assert_eq!(
            pinned_map_id(&dir, pin),
            map_before,
            "{subcommand}: the pinned {pin} were kept"
        );
        let status: Value = serde_json::from_slice(&here.ebpf_net(&["status", "--json"]).stdout).unwrap();
        let entry = status["persisted"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["subcommand"] == subcommand && e["netns"] == here.name.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{subcommand} not in {status}"));
        assert_eq!(entry["state"], "active", "{subcommand}: {entry}");
        let attached = status["attached"].as_array().unwrap();
        assert!(
            attached
                .iter()
                .any(|a| a["interface"] == "eth0" && a["owner"] == "persisted"),
            "{subcommand}: {status}"
        );
        let down = here.ebpf_net(&["down"]);
        assert!(down.status.success());
    }
}

/// A config file of 10,000 lb services on eth0, VIPs 10.96.x.y:`port`.
fn lb_config(path: &std::path::Path, port: u16) {
    let mut text = String::from("[lb]\ninterface = \"eth0\"\n");
    for i in 0..10_000u32 {
        text.push_str(&format!(
            "[[lb.service]]\nvip = \"10.96.{}.{}:{port}\"\nbackends = [\"10.0.0.2:{port}\"]\n",
            i / 250,
            i % 250 + 1
        ));
    }
    std::fs::write(path, text).unwrap();
}

/// The services `status --json` lists for lb in `ns`.
fn lb_services(ns: &Netns) -> Vec<String> {
    let status: Value = serde_json::from_slice(&ns.ebpf_net(&["status", "--json"]).stdout).unwrap();
    status["persisted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["subcommand"] == "lb" && e["netns"] == ns.name.as_str())
        .map(|e| {
            e["details"]["services"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["vip"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the config files on drop.
struct Files(Vec<std::path::PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[test]
fn an_update_killed_midway_is_shown_by_status_and_finished_by_a_rerun() {
    if !kernel::require(Feature::CtNat) {
        return;
    }
    let (ns, _peer) = node("upd");
    let dir = std::env::temp_dir();
    let files = Files(vec![
        dir.join(format!("{}-old.toml", ns.name)),
        dir.join(format!("{}-new.toml", ns.name)),
    ]);
    lb_config(&files.0[0], 80);
    lb_config(&files.0[1], 8080);
    let (old, new) = (files.0[0].to_str().unwrap(), files.0[1].to_str().unwrap());
    let first = ns.ebpf_net(&["lb", "--config", old, "--persist"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );

    let record = format!("/run/ebpf-net/lb/{}/eth0.lock", ns.name);
    let mut random = Random::new();
    let seed = random.0;
    let mut killed = false;
    for attempt in 0..5 {
        let mut child = Command::new(BIN)
            .args(["--netns", &ns.name, "lb", "--config", new, "--persist"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // the update begins once the record says so; killed at a random instant after
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&record)
            .unwrap_or_default()
            .contains("update in progress")
        {
            assert!(Instant::now() < deadline, "no update in progress recorded");
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(random.below(200 >> attempt)));
        let running = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        let _ = child.wait();
        if running {
            killed = true;
            break;
        }
        // it finished first: back to the old services and a shorter wait
        let back = ns.ebpf_net(&["lb", "--config", old, "--persist"]);
        assert!(back.status.success());
    }
    assert!(killed, "the update always finished before the kill (seed {seed})");

    let shown =
        String::from_utf8_lossy(&Command::new(BIN).arg("status").output().unwrap().stdout).into_owned();
    let line = shown
        .lines()
        .find(|l| l.contains(&ns.name) && l.contains("orphaned"))
        .unwrap_or_else(|| panic!("status does not show the killed update (seed {seed}): {shown}"));
    assert!(line.contains("update in progress"), "{line}");
    // removals go last: a kill midway never leaves fewer services than either state has
    let midway = lb_services(&ns);
    assert!(
        midway.len() >= 10_000,
        "{} services after the kill (seed {seed})",
        midway.len()
    );

    let rerun = ns.ebpf_net(&["lb", "--config", new, "--persist"]);
    let said = String::from_utf8_lossy(&rerun.stderr);
    assert!(
        rerun.status.success() && said.contains("finishing the update"),
        "{said}"
    );
    let done = lb_services(&ns);
    assert_eq!(done.len(), 10_000);
    assert!(done.iter().all(|vip| vip.ends_with(":8080")), "{:?}", &done[..5]);
    let shown =
        String::from_utf8_lossy(&Command::new(BIN).arg("status").output().unwrap().stdout).into_owned();
    assert!(
        !shown
            .lines()
            .any(|l| l.contains(&ns.name) && l.contains("orphaned")),
        "{shown}"
    );
    let down = ns.ebpf_net(&["down"]);
    assert!(down.status.success());
}
