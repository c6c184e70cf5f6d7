//! Services shared by the load-balancing datapaths: `--service VIP:PORT=BACKEND:PORT[,...]`
//! parsing, and the service tables of include/service.h, kept in sync with what the user
//! asked for without a moment where a VIP is missing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde_json::{json, Value};

use crate::control::counters::Counters;
use crate::control::desired::Written;
use crate::kernel::maps::{self, as_bytes, MappedArray};
use crate::kernel::pin::{MapPin, PinDir};
use crate::kernel::skel::sock_xlate::types::{service_endpoint, service_range};

/// Longer than any program that read a service's old slot range before the swap can still
/// be running, before that range is written again in the same update.
const RANGE_REUSE_GRACE: Duration = Duration::from_millis(20);

// SAFETY: plain C structs of integers from include/service.h.
unsafe impl plain::Plain for service_endpoint {}
unsafe impl plain::Plain for service_range {}

crate::endpoint_conversions!(service_endpoint);

/// Appends the bytes of a service endpoint, the start of every backend value, to `out`.
pub fn endpoint_bytes(addr: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(as_bytes(&service_endpoint::from(addr)));
}

/// Whether a backend takes new flows. Flows it already has stay with it in every state, until
/// they end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum BackendState {
    /// new flows, by weight
    #[default]
    Active,
    /// no new flows; its own flows go on (a backend on its way out)
    Draining,
    /// no new flows (taken out by hand)
    Down,
}

impl BackendState {
    fn parse(text: &str) -> Result<Self> {
        match text {
            "active" => Ok(Self::Active),
            "draining" => Ok(Self::Draining),
            "down" => Ok(Self::Down),
            _ => bail!("state '{text}': active, draining or down"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Down => "down",
        }
    }
}

/// A backend of a service: where its packets go, its share of new flows, and (xdp-lb) the
/// MAC of its next hop when given rather than looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: SocketAddr,
    pub mac: Option<[u8; 6]>,
    /// relative share of new flows among the usable backends (1..=SERVICE_MAX_WEIGHT)
    pub weight: u32,
    pub state: BackendState,
    /// what the health checks last said (true without checks); not part of the syntax
    pub healthy: bool,
}

/// include/service.h SERVICE_MAX_WEIGHT
pub const MAX_WEIGHT: u32 = 1000;

impl Backend {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            mac: None,
            weight: 1,
            state: BackendState::Active,
            healthy: true,
        }
    }

    /// `IP:PORT[@MAC][;weight=N][;state=active|draining|down]`.
    pub fn parse(text: &str) -> Result<Self> {
        if !text.bytes().any(|byte| byte == b';' || byte == b'@') {
            // no MAC, no options: the common case, 100,000 times in a large run
            return Ok(Self::new(parse_endpoint("backend", text)?));
        }
        let mut parts = text.split(';');
        let endpoint = parts.next().unwrap_or_default();
        let (addr, mac) = match endpoint.rsplit_once('@') {
            Some((addr, mac)) => {
                let mac = crate::kernel::neigh::parse_mac(mac.trim())
                    .with_context(|| format!("backend {}", addr.trim()))?;
                (addr, Some(mac))
            }
            None => (endpoint, None),
        };
        let mut backend = Self::new(parse_endpoint("backend", addr)?);
        backend.mac = mac;
        for option in parts {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            let fail = |problem: String| anyhow::anyhow!("backend {}: {problem}", backend.addr);
            match key.trim() {
                "weight" => {
                    backend.weight = value.trim().parse().ok().filter(|w| (1..=MAX_WEIGHT).contains(w)).ok_or_else(
                        || fail(format!("weight '{value}': a whole number from 1 to {MAX_WEIGHT} (to stop new flows, state=draining)")),
                    )?
                }
                "state" => backend.state = BackendState::parse(value.trim()).map_err(|err| fail(format!("{err:#}")))?,
                other => return Err(fail(format!("unknown option '{other}' (weight=N, state=active|draining|down)"))),
            }
        }
        Ok(backend)
    }

    /// Whether the backend's own state lets it take new flows.
    pub fn active(&self) -> bool {
        self.state == BackendState::Active
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.addr)?;
        if let Some(mac) = self.mac {
            write!(f, "@{}", crate::kernel::neigh::format_mac(&mac))?;
        }
        if self.weight != 1 {
            write!(f, ";weight={}", self.weight)?;
        }
        if self.state != BackendState::Active {
            write!(f, ";state={}", self.state.name())?;
        }
        Ok(())
    }
}

/// The transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    fn from_number(number: u8) -> Option<Self> {
        match number {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "sctp" => bail!("protocol sctp is not supported (tcp or udp)"),
            _ => bail!("protocol '{text}': tcp or udp"),
        }
    }
}

/// A key of the service table: VIP:PORT and one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub vip: SocketAddr,
    pub protocol: Protocol,
}

impl ServiceKey {
    fn endpoint(&self) -> service_endpoint {
        let mut key = service_endpoint::from(self.vip);
        key.proto = self.protocol.number();
        key
    }
}

/// Session affinity's default timeout (Kubernetes' `timeoutSeconds` default).
pub const DEFAULT_AFFINITY: Duration = Duration::from_secs(10800);

/// An active health check of every backend of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// None: a TCP connect; Some: an HTTP GET of this path
    pub http_path: Option<String>,
    /// the HTTP status that means healthy
    pub expect: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// successes in a row that make an unhealthy backend healthy
    pub rise: u32,
    /// failures in a row that make a healthy backend unhealthy
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            http_path: None,
            expect: 200,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
        }
    }
}

/// A service: TCP, UDP or both to `vip` go to one of `backends`. Made by the `--service`
/// parser, from a config file entry, or by a program; never printed to text and parsed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub vip: SocketAddr,
    /// None: both TCP and UDP
    pub protocol: Option<Protocol>,
    /// empty: the service refuses every client (TCP RST, ICMP port unreachable, ECONNREFUSED)
    pub backends: Vec<Backend>,
    /// Some: a client keeps its backend this long across connections
    pub affinity: Option<Duration>,
    pub check: Option<HealthCheck>,
    /// lb: the backends see the client's own address, no source NAT (Kubernetes'
    /// `externalTrafficPolicy: Local`); their replies must come back through this node
    pub keep_source: bool,
    /// where it came from, for error messages: `--service TEXT` or `FILE:LINE: service VIP`
    pub origin: String,
}

/// The options of a service, in the `--service` syntax and the config file alike.
pub const SERVICE_OPTIONS: &str = "affinity=client, affinity-timeout=SECONDS, check=tcp|http:PATH, check-expect=STATUS, check-interval=SECONDS, check-timeout=SECONDS, check-rise=N, check-fall=N";

impl Service {
    /// A service after the checks every source gets: one address family, no backend twice,
    /// the VIP not its own backend. Errors do not say where it came from.
    pub fn new(vip: SocketAddr, backends: Vec<Backend>, origin: String) -> Result<Self> {
        let mut seen = HashSet::new();
        for (index, backend) in backends.iter().enumerate() {
            if backend.addr.is_ipv4() != vip.is_ipv4() {
                bail!(
                    "backend {} is not of the VIP's address family (one family per service)",
                    backend.addr
                );
            }
            if backend.addr == vip {
                bail!("the VIP is its own backend");
            }
            // a short list is checked pairwise: 10,000 services need no 10,000 hash sets
            let twice = if backends.len() <= 16 {
                backends[..index]
                    .iter()
                    .any(|earlier| earlier.addr == backend.addr)
            } else {
                !seen.insert(backend.addr)
            };
            if twice {
                bail!("backend {} is listed twice", backend.addr);
            }
        }
        Ok(Self {
            vip,
            protocol: None,
            backends,
            affinity: None,
            check: None,
            keep_source: false,
            origin,
        })
    }

