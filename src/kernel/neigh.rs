//! Routes and neighbours of the current network namespace, asked over rtnetlink: where a
//! backend is reached from, the source address towards it, and the MAC of its next hop.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteVia};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::kernel::addr::Interface;
use crate::kernel::netlink::Rtnetlink;

/// How this namespace reaches an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    /// the gateway, or the address itself when it is on the link
    pub next_hop: IpAddr,
    /// the source address the kernel picks towards it
    pub source: IpAddr,
}

/// Lookups for many addresses: one netlink socket, and each distinct address asked once.
/// Routes change, so keep one for a batch (a reload, a persist run), not for a process.
pub struct Routes {
    netlink: Rtnetlink,
    known: HashMap<IpAddr, Route>,
    names: HashMap<u32, String>,
}

impl Routes {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Self> {
        Ok(Self {
            netlink: Rtnetlink::open().context("opening a netlink socket")?,
            known: HashMap::new(),
            names: HashMap::new(),
        })
    }

    /// What `ip route get IP` answers: the device, the gateway (else the address itself) and
    /// the preferred source. A local address is reached through `lo` from itself.
    pub fn route_to(&mut self, ip: IpAddr) -> Result<Route> {
        if let Some(route) = self.known.get(&ip) {
            return Ok(route.clone());
        }
        let route = self.ask_route(ip)?;
        self.known.insert(ip, route.clone());
        Ok(route)
    }

    /// The address this namespace sends from towards `ip`: what masquerade would pick.
    pub fn source_towards(&mut self, ip: IpAddr) -> Result<IpAddr> {
        match self.route_to(ip) {
            Ok(route) => Ok(route.source),
            // the kernel's reason alone: "no route to X" again would only repeat the context
            Err(err) => Err(anyhow!("{}", err.root_cause()))
                .with_context(|| format!("no route to backend {ip} from this network namespace")),
        }
    }

    /// The neighbour table's usable MAC for `ip` on `dev`, if it has one.
    pub fn neighbour(&mut self, ip: IpAddr, dev: &str) -> Result<Option<[u8; 6]>> {
        let iface = Interface::by_name(dev)?;
        let mut request = NeighbourMessage::default();
        request.header.family = family(ip);
        request.header.ifindex = iface.index;
        request
            .attributes
            .push(NeighbourAttribute::Destination(ip.into()));
        let entry = match self.netlink.get(RouteNetlinkMessage::GetNeighbour(request)) {
            Ok(RouteNetlinkMessage::NewNeighbour(entry)) => entry,
            Ok(other) => bail!("asking the neighbour table for {ip} on {dev}: unexpected answer {other:?}"),
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(err) => {
                return Err(err).with_context(|| format!("asking the neighbour table for {ip} on {dev}"))
            }
        };
        // what `ip neigh show` lists, less INCOMPLETE and FAILED: those have no address yet
        // or no longer; NOARP and NONE entries never learnt one from the peer
        if !matches!(
            entry.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
        ) {
            return Ok(None);
        }
        let Some(lladdr) = entry.attributes.iter().find_map(|attribute| match attribute {
            NeighbourAttribute::LinkLayerAddress(lladdr) => Some(lladdr),
            _ => None,
        }) else {
            return Ok(None);
        };
        let mac: [u8; 6] = lladdr.as_slice().try_into().with_context(|| {
            format!(
                "neighbour {ip} on {dev} has a {}-byte link-layer address, not a MAC",
                lladdr.len()
            )
        })?;
        Ok(Some(unicast(mac, &format_mac(&mac))?))
    }

