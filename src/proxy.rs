//! `ebpf-net proxy`: transparent destination rewriting at tc. Egress sends packets for FROM
//! to TO (re-routed, MACs rewritten); ingress makes TO's replies come from FROM, per flow.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde_json::{json, Value};

use crate::addr::Interface;
use crate::attach::{self, TcDirection, TcxAttachment};
use crate::config::{self, ConfigFile, Item, RunOptions};
use crate::instance::Instance;
use crate::maps::{self, as_bytes};
use crate::metrics;
use crate::pin::PinDir;
use crate::run::{self, Shutdown};
use crate::skel::proxy::types::{proxy_endpoint, proxy_stats, proxy_target};
use crate::skel::proxy::{ProxySkel, ProxySkelBuilder};

pub const SUBCOMMAND: &str = "proxy";
pub const PROGRAMS: [&str; 2] = ["proxy_egress", "proxy_ingress"];
/// include/proxy.h PROXY_MAX_RULES
const MAX_RULES: usize = 4096;
const PIN_RULES: &str = "rules";
const PIN_FLOWS: &str = "flows";
const PIN_STATS: &str = "stats";

// SAFETY: plain C structs of integers from include/proxy.h.
unsafe impl plain::Plain for proxy_endpoint {}
unsafe impl plain::Plain for proxy_target {}
unsafe impl plain::Plain for proxy_stats {}

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// interface the clients' traffic leaves by
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub iface: Option<String>,
    /// FROM_IP:PORT=TO_IP:PORT, repeatable; IPv6 in brackets: [2001:db8::1]:80=[2001:db8::2]:8080
    #[arg(long = "map", value_name = "FROM=TO")]
    pub maps: Vec<String>,
    /// attach, pin under /sys/fs/bpf/ebpf-net/proxy/, print ready and exit; run again to update rules in place
    #[arg(long)]
    pub persist: bool,
    #[command(flatten)]
    pub run: RunOptions,
}

/// What flags and config file say together.
struct Settings {
    iface: Item,
    rules: Vec<Rule>,
}

impl Settings {
    fn read(args: &ProxyArgs) -> Result<Self> {
        let config = ConfigFile::load(args.run.config.as_deref())?;
        let section = config::section_of(config.as_ref(), |doc| &doc.proxy, SUBCOMMAND)?;
        let iface = config::interface(
            args.iface.as_ref(),
            config.as_ref(),
            section.map(|s| &s.interface),
            SUBCOMMAND,
        )?;
        let from_file = config.as_ref().zip(section).map(|(c, s)| c.rules(&s.map));
        let items = config::entries(
            Item::flags("--map", &args.maps),
            from_file.unwrap_or_default(),
            "rules",
            "--map",
            "proxy.map",
        )?;
        Ok(Self {
            iface,
            rules: parse_rule_items(&items)?,
        })
    }
}

/// One `--map`: TCP and UDP packets to `from` go to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub from: SocketAddr,
    pub to: SocketAddr,
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

fn parse_rule(text: &str) -> Result<Rule> {
    let (from, to) = text.split_once('=').context("expected FROM_IP:PORT=TO_IP:PORT")?;
    let rule = Rule {
        from: parse_endpoint(from)?,
        to: parse_endpoint(to)?,
    };
    if rule.from.is_ipv4() != rule.to.is_ipv4() {
        bail!("FROM and TO are of different address families");
    }
    if rule.from == rule.to {
        bail!("FROM and TO are the same");
    }
    Ok(rule)
}

/// Parses and checks every `--map`: one family per rule, FROM never twice, FROM != TO.
pub fn parse_rules(maps: &[String]) -> Result<Vec<Rule>> {
    parse_rule_items(&Item::flags("--map", maps))
}

/// Parses rules from flags and a config file, each error naming the flag or file line.
pub fn parse_rule_items(items: &[Item]) -> Result<Vec<Rule>> {
    let mut seen = HashMap::new();
    let mut rules = Vec::new();
    for item in items {
        let rule = parse_rule(&item.text).map_err(|err| item.fail(err))?;
        if let Some(first) = seen.insert(rule.from, &item.origin) {
            return Err(item.fail(format!("FROM {} is mapped twice (also at {first})", rule.from)));
        }
        rules.push(rule);
    }
    if rules.len() > MAX_RULES {
        bail!("{} rules; at most {MAX_RULES}", rules.len());
    }
    Ok(rules)
}

