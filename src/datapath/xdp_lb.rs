//! `ebpf-net xdp-lb`: a one-arm full-NAT L4 load balancer in XDP. Clients, this node and the
//! backends share a link; a packet to a service VIP:PORT leaves the interface it came in on
//! towards a backend picked by Maglev hashing, from this node's address and a port of its
//! own, and the backend's reply is rewritten back to the client.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBufferBuilder};
use serde_json::json;

use crate::control::config::{Item, RunOptions, Sources, XdpLbSection};
use crate::control::counters::{self, Counters};
use crate::control::lifecycle::{Applied, Datapath, Details, Report, Storage, Target};
use crate::control::metrics;
use crate::control::run::{self, Shutdown};
use crate::control::service::{self, Limits, Service, ServiceReport, ServiceTables, SyncReport};
use crate::datapath::maglev;
use crate::kernel::addr::{ip_from_words, ip_to_words, Interface};
use crate::kernel::attach::{self, XdpAttachment, XdpMode};
use crate::kernel::maps::{self, as_bytes};
use crate::kernel::neigh;
use crate::kernel::pin::{Earlier, MapPin, OnChange, PinDir, PinSet};
use crate::kernel::skel::xdp_lb::types::{
    service_endpoint, xdp_lb_backend, xdp_lb_counters, xdp_lb_event, xdp_lb_flow, xdp_lb_reply, xdp_lb_stats,
    xdp_lb_tuple, xdp_lb_tuple4,
};
use crate::kernel::skel::xdp_lb::{XdpLbSkel, XdpLbSkelBuilder};

pub const SUBCOMMAND: &str = "xdp-lb";
/// xdp_lb, or xdp_lb_compat on a kernel without bpf_loop (before 5.17).
pub const PROGRAMS: &[&str] = &["xdp_lb", "xdp_lb_compat"];
/// Set to 1, loads xdp_lb_compat whatever the kernel has (tests run it on a new kernel).
pub const COMPAT_ENV: &str = "EBPF_NET_XDP_LB_COMPAT";

/// Whether this kernel needs xdp_lb_compat: no bpf_loop helper for XDP (before 5.17).
pub fn needs_compat() -> bool {
    if std::env::var_os(COMPAT_ENV).is_some_and(|value| value == "1") {
        return true;
    }
    // SAFETY: a plain probe; no options.
    let has_loop = unsafe {
        libbpf_sys::libbpf_probe_bpf_helper(
            libbpf_sys::BPF_PROG_TYPE_XDP,
            libbpf_sys::BPF_FUNC_loop,
            std::ptr::null(),
        )
    };
    has_loop != 1
}

/// The program of a load: xdp_lb, or xdp_lb_compat where [`needs_compat`] chose it.
pub fn program<'a>(skel: &'a XdpLbSkel<'_>) -> &'a libbpf_rs::ProgramMut<'a> {
    if skel.progs.xdp_lb.autoload() {
        &skel.progs.xdp_lb
    } else {
        &skel.progs.xdp_lb_compat
    }
}
/// include/xdp_lb.h
pub const LIMITS: Limits = Limits {
    services: 65536,
    backends_per_service: 4096,
    backends: 32768,
    macs: true,
};
const RING_PER_SLOT: u32 = 128;
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// include/xdp_lb.h XDP_LB_DEFAULT_FLOOD_RATE
pub const DEFAULT_FLOOD_RATE: u32 = 40_000;
const fn rebuilt(map: &'static str, name: &'static str) -> MapPin {
    MapPin {
        map,
        name,
        version: 1,
        on_change: OnChange::Rebuild,
    }
}
// v2: keys by protocol, values with weights and affinity (include/service.h)
const PIN_SERVICES: MapPin = MapPin {
    version: 2,
    ..rebuilt("xdp_lb_services", "services")
};
const PIN_WEIGHTS: MapPin = rebuilt("xdp_lb_weights", "weights");
const PIN_BACKENDS: MapPin = rebuilt("xdp_lb_backends", "backends");
const PIN_RINGS: MapPin = rebuilt("xdp_lb_rings", "rings");
const PIN_STATS: MapPin = MapPin {
    map: "xdp_lb_stats",
    name: "stats",
    version: 1,
    on_change: OnChange::Rebuild,
};
/// Flows survive a change of --max-flows: copied into the new tables; and an upgrade from
/// the tables both families shared (flows_v2, reverse_v3): taken over by family.
// v2: plain hashes with a flow clock instead of LRUs; v3: IPv6 flows only (IPv4's: flows4)
const PIN_FLOWS: MapPin = MapPin {
    map: "xdp_lb_flows6",
    name: "flows",
    version: 3,
    on_change: OnChange::Split {
        setting: "--max-flows",
        earlier: Earlier {
            file: "flows_v2",
            convert: ipv6_entry,
        },
    },
};
const PIN_FLOWS4: MapPin = MapPin {
    map: "xdp_lb_flows4",
    name: "flows4",
    version: 1,
    on_change: OnChange::Split {
        setting: "--max-flows",
        earlier: Earlier {
            file: "flows_v2",
            convert: ipv4_entry,
        },
    },
};
// v3: values carry what a reply needs (struct xdp_lb_reply); v4: IPv6 only (IPv4's: reverse4)
const PIN_REVERSE: MapPin = MapPin {
    map: "xdp_lb_reverse6",
    name: "reverse",
    version: 4,
    on_change: OnChange::Split {
        setting: "--max-flows",
        earlier: Earlier {
            file: "reverse_v3",
            convert: ipv6_entry,
        },
    },
};
const PIN_REVERSE4: MapPin = MapPin {
    map: "xdp_lb_reverse4",
    name: "reverse4",
    version: 1,
    on_change: OnChange::Split {
        setting: "--max-flows",
        earlier: Earlier {
            file: "reverse_v3",
            convert: ipv4_entry,
        },
    },
};

