//! One ebpf-net per datapath and target: a lock file under /run/ebpf-net, held (flock) while a
//! run lasts. It records what a foreground run changed outside its own links, so that after a
//! SIGKILL `status` can say what was left behind and `down` can remove it.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

pub const RUN_ROOT: &str = "/run/ebpf-net";

/// What one run wrote about itself.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Record {
    pub pid: u32,
    pub subcommand: String,
    pub netns: String,
    pub target: String,
    /// "foreground" or "persist"
    pub mode: String,
    pub command: String,
    /// things outside the run's links that a SIGKILL leaves behind
    #[serde(default)]
    pub left: Vec<String>,
    /// where a foreground run pins its maps for `status` (removed when it ends)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pins: Option<PathBuf>,
}

/// A held claim on (subcommand, namespace, target); released and removed on drop.
pub struct Instance {
    file: Flock<File>,
    path: PathBuf,
    record: Record,
}

fn lock_path(subcommand: &str, netns: &str, target: &str) -> PathBuf {
    Path::new(RUN_ROOT)
        .join(subcommand)
        .join(netns)
        .join(format!("{target}.lock"))
}

/// The file locked (released when the lock is dropped), or given back when another holds it.
fn try_lock(file: File) -> std::io::Result<Result<Flock<File>, File>> {
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => Ok(Ok(locked)),
        Err((file, Errno::EWOULDBLOCK)) => Ok(Err(file)),
        Err((_, errno)) => Err(errno.into()),
    }
}

fn read_record(file: &mut File) -> Option<Record> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// The command line as the record keeps it: 10,000 `--service` flags are 2 MB, written with
/// every change of the record; the start says which run it is.
fn shortened(args: impl Iterator<Item = std::ffi::OsString>) -> String {
    const KEPT: usize = 1024;
    let mut command = String::new();
    let mut rest = 0;
    // the words past the first KiB are only counted (as given, also when an argument is not
    // UTF-8: a file name, say), not copied: 20,000 --service flags are 2 MB
    let lossy_len =
        |arg: &std::ffi::OsString| arg.to_str().map_or_else(|| arg.to_string_lossy().len(), str::len);
    for arg in args {
        if command.len() > KEPT {
            rest += lossy_len(&arg) + 1;
            continue;
        }
        if !command.is_empty() {
            command.push(' ');
        }
        command.push_str(&arg.to_string_lossy());
    }
    if command.len() > KEPT {
        let mut cut = KEPT;
        while !command.is_char_boundary(cut) {
            cut -= 1;
        }
        rest += command.len() - cut;
        command.truncate(cut);
    }
    if rest > 0 {
        command.push_str(&format!(" ... ({rest} more bytes)"));
    }
    command
}

impl Instance {
    /// Claims the target or refuses, naming the run that holds it. A record left by a killed
    /// run is taken over (what it left is reused, and cleaned up when this run ends); the
    /// returned record says what it was.
    pub fn claim(
        subcommand: &str,
        netns: &str,
        target: &str,
        persist: bool,
    ) -> Result<(Self, Option<Record>)> {
        let path = lock_path(subcommand, netns, target);
        let dir = path.parent().expect("lock path has a parent");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let locked = try_lock(file).with_context(|| format!("locking {}", path.display()))?;
            let mut file = match locked {
                Ok(file) => file,
                Err(mut file) => {
                    let holder = read_record(&mut file)
                        .map(|r| format!(" (pid {}, {})", r.pid, r.mode))
                        .unwrap_or_default();
                    bail!(
                        "another ebpf-net {subcommand} already runs on {}{holder}; stop it first",
                        display_target(target)
                    );
                }
            };
            // the holder we raced with may have removed the file between our open and lock
            let same = fs::metadata(&path)
                .map(|meta| meta.ino() == file.metadata().map(|m| m.ino()).unwrap_or(0))
                .unwrap_or(false);
            if !same {
                continue;
            }
            let orphan = read_record(&mut file);
            let record = Record {
                pid: std::process::id(),
                subcommand: subcommand.into(),
                netns: netns.into(),
                target: target.into(),
                mode: if persist { "persist" } else { "foreground" }.into(),
                command: shortened(std::env::args_os()),
                left: orphan.as_ref().map(|o| o.left.clone()).unwrap_or_default(),
                pins: None,
            };
            let mut instance = Self { file, path, record };
            instance.write()?;
            return Ok((instance, orphan));
        }
    }

    fn write(&mut self) -> Result<()> {
        let text = serde_json::to_string(&self.record)?;
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Notes something outside the run's links that would stay if the process were killed.
    pub fn leaves(&mut self, what: &str) -> Result<()> {
        if !self.record.left.iter().any(|w| w == what) {
            self.record.left.push(what.to_string());
            self.write()?;
        }
        Ok(())
    }
}

