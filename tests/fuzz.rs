//! Fuzzing every packet program through test_run: frames built for each program's services,
//! rules and probe addresses, then truncated at every offset and mutated at random (IHL,
//! lengths, protocols, fragment bits, VLAN tags, IPv6 extension chains, zero checksums,
//! garbage). Invariants, checked by etherparse, not by the code under test:
//! - a frame that carries none of the program's configured addresses comes out byte-identical
//!   with a pass verdict (so nothing it does not own is ever dropped);
//! - a frame it changes has valid IP and L4 checksums when the input had them;
//! - the only drops are of frames addressed to a service (xdp-lb, when it cannot make a flow).
//!
//! EBPF_NET_FUZZ_PACKETS (default 100000 per program) and EBPF_NET_FUZZ_SEED set the run;
//! `make fuzz` runs a long one.

mod common;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};

use etherparse::{IpNumber, Ipv6Extensions, NetHeaders, NetSlice, SlicedPacket, TransportSlice};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ProgramInput, ProgramMut};

use common::kernel::Feature;
use common::packets::{
    ext_chain, fragment, icmp_error_frame, ip_frame, minimal_quote, verify_l4_checksum, with_long_ext_chain,
    with_qinq, with_vlan, zero_udp_checksum, IcmpError, CLIENT_MAC, L4, SERVER_MAC,
};
use common::topology::Netns;
use ebpf_net::control::service::parse_services;
use ebpf_net::datapath::ipv6_hp::{
    load_egress, load_ingress, ProbeAddresses, DEFAULT_GLOBAL, DEFAULT_LINK_LOCAL,
};
use ebpf_net::datapath::lb;
use ebpf_net::datapath::proxy::{load_with_rules, Rule};
use ebpf_net::datapath::xdp_lb::{self, Backend, Options};
use ebpf_net::kernel::skel::monitor::MonitorSkelBuilder;

const TCX_NEXT: i32 = -1;
const TCX_PASS: i32 = 0;
const TC_ACT_REDIRECT: i32 = 7;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;

/// Gives lb a route to its backends (it looks up its source NAT address towards each).
const LINK: &str = "ip link add v0 type veth peer name v1 && ip addr add 10.1.0.1/24 dev v0 && \
                    ip -6 addr add 2001:db8:1::1/64 dev v0 nodad && ip link set v0 up && ip link set v1 up";

