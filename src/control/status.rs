//! `ebpf-net status` and `ebpf-net down`: what is persisted (every namespace), what is attached
//! here, and removing it.

use anyhow::Result;
use serde_json::{json, Value};

use crate::control::instance::{self, RUN_ROOT};
use crate::control::lifecycle::{Registered, Report};
use crate::kernel::addr::Interface;
use crate::kernel::attach::{self, PinnedLink, TcDirection};
use crate::kernel::netns;
use crate::kernel::pin::{PinDir, PIN_ROOT};

/// Every datapath, as the CLI's registry lists them.
pub type Registry = [&'static dyn Registered];

/// Every program name ebpf-net loads onto a hook, to recognise ours among others.
fn is_ours(registry: &Registry, name: &str) -> bool {
    registry
        .iter()
        .any(|datapath| datapath.programs().contains(&name))
}

fn find<'a>(registry: &'a Registry, subcommand: &str) -> Option<&'a dyn Registered> {
    registry
        .iter()
        .copied()
        .find(|datapath| datapath.name() == subcommand)
}

/// Whether a persisted entry still does its job, and if not, why.
fn health(pins: &PinDir) -> String {
    if netns::key_exists(&pins.netns) == Some(false) {
        return format!("orphaned: network namespace '{}' is gone", pins.netns);
    }
    let links = pins.links();
    let legacy = crate::kernel::tc::recorded(&pins.path);
    if let Some((record, _)) = legacy.iter().find(|(_, id)| id.is_none()) {
        return format!(
            "orphaned: its {} tc filter (handle {:#x}) is gone",
            record.direction.name(),
            record.handle
        );
    }
    if links.is_empty() && legacy.is_empty() {
        return "orphaned: nothing attached".into();
    }
    for (name, path) in links {
        match PinnedLink::open(&path) {
            Ok(link) => {
                if let Some(lost) = link.target.lost() {
                    return format!("orphaned: {name} link {lost}");
                }
            }
            Err(err) => return format!("broken: {err:#}"),
        }
    }
    "active".into()
}

