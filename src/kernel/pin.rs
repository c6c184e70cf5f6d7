//! Persisted state in the host's bpffs: /sys/fs/bpf/ebpf-net/<subcommand>/<netns>/<target>/.
//! Files named `link_*` are pinned links (the attachments), the rest pinned maps. A foreground
//! run pins its maps (never its links) under /sys/fs/bpf/ebpf-net/_run/<subcommand>/<netns>/
//! <target>/ while it lasts, so `status` reads them as it reads persisted ones.
//!
//! Directories are made 0700 and pins are 0600 (the kernel's default): on this kernel file
//! permission on a pin is all it takes to read and rewrite a map, so a tree whose modes were
//! loosened (group- or world-writable, or not owned by us) is refused, see [`loosened`].

use std::fs;
use std::path::{Path, PathBuf};

use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};

use anyhow::{bail, Context, Result};
use libbpf_rs::MapCore;

use crate::kernel::attach::PinnedLink;
use crate::kernel::probe;

pub const BPFFS: &str = "/sys/fs/bpf";
pub const PIN_ROOT: &str = "/sys/fs/bpf/ebpf-net";
/// Under [`PIN_ROOT`]: the maps of running foreground runs, one directory per run (bpffs
/// refuses names with a dot, and no datapath's name starts with `_`).
pub const RUN_PINS: &str = "_run";

/// The pins of one subcommand on one target (an interface or a cgroup) in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDir {
    pub subcommand: String,
    pub netns: String,
    pub target: String,
    pub path: PathBuf,
}

impl PinDir {
    pub fn new(subcommand: &str, netns: &str, target: &str) -> Self {
        let path = Path::new(PIN_ROOT).join(subcommand).join(netns).join(target);
        Self {
            subcommand: subcommand.into(),
            netns: netns.into(),
            target: target.into(),
            path,
        }
    }

    /// Where a foreground run pins its maps while it lasts.
    pub fn foreground(subcommand: &str, netns: &str, target: &str) -> Self {
        let path = Path::new(PIN_ROOT)
            .join(RUN_PINS)
            .join(subcommand)
            .join(netns)
            .join(target);
        Self {
            subcommand: subcommand.into(),
            netns: netns.into(),
            target: target.into(),
            path,
        }
    }

    /// The target as users name it: an interface, or `cgroup /path` for a cgroup.
    pub fn target_display(&self) -> String {
        if self.target.starts_with("%2F") {
            format!("cgroup {}", crate::kernel::cgroup::decode_target(&self.target))
        } else {
            self.target.clone()
        }
    }

    /// How `down` names this target: `-i eth0` or `--cgroup /sys/fs/cgroup/x`.
    pub fn down_args(&self) -> String {
        if self.target.starts_with("%2F") {
            format!("--cgroup {}", crate::kernel::cgroup::decode_target(&self.target))
        } else {
            format!("-i {}", self.target)
        }
    }

    /// A pinned map of this directory, by its spec.
    pub fn map_file(&self, spec: &MapPin) -> PathBuf {
        self.file(&spec.file_name())
    }

