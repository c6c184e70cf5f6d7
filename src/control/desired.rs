//! The desired state a `--persist` run applied, as the service maps held it when the run
//! ended: /run/ebpf-net/.desired/<subcommand>/<netns>/<target>.json, outside the bpffs (a
//! holder of the pins alone cannot rewrite both). `status` compares the pinned maps with it
//! and reports every entry someone else rewrote, added or removed.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde::{Deserialize, Serialize};

use crate::control::instance::RUN_ROOT;
use crate::kernel::pin::{MapPin, PinDir};

/// Entries of each map by its pin's file name: key → value, in hex.
#[derive(Serialize, Deserialize, Default)]
struct Snapshot {
    maps: BTreeMap<String, BTreeMap<String, String>>,
}

fn path(pins: &PinDir) -> PathBuf {
    Path::new(RUN_ROOT)
        .join(".desired")
        .join(&pins.subcommand)
        .join(&pins.netns)
        .join(format!("{}.json", pins.target))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every entry of a map; an array's all-zero slots (unused) are left out.
fn dump(map: &MapHandle) -> Result<BTreeMap<String, String>> {
    let array = matches!(map.map_type(), libbpf_rs::MapType::Array);
    let mut entries = BTreeMap::new();
    // by batches: a table of 131,072 backend slots is a few system calls, not 262,144
    for (key, value) in map.lookup_batch(4096, MapFlags::ANY, MapFlags::ANY)? {
        if array && value.iter().all(|b| *b == 0) {
            continue;
        }
        entries.insert(hex(&key), hex(&value));
    }
    Ok(entries)
}

/// Forgets the recorded state before an update changes the maps: a run killed midway
/// leaves no record to compare a half-applied table with.
pub fn forget(pins: &PinDir) {
    let path = path(pins);
    let _ = fs::remove_file(&path);
    for dir in path.ancestors().skip(1).take(3) {
        if fs::remove_dir(dir).is_err() {
            break;
        }
    }
}

/// Records what the maps of `specs` hold now, right after an apply.
pub fn record(pins: &PinDir, specs: &[MapPin]) -> Result<()> {
    if specs.is_empty() {
        return Ok(());
    }
    let mut snapshot = Snapshot::default();
    for spec in specs {
        snapshot
            .maps
            .insert(spec.file_name(), dump(&pins.open_map(spec)?)?);
    }
    let path = path(pins);
    let dir = path.parent().expect("the desired state's path has a parent");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let temp = path.with_extension("json.new");
    fs::write(&temp, serde_json::to_vec(&snapshot)?)
        .with_context(|| format!("writing {}", temp.display()))?;
    fs::rename(&temp, &path).with_context(|| format!("writing {}", path.display()))
}

/// How the pinned maps differ from the state recorded at the last apply, one line per map
/// that differs (empty: the same, or nothing recorded).
pub fn compare(pins: &PinDir) -> Vec<String> {
    let Ok(text) = fs::read(path(pins)) else {
        return Vec::new();
    };
    let Ok(snapshot) = serde_json::from_slice::<Snapshot>(&text) else {
        return vec![format!(
            "the desired state recorded at {} is unreadable",
            path(pins).display()
        )];
    };
    let mut found = Vec::new();
    for (name, applied) in &snapshot.maps {
        let now = match MapHandle::from_pinned_path(pins.file(name))
            .map_err(anyhow::Error::from)
            .and_then(|map| dump(&map))
        {
            Ok(now) => now,
            Err(err) => {
                found.push(format!("{name}: unreadable ({err:#})"));
                continue;
            }
        };
        let mut changes = Vec::new();
        for (key, value) in applied {
            match now.get(key) {
                Some(current) if current == value => {}
                Some(current) => {
                    changes.push(format!("key {key} rewritten ({value} applied, {current} now)"))
                }
                None => changes.push(format!("key {key} removed")),
            }
        }
        for (key, current) in &now {
            if !applied.contains_key(key) {
                changes.push(format!("key {key} added ({current})"));
            }
        }
        if changes.is_empty() {
            continue;
        }
        let count = changes.len();
        let shown: Vec<String> = changes.into_iter().take(3).collect();
        let more = if count > 3 {
            format!(", and {} more", count - 3)
        } else {
            String::new()
        };
        found.push(format!(
            "{} differs from the last apply in {count} entr{}: {}{more}",
            pins.file(name).display(),
            if count == 1 { "y" } else { "ies" },
            shown.join(", ")
        ));
    }
    found
}
