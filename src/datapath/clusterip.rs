//! `ebpf-net clusterip`: socket-level service load balancing on a cgroup. connect(), sendmsg(),
//! recvmsg() and getpeername() of the cgroup's processes see a service VIP while their sockets
//! talk to a backend; no packet is NATed.

use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapHandle, Program, ProgramAttachType};
use serde_json::json;

use crate::control::config::{self, ClusteripSection, Item, RunOptions, Sources};
use crate::control::counters::{self, Counters};
use crate::control::lifecycle::{Applied, AttachedElsewhere, Datapath, Details, Report, Storage, Target};
use crate::control::metrics;
use crate::control::service::{self, Limits, Service, ServiceReport, ServiceTables, SyncReport};
use crate::kernel::attach;
use crate::kernel::cgroup::Cgroup;
use crate::kernel::pin::{MapPin, OnChange, PinDir, PinSet};
use crate::kernel::skel::sock_xlate::types::{clusterip_counters, clusterip_stats};
use crate::kernel::skel::sock_xlate::{SockXlateSkel, SockXlateSkelBuilder};
use crate::kernel::{maps, netns};

pub const SUBCOMMAND: &str = "clusterip";
/// Program names as the kernel reports them (at most 15 characters).
pub const PROGRAMS: &[&str] = &[
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
    macs: false,
};
const BACKEND_SLOTS: u32 = 131072;
const PIN_SERVICES: MapPin = MapPin {
    map: "clusterip_services",
    name: "services",
    // v2: keys by protocol, values with weights and affinity (include/service.h)
    version: 2,
    on_change: OnChange::Rebuild,
};
const PIN_BACKENDS: MapPin = MapPin {
    map: "clusterip_backends",
    name: "backends",
    version: 1,
    on_change: OnChange::Rebuild,
};
const PIN_REVERSE: MapPin = MapPin {
    map: "clusterip_reverse",
    name: "reverse",
    version: 1,
    on_change: OnChange::Copy {
        setting: "the UDP reply table",
    },
};
const PIN_STATS: MapPin = MapPin {
    map: "clusterip_stats",
    name: "stats",
    version: 1,
    on_change: OnChange::Rebuild,
};

const PIN_WEIGHTS: MapPin = MapPin {
    map: "clusterip_weights",
    name: "weights",
    version: 1,
    on_change: OnChange::Rebuild,
};
const PIN_AFFINITY: MapPin = MapPin {
    map: "clusterip_affinity",
    name: "affinity",
    version: 1,
    on_change: OnChange::Rebuild,
};
const PIN_COUNTERS: MapPin = MapPin {
    map: "clusterip_counters",
    name: "counters",
    version: 1,
    on_change: OnChange::Rebuild,
};

crate::declare_counters!(
    clusterip_counters,
    "clusterip_counters",
    [(
        refused,
        Event,
        "connect() or sendmsg() to a service without a usable backend, refused"
    ),]
);

crate::declare_counters!(
    clusterip_stats,
    "clusterip_stats",
    [
        (
            connects,
            Traffic,
            "connect() calls sent to the backend (TCP and connected UDP)"
        ),
        (
            datagrams,
            Traffic,
            "unconnected UDP sendmsg() calls sent to the backend"
        ),
    ]
);

#[derive(clap::Args, Debug)]
pub struct ClusteripArgs {
    /// cgroup v2 directory whose processes get the services, absolute or relative to the
    /// cgroup2 mount [default: the cgroup2 root, i.e. every process]
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// VIP:PORT=BACKEND:PORT[,BACKEND:PORT...], repeatable; TCP and UDP; IPv6 in brackets
    #[arg(long = "service", value_name = "VIP=BACKENDS", value_parser = service::service_flag)]
    pub services: Vec<Service>,
    /// attach, pin under /sys/fs/bpf/ebpf-net/clusterip/, print ready and exit; run again to
    /// update the services in place
    #[arg(long)]
    pub persist: bool,
    #[command(flatten)]
    pub run: RunOptions,
}

crate::run_args!(ClusteripArgs);

/// What flags and config file say together.
pub struct Settings {
    cgroup: Option<Item>,
    /// shared with the plan: 10,000 services are not copied for it
    services: Arc<Vec<Service>>,
}

