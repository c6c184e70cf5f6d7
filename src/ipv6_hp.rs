//! `ebpf-net ipv6-hp`: the Azure SLB IPv6 health-probe fix on tc ingress and egress.
//!
//! Probes arrive from a link-local source the node cannot answer through its CNI; ingress
//! rewrites that source to a global address and egress rewrites replies back, in place of
//! the nft table `ip6 azureSLBProbe`.

use std::mem::MaybeUninit;
use std::net::Ipv6Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenObject, Program};
use serde_json::{json, Value};
use toml::Spanned;

use crate::addr::{parse_ipv6, Interface};
use crate::attach::{self, prepare_tcx, LinkTarget, PinnedLink, TcDirection, TcxAttachment};
use crate::config::{self, ConfigFile, RunOptions};
use crate::instance::Instance;
use crate::metrics;
use crate::pin::PinDir;
use crate::skel::egress::EgressSkel;
use crate::skel::ingress::types::{ipv6_hp_stats, rodata as Ipv6HpConfig};
use crate::skel::ingress::IngressSkel;
use crate::{maps, probe, run};

pub const SUBCOMMAND: &str = "ipv6-hp";
pub const DEFAULT_LINK_LOCAL: &str = "fe80::1234:5678:9abc";
pub const DEFAULT_GLOBAL: &str = "2603:1062:0:1:fe80:1234:5678:9abc";
/// The nft table this datapath replaces.
const NFT_TABLE: [&str; 2] = ["ip6", "azureSLBProbe"];
/// Program names as the kernel reports them, ingress then egress.
pub const PROGRAMS: [&str; 2] = ["ipv6_hp_ingress", "ipv6_hp_egress"];

// SAFETY: both are plain C structs of integers and byte arrays from include/ipv6_hp.h.
unsafe impl plain::Plain for ipv6_hp_stats {}
unsafe impl plain::Plain for Ipv6HpConfig {}

#[derive(clap::Args, Debug)]
pub struct Ipv6HpArgs {
    /// interface the health probes arrive on
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub iface: Option<String>,
    /// source address of the probes on the wire [default: fe80::1234:5678:9abc]
    #[arg(long, value_name = "ADDR")]
    pub link_local: Option<String>,
    /// address the node sees the probes coming from [default: 2603:1062:0:1:fe80:1234:5678:9abc]
    #[arg(long, value_name = "ADDR")]
    pub global: Option<String>,
    /// also delete the nft table `ip6 azureSLBProbe` this replaces, if present
    #[arg(long)]
    pub remove_nft_table: bool,
    /// attach, pin under /sys/fs/bpf/ebpf-net/ipv6-hp/, print ready and exit; run again to update in place
    #[arg(long)]
    pub persist: bool,
    #[command(flatten)]
    pub run: RunOptions,
}

/// What flags and config file say together.
#[derive(Debug, PartialEq, Eq)]
struct Settings {
    iface: String,
    addrs: ProbeAddresses,
    remove_nft_table: bool,
}

impl Settings {
    fn read(args: &Ipv6HpArgs) -> Result<Self> {
        let config = ConfigFile::load(args.run.config.as_deref())?;
        let section = config::section_of(config.as_ref(), |doc| &doc.ipv6_hp, SUBCOMMAND)?;
        let iface = config::interface(
            args.iface.as_ref(),
            config.as_ref(),
            section.map(|s| &s.interface),
            SUBCOMMAND,
        )?;
        // the flag, else the file (errors name its line), else the default
        let address =
            |flag: Option<&String>, name: &str, key: &str, value: Option<&Spanned<String>>, default: &str| {
                match (flag, config.as_ref().zip(value)) {
                    (Some(text), _) => parse_ipv6(name, text),
                    (None, Some((config, value))) => {
                        parse_ipv6(&format!("{}: {key}", config.at(value.span())), value.get_ref())
                    }
                    (None, None) => parse_ipv6(name, default),
                }
            };
        let link_local = address(
            args.link_local.as_ref(),
            "--link-local",
            "link-local",
            section.and_then(|s| s.link_local.as_ref()),
            DEFAULT_LINK_LOCAL,
        )?;
        let global = address(
            args.global.as_ref(),
            "--global",
            "global",
            section.and_then(|s| s.global.as_ref()),
            DEFAULT_GLOBAL,
        )?;
        if link_local == global {
            bail!("link-local and global are both {link_local}; they must differ");
        }
        Ok(Self {
            iface: iface.text,
            addrs: ProbeAddresses { link_local, global },
            remove_nft_table: args.remove_nft_table
                || section.and_then(|s| s.remove_nft_table).unwrap_or(false),
        })
    }
}