    /// Opens a pinned map by its spec.
    pub fn open_map(&self, spec: &MapPin) -> Result<libbpf_rs::MapHandle> {
        let path = self.map_file(spec);
        libbpf_rs::MapHandle::from_pinned_path(&path).with_context(|| format!("opening {}", path.display()))
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Where the link of one side of an interface is pinned.
    pub fn link_file(&self, direction: crate::kernel::attach::TcDirection) -> PathBuf {
        self.file(&format!("link_{}", direction.name()))
    }

    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    /// Creates the directory; fails with a clear reason when /sys/fs/bpf is not a bpffs.
    pub fn create(&self) -> Result<()> {
        probe::require_bpffs(Path::new(BPFFS))?;
        // only root may even look inside what ebpf-net makes
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
            .with_context(|| format!("creating {}", self.path.display()))
    }

    /// The program ids of every link pinned in this directory.
    pub fn prog_ids(&self) -> Vec<u32> {
        self.links()
            .iter()
            .filter_map(|(_, path)| PinnedLink::open(path).ok().map(|link| link.prog_id))
            .chain(
                crate::kernel::tc::recorded(&self.path)
                    .into_iter()
                    .filter_map(|(_, id)| id),
            )
            .collect()
    }

    /// Pinned maps in this directory (every pin but links and legacy tc programs).
    pub fn map_files(&self) -> Vec<PathBuf> {
        entries(&self.path)
            .into_iter()
            .filter(|path| {
                let name = file_name(path);
                !name.starts_with("link_") && !name.starts_with("tc_")
            })
            .collect()
    }

    /// Pinned links in this directory, as (name without `link_`, path).
    pub fn links(&self) -> Vec<(String, PathBuf)> {
        let mut links: Vec<_> = entries(&self.path)
            .into_iter()
            .filter_map(|path| {
                let name = path.file_name()?.to_str()?.strip_prefix("link_")?.to_string();
                Some((name, path))
            })
            .collect();
        links.sort();
        links
    }

    /// Detaches every pinned link (even if some process still holds it) and removes every
    /// pin, then the directory and its parents once they are empty.
    pub fn remove(&self) -> Result<()> {
        crate::kernel::tc::remove_recorded(&self.path)?;
        for (_, path) in self.links() {
            if let Ok(link) = libbpf_rs::Link::open(&path) {
                // A link whose interface is gone is already detached; nothing to report.
                let _ = link.detach();
            }
        }
        for path in entries(&self.path) {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        let mut dir = Some(self.path.as_path());
        while let Some(path) = dir.filter(|path| path.starts_with(PIN_ROOT)) {
            if fs::remove_dir(path).is_err() {
                break;
            }
            dir = path.parent();
        }
        Ok(())
    }

    /// Every persisted directory, of every subcommand and namespace (not the foreground
    /// runs' maps under [`RUN_PINS`]).
    pub fn all() -> Vec<PinDir> {
        Self::all_under(Path::new(PIN_ROOT), Self::new)
    }

    /// Every directory of foreground runs' maps, live or left by a killed run.
    pub fn foreground_all() -> Vec<PinDir> {
        Self::all_under(&Path::new(PIN_ROOT).join(RUN_PINS), Self::foreground)
    }

    fn all_under(root: &Path, new: fn(&str, &str, &str) -> PinDir) -> Vec<PinDir> {
        let mut found = Vec::new();
        let hidden = |path: &PathBuf| file_name(path) == RUN_PINS;
        for subcommand in entries(root).into_iter().filter(|path| !hidden(path)) {
            for netns in entries(&subcommand) {
                for target in entries(&netns) {
                    if target.is_dir() {
                        found.push(new(
                            &file_name(&subcommand),
                            &file_name(&netns),
                            &file_name(&target),
                        ));
                    }
                }
            }
        }
        found.sort_by(|a, b| a.path.cmp(&b.path));
        found
    }
}

/// What makes a pin tree unsafe to use: a directory from the pin root down to `dir`, or a
/// pin in it, that is group- or world-writable or owned by someone else than us. One line
/// each, naming the path.
pub fn loosened(dir: &PinDir) -> Vec<String> {
    // SAFETY: geteuid cannot fail and touches no memory
    let me = unsafe { libc::geteuid() };
    let mut paths: Vec<PathBuf> = dir
        .path
        .ancestors()
        .filter(|path| path.starts_with(PIN_ROOT))
        .map(Path::to_path_buf)
        .collect();
    paths.reverse();
    let mut pins = entries(&dir.path);
    pins.sort();
    paths.extend(pins);
    let mut found = Vec::new();
    for path in paths {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            found.push(format!(
                "{} is group- or world-writable (mode {mode:04o}); ebpf-net makes it {}",
                path.display(),
                if meta.is_dir() { "0700" } else { "0600" }
            ));
        } else if meta.uid() != me {
            found.push(format!(
                "{} is owned by uid {}, not by uid {me} that runs ebpf-net",
                path.display(),
                meta.uid()
            ));
        }
    }
    found
}

/// Refuses, in one line naming the path, to use a pin tree whose modes were loosened.
pub fn require_untampered(dir: &PinDir, subcommand: &str) -> Result<()> {
    if let Some(first) = loosened(dir).into_iter().next() {
        bail!(
            "{subcommand}: refusing to use the pins on {}: {first} (whoever can write a pin can rewrite the map; check who changed it, then `ebpf-net down {subcommand} {}`)",
            dir.target_display(),
            dir.down_args()
        );
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default()
}

/// A map a datapath pins: its name in the BPF object, the file it is pinned as (with the
/// layout version in the name, as Cilium's `cilium_lb4_services_v2`), and what to do when
/// the pin in place has another shape.
#[derive(Debug, Clone, Copy)]
pub struct MapPin {
    pub map: &'static str,
    pub name: &'static str,
    pub version: u32,
    pub on_change: OnChange,
}

/// What a re-run does when a pinned map's shape differs from the one about to load.
#[derive(Debug, Clone, Copy)]
pub enum OnChange {
    /// filled from the desired state by every run: a fresh map takes its place
    Rebuild,
    /// state the datapath made (flows, counters): copied into the fresh map when only its
    /// size changed; refused, naming `setting` and the way out, when its layout changed
    Copy { setting: &'static str },
    /// as Copy, and an earlier version's table (one that split into this and others) is
    /// taken over: its entries, converted, fill this map in place of a refusal
    Split { setting: &'static str, earlier: Earlier },
}

/// An entry of an earlier table as this map's (key, value), or None: not this map's.
pub type Convert = fn(&[u8], &[u8]) -> Option<(Vec<u8>, Vec<u8>)>;

/// The pin of an earlier version's table whose entries a map takes over.
#[derive(Debug, Clone, Copy)]
pub struct Earlier {
    /// its file name: `flows_v2`
    pub file: &'static str,
    pub convert: Convert,
}

impl MapPin {
    /// The pin's file name: `flows_v1`.
    pub fn file_name(&self) -> String {
        format!("{}_v{}", self.name, self.version)
    }
}

/// A map's shape as the kernel checks it when a pin is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// creation flags (BPF_F_NO_PREALLOC, BPF_F_MMAPABLE, ...): libbpf reuses a pin only
    /// when they match too
    pub map_flags: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} bytes, value {} bytes, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.map_flags
        )
    }
}

