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
use crate::kernel::maps::{self, as_bytes};
use crate::kernel::pin::{MapPin, PinDir};
use crate::kernel::skel::sock_xlate::types::{service_endpoint, service_range};

/// Longer than any program that read a service's old slot range before the swap can still
/// be running, before that range is written again in the same update.
const RANGE_REUSE_GRACE: Duration = Duration::from_millis(20);

// SAFETY: plain C structs of integers from include/service.h.
unsafe impl plain::Plain for service_endpoint {}
unsafe impl plain::Plain for service_range {}

crate::endpoint_conversions!(service_endpoint);

/// The bytes of a service endpoint, the start of every backend value.
pub fn endpoint_bytes(addr: SocketAddr) -> Vec<u8> {
    as_bytes(&service_endpoint::from(addr)).to_vec()
}

/// A backend of a service: where its packets go, and (xdp-lb) the MAC of its next hop when
/// given rather than looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: SocketAddr,
    pub mac: Option<[u8; 6]>,
}

impl Backend {
    /// `IP:PORT` or `IP:PORT@MAC`.
    pub fn parse(text: &str) -> Result<Self> {
        let (addr, mac) = match text.rsplit_once('@') {
            Some((addr, mac)) => {
                let mac = crate::kernel::neigh::parse_mac(mac.trim())
                    .with_context(|| format!("backend {}", addr.trim()))?;
                (addr, Some(mac))
            }
            None => (text, None),
        };
        Ok(Self {
            addr: parse_endpoint("backend", addr)?,
            mac,
        })
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.mac {
            Some(mac) => write!(f, "{}@{}", self.addr, crate::kernel::neigh::format_mac(&mac)),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// A service: TCP and UDP to `vip` go to one of `backends`. Made by the `--service` parser,
/// from a config file entry, or by a program; never printed to text and parsed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub vip: SocketAddr,
    pub backends: Vec<Backend>,
    /// where it came from, for error messages: `--service TEXT` or `FILE:LINE: service VIP`
    pub origin: String,
}

impl Service {
    /// A service after the checks every source gets: one address family, at least one
    /// backend, none twice, the VIP not its own backend. Errors do not say where it came from.
    pub fn new(vip: SocketAddr, backends: Vec<Backend>, origin: String) -> Result<Self> {
        if backends.is_empty() {
            bail!("no backends");
        }
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
            backends,
            origin,
        })
    }

    /// One service in the `--service` syntax: VIP:PORT=BACKEND:PORT[@MAC][,...].
    pub fn parse(text: &str) -> Result<Self> {
        let (vip, backends) = text
            .split_once('=')
            .context("expected VIP:PORT=BACKEND:PORT[,BACKEND:PORT...]")?;
        let vip = parse_endpoint("VIP", vip)?;
        if backends.trim().is_empty() {
            bail!("no backends");
        }
        let mut list = Vec::with_capacity(backends.matches(',').count() + 1);
        for backend in backends.split(',') {
            if backend.trim().is_empty() {
                bail!("empty backend in the list");
            }
            list.push(Backend::parse(backend)?);
        }
        Self::new(vip, list, format!("--service {text}"))
    }

    /// A `[[DATAPATH.service]]` entry of a config file; `origin` names its line.
    pub fn from_entry(vip: &str, backends: &[String], origin: String) -> Result<Self> {
        let vip = parse_endpoint("VIP", vip)?;
        let backends = backends
            .iter()
            .map(|backend| Backend::parse(backend))
            .collect::<Result<Vec<_>>>()?;
        Self::new(vip, backends, origin)
    }

