//! `ebpf-net proxy`: transparent destination rewriting at tc. Egress sends packets for FROM
//! to TO (re-routed, MACs rewritten); ingress makes TO's replies come from FROM, per flow.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::mem::MaybeUninit;
use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde_json::json;

use crate::control::config::{self, Item, ProxySection, RunOptions, Sources};
use crate::control::counters::Counters;
use crate::control::lifecycle::{Applied, Datapath, Details, Report, Storage, Target};
use crate::control::metrics;
use crate::kernel::addr::Interface;
use crate::kernel::attach::TcDirection;
use crate::kernel::maps::{self, as_bytes};
use crate::kernel::neigh::Routes;
use crate::kernel::pin::{MapPin, OnChange, PinDir, PinSet};
use crate::kernel::skel::proxy::types::{proxy_endpoint, proxy_stats, proxy_target};
use crate::kernel::skel::proxy::{ProxySkel, ProxySkelBuilder};

pub const SUBCOMMAND: &str = "proxy";
pub const PROGRAMS: &[&str] = &["proxy_egress", "proxy_ingress"];
/// include/proxy.h PROXY_MAX_RULES
const MAX_RULES: usize = 4096;
const PIN_RULES: MapPin = MapPin {
    map: "proxy_rules",
    name: "rules",
    version: 1,
    on_change: OnChange::Rebuild,
};
const PIN_FLOWS: MapPin = MapPin {
    map: "proxy_flows",
    name: "flows",
    version: 1,
    on_change: OnChange::Copy {
        setting: "the flow table",
    },
};
const PIN_STATS: MapPin = MapPin {
    map: "proxy_stats",
    name: "stats",
    // v2: icmp_errors
    version: 2,
    on_change: OnChange::Rebuild,
};

// SAFETY: plain C structs of integers from include/proxy.h.
unsafe impl plain::Plain for proxy_endpoint {}
unsafe impl plain::Plain for proxy_target {}

crate::declare_counters!(
    proxy_stats,
    "proxy_stats",
    [
        (packets, Traffic, "client packets to FROM sent to TO"),
        (bytes, Traffic, "bytes of those packets"),
        (replies, Traffic, "reply packets from TO made to come from FROM"),
        (reply_bytes, Traffic, "bytes of those replies"),
        (
            rerouted,
            Traffic,
            "packets whose next hop changed with the destination"
        ),
        (
            icmp_errors,
            Traffic,
            "ICMP errors about the rule's flows, translated"
        ),
    ]
);

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// interface the clients' traffic leaves by
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub iface: Option<String>,
    /// FROM_IP:PORT=TO_IP:PORT, repeatable; IPv6 in brackets: [2001:db8::1]:80=[2001:db8::2]:8080
    #[arg(long = "map", value_name = "FROM=TO", value_parser = rule_flag)]
    pub maps: Vec<Rule>,
    /// attach, pin under /sys/fs/bpf/ebpf-net/proxy/, print ready and exit; run again to update rules in place
    #[arg(long)]
    pub persist: bool,
    #[command(flatten)]
    pub run: RunOptions,
}

crate::run_args!(ProxyArgs);

/// What flags and config file say together.
pub struct Settings {
    iface: Item,
    rules: Vec<Rule>,
}

impl Settings {
    fn read(args: &ProxyArgs) -> Result<Self> {
        let file = Sources::<ProxySection>::read(&args.run)?;
        let iface = file.interface(args.iface.as_ref())?;
        let from_file = file
            .config
            .as_ref()
            .zip(file.section())
            .map(|(c, s)| {
                c.rules(&s.map)
                    .iter()
                    .map(|item| parse_rule(&item.text, &item.origin).map_err(|err| item.fail(err)))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let rules = config::entries(
            args.maps.clone(),
            from_file.unwrap_or_default(),
            "rules",
            "--map",
            "proxy.map",
        )?;
        Ok(Self {
            iface,
            rules: check_rules(rules)?,
        })
    }
}

/// One `--map`: TCP and UDP packets to `from` go to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub from: SocketAddr,
    pub to: SocketAddr,
    /// where it came from, for error messages: `--map TEXT` or `FILE:LINE: map FROM`
    pub origin: String,
}

fn parse_endpoint(text: &str) -> Result<SocketAddr> {
    let addr: SocketAddr = text
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("'{text}' is not IP:PORT (IPv6 goes in brackets: [2001:db8::1]:80)"))?;
    if addr.port() == 0 {
        bail!("port 0 in '{text}'");
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        bail!("'{}' is not a unicast address", addr.ip());
    }
    Ok(addr)
}

