//! Frames for test_run tables built with etherparse, and checksum checks by etherparse's
//! own parser, independent of the BPF code under test.

use std::net::{IpAddr, Ipv6Addr};

use etherparse::{
    IpFragOffset, IpNumber, Ipv6Extensions, Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader,
    Ipv6RoutingExtensions, NetHeaders, NetSlice, PacketBuilder, SlicedPacket, TcpSlice, TransportSlice,
};
use libbpf_rs::{ProgramInput, ProgramMut};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const PAYLOAD: &[u8] = b"health probe payload";

/// L4 of a test frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
    Icmpv6Echo,
    Icmpv4Echo,
}

/// An Ethernet + IPv6 (+ extension headers) + L4 frame with correct checksums, from port
/// 40000 to 80 (TCP) or 53 (UDP).
pub fn ipv6_frame(src: Ipv6Addr, dst: Ipv6Addr, exts: Ipv6Extensions, l4: L4) -> Vec<u8> {
    let dport = if l4 == L4::Udp { 53 } else { 80 };
    ip_frame(IpAddr::V6(src), 40000, IpAddr::V6(dst), dport, exts, &[], l4)
}

/// Any IP frame with correct checksums; `options` (a multiple of 4 bytes) go into an IPv4
/// header, `exts` into an IPv6 one.
pub fn ip_frame(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    exts: Ipv6Extensions,
    options: &[u8],
    l4: L4,
) -> Vec<u8> {
    let headers = match (src, dst) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let header = Ipv6Header {
                source: src.octets(),
                destination: dst.octets(),
                hop_limit: 64,
                ..Default::default()
            };
            etherparse::IpHeaders::Ipv6(header, exts)
        }
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut header =
                etherparse::Ipv4Header::new(0, 64, IpNumber::TCP, src.octets(), dst.octets()).unwrap();
            header.options = options.try_into().expect("IPv4 options");
            etherparse::IpHeaders::Ipv4(header, Default::default())
        }
        _ => panic!("mixed families"),
    };
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC).ip(headers);
    let mut frame = Vec::new();
    match l4 {
        L4::Tcp => builder
            .tcp(sport, dport, 1234, 64240)
            .syn()
            .write(&mut frame, PAYLOAD),
        L4::Udp => builder.udp(sport, dport).write(&mut frame, PAYLOAD),
        L4::Icmpv6Echo => builder.icmpv6_echo_request(7, 1).write(&mut frame, PAYLOAD),
        L4::Icmpv4Echo => builder.icmpv4_echo_request(7, 1).write(&mut frame, PAYLOAD),
    }
    .expect("building frame");
    frame
}

/// A frame from `src` to `dst` (one family) with correct checksums, no options.
pub fn l4_frame(src: std::net::SocketAddr, dst: std::net::SocketAddr, l4: L4) -> Vec<u8> {
    frame_with_options(src, dst, &[], l4)
}

/// Like [`l4_frame`], with IPv4 header options (a multiple of 4 bytes).
pub fn frame_with_options(
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    options: &[u8],
    l4: L4,
) -> Vec<u8> {
    ip_frame(
        src.ip(),
        src.port(),
        dst.ip(),
        dst.port(),
        Ipv6Extensions::default(),
        options,
        l4,
    )
}

/// An ICMP (IPv4) or ICMPv6 error, by what it says; the family comes from its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    /// destination unreachable with this code (IPv4 3 port, 1 host; IPv6 4 port, 3 address)
    Unreachable(u8),
    /// IPv4 fragmentation needed (3/4) or ICMPv6 packet too big (2), with the next-hop MTU
    TooBig(u16),
    /// time (TTL / hop limit) exceeded in transit
    TimeExceeded,
    /// any other type and code, for errors that must be left alone
    Raw(u8, u8),
}

