//! `ebpf-net lb`: an L4 load balancer on the kernel's conntrack. tc ingress creates a
//! conntrack entry with destination NAT (and by default source NAT) for the first packet of
//! each flow to a service; conntrack translates the rest of the flow both ways, but for
//! the client's packets of answered UDP flows and of established TCP flows handed over by
//! conntrack ([`Handoff`]), which lb translates and sends on itself.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::MapHandle;
use serde_json::{json, Value};

use crate::control::config::{Item, LbSection, RunOptions, Sources};
use crate::control::counters::{self, Counters};
use crate::control::lifecycle::{Applied, Datapath, Details, Report, Storage, Target};
use crate::control::run::{self, Request, Shutdown};
use crate::control::service::{self, Limits, Service, ServiceReport, ServiceTables, SyncReport};

use crate::kernel::addr::{ip_from_words, ip_to_words, Interface};
use crate::kernel::attach::{prepare_tcx, TcDirection};
use crate::kernel::maps::{self, as_bytes};
use crate::kernel::neigh::Routes;
use crate::kernel::netlink::{Ctnetlink, FlowTuple, NftablesEvents};
use crate::kernel::pin::{MapPin, OnChange, PinDir, PinSet};
use crate::kernel::skel::lb::types::{lb_ask, lb_backend, lb_counters, lb_stats, service_endpoint};
use crate::kernel::skel::lb::{LbSkel, LbSkelBuilder};
use crate::kernel::{netns, nft, probe};

pub const SUBCOMMAND: &str = "lb";
pub const PROGRAMS: &[&str] = &["lb_ingress"];
/// Every conntrack kfunc bpf/lb.c calls.
pub const KFUNCS: [&str; 7] = [
    "bpf_skb_ct_alloc",
    "bpf_skb_ct_lookup",
    "bpf_ct_insert_entry",
    "bpf_ct_release",
    "bpf_ct_set_timeout",
    "bpf_ct_change_timeout",
    "bpf_ct_set_nat_info",
];
/// include/lb.h
pub const LIMITS: Limits = Limits {
    services: 65536,
    backends_per_service: 16384,
    backends: 131072,
    macs: false,
};
const PIN_SERVICES: MapPin = MapPin {
    map: "lb_services",
    name: "services",
    // v2: keys by protocol, values with weights and affinity (include/service.h)
    version: 2,
    on_change: OnChange::Rebuild,
};
const PIN_BACKENDS: MapPin = MapPin {
    map: "lb_backends",
    name: "backends",
    version: 1,
    on_change: OnChange::Rebuild,
};
const PIN_WEIGHTS: MapPin = MapPin {
    map: "lb_weights",
    name: "weights",
    version: 1,
    on_change: OnChange::Rebuild,
};
const PIN_STATS: MapPin = MapPin {
    map: "lb_stats",
    name: "stats",
    version: 1,
    on_change: OnChange::Rebuild,
};
const PIN_COUNTERS: MapPin = MapPin {
    map: "lb_counters",
    name: "counters",
    // v2, v3, v4 (refused), v5 (forwarded), v6 (TCP sent on): more counters (include/lb.h)
    version: 6,
    on_change: OnChange::Rebuild,
};
/// Session affinity: (service, client address) -> backend; an LRU of the program's own.
const PIN_AFFINITY: MapPin = MapPin {
    map: "lb_affinity",
    name: "affinity",
    version: 1,
    on_change: OnChange::Rebuild,
};
/// include/lb.h LB_DEFAULT_FLOOD_RATE
pub const DEFAULT_FLOOD_RATE: u32 = 40_000;
/// include/lb.h LB_UDP_TIMEOUT_MS, LB_UDP_STREAM_TIMEOUT_MS, LB_TCP_ESTABLISHED_TIMEOUT_MS:
/// conntrack's defaults
const LB_UDP_TIMEOUT_MS: u32 = 30_000;
const LB_UDP_STREAM_TIMEOUT_MS: u32 = 120_000;
const LB_TCP_ESTABLISHED_TIMEOUT_MS: u32 = 432_000_000;
/// include/lb.h LB_HALF_OPEN_S: conntrack's SYN_SENT and SYN_RECV timeouts in the namespace
/// while lb runs, when they were longer.
pub const HALF_OPEN_S: u32 = 60;
/// The conntrack timeouts of half-open TCP flows lb shortens: (name in the record, sysctl).
const HALF_OPEN_TIMEOUTS: [(&str, &str); 2] = [
    (
        "tcp-syn-sent",
        "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_syn_sent",
    ),
    (
        "tcp-syn-recv",
        "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_syn_recv",
    ),
];
/// The nft table (family inet) lb adds when this namespace lacks conntrack and NAT hooks.
/// Its comment records what lb changed, so the last lb to stop can undo exactly that.
pub const NFT_TABLE: &str = "ebpf_net_lb";

// SAFETY: a plain C struct of integers from include/lb.h.
unsafe impl plain::Plain for lb_backend {}
// SAFETY: a plain C struct of integers from include/lb.h.
unsafe impl plain::Plain for lb_ask {}

crate::declare_counters!(
    lb_stats,
    "lb_stats",
    [(
        new_flows,
        Traffic,
        "flows given a conntrack entry towards the backend"
    ),]
);

