//! `ebpf-net xdp-lb`: a one-arm full-NAT L4 load balancer in XDP. Clients, this node and the
//! backends share a link; a packet to a service VIP:PORT leaves the interface it came in on
//! towards a backend picked by Maglev hashing, from this node's address and a port of its
//! own, and the backend's reply is rewritten back to the client.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBufferBuilder};
use serde_json::{json, Value};

use crate::addr::{ip_from_words, ip_to_words, Interface};
use crate::attach::{self, PinnedLink, XdpAttachment, XdpMode};
use crate::config::{self, ConfigFile, Item, RunOptions};
use crate::instance::Instance;
use crate::maps::{self, as_bytes};
use crate::metrics;
use crate::pin::PinDir;
use crate::service::{self, Limits, Service, ServiceTables, SyncReport};
use crate::skel::xdp_lb::types::{
    service_endpoint, xdp_lb_backend, xdp_lb_counters, xdp_lb_event, xdp_lb_flow, xdp_lb_stats, xdp_lb_tuple,
};
use crate::skel::xdp_lb::{XdpLbSkel, XdpLbSkelBuilder};
use crate::{maglev, neigh, run};

pub const SUBCOMMAND: &str = "xdp-lb";
pub const PROGRAMS: [&str; 1] = ["xdp_lb"];
/// include/xdp_lb.h
pub const LIMITS: Limits = Limits {
    services: 65536,
    backends_per_service: 4096,
    backends: 32768,
};
const RING_PER_SLOT: u32 = 128;
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
const PIN_SERVICES: &str = "services";
const PIN_BACKENDS: &str = "backends";
const PIN_STATS: &str = "stats";
const PIN_RINGS: &str = "rings";
const PIN_FLOWS: &str = "flows";
const PIN_REVERSE: &str = "reverse";
const PIN_COUNTERS: &str = "counters";
const LINK: &str = "link_xdp";
/// How long a backend's next hop gets to answer ARP or neighbour discovery.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

const EVENT_NEW_FLOW: u8 = 1;
const EVENT_REROUTED: u8 = 2;
const EVENT_TRACE_IN: u8 = 3;
const EVENT_TRACE_OUT: u8 = 4;

// SAFETY: plain C structs of integers from include/xdp_lb.h.
unsafe impl plain::Plain for xdp_lb_backend {}
unsafe impl plain::Plain for xdp_lb_stats {}
unsafe impl plain::Plain for xdp_lb_counters {}
unsafe impl plain::Plain for xdp_lb_event {}
unsafe impl plain::Plain for xdp_lb_flow {}
unsafe impl plain::Plain for xdp_lb_tuple {}

crate::endpoint_conversions!(service_endpoint);

#[derive(clap::Args, Debug)]
pub struct XdpLbArgs {
    /// the interface clients, this node and the backends share; packets leave where they came in
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub iface: Option<String>,
    /// VIP:PORT=BACKEND:PORT[@MAC][,BACKEND:PORT[@MAC]...], repeatable; TCP and UDP; IPv6 in
    /// brackets; a backend's MAC is looked up (and resolved) unless given
    #[arg(long = "service", value_name = "VIP=BACKENDS")]
    pub services: Vec<String>,
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
    /// attach, pin under /sys/fs/bpf/ebpf-net/xdp-lb/, print ready and exit; run again to
    /// update the services in place (no events: nobody reads them)
    #[arg(long, conflicts_with_all = ["json", "trace"])]
    pub persist: bool,
    #[command(flatten)]
    pub run: RunOptions,
}

const MAX_FLOWS_RANGE: std::ops::RangeInclusive<i64> = 16..=16_777_216;

/// What flags and config file say together.
struct Settings {
    iface: Item,
    services: Vec<Service>,
    macs: BackendMacs,
    mode: XdpMode,
    max_flows: u32,
}