/// An entry of a table both families shared (40-byte tuple keys; values as today's) as an
/// IPv4 table's: its key the tuple's 16 bytes (struct xdp_lb_tuple4).
fn ipv4_entry(key: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let tuple: xdp_lb_tuple = maps::from_bytes("flow key", key).ok()?;
    if i32::from(tuple.family) != libc::AF_INET {
        return None;
    }
    let key4 = xdp_lb_tuple4 {
        src: tuple.src[0],
        dst: tuple.dst[0],
        sport: tuple.sport,
        dport: tuple.dport,
        proto: tuple.proto,
        ..Default::default()
    };
    Some((as_bytes(&key4).to_vec(), value.to_vec()))
}

/// The same for an IPv6 table: the entry as it was.
fn ipv6_entry(key: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let tuple: xdp_lb_tuple = maps::from_bytes("flow key", key).ok()?;
    (i32::from(tuple.family) == libc::AF_INET6).then(|| (key.to_vec(), value.to_vec()))
}

const PIN_CLOCK: MapPin = MapPin {
    map: "xdp_lb_clock",
    name: "clock",
    version: 1,
    on_change: OnChange::Copy {
        setting: "--max-flows",
    },
};
// v3: refused
const PIN_COUNTERS: MapPin = MapPin {
    map: "xdp_lb_counters",
    name: "counters",
    version: 3,
    on_change: OnChange::Rebuild,
};
/// Session affinity: (service, client address) -> backend; an LRU of the program's own.
const PIN_AFFINITY: MapPin = rebuilt("xdp_lb_affinity", "affinity");
const LINK: &str = "link_xdp";
/// How long a backend's next hop gets to answer ARP or neighbour discovery.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

const EVENT_NEW_FLOW: u8 = 1;
const EVENT_REROUTED: u8 = 2;
const EVENT_TRACE_IN: u8 = 3;
const EVENT_TRACE_OUT: u8 = 4;

// SAFETY: plain C structs of integers from include/xdp_lb.h.
unsafe impl plain::Plain for xdp_lb_backend {}
unsafe impl plain::Plain for xdp_lb_event {}
unsafe impl plain::Plain for xdp_lb_flow {}
unsafe impl plain::Plain for xdp_lb_tuple {}
unsafe impl plain::Plain for xdp_lb_tuple4 {}
unsafe impl plain::Plain for xdp_lb_reply {}

crate::endpoint_conversions!(service_endpoint);

crate::declare_counters!(
    xdp_lb_stats,
    "xdp_lb_stats",
    [
        (packets_in, Traffic, "client packets sent to the backend"),
        (bytes_in, Traffic, "bytes of those packets"),
        (packets_out, Traffic, "backend packets sent back to the client"),
        (bytes_out, Traffic, "bytes of those packets"),
        (new_flows, Traffic, "flows sent to the backend"),
    ]
);

crate::declare_counters!(
    xdp_lb_counters,
    "xdp_lb_counters",
    [
        (new_flows, Event, "flows created"),
        (
            rerouted,
            Event,
            "flows whose backend left its service, sent to a new one"
        ),
        (
            no_port,
            Error,
            "no free source port towards the backend: packet dropped"
        ),
        (flow_failed, Error, "flow table insert failed: packet dropped"),
        (
            stale_replies,
            Event,
            "replies whose flow was evicted or moved: passed to the kernel"
        ),
        (
            lost_events,
            Error,
            "ring buffer full: event not sent (the packet went on)"
        ),
        (
            unattributed,
            Error,
            "replies counted nowhere: their backend slot changed meanwhile"
        ),
        (
            evicted,
            Event,
            "half-open or finished flows that made room for a new flow"
        ),
        (port_retries, Event, "source ports probed beyond the first"),
        (
            flood_dropped,
            Error,
            "first packets of new flows dropped under flood"
        ),
        (
            flood_admitted,
            Event,
            "new flows made under flood for a client that asked again"
        ),
        (
            table_full,
            Error,
            "no room: every slot tried held a live established flow"
        ),
        (
            icmp_to_client,
            Event,
            "ICMP errors about a flow's backend leg, sent on to its client"
        ),
        (
            icmp_to_backend,
            Event,
            "ICMP errors about a flow's client leg, sent on to its backend"
        ),
        (
            refused,
            Event,
            "new flows to a service without a usable backend, answered with an RST or ICMP port unreachable"
        ),
    ]
);