crate::endpoint_conversions!(proxy_endpoint);

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
    pins: Option<&PinDir>,
) -> Result<ProxySkel<'obj>> {
    let mut open = ProxySkelBuilder::default()
        .open(storage)
        .context("opening the proxy programs")?;
    if let Some(pins) = pins {
        // libbpf reuses these when pinned already: a re-run updates the live tables
        open.maps.proxy_rules.set_pin_path(pins.file(PIN_RULES))?;
        open.maps.proxy_flows.set_pin_path(pins.file(PIN_FLOWS))?;
        open.maps.proxy_stats.set_pin_path(pins.file(PIN_STATS))?;
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

pub fn run(args: &ProxyArgs, netns_key: &str) -> Result<()> {
    args.run.check(args.persist)?;
    let Settings { iface, mut rules } = Settings::read(args)?;
    let iface = Interface::by_name(&iface.text).map_err(|err| iface.fail(err))?;
    let pins = PinDir::new(SUBCOMMAND, netns_key, &iface.name);
    let _instance = Instance::claim(SUBCOMMAND, netns_key, &iface.name, args.persist)?;
    attach::refuse_if_attached(SUBCOMMAND, &PROGRAMS, &iface, &pins)?;
    if args.persist {
        return persist(&rules, &iface, &pins);
    }
    if pins.exists() {
        bail!(
            "proxy is persisted on {} (see `ebpf-net status`); run `ebpf-net down proxy -i {}` first",
            iface.name,
            iface.name
        );
    }
    let mut object = MaybeUninit::uninit();
    let skel = load_with_rules(&mut object, &rules)?;
    let metrics = metrics::serve(args.run.metrics.as_ref(), || metrics_source(&skel))?;
    let attachments = [
        TcxAttachment::attach(&skel.progs.proxy_egress, &iface, TcDirection::Egress)?,
        TcxAttachment::attach(&skel.progs.proxy_ingress, &iface, TcDirection::Ingress)?,
    ];
    let shutdown = Shutdown::install()?;
    if let Some(addr) = metrics {
        eprintln!("{SUBCOMMAND}: metrics at http://{addr}/metrics");
    }
    run::announce_ready(SUBCOMMAND, &format!("{}: {}", iface.name, describe_rules(&rules)));
    shutdown.serve(SUBCOMMAND, || {
        let new = Settings::read(args)?;
        if new.iface.text != iface.name {
            bail!(
                "the interface changed ({} -> {}); that needs a restart",
                iface.name,
                new.iface.text
            );
        }
        sync_rules(&skel.maps.proxy_rules, &skel.maps.proxy_stats, &new.rules)?;
        rules = new.rules;
        Ok(describe_rules(&rules))
    });
    drop(attachments);
    for entry in rule_report(&skel.maps.proxy_rules, &skel.maps.proxy_stats)? {
        eprintln!("{SUBCOMMAND}: {}", summarize_rule(&entry));
    }
    eprintln!("{SUBCOMMAND}: detached from {}", iface.name);
    Ok(())
}

/// Metrics read at each scrape: per-rule counters, rewrites by direction, tracked flows.
fn metrics_source(skel: &ProxySkel<'_>) -> Result<metrics::Source> {
    let rules_map = MapHandle::try_from(&skel.maps.proxy_rules)?;
    let stats_map = MapHandle::try_from(&skel.maps.proxy_stats)?;
    let flows_map = MapHandle::try_from(&skel.maps.proxy_flows)?;
    Ok(Arc::new(move || {
        let report = rule_report(&rules_map, &stats_map)?;
        let fields = [
            ("packets", "client packets to FROM sent to TO"),
            ("bytes", "bytes of those packets"),
            ("replies", "reply packets from TO made to come from FROM"),
            ("reply_bytes", "bytes of those replies"),
            ("rerouted", "packets whose next hop changed with the destination"),
            ("icmp_errors", "ICMP errors about the rule's flows, translated"),
        ];
        let total =
            |field: &str| -> u64 { report.iter().map(|rule| rule[field].as_u64().unwrap_or(0)).sum() };
        let mut families = Vec::new();
        for (field, help) in fields {
            let mut family = metrics::Family::counter(&format!("ebpf_net_proxy_rule_{field}"), help);
            for rule in &report {
                family.add(
                    &[
                        ("from", rule["from"].as_str().unwrap_or_default()),
                        ("to", rule["to"].as_str().unwrap_or_default()),
                    ],
                    rule[field].as_u64().unwrap_or(0),
                );
            }
            families.push(family);
        }
        families.push(metrics::rewrites(
            SUBCOMMAND,
            &[("egress", total("packets")), ("ingress", total("replies"))],
        ));
        let mut flows =
            metrics::Family::gauge("ebpf_net_proxy_flows", "flows whose replies are translated back");
        flows.add(&[], flows_map.keys().count() as u64);
        families.push(flows);
        Ok(families)
    }))
}

fn persist(rules: &[Rule], iface: &Interface, pins: &PinDir) -> Result<()> {
    let fresh = !pins.exists();
    pins.create()?;
    let result = (|| -> Result<bool> {
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, Some(pins))?;
        // the new rules are in place before any (new) program sees a packet
        sync_rules(&skel.maps.proxy_rules, &skel.maps.proxy_stats, rules)?;
        let mut updated = false;
        for (prog, direction) in [
            (&skel.progs.proxy_egress, TcDirection::Egress),
            (&skel.progs.proxy_ingress, TcDirection::Ingress),
        ] {
            updated |= attach::attach_or_update_pinned(prog, iface, direction, &pins.link_file(direction))?;
        }
        Ok(updated)
    })();
    if result.is_err() && fresh {
        let _ = pins.remove();
    }
    let verb = if result? { "updated in place" } else { "pinned" };
    run::announce_ready(
        SUBCOMMAND,
        &format!("{verb}: {}: {}", iface.name, describe_rules(rules)),
    );
    Ok(())
}

