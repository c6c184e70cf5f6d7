//! Running ebpf-net like a node service, on the lab: `--config`, restarts and config changes
//! under a live TCP connection and UDP stream, SIGHUP reloads, `--metrics`, a killed run's
//! leftovers in `status` and `down`, and one instance per datapath and target.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::kernel::{self, Feature};
use common::lab::Lab;
use common::topology::{output_within, Daemon, BIN};

const B1: &str = "10.77.0.21";
const B2: &str = "10.77.0.22";
const B3: &str = "10.77.0.23";
const VIP: &str = "10.77.0.100";
/// clusterip's VIP: exists nowhere, the socket goes straight to a backend
const CLUSTER_VIP: &str = "10.96.0.10";
/// proxy's FROM: routed to the LB node, rewritten on client1's egress to b1
const PROXY_FROM: &str = "10.96.1.1";

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

/// A config file of this test's own; removed on drop.
struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    fn new(lab: &Lab) -> Self {
        Self {
            path: std::env::temp_dir().join(format!("{}.toml", lab.name)),
        }
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One file for all four service datapaths of the lab. `changed` adds b3 to every service
/// and a second service or rule: a change that removes no backend in use.
fn node_config(lab: &Lab, changed: bool) -> String {
    let (extra_backend, extra) = if changed {
        (format!(", \"{B3}:7\""), true)
    } else {
        (String::new(), false)
    };
    let mut text = format!(
        "# the lab's node config\n\
         [proxy]\ninterface = \"eth0\"\n\
         [[proxy.map]]\nfrom = \"{PROXY_FROM}:7\"\nto = \"{B1}:7\"\n\n\
         [clusterip]\ncgroup = \"{cgroup}\"\n\
         [[clusterip.service]]\nvip = \"{CLUSTER_VIP}:7\"\nbackends = [\"{B1}:7\", \"{B2}:7\"{extra_backend}]\n\n\
         [lb]\ninterface = \"eth0\"\n\
         [[lb.service]]\nvip = \"{VIP}:7\"\nbackends = [\"{B1}:7\", \"{B2}:7\"{extra_backend}]\n\n\
         [xdp-lb]\ninterface = \"eth0\"\n\
         [[xdp-lb.service]]\nvip = \"{VIP}:7\"\nbackends = [\"{B1}:7\", \"{B2}:7\"{extra_backend}]\n",
        cgroup = lab.cgroup()
    );
    if extra {
        text.push_str(&format!(
            "\n[[proxy.map]]\nfrom = \"10.96.1.2:80\"\nto = \"{B2}:80\"\n\
             [[clusterip.service]]\nvip = \"10.96.0.11:80\"\nbackends = [\"{B3}:80\"]\n\
             [[lb.service]]\nvip = \"{VIP}:80\"\nbackends = [\"{B3}:80\"]\n\
             [[xdp-lb.service]]\nvip = \"{VIP}:80\"\nbackends = [\"{B3}:80\"]\n"
        ));
    }
    text
}

/// Runs the persisted datapath, then the same command again and a changed config, while
/// client1 keeps a TCP connection and a UDP stream to `target` busy; none may lose a message.
fn survives_restarts(lab: &Lab, config: &ConfigFile, netns: Option<&str>, datapath: &str, target: &str) {
    config.write(&node_config(lab, false));
    let mut command: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        command.extend(["-n", ns]);
    }
    command.extend([datapath, "--persist", "--config", config.path()]);
    let first = ebpf_net(&command);
    assert!(first.status.success(), "{datapath}: {}", text(&first));

    let stream = lab.spawn_request("client1", &["stream", target, "--seconds", "3"]);
    if let Err(seen) = stream.wait_for("stream: started", Duration::from_secs(10)) {
        panic!("{datapath}: the stream did not start: {seen:?}");
    }
    std::thread::sleep(Duration::from_millis(400));
    let again = ebpf_net(&command);
    assert!(
        again.status.success() && text(&again).contains("updated in place"),
        "{datapath} re-run: {}",
        text(&again)
    );
    std::thread::sleep(Duration::from_millis(400));
    config.write(&node_config(lab, true));
    let changed = ebpf_net(&command);
    assert!(
        changed.status.success() && text(&changed).contains("updated in place"),
        "{datapath} changed config: {}",
        text(&changed)
    );
    let (ok, lines) = stream.finish(Duration::from_secs(20));
    let summary = lines
        .iter()
        .find(|l| l.starts_with("stream: tcp"))
        .cloned()
        .unwrap_or_default();
    assert!(ok, "{datapath}: the stream lost messages: {lines:?}");
    // "tcp N/N echoed ... udp N/N answered"
    let counts: Vec<&str> = summary.split_whitespace().filter(|w| w.contains('/')).collect();
    assert!(
        counts.len() == 2
            && counts
                .iter()
                .all(|c| c.split_once('/').is_some_and(|(a, b)| a == b && a != "0")),
        "{datapath}: {summary}"
    );
    eprintln!("{datapath}: {summary}");

    let mut down: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        down.extend(["-n", ns]);
    }
    down.extend(["down", datapath]);
    let cgroup = lab.cgroup();
    if datapath == "clusterip" {
        down.extend(["--cgroup", &cgroup]);
    }
    let removed = ebpf_net(&down);
    assert!(removed.status.success(), "{}", text(&removed));
}