#[derive(clap::Args, Debug)]
pub struct XdpLbArgs {
    /// the interface clients, this node and the backends share; packets leave where they came in
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub iface: Option<String>,
    /// VIP:PORT=BACKEND:PORT[@MAC][,BACKEND:PORT[@MAC]...], repeatable; TCP and UDP; IPv6 in
    /// brackets; a backend's MAC is looked up (and resolved) unless given
    #[arg(long = "service", value_name = "VIP=BACKENDS", value_parser = service::service_flag)]
    pub services: Vec<Service>,
    /// XDP mode [default: auto]
    #[arg(long, value_enum)]
    pub mode: Option<XdpMode>,
    /// print events as JSON lines
    #[arg(long)]
    pub json: bool,
    /// an event for every packet, not only for new flows
    #[arg(long)]
    pub trace: bool,
    /// entries of the flow tables (LRU: the least recently used flow makes room)
    /// [default: 262144]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(MAX_FLOWS_RANGE))]
    pub max_flows: Option<u32>,
    /// new flows per second per CPU above which xdp-lb is under flood: a new flow is then
    /// only made for a client that sends its first packet again (0: never) [default: 40000]
    #[arg(long, value_name = "N")]
    pub flood_rate: Option<u32>,
    /// attach, pin under /sys/fs/bpf/ebpf-net/xdp-lb/, print ready and exit; run again to
    /// update the services in place (no events: nobody reads them)
    #[arg(long, conflicts_with_all = ["json", "trace"])]
    pub persist: bool,
    #[command(flatten)]
    pub run: RunOptions,
}

crate::run_args!(XdpLbArgs);

const MAX_FLOWS_RANGE: std::ops::RangeInclusive<i64> = 16..=16_777_216;

/// What flags and config file say together.
pub struct Settings {
    iface: Item,
    services: Vec<Service>,
    mode: XdpMode,
    max_flows: u32,
    flood_rate: u32,
}

impl Settings {
    fn read(args: &XdpLbArgs) -> Result<Self> {
        let file = Sources::<XdpLbSection>::read(&args.run)?;
        let iface = file.interface(args.iface.as_ref())?;
        let services = file.services(&args.services, LIMITS)?;
        let max_flows = match (args.max_flows, file.section().and_then(|s| s.max_flows.as_ref())) {
            (Some(n), _) => n,
            (None, Some(n)) => {
                let value = *n.get_ref();
                if !MAX_FLOWS_RANGE.contains(&i64::from(value)) {
                    let config = file.config.as_ref().expect("a section comes from a file");
                    bail!(
                        "{}: max-flows {value} is not in 16..=16777216",
                        config.at(n.span())
                    );
                }
                value
            }
            (None, None) => DEFAULT_MAX_FLOWS,
        };
        Ok(Self {
            iface,
            services,
            mode: file.value(args.mode, |s| s.mode, XdpMode::Auto),
            max_flows,
            flood_rate: file.value(args.flood_rate, |s| s.flood_rate, DEFAULT_FLOOD_RATE),
        })
    }

    /// The settings of a program that drives xdp-lb (the Kubernetes agent): `services` on
    /// `iface`, everything else as without flags.
    pub fn driven(iface: &str, services: Vec<Service>) -> Result<(Self, EventLevel)> {
        let settings = Self {
            iface: Item::flags("-i", &[iface.to_string()]).remove(0),
            services: service::check_services(services, LIMITS)?,
            mode: XdpMode::Auto,
            max_flows: DEFAULT_MAX_FLOWS,
            flood_rate: DEFAULT_FLOOD_RATE,
        };
        // no flow events: nobody reads them, as with --persist
        Ok((
            settings,
            EventLevel {
                events: 0,
                json: false,
            },
        ))
    }
}

/// Where packets to one backend go: this node's address towards it and its next hop's MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub lb_addr: IpAddr,
    pub mac: [u8; 6],
}

/// What the program is loaded with.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// 0 no events, 1 flows, 2 every packet (include/xdp_lb.h XDP_LB_EVENTS_*)
    pub events: u8,
    pub max_flows: u32,
    /// new flows per second per CPU that mean a flood (0: never)
    pub flood_rate: u32,
    /// source ports handed out towards backends: first, count
    pub ports: (u16, u16),
    /// flow hash seed; random when None
    pub seed: Option<u32>,
}

/// The source ports this node hands out towards backends: the largest run of ports at or
/// above 1024 outside the kernel's ephemeral range, so our flows never take the port of a
/// connection this node makes itself.
pub fn port_range() -> Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading /proc/sys/net/ipv4/ip_local_port_range")?;
    let bounds: Vec<u32> = text
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    let (lo, hi) = match bounds[..] {
        [lo, hi] if lo <= hi => (lo, hi),
        _ => bail!("unexpected ip_local_port_range '{}'", text.trim()),
    };
    Ok(free_ports(lo, hi))
}

fn free_ports(ephemeral_lo: u32, ephemeral_hi: u32) -> (u16, u16) {
    let below = (1024, ephemeral_lo.saturating_sub(1024));
    let above = (
        (ephemeral_hi + 1).max(1024),
        65536u32.saturating_sub((ephemeral_hi + 1).max(1024)),
    );
    let (first, count) = if below.1 >= above.1 { below } else { above };
    // the whole ephemeral range above 1024: share it rather than have no ports
    if count == 0 {
        return (1024, 64512);
    }
    (first as u16, count as u16)
}

/// Each backend's route out of `iface`: this node's source address and the next hop's MAC
/// (named, known to the neighbour table, or asked for).
fn resolve_backends(services: &[Service], iface: &Interface) -> Result<HashMap<SocketAddr, Backend>> {
    let mut routes = neigh::Routes::new()?;
    let mut backends = HashMap::new();
    for named in services.iter().flat_map(|svc| svc.backends.iter()) {
        let endpoint = &named.addr;
        if backends.contains_key(endpoint) {
            continue;
        }
        let route = routes.route_to(endpoint.ip())?;
        if route.dev != iface.name {
            bail!(
                "backend {endpoint} is reached through {}, not {}: xdp-lb sends packets back out the interface they came in on",
                route.dev,
                iface.name
            );
        }
        let mac = match named.mac {
            Some(mac) => mac,
            None => neigh::resolve(route.next_hop, &iface.name, RESOLVE_TIMEOUT)
                .with_context(|| format!("backend {endpoint}"))?,
        };
        backends.insert(
            *endpoint,
            Backend {
                lb_addr: route.source,
                mac,
            },
        );
    }
    Ok(backends)
}

