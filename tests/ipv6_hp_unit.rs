//! test_run table for the ipv6-hp programs: exact output bytes, checksums checked by etherparse.

mod common;

use std::mem::MaybeUninit;
use std::net::Ipv6Addr;

use common::packets::*;
use ebpf_net::datapath::ipv6_hp::{
    load_egress, load_ingress, ProbeAddresses, DEFAULT_GLOBAL, DEFAULT_LINK_LOCAL,
};
use etherparse::Ipv6Extensions;

fn azure() -> ProbeAddresses {
    ProbeAddresses {
        link_local: DEFAULT_LINK_LOCAL.parse().unwrap(),
        global: DEFAULT_GLOBAL.parse().unwrap(),
    }
}

fn node() -> Ipv6Addr {
    "2001:db8:1::10".parse().unwrap()
}

fn other() -> Ipv6Addr {
    "fe80::1".parse().unwrap()
}

fn no_exts() -> Ipv6Extensions {
    Ipv6Extensions::default()
}

fn ingress_cases(hp: &ProbeAddresses) -> Vec<Case> {
    let (ll, global) = (hp.link_local, hp.global);
    let mut cases = Vec::new();
    for (name, l4) in [
        ("tcp", L4::Tcp),
        ("udp", L4::Udp),
        ("icmpv6 echo", L4::Icmpv6Echo),
    ] {
        cases.push(rewritten(
            name,
            ipv6_frame(ll, node(), no_exts(), l4),
            ipv6_frame(global, node(), no_exts(), l4),
        ));
    }
    cases.push(Case {
        check_l4: true,
        ..rewritten(
            "udp zero checksum stays zero",
            zero_udp_checksum(ipv6_frame(ll, node(), no_exts(), L4::Udp)),
            zero_udp_checksum(ipv6_frame(global, node(), no_exts(), L4::Udp)),
        )
    });
    cases.push(rewritten(
        "extension-header chain before tcp",
        ipv6_frame(ll, node(), ext_chain(), L4::Tcp),
        ipv6_frame(global, node(), ext_chain(), L4::Tcp),
    ));
    cases.push(rewritten(
        "first fragment: tcp checksum fixed",
        ipv6_frame(ll, node(), fragment(0, true), L4::Tcp),
        ipv6_frame(global, node(), fragment(0, true), L4::Tcp),
    ));
    cases.push(Case {
        check_l4: false,
        ..rewritten(
            "later fragment: address only",
            ipv6_raw_frame(ll, node(), fragment(3, false), 6, PAYLOAD),
            ipv6_raw_frame(global, node(), fragment(3, false), 6, PAYLOAD),
        )
    });
    cases.push(Case {
        check_l4: false,
        ..rewritten(
            "sctp: address only",
            ipv6_raw_frame(ll, node(), no_exts(), 132, PAYLOAD),
            ipv6_raw_frame(global, node(), no_exts(), 132, PAYLOAD),
        )
    });
    // neighbour discovery stays link-local (Azure's rules accept it before rewriting)
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let hop_by_hop = Ipv6Extensions {
        hop_by_hop_options: Some(
            etherparse::Ipv6RawExtHeader::new_raw(etherparse::IpNumber(0), &[0u8; 6]).unwrap(),
        ),
        ..Default::default()
    };
    for (name, kind, dst) in [
        ("router solicitation", 133, all_nodes),
        ("router advertisement", 134, all_nodes),
        ("neighbor solicitation", 135, node()),
        ("neighbor advertisement", 136, node()),
        ("redirect", 137, node()),
    ] {
        cases.push(untouched(
            name,
            icmpv6_frame(ll, dst, no_exts(), (kind, 0), &[0u8; 24]),
        ));
    }
    cases.push(untouched(
        "router advertisement behind hop-by-hop options",
        icmpv6_frame(ll, all_nodes, hop_by_hop, (134, 0), &[0u8; 24]),
    ));
    for (name, kind) in [
        ("icmpv6 type 132 (not ND)", 132),
        ("icmpv6 type 138 (not ND)", 138),
    ] {
        cases.push(rewritten(
            name,
            icmpv6_frame(ll, node(), no_exts(), (kind, 0), &[0u8; 24]),
            icmpv6_frame(global, node(), no_exts(), (kind, 0), &[0u8; 24]),
        ));
    }
    cases.push(untouched(
        "other link-local source",
        ipv6_frame(other(), node(), no_exts(), L4::Tcp),
    ));
    cases.push(untouched(
        "probe address as destination",
        ipv6_frame(node(), ll, no_exts(), L4::Tcp),
    ));
    cases.push(untouched("ipv4", ipv4_tcp_frame()));
    let full = ipv6_frame(ll, node(), no_exts(), L4::Tcp);
    // test_run refuses an untagged IPv6 frame shorter than its IPv6 header; a VLAN tag hides it
    cases.push(untouched(
        "vlan-tagged, ipv6 header cut short",
        with_vlan(&full)[..18 + 30].to_vec(),
    ));
    cases.push(rewritten(
        "vlan-tagged tcp",
        with_vlan(&full),
        with_vlan(&ipv6_frame(global, node(), no_exts(), L4::Tcp)),
    ));
    cases.push(untouched(
        "truncated tcp before checksum",
        full[..14 + 40 + 12].to_vec(),
    ));
    let chained = ipv6_frame(ll, node(), ext_chain(), L4::Tcp);
    cases.push(untouched(
        "truncated inside extension chain",
        chained[..14 + 40 + 12].to_vec(),
    ));
    cases
}

