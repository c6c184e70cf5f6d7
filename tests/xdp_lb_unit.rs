//! test_run tables for the xdp-lb program: exact output bytes (frames built by etherparse
//! with the addresses expected), checksums checked by etherparse's parser, and the flow table
//! the program leaves behind.

mod common;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};

use common::packets::*;
use common::topology::Netns;
use ebpf_net::control::service::{self, parse_services, Service};
use ebpf_net::datapath::xdp_lb::{self, Backend, Flow, Options};
use ebpf_net::kernel::skel::xdp_lb::types::{xdp_lb_counters, xdp_lb_stats};
use libbpf_rs::{ProgramInput, ProgramMut};

const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];
const PORTS: (u16, u16) = (20000, 1000);

fn sock(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A backend's MAC: 02:00:00:00:bb:<last byte of its address>.
fn backend_mac(backend: SocketAddr) -> [u8; 6] {
    let last = match backend.ip() {
        IpAddr::V4(ip) => ip.octets()[3],
        IpAddr::V6(ip) => ip.octets()[15],
    };
    [0x02, 0, 0, 0, 0xbb, last]
}

fn lb_addr(of: SocketAddr) -> IpAddr {
    if of.is_ipv4() {
        "10.1.0.1".parse().unwrap()
    } else {
        "fd01::1".parse().unwrap()
    }
}

fn services(texts: &[&str]) -> Vec<Service> {
    let texts: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
    parse_services(&texts, xdp_lb::LIMITS).unwrap()
}

fn backends_of(services: &[Service]) -> HashMap<SocketAddr, Backend> {
    services
        .iter()
        .flat_map(|svc| svc.addrs())
        .map(|backend| {
            (
                backend,
                Backend {
                    lb_addr: lb_addr(backend),
                    mac: backend_mac(backend),
                },
            )
        })
        .collect()
}

fn options(max_flows: u32, ports: (u16, u16)) -> Options {
    Options {
        events: 0,
        max_flows,
        flood_rate: 0,
        ports,
        seed: Some(0x5eed),
    }
}

fn load<'obj>(
    object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    services: &[Service],
    max_flows: u32,
    ports: (u16, u16),
) -> ebpf_net::kernel::skel::xdp_lb::XdpLbSkel<'obj> {
    xdp_lb::load_with_services(
        object,
        &options(max_flows, ports),
        services,
        &backends_of(services),
    )
    .unwrap()
}