    /// One service in the `--service` syntax:
    /// `[tcp:|udp:]VIP:PORT[;OPTION...]=BACKEND[,BACKEND...]` or `...=reject`.
    pub fn parse(text: &str) -> Result<Self> {
        let (head, backends) = split_head(text).context(
            "expected VIP:PORT=BACKEND:PORT[,BACKEND:PORT...], tcp: or udp: before the VIP for one protocol",
        )?;
        let mut options = head.split(';');
        let vip_text = options.next().unwrap_or_default().trim();
        let (protocol, vip_text) = match vip_text.split_once(':') {
            Some((proto, rest)) if proto.eq_ignore_ascii_case("tcp") || proto.eq_ignore_ascii_case("udp") => {
                (Some(Protocol::parse(proto)?), rest)
            }
            Some((proto, _)) if proto.eq_ignore_ascii_case("sctp") => {
                bail!("protocol sctp is not supported (tcp or udp)")
            }
            _ => (None, vip_text),
        };
        let vip = parse_endpoint("VIP", vip_text)?;
        let backends = match backends.trim() {
            "" => bail!("no backends (a service that refuses its clients says =reject)"),
            "reject" => Vec::new(),
            list => {
                let mut backends = Vec::with_capacity(list.bytes().filter(|byte| *byte == b',').count() + 1);
                for backend in list.split(',') {
                    if backend.trim().is_empty() {
                        bail!("empty backend in the list");
                    }
                    backends.push(Backend::parse(backend)?);
                }
                backends
            }
        };
        let mut service = Self::new(vip, backends, format!("--service {text}"))?;
        service.protocol = protocol;
        for option in options {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            service.set_option(key.trim(), value.trim())?;
        }
        service.finish_options()?;
        Ok(service)
    }

    /// A `[[DATAPATH.service]]` entry of a config file: `vip`, `protocol`, `backends` in the
    /// flag's syntax (`["reject"]` for none) and the options of [`SERVICE_OPTIONS`] as keys;
    /// `origin` names its line.
    pub fn from_entry(
        vip: &str,
        protocol: Option<&str>,
        backends: &[String],
        options: &[(String, String)],
        origin: String,
    ) -> Result<Self> {
        let vip = parse_endpoint("VIP", vip)?;
        let backends = match backends {
            [] => bail!("no backends (a service that refuses its clients says backends = [\"reject\"])"),
            [only] if only.trim() == "reject" => Vec::new(),
            list => list
                .iter()
                .map(|backend| Backend::parse(backend))
                .collect::<Result<Vec<_>>>()?,
        };
        let mut service = Self::new(vip, backends, origin)?;
        service.protocol = protocol.map(Protocol::parse).transpose()?;
        for (key, value) in options {
            service.set_option(key, value)?;
        }
        service.finish_options()?;
        Ok(service)
    }

    /// One option of [`SERVICE_OPTIONS`].
    pub fn set_option(&mut self, key: &str, value: &str) -> Result<()> {
        let seconds = |value: &str| -> Result<Duration> {
            let number: f64 = value
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 86400.0 * 365.0)
                .with_context(|| format!("{key}={value}: seconds, more than 0"))?;
            Ok(Duration::from_secs_f64(number))
        };
        let count = |value: &str| -> Result<u32> {
            value
                .parse()
                .ok()
                .filter(|n| (1..=100).contains(n))
                .with_context(|| format!("{key}={value}: a whole number from 1 to 100"))
        };
        match key {
            "affinity" => match value {
                "client" => {
                    self.affinity.get_or_insert(DEFAULT_AFFINITY);
                }
                "none" => self.affinity = None,
                _ => bail!("affinity={value}: client or none"),
            },
            "affinity-timeout" => {
                let timeout = seconds(value)?;
                if timeout.as_secs() == 0 || timeout.as_secs() > u32::MAX as u64 {
                    bail!("affinity-timeout={value}: whole seconds from 1");
                }
                self.affinity = Some(Duration::from_secs(timeout.as_secs()));
            }
            "check" => {
                let check = self.check.get_or_insert_with(HealthCheck::default);
                match value.split_once(':') {
                    None if value == "tcp" => check.http_path = None,
                    Some(("http", path)) if path.starts_with('/') && !path.contains(char::is_whitespace) => {
                        check.http_path = Some(path.to_string())
                    }
                    _ => bail!("check={value}: tcp, or http:/PATH"),
                }
            }
            "check-expect" => {
                let status = value
                    .parse()
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .with_context(|| format!("check-expect={value}: an HTTP status, 100 to 599"))?;
                self.check.get_or_insert_with(HealthCheck::default).expect = status;
            }
            "check-interval" => {
                self.check.get_or_insert_with(HealthCheck::default).interval = seconds(value)?
            }
            "check-timeout" => self.check.get_or_insert_with(HealthCheck::default).timeout = seconds(value)?,
            "check-rise" => self.check.get_or_insert_with(HealthCheck::default).rise = count(value)?,
            "check-fall" => self.check.get_or_insert_with(HealthCheck::default).fall = count(value)?,
            other => bail!("unknown service option '{other}' ({SERVICE_OPTIONS})"),
        }
        Ok(())
    }

    /// Checks the options together once all are set.
    pub fn finish_options(&mut self) -> Result<()> {
        if let Some(check) = &self.check {
            if check.timeout > check.interval {
                bail!(
                    "check-timeout {} s is longer than check-interval {} s",
                    check.timeout.as_secs_f64(),
                    check.interval.as_secs_f64()
                );
            }
            if check.http_path.is_some() && self.protocol == Some(Protocol::Udp) {
                bail!("an HTTP check of a UDP-only service");
            }
        }
        Ok(())
    }

    /// The keys this service has in the service table: one per protocol.
    pub fn keys(&self) -> Vec<ServiceKey> {
        let protocols = match self.protocol {
            Some(protocol) => vec![protocol],
            None => vec![Protocol::Tcp, Protocol::Udp],
        };
        protocols
            .into_iter()
            .map(|protocol| ServiceKey {
                vip: self.vip,
                protocol,
            })
            .collect()
    }

    /// `tcp:VIP:PORT`, `udp:VIP:PORT` or `VIP:PORT` (both).
    pub fn name(&self) -> String {
        match self.protocol {
            Some(protocol) => format!("{}:{}", protocol.name(), self.vip),
            None => self.vip.to_string(),
        }
    }

    /// The backends' addresses, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.backends.iter().map(|backend| backend.addr).collect()
    }

    /// Each backend's share of new flows as the tables get it: its weight when it is active
    /// and healthy, else 0. When every active backend is unhealthy, the active ones keep
    /// their weights (fail open: a check that fails everywhere is more likely the checker's
    /// problem than every backend's, and refusing every client would make it the service's).
    pub fn effective_weights(&self) -> Vec<u32> {
        self.effective_weights_iter().collect()
    }

    /// [`Service::effective_weights`], one backend at a time.
    pub fn effective_weights_iter(&self) -> impl Iterator<Item = u32> + '_ {
        let any_healthy = self.backends.iter().any(|b| b.active() && b.healthy);
        self.backends.iter().map(move |b| {
            if b.active() && (b.healthy || !any_healthy) {
                b.weight
            } else {
                0
            }
        })
    }
}

