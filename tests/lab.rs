//! The lab (`scripts/lab`) and the demo on it (`scripts/demo`): `up` makes a topology whose
//! servers answer, `down` leaves nothing behind even with ebpf-net persisted and running in
//! it, and the demo runs end to end.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::lab::{bin_dir, root, Lab};
use common::topology::{output_within, sh, BIN};

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn lab_up_serves_and_down_leaves_nothing() {
    let lab = Lab::new("lab");
    let up = lab.lab(&["up"]);
    assert!(up.status.success(), "lab up: {}", text(&up));
    let printed = text(&up);
    for address in [
        "10.77.0.11",
        "fd77::12",
        "10.77.0.100",
        "fd77::23",
        "fe80::1234:5678:9abc",
    ] {
        assert!(
            printed.contains(address),
            "up does not print {address}: {printed}"
        );
    }
    assert_eq!(lab.namespaces().len(), 8, "{:?}", lab.namespaces());

    // every backend answers HTTP, TCP echo and UDP echo, in both families, by its own name
    for (i, name) in ["b1", "b2", "b3"].iter().enumerate() {
        for (protocol, target) in [
            ("http", format!("10.77.0.2{}:80", i + 1)),
            ("tcp", format!("[fd77::2{}]:7", i + 1)),
            ("udp", format!("10.77.0.2{}:7", i + 1)),
            ("udp", format!("[fd77::2{}]:7", i + 1)),
        ] {
            let answer = lab.request("client2", &[protocol, &target]);
            assert!(answer.status.success(), "{protocol} {target}: {}", text(&answer));
            assert!(
                text(&answer).contains(&format!("backend {name} at {target} saw")),
                "{protocol} {target}: {}",
                text(&answer)
            );
        }
    }
    let again = lab.lab(&["up"]);
    assert!(!again.status.success(), "a second up must refuse");
    assert!(text(&again).contains("already up"), "{}", text(&again));
    let status = lab.lab(&["status"]);
    assert_eq!(
        text(&status).matches(": running (pid").count(),
        3,
        "{}",
        text(&status)
    );

    // leave state behind as a user would: a persisted xdp-lb, a foreground proxy, a
    // foreground clusterip attached to the lab's cgroup from outside the lab
    let lb_ns = format!("{}-lb", lab.name);
    let persisted = output_within(Command::new(BIN).args([
        "-n",
        &lb_ns,
        "xdp-lb",
        "-i",
        "eth0",
        "--persist",
        "--service",
        "10.77.0.100:80=10.77.0.21:80,10.77.0.22:80",
    ]));
    assert!(persisted.status.success(), "{}", text(&persisted));
    let balanced = lab.request("client1", &["http", "10.77.0.100:80"]);
    assert!(balanced.status.success(), "{}", text(&balanced));
    let client_ns = format!("{}-client1", lab.name);
    let mut proxy = common::topology::Daemon::start(&[
        "-n",
        &client_ns,
        "proxy",
        "-i",
        "eth0",
        "--map",
        "10.96.1.1:80=10.77.0.21:80",
    ]);
    let cgroup = format!("{}/{}", common::cgroup::cgroup2_root().display(), lab.name);
    let mut clusterip = common::topology::Daemon::start(&[
        "clusterip",
        "--cgroup",
        &cgroup,
        "--service",
        "10.96.0.10:80=10.77.0.22:80",
    ]);
    let through = lab.request("client1", &["http", "10.96.0.10:80"]);
    assert!(text(&through).contains("backend b2"), "{}", text(&through));
    let status = lab.lab(&["status"]);
    assert!(text(&status).contains("xdp/generic"), "{}", text(&status));
    let servers: Vec<String> = ["b1", "b2", "b3"]
        .iter()
        .map(|b| {
            std::fs::read_to_string(format!("/run/ebpf-net-lab/{}/{b}.pid", lab.name))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();

    let down = lab.lab(&["down"]);
    assert!(down.status.success(), "lab down: {}", text(&down));
    assert_eq!(lab.namespaces(), Vec::<String>::new());
    assert!(!Path::new(&cgroup).exists(), "cgroup {cgroup} left");
    assert!(!Path::new(&format!("/run/ebpf-net-lab/{}", lab.name)).exists());
    for pid in &servers {
        // gone, or a zombie that init has not reaped yet
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim_start().chars().next();
        assert!(
            matches!(state, None | Some('Z')),
            "server {pid} still runs: {stat}"
        );
    }
    // the foreground datapaths were stopped by down, not left running detached from it
    assert!(proxy.has_exited(), "the proxy in the lab still runs");
    assert!(clusterip.has_exited(), "clusterip on the lab's cgroup still runs");
    let status = output_within(Command::new(BIN).arg("status"));
    assert!(
        !text(&status).contains(&lab.name),
        "pins left after down: {}",
        text(&status)
    );
    // the cgroup is gone, so nothing can be attached to it; and no XDP or tc is left in a
    // namespace, because the namespaces are gone
    let bpffs = Path::new("/sys/fs/bpf/ebpf-net");
    if bpffs.exists() {
        let listing = sh(&format!("find {} -path '*{}*'", bpffs.display(), lab.name));
        assert!(listing.trim().is_empty(), "pins left: {listing}");
    }
}

#[test]
fn demo_runs_end_to_end_and_leaves_nothing() {
    let demo = output_within(Command::new(root().join("scripts/demo")).arg(bin_dir()));
    assert!(demo.status.success(), "demo: {}", text(&demo));
    let out = text(&demo);
    for seen in [
        "saw [fe80::1234:5678:9abc]",
        "saw [2603:1062:0:1:fe80:1234:5678:9abc]",
        "10.96.1.1:80: backend b2",
        "new flow 10.77.0.1",
        "demo: OK",
    ] {
        assert!(out.contains(seen), "the demo did not show {seen:?}: {out}");
    }
    let left: Vec<String> = sh("ip netns list")
        .lines()
        .filter(|line| line.starts_with("ebndemo-"))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "demo left {left:?}");
}
