//! The one lifecycle every datapath runs on. A datapath says once how it loads, applies a
//! desired state to its maps as a diff, attaches and reports; this module runs it in the
//! foreground (signals first, attach, `ready`, SIGHUP reload, detach) or persisted (reuse or
//! migrate the pins, diff-apply, swap the programs, exit), and answers `status`, `down` and
//! `--metrics` for all of them through the registry.
//!
//! ```text
//!   CLI flags ─┐                         ┌─ foreground: attach, ready, reload, detach
//!   TOML file ─┼─> Desired ─> plan ─> load ─> apply (diff) ─┤
//!   agent    ──┘                         └─ persist: pins reused/migrated, swap, exit
//!                          report ─> status text, --json, /metrics, exit summary
//! ```

use std::any::Any;
use std::mem::MaybeUninit;
use std::sync::Arc;

use anyhow::{bail, Result};
use libbpf_rs::OpenObject;
use serde_json::Value;

use crate::control::config::RunOptions;
use crate::control::desired;
use crate::control::health;
use crate::control::instance::Instance;
use crate::control::metrics::{self, Family};
use crate::control::run::{self, Request, Shutdown};
use crate::control::service::SyncReport;
use crate::kernel::addr::Interface;
use crate::kernel::attach;
use crate::kernel::cgroup::Cgroup;
use crate::kernel::pin::{self, MapPin, PinDir, PinSet};

/// Room for the BPF objects of one load (ipv6-hp loads two).
pub type Storage = [MaybeUninit<OpenObject>; 2];

/// Where a datapath attaches.
pub enum Target {
    Interface(Interface),
    Cgroup(Cgroup),
}

impl Target {
    /// The interface a flag or config line names; an unknown one fails naming where it
    /// came from.
    pub fn interface(item: &crate::control::config::Item) -> Result<Self> {
        Ok(Target::Interface(
            Interface::by_name(&item.text).map_err(|err| item.fail(err))?,
        ))
    }

    /// The name of its pin directory and run record.
    pub fn key(&self) -> String {
        match self {
            Target::Interface(iface) => iface.name.clone(),
            Target::Cgroup(cgroup) => cgroup.target(),
        }
    }

    /// As users name it: `eth0`, `cgroup /pods`.
    pub fn display(&self) -> String {
        match self {
            Target::Interface(iface) => iface.name.clone(),
            Target::Cgroup(cgroup) => format!("cgroup {}", cgroup.relative),
        }
    }

    /// The interface; datapaths on interfaces only ever get one.
    pub fn iface(&self) -> &Interface {
        match self {
            Target::Interface(iface) => iface,
            Target::Cgroup(_) => unreachable!("an interface datapath got a cgroup"),
        }
    }

    /// The cgroup; clusterip only ever gets one.
    pub fn cgroup(&self) -> &Cgroup {
        match self {
            Target::Cgroup(cgroup) => cgroup,
            Target::Interface(_) => unreachable!("a cgroup datapath got an interface"),
        }
    }

    fn down_args(&self) -> String {
        match self {
            Target::Interface(iface) => format!("-i {}", iface.name),
            Target::Cgroup(cgroup) => format!("--cgroup {}", cgroup.path.display()),
        }
    }
}

/// What applying a desired state did.
#[derive(Default)]
pub struct Applied {
    /// "1 added, 0 changed, ..." for the ready and reload lines (empty: nothing to count)
    pub report: String,
    /// lines for the log
    pub log: Vec<String>,
    /// what a SIGKILL would leave outside the links, for the run record
    pub leaves: Vec<String>,
    /// what it wrote to the [`Datapath::desired_maps`] (None: read them back to record)
    pub written: Option<desired::Written>,
}

impl Applied {
    /// A service table sync's outcome: its counts, and what it wrote.
    pub fn synced(report: SyncReport) -> Self {
        Self {
            report: report.to_string(),
            written: Some(report.written),
            ..Self::default()
        }
    }
}

