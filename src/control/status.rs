//! `ebpf-net status` and `ebpf-net down`: what is persisted (every namespace), what is attached
//! here, and removing it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{json, Value};

use crate::control::desired;
use crate::control::instance::{self, RUN_ROOT};
use crate::control::lifecycle::{Registered, Report};
use crate::kernel::addr::Interface;
use crate::kernel::attach::{self, PinnedLink, TcDirection};
use crate::kernel::netns;
use crate::kernel::pin::{self, PinDir, PIN_ROOT, RUN_PINS};

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

/// What lies under the pin root that ebpf-net never makes there: files where only
/// directories go, a directory named after no datapath. Reported, never touched.
fn unexpected_pins(registry: &Registry) -> Vec<String> {
    fn entries(dir: &Path) -> Vec<(PathBuf, bool)> {
        let Ok(read) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut found: Vec<(PathBuf, bool)> = read
            .flatten()
            .map(|entry| (entry.path(), entry.file_type().is_ok_and(|kind| kind.is_dir())))
            .collect();
        found.sort();
        found
    }
    let mut unexpected = Vec::new();
    for (subcommand, is_dir) in entries(Path::new(PIN_ROOT)) {
        let name = subcommand.file_name().unwrap_or_default().to_string_lossy();
        if is_dir && name == RUN_PINS {
            // the foreground runs' maps, listed with the runs
            continue;
        }
        if !is_dir {
            unexpected.push(format!(
                "{}: a file where only datapath directories go",
                subcommand.display()
            ));
        } else if find(registry, &name).is_none() {
            unexpected.push(format!(
                "{}: a directory named after no datapath",
                subcommand.display()
            ));
        } else {
            for (netns, is_dir) in entries(&subcommand) {
                if !is_dir {
                    unexpected.push(format!(
                        "{}: a file where only namespace directories go",
                        netns.display()
                    ));
                    continue;
                }
                for (target, is_dir) in entries(&netns) {
                    if !is_dir {
                        unexpected.push(format!(
                            "{}: a file where only target directories go",
                            target.display()
                        ));
                    }
                }
            }
        }
    }
    unexpected
}