/// A frame from `src` to `dst` between two MACs, with correct checksums.
fn frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: SocketAddr, dst: SocketAddr, l4: L4) -> Vec<u8> {
    let mut frame = l4_frame(src, dst, l4);
    frame[0..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&src_mac);
    frame
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run(prog: &ProgramMut<'_>, input: &[u8]) -> (i32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let result = prog
        .test_run(ProgramInput {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("test_run");
    let data = result.data.map(|data| data.to_vec()).unwrap_or_default();
    (result.return_value as i32, data)
}

/// Runs one frame and checks verdict, exact bytes and (for rewritten frames) checksums.
fn expect(prog: &ProgramMut<'_>, name: &str, input: &[u8], verdict: i32, output: &[u8]) {
    let (got_verdict, got) = run(prog, input);
    let mut problems = Vec::new();
    if got_verdict != verdict {
        problems.push(format!("verdict {got_verdict}, expected {verdict}"));
    }
    if got != output {
        problems.push(format!(
            "output differs\n    input    {}\n    expected {}\n    got      {}",
            hex(input),
            hex(output),
            hex(&got)
        ));
    }
    if verdict == XDP_TX {
        if let Err(err) = verify_l4_checksum(&got, true) {
            problems.push(format!("checksum: {err}"));
        }
    }
    assert!(problems.is_empty(), "{name}: {}", problems.join("; "));
}

fn flow_of(flows: &[Flow], client: SocketAddr, vip: SocketAddr, proto: u8) -> Flow {
    flows
        .iter()
        .find(|flow| flow.client == client && flow.vip == vip && flow.proto == proto)
        .unwrap_or_else(|| panic!("no flow {client} -> {vip} in {flows:?}"))
        .clone()
}

fn proto_of(l4: L4) -> u8 {
    if l4 == L4::Udp {
        17
    } else {
        6
    }
}

#[test]
fn clients_go_to_backends_and_replies_come_back_rewritten() {
    let netns = Netns::new("xlb-unit");
    netns.enter(|| {
        let services = services(&[
            "10.96.0.10:80=10.1.0.2:8080,10.1.0.3:8080,10.1.0.4:8080",
            "10.96.0.10:53=10.1.0.5:5353",
            "[fd96::10]:80=[fd01::2]:8080,[fd01::3]:8080,[fd01::4]:8080",
            "[fd96::10]:53=[fd01::5]:5353",
        ]);
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, &services, 1024, PORTS);
        let prog = xdp_lb::program(&skel);

        let cases = [
            (
                "v4 tcp",
                sock("10.0.0.1:40000"),
                sock("10.0.0.2:40000"),
                sock("10.96.0.10:80"),
                L4::Tcp,
            ),
            (
                "v4 udp",
                sock("10.0.0.1:40000"),
                sock("10.0.0.2:40000"),
                sock("10.96.0.10:53"),
                L4::Udp,
            ),
            (
                "v6 tcp",
                sock("[2001:db8::1]:40000"),
                sock("[2001:db8::2]:40000"),
                sock("[fd96::10]:80"),
                L4::Tcp,
            ),
            (
                "v6 udp",
                sock("[2001:db8::1]:40000"),
                sock("[2001:db8::2]:40000"),
                sock("[fd96::10]:53"),
                L4::Udp,
            ),
        ];
        for (name, client, other_client, vip, l4) in cases {
            // two clients with the same source port, one through a router
            for (client, client_mac) in [(client, CLIENT_MAC), (other_client, ROUTER_MAC)] {
                let input = frame(client_mac, LB_MAC, client, vip, l4);
                let (verdict, _) = run(prog, &input);
                assert_eq!(verdict, XDP_TX, "{name} {client}");
                let flows = xdp_lb::all_flows(&skel).unwrap();
                let flow = flow_of(&flows, client, vip, proto_of(l4));
                assert_eq!(flow.lb_addr, lb_addr(vip), "{name}");
                assert_eq!(flow.client_mac, client_mac, "{name}");
                assert!(
                    (PORTS.0..PORTS.0 + PORTS.1).contains(&flow.lb_port),
                    "{name}: {flow:?}"
                );
                let lb = SocketAddr::new(flow.lb_addr, flow.lb_port);
                // exact bytes: the same frame from us to the backend
                let to_backend = frame(LB_MAC, backend_mac(flow.backend), lb, flow.backend, l4);
                expect(
                    prog,
                    &format!("{name} {client} again"),
                    &input,
                    XDP_TX,
                    &to_backend,
                );
                // the backend's reply goes back to the client, from the VIP
                let reply = frame(backend_mac(flow.backend), LB_MAC, flow.backend, lb, l4);
                let to_client = frame(LB_MAC, client_mac, vip, client, l4);
                expect(
                    prog,
                    &format!("{name} reply to {client}"),
                    &reply,
                    XDP_TX,
                    &to_client,
                );
            }
            let flows = xdp_lb::all_flows(&skel).unwrap();
            let a = flow_of(&flows, client, vip, proto_of(l4));
            let b = flow_of(&flows, other_client, vip, proto_of(l4));
            assert!(
                (a.backend, a.lb_port) != (b.backend, b.lb_port),
                "{name}: two clients on one source port share {a:?}"
            );
        }
        assert_eq!(xdp_lb::all_flows(&skel).unwrap().len(), 8);

        // untouched: other ports of a VIP, unknown replies, frames that are not ours
        let client = sock("10.0.0.1:40000");
        let lb = sock("10.1.0.1:20001");
        let mut fragment = frame(CLIENT_MAC, LB_MAC, client, sock("10.96.0.10:80"), L4::Tcp);
        fragment[14 + 6] |= 0x20; // more fragments
        let untouched = [
            (
                "a VIP port without a service",
                frame(CLIENT_MAC, LB_MAC, client, sock("10.96.0.10:81"), L4::Tcp),
            ),
            (
                "another address",
                frame(CLIENT_MAC, LB_MAC, client, sock("10.96.0.11:80"), L4::Tcp),
            ),
            (
                "a packet to us from a backend, no flow",
                frame(
                    backend_mac(sock("10.1.0.2:8080")),
                    LB_MAC,
                    sock("10.1.0.2:8080"),
                    lb,
                    L4::Tcp,
                ),
            ),
            (
                "the right backend, the wrong port",
                frame(LB_MAC, LB_MAC, sock("10.1.0.2:8081"), lb, L4::Tcp),
            ),
            (
                "icmpv6",
                frame(
                    CLIENT_MAC,
                    LB_MAC,
                    sock("[2001:db8::1]:0"),
                    sock("[fd96::10]:0"),
                    L4::Icmpv6Echo,
                ),
            ),
            ("an IPv4 first fragment", fragment.clone()),
        ];
        for (name, input) in untouched {
            expect(prog, name, &input, XDP_PASS, &input);
        }
        // frames cut anywhere inside their headers: passed as they are
        for l4 in [L4::Tcp, L4::Udp] {
            for vip in [sock("10.96.0.10:80"), sock("[fd96::10]:80")] {
                let client = if vip.is_ipv4() {
                    sock("10.0.0.9:1")
                } else {
                    sock("[2001:db8::9]:1")
                };
                let whole = frame(CLIENT_MAC, LB_MAC, client, vip, l4);
                let headers = whole.len() - PAYLOAD.len();
                for cut in 14..headers {
                    let input = &whole[..cut];
                    expect(
                        prog,
                        &format!("{vip} {l4:?} cut at {cut}"),
                        input,
                        XDP_PASS,
                        input,
                    );
                }
            }
        }
        assert_eq!(
            xdp_lb::all_flows(&skel).unwrap().len(),
            8,
            "no flow from bad frames"
        );
    });
}

#[test]
fn header_variants_keep_their_shape_and_checksums() {
    let netns = Netns::new("xlb-unit2");
    netns.enter(|| {
        let services = services(&["10.96.0.10:53=10.1.0.5:5353", "10.96.0.10:80=10.1.0.2:8080"]);
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, &services, 1024, PORTS);
        let prog = xdp_lb::program(&skel);
        let vip = sock("10.96.0.10:53");
        let backend = sock("10.1.0.5:5353");

        // a UDP datagram without a checksum stays without one
        let client = sock("10.0.0.1:1111");
        let input = zero_udp_checksum(frame(CLIENT_MAC, LB_MAC, client, vip, L4::Udp));
        run(prog, &input);
        let flow = flow_of(&xdp_lb::all_flows(&skel).unwrap(), client, vip, 17);
        let lb = SocketAddr::new(flow.lb_addr, flow.lb_port);
        let output = zero_udp_checksum(frame(LB_MAC, backend_mac(backend), lb, backend, L4::Udp));
        expect(prog, "udp without checksum", &input, XDP_TX, &output);

        // IPv4 options and an 802.1Q tag stay where they are
        let client = sock("10.0.0.1:2222");
        let options = [1u8, 1, 1, 0];
        let with_options = |src: SocketAddr, dst: SocketAddr, src_mac: [u8; 6], dst_mac: [u8; 6]| {
            let mut f = frame_with_options(src, dst, &options, L4::Tcp);
            f[0..6].copy_from_slice(&dst_mac);
            f[6..12].copy_from_slice(&src_mac);
            f
        };
        let vip80 = sock("10.96.0.10:80");
        let backend80 = sock("10.1.0.2:8080");
        let input = with_vlan(&with_options(client, vip80, CLIENT_MAC, LB_MAC));
        run(prog, &input);
        let flow = flow_of(&xdp_lb::all_flows(&skel).unwrap(), client, vip80, 6);
        let lb = SocketAddr::new(flow.lb_addr, flow.lb_port);
        let output = with_vlan(&with_options(lb, backend80, LB_MAC, backend_mac(backend80)));
        expect(prog, "vlan + ip options", &input, XDP_TX, &output);
        let reply = with_vlan(&with_options(backend80, lb, backend_mac(backend80), LB_MAC));
        let back = with_vlan(&with_options(vip80, client, LB_MAC, CLIENT_MAC));
        expect(prog, "vlan + ip options reply", &reply, XDP_TX, &back);
    });
}

#[test]
fn a_full_flow_table_makes_room_and_sources_ports_run_out_cleanly() {
    let netns = Netns::new("xlb-unit3");
    netns.enter(|| {
        let services = services(&["10.96.0.10:80=10.1.0.2:8080,10.1.0.3:8080,10.1.0.4:8080"]);
        let vip = sock("10.96.0.10:80");
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, &services, 256, PORTS);
        let prog = xdp_lb::program(&skel);
        // 2,000 half-open flows through a table of 256: every one is balanced (a half-open
        // flow gives its slot to a new one), the table stays within its size, the latest flow
        // is there, and every flow in the table answers
        let clients: Vec<SocketAddr> = (0..2000u32)
            .map(|i| {
                SocketAddr::new(
                    IpAddr::from([10, 0, (i / 250) as u8, (i % 250) as u8 + 1]),
                    30000 + i as u16,
                )
            })
            .collect();
        for client in &clients {
            let (verdict, _) = run(prog, &frame(CLIENT_MAC, LB_MAC, *client, vip, L4::Tcp));
            assert_eq!(verdict, XDP_TX, "{client}");
        }
        let flows = xdp_lb::all_flows(&skel).unwrap();
        assert!(
            flows.len() <= 256 && flows.len() >= 128,
            "{} flows in a table of 256",
            flows.len()
        );
        flow_of(&flows, clients[clients.len() - 1], vip, 6);
        for flow in &flows {
            let lb = SocketAddr::new(flow.lb_addr, flow.lb_port);
            let reply = frame(backend_mac(flow.backend), LB_MAC, flow.backend, lb, L4::Tcp);
            let to_client = frame(LB_MAC, CLIENT_MAC, vip, flow.client, L4::Tcp);
            expect(
                prog,
                &format!("reply to {}", flow.client),
                &reply,
                XDP_TX,
                &to_client,
            );
        }

        // four source ports towards a single backend, five clients on the same source port:
        // four get a port each, the fifth is dropped and counted
        let one = parse_services(&["10.96.0.10:80=10.1.0.2:8080".to_string()], xdp_lb::LIMITS).unwrap();
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, &one, 256, (20000, 4));
        let prog = xdp_lb::program(&skel);
        for (i, verdict) in [XDP_TX, XDP_TX, XDP_TX, XDP_TX, XDP_DROP].into_iter().enumerate() {
            let client = SocketAddr::new(IpAddr::from([10, 0, 0, i as u8 + 1]), 40000);
            let (got, _) = run(prog, &frame(CLIENT_MAC, LB_MAC, client, vip, L4::Tcp));
            assert_eq!(got, verdict, "client {client}");
        }
        let mut ports: Vec<u16> = xdp_lb::all_flows(&skel)
            .unwrap()
            .iter()
            .map(|flow| flow.lb_port)
            .collect();
        ports.sort();
        assert_eq!(ports, vec![20000, 20001, 20002, 20003]);
        // four clients on one source port, one backend: each reply finds its own client
        for flow in xdp_lb::all_flows(&skel).unwrap() {
            let lb = SocketAddr::new(flow.lb_addr, flow.lb_port);
            let reply = frame(backend_mac(flow.backend), LB_MAC, flow.backend, lb, L4::Tcp);
            let to_client = frame(LB_MAC, CLIENT_MAC, vip, flow.client, L4::Tcp);
            expect(
                prog,
                &format!("reply to {}", flow.client),
                &reply,
                XDP_TX,
                &to_client,
            );
        }
        let counters: xdp_lb_counters =
            ebpf_net::kernel::maps::sum_percpu_counters(&skel.maps.xdp_lb_counters, 0).unwrap();
        assert_eq!((counters.no_port, counters.new_flows), (1, 4));
    });
}

