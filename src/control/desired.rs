//! The desired state a `--persist` run applied, as the service maps held it when the run
//! ended: /run/ebpf-net/.desired/<subcommand>/<netns>/<target>.bin, outside the bpffs (a
//! holder of the pins alone cannot rewrite both). `status` compares the pinned maps with it
//! and reports every entry someone else rewrote, added or removed.
//!
//! A re-run whose maps were reused brings the record up to date from what its diff wrote
//! ([`Written`], appended to `<target>.log`) instead of reading 100,000 entries back; the
//! log is folded into a fresh `.bin` once it outgrows it. While a run updates, the `.bin` is
//! renamed away, so a run killed midway leaves no record to compare a half-applied table
//! with, and the next run reads the maps whole.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapHandle};

use crate::control::instance::RUN_ROOT;
use crate::kernel::maps;
use crate::kernel::pin::{MapPin, PinDir};

/// A map's entries: key bytes → value bytes.
type Entries = HashMap<Vec<u8>, Vec<u8>>;
/// A value length that marks a removed key (written by a later run over an earlier one).
const REMOVED: u32 = u32::MAX;

fn put(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as u32).to_ne_bytes());
    out.extend_from_slice(bytes);
}

/// One map's section: name, count, then key and value each length-prefixed (a value of
/// length [`REMOVED`] removes the key). Entries of 100,000 backends are written and read
/// back in milliseconds.
fn section(name: &str, count: u32, entries: &[u8], out: &mut Vec<u8>) {
    put(name.as_bytes(), out);
    out.extend_from_slice(&count.to_ne_bytes());
    out.extend_from_slice(entries);
}

