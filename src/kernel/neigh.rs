//! Routes and neighbours of the current network namespace, through iproute2's JSON output:
//! where a backend is reached from, and the MAC address of its next hop.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// How this namespace reaches an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    /// the gateway, or the address itself when it is on the link
    pub next_hop: IpAddr,
    /// the source address the kernel picks towards it
    pub source: IpAddr,
}

fn ip_json(args: &[&str]) -> Result<Value> {
    let output = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| format!("parsing `ip -j {}`", args.join(" ")))
}

pub fn route_to(ip: IpAddr) -> Result<Route> {
    let text = ip.to_string();
    let routes = ip_json(&["route", "get", &text]).with_context(|| format!("no route to {ip}"))?;
    let route = routes.get(0).with_context(|| format!("no route to {ip}"))?;
    let field = |name: &str| route[name].as_str().map(str::to_string);
    let dev = field("dev").with_context(|| format!("the route to {ip} has no device"))?;
    let next_hop = match field("gateway") {
        Some(gateway) => gateway.parse().context("parsing the gateway")?,
        None => ip,
    };
    let source = field("prefsrc")
        .with_context(|| format!("no source address towards {ip}"))?
        .parse()
        .context("parsing the source address")?;
    Ok(Route {
        dev,
        next_hop,
        source,
    })
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

/// The neighbour table's usable MAC for `ip` on `dev`, if it has one.
pub fn neighbour(ip: IpAddr, dev: &str) -> Result<Option<[u8; 6]>> {
    let text = ip.to_string();
    let entries = ip_json(&["neigh", "show", "to", &text, "dev", dev])?;
    for entry in entries.as_array().into_iter().flatten() {
        let states: Vec<&str> = entry["state"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if states
            .iter()
            .any(|state| matches!(*state, "INCOMPLETE" | "FAILED"))
        {
            continue;
        }
        if let Some(mac) = entry["lladdr"].as_str() {
            return Ok(Some(parse_mac(mac)?));
        }
    }
    Ok(None)
}

/// The MAC of `next_hop` on `dev`, asking the network (ARP or neighbour discovery, started by
/// one empty datagram to the discard port) when the table does not know it yet.
pub fn resolve(next_hop: IpAddr, dev: &str, timeout: Duration) -> Result<[u8; 6]> {
    if let Some(mac) = neighbour(next_hop, dev)? {
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
        if let Some(mac) = neighbour(next_hop, dev)? {
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