fn shape_of_handle(map: &libbpf_rs::MapHandle) -> Result<Shape> {
    let info = libbpf_rs::MapInfo::new(map.as_fd()).context("reading a pinned map's info")?;
    Ok(Shape {
        map_type: info.info.type_,
        key_size: info.info.key_size,
        value_size: info.info.value_size,
        max_entries: info.info.max_entries,
        map_flags: info.info.map_flags,
    })
}

/// A pinned map that is not reused: the old one stays in service until the new program
/// is swapped in, then the new map takes its pin.
struct Replaced {
    spec: MapPin,
    old: Option<libbpf_rs::MapHandle>,
    stale: Option<PathBuf>,
    /// the old map is an earlier version's, its entries converted
    convert: Option<Convert>,
    why: String,
}

/// `.rodata` variables drawn at random by every load (flow hash seeds): a program kept by a
/// re-run keeps its own, so they are no part of a load's [`fingerprint`].
const RANDOM_PER_LOAD: [&str; 1] = ["hash_seed"];

/// What decides the program a load makes: each program's instructions, type and whether
/// it loads, each map's definition and initial data (but [`RANDOM_PER_LOAD`]). Two loads
/// with the same fingerprint on one kernel make the same programs.
fn fingerprint(object: &libbpf_rs::OpenObject) -> u64 {
    use libbpf_rs::AsRawLibbpf;
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for prog in object.progs() {
        prog.name().hash(&mut hasher);
        prog.autoload().hash(&mut hasher);
        (prog.prog_type() as u32).hash(&mut hasher);
        // SAFETY: a program of the open object.
        let attach =
            unsafe { libbpf_sys::bpf_program__expected_attach_type(prog.as_libbpf_object().as_ptr()) };
        attach.hash(&mut hasher);
        let insns = prog.insns();
        // SAFETY: bpf_insn is 8 bytes of plain integers, every byte initialised.
        let bytes = unsafe { std::slice::from_raw_parts(insns.as_ptr().cast::<u8>(), size_of_val(insns)) };
        bytes.hash(&mut hasher);
    }
    // SAFETY: the object outlives this function's borrow of it.
    let btf = libbpf_rs::btf::Btf::from_bpf_object(unsafe { object.as_libbpf_object().as_ref() })
        .ok()
        .flatten();
    for map in object.maps() {
        map.name().hash(&mut hasher);
        (map.map_type() as u32, map.key_size(), map.value_size()).hash(&mut hasher);
        (map.max_entries(), map.map_flags()).hash(&mut hasher);
        let Some(initial) = map.initial_value() else {
            continue;
        };
        let mut initial = initial.to_vec();
        if map.name().to_string_lossy().ends_with(".rodata") {
            let section = btf.as_ref().and_then(|btf| {
                Some((
                    btf,
                    btf.type_by_name::<libbpf_rs::btf::types::DataSec<'_>>(".rodata")?,
                ))
            });
            for (btf, var) in section
                .iter()
                .flat_map(|(btf, section)| section.iter().map(move |var| (btf, var)))
            {
                let name = btf
                    .type_by_id::<libbpf_rs::btf::BtfType<'_>>(var.ty)
                    .and_then(|ty| ty.name().map(|name| name.to_string_lossy().into_owned()));
                if name.is_some_and(|name| RANDOM_PER_LOAD.contains(&name.as_str())) {
                    let (start, end) = (var.offset as usize, (var.offset + var.size as u32) as usize);
                    if let Some(bytes) = initial.get_mut(start..end) {
                        bytes.fill(0);
                    }
                }
            }
        }
        initial.hash(&mut hasher);
    }
    hasher.finish()
}

