//! `ebpf-net clusterip`: socket-level service load balancing on a cgroup. connect(), sendmsg(),
//! recvmsg() and getpeername() of the cgroup's processes see a service VIP while their sockets
//! talk to a backend; no packet is NATed.

use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapHandle, Program, ProgramAttachType};
use serde_json::{json, Value};

use crate::control::config::{self, ConfigFile, Item, RunOptions};
use crate::control::instance::Instance;
use crate::control::metrics;
use crate::control::run;
use crate::control::service::{self, Limits, Service, ServiceTables, SyncReport};
use crate::kernel::attach;
use crate::kernel::cgroup::{self, Cgroup};
use crate::kernel::maps;
use crate::kernel::netns;
use crate::kernel::pin::PinDir;
use crate::kernel::skel::sock_xlate::types::clusterip_stats;
use crate::kernel::skel::sock_xlate::{SockXlateSkel, SockXlateSkelBuilder};

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

// SAFETY: a plain C struct of integers from include/clusterip.h.
unsafe impl plain::Plain for clusterip_stats {}

#[derive(clap::Args, Debug)]
pub struct ClusteripArgs {
    /// cgroup v2 directory whose processes get the services, absolute or relative to the
    /// cgroup2 mount [default: the cgroup2 root, i.e. every process]
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// VIP:PORT=BACKEND:PORT[,BACKEND:PORT...], repeatable; TCP and UDP; IPv6 in brackets
    #[arg(long = "service", value_name = "VIP=BACKENDS")]
    pub services: Vec<String>,
    /// attach, pin under /sys/fs/bpf/ebpf-net/clusterip/, print ready and exit; run again to
    /// update the services in place
    #[arg(long)]
    pub persist: bool,
    #[command(flatten)]
    pub run: RunOptions,
}

/// What flags and config file say together.
struct Settings {
    cgroup: Option<Item>,
    services: Vec<Service>,
}

impl Settings {
    fn read(args: &ClusteripArgs) -> Result<Self> {
        let config = ConfigFile::load(args.run.config.as_deref())?;
        let section = config::section_of(config.as_ref(), |doc| &doc.clusterip, SUBCOMMAND)?;
        let cgroup = config::pick(
            args.cgroup.as_ref(),
            "--cgroup",
            config
                .as_ref()
                .zip(section)
                .map(|(c, s)| (c, &s.cgroup, "cgroup")),
        );
        let items = config::services(
            &args.services,
            config.as_ref(),
            section.map(|s| &s.service),
            SUBCOMMAND,
        )?;
        Ok(Self {
            cgroup,
            services: service::parse_service_items(&items, LIMITS)?,
        })
    }