crate::declare_counters!(
    lb_counters,
    "lb_counters",
    [
        (new_flows, Event, "conntrack entries created"),
        (
            known_flows,
            Event,
            "flow openers conntrack already knew (SYN retransmits, later UDP)"
        ),
        (
            reopened,
            Event,
            "SYNs on a closed connection's entry, replaced by a new one"
        ),
        (alloc_failed, Error, "bpf_skb_ct_alloc returned nothing"),
        (nat_failed, Error, "bpf_ct_set_nat_info failed"),
        (
            insert_failed,
            Error,
            "no entry (source NAT ports all taken): dropped"
        ),
        (insert_raced, Event, "another CPU inserted the same flow first"),
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
            ports_low_dropped,
            Error,
            "first packets of new flows dropped: source-NAT ports towards the backend low"
        ),
        (
            ports_low_admitted,
            Event,
            "new flows made with ports low for a client that asked again"
        ),
        (
            refused,
            Event,
            "new flows to a service without a usable backend, answered with an RST or ICMP port unreachable"
        ),
        (
            forwarded,
            Event,
            "datagrams of UDP flows answered both ways, translated and sent to the next hop by lb itself"
        ),
        (
            tcp_forwarded,
            Event,
            "segments of established TCP flows translated and sent to the next hop by lb itself"
        ),
        (
            tcp_tracked,
            Event,
            "segments of established TCP flows whose windows conntrack still checks: passed to the stack"
        ),
        (
            asked,
            Event,
            "asks to stop conntrack checking an established TCP flow's windows"
        ),
        (
            asks_lost,
            Error,
            "asks the ring buffer had no room for (the flow asks again)"
        ),
    ]
);

crate::endpoint_conversions!(service_endpoint);

#[derive(clap::Args, Debug)]
pub struct LbArgs {
    /// interface the clients' packets arrive on
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub iface: Option<String>,
    /// VIP:PORT=BACKEND:PORT[,BACKEND:PORT...], repeatable; TCP and UDP; IPv6 in brackets
    #[arg(long = "service", value_name = "VIP=BACKENDS", value_parser = service::service_flag)]
    pub services: Vec<Service>,
    /// keep the client's address towards the backends (for a load balancer that is their
    /// gateway); by default the source becomes this node's address towards each backend
    #[arg(long)]
    pub no_snat: bool,
    /// new flows per second per CPU above which lb is under flood: a new flow then gets a
    /// conntrack entry only when its client sends its first packet again (0: never)
    /// [default: 40000]
    #[arg(long, value_name = "N")]
    pub flood_rate: Option<u32>,
    /// attach, pin under /sys/fs/bpf/ebpf-net/lb/, print ready and exit; run again to update
    /// the services in place
    #[arg(long)]
    pub persist: bool,
    #[command(flatten)]
    pub run: RunOptions,
}

crate::run_args!(LbArgs);

/// What flags and config file say together.
#[derive(Debug, PartialEq, Eq)]
pub struct Settings {
    iface: Item,
    /// shared with the plan: 10,000 services are not copied for it
    services: Arc<Vec<Service>>,
    no_snat: bool,
    flood_rate: u32,
}

impl Settings {
    fn read(args: &LbArgs) -> Result<Self> {
        let file = Sources::<LbSection>::read(&args.run)?;
        Ok(Self {
            iface: file.interface(args.iface.as_ref())?,
            services: Arc::new(file.services(&args.services, LIMITS)?),
            no_snat: args.no_snat || file.value(None, |s| s.no_snat, false),
            flood_rate: file.value(args.flood_rate, |s| s.flood_rate, DEFAULT_FLOOD_RATE),
        })
    }

    /// The settings of a program that drives lb (the Kubernetes agent): `services` on
    /// `iface`, everything else as without flags.
    pub fn driven(iface: &str, services: Vec<Service>) -> Result<Self> {
        Ok(Self {
            iface: Item::flags("-i", &[iface.to_string()]).remove(0),
            services: Arc::new(service::check_services(services, LIMITS)?),
            no_snat: false,
            flood_rate: DEFAULT_FLOOD_RATE,
        })
    }

    /// What a reload may change live: the services; the rest needs a restart.
    fn check_reload(&self, new: &Self) -> Result<()> {
        if new.iface.text != self.iface.text {
            bail!(
                "the interface changed ({} -> {}); that needs a restart",
                self.iface.text,
                new.iface.text
            );
        }
        if new.no_snat != self.no_snat || new.flood_rate != self.flood_rate {
            bail!("no-snat or flood-rate changed; that needs a restart");
        }
        Ok(())
    }
}

/// Each backend's table value, its endpoint and the source NAT address towards it, looked
/// up when the table needs it: a re-run that changes one backend of 100,000 asks the kernel
/// about that one.
struct BackendValues {
    routes: RefCell<Routes>,
    sources: RefCell<HashMap<IpAddr, IpAddr>>,
    snat: bool,
}

impl BackendValues {
    fn new(snat: bool) -> Result<Self> {
        Ok(Self {
            routes: RefCell::new(Routes::new()?),
            sources: RefCell::new(HashMap::new()),
            snat,
        })
    }

    /// Appends the table value of `backend` to `out`; `snat` false: its service keeps the
    /// client's address.
    fn value(&self, backend: SocketAddr, snat: bool, out: &mut Vec<u8>) -> Result<()> {
        if !(self.snat && snat) {
            let value = lb_backend {
                endpoint: backend.into(),
                snat_addr: [0; 4],
            };
            out.extend_from_slice(as_bytes(&value));
            return Ok(());
        }
        let ip = backend.ip();
        let known = self.sources.borrow().get(&ip).copied();
        let source = match known {
            Some(source) => source,
            None => {
                let source = self.routes.borrow_mut().source_towards(ip)?;
                self.sources.borrow_mut().insert(ip, source);
                source
            }
        };
        let value = lb_backend {
            endpoint: backend.into(),
            snat_addr: ip_to_words(source).1,
        };
        out.extend_from_slice(as_bytes(&value));
        Ok(())
    }
}