/// Splits `--service` text into the VIP with its options and the backend list: at the first
/// '=' not inside a service option (`;key=value` pairs come before the backends' '=').
fn split_head(text: &str) -> Option<(&str, &str)> {
    let mut offset = 0;
    for (index, part) in text.split(';').enumerate() {
        if index == 0 {
            if let Some(at) = part.find('=') {
                return Some((&text[..at], &text[at + 1..]));
            }
        } else if let Some((_, value)) = part.split_once('=') {
            // an option's value ends at the first '=' after it: `check-fall=3=BACKENDS`
            if let Some(at) = value.find('=') {
                let end = offset + part.len() - value.len() + at;
                return Some((&text[..end], &text[end + 1..]));
            }
        }
        offset += part.len() + 1;
    }
    None
}

/// clap's value parser for `--service`; the error is the whole chain, in one line.
pub fn service_flag(text: &str) -> Result<Service, String> {
    Service::parse(text).map_err(|err| format!("{err:#}"))
}

/// Limits of the tables a datapath keeps services in.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub services: usize,
    pub backends_per_service: usize,
    pub backends: usize,
    /// whether backends may name their next hop's MAC (xdp-lb)
    pub macs: bool,
}

fn parse_endpoint(what: &str, text: &str) -> Result<SocketAddr> {
    let trimmed = text.trim();
    let addr: SocketAddr = match plain_ipv4_endpoint(trimmed) {
        Some(addr) => addr,
        None => trimmed.parse().map_err(|_| {
            anyhow::anyhow!("{what} '{text}' is not IP:PORT (IPv6 goes in brackets: [2001:db8::1]:80)")
        })?,
    };
    if addr.port() == 0 {
        bail!("{what} '{text}' has port 0");
    }
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() || ip == std::net::Ipv4Addr::BROADCAST {
        bail!("{what} '{ip}' is not a unicast address other nodes can reach");
    }
    Ok(addr)
}

/// `a.b.c.d:port` written plainly (decimal, no leading zeros), parsed without std's general
/// address parser, which takes a third of the time of 10,000 `--service` flags; None for
/// anything else, which std's parser then reads (it accepts every plain form alike).
fn plain_ipv4_endpoint(text: &str) -> Option<SocketAddr> {
    // the digits of one decimal number at `at`, at most `most`, without a leading zero
    fn number(bytes: &[u8], at: &mut usize, most: usize) -> Option<u32> {
        let start = *at;
        let mut value = 0u32;
        while let Some(digit) = bytes.get(*at).filter(|byte| byte.is_ascii_digit()) {
            if *at - start == most {
                return None;
            }
            value = value * 10 + u32::from(digit - b'0');
            *at += 1;
        }
        let digits = *at - start;
        (digits > 0 && (digits == 1 || bytes[start] != b'0')).then_some(value)
    }
    let bytes = text.as_bytes();
    let mut at = 0;
    let mut octets = [0u8; 4];
    for (index, octet) in octets.iter_mut().enumerate() {
        *octet = u8::try_from(number(bytes, &mut at, 3)?).ok()?;
        let separator = if index == 3 { b':' } else { b'.' };
        if bytes.get(at) != Some(&separator) {
            return None;
        }
        at += 1;
    }
    let port = u16::try_from(number(bytes, &mut at, 5)?).ok()?;
    (at == bytes.len()).then(|| SocketAddr::new(std::net::Ipv4Addr::from(octets).into(), port))
}

/// Parses `--service` flags and checks them together against the table limits.
pub fn parse_services(texts: &[String], limits: Limits) -> Result<Vec<Service>> {
    let services = texts
        .iter()
        .map(|text| Service::parse(text).map_err(|err| anyhow::anyhow!("--service {text}: {err:#}")))
        .collect::<Result<Vec<_>>>()?;
    check_services(services, limits)
}

/// Checks services from every source together: a VIP once, the table limits, and MACs only
/// where the datapath uses them; each error names the flag or file line.
pub fn check_services(services: Vec<Service>, limits: Limits) -> Result<Vec<Service>> {
    let mut vips: FastMap<ServiceKey, &str> =
        FastMap::with_capacity_and_hasher(2 * services.len(), Default::default());
    let mut macs: HashMap<SocketAddr, [u8; 6]> = HashMap::new();
    let mut total = 0;
    for service in &services {
        let fail = |problem: String| anyhow::anyhow!("{}: {problem}", service.origin);
        for key in service.keys() {
            if let Some(first) = vips.insert(key, &service.origin) {
                return Err(fail(format!(
                    "VIP {} ({}) is given twice (also at {first})",
                    service.vip,
                    key.protocol.name()
                )));
            }
        }
        if service.backends.len() > limits.backends_per_service {
            return Err(fail(format!(
                "{} backends; at most {} per service",
                service.backends.len(),
                limits.backends_per_service
            )));
        }
        for backend in &service.backends {
            let Some(mac) = backend.mac else { continue };
            if !limits.macs {
                return Err(fail(format!(
                    "backend {}: a next-hop MAC is for xdp-lb only",
                    backend.addr
                )));
            }
            if macs.insert(backend.addr, mac).is_some_and(|other| other != mac) {
                return Err(fail(format!(
                    "backend {} is given two different MACs",
                    backend.addr
                )));
            }
        }
        total += service.backends.len();
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
            if service.backends.is_empty() {
                return format!("{} -> refused (no backends)", service.name());
            }
            let backends: Vec<String> = service
                .backends
                .iter()
                .map(|b| Backend { mac: None, ..*b }.to_string())
                .collect();
            format!("{} -> {}", service.name(), backends.join(", "))
        })
        .collect();
    if services.len() > SHOWN {
        parts.push(format!("and {} more services", services.len() - SHOWN));
    }
    parts.join("; ")
}

/// The tables of include/service.h in one datapath's maps, from a fresh skeleton or pins:
/// service key -> slot range, slot -> backend (a struct that starts with its endpoint),
/// slot -> cumulative weight, and slot -> counters. The slot arrays made mmapable
/// (`BPF_F_MMAPABLE`) are mapped into this process and read and written as memory; the
/// others go through the bpf system call by batches.
pub struct ServiceTables {
    pub services: MapHandle,
    pub backends: MapHandle,
    pub weights: MapHandle,
    pub stats: MapHandle,
    /// entries of the backend and counter arrays
    pub slots: u32,
    /// the backend, weight and counter arrays where they are mapped, in [`Slots`] order
    mapped: [Option<MappedArray>; 3],
}

/// One of the slot arrays.
#[derive(Debug, Clone, Copy)]
enum Slots {
    Backends = 0,
    Weights = 1,
    Stats = 2,
}

impl ServiceTables {
    pub fn new(services: MapHandle, backends: MapHandle, weights: MapHandle, stats: MapHandle) -> Self {
        let slots = backends.max_entries();
        // an array the kernel will not map is read and written by system calls instead
        let map = |handle: &MapHandle| MappedArray::new(handle).ok().flatten();
        let mapped = [map(&backends), map(&weights), map(&stats)];
        Self {
            services,
            backends,
            weights,
            stats,
            slots,
            mapped,
        }
    }

