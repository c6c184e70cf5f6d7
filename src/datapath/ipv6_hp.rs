//! `ebpf-net ipv6-hp`: the Azure SLB IPv6 health-probe fix on tc ingress and egress.
//!
//! Probes arrive from a link-local source the node cannot answer through its CNI; ingress
//! rewrites that source to a global address and egress rewrites replies back, in place of
//! the nft table `ip6 azureSLBProbe`.

use std::mem::MaybeUninit;
use std::net::Ipv6Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenObject};
use serde_json::json;
use toml::Spanned;

use crate::control::config::{Ipv6HpSection, RunOptions, Sources};
use crate::control::counters::{self, Counters};
use crate::control::lifecycle::{Applied, Datapath, Details, Report, Storage, Target};
use crate::control::metrics;
use crate::kernel::addr::{parse_ipv6, Interface};
use crate::kernel::attach::{self, prepare_tcx, LinkTarget, PinnedLink, TcDirection};
use crate::kernel::pin::{MapPin, OnChange, PinDir, PinSet};
use crate::kernel::skel::egress::EgressSkel;
use crate::kernel::skel::ingress::types::{ipv6_hp_stats, rodata as Ipv6HpConfig};
use crate::kernel::skel::ingress::IngressSkel;
use crate::kernel::{maps, probe};

pub const SUBCOMMAND: &str = "ipv6-hp";
pub const DEFAULT_LINK_LOCAL: &str = "fe80::1234:5678:9abc";
pub const DEFAULT_GLOBAL: &str = "2603:1062:0:1:fe80:1234:5678:9abc";
/// The nft table this datapath replaces.
const NFT_TABLE: [&str; 2] = ["ip6", "azureSLBProbe"];
/// Program names as the kernel reports them, ingress then egress.
pub const PROGRAMS: &[&str] = &["ipv6_hp_ingress", "ipv6_hp_egress"];
/// The counters of each side, one object each.
const PIN_INGRESS: [MapPin; 1] = [MapPin {
    map: "ipv6_hp_stats",
    name: "stats_ingress",
    // v2: nd_passed
    version: 2,
    on_change: OnChange::Rebuild,
}];
const PIN_EGRESS: [MapPin; 1] = [MapPin {
    map: "ipv6_hp_stats",
    name: "stats_egress",
    version: 2,
    on_change: OnChange::Rebuild,
}];

// SAFETY: a plain C struct of integers and byte arrays from include/ipv6_hp.h.
unsafe impl plain::Plain for Ipv6HpConfig {}

crate::declare_counters!(
    ipv6_hp_stats,
    "ipv6_hp_stats",
    [
        (rewritten_packets, Traffic, "packets translated"),
        (rewritten_bytes, Traffic, "bytes of the packets translated"),
        (
            l4_fixed,
            Event,
            "translated packets whose L4 checksum was fixed too"
        ),
        (skipped, Error, "packets of the probe address not translated"),
        (
            nd_passed,
            Event,
            "neighbour discovery from or to the probe address, left alone"
        ),
    ]
);

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

crate::run_args!(Ipv6HpArgs);

/// What flags and config file say together.
#[derive(Debug, PartialEq, Eq)]
pub struct Settings {
    iface: String,
    addrs: ProbeAddresses,
    remove_nft_table: bool,
}