pub fn status(registry: &Registry, json_output: bool, netns_key: &str) -> Result<()> {
    let all_pins = PinDir::all();
    let persisted: Vec<Value> = all_pins
        .iter()
        .map(|pins| {
            let report = match find(registry, &pins.subcommand) {
                Some(datapath) => datapath.report_pinned(pins),
                None => Err(anyhow::anyhow!(
                    "unknown subcommand directory '{}'",
                    pins.subcommand
                )),
            };
            let (details, summary, error) = match report {
                Ok(Report { details, summary, .. }) => (details, summary, None),
                Err(err) => (Value::Null, String::new(), Some(format!("{err:#}"))),
            };
            json!({
                "subcommand": pins.subcommand,
                "netns": pins.netns,
                "target": pins.target,
                "target_display": pins.target_display(),
                "path": pins.path,
                "state": health(pins),
                "details": details,
                "summary": summary,
                "error": error,
            })
        })
        .collect();

    let pinned_prog_ids: Vec<u32> = all_pins
        .iter()
        .filter(|pins| pins.netns == netns_key || pins.netns == netns::HOST_KEY)
        .flat_map(PinDir::prog_ids)
        .collect();
    let owner = |id: u32| {
        if pinned_prog_ids.contains(&id) {
            "persisted"
        } else {
            "foreground process"
        }
    };
    let mut attached = Vec::new();
    let run_filters = crate::kernel::tc::run_filters();
    for iface in Interface::all() {
        for direction in TcDirection::BOTH {
            // An interface without tcx support or gone meanwhile simply has nothing to show.
            for prog in attach::tcx_programs(iface.index, direction).unwrap_or_default() {
                if is_ours(registry, &prog.name) {
                    attached.push(json!({
                        "interface": iface.name,
                        "hook": format!("tcx/{}", direction.name()),
                        "program": prog.name,
                        "prog_id": prog.id,
                        "owner": owner(prog.id),
                    }));
                }
            }
            for (prog, record) in crate::kernel::tc::legacy_programs(iface.index, direction) {
                if is_ours(registry, &prog.name) {
                    let killed = run_filters
                        .iter()
                        .find(|filter| !filter.alive && filter.record.same_place(&record))
                        .map(|filter| {
                            format!(
                                "orphaned: killed run (pid {}); `ebpf-net down` removes it",
                                filter.record.pid
                            )
                        });
                    attached.push(json!({
                        "interface": iface.name,
                        "hook": format!("tc/{} handle {:#x} prio {}", direction.name(), record.handle, record.priority),
                        "program": prog.name,
                        "prog_id": prog.id,
                        "owner": killed.unwrap_or_else(|| owner(prog.id).to_string()),
                    }));
                }
            }
        }
        if let Some(prog) = attach::xdp_program(iface.index).filter(|prog| is_ours(registry, &prog.name)) {
            let mode = attach::xdp_mode(iface.index).map_or("?", attach::XdpMode::name);
            attached.push(json!({
                "interface": iface.name,
                "hook": format!("xdp/{mode}"),
                "program": prog.name,
                "prog_id": prog.id,
                "owner": owner(prog.id),
            }));
        }
    }
    // cgroup hooks belong to no network namespace
    for found in registry.iter().flat_map(|datapath| datapath.attached_elsewhere()) {
        attached.push(json!({
            "cgroup": found.cgroup,
            "hook": found.hook,
            "program": found.program,
            "prog_id": found.prog_id,
            "owner": owner(found.prog_id),
        }));
    }

    let runs: Vec<Value> = instance::all()
        .iter()
        .map(|claim| {
            json!({
                "subcommand": claim.record.subcommand,
                "netns": claim.record.netns,
                "target": claim.record.target,
                "target_display": claim.target_display(),
                "pid": claim.record.pid,
                "mode": claim.record.mode,
                "command": claim.record.command,
                "left": claim.record.left,
                "state": if claim.alive { "running" } else { "orphaned" },
                "description": claim.describe(),
            })
        })
        .collect();

    if json_output {
        let report =
            json!({ "netns": netns_key, "persisted": persisted, "attached": attached, "runs": runs });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if persisted.is_empty() {
        println!("persisted: none under {PIN_ROOT}");
    } else {
        println!("persisted (all namespaces, {PIN_ROOT}):");
        for entry in &persisted {
            let subcommand = entry["subcommand"].as_str().unwrap_or_default();
            let detail = match entry["error"].as_str() {
                Some(error) => format!("unreadable: {error}"),
                None => entry["summary"].as_str().unwrap_or_default().to_string(),
            };
            println!(
                "  {subcommand:<9} netns {:<12} {:<12} {:<10} {detail}",
                entry["netns"].as_str().unwrap_or_default(),
                entry["target_display"].as_str().unwrap_or_default(),
                entry["state"].as_str().unwrap_or_default(),
            );
        }
    }
    if !runs.is_empty() {
        println!("runs (all namespaces, {RUN_ROOT}):");
        for run in &runs {
            println!(
                "  {:<9} netns {:<12} {:<12} {}",
                run["subcommand"].as_str().unwrap_or_default(),
                run["netns"].as_str().unwrap_or_default(),
                run["target_display"].as_str().unwrap_or_default(),
                run["description"].as_str().unwrap_or_default(),
            );
        }
    }
    if attached.is_empty() {
        println!("attached in network namespace {netns_key}: none");
    } else {
        println!("attached in network namespace {netns_key}:");
        for entry in &attached {
            let target = match entry["cgroup"].as_str() {
                Some(cgroup) => format!("cgroup {cgroup}"),
                None => entry["interface"].as_str().unwrap_or_default().to_string(),
            };
            println!(
                "  {:<12} {:<12} {:<18} prog {:<6} {}",
                target,
                entry["hook"].as_str().unwrap_or_default(),
                entry["program"].as_str().unwrap_or_default(),
                entry["prog_id"],
                entry["owner"].as_str().unwrap_or_default(),
            );
        }
    }
    Ok(())
}

/// What a removed lb changed in this namespace beyond its pins or links (its nft table,
/// forwarding) goes once no lb is left; other namespaces' are left to a `down` run there.
fn release_after(registry: &Registry, subcommand: &str, netns: &str, netns_key: &str) -> Result<()> {
    if netns != netns_key {
        return Ok(());
    }
    if let Some(datapath) = find(registry, subcommand) {
        for line in datapath.release(netns_key)? {
            eprintln!("down: {line}");
        }
    }
    Ok(())
}

/// Removes persisted state of this namespace (or of every namespace with `all`), optionally
/// only of one subcommand and/or one target.
pub fn down(
    registry: &Registry,
    subcommand: Option<&str>,
    target: Option<&str>,
    all: bool,
    netns_key: &str,
) -> Result<()> {
    let mut removed = 0;
    for line in crate::kernel::tc::remove_orphaned()? {
        eprintln!("down: {line}");
        removed += 1;
    }
    for pins in PinDir::all() {
        if !all && pins.netns != netns_key {
            continue;
        }
        if subcommand.is_some_and(|name| name != pins.subcommand)
            || target.is_some_and(|name| name != pins.target)
        {
            continue;
        }
        pins.remove()?;
        eprintln!(
            "down: removed {} on {} (netns {})",
            pins.subcommand,
            pins.target_display(),
            pins.netns
        );
        removed += 1;
        release_after(registry, &pins.subcommand, &pins.netns, netns_key)?;
    }
    for claim in instance::all() {
        let record = &claim.record;
        if claim.alive
            || (!all && record.netns != netns_key)
            || subcommand.is_some_and(|name| name != record.subcommand)
            || target.is_some_and(|name| name != record.target)
        {
            continue;
        }
        if !claim.remove()? {
            continue;
        }
        eprintln!(
            "down: removed the record of a killed {} run (pid {}) on {} (netns {})",
            record.subcommand,
            record.pid,
            claim.target_display(),
            record.netns
        );
        removed += 1;
        release_after(registry, &record.subcommand, &record.netns, netns_key)?;
    }
    if removed == 0 {
        eprintln!("down: nothing persisted or left behind to remove in network namespace {netns_key}");
    }
    Ok(())
}