    fn resolve_cgroup(&self) -> Result<Cgroup> {
        match &self.cgroup {
            Some(item) => Cgroup::resolve(Some(&item.text)).map_err(|err| item.fail(err)),
            None => Cgroup::resolve(None),
        }
    }
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

fn tables(skel: &SockXlateSkel<'_>) -> Result<ServiceTables> {
    Ok(ServiceTables::new(
        MapHandle::try_from(&skel.maps.clusterip_services)?,
        MapHandle::try_from(&skel.maps.clusterip_backends)?,
        MapHandle::try_from(&skel.maps.clusterip_stats)?,
    ))
}

fn sync(tables: &ServiceTables, services: &[Service]) -> Result<SyncReport> {
    // a backend is just its endpoint here
    service::sync_services(tables, services, |backend| Ok(service::endpoint_bytes(backend)))
}

/// Loads the programs with `services` installed, nothing attached yet.
fn load_with_services<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    services: &[Service],
) -> Result<SockXlateSkel<'obj>> {
    let skel = load(storage, None)?;
    sync(&tables(&skel)?, services)?;
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
    let pinned = pins.prog_ids();
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
    args.run.check(args.persist)?;
    let settings = Settings::read(args)?;
    let mut services = settings.services.clone();
    let cgroup = settings.resolve_cgroup()?;
    let pins = PinDir::new(SUBCOMMAND, netns::HOST_KEY, &cgroup.target());
    let _instance = Instance::claim(SUBCOMMAND, netns::HOST_KEY, &cgroup.target(), args.persist)?;
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
    let tables = tables(&skel)?;
    let metrics = metrics::serve(args.run.metrics.as_ref(), || metrics_source(&skel))?;
    let dir = cgroup.open()?;
    let links = programs(&skel)
        .into_iter()
        .map(|(prog, _)| attach::attach_cgroup(prog, dir.as_fd(), &cgroup.relative))
        .collect::<Result<Vec<Link>>>()?;
    let shutdown = run::Shutdown::install()?;
    if let Some(addr) = metrics {
        eprintln!("{SUBCOMMAND}: metrics at http://{addr}/metrics");
    }
    run::announce_ready(
        SUBCOMMAND,
        &format!("cgroup {}: {}", cgroup.relative, service::describe(&services)),
    );
    shutdown.serve(SUBCOMMAND, || {
        let new = Settings::read(args)?;
        let new_cgroup = new.resolve_cgroup()?;
        if new_cgroup.path != cgroup.path {
            bail!(
                "the cgroup changed ({} -> {}); that needs a restart",
                cgroup.relative,
                new_cgroup.relative
            );
        }
        let report = sync(&tables, &new.services)?;
        services = new.services;
        Ok(format!("{} ({report})", service::describe(&services)))
    });
    drop(links);
    let report = service_report(&tables)?;
    for entry in report.iter().take(20) {
        eprintln!("{SUBCOMMAND}: {}", service::summarize_service(entry, counters));
    }
    eprintln!("{SUBCOMMAND}: detached from cgroup {}", cgroup.relative);
    Ok(())
}

/// Metrics read at each scrape: connects and datagrams per backend and service, and the
/// socket calls translated.
fn metrics_source(skel: &SockXlateSkel<'_>) -> Result<metrics::Source> {
    let tables = tables(skel)?;
    Ok(Arc::new(move || {
        let report = service_report(&tables)?;
        let mut families = metrics::service_families(
            SUBCOMMAND,
            &report,
            &[
                (
                    "connects",
                    "connect() calls sent to the backend (TCP and connected UDP)",
                ),
                ("datagrams", "unconnected UDP sendmsg() calls sent to the backend"),
            ],
        );
        families.push(metrics::rewrites(
            SUBCOMMAND,
            &[
                ("connect", metrics::report_total(&report, "connects")),
                ("sendmsg", metrics::report_total(&report, "datagrams")),
            ],
        ));
        Ok(families)
    }))
}

fn persist(services: &[Service], cgroup: &Cgroup, pins: &PinDir) -> Result<()> {
    let fresh = !pins.exists();
    pins.create()?;
    let result = (|| -> Result<(bool, SyncReport)> {
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, Some(pins))?;
        // the tables are right before any (new) program runs
        let report = sync(&tables(&skel)?, services)?;
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

fn service_report(tables: &ServiceTables) -> Result<Vec<Value>> {
    service::service_report(tables, |bytes| {
        let stats: clusterip_stats = maps::from_bytes("clusterip counters", bytes)?;
        let mut fields = serde_json::Map::new();
        fields.insert("connects".into(), json!(stats.connects));
        fields.insert("datagrams".into(), json!(stats.datagrams));
        Ok(fields)
    })
}

fn counters(backend: &Value) -> String {
    format!(
        "{} connects, {} datagrams",
        backend["connects"], backend["datagrams"]
    )
}

/// What `status` shows of one persisted clusterip directory.
pub fn describe_persisted(pins: &PinDir) -> Result<Value> {
    let tables = ServiceTables::pinned(pins, [PIN_SERVICES, PIN_BACKENDS, PIN_STATS])?;
    Ok(json!({
        "cgroup": cgroup::decode_target(&pins.target),
        "services": service_report(&tables)?,
    }))
}

pub fn summarize(details: &Value) -> String {
    service::summarize_report(&details["services"], counters)
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