    /// The tables pinned in `pins`: services, backends, weights, counters.
    pub fn pinned(pins: &PinDir, specs: [MapPin; 4]) -> Result<Self> {
        Ok(Self::new(
            pins.open_map(&specs[0])?,
            pins.open_map(&specs[1])?,
            pins.open_map(&specs[2])?,
            pins.open_map(&specs[3])?,
        ))
    }

    fn handle(&self, which: Slots) -> &MapHandle {
        match which {
            Slots::Backends => &self.backends,
            Slots::Weights => &self.weights,
            Slots::Stats => &self.stats,
        }
    }

    /// The values of slots `0..count` (fewer when the array is shorter), back to back.
    fn read_first(&self, which: Slots, count: u32) -> Result<Vec<u8>> {
        if let Some(mapped) = &self.mapped[which as usize] {
            return Ok(mapped.read_first(count));
        }
        let map = self.handle(which);
        let size = map.value_size() as usize;
        let entries = maps::read_first(map, count as usize)?;
        let mut out = Vec::with_capacity(count as usize * size);
        for (_, value) in entries.iter().take(count as usize) {
            out.extend_from_slice(value);
        }
        Ok(out)
    }

    /// Writes `values` to the slots of `keys` (u32 each), as a batch update takes them.
    fn write(&self, which: Slots, keys: &[u8], values: &[u8]) -> Result<()> {
        if let Some(mapped) = &self.mapped[which as usize] {
            return mapped.write(keys, values);
        }
        self.handle(which).update_batch(
            keys,
            values,
            (keys.len() / 4) as u32,
            MapFlags::ANY,
            MapFlags::ANY,
        )?;
        Ok(())
    }
}

/// A service as the tables hold it: the keys pointing at its slots
/// [base, base + backends.len()), and what its value and slots say.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    keys: Vec<ServiceKey>,
    base: u32,
    backends: Vec<SocketAddr>,
    /// each slot's own weight (its cumulative weight less the one before)
    weights: Vec<u32>,
    affinity_s: Option<u32>,
}

impl Installed {
    fn protocol(&self) -> Option<Protocol> {
        match self.keys.as_slice() {
            [only] => Some(only.protocol),
            _ => None,
        }
    }
}

/// What a service's slots should say, in an order that does not depend on the slots':
/// (backend, effective weight) sorted into `out`, and the affinity timeout returned. Equal
/// for two services that behave the same.
fn wanted_image_into(service: &Service, out: &mut Vec<(SocketAddr, u32)>) -> Option<u32> {
    out.clear();
    out.extend(
        service
            .backends
            .iter()
            .map(|backend| backend.addr)
            .zip(service.effective_weights_iter()),
    );
    out.sort_unstable();
    affinity_seconds(service)
}

fn affinity_seconds(service: &Service) -> Option<u32> {
    service
        .affinity
        .map(|timeout| timeout.as_secs().clamp(1, u32::MAX as u64) as u32)
}

/// The tables as an update or a report finds them, read once: which range every key points
/// at, and the endpoints and cumulative weights of the slots those ranges use, kept as the
/// maps' bytes. A service's slots are decoded only when asked about: an update that changes
/// one service of 10,000 compares each in place rather than building 10,000 lists.
struct Current {
    /// range start -> its value and how many keys point at it
    ranges: FastMap<u32, (service_range, usize)>,
    /// key -> the start of the range it points at
    pointing: FastMap<ServiceKey, u32>,
    /// the backend values of slots 0..used, `backend_size` bytes each
    backends: Vec<u8>,
    backend_size: usize,
    /// the cumulative weights of slots 0..used
    cumulative: Vec<u32>,
}

impl Current {
    fn read(tables: &ServiceTables) -> Result<Self> {
        // by batches: 10,000 services are a few system calls
        let entries = maps::read_all(&tables.services)?;
        let mut ranges: FastMap<u32, (service_range, usize)> =
            FastMap::with_capacity_and_hasher(entries.len(), Default::default());
        let mut pointing = FastMap::with_capacity_and_hasher(entries.len(), Default::default());
        for (key, value) in entries.iter() {
            let endpoint: service_endpoint = maps::from_bytes("service key", key)?;
            let range: service_range = maps::from_bytes("service range", value)?;
            let Some(protocol) = Protocol::from_number(endpoint.proto) else {
                continue;
            };
            let key = ServiceKey {
                vip: SocketAddr::from(&endpoint),
                protocol,
            };
            ranges.entry(range.base).or_insert((range, 0)).1 += 1;
            pointing.insert(key, range.base);
        }
        let used = ranges
            .values()
            .map(|(range, _)| range.base.saturating_add(range.count))
            .max()
            .unwrap_or(0)
            .min(tables.slots);
        let backend_size = tables.backends.value_size() as usize;
        anyhow::ensure!(
            backend_size >= size_of::<service_endpoint>(),
            "a backend value shorter than an endpoint"
        );
        let (backends, cumulative) = if used > 0 {
            let weights = tables.read_first(Slots::Weights, used)?;
            let cumulative = weights
                .chunks_exact(4)
                .map(|bytes| u32::from_ne_bytes(bytes.try_into().expect("4 bytes")))
                .collect();
            (tables.read_first(Slots::Backends, used)?, cumulative)
        } else {
            (Vec::new(), Vec::new())
        };
        let current = Self {
            ranges,
            pointing,
            backends,
            backend_size,
            cumulative,
        };
        for base in current.ranges.keys() {
            anyhow::ensure!(
                *base as usize <= current.slot_count(),
                "backend slot out of range"
            );
            anyhow::ensure!(
                current.end(*base) as usize <= current.cumulative.len(),
                "weight slot out of range"
            );
        }
        Ok(current)
    }

    /// Slots read.
    fn slot_count(&self) -> usize {
        self.backends.len() / self.backend_size
    }

    /// The end of the slots of the range at `base` that were read.
    fn end(&self, base: u32) -> u32 {
        let count = self.ranges.get(&base).map_or(0, |(range, _)| range.count);
        base.saturating_add(count).min(self.slot_count() as u32)
    }

    /// How many backends the range at `base` holds.
    fn len(&self, base: u32) -> usize {
        self.end(base).saturating_sub(base) as usize
    }

    fn endpoint(&self, slot: u32) -> Result<SocketAddr> {
        let at = slot as usize * self.backend_size;
        let endpoint: service_endpoint =
            maps::from_bytes("backend", &self.backends[at..at + size_of::<service_endpoint>()])?;
        Ok(SocketAddr::from(&endpoint))
    }

