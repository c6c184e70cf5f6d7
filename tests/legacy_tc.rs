//! Legacy tc attach (clsact + cls_bpf, `--tc legacy`, what kernels before 6.6 get by
//! default) through its whole lifecycle, on any kernel: a foreground run adds its filters
//! and takes them (and the clsact qdisc it created) away again; a SIGKILLed run's filters
//! outlive it, `status` reports them orphaned and `down` or the next run removes them; a
//! `--persist` re-run swaps the program inside the same filter, keeping maps and flows.
//! `--tc tcx` runs where the kernel has tcx and refuses in one line where it has not.
//!
//! The datapath tests themselves run under legacy tc with `EBPF_NET_TC=legacy` (the Makefile's
//! `test` does for ipv6-hp, proxy, monitor and lb; in the 6.1 and 5.10 VMs auto is legacy).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::kernel::{self, Feature};
use common::servers::{tcp_echo, TcpEchoServer};
use common::topology::{veth, Netns};
use serde_json::Value;

const CLIENT: &str = "10.74.0.1";
const SERVER: &str = "10.74.0.2";
const SERVICE: &str = "10.96.74.1:80";
const BACKEND: &str = "10.74.0.2:8080";

struct Lab {
    client: Netns,
    _server: Netns,
    _echo: TcpEchoServer,
}

/// A client and a server on one veth; the service's network is routed to the server, and
/// only a proxy rule makes the service answer.
fn lab(tag: &str) -> Lab {
    let client = Netns::new(&format!("{tag}-c"));
    let server = Netns::new(&format!("{tag}-s"));
    veth(&client, "eth0", &server, "eth0");
    client.exec(&format!(
        "ip addr add {CLIENT}/24 dev eth0 && ip route add 10.96.74.0/24 via {SERVER}"
    ));
    server.exec(&format!("ip addr add {SERVER}/24 dev eth0"));
    let echo = TcpEchoServer::start(&server, BACKEND.parse().unwrap());
    Lab {
        client,
        _server: server,
        _echo: echo,
    }
}

fn service() -> SocketAddr {
    SERVICE.parse().unwrap()
}

