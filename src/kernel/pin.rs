//! Persisted state in the host's bpffs: /sys/fs/bpf/ebpf-net/<subcommand>/<netns>/<target>/.
//! Files named `link_*` are pinned links (the attachments), the rest pinned maps.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::kernel::attach::PinnedLink;
use crate::kernel::probe;

pub const BPFFS: &str = "/sys/fs/bpf";
pub const PIN_ROOT: &str = "/sys/fs/bpf/ebpf-net";

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

    /// The target as users name it: an interface, or `cgroup /path` for a cgroup.
    pub fn target_display(&self) -> String {
        if self.target.starts_with("%2F") {
            format!("cgroup {}", crate::kernel::cgroup::decode_target(&self.target))
        } else {
            self.target.clone()
        }
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
        fs::create_dir_all(&self.path).with_context(|| format!("creating {}", self.path.display()))
    }

    /// The program ids of every link pinned in this directory.
    pub fn prog_ids(&self) -> Vec<u32> {
        self.links()
            .iter()
            .filter_map(|(_, path)| PinnedLink::open(path).ok().map(|link| link.prog_id))
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

    /// Every persisted directory, of every subcommand and namespace.
    pub fn all() -> Vec<PinDir> {
        let mut found = Vec::new();
        for subcommand in entries(Path::new(PIN_ROOT)) {
            for netns in entries(&subcommand) {
                for target in entries(&netns) {
                    if target.is_dir() {
                        found.push(PinDir::new(
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
