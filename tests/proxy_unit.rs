//! test_run table for the proxy programs: exact output bytes, checksums checked by etherparse.
//! Runs inside an empty namespace, where forwarding is off: a rewritten packet is handed to
//! the kernel's route and neighbour lookup (TC_ACT_REDIRECT) with its MACs as they were, so
//! the output is the rewrite alone. Re-routing itself is covered end to end.

mod common;

use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};

use common::packets::*;
use common::topology::Netns;
use ebpf_net::datapath::proxy::{load_with_rules, Rule};

const CLIENT4: &str = "10.0.0.1";
const CLIENT6: &str = "2001:db8::1";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn rule(from: &str, to: &str) -> Rule {
    Rule {
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        origin: String::new(),
    }
}

fn sock(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

/// A request rewritten on egress: re-routed.
fn redirected(name: &'static str, input: Vec<u8>, output: Vec<u8>) -> Case {
    Case {
        verdict: TC_ACT_REDIRECT,
        ..rewritten(name, input, output)
    }
}

#[test]
fn egress_rewrites_destination_and_ingress_rewrites_replies() {
    let netns = Netns::new("proxy-unit");
    netns.enter(|| {
        let rules = [
            rule("10.96.0.10:80", "10.1.0.2:8080"),
            rule("10.96.0.10:53", "10.1.0.3:5353"),
            rule("[fd96::10]:80", "[2001:db8:1::2]:8080"),
            rule("[fd96::10]:53", "[2001:db8:1::3]:53"),
        ];
        let mut object = MaybeUninit::uninit();
        let skel = load_with_rules(&mut object, &rules).unwrap();
        let client4 = sock(CLIENT4, 40000);
        let client6 = sock(CLIENT6, 40000);
        let options = [1u8, 1, 1, 1, 1, 1, 1, 0];
        let with_options = |src: SocketAddr, dst: SocketAddr| frame_with_options(src, dst, &options, L4::Tcp);

        let egress = vec![
            redirected(
                "v4 tcp",
                l4_frame(client4, rules[0].from, L4::Tcp),
                l4_frame(client4, rules[0].to, L4::Tcp),
            ),
            redirected(
                "v4 udp",
                l4_frame(client4, rules[1].from, L4::Udp),
                l4_frame(client4, rules[1].to, L4::Udp),
            ),
            redirected(
                "v4 udp, zero checksum stays zero",
                zero_udp_checksum(l4_frame(client4, rules[1].from, L4::Udp)),
                zero_udp_checksum(l4_frame(client4, rules[1].to, L4::Udp)),
            ),
            redirected(
                "v4 tcp with IP options",
                with_options(client4, rules[0].from),
                with_options(client4, rules[0].to),
            ),
            redirected(
                "v6 tcp",
                l4_frame(client6, rules[2].from, L4::Tcp),
                l4_frame(client6, rules[2].to, L4::Tcp),
            ),
            redirected(
                "v6 udp, same port on both sides",
                l4_frame(client6, rules[3].from, L4::Udp),
                l4_frame(client6, rules[3].to, L4::Udp),
            ),
            untouched(
                "v4 other port of the same address",
                l4_frame(client4, sock("10.96.0.10", 81), L4::Tcp),
            ),
            untouched(
                "v4 other address",
                l4_frame(client4, sock("10.96.0.11", 80), L4::Tcp),
            ),
            untouched(
                "v6 udp to an address without rules",
                l4_frame(client6, sock("fd96::11", 80), L4::Udp),
            ),
            untouched(
                "icmpv6 to FROM's address",
                l4_frame(client6, sock("fd96::10", 0), L4::Icmpv6Echo),
            ),
            untouched(
                "ipv4 tcp cut before its checksum",
                l4_frame(client4, rules[0].from, L4::Tcp)[..14 + 20 + 12].to_vec(),
            ),
            untouched(
                "reply direction on egress",
                l4_frame(rules[0].to, client4, L4::Tcp),
            ),
        ];
        run_table(&skel.progs.proxy_egress, &egress);

        let ingress = vec![
            rewritten(
                "v4 tcp reply",
                l4_frame(rules[0].to, client4, L4::Tcp),
                l4_frame(rules[0].from, client4, L4::Tcp),
            ),
            rewritten(
                "v4 udp reply",
                l4_frame(rules[1].to, client4, L4::Udp),
                l4_frame(rules[1].from, client4, L4::Udp),
            ),
            rewritten(
                "v4 udp reply, zero checksum stays zero",
                zero_udp_checksum(l4_frame(rules[1].to, client4, L4::Udp)),
                zero_udp_checksum(l4_frame(rules[1].from, client4, L4::Udp)),
            ),
            rewritten(
                "v6 tcp reply",
                l4_frame(rules[2].to, client6, L4::Tcp),
                l4_frame(rules[2].from, client6, L4::Tcp),
            ),
            rewritten(
                "v6 udp reply",
                l4_frame(rules[3].to, client6, L4::Udp),
                l4_frame(rules[3].from, client6, L4::Udp),
            ),
            untouched(
                "reply to a client port never seen",
                l4_frame(rules[0].to, sock(CLIENT4, 40001), L4::Tcp),
            ),
            untouched(
                "reply from TO's other port",
                l4_frame(sock("10.1.0.2", 8081), client4, L4::Tcp),
            ),
            untouched(
                "packet towards FROM on ingress",
                l4_frame(client4, rules[0].from, L4::Tcp),
            ),
        ];
        run_table(&skel.progs.proxy_ingress, &ingress);
    });
}

#[test]
fn icmp_errors_of_translated_flows_name_from_instead_of_to() {
    let netns = Netns::new("proxy-icmp");
    netns.enter(|| {
        let rules = [
            rule("10.96.0.10:80", "10.1.0.2:8080"),
            rule("10.96.0.10:53", "10.1.0.3:5353"),
            rule("[fd96::10]:80", "[2001:db8:1::2]:8080"),
            rule("[fd96::10]:53", "[2001:db8:1::3]:53"),
        ];
        let mut object = MaybeUninit::uninit();
        let skel = load_with_rules(&mut object, &rules).unwrap();
        let client4 = sock(CLIENT4, 40000);
        let client6 = sock(CLIENT6, 40000);
        let macs = (SERVER_MAC, CLIENT_MAC);
        let mut ingress = Vec::new();
        let mut egress = Vec::new();
        for (rule, client, l4, router) in [
            (&rules[0], client4, L4::Tcp, "10.1.0.254"),
            (&rules[1], client4, L4::Udp, "10.1.0.254"),
            (&rules[2], client6, L4::Tcp, "2001:db8:1::fe"),
            (&rules[3], client6, L4::Udp, "2001:db8:1::fe"),
        ] {
            // the flow: the request leaves translated
            let request = l4_frame(client, rule.from, l4);
            let sent = l4_frame(client, rule.to, l4);
            run_table(
                &skel.progs.proxy_egress,
                &[redirected("flow", request.clone(), sent.clone())],
            );
            let kinds: &[IcmpError] = if client.is_ipv4() {
                &[
                    IcmpError::TooBig(1200),
                    IcmpError::Unreachable(3),
                    IcmpError::Unreachable(1),
                    IcmpError::TimeExceeded,
                ]
            } else {
                &[
                    IcmpError::TooBig(1280),
                    IcmpError::Unreachable(4),
                    IcmpError::Unreachable(3),
                    IcmpError::TimeExceeded,
                ]
            };
            for &kind in kinds {
                for quote in [minimal_quote(&sent), sent.len() - 14] {
                    // about the request, from TO or a router: as if about client -> FROM, from FROM
                    for from in [ip(router), rule.to.ip()] {
                        ingress.push(rewritten(
                            "error about a request",
                            icmp_error_frame(macs, from, client.ip(), kind, &sent, quote),
                            icmp_error_frame(macs, rule.from.ip(), client.ip(), kind, &request, quote),
                        ));
                    }
                    // this node's error about a reply (FROM -> client): to TO, about TO -> client
                    egress.push(redirected(
                        "error about a reply",
                        icmp_error_frame(
                            macs,
                            client.ip(),
                            rule.from.ip(),
                            kind,
                            &l4_frame(rule.from, client, l4),
                            quote,
                        ),
                        icmp_error_frame(
                            macs,
                            client.ip(),
                            rule.to.ip(),
                            kind,
                            &l4_frame(rule.to, client, l4),
                            quote,
                        ),
                    ));
                }
            }
            let quote = sent.len() - 14;
            let other_client = SocketAddr::new(client.ip(), 40001);
            let other_kind = if client.is_ipv4() {
                IcmpError::Raw(12, 0)
            } else {
                IcmpError::Raw(4, 0)
            };
            ingress.extend([
                untouched(
                    "error about another client port",
                    icmp_error_frame(
                        macs,
                        ip(router),
                        client.ip(),
                        kinds[0],
                        &l4_frame(other_client, rule.to, l4),
                        quote,
                    ),
                ),
                untouched(
                    "error about a flow to FROM itself",
                    icmp_error_frame(macs, ip(router), client.ip(), kinds[0], &request, quote),
                ),
                untouched(
                    "parameter problem",
                    icmp_error_frame(macs, ip(router), client.ip(), other_kind, &sent, quote),
                ),
                untouched(
                    "quote without ports",
                    icmp_error_frame(
                        macs,
                        ip(router),
                        client.ip(),
                        kinds[0],
                        &sent,
                        minimal_quote(&sent) - 5,
                    ),
                ),
            ]);
            egress.extend([
                untouched(
                    "error about a reply never translated",
                    icmp_error_frame(
                        macs,
                        client.ip(),
                        rule.from.ip(),
                        kinds[0],
                        &l4_frame(rule.from, other_client, l4),
                        quote,
                    ),
                ),
                untouched(
                    "error about TO's own packet",
                    icmp_error_frame(
                        macs,
                        client.ip(),
                        rule.to.ip(),
                        kinds[0],
                        &l4_frame(rule.to, client, l4),
                        quote,
                    ),
                ),
            ]);
        }
        let zero = zero_udp_checksum;
        ingress.push(rewritten(
            "zero UDP checksum quoted",
            icmp_error_frame(
                macs,
                ip("10.1.0.254"),
                client4.ip(),
                IcmpError::TooBig(1200),
                &zero(l4_frame(client4, rules[1].to, L4::Udp)),
                200,
            ),
            icmp_error_frame(
                macs,
                rules[1].from.ip(),
                client4.ip(),
                IcmpError::TooBig(1200),
                &zero(l4_frame(client4, rules[1].from, L4::Udp)),
                200,
            ),
        ));
        run_table(&skel.progs.proxy_ingress, &ingress);
        run_table(&skel.progs.proxy_egress, &egress);
        let translated = ingress
            .iter()
            .chain(&egress)
            .filter(|case| case.input != case.output)
            .count() as u64;
        let counted: u64 = (0..rules.len() as u32)
            .map(|rule| {
                ebpf_net::kernel::maps::sum_percpu_counters::<
                        ebpf_net::kernel::skel::proxy::types::proxy_stats,
                    >(&skel.maps.proxy_stats, rule)
                    .unwrap()
                    .icmp_errors
            })
            .sum();
        assert_eq!(counted, translated);
    });
}
