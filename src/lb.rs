//! `ebpf-net lb`: an L4 load balancer on the kernel's conntrack. tc ingress creates a
//! conntrack entry with destination NAT (and by default source NAT) for the first packet of
//! each flow to a service; conntrack translates the rest of the flow both ways.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::MapHandle;
use serde_json::{json, Value};

use crate::addr::{ip_to_words, Interface};
use crate::attach::{self, prepare_tcx, TcDirection, TcxAttachment};
use crate::config::{self, ConfigFile, Item, RunOptions};
use crate::instance::Instance;
use crate::maps::{self, as_bytes};
use crate::pin::PinDir;
use crate::service::{self, Limits, Service, ServiceTables, SyncReport};
use crate::skel::lb::types::{lb_backend, lb_counters, lb_stats, service_endpoint};
use crate::skel::lb::{LbSkel, LbSkelBuilder};
use crate::{metrics, nft, probe, run};

pub const SUBCOMMAND: &str = "lb";
pub const PROGRAMS: [&str; 1] = ["lb_ingress"];
/// Every conntrack kfunc bpf/lb.c calls.
const KFUNCS: [&str; 7] = [
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
};
const PIN_SERVICES: &str = "services";
const PIN_BACKENDS: &str = "backends";
const PIN_STATS: &str = "stats";
// v2: more counters (include/lb.h)
const PIN_COUNTERS: &str = "counters_v2";
/// include/lb.h LB_DEFAULT_FLOOD_RATE
pub const DEFAULT_FLOOD_RATE: u32 = 40_000;
/// The nft table (family inet) lb adds when this namespace lacks conntrack and NAT hooks.
/// Its comment records what lb changed, so the last lb to stop can undo exactly that.
pub const NFT_TABLE: &str = "ebpf_net_lb";

// SAFETY: plain C structs of integers from include/lb.h.
unsafe impl plain::Plain for lb_backend {}
unsafe impl plain::Plain for lb_stats {}
unsafe impl plain::Plain for lb_counters {}

crate::endpoint_conversions!(service_endpoint);