impl Settings {
    fn read(args: &ClusteripArgs) -> Result<Self> {
        let file = Sources::<ClusteripSection>::read(&args.run)?;
        let in_file = file.config.as_ref().zip(file.section());
        Ok(Self {
            cgroup: config::pick(
                args.cgroup.as_ref(),
                "--cgroup",
                in_file.map(|(c, s)| (c, &s.cgroup, "cgroup")),
            ),
            services: Arc::new(file.services(&args.services, LIMITS)?),
        })
    }

    /// The settings of a program that drives clusterip (the Kubernetes agent): `services` on
    /// the cgroup `cgroup` (None: the root).
    pub fn driven(cgroup: Option<&str>, services: Vec<Service>) -> Result<Self> {
        Ok(Self {
            cgroup: cgroup.map(|path| Item::flags("--cgroup", &[path.to_string()]).remove(0)),
            services: Arc::new(service::check_services(services, LIMITS)?),
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
    pins: Option<&mut PinSet>,
) -> Result<SockXlateSkel<'obj>> {
    let mut open = SockXlateSkelBuilder::default()
        .open(storage)
        .context("opening the clusterip programs")?;
    if let Some(pins) = pins {
        pins.prepare(open.open_object_mut(), SUBCOMMAND, PINS)?;
    }
    open.load().context("loading the clusterip programs")
}

/// Loads the programs with `services` installed, nothing attached: for benchmarks.
pub fn load_with_services<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    services: &[Service],
) -> Result<SockXlateSkel<'obj>> {
    let skel = load(storage, None)?;
    sync(&tables(&skel)?, services)?;
    Ok(skel)
}

fn tables(skel: &SockXlateSkel<'_>) -> Result<ServiceTables> {
    Ok(ServiceTables::new(
        MapHandle::try_from(&skel.maps.clusterip_services)?,
        MapHandle::try_from(&skel.maps.clusterip_backends)?,
        MapHandle::try_from(&skel.maps.clusterip_weights)?,
        MapHandle::try_from(&skel.maps.clusterip_stats)?,
    ))
}

fn sync(tables: &ServiceTables, services: &[Service]) -> Result<SyncReport> {
    // a backend is just its endpoint here
    service::sync_services(tables, services, |_, backend, out| {
        service::endpoint_bytes(backend, out);
        Ok(())
    })
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
fn refuse_if_attached(cgroup: &Cgroup, pinned: &[u32]) -> Result<()> {
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

/// The clusterip datapath on the lifecycle.
pub struct Clusterip;

/// What a clusterip run works from: the services, and the cgroup whose processes' connected
/// UDP sockets go when their backend does.
pub struct Plan {
    services: Arc<Vec<Service>>,
    cgroup: Cgroup,
}

/// Destroys the connected UDP sockets clusterip gave a backend in `gone`, in every network
/// namespace of the cgroup's processes (bpf/sock_destroy.c): their owners see ECONNABORTED
/// and connect again through the VIP. Says what it did, or why it could not, in a log line;
/// never fails the update, which is in the maps already.
fn destroy_gone_udp(
    skel: &SockXlateSkel<'_>,
    gone: &[(std::net::SocketAddr, std::net::SocketAddr)],
    cgroup: &Cgroup,
) -> Option<String> {
    use crate::kernel::skel::sock_destroy::SockDestroySkelBuilder;
    use libbpf_rs::MapCore;
    let udp_gone: std::collections::HashSet<_> = gone.iter().map(|(_, backend)| backend).collect();
    let udp_gone = udp_gone.len();
    let result = (|| -> Result<u64> {
        let mut storage = MaybeUninit::uninit();
        let mut open = SockDestroySkelBuilder::default().open(&mut storage)?;
        open.maps
            .clusterip_reverse
            .reuse_fd(skel.maps.clusterip_reverse.as_fd())?;
        let destroyer = open
            .load()
            .context("loading the socket iterator (bpf_sock_destroy needs Linux 6.5)")?;
        let room = destroyer.maps.clusterip_gone.max_entries() as usize;
        for (vip, backend) in gone.iter().take(room) {
            // as the reply table has them: VIP then backend, neither with a protocol
            let mut key = Vec::with_capacity(40);
            service::endpoint_bytes(*vip, &mut key);
            service::endpoint_bytes(*backend, &mut key);
            destroyer
                .maps
                .clusterip_gone
                .update(&key, &[1], libbpf_rs::MapFlags::ANY)?;
        }
        let link = destroyer.progs.cip_udp_gone.attach()?;
        for netns in namespaces_of(cgroup) {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| -> Result<()> {
                        let file = std::fs::File::open(&netns)?;
                        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                        let mut iter = libbpf_rs::Iter::new(&link)?;
                        std::io::copy(&mut iter, &mut std::io::sink())?;
                        Ok(())
                    })
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the socket iterator's thread failed")))
            })
            .with_context(|| format!("iterating the UDP sockets of {}", netns.display()))?;
        }
        Ok(destroyer.maps.bss_data.as_deref().map_or(0, |bss| bss.destroyed))
    })();
    match result {
        Ok(0) => None,
        Ok(destroyed) => Some(format!(
            "destroyed {destroyed} connected UDP sockets of {udp_gone} backends that left their services (their owners connect again)"
        )),
        Err(err) => Some(format!(
            "connected UDP sockets of backends that left their services stay: {err:#}"
        )),
    }
}