/// An ICMP error from `src` to `dst` quoting the first `quote` bytes of `quoted`'s IP packet
/// (`quoted` is a whole frame; its Ethernet header is not quoted), with correct checksums.
pub fn icmp_error_frame(
    macs: ([u8; 6], [u8; 6]),
    src: IpAddr,
    dst: IpAddr,
    kind: IcmpError,
    quoted: &[u8],
    quote: usize,
) -> Vec<u8> {
    let payload = &quoted[14..(14 + quote).min(quoted.len())];
    let v6 = src.is_ipv6();
    let (kind_type, code, rest) = match (kind, v6) {
        (IcmpError::Unreachable(code), false) => (3, code, [0; 4]),
        (IcmpError::Unreachable(code), true) => (1, code, [0; 4]),
        (IcmpError::TooBig(mtu), false) => (3, 4, [0, 0, (mtu >> 8) as u8, mtu as u8]),
        (IcmpError::TooBig(mtu), true) => (2, 0, u32::from(mtu).to_be_bytes()),
        (IcmpError::TimeExceeded, false) => (11, 0, [0; 4]),
        (IcmpError::TimeExceeded, true) => (3, 0, [0; 4]),
        (IcmpError::Raw(kind_type, code), _) => (kind_type, code, [0; 4]),
    };
    let builder = PacketBuilder::ethernet2(macs.0, macs.1);
    let mut frame = Vec::new();
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => builder
            .ipv4(src.octets(), dst.octets(), 64)
            .icmpv4_raw(kind_type, code, rest)
            .write(&mut frame, payload),
        (IpAddr::V6(src), IpAddr::V6(dst)) => builder
            .ipv6(src.octets(), dst.octets(), 64)
            .icmpv6_raw(kind_type, code, rest)
            .write(&mut frame, payload),
        _ => panic!("mixed families"),
    }
    .expect("building ICMP error");
    frame
}

/// An ICMPv6 message of any type (neighbour discovery, errors) with a correct checksum: the
/// type, code and 4 bytes of header, then `body`; behind `exts` and hop limit 255, as ND sends.
pub fn icmpv6_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    exts: Ipv6Extensions,
    kind: (u8, u8),
    body: &[u8],
) -> Vec<u8> {
    let header = Ipv6Header {
        source: src.octets(),
        destination: dst.octets(),
        hop_limit: 255,
        ..Default::default()
    };
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ip(etherparse::IpHeaders::Ipv6(header, exts))
        .icmpv6_raw(kind.0, kind.1, [0; 4])
        .write(&mut frame, body)
        .expect("building ICMPv6 frame");
    frame
}

/// The IP header and 8 bytes of L4 of a frame: what RFC 792 asks an ICMP error to quote.
pub fn minimal_quote(frame: &[u8]) -> usize {
    if frame[12..14] == [0x86, 0xdd] {
        40 + 8
    } else {
        usize::from(frame[14] & 0x0f) * 4 + 8
    }
}

/// Checks what an ICMP error quotes: the IPv4 header checksum, and when the whole datagram is
/// quoted, its L4 checksum too.
fn verify_quote(quote: &[u8], v6: bool) -> Result<(), String> {
    let whole = if v6 {
        let header = etherparse::Ipv6HeaderSlice::from_slice(quote).map_err(|err| format!("quote: {err}"))?;
        40 + usize::from(header.payload_length()) == quote.len()
    } else {
        let header = etherparse::Ipv4HeaderSlice::from_slice(quote).map_err(|err| format!("quote: {err}"))?;
        if header.to_header().calc_header_checksum() != header.header_checksum() {
            return Err("bad IPv4 header checksum in the quote".into());
        }
        usize::from(header.total_len()) == quote.len()
    };
    if !whole {
        return Ok(());
    }
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    frame.extend_from_slice(quote);
    verify_l4_checksum(&frame, true).map_err(|err| format!("quote: {err}"))
}

/// Zeroes the UDP checksum of a frame without VLAN tags or IP options/extensions.
pub fn zero_udp_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let ip_len = if frame[12..14] == [0x86, 0xdd] { 40 } else { 20 };
    let at = 14 + ip_len + 6;
    frame[at..at + 2].copy_from_slice(&[0, 0]);
    frame
}

/// An IPv6 frame whose payload is raw bytes behind the given extension headers and protocol.
pub fn ipv6_raw_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    exts: Ipv6Extensions,
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let header = Ipv6Header {
        source: src.octets(),
        destination: dst.octets(),
        hop_limit: 64,
        ..Default::default()
    };
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ip(etherparse::IpHeaders::Ipv6(header, exts))
        .write(&mut frame, IpNumber(proto), payload)
        .expect("building frame");
    frame
}