#[test]
fn a_flow_keeps_its_backend_until_that_backend_leaves() {
    let netns = Netns::new("xlb-unit4");
    netns.enter(|| {
        let all = services(&["10.96.0.10:80=10.1.0.2:8080,10.1.0.3:8080,10.1.0.4:8080"]);
        let vip = sock("10.96.0.10:80");
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, &all, 4096, PORTS);
        let prog = xdp_lb::program(&skel);
        let tables = xdp_lb::Tables::of(&skel).unwrap();
        let clients: Vec<SocketAddr> = (0..300u16)
            .map(|i| SocketAddr::new(IpAddr::from([10, 0, 1, 1]), 10000 + i))
            .collect();
        for client in &clients {
            run(prog, &frame(CLIENT_MAC, LB_MAC, *client, vip, L4::Udp));
        }
        // established (the backend answered, the client spoke again): a half-open flow may
        // lose its port to a new flow after a second, which a slow VM's test reaches
        for flow in xdp_lb::all_flows(&skel).unwrap() {
            let lb = SocketAddr::new(flow.lb_addr, flow.lb_port);
            let reply = frame(backend_mac(flow.backend), LB_MAC, flow.backend, lb, L4::Udp);
            assert_eq!(run(prog, &reply).0, XDP_TX, "reply of {flow:?}");
            let again = frame(CLIENT_MAC, LB_MAC, flow.client, vip, L4::Udp);
            assert_eq!(run(prog, &again).0, XDP_TX, "{flow:?} again");
        }
        let before = xdp_lb::all_flows(&skel).unwrap();
        let removed = all[0].backends[0].addr;
        let fewer = services(&["10.96.0.10:80=10.1.0.3:8080,10.1.0.4:8080"]);
        xdp_lb::sync(&tables, &fewer, &backends_of(&all)).unwrap();
        for client in &clients {
            run(prog, &frame(CLIENT_MAC, LB_MAC, *client, vip, L4::Udp));
        }
        let after = xdp_lb::all_flows(&skel).unwrap();
        let mut moved = 0;
        for old in &before {
            let new = flow_of(&after, old.client, vip, 17);
            if old.backend == removed {
                assert_ne!(new.backend, removed, "{new:?}");
                moved += 1;
            } else {
                assert_eq!(
                    (new.backend, new.lb_port),
                    (old.backend, old.lb_port),
                    "a flow moved without need"
                );
            }
        }
        assert!(
            (50..=150).contains(&moved),
            "{moved} of 300 flows were on the removed backend"
        );
        // the replies of every flow, moved or kept in a list written to new slots, count
        // for their backend in the service's list of now
        let replies_counted = || -> u64 {
            let report = service::service_report::<xdp_lb_stats>(&tables.services).unwrap();
            report[0].totals().packets_out
        };
        let before_replies = replies_counted();
        for flow in &after {
            let lb = SocketAddr::new(flow.lb_addr, flow.lb_port);
            let reply = frame(backend_mac(flow.backend), LB_MAC, flow.backend, lb, L4::Udp);
            assert_eq!(run(prog, &reply).0, XDP_TX, "reply of {flow:?}");
        }
        assert_eq!(replies_counted() - before_replies, after.len() as u64);
        let counters: xdp_lb_counters =
            ebpf_net::kernel::maps::sum_percpu_counters(&skel.maps.xdp_lb_counters, 0).unwrap();
        assert_eq!(counters.unattributed, 0, "replies counted for no backend");
    });
}