fn parse_rule(text: &str, origin: &str) -> Result<Rule> {
    let (from, to) = text.split_once('=').context("expected FROM_IP:PORT=TO_IP:PORT")?;
    let rule = Rule {
        from: parse_endpoint(from)?,
        to: parse_endpoint(to)?,
        origin: origin.to_string(),
    };
    if rule.from.is_ipv4() != rule.to.is_ipv4() {
        bail!("FROM and TO are of different address families");
    }
    if rule.from == rule.to {
        bail!("FROM and TO are the same");
    }
    Ok(rule)
}

/// clap's value parser for `--map`; the error is the whole chain, in one line.
pub fn rule_flag(text: &str) -> Result<Rule, String> {
    parse_rule(text, &format!("--map {text}")).map_err(|err| format!("{err:#}"))
}

/// Parses and checks every `--map`: one family per rule, FROM never twice, FROM != TO.
pub fn parse_rules(maps: &[String]) -> Result<Vec<Rule>> {
    let rules = maps
        .iter()
        .map(|text| rule_flag(text).map_err(|err| anyhow::anyhow!("--map {text}: {err}")))
        .collect::<Result<Vec<_>>>()?;
    check_rules(rules)
}

/// Checks rules from flags and a config file together, each error naming the flag or line.
pub fn check_rules(rules: Vec<Rule>) -> Result<Vec<Rule>> {
    let mut seen: HashMap<SocketAddr, &str> = HashMap::new();
    for rule in &rules {
        if let Some(first) = seen.insert(rule.from, &rule.origin) {
            bail!(
                "{}: FROM {} is mapped twice (also at {first})",
                rule.origin,
                rule.from
            );
        }
    }
    if rules.len() > MAX_RULES {
        bail!("{} rules; at most {MAX_RULES}", rules.len());
    }
    Ok(rules)
}

crate::endpoint_conversions!(proxy_endpoint);

/// Refuses a rule whose FROM the kernel would never send out of `iface`: without a route a
/// connect() fails before any packet exists, and through another interface (or `lo`, for an
/// address of this node) the egress program never sees it. Either way every connection
/// would fail or go elsewhere while `ready` said otherwise.
fn check_routes(rules: &[Rule], iface: &Interface) -> Result<()> {
    let mut routes = Routes::new()?;
    for rule in rules {
        let from = rule.from.ip();
        match routes.route_to(from) {
            Err(err) => bail!(
                "{}: FROM {from} has no route from this network namespace ({}); connections to it \
                 would fail before a packet reaches {}: add a route to it through {} first",
                rule.origin,
                err.root_cause(),
                iface.name,
                iface.name
            ),
            Ok(route) if route.dev != iface.name => bail!(
                "{}: FROM {from} is routed through {}, not {}: the proxy on {}'s egress would never \
                 see its packets",
                rule.origin,
                route.dev,
                iface.name,
                iface.name
            ),
            Ok(_) => {}
        }
    }
    Ok(())
}

/// The rules in the kernel map now: FROM -> (TO, rule id).
fn installed_rules(rules: &impl MapCore) -> Result<BTreeMap<SocketAddr, (SocketAddr, u32)>> {
    let mut installed = BTreeMap::new();
    for key in rules.keys() {
        let Some(value) = rules.lookup(&key, MapFlags::ANY)? else {
            continue;
        };
        let from: proxy_endpoint = maps::from_bytes("proxy rule key", &key)?;
        let target: proxy_target = maps::from_bytes("proxy rule", &value)?;
        installed.insert(
            SocketAddr::from(&from),
            (SocketAddr::from(&target.to), target.rule_id),
        );
    }
    Ok(installed)
}

/// Makes the rule map say exactly `rules`: new and changed rules are written before removed
/// ones are deleted, and a rule keeps its id (and so its counters) while its FROM stays.
fn sync_rules(rules_map: &impl MapCore, stats_map: &impl MapCore, rules: &[Rule]) -> Result<()> {
    let installed = installed_rules(rules_map)?;
    let mut used: HashSet<u32> = installed
        .iter()
        .filter(|(from, _)| rules.iter().any(|rule| rule.from == **from))
        .map(|(_, (_, id))| *id)
        .collect();
    let mut next_free = (0..MAX_RULES as u32)
        .filter(|id| !used.contains(id))
        .collect::<Vec<_>>()
        .into_iter();
    let zero_stats = vec![vec![0u8; size_of::<proxy_stats>()]; libbpf_rs::num_possible_cpus()?];
    for rule in rules {
        let rule_id = match installed.get(&rule.from) {
            Some((_, id)) => *id,
            None => {
                let id = next_free.next().context("no free rule id")?;
                // a reused id starts counting from zero
                stats_map.update_percpu(&id.to_ne_bytes(), &zero_stats, MapFlags::ANY)?;
                used.insert(id);
                id
            }
        };
        let target = proxy_target {
            to: rule.to.into(),
            rule_id,
        };
        rules_map
            .update(
                as_bytes(&proxy_endpoint::from(rule.from)),
                as_bytes(&target),
                MapFlags::ANY,
            )
            .with_context(|| format!("writing rule {} -> {}", rule.from, rule.to))?;
    }
    for from in installed.keys() {
        if !rules.iter().any(|rule| rule.from == *from) {
            rules_map
                .delete(as_bytes(&proxy_endpoint::from(*from)))
                .with_context(|| format!("removing rule {from}"))?;
        }
    }
    Ok(())
}