#[test]
fn persisted_datapaths_keep_connections_across_reruns_and_config_changes() {
    let lab = Lab::up("ops");
    let config = ConfigFile::new(&lab);
    let client1 = lab.ns("client1");
    let lb = lab.ns("lb");
    survives_restarts(&lab, &config, Some(&client1), "proxy", &format!("{PROXY_FROM}:7"));
    survives_restarts(&lab, &config, None, "clusterip", &format!("{CLUSTER_VIP}:7"));
    if kernel::require_for(Feature::CtNat, "lb") {
        survives_restarts(&lab, &config, Some(&lb), "lb", &format!("{VIP}:7"));
    }
    survives_restarts(&lab, &config, Some(&lb), "xdp-lb", &format!("{VIP}:7"));
}

/// GET /metrics from inside a namespace.
fn scrape(netns: &str, addr: &str) -> String {
    let netns = netns.to_string();
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
        // SAFETY: setns on a valid fd affects only this thread.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let mut stream = TcpStream::connect(&addr).expect("connecting to the metrics endpoint");
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    })
    .join()
    .unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels, exactly).
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{metrics}"))
}

#[test]
fn sighup_applies_the_changed_config_and_keeps_the_rest_running() {
    if !kernel::require(Feature::CtNat) {
        return;
    }
    let lab = Lab::up("hup");
    let config = ConfigFile::new(&lab);
    config.write(&node_config(&lab, false));
    let lb = lab.ns("lb");
    let daemon = Daemon::start(&[
        "-n",
        &lb,
        "lb",
        "--config",
        config.path(),
        "--metrics",
        "127.0.0.1:9465",
    ]);

    let stream = lab.spawn_request("client1", &["stream", &format!("{VIP}:7"), "--seconds", "3"]);
    stream
        .wait_for("stream: started", Duration::from_secs(10))
        .unwrap();
    let new_service = format!("{VIP}:80");
    let before = lab.request("client1", &["http", &new_service, "--timeout", "0.5"]);
    assert!(
        !before.status.success(),
        "{new_service} answered before it was configured"
    );

    // the changed file: b3 joins, a new service appears
    config.write(&node_config(&lab, true));
    let logged = daemon.stderr().len();
    daemon.signal(libc::SIGHUP);
    let reloaded = daemon.wait_stderr("lb: reloaded", logged, Duration::from_secs(10));
    assert!(reloaded.is_some(), "no reload: {:?}", daemon.stderr());
    let answer = lab.request("client1", &["http", &new_service]);
    assert!(text(&answer).contains("backend b3"), "{}", text(&answer));

    // a broken file: one line naming file and line, and the running config stays
    config.write("[lb]\ninterface = \"eth0\"\nbogus = 1\n");
    let logged = daemon.stderr().len();
    daemon.signal(libc::SIGHUP);
    let failed = daemon
        .wait_stderr("reload failed", logged, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no failed reload: {:?}", daemon.stderr()));
    assert!(
        failed.contains(&format!("{}:3:1: unknown field `bogus`", config.path())),
        "{failed}"
    );
    let answer = lab.request("client1", &["http", &new_service]);
    assert!(text(&answer).contains("backend b3"), "{}", text(&answer));

    let (ok, lines) = stream.finish(Duration::from_secs(20));
    assert!(ok, "the stream lost messages across reloads: {lines:?}");

    // the metrics of the same run, read from its maps now
    let metrics = scrape(&lb, "127.0.0.1:9465");
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(metrics.contains("application/openmetrics-text"), "{metrics}");
    let flows = sample(
        &metrics,
        &format!("ebpf_net_service_new_flows_total{{datapath=\"lb\",service=\"{VIP}:7\"}}"),
    );
    assert!(flows >= 2, "the stream's TCP and UDP flows: {flows}\n{metrics}");
    let b3 = sample(
        &metrics,
        &format!(
            "ebpf_net_backend_new_flows_total{{datapath=\"lb\",service=\"{VIP}:80\",backend=\"{B3}:80\"}}"
        ),
    );
    assert!(b3 >= 2, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "ebpf_net_errors_total{datapath=\"lb\",error=\"alloc_failed\"}"
        ),
        0
    );
    let (code, _) = daemon.stop();
    assert_eq!(code, Some(0));
}

