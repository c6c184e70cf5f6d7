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

impl Rtnetlink {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
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