/// The address pair both programs are built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeAddresses {
    pub link_local: Ipv6Addr,
    pub global: Ipv6Addr,
}

/// Opens one of the two ipv6-hp skeletons, sets its constants and loads it. A macro
/// because the two skeletons are distinct generated types with the same shape.
macro_rules! load_hp_skeleton {
    ($module:ident, $builder:ident, $prog:ident, $direction:expr, $storage:expr, $addrs:expr, $csum_flag:expr, $stats_pin:expr) => {{
        use crate::skel::$module::{types::in6_addr, $builder};
        let mut open = $builder::default()
            .open($storage)
            .with_context(|| format!("opening the {} program", stringify!($prog)))?;
        let rodata = open
            .maps
            .rodata_data
            .as_deref_mut()
            .expect("ipv6_hp.h declares constants");
        // SAFETY: in6_addr is the 16-byte C union of include/vmlinux.h.
        rodata.link_local_addr =
            unsafe { std::mem::transmute::<[u8; 16], in6_addr>($addrs.link_local.octets()) };
        rodata.global_addr = unsafe { std::mem::transmute::<[u8; 16], in6_addr>($addrs.global.octets()) };
        rodata.l4_csum_ipv6_flag = $csum_flag;
        prepare_tcx(&mut open.progs.$prog, $direction);
        if let Some(path) = $stats_pin {
            // libbpf reuses the pinned counters when they exist, so an update keeps counting.
            open.maps.ipv6_hp_stats.set_pin_path(path)?;
        }
        open.load()
            .with_context(|| format!("loading the {} program", stringify!($prog)))
    }};
}

/// Loads the ingress program (source link-local -> global); `stats_pin` shares its counters
/// through bpffs. Nothing is attached.
pub fn load_ingress<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    addrs: &ProbeAddresses,
    csum_flag: u64,
    stats_pin: Option<&Path>,
) -> Result<IngressSkel<'obj>> {
    load_hp_skeleton!(
        ingress,
        IngressSkelBuilder,
        ipv6_hp_ingress,
        TcDirection::Ingress,
        storage,
        addrs,
        csum_flag,
        stats_pin
    )
}

/// Loads the egress program (destination global -> link-local), like [`load_ingress`].
pub fn load_egress<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    addrs: &ProbeAddresses,
    csum_flag: u64,
    stats_pin: Option<&Path>,
) -> Result<EgressSkel<'obj>> {
    load_hp_skeleton!(
        egress,
        EgressSkelBuilder,
        ipv6_hp_egress,
        TcDirection::Egress,
        storage,
        addrs,
        csum_flag,
        stats_pin
    )
}

fn stats_pin_name(direction: TcDirection) -> String {
    format!("stats_{}", direction.name())
}