    fn ask_route(&mut self, ip: IpAddr) -> Result<Route> {
        let mut request = RouteMessage::default();
        request.header.address_family = family(ip);
        request.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
        request.attributes.push(RouteAttribute::Destination(ip.into()));
        let answer = self
            .netlink
            .get(RouteNetlinkMessage::GetRoute(request))
            .with_context(|| format!("no route to {ip}"))?;
        let RouteNetlinkMessage::NewRoute(answer) = answer else {
            bail!("no route to {ip}: unexpected answer {answer:?}");
        };
        let (mut oif, mut gateway, mut source) = (None, None, None);
        for attribute in &answer.attributes {
            match attribute {
                RouteAttribute::Oif(index) => oif = Some(*index),
                RouteAttribute::Gateway(address) => gateway = route_ip(address),
                // an IPv4 route through an IPv6 next hop (RFC 5549)
                RouteAttribute::Via(RouteVia::Inet(v4)) => gateway = Some((*v4).into()),
                RouteAttribute::Via(RouteVia::Inet6(v6)) => gateway = Some((*v6).into()),
                RouteAttribute::PrefSource(address) => source = route_ip(address),
                _ => {}
            }
        }
        let oif = oif.with_context(|| format!("the route to {ip} has no device"))?;
        let dev = self
            .name_of(oif)
            .with_context(|| format!("the route to {ip} has no device"))?;
        let source = source.with_context(|| format!("no source address towards {ip}"))?;
        Ok(Route {
            dev,
            next_hop: gateway.unwrap_or(ip),
            source,
        })
    }

    fn name_of(&mut self, index: u32) -> Result<String> {
        if let Some(name) = self.names.get(&index) {
            return Ok(name.clone());
        }
        let name = Interface::name_of(index).with_context(|| format!("no interface has index {index}"))?;
        self.names.insert(index, name.clone());
        Ok(name)
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some((*v4).into()),
        RouteAddress::Inet6(v6) => Some((*v6).into()),
        _ => None,
    }
}

/// How this namespace reaches `ip`; for many addresses use one [`Routes`].
pub fn route_to(ip: IpAddr) -> Result<Route> {
    Routes::new()?.route_to(ip)
}

/// The address this namespace sends from towards `ip`; for many addresses use one [`Routes`].
pub fn source_towards(ip: IpAddr) -> Result<IpAddr> {
    Routes::new()?.source_towards(ip)
}

/// The neighbour table's usable MAC for `ip` on `dev`, if it has one.
pub fn neighbour(ip: IpAddr, dev: &str) -> Result<Option<[u8; 6]>> {
    Routes::new()?.neighbour(ip, dev)
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        bail!("'{text}' is not a MAC address (aa:bb:cc:dd:ee:ff)");
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.is_empty() || part.len() > 2 {
            bail!("'{text}' is not a MAC address (aa:bb:cc:dd:ee:ff)");
        }
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("'{text}' is not a MAC address"))?;
    }
    unicast(mac, text)
}

fn unicast(mac: [u8; 6], text: &str) -> Result<[u8; 6]> {
    if mac == [0; 6] || mac[0] & 1 == 1 {
        bail!("'{text}' is not a unicast MAC address");
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC of `next_hop` on `dev`, asking the network (ARP or neighbour discovery, started by
/// one empty datagram to the discard port) when the table does not know it yet.
pub fn resolve(next_hop: IpAddr, dev: &str, timeout: Duration) -> Result<[u8; 6]> {
    let mut routes = Routes::new()?;
    if let Some(mac) = routes.neighbour(next_hop, dev)? {
        return Ok(mac);
    }
    let any: SocketAddr = if next_hop.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(any)?;
    let deadline = Instant::now() + timeout;
    let mut next_ask = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_ask {
            // the kernel queues it until the neighbour answers, or drops it
            let _ = socket.send_to(&[], SocketAddr::new(next_hop, 9));
            next_ask = Instant::now() + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(20));
        if let Some(mac) = routes.neighbour(next_hop, dev)? {
            return Ok(mac);
        }
    }
    bail!(
        "no MAC address for {next_hop} on {dev}: it does not answer ARP/neighbour discovery (name it with BACKEND:PORT@MAC)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_mac("02:aB:0:1:2:3").unwrap(), [0x02, 0xab, 0, 1, 2, 3]);
        for bad in [
            "",
            "02:ab:00:01:02",
            "02:ab:00:01:02:03:04",
            "02:ab:00:01:02:zz",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "02:ab:00:01:02:003",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(format_mac(&[2, 0xab, 0, 1, 2, 3]), "02:ab:00:01:02:03");
    }
}
