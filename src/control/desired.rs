//! The desired state a `--persist` run applied, as the service maps held it when the run
//! ended: /run/ebpf-net/.desired/<subcommand>/<netns>/<target>.bin, outside the bpffs (a
//! holder of the pins alone cannot rewrite both). `status` compares the pinned maps with it
//! and reports every entry someone else rewrote, added or removed.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::control::instance::RUN_ROOT;
use crate::kernel::pin::{MapPin, PinDir};

/// A map's entries: key bytes → value bytes.
type Entries = HashMap<Vec<u8>, Vec<u8>>;
/// A map's entries as read, in the map's order.
type Dumped = Vec<(Vec<u8>, Vec<u8>)>;

/// Entries of each map by its pin's file name, as raw bytes: 100,000 backends are written
/// and read back in milliseconds (length-prefixed: name, count, then key and value each).
fn encode(maps: &[(String, Dumped)]) -> Vec<u8> {
    let mut out = Vec::new();
    let put = |bytes: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(&(bytes.len() as u32).to_ne_bytes());
        out.extend_from_slice(bytes);
    };
    for (name, entries) in maps {
        put(name.as_bytes(), &mut out);
        out.extend_from_slice(&(entries.len() as u32).to_ne_bytes());
        for (key, value) in entries {
            put(key, &mut out);
            put(value, &mut out);
        }
    }
    out
}

fn decode(bytes: &[u8]) -> Option<Vec<(String, Entries)>> {
    let mut at: usize = 0;
    let mut take = |len: usize| -> Option<&[u8]> {
        let part = bytes.get(at..at.checked_add(len)?)?;
        at += len;
        Some(part)
    };
    let mut maps = Vec::new();
    while let Some(len) = take(4) {
        let len = u32::from_ne_bytes(len.try_into().ok()?) as usize;
        let name = String::from_utf8(take(len)?.to_vec()).ok()?;
        let count = u32::from_ne_bytes(take(4)?.try_into().ok()?) as usize;
        let mut entries = Entries::with_capacity(count);
        for _ in 0..count {
            let klen = u32::from_ne_bytes(take(4)?.try_into().ok()?) as usize;
            let key = take(klen)?.to_vec();
            let vlen = u32::from_ne_bytes(take(4)?.try_into().ok()?) as usize;
            entries.insert(key, take(vlen)?.to_vec());
        }
        maps.push((name, entries));
    }
    Some(maps)
}

fn path(pins: &PinDir) -> PathBuf {
    Path::new(RUN_ROOT)
        .join(".desired")
        .join(&pins.subcommand)
        .join(&pins.netns)
        .join(format!("{}.bin", pins.target))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(DIGITS[usize::from(byte >> 4)] as char);
        text.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
    text
}

/// Every entry of a map; an array's all-zero slots (unused) are left out.
fn dump(map: &MapHandle) -> Result<Dumped> {
    let array = matches!(map.map_type(), libbpf_rs::MapType::Array);
    let mut entries = Dumped::new();
    if !array {
        // key by key: a batch over a hash table can end early (ENOSPC on a full bucket)
        for key in map.keys() {
            if let Some(value) = map.lookup(&key, MapFlags::ANY)? {
                entries.push((key, value));
            }
        }
        return Ok(entries);
    }
    // an array by batches: 131,072 backend slots are a few system calls, not 262,144
    for (key, value) in map.lookup_batch(4096, MapFlags::ANY, MapFlags::ANY)? {
        if value.iter().all(|b| *b == 0) {
            continue;
        }
        entries.push((key, value));
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
    let mut snapshot = Vec::new();
    for spec in specs {
        snapshot.push((spec.file_name(), dump(&pins.open_map(spec)?)?));
    }
    let path = path(pins);
    let dir = path.parent().expect("the desired state's path has a parent");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let temp = path.with_extension("bin.new");
    fs::write(&temp, encode(&snapshot)).with_context(|| format!("writing {}", temp.display()))?;
    fs::rename(&temp, &path).with_context(|| format!("writing {}", path.display()))
}

/// How the pinned maps differ from the state recorded at the last apply, one line per map
/// that differs (empty: the same, or nothing recorded).
pub fn compare(pins: &PinDir) -> Vec<String> {
    let Ok(text) = fs::read(path(pins)) else {
        return Vec::new();
    };
    let Some(snapshot) = decode(&text) else {
        return vec![format!(
            "the desired state recorded at {} is unreadable",
            path(pins).display()
        )];
    };
    let mut found = Vec::new();
    for (name, applied) in &snapshot {
        let now = match MapHandle::from_pinned_path(pins.file(name))
            .map_err(anyhow::Error::from)
            .and_then(|map| dump(&map))
            .map(|now| now.into_iter().collect::<Entries>())
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
                Some(current) => changes.push(format!(
                    "key {} rewritten ({} applied, {} now)",
                    hex(key),
                    hex(value),
                    hex(current)
                )),
                None => changes.push(format!("key {} removed", hex(key))),
            }
        }
        for (key, current) in &now {
            if !applied.contains_key(key) {
                changes.push(format!("key {} added ({})", hex(key), hex(current)));
            }
        }
        changes.sort();
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