/// A TCP SYN frame (IPv4, no options) made the handshake's ACK, checksum updated.
fn as_ack(mut frame: Vec<u8>) -> Vec<u8> {
    let at = 14 + 20;
    let old = u16::from_be_bytes([frame[at + 12], frame[at + 13]]);
    frame[at + 13] = 0x10;
    let new = u16::from_be_bytes([frame[at + 12], frame[at + 13]]);
    let check = u16::from_be_bytes([frame[at + 16], frame[at + 17]]);
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[at + 16..at + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    frame
}

#[test]
fn established_flows_outlive_a_flood_and_the_detector_admits_clients_that_ask_again() {
    let netns = Netns::new("xlb-unit5");
    netns.enter(|| {
        let services = services(&["10.96.0.10:80=10.1.0.2:8080,10.1.0.3:8080,10.1.0.4:8080"]);
        let vip = sock("10.96.0.10:80");
        let client = |i: u32| SocketAddr::new(IpAddr::from([10, 9, (i >> 8) as u8, i as u8]), 40000);
        let counters = |skel: &ebpf_net::kernel::skel::xdp_lb::XdpLbSkel<'_>| -> xdp_lb_counters {
            ebpf_net::kernel::maps::sum_percpu_counters(&skel.maps.xdp_lb_counters, 0).unwrap()
        };
        let reply_of = |flow: &Flow| {
            let lb = SocketAddr::new(flow.lb_addr, flow.lb_port);
            frame(backend_mac(flow.backend), LB_MAC, flow.backend, lb, L4::Tcp)
        };
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, &services, 16, PORTS);
        let prog = xdp_lb::program(&skel);
        // 12 of 16 slots established (the backend answered, then the client), then 3,000
        // SYNs the backend answers but no client does: the established flows all stay,
        // with their way back
        let established: Vec<Flow> = (0..12)
            .map(|i| {
                let (verdict, _) = run(prog, &frame(CLIENT_MAC, LB_MAC, client(i), vip, L4::Tcp));
                assert_eq!(verdict, XDP_TX);
                let flow = flow_of(&xdp_lb::all_flows(&skel).unwrap(), client(i), vip, 6);
                assert_eq!(run(prog, &reply_of(&flow)).0, XDP_TX);
                let ack = as_ack(frame(CLIENT_MAC, LB_MAC, client(i), vip, L4::Tcp));
                assert_eq!(run(prog, &ack).0, XDP_TX);
                flow
            })
            .collect();
        let floods = (1000..4000).filter(|i| {
            if run(prog, &frame(CLIENT_MAC, LB_MAC, client(*i), vip, L4::Tcp)).0 != XDP_TX {
                return false;
            }
            let flows = xdp_lb::all_flows(&skel).unwrap();
            run(prog, &reply_of(&flow_of(&flows, client(*i), vip, 6))).0 == XDP_TX
        });
        assert!(floods.count() > 2900, "half-open flows make room for each other");
        let flows = xdp_lb::all_flows(&skel).unwrap();
        assert!(flows.len() <= 16, "{} flows in a table of 16", flows.len());
        for flow in &established {
            assert_eq!(&flow_of(&flows, flow.client, vip, 6), flow);
            let to_client = frame(LB_MAC, CLIENT_MAC, vip, flow.client, L4::Tcp);
            expect(
                prog,
                &format!("reply to {}", flow.client),
                &reply_of(flow),
                XDP_TX,
                &to_client,
            );
        }
        assert!(counters(&skel).evicted > 2900);
        // a table full of established flows takes no new one: dropped and counted
        for i in 4000..4200 {
            if run(prog, &frame(CLIENT_MAC, LB_MAC, client(i), vip, L4::Tcp)).0 == XDP_TX {
                let flows = xdp_lb::all_flows(&skel).unwrap();
                assert_eq!(
                    run(prog, &reply_of(&flow_of(&flows, client(i), vip, 6))).0,
                    XDP_TX
                );
                let ack = as_ack(frame(CLIENT_MAC, LB_MAC, client(i), vip, L4::Tcp));
                assert_eq!(run(prog, &ack).0, XDP_TX);
            }
        }
        let flows = xdp_lb::all_flows(&skel).unwrap();
        assert_eq!(flows.len(), 16);
        for flow in &established {
            assert_eq!(&flow_of(&flows, flow.client, vip, 6), flow);
        }
        assert!(counters(&skel).table_full > 0);

        // flood detector at 50 new flows a second: the rest are dropped at first, and a
        // client sending its SYN again 0.3 s later gets its flow. On one CPU: each has its own
        // window, and a thread moved midway would find 50 more admitted on the next.
        common::pin_this_thread(0);
        let mut object = MaybeUninit::uninit();
        let options = Options {
            flood_rate: 50,
            ..options(4096, PORTS)
        };
        let skel =
            xdp_lb::load_with_services(&mut object, &options, &services, &backends_of(&services)).unwrap();
        let prog = xdp_lb::program(&skel);
        let verdicts: Vec<i32> = (0..200)
            .map(|i| run(prog, &frame(CLIENT_MAC, LB_MAC, client(i), vip, L4::Tcp)).0)
            .collect();
        assert_eq!(verdicts.iter().filter(|v| **v == XDP_TX).count(), 50);
        assert!(verdicts[50..].iter().all(|v| *v == XDP_DROP));
        // at once again: not a retransmission yet
        assert_eq!(
            run(prog, &frame(CLIENT_MAC, LB_MAC, client(199), vip, L4::Tcp)).0,
            XDP_DROP
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(
            run(prog, &frame(CLIENT_MAC, LB_MAC, client(199), vip, L4::Tcp)).0,
            XDP_TX
        );
        let c = counters(&skel);
        assert_eq!((c.new_flows, c.flood_dropped, c.flood_admitted), (51, 151, 1));
    });
}