/// Reusing, migrating or creating the pinned maps of one load. `prepare` runs on the opened
/// object, `after_load` once loaded (copies, first pins), `after_swap` once the new
/// program is attached (the last copies, the replaced pins).
pub struct PinSet {
    dir: PinDir,
    replaced: Vec<Replaced>,
    /// the specs whose pinned map the load took over as it was
    reused: Vec<&'static str>,
    /// the fingerprint of the programs running from these pins, when a re-run may keep them
    keep: Option<u64>,
    /// the fingerprints of the objects prepared
    pub fingerprints: Vec<u64>,
    /// whether the load kept the running programs (loaded none, attaches nothing)
    pub kept: bool,
    pub log: Vec<String>,
}

impl PinSet {
    pub fn new(dir: &PinDir) -> Self {
        Self {
            dir: dir.clone(),
            replaced: Vec::new(),
            reused: Vec::new(),
            keep: None,
            fingerprints: Vec::new(),
            kept: false,
            log: Vec::new(),
        }
    }

    /// The path of a spec's pin.
    pub fn path(&self, spec: &MapPin) -> PathBuf {
        self.dir.file(&spec.file_name())
    }

    /// Older versions of a spec's pin in the directory.
    fn stale_versions(&self, spec: &MapPin) -> Vec<PathBuf> {
        entries(&self.dir.path)
            .into_iter()
            .filter(|path| {
                let name = file_name(path);
                name.strip_prefix(spec.name)
                    .and_then(|rest| rest.strip_prefix("_v"))
                    .is_some_and(|version| {
                        version.parse::<u32>().is_ok() && version != spec.version.to_string()
                    })
            })
            .collect()
    }

