//! Parsing what users type: interface names and addresses.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use anyhow::{bail, Result};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// A network interface of the current namespace, resolved once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

impl Interface {
    /// Resolves a name in the current network namespace.
    pub fn by_name(name: &str) -> Result<Self> {
        if name.is_empty() || name.len() >= libc::IF_NAMESIZE || name.contains(['/', ' ']) {
            bail!("invalid interface name '{name}'");
        }
        let c_name = CString::new(name)?;
        let Ok(index) = nix::net::if_::if_nametoindex(c_name.as_c_str()) else {
            bail!("unknown interface '{name}' in this network namespace");
        };
        Ok(Self {
            name: name.to_string(),
            index,
        })
    }

    /// Every interface of the current network namespace.
    pub fn all() -> Vec<Self> {
        let Ok(list) = nix::net::if_::if_nameindex() else {
            return Vec::new();
        };
        list.iter()
            .map(|entry| Self {
                name: entry.name().to_string_lossy().into_owned(),
                index: entry.index(),
            })
            .collect()
    }

    /// The kernel driver behind the interface (`veth`, `mlx5_core`, ...), as ethtool reports it.
    pub fn driver(&self) -> Option<String> {
        const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
        #[repr(C)]
        struct DrvInfo {
            cmd: u32,
            driver: [u8; 32],
            rest: [u8; 160],
        }
        #[repr(C)]
        struct IfReq {
            name: [u8; libc::IF_NAMESIZE],
            data: *mut DrvInfo,
            pad: [u8; 16],
        }
        let mut info = DrvInfo {
            cmd: ETHTOOL_GDRVINFO,
            driver: [0; 32],
            rest: [0; 160],
        };
        let mut req = IfReq {
            name: [0; libc::IF_NAMESIZE],
            data: &mut info,
            pad: [0; 16],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // any socket will do for the ioctl; closed when dropped
        let socket = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .ok()?;
        // SAFETY: req and the DrvInfo it points at outlive the call. No crate wraps
        // SIOCETHTOOL, and ethtool's netlink interface has no driver query.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut req) } != 0 {
            return None;
        }
        let end = info
            .driver
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(info.driver.len());
        Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
    }

    /// The name of an interface index in the current namespace, if it still exists.
    pub fn name_of(index: u32) -> Option<String> {
        let name = nix::net::if_::if_indextoname(index).ok()?;
        // nix 0.31 misses libc's NULL for an unknown index and answers an empty name
        (!name.is_empty()).then(|| name.to_string_lossy().into_owned())
    }
}

/// An address as the BPF headers hold it: four 32-bit words in network byte order (IPv4 in
/// the first) plus an address family.
pub fn ip_from_words(family: u8, words: [u32; 4]) -> IpAddr {
    // no allocation: 100,000 backend slots are decoded by every update
    if i32::from(family) == libc::AF_INET {
        Ipv4Addr::from(words[0].to_ne_bytes()).into()
    } else {
        let mut bytes = [0u8; 16];
        for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ipv6Addr::from(bytes).into()
    }
}

/// The inverse of [`ip_from_words`].
pub fn ip_to_words(ip: IpAddr) -> (u8, [u32; 4]) {
    let mut words = [0u32; 4];
    let family = match ip {
        IpAddr::V4(v4) => {
            words[0] = u32::from_ne_bytes(v4.octets());
            libc::AF_INET
        }
        IpAddr::V6(v6) => {
            for (word, chunk) in words.iter_mut().zip(v6.octets().chunks_exact(4)) {
                *word = u32::from_ne_bytes(chunk.try_into().expect("4 bytes"));
            }
            libc::AF_INET6
        }
    };
    (family as u8, words)
}

/// `From` conversions between `SocketAddr` and a BPF endpoint struct of a skeleton, laid out
/// as `{ addr: [u32; 4], port (network order), family, pad }` in the C headers.
#[macro_export]
macro_rules! endpoint_conversions {
    ($ty:ty) => {
        impl From<std::net::SocketAddr> for $ty {
            fn from(addr: std::net::SocketAddr) -> Self {
                let (family, words) = $crate::kernel::addr::ip_to_words(addr.ip());
                Self {
                    addr: words,
                    port: addr.port().to_be(),
                    family,
                    ..Default::default()
                }
            }
        }

        impl From<&$ty> for std::net::SocketAddr {
            fn from(endpoint: &$ty) -> Self {
                std::net::SocketAddr::new(
                    $crate::kernel::addr::ip_from_words(endpoint.family, endpoint.addr),
                    u16::from_be(endpoint.port),
                )
            }
        }
    };
}

/// An IPv6 address for a flag; says which flag and why when it is not one.
pub fn parse_ipv6(flag: &str, text: &str) -> Result<Ipv6Addr> {
    match text.parse::<Ipv6Addr>() {
        Ok(addr) if addr.is_unspecified() || addr.is_multicast() => {
            bail!("{flag} {text}: must be a unicast IPv6 address")
        }
        Ok(addr) => Ok(addr),
        Err(_) if text.parse::<std::net::Ipv4Addr>().is_ok() => {
            bail!("{flag} {text}: an IPv4 address where an IPv6 address is needed")
        }
        Err(_) => bail!("{flag} {text}: not an IPv6 address"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_flags_reject_what_is_not_a_unicast_ipv6_address() {
        assert!(parse_ipv6("--global", "2001:db8::1").is_ok());
        for bad in ["10.0.0.1", "fe80::1::2", "ff02::1", "::", "", "eth0"] {
            let err = parse_ipv6("--global", bad).unwrap_err().to_string();
            assert!(err.starts_with("--global"), "{bad}: {err}");
        }
    }

    #[test]
    fn address_words_round_trip() {
        for ip in ["10.1.2.3", "2001:db8::1", "fe80::1234:5678:9abc"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (family, words) = ip_to_words(ip);
            assert_eq!(ip_from_words(family, words), ip);
        }
        // network order in memory: the first byte of the address is the first byte stored
        assert_eq!(
            ip_to_words("10.1.2.3".parse().unwrap()).1[0].to_ne_bytes(),
            [10, 1, 2, 3]
        );
    }

    #[test]
    fn loopback_resolves_and_nonsense_does_not() {
        assert_eq!(Interface::by_name("lo").unwrap().index, 1);
        assert!(Interface::by_name("no-such-if0").is_err());
        assert!(Interface::by_name("a/b").is_err());
    }
}