fn proxy(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["proxy", "-i", "eth0", "--map"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(format!("{SERVICE}={BACKEND}"));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Whether the service answers through the proxy (bounded: 2 s).
fn answers(lab: &Lab) -> bool {
    lab.client
        .enter(|| TcpStream::connect_timeout(&service(), Duration::from_secs(2)))
        .is_ok()
}

/// `tc filter show` of both sides of the client's eth0.
fn filters(lab: &Lab) -> String {
    lab.client
        .exec("tc filter show dev eth0 ingress; echo ---; tc filter show dev eth0 egress")
}

fn status(netns: &Netns) -> Value {
    let output = netns.ebpf_net(&["status", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// What `status` lists as attached to this namespace's interfaces (not the cgroup hooks other
/// tests' clusterips may hold meanwhile).
fn attached(netns: &Netns) -> Vec<Value> {
    let mut listed = status(netns)["attached"].as_array().cloned().unwrap_or_default();
    listed.retain(|entry| entry.get("interface").is_some());
    listed
}

#[test]
fn foreground_legacy_run_adds_cls_bpf_filters_and_removes_them_and_its_qdisc() {
    let lab = lab("ltc-fg");
    assert!(!answers(&lab), "the service answers without ebpf-net");
    let daemon = lab.client.ebpf_net_daemon(&strs(&proxy(&["--tc", "legacy"])));
    let ready = daemon
        .wait_stderr(": ready: ", 0, Duration::from_secs(1))
        .unwrap();
    assert!(ready.contains("(legacy tc)"), "{ready}");
    let shown = filters(&lab);
    assert_eq!(shown.matches("direct-action").count(), 2, "{shown}");
    assert!(shown.contains("handle 0xeb9f0000"), "{shown}");
    let (seen, local, peer) = tcp_echo(&lab.client, service(), b"through cls_bpf");
    assert_eq!((seen, peer), (local, service()));
    let listed = attached(&lab.client);
    assert_eq!(listed.len(), 2, "{listed:?}");
    for entry in &listed {
        assert!(entry["hook"].as_str().unwrap().starts_with("tc/"), "{entry}");
        assert_eq!(entry["owner"], "foreground process", "{entry}");
    }

    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log:?}");
    assert_eq!(filters(&lab).trim(), "---", "filters left behind");
    assert!(
        !lab.client.exec("tc qdisc show dev eth0").contains("clsact"),
        "the clsact qdisc it created stays"
    );
    assert!(!answers(&lab));
    assert_eq!(attached(&lab.client), Vec::<Value>::new());
}

#[test]
fn killed_legacy_run_is_reported_orphaned_and_removed_by_down_and_by_the_next_run() {
    let lab = lab("ltc-kill");
    let args = proxy(&["--tc", "legacy"]);

    // killed, then `down`
    let daemon = lab.client.ebpf_net_daemon(&strs(&args));
    let pid = daemon.pid();
    daemon.signal(libc::SIGKILL);
    drop(daemon);
    // the filters outlive the process: the service still answers
    assert!(
        answers(&lab),
        "a SIGKILLed run's filters are gone (they should stay)"
    );
    let listed = attached(&lab.client);
    assert_eq!(listed.len(), 2, "{listed:?}");
    for entry in &listed {
        let owner = entry["owner"].as_str().unwrap();
        assert!(
            owner.contains("orphaned") && owner.contains(&format!("pid {pid}")),
            "{entry}"
        );
    }
    let text = lab.client.ebpf_net(&["status"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("orphaned"));
    let down = lab.client.ebpf_net(&["down"]);
    let said = String::from_utf8_lossy(&down.stderr);
    assert!(down.status.success(), "{said}");
    assert_eq!(said.matches("of a killed run").count(), 2, "{said}");
    assert_eq!(filters(&lab).trim(), "---");
    assert!(!lab.client.exec("tc qdisc show dev eth0").contains("clsact"));
    assert!(!answers(&lab));

    // killed, then the next run takes over: one filter per side, and it answers
    let daemon = lab.client.ebpf_net_daemon(&strs(&args));
    let killed = daemon.pid();
    daemon.signal(libc::SIGKILL);
    drop(daemon);
    let next = lab.client.ebpf_net_daemon(&strs(&args));
    let said = next.stderr().join("\n");
    assert_eq!(
        said.matches(&format!("a killed run (pid {killed}) left")).count(),
        2,
        "{said}"
    );
    let shown = filters(&lab);
    assert_eq!(shown.matches("direct-action").count(), 2, "{shown}");
    assert!(answers(&lab));
    for entry in attached(&lab.client) {
        assert_eq!(entry["owner"], "foreground process", "{entry}");
    }
    let (code, log) = next.stop();
    assert_eq!(code, Some(0), "{log:?}");
    assert_eq!(filters(&lab).trim(), "---");
}

/// The (handle, program id) of our filter on each side, from `status`.
fn legacy_filters(netns: &Netns) -> Vec<(String, u64)> {
    let mut found: Vec<(String, u64)> = attached(netns)
        .iter()
        .map(|entry| {
            (
                entry["hook"].as_str().unwrap().to_string(),
                entry["prog_id"].as_u64().unwrap(),
            )
        })
        .collect();
    found.sort();
    found
}

#[test]
fn persisted_legacy_rerun_swaps_the_program_in_the_same_filter_keeping_flows() {
    let lab = lab("ltc-pin");
    let args = proxy(&["--tc", "legacy", "--persist"]);
    let first = lab.client.ebpf_net(&strs(&args));
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success() && said.contains("(legacy tc)"), "{said}");
    // the second side finds the qdisc the first made: no word from libbpf about it
    assert_eq!(said.lines().count(), 1, "the ready line only: {said}");
    let before = legacy_filters(&lab.client);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(
        before.iter().all(|(hook, _)| hook.starts_with("tc/")),
        "{before:?}"
    );

    // a connection open across the re-run: its replies need the flow the proxy recorded
    let mut stream = lab
        .client
        .enter(|| TcpStream::connect_timeout(&service(), Duration::from_secs(2)))
        .expect("connecting through the persisted proxy");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    let persisted = |netns: &Netns| -> Value {
        status(netns)["persisted"]
            .as_array()
            .unwrap()
            .iter()
            .find(|entry| entry["netns"] == netns.name.as_str() && entry["subcommand"] == "proxy")
            .cloned()
            .expect("the persisted proxy in status")
    };
    // the connection keeps talking (a line every 200 ms; the server closes after 10 s (scaled) of
    // silence) while status is read and the re-run swaps the programs
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (second, exchanged, entry) = std::thread::scope(|scope| {
        let talker = scope.spawn(|| {
            let mut exchanged = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let line = format!("line {exchanged}\n");
                stream
                    .write_all(line.as_bytes())
                    .expect("sending on the open connection");
                let mut echo = String::new();
                reader.read_line(&mut echo).expect("echo on the open connection");
                assert_eq!(echo, line, "the open connection broke after {exchanged} lines");
                exchanged += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            exchanged
        });
        std::thread::sleep(Duration::from_millis(500));
        // (no assertion in here: the talker would never be told to stop)
        let entry = persisted(&lab.client);
        let second = lab.client.ebpf_net(&strs(&args));
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (second, talker.join().expect("the open connection"), entry)
    });
    assert_eq!(entry["state"], "active", "{entry}");
    let flows = entry["details"]["flows"].as_u64();
    assert!(flows.unwrap_or(0) >= 1, "{entry}");
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        second.status.success() && said.contains("updated in place"),
        "{said}"
    );
    assert!(exchanged >= 4, "{exchanged} lines");
    let after = legacy_filters(&lab.client);
    assert_eq!(after.len(), 2, "{after:?}");
    for ((hook_before, id_before), (hook_after, id_after)) in before.iter().zip(&after) {
        assert_eq!(hook_before, hook_after, "the filter moved");
        assert_ne!(id_before, id_after, "the program was not replaced");
    }
    let entry = persisted(&lab.client);
    assert_eq!(entry["state"], "active", "{entry}");
    assert!(entry["details"]["flows"].as_u64() >= flows, "{entry}");

    let down = lab.client.ebpf_net(&["down", "proxy"]);
    assert!(down.status.success());
    assert_eq!(filters(&lab).trim(), "---");
    assert!(!lab.client.exec("tc qdisc show dev eth0").contains("clsact"));
    assert_eq!(attached(&lab.client), Vec::<Value>::new());
}

#[test]
fn tcx_where_the_kernel_has_it_else_a_one_line_refusal() {
    let lab = lab("ltc-tcx");
    let args = proxy(&["--tc", "tcx"]);
    if !kernel::has(Feature::Tcx) {
        let output = lab.client.ebpf_net(&strs(&args));
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert_eq!(said.lines().count(), 1, "{said}");
        assert!(said.contains("6.6"), "{said}");
        assert!(attached(&lab.client).is_empty());
        kernel::skip("the tcx run itself needs tcx links (Linux 6.6); checked the refusal instead");
        return;
    }
    let daemon = lab.client.ebpf_net_daemon(&strs(&args));
    let ready = daemon
        .wait_stderr(": ready: ", 0, Duration::from_secs(1))
        .unwrap();
    assert!(!ready.contains("legacy"), "{ready}");
    assert!(answers(&lab));
    for entry in attached(&lab.client) {
        assert!(entry["hook"].as_str().unwrap().starts_with("tcx/"), "{entry}");
    }
    // no cls_bpf filter, no qdisc
    assert_eq!(filters(&lab).trim(), "---");
    drop(daemon);
    assert!(!answers(&lab));
}