fn packets_per_program() -> usize {
    std::env::var("EBPF_NET_FUZZ_PACKETS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000)
}

fn seed() -> u64 {
    std::env::var("EBPF_NET_FUZZ_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0x00eb_9f5e_ed00_0001)
}

/// xorshift64*: reproducible from the seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn sock(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Sets IPv4 fragment bits (MF and/or an offset) and fixes the header checksum.
fn ipv4_fragment(mut frame: Vec<u8>, more: bool, offset: u16) -> Vec<u8> {
    let flags_offset = (u16::from(more) << 13) | (offset & 0x1fff);
    frame[20..22].copy_from_slice(&flags_offset.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let mut sum = 0u32;
    for pair in frame[14..14 + ihl].chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    frame
}

/// Every shape of frame between two endpoints that a node sees: TCP, UDP (also with a zero
/// checksum), ICMPv6, IPv4 options, VLAN tags, IPv6 extension chains, fragments.
fn shapes(src: SocketAddr, dst: SocketAddr) -> Vec<Vec<u8>> {
    let frame = |exts: Ipv6Extensions, options: &[u8], l4: L4| {
        ip_frame(src.ip(), src.port(), dst.ip(), dst.port(), exts, options, l4)
    };
    let plain = || Ipv6Extensions::default();
    let tcp = frame(plain(), &[], L4::Tcp);
    let udp = frame(plain(), &[], L4::Udp);
    let mut shapes = vec![
        tcp.clone(),
        udp.clone(),
        zero_udp_checksum(udp.clone()),
        with_vlan(&tcp),
        with_vlan(&udp),
        with_qinq(&tcp),
        with_qinq(&udp),
    ];
    if src.is_ipv4() {
        let options = [1u8, 1, 1, 1, 1, 1, 1, 0];
        shapes.push(frame(plain(), &options, L4::Tcp));
        shapes.push(frame(plain(), &options, L4::Udp));
        shapes.push(ipv4_fragment(tcp.clone(), true, 0));
        shapes.push(ipv4_fragment(udp.clone(), false, 185));
        shapes.push(frame(plain(), &[], L4::Icmpv4Echo));
    } else {
        shapes.push(frame(ext_chain(), &[], L4::Tcp));
        shapes.push(frame(ext_chain(), &[], L4::Udp));
        shapes.push(frame(fragment(0, true), &[], L4::Tcp));
        shapes.push(frame(fragment(185, false), &[], L4::Udp));
        shapes.push(frame(plain(), &[], L4::Icmpv6Echo));
        // longer extension chains than the parsers walk (8 headers)
        shapes.push(with_long_ext_chain(&tcp, 9));
        shapes.push(with_long_ext_chain(&udp, 12));
    }
    shapes
}

/// ICMP errors from `src` to `dst` about each of `quoted` (whole frames): every kind of error
/// a translator handles, quoting the minimum RFC 792 asks for and the whole packet, and under
/// a VLAN tag.
fn errors(src: &str, dst: &str, quoted: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let kinds = if src.is_ipv4() {
        [
            IcmpError::TooBig(1200),
            IcmpError::Unreachable(3),
            IcmpError::TimeExceeded,
        ]
    } else {
        [
            IcmpError::TooBig(1280),
            IcmpError::Unreachable(4),
            IcmpError::TimeExceeded,
        ]
    };
    let mut frames = Vec::new();
    for frame in quoted {
        for kind in kinds {
            for quote in [minimal_quote(frame), frame.len() - 14] {
                frames.push(icmp_error_frame(
                    (CLIENT_MAC, SERVER_MAC),
                    src,
                    dst,
                    kind,
                    frame,
                    quote,
                ));
            }
        }
        let error = icmp_error_frame(
            (CLIENT_MAC, SERVER_MAC),
            src,
            dst,
            kinds[0],
            frame,
            frame.len() - 14,
        );
        frames.push(with_vlan(&error));
    }
    frames
}

/// A TCP and a UDP packet between two endpoints.
fn tcp_udp(src: &str, dst: &str) -> Vec<Vec<u8>> {
    [L4::Tcp, L4::Udp]
        .map(|l4| {
            ip_frame(
                sock(src).ip(),
                sock(src).port(),
                sock(dst).ip(),
                sock(dst).port(),
                Ipv6Extensions::default(),
                &[],
                l4,
            )
        })
        .to_vec()
}

/// Offset of the IP header: after the Ethernet header and an 802.1Q tag, if any.
fn ip_offset(frame: &[u8]) -> usize {
    if frame.len() >= 14 && frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    }
}

/// One random change of a frame.
fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    let ip = ip_offset(frame);
    let len = frame.len();
    match rng.below(9) {
        0 => frame.truncate(rng.below(len + 1)),
        1 => {
            for _ in 0..1 + rng.below(4) {
                if len > 0 {
                    let at = rng.below(len);
                    frame[at] ^= rng.byte() | 1;
                }
            }
        }
        // IPv4: version/IHL; IPv6: version/traffic class
        2 if len > ip => frame[ip] = (frame[ip] & 0xf0) | (rng.byte() & 0x0f),
        // IPv4 total length, IPv6 payload length
        3 if len > ip + 6 => {
            let at = if frame[ip] >> 4 == 6 { ip + 4 } else { ip + 2 };
            frame[at] = rng.byte();
            frame[at + 1] = rng.byte();
        }
        // L4 protocol / next header
        4 if len > ip + 9 => {
            let at = if frame[ip] >> 4 == 6 { ip + 6 } else { ip + 9 };
            frame[at] = [6, 17, 1, 58, 0, 43, 44, 60, 51, 50][rng.below(10)];
        }
        // IPv4 fragment bits
        5 if len > ip + 7 && frame[ip] >> 4 == 4 => {
            frame[ip + 6] = rng.byte() & 0x3f;
            frame[ip + 7] = rng.byte();
        }
        // garbage after a valid-looking Ethernet header
        6 => {
            let ethertype: [u8; 2] = [[0x08, 0x00], [0x86, 0xdd], [0x81, 0x00], [0x88, 0xa8]][rng.below(4)];
            frame.truncate(12.min(len));
            frame.resize(12, 0x02);
            frame.extend_from_slice(&ethertype);
            for _ in 0..rng.below(120) {
                frame.push(rng.byte());
            }
        }
        // trailing bytes (Ethernet padding or junk)
        7 => {
            for _ in 0..1 + rng.below(40) {
                frame.push(rng.byte());
            }
        }
        // L4 checksum zeroed
        _ => {
            let l4 = ip + if len > ip && frame[ip] >> 4 == 6 { 40 } else { 20 };
            let at = if len > ip + 9 && frame[ip + 9] == 6 {
                l4 + 16
            } else {
                l4 + 6
            };
            if at + 2 <= len {
                frame[at..at + 2].copy_from_slice(&[0, 0]);
            }
        }
    }
}

/// What a program is, and which of its verdicts mean what.
struct Target<'a> {
    name: &'static str,
    prog: &'a ProgramMut<'a>,
    /// verdicts that let a packet go on unchanged by intent
    pass: &'a [i32],
    /// verdicts a translated packet may get
    translated: &'a [i32],
    /// verdicts dropping a packet addressed to a service
    owned_drop: &'a [i32],
    /// configured addresses: a frame with none of them must come out untouched
    addresses: Vec<IpAddr>,
    /// frames addressed to services, rules or probe addresses, before mutation
    addressed: Vec<Vec<u8>>,
    /// frames of the same shapes between other addresses
    other: Vec<Vec<u8>>,
    /// whether the program never changes a packet (monitor, lb)
    read_only: bool,
    /// frames carrying configured addresses that are still not the program's (ICMP errors
    /// about flows it never made): they and every cut of them must pass byte-identical
    foreign: Vec<Vec<u8>>,
    /// frames it must translate (ICMP errors about its flows): changed, checksums valid
    must_translate: Vec<Vec<u8>>,
}