/// Hop-by-hop, routing (with final destination options) and destination options before L4.
pub fn ext_chain() -> Ipv6Extensions {
    let pad = [0u8; 6];
    Ipv6Extensions {
        hop_by_hop_options: Some(Ipv6RawExtHeader::new_raw(IpNumber(0), &pad).unwrap()),
        destination_options: Some(Ipv6RawExtHeader::new_raw(IpNumber(0), &[0u8; 14]).unwrap()),
        routing: Some(Ipv6RoutingExtensions {
            routing: Ipv6RawExtHeader::new_raw(IpNumber(0), &[0, 0, 0, 0, 0, 0]).unwrap(),
            final_destination_options: Some(Ipv6RawExtHeader::new_raw(IpNumber(0), &pad).unwrap()),
        }),
        ..Default::default()
    }
}

/// A fragment header at `offset_units` (of 8 bytes), with or without more fragments.
pub fn fragment(offset_units: u16, more: bool) -> Ipv6Extensions {
    Ipv6Extensions {
        fragment: Some(Ipv6FragmentHeader::new(
            IpNumber(0),
            IpFragOffset::try_new(offset_units).unwrap(),
            more,
            0x1234,
        )),
        ..Default::default()
    }
}

/// The same frame with an 802.1Q tag (VLAN 100) between the MACs and the EtherType.
pub fn with_vlan(frame: &[u8]) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 100]);
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

/// The same frame with two tags, 802.1ad (outer, VLAN 200) and 802.1Q (inner, VLAN 100).
pub fn with_qinq(frame: &[u8]) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&[0x88, 0xa8, 0x00, 200, 0x81, 0x00, 0x00, 100]);
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

/// An untagged IPv6 frame without extension headers given `count` destination-options
/// headers (PadN only) before its upper layer: longer chains than a parser may walk. Upper
/// layer checksums stay valid (they do not cover extension headers).
pub fn with_long_ext_chain(frame: &[u8], count: usize) -> Vec<u8> {
    assert_eq!(frame[12..14], [0x86, 0xdd]);
    let upper = frame[14 + 6];
    let mut out = frame[..14 + 40].to_vec();
    out[14 + 6] = 60;
    let payload_len = u16::from_be_bytes([out[18], out[19]]) as usize + count * 8;
    out[18..20].copy_from_slice(&(payload_len as u16).to_be_bytes());
    for i in 0..count {
        let next = if i + 1 == count { upper } else { 60 };
        out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    out.extend_from_slice(&frame[14 + 40..]);
    out
}

/// A plain IPv4 TCP frame.
pub fn ipv4_tcp_frame() -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 80, 1, 64240)
        .write(&mut frame, PAYLOAD)
        .unwrap();
    frame
}

/// Checks the L4 checksum of a frame the way a receiver would. A zero UDP checksum is
/// accepted only when `allow_zero_udp`.
pub fn verify_l4_checksum(frame: &[u8], allow_zero_udp: bool) -> Result<(), String> {
    let packet = SlicedPacket::from_ethernet(frame).map_err(|err| format!("unparsable: {err}"))?;
    let (src, dst): (IpAddr, IpAddr) = match &packet.net {
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv4(ip)) => {
            let header = ip.header();
            if header.to_header().calc_header_checksum() != header.header_checksum() {
                return Err("bad IPv4 header checksum".into());
            }
            (header.source_addr().into(), header.destination_addr().into())
        }
        _ => return Err("no IP header".into()),
    };
    let (computed, found) = match (&packet.transport, src, dst) {
        (Some(TransportSlice::Tcp(tcp)), IpAddr::V6(s), IpAddr::V6(d)) => (
            tcp.calc_checksum_ipv6(s.octets(), d.octets()).unwrap(),
            tcp.checksum(),
        ),
        (Some(TransportSlice::Tcp(tcp)), IpAddr::V4(s), IpAddr::V4(d)) => (
            tcp.calc_checksum_ipv4(s.octets(), d.octets()).unwrap(),
            tcp.checksum(),
        ),
        (Some(TransportSlice::Udp(udp)), s, d) => {
            if udp.checksum() == 0 {
                return if allow_zero_udp {
                    Ok(())
                } else {
                    Err("UDP checksum is zero".into())
                };
            }
            let header = udp.to_header();
            let computed = match (s, d) {
                (IpAddr::V6(s), IpAddr::V6(d)) => header
                    .calc_checksum_ipv6_raw(s.octets(), d.octets(), udp.payload())
                    .unwrap(),
                (IpAddr::V4(s), IpAddr::V4(d)) => header
                    .calc_checksum_ipv4_raw(s.octets(), d.octets(), udp.payload())
                    .unwrap(),
                _ => unreachable!(),
            };
            (computed, udp.checksum())
        }
        (Some(TransportSlice::Icmpv6(icmp)), IpAddr::V6(s), IpAddr::V6(d)) => {
            if !icmp.is_checksum_valid(s.octets(), d.octets()) {
                return Err("bad ICMPv6 checksum".into());
            }
            return match icmp.type_u8() {
                1..=3 => verify_quote(icmp.payload(), true),
                _ => Ok(()),
            };
        }
        (Some(TransportSlice::Icmpv4(icmp)), _, _) => {
            if icmp.icmp_type().calc_checksum(icmp.payload()) != icmp.checksum() {
                return Err("bad ICMP checksum".into());
            }
            return match icmp.type_u8() {
                3 | 11 => verify_quote(icmp.payload(), false),
                _ => Ok(()),
            };
        }
        (None, IpAddr::V6(s), IpAddr::V6(d)) => return verify_fragment_tcp(frame, s, d),
        (other, _, _) => return Err(format!("no checksummed transport: {other:?}")),
    };
    if computed != found {
        return Err(format!("L4 checksum {found:#06x}, should be {computed:#06x}"));
    }
    Ok(())
}