#[derive(clap::Args, Debug)]
pub struct LbArgs {
    /// interface the clients' packets arrive on
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub iface: Option<String>,
    /// VIP:PORT=BACKEND:PORT[,BACKEND:PORT...], repeatable; TCP and UDP; IPv6 in brackets
    #[arg(long = "service", value_name = "VIP=BACKENDS")]
    pub services: Vec<String>,
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

/// What flags and config file say together.
#[derive(Debug, PartialEq, Eq)]
struct Settings {
    iface: Item,
    services: Vec<Service>,
    no_snat: bool,
    flood_rate: u32,
}

impl Settings {
    fn read(args: &LbArgs) -> Result<Self> {
        let config = ConfigFile::load(args.run.config.as_deref())?;
        let section = config::section_of(config.as_ref(), |doc| &doc.lb, SUBCOMMAND)?;
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
        Ok(Self {
            iface,
            services: service::parse_service_items(&items, LIMITS)?,
            no_snat: args.no_snat || section.and_then(|s| s.no_snat).unwrap_or(false),
            flood_rate: args
                .flood_rate
                .or(section.and_then(|s| s.flood_rate))
                .unwrap_or(DEFAULT_FLOOD_RATE),
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

/// The address this namespace sends from towards `ip`: what masquerade would pick.
fn source_towards(ip: IpAddr) -> Result<IpAddr> {
    let any: SocketAddr = match ip {
        IpAddr::V4(_) => "0.0.0.0:0".parse()?,
        IpAddr::V6(_) => "[::]:0".parse()?,
    };
    let socket = UdpSocket::bind(any)?;
    socket
        .connect(SocketAddr::new(ip, 9))
        .with_context(|| format!("no route to backend {ip} from this network namespace"))?;
    Ok(socket.local_addr()?.ip())
}

/// Each backend's table value: its endpoint and the source NAT address towards it.
fn backend_values(services: &[Service], snat: bool) -> Result<HashMap<SocketAddr, Vec<u8>>> {
    let mut values = HashMap::new();
    for backend in services.iter().flat_map(|svc| svc.backends.iter()) {
        if values.contains_key(backend) {
            continue;
        }
        let source = source_towards(backend.ip())?;
        let value = lb_backend {
            endpoint: (*backend).into(),
            snat_addr: if snat { ip_to_words(source).1 } else { [0; 4] },
        };
        values.insert(*backend, as_bytes(&value).to_vec());
    }
    Ok(values)
}

fn load<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    pins: Option<&PinDir>,
    flood_rate: u32,
) -> Result<LbSkel<'obj>> {
    let mut open = LbSkelBuilder::default()
        .open(storage)
        .context("opening the lb program")?;
    let mut seed = [0u8; 4];
    // SAFETY: a 4-byte buffer we own.
    if unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) } != seed.len() as isize {
        bail!("getrandom failed: {}", std::io::Error::last_os_error());
    }
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .expect("lb.c declares constants");
    rodata.hash_seed = u32::from_ne_bytes(seed);
    rodata.flood_rate = flood_rate;
    prepare_tcx(&mut open.progs.lb_ingress, TcDirection::Ingress);
    if let Some(pins) = pins {
        // libbpf reuses these when pinned already: a re-run updates the live tables
        open.maps.lb_services.set_pin_path(pins.file(PIN_SERVICES))?;
        open.maps.lb_backends.set_pin_path(pins.file(PIN_BACKENDS))?;
        open.maps.lb_stats.set_pin_path(pins.file(PIN_STATS))?;
        open.maps.lb_counters.set_pin_path(pins.file(PIN_COUNTERS))?;
    }
    open.load().context("loading the lb program")
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
    sync(&tables(&skel)?, services, &backend_values(services, snat)?)?;
    Ok(skel)
}

fn tables(skel: &LbSkel<'_>) -> Result<ServiceTables> {
    Ok(ServiceTables::new(
        MapHandle::try_from(&skel.maps.lb_services)?,
        MapHandle::try_from(&skel.maps.lb_backends)?,
        MapHandle::try_from(&skel.maps.lb_stats)?,
    ))
}

fn sync(
    tables: &ServiceTables,
    services: &[Service],
    values: &HashMap<SocketAddr, Vec<u8>>,
) -> Result<SyncReport> {
    service::sync_services(tables, services, |backend| {
        values.get(&backend).cloned().context("backend without a value")
    })
}

/// What lb changed in this namespace, as recorded in its nft table's comment.
fn recorded_changes() -> Option<Vec<String>> {
    let listing = nft::run(&["list", "table", "inet", NFT_TABLE]).ok()?;
    let comment = listing
        .lines()
        .find_map(|line| line.trim().strip_prefix("comment \""))
        .map(|rest| rest.trim_end_matches('"').to_string())
        .unwrap_or_default();
    Some(comment.split_whitespace().map(str::to_string).collect())
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

/// Makes this namespace apply the entries lb creates: conntrack and NAT hooks (an nft table,
/// only if none registers them yet) and forwarding towards backends that are not local (only
/// if off). Returns what it did, for the log.
fn prepare_namespace(services: &[Service]) -> Result<Vec<String>> {
    let mut log = Vec::new();
    let mut changed = Vec::new();
    for (name, path, v4) in FORWARDING {
        let forwards = services
            .iter()
            .filter(|svc| svc.vip.is_ipv4() == v4)
            .flat_map(|svc| svc.backends.iter())
            .any(|backend| source_towards(backend.ip()).ok() != Some(backend.ip()));
        if !forwards {
            continue;
        }
        let family = if v4 { "IPv4" } else { "IPv6" };
        let value = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        if value.trim() == "0" {
            std::fs::write(path, "1").with_context(|| format!("enabling {family} forwarding ({path})"))?;
            changed.push(name.to_string());
            log.push(format!(
                "enabled {family} forwarding in this namespace: backends are behind it (off again when the last lb stops)"
            ));
        } else {
            log.push(format!("{family} forwarding already on"));
        }
    }

    if let Some(previous) = recorded_changes() {
        log.push(format!(
            "conntrack and NAT hooks: table inet {NFT_TABLE} already there ({})",
            previous.join(" ")
        ));
        return Ok(log);
    }
    let mut families = Vec::new();
    if services.iter().any(|svc| svc.vip.is_ipv4()) {
        families.push("ip");
    }
    if services.iter().any(|svc| svc.vip.is_ipv6()) {
        families.push("ip6");
    }
    let (need_nat, need_conntrack) = missing_hooks(&families).context("conntrack and NAT hooks")?;
    let add_hooks = need_nat || need_conntrack;
    if !add_hooks {
        log.push("conntrack and NAT hooks already registered in this namespace; added none".into());
        if changed.is_empty() {
            return Ok(log);
        }
    }
    if add_hooks {
        changed.push("nat-hooks".into());
    }
    // Any rule using ct makes the namespace track connections; in a nat chain it only ever
    // sees a flow's first packet, so it costs nothing per packet.
    let conntrack_rule = if need_conntrack {
        " ct state invalid counter;"
    } else {
        ""
    };
    let mut chains = format!(
        "  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;{conntrack_rule} }}\n"
    );
    if need_nat {
        chains
            .push_str("  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n");
    }
    // the table also records what lb changed, for the last lb to undo
    nft::apply(&format!(
        "table inet {NFT_TABLE} {{\n  comment \"{}\"\n{chains}}}\n",
        changed.join(" ")
    ))?;
    if add_hooks {
        let what = match (need_nat, need_conntrack) {
            (true, true) => "conntrack and NAT hooks",
            (true, false) => "NAT hooks (conntrack was on)",
            _ => "conntrack (NAT hooks were there)",
        };
        log.push(format!(
            "registered {what}: nft table inet {NFT_TABLE} (removed when the last lb stops)"
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
        attach::tcx_programs(iface.index, TcDirection::Ingress)
            .unwrap_or_default()
            .iter()
            .any(|prog| PROGRAMS.contains(&prog.name.as_str()))
    });
    let Some(changes) = recorded_changes() else {
        return Ok(Vec::new());
    };
    if persisted || attached {
        return Ok(vec![format!(
            "another lb still runs here: kept nft table inet {NFT_TABLE}"
        )]);
    }
    let mut log = Vec::new();
    for (name, path, v4) in FORWARDING {
        if changes.iter().any(|change| change == name) {
            std::fs::write(path, "0").with_context(|| format!("restoring {path}"))?;
            log.push(format!(
                "turned {} forwarding off again",
                if v4 { "IPv4" } else { "IPv6" }
            ));
        }
    }
    nft::run(&["delete", "table", "inet", NFT_TABLE])?;
    log.push(format!("removed nft table inet {NFT_TABLE}"));
    Ok(log)
}

pub fn run(args: &LbArgs, netns_key: &str) -> Result<()> {
    args.run.check(args.persist)?;
    let mut settings = Settings::read(args)?;
    probe::require_kfuncs(SUBCOMMAND, &KFUNCS)?;
    let iface = Interface::by_name(&settings.iface.text).map_err(|err| settings.iface.fail(err))?;
    let pins = PinDir::new(SUBCOMMAND, netns_key, &iface.name);
    let (mut instance, orphan) = Instance::claim(SUBCOMMAND, netns_key, &iface.name, args.persist)?;
    attach::refuse_if_attached(SUBCOMMAND, &PROGRAMS, &iface, &pins)?;
    let values = backend_values(&settings.services, !settings.no_snat)?;
    if args.persist {
        return persist(&settings.services, &values, settings.flood_rate, &iface, &pins);
    }
    if pins.exists() {
        bail!(
            "lb is persisted on {} (see `ebpf-net status`); run `ebpf-net down lb -i {}` first",
            iface.name,
            iface.name
        );
    }
    if let Some(orphan) = orphan {
        eprintln!(
            "{SUBCOMMAND}: taking over from a killed run (pid {}) on {}",
            orphan.pid, iface.name
        );
    }
    let mut object = MaybeUninit::uninit();
    let skel = load(&mut object, None, settings.flood_rate)?;
    let tables = tables(&skel)?;
    sync(&tables, &settings.services, &values)?;
    let metrics = metrics::serve(args.run.metrics.as_ref(), || metrics_source(&skel))?;
    let setup = prepare_namespace(&settings.services)?;
    note_leftovers(&mut instance)?;
    let attachment = match TcxAttachment::attach(&skel.progs.lb_ingress, &iface, TcDirection::Ingress) {
        Ok(attachment) => attachment,
        Err(err) => {
            let _ = release_namespace(netns_key);
            return Err(err);
        }
    };
    for line in &setup {
        eprintln!("{SUBCOMMAND}: {line}");
    }
    let shutdown = run::Shutdown::install()?;
    if let Some(addr) = metrics {
        eprintln!("{SUBCOMMAND}: metrics at http://{addr}/metrics");
    }
    run::announce_ready(
        SUBCOMMAND,
        &format!(
            "{}: {}{}",
            iface.name,
            service::describe(&settings.services),
            snat_note(settings.no_snat)
        ),
    );
    shutdown.serve(SUBCOMMAND, || {
        let new = Settings::read(args)?;
        settings.check_reload(&new)?;
        let values = backend_values(&new.services, !new.no_snat)?;
        let report = sync(&tables, &new.services, &values)?;
        for line in prepare_namespace(&new.services)? {
            eprintln!("{SUBCOMMAND}: {line}");
        }
        note_leftovers(&mut instance)?;
        settings = new;
        Ok(format!("{} ({report})", service::describe(&settings.services)))
    });
    drop(attachment);
    let report = service_report(&tables)?;
    for entry in report.iter().take(20) {
        eprintln!("{SUBCOMMAND}: {}", service::summarize_service(entry, counters));
    }
    let totals: lb_counters = maps::sum_percpu_counters(&skel.maps.lb_counters, 0)?;
    eprintln!("{SUBCOMMAND}: {}", describe_counters(&totals));
    for line in release_namespace(netns_key)? {
        eprintln!("{SUBCOMMAND}: {line}");
    }
    eprintln!("{SUBCOMMAND}: detached from {}", iface.name);
    Ok(())
}

/// Records in the run's lock file what a SIGKILL would leave in this namespace: lb's nft table
/// and what its comment says lb changed.
fn note_leftovers(instance: &mut Instance) -> Result<()> {
    match recorded_changes() {
        Some(changes) => instance.leaves(&format!("nft table inet {NFT_TABLE} ({})", changes.join(" "))),
        None => Ok(()),
    }
}

/// Metrics read at each scrape: new flows per backend and service, and the event and error
/// counters.
fn metrics_source(skel: &LbSkel<'_>) -> Result<metrics::Source> {
    let tables = tables(skel)?;
    let counters_map = MapHandle::try_from(&skel.maps.lb_counters)?;
    Ok(Arc::new(move || {
        let mut families = metrics::service_families(
            SUBCOMMAND,
            &service_report(&tables)?,
            &[("new_flows", "flows given a conntrack entry towards the backend")],
        );
        let t: lb_counters = maps::sum_percpu_counters(&counters_map, 0)?;
        families.extend(metrics::counter_families(
            SUBCOMMAND,
            &[
                ("new_flows", t.new_flows, false),
                ("known_flows", t.known_flows, false),
                ("reopened", t.reopened, false),
                ("alloc_failed", t.alloc_failed, true),
                ("nat_failed", t.nat_failed, true),
                ("insert_failed", t.insert_failed, true),
                ("insert_raced", t.insert_raced, false),
                ("flood_dropped", t.flood_dropped, true),
                ("flood_admitted", t.flood_admitted, false),
            ],
        ));
        Ok(families)
    }))
}

fn snat_note(no_snat: bool) -> &'static str {
    if no_snat {
        " (client addresses kept)"
    } else {
        " (source NAT to this node)"
    }
}

fn persist(
    services: &[Service],
    values: &HashMap<SocketAddr, Vec<u8>>,
    flood_rate: u32,
    iface: &Interface,
    pins: &PinDir,
) -> Result<()> {
    let fresh = !pins.exists();
    pins.create()?;
    let result = (|| -> Result<(bool, SyncReport, Vec<String>)> {
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, Some(pins), flood_rate)?;
        // the tables are right before the (new) program sees a packet
        let report = sync(&tables(&skel)?, services, values)?;
        let setup = prepare_namespace(services)?;
        let updated = attach::attach_or_update_pinned(
            &skel.progs.lb_ingress,
            iface,
            TcDirection::Ingress,
            &pins.link_file(TcDirection::Ingress),
        )?;
        Ok((updated, report, setup))
    })();
    if result.is_err() && fresh {
        let _ = pins.remove();
        let _ = release_namespace(&pins.netns);
    }
    let (updated, report, setup) = result?;
    for line in &setup {
        eprintln!("{SUBCOMMAND}: {line}");
    }
    let verb = if updated { "updated in place" } else { "pinned" };
    run::announce_ready(
        SUBCOMMAND,
        &format!(
            "{verb}: {}: {} ({report})",
            iface.name,
            service::describe(services)
        ),
    );
    Ok(())
}

fn service_report(tables: &ServiceTables) -> Result<Vec<Value>> {
    service::service_report(tables, |bytes| {
        let stats: lb_stats = maps::from_bytes("lb counters", bytes)?;
        let mut fields = serde_json::Map::new();
        fields.insert("new_flows".into(), json!(stats.new_flows));
        Ok(fields)
    })
}

fn counters(backend: &Value) -> String {
    format!("{} new flows", backend["new_flows"])
}

fn describe_counters(totals: &lb_counters) -> String {
    format!(
        "conntrack entries created {} ({} replacing a closed connection's), flow openers already tracked {}, failed and dropped: alloc {} nat {} insert {}; insert raced {}; under flood dropped {} ({} admitted on asking again)",
        totals.new_flows,
        totals.reopened,
        totals.known_flows,
        totals.alloc_failed,
        totals.nat_failed,
        totals.insert_failed,
        totals.insert_raced,
        totals.flood_dropped,
        totals.flood_admitted
    )
}

/// What `status` shows of one persisted lb directory.
pub fn describe_persisted(pins: &PinDir) -> Result<Value> {
    let tables = ServiceTables::pinned(pins, [PIN_SERVICES, PIN_BACKENDS, PIN_STATS])?;
    let counters_map = MapHandle::from_pinned_path(pins.file(PIN_COUNTERS))?;
    let totals: lb_counters = maps::sum_percpu_counters(&counters_map, 0)?;
    Ok(json!({
        "services": service_report(&tables)?,
        "counters": {
            "new_flows": totals.new_flows,
            "known_flows": totals.known_flows,
            "reopened": totals.reopened,
            "alloc_failed": totals.alloc_failed,
            "nat_failed": totals.nat_failed,
            "insert_failed": totals.insert_failed,
            "insert_raced": totals.insert_raced,
            "flood_dropped": totals.flood_dropped,
            "flood_admitted": totals.flood_admitted,
        },
    }))
}

pub fn summarize(details: &Value) -> String {
    let c = &details["counters"];
    format!(
        "{}; conntrack entries created {}, failed {}",
        service::summarize_report(&details["services"], counters),
        c["new_flows"],
        c["alloc_failed"].as_u64().unwrap_or(0)
            + c["nat_failed"].as_u64().unwrap_or(0)
            + c["insert_failed"].as_u64().unwrap_or(0)
            + c["flood_dropped"].as_u64().unwrap_or(0)
    )
}