    /// Decides for every pinned map of the opened object: reuse the pin (same shape), or
    /// load a fresh map and migrate (another shape, where the spec allows it), or refuse in
    /// one line with nothing changed.
    pub fn prepare(
        &mut self,
        object: &mut libbpf_rs::OpenObject,
        subcommand: &str,
        specs: &[MapPin],
    ) -> Result<()> {
        let fingerprint = fingerprint(object);
        self.fingerprints.push(fingerprint);
        for spec in specs {
            let mut map = object
                .maps_mut()
                .find(|map| map.name() == spec.map)
                .with_context(|| format!("the {subcommand} program has no map {}", spec.map))?;
            let wanted = Shape {
                map_type: map.map_type() as u32,
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: map.max_entries(),
                map_flags: map.map_flags(),
            };
            let path = self.path(spec);
            let earlier = match spec.on_change {
                OnChange::Split { earlier, .. } => Some(earlier),
                _ => None,
            };
            let (old, stale) = if path.exists() {
                (Some(path.clone()), None)
            } else {
                // an older version of this pin, else the table this one split off
                let older = self.stale_versions(spec).into_iter().next().or_else(|| {
                    earlier
                        .map(|earlier| self.dir.file(earlier.file))
                        .filter(|path| path.exists())
                });
                (older.clone(), older)
            };
            let Some(old_path) = old else { continue };
            let handle = libbpf_rs::MapHandle::from_pinned_path(&old_path)
                .with_context(|| format!("opening {}", old_path.display()))?;
            let taken_over = earlier.filter(|earlier| {
                stale
                    .as_deref()
                    .is_some_and(|stale| file_name(stale) == earlier.file)
            });
            if let Some(earlier) = taken_over {
                self.replaced.push(Replaced {
                    spec: *spec,
                    old: Some(handle),
                    stale,
                    convert: Some(earlier.convert),
                    why: format!(
                        "pinned {} on {} is an earlier version's table: its entries taken over by {}",
                        earlier.file,
                        self.dir.target_display(),
                        spec.file_name()
                    ),
                });
                continue;
            }
            let have = shape_of_handle(&handle)?;
            if have == wanted && stale.is_none() {
                map.reuse_fd(handle.as_fd())
                    .with_context(|| format!("reusing {}", old_path.display()))?;
                self.reused.push(spec.name);
                continue;
            }
            let layout_same = have.map_type == wanted.map_type
                && have.key_size == wanted.key_size
                && have.value_size == wanted.value_size
                && stale.is_none();
            let what = format!(
                "pinned {} on {} ({}) is {have}; this version's is {wanted}",
                file_name(&old_path),
                self.dir.target_display(),
                spec.name
            );
            let why = match spec.on_change {
                OnChange::Rebuild => format!("{what}: rebuilt from the desired state"),
                OnChange::Copy { .. } | OnChange::Split { .. } if layout_same => {
                    format!("{what}: entries copied over")
                }
                // an upgrade's new layout: no setting brings the old one back
                OnChange::Copy { .. } | OnChange::Split { .. } if stale.is_some() => bail!(
                    "{subcommand}: the {what}, the layout of an earlier version; run `ebpf-net down {subcommand} {}` and start afresh (its entries are dropped)",
                    self.dir.down_args()
                ),
                OnChange::Copy { setting } | OnChange::Split { setting, .. } => bail!(
                    "{subcommand}: the {what}; keep {setting} as it was, or run `ebpf-net down {subcommand} {}` and start afresh (its entries are dropped)",
                    self.dir.down_args()
                ),
            };
            let copy = !matches!(spec.on_change, OnChange::Rebuild);
            self.replaced.push(Replaced {
                spec: *spec,
                old: copy.then_some(handle),
                stale,
                convert: None,
                why,
            });
        }
        // the same programs over the same maps: the running ones stay, none is loaded
        if self.keep == Some(fingerprint) && self.fingerprints.len() == 1 && self.replaced.is_empty() {
            for mut prog in object.progs_mut() {
                prog.set_autoload(false);
            }
            self.kept = true;
        }
        Ok(())
    }

