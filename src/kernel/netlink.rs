//! A synchronous rtnetlink socket: one get request, the kernel's one answer, on a socket
//! kept open across requests so that thousands of lookups cost a round trip each.

use std::io;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Room for any one answer to a get (a route or a neighbour is well under 1 KiB).
const RECEIVE_BUFFER: usize = 32 * 1024;

/// A NETLINK_ROUTE socket. It answers for the network namespace that the opening thread was
/// in, whatever namespace the thread moves to later.
pub struct Rtnetlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

/// A netlink socket of `protocol` that talks to the kernel.
fn kernel_socket(protocol: isize) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

impl Rtnetlink {
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            socket: kernel_socket(NETLINK_ROUTE)?,
            sequence: 0,
            buffer: Vec::with_capacity(RECEIVE_BUFFER),
        })
    }

    /// Sends a get request (RTM_GETROUTE, RTM_GETNEIGH, ...) and returns the kernel's answer,
    /// or the errno it refused with (ENETUNREACH for no route, ENOENT for no neighbour).
    pub fn get(&mut self, request: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.sequence;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
        message.finalize();
        self.buffer.clear();
        self.buffer.resize(message.buffer_len(), 0);
        message.serialize(&mut self.buffer);
        self.socket.send(&self.buffer, 0)?;
        loop {
            self.buffer.clear();
            self.socket.recv(&mut self.buffer, 0)?;
            let mut offset = 0;
            while offset < self.buffer.len() {
                let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buffer[offset..])
                    .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
                let length = answer.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += length.next_multiple_of(4);
                // a reply to an earlier request that gave up part way is not ours
                if answer.header.sequence_number != self.sequence {
                    continue;
                }
                match answer.payload {
                    NetlinkPayload::InnerMessage(inner) => return Ok(inner),
                    NetlinkPayload::Error(error) if error.code.is_some() => return Err(error.to_io()),
                    _ => {}
                }
            }
        }
    }
}

/// nftables' change notifications of the namespace the opening thread is in
/// (NFNLGRP_NFTABLES on a NETLINK_NETFILTER socket).
pub struct NftablesEvents {
    socket: Socket,
    buffer: Vec<u8>,
}

/// include/uapi/linux/netfilter/nfnetlink.h
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// include/uapi/linux/netfilter/nf_tables.h: NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN,
/// NFT_MSG_DELRULE
const NFT_MSG_DELETIONS: [u16; 3] = [2, 5, 8];

impl NftablesEvents {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.add_membership(NFNLGRP_NFTABLES)?;
        Ok(Self {
            socket,
            buffer: Vec::with_capacity(RECEIVE_BUFFER),
        })
    }

    /// Waits up to `timeout` for notifications; whether any of them deleted a table, a chain
    /// or a rule. A lost notification (the socket's buffer overflowed) counts as one.
    pub fn deleted_within(&mut self, timeout: std::time::Duration) -> io::Result<bool> {
        use std::os::fd::AsFd;
        let timeout = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
        nix::sys::socket::setsockopt(
            &self.socket.as_fd(),
            nix::sys::socket::sockopt::ReceiveTimeout,
            &timeout,
        )?;
        self.buffer.clear();
        match self.socket.recv(&mut self.buffer, 0) {
            Ok(_) => Ok(self.has_deletion()),
            Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => Ok(true),
            Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    fn has_deletion(&self) -> bool {
        let mut rest = &self.buffer[..];
        while rest.len() >= 16 {
            let length = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if kind >> 8 == NFNL_SUBSYS_NFTABLES && NFT_MSG_DELETIONS.contains(&(kind & 0xff)) {
                return true;
            }
            if length < 16 {
                break;
            }
            rest = &rest[length.next_multiple_of(4).min(rest.len())..];
        }
        false
    }
}

/// A connection as conntrack keys its original direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    /// IPPROTO_TCP, IPPROTO_UDP
    pub proto: u8,
}

/// A NETLINK_NETFILTER socket for conntrack's entries (ctnetlink) of the namespace the
/// opening thread is in.
pub struct Ctnetlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

/// include/uapi/linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h, nf_conntrack_tcp.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET_STATS: u16 = 5;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_PROTOINFO: u16 = 4;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;
const IP_CT_TCP_FLAG_BE_LIBERAL: u8 = 0x08;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const NLM_F_ACK: u16 = 4;

/// Netlink attributes written into a message under construction.
struct Attributes<'a>(&'a mut Vec<u8>);