    /// The backends' addresses, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.backends.iter().map(|backend| backend.addr).collect()
    }
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
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        anyhow::anyhow!("{what} '{text}' is not IP:PORT (IPv6 goes in brackets: [2001:db8::1]:80)")
    })?;
    if addr.port() == 0 {
        bail!("{what} '{text}' has port 0");
    }
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() || ip == std::net::Ipv4Addr::BROADCAST {
        bail!("{what} '{ip}' is not a unicast address other nodes can reach");
    }
    Ok(addr)
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
    let mut vips: HashMap<SocketAddr, &str> = HashMap::new();
    let mut macs: HashMap<SocketAddr, [u8; 6]> = HashMap::new();
    let mut total = 0;
    for service in &services {
        let fail = |problem: String| anyhow::anyhow!("{}: {problem}", service.origin);
        if let Some(first) = vips.insert(service.vip, &service.origin) {
            return Err(fail(format!(
                "VIP {} is given twice (also at {first})",
                service.vip
            )));
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
            let backends: Vec<String> = service.backends.iter().map(|b| b.addr.to_string()).collect();
            format!("{} -> {}", service.vip, backends.join(", "))
        })
        .collect();
    if services.len() > SHOWN {
        parts.push(format!("and {} more services", services.len() - SHOWN));
    }
    parts.join("; ")
}

/// The tables of include/service.h in one datapath's maps, from a fresh skeleton or pins:
/// VIP:PORT -> slot range, slot -> backend (a struct that starts with its endpoint), and
/// slot -> counters.
pub struct ServiceTables {
    pub services: MapHandle,
    pub backends: MapHandle,
    pub stats: MapHandle,
    /// entries of the backend and counter arrays
    pub slots: u32,
}

impl ServiceTables {
    pub fn new(services: MapHandle, backends: MapHandle, stats: MapHandle) -> Self {
        let slots = backends.max_entries();
        Self {
            services,
            backends,
            stats,
            slots,
        }
    }

    /// The tables pinned in `pins`: services, backends, counters.
    pub fn pinned(pins: &PinDir, specs: [MapPin; 3]) -> Result<Self> {
        Ok(Self::new(
            pins.open_map(&specs[0])?,
            pins.open_map(&specs[1])?,
            pins.open_map(&specs[2])?,
        ))
    }
}

/// A service as the tables hold it: slots [base, base + backends.len()).
#[derive(Debug, Clone)]
struct Installed {
    base: u32,
    backends: Vec<SocketAddr>,
}

fn read_installed(tables: &ServiceTables) -> Result<BTreeMap<SocketAddr, Installed>> {
    // by batches: 10,000 services and their 100,000 backend slots are a few system calls
    let mut ranges = Vec::new();
    for (key, value) in maps::read_all(&tables.services)?.iter() {
        let vip: service_endpoint = maps::from_bytes("service key", key)?;
        let range: service_range = maps::from_bytes("service range", value)?;
        ranges.push((SocketAddr::from(&vip), range));
    }
    let used = ranges
        .iter()
        .map(|(_, range)| range.base.saturating_add(range.count))
        .max()
        .unwrap_or(0)
        .min(tables.slots);
    let mut endpoints = Vec::with_capacity(used as usize);
    if used > 0 {
        for (_, bytes) in maps::read_first(&tables.backends, used as usize)?.iter() {
            if endpoints.len() as u32 >= used {
                break;
            }
            let endpoint = bytes
                .get(..size_of::<service_endpoint>())
                .context("a backend value shorter than an endpoint")?;
            let backend: service_endpoint = maps::from_bytes("backend", endpoint)?;
            endpoints.push(SocketAddr::from(&backend));
        }
    }
    let mut installed = BTreeMap::new();
    for (vip, range) in ranges {
        let end = range.base.saturating_add(range.count).min(endpoints.len() as u32);
        let backends = endpoints
            .get(range.base as usize..end as usize)
            .context("backend slot out of range")?
            .to_vec();
        installed.insert(
            vip,
            Installed {
                base: range.base,
                backends,
            },
        );
    }
    Ok(installed)
}

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

fn same_backends(a: &[SocketAddr], b: &[SocketAddr]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    a == b
}

/// Makes the tables hold exactly `services`, touching only what differs. A changed backend
/// list is written to free slots first and then swapped in with one update of the service's
/// value, so every connect sees either the old list or the new one and a VIP is never
/// missing; counters of backends that stay are carried over.
pub fn sync_services(
    tables: &ServiceTables,
    services: &[Service],
    backend_value: impl Fn(SocketAddr) -> Result<Vec<u8>>,
) -> Result<SyncReport> {
    sync_services_with(tables, services, backend_value, |_, _| Ok(()))
}