/// A report's JSON, built only when something shows it: at 10,000 services x 10 backends it
/// was 150 MB of `serde_json` values that `status` without --json and every /metrics scrape
/// built and threw away.
pub struct Details(Box<dyn FnOnce() -> Value>);

impl Details {
    /// JSON made later, from what `make` owns.
    pub fn later(make: impl FnOnce() -> Value + 'static) -> Self {
        Self(Box::new(make))
    }

    /// JSON already made (small reports).
    pub fn now(value: Value) -> Self {
        Self(Box::new(move || value))
    }

    pub fn build(self) -> Value {
        (self.0)()
    }
}

impl Default for Details {
    fn default() -> Self {
        Self::now(Value::Null)
    }
}

/// What a datapath shows of itself, read once and shown three ways.
#[derive(Default)]
pub struct Report {
    /// `status --json`'s `details`, made only when asked for
    pub details: Details,
    /// `status`'s one line
    pub summary: String,
    /// `/metrics`
    pub families: Vec<Family>,
    /// the lines printed when a foreground run stops
    pub exit: Vec<String>,
    /// said on the `detached from TARGET` line itself
    pub on_detach: Option<String>,
}

/// What the lifecycle reads of a datapath's command line besides its own settings.
pub trait RunArgs {
    fn run_options(&self) -> &RunOptions;
    /// `--persist` (false for a datapath that only runs in the foreground).
    fn persist(&self) -> bool;
}

/// [`RunArgs`] for a datapath's clap arguments with a `run: RunOptions` field and a
/// `persist: bool` one (`foreground`: without, it never persists).
#[macro_export]
macro_rules! run_args {
    ($args:ty) => {
        impl $crate::control::lifecycle::RunArgs for $args {
            fn run_options(&self) -> &$crate::control::config::RunOptions {
                &self.run
            }
            fn persist(&self) -> bool {
                self.persist
            }
        }
    };
    ($args:ty, foreground) => {
        impl $crate::control::lifecycle::RunArgs for $args {
            fn run_options(&self) -> &$crate::control::config::RunOptions {
                &self.run
            }
            fn persist(&self) -> bool {
                false
            }
        }
    };
}