/// This namespace's own addresses: a backend at one of them needs no forwarding.
fn local_addresses() -> Result<HashSet<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing this namespace's addresses")?;
    Ok(addrs
        .filter_map(|ifaddr| {
            let addr = ifaddr.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect())
}

fn load<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    pins: Option<&mut PinSet>,
    flood_rate: u32,
) -> Result<LbSkel<'obj>> {
    let mut open = LbSkelBuilder::default()
        .open(storage)
        .context("opening the lb program")?;
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .expect("lb.c declares constants");
    rodata.hash_seed = crate::kernel::random_seed()?;
    rodata.flood_rate = flood_rate;
    let (udp, stream, established) = timeouts_ms();
    rodata.udp_timeout_ms = udp;
    rodata.udp_stream_timeout_ms = stream;
    rodata.tcp_established_timeout_ms = established;
    // IPv6 datagrams are forwarded past the stack only where the checksum helper knows IPv6
    rodata.l4_csum_ipv6_flag = probe::l4_csum_ipv6_flag();
    prepare_tcx(&mut open.progs.lb_ingress, TcDirection::Ingress);
    if let Some(pins) = pins {
        pins.prepare(open.open_object_mut(), SUBCOMMAND, PINS)?;
    }
    open.load().context("loading the lb program")
}

/// This namespace's conntrack timeouts of a UDP flow that saw a reply, of a stream and of an
/// established TCP flow, in ms: lb refreshes them on the packets it sends on itself, as
/// conntrack does on those it sees. The kernel's defaults where conntrack is not loaded yet
/// or the sysctls cannot be read.
fn timeouts_ms() -> (u32, u32, u32) {
    let read = |name: &str, default: u32| {
        std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .map_or(default, |seconds| seconds.saturating_mul(1000))
    };
    (
        read("nf_conntrack_udp_timeout", LB_UDP_TIMEOUT_MS),
        read("nf_conntrack_udp_timeout_stream", LB_UDP_STREAM_TIMEOUT_MS),
        read(
            "nf_conntrack_tcp_timeout_established",
            LB_TCP_ESTABLISHED_TIMEOUT_MS,
        ),
    )
}

/// Loads the program with `services` installed, nothing attached; for benchmarks. Each
/// backend needs a route from this namespace (its source NAT address is looked up).
pub fn load_with_services<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    services: &[Service],
    snat: bool,
) -> Result<LbSkel<'obj>> {
    // no flood detector: benchmarks and fuzzing make new flows fast on purpose
    let skel = load(storage, None, 0)?;
    sync(&tables(&skel)?, services, &BackendValues::new(snat)?)?;
    Ok(skel)
}

fn tables(skel: &LbSkel<'_>) -> Result<ServiceTables> {
    Ok(ServiceTables::new(
        MapHandle::try_from(&skel.maps.lb_services)?,
        MapHandle::try_from(&skel.maps.lb_backends)?,
        MapHandle::try_from(&skel.maps.lb_weights)?,
        MapHandle::try_from(&skel.maps.lb_stats)?,
    ))
}

fn sync(tables: &ServiceTables, services: &[Service], values: &BackendValues) -> Result<SyncReport> {
    service::sync_services(tables, services, |service, backend, out| {
        values.value(backend, !service.keep_source, out)
    })
}

/// What lb changed in this namespace, as recorded in its nft table's comment.
fn recorded_changes() -> Option<Vec<String>> {
    Some(changes_in(&nft::run(&["list", "table", "inet", NFT_TABLE]).ok()?))
}

/// The changes a listing of lb's table records in its comment.
fn changes_in(listing: &str) -> Vec<String> {
    let comment = listing
        .lines()
        .find_map(|line| line.trim().strip_prefix("comment \""))
        .map(|rest| rest.trim_end_matches('"').to_string())
        .unwrap_or_default();
    comment.split_whitespace().map(str::to_string).collect()
}

/// Which hooks this namespace still lacks for `families` ("ip" / "ip6"): NAT (nat chains
/// at prerouting and postrouting) and conntrack (a rule using `ct` or NAT in one of those
/// chains). Lists chains, then only the rules of nat base chains: listing a whole ruleset
/// of a busy node (thousands of service chains) takes seconds.
fn missing_hooks(families: &[&str]) -> Result<(bool, bool)> {
    let chains = nft::run(&["-j", "list", "chains"])?;
    let chains: Value = serde_json::from_str(&chains).context("parsing `nft -j list chains`")?;
    let nat_chains: Vec<Value> = chains["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("chain"))
        .filter(|chain| chain["type"] == "nat")
        .cloned()
        .collect();
    let covers = |family: &str, hook: &str| {
        nat_chains
            .iter()
            .any(|chain| chain["hook"] == hook && (chain["family"] == family || chain["family"] == "inet"))
    };
    let need_nat = !families
        .iter()
        .all(|family| covers(family, "prerouting") && covers(family, "postrouting"));
    let need_conntrack = !nat_chains.iter().any(|chain| {
        let listed = nft::run(&[
            "-j",
            "list",
            "chain",
            chain["family"].as_str().unwrap_or_default(),
            chain["table"].as_str().unwrap_or_default(),
            chain["name"].as_str().unwrap_or_default(),
        ])
        .unwrap_or_default();
        [
            "{\"ct\":",
            "{\"dnat\":",
            "{\"snat\":",
            "{\"masquerade\":",
            "{\"redirect\":",
        ]
        .iter()
        .any(|expr| listed.contains(expr))
    });
    Ok((need_nat, need_conntrack))
}

const FORWARDING: [(&str, &str, bool); 2] = [
    ("ipv4-forwarding", "/proc/sys/net/ipv4/ip_forward", true),
    ("ipv6-forwarding", "/proc/sys/net/ipv6/conf/all/forwarding", false),
];
/// What lb changed beside forwarding: the nat chains (and a `ct` rule) of its table.
const NAT_HOOKS: &str = "nat-hooks";

/// What lb changed in one namespace, written before each change is made, in a file of its
/// own: a flushed ruleset takes the table (and its comment) but not this, so lb can put the
/// table back and the last lb can still restore forwarding.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceChanges {
    /// "ipv4-forwarding", "ipv6-forwarding", "nat-hooks": each was off or missing before lb
    pub changed: Vec<String>,
    /// times lb found its table or chains removed by someone and re-created them
    #[serde(default)]
    pub repairs: u64,
}

impl NamespaceChanges {
    fn path(netns_key: &str) -> std::path::PathBuf {
        std::path::Path::new(crate::control::instance::RUN_ROOT)
            .join(SUBCOMMAND)
            .join(netns_key)
            .join("namespace.changes")
    }