fn load<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    pins: Option<&mut PinSet>,
) -> Result<ProxySkel<'obj>> {
    let mut open = ProxySkelBuilder::default()
        .open(storage)
        .context("opening the proxy programs")?;
    if let Some(pins) = pins {
        pins.prepare(open.open_object_mut(), SUBCOMMAND, PINS)?;
    }
    open.load().context("loading the proxy programs")
}

/// Loads the programs with `rules` installed, nothing attached; for tests and benchmarks.
pub fn load_with_rules<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    rules: &[Rule],
) -> Result<ProxySkel<'obj>> {
    let skel = load(storage, None)?;
    sync_rules(&skel.maps.proxy_rules, &skel.maps.proxy_stats, rules)?;
    Ok(skel)
}

fn describe_rules(rules: &[Rule]) -> String {
    rules
        .iter()
        .map(|rule| format!("{} -> {}", rule.from, rule.to))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The proxy datapath on the lifecycle.
pub struct Proxy;

/// Every map pinned with `--persist`.
const PINS: &[MapPin] = &[PIN_RULES, PIN_FLOWS, PIN_STATS];

/// The maps a report reads.
pub struct View {
    rules: MapHandle,
    stats: MapHandle,
    flows: MapHandle,
}

/// One rule with its counters.
struct RuleReport {
    from: SocketAddr,
    to: SocketAddr,
    stats: proxy_stats,
}

impl Datapath for Proxy {
    const NAME: &'static str = SUBCOMMAND;
    const PROGRAMS: &'static [&'static str] = PROGRAMS;
    type Args = ProxyArgs;
    type Desired = Settings;
    type Plan = Vec<Rule>;
    type Loaded<'obj> = ProxySkel<'obj>;
    type View = View;

    fn desired(args: &ProxyArgs) -> Result<Settings> {
        Settings::read(args)
    }
    fn target(desired: &Settings) -> Result<Target> {
        Target::interface(&desired.iface)
    }
    fn plan(desired: &Settings, target: &Target, _persist: bool) -> Result<Vec<Rule>> {
        check_routes(&desired.rules, target.iface())?;
        Ok(desired.rules.clone())
    }
    fn load<'obj>(
        storage: &'obj mut Storage,
        _plan: &Vec<Rule>,
        pins: Option<&mut PinSet>,
    ) -> Result<ProxySkel<'obj>> {
        load(&mut storage[0], pins)
    }
    fn apply(skel: &ProxySkel<'_>, rules: &Vec<Rule>) -> Result<Applied> {
        sync_rules(&skel.maps.proxy_rules, &skel.maps.proxy_stats, rules)?;
        Ok(Applied::default())
    }
    fn attach(
        skel: &ProxySkel<'_>,
        target: &Target,
        _plan: &Vec<Rule>,
    ) -> Result<Vec<Box<dyn std::any::Any>>> {
        Ok(vec![
            crate::kernel::tc::attach_tc(&skel.progs.proxy_egress, target.iface(), TcDirection::Egress)?,
            crate::kernel::tc::attach_tc(&skel.progs.proxy_ingress, target.iface(), TcDirection::Ingress)?,
        ])
    }
    fn attach_pinned(
        skel: &ProxySkel<'_>,
        target: &Target,
        pins: &PinDir,
        _plan: &Vec<Rule>,
    ) -> Result<bool> {
        crate::kernel::tc::attach_or_update_pinned_all(
            &[
                (&skel.progs.proxy_egress, TcDirection::Egress),
                (&skel.progs.proxy_ingress, TcDirection::Ingress),
            ],
            target.iface(),
            pins,
        )
    }
    fn desired_maps() -> &'static [MapPin] {
        &[PIN_RULES]
    }
    fn objects<'a>(skel: &'a ProxySkel<'_>) -> Vec<(&'a libbpf_rs::Object, &'static [MapPin])> {
        vec![(skel.object(), PINS)]
    }
    fn check_reload(old: &Settings, new: &Settings) -> Result<()> {
        if new.iface.text != old.iface.text {
            bail!(
                "the interface changed ({} -> {}); that needs a restart",
                old.iface.text,
                new.iface.text
            );
        }
        Ok(())
    }
    fn describe(desired: &Settings, _target: &Target, _plan: &Vec<Rule>) -> String {
        describe_rules(&desired.rules)
    }
    fn view(skel: &ProxySkel<'_>) -> Result<View> {
        Ok(View {
            rules: MapHandle::try_from(&skel.maps.proxy_rules)?,
            stats: MapHandle::try_from(&skel.maps.proxy_stats)?,
            flows: MapHandle::try_from(&skel.maps.proxy_flows)?,
        })
    }
    fn view_pinned(pins: &PinDir) -> Result<View> {
        Ok(View {
            rules: pins.open_map(&PIN_RULES)?,
            stats: pins.open_map(&PIN_STATS)?,
            flows: pins.open_map(&PIN_FLOWS)?,
        })
    }
    fn report(view: &View) -> Result<Report> {
        let rules = rule_report(&view.rules, &view.stats)?;
        let flows = view.flows.keys().count() as u64;
        let mut families = Vec::new();
        for (index, field) in proxy_stats::FIELDS.iter().enumerate() {
            let mut family =
                metrics::Family::counter(&format!("ebpf_net_proxy_rule_{}", field.name), field.help);
            for rule in &rules {
                family.add(
                    &[("from", &rule.from.to_string()), ("to", &rule.to.to_string())],
                    rule.stats.values()[index],
                );
            }
            families.push(family);
        }
        let all = proxy_stats::sum(rules.iter().map(|rule| &rule.stats));
        families.push(metrics::rewrites(
            SUBCOMMAND,
            &[("egress", all.packets), ("ingress", all.replies)],
        ));
        let mut gauge =
            metrics::Family::gauge("ebpf_net_proxy_flows", "flows whose replies are translated back");
        gauge.add(&[], flows);
        families.push(gauge);
        let lines: Vec<String> = rules.iter().map(summarize_rule).collect();
        let details: Vec<serde_json::Value> = rules
            .iter()
            .map(|rule| {
                let mut entry = rule.stats.json();
                entry.insert("from".into(), json!(rule.from.to_string()));
                entry.insert("to".into(), json!(rule.to.to_string()));
                serde_json::Value::Object(entry)
            })
            .collect();
        Ok(Report {
            on_detach: None,
            details: Details::now(json!({ "rules": details, "flows": flows })),
            summary: format!("{flows} tracked flows; {}", lines.join("; ")),
            families,
            exit: lines,
        })
    }
}

