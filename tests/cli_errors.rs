//! Bad input: one clear line on stderr, a non-zero exit, and nothing attached or pinned.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use common::topology::{output_within, Netns, BIN};
use ebpf_net::kernel::attach::{tcx_programs, TcDirection};

/// Asserts a failure with exactly one line that mentions `needle`.
fn assert_one_clear_line(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, got success: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(
        lines[0].contains(needle),
        "'{}' does not mention '{needle}'",
        lines[0]
    );
}

/// Nothing of ours on any hook of the namespace, and nothing pinned for it.
fn assert_nothing_attached(netns: &Netns) {
    let attached: Vec<String> = netns.enter(|| {
        ebpf_net::kernel::addr::Interface::all()
            .iter()
            .flat_map(|iface| {
                TcDirection::BOTH.iter().flat_map(move |&dir| {
                    tcx_programs(iface.index, dir)
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |p| format!("{} {}", iface.name, p.name))
                })
            })
            .collect()
    });
    assert!(attached.is_empty(), "left attached: {attached:?}");
    let pins: Vec<_> = ebpf_net::kernel::pin::PinDir::all()
        .into_iter()
        .filter(|pins| pins.netns == netns.name)
        .collect();
    assert!(pins.is_empty(), "left pinned: {pins:?}");
}

#[test]
fn ipv6_hp_bad_input_fails_cleanly() {
    let node = Netns::new("cli");
    node.exec("ip link add eth0 type veth peer name eth1 && ip link set eth0 up && ip link set eth1 up");
    let cases: &[(&[&str], &str)] = &[
        (&["ipv6-hp", "-i", "nope0"], "unknown interface 'nope0'"),
        (
            &["ipv6-hp", "-i", "eth0", "--global", "2603::zz"],
            "--global 2603::zz: not an IPv6 address",
        ),
        (&["ipv6-hp", "-i", "eth0", "--link-local", "10.0.0.1"], "IPv4"),
        (&["ipv6-hp", "-i", "eth0", "--global", "ff02::1"], "unicast"),
        (
            &["ipv6-hp", "-i", "eth0", "--global", "fe80::1234:5678:9abc"],
            "must differ",
        ),
        (&["ipv6-hp", "-i", "eth0", "--bogus"], "--bogus"),
        (&["ipv6-hp"], "no interface: give -i"),
        (&["down", "no-such-datapath"], "no-such-datapath"),
    ];
    for (args, needle) in cases {
        let output = node.ebpf_net(args);
        assert_one_clear_line(&output, needle);
        assert_nothing_attached(&node);
    }
}

#[test]
fn unknown_namespace_fails_cleanly() {
    let output =
        output_within(Command::new(BIN).args(["--netns", "ebn-no-such-ns", "ipv6-hp", "-i", "eth0"]));
    assert_one_clear_line(&output, "network namespace 'ebn-no-such-ns' not found");
}

#[test]
fn not_root_fails_cleanly() {
    let node = Netns::new("cli-user");
    node.exec("ip link add eth0 type veth peer name eth1");
    let output = output_within(
        Command::new(BIN)
            .args(["--netns", &node.name, "ipv6-hp", "-i", "eth0"])
            .uid(65534)
            .gid(65534),
    );
    assert_one_clear_line(&output, "needs root");
    assert_nothing_attached(&node);
}

#[test]
fn persist_under_ip_netns_exec_refuses_instead_of_pinning_into_a_private_sys() {
    let node = Netns::new("cli-exec");
    node.exec("ip link add eth0 type veth peer name eth1");
    let output = output_within(Command::new("ip").args([
        "netns",
        "exec",
        &node.name,
        BIN,
        "ipv6-hp",
        "-i",
        "eth0",
        "--persist",
    ]));
    assert_one_clear_line(&output, "--netns NAME");
    assert_nothing_attached(&node);
}