    /// The record of a namespace; an older lb's table comment when it left no file.
    pub fn read(netns_key: &str) -> Option<Self> {
        match std::fs::read_to_string(Self::path(netns_key)) {
            Ok(text) => serde_json::from_str(&text).ok(),
            Err(_) => recorded_changes().map(|changed| Self { changed, repairs: 0 }),
        }
    }

    /// Written whole (a new file renamed over the old) so a kill never leaves half of it.
    fn write(&self, netns_key: &str) -> Result<()> {
        let path = Self::path(netns_key);
        let dir = path.parent().expect("record path has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let fresh = path.with_extension(format!("new{}", std::process::id()));
        std::fs::write(&fresh, serde_json::to_string(self)?)
            .with_context(|| format!("writing {}", fresh.display()))?;
        std::fs::rename(&fresh, &path).with_context(|| format!("writing {}", path.display()))
    }

    fn remove(netns_key: &str) {
        let path = Self::path(netns_key);
        let _ = std::fs::remove_file(&path);
        for dir in path.ancestors().skip(1).take(3) {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }

    fn has(&self, name: &str) -> bool {
        self.changed.iter().any(|change| change == name)
    }

    fn add(&mut self, name: &str) {
        if !self.has(name) {
            self.changed.push(name.to_string());
        }
    }
}

/// Whether lb's table is there as `record` wants it: the comment, and the nat chains when
/// lb added them.
fn table_in_place(record: &NamespaceChanges) -> bool {
    let Ok(listing) = nft::run(&["list", "table", "inet", NFT_TABLE]) else {
        return false;
    };
    let comment_ok = changes_in(&listing) == record.changed;
    let chains_ok = !record.has(NAT_HOOKS)
        || (listing.contains("chain prerouting")
            && listing.contains("chain postrouting")
            && listing.contains("ct state invalid"));
    comment_ok && chains_ok
}

/// Writes lb's table as `record` says, replacing whatever is there in one transaction (a
/// table's comment cannot be changed in place): the nat hooks never go missing meanwhile.
fn write_table(record: &NamespaceChanges) -> Result<()> {
    // Any rule using ct makes the namespace track connections; in a nat chain it only ever
    // sees a flow's first packet, so it costs nothing per packet.
    let chains = if record.has(NAT_HOOKS) {
        "  chain prerouting { type nat hook prerouting priority dstnat; policy accept; ct state invalid counter; }\n  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n"
    } else {
        ""
    };
    nft::apply(&format!(
        "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n  comment \"{}\"\n{chains}}}\n",
        record.changed.join(" ")
    ))
}

/// Puts lb's table back when someone removed it or its chains; the log line, or nothing.
/// Foreground runs call it periodically, every run and reload through [`prepare_namespace`].
pub fn repair_namespace(netns_key: &str) -> Result<Option<String>> {
    let Some(mut record) = NamespaceChanges::read(netns_key) else {
        return Ok(None);
    };
    if record.changed.is_empty() || table_in_place(&record) {
        return Ok(None);
    }
    record.repairs += 1;
    record.write(netns_key)?;
    write_table(&record)?;
    Ok(Some(format!(
        "nft table inet {NFT_TABLE} or its chains were removed by someone: re-created it (repair {})",
        record.repairs
    )))
}

/// Makes this namespace apply the entries lb creates: conntrack and NAT hooks (an nft table,
/// only if none registers them yet) and forwarding towards backends that are not local (only
/// if off). Every change is recorded (file and table comment) before it is made, on every
/// path: first run, re-run, reload, a second lb. Returns what it did, for the log.
fn prepare_namespace(services: &[Service], netns_key: &str) -> Result<Vec<String>> {
    let local = local_addresses()?;
    let mut log = Vec::new();
    let before = NamespaceChanges::read(netns_key);
    let mut record = before.clone().unwrap_or_default();
    let mut enable = Vec::new();
    for (name, path, v4) in FORWARDING {
        let forwards = services
            .iter()
            .filter(|svc| svc.vip.is_ipv4() == v4)
            .flat_map(|svc| svc.backends.iter())
            .any(|backend| !local.contains(&backend.addr.ip()));
        if !forwards {
            continue;
        }
        let family = if v4 { "IPv4" } else { "IPv6" };
        let value = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        if value.trim() == "0" {
            record.add(name);
            enable.push((path, family));
        } else {
            log.push(format!("{family} forwarding already on"));
        }
    }

    let mut added_hooks = None;
    if record.has(NAT_HOOKS) {
        log.push(format!(
            "conntrack and NAT hooks: table inet {NFT_TABLE} already there ({})",
            record.changed.join(" ")
        ));
    } else {
        let mut families = Vec::new();
        if services.iter().any(|svc| svc.vip.is_ipv4()) {
            families.push("ip");
        }
        if services.iter().any(|svc| svc.vip.is_ipv6()) {
            families.push("ip6");
        }
        let (need_nat, need_conntrack) = missing_hooks(&families).context("conntrack and NAT hooks")?;
        if need_nat || need_conntrack {
            record.add(NAT_HOOKS);
            added_hooks = Some(match (need_nat, need_conntrack) {
                (true, true) => "conntrack and NAT hooks",
                (true, false) => "NAT hooks (conntrack was on)",
                _ => "conntrack (NAT hooks were there)",
            });
        } else {
            log.push("conntrack and NAT hooks already registered in this namespace; added none".into());
        }
    }

    // The first SYN resets an entry lb made to conntrack's SYN_SENT timeout (120 s by
    // default), so a spoofed SYN holds a source-NAT port that long: shorten half-open life
    // in this namespace (include/lb.h LB_HALF_OPEN_S), as Cilium's CT_SYN_TIMEOUT does.
    let mut shorten = Vec::new();
    for (name, path) in HALF_OPEN_TIMEOUTS {
        let Ok(value) = std::fs::read_to_string(path) else {
            log.push(format!("no {path}: half-open TCP flows keep conntrack's timeout"));
            continue;
        };
        let value: u32 = value.trim().parse().with_context(|| format!("reading {path}"))?;
        let prefix = format!("{name}=");
        if value > HALF_OPEN_S && !record.changed.iter().any(|c| c.starts_with(&prefix)) {
            record.add(&format!("{name}={value}"));
            shorten.push((name, path, value));
        }
    }

    // the record first: a kill from here on leaves nothing the last lb cannot undo
    if before.as_ref() != Some(&record) && !record.changed.is_empty() {
        record.write(netns_key)?;
    }
    if !record.changed.is_empty() && !table_in_place(&record) {
        let was_there = before.as_ref().is_some_and(|b| b.has(NAT_HOOKS));
        if was_there && nft::run(&["list", "table", "inet", NFT_TABLE]).is_err() {
            record.repairs += 1;
            record.write(netns_key)?;
            log.push(format!(
                "nft table inet {NFT_TABLE} was removed by someone: re-created it (repair {})",
                record.repairs
            ));
        }
        write_table(&record)?;
    }
    if let Some(what) = added_hooks {
        log.push(format!(
            "registered {what}: nft table inet {NFT_TABLE} (removed when the last lb stops)"
        ));
    }
    for (name, path, value) in shorten {
        std::fs::write(path, HALF_OPEN_S.to_string()).with_context(|| format!("shortening {path}"))?;
        log.push(format!(
            "conntrack's {name} timeout {value} s -> {HALF_OPEN_S} s in this namespace (restored when the last lb stops)"
        ));
    }
    for (path, family) in enable {
        std::fs::write(path, "1").with_context(|| format!("enabling {family} forwarding ({path})"))?;
        log.push(format!(
            "enabled {family} forwarding in this namespace: backends are behind it (off again when the last lb stops)"
        ));
    }
    Ok(log)
}

/// Undoes what lb changed in this namespace, once no lb is left in it: forwarding it
/// enabled and its nft table.
pub fn release_namespace(netns_key: &str) -> Result<Vec<String>> {
    let persisted = PinDir::all()
        .into_iter()
        .any(|pins| pins.subcommand == SUBCOMMAND && pins.netns == netns_key);
    let attached = Interface::all().iter().any(|iface| {
        crate::kernel::tc::tc_programs(iface.index, TcDirection::Ingress)
            .unwrap_or_default()
            .iter()
            .any(|prog| PROGRAMS.contains(&prog.name.as_str()))
    });
    let Some(record) = NamespaceChanges::read(netns_key) else {
        return Ok(Vec::new());
    };
    if persisted || attached {
        return Ok(vec![format!(
            "another lb still runs here: kept nft table inet {NFT_TABLE}"
        )]);
    }
    let mut log = Vec::new();
    for (name, path, v4) in FORWARDING {
        if record.has(name) {
            std::fs::write(path, "0").with_context(|| format!("restoring {path}"))?;
            log.push(format!(
                "turned {} forwarding off again",
                if v4 { "IPv4" } else { "IPv6" }
            ));
        }
    }
    for (name, path) in HALF_OPEN_TIMEOUTS {
        let recorded = record
            .changed
            .iter()
            .find_map(|change| change.strip_prefix(name)?.strip_prefix('='));
        let Some(previous) = recorded else { continue };
        // someone set it since: theirs stays
        let current = std::fs::read_to_string(path).unwrap_or_default();
        if current.trim() == HALF_OPEN_S.to_string() {
            std::fs::write(path, previous).with_context(|| format!("restoring {path}"))?;
            log.push(format!("conntrack's {name} timeout back to {previous} s"));
        }
    }
    if nft::run(&["list", "table", "inet", NFT_TABLE]).is_ok() {
        nft::run(&["delete", "table", "inet", NFT_TABLE])?;
        log.push(format!("removed nft table inet {NFT_TABLE}"));
    }
    // last: a kill before this leaves the record for `down` to finish from
    NamespaceChanges::remove(netns_key);
    Ok(log)
}

/// The lb datapath on the lifecycle.
pub struct Lb;

/// What an lb run works from: the settings, and each backend's table value.
pub struct Plan {
    settings: Settings,
}

/// Every map pinned with `--persist`.
const PINS: &[MapPin] = &[
    PIN_SERVICES,
    PIN_BACKENDS,
    PIN_WEIGHTS,
    PIN_STATS,
    PIN_COUNTERS,
    PIN_AFFINITY,
];

/// The maps a report reads.
pub struct View {
    tables: ServiceTables,
    counters: MapHandle,
    /// the namespace whose record (nft repairs) the report shows
    netns: String,
}

/// How often a foreground lb checks that its nft table and chains are still there.
pub const CHECK_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

impl Datapath for Lb {
    const NAME: &'static str = SUBCOMMAND;
    const PROGRAMS: &'static [&'static str] = PROGRAMS;
    type Args = LbArgs;
    type Desired = Settings;
    type Plan = Plan;
    type Loaded<'obj> = LbSkel<'obj>;
    type View = View;

    fn desired(args: &LbArgs) -> Result<Settings> {
        Settings::read(args)
    }
    fn target(desired: &Settings) -> Result<Target> {
        Target::interface(&desired.iface)
    }
    fn check_kernel() -> Result<()> {
        probe::require_kfuncs(SUBCOMMAND, &KFUNCS)
    }
    fn plan(desired: &Settings, target: &Target, _persist: bool) -> Result<Plan> {
        super::shared_vips::refuse_served_elsewhere(SUBCOMMAND, target.iface(), &desired.services)?;
        Ok(Plan {
            settings: Settings {
                iface: desired.iface.clone(),
                services: Arc::clone(&desired.services),
                no_snat: desired.no_snat,
                flood_rate: desired.flood_rate,
            },
        })
    }
    fn load<'obj>(
        storage: &'obj mut Storage,
        plan: &Plan,
        pins: Option<&mut PinSet>,
    ) -> Result<LbSkel<'obj>> {
        load(&mut storage[0], pins, plan.settings.flood_rate)
    }
    fn apply(skel: &LbSkel<'_>, plan: &Plan) -> Result<Applied> {
        let values = BackendValues::new(!plan.settings.no_snat)?;
        let report = sync(&tables(skel)?, &plan.settings.services, &values)?;
        let netns_key = netns::current_key()?;
        let log = prepare_namespace(&plan.settings.services, &netns_key)?;
        // the table is in place as the record says once prepared: no need to list it again
        let leaves = NamespaceChanges::read(&netns_key)
            .filter(|record| !record.changed.is_empty())
            .map(|record| {
                vec![format!(
                    "nft table inet {NFT_TABLE} ({})",
                    record.changed.join(" ")
                )]
            })
            .unwrap_or_default();
        Ok(Applied {
            log,
            leaves,
            ..Applied::synced(report)
        })
    }
    fn attach(skel: &LbSkel<'_>, target: &Target, _plan: &Plan) -> Result<Vec<Box<dyn std::any::Any>>> {
        let attachment =
            crate::kernel::tc::attach_tc(&skel.progs.lb_ingress, target.iface(), TcDirection::Ingress)?;
        Ok(vec![attachment])
    }
    fn attach_pinned(skel: &LbSkel<'_>, target: &Target, pins: &PinDir, _plan: &Plan) -> Result<bool> {
        crate::kernel::tc::attach_or_update_pinned_tc(
            &skel.progs.lb_ingress,
            target.iface(),
            TcDirection::Ingress,
            &pins.link_file(TcDirection::Ingress),
        )
    }
    fn desired_maps() -> &'static [MapPin] {
        &[PIN_SERVICES, PIN_BACKENDS, PIN_WEIGHTS]
    }
    fn objects<'a>(skel: &'a LbSkel<'_>) -> Vec<(&'a libbpf_rs::Object, &'static [MapPin])> {
        vec![(skel.object(), PINS)]
    }
    fn check_reload(old: &Settings, new: &Settings) -> Result<()> {
        old.check_reload(new)
    }
    fn describe(desired: &Settings, _target: &Target, _plan: &Plan) -> String {
        format!(
            "{}{}",
            service::describe(&desired.services),
            snat_note(desired.no_snat)
        )
    }
    fn view(skel: &LbSkel<'_>) -> Result<View> {
        Ok(View {
            tables: tables(skel)?,
            counters: MapHandle::try_from(&skel.maps.lb_counters)?,
            netns: netns::current_key()?,
        })
    }
    fn view_pinned(pins: &PinDir) -> Result<View> {
        Ok(View {
            tables: ServiceTables::pinned(pins, [PIN_SERVICES, PIN_BACKENDS, PIN_WEIGHTS, PIN_STATS])?,
            counters: pins.open_map(&PIN_COUNTERS)?,
            netns: pins.netns.clone(),
        })
    }
    fn report(view: &View) -> Result<Report> {
        let services: Vec<ServiceReport<lb_stats>> = service::service_report(&view.tables)?;
        let totals: lb_counters = maps::sum_percpu_counters(&view.counters, 0)?;
        let mut families = counters::service_families(SUBCOMMAND, &services);
        families.extend(crate::control::health::families(SUBCOMMAND));
        families.extend(counters::event_families(SUBCOMMAND, &totals));
        let mut exit: Vec<String> = services
            .iter()
            .take(20)
            .map(|service| service.summary(backend_words))
            .collect();
        exit.push(describe_counters(&totals));
        let repairs = NamespaceChanges::read(&view.netns).map_or(0, |record| record.repairs);
        let repaired = if repairs > 0 {
            format!("; nft table inet {NFT_TABLE} re-created {repairs} times (someone removed it)")
        } else {
            String::new()
        };
        Ok(Report {
            on_detach: None,
            summary: format!(
                "{}; conntrack entries created {}, failed {}{repaired}",
                service::summarize_report(&services, backend_words),
                totals.new_flows,
                totals.total_of(counters::Kind::Error)
            ),
            families,
            exit,
            details: Details::later(move || {
                json!({
                    "services": services.iter().map(ServiceReport::json).collect::<Vec<_>>(),
                    "health": crate::control::health::snapshot(),
                    "counters": totals.json(),
                    "nft_table_repairs": repairs,
                })
            }),
        })
    }
    fn release(netns_key: &str) -> Result<Vec<String>> {
        release_namespace(netns_key)
    }
    fn beside_driven(skel: &LbSkel<'_>) -> Result<Option<Box<dyn std::any::Any>>> {
        Ok(Some(Box::new(DrivenAnswers::start(skel)?)))
    }
    /// Serves signals; each second logs a line when a flood or low source ports dropped
    /// first packets. Puts the nft table back the moment someone removes it (nftables'
    /// notifications), and checks it every CHECK_PERIOD besides. Answers the asks of
    /// established TCP flows (conntrack stops checking their windows: [`Handoff`]).
    fn serve(
        skel: &LbSkel<'_>,
        shutdown: &Shutdown,
        reload: &mut dyn FnMut(Request) -> Result<String>,
    ) -> Result<()> {
        let netns_key = netns::current_key()?;
        let repairs = Repairs::default();
        let watch = repairs.clone();
        let watched = netns_key.clone();
        std::thread::spawn(move || watch_table(&watched, &watch));
        let _stop = StopRepairs(repairs.clone());
        let mut answerer = Answerer::new(&skel.maps.lb_asks, &skel.maps.lb_answered_until)?;
        let mut last = lb_counters::default();
        let mut next_second = Instant::now();
        let mut next_check = Instant::now() + CHECK_PERIOD;
        loop {
            // returns early on asks; the signal is checked between polls
            answerer.poll(Duration::from_millis(100))?;
            match shutdown.next_timeout(Duration::ZERO) {
                Some(Request::Stop) => {
                    eprintln!("{SUBCOMMAND}: {}", answerer.finish());
                    return Ok(());
                }
                Some(request @ (Request::Reload | Request::Health)) => {
                    let _one = repairs.lock();
                    run::log_reload(SUBCOMMAND, request, reload(request))
                }
                None => {}
            }
            if Instant::now() < next_second {
                continue;
            }
            next_second = Instant::now() + Duration::from_secs(1);
            let now: lb_counters = maps::sum_percpu_counters(&skel.maps.lb_counters, 0)?;
            if let Some(line) = pressure_line(&last, &now) {
                eprintln!("{SUBCOMMAND}: {line}");
            }
            last = now;
            if Instant::now() >= next_check {
                next_check = Instant::now() + CHECK_PERIOD;
                let _one = repairs.lock();
                log_repair(repair_namespace(&netns_key));
            }
        }
    }
}

