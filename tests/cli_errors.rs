//! Bad input: one clear line on stderr, a non-zero exit, and nothing attached or pinned.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use common::topology::{output_within, Netns, BIN};
use ebpf_net::attach::{tcx_programs, TcDirection};

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
        ebpf_net::addr::Interface::all()
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
    let pins: Vec<_> = ebpf_net::pin::PinDir::all()
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
