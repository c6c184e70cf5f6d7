//! `ebpf-net clusterip`: socket-level service load balancing on a cgroup. connect(), sendmsg(),
//! recvmsg() and getpeername() of the cgroup's processes see a service VIP while their sockets
//! talk to a backend; no packet is NATed.

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, Program, ProgramAttachType};
use serde_json::{json, Value};

use crate::attach::{self, PinnedLink};
use crate::cgroup::{self, Cgroup};
use crate::maps::{self, as_bytes};
use crate::netns;
use crate::pin::PinDir;
use crate::run;
use crate::service::{self, Limits, Service};
use crate::skel::sock_xlate::types::{clusterip_endpoint, clusterip_service, clusterip_stats};
use crate::skel::sock_xlate::{SockXlateSkel, SockXlateSkelBuilder};

pub const SUBCOMMAND: &str = "clusterip";
/// Program names as the kernel reports them (at most 15 characters).
pub const PROGRAMS: [&str; 8] = [
    "cip_connect4",
    "cip_connect6",
    "cip_sendmsg4",
    "cip_sendmsg6",
    "cip_recvmsg4",
    "cip_recvmsg6",
    "cip_getpeer4",
    "cip_getpeer6",
];
/// include/clusterip.h
pub const LIMITS: Limits = Limits {
    services: 65536,
    backends_per_service: 16384,
    backends: BACKEND_SLOTS as usize,
};
const BACKEND_SLOTS: u32 = 131072;
const PIN_SERVICES: &str = "services";
const PIN_BACKENDS: &str = "backends";
const PIN_REVERSE: &str = "reverse";
const PIN_STATS: &str = "stats";
/// Longer than any program that read a service's old slot range before the swap can still
/// be running, before that range is written again in the same update.
const RANGE_REUSE_GRACE: Duration = Duration::from_millis(20);

// SAFETY: plain C structs of integers from include/clusterip.h.
unsafe impl plain::Plain for clusterip_endpoint {}
unsafe impl plain::Plain for clusterip_service {}
unsafe impl plain::Plain for clusterip_stats {}

crate::endpoint_conversions!(clusterip_endpoint);

#[derive(clap::Args, Debug)]
pub struct ClusteripArgs {
    /// cgroup v2 directory whose processes get the services, absolute or relative to the
    /// cgroup2 mount [default: the cgroup2 root, i.e. every process]
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// VIP:PORT=BACKEND:PORT[,BACKEND:PORT...], repeatable; TCP and UDP; IPv6 in brackets
    #[arg(long = "service", value_name = "VIP=BACKENDS", required = true)]
    pub services: Vec<String>,
    /// attach, pin under /sys/fs/bpf/ebpf-net/clusterip/, print ready and exit; run again to
    /// update the services in place
    #[arg(long)]
    pub persist: bool,
}

/// The four tables, from a fresh skeleton or from pins.
pub struct Tables {
    pub services: MapHandle,
    pub backends: MapHandle,
    pub stats: MapHandle,
}

impl Tables {
    pub fn of(skel: &SockXlateSkel<'_>) -> Result<Self> {
        Ok(Self {
            services: MapHandle::try_from(&skel.maps.clusterip_services)?,
            backends: MapHandle::try_from(&skel.maps.clusterip_backends)?,
            stats: MapHandle::try_from(&skel.maps.clusterip_stats)?,
        })
    }

    fn pinned(pins: &PinDir) -> Result<Self> {
        let open = |name| {
            let path = pins.file(name);
            MapHandle::from_pinned_path(&path).with_context(|| format!("opening {}", path.display()))
        };
        Ok(Self {
            services: open(PIN_SERVICES)?,
            backends: open(PIN_BACKENDS)?,
            stats: open(PIN_STATS)?,
        })
    }
}

/// A service as the tables hold it: slots [base, base + backends.len()).
#[derive(Debug, Clone)]
struct Installed {
    base: u32,
    backends: Vec<SocketAddr>,
}