/// Every rule with its counters, for `status` and the exit summary.
fn rule_report(rules_map: &impl MapCore, stats_map: &impl MapCore) -> Result<Vec<Value>> {
    let mut report = Vec::new();
    for (from, (to, rule_id)) in installed_rules(rules_map)? {
        let stats: proxy_stats = maps::sum_percpu_counters(stats_map, rule_id)?;
        report.push(json!({
            "from": from.to_string(),
            "to": to.to_string(),
            "packets": stats.packets,
            "bytes": stats.bytes,
            "replies": stats.replies,
            "reply_bytes": stats.reply_bytes,
            "rerouted": stats.rerouted,
            "icmp_errors": stats.icmp_errors,
        }));
    }
    Ok(report)
}

fn summarize_rule(rule: &Value) -> String {
    format!(
        "{} -> {}: {} packets out ({} re-routed), {} replies back, {} ICMP errors translated",
        rule["from"].as_str().unwrap_or("?"),
        rule["to"].as_str().unwrap_or("?"),
        rule["packets"],
        rule["rerouted"],
        rule["replies"],
        rule["icmp_errors"]
    )
}

/// What `status` shows of one persisted proxy directory.
pub fn describe_persisted(pins: &PinDir) -> Result<Value> {
    let rules = MapHandle::from_pinned_path(pins.file(PIN_RULES))?;
    let stats = MapHandle::from_pinned_path(pins.file(PIN_STATS))?;
    let flows = MapHandle::from_pinned_path(pins.file(PIN_FLOWS))?;
    Ok(json!({ "rules": rule_report(&rules, &stats)?, "flows": flows.keys().count() }))
}

pub fn summarize(details: &Value) -> String {
    let rules: Vec<String> = details["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(summarize_rule)
        .collect();
    format!("{} tracked flows; {}", details["flows"], rules.join("; "))
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