/// What a killed foreground run leaves when its maps were pinned for `status`.
pub fn pinned_maps(path: &Path) -> String {
    format!("its maps pinned under {}", path.display())
}

impl Instance {
    /// Records where this run pins its maps, before it pins them.
    pub fn pins(&mut self, path: &Path) -> Result<()> {
        self.record.pins = Some(path.to_path_buf());
        self.leaves(&pinned_maps(path))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // removed while still locked: nobody can claim the file we are about to release
        let _ = fs::remove_file(&self.path);
        // and the directories it needed, once empty (another run's file keeps them)
        for dir in self.path.ancestors().skip(1).take(3) {
            if fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

fn display_target(target: &str) -> String {
    if target.starts_with("%2F") {
        format!("cgroup {}", crate::kernel::cgroup::decode_target(target))
    } else {
        target.to_string()
    }
}

/// A run's record as `status` sees it: alive (lock held) or orphaned (holder gone).
#[derive(Debug, Clone)]
pub struct Claim {
    pub record: Record,
    pub path: PathBuf,
    pub alive: bool,
}

impl Claim {
    pub fn target_display(&self) -> String {
        display_target(&self.record.target)
    }

    /// "orphaned: foreground lb (pid 12, killed) left nft table ..." or "running: pid 12".
    pub fn describe(&self) -> String {
        let r = &self.record;
        if self.alive {
            return format!("running: pid {} ({})", r.pid, r.mode);
        }
        let left = if r.left.is_empty() {
            "nothing else (its links went with it)".to_string()
        } else {
            r.left.join(", ")
        };
        format!("orphaned: {} run pid {} was killed; left {left}", r.mode, r.pid)
    }

    /// Removes the record of a dead run (no-op for a live one, whose lock we cannot take).
    pub fn remove(&self) -> Result<bool> {
        let Ok(file) = File::open(&self.path) else {
            return Ok(false);
        };
        // held until the file is gone, so no run can claim it in between
        let Ok(_locked) = try_lock(file)? else {
            return Ok(false);
        };
        fs::remove_file(&self.path).with_context(|| format!("removing {}", self.path.display()))?;
        for dir in self.path.ancestors().skip(1).take(3) {
            if fs::remove_dir(dir).is_err() {
                break;
            }
        }
        Ok(true)
    }
}

/// Every run record on this machine, of every namespace.
pub fn all() -> Vec<Claim> {
    let mut claims = Vec::new();
    let Ok(subcommands) = fs::read_dir(RUN_ROOT) else {
        return claims;
    };
    // names starting with a dot are ebpf-net's own (the desired states), not run records
    for subcommand in subcommands
        .flatten()
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
    {
        for netns in fs::read_dir(subcommand.path()).into_iter().flatten().flatten() {
            for entry in fs::read_dir(netns.path()).into_iter().flatten().flatten() {
                let path = entry.path();
                let Ok(file) = File::open(&path) else { continue };
                let (record, alive) = match try_lock(file) {
                    Ok(Ok(mut free)) => (read_record(&mut free), false),
                    Ok(Err(mut held)) => (read_record(&mut held), true),
                    Err(_) => continue,
                };
                // an empty or unreadable file is a claim being written right now
                let Some(record) = record else {
                    continue;
                };
                claims.push(Claim { record, path, alive });
            }
        }
    }
    claims.sort_by(|a, b| a.path.cmp(&b.path));
    claims
}