/// Every rule with its counters, for `status` and the exit summary.
fn rule_report(rules_map: &impl MapCore, stats_map: &impl MapCore) -> Result<Vec<RuleReport>> {
    let mut report = Vec::new();
    for (from, (to, rule_id)) in installed_rules(rules_map)? {
        report.push(RuleReport {
            from,
            to,
            stats: maps::sum_percpu_counters(stats_map, rule_id)?,
        });
    }
    Ok(report)
}

fn summarize_rule(rule: &RuleReport) -> String {
    format!(
        "{} -> {}: {} packets out ({} re-routed), {} replies back, {} ICMP errors translated",
        rule.from,
        rule.to,
        rule.stats.packets,
        rule.stats.rerouted,
        rule.stats.replies,
        rule.stats.icmp_errors
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rules_parse_both_families() {
        let rules = parse_rules(&maps(&[
            "10.0.0.1:80=10.0.0.2:8080",
            "[2001:db8::1]:53=[2001:db8::2]:5353",
        ]))
        .unwrap();
        assert_eq!(rules[0].to, "10.0.0.2:8080".parse().unwrap());
        assert_eq!(rules[1].from, "[2001:db8::1]:53".parse().unwrap());
        assert_eq!(SocketAddr::from(&proxy_endpoint::from(rules[1].to)), rules[1].to);
        assert_eq!(
            SocketAddr::from(&proxy_endpoint::from(rules[0].from)),
            rules[0].from
        );
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (bad, needle) in [
            ("10.0.0.1:80", "expected FROM_IP:PORT=TO_IP:PORT"),
            ("10.0.0.1=10.0.0.2:80", "not IP:PORT"),
            ("2001:db8::1:80=[2001:db8::2]:80", "brackets"),
            ("10.0.0.1:80=[2001:db8::2]:80", "different address families"),
            ("10.0.0.1:80=10.0.0.1:80", "the same"),
            ("10.0.0.1:0=10.0.0.2:80", "port 0"),
            ("0.0.0.0:80=10.0.0.2:80", "unicast"),
        ] {
            let err = parse_rules(&maps(&[bad])).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let err = parse_rules(&maps(&["10.0.0.1:80=10.0.0.2:80", "10.0.0.1:80=10.0.0.3:80"])).unwrap_err();
        assert!(err.to_string().contains("mapped twice"), "{err}");
    }
}