fn egress_cases(hp: &ProbeAddresses) -> Vec<Case> {
    let (ll, global) = (hp.link_local, hp.global);
    let mut cases = Vec::new();
    for (name, l4) in [
        ("tcp", L4::Tcp),
        ("udp", L4::Udp),
        ("icmpv6 echo", L4::Icmpv6Echo),
    ] {
        cases.push(rewritten(
            name,
            ipv6_frame(node(), global, no_exts(), l4),
            ipv6_frame(node(), ll, no_exts(), l4),
        ));
    }
    cases.push(rewritten(
        "extension-header chain before udp",
        ipv6_frame(node(), global, ext_chain(), L4::Udp),
        ipv6_frame(node(), ll, ext_chain(), L4::Udp),
    ));
    for (name, kind) in [("neighbor solicitation", 135), ("neighbor advertisement", 136)] {
        cases.push(untouched(
            name,
            icmpv6_frame(node(), global, no_exts(), (kind, 0), &[0u8; 24]),
        ));
    }
    cases.push(rewritten(
        "icmpv6 echo reply to the probe",
        icmpv6_frame(node(), global, no_exts(), (129, 0), PAYLOAD),
        icmpv6_frame(node(), ll, no_exts(), (129, 0), PAYLOAD),
    ));
    cases.push(untouched(
        "other destination",
        ipv6_frame(node(), "2001:db8::99".parse().unwrap(), no_exts(), L4::Udp),
    ));
    cases.push(untouched(
        "global address as source",
        ipv6_frame(global, node(), no_exts(), L4::Udp),
    ));
    cases.push(untouched("ipv4", ipv4_tcp_frame()));
    let full = ipv6_frame(node(), global, no_exts(), L4::Udp);
    cases.push(untouched(
        "truncated udp before checksum",
        full[..14 + 40 + 4].to_vec(),
    ));
    cases
}

#[test]
fn ingress_rewrites_probe_source_with_azure_defaults() {
    let mut object = MaybeUninit::uninit();
    let skel = load_ingress(
        &mut object,
        &azure(),
        ebpf_net::kernel::probe::l4_csum_ipv6_flag(),
        None,
    )
    .unwrap();
    run_table(&skel.progs.ipv6_hp_ingress, &ingress_cases(&azure()));
}

#[test]
fn egress_rewrites_reply_destination_with_azure_defaults() {
    let mut object = MaybeUninit::uninit();
    let skel = load_egress(
        &mut object,
        &azure(),
        ebpf_net::kernel::probe::l4_csum_ipv6_flag(),
        None,
    )
    .unwrap();
    run_table(&skel.progs.ipv6_hp_egress, &egress_cases(&azure()));
}

#[test]
fn configured_addresses_replace_the_defaults() {
    let custom = ProbeAddresses {
        link_local: "fe80::aa".parse().unwrap(),
        global: "2001:db8:ffff::aa".parse().unwrap(),
    };
    let (mut ingress_obj, mut egress_obj) = (MaybeUninit::uninit(), MaybeUninit::uninit());
    let ingress = load_ingress(&mut ingress_obj, &custom, 0, None).unwrap();
    let egress = load_egress(&mut egress_obj, &custom, 0, None).unwrap();
    run_table(&ingress.progs.ipv6_hp_ingress, &ingress_cases(&custom));
    run_table(&egress.progs.ipv6_hp_egress, &egress_cases(&custom));
    // and the Azure defaults no longer match
    run_table(
        &ingress.progs.ipv6_hp_ingress,
        &[untouched(
            "default address when configured otherwise",
            ipv6_frame(azure().link_local, node(), no_exts(), L4::Tcp),
        )],
    );
}