#[test]
fn icmp_errors_of_flows_reach_the_other_side_translated() {
    let netns = Netns::new("xlb-icmp");
    netns.enter(|| {
        let services = services(&[
            "10.96.0.10:80=10.1.0.2:8080",
            "10.96.0.10:53=10.1.0.5:5353",
            "[fd96::10]:80=[fd01::2]:8080",
            "[fd96::10]:53=[fd01::5]:5353",
        ]);
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, &services, 1024, PORTS);
        let prog = xdp_lb::program(&skel);
        let v4_kinds = [
            IcmpError::TooBig(1200),
            IcmpError::Unreachable(3),
            IcmpError::Unreachable(1),
            IcmpError::Unreachable(13),
            IcmpError::TimeExceeded,
        ];
        let v6_kinds = [
            IcmpError::TooBig(1280),
            IcmpError::Unreachable(4),
            IcmpError::Unreachable(3),
            IcmpError::TimeExceeded,
        ];
        let mut to_client = 0;
        let mut to_backend = 0;
        for (client, vip, l4, router) in [
            (
                sock("10.0.0.1:40000"),
                sock("10.96.0.10:80"),
                L4::Tcp,
                "10.1.0.254",
            ),
            (
                sock("10.0.0.1:40000"),
                sock("10.96.0.10:53"),
                L4::Udp,
                "10.1.0.254",
            ),
            (
                sock("[2001:db8::1]:40000"),
                sock("[fd96::10]:80"),
                L4::Tcp,
                "fd01::fe",
            ),
            (
                sock("[2001:db8::1]:40000"),
                sock("[fd96::10]:53"),
                L4::Udp,
                "fd01::fe",
            ),
        ] {
            let router: IpAddr = router.parse().unwrap();
            let request = frame(ROUTER_MAC, LB_MAC, client, vip, l4);
            let (verdict, _) = run(prog, &request);
            assert_eq!(verdict, XDP_TX);
            let flow = flow_of(&xdp_lb::all_flows(&skel).unwrap(), client, vip, proto_of(l4));
            let lb = SocketAddr::new(flow.lb_addr, flow.lb_port);
            let backend = flow.backend;
            let bmac = backend_mac(backend);
            // the packets as each side sent or got them
            let forwarded = frame(LB_MAC, bmac, lb, backend, l4);
            let reply = frame(bmac, LB_MAC, backend, lb, l4);
            let reply_out = frame(LB_MAC, ROUTER_MAC, vip, client, l4);
            let kinds: &[IcmpError] = if client.is_ipv4() { &v4_kinds } else { &v6_kinds };
            for &kind in kinds {
                for quote in [minimal_quote(&request), request.len() - 14] {
                    let name = format!("{client} -> {vip} {l4:?} {kind:?} quoting {quote}");
                    // about the backend leg, from the backend or a router: back to the client,
                    // about its own packet, from the VIP
                    for from in [router, backend.ip()] {
                        let input = icmp_error_frame((bmac, LB_MAC), from, lb.ip(), kind, &forwarded, quote);
                        let output = icmp_error_frame(
                            (LB_MAC, ROUTER_MAC),
                            vip.ip(),
                            client.ip(),
                            kind,
                            &request,
                            quote,
                        );
                        expect(prog, &format!("{name} from {from}"), &input, XDP_TX, &output);
                        to_client += 1;
                    }
                    // about the client leg, to the VIP: on to the backend, about its reply
                    let input = icmp_error_frame(
                        (ROUTER_MAC, LB_MAC),
                        client.ip(),
                        vip.ip(),
                        kind,
                        &reply_out,
                        quote,
                    );
                    let output = icmp_error_frame((LB_MAC, bmac), lb.ip(), backend.ip(), kind, &reply, quote);
                    expect(prog, &format!("{name} about the reply"), &input, XDP_TX, &output);
                    to_backend += 1;
                }
            }
            // a UDP quote without a checksum keeps none
            if l4 == L4::Udp {
                let input = icmp_error_frame(
                    (bmac, LB_MAC),
                    router,
                    lb.ip(),
                    kinds[0],
                    &zero_udp_checksum(forwarded.clone()),
                    200,
                );
                let output = icmp_error_frame(
                    (LB_MAC, ROUTER_MAC),
                    vip.ip(),
                    client.ip(),
                    kinds[0],
                    &zero_udp_checksum(request.clone()),
                    200,
                );
                expect(prog, "zero UDP checksum quoted", &input, XDP_TX, &output);
                to_client += 1;
            }

            // not ours: passed byte for byte
            let other_port = SocketAddr::new(lb.ip(), lb.port() + 1);
            let other_client = SocketAddr::new(client.ip(), client.port() + 1);
            let quote = request.len() - 14;
            let other_kind = if client.is_ipv4() {
                IcmpError::Raw(12, 0)
            } else {
                IcmpError::Raw(4, 0)
            };
            let untouched = [
                (
                    "a flow's port we never gave out",
                    icmp_error_frame(
                        (bmac, LB_MAC),
                        router,
                        lb.ip(),
                        kinds[0],
                        &frame(LB_MAC, bmac, other_port, backend, l4),
                        quote,
                    ),
                ),
                (
                    "another backend port",
                    icmp_error_frame(
                        (bmac, LB_MAC),
                        router,
                        lb.ip(),
                        kinds[0],
                        &frame(LB_MAC, bmac, lb, SocketAddr::new(backend.ip(), 9), l4),
                        quote,
                    ),
                ),
                (
                    "a reply to another client",
                    icmp_error_frame(
                        (ROUTER_MAC, LB_MAC),
                        client.ip(),
                        vip.ip(),
                        kinds[0],
                        &frame(LB_MAC, ROUTER_MAC, vip, other_client, l4),
                        quote,
                    ),
                ),
                (
                    "parameter problem about our flow",
                    icmp_error_frame((bmac, LB_MAC), router, lb.ip(), other_kind, &forwarded, quote),
                ),
                (
                    "redirect about our flow",
                    icmp_error_frame(
                        (bmac, LB_MAC),
                        router,
                        lb.ip(),
                        if client.is_ipv4() {
                            IcmpError::Raw(5, 1)
                        } else {
                            IcmpError::Raw(137, 0)
                        },
                        &forwarded,
                        quote,
                    ),
                ),
                (
                    "quote without the ports",
                    icmp_error_frame(
                        (bmac, LB_MAC),
                        router,
                        lb.ip(),
                        kinds[0],
                        &forwarded,
                        minimal_quote(&request) - 5,
                    ),
                ),
            ];
            for (what, input) in untouched {
                expect(
                    prog,
                    &format!("{client} {l4:?}: {what}"),
                    &input,
                    XDP_PASS,
                    &input,
                );
            }
            // an error cut anywhere before the quoted ports end passes as it is
            let whole = icmp_error_frame((bmac, LB_MAC), router, lb.ip(), kinds[0], &forwarded, quote);
            let ports_end = whole.len() - quote + minimal_quote(&request) - 4;
            for cut in 14..ports_end {
                expect(
                    prog,
                    &format!("{client} {l4:?} error cut at {cut}"),
                    &whole[..cut],
                    XDP_PASS,
                    &whole[..cut],
                );
            }
        }
        // an echo request to the VIP, and an error quoting an ICMP echo, are not flows
        let echo = frame(
            CLIENT_MAC,
            LB_MAC,
            sock("[2001:db8::1]:0"),
            sock("[fd96::10]:0"),
            L4::Icmpv6Echo,
        );
        expect(prog, "icmpv6 echo to the VIP", &echo, XDP_PASS, &echo);
        let about_echo = icmp_error_frame(
            (ROUTER_MAC, LB_MAC),
            "2001:db8::1".parse().unwrap(),
            "fd96::10".parse().unwrap(),
            IcmpError::TooBig(1280),
            &echo,
            100,
        );
        expect(prog, "error quoting an echo", &about_echo, XDP_PASS, &about_echo);

        let counters: xdp_lb_counters =
            ebpf_net::kernel::maps::sum_percpu_counters(&skel.maps.xdp_lb_counters, 0).unwrap();
        assert_eq!(
            (counters.icmp_to_client, counters.icmp_to_backend),
            (to_client, to_backend)
        );
    });
}