/// [`sync_services`], with `before_swap(service, base)` called once a changed service's
/// backends sit in their new slots and before the service points at them: a datapath's own
/// per-service tables (xdp-lb's Maglev ring) are right before a packet can use them.
pub fn sync_services_with(
    tables: &ServiceTables,
    services: &[Service],
    backend_value: impl Fn(SocketAddr) -> Result<Vec<u8>>,
    before_swap: impl Fn(&Service, u32) -> Result<()>,
) -> Result<SyncReport> {
    let installed = read_installed(tables)?;
    crate::control::run::phase("installed services read");
    let mut report = SyncReport::default();
    let mut allocator = SlotAllocator::new(
        tables.slots,
        installed
            .values()
            .map(|svc| (svc.base, svc.backends.len() as u32)),
    );
    let mut released = Vec::new();

    let wanted: BTreeMap<SocketAddr, &Service> = services.iter().map(|svc| (svc.vip, svc)).collect();
    // Removed services go last, once every added or changed one is in: an update stopped
    // midway never leaves fewer services than either the old state or the new one has.
    let mut removals: Vec<(SocketAddr, u32, u32)> = installed
        .iter()
        .filter(|(vip, _)| !wanted.contains_key(vip))
        .map(|(vip, old)| (*vip, old.base, old.backends.len() as u32))
        .collect();
    let remove = |removals: &mut Vec<(SocketAddr, u32, u32)>,
                  released: &mut Vec<(u32, u32)>,
                  report: &mut SyncReport|
     -> Result<()> {
        for (vip, base, len) in removals.drain(..) {
            let key = service_endpoint::from(vip);
            tables
                .services
                .delete(as_bytes(&key))
                .with_context(|| format!("removing service {vip}"))?;
            report.written.delete(&tables.services, as_bytes(&key))?;
            released.push((base, len));
            report.removed += 1;
        }
        Ok(())
    };

    let mut pending: Vec<&Service> = Vec::new();
    for service in services {
        match installed.get(&service.vip) {
            Some(old) if same_backends(&old.backends, &service.addrs()) => report.unchanged += 1,
            Some(_) => {
                report.changed += 1;
                pending.push(service);
            }
            None => {
                report.added += 1;
                pending.push(service);
            }
        }
    }

    while !pending.is_empty() {
        let mut placed = Vec::new();
        let mut deferred = Vec::new();
        for service in pending {
            match allocator.alloc(service.backends.len() as u32) {
                Some(base) => placed.push((service, base)),
                None => deferred.push(service),
            }
        }
        write_ranges(
            tables,
            &installed,
            &placed,
            &backend_value,
            &before_swap,
            &mut report.written,
        )?;
        for (service, _) in &placed {
            if let Some(old) = installed.get(&service.vip) {
                released.push((old.base, old.backends.len() as u32));
            }
        }
        if !deferred.is_empty() && placed.is_empty() && released.is_empty() && !removals.is_empty() {
            // no room left for the rest: the removed services' slots are needed now
            remove(&mut removals, &mut released, &mut report)?;
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
            // Slots of lists swapped out above are written again only after every connect
            // that may have read the old list is done.
            std::thread::sleep(RANGE_REUSE_GRACE);
            for (base, len) in released.drain(..) {
                allocator.release(base, len);
            }
        }
        pending = deferred;
    }
    remove(&mut removals, &mut released, &mut report)?;
    Ok(report)
}