/// The answers to established TCP flows' asks: conntrack stops checking each one's windows
/// (ctnetlink), and lb sends its segments on past the stack from then on (bpf/lb.c
/// offloaded_translation). A flow asks again until that happens; one answer a second each,
/// and at most [`ANSWERS_PER_SECOND`] in all (many connections asking at once cost this run
/// one netlink round trip each: past that their segments stay conntrack's a while longer).
struct Handoff {
    conntrack: Option<Ctnetlink>,
    answered: HashMap<FlowTuple, Instant>,
    window: Instant,
    in_window: u64,
    handed: u64,
    gone: u64,
    failed: u64,
    over_budget: u64,
}

/// Answers to asks a second at most.
const ANSWERS_PER_SECOND: u64 = 20_000;

impl Handoff {
    fn open() -> Self {
        let conntrack = Ctnetlink::open()
            .map_err(|err| {
                eprintln!(
                    "{SUBCOMMAND}: no conntrack netlink socket ({err}): conntrack keeps every TCP flow's segments"
                )
            })
            .ok();
        Self {
            conntrack,
            answered: HashMap::new(),
            window: Instant::now(),
            in_window: 0,
            handed: 0,
            gone: 0,
            failed: 0,
            over_budget: 0,
        }
    }

    fn answer(&mut self, ask: &lb_ask) {
        let Some(conntrack) = self.conntrack.as_mut() else {
            return;
        };
        let flow = FlowTuple {
            src: SocketAddr::new(ip_from_words(ask.family, ask.saddr), u16::from_be(ask.sport)),
            dst: SocketAddr::new(ip_from_words(ask.family, ask.daddr), u16::from_be(ask.dport)),
            proto: ask.proto,
        };
        let now = Instant::now();
        if self
            .answered
            .get(&flow)
            .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(1))
        {
            return;
        }
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            // a new second: the answers of the one before may be given again
            self.window = now;
            self.in_window = 0;
            self.answered
                .retain(|_, at| now.duration_since(*at) < Duration::from_secs(1));
        }
        if self.in_window >= ANSWERS_PER_SECOND {
            self.over_budget += 1;
            return;
        }
        self.in_window += 1;
        self.answered.insert(flow, now);
        match conntrack.be_liberal(&flow) {
            Ok(()) => self.handed += 1,
            // closed meanwhile
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => self.gone += 1,
            Err(err) => {
                if self.failed == 0 {
                    eprintln!(
                        "{SUBCOMMAND}: conntrack refused to stop checking the windows of {} -> {}: {err} (conntrack keeps its segments)",
                        flow.src, flow.dst
                    );
                }
                self.failed += 1;
            }
        }
    }

    fn summary(&self) -> String {
        format!(
            "TCP flows handed over by conntrack {} (asks for entries already gone {}, refused {}, past {ANSWERS_PER_SECOND} a second {})",
            self.handed, self.gone, self.failed, self.over_budget
        )
    }
}