#[test]
fn every_datapath_serves_metrics_read_at_scrape_time() {
    if !kernel::require(Feature::CtNat) {
        return;
    }
    let lab = Lab::up("met");
    let (client1, lb, b1) = (lab.ns("client1"), lab.ns("lb"), lab.ns("b1"));
    let cgroup = lab.cgroup();
    let http = |target: &str| {
        let answer = lab.request("client1", &["http", target, "--count", "3"]);
        assert!(answer.status.success(), "{target}: {}", text(&answer));
    };

    let proxy = Daemon::start(&[
        "-n",
        &client1,
        "proxy",
        "-i",
        "eth0",
        "--map",
        &format!("{PROXY_FROM}:80={B1}:80"),
        "--metrics",
        "127.0.0.1:9466",
    ]);
    http(&format!("{PROXY_FROM}:80"));
    let metrics = scrape(&client1, "127.0.0.1:9466");
    let rule = format!("{{from=\"{PROXY_FROM}:80\",to=\"{B1}:80\"}}");
    assert!(
        sample(&metrics, &format!("ebpf_net_proxy_rule_packets_total{rule}")) >= 3,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "ebpf_net_rewrites_total{datapath=\"proxy\",direction=\"ingress\"}"
        ) >= 3
    );
    assert!(sample(&metrics, "ebpf_net_proxy_flows") >= 1, "{metrics}");
    drop(proxy);

    let monitor = Daemon::start(&[
        "-n",
        &client1,
        "monitor",
        "-i",
        "eth0",
        "--interval",
        "60",
        "--metrics",
        "127.0.0.1:9467",
    ]);
    http(&format!("{B2}:80"));
    let metrics = scrape(&client1, "127.0.0.1:9467");
    assert!(
        sample(
            &metrics,
            "ebpf_net_monitor_flows{direction=\"egress\",proto=\"tcp\"}"
        ) >= 3,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "ebpf_net_monitor_bytes{direction=\"ingress\",proto=\"tcp\"}"
        ) > 0,
        "{metrics}"
    );
    drop(monitor);

    let clusterip = Daemon::start(&[
        "clusterip",
        "--cgroup",
        &cgroup,
        "--service",
        &format!("{CLUSTER_VIP}:80={B1}:80,{B2}:80"),
        "--metrics",
        "127.0.0.1:9468",
    ]);
    http(&format!("{CLUSTER_VIP}:80"));
    let metrics = std::thread::spawn(|| {
        let mut stream = TcpStream::connect("127.0.0.1:9468").unwrap();
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    })
    .join()
    .unwrap();
    let service = format!("{{datapath=\"clusterip\",service=\"{CLUSTER_VIP}:80\"}}");
    assert_eq!(
        sample(&metrics, &format!("ebpf_net_service_connects_total{service}")),
        3,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "ebpf_net_rewrites_total{datapath=\"clusterip\",direction=\"connect\"}"
        ),
        3
    );
    drop(clusterip);

    let balancer = Daemon::start(&[
        "-n",
        &lb,
        "xdp-lb",
        "-i",
        "eth0",
        "--service",
        &format!("{VIP}:80={B1}:80,{B2}:80"),
        "--metrics",
        "127.0.0.1:9469",
    ]);
    http(&format!("{VIP}:80"));
    let metrics = scrape(&lb, "127.0.0.1:9469");
    let service = format!("{{datapath=\"xdp-lb\",service=\"{VIP}:80\"}}");
    assert_eq!(
        sample(&metrics, &format!("ebpf_net_service_new_flows_total{service}")),
        3,
        "{metrics}"
    );
    assert!(
        sample(&metrics, &format!("ebpf_net_service_packets_in_total{service}")) >= 15,
        "{metrics}"
    );
    assert!(
        sample(&metrics, &format!("ebpf_net_service_bytes_out_total{service}")) > 0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "ebpf_net_errors_total{datapath=\"xdp-lb\",error=\"no_port\"}"
        ),
        0
    );
    assert!(sample(&metrics, "ebpf_net_xdp_lb_flows") >= 3, "{metrics}");
    // an unknown path is not the metrics
    let other = std::thread::spawn({
        let lb = lb.clone();
        move || {
            let file = std::fs::File::open(format!("/run/netns/{lb}")).unwrap();
            // SAFETY: setns on a valid fd affects only this thread.
            assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let mut stream = TcpStream::connect("127.0.0.1:9469").unwrap();
            stream.write_all(b"GET /nope HTTP/1.0\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        }
    })
    .join()
    .unwrap();
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    drop(balancer);

    let hp = Daemon::start(&["-n", &b1, "ipv6-hp", "-i", "eth0", "--metrics", "127.0.0.1:9470"]);
    let probe = lab.request("prober", &["http", "[fd77::21]:80"]);
    assert!(probe.status.success(), "{}", text(&probe));
    let metrics = scrape(&b1, "127.0.0.1:9470");
    assert!(
        sample(
            &metrics,
            "ebpf_net_rewrites_total{datapath=\"ipv6-hp\",direction=\"ingress\"}"
        ) >= 1,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "ebpf_net_rewrites_total{datapath=\"ipv6-hp\",direction=\"egress\"}"
        ) >= 1,
        "{metrics}"
    );
    drop(hp);
}