    /// The backends of the range at `base` with each slot's own weight (its cumulative
    /// weight less the one before), in slot order.
    fn slots(&self, base: u32) -> impl Iterator<Item = Result<(SocketAddr, u32)>> + '_ {
        let mut before = 0u32;
        (base..self.end(base)).map(move |slot| {
            let end = self.cumulative[slot as usize];
            let own = end.saturating_sub(before);
            before = end;
            Ok((self.endpoint(slot)?, own))
        })
    }

    /// The affinity timeout the range at `base` says.
    fn affinity(&self, base: u32) -> Option<u32> {
        let (range, _) = self.ranges.get(&base)?;
        (range.flags & SERVICE_AFFINITY != 0).then_some(range.affinity_s)
    }

    /// Whether `service` is in the tables as it should be: every key of it, and no other,
    /// points at one range, whose slots say what the service's should (in any order).
    fn holds(
        &self,
        service: &Service,
        keys: &[ServiceKey],
        wanted: &mut Vec<(SocketAddr, u32)>,
        have: &mut Vec<(SocketAddr, u32)>,
    ) -> Result<bool> {
        let Some(&base) = keys.first().and_then(|key| self.pointing.get(key)) else {
            return Ok(false);
        };
        if keys.iter().any(|key| self.pointing.get(key) != Some(&base))
            || self.ranges.get(&base).map(|(_, holders)| *holders) != Some(keys.len())
        {
            return Ok(false);
        }
        if affinity_seconds(service) != self.affinity(base)
            || service.backends.len() != self.len(base)
            || self
                .ranges
                .get(&base)
                .map(|(range, _)| range.flags & SERVICE_KEEP_SOURCE != 0)
                != Some(service.keep_source)
        {
            return Ok(false);
        }
        // the slots as this program writes them, in the service's order: no sorting
        let mut in_order = true;
        for ((backend, weight), slot) in service
            .backends
            .iter()
            .zip(service.effective_weights_iter())
            .zip(self.slots(base))
        {
            if slot? != (backend.addr, weight) {
                in_order = false;
                break;
            }
        }
        if in_order {
            return Ok(true);
        }
        // else the same backends in another order are the same service
        wanted_image_into(service, wanted);
        have.clear();
        for slot in self.slots(base) {
            have.push(slot?);
        }
        have.sort_unstable();
        Ok(wanted == have)
    }

    /// The slot `addr` has in the range at `base`, if it is one of its backends.
    fn slot_of(&self, base: u32, addr: SocketAddr) -> Option<u32> {
        (base..self.end(base)).find(|slot| self.endpoint(*slot).is_ok_and(|at| at == addr))
    }

    /// Every service in the tables, one entry per slot range (the keys of a service of both
    /// protocols share theirs), by range start.
    fn installed(&self) -> Result<BTreeMap<u32, Installed>> {
        let mut installed: BTreeMap<u32, Installed> = BTreeMap::new();
        for (key, base) in &self.pointing {
            if let Some(service) = installed.get_mut(base) {
                service.keys.push(*key);
                continue;
            }
            let (backends, weights) = self.slots(*base).collect::<Result<Vec<_>>>()?.into_iter().unzip();
            installed.insert(
                *base,
                Installed {
                    keys: vec![*key],
                    base: *base,
                    backends,
                    weights,
                    affinity_s: self.affinity(*base),
                },
            );
        }
        for service in installed.values_mut() {
            service.keys.sort();
        }
        Ok(installed)
    }
}

/// Every service in the tables, one entry per slot range, by range start.
fn read_installed(tables: &ServiceTables) -> Result<BTreeMap<u32, Installed>> {
    Current::read(tables)?.installed()
}

/// include/service.h
const SERVICE_AFFINITY: u32 = 1;
const SERVICE_KEEP_SOURCE: u32 = 2;
const SERVICE_EVEN_WEIGHTS: u32 = 4;

/// A service's flags in its range value.
fn service_flags(service: &Service) -> u32 {
    let mut flags = 0;
    if service.affinity.is_some() {
        flags |= SERVICE_AFFINITY;
    }
    if service.keep_source {
        flags |= SERVICE_KEEP_SOURCE;
    }
    flags
}

/// The hasher of an update's own maps (keys from the tables and the user's services, not
/// from the network): multiply-rotate as rustc's FxHash. SipHash's resistance to chosen keys
/// buys nothing here and costs milliseconds over the 100,000 lookups of 10,000 services.
#[derive(Default, Clone, Copy)]
struct FastHasher(u64);

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_ne_bytes(word));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(n.into());
    }
    fn write_u16(&mut self, n: u16) {
        self.add(n.into());
    }
    fn write_u32(&mut self, n: u32) {
        self.add(n.into());
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;
type FastSet<K> = HashSet<K, std::hash::BuildHasherDefault<FastHasher>>;

/// First-fit allocation of contiguous backend slot ranges.
struct SlotAllocator {
    /// free (start, len), sorted by start
    gaps: Vec<(u32, u32)>,
}

impl SlotAllocator {
    fn new(total: u32, used: impl Iterator<Item = (u32, u32)>) -> Self {
        let mut used: Vec<(u32, u32)> = used.collect();
        used.sort();
        let mut gaps = Vec::new();
        let mut next = 0;
        for (start, len) in used {
            if start > next {
                gaps.push((next, start - next));
            }
            next = next.max(start + len);
        }
        if next < total {
            gaps.push((next, total - next));
        }
        Self { gaps }
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        let index = self.gaps.iter().position(|&(_, free)| free >= len)?;
        let (start, free) = self.gaps[index];
        if free == len {
            self.gaps.remove(index);
        } else {
            self.gaps[index] = (start + len, free - len);
        }
        Some(start)
    }

    fn release(&mut self, start: u32, len: u32) {
        self.gaps.push((start, len));
        self.gaps.sort();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.gaps.len());
        for &(start, len) in &self.gaps {
            match merged.last_mut() {
                Some((last_start, last_len)) if *last_start + *last_len == start => *last_len += len,
                _ => merged.push((start, len)),
            }
        }
        self.gaps = merged;
    }

    fn free(&self) -> u32 {
        self.gaps.iter().map(|&(_, len)| len).sum()
    }
}

/// What an update changed.
#[derive(Default)]
pub struct SyncReport {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// what it wrote to the services and backends, for the record `status` compares with
    pub written: Written,
    /// (UDP VIP, backend) of every backend that left a UDP service (clusterip destroys the
    /// sockets it connected through that VIP to that backend)
    pub gone: Vec<(SocketAddr, SocketAddr)>,
}

impl std::fmt::Display for SyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} added, {} changed, {} removed, {} unchanged",
            self.added, self.changed, self.removed, self.unchanged
        )
    }
}

/// Makes the tables hold exactly `services`, touching only what differs. A changed service
/// is written to free slots first and then swapped in with one update of each of its keys,
/// so every lookup sees either the old service or the new one and a VIP is never missing;
/// counters of backends that stay are carried over.
pub fn sync_services(
    tables: &ServiceTables,
    services: &[Service],
    backend_value: impl Fn(&Service, SocketAddr, &mut Vec<u8>) -> Result<()>,
) -> Result<SyncReport> {
    sync_services_with(tables, services, backend_value, |_, _| Ok(()))
}