pub fn status(registry: &Registry, json_output: bool, netns_key: &str) -> Result<()> {
    // a directory named after no datapath is listed once, as unexpected, not as a datapath
    let all_pins: Vec<PinDir> = PinDir::all()
        .into_iter()
        .filter(|pins| find(registry, &pins.subcommand).is_some())
        .collect();
    let unexpected = unexpected_pins(registry);
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
                // the JSON only for --json: at 10,000 services it is most of status's memory
                Ok(Report { details, summary, .. }) => (
                    if json_output { details.build() } else { Value::Null },
                    summary,
                    None,
                ),
                Err(err) => (Value::Null, String::new(), Some(format!("{err:#}"))),
            };
            json!({
                "loosened": pin::loosened(pins),
                "tampered": desired::compare(pins),
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

    let claims = instance::all();
    let runs: Vec<Value> = claims
        .iter()
        .map(|claim| {
            // a live foreground run's maps, read as a persisted directory's are
            let shown = claim.record.pins.as_ref().filter(|_| claim.alive).map(|_| {
                PinDir::foreground(
                    &claim.record.subcommand,
                    &claim.record.netns,
                    &claim.record.target,
                )
            });
            let (details, summary, error) = match shown.as_ref().map(|pins| {
                let report = find(registry, &pins.subcommand)
                    .ok_or_else(|| anyhow::anyhow!("unknown subcommand '{}'", pins.subcommand))
                    .and_then(|datapath| datapath.report_pinned(pins));
                (report, pin::loosened(pins))
            }) {
                None => (Value::Null, String::new(), None),
                Some((Ok(Report { details, summary, .. }), loosened)) => (
                    if json_output { details.build() } else { Value::Null },
                    summary,
                    loosened.into_iter().next(),
                ),
                Some((Err(err), _)) => (Value::Null, String::new(), Some(format!("{err:#}"))),
            };
            json!({
                "pins": claim.record.pins,
                "details": details,
                "summary": summary,
                "error": error,
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

    // maps a killed foreground run left pinned without a record naming them
    let left_over: Vec<String> = PinDir::foreground_all()
        .iter()
        .filter(|pins| !claims.iter().any(|claim| holds(claim, pins)))
        .map(|pins| {
            format!(
                "{}: maps a killed foreground {} run left on {} (netns {}); `ebpf-net down` removes them",
                pins.path.display(),
                pins.subcommand,
                pins.target_display(),
                pins.netns
            )
        })
        .collect();

    if json_output {
        let report = json!({ "netns": netns_key, "persisted": persisted, "attached": attached, "runs": runs, "left_over": left_over, "unexpected": unexpected });
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
            for (label, key) in [("loosened", "loosened"), ("tampered", "tampered")] {
                for line in entry[key].as_array().into_iter().flatten() {
                    println!("      {label}: {}", line.as_str().unwrap_or_default());
                }
            }
        }
    }
    for what in &unexpected {
        println!("  unexpected: {what} (not made by ebpf-net; left alone)");
    }
    if !runs.is_empty() {
        println!("runs (all namespaces, {RUN_ROOT}):");
        for run in &runs {
            let detail = match (run["error"].as_str(), run["summary"].as_str()) {
                (Some(error), _) => format!(" unreadable: {error}"),
                (None, Some(summary)) if !summary.is_empty() => format!(" {summary}"),
                _ => String::new(),
            };
            println!(
                "  {:<9} netns {:<12} {:<12} {}{detail}",
                run["subcommand"].as_str().unwrap_or_default(),
                run["netns"].as_str().unwrap_or_default(),
                run["target_display"].as_str().unwrap_or_default(),
                run["description"].as_str().unwrap_or_default(),
            );
        }
    }
    for what in &left_over {
        println!("  left over: {what}");
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

/// Whether a run record is the one of a foreground run's pinned maps.
fn holds(claim: &instance::Claim, pins: &PinDir) -> bool {
    claim.record.subcommand == pins.subcommand
        && claim.record.netns == pins.netns
        && claim.record.target == pins.target
        && claim.record.pins.as_ref() == Some(&pins.path)
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

/// What `down` removes.
pub struct DownScope<'a> {
    /// only this datapath
    pub subcommand: Option<&'a str>,
    /// only this interface or cgroup (pin directory name)
    pub target: Option<&'a str>,
    /// without a target named: the only cgroup whose clusterip goes (the root cgroup, as
    /// `clusterip` without `--cgroup` means); other cgroups' are left and listed
    pub default_cgroup: Option<&'a str>,
    /// every namespace and every cgroup
    pub all: bool,
    /// only these (subcommand, netns, target): what a Kubernetes agent drove
    pub only: Option<&'a [(String, String, String)]>,
}

impl DownScope<'_> {
    /// Whether `down` removes the state of (subcommand, netns, target); `Err` with a note
    /// when it is left only because it is another cgroup than the default one.
    fn covers(&self, subcommand: &str, netns: &str, target: &str, netns_key: &str) -> Result<bool, ()> {
        if let Some(only) = self.only {
            // clusterip's cgroup state is the host's whichever namespace `down` runs in
            return Ok((netns == netns_key || netns == crate::kernel::netns::HOST_KEY)
                && only
                    .iter()
                    .any(|(s, n, t)| s == subcommand && n == netns && t == target));
        }
        if (!self.all && netns != netns_key)
            || self.subcommand.is_some_and(|name| name != subcommand)
            || self.target.is_some_and(|name| name != target)
        {
            return Ok(false);
        }
        let is_cgroup = target.starts_with("%2F");
        match (self.all, self.target, self.default_cgroup) {
            (false, None, Some(default)) if is_cgroup && target != default => Err(()),
            _ => Ok(true),
        }
    }
}

/// Removes persisted state and what killed runs left, as `scope` says, and prints each thing
/// it removed (and each it left because it was not named).
pub fn down(registry: &Registry, scope: &DownScope<'_>, netns_key: &str) -> Result<()> {
    let mut removed = 0;
    let mut left = Vec::new();
    // legacy tc filters of killed foreground runs (a tcx link goes with its process)
    for line in crate::kernel::tc::remove_orphaned()? {
        eprintln!("down: {line}");
        removed += 1;
    }
    // a directory named after no datapath is not ours to remove (status lists it)
    for pins in PinDir::all()
        .into_iter()
        .filter(|pins| find(registry, &pins.subcommand).is_some())
    {
        match scope.covers(&pins.subcommand, &pins.netns, &pins.target, netns_key) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(()) => {
                left.push(format!("{} on {}", pins.subcommand, pins.target_display()));
                continue;
            }
        }
        pins.remove()?;
        desired::forget(&pins);
        eprintln!(
            "down: removed {} on {} (netns {})",
            pins.subcommand,
            pins.target_display(),
            pins.netns
        );
        removed += 1;
        release_after(registry, &pins.subcommand, &pins.netns, netns_key)?;
    }
    // the maps killed foreground runs left pinned go before their records
    let claims = instance::all();
    for pins in PinDir::foreground_all() {
        if claims.iter().any(|claim| claim.alive && holds(claim, &pins))
            || scope.covers(&pins.subcommand, &pins.netns, &pins.target, netns_key) != Ok(true)
        {
            continue;
        }
        pins.remove()?;
        eprintln!(
            "down: removed the maps a killed {} run left pinned on {} (netns {})",
            pins.subcommand,
            pins.target_display(),
            pins.netns
        );
        removed += 1;
    }
    for claim in instance::all() {
        let record = &claim.record;
        match scope.covers(&record.subcommand, &record.netns, &record.target, netns_key) {
            Ok(true) if !claim.alive => {}
            Err(()) if !claim.alive => {
                left.push(format!(
                    "the record of a killed {} run on {}",
                    record.subcommand,
                    claim.target_display()
                ));
                continue;
            }
            _ => continue,
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
    for what in &left {
        eprintln!("down: left {what} (name it with --cgroup, or use --all)");
    }
    if removed == 0 {
        eprintln!("down: nothing persisted or left behind to remove in network namespace {netns_key}");
    }
    Ok(())
}
