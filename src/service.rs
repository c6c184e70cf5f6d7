//! `--service VIP:PORT=BACKEND:PORT[,BACKEND:PORT...]`, shared by the load-balancing datapaths.

use std::collections::HashSet;
use std::net::SocketAddr;

use anyhow::{bail, Context, Result};

/// A service: TCP and UDP to `vip` go to one of `backends`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub vip: SocketAddr,
    pub backends: Vec<SocketAddr>,
}

/// Limits of the tables a datapath keeps services in.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub services: usize,
    pub backends_per_service: usize,
    pub backends: usize,
}

fn parse_endpoint(service: &str, what: &str, text: &str) -> Result<SocketAddr> {
    let addr: SocketAddr = text.trim().parse().with_context(|| {
        format!(
            "--service {service}: {what} '{text}' is not IP:PORT (IPv6 goes in brackets: [2001:db8::1]:80)"
        )
    })?;
    if addr.port() == 0 {
        bail!("--service {service}: {what} '{text}' has port 0");
    }
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() || ip == std::net::Ipv4Addr::BROADCAST {
        bail!("--service {service}: {what} '{ip}' is not a unicast address other nodes can reach");
    }
    Ok(addr)
}

/// Parses one `--service`: VIP:PORT=BACKEND:PORT[,BACKEND:PORT...], one address family,
/// at least one backend, none twice.
pub fn parse_service(text: &str) -> Result<Service> {
    let (vip, backends) = text
        .split_once('=')
        .with_context(|| format!("--service {text}: expected VIP:PORT=BACKEND:PORT[,BACKEND:PORT...]"))?;
    let vip = parse_endpoint(text, "VIP", vip)?;
    if backends.trim().is_empty() {
        bail!("--service {text}: no backends");
    }
    let mut seen = HashSet::new();
    let mut list = Vec::new();
    for backend in backends.split(',') {
        if backend.trim().is_empty() {
            bail!("--service {text}: empty backend in the list");
        }
        let backend = parse_endpoint(text, "backend", backend)?;
        if backend.is_ipv4() != vip.is_ipv4() {
            bail!("--service {text}: backend {backend} is not of the VIP's address family (one family per service)");
        }
        if backend == vip {
            bail!("--service {text}: the VIP is its own backend");
        }
        if !seen.insert(backend) {
            bail!("--service {text}: backend {backend} is listed twice");
        }
        list.push(backend);
    }
    Ok(Service { vip, backends: list })
}

/// Parses every `--service` and checks them together against the table limits.
pub fn parse_services(texts: &[String], limits: Limits) -> Result<Vec<Service>> {
    let mut vips = HashSet::new();
    let mut services = Vec::with_capacity(texts.len());
    let mut total = 0;
    for text in texts {
        let service = parse_service(text)?;
        if !vips.insert(service.vip) {
            bail!("--service {text}: VIP {} is given twice", service.vip);
        }
        if service.backends.len() > limits.backends_per_service {
            bail!(
                "--service {}: {} backends; at most {} per service",
                service.vip,
                service.backends.len(),
                limits.backends_per_service
            );
        }
        total += service.backends.len();
        services.push(service);
    }
    if services.len() > limits.services {
        bail!("{} services; at most {}", services.len(), limits.services);
    }
    if total > limits.backends {
        bail!("{total} backends in all; at most {}", limits.backends);
    }
    Ok(services)
}

/// "VIP -> a, b, c" for logs.
pub fn describe(services: &[Service]) -> String {
    const SHOWN: usize = 8;
    let mut parts: Vec<String> = services
        .iter()
        .take(SHOWN)
        .map(|service| {
            let backends: Vec<String> = service.backends.iter().map(|b| b.to_string()).collect();
            format!("{} -> {}", service.vip, backends.join(", "))
        })
        .collect();
    if services.len() > SHOWN {
        parts.push(format!("and {} more services", services.len() - SHOWN));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        services: 3,
        backends_per_service: 3,
        backends: 5,
    };

    fn texts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn services_parse_both_families() {
        let services = parse_services(
            &texts(&[
                "10.96.0.10:80=10.0.0.1:8080,10.0.0.2:8080",
                "[fd00::10]:53=[fd00::1]:53",
            ]),
            LIMITS,
        )
        .unwrap();
        assert_eq!(services[0].vip, "10.96.0.10:80".parse().unwrap());
        assert_eq!(services[0].backends.len(), 2);
        assert_eq!(services[1].backends, vec!["[fd00::1]:53".parse().unwrap()]);
    }

    #[test]
    fn bad_services_say_what_is_wrong() {
        for (bad, needle) in [
            ("10.96.0.10:80", "expected VIP:PORT=BACKEND:PORT"),
            ("10.96.0.10:80=", "no backends"),
            ("10.96.0.10:80=10.0.0.1:80,", "empty backend"),
            ("10.96.0.10=10.0.0.1:80", "VIP '10.96.0.10' is not IP:PORT"),
            ("10.96.0.10:80=fd00::1:80", "brackets"),
            ("10.96.0.10:80=[fd00::1]:80", "address family"),
            ("10.96.0.10:80=10.0.0.1:0", "port 0"),
            ("0.0.0.0:80=10.0.0.1:80", "not a unicast"),
            ("10.96.0.10:80=127.0.0.1:80", "not a unicast"),
            ("10.96.0.10:80=10.0.0.1:80,10.0.0.1:80", "listed twice"),
            ("10.96.0.10:80=10.96.0.10:80", "its own backend"),
            (
                "10.96.0.10:80=10.0.0.1:1,10.0.0.1:2,10.0.0.1:3,10.0.0.1:4",
                "at most 3 per service",
            ),
        ] {
            let err = parse_services(&texts(&[bad]), LIMITS).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let err = parse_services(
            &texts(&["10.96.0.10:80=10.0.0.1:80", "10.96.0.10:80=10.0.0.2:80"]),
            LIMITS,
        )
        .unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
        let err = parse_services(
            &texts(&[
                "10.96.0.1:80=10.0.0.1:80,10.0.0.2:80,10.0.0.3:80",
                "10.96.0.2:80=10.0.0.1:80,10.0.0.2:80,10.0.0.3:80",
            ]),
            LIMITS,
        )
        .unwrap_err();
        assert!(err.to_string().contains("6 backends in all; at most 5"), "{err}");
    }
}
