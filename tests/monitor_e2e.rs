//! monitor end to end: traffic the test makes itself between two namespaces, counted exactly.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::topology::{veth, Netns};
use serde_json::Value;

const PAYLOAD: &[u8] = b"monitor me, exactly";

/// client(c0: 10.77.0.1, fd77::1) <-> server(s0: 10.77.0.2, fd77::2)
fn pair() -> (Netns, Netns) {
    let client = Netns::new("mon-c");
    let server = Netns::new("mon-s");
    veth(&client, "c0", &server, "s0");
    client.exec("ip addr add 10.77.0.1/24 dev c0 && ip -6 addr add fd77::1/64 dev c0 nodad");
    server.exec("ip addr add 10.77.0.2/24 dev s0 && ip -6 addr add fd77::2/64 dev s0 nodad");
    (client, server)
}

/// Sends `count` datagrams that the server echoes; returns the client's source port.
fn echo_datagrams(client: &Netns, server: &Netns, server_ip: &str, count: usize) -> (u16, u16) {
    let server_socket = server.enter(|| UdpSocket::bind(format!("{}:0", wrap(server_ip))).unwrap());
    server_socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let server_port = server_socket.local_addr().unwrap().port();
    let any = if server_ip.contains(':') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let client_socket = client.enter(|| UdpSocket::bind(any).unwrap());
    client_socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let target: SocketAddr = format!("{}:{server_port}", wrap(server_ip)).parse().unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..count {
        client_socket.send_to(PAYLOAD, target).unwrap();
        let (len, peer) = server_socket.recv_from(&mut buf).unwrap();
        server_socket.send_to(&buf[..len], peer).unwrap();
        client_socket.recv_from(&mut buf).unwrap();
    }
    (client_socket.local_addr().unwrap().port(), server_port)
}

fn wrap(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

fn find<'a>(
    flows: &'a [Value],
    direction: &str,
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
) -> Option<&'a Value> {
    flows.iter().find(|flow| {
        flow["direction"] == direction
            && flow["proto"] == "udp"
            && flow["src"] == src
            && flow["sport"] == sport
            && flow["dst"] == dst
            && flow["dport"] == dport
    })
}

#[test]
fn json_reports_exact_counts_per_flow_and_direction() {
    let (client, server) = pair();
    let monitor =
        server.ebpf_net_daemon(&["monitor", "-i", "s0", "--json", "--count", "2", "--interval", "1"]);
    let (v4_client, v4_server) = echo_datagrams(&client, &server, "10.77.0.2", 25);
    let (v6_client, v6_server) = echo_datagrams(&client, &server, "fd77::2", 10);
    let (code, stdout, log) = monitor.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{log:?}");
    let reports: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(reports.len(), 2, "--count 2: {stdout}");
    let flows = reports[1]["flows"].as_array().unwrap();

    let v4_frame = (14 + 20 + 8 + PAYLOAD.len()) as u64;
    let v6_frame = (14 + 40 + 8 + PAYLOAD.len()) as u64;
    for (direction, src, sport, dst, dport, packets, frame) in [
        (
            "ingress",
            "10.77.0.1",
            v4_client,
            "10.77.0.2",
            v4_server,
            25,
            v4_frame,
        ),
        (
            "egress",
            "10.77.0.2",
            v4_server,
            "10.77.0.1",
            v4_client,
            25,
            v4_frame,
        ),
        (
            "ingress", "fd77::1", v6_client, "fd77::2", v6_server, 10, v6_frame,
        ),
        ("egress", "fd77::2", v6_server, "fd77::1", v6_client, 10, v6_frame),
    ] {
        let flow = find(flows, direction, src, sport, dst, dport)
            .unwrap_or_else(|| panic!("no {direction} flow {src}:{sport} -> {dst}:{dport} in {flows:?}"));
        assert_eq!(flow["packets"], packets, "{flow}");
        assert_eq!(flow["bytes"], packets * frame, "{flow}");
    }
    // sorted by bytes, biggest first
    let bytes: Vec<u64> = flows.iter().map(|flow| flow["bytes"].as_u64().unwrap()).collect();
    assert!(bytes.windows(2).all(|pair| pair[0] >= pair[1]), "{bytes:?}");
}

#[test]
fn one_direction_counts_only_that_direction() {
    let (client, server) = pair();
    let monitor = server.ebpf_net_daemon(&[
        "monitor",
        "-i",
        "s0",
        "--json",
        "--count",
        "1",
        "--interval",
        "1",
        "--direction",
        "egress",
    ]);
    echo_datagrams(&client, &server, "10.77.0.2", 5);
    let (code, stdout, log) = monitor.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{log:?}");
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let flows = report["flows"].as_array().unwrap();
    assert!(!flows.is_empty());
    assert!(
        flows.iter().all(|flow| flow["direction"] == "egress"),
        "{flows:?}"
    );
}

#[test]
fn monitor_bad_input_fails_cleanly() {
    let (_client, server) = pair();
    for (args, needle) in [
        (&["monitor", "-i", "nope0"][..], "unknown interface 'nope0'"),
        (&["monitor", "-i", "s0", "--interval", "0"][..], "--interval"),
        (
            &["monitor", "-i", "s0", "--direction", "sideways"][..],
            "sideways",
        ),
        (&["monitor", "-i", "s0", "--count", "0"][..], "--count"),
    ] {
        let output = server.ebpf_net(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
    let status: Value = serde_json::from_slice(&server.ebpf_net(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["attached"], serde_json::json!([]));
}