/// A VIP that is also one of our source addresses must not use a port we hand out: its
/// replies would look like a client's packets to the VIP.
fn check_vips(
    services: &[Service],
    backends: &HashMap<SocketAddr, Backend>,
    ports: (u16, u16),
) -> Result<()> {
    let ours: Vec<IpAddr> = backends.values().map(|backend| backend.lb_addr).collect();
    let (first, count) = (u32::from(ports.0), u32::from(ports.1));
    for service in services {
        let port = u32::from(service.vip.port());
        if ours.contains(&service.vip.ip()) && port >= first && port < first + count {
            bail!(
                "--service {}: the VIP is this node's own address towards backends and port {port} is one it hands out to flows ({first}-{}); use a port below {first} or an address of its own for the VIP",
                service.vip,
                first + count - 1
            );
        }
    }
    Ok(())
}

pub fn load<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    pins: Option<&mut PinSet>,
    options: &Options,
) -> Result<XdpLbSkel<'obj>> {
    let mut open = XdpLbSkelBuilder::default()
        .open(storage)
        .context("opening the xdp-lb program")?;
    let seed = match options.seed {
        Some(seed) => seed,
        None => crate::kernel::random_seed()?,
    };
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .expect("xdp_lb.c declares constants");
    rodata.hash_seed = seed;
    rodata.events_level = options.events;
    rodata.port_lo = options.ports.0;
    rodata.port_span = options.ports.1;
    rodata.clock_size = options.max_flows;
    rodata.flood_rate = options.flood_rate;
    // one of the two programs: the other may not even load here (bpf_loop)
    let compat = needs_compat();
    open.progs.xdp_lb.set_autoload(!compat);
    open.progs.xdp_lb_compat.set_autoload(compat);
    open.maps.xdp_lb_flows4.set_max_entries(options.max_flows)?;
    open.maps.xdp_lb_flows6.set_max_entries(options.max_flows)?;
    open.maps.xdp_lb_reverse4.set_max_entries(options.max_flows)?;
    open.maps.xdp_lb_reverse6.set_max_entries(options.max_flows)?;
    open.maps.xdp_lb_clock.set_max_entries(options.max_flows)?;
    if let Some(pins) = pins {
        pins.prepare(open.open_object_mut(), SUBCOMMAND, PINS)?;
    }
    open.load().context("loading the xdp-lb program")
}

/// The service tables and the Maglev rings of a loaded program.
pub struct Tables {
    pub services: ServiceTables,
    pub rings: MapHandle,
    /// services_epoch's section, renewed after every sync; not pinned: each run's program has
    /// its own (a re-run's flows carry the old run's value, so each is checked once), and
    /// only the process that loaded it syncs
    epoch: Option<MapHandle>,
}

impl Tables {
    pub fn of(skel: &XdpLbSkel<'_>) -> Result<Self> {
        Ok(Self {
            services: ServiceTables::new(
                MapHandle::try_from(&skel.maps.xdp_lb_services)?,
                MapHandle::try_from(&skel.maps.xdp_lb_backends)?,
                MapHandle::try_from(&skel.maps.xdp_lb_weights)?,
                MapHandle::try_from(&skel.maps.xdp_lb_stats)?,
            ),
            rings: MapHandle::try_from(&skel.maps.xdp_lb_rings)?,
            epoch: Some(MapHandle::try_from(&skel.maps.data_epoch)?),
        })
    }

    fn pinned(pins: &PinDir) -> Result<Self> {
        Ok(Self {
            services: ServiceTables::pinned(pins, [PIN_SERVICES, PIN_BACKENDS, PIN_WEIGHTS, PIN_STATS])?,
            rings: pins.open_map(&PIN_RINGS)?,
            epoch: None,
        })
    }

    /// A new epoch: every flow checks its service and backend again at its next packet
    /// (bpf/xdp_lb.c balance). Random and never 0 (0: never checked), so it differs from
    /// the value of any earlier run whose flows a re-run keeps, but for a 1 in 2^32 chance.
    fn renew_epoch(&self) -> Result<()> {
        let epoch = self
            .epoch
            .as_ref()
            .context("the service epoch of a pinned view cannot be renewed")?;
        let old = epoch
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .map_or(0, |value| u32::from_ne_bytes(value[..4].try_into().unwrap()));
        let mut new = 0;
        while new == 0 || new == old {
            new = crate::kernel::random_seed()?;
        }
        epoch
            .update(&0u32.to_ne_bytes(), &new.to_ne_bytes(), MapFlags::ANY)
            .context("writing xdp-lb's service epoch")
    }
}