impl<'a> Target<'a> {
    /// A tc program that never changes a packet (monitor, lb): frames to `addressed` pairs
    /// and to `other_pairs` of the same shapes.
    fn read_only_tc(
        name: &'static str,
        prog: &'a ProgramMut<'a>,
        addressed: &[(&str, &str)],
        other_pairs: &[(&str, &str)],
    ) -> Self {
        Target {
            name,
            prog,
            pass: &[TCX_NEXT, TCX_PASS],
            translated: &[],
            owned_drop: &[],
            addresses: vec![],
            addressed: other_shapes(addressed),
            other: other_shapes(other_pairs),
            read_only: true,
            foreign: vec![],
            must_translate: vec![],
        }
    }
}

#[derive(Default, Debug)]
struct Tally {
    frames: usize,
    /// frames test_run itself does not take (shorter than their network header)
    refused: usize,
    unaddressed: usize,
    translated: usize,
    passed_with_address: usize,
    dropped: usize,
    /// invariants evaluated: one verdict/bytes check per frame, one per checksum verified
    checks: usize,
    failures: Vec<String>,
}

fn contains(frame: &[u8], needle: &[u8]) -> bool {
    frame.windows(needle.len()).any(|window| window == needle)
}

fn carries_address(frame: &[u8], addresses: &[IpAddr]) -> bool {
    addresses.iter().any(|addr| match addr {
        IpAddr::V4(v4) => contains(frame, &v4.octets()),
        IpAddr::V6(v6) => contains(frame, &v6.octets()),
    })
}