/// Writes each placed service's backends and counters to its new slots, then points the
/// services at them (one batch per table).
fn write_ranges(
    tables: &ServiceTables,
    installed: &BTreeMap<SocketAddr, Installed>,
    placed: &[(&Service, u32)],
    backend_value: &impl Fn(SocketAddr) -> Result<Vec<u8>>,
    before_swap: &impl Fn(&Service, u32) -> Result<()>,
    written: &mut Written,
) -> Result<()> {
    if placed.is_empty() {
        return Ok(());
    }
    let mut slot_keys = Vec::new();
    let mut backend_values = Vec::new();
    let mut stats_values = Vec::new();
    let mut service_keys = Vec::new();
    let mut service_values = Vec::new();
    for (service, base) in placed {
        let old = installed.get(&service.vip);
        for (index, backend) in service.addrs().iter().enumerate() {
            let slot = base + index as u32;
            slot_keys.extend_from_slice(&slot.to_ne_bytes());
            backend_values.extend_from_slice(&backend_value(*backend)?);
            let old_slot =
                old.and_then(|old| Some(old.base + old.backends.iter().position(|b| b == backend)? as u32));
            let carried = match old_slot {
                Some(slot) => read_stats(tables, slot)?,
                None => vec![0u8; tables.stats.value_size() as usize],
            };
            stats_values.extend_from_slice(&carried);
        }
        service_keys.extend_from_slice(as_bytes(&service_endpoint::from(service.vip)));
        let range = service_range {
            base: *base,
            count: service.backends.len() as u32,
        };
        service_values.extend_from_slice(as_bytes(&range));
    }
    let slots = (slot_keys.len() / 4) as u32;
    tables
        .backends
        .update_batch(&slot_keys, &backend_values, slots, MapFlags::ANY, MapFlags::ANY)
        .context("writing backends")?;
    written.update(&tables.backends, &slot_keys, &backend_values)?;
    write_stats(tables, &slot_keys, &stats_values, slots).context("writing backend counters")?;
    for (service, base) in placed {
        before_swap(service, *base)?;
    }
    tables
        .services
        .update_batch(
            &service_keys,
            &service_values,
            placed.len() as u32,
            MapFlags::ANY,
            MapFlags::ANY,
        )
        .context("writing services")?;
    written.update(&tables.services, &service_keys, &service_values)?;
    Ok(())
}

/// The counters of a backend slot; a per-CPU table's summed over CPUs (every counter struct
/// of include/ is made of u64 words).
fn read_stats(tables: &ServiceTables, slot: u32) -> Result<Vec<u8>> {
    let size = tables.stats.value_size() as usize;
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
fn write_stats(tables: &ServiceTables, keys: &[u8], values: &[u8], slots: u32) -> Result<()> {
    if !tables.stats.map_type().is_percpu() {
        tables
            .stats
            .update_batch(keys, values, slots, MapFlags::ANY, MapFlags::ANY)?;
        return Ok(());
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
    pub counters: T,
}

/// One service as the tables hold it, with every backend's counters.
#[derive(Debug, Clone)]
pub struct ServiceReport<T> {
    pub vip: SocketAddr,
    pub backends: Vec<BackendReport<T>>,
}

impl<T: Counters> ServiceReport<T> {
    /// The sum of its backends' counters.
    pub fn totals(&self) -> T {
        T::sum(self.backends.iter().map(|backend| &backend.counters))
    }

    /// `{ "vip", "backends": [{ "backend", counters... }], "totals": {...} }`
    pub fn json(&self) -> Value {
        let backends: Vec<Value> = self
            .backends
            .iter()
            .map(|b| {
                let mut entry = b.counters.json();
                entry.insert("backend".into(), json!(b.backend.to_string()));
                Value::Object(entry)
            })
            .collect();
        json!({ "vip": self.vip.to_string(), "backends": backends, "totals": self.totals().json() })
    }

    /// "VIP -> backend (counters), ..."; `words` says a backend's counters.
    pub fn summary(&self, words: impl Fn(&T) -> String) -> String {
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|b| format!("{} ({})", b.backend, words(&b.counters)))
            .collect();
        format!("{} -> {}", self.vip, backends.join(", "))
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
/// summaries.
pub fn service_report<T: Counters>(tables: &ServiceTables) -> Result<Vec<ServiceReport<T>>> {
    let mut report = Vec::new();
    for (vip, installed) in read_installed(tables)? {
        let mut backends = Vec::new();
        for (index, backend) in installed.backends.iter().enumerate() {
            let bytes = read_stats(tables, installed.base + index as u32)?;
            backends.push(BackendReport {
                backend: *backend,
                counters: maps::from_bytes(T::C_STRUCT, &bytes)?,
            });
        }
        report.push(ServiceReport { vip, backends });
    }
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

    #[test]
    fn backend_order_does_not_make_a_change() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert!(same_backends(&[a, b], &[b, a]));
        assert!(!same_backends(&[a], &[a, b]));
    }
}