/// [`sync_services`], with `before_swap(service, base)` called once a changed service's
/// backends sit in their new slots and before the service points at them: a datapath's own
/// per-service tables (xdp-lb's Maglev ring) are right before a packet can use them.
pub fn sync_services_with(
    tables: &ServiceTables,
    services: &[Service],
    backend_value: impl Fn(&Service, SocketAddr, &mut Vec<u8>) -> Result<()>,
    before_swap: impl Fn(&Service, u32) -> Result<()>,
) -> Result<SyncReport> {
    crate::control::health::configure(services);
    let checked = crate::control::health::overlay(services);
    let services: &[Service] = &checked;
    let current = Current::read(tables)?;
    crate::control::run::phase("installed services read");
    let mut report = SyncReport::default();
    let mut allocator = SlotAllocator::new(
        tables.slots,
        current
            .ranges
            .keys()
            .map(|base| (*base, held(current.len(*base)))),
    );
    // which range each key points at, and how many keys point at each range: a range is
    // free again once no key points at it
    let mut pointing: FastMap<ServiceKey, u32> = current.pointing.clone();
    let mut holders: FastMap<u32, usize> = current
        .ranges
        .iter()
        .map(|(base, (_, holders))| (*base, *holders))
        .collect();
    let mut released: Vec<(u32, u32)> = Vec::new();
    let mut lengths: FastMap<u32, u32> = current
        .ranges
        .keys()
        .map(|base| (*base, held(current.len(*base))))
        .collect();
    // a key no longer points at its range; the range's slots once no key does
    fn unpoint(
        key: &ServiceKey,
        pointing: &mut FastMap<ServiceKey, u32>,
        holders: &mut FastMap<u32, usize>,
        lengths: &FastMap<u32, u32>,
        released: &mut Vec<(u32, u32)>,
    ) -> bool {
        let Some(base) = pointing.remove(key) else {
            return false;
        };
        let left = holders.get_mut(&base).expect("a range of an installed key");
        *left -= 1;
        if *left == 0 {
            released.push((base, lengths[&base]));
        }
        *left == 0
    }

    let wanted: FastSet<ServiceKey> = services.iter().flat_map(Service::keys).collect();
    // Removed services go last, once every added or changed one is in: an update stopped
    // midway never leaves fewer services than either the old state or the new one has.
    let mut removals: Vec<ServiceKey> = pointing
        .keys()
        .filter(|key| !wanted.contains(key))
        .copied()
        .collect();
    removals.sort();
    for key in removals.iter().filter(|key| key.protocol == Protocol::Udp) {
        gone_from(&current, *key, pointing[key], &[], &mut report.gone)?;
    }

    let mut pending: Vec<&Service> = Vec::new();
    // reused for every service: comparing 10,000 services allocates nothing per service
    let (mut wanted_image, mut installed_image) = (Vec::new(), Vec::new());
    for service in services {
        let keys = service.keys();
        if current.holds(service, &keys, &mut wanted_image, &mut installed_image)? {
            report.unchanged += 1;
        } else if keys.iter().any(|key| pointing.contains_key(key)) {
            report.changed += 1;
            pending.push(service);
            let now = service.addrs();
            for key in keys.iter().filter(|key| key.protocol == Protocol::Udp) {
                if let Some(base) = pointing.get(key) {
                    gone_from(&current, *key, *base, &now, &mut report.gone)?;
                }
            }
        } else {
            report.added += 1;
            pending.push(service);
        }
    }

    crate::control::run::phase("  services compared");
    while !pending.is_empty() {
        let mut placed = Vec::new();
        let mut deferred = Vec::new();
        for service in pending {
            match allocator.alloc(held(service.backends.len())) {
                Some(base) => placed.push((service, base)),
                None => deferred.push(service),
            }
        }
        write_ranges(
            tables,
            &current,
            &pointing,
            &placed,
            &backend_value,
            &before_swap,
            &mut report.written,
        )?;
        for (service, base) in &placed {
            for key in service.keys() {
                unpoint(&key, &mut pointing, &mut holders, &lengths, &mut released);
                pointing.insert(key, *base);
            }
            holders.insert(*base, service.keys().len());
            lengths.insert(*base, held(service.backends.len()));
        }
        if !deferred.is_empty() && placed.is_empty() && released.is_empty() && !removals.is_empty() {
            // no room left for the rest: the removed services' slots are needed now
            for key in removals.drain(..) {
                delete_key(tables, &key, &mut report.written)?;
                if unpoint(&key, &mut pointing, &mut holders, &lengths, &mut released) {
                    report.removed += 1;
                }
            }
        }
        if !deferred.is_empty() && placed.is_empty() && released.is_empty() {
            bail!(
                "the backend table is full: {} more slots needed, {} of {} free",
                deferred.iter().map(|svc| svc.backends.len()).sum::<usize>(),
                allocator.free(),
                tables.slots
            );
        }
        if !deferred.is_empty() {
            // Slots of lists swapped out above are written again only after every lookup
            // that may have read the old list is done.
            std::thread::sleep(RANGE_REUSE_GRACE);
            for (base, len) in released.drain(..) {
                allocator.release(base, len);
            }
        }
        pending = deferred;
    }
    for key in removals.drain(..) {
        delete_key(tables, &key, &mut report.written)?;
        if unpoint(&key, &mut pointing, &mut holders, &lengths, &mut released) {
            report.removed += 1;
        }
    }
    Ok(report)
}

/// Notes (VIP, backend) for each backend of the range at `base` that `key` points at and
/// that is not in `now`.
fn gone_from(
    current: &Current,
    key: ServiceKey,
    base: u32,
    now: &[SocketAddr],
    gone: &mut Vec<(SocketAddr, SocketAddr)>,
) -> Result<()> {
    for slot in base..current.end(base) {
        let backend = current.endpoint(slot)?;
        if !now.contains(&backend) {
            gone.push((key.vip, backend));
        }
    }
    Ok(())
}

/// The slots a service of `backends` backends holds: one at least, so that every service,
/// one that refuses its clients too, has a range of its own.
fn held(backends: usize) -> u32 {
    backends.max(1) as u32
}

fn delete_key(tables: &ServiceTables, key: &ServiceKey, written: &mut Written) -> Result<()> {
    let endpoint = key.endpoint();
    tables
        .services
        .delete(as_bytes(&endpoint))
        .with_context(|| format!("removing service {}:{}", key.protocol.name(), key.vip))?;
    written.delete(&tables.services, as_bytes(&endpoint))
}

/// Writes each placed service's backends, weights and counters to its new slots, then points
/// its keys at them (one batch per table).
fn write_ranges(
    tables: &ServiceTables,
    current: &Current,
    pointing: &FastMap<ServiceKey, u32>,
    placed: &[(&Service, u32)],
    backend_value: &impl Fn(&Service, SocketAddr, &mut Vec<u8>) -> Result<()>,
    before_swap: &impl Fn(&Service, u32) -> Result<()>,
    written: &mut Written,
) -> Result<()> {
    if placed.is_empty() {
        return Ok(());
    }
    // sized once: 100,000 slots grow no buffer by doubling
    let slots: usize = placed.iter().map(|(service, _)| service.backends.len()).sum();
    let key_count = 2 * placed.len();
    let mut slot_keys = Vec::with_capacity(slots * 4);
    let mut backend_values = Vec::with_capacity(slots * tables.backends.value_size() as usize);
    let mut weight_values = Vec::with_capacity(slots * 4);
    let mut stats_values = Vec::with_capacity(slots * tables.stats.value_size() as usize);
    let mut service_keys = Vec::with_capacity(key_count * size_of::<service_endpoint>());
    let mut service_values = Vec::with_capacity(key_count * size_of::<service_range>());
    for (service, base) in placed {
        // the ranges its keys point at now, whose counters its staying backends carry over
        let mut olds: Vec<u32> = Vec::new();
        for key in service.keys() {
            if let Some(old) = pointing.get(&key).filter(|old| current.ranges.contains_key(old)) {
                olds.push(*old);
            }
        }
        let stats_size = tables.stats.value_size() as usize;
        let mut cumulative = 0u32;
        // every backend usable and of one weight: the programs pick without the weights
        let mut even = true;
        for (index, (backend, weight)) in service
            .backends
            .iter()
            .zip(service.effective_weights_iter())
            .enumerate()
        {
            let slot = base + index as u32;
            slot_keys.extend_from_slice(&slot.to_ne_bytes());
            backend_value(service, backend.addr, &mut backend_values)?;
            even &= weight > 0 && (index == 0 || weight == cumulative / index as u32);
            cumulative += weight;
            weight_values.extend_from_slice(&cumulative.to_ne_bytes());
            match olds.iter().find_map(|old| current.slot_of(*old, backend.addr)) {
                Some(slot) => stats_values.extend_from_slice(&read_stats(tables, slot)?),
                None => stats_values.resize(stats_values.len() + stats_size, 0),
            }
        }
        let range = service_range {
            base: *base,
            count: service.backends.len() as u32,
            weight: cumulative,
            flags: service_flags(service) | if even { SERVICE_EVEN_WEIGHTS } else { 0 },
            affinity_s: affinity_seconds(service).unwrap_or(0),
            pad: 0,
        };
        for key in service.keys() {
            service_keys.extend_from_slice(as_bytes(&key.endpoint()));
            service_values.extend_from_slice(as_bytes(&range));
        }
    }
    crate::control::run::phase("  slot values made");
    if !slot_keys.is_empty() {
        tables
            .write(Slots::Backends, &slot_keys, &backend_values)
            .context("writing backends")?;
        written.update(&tables.backends, &slot_keys, &backend_values)?;
        tables
            .write(Slots::Weights, &slot_keys, &weight_values)
            .context("writing backend weights")?;
        written.update(&tables.weights, &slot_keys, &weight_values)?;
        crate::control::run::phase("  backends and weights written");
        write_stats(tables, &slot_keys, &stats_values).context("writing backend counters")?;
        crate::control::run::phase("  counters written");
    }
    for (service, base) in placed {
        before_swap(service, *base)?;
    }
    let keys = (service_keys.len() / size_of::<service_endpoint>()) as u32;
    tables
        .services
        .update_batch(&service_keys, &service_values, keys, MapFlags::ANY, MapFlags::ANY)
        .context("writing services")?;
    written.update(&tables.services, &service_keys, &service_values)?;
    crate::control::run::phase("  services written");
    Ok(())
}