/// Whether the input's checksums can be held against the output: a decoded TCP, UDP or ICMP
/// segment, or an IPv6 first fragment holding TCP. Not an IPv6 UDP datagram with a zero
/// checksum (invalid in IPv6; no rewrite can make it right) nor an AH/ESP payload.
fn checkable(frame: &[u8]) -> bool {
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
        return false;
    };
    match (&packet.net, &packet.transport) {
        (Some(NetSlice::Ipv6(_)), Some(TransportSlice::Udp(udp))) => udp.checksum() != 0,
        (_, Some(_)) => true,
        (Some(NetSlice::Ipv6(_)), None) => etherparse::PacketHeaders::from_ethernet_slice(frame)
            .ok()
            .and_then(|headers| match headers.net {
                Some(NetHeaders::Ipv6(_, exts)) => exts.fragment,
                _ => None,
            })
            .is_some_and(|fragment| {
                fragment.fragment_offset.value() == 0 && fragment.next_header == IpNumber::TCP
            }),
        _ => false,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The verdict and output frame; None when the kernel's test_run refuses the input itself
/// (skb programs: too short for the network header the EtherType names).
fn try_run(prog: &ProgramMut<'_>, input: &[u8]) -> Option<(i32, Vec<u8>)> {
    let mut out = vec![0u8; input.len() + 256];
    let result = match prog.test_run(ProgramInput {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..Default::default()
    }) {
        Ok(result) => result,
        // the kernel refuses skb frames shorter than the network header their EtherType names
        Err(err) if err.kind() == libbpf_rs::ErrorKind::InvalidInput && input.len() < 14 + 40 => return None,
        Err(err) => panic!("test_run: {err} on {}", hex(input)),
    };
    let data = result.data.map(|data| data.to_vec()).unwrap_or_default();
    Some((result.return_value as i32, data))
}

fn run(prog: &ProgramMut<'_>, input: &[u8]) -> (i32, Vec<u8>) {
    try_run(prog, input).expect("a frame test_run takes")
}

/// Checks one frame against the invariants, counting what happened.
fn check(target: &Target<'_>, input: &[u8], tally: &mut Tally) {
    // test_run refuses frames without a whole Ethernet header
    let Some((verdict, output)) = (if input.len() < 14 {
        None
    } else {
        try_run(target.prog, input)
    }) else {
        tally.refused += 1;
        return;
    };
    tally.frames += 1;
    tally.checks += 1;
    let mut problem = None;
    if !carries_address(input, &target.addresses) {
        tally.unaddressed += 1;
        if !target.pass.contains(&verdict) || output != input {
            problem = Some(format!(
                "unaddressed frame: verdict {verdict}, output {}",
                hex(&output)
            ));
        }
    } else if target.owned_drop.contains(&verdict) {
        tally.dropped += 1;
    } else if output == input && target.pass.contains(&verdict) {
        tally.passed_with_address += 1;
    } else if target.read_only {
        problem = Some(format!(
            "a read-only program changed or stopped it: verdict {verdict}"
        ));
    } else if !target.translated.contains(&verdict) && !target.pass.contains(&verdict) {
        problem = Some(format!("unexpected verdict {verdict}"));
    } else {
        tally.translated += 1;
        if output != input && checkable(input) && verify_l4_checksum(input, true).is_ok() {
            tally.checks += 1;
            if let Err(err) = verify_l4_checksum(&output, true) {
                problem = Some(format!(
                    "translated with a bad checksum ({err}): {}",
                    hex(&output)
                ));
            }
        }
    }
    if let Some(problem) = problem {
        if tally.failures.len() < 8 {
            tally
                .failures
                .push(format!("{problem}\n    input {}", hex(input)));
        }
    }
}

/// Every template truncated at every offset, then random mutations of random templates up to
/// `count` frames in all.
fn fuzz(target: &Target<'_>, count: usize, rng: &mut Rng) -> Tally {
    let mut tally = Tally::default();
    for frame in &target.foreign {
        for cut in 14..=frame.len() {
            let input = &frame[..cut];
            let Some((verdict, output)) = try_run(target.prog, input) else {
                continue;
            };
            tally.checks += 1;
            if !target.pass.contains(&verdict) || output != input {
                tally.failures.push(format!(
                    "a foreign ICMP error (cut at {cut}) changed: verdict {verdict}\n    input {}\n    output {}",
                    hex(input),
                    hex(&output)
                ));
            }
        }
    }
    for input in &target.must_translate {
        let (verdict, output) = run(target.prog, input);
        tally.checks += 2;
        let valid = verify_l4_checksum(&output, true);
        if output == *input || !target.translated.contains(&verdict) || valid.is_err() {
            tally.failures.push(format!(
                "an ICMP error of a flow not translated right: verdict {verdict}, {valid:?}\n    input {}\n    output {}",
                hex(input),
                hex(&output)
            ));
        }
    }
    let templates: Vec<&Vec<u8>> = target
        .addressed
        .iter()
        .chain(target.other.iter())
        .chain(target.foreign.iter())
        .chain(target.must_translate.iter())
        .collect();
    for template in &templates {
        check(target, template, &mut tally);
        for cut in 0..template.len() {
            check(target, &template[..cut], &mut tally);
        }
    }
    let mut frame = Vec::with_capacity(256);
    while tally.frames < count {
        frame.clear();
        frame.extend_from_slice(templates[rng.below(templates.len())]);
        for _ in 0..1 + rng.below(2) {
            mutate(rng, &mut frame);
        }
        check(target, &frame, &mut tally);
    }
    tally
}

/// Runs and reports one program; fails the test on any broken invariant.
fn fuzz_and_report(target: Target<'_>, rng: &mut Rng, failures: &mut Vec<String>) {
    let tally = fuzz(&target, packets_per_program(), rng);
    eprintln!(
        "fuzz {:<16} {:>8} frames: {:>8} without a configured address (all untouched, passed); with one: {} translated, {} passed untouched, {} dropped; {} too short for test_run; {} ICMP errors of its flows, {} foreign; {} invariant checks",
        target.name, tally.frames, tally.unaddressed, tally.translated, tally.passed_with_address, tally.dropped, tally.refused,
        target.must_translate.len(), target.foreign.len(), tally.checks
    );
    assert!(tally.frames >= packets_per_program());
    assert!(
        tally.unaddressed > tally.frames / 10,
        "{}: too few unaddressed frames",
        target.name
    );
    if !target.read_only && target.owned_drop.is_empty() {
        assert!(
            tally.translated > 0,
            "{}: nothing translated: the fuzz misses the program",
            target.name
        );
    }
    for failure in tally.failures {
        failures.push(format!("{}: {failure}", target.name));
    }
}

fn pairs_shapes(pairs: &[(&str, &str)]) -> Vec<Vec<u8>> {
    pairs
        .iter()
        .flat_map(|(src, dst)| shapes(sock(src), sock(dst)))
        .collect()
}

/// Frames between other addresses: every shape, and ICMP errors about their packets.
fn other_shapes(pairs: &[(&str, &str)]) -> Vec<Vec<u8>> {
    let mut frames = pairs_shapes(pairs);
    for (src, dst) in pairs {
        let (s, d) = (sock(src).ip().to_string(), sock(dst).ip().to_string());
        frames.extend(errors(&d, &s, &tcp_udp(src, dst)));
    }
    frames
}

#[test]
fn every_packet_program_keeps_its_invariants_under_fuzzed_frames() {
    let netns = Netns::new("fuzz");
    netns.exec(LINK);
    let seed = seed();
    eprintln!(
        "fuzz seed {seed} (EBPF_NET_FUZZ_SEED), {} frames per program",
        packets_per_program()
    );
    let failures = netns.enter(|| {
        let mut rng = Rng(seed);
        let mut failures = Vec::new();
        let mut objects: [MaybeUninit<libbpf_rs::OpenObject>; 6] =
            std::array::from_fn(|_| MaybeUninit::uninit());
        let [ingress_obj, egress_obj, monitor_obj, proxy_obj, lb_obj, xdp_obj] = &mut objects;
        let tc_pass: &[i32] = &[TCX_NEXT, TCX_PASS];
        let other_pairs = [
            ("10.0.0.1:40000", "10.0.0.2:80"),
            ("[2001:db8::1]:40000", "[2001:db8::2]:80"),
        ];

        // ipv6-hp: the probe's link-local source (ingress) and global destination (egress)
        let hp = ProbeAddresses {
            link_local: DEFAULT_LINK_LOCAL.parse().unwrap(),
            global: DEFAULT_GLOBAL.parse().unwrap(),
        };
        let flag = ebpf_net::kernel::probe::l4_csum_ipv6_flag();
        let ingress = load_ingress(ingress_obj, &hp, flag, None).unwrap();
        let egress = load_egress(egress_obj, &hp, flag, None).unwrap();
        let ll = format!("[{DEFAULT_LINK_LOCAL}]:40000");
        let global = format!("[{DEFAULT_GLOBAL}]:40000");
        let hp_addresses = vec![IpAddr::V6(hp.link_local), IpAddr::V6(hp.global)];
        for (name, prog, pairs, icmp) in [
            (
                "ipv6_hp_ingress",
                &ingress.progs.ipv6_hp_ingress,
                [(ll.as_str(), "[2001:db8::10]:80")],
                // the prober's errors about the node's replies: the address rewritten too
                errors(
                    DEFAULT_LINK_LOCAL,
                    "2001:db8::10",
                    &tcp_udp("[2001:db8::10]:80", &ll),
                ),
            ),
            (
                "ipv6_hp_egress",
                &egress.progs.ipv6_hp_egress,
                [("[2001:db8::10]:80", global.as_str())],
                errors(
                    "2001:db8::10",
                    DEFAULT_GLOBAL,
                    &tcp_udp(&global, "[2001:db8::10]:80"),
                ),
            ),
        ] {
            fuzz_and_report(
                Target {
                    name,
                    prog,
                    pass: tc_pass,
                    translated: tc_pass,
                    owned_drop: &[],
                    addresses: hp_addresses.clone(),
                    addressed: pairs_shapes(&pairs),
                    other: other_shapes(&other_pairs),
                    read_only: false,
                    foreign: vec![],
                    must_translate: icmp,
                },
                &mut rng,
                &mut failures,
            );
        }

        // monitor: counts everything, changes nothing
        let monitor = MonitorSkelBuilder::default()
            .open(monitor_obj)
            .unwrap()
            .load()
            .unwrap();
        for (name, prog) in [
            ("monitor_ingress", &monitor.progs.monitor_ingress),
            ("monitor_egress", &monitor.progs.monitor_egress),
        ] {
            fuzz_and_report(
                Target::read_only_tc(
                    name,
                    prog,
                    &[
                        ("10.0.0.1:40000", "10.96.0.10:80"),
                        ("[fd00::1]:40000", "[fd96::10]:53"),
                    ],
                    &other_pairs,
                ),
                &mut rng,
                &mut failures,
            );
        }

        // proxy: requests to FROM on egress, replies from TO on ingress (flows made first)
        let rules = [
            Rule {
                from: sock("10.96.0.10:80"),
                to: sock("10.1.0.2:8080"),
                origin: String::new(),
            },
            Rule {
                from: sock("[fd96::10]:80"),
                to: sock("[2001:db8:1::2]:8080"),
                origin: String::new(),
            },
        ];
        let proxy = load_with_rules(proxy_obj, &rules).unwrap();
        let requests = [
            ("10.0.0.1:40000", "10.96.0.10:80"),
            ("[fd00::1]:40000", "[fd96::10]:80"),
        ];
        let replies = [
            ("10.1.0.2:8080", "10.0.0.1:40000"),
            ("[2001:db8:1::2]:8080", "[fd00::1]:40000"),
        ];
        let proxy_addresses: Vec<IpAddr> = rules.iter().flat_map(|r| [r.from.ip(), r.to.ip()]).collect();
        for (name, prog, pairs, translated) in [
            (
                "proxy_egress",
                &proxy.progs.proxy_egress,
                requests,
                &[TCX_NEXT, TCX_PASS, TC_ACT_REDIRECT][..],
            ),
            ("proxy_ingress", &proxy.progs.proxy_ingress, replies, tc_pass),
        ] {
            if name == "proxy_egress" {
                // the flows the replies belong to
                for frame in pairs_shapes(&requests) {
                    run(prog, &frame);
                }
            }
            // ICMP errors: on ingress about requests (client -> TO), from a router; on egress
            // this node's about replies (FROM -> client); of flows and of ports never seen
            let about = |client: &str, v6: bool| -> Vec<Vec<u8>> {
                let (rule, router) = if v6 {
                    (&rules[1], "2001:db8:1::fe")
                } else {
                    (&rules[0], "10.1.0.254")
                };
                let client_ip = sock(client).ip().to_string();
                if name == "proxy_egress" {
                    errors(
                        &client_ip,
                        &rule.from.ip().to_string(),
                        &tcp_udp(&rule.from.to_string(), client),
                    )
                } else {
                    errors(router, &client_ip, &tcp_udp(client, &rule.to.to_string()))
                }
            };
            let must_translate = [about("10.0.0.1:40000", false), about("[fd00::1]:40000", true)].concat();
            let foreign = [about("10.0.0.77:40001", false), about("[fd00::77]:40001", true)].concat();
            fuzz_and_report(
                Target {
                    name,
                    prog,
                    pass: tc_pass,
                    translated,
                    owned_drop: &[],
                    addresses: proxy_addresses.clone(),
                    addressed: pairs_shapes(&pairs),
                    other: other_shapes(&other_pairs),
                    read_only: false,
                    foreign,
                    must_translate,
                },
                &mut rng,
                &mut failures,
            );
        }

        // lb: makes conntrack entries, never changes or stops a packet itself (not below
        // 6.1: no conntrack NAT kfunc, lb refuses to load there)
        if common::kernel::require_for(Feature::CtNat, "fuzzing lb") {
            let services = parse_services(
                &[
                    "10.96.0.20:80=10.1.0.2:8080,10.1.0.3:8080".to_string(),
                    "[fd96::20]:80=[2001:db8:1::2]:8080".to_string(),
                ],
                lb::LIMITS,
            )
            .unwrap();
            let lb_skel = lb::load_with_services(lb_obj, &services, true).unwrap();
            // as while a run answers asks: every TCP segment to a VIP is looked up in
            // conntrack (tcp_established), none is sent on (no entry was handed over)
            libbpf_rs::MapCore::update(
                &lb_skel.maps.lb_answered_until,
                &0u32.to_ne_bytes(),
                &u64::MAX.to_ne_bytes(),
                libbpf_rs::MapFlags::ANY,
            )
            .unwrap();
            let prog = &lb_skel.progs.lb_ingress;
            fuzz_and_report(
                Target::read_only_tc(
                    "lb_ingress",
                    prog,
                    &[
                        ("10.0.0.1:40000", "10.96.0.20:80"),
                        ("[fd00::1]:40000", "[fd96::20]:80"),
                    ],
                    &other_pairs,
                ),
                &mut rng,
                &mut failures,
            );
        }

        // xdp-lb: requests to the VIPs, replies from backends to the node's address
        let services = parse_services(
            &[
                "10.96.0.10:80=10.1.0.2:8080,10.1.0.3:8080".to_string(),
                "[fd96::10]:80=[2001:db8:1::2]:8080".to_string(),
            ],
            xdp_lb::LIMITS,
        )
        .unwrap();
        let backends: HashMap<SocketAddr, Backend> = services
            .iter()
            .flat_map(|svc| svc.addrs())
            .map(|b| {
                let lb_addr = if b.is_ipv4() { "10.1.0.1" } else { "2001:db8:1::1" };
                (
                    b,
                    Backend {
                        lb_addr: lb_addr.parse().unwrap(),
                        mac: [2, 0, 0, 0, 0xbb, 1],
                    },
                )
            })
            .collect();
        let options = Options {
            events: 0,
            max_flows: 65536,
            flood_rate: 0,
            ports: (20000, 4096),
            seed: Some(7),
        };
        let xdp = xdp_lb::load_with_services(xdp_obj, &options, &services, &backends).unwrap();
        let prog = xdp_lb::program(&xdp);
        let mut addresses: Vec<IpAddr> = services.iter().map(|s| s.vip.ip()).collect();
        addresses.extend(backends.iter().flat_map(|(b, backend)| [b.ip(), backend.lb_addr]));
        // ICMP errors of flows (made first): about the backend leg from a router, about the
        // client leg to the VIP; and of ports never handed out or clients never seen
        let clients = ["10.0.0.1:40000", "[fd00::1]:40000"];
        let vips = ["10.96.0.10:80", "[fd96::10]:80"];
        for (client, vip) in clients.iter().zip(vips) {
            for frame in tcp_udp(client, vip) {
                assert_eq!(run(prog, &frame).0, XDP_TX);
            }
        }
        let mut must_translate = Vec::new();
        let mut foreign = Vec::new();
        for flow in xdp_lb::all_flows(&xdp).unwrap() {
            let (client, vip) = (flow.client.to_string(), flow.vip.to_string());
            let lb = SocketAddr::new(flow.lb_addr, flow.lb_port).to_string();
            let never = SocketAddr::new(flow.lb_addr, 30000).to_string();
            let backend = flow.backend.to_string();
            let router = if flow.client.is_ipv4() {
                "10.1.0.254"
            } else {
                "2001:db8:1::fe"
            };
            let stranger = if flow.client.is_ipv4() {
                "10.0.0.77:40001"
            } else {
                "[fd00::77]:40001"
            };
            let (lb_ip, vip_ip, client_ip) = (
                flow.lb_addr.to_string(),
                flow.vip.ip().to_string(),
                flow.client.ip().to_string(),
            );
            let pick = |frames: Vec<Vec<u8>>| -> Vec<Vec<u8>> {
                frames
                    .into_iter()
                    .filter(|f| f[14 + if flow.client.is_ipv4() { 9 } else { 6 }] == flow.proto)
                    .collect()
            };
            must_translate.extend(errors(router, &lb_ip, &pick(tcp_udp(&lb, &backend))));
            must_translate.extend(errors(&client_ip, &vip_ip, &pick(tcp_udp(&vip, &client))));
            foreign.extend(errors(router, &lb_ip, &pick(tcp_udp(&never, &backend))));
            foreign.extend(errors(&client_ip, &vip_ip, &pick(tcp_udp(&vip, stranger))));
        }
        assert_eq!(must_translate.len(), 4 * 2 * 7);
        fuzz_and_report(
            Target {
                name: "xdp_lb",
                prog,
                pass: &[XDP_PASS],
                translated: &[XDP_TX],
                owned_drop: &[XDP_DROP],
                addresses,
                addressed: pairs_shapes(&[
                    ("10.0.0.1:40000", "10.96.0.10:80"),
                    ("[fd00::1]:40000", "[fd96::10]:80"),
                    ("10.1.0.2:8080", "10.1.0.1:20001"),
                    ("[2001:db8:1::2]:8080", "[2001:db8:1::1]:20001"),
                ]),
                other: other_shapes(&other_pairs),
                read_only: false,
                foreign,
                must_translate,
            },
            &mut rng,
            &mut failures,
        );
        failures
    });
    assert!(
        failures.is_empty(),
        "{} broken invariants:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Stateful mode on xdp-lb: TCP conversations (SYN, the backend's SYN-ACK, ACK, data both
/// ways, FIN or RST, SYNs never answered) over many flows, interleaved at random, through a
/// table of 64 flows and 256 source ports per backend. After every frame, the tables read
/// back must hold: every flow has its reverse entry and every reverse entry its flow; no
/// source port is owned twice; no established flow (handshake done, not closed) is gone or
/// moved.
#[test]
fn xdp_lb_stateful_sequences_keep_the_tables_consistent() {
    use ebpf_net::kernel::maps::from_bytes;
    use ebpf_net::kernel::skel::xdp_lb::types::{xdp_lb_flow, xdp_lb_reply, xdp_lb_tuple};
    use etherparse::PacketBuilder;
    use libbpf_rs::{MapCore, MapFlags};

    const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const OTHER_ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 0xbb, 1];
    let sequences = (packets_per_program() / 20).max(500);
    let netns = Netns::new("fuzz-state");
    let (frames, checks, peak, failures) = netns.enter(|| {
        let services = parse_services(
            &["10.96.0.10:80=10.1.0.2:8080,10.1.0.3:8080".to_string()],
            xdp_lb::LIMITS,
        )
        .unwrap();
        let backends: HashMap<SocketAddr, Backend> = services[0]
            .addrs()
            .into_iter()
            .map(|b| {
                (
                    b,
                    Backend {
                        lb_addr: "10.1.0.1".parse().unwrap(),
                        mac: BACKEND_MAC,
                    },
                )
            })
            .collect();
        let options = Options {
            events: 0,
            max_flows: 64,
            flood_rate: 0,
            ports: (20000, 256),
            seed: Some(11),
        };
        let mut object = MaybeUninit::uninit();
        let skel = xdp_lb::load_with_services(&mut object, &options, &services, &backends).unwrap();
        let prog = xdp_lb::program(&skel);
        let vip = sock("10.96.0.10:80");
        let tcp = |src_mac: [u8; 6], src: SocketAddr, dst: SocketAddr, flags: &str, payload: &[u8]| -> Vec<u8> {
            let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
                unreachable!()
            };
            let mut b = PacketBuilder::ethernet2(src_mac, LB_MAC)
                .ipv4(s.octets(), d.octets(), 64)
                .tcp(src.port(), dst.port(), 1000, 64240);
            for flag in flags.chars() {
                b = match flag {
                    'S' => b.syn(),
                    'A' => b.ack(1),
                    'F' => b.fin(),
                    'R' => b.rst(),
                    _ => b,
                };
            }
            let mut out = Vec::new();
            b.write(&mut out, payload).unwrap();
            out
        };
        let run = |frame: &[u8]| -> i32 {
            let mut out = vec![0u8; frame.len() + 64];
            prog.test_run(ProgramInput {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap()
            .return_value as i32
        };
        let decode = |bytes: &[u8]| -> xdp_lb_tuple { xdp_lb::tuple_of_key(bytes).unwrap() };
        // every (key, value) of the tables of both families
        let entries = |tables: &[&libbpf_rs::Map<'_>]| -> Vec<(Vec<u8>, Vec<u8>)> {
            tables
                .iter()
                .flat_map(|table| {
                    table.keys().filter_map(|key| {
                        let value = table.lookup(&key, MapFlags::ANY).unwrap()?;
                        Some((key, value))
                    })
                })
                .collect()
        };
        let mut rng = Rng(seed() ^ 0x57a7e);
        // per client: 0 nothing, 1 SYN sent, 2 answered, 3 established, 4 closed
        let clients: Vec<SocketAddr> = (0..150u32)
            .map(|i| {
                SocketAddr::new(
                    IpAddr::from([10, 2, (i / 200) as u8, (i % 200) as u8 + 1]),
                    40000 + (i % 7) as u16,
                )
            })
            .collect();
        let mut stage = vec![0u8; clients.len()];
        let mut established: HashMap<SocketAddr, xdp_lb::Flow> = HashMap::new();
        let (mut frames, mut checks, mut failures) = (0u64, 0u64, Vec::new());
        let (mut started, mut peak) = (0usize, 0usize);
        while started < sequences {
            let i = rng.below(clients.len());
            let client = clients[i];
            let flows = xdp_lb::all_flows(&skel).unwrap();
            let flow = flows.iter().find(|f| f.client == client).cloned();
            let from_backend = |f: &xdp_lb::Flow, flags: &str, data: &[u8]| {
                tcp(BACKEND_MAC, f.backend, SocketAddr::new(f.lb_addr, f.lb_port), flags, data)
            };
            // one client frame in eight from another router: the flow's way back follows
            let mac = if rng.below(8) == 0 { OTHER_ROUTER_MAC } else { CLIENT_MAC };
            let tcp = |src: SocketAddr, dst: SocketAddr, flags: &str, payload: &[u8]| tcp(mac, src, dst, flags, payload);
            let frame = match (stage[i], &flow, rng.below(10)) {
                // a SYN, or (one in ten) a SYN that will never be answered: a spoofed one
                (0 | 4, _, _) | (_, None, _) => {
                    stage[i] = 1;
                    started += 1;
                    established.remove(&client);
                    tcp(client, vip, "S", &[])
                }
                (1, Some(f), n) if n < 9 => {
                    stage[i] = 2;
                    from_backend(f, "SA", &[])
                }
                (1, _, _) => tcp(client, vip, "S", &[]),
                (2, Some(_), _) => {
                    stage[i] = 3;
                    tcp(client, vip, "A", &[])
                }
                (3, Some(_), 0) => {
                    stage[i] = 4;
                    established.remove(&client);
                    tcp(client, vip, "AR", &[])
                }
                (3, Some(f), 1) => {
                    stage[i] = 4;
                    established.remove(&client);
                    from_backend(f, "AF", &[])
                }
                (3, Some(f), n) if n < 6 => from_backend(f, "A", b"data from the backend"),
                (_, _, _) => tcp(client, vip, "A", b"data from the client"),
            };
            let verdict = run(&frame);
            frames += 1;
            // the handshake's ACK went through: established from here on
            if stage[i] == 3 && verdict == XDP_TX && !established.contains_key(&client) {
                if let Some(f) = xdp_lb::all_flows(&skel)
                    .unwrap()
                    .into_iter()
                    .find(|f| f.client == client)
                {
                    established.insert(client, f);
                }
            }
            if stage[i] == 1 && verdict != XDP_TX {
                stage[i] = 0;
            }
            // invariants
            let flows = xdp_lb::all_flows(&skel).unwrap();
            // client -> the flow's backend slot
            let mut slots = HashMap::new();
            for (key, value) in entries(&[&skel.maps.xdp_lb_flows4, &skel.maps.xdp_lb_flows6]) {
                let (k, v): (xdp_lb_tuple, xdp_lb_flow) = (decode(&key), from_bytes("flow", &value).unwrap());
                let client = SocketAddr::new(
                    ebpf_net::kernel::addr::ip_from_words(k.family, k.src),
                    u16::from_be(k.sport),
                );
                slots.insert(client, v.slot);
            }
            // (backend, port) -> what a reply of that flow is rewritten with
            let mut reverse = HashMap::new();
            for (key, value) in entries(&[&skel.maps.xdp_lb_reverse4, &skel.maps.xdp_lb_reverse6]) {
                let (k, v): (xdp_lb_tuple, xdp_lb_reply) = (decode(&key), from_bytes("reply", &value).unwrap());
                let backend = SocketAddr::new(
                    ebpf_net::kernel::addr::ip_from_words(k.family, k.src),
                    u16::from_be(k.sport),
                );
                let port = u16::from_be(k.dport);
                let client = SocketAddr::new(
                    ebpf_net::kernel::addr::ip_from_words(v.client.family, v.client.src),
                    u16::from_be(v.client.sport),
                );
                reverse.insert((backend, port), (client, v.client_mac, v.slot));
            }
            checks += 1;
            if reverse.len() != flows.len() {
                failures.push(format!(
                    "frame {frames}: {} flows, {} reverse entries",
                    flows.len(),
                    reverse.len()
                ));
            }
            let mut owners = HashMap::new();
            for f in &flows {
                checks += 2;
                match reverse.get(&(f.backend, f.lb_port)) {
                    Some((client, _, _)) if *client != f.client => failures.push(format!(
                        "frame {frames}: flow of {}: its reverse entry names {client}",
                        f.client
                    )),
                    Some((_, mac, slot)) if (*mac, Some(slot)) != (f.client_mac, slots.get(&f.client)) => {
                        failures.push(format!(
                            "frame {frames}: flow of {}: its reverse entry has MAC {mac:02x?} and slot {slot}, the flow {:02x?} and {:?}",
                            f.client,
                            f.client_mac,
                            slots.get(&f.client)
                        ))
                    }
                    Some(_) => {}
                    None => failures.push(format!("frame {frames}: flow of {} has no reverse entry", f.client)),
                }
                if let Some(other) = owners.insert((f.backend, f.lb_port), f.client) {
                    failures.push(format!(
                        "frame {frames}: port {} towards {} owned by {} and {other}",
                        f.lb_port, f.backend, f.client
                    ));
                }
            }
            for (client, was) in &established {
                checks += 1;
                let way = |f: &xdp_lb::Flow| (f.backend, f.lb_addr, f.lb_port);
                if flows.iter().find(|f| f.client == *client).map(way) != Some(way(was)) {
                    failures.push(format!(
                        "frame {frames}: established flow of {client} lost or moved"
                    ));
                }
            }
            peak = peak.max(established.len());
            if failures.len() > 20 {
                break;
            }
        }
        (frames, checks, peak, failures)
    });
    println!(
        "xdp_lb stateful: {sequences} sequences over 150 clients through 64 flows, {frames} frames, {checks} invariant checks, up to {peak} established flows at once, {} broken",
        failures.len()
    );
    assert!(
        peak >= 16,
        "only {peak} established flows at once: the table was never under pressure"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