    /// Lets the load keep the programs that run from these pins (fingerprint `running`)
    /// rather than load and verify them again, when it would make the same ones.
    pub fn keep_programs(&mut self, running: u64) {
        self.keep = Some(running);
    }

    /// Whether the load took over the pinned map of `spec` as it was.
    pub fn reused(&self, spec: &MapPin) -> bool {
        self.reused.contains(&spec.name)
    }

    /// Pins every map of a loaded object under its spec's name in `dir`: how a foreground run
    /// shows its maps to `status` (the links stay with the process).
    pub fn pin_all(dir: &PinDir, object: &libbpf_rs::Object, specs: &[MapPin]) -> Result<()> {
        for spec in specs {
            let path = dir.map_file(spec);
            handle_of(object, spec.map)?
                .pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
        Ok(())
    }

    /// Once loaded: copies what the replaced maps held and pins every map that had no pin.
    pub fn after_load(&mut self, object: &libbpf_rs::Object, specs: &[MapPin]) -> Result<()> {
        for spec in specs {
            let replaced = self.replaced.iter().find(|r| r.spec.name == spec.name);
            let path = self.path(spec);
            let mut map = handle_of(object, spec.map)?;
            match replaced {
                Some(replaced) => {
                    if let Some(old) = &replaced.old {
                        copy_entries(old, &map, replaced.convert)?;
                    }
                }
                None if !path.exists() => {
                    map.pin(&path)
                        .with_context(|| format!("pinning {}", path.display()))?;
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Once the new program runs: copies what the old maps gained meanwhile, then moves
    /// each replaced pin to its new map.
    pub fn after_swap(&mut self, object: &libbpf_rs::Object, specs: &[MapPin]) -> Result<()> {
        let (mine, others) = std::mem::take(&mut self.replaced)
            .into_iter()
            .partition(|r| specs.iter().any(|spec| spec.name == r.spec.name));
        self.replaced = others;
        for replaced in mine {
            let mut map = handle_of(object, replaced.spec.map)?;
            if let Some(old) = &replaced.old {
                copy_entries(old, &map, replaced.convert)?;
            }
            let path = self.path(&replaced.spec);
            for old_path in [Some(path.clone()), replaced.stale].into_iter().flatten() {
                if old_path.exists() {
                    fs::remove_file(&old_path).with_context(|| format!("removing {}", old_path.display()))?;
                }
            }
            map.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
            self.log.push(replaced.why);
        }
        Ok(())
    }
}

/// A loaded object's map by its name in the C source.
fn handle_of(object: &libbpf_rs::Object, name: &str) -> Result<libbpf_rs::MapHandle> {
    let map = object
        .maps()
        .find(|map| map.name() == name)
        .with_context(|| format!("no map {name} in the loaded object"))?;
    libbpf_rs::MapHandle::try_from(&map).with_context(|| format!("opening map {name}"))
}

/// Copies every entry of `from` that `to` lacks (hash tables) or every slot (arrays), as far
/// as `to` has room; through `convert` when `from` is an earlier version's table.
fn copy_entries(from: &libbpf_rs::MapHandle, to: &impl MapCore, convert: Option<Convert>) -> Result<()> {
    use libbpf_rs::MapFlags;
    let percpu = from.map_type().is_percpu();
    let room = to.max_entries() as usize;
    for (count, key) in from.keys().enumerate() {
        if count >= room {
            break;
        }
        let done = if percpu {
            match from.lookup_percpu(&key, MapFlags::ANY)? {
                Some(values) => to.update_percpu(&key, &values, MapFlags::ANY),
                None => continue,
            }
        } else {
            let Some(value) = from.lookup(&key, MapFlags::ANY)? else {
                continue;
            };
            match convert {
                None => to.update(&key, &value, MapFlags::ANY),
                Some(convert) => match convert(&key, &value) {
                    Some((key, value)) => to.update(&key, &value, MapFlags::ANY),
                    None => continue,
                },
            }
        };
        // a full hash table or a key beyond a smaller array ends the copy
        if done.is_err() {
            break;
        }
    }
    Ok(())
}