/// The counters of a backend slot; a per-CPU table's summed over CPUs (every counter struct
/// of include/ is made of u64 words).
fn read_stats(tables: &ServiceTables, slot: u32) -> Result<Vec<u8>> {
    let size = tables.stats.value_size() as usize;
    if let Some(mapped) = &tables.mapped[Slots::Stats as usize] {
        return mapped.read(slot);
    }
    let key = slot.to_ne_bytes();
    if !tables.stats.map_type().is_percpu() {
        return Ok(tables
            .stats
            .lookup(&key, MapFlags::ANY)?
            .unwrap_or_else(|| vec![0u8; size]));
    }
    let mut sum = vec![0u64; size / 8];
    for cpu in tables
        .stats
        .lookup_percpu(&key, MapFlags::ANY)?
        .unwrap_or_default()
    {
        for (total, word) in sum.iter_mut().zip(cpu.chunks_exact(8)) {
            *total += u64::from_ne_bytes(word.try_into().expect("8 bytes"));
        }
    }
    Ok(sum.iter().flat_map(|word| word.to_ne_bytes()).collect())
}

/// Writes counters to slots; a per-CPU table gets each slot's total on the first CPU.
fn write_stats(tables: &ServiceTables, keys: &[u8], values: &[u8]) -> Result<()> {
    if !tables.stats.map_type().is_percpu() {
        return tables.write(Slots::Stats, keys, values);
    }
    let size = tables.stats.value_size() as usize;
    let cpus = libbpf_rs::num_possible_cpus()?;
    for (key, value) in keys.chunks_exact(4).zip(values.chunks_exact(size)) {
        let mut per_cpu = vec![vec![0u8; size]; cpus];
        per_cpu[0] = value.to_vec();
        tables.stats.update_percpu(key, &per_cpu, MapFlags::ANY)?;
    }
    Ok(())
}

/// One backend of a service report, with its counters.
#[derive(Debug, Clone)]
pub struct BackendReport<T> {
    pub backend: SocketAddr,
    /// its share of new flows as the tables say (0: none, for whatever reason)
    pub weight: u32,
    pub counters: T,
}

/// One service as the tables hold it, with every backend's counters.
#[derive(Debug, Clone)]
pub struct ServiceReport<T> {
    pub vip: SocketAddr,
    /// None: both
    pub protocol: Option<Protocol>,
    pub affinity_s: Option<u32>,
    pub backends: Vec<BackendReport<T>>,
}

impl<T: Counters> ServiceReport<T> {
    /// The sum of its backends' counters.
    pub fn totals(&self) -> T {
        T::sum(self.backends.iter().map(|backend| &backend.counters))
    }

    /// `tcp:VIP:PORT`, `udp:VIP:PORT` or `VIP:PORT`.
    pub fn name(&self) -> String {
        match self.protocol {
            Some(protocol) => format!("{}:{}", protocol.name(), self.vip),
            None => self.vip.to_string(),
        }
    }

    /// `{ "vip", "protocol", "affinity_timeout", "backends": [{ "backend", "weight",
    /// counters... }], "totals": {...} }`
    pub fn json(&self) -> Value {
        let backends: Vec<Value> = self
            .backends
            .iter()
            .map(|b| {
                let mut entry = b.counters.json();
                entry.insert("backend".into(), json!(b.backend.to_string()));
                entry.insert("weight".into(), json!(b.weight));
                Value::Object(entry)
            })
            .collect();
        json!({
            "vip": self.vip.to_string(),
            "protocol": self.protocol.map_or("both", Protocol::name),
            "affinity_timeout": self.affinity_s,
            "backends": backends,
            "totals": self.totals().json(),
        })
    }

    /// "VIP -> backend (counters), ..."; `words` says a backend's counters.
    pub fn summary(&self, words: impl Fn(&T) -> String) -> String {
        if self.backends.is_empty() {
            return format!("{} -> refused (no backends)", self.name());
        }
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|b| {
                let share = if b.weight == 0 {
                    "no new flows, ".to_string()
                } else {
                    String::new()
                };
                format!("{} ({share}{})", b.backend, words(&b.counters))
            })
            .collect();
        format!("{} -> {}", self.name(), backends.join(", "))
    }
}

/// The counters of every backend of every service, summed.
pub fn grand_total<T: Counters>(services: &[ServiceReport<T>]) -> T {
    T::sum(
        services
            .iter()
            .flat_map(|service| service.backends.iter().map(|b| &b.counters)),
    )
}

/// Every service with its backends and their counters, for `status`, metrics and exit
/// summaries, by VIP.
pub fn service_report<T: Counters>(tables: &ServiceTables) -> Result<Vec<ServiceReport<T>>> {
    let mut report = Vec::new();
    for installed in read_installed(tables)?.into_values() {
        let mut backends = Vec::new();
        for (index, (backend, weight)) in installed.backends.iter().zip(&installed.weights).enumerate() {
            let bytes = read_stats(tables, installed.base + index as u32)?;
            backends.push(BackendReport {
                backend: *backend,
                weight: *weight,
                counters: maps::from_bytes(T::C_STRUCT, &bytes)?,
            });
        }
        report.push(ServiceReport {
            vip: installed.keys[0].vip,
            protocol: installed.protocol(),
            affinity_s: installed.affinity_s,
            backends,
        });
    }
    report.sort_by_key(|service| (service.vip, service.protocol));
    Ok(report)
}

