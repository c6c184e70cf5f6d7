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