/// One `/proc/PID/ns/net` per network namespace the processes of `cgroup` (and its
/// descendants) are in.
fn namespaces_of(cgroup: &Cgroup) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    for dir in cgroup.walk() {
        let Ok(procs) = std::fs::read_to_string(dir.path.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.split_whitespace() {
            let path = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Ok(meta) = std::fs::metadata(&path) {
                if seen.insert((meta.dev(), meta.ino())) {
                    found.push(path);
                }
            }
        }
    }
    found
}

/// Every map pinned with `--persist`.
const PINS: &[MapPin] = &[
    PIN_SERVICES,
    PIN_BACKENDS,
    PIN_WEIGHTS,
    PIN_REVERSE,
    PIN_STATS,
    PIN_AFFINITY,
    PIN_COUNTERS,
];

/// The maps a report reads.
pub struct View {
    tables: ServiceTables,
    counters: MapHandle,
}

impl Datapath for Clusterip {
    const NAME: &'static str = SUBCOMMAND;
    const PROGRAMS: &'static [&'static str] = PROGRAMS;
    type Args = ClusteripArgs;
    type Desired = Settings;
    type Plan = Plan;
    type Loaded<'obj> = SockXlateSkel<'obj>;
    type View = View;

    fn desired(args: &ClusteripArgs) -> Result<Settings> {
        Settings::read(args)
    }
    fn netns_key(_netns_key: &str) -> String {
        // cgroup hooks serve their processes in every network namespace
        netns::HOST_KEY.to_string()
    }
    fn target(desired: &Settings) -> Result<Target> {
        Ok(Target::Cgroup(desired.resolve_cgroup()?))
    }
    fn refuse_if_attached(target: &Target, pinned: &[u32]) -> Result<()> {
        refuse_if_attached(target.cgroup(), pinned)
    }
    fn plan(desired: &Settings, target: &Target, _persist: bool) -> Result<Plan> {
        Ok(Plan {
            services: Arc::clone(&desired.services),
            cgroup: target.cgroup().clone(),
        })
    }
    fn load<'obj>(
        storage: &'obj mut Storage,
        _plan: &Plan,
        pins: Option<&mut PinSet>,
    ) -> Result<SockXlateSkel<'obj>> {
        load(&mut storage[0], pins)
    }
    fn apply(skel: &SockXlateSkel<'_>, plan: &Plan) -> Result<Applied> {
        let report = sync(&tables(skel)?, &plan.services)?;
        let mut log = Vec::new();
        if !report.gone.is_empty() {
            log.extend(destroy_gone_udp(skel, &report.gone, &plan.cgroup));
        }
        Ok(Applied {
            log,
            ..Applied::synced(report)
        })
    }
    fn attach(
        loaded: &SockXlateSkel<'_>,
        target: &Target,
        _plan: &Plan,
    ) -> Result<Vec<Box<dyn std::any::Any>>> {
        let cgroup = target.cgroup();
        let dir = cgroup.open()?;
        let mut links: Vec<Box<dyn std::any::Any>> = Vec::new();
        for (prog, _) in programs(loaded) {
            links.push(Box::new(attach::attach_cgroup(
                prog,
                dir.as_fd(),
                &cgroup.relative,
            )?));
        }
        Ok(links)
    }
    fn attach_pinned(
        loaded: &SockXlateSkel<'_>,
        target: &Target,
        pins: &PinDir,
        _plan: &Plan,
    ) -> Result<bool> {
        let cgroup = target.cgroup();
        let dir = cgroup.open()?;
        let mut updated = false;
        for (prog, name) in programs(loaded) {
            let path = pins.file(&format!("link_{name}"));
            if attach::update_pinned(prog, &path)? {
                updated = true;
            } else {
                let mut link = attach::attach_cgroup(prog, dir.as_fd(), &cgroup.relative)?;
                link.pin(&path)
                    .with_context(|| format!("pinning link at {}", path.display()))?;
            }
        }
        Ok(updated)
    }
    fn desired_maps() -> &'static [MapPin] {
        &[PIN_SERVICES, PIN_BACKENDS, PIN_WEIGHTS]
    }
    fn objects<'a>(loaded: &'a SockXlateSkel<'_>) -> Vec<(&'a libbpf_rs::Object, &'static [MapPin])> {
        vec![(loaded.object(), PINS)]
    }
    fn check_reload(old: &Settings, new: &Settings) -> Result<()> {
        let (old, new) = (old.resolve_cgroup()?, new.resolve_cgroup()?);
        if new.path != old.path {
            bail!(
                "the cgroup changed ({} -> {}); that needs a restart",
                old.relative,
                new.relative
            );
        }
        Ok(())
    }
    fn describe(desired: &Settings, _target: &Target, _plan: &Plan) -> String {
        service::describe(&desired.services)
    }
    fn view(loaded: &SockXlateSkel<'_>) -> Result<View> {
        Ok(View {
            tables: tables(loaded)?,
            counters: MapHandle::try_from(&loaded.maps.clusterip_counters)?,
        })
    }
    fn view_pinned(pins: &PinDir) -> Result<View> {
        Ok(View {
            tables: ServiceTables::pinned(pins, [PIN_SERVICES, PIN_BACKENDS, PIN_WEIGHTS, PIN_STATS])?,
            counters: pins.open_map(&PIN_COUNTERS)?,
        })
    }
    fn report(view: &View) -> Result<Report> {
        let services: Vec<ServiceReport<clusterip_stats>> = service::service_report(&view.tables)?;
        let mut families = counters::service_families(SUBCOMMAND, &services);
        families.extend(crate::control::health::families(SUBCOMMAND));
        let totals = service::grand_total(&services);
        families.push(metrics::rewrites(
            SUBCOMMAND,
            &[("connect", totals.connects), ("sendmsg", totals.datagrams)],
        ));
        let events: clusterip_counters = maps::sum_percpu_counters(&view.counters, 0)?;
        families.extend(counters::event_families(SUBCOMMAND, &events));
        let mut exit: Vec<String> = services
            .iter()
            .take(20)
            .map(|service| service.summary(backend_words))
            .collect();
        if events.refused > 0 {
            exit.push(format!(
                "{} connects and datagrams refused: their service had no usable backend",
                events.refused
            ));
        }
        Ok(Report {
            on_detach: None,
            summary: format!(
                "{}; refused {}",
                service::summarize_report(&services, backend_words),
                events.refused
            ),
            families,
            exit,
            details: Details::later(move || {
                json!({
                    "services": services.iter().map(ServiceReport::json).collect::<Vec<_>>(),
                    "health": crate::control::health::snapshot(),
                    "counters": events.json(),
                })
            }),
        })
    }
    fn attached_elsewhere() -> Vec<AttachedElsewhere> {
        attached()
            .into_iter()
            .map(|(cgroup, program, prog_id)| AttachedElsewhere {
                cgroup,
                // the connect4 program stands for all eight
                hook: "cgroup/connect4 (+7 more)",
                program,
                prog_id,
            })
            .collect()
    }
}

fn backend_words(stats: &clusterip_stats) -> String {
    format!("{} connects, {} datagrams", stats.connects, stats.datagrams)
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