pub fn run(args: &Ipv6HpArgs, netns_key: &str) -> Result<()> {
    args.run.check(args.persist)?;
    let settings = Settings::read(args)?;
    let addrs = settings.addrs;
    let iface = Interface::by_name(&settings.iface)?;
    let csum_flag = probe::l4_csum_ipv6_flag();
    let pins = PinDir::new(SUBCOMMAND, netns_key, &iface.name);
    let _instance = Instance::claim(SUBCOMMAND, netns_key, &iface.name, args.persist)?;

    if args.persist {
        return persist(&settings, &iface, &pins, csum_flag);
    }
    if pins.exists() {
        bail!(
            "ipv6-hp is persisted on {} (see `ebpf-net status`); run `ebpf-net down ipv6-hp -i {}` first",
            iface.name,
            iface.name
        );
    }
    attach::refuse_if_attached(SUBCOMMAND, &PROGRAMS, &iface, &pins)?;

    let (mut ingress_obj, mut egress_obj) = (MaybeUninit::uninit(), MaybeUninit::uninit());
    let ingress = load_ingress(&mut ingress_obj, &addrs, csum_flag, None)?;
    let egress = load_egress(&mut egress_obj, &addrs, csum_flag, None)?;
    let metrics = metrics::serve(args.run.metrics.as_ref(), || {
        let ingress_map = MapHandle::try_from(&ingress.maps.ipv6_hp_stats)?;
        let egress_map = MapHandle::try_from(&egress.maps.ipv6_hp_stats)?;
        Ok(Arc::new(move || {
            let i: ipv6_hp_stats = maps::sum_percpu_counters(&ingress_map, 0)?;
            let e: ipv6_hp_stats = maps::sum_percpu_counters(&egress_map, 0)?;
            let mut families = vec![metrics::rewrites(
                SUBCOMMAND,
                &[("ingress", i.rewritten_packets), ("egress", e.rewritten_packets)],
            )];
            let mut bytes =
                metrics::Family::counter("ebpf_net_rewrite_bytes", "bytes of the packets translated");
            bytes.add(
                &[("datapath", SUBCOMMAND), ("direction", "ingress")],
                i.rewritten_bytes,
            );
            bytes.add(
                &[("datapath", SUBCOMMAND), ("direction", "egress")],
                e.rewritten_bytes,
            );
            families.push(bytes);
            families.extend(metrics::counter_families(
                SUBCOMMAND,
                &[
                    ("l4_checksum_fixed", i.l4_fixed + e.l4_fixed, false),
                    ("skipped", i.skipped + e.skipped, true),
                    ("nd_passed", i.nd_passed + e.nd_passed, false),
                ],
            ));
            Ok(families)
        }) as metrics::Source)
    })?;

    let attachments = [
        TcxAttachment::attach(&ingress.progs.ipv6_hp_ingress, &iface, TcDirection::Ingress)?,
        TcxAttachment::attach(&egress.progs.ipv6_hp_egress, &iface, TcDirection::Egress)?,
    ];
    if settings.remove_nft_table {
        eprintln!("{SUBCOMMAND}: {}", remove_nft_table()?);
    }
    let shutdown = run::Shutdown::install()?;
    if let Some(addr) = metrics {
        eprintln!("{SUBCOMMAND}: metrics at http://{addr}/metrics");
    }
    run::announce_ready(SUBCOMMAND, &describe_pair(&iface, &addrs, csum_flag));
    // the addresses are compiled into the programs: a reload can only confirm them
    shutdown.serve(SUBCOMMAND, || {
        let new = Settings::read(args)?;
        if new != settings {
            bail!("the interface or addresses changed; that needs a restart (or --persist, which swaps the programs in place)");
        }
        Ok("nothing changed".into())
    });
    drop(attachments);

    let ingress_stats: ipv6_hp_stats = maps::sum_percpu_counters(&ingress.maps.ipv6_hp_stats, 0)?;
    let egress_stats: ipv6_hp_stats = maps::sum_percpu_counters(&egress.maps.ipv6_hp_stats, 0)?;
    eprintln!(
        "{SUBCOMMAND}: detached from {}; ingress {}; egress {}",
        iface.name,
        stats_summary(&ingress_stats),
        stats_summary(&egress_stats)
    );
    Ok(())
}

fn describe_pair(iface: &Interface, addrs: &ProbeAddresses, csum_flag: u64) -> String {
    format!(
        "{} ingress {} -> {}, egress {} -> {} (tcx{})",
        iface.name,
        addrs.link_local,
        addrs.global,
        addrs.global,
        addrs.link_local,
        if csum_flag != 0 { ", BPF_F_IPV6" } else { "" }
    )
}

fn stats_summary(stats: &ipv6_hp_stats) -> String {
    format!(
        "rewrote {} packets ({} bytes, {} with L4 checksum fix), skipped {}, neighbour discovery left alone {}",
        stats.rewritten_packets, stats.rewritten_bytes, stats.l4_fixed, stats.skipped, stats.nd_passed
    )
}

/// Attaches and pins, or, when pinned state exists, swaps the new programs into the
/// existing links atomically: no moment without translation.
fn persist(settings: &Settings, iface: &Interface, pins: &PinDir, csum_flag: u64) -> Result<()> {
    let addrs = &settings.addrs;
    attach::refuse_if_attached(SUBCOMMAND, &PROGRAMS, iface, pins)?;
    let fresh = !pins.exists();
    pins.create()?;
    let result = persist_into(addrs, iface, pins, csum_flag);
    if result.is_err() && fresh {
        let _ = pins.remove();
    }
    let updated = result?;
    if settings.remove_nft_table {
        eprintln!("{SUBCOMMAND}: {}", remove_nft_table()?);
    }
    let verb = if updated { "updated in place" } else { "pinned" };
    run::announce_ready(
        SUBCOMMAND,
        &format!("{verb}: {}", describe_pair(iface, addrs, csum_flag)),
    );
    Ok(())
}