/// Everything a datapath says once. The lifecycle functions below do the rest.
pub trait Datapath: 'static {
    /// The subcommand, and the directory name of its pins and run records.
    const NAME: &'static str;
    /// Program names as the kernel reports them, to recognise ours on a hook.
    const PROGRAMS: &'static [&'static str];
    /// One run per target (false: several may share it, as monitors do).
    const EXCLUSIVE: bool = true;

    /// Its command line.
    type Args: RunArgs;
    /// What the user (or a program) asked for: settings and services or rules, typed.
    type Desired;
    /// What the desired state needs resolved on this node (routes, MACs, ports).
    type Plan;
    /// Its loaded programs and maps.
    type Loaded<'obj>;
    /// What reports read: map handles, which the metrics thread may hold.
    type View: Send + Sync + 'static;

    /// Reads the flags and the config file; SIGHUP calls it again.
    fn desired(args: &Self::Args) -> Result<Self::Desired>;
    /// The network namespace its state is keyed by (clusterip: none, the host's).
    fn netns_key(netns_key: &str) -> String {
        netns_key.to_string()
    }
    fn target(desired: &Self::Desired) -> Result<Target>;
    /// What the kernel must offer for the programs to load (lb: the conntrack kfuncs),
    /// checked before a first load; a re-run whose pinned program is attached skips it, as
    /// that program loaded on this kernel.
    fn check_kernel() -> Result<()> {
        Ok(())
    }
    /// Refuses when one of our programs not pinned by us is on the target already.
    fn refuse_if_attached(target: &Target, pinned: &[u32]) -> Result<()> {
        attach::refuse_if_attached(Self::NAME, Self::PROGRAMS, target.iface(), pinned)
    }
    /// Checks and resolves a desired state before anything changes.
    fn plan(desired: &Self::Desired, target: &Target, persist: bool) -> Result<Self::Plan>;
    /// Opens, configures and loads; with `pins`, its maps are reused or migrated.
    fn load<'obj>(
        storage: &'obj mut Storage,
        plan: &Self::Plan,
        pins: Option<&mut PinSet>,
    ) -> Result<Self::Loaded<'obj>>;
    /// Makes the maps hold the desired state, touching only what differs.
    fn apply(loaded: &Self::Loaded<'_>, plan: &Self::Plan) -> Result<Applied>;
    /// Attaches for a foreground run: the values detach when dropped.
    fn attach(loaded: &Self::Loaded<'_>, target: &Target, plan: &Self::Plan) -> Result<Vec<Box<dyn Any>>>;
    /// Attaches and pins the links, or swaps the programs into the pinned links; true when
    /// it swapped.
    fn attach_pinned(
        loaded: &Self::Loaded<'_>,
        target: &Target,
        pins: &PinDir,
        plan: &Self::Plan,
    ) -> Result<bool>;
    /// The loaded object(s), each with the pins of its maps.
    fn objects<'a>(loaded: &'a Self::Loaded<'_>) -> Vec<(&'a libbpf_rs::Object, &'static [MapPin])>;
    /// The maps filled only from the desired state (services, backends), which `status`
    /// compares with what the last `--persist` apply left in them.
    fn desired_maps() -> &'static [MapPin] {
        &[]
    }
    /// What a reload may not change without a restart.
    fn check_reload(old: &Self::Desired, new: &Self::Desired) -> Result<()>;
    /// The ready line after the target.
    fn describe(desired: &Self::Desired, target: &Target, plan: &Self::Plan) -> String;
    /// Handles on the maps a report reads, from a running load...
    fn view(loaded: &Self::Loaded<'_>) -> Result<Self::View>;
    /// ...or from a persisted directory.
    fn view_pinned(pins: &PinDir) -> Result<Self::View>;
    /// Reads the maps once: status, `--json`, `/metrics` and the exit summary all show this.
    fn report(view: &Self::View) -> Result<Report>;
    /// Undoes what the datapath changed in the namespace beyond its links and pins, once no
    /// instance of it is left there.
    fn release(_netns_key: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// Its programs attached elsewhere than on interfaces, for `status`.
    fn attached_elsewhere() -> Vec<AttachedElsewhere> {
        Vec::new()
    }
    /// What a run the Kubernetes agent drives does beside its updates, for as long as it
    /// drives the loaded programs (lb answers established TCP flows' asks); it ends when the
    /// returned value drops. Nothing by default.
    fn beside_driven(_loaded: &Self::Loaded<'_>) -> Result<Option<Box<dyn std::any::Any>>> {
        Ok(None)
    }
    /// Runs between `ready` and the stop: by default it serves signals (SIGHUP reloads).
    fn serve(
        _loaded: &Self::Loaded<'_>,
        shutdown: &Shutdown,
        reload: &mut dyn FnMut(Request) -> Result<String>,
    ) -> Result<()> {
        shutdown.serve(Self::NAME, reload);
        Ok(())
    }
}

/// Runs a datapath as its command line says: in the foreground or persisted.
pub fn run<D: Datapath>(args: &D::Args, netns_key: &str) -> Result<()> {
    // first, so a stop at any moment of what follows is a stop we handle
    let shutdown = Shutdown::install()?;
    let persist = args.persist();
    args.run_options().check(persist)?;
    let mut desired = D::desired(args)?;
    run::phase("desired state read");
    let target = D::target(&desired)?;
    run::phase("target resolved");
    let netns_key = D::netns_key(netns_key);
    let pins = PinDir::new(D::NAME, &netns_key, &target.key());
    if pins.prog_ids().is_empty() {
        D::check_kernel()?;
    }
    let (mut instance, orphan) = if D::EXCLUSIVE {
        let (instance, orphan) = Instance::claim(D::NAME, &netns_key, &target.key(), persist)?;
        (Some(instance), orphan)
    } else {
        (None, None)
    };
    if let Target::Interface(iface) = &target {
        // legacy tc filters outlive a SIGKILLed run (tcx links do not): take over from them
        for line in crate::kernel::tc::remove_orphaned_on(iface.index, D::PROGRAMS)? {
            eprintln!("{}: {line}", D::NAME);
        }
    }
    D::refuse_if_attached(&target, &pins.prog_ids())?;
    run::phase("instance claimed, target checked");
    let mut plan = D::plan(&desired, &target, persist)?;
    run::phase("planned");
    if persist {
        if let Some(orphan) = orphan
            .as_ref()
            .filter(|o| o.left.iter().any(|w| w == UPDATE_IN_PROGRESS))
        {
            eprintln!(
                "{}: finishing the update a killed run (pid {}) left in progress on {}",
                D::NAME,
                orphan.pid,
                target.display()
            );
        }
        return persist_run::<D>(&desired, &target, &plan, &pins, instance.as_mut(), None);
    }
    // before the first apply: it registers the checks the services ask for
    health::start(D::NAME, shutdown.sender());
    if pins.exists() {
        bail!(
            "{} is persisted on {} (see `ebpf-net status`); run `ebpf-net down {} {}` first",
            D::NAME,
            target.display(),
            D::NAME,
            target.down_args()
        );
    }
    if let Some(orphan) = orphan {
        eprintln!(
            "{}: taking over from a killed run (pid {}) on {}",
            D::NAME,
            orphan.pid,
            target.display()
        );
    }
    // where this run shows its maps to `status`; what a killed run left there goes first
    let run_pins = PinDir::foreground(D::NAME, &netns_key, &target.key());
    if instance.is_some() {
        if run_pins.exists() {
            run_pins.remove()?;
        }
        pin::require_untampered(&run_pins, D::NAME)?;
    }
    let mut storage: Storage = [MaybeUninit::uninit(), MaybeUninit::uninit()];
    let loaded = D::load(&mut storage, &plan, None)?;
    // From the first change on, a failure undoes what apply changed in the namespace (lb's
    // nft table and forwarding), as a stop would.
    let started = (|| {
        let applied = D::apply(&loaded, &plan)?;
        for what in &applied.leaves {
            if let Some(instance) = instance.as_mut() {
                instance.leaves(what)?;
            }
        }
        // the maps pinned for `status` (recorded first, removed on every way out)
        let shown = match instance.as_mut() {
            Some(instance) => {
                instance.pins(&run_pins.path)?;
                run_pins.create()?;
                let shown = RunPins(run_pins.clone());
                for (object, specs) in D::objects(&loaded) {
                    PinSet::pin_all(&run_pins, object, specs)?;
                }
                Some(shown)
            }
            None => None,
        };
        let metrics = metrics::serve(args.run_options().metrics.as_ref(), || {
            // the exporter's thread reads the same maps through its own handles
            let view = D::view(&loaded)?;
            Ok(Arc::new(move || D::report(&view).map(|report| report.families)) as metrics::Source)
        })?;
        Ok((applied, (shown, metrics), D::attach(&loaded, &target, &plan)?))
    })();
    let (applied, attachments) = match started {
        Ok((applied, metrics, attachments)) => (applied, (metrics, attachments)),
        Err(err) => {
            let _ = D::release(&netns_key);
            return Err(err);
        }
    };
    let ((shown, metrics), attachments) = attachments;
    for line in &applied.log {
        eprintln!("{}: {line}", D::NAME);
    }
    if let Some(addr) = metrics {
        eprintln!("{}: metrics at http://{addr}/metrics", D::NAME);
    }
    run::announce_ready(
        D::NAME,
        &format!(
            "{}: {}{}",
            target.display(),
            D::describe(&desired, &target, &plan),
            crate::kernel::tc::ready_note()
        ),
    );
    let mut reload = |request: Request| -> Result<String> {
        if request == Request::Health {
            // the same plan, with what the checks say now (service::sync_services_with)
            D::apply(&loaded, &plan)?;
            return Ok(String::new());
        }
        let new = D::desired(args)?;
        D::check_reload(&desired, &new)?;
        let new_plan = D::plan(&new, &target, false)?;
        let applied = D::apply(&loaded, &new_plan)?;
        for line in &applied.log {
            eprintln!("{}: {line}", D::NAME);
        }
        for what in &applied.leaves {
            if let Some(instance) = instance.as_mut() {
                instance.leaves(what)?;
            }
        }
        let described = D::describe(&new, &target, &new_plan);
        desired = new;
        plan = new_plan;
        Ok(if applied.report.is_empty() {
            described
        } else {
            format!("{described} ({})", applied.report)
        })
    };
    let served = D::serve(&loaded, &shutdown, &mut reload);
    drop(attachments);
    let report = D::view(&loaded).and_then(|view| D::report(&view));
    drop(shown);
    for line in D::release(&netns_key)? {
        eprintln!("{}: {line}", D::NAME);
    }
    served?;
    let report = report?;
    for line in &report.exit {
        eprintln!("{}: {line}", D::NAME);
    }
    let note = report
        .on_detach
        .map(|note| format!("; {note}"))
        .unwrap_or_default();
    eprintln!("{}: detached from {}{note}", D::NAME, target.display());
    Ok(())
}

/// A foreground run's maps pinned for `status`: removed when dropped, on every way out.
struct RunPins(PinDir);

impl Drop for RunPins {
    fn drop(&mut self) {
        if let Err(err) = self.0.remove() {
            eprintln!("ebpf-net: could not remove {}: {err:#}", self.0.path.display());
        }
    }
}

/// What a `--persist` run killed before it finished leaves in its run record.
pub const UPDATE_IN_PROGRESS: &str =
    "an update in progress (the maps may hold part of it; run the same command again to finish it)";

/// What a program driving a datapath (the Kubernetes agent) is told after each apply (the
/// ready line's text, or why it failed), answered with the next desired state; None stops,
/// leaving the datapath pinned and serving.
pub type Next<'a, D> = &'a mut dyn FnMut(Result<String>) -> Option<<D as Datapath>::Desired>;

/// Runs a datapath for a program that computes its desired state, as the Kubernetes agent
/// does: attached and pinned as `--persist` does, so it serves on while the program stops or
/// restarts, then kept loaded while `next` gives new desired states, each applied in place as
/// a diff. Call it on a thread of its own (in the datapath's network namespace).
pub fn drive<D: Datapath>(netns_key: &str, desired: D::Desired, next: Next<'_, D>) -> Result<()> {
    let target = D::target(&desired)?;
    let netns_key = D::netns_key(netns_key);
    let pins = PinDir::new(D::NAME, &netns_key, &target.key());
    if pins.prog_ids().is_empty() {
        D::check_kernel()?;
    }
    let (mut instance, _) = Instance::claim(D::NAME, &netns_key, &target.key(), true)?;
    if let Target::Interface(iface) = &target {
        for line in crate::kernel::tc::remove_orphaned_on(iface.index, D::PROGRAMS)? {
            eprintln!("{}: {line}", D::NAME);
        }
    }
    D::refuse_if_attached(&target, &pins.prog_ids())?;
    let plan = D::plan(&desired, &target, true)?;
    persist_run::<D>(&desired, &target, &plan, &pins, Some(&mut instance), Some(next))
}

/// " (1 added, ...)" after a ready or update line, when the apply counted.
fn counted(applied: &Applied) -> String {
    if applied.report.is_empty() {
        String::new()
    } else {
        format!(" ({})", applied.report)
    }
}

/// [`drive`]'s updates: each desired state `next` gives is planned, applied as a diff and
/// recorded for `status`, as a `--persist` re-run would, without loading anything again.
fn drive_updates<D: Datapath>(
    loaded: &D::Loaded<'_>,
    target: &Target,
    pins: &PinDir,
    first: String,
    next: Next<'_, D>,
) {
    let mut outcome = Ok(first);
    while let Some(desired) = next(outcome) {
        outcome = (|| {
            let plan = D::plan(&desired, target, true)?;
            let recorded = desired::set_aside(pins);
            let applied = D::apply(loaded, &plan)?;
            for line in &applied.log {
                eprintln!("{}: {line}", D::NAME);
            }
            let before = if recorded {
                desired::Before::Recorded
            } else {
                desired::Before::Unknown
            };
            desired::record(pins, D::desired_maps(), before, applied.written.as_ref())?;
            Ok(format!(
                "{}: {}{}",
                target.display(),
                D::describe(&desired, target, &plan),
                counted(&applied)
            ))
        })();
    }
}

/// Attaches and pins, or updates what is pinned in place: the maps are reused (or migrated
/// to a new shape), the desired state applied as a diff, then the new programs swapped into
/// the pinned links, so traffic never meets an empty table or a missing program. With
/// `drive`, it stays loaded for the updates [`drive`] gives.
fn persist_run<D: Datapath>(
    desired: &D::Desired,
    target: &Target,
    plan: &D::Plan,
    pins: &PinDir,
    instance: Option<&mut Instance>,
    mut drive: Option<Next<'_, D>>,
) -> Result<()> {
    let driven = drive.is_some();
    // recorded before the first map changes; the record goes when this run ends, so only a
    // killed run leaves it, for `status` to show and the next run to finish
    // a tree someone loosened is not ours to trust: refused before anything changes
    pin::require_untampered(pins, D::NAME)?;
    if let Some(instance) = instance {
        instance.leaves(UPDATE_IN_PROGRESS)?;
    }
    // a run killed midway leaves no desired state to compare a half-applied table with
    let recorded = desired::set_aside(pins);
    let fresh = !pins.exists();
    pins.create()?;
    let mut set = PinSet::new(pins);
    if let Some(running) = keepable_programs(pins, target).filter(|_| !fresh) {
        set.keep_programs(running);
    }
    run::phase("pin directory ready");
    let result = (|| -> Result<(bool, Applied)> {
        let mut storage: Storage = [MaybeUninit::uninit(), MaybeUninit::uninit()];
        let loaded = D::load(&mut storage, plan, Some(&mut set))?;
        run::phase("loaded");
        for (object, specs) in D::objects(&loaded) {
            set.after_load(object, specs)?;
        }
        // the tables are right before the (new) program sees a packet
        let applied = D::apply(&loaded, plan)?;
        run::phase("applied");
        let updated = if set.kept {
            // the programs running are the ones this load would make
            if matches!(target, Target::Interface(_)) {
                crate::kernel::tc::note_kept(pins);
            }
            true
        } else {
            D::attach_pinned(&loaded, target, pins, plan)?
        };
        for (object, specs) in D::objects(&loaded) {
            set.after_swap(object, specs)?;
        }
        run::phase("attached");
        // the record follows from what apply wrote when it knows what the maps held before
        let before = if fresh {
            desired::Before::Fresh
        } else if recorded && D::desired_maps().iter().all(|spec| set.reused(spec)) {
            desired::Before::Recorded
        } else {
            desired::Before::Unknown
        };
        desired::record(pins, D::desired_maps(), before, applied.written.as_ref())?;
        run::phase("  desired maps recorded");
        desired::record_programs(pins, &set.fingerprints, &pins.prog_ids())?;
        run::phase("desired state recorded");
        if let Some(next) = drive.take() {
            for line in applied.log.iter().chain(&set.log) {
                eprintln!("{}: {line}", D::NAME);
            }
            let first = format!(
                "{}: {}{}",
                target.display(),
                D::describe(desired, target, plan),
                counted(&applied)
            );
            let _beside = D::beside_driven(&loaded).unwrap_or_else(|err| {
                eprintln!("{}: {err:#}", D::NAME);
                None
            });
            drive_updates::<D>(&loaded, target, pins, first, next);
        }
        Ok((updated, applied))
    })();
    if result.is_err() && fresh {
        let _ = pins.remove();
        let _ = D::release(&pins.netns);
    }
    let (updated, applied) = result?;
    if driven {
        // the driver said everything as it went; it stops leaving the datapath serving
        return Ok(());
    }
    for line in applied.log.iter().chain(&set.log) {
        eprintln!("{}: {line}", D::NAME);
    }
    run::phase("done");
    let verb = if updated { "updated in place" } else { "pinned" };
    let counted = counted(&applied);
    run::announce_ready(
        D::NAME,
        &format!(
            "{verb}: {}: {}{counted}{}",
            target.display(),
            D::describe(desired, target, plan),
            crate::kernel::tc::ready_note()
        ),
    );
    Ok(())
}

/// The fingerprint of the programs running from `pins` when a re-run may keep them: what
/// the last run recorded (one object), every pinned link alive on `target` with the program
/// recorded, no legacy tc filter, and every pinned map one those programs use.
fn keepable_programs(pins: &PinDir, target: &Target) -> Option<u64> {
    let (fingerprints, recorded) = desired::recorded_programs(pins)?;
    let [fingerprint] = fingerprints[..] else {
        return None;
    };
    if !crate::kernel::tc::recorded(&pins.path).is_empty() {
        return None;
    }
    let mut running = Vec::new();
    for (_, path) in pins.links() {
        let link = attach::PinnedLink::open(&path).ok()?;
        let on_target = match (link.target, target) {
            (attach::LinkTarget::Interface(index), Target::Interface(iface)) => index == iface.index,
            (attach::LinkTarget::Cgroup(id), Target::Cgroup(cgroup)) => Some(id) == cgroup.id(),
            _ => false,
        };
        if !on_target {
            return None;
        }
        running.push(link.prog_id);
    }
    running.sort_unstable();
    running.dedup();
    if running.is_empty() || running != recorded {
        return None;
    }
    let mut used = Vec::new();
    for id in &running {
        used.extend(attach::program_info(*id).ok()?.1);
    }
    for path in pins.map_files() {
        let map = libbpf_rs::MapHandle::from_pinned_path(&path).ok()?;
        let info = libbpf_rs::MapInfo::new(std::os::fd::AsFd::as_fd(&map)).ok()?;
        if !used.contains(&info.info.id) {
            return None;
        }
    }
    Some(fingerprint)
}

/// A program of ours attached somewhere other than an interface (clusterip's cgroups), for
/// `status`.
pub struct AttachedElsewhere {
    pub cgroup: String,
    pub hook: &'static str,
    pub program: String,
    pub prog_id: u32,
}

/// A datapath as `status`, `down` and the CLI see it; every [`Datapath`] is one.
pub trait Registered: Sync {
    fn name(&self) -> &'static str;
    fn programs(&self) -> &'static [&'static str];
    fn report_pinned(&self, pins: &PinDir) -> Result<Report>;
    fn release(&self, netns_key: &str) -> Result<Vec<String>>;
    fn attached_elsewhere(&self) -> Vec<AttachedElsewhere>;
}

/// The registry entry of a datapath: `&Entry::<Lb>::NEW`.
pub struct Entry<D>(std::marker::PhantomData<fn() -> D>);

impl<D> Entry<D> {
    pub const NEW: Self = Self(std::marker::PhantomData);
}

impl<D: Datapath> Registered for Entry<D> {
    fn name(&self) -> &'static str {
        D::NAME
    }
    fn programs(&self) -> &'static [&'static str] {
        D::PROGRAMS
    }
    fn report_pinned(&self, pins: &PinDir) -> Result<Report> {
        D::report(&D::view_pinned(pins)?)
    }
    fn release(&self, netns_key: &str) -> Result<Vec<String>> {
        D::release(netns_key)
    }
    fn attached_elsewhere(&self) -> Vec<AttachedElsewhere> {
        D::attached_elsewhere()
    }
}