impl Attributes<'_> {
    fn put(&mut self, kind: u16, payload: &[u8]) {
        let length = 4 + payload.len();
        self.0.extend_from_slice(&(length as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
    }

    /// A nested attribute holding what `fill` puts.
    fn nest(&mut self, kind: u16, fill: impl FnOnce(&mut Attributes<'_>)) {
        let start = self.0.len();
        self.put(kind | NLA_F_NESTED, &[]);
        fill(&mut Attributes(self.0));
        let length = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&length.to_ne_bytes());
    }
}

impl Ctnetlink {
    /// Opens the socket and makes a first request of conntrack's netlink subsystem, which
    /// loads nf_conntrack_netlink where it is a module not yet loaded (measured: a third of a
    /// second in an emulated VM with Linux 6.1): paid here, not by the first flow handed
    /// over; and a kernel without ctnetlink refuses here.
    pub fn open() -> io::Result<Self> {
        let mut ctnetlink = Self {
            socket: kernel_socket(netlink_sys::protocols::NETLINK_NETFILTER)?,
            sequence: 0,
            buffer: Vec::with_capacity(RECEIVE_BUFFER),
        };
        ctnetlink.request(IPCTNL_MSG_CT_GET_STATS, libc::AF_UNSPEC, |_| {})?;
        Ok(ctnetlink)
    }

    /// Stops conntrack checking the TCP windows of `flow`'s entry, both ways (what the
    /// kernel's flow offload does for an entry whose packets it takes over): its segments
    /// may then pass this node without conntrack seeing them. ENOENT: no such entry.
    pub fn be_liberal(&mut self, flow: &FlowTuple) -> io::Result<()> {
        let family = if flow.src.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        self.request(IPCTNL_MSG_CT_NEW, family, |attributes| {
            attributes.nest(CTA_TUPLE_ORIG, |tuple| {
                tuple.nest(CTA_TUPLE_IP, |ip| match (flow.src.ip(), flow.dst.ip()) {
                    (std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) => {
                        ip.put(CTA_IP_V4_SRC, &src.octets());
                        ip.put(CTA_IP_V4_DST, &dst.octets());
                    }
                    (std::net::IpAddr::V6(src), std::net::IpAddr::V6(dst)) => {
                        ip.put(CTA_IP_V6_SRC, &src.octets());
                        ip.put(CTA_IP_V6_DST, &dst.octets());
                    }
                    // one family in a tuple: nothing to name
                    _ => {}
                });
                tuple.nest(CTA_TUPLE_PROTO, |proto| {
                    proto.put(CTA_PROTO_NUM, &[flow.proto]);
                    proto.put(CTA_PROTO_SRC_PORT, &flow.src.port().to_be_bytes());
                    proto.put(CTA_PROTO_DST_PORT, &flow.dst.port().to_be_bytes());
                });
            });
            attributes.nest(CTA_PROTOINFO, |info| {
                info.nest(CTA_PROTOINFO_TCP, |tcp| {
                    // struct nf_ct_tcp_flags: the flags, the mask of those to change
                    let liberal = [IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL];
                    tcp.put(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &liberal);
                    tcp.put(CTA_PROTOINFO_TCP_FLAGS_REPLY, &liberal);
                });
            });
        })
    }

    /// One ctnetlink request of `kind` for `family`, with the attributes `fill` puts, and its
    /// acknowledgement: Ok, or the kernel's error. What it answers before that is skipped.
    fn request(&mut self, kind: u16, family: i32, fill: impl FnOnce(&mut Attributes<'_>)) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut message = Vec::with_capacity(128);
        message.extend_from_slice(&0u32.to_ne_bytes()); // length, below
        message.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | kind).to_ne_bytes());
        message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        message.extend_from_slice(&self.sequence.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, NFNETLINK_V0, resource id
        message.extend_from_slice(&[family as u8, 0, 0, 0]);
        fill(&mut Attributes(&mut message));
        let length = message.len() as u32;
        message[0..4].copy_from_slice(&length.to_ne_bytes());
        self.socket.send(&message, 0)?;
        loop {
            self.buffer.clear();
            self.socket.recv(&mut self.buffer, 0)?;
            let answer = &self.buffer[..];
            if answer.len() < 20 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink answer"));
            }
            let kind = u16::from_ne_bytes(answer[4..6].try_into().unwrap());
            let sequence = u32::from_ne_bytes(answer[8..12].try_into().unwrap());
            // an answer to an earlier request that gave up part way, or this request's own
            // answer before its acknowledgement
            if kind != NLMSG_ERROR || sequence != self.sequence {
                continue;
            }
            let code = i32::from_ne_bytes(answer[16..20].try_into().unwrap());
            return if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-code))
            };
        }
    }
}