/// Returns whether existing links were updated (true) or new ones pinned (false).
fn persist_into(addrs: &ProbeAddresses, iface: &Interface, pins: &PinDir, csum_flag: u64) -> Result<bool> {
    let (mut ingress_obj, mut egress_obj) = (MaybeUninit::uninit(), MaybeUninit::uninit());
    let ingress_stats = pins.file(&stats_pin_name(TcDirection::Ingress));
    let egress_stats = pins.file(&stats_pin_name(TcDirection::Egress));
    let ingress = load_ingress(&mut ingress_obj, addrs, csum_flag, Some(&ingress_stats))?;
    let egress = load_egress(&mut egress_obj, addrs, csum_flag, Some(&egress_stats))?;

    let programs: [(&Program, TcDirection); 2] = [
        (&ingress.progs.ipv6_hp_ingress, TcDirection::Ingress),
        (&egress.progs.ipv6_hp_egress, TcDirection::Egress),
    ];
    let mut updated = false;
    for (prog, direction) in programs {
        updated |= attach::attach_or_update_pinned(prog, iface, direction, &pins.link_file(direction))?;
    }
    Ok(updated)
}

fn remove_nft_table() -> Result<String> {
    let table = NFT_TABLE.join(" ");
    let listed = match Command::new("nft")
        .arg("list")
        .arg("table")
        .args(NFT_TABLE)
        .output()
    {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(format!(
                "nft is not installed, so there is no nft table {table} to remove"
            ))
        }
        Err(err) => return Err(err).context("running nft"),
    };
    if !listed.status.success() {
        return Ok(format!("nft table {table} not present, nothing to remove"));
    }
    let deleted = Command::new("nft")
        .arg("delete")
        .arg("table")
        .args(NFT_TABLE)
        .output()
        .context("running nft")?;
    if !deleted.status.success() {
        bail!(
            "nft delete table {table}: {}",
            String::from_utf8_lossy(&deleted.stderr).trim()
        );
    }
    Ok(format!("removed nft table {table}, which ebpf-net now replaces"))
}

/// What `status` shows of one persisted ipv6-hp directory.
pub fn describe_persisted(pins: &PinDir) -> Result<Value> {
    let mut sides = serde_json::Map::new();
    let mut addresses = None;
    for direction in TcDirection::BOTH {
        let link = PinnedLink::open(&pins.link_file(direction))?;
        let ifindex = match link.target {
            LinkTarget::Interface(ifindex) => ifindex,
            _ => 0,
        };
        let stats_map = MapHandle::from_pinned_path(pins.file(&stats_pin_name(direction)))?;
        let stats: ipv6_hp_stats = maps::sum_percpu_counters(&stats_map, 0)?;
        if addresses.is_none() {
            addresses = program_addresses(link.prog_id).ok();
        }
        sides.insert(
            direction.name().into(),
            json!({
                "attached": ifindex != 0,
                "ifindex": ifindex,
                "prog_id": link.prog_id,
                "rewritten_packets": stats.rewritten_packets,
                "rewritten_bytes": stats.rewritten_bytes,
                "l4_checksum_fixed": stats.l4_fixed,
                "skipped": stats.skipped,
                "nd_passed": stats.nd_passed,
            }),
        );
    }
    let (link_local, global) = addresses
        .map(|a| (a.link_local.to_string(), a.global.to_string()))
        .unzip();
    Ok(
        json!({ "link_local": link_local, "global": global, "ingress": sides["ingress"], "egress": sides["egress"] }),
    )
}

pub fn summarize(details: &Value) -> String {
    let side = |name: &str| {
        let side = &details[name];
        format!(
            "{name} rewrote {} packets ({} skipped)",
            side["rewritten_packets"], side["skipped"]
        )
    };
    format!(
        "{} <-> {}; {}; {}",
        details["link_local"].as_str().unwrap_or("?"),
        details["global"].as_str().unwrap_or("?"),
        side("ingress"),
        side("egress")
    )
}

/// The addresses a loaded ipv6-hp program was built with, read back from its constants.
fn program_addresses(prog_id: u32) -> Result<ProbeAddresses> {
    let (_, map_ids) = attach::program_info(prog_id)?;
    for id in map_ids {
        if !attach::map_name(id)?.ends_with(".rodata") {
            continue;
        }
        let map = MapHandle::from_map_id(id)?;
        let bytes = map
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .context("empty .rodata")?;
        // SAFETY: a C struct of integers and byte arrays, for which all zeroes is valid.
        let mut config: Ipv6HpConfig = unsafe { std::mem::zeroed() };
        plain::copy_from_bytes(&mut config, &bytes)
            .map_err(|err| anyhow::anyhow!("rodata layout: {err:?}"))?;
        // SAFETY: in6_addr is 16 bytes of address.
        let octets = |addr| unsafe { std::mem::transmute::<_, [u8; 16]>(addr) };
        return Ok(ProbeAddresses {
            link_local: Ipv6Addr::from(octets(config.link_local_addr)),
            global: Ipv6Addr::from(octets(config.global_addr)),
        });
    }
    bail!("program {prog_id} has no .rodata map")
}