/// A run's answers to asks: reads the ring buffer, hands each asking flow over, renews the
/// promise to answer every second and withdraws it when dropped.
struct Answerer<'a> {
    asks: libbpf_rs::RingBuffer<'a>,
    handoff: std::rc::Rc<RefCell<Handoff>>,
    /// None: no conntrack socket, so nothing could be answered; no promise, flows do not ask
    answering: Option<Answering<'a>>,
    renew_at: Instant,
}

impl<'a> Answerer<'a> {
    fn new(asks: &'a dyn libbpf_rs::MapCore, until: &'a dyn libbpf_rs::MapCore) -> Result<Self> {
        let handoff = std::rc::Rc::new(RefCell::new(Handoff::open()));
        let answers = handoff.clone();
        let mut builder = libbpf_rs::RingBufferBuilder::new();
        builder.add(asks, move |data: &[u8]| {
            if let Ok(ask) = maps::from_bytes::<lb_ask>("ask", data) {
                answers.borrow_mut().answer(&ask);
            }
            0
        })?;
        let answering = handoff.borrow().conntrack.is_some().then_some(Answering(until));
        answering.as_ref().map(Answering::renew).transpose()?;
        Ok(Self {
            asks: builder.build()?,
            handoff,
            answering,
            renew_at: Instant::now() + Duration::from_secs(1),
        })
    }