/// Nothing of ours on any tc or XDP hook of the namespace, no pins for it, no clusterip on the
/// cgroup, and no run record left.
fn assert_nothing_left(netns: &Netns, cgroup: &str) {
    assert_nothing_attached(netns);
    let xdp: Vec<String> = netns.enter(|| {
        ebpf_net::kernel::addr::Interface::all()
            .iter()
            .filter_map(|iface| {
                ebpf_net::kernel::attach::xdp_program(iface.index)
                    .map(|p| format!("{} {}", iface.name, p.name))
            })
            .collect()
    });
    assert!(xdp.is_empty(), "left on XDP: {xdp:?}");
    let relative = cgroup
        .trim_start_matches(&common::cgroup::cgroup2_root().display().to_string())
        .to_string();
    let on_cgroup: Vec<_> = ebpf_net::datapath::clusterip::attached()
        .into_iter()
        .filter(|(path, _, _)| *path == relative)
        .collect();
    assert!(on_cgroup.is_empty(), "left on the cgroup: {on_cgroup:?}");
    let runs: Vec<_> = ebpf_net::control::instance::all()
        .into_iter()
        .filter(|claim| claim.record.netns == netns.name || claim.record.target.contains("ebn-clicg"))
        .map(|claim| claim.path)
        .collect();
    assert!(runs.is_empty(), "run records left: {runs:?}");
    let status = output_within(Command::new(BIN).args(["--netns", &netns.name, "status"]));
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains(": none"),
        "status shows something attached: {shown}"
    );
}