/// The sections of a record and of its log, folded in order into each map's entries.
fn decode(bytes: &[u8]) -> Option<Vec<(String, Entries)>> {
    let mut at: usize = 0;
    let mut take = |len: usize| -> Option<&[u8]> {
        let part = bytes.get(at..at.checked_add(len)?)?;
        at += len;
        Some(part)
    };
    let mut maps: Vec<(String, Entries)> = Vec::new();
    while let Some(len) = take(4) {
        let len = u32::from_ne_bytes(len.try_into().ok()?) as usize;
        let name = String::from_utf8(take(len)?.to_vec()).ok()?;
        let count = u32::from_ne_bytes(take(4)?.try_into().ok()?) as usize;
        let index = match maps.iter().position(|(known, _)| *known == name) {
            Some(index) => index,
            None => {
                maps.push((name, Entries::with_capacity(count)));
                maps.len() - 1
            }
        };
        let entries = &mut maps[index].1;
        for _ in 0..count {
            let klen = u32::from_ne_bytes(take(4)?.try_into().ok()?) as usize;
            let key = take(klen)?.to_vec();
            let vlen = u32::from_ne_bytes(take(4)?.try_into().ok()?);
            if vlen == REMOVED {
                entries.remove(&key);
            } else {
                entries.insert(key, take(vlen as usize)?.to_vec());
            }
        }
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

/// Where the record waits while a run updates the maps.
fn updating_path(pins: &PinDir) -> PathBuf {
    path(pins).with_extension("bin.updating")
}

/// What later runs wrote since the record was made whole.
fn log_path(pins: &PinDir) -> PathBuf {
    path(pins).with_extension("log")
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

fn is_array(map: &MapHandle) -> bool {
    matches!(map.map_type(), libbpf_rs::MapType::Array)
}

/// Every entry of a map, encoded as a section's entries, with their count; an array's
/// all-zero slots (unused) are left out.
fn dump(map: &MapHandle) -> Result<(u32, Vec<u8>)> {
    let array = is_array(map);
    let mut out = Vec::new();
    let mut count = 0;
    for (key, value) in maps::read_all(map)?.iter() {
        if array && value.iter().all(|b| *b == 0) {
            continue;
        }
        put(key, &mut out);
        put(value, &mut out);
        count += 1;
    }
    Ok((count, out))
}

/// A map's entries read back from the kernel, for comparing.
fn read(map: &MapHandle) -> Result<Entries> {
    let array = is_array(map);
    Ok(maps::read_all(map)?
        .iter()
        .filter(|(_, value)| !array || value.iter().any(|b| *b != 0))
        .map(|(key, value)| (key.to_vec(), value.to_vec()))
        .collect())
}

/// What an apply wrote to the maps a record covers, in order, by map id.
#[derive(Default)]
pub struct Written {
    /// (map id, entry count, entries encoded as in a section)
    maps: Vec<(u32, u32, Vec<u8>)>,
    /// the ids of the handles written through, by descriptor (asked once each)
    ids: Vec<(RawFd, u32)>,
}

impl Written {
    fn entries_of(&mut self, map: &MapHandle) -> Result<(&mut u32, &mut Vec<u8>)> {
        let fd = map.as_fd().as_raw_fd();
        let id = match self.ids.iter().find(|(known, _)| *known == fd) {
            Some((_, id)) => *id,
            None => {
                let id = libbpf_rs::MapInfo::new(map.as_fd())
                    .context("reading a map's id")?
                    .info
                    .id;
                self.ids.push((fd, id));
                id
            }
        };
        let index = match self.maps.iter().position(|(known, _, _)| *known == id) {
            Some(index) => index,
            None => {
                self.maps.push((id, 0, Vec::new()));
                self.maps.len() - 1
            }
        };
        let (_, count, entries) = &mut self.maps[index];
        Ok((count, entries))
    }

    /// Notes a batch write: `keys` and `values` back to back, as `update_batch` takes them.
    pub fn update(&mut self, map: &MapHandle, keys: &[u8], values: &[u8]) -> Result<()> {
        let array = is_array(map);
        let (key_size, value_size) = (map.key_size() as usize, map.value_size() as usize);
        let (count, out) = self.entries_of(map)?;
        for (key, value) in keys.chunks_exact(key_size).zip(values.chunks_exact(value_size)) {
            put(key, out);
            if array && value.iter().all(|b| *b == 0) {
                // an unused slot, as a read of the map leaves it out
                out.extend_from_slice(&REMOVED.to_ne_bytes());
            } else {
                put(value, out);
            }
            *count += 1;
        }
        Ok(())
    }

    /// Notes a removed key.
    pub fn delete(&mut self, map: &MapHandle, key: &[u8]) -> Result<()> {
        let (count, out) = self.entries_of(map)?;
        put(key, out);
        out.extend_from_slice(&REMOVED.to_ne_bytes());
        *count += 1;
        Ok(())
    }

    /// The sections of the maps of `specs` in `pins`; `every`: an empty one for a map not
    /// written to (a whole record names every map it covers).
    fn sections(&self, pins: &PinDir, specs: &[MapPin], every: bool) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for spec in specs {
            let map = pins.open_map(spec)?;
            let id = libbpf_rs::MapInfo::new(map.as_fd())
                .context("reading a map's id")?
                .info
                .id;
            match self.maps.iter().find(|(known, _, _)| *known == id) {
                Some((_, count, entries)) => section(&spec.file_name(), *count, entries, &mut out),
                None if every => section(&spec.file_name(), 0, &[], &mut out),
                None => {}
            }
        }
        Ok(out)
    }
}

/// Where an update starts from, for [`record`].
pub enum Before {
    /// the maps were made by this run: empty until it wrote them
    Fresh,
    /// the record of the last apply, set aside until this run records
    Recorded,
    /// nothing to build on (no record, a killed run's, or a map replaced): read the maps
    Unknown,
}

/// Sets the record aside before an update changes the maps: `status` compares nothing
/// until [`record`] puts it back, and a run killed midway leaves none.
pub fn set_aside(pins: &PinDir) -> bool {
    let (path, updating) = (path(pins), updating_path(pins));
    if fs::rename(&path, &updating).is_ok() {
        return true;
    }
    // a killed run's leftovers: the maps may hold part of its update
    let _ = fs::remove_file(&updating);
    let _ = fs::remove_file(log_path(pins));
    false
}

/// Which programs a `--persist` run left running and what loaded them.
fn programs_path(pins: &PinDir) -> PathBuf {
    path(pins).with_extension("programs")
}

/// Records the programs now running from `pins`: the fingerprint of each object that made
/// them, and their ids, for a re-run deciding whether it may keep them.
pub fn record_programs(pins: &PinDir, fingerprints: &[u64], prog_ids: &[u32]) -> Result<()> {
    let mut ids = prog_ids.to_vec();
    ids.sort_unstable();
    let words = |items: Vec<String>| items.join(" ");
    let text = format!(
        "{}\n{}\n",
        words(fingerprints.iter().map(|f| format!("{f:016x}")).collect()),
        words(ids.iter().map(u32::to_string).collect())
    );
    let path = programs_path(pins);
    if let Some(dir) = path.parent() {
        // a datapath without service tables (ipv6-hp) has no record of them to share it with
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let temp = path.with_extension("programs.new");
    fs::write(&temp, text).with_context(|| format!("writing {}", temp.display()))?;
    fs::rename(&temp, &path).with_context(|| format!("writing {}", path.display()))
}

/// What [`record_programs`] recorded: the fingerprints, and the program ids (sorted).
pub fn recorded_programs(pins: &PinDir) -> Option<(Vec<u64>, Vec<u32>)> {
    let text = fs::read_to_string(programs_path(pins)).ok()?;
    let mut lines = text.lines();
    let fingerprints = lines
        .next()?
        .split_whitespace()
        .map(|word| u64::from_str_radix(word, 16).ok())
        .collect::<Option<Vec<_>>>()?;
    let ids = lines
        .next()?
        .split_whitespace()
        .map(|word| word.parse().ok())
        .collect::<Option<Vec<_>>>()?;
    Some((fingerprints, ids))
}

/// Forgets the recorded state (`down`).
pub fn forget(pins: &PinDir) {
    let path = path(pins);
    for file in [
        path.clone(),
        updating_path(pins),
        log_path(pins),
        programs_path(pins),
    ] {
        let _ = fs::remove_file(file);
    }
    for dir in path.ancestors().skip(1).take(3) {
        if fs::remove_dir(dir).is_err() {
            break;
        }
    }
}

fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = path.with_extension("bin.new");
    fs::write(&temp, bytes).with_context(|| format!("writing {}", temp.display()))?;
    fs::rename(&temp, path).with_context(|| format!("writing {}", path.display()))
}

/// Records what the maps of `specs` hold now, right after an apply: from `written` on top
/// of what was there `before` where both are known, else by reading the maps.
pub fn record(pins: &PinDir, specs: &[MapPin], before: Before, written: Option<&Written>) -> Result<()> {
    if specs.is_empty() {
        return Ok(());
    }
    let (path, updating, log) = (path(pins), updating_path(pins), log_path(pins));
    let dir = path.parent().expect("the desired state's path has a parent");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    match (before, written) {
        (Before::Fresh, Some(written)) => {
            let _ = fs::remove_file(&log);
            write_whole(&path, &written.sections(pins, specs, true)?)?;
            let _ = fs::remove_file(&updating);
            return Ok(());
        }
        (Before::Recorded, Some(written)) => {
            let appended = written.sections(pins, specs, false)?;
            let mut file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .with_context(|| format!("opening {}", log.display()))?;
            file.write_all(&appended)
                .with_context(|| format!("writing {}", log.display()))?;
            let logged = file.metadata().map_or(u64::MAX, |meta| meta.len());
            let whole = fs::metadata(&updating).map_or(0, |meta| meta.len());
            // a log larger than the record it updates is folded in (read the maps once)
            if logged <= whole {
                return fs::rename(&updating, &path).with_context(|| format!("writing {}", path.display()));
            }
        }
        _ => {}
    }
    let mut snapshot = Vec::new();
    for spec in specs {
        let (count, entries) = dump(&pins.open_map(spec)?)?;
        section(&spec.file_name(), count, &entries, &mut snapshot);
    }
    // the log first: a kill between the two leaves no record rather than a wrong one
    let _ = fs::remove_file(&log);
    write_whole(&path, &snapshot)?;
    let _ = fs::remove_file(&updating);
    Ok(())
}

/// How the pinned maps differ from the state recorded at the last apply, one line per map
/// that differs (empty: the same, or nothing recorded).
pub fn compare(pins: &PinDir) -> Vec<String> {
    let Ok(mut text) = fs::read(path(pins)) else {
        return Vec::new();
    };
    if let Ok(logged) = fs::read(log_path(pins)) {
        text.extend_from_slice(&logged);
    }
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
            .and_then(|map| read(&map))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: u8, value: Option<u8>, out: &mut Vec<u8>) {
        put(&[key], out);
        match value {
            Some(value) => put(&[value], out),
            None => out.extend_from_slice(&REMOVED.to_ne_bytes()),
        }
    }

    #[test]
    fn a_log_appended_to_a_record_rewrites_and_removes_entries() {
        let mut whole = Vec::new();
        let mut entries = Vec::new();
        for key in 1..=3 {
            entry(key, Some(key * 10), &mut entries);
        }
        section("services_v1", 3, &entries, &mut whole);
        section("backends_v1", 0, &[], &mut whole);
        // a later run: key 2 rewritten, key 3 removed, key 4 added, a backend slot written
        let mut later = Vec::new();
        entry(2, Some(21), &mut later);
        entry(3, None, &mut later);
        entry(4, Some(40), &mut later);
        section("services_v1", 3, &later, &mut whole);
        let mut slot = Vec::new();
        entry(7, Some(70), &mut slot);
        section("backends_v1", 1, &slot, &mut whole);

        let maps = decode(&whole).expect("decodes");
        let names: Vec<&str> = maps.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["services_v1", "backends_v1"]);
        let services = &maps[0].1;
        assert_eq!(services.len(), 3);
        assert_eq!(services[&vec![1]], vec![10]);
        assert_eq!(services[&vec![2]], vec![21]);
        assert_eq!(services[&vec![4]], vec![40]);
        assert_eq!(maps[1].1[&vec![7]], vec![70]);
        // a cut file is unreadable, not half a record
        assert!(decode(&whole[..whole.len() - 1]).is_none());
    }
}
