//! One view of everything, and evidence of tampering: `status` shows foreground runs with
//! their services and counters (their maps pinned under a per-run directory removed on
//! exit), refuses and reports a pin tree whose modes were loosened, and reports a service
//! table entry someone rewrote behind ebpf-net's back.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::kernel::{self, Feature};
use common::lab::Lab;
use common::topology::{output_within, Daemon, BIN};
use ebpf_net::kernel::pin::PinDir;
use serde_json::Value;

const B1: &str = "10.77.0.21";
const B2: &str = "10.77.0.22";
const VIP: &str = "10.77.0.100";
const CLUSTER_VIP: &str = "10.96.0.10";

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

fn status_json() -> Value {
    let out = ebpf_net(&["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn total(service: &Value) -> u64 {
    service["totals"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

#[test]
fn status_shows_foreground_runs_with_their_services_and_counters() {
    if !kernel::require(Feature::CtNat) {
        return;
    }
    let lab = Lab::up("view");
    let lb = lab.ns("lb");
    let cgroup = lab.cgroup();
    let lb_service = format!("{VIP}:80={B1}:80,{B2}:80");
    let cluster_service = format!("{CLUSTER_VIP}:80={B1}:80,{B2}:80");
    let lb_run = Daemon::start(&["-n", &lb, "lb", "-i", "eth0", "--service", &lb_service]);
    let cluster_run = Daemon::start(&["clusterip", "--cgroup", &cgroup, "--service", &cluster_service]);
    for target in [format!("{VIP}:80"), format!("{CLUSTER_VIP}:80")] {
        let answer = lab.request("client1", &["http", &target, "--count", "4"]);
        assert!(answer.status.success(), "{target}: {}", text(&answer));
    }

    let status = status_json();
    let runs = status["runs"].as_array().unwrap();
    let find = |subcommand: &str, pid: u32| -> &Value {
        runs.iter()
            .find(|run| run["subcommand"] == subcommand && run["pid"] == pid)
            .unwrap_or_else(|| panic!("{subcommand} pid {pid} not in {status}"))
    };
    let text_status = String::from_utf8_lossy(&ebpf_net(&["status"]).stdout).into_owned();
    let mut pins = Vec::new();
    for (subcommand, pid, vip) in [
        ("lb", lb_run.pid(), VIP),
        ("clusterip", cluster_run.pid(), CLUSTER_VIP),
    ] {
        let run = find(subcommand, pid);
        assert_eq!(
            run["description"],
            format!("running: pid {pid} (foreground)"),
            "{run}"
        );
        let service = &run["details"]["services"][0];
        assert_eq!(service["vip"], format!("{vip}:80"), "{run}");
        assert_eq!(service["backends"].as_array().unwrap().len(), 2, "{run}");
        assert!(total(service) >= 4, "{subcommand}: the traffic is counted: {run}");
        let summary = run["summary"].as_str().unwrap();
        assert!(!summary.is_empty(), "{run}");
        let line = text_status
            .lines()
            .find(|l| l.contains(&format!("running: pid {pid} (foreground)")))
            .unwrap_or_else(|| panic!("{text_status}"));
        assert!(line.contains(summary), "{line}");
        let path = run["pins"].as_str().unwrap().to_string();
        assert!(path.starts_with("/sys/fs/bpf/ebpf-net/_run/"), "{path}");
        assert!(Path::new(&path).is_dir(), "{path}");
        pins.push(path);
    }
    // a foreground run's maps are not persisted state, nor unexpected
    assert!(
        !status["persisted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["netns"] == lb.as_str()),
        "{status}"
    );
    assert!(
        !text_status.contains("unexpected: /sys/fs/bpf/ebpf-net/_run"),
        "{text_status}"
    );

    for daemon in [lb_run, cluster_run] {
        let (code, lines) = daemon.stop();
        assert_eq!(code, Some(0), "{lines:?}");
    }
    for path in &pins {
        assert!(!Path::new(path).exists(), "{path} is left after SIGTERM");
    }

    // a killed run leaves its maps pinned: shown as left over, and `down` removes them
    let killed = Daemon::start(&["-n", &lb, "lb", "-i", "eth0", "--service", &lb_service]);
    let pid = killed.pid();
    killed.signal(libc::SIGKILL);
    let (code, _) = killed.stop();
    assert_eq!(code, None);
    let left = PinDir::foreground("lb", &lb, "eth0").path;
    assert!(left.is_dir(), "{}", left.display());
    let shown = String::from_utf8_lossy(&ebpf_net(&["status"]).stdout).into_owned();
    assert!(
        shown.lines().any(|l| l.contains(&format!("pid {pid} was killed"))
            && l.contains(&format!("its maps pinned under {}", left.display()))),
        "{shown}"
    );
    let down = ebpf_net(&["-n", &lb, "down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(
        text(&down).contains("removed the maps a killed lb run left pinned on eth0"),
        "{}",
        text(&down)
    );
    assert!(!left.exists(), "{}", left.display());
}

/// Removes this test's persisted lb whatever happens.
struct Persisted<'a>(&'a str);

impl Drop for Persisted<'_> {
    fn drop(&mut self) {
        let pins = PinDir::new("lb", self.0, "eth0");
        let _ = std::fs::set_permissions(&pins.path, std::fs::Permissions::from_mode(0o700));
        let _ = ebpf_net(&["-n", self.0, "down", "lb"]);
    }
}

fn persisted_entry(status: &Value, netns: &str) -> Value {
    status["persisted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["subcommand"] == "lb" && p["netns"] == netns)
        .unwrap_or_else(|| panic!("{status}"))
        .clone()
}

#[test]
fn loosened_and_tampered_pins_are_reported_and_refused() {
    if !kernel::require(Feature::CtNat) {
        return;
    }
    let lab = Lab::up("tamper");
    let lb = lab.ns("lb");
    let service = format!("{VIP}:80={B1}:80,{B2}:80");
    let command = ["-n", &lb, "lb", "-i", "eth0", "--persist", "--service", &service];
    let _persisted = Persisted(&lb);
    let first = ebpf_net(&command);
    assert!(first.status.success(), "{}", text(&first));
    let pins = PinDir::new("lb", &lb, "eth0");
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&pins.path), 0o700, "{}", pins.path.display());
    let backends = pins.file("backends_v1");
    assert_eq!(mode(&backends), 0o600, "{}", backends.display());
    let entry = persisted_entry(&status_json(), &lb);
    assert_eq!(entry["tampered"], serde_json::json!([]), "{entry}");
    assert_eq!(entry["loosened"], serde_json::json!([]), "{entry}");

    // someone rewrites one backend: the first used slot now points elsewhere
    let dump = output_within(
        Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&backends),
    );
    assert!(dump.status.success(), "{}", text(&dump));
    let dump: Value = serde_json::from_slice(&dump.stdout).unwrap();
    let hex_bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
            .collect()
    };
    let (key, mut value) = dump
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (hex_bytes(&e["key"]), hex_bytes(&e["value"])))
        .find(|(_, value)| value.iter().any(|b| *b != 0))
        .expect("a backend slot in use");
    // the backend's IPv4 address comes first: 10.77.0.2x becomes 10.77.0.99
    value[3] = 99;
    let args = |bytes: &[u8]| bytes.iter().map(|b| format!("{b}")).collect::<Vec<_>>();
    let update = output_within(
        Command::new("bpftool")
            .args(["map", "update", "pinned"])
            .arg(&backends)
            .arg("key")
            .args(args(&key))
            .arg("value")
            .args(args(&value)),
    );
    assert!(update.status.success(), "{}", text(&update));
    let entry = persisted_entry(&status_json(), &lb);
    let tampered = entry["tampered"].as_array().unwrap();
    assert_eq!(tampered.len(), 1, "{entry}");
    let line = tampered[0].as_str().unwrap();
    assert!(
        line.contains(&backends.display().to_string()) && line.contains("rewritten"),
        "{line}"
    );
    let shown = String::from_utf8_lossy(&ebpf_net(&["status"]).stdout).into_owned();
    assert!(shown.contains(&format!("tampered: {line}")), "{shown}");

    // someone loosens the modes: status says so, and the re-run refuses to reuse the tree
    std::fs::set_permissions(&pins.path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let shown = String::from_utf8_lossy(&ebpf_net(&["status"]).stdout).into_owned();
    assert!(
        shown.contains(&format!(
            "loosened: {} is group- or world-writable (mode 0777)",
            pins.path.display()
        )),
        "{shown}"
    );
    let again = ebpf_net(&command);
    assert!(!again.status.success(), "{}", text(&again));
    let said = text(&again);
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert!(
        said.contains("refusing to use the pins on eth0")
            && said.contains(&format!("{} is group- or world-writable", pins.path.display())),
        "{said}"
    );
}