#[test]
fn every_subcommand_refuses_malformed_arguments_and_configs_with_one_line() {
    let node = Netns::new("clicfg");
    node.exec("ip link add eth0 type veth peer name eth1 && ip link set eth0 up && ip link set eth1 up");
    let cgroup = common::cgroup::TestCgroup::new("clicg");
    let cg = cgroup.path_str().to_string();
    let file = std::env::temp_dir().join(format!("ebn-cli-{}.toml", std::process::id()));
    let path = file.to_str().unwrap().to_string();
    // removed on drop, also when an assertion fails
    struct Removed(std::path::PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _removed = Removed(file.clone());
    let svc = "10.96.0.1:80=10.0.0.1:80";
    // (subcommand and flags, config file text or none, what the one line must say)
    let cases: Vec<(Vec<&str>, Option<String>, String)> = vec![
        // the file itself
        (vec!["lb", "--config", "/nonexistent.toml"], None, "reading config file /nonexistent.toml".into()),
        (vec!["lb"], Some("[lb\n".into()), format!("{path}:1:4:")),
        (vec!["lb"], Some("[lb]\ninterface = \"eth0\"\nbogus = 1\n".into()), format!("{path}:3:1: unknown field `bogus`")),
        (vec!["lb"], Some("[lbb]\n".into()), format!("{path}:1:2: unknown field `lbb`")),
        (vec!["lb"], Some("[proxy]\ninterface = \"eth0\"\n".into()), format!("{path}: no [lb] table")),
        (vec!["lb"], Some("[lb]\nno-snat = \"yes\"\n".into()), format!("{path}:2:11: invalid type")),
        // ipv6-hp
        (vec!["ipv6-hp"], Some("[ipv6-hp]\ninterface = \"eth0\"\nlink-local = \"10.0.0.1\"\n".into()), format!("{path}:3: link-local")),
        (vec!["ipv6-hp"], Some("[ipv6-hp]\ninterface = \"nope0\"\n".into()), "unknown interface 'nope0'".into()),
        (vec!["ipv6-hp", "-i", "eth0", "--metrics", "nowhere"], None, "--metrics nowhere: expected ADDR:PORT".into()),
        (vec!["ipv6-hp", "-i", "eth0", "--persist", "--metrics", "127.0.0.1:9999"], None, "--metrics needs a foreground run".into()),
        // monitor
        (vec!["monitor", "-i", "nope0"], None, "unknown interface 'nope0'".into()),
        (vec!["monitor", "-i", "eth0", "--interval", "0"], None, "--interval".into()),
        (vec!["monitor"], Some("[monitor]\ninterface = \"eth0\"\ninterval = 0.0\n".into()), format!("{path}:3: interval must be")),
        (vec!["monitor"], Some("[monitor]\ninterface = \"eth0\"\ndirection = \"sideways\"\n".into()), format!("{path}:3:13: unknown variant `sideways`")),
        (vec!["monitor", "-i", "eth0", "--count", "0"], None, "--count 0".into()),
        // proxy
        (vec!["proxy", "-i", "eth0", "--map", "10.0.0.1:80"], None, "--map 10.0.0.1:80: expected FROM_IP:PORT=TO_IP:PORT".into()),
        (vec!["proxy", "-i", "eth0"], None, "no rules: give --map".into()),
        (vec!["proxy"], Some("[proxy]\ninterface = \"eth0\"\n[[proxy.map]]\nfrom = \"10.0.0.1:80\"\n".into()), format!("{path}:3:1: missing field `to`")),
        (vec!["proxy"], Some("[proxy]\ninterface = \"eth0\"\n[[proxy.map]]\nfrom = \"10.0.0.1\"\nto = \"10.0.0.2:80\"\n".into()), format!("{path}:3: map 10.0.0.1: '10.0.0.1' is not IP:PORT")),
        (vec!["proxy", "--map", "10.0.0.1:80=10.0.0.3:80"], Some("[proxy]\ninterface = \"eth0\"\n[[proxy.map]]\nfrom = \"10.0.0.1:80\"\nto = \"10.0.0.2:80\"\n".into()), format!("--map 10.0.0.1:80=10.0.0.3:80: FROM 10.0.0.1:80 is mapped twice (also at {path}:3: map 10.0.0.1:80)")),
        // clusterip
        (vec!["clusterip", "--cgroup", &cg], None, "no services: give --service".into()),
        (vec!["clusterip"], Some(format!("[clusterip]\ncgroup = \"{cg}\"\n[[clusterip.service]]\nvip = \"10.96.0.1:80\"\nbackends = [\"10.0.0.1:80\", \"[fd00::1]:80\"]\n")), format!("{path}:3: service 10.96.0.1:80: backend [fd00::1]:80 is not of the VIP's address family")),
        (vec!["clusterip", "--service", svc], Some("[clusterip]\ncgroup = \"/tmp\"\n".into()), format!("{path}:2: cgroup:")),
        // lb
        (vec!["lb"], Some("[lb]\n[[lb.service]]\nvip = \"10.96.0.1:80\"\nbackends = [\"10.0.0.1:80\"]\n".into()), format!("no interface: give -i or `interface` in the [lb] table of {path}")),
        (vec!["lb"], Some("[lb]\ninterface = \"eth0\"\n[[lb.service]]\nvip = \"10.96.0.1:80\"\nbackends = []\n".into()), format!("{path}:3: service 10.96.0.1:80: no backends")),
        (vec!["lb", "--service", svc], Some("[lb]\ninterface = \"nope0\"\n".into()), format!("{path}:2: interface: unknown interface 'nope0'")),
        (vec!["lb", "-i", "eth0", "--service", "10.96.0.1:80=127.0.0.1:80"], None, "not a unicast address".into()),
        // xdp-lb
        (vec!["xdp-lb", "--service", svc], Some("[xdp-lb]\ninterface = \"eth0\"\nmode = \"turbo\"\n".into()), format!("{path}:3:8: unknown variant `turbo`")),
        (vec!["xdp-lb", "--service", svc], Some("[xdp-lb]\ninterface = \"eth0\"\nmax-flows = 3\n".into()), format!("{path}:3: max-flows 3 is not in 16..=16777216")),
        (vec!["xdp-lb"], Some("[xdp-lb]\ninterface = \"eth0\"\n[[xdp-lb.service]]\nvip = \"10.96.0.1:80\"\nbackends = [\"10.0.0.1:80@02:zz:00:00:00:01\"]\n".into()), format!("{path}:3: service 10.96.0.1:80: backend 10.0.0.1:80")),
        (vec!["xdp-lb", "-i", "eth0", "--service", svc, "--max-flows", "3"], None, "--max-flows".into()),
        // status and down
        (vec!["status", "--bogus"], None, "--bogus".into()),
        (vec!["down", "--cgroup", "/tmp"], None, "--cgroup /tmp: outside the cgroup v2 mount".into()),
        (vec!["down", "lb", "-i", "eth0", "--cgroup", &cg], None, "cannot be used with".into()),
    ];
    for (args, config, needle) in &cases {
        let mut full: Vec<&str> = args.clone();
        if let Some(text) = config {
            std::fs::write(&file, text).unwrap();
            full.extend(["--config", &path]);
        }
        // clusterip works on cgroups, which belong to no namespace
        let output = if args[0] == "clusterip" {
            output_within(Command::new(BIN).args(&full))
        } else {
            node.ebpf_net(&full)
        };
        assert_one_clear_line(&output, needle);
        assert_nothing_left(&node, &cg);
    }
}