fn read_installed(tables: &Tables) -> Result<BTreeMap<SocketAddr, Installed>> {
    let mut installed = BTreeMap::new();
    for key in tables.services.keys() {
        let Some(value) = tables.services.lookup(&key, MapFlags::ANY)? else {
            continue;
        };
        let vip: clusterip_endpoint = maps::from_bytes("clusterip service key", &key)?;
        let range: clusterip_service = maps::from_bytes("clusterip service", &value)?;
        let mut backends = Vec::with_capacity(range.count as usize);
        for slot in range.base..range.base.saturating_add(range.count).min(BACKEND_SLOTS) {
            let bytes = tables
                .backends
                .lookup(&slot.to_ne_bytes(), MapFlags::ANY)?
                .context("backend slot out of range")?;
            let backend: clusterip_endpoint = maps::from_bytes("clusterip backend", &bytes)?;
            backends.push(SocketAddr::from(&backend));
        }
        installed.insert(
            SocketAddr::from(&vip),
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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
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
pub fn sync_services(tables: &Tables, services: &[Service]) -> Result<SyncReport> {
    let installed = read_installed(tables)?;
    let mut report = SyncReport::default();
    let mut allocator = SlotAllocator::new(
        BACKEND_SLOTS,
        installed
            .values()
            .map(|svc| (svc.base, svc.backends.len() as u32)),
    );
    let mut released = Vec::new();

    let wanted: BTreeMap<SocketAddr, &Service> = services.iter().map(|svc| (svc.vip, svc)).collect();
    for (vip, old) in &installed {
        if !wanted.contains_key(vip) {
            tables
                .services
                .delete(as_bytes(&clusterip_endpoint::from(*vip)))
                .with_context(|| format!("removing service {vip}"))?;
            released.push((old.base, old.backends.len() as u32));
            report.removed += 1;
        }
    }

    let mut pending: Vec<&Service> = Vec::new();
    for service in services {
        match installed.get(&service.vip) {
            Some(old) if same_backends(&old.backends, &service.backends) => report.unchanged += 1,
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
        write_ranges(tables, &installed, &placed)?;
        for (service, _) in &placed {
            if let Some(old) = installed.get(&service.vip) {
                released.push((old.base, old.backends.len() as u32));
            }
        }
        if !deferred.is_empty() && placed.is_empty() && released.is_empty() {
            bail!(
                "the backend table is full: {} more slots needed, {} of {BACKEND_SLOTS} free",
                deferred.iter().map(|svc| svc.backends.len()).sum::<usize>(),
                allocator.free()
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
    Ok(report)
}

/// Writes each placed service's backends and counters to its new slots, then points the
/// services at them (one batch per table).
fn write_ranges(
    tables: &Tables,
    installed: &BTreeMap<SocketAddr, Installed>,
    placed: &[(&Service, u32)],
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
        for (index, backend) in service.backends.iter().enumerate() {
            let slot = base + index as u32;
            slot_keys.extend_from_slice(&slot.to_ne_bytes());
            backend_values.extend_from_slice(as_bytes(&clusterip_endpoint::from(*backend)));
            let carried = old
                .and_then(|old| {
                    let at = old.backends.iter().position(|b| b == backend)?;
                    tables
                        .stats
                        .lookup(&(old.base + at as u32).to_ne_bytes(), MapFlags::ANY)
                        .ok()?
                })
                .unwrap_or_else(|| vec![0u8; size_of::<clusterip_stats>()]);
            stats_values.extend_from_slice(&carried);
        }
        service_keys.extend_from_slice(as_bytes(&clusterip_endpoint::from(service.vip)));
        let range = clusterip_service {
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
    tables
        .stats
        .update_batch(&slot_keys, &stats_values, slots, MapFlags::ANY, MapFlags::ANY)
        .context("writing backend counters")?;
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
    Ok(())
}

fn load<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    pins: Option<&PinDir>,
) -> Result<SockXlateSkel<'obj>> {
    let mut open = SockXlateSkelBuilder::default()
        .open(storage)
        .context("opening the clusterip programs")?;
    if let Some(pins) = pins {
        // libbpf reuses these when pinned already: a re-run updates the live tables
        open.maps
            .clusterip_services
            .set_pin_path(pins.file(PIN_SERVICES))?;
        open.maps
            .clusterip_backends
            .set_pin_path(pins.file(PIN_BACKENDS))?;
        open.maps.clusterip_reverse.set_pin_path(pins.file(PIN_REVERSE))?;
        open.maps.clusterip_stats.set_pin_path(pins.file(PIN_STATS))?;
    }
    open.load().context("loading the clusterip programs")
}

/// Loads the programs with `services` installed, nothing attached; for tests and benchmarks.
pub fn load_with_services<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    services: &[Service],
) -> Result<SockXlateSkel<'obj>> {
    let skel = load(storage, None)?;
    sync_services(&Tables::of(&skel)?, services)?;
    Ok(skel)
}

/// Every program with the name its link is pinned under.
fn programs<'a>(skel: &'a SockXlateSkel<'_>) -> [(&'a Program<'a>, &'static str); 8] {
    let progs = &skel.progs;
    [
        (&progs.cip_connect4, "connect4"),
        (&progs.cip_connect6, "connect6"),
        (&progs.cip_sendmsg4, "sendmsg4"),
        (&progs.cip_sendmsg6, "sendmsg6"),
        (&progs.cip_recvmsg4, "recvmsg4"),
        (&progs.cip_recvmsg6, "recvmsg6"),
        (&progs.cip_getpeer4, "getpeername4"),
        (&progs.cip_getpeer6, "getpeername6"),
    ]
}

/// Refuses when another clusterip (not the one pinned in `pins`) is on the cgroup already.
fn refuse_if_attached(cgroup: &Cgroup, pins: &PinDir) -> Result<()> {
    let pinned = PinnedLink::prog_ids(pins);
    let dir = cgroup.open()?;
    for prog in attach::cgroup_programs(dir.as_fd(), ProgramAttachType::CgroupInet4Connect)? {
        if PROGRAMS.contains(&prog.name.as_str()) && !pinned.contains(&prog.id) {
            bail!(
                "another ebpf-net clusterip is already attached to cgroup {} (program {}); stop it first",
                cgroup.relative,
                prog.id
            );
        }
    }
    Ok(())
}

pub fn run(args: &ClusteripArgs) -> Result<()> {
    let services = service::parse_services(&args.services, LIMITS)?;
    let cgroup = Cgroup::resolve(args.cgroup.as_deref())?;
    let pins = PinDir::new(SUBCOMMAND, netns::HOST_KEY, &cgroup.target());
    refuse_if_attached(&cgroup, &pins)?;
    if args.persist {
        return persist(&services, &cgroup, &pins);
    }
    if pins.exists() {
        bail!(
            "clusterip is persisted on cgroup {} (see `ebpf-net status`); run `ebpf-net down clusterip --cgroup {}` first",
            cgroup.relative,
            cgroup.path.display()
        );
    }
    let mut object = MaybeUninit::uninit();
    let skel = load_with_services(&mut object, &services)?;
    let dir = cgroup.open()?;
    let links = programs(&skel)
        .into_iter()
        .map(|(prog, _)| attach::attach_cgroup(prog, dir.as_fd(), &cgroup.relative))
        .collect::<Result<Vec<Link>>>()?;
    let shutdown = run::Shutdown::install()?;
    run::announce_ready(
        SUBCOMMAND,
        &format!("cgroup {}: {}", cgroup.relative, service::describe(&services)),
    );
    shutdown.wait();
    drop(links);
    let report = service_report(&Tables::of(&skel)?)?;
    for entry in report.iter().take(20) {
        eprintln!("{SUBCOMMAND}: {}", summarize_service(entry));
    }
    eprintln!("{SUBCOMMAND}: detached from cgroup {}", cgroup.relative);
    Ok(())
}

fn persist(services: &[Service], cgroup: &Cgroup, pins: &PinDir) -> Result<()> {
    let fresh = !pins.exists();
    pins.create()?;
    let result = (|| -> Result<(bool, SyncReport)> {
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, Some(pins))?;
        // the tables are right before any (new) program runs
        let report = sync_services(&Tables::of(&skel)?, services)?;
        let dir = cgroup.open()?;
        let mut updated = false;
        for (prog, name) in programs(&skel) {
            let path = pins.file(&format!("link_{name}"));
            if attach::update_pinned(prog, &path)? {
                updated = true;
            } else {
                let mut link = attach::attach_cgroup(prog, dir.as_fd(), &cgroup.relative)?;
                link.pin(&path)
                    .with_context(|| format!("pinning link at {}", path.display()))?;
            }
        }
        Ok((updated, report))
    })();
    if result.is_err() && fresh {
        let _ = pins.remove();
    }
    let (updated, report) = result?;
    let verb = if updated { "updated in place" } else { "pinned" };
    run::announce_ready(
        SUBCOMMAND,
        &format!(
            "{verb}: cgroup {}: {} ({report})",
            cgroup.relative,
            service::describe(services)
        ),
    );
    Ok(())
}

/// Every service with its backends and their counters, for `status` and the exit summary.
fn service_report(tables: &Tables) -> Result<Vec<Value>> {
    let mut report = Vec::new();
    for (vip, installed) in read_installed(tables)? {
        let mut backends = Vec::new();
        for (index, backend) in installed.backends.iter().enumerate() {
            let slot = installed.base + index as u32;
            let stats: clusterip_stats = match tables.stats.lookup(&slot.to_ne_bytes(), MapFlags::ANY)? {
                Some(bytes) => maps::from_bytes("clusterip counters", &bytes)?,
                None => clusterip_stats::default(),
            };
            backends.push(json!({
                "backend": backend.to_string(),
                "connects": stats.connects,
                "datagrams": stats.datagrams,
            }));
        }
        report.push(json!({ "vip": vip.to_string(), "backends": backends }));
    }
    Ok(report)
}

fn summarize_service(service: &Value) -> String {
    let backends: Vec<String> = service["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            format!(
                "{} ({} connects, {} datagrams)",
                b["backend"].as_str().unwrap_or("?"),
                b["connects"],
                b["datagrams"]
            )
        })
        .collect();
    format!(
        "{} -> {}",
        service["vip"].as_str().unwrap_or("?"),
        backends.join(", ")
    )
}