    /// Answers what asks within `timeout` (returning early on asks or a signal).
    fn poll(&mut self, timeout: Duration) -> Result<()> {
        if let Err(err) = self.asks.poll(timeout) {
            // a signal interrupts the wait; anything else is a real failure
            if err.kind() != libbpf_rs::ErrorKind::Interrupted {
                return Err(err).context("reading asks");
            }
        }
        if Instant::now() >= self.renew_at {
            self.renew_at = Instant::now() + Duration::from_secs(1);
            self.answering.as_ref().map(Answering::renew).transpose()?;
        }
        Ok(())
    }

    /// Answers what is left; the line that says what was handed over.
    fn finish(&self) -> String {
        let _ = self.asks.consume();
        self.handoff.borrow().summary()
    }
}

/// The answers of a run the Kubernetes agent drives, on a thread of their own beside the
/// driver's updates (lifecycle::Datapath::beside_driven), stopped and joined when dropped.
struct DrivenAnswers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DrivenAnswers {
    fn start(skel: &LbSkel<'_>) -> Result<Self> {
        let asks = MapHandle::try_from(&skel.maps.lb_asks)?;
        let until = MapHandle::try_from(&skel.maps.lb_answered_until)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        // a new thread starts in its creator's network namespace: the driven one
        let thread = std::thread::Builder::new()
            .name("lb answers".into())
            .spawn(move || {
                let result = (|| -> Result<String> {
                    let mut answerer = Answerer::new(&asks, &until)?;
                    while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        answerer.poll(Duration::from_millis(200))?;
                    }
                    Ok(answerer.finish())
                })();
                match result {
                    Ok(line) => eprintln!("{SUBCOMMAND}: {line}"),
                    Err(err) => eprintln!(
                        "{SUBCOMMAND}: answering established TCP flows' asks: {err:#} (conntrack keeps their segments)"
                    ),
                }
            })
            .context("starting the thread that answers asks")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DrivenAnswers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long an answer to asks is promised ahead: a run that stops answering (killed) leaves
/// flows asking this long at most.
const ANSWER_AHEAD: Duration = Duration::from_secs(3);

/// The promise of a run to answer asks (bpf/lb.c lb_answered_until): renewed every second,
/// withdrawn when the run ends however it ends.
struct Answering<'a>(&'a dyn libbpf_rs::MapCore);