/// A service without a usable backend answers a SYN with an RST (SEQ 0, ACK = SEG.SEQ +
/// SEG.LEN, RST|ACK, from the VIP) and a UDP datagram with ICMP / ICMPv6 port unreachable
/// quoting it (RFC 792: header + 8 bytes; RFC 4443: the whole packet when it fits), back to
/// the MAC it came from; checksums as a receiver checks them; counted.
#[test]
fn a_service_without_usable_backend_answers_rst_and_port_unreachable() {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    let netns = Netns::new("xlb-unit-rej");
    netns.enter(|| {
        let services = services(&[
            "10.96.0.10:80=reject",
            "[fd96::10]:80=reject",
            "10.96.0.11:80=10.1.0.2:8080;state=down",
        ]);
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, &services, 1024, PORTS);
        let prog = xdp_lb::program(&skel);
        let client_mac = [0x02, 0, 0, 0, 0, 0xcc];
        let cases = [
            (sock("10.0.0.1:40000"), sock("10.96.0.10:80")),
            (sock("10.0.0.1:40000"), sock("10.96.0.11:80")),
            (sock("[2001:db8::1]:40000"), sock("[fd96::10]:80")),
        ];
        let mut answered = 0;
        for (client, vip) in cases {
            for l4 in [L4::Tcp, L4::Udp] {
                let input = frame(client_mac, LB_MAC, client, vip, l4);
                let (verdict, got) = run(prog, &input);
                let name = format!("{client} -> {vip} {l4:?}");
                assert_eq!(verdict, XDP_TX, "{name}: verdict");
                verify_l4_checksum(&got, false).unwrap_or_else(|err| panic!("{name}: {err}: {}", hex(&got)));
                assert_eq!(got[0..6], client_mac, "{name}: to the client's MAC");
                assert_eq!(got[6..12], LB_MAC, "{name}: from ours");
                let packet = SlicedPacket::from_ethernet(&got).unwrap();
                let (src, dst): (IpAddr, IpAddr) = match &packet.net {
                    Some(NetSlice::Ipv4(ip)) => (
                        ip.header().source_addr().into(),
                        ip.header().destination_addr().into(),
                    ),
                    Some(NetSlice::Ipv6(ip)) => (
                        ip.header().source_addr().into(),
                        ip.header().destination_addr().into(),
                    ),
                    other => panic!("{name}: {other:?}"),
                };
                assert_eq!((src, dst), (vip.ip(), client.ip()), "{name}: addresses");
                match (&packet.transport, l4) {
                    (Some(TransportSlice::Tcp(tcp)), L4::Tcp) => {
                        assert!(tcp.rst() && tcp.ack() && !tcp.syn(), "{name}: flags");
                        assert_eq!(tcp.sequence_number(), 0, "{name}: seq");
                        // the SYN: seq 1234, PAYLOAD bytes of data
                        assert_eq!(
                            tcp.acknowledgment_number(),
                            1234 + 1 + PAYLOAD.len() as u32,
                            "{name}: ack"
                        );
                        assert_eq!(
                            (tcp.source_port(), tcp.destination_port()),
                            (vip.port(), client.port())
                        );
                        assert_eq!(
                            got.len(),
                            14 + if vip.is_ipv4() { 20 } else { 40 } + 20,
                            "{name}: length"
                        );
                    }
                    (Some(TransportSlice::Icmpv4(icmp)), L4::Udp) => {
                        assert_eq!(
                            (icmp.type_u8(), icmp.code_u8()),
                            (3, 3),
                            "{name}: port unreachable"
                        );
                        // RFC 792: the invoking header and 64 bits of its data
                        assert_eq!(icmp.payload(), &input[14..14 + 28], "{name}: quote");
                    }
                    (Some(TransportSlice::Icmpv6(icmp)), L4::Udp) => {
                        assert_eq!(
                            (icmp.type_u8(), icmp.code_u8()),
                            (1, 4),
                            "{name}: port unreachable"
                        );
                        // RFC 4443: all of it, it fits in 1280
                        assert_eq!(icmp.payload(), &input[14..], "{name}: quote");
                    }
                    other => panic!("{name}: {other:?}"),
                }
                answered += 1;
            }
        }
        // a datagram that does not fit in the IPv6 minimum MTU: its headers are quoted
        let big = etherparse::PacketBuilder::ethernet2(client_mac, LB_MAC)
            .ipv6(
                "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                "fd96::10".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                64,
            )
            .udp(40000, 80);
        let mut input = Vec::new();
        big.write(&mut input, &[7u8; 1400]).unwrap();
        let (verdict, got) = run(prog, &input);
        assert_eq!(verdict, XDP_TX, "big datagram");
        verify_l4_checksum(&got, false).unwrap_or_else(|err| panic!("big datagram: {err}"));
        assert_eq!(got.len(), 14 + 40 + 8 + 40 + 8, "big datagram: headers quoted");
        assert_eq!(&got[62..], &input[14..14 + 48]);
        answered += 1;
        // a non-SYN TCP packet of no flow is dropped, unanswered
        let mut ack = l4_frame(sock("10.0.0.1:40001"), sock("10.96.0.10:80"), L4::Tcp);
        ack[14 + 20 + 13] = 0x10;
        assert_eq!(run(prog, &ack).0, XDP_DROP);
        let counters: xdp_lb_counters = ebpf_net::kernel::maps::sum_percpu_counters(
            &libbpf_rs::MapHandle::try_from(&skel.maps.xdp_lb_counters).unwrap(),
            0,
        )
        .unwrap();
        assert_eq!(counters.refused, answered);
    });
}