fn status() -> String {
    text(&ebpf_net(&["status"]))
}

#[test]
fn a_killed_run_is_reported_as_orphaned_and_down_removes_what_it_left() {
    if !kernel::require(Feature::CtNat) {
        return;
    }
    let lab = Lab::up("kil");
    let lb = lab.ns("lb");
    let service = format!("{VIP}:7={B1}:7,{B2}:7");
    let daemon = Daemon::start(&["-n", &lb, "lb", "-i", "eth0", "--service", &service]);
    let pid = daemon.pid();
    daemon.signal(libc::SIGKILL);
    let (code, _) = daemon.stop();
    assert_eq!(code, None, "SIGKILL leaves no exit code");

    let nft = |ns: &str| -> String {
        text(&output_within(
            Command::new("ip").args(["netns", "exec", ns, "nft", "list", "tables"]),
        ))
    };
    assert!(
        nft(&lb).contains("ebpf_net_lb"),
        "the killed run's nft table: {}",
        nft(&lb)
    );
    let shown = status();
    let line = shown
        .lines()
        .find(|l| l.contains(&lb) && l.contains("lb "))
        .unwrap_or_else(|| panic!("status does not list the killed run: {shown}"));
    assert!(
        line.contains(&format!(
            "orphaned: foreground run pid {pid} was killed; left nft table inet ebpf_net_lb"
        )),
        "{line}"
    );
    let json = text(&ebpf_net(&["status", "--json"]));
    assert!(json.contains("\"state\": \"orphaned\""), "{json}");

    let down = ebpf_net(&["-n", &lb, "down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(
        text(&down).contains(&format!("removed the record of a killed lb run (pid {pid})")),
        "{}",
        text(&down)
    );
    assert!(
        text(&down).contains("removed nft table inet ebpf_net_lb"),
        "{}",
        text(&down)
    );
    assert!(!nft(&lb).contains("ebpf_net_lb"), "{}", nft(&lb));
    assert!(!status().contains(&lb), "{}", status());
    let here = text(&ebpf_net(&["-n", &lb, "status"]));
    assert!(
        here.contains(": none"),
        "nothing attached in the namespace: {here}"
    );

    // a new run after a killed one takes over its record
    let daemon = Daemon::start(&["-n", &lb, "lb", "-i", "eth0", "--service", &service]);
    daemon.signal(libc::SIGKILL);
    let _ = daemon.stop();
    let again = Daemon::start(&["-n", &lb, "lb", "-i", "eth0", "--service", &service]);
    assert!(
        again
            .stderr()
            .iter()
            .any(|l| l.contains("taking over from a killed run")),
        "{:?}",
        again.stderr()
    );
    let (code, _) = again.stop();
    assert_eq!(code, Some(0));
    assert!(
        !nft(&lb).contains("ebpf_net_lb"),
        "the clean stop removes the table: {}",
        nft(&lb)
    );
}

#[test]
fn a_second_instance_on_the_same_target_is_refused() {
    let lab = Lab::up("two");
    let (lb, client1, b1) = (lab.ns("lb"), lab.ns("client1"), lab.ns("b1"));
    let service = format!("{VIP}:7={B1}:7");
    let map = format!("{PROXY_FROM}:7={B1}:7");
    let cases: [(&str, Vec<&str>); 4] = [
        ("lb", vec!["-n", &lb, "lb", "-i", "eth0", "--service", &service]),
        (
            "xdp-lb",
            vec!["-n", &lb, "xdp-lb", "-i", "eth0", "--service", &service],
        ),
        (
            "proxy",
            vec!["-n", &client1, "proxy", "-i", "eth0", "--map", &map],
        ),
        ("ipv6-hp", vec!["-n", &b1, "ipv6-hp", "-i", "eth0"]),
    ];
    let lb_runs = kernel::require_for(Feature::CtNat, "lb");
    for (datapath, args) in cases
        .into_iter()
        .filter(|(datapath, _)| lb_runs || *datapath != "lb")
    {
        let first = Daemon::start(&args);
        let second = ebpf_net(&args);
        assert!(!second.status.success(), "{datapath}: {}", text(&second));
        let expected = format!(
            "ebpf-net: error: another ebpf-net {datapath} already runs on eth0 (pid {}, foreground); stop it first",
            first.pid()
        );
        assert_eq!(text(&second).trim(), expected);
        let mut persisted = args.clone();
        persisted.push("--persist");
        let refused = ebpf_net(&persisted);
        assert!(
            !refused.status.success(),
            "{datapath} --persist: {}",
            text(&refused)
        );
        assert!(
            text(&refused).contains("already runs on eth0"),
            "{}",
            text(&refused)
        );
        let (code, _) = first.stop();
        assert_eq!(
            code,
            Some(0),
            "{datapath}: the first keeps running and stops cleanly"
        );
    }
}

/// Every number `status --json` shows of a persisted datapath, after real traffic, equals
/// the one `/metrics` would: both come from one report read, counters declared once.
#[test]
fn status_json_and_metrics_agree_for_every_persisted_datapath() {
    if !kernel::require(Feature::CtNat) {
        return;
    }
    use ebpf_net::datapath::REGISTRY;
    use ebpf_net::kernel::pin::PinDir;
    let lab = Lab::up("agree");
    let (client1, lb, b1) = (lab.ns("client1"), lab.ns("lb"), lab.ns("b1"));
    let cgroup = lab.cgroup();
    let persist = |args: &[&str]| {
        let out = ebpf_net(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    };
    persist(&["-n", &b1, "ipv6-hp", "-i", "eth0", "--persist"]);
    persist(&[
        "-n",
        &client1,
        "proxy",
        "-i",
        "eth0",
        "--persist",
        "--map",
        &format!("{PROXY_FROM}:80={B1}:80"),
    ]);
    let cluster_service = format!("{CLUSTER_VIP}:80={B1}:80,{B2}:80");
    persist(&[
        "clusterip",
        "--cgroup",
        &cgroup,
        "--persist",
        "--service",
        &cluster_service,
    ]);
    let lb_service = format!("{VIP}:80={B1}:80,{B2}:80,{B3}:80");
    persist(&[
        "-n",
        &lb,
        "lb",
        "-i",
        "eth0",
        "--persist",
        "--service",
        &lb_service,
    ]);
    for target in [
        format!("{PROXY_FROM}:80"),
        format!("{CLUSTER_VIP}:80"),
        format!("{VIP}:80"),
    ] {
        let answer = lab.request("client1", &["http", &target, "--count", "4"]);
        assert!(answer.status.success(), "{target}: {}", text(&answer));
    }
    let probe = lab.request("prober", &["http", "[fd77::21]:80"]);
    assert!(probe.status.success(), "{}", text(&probe));

    let status: serde_json::Value = serde_json::from_slice(&ebpf_net(&["status", "--json"]).stdout).unwrap();
    let text_status = status_text();
    let mut checked = 0;
    for entry in status["persisted"].as_array().unwrap() {
        let (subcommand, netns, target) = (
            entry["subcommand"].as_str().unwrap(),
            entry["netns"].as_str().unwrap(),
            entry["target"].as_str().unwrap(),
        );
        let ours = [b1.as_str(), client1.as_str(), lb.as_str()].contains(&netns)
            || (subcommand == "clusterip" && entry["target_display"].as_str().unwrap().ends_with(&lab.name));
        if !ours {
            continue;
        }
        let datapath = REGISTRY.iter().find(|d| d.name() == subcommand).unwrap();
        let report = datapath
            .report_pinned(&PinDir::new(subcommand, netns, target))
            .unwrap();
        let metrics = ebpf_net::control::metrics::render(report.families).unwrap();
        let details = &entry["details"];
        let expect = |series: String, value: &serde_json::Value| {
            assert_eq!(
                sample(&metrics, &series),
                value.as_u64().unwrap_or_else(|| panic!("{series}: {value}")),
                "{subcommand}: {series}"
            );
        };
        match subcommand {
            "ipv6-hp" => {
                for side in ["ingress", "egress"] {
                    expect(
                        format!("ebpf_net_rewrites_total{{datapath=\"ipv6-hp\",direction=\"{side}\"}}"),
                        &details[side]["rewritten_packets"],
                    );
                    expect(
                        format!("ebpf_net_rewrite_bytes_total{{datapath=\"ipv6-hp\",direction=\"{side}\"}}"),
                        &details[side]["rewritten_bytes"],
                    );
                }
                assert!(details["ingress"]["rewritten_packets"].as_u64().unwrap() >= 1);
            }
            "proxy" => {
                let rule = &details["rules"][0];
                for field in [
                    "packets",
                    "bytes",
                    "replies",
                    "reply_bytes",
                    "rerouted",
                    "icmp_errors",
                ] {
                    expect(
                        format!(
                            "ebpf_net_proxy_rule_{field}_total{{from=\"{}\",to=\"{}\"}}",
                            rule["from"].as_str().unwrap(),
                            rule["to"].as_str().unwrap()
                        ),
                        &rule[field],
                    );
                }
                assert!(rule["packets"].as_u64().unwrap() >= 4, "{rule}");
            }
            "clusterip" | "lb" => {
                for service in details["services"].as_array().unwrap() {
                    let vip = service["vip"].as_str().unwrap();
                    for (field, value) in service["totals"].as_object().unwrap() {
                        expect(
                            format!("ebpf_net_service_{field}_total{{datapath=\"{subcommand}\",service=\"{vip}\"}}"),
                            value,
                        );
                    }
                    for backend in service["backends"].as_array().unwrap() {
                        let addr = backend["backend"].as_str().unwrap();
                        // the weight is a gauge, every other field a counter
                        expect(
                            format!("ebpf_net_backend_weight{{datapath=\"{subcommand}\",service=\"{vip}\",backend=\"{addr}\"}}"),
                            &backend["weight"],
                        );
                        for (field, value) in backend.as_object().unwrap() {
                            if field != "backend" && field != "weight" {
                                expect(
                                    format!("ebpf_net_backend_{field}_total{{datapath=\"{subcommand}\",service=\"{vip}\",backend=\"{addr}\"}}"),
                                    value,
                                );
                            }
                        }
                    }
                }
                let total: u64 = details["services"][0]["totals"]
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|v| v.as_u64().unwrap())
                    .sum();
                assert!(total >= 4, "{subcommand}: {details}");
                if subcommand == "lb" {
                    for (name, value) in details["counters"].as_object().unwrap() {
                        let in_events = metrics.contains(&format!("event=\"{name}\""));
                        let label = if in_events { "event" } else { "error" };
                        let family = if in_events { "events" } else { "errors" };
                        expect(
                            format!("ebpf_net_{family}_total{{datapath=\"lb\",{label}=\"{name}\"}}"),
                            value,
                        );
                    }
                }
            }
            other => panic!("unexpected {other}"),
        }
        // the text line says the same
        assert!(
            text_status.contains(entry["summary"].as_str().unwrap()),
            "{subcommand}: {} not in {text_status}",
            entry["summary"]
        );
        checked += 1;
    }
    assert_eq!(checked, 4, "{status}");
    for (netns, datapath) in [(&b1, "ipv6-hp"), (&client1, "proxy"), (&lb, "lb")] {
        let out = ebpf_net(&["-n", netns, "down", datapath]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = ebpf_net(&["down", "clusterip", "--cgroup", &cgroup]);
    assert!(out.status.success(), "{}", text(&out));
}

fn status_text() -> String {
    String::from_utf8_lossy(&ebpf_net(&["status"]).stdout).into_owned()
}