impl Settings {
    fn read(args: &Ipv6HpArgs) -> Result<Self> {
        let file = Sources::<Ipv6HpSection>::read(&args.run)?;
        let (config, section) = (file.config.as_ref(), file.section());
        let iface = file.interface(args.iface.as_ref())?;
        // the flag, else the file (errors name its line), else the default
        let address =
            |flag: Option<&String>, name: &str, key: &str, value: Option<&Spanned<String>>, default: &str| {
                match (flag, config.zip(value)) {
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
            remove_nft_table: args.remove_nft_table || file.value(None, |s| s.remove_nft_table, false),
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
        use crate::kernel::skel::$module::{types::in6_addr, $builder};
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
        if let Some((pins, specs)) = $stats_pin {
            // the pinned counters are reused, so an update keeps counting
            pins.prepare(open.open_object_mut(), SUBCOMMAND, specs)?;
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
    stats_pin: Option<(&mut PinSet, &[MapPin])>,
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
    stats_pin: Option<(&mut PinSet, &[MapPin])>,
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

/// The ipv6-hp datapath on the lifecycle.
pub struct Ipv6Hp;

/// The two programs, one object each.
pub type Loaded<'obj> = (IngressSkel<'obj>, EgressSkel<'obj>);

/// What an ipv6-hp run works from.
pub struct Plan {
    settings: Settings,
    csum_flag: u64,
}

/// The maps and links a report reads.
pub struct View {
    ingress: MapHandle,
    egress: MapHandle,
    /// persisted: each side's link, as (ifindex, prog_id)
    links: Option<[(u32, u32); 2]>,
}

impl Datapath for Ipv6Hp {
    const NAME: &'static str = SUBCOMMAND;
    const PROGRAMS: &'static [&'static str] = PROGRAMS;
    type Args = Ipv6HpArgs;
    type Desired = Settings;
    type Plan = Plan;
    type Loaded<'obj> = Loaded<'obj>;
    type View = View;

    fn desired(args: &Ipv6HpArgs) -> Result<Settings> {
        Settings::read(args)
    }
    fn target(desired: &Settings) -> Result<Target> {
        Ok(Target::Interface(Interface::by_name(&desired.iface)?))
    }
    fn plan(desired: &Settings, _target: &Target, _persist: bool) -> Result<Plan> {
        Ok(Plan {
            settings: Settings {
                iface: desired.iface.clone(),
                addrs: desired.addrs,
                remove_nft_table: desired.remove_nft_table,
            },
            csum_flag: probe::l4_csum_ipv6_flag(),
        })
    }
    fn load<'obj>(
        storage: &'obj mut Storage,
        plan: &Plan,
        mut pins: Option<&mut PinSet>,
    ) -> Result<Loaded<'obj>> {
        let [ingress_obj, egress_obj] = storage;
        let addrs = &plan.settings.addrs;
        let ingress = load_ingress(
            ingress_obj,
            addrs,
            plan.csum_flag,
            pins.as_deref_mut().map(|pins| (pins, &PIN_INGRESS[..])),
        )?;
        let egress = load_egress(
            egress_obj,
            addrs,
            plan.csum_flag,
            pins.map(|pins| (pins, &PIN_EGRESS[..])),
        )?;
        Ok((ingress, egress))
    }
    fn apply(_loaded: &Loaded<'_>, plan: &Plan) -> Result<Applied> {
        // the addresses are compiled into the programs; the nft table is the one thing to do
        let log = if plan.settings.remove_nft_table {
            vec![remove_nft_table()?]
        } else {
            Vec::new()
        };
        Ok(Applied {
            log,
            ..Applied::default()
        })
    }
    fn attach(loaded: &Loaded<'_>, target: &Target, _plan: &Plan) -> Result<Vec<Box<dyn std::any::Any>>> {
        let iface = target.iface();
        Ok(vec![
            crate::kernel::tc::attach_tc(&loaded.0.progs.ipv6_hp_ingress, iface, TcDirection::Ingress)?,
            crate::kernel::tc::attach_tc(&loaded.1.progs.ipv6_hp_egress, iface, TcDirection::Egress)?,
        ])
    }
    fn attach_pinned(loaded: &Loaded<'_>, target: &Target, pins: &PinDir, _plan: &Plan) -> Result<bool> {
        crate::kernel::tc::attach_or_update_pinned_all(
            &[
                (&loaded.0.progs.ipv6_hp_ingress, TcDirection::Ingress),
                (&loaded.1.progs.ipv6_hp_egress, TcDirection::Egress),
            ],
            target.iface(),
            pins,
        )
    }
    fn objects<'a>(loaded: &'a Loaded<'_>) -> Vec<(&'a libbpf_rs::Object, &'static [MapPin])> {
        vec![
            (loaded.0.object(), &PIN_INGRESS),
            (loaded.1.object(), &PIN_EGRESS),
        ]
    }
    fn check_reload(old: &Settings, new: &Settings) -> Result<()> {
        if new != old {
            bail!("the interface or addresses changed; that needs a restart (or --persist, which swaps the programs in place)");
        }
        Ok(())
    }
    fn describe(desired: &Settings, _target: &Target, plan: &Plan) -> String {
        describe_pair(&desired.addrs, plan.csum_flag)
    }
    fn view(loaded: &Loaded<'_>) -> Result<View> {
        Ok(View {
            ingress: MapHandle::try_from(&loaded.0.maps.ipv6_hp_stats)?,
            egress: MapHandle::try_from(&loaded.1.maps.ipv6_hp_stats)?,
            links: None,
        })
    }
    fn view_pinned(pins: &PinDir) -> Result<View> {
        let mut links = [(0, 0); 2];
        // a tcx link pinned, or a legacy tc filter recorded (its program queried from it)
        let legacy = crate::kernel::tc::recorded(&pins.path);
        for (side, direction) in links.iter_mut().zip(TcDirection::BOTH) {
            if let Some((record, id)) = legacy.iter().find(|(record, _)| record.direction == direction) {
                *side = (id.map_or(0, |_| record.ifindex), id.unwrap_or(0));
                continue;
            }
            let file = pins.link_file(direction);
            if !file.exists() {
                // a foreground run pins its maps for `status`, not its links (they go with it)
                continue;
            }
            let link = PinnedLink::open(&file)?;
            let ifindex = match link.target {
                LinkTarget::Interface(ifindex) => ifindex,
                _ => 0,
            };
            *side = (ifindex, link.prog_id);
        }
        Ok(View {
            ingress: pins.open_map(&PIN_INGRESS[0])?,
            egress: pins.open_map(&PIN_EGRESS[0])?,
            links: Some(links),
        })
    }
    fn report(view: &View) -> Result<Report> {
        let ingress: ipv6_hp_stats = maps::sum_percpu_counters(&view.ingress, 0)?;
        let egress: ipv6_hp_stats = maps::sum_percpu_counters(&view.egress, 0)?;
        let mut families = vec![metrics::rewrites(
            SUBCOMMAND,
            &[
                ("ingress", ingress.rewritten_packets),
                ("egress", egress.rewritten_packets),
            ],
        )];
        let mut bytes = metrics::Family::counter("ebpf_net_rewrite_bytes", "bytes of the packets translated");
        bytes.add(
            &[("datapath", SUBCOMMAND), ("direction", "ingress")],
            ingress.rewritten_bytes,
        );
        bytes.add(
            &[("datapath", SUBCOMMAND), ("direction", "egress")],
            egress.rewritten_bytes,
        );
        families.push(bytes);
        families.extend(counters::event_families(
            SUBCOMMAND,
            &ipv6_hp_stats::sum([&ingress, &egress]),
        ));
        let addresses = view.links.and_then(|links| program_addresses(links[0].1).ok());
        let (link_local, global) = addresses
            .map(|a| (a.link_local.to_string(), a.global.to_string()))
            .unzip();
        let side = |stats: &ipv6_hp_stats, link: Option<(u32, u32)>| {
            let mut entry = stats.json();
            if let Some((ifindex, prog_id)) = link {
                entry.insert("attached".into(), json!(ifindex != 0));
                entry.insert("ifindex".into(), json!(ifindex));
                entry.insert("prog_id".into(), json!(prog_id));
            }
            serde_json::Value::Object(entry)
        };
        let words = |name: &str, stats: &ipv6_hp_stats| {
            format!(
                "{name} rewrote {} packets ({} skipped)",
                stats.rewritten_packets, stats.skipped
            )
        };
        Ok(Report {
            details: Details::now(json!({
                "link_local": link_local,
                "global": global,
                "ingress": side(&ingress, view.links.map(|links| links[0])),
                "egress": side(&egress, view.links.map(|links| links[1])),
            })),
            summary: format!(
                "{} <-> {}; {}; {}",
                link_local.as_deref().unwrap_or("?"),
                global.as_deref().unwrap_or("?"),
                words("ingress", &ingress),
                words("egress", &egress)
            ),
            families,
            exit: Vec::new(),
            on_detach: Some(format!(
                "ingress {}; egress {}",
                stats_summary(&ingress),
                stats_summary(&egress)
            )),
        })
    }
}

fn describe_pair(addrs: &ProbeAddresses, csum_flag: u64) -> String {
    format!(
        "ingress {} -> {}, egress {} -> {} (tcx{})",
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