impl Settings {
    fn read(args: &XdpLbArgs) -> Result<Self> {
        let config = ConfigFile::load(args.run.config.as_deref())?;
        let section = config::section_of(config.as_ref(), |doc| &doc.xdp_lb, SUBCOMMAND)?;
        let iface = config::interface(
            args.iface.as_ref(),
            config.as_ref(),
            section.map(|s| &s.interface),
            SUBCOMMAND,
        )?;
        let items = config::services(
            &args.services,
            config.as_ref(),
            section.map(|s| &s.service),
            SUBCOMMAND,
        )?;
        let (items, macs) = split_mac_items(&items)?;
        let max_flows = match (args.max_flows, section.and_then(|s| s.max_flows.as_ref())) {
            (Some(n), _) => n,
            (None, Some(n)) => {
                let value = *n.get_ref();
                if !MAX_FLOWS_RANGE.contains(&i64::from(value)) {
                    let config = config.as_ref().expect("a section comes from a file");
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
            services: service::parse_service_items(&items, LIMITS)?,
            macs,
            mode: args
                .mode
                .or(section.and_then(|s| s.mode))
                .unwrap_or(XdpMode::Auto),
            max_flows,
        })
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
    /// source ports handed out towards backends: first, count
    pub ports: (u16, u16),
    /// flow hash seed; random when None
    pub seed: Option<u32>,
}

/// MACs named on the command line, per backend.
pub type BackendMacs = HashMap<SocketAddr, [u8; 6]>;

/// Splits `@MAC` off every backend of every service (from flags or a config file): the plain
/// entries for [`service::parse_service_items`] and the MACs named.
pub fn split_mac_items(items: &[Item]) -> Result<(Vec<Item>, BackendMacs)> {
    let mut plain = Vec::with_capacity(items.len());
    let mut macs = BackendMacs::new();
    for item in items {
        let Some((vip, backends)) = item.text.split_once('=') else {
            plain.push(item.clone());
            continue;
        };
        let mut list = Vec::new();
        for backend in backends.split(',') {
            let Some((addr, mac)) = backend.rsplit_once('@') else {
                list.push(backend.to_string());
                continue;
            };
            let mac =
                neigh::parse_mac(mac.trim()).map_err(|err| item.fail(format!("backend {addr}: {err:#}")))?;
            if let Ok(endpoint) = addr.trim().parse::<SocketAddr>() {
                if macs.insert(endpoint, mac).is_some_and(|other| other != mac) {
                    return Err(item.fail(format!("backend {endpoint} is given two different MACs")));
                }
            }
            list.push(addr.to_string());
        }
        plain.push(Item {
            text: format!("{vip}={}", list.join(",")),
            origin: item.origin.clone(),
        });
    }
    Ok((plain, macs))
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
fn resolve_backends(
    services: &[Service],
    macs: &BackendMacs,
    iface: &Interface,
) -> Result<HashMap<SocketAddr, Backend>> {
    let mut backends = HashMap::new();
    for endpoint in services.iter().flat_map(|svc| svc.backends.iter()) {
        if backends.contains_key(endpoint) {
            continue;
        }
        let route = neigh::route_to(endpoint.ip())?;
        if route.dev != iface.name {
            bail!(
                "backend {endpoint} is reached through {}, not {}: xdp-lb sends packets back out the interface they came in on",
                route.dev,
                iface.name
            );
        }
        let mac = match macs.get(endpoint) {
            Some(mac) => *mac,
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
    pins: Option<&PinDir>,
    options: &Options,
) -> Result<XdpLbSkel<'obj>> {
    let mut open = XdpLbSkelBuilder::default()
        .open(storage)
        .context("opening the xdp-lb program")?;
    let seed = match options.seed {
        Some(seed) => seed,
        None => {
            let mut seed = [0u8; 4];
            // SAFETY: a 4-byte buffer we own.
            if unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) } != seed.len() as isize {
                bail!("getrandom failed: {}", std::io::Error::last_os_error());
            }
            u32::from_ne_bytes(seed)
        }
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
    open.maps.xdp_lb_flows.set_max_entries(options.max_flows)?;
    open.maps.xdp_lb_reverse.set_max_entries(options.max_flows)?;
    if let Some(pins) = pins {
        // libbpf reuses these when pinned already: a re-run updates the live tables
        open.maps.xdp_lb_services.set_pin_path(pins.file(PIN_SERVICES))?;
        open.maps.xdp_lb_backends.set_pin_path(pins.file(PIN_BACKENDS))?;
        open.maps.xdp_lb_stats.set_pin_path(pins.file(PIN_STATS))?;
        open.maps.xdp_lb_rings.set_pin_path(pins.file(PIN_RINGS))?;
        open.maps.xdp_lb_flows.set_pin_path(pins.file(PIN_FLOWS))?;
        open.maps.xdp_lb_reverse.set_pin_path(pins.file(PIN_REVERSE))?;
        open.maps.xdp_lb_counters.set_pin_path(pins.file(PIN_COUNTERS))?;
    }
    open.load().context("loading the xdp-lb program")
}

/// The service tables and the Maglev rings of a loaded program.
pub struct Tables {
    pub services: ServiceTables,
    pub rings: MapHandle,
}

impl Tables {
    pub fn of(skel: &XdpLbSkel<'_>) -> Result<Self> {
        Ok(Self {
            services: ServiceTables::new(
                MapHandle::try_from(&skel.maps.xdp_lb_services)?,
                MapHandle::try_from(&skel.maps.xdp_lb_backends)?,
                MapHandle::try_from(&skel.maps.xdp_lb_stats)?,
            ),
            rings: MapHandle::try_from(&skel.maps.xdp_lb_rings)?,
        })
    }

    fn pinned(pins: &PinDir) -> Result<Self> {
        Ok(Self {
            services: ServiceTables::pinned(pins, [PIN_SERVICES, PIN_BACKENDS, PIN_STATS])?,
            rings: MapHandle::from_pinned_path(pins.file(PIN_RINGS))?,
        })
    }
}

/// Writes a service's Maglev ring to the entries its backend slots own (include/xdp_lb.h):
/// the size, then a backend index (relative to `base`) per entry.
fn write_ring(rings: &MapHandle, service: &Service, base: u32) -> Result<()> {
    let size = maglev::table_size(service.backends.len());
    let reserved = service.backends.len() as u32 * RING_PER_SLOT;
    anyhow::ensure!(
        size < reserved,
        "a ring of {size} does not fit in {reserved} entries"
    );
    let start = base * RING_PER_SLOT;
    let mut values = Vec::with_capacity((size as usize + 1) * 4);
    values.extend_from_slice(&size.to_ne_bytes());
    for index in maglev::table(&service.backends, size) {
        values.extend_from_slice(&index.to_ne_bytes());
    }
    let keys: Vec<u8> = (start..=start + size).flat_map(u32::to_ne_bytes).collect();
    rings
        .update_batch(&keys, &values, size + 1, MapFlags::ANY, MapFlags::ANY)
        .with_context(|| format!("writing the Maglev ring of {}", service.vip))
}

/// Makes the tables hold exactly `services`; see [`service::sync_services`].
pub fn sync(
    tables: &Tables,
    services: &[Service],
    backends: &HashMap<SocketAddr, Backend>,
) -> Result<SyncReport> {
    service::sync_services_with(
        &tables.services,
        services,
        |endpoint| {
            let backend = backends.get(&endpoint).context("backend without a route")?;
            let value = xdp_lb_backend {
                endpoint: endpoint.into(),
                lb_addr: ip_to_words(backend.lb_addr).1,
                mac: backend.mac,
                ..Default::default()
            };
            Ok(as_bytes(&value).to_vec())
        },
        |service, base| write_ring(&tables.rings, service, base),
    )
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
fn refuse_if_attached(iface: &Interface, pins: &PinDir) -> Result<()> {
    let Some(prog) = attach::xdp_program(iface.index) else {
        return Ok(());
    };
    if PinnedLink::prog_ids(pins).contains(&prog.id) {
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

pub fn run(args: &XdpLbArgs, netns_key: &str) -> Result<()> {
    args.run.check(args.persist)?;
    let mut settings = Settings::read(args)?;
    let iface = Interface::by_name(&settings.iface.text).map_err(|err| settings.iface.fail(err))?;
    let pins = PinDir::new(SUBCOMMAND, netns_key, &iface.name);
    let _instance = Instance::claim(SUBCOMMAND, netns_key, &iface.name, args.persist)?;
    refuse_if_attached(&iface, &pins)?;
    if !args.persist && pins.exists() {
        bail!(
            "xdp-lb is persisted on {} (see `ebpf-net status`); run `ebpf-net down xdp-lb -i {}` first",
            iface.name,
            iface.name
        );
    }
    let backends = resolve_backends(&settings.services, &settings.macs, &iface)?;
    let ports = port_range()?;
    check_vips(&settings.services, &backends, ports)?;
    let options = Options {
        events: match (args.persist, args.trace) {
            (true, _) => 0,
            (false, false) => 1,
            (false, true) => 2,
        },
        max_flows: settings.max_flows,
        ports,
        seed: None,
    };
    if args.persist {
        return persist(
            &settings.services,
            &backends,
            &options,
            settings.mode,
            &iface,
            &pins,
        );
    }

    let mut object = MaybeUninit::uninit();
    let skel = load(&mut object, None, &options)?;
    let tables = Tables::of(&skel)?;
    sync(&tables, &settings.services, &backends)?;
    let metrics = metrics::serve(args.run.metrics.as_ref(), || metrics_source(&skel))?;
    let attachment = XdpAttachment::attach(&skel.progs.xdp_lb, &iface, settings.mode)?;
    warn_native_veth(&iface, settings.mode);
    let shutdown = run::Shutdown::install()?;
    let as_json = args.json;
    let mut builder = RingBufferBuilder::new();
    builder.add(&skel.maps.xdp_lb_events, move |data: &[u8]| {
        if let Ok(event) = maps::from_bytes::<xdp_lb_event>("event", data) {
            println!("{}", format_event(&event, as_json));
        }
        0
    })?;
    let events = builder.build()?;
    if let Some(addr) = metrics {
        eprintln!("{SUBCOMMAND}: metrics at http://{addr}/metrics");
    }
    run::announce_ready(
        SUBCOMMAND,
        &format!(
            "{} ({} XDP): {}; source ports {}-{}",
            iface.name,
            attachment.mode.name(),
            service::describe(&settings.services),
            ports.0,
            u32::from(ports.0) + u32::from(ports.1) - 1
        ),
    );
    let mut reload = || -> Result<String> {
        let new = Settings::read(args)?;
        if new.iface.text != iface.name {
            bail!(
                "the interface changed ({} -> {}); that needs a restart",
                iface.name,
                new.iface.text
            );
        }
        if new.mode != settings.mode || new.max_flows != settings.max_flows {
            bail!("mode or max-flows changed; that needs a restart");
        }
        let backends = resolve_backends(&new.services, &new.macs, &iface)?;
        check_vips(&new.services, &backends, ports)?;
        let report = sync(&tables, &new.services, &backends)?;
        settings = new;
        Ok(format!("{} ({report})", service::describe(&settings.services)))
    };
    let mut lost_reported = 0;
    let mut next_check = Instant::now();
    loop {
        // poll returns early on events; the signal is checked between polls
        if let Err(err) = events.poll(Duration::from_millis(100)) {
            // a signal interrupts the wait; anything else is a real failure
            if err.kind() != libbpf_rs::ErrorKind::Interrupted {
                return Err(err).context("reading events");
            }
        }
        match shutdown.next_timeout(Duration::ZERO) {
            Some(run::Request::Stop) => break,
            Some(run::Request::Reload) => run::log_reload(SUBCOMMAND, reload()),
            None => {}
        }
        if Instant::now() >= next_check {
            next_check = Instant::now() + Duration::from_secs(1);
            let totals: xdp_lb_counters = maps::sum_percpu_counters(&skel.maps.xdp_lb_counters, 0)?;
            if totals.lost_events > lost_reported {
                eprintln!(
                    "{SUBCOMMAND}: {} events lost (ring buffer full; the packets went on), {} in all",
                    totals.lost_events - lost_reported,
                    totals.lost_events
                );
                lost_reported = totals.lost_events;
            }
        }
    }
    drop(attachment);
    let _ = events.consume();
    for entry in service_report(&tables.services)?.iter().take(20) {
        eprintln!(
            "{SUBCOMMAND}: {}",
            service::summarize_service(entry, backend_counters)
        );
    }
    let totals: xdp_lb_counters = maps::sum_percpu_counters(&skel.maps.xdp_lb_counters, 0)?;
    eprintln!("{SUBCOMMAND}: {}", describe_counters(&totals));
    eprintln!("{SUBCOMMAND}: detached from {}", iface.name);
    Ok(())
}

/// Metrics read at each scrape: packets, bytes and new flows per backend and service, both
/// directions translated, the event and error counters, and the flows in the table.
fn metrics_source(skel: &XdpLbSkel<'_>) -> Result<metrics::Source> {
    let tables = Tables::of(skel)?;
    let counters_map = MapHandle::try_from(&skel.maps.xdp_lb_counters)?;
    let flows_map = MapHandle::try_from(&skel.maps.xdp_lb_flows)?;
    Ok(Arc::new(move || {
        let report = service_report(&tables.services)?;
        let mut families = metrics::service_families(
            SUBCOMMAND,
            &report,
            &[
                ("new_flows", "flows sent to the backend"),
                ("packets_in", "client packets sent to the backend"),
                ("bytes_in", "bytes of those packets"),
                ("packets_out", "backend packets sent back to the client"),
                ("bytes_out", "bytes of those packets"),
            ],
        );
        families.push(metrics::rewrites(
            SUBCOMMAND,
            &[
                ("in", metrics::report_total(&report, "packets_in")),
                ("out", metrics::report_total(&report, "packets_out")),
            ],
        ));
        let t: xdp_lb_counters = maps::sum_percpu_counters(&counters_map, 0)?;
        families.extend(metrics::counter_families(
            SUBCOMMAND,
            &[
                ("new_flows", t.new_flows, false),
                ("rerouted", t.rerouted, false),
                ("stale_replies", t.stale_replies, false),
                ("no_port", t.no_port, true),
                ("flow_failed", t.flow_failed, true),
                ("lost_events", t.lost_events, true),
                ("unattributed", t.unattributed, true),
                ("icmp_to_client", t.icmp_to_client, false),
                ("icmp_to_backend", t.icmp_to_backend, false),
            ],
        ));
        let mut flows = metrics::Family::gauge(
            "ebpf_net_xdp_lb_flows",
            "entries in the flow table (both directions)",
        );
        flows.add(&[], flows_map.keys().count() as u64);
        families.push(flows);
        Ok(families)
    }))
}

fn warn_native_veth(iface: &Interface, mode: XdpMode) {
    if mode == XdpMode::Native && iface.driver().as_deref() == Some("veth") {
        eprintln!(
            "{SUBCOMMAND}: note: native XDP on veth {} sends (XDP_TX) only to a peer that runs XDP or has GRO on (ethtool -K PEER gro on); --mode auto uses generic on veth",
            iface.name
        );
    }
}

fn persist(
    services: &[Service],
    backends: &HashMap<SocketAddr, Backend>,
    options: &Options,
    mode: XdpMode,
    iface: &Interface,
    pins: &PinDir,
) -> Result<()> {
    let fresh = !pins.exists();
    pins.create()?;
    let result = (|| -> Result<(bool, SyncReport)> {
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, Some(pins), options)?;
        // the tables are right before the (new) program sees a packet
        let report = sync(&Tables::of(&skel)?, services, backends)?;
        let link = pins.file(LINK);
        if attach::update_pinned(&skel.progs.xdp_lb, &link)? {
            return Ok((true, report));
        }
        XdpAttachment::attach(&skel.progs.xdp_lb, iface, mode)?.pin(&link)?;
        warn_native_veth(iface, mode);
        Ok((false, report))
    })();
    if result.is_err() && fresh {
        let _ = pins.remove();
    }
    let (updated, report) = result?;
    let verb = if updated { "updated in place" } else { "pinned" };
    let mode = attach::xdp_mode(iface.index).map_or("?", XdpMode::name);
    run::announce_ready(
        SUBCOMMAND,
        &format!(
            "{verb}: {} ({mode} XDP): {} ({report})",
            iface.name,
            service::describe(services)
        ),
    );
    Ok(())
}

fn service_report(tables: &ServiceTables) -> Result<Vec<Value>> {
    service::service_report(tables, |bytes| {
        let stats: xdp_lb_stats = maps::from_bytes("xdp-lb counters", bytes)?;
        let mut fields = serde_json::Map::new();
        fields.insert("new_flows".into(), json!(stats.new_flows));
        fields.insert("packets_in".into(), json!(stats.packets_in));
        fields.insert("bytes_in".into(), json!(stats.bytes_in));
        fields.insert("packets_out".into(), json!(stats.packets_out));
        fields.insert("bytes_out".into(), json!(stats.bytes_out));
        Ok(fields)
    })
}

/// Per-service totals: the sum of its backends' counters.
fn with_service_totals(mut services: Vec<Value>) -> Vec<Value> {
    for service in &mut services {
        let mut totals = serde_json::Map::new();
        for field in ["new_flows", "packets_in", "bytes_in", "packets_out", "bytes_out"] {
            let sum: u64 = service["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|backend| backend[field].as_u64().unwrap_or(0))
                .sum();
            totals.insert(field.into(), json!(sum));
        }
        service["totals"] = Value::Object(totals);
    }
    services
}

fn backend_counters(backend: &Value) -> String {
    format!(
        "{} new flows, {} packets / {} bytes in, {} packets / {} bytes out",
        backend["new_flows"],
        backend["packets_in"],
        backend["bytes_in"],
        backend["packets_out"],
        backend["bytes_out"]
    )
}

fn counters_json(totals: &xdp_lb_counters) -> Value {
    json!({
        "new_flows": totals.new_flows,
        "rerouted": totals.rerouted,
        "no_port": totals.no_port,
        "flow_failed": totals.flow_failed,
        "stale_replies": totals.stale_replies,
        "lost_events": totals.lost_events,
        "unattributed": totals.unattributed,
        "icmp_to_client": totals.icmp_to_client,
        "icmp_to_backend": totals.icmp_to_backend,
    })
}

fn describe_counters(totals: &xdp_lb_counters) -> String {
    format!(
        "flows {} new, {} rerouted; dropped: no source port {}, flow table {}; stale replies passed {}; events lost {}; ICMP errors translated {} to clients, {} to backends",
        totals.new_flows,
        totals.rerouted,
        totals.no_port,
        totals.flow_failed,
        totals.stale_replies,
        totals.lost_events,
        totals.icmp_to_client,
        totals.icmp_to_backend
    )
}

/// What `status` shows of one persisted xdp-lb directory.
pub fn describe_persisted(pins: &PinDir) -> Result<Value> {
    let tables = Tables::pinned(pins)?;
    let counters_map = MapHandle::from_pinned_path(pins.file(PIN_COUNTERS))?;
    let totals: xdp_lb_counters = maps::sum_percpu_counters(&counters_map, 0)?;
    let flows = MapHandle::from_pinned_path(pins.file(PIN_FLOWS))?;
    Ok(json!({
        "services": with_service_totals(service_report(&tables.services)?),
        "flows": flows.keys().count(),
        "max_flows": flows.max_entries(),
        "counters": counters_json(&totals),
    }))
}

pub fn summarize(details: &Value) -> String {
    let c = &details["counters"];
    format!(
        "{}; {} flows in the table, {} dropped",
        service::summarize_report(&details["services"], backend_counters),
        details["flows"],
        c["no_port"].as_u64().unwrap_or(0) + c["flow_failed"].as_u64().unwrap_or(0)
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

/// Every flow of a flow table.
pub fn flows(map: &impl MapCore) -> Result<Vec<Flow>> {
    let mut flows = Vec::new();
    for key in map.keys() {
        let Some(value) = map.lookup(&key, MapFlags::ANY)? else {
            continue;
        };
        let tuple: xdp_lb_tuple = maps::from_bytes("flow key", &key)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ports_avoid_the_ephemeral_range() {
        assert_eq!(free_ports(32768, 60999), (1024, 31744));
        assert_eq!(free_ports(1024, 40000), (40001, 25535));
        assert_eq!(free_ports(1024, 65535), (1024, 64512));
    }

    #[test]
    fn macs_split_off_backends() {
        let split = |texts: &[&str]| {
            let texts: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
            split_mac_items(&Item::flags("--service", &texts))
        };
        let (plain, macs) = split(&[
            "10.0.0.10:80=10.0.0.1:8080@02:00:00:00:00:01,10.0.0.2:8080",
            "[fd00::10]:80=[fd00::1]:80@02:00:00:00:00:03",
        ])
        .unwrap();
        assert_eq!(plain[0].text, "10.0.0.10:80=10.0.0.1:8080,10.0.0.2:8080");
        assert_eq!(plain[1].text, "[fd00::10]:80=[fd00::1]:80");
        assert_eq!(macs[&"10.0.0.1:8080".parse().unwrap()], [2, 0, 0, 0, 0, 1]);
        assert_eq!(macs.len(), 2);
        let err = split(&["10.0.0.10:80=10.0.0.1:8080@02:00:zz:00:00:01"]).unwrap_err();
        assert!(format!("{err:#}").contains("not a MAC address"), "{err:#}");
    }
}