/// etherparse leaves the transport of a fragment undecoded; a first fragment that holds a
/// whole TCP segment is still checkable.
fn verify_fragment_tcp(frame: &[u8], src: Ipv6Addr, dst: Ipv6Addr) -> Result<(), String> {
    let (headers, payload) = etherparse::PacketHeaders::from_ethernet_slice(frame)
        .map_err(|err| format!("{err}"))
        .map(|h| {
            let payload = h.payload.slice().to_vec();
            (h, payload)
        })?;
    match headers.net {
        Some(NetHeaders::Ipv6(_, _)) => {}
        _ => return Err("not IPv6".into()),
    }
    let tcp = TcpSlice::from_slice(&payload).map_err(|err| format!("fragment payload: {err}"))?;
    let computed = tcp.calc_checksum_ipv6(src.octets(), dst.octets()).unwrap();
    if computed != tcp.checksum() {
        return Err(format!(
            "fragment TCP checksum {:#06x}, should be {computed:#06x}",
            tcp.checksum()
        ));
    }
    Ok(())
}

/// One row of a test_run table.
pub struct Case {
    pub name: &'static str,
    pub input: Vec<u8>,
    /// program return value as the kernel reports it (TC_ACT_UNSPEC is -1)
    pub verdict: i32,
    pub output: Vec<u8>,
    /// whether the output's L4 checksum must verify (false for packets we pass untouched
    /// or whose L4 header is elsewhere)
    pub check_l4: bool,
}

/// A rewritten frame passed on; `output` is built like `input` but with the new addresses,
/// so its checksums are etherparse's.
pub fn rewritten(name: &'static str, input: Vec<u8>, output: Vec<u8>) -> Case {
    Case {
        name,
        input,
        verdict: TC_PASS_ON,
        output,
        check_l4: true,
    }
}

/// A frame the program must pass on byte for byte.
pub fn untouched(name: &'static str, input: Vec<u8>) -> Case {
    Case {
        name,
        output: input.clone(),
        input,
        verdict: TC_PASS_ON,
        check_l4: false,
    }
}

pub const TC_PASS_ON: i32 = -1;
pub const TC_ACT_REDIRECT: i32 = 7;

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join("")
}

/// Runs every case through the program and reports all mismatches at once.
pub fn run_table(prog: &ProgramMut<'_>, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let mut out = vec![0u8; case.input.len() + 256];
        let input = ProgramInput {
            data_in: Some(&case.input),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = prog
            .test_run(input)
            .unwrap_or_else(|err| panic!("{}: test_run: {err}", case.name));
        let verdict = result.return_value as i32;
        let got = result.data.map(|data| data.to_vec()).unwrap_or_default();
        let mut problems = Vec::new();
        if verdict != case.verdict {
            problems.push(format!("verdict {verdict}, expected {}", case.verdict));
        }
        if got != case.output {
            problems.push(format!(
                "output differs\n    input    {}\n    expected {}\n    got      {}",
                hex(&case.input),
                hex(&case.output),
                hex(&got)
            ));
        }
        if case.check_l4 {
            if let Err(err) = verify_l4_checksum(&got, true) {
                problems.push(format!("checksum: {err}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