/// Writes a service's Maglev ring to the entries its backend slots own (include/xdp_lb.h):
/// the size, then a backend index (relative to `base`) per entry, each usable backend in
/// proportion to its weight. Without a usable backend, a ring of size 0.
fn write_ring(rings: &MapHandle, service: &Service, base: u32) -> Result<()> {
    let weights = service.effective_weights();
    let start = base * RING_PER_SLOT;
    if weights.iter().all(|&weight| weight == 0) {
        return rings
            .update(&start.to_ne_bytes(), &0u32.to_ne_bytes(), MapFlags::ANY)
            .with_context(|| format!("writing the Maglev ring of {}", service.name()));
    }
    let size = maglev::table_size(service.backends.len());
    let reserved = service.backends.len() as u32 * RING_PER_SLOT;
    anyhow::ensure!(
        size < reserved,
        "a ring of {size} does not fit in {reserved} entries"
    );
    let mut values = Vec::with_capacity((size as usize + 1) * 4);
    values.extend_from_slice(&size.to_ne_bytes());
    for index in maglev::weighted_table(&service.addrs(), &weights, size) {
        values.extend_from_slice(&index.to_ne_bytes());
    }
    let keys: Vec<u8> = (start..=start + size).flat_map(u32::to_ne_bytes).collect();
    rings
        .update_batch(&keys, &values, size + 1, MapFlags::ANY, MapFlags::ANY)
        .with_context(|| format!("writing the Maglev ring of {}", service.vip))
}

/// Makes the tables hold exactly `services`; see [`service::sync_services`]. Then a new
/// epoch, also after a failed sync (it may have written part): flows check again.
pub fn sync(
    tables: &Tables,
    services: &[Service],
    backends: &HashMap<SocketAddr, Backend>,
) -> Result<SyncReport> {
    let synced = service::sync_services_with(
        &tables.services,
        services,
        |_, endpoint, out| {
            let backend = backends.get(&endpoint).context("backend without a route")?;
            let value = xdp_lb_backend {
                endpoint: endpoint.into(),
                lb_addr: ip_to_words(backend.lb_addr).1,
                mac: backend.mac,
                ..Default::default()
            };
            out.extend_from_slice(as_bytes(&value));
            Ok(())
        },
        |service, base| write_ring(&tables.rings, service, base),
    );
    tables.renew_epoch()?;
    synced
}

/// A loaded program with `services` in its tables: for test_run tables and benchmarks.
pub fn load_with_services<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    options: &Options,
    services: &[Service],
    backends: &HashMap<SocketAddr, Backend>,
) -> Result<XdpLbSkel<'obj>> {
    let skel = load(storage, None, options)?;
    sync(&Tables::of(&skel)?, services, backends)?;
    Ok(skel)
}

/// Refuses when an XDP program is on the interface that is not the link pinned in `pins`:
/// another xdp-lb, or someone else's program we would replace.
fn refuse_if_attached(iface: &Interface, pinned: &[u32]) -> Result<()> {
    let Some(prog) = attach::xdp_program(iface.index) else {
        return Ok(());
    };
    if pinned.contains(&prog.id) {
        return Ok(());
    }
    if PROGRAMS.contains(&prog.name.as_str()) {
        bail!(
            "another ebpf-net xdp-lb is already attached to {} (program {}); stop it first",
            iface.name,
            prog.id
        );
    }
    bail!(
        "{} already runs XDP program {} (id {}); xdp-lb will not replace it",
        iface.name,
        prog.name,
        prog.id
    )
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        6 => "tcp",
        17 => "udp",
        _ => "?",
    }
}

fn tuple_ends(tuple: &xdp_lb_tuple) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(ip_from_words(tuple.family, tuple.src), u16::from_be(tuple.sport)),
        SocketAddr::new(ip_from_words(tuple.family, tuple.dst), u16::from_be(tuple.dport)),
    )
}

/// One event as a line of text, or JSON.
pub fn format_event(event: &xdp_lb_event, as_json: bool) -> String {
    let (client, vip) = tuple_ends(&event.flow);
    let backend = SocketAddr::from(&event.backend);
    let proto = proto_name(event.flow.proto);
    let lb_port = u16::from_be(event.lb_port);
    let (kind, text) = match event.kind {
        EVENT_NEW_FLOW => (
            "new_flow",
            format!("new flow {client} -> {vip} via {backend} ({proto}, source port {lb_port})"),
        ),
        EVENT_REROUTED => (
            "rerouted",
            format!(
                "flow {client} -> {vip} moved from {} to {backend}: its backend left the service ({proto})",
                SocketAddr::from(&event.previous)
            ),
        ),
        EVENT_TRACE_IN => (
            "to_backend",
            format!(
                "{proto} {client} -> {vip} via {backend}: {} bytes to the backend",
                event.len
            ),
        ),
        EVENT_TRACE_OUT => (
            "to_client",
            format!(
                "{proto} {client} -> {vip} via {backend}: {} bytes back to the client",
                event.len
            ),
        ),
        other => ("unknown", format!("unknown event {other}")),
    };
    if !as_json {
        return text;
    }
    let mut value = json!({
        "event": kind,
        "proto": proto,
        "client": client.to_string(),
        "vip": vip.to_string(),
        "backend": backend.to_string(),
        "source_port": lb_port,
        "timestamp_ns": event.timestamp,
    });
    if event.kind == EVENT_REROUTED {
        value["previous"] = json!(SocketAddr::from(&event.previous).to_string());
    }
    if event.kind == EVENT_TRACE_IN || event.kind == EVENT_TRACE_OUT {
        value["bytes"] = json!(event.len);
    }
    value.to_string()
}

/// The xdp-lb datapath on the lifecycle.
pub struct XdpLb;