/// The services of a report, the first few spelled out, for `status`.
pub fn summarize_report<T: Counters>(services: &[ServiceReport<T>], words: impl Fn(&T) -> String) -> String {
    const SHOWN: usize = 10;
    let mut parts: Vec<String> = services
        .iter()
        .take(SHOWN)
        .map(|service| service.summary(&words))
        .collect();
    if services.len() > SHOWN {
        parts.push(format!("and {} more (see --json)", services.len() - SHOWN));
    }
    format!("{} services; {}", services.len(), parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        services: 3,
        backends_per_service: 3,
        backends: 5,
        macs: false,
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
        assert_eq!(services[1].addrs(), vec!["[fd00::1]:53".parse().unwrap()]);
    }

    #[test]
    fn plain_ipv4_endpoints_parse_as_std_does() {
        let agrees = |text: &str| {
            if let Some(fast) = plain_ipv4_endpoint(text) {
                assert_eq!(Some(fast), text.parse().ok(), "{text}");
            }
        };
        for text in [
            "10.0.0.1:80",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "1.2.3.4:08080",
            "01.2.3.4:80",
            "1.2.3.4:080",
            "256.1.1.1:80",
            "1.2.3:80",
            "1.2.3.4.5:80",
            "1.2.3.4:65536",
            "1.2.3.4:",
            ":80",
            "1.2.3.4",
            "1.2.3.4:80x",
            "1.2.3.4 :80",
            "1.2.3.0400:80",
            "1.2.3.4:123456",
            "[::1]:80",
            "a.b.c.d:80",
            "1..3.4:80",
            "1.2.3.4::80",
            "+1.2.3.4:80",
            "1.2.3.4:+80",
        ] {
            agrees(text);
        }
        // and addresses made of random parts, most of them plain, against std's parser
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        let mut plain = 0;
        for _ in 0..200_000 {
            let mut text = String::new();
            for part in 0..5 {
                let number = match next(8) {
                    0 => format!("0{}", next(300)),
                    1 => next(100_000).to_string(),
                    2 => String::new(),
                    _ => next(if part == 4 { 70_000 } else { 260 }).to_string(),
                };
                text.push_str(&number);
                if part < 4 {
                    let separator = match next(12) {
                        0 => ":",
                        1 => "..",
                        2 => " ",
                        _ if part == 3 => ":",
                        _ => ".",
                    };
                    text.push_str(separator);
                }
            }
            plain += usize::from(plain_ipv4_endpoint(&text).is_some());
            agrees(&text);
        }
        assert!(plain > 5_000, "only {plain} plain addresses made");
        for plain in ["10.0.0.1:80", "192.168.255.254:65535", "0.0.0.0:0"] {
            assert_eq!(plain_ipv4_endpoint(plain), plain.parse().ok(), "{plain}");
        }
        assert_eq!(plain_ipv4_endpoint("010.0.0.1:80"), None);
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

    #[test]
    fn allocator_fills_gaps_first_fit_and_merges_released_ranges() {
        let mut slots = SlotAllocator::new(100, [(10, 10), (30, 5)].into_iter());
        assert_eq!(slots.gaps, vec![(0, 10), (20, 10), (35, 65)]);
        assert_eq!(slots.alloc(10), Some(0));
        assert_eq!(slots.alloc(4), Some(20));
        assert_eq!(slots.alloc(7), Some(35));
        assert_eq!(slots.alloc(60), None);
        assert_eq!(slots.free(), 6 + 58);
        slots.release(10, 10);
        slots.release(0, 10);
        assert_eq!(slots.gaps[0], (0, 20));
        assert_eq!(slots.alloc(20), Some(0));
    }

    fn wanted_image(service: &Service) -> (Vec<(SocketAddr, u32)>, Option<u32>) {
        let mut backends = Vec::new();
        let affinity = wanted_image_into(service, &mut backends);
        (backends, affinity)
    }

    #[test]
    fn backend_order_does_not_make_a_change_but_weights_do() {
        let one = Service::parse("10.96.0.1:80=10.0.0.1:80,10.0.0.2:80;weight=2").unwrap();
        let other = Service::parse("10.96.0.1:80=10.0.0.2:80;weight=2,10.0.0.1:80").unwrap();
        assert_eq!(wanted_image(&one), wanted_image(&other));
        let heavier = Service::parse("10.96.0.1:80=10.0.0.2:80;weight=3,10.0.0.1:80").unwrap();
        assert_ne!(wanted_image(&one), wanted_image(&heavier));
    }

    #[test]
    fn protocols_options_weights_and_states_parse() {
        let service =
            Service::parse("tcp:10.96.0.1:80;affinity=client;affinity-timeout=60=10.0.0.1:80;weight=3,10.0.0.2:80;state=draining")
                .unwrap();
        assert_eq!(service.protocol, Some(Protocol::Tcp));
        assert_eq!(service.affinity, Some(Duration::from_secs(60)));
        assert_eq!(service.backends[0].weight, 3);
        assert_eq!(service.backends[1].state, BackendState::Draining);
        assert_eq!(service.effective_weights(), vec![3, 0]);
        assert_eq!(service.keys().len(), 1);
        let both =
            Service::parse("[fd00::1]:53;check=tcp;check-interval=1;check-timeout=0.5=[fd00::2]:53").unwrap();
        assert_eq!(both.protocol, None);
        assert_eq!(both.keys().len(), 2);
        let check = both.check.unwrap();
        assert_eq!(
            (check.interval, check.timeout),
            (Duration::from_secs(1), Duration::from_millis(500))
        );
        let refusing = Service::parse("udp:10.96.0.1:53=reject").unwrap();
        assert!(refusing.backends.is_empty());
        // fail open: every active backend unhealthy keeps their weights
        let mut sick = Service::parse("10.96.0.1:80=10.0.0.1:80,10.0.0.2:80;state=down").unwrap();
        sick.backends[0].healthy = false;
        assert_eq!(sick.effective_weights(), vec![1, 0]);
        // a TCP and a UDP service on one VIP:PORT are two services; both and TCP clash
        let limits = Limits {
            services: 10,
            backends_per_service: 10,
            backends: 10,
            macs: false,
        };
        assert!(parse_services(
            &texts(&["tcp:10.96.0.1:53=10.0.0.1:53", "udp:10.96.0.1:53=10.0.0.2:53"]),
            limits
        )
        .is_ok());
        let err = parse_services(
            &texts(&["10.96.0.1:53=10.0.0.1:53", "tcp:10.96.0.1:53=10.0.0.2:53"]),
            limits,
        )
        .unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
        for (bad, needle) in [
            ("sctp:10.96.0.1:80=10.0.0.1:80", "sctp is not supported"),
            ("10.96.0.1:80=10.0.0.1:80;weight=0", "weight '0'"),
            ("10.96.0.1:80=10.0.0.1:80;state=gone", "active, draining or down"),
            ("10.96.0.1:80=10.0.0.1:80;color=red", "unknown option 'color'"),
            ("10.96.0.1:80;affinity=sticky=10.0.0.1:80", "client or none"),
            (
                "10.96.0.1:80;bogus=1=10.0.0.1:80",
                "unknown service option 'bogus'",
            ),
            ("10.96.0.1:80;check=http:nopath=10.0.0.1:80", "http:/PATH"),
            (
                "10.96.0.1:80;check-timeout=9=10.0.0.1:80",
                "longer than check-interval",
            ),
            (
                "udp:10.96.0.1:80;check=http:/=10.0.0.1:80",
                "HTTP check of a UDP-only",
            ),
        ] {
            let err = parse_services(&texts(&[bad]), LIMITS).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
