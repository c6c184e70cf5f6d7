//! test_run table for the monitor programs: packets pass unchanged and land in the flow table
//! under the right key.

mod common;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::IpAddr;

use common::packets::*;
use ebpf_net::datapath::monitor::{read_flows, Counters, Flow};
use ebpf_net::kernel::skel::monitor::MonitorSkelBuilder;
use etherparse::{IpFragOffset, IpNumber, Ipv6Extensions, Ipv6FragmentHeader, PacketBuilder};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};

fn udp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut frame, payload)
        .unwrap();
    frame
}

/// IPv4 with 8 bytes of options (IHL 7) before TCP.
fn tcp4_with_options() -> Vec<u8> {
    let mut header = etherparse::Ipv4Header::new(0, 64, IpNumber::TCP, [10, 0, 0, 1], [10, 0, 0, 2]).unwrap();
    header.options = [1u8, 1, 1, 1, 1, 1, 1, 0][..].try_into().unwrap();
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ip(etherparse::IpHeaders::Ipv4(header, Default::default()))
        .tcp(1111, 2222, 1, 1000)
        .write(&mut frame, PAYLOAD)
        .unwrap();
    frame
}

fn flow(direction: &'static str, proto: u8, src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
    Flow {
        direction,
        proto,
        src: src.parse::<IpAddr>().unwrap(),
        sport,
        dst: dst.parse::<IpAddr>().unwrap(),
        dport,
    }
}

#[test]
fn flows_are_keyed_and_counted_exactly() {
    let mut object = MaybeUninit::uninit();
    let skel = MonitorSkelBuilder::default()
        .open(&mut object)
        .unwrap()
        .load()
        .unwrap();
    let ll = "fe80::1".parse().unwrap();
    let node = "2001:db8::10".parse().unwrap();
    let udp = udp4([10, 0, 0, 1], 5353, [10, 0, 0, 2], 53, b"query");
    let v6_tcp = ipv6_frame(ll, node, Ipv6Extensions::default(), L4::Tcp);
    let v6_icmp = ipv6_frame(ll, node, Ipv6Extensions::default(), L4::Icmpv6Echo);
    let later_fragment = ipv6_raw_frame(
        ll,
        node,
        Ipv6Extensions {
            fragment: Some(Ipv6FragmentHeader::new(
                IpNumber(0),
                IpFragOffset::try_new(5).unwrap(),
                false,
                9,
            )),
            ..Default::default()
        },
        17,
        PAYLOAD,
    );
    let options = tcp4_with_options();
    let arp = {
        let mut frame = vec![0u8; 42];
        frame[12..14].copy_from_slice(&[0x08, 0x06]);
        frame
    };

    // every frame passes unchanged, counted or not
    let mut cases = Vec::new();
    for _ in 0..3 {
        cases.push(Case {
            name: "udp4",
            input: udp.clone(),
            verdict: TC_PASS_ON,
            output: udp.clone(),
            check_l4: false,
        });
    }
    for (name, frame) in [
        ("tcp6", &v6_tcp),
        ("icmpv6", &v6_icmp),
        ("later fragment", &later_fragment),
        ("ipv4 options", &options),
        ("arp", &arp),
        ("vlan udp4", &with_vlan(&udp)),
    ] {
        cases.push(Case {
            name,
            input: frame.clone(),
            verdict: TC_PASS_ON,
            output: frame.clone(),
            check_l4: false,
        });
    }
    run_table(&skel.progs.monitor_ingress, &cases);
    run_table(
        &skel.progs.monitor_egress,
        &[Case {
            name: "egress udp4",
            input: udp.clone(),
            verdict: TC_PASS_ON,
            output: udp.clone(),
            check_l4: false,
        }],
    );

    let flows = read_flows(&skel.maps.monitor_flows).unwrap();
    let counted = |packets: u64, frame: &[u8]| Counters {
        packets,
        bytes: packets * frame.len() as u64,
    };
    let udp_tagged_len = udp.len() as u64 + 4;
    let expected: HashMap<Flow, Counters> = [
        // three untagged and one tagged datagram of the same flow
        (
            flow("ingress", 17, "10.0.0.1", 5353, "10.0.0.2", 53),
            Counters {
                packets: 4,
                bytes: 3 * udp.len() as u64 + udp_tagged_len,
            },
        ),
        (
            flow("egress", 17, "10.0.0.1", 5353, "10.0.0.2", 53),
            counted(1, &udp),
        ),
        (
            flow("ingress", 6, "fe80::1", 40000, "2001:db8::10", 80),
            counted(1, &v6_tcp),
        ),
        (
            flow("ingress", 58, "fe80::1", 128, "2001:db8::10", 0),
            counted(1, &v6_icmp),
        ),
        (
            flow("ingress", 17, "fe80::1", 0, "2001:db8::10", 0),
            counted(1, &later_fragment),
        ),
        (
            flow("ingress", 6, "10.0.0.1", 1111, "10.0.0.2", 2222),
            counted(1, &options),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(flows, expected);
}