/// What an xdp-lb run works from: the settings, each backend's route, the load options.
pub struct Plan {
    settings: Settings,
    backends: HashMap<SocketAddr, Backend>,
    options: Options,
    json: bool,
}

/// The loaded program, and how its events are printed.
pub struct Loaded<'obj> {
    pub skel: XdpLbSkel<'obj>,
    json: bool,
}

/// Every map pinned with `--persist`.
const PINS: &[MapPin] = &[
    PIN_SERVICES,
    PIN_BACKENDS,
    PIN_WEIGHTS,
    PIN_STATS,
    PIN_RINGS,
    PIN_FLOWS4,
    PIN_FLOWS,
    PIN_REVERSE4,
    PIN_REVERSE,
    PIN_CLOCK,
    PIN_COUNTERS,
    PIN_AFFINITY,
];

/// The maps a report reads.
pub struct View {
    tables: Tables,
    counters: MapHandle,
    /// IPv4's flow table and IPv6's
    flows: [MapHandle; 2],
}

impl Datapath for XdpLb {
    const NAME: &'static str = SUBCOMMAND;
    const PROGRAMS: &'static [&'static str] = PROGRAMS;
    type Args = XdpLbArgs;
    type Desired = (Settings, EventLevel);
    type Plan = Plan;
    type Loaded<'obj> = Loaded<'obj>;
    type View = View;

    fn desired(args: &XdpLbArgs) -> Result<(Settings, EventLevel)> {
        let events = EventLevel {
            events: match (args.persist, args.trace) {
                (true, _) => 0,
                (false, false) => 1,
                (false, true) => 2,
            },
            json: args.json,
        };
        Ok((Settings::read(args)?, events))
    }
    fn target((settings, _): &(Settings, EventLevel)) -> Result<Target> {
        Target::interface(&settings.iface)
    }
    fn refuse_if_attached(target: &Target, pinned: &[u32]) -> Result<()> {
        refuse_if_attached(target.iface(), pinned)
    }
    fn plan((settings, events): &(Settings, EventLevel), target: &Target, _persist: bool) -> Result<Plan> {
        super::shared_vips::refuse_served_elsewhere(SUBCOMMAND, target.iface(), &settings.services)?;
        let backends = resolve_backends(&settings.services, target.iface())?;
        let ports = port_range()?;
        check_vips(&settings.services, &backends, ports)?;
        Ok(Plan {
            settings: Settings {
                iface: settings.iface.clone(),
                services: settings.services.clone(),
                mode: settings.mode,
                max_flows: settings.max_flows,
                flood_rate: settings.flood_rate,
            },
            backends,
            options: Options {
                events: events.events,
                max_flows: settings.max_flows,
                flood_rate: settings.flood_rate,
                ports,
                seed: None,
            },
            json: events.json,
        })
    }
    fn load<'obj>(
        storage: &'obj mut Storage,
        plan: &Plan,
        pins: Option<&mut PinSet>,
    ) -> Result<Loaded<'obj>> {
        Ok(Loaded {
            skel: load(&mut storage[0], pins, &plan.options)?,
            json: plan.json,
        })
    }
    fn apply(loaded: &Loaded<'_>, plan: &Plan) -> Result<Applied> {
        let report = sync(
            &Tables::of(&loaded.skel)?,
            &plan.settings.services,
            &plan.backends,
        )?;
        Ok(Applied::synced(report))
    }
    fn attach(loaded: &Loaded<'_>, target: &Target, plan: &Plan) -> Result<Vec<Box<dyn std::any::Any>>> {
        let attachment = XdpAttachment::attach(program(&loaded.skel), target.iface(), plan.settings.mode)?;
        warn_native_veth(target.iface(), plan.settings.mode);
        Ok(vec![Box::new(attachment)])
    }
    fn attach_pinned(loaded: &Loaded<'_>, target: &Target, pins: &PinDir, plan: &Plan) -> Result<bool> {
        let link = pins.file(LINK);
        attach::drop_severed(&link, target.iface())?;
        if attach::update_pinned(program(&loaded.skel), &link)? {
            return Ok(true);
        }
        XdpAttachment::attach(program(&loaded.skel), target.iface(), plan.settings.mode)?.pin(&link)?;
        warn_native_veth(target.iface(), plan.settings.mode);
        Ok(false)
    }
    fn desired_maps() -> &'static [MapPin] {
        // the Maglev rings (4 million slots) follow from these
        &[PIN_SERVICES, PIN_BACKENDS, PIN_WEIGHTS]
    }
    fn objects<'a>(loaded: &'a Loaded<'_>) -> Vec<(&'a libbpf_rs::Object, &'static [MapPin])> {
        vec![(loaded.skel.object(), PINS)]
    }
    fn check_reload((old, _): &(Settings, EventLevel), (new, _): &(Settings, EventLevel)) -> Result<()> {
        if new.iface.text != old.iface.text {
            bail!(
                "the interface changed ({} -> {}); that needs a restart",
                old.iface.text,
                new.iface.text
            );
        }
        if new.mode != old.mode || new.max_flows != old.max_flows || new.flood_rate != old.flood_rate {
            bail!("mode, max-flows or flood-rate changed; that needs a restart (or --persist, which keeps the flows)");
        }
        Ok(())
    }
    fn describe((settings, _): &(Settings, EventLevel), target: &Target, plan: &Plan) -> String {
        let got = attach::xdp_mode(target.iface().index);
        let mut mode = got.map_or("?", XdpMode::name).to_string();
        // auto's choice of generic says why, so a slow path is never a mystery
        if settings.mode == XdpMode::Auto && got == Some(XdpMode::Generic) {
            if let Some(why) = attach::veth_xdp_tx_blocker(target.iface()) {
                mode = format!("{mode} XDP, as {why}; native needs an XDP program on the peer");
            } else {
                mode.push_str(" XDP, the driver has no native XDP");
            }
        } else {
            mode.push_str(" XDP");
        }
        let (first, count) = plan.options.ports;
        format!(
            "({mode}): {}; source ports {first}-{}",
            service::describe(&settings.services),
            u32::from(first) + u32::from(count) - 1
        )
    }
    fn view(loaded: &Loaded<'_>) -> Result<View> {
        Ok(View {
            tables: Tables::of(&loaded.skel)?,
            counters: MapHandle::try_from(&loaded.skel.maps.xdp_lb_counters)?,
            flows: [
                MapHandle::try_from(&loaded.skel.maps.xdp_lb_flows4)?,
                MapHandle::try_from(&loaded.skel.maps.xdp_lb_flows6)?,
            ],
        })
    }
    fn view_pinned(pins: &PinDir) -> Result<View> {
        Ok(View {
            tables: Tables::pinned(pins)?,
            counters: pins.open_map(&PIN_COUNTERS)?,
            flows: [pins.open_map(&PIN_FLOWS4)?, pins.open_map(&PIN_FLOWS)?],
        })
    }
    fn report(view: &View) -> Result<Report> {
        let services: Vec<ServiceReport<xdp_lb_stats>> = service::service_report(&view.tables.services)?;
        let totals: xdp_lb_counters = maps::sum_percpu_counters(&view.counters, 0)?;
        let flows: u64 = view.flows.iter().map(|table| table.keys().count() as u64).sum();
        let mut families = counters::service_families(SUBCOMMAND, &services);
        families.extend(crate::control::health::families(SUBCOMMAND));
        let all = service::grand_total(&services);
        families.push(metrics::rewrites(
            SUBCOMMAND,
            &[("in", all.packets_in), ("out", all.packets_out)],
        ));
        families.extend(counters::event_families(SUBCOMMAND, &totals));
        let mut gauge = metrics::Family::gauge(
            "ebpf_net_xdp_lb_flows",
            "entries in the flow table (both directions)",
        );
        gauge.add(&[], flows);
        families.push(gauge);
        let mut exit: Vec<String> = services
            .iter()
            .take(20)
            .map(|service| service.summary(backend_words))
            .collect();
        exit.push(describe_counters(&totals));
        // the flow clock's size: both tables' flows together
        let max_flows = view.flows[0].max_entries();
        Ok(Report {
            on_detach: None,
            summary: format!(
                "{}; {flows} flows in the table, {} dropped",
                service::summarize_report(&services, backend_words),
                totals.no_port + totals.flow_failed + totals.table_full + totals.flood_dropped
            ),
            families,
            exit,
            details: Details::later(move || {
                json!({
                    "services": services.iter().map(ServiceReport::json).collect::<Vec<_>>(),
                    "health": crate::control::health::snapshot(),
                    "flows": flows,
                    "max_flows": max_flows,
                    "counters": totals.json(),
                })
            }),
        })
    }
    fn serve(
        loaded: &Loaded<'_>,
        shutdown: &Shutdown,
        reload: &mut dyn FnMut(run::Request) -> Result<String>,
    ) -> Result<()> {
        let as_json = loaded.json;
        let mut builder = RingBufferBuilder::new();
        builder.add(&loaded.skel.maps.xdp_lb_events, move |data: &[u8]| {
            if let Ok(event) = maps::from_bytes::<xdp_lb_event>("event", data) {
                println!("{}", format_event(&event, as_json));
            }
            0
        })?;
        let events = builder.build()?;
        let mut lost_reported = 0;
        let mut pressure = Pressure::default();
        let mut next_check = Instant::now();
        loop {
            // poll returns early on events; the signal is checked between polls
            if let Err(err) = events.poll(Duration::from_millis(100)) {
                // a signal interrupts the wait; anything else is a real failure
                if err.kind() != libbpf_rs::ErrorKind::Interrupted {
                    return Err(err).context("reading events");
                }
            }
            // events written without a wakeup (at most one a tick per CPU wakes this reader)
            events.consume().context("reading events")?;
            match shutdown.next_timeout(Duration::ZERO) {
                Some(run::Request::Stop) => break,
                Some(request @ (run::Request::Reload | run::Request::Health)) => {
                    run::log_reload(SUBCOMMAND, request, reload(request))
                }
                None => {}
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + Duration::from_secs(1);
                let totals: xdp_lb_counters =
                    maps::sum_percpu_counters(&loaded.skel.maps.xdp_lb_counters, 0)?;
                if totals.lost_events > lost_reported {
                    eprintln!(
                        "{SUBCOMMAND}: {} events lost (ring buffer full; the packets went on), {} in all",
                        totals.lost_events - lost_reported,
                        totals.lost_events
                    );
                    lost_reported = totals.lost_events;
                }
                if let Some(line) = pressure.report(&totals) {
                    eprintln!("{SUBCOMMAND}: {line}");
                }
            }
        }
        let _ = events.consume();
        Ok(())
    }
}