impl Answering<'_> {
    fn write(&self, until_ns: u64) -> Result<()> {
        self.0
            .update(
                &0u32.to_ne_bytes(),
                &until_ns.to_ne_bytes(),
                libbpf_rs::MapFlags::ANY,
            )
            .context("updating lb_answered_until")
    }

    fn renew(&self) -> Result<()> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
        let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        self.write(now_ns + ANSWER_AHEAD.as_nanos() as u64)
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        let _ = self.write(0);
    }
}

/// Repairs of the nft table one at a time, and none once the run stops (its release removes
/// the table); true once it stopped.
type Repairs = std::sync::Arc<std::sync::Mutex<bool>>;

/// Marks the run stopped however `serve` ends, after a repair under way.
struct StopRepairs(Repairs);

impl Drop for StopRepairs {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|poison| poison.into_inner()) = true;
    }
}

fn log_repair(result: Result<Option<String>>) {
    match result {
        Ok(Some(line)) => eprintln!("{SUBCOMMAND}: {line}"),
        Ok(None) => {}
        Err(err) => eprintln!("{SUBCOMMAND}: checking the nft table: {err:#}"),
    }
}

/// The watcher gave up: the periodic check is what is left.
fn watch_failed(err: &std::io::Error) {
    eprintln!(
        "{SUBCOMMAND}: watching nftables' notifications: {err}; checking the nft table every {} s only",
        CHECK_PERIOD.as_secs()
    );
}

/// Repairs lb's table as soon as nftables says a table, chain or rule was deleted in this
/// namespace: until it is back no conntrack hook sees a packet, and a backend's packet to
/// this node meets the node's own stack, which answers with an RST that ends the connection.
/// Milliseconds of that are survivable; the check period is not.
fn watch_table(netns_key: &str, repairs: &Repairs) {
    let mut events = match NftablesEvents::open() {
        Ok(events) => events,
        Err(err) => {
            return watch_failed(&err);
        }
    };
    loop {
        let deleted = events.deleted_within(Duration::from_millis(500));
        let stopped = repairs.lock().unwrap_or_else(|poison| poison.into_inner());
        if *stopped {
            return;
        }
        match deleted {
            Ok(true) => log_repair(repair_namespace(netns_key)),
            Ok(false) => {}
            Err(err) => {
                return watch_failed(&err);
            }
        }
    }
}

/// What pressed since `last`: the line the foreground run logs about it.
fn pressure_line(last: &lb_counters, now: &lb_counters) -> Option<String> {
    let delta = |f: fn(&lb_counters) -> u64| f(now).saturating_sub(f(last));
    let mut parts = Vec::new();
    if delta(|c| c.flood_dropped) > 0 {
        parts.push(format!(
            "under flood: {} first packets of new flows dropped, {} clients admitted on asking again",
            delta(|c| c.flood_dropped),
            delta(|c| c.flood_admitted)
        ));
    }
    if delta(|c| c.ports_low_dropped) + delta(|c| c.insert_failed) > 0 {
        parts.push(format!(
            "source ports running low: {} first packets of new flows dropped, {} clients admitted on asking again, {} found no port",
            delta(|c| c.ports_low_dropped),
            delta(|c| c.ports_low_admitted),
            delta(|c| c.insert_failed)
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn snat_note(no_snat: bool) -> &'static str {
    if no_snat {
        " (client addresses kept)"
    } else {
        " (source NAT to this node)"
    }
}

fn backend_words(stats: &lb_stats) -> String {
    format!("{} new flows", stats.new_flows)
}

fn describe_counters(totals: &lb_counters) -> String {
    format!(
        "conntrack entries created {} ({} replacing a closed connection's), flow openers already tracked {} ({} UDP datagrams forwarded here past the stack), established TCP segments {} sent on here past the stack ({} still checked by conntrack, {} asks, {} lost), failed and dropped: alloc {} nat {} insert {}; insert raced {}; under flood dropped {} ({} admitted on asking again); source ports low dropped {} ({} admitted on asking again)",
        totals.new_flows,
        totals.reopened,
        totals.known_flows,
        totals.forwarded,
        totals.tcp_forwarded,
        totals.tcp_tracked,
        totals.asked,
        totals.asks_lost,
        totals.alloc_failed,
        totals.nat_failed,
        totals.insert_failed,
        totals.insert_raced,
        totals.flood_dropped,
        totals.flood_admitted,
        totals.ports_low_dropped,
        totals.ports_low_admitted
    )
}