/// What `status` shows of one persisted clusterip directory.
pub fn describe_persisted(pins: &PinDir) -> Result<Value> {
    let tables = Tables::pinned(pins)?;
    Ok(json!({
        "cgroup": cgroup::decode_target(&pins.target),
        "services": service_report(&tables)?,
    }))
}

pub fn summarize(details: &Value) -> String {
    const SHOWN: usize = 10;
    let services = details["services"].as_array().cloned().unwrap_or_default();
    let mut parts: Vec<String> = services.iter().take(SHOWN).map(summarize_service).collect();
    if services.len() > SHOWN {
        parts.push(format!("and {} more (see --json)", services.len() - SHOWN));
    }
    format!("{} services; {}", services.len(), parts.join("; "))
}

/// The clusterip programs attached anywhere in the cgroup hierarchy, as (cgroup, program
/// name, program id), for `status`.
pub fn attached() -> Vec<(String, String, u32)> {
    let Ok(root) = Cgroup::root() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for cgroup in root.walk() {
        let Ok(dir) = cgroup.open() else { continue };
        for prog in
            attach::cgroup_programs(dir.as_fd(), ProgramAttachType::CgroupInet4Connect).unwrap_or_default()
        {
            if PROGRAMS.contains(&prog.name.as_str()) {
                found.push((cgroup.relative.clone(), prog.name, prog.id));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

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