/// What ran low since the last second: the line the foreground run logs about it.
#[derive(Default)]
struct Pressure {
    last: xdp_lb_counters,
}

impl Pressure {
    fn report(&mut self, now: &xdp_lb_counters) -> Option<String> {
        let last = std::mem::replace(&mut self.last, *now);
        let delta = |f: fn(&xdp_lb_counters) -> u64| f(now).saturating_sub(f(&last));
        let new_flows = delta(|c| c.new_flows);
        let mut parts = Vec::new();
        let flood = delta(|c| c.flood_dropped);
        if flood > 0 {
            parts.push(format!(
                "under flood: {flood} first packets of new flows dropped, {} clients admitted on asking again",
                delta(|c| c.flood_admitted)
            ));
        }
        let no_port = delta(|c| c.no_port);
        let retries = delta(|c| c.port_retries);
        if no_port > 0 || retries > 4 * new_flows.max(1) {
            parts.push(format!(
                "source ports running low: {no_port} new flows found none, {retries} extra ports probed for {new_flows} new flows"
            ));
        }
        let full = delta(|c| c.table_full) + delta(|c| c.flow_failed);
        if full > 0 {
            parts.push(format!(
                "flow table full of established flows: {full} new flows dropped (see --max-flows)"
            ));
        }
        let evicted = delta(|c| c.evicted);
        if evicted > new_flows / 2 && evicted > 100 {
            parts.push(format!(
                "flow table low: {evicted} half-open or finished flows evicted for {new_flows} new flows"
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Which events a run prints, and how.
pub struct EventLevel {
    /// 0 none, 1 flows, 2 every packet (include/xdp_lb.h XDP_LB_EVENTS_*)
    events: u8,
    json: bool,
}

fn warn_native_veth(iface: &Interface, mode: XdpMode) {
    if mode != XdpMode::Native {
        return;
    }
    if let Some(why) = attach::veth_xdp_tx_blocker(iface) {
        eprintln!("{SUBCOMMAND}: warning: {why} (attach any XDP program to the peer in native mode, e.g. one that returns XDP_PASS; GRO alone is not enough); --mode auto would use generic");
    }
}

fn backend_words(stats: &xdp_lb_stats) -> String {
    format!(
        "{} new flows, {} packets / {} bytes in, {} packets / {} bytes out",
        stats.new_flows, stats.packets_in, stats.bytes_in, stats.packets_out, stats.bytes_out
    )
}

fn describe_counters(totals: &xdp_lb_counters) -> String {
    format!(
        "flows {} new, {} rerouted, {} evicted (half-open or finished); dropped: no source port {}, flow table {}, table full of established {}, under flood {} ({} admitted on asking again); stale replies passed {}; events lost {}; ICMP errors translated {} to clients, {} to backends",
        totals.new_flows,
        totals.rerouted,
        totals.evicted,
        totals.no_port,
        totals.flow_failed,
        totals.table_full,
        totals.flood_dropped,
        totals.flood_admitted,
        totals.stale_replies,
        totals.lost_events,
        totals.icmp_to_client,
        totals.icmp_to_backend
    )
}

/// A flow table entry, decoded (tests and benchmarks read the table with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub proto: u8,
    pub backend: SocketAddr,
    pub lb_addr: IpAddr,
    pub lb_port: u16,
    pub client_mac: [u8; 6],
}

/// Every flow of a flow table (IPv4's or IPv6's: told apart by their keys' size).
pub fn flows(map: &impl MapCore) -> Result<Vec<Flow>> {
    let mut flows = Vec::new();
    for key in map.keys() {
        let Some(value) = map.lookup(&key, MapFlags::ANY)? else {
            continue;
        };
        let tuple = tuple_of_key(&key)?;
        let flow: xdp_lb_flow = maps::from_bytes("flow", &value)?;
        let (client, vip) = tuple_ends(&tuple);
        flows.push(Flow {
            client,
            vip,
            proto: tuple.proto,
            backend: SocketAddr::from(&flow.backend),
            lb_addr: ip_from_words(tuple.family, flow.lb_addr),
            lb_port: u16::from_be(flow.lb_port),
            client_mac: flow.client_mac,
        });
    }
    Ok(flows)
}

/// Every flow of a loaded program, IPv4's and IPv6's.
pub fn all_flows(skel: &XdpLbSkel<'_>) -> Result<Vec<Flow>> {
    let mut all = flows(&skel.maps.xdp_lb_flows4)?;
    all.extend(flows(&skel.maps.xdp_lb_flows6)?);
    Ok(all)
}

/// A flow or reverse table's key as a tuple: an IPv4 table's 16 bytes (struct
/// xdp_lb_tuple4) or an IPv6 table's whole tuple.
pub fn tuple_of_key(key: &[u8]) -> Result<xdp_lb_tuple> {
    if key.len() != size_of::<xdp_lb_tuple4>() {
        return maps::from_bytes("flow key", key);
    }
    let key4: xdp_lb_tuple4 = maps::from_bytes("IPv4 flow key", key)?;
    Ok(xdp_lb_tuple {
        src: [key4.src, 0, 0, 0],
        dst: [key4.dst, 0, 0, 0],
        sport: key4.sport,
        dport: key4.dport,
        proto: key4.proto,
        family: libc::AF_INET as u8,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ports_avoid_the_ephemeral_range() {
        assert_eq!(free_ports(32768, 60999), (1024, 31744));
        assert_eq!(free_ports(1024, 40000), (40001, 25535));
        assert_eq!(free_ports(1024, 65535), (1024, 64512));
    }
}
