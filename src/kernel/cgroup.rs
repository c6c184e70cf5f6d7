//! cgroup v2 directories: finding the mount, resolving `--cgroup`, and naming a cgroup in
//! pinned state paths.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use nix::sys::statfs::{statfs, FsType, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};

/// A cgroup v2 directory: where it is and its path inside the hierarchy ("/" for the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub path: PathBuf,
    pub relative: String,
}

/// Undoes the octal escapes (`\040` for a space) of /proc/mounts fields.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let text = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("0");
            out.push(u8::from_str_radix(text, 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where cgroup v2 is mounted, from /proc/mounts (`/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() > 2 && fields[2] == "cgroup2")
                .then(|| PathBuf::from(unescape_mount_field(fields[1])))
        })
        .context("cgroup v2 is not mounted (no cgroup2 line in /proc/mounts)")
}

fn fs_type(path: &Path) -> Result<FsType> {
    let stat = statfs(path)
        .map_err(std::io::Error::from)
        .with_context(|| format!("--cgroup {}", path.display()))?;
    Ok(stat.filesystem_type())
}

impl Cgroup {
    /// The id the kernel gives the cgroup (its directory's inode), as cgroup links report it.
    pub fn id(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&self.path).ok().map(|meta| meta.ino())
    }

    /// The cgroup v2 root, found from /proc/mounts.
    pub fn root() -> Result<Self> {
        Self::resolve(None)
    }

    /// `--cgroup PATH`: absolute, or relative to the cgroup v2 mount; default the root. It
    /// must be an existing directory of the cgroup v2 hierarchy.
    pub fn resolve(path: Option<&str>) -> Result<Self> {
        let mount = cgroup2_mount()?;
        let path = Self::full_path(&mount, path);
        let meta = fs::metadata(&path).with_context(|| format!("--cgroup {}", path.display()))?;
        if !meta.is_dir() {
            bail!("--cgroup {}: not a directory", path.display());
        }
        match fs_type(&path)? {
            CGROUP2_SUPER_MAGIC => {}
            CGROUP_SUPER_MAGIC => bail!(
                "--cgroup {}: a cgroup v1 directory; socket hooks need cgroup v2 (mounted at {})",
                path.display(),
                mount.display()
            ),
            _ => bail!(
                "--cgroup {}: not a cgroup v2 directory (cgroup v2 is mounted at {})",
                path.display(),
                mount.display()
            ),
        }
        let canonical = path
            .canonicalize()
            .with_context(|| format!("--cgroup {}", path.display()))?;
        let relative = match canonical.strip_prefix(&mount) {
            Ok(inside) => format!("/{}", inside.display()),
            Err(_) => bail!(
                "--cgroup {}: outside the cgroup v2 mount at {}",
                path.display(),
                mount.display()
            ),
        };
        Ok(Self {
            path: canonical,
            relative,
        })
    }

    /// The path a `--cgroup` names, existing or not.
    fn full_path(mount: &Path, path: Option<&str>) -> PathBuf {
        match path {
            None => mount.to_path_buf(),
            Some(path) if Path::new(path).is_absolute() => PathBuf::from(path),
            Some(path) => mount.join(path),
        }
    }

    /// The pin directory name of the cgroup a `--cgroup` names, also when it no longer
    /// exists (for `down`).
    pub fn target_of(path: Option<&str>) -> Result<String> {
        if let Ok(cgroup) = Self::resolve(path) {
            return Ok(cgroup.target());
        }
        let mount = cgroup2_mount()?;
        let full = Self::full_path(&mount, path);
        let inside = full.strip_prefix(&mount).map_err(|_| {
            anyhow::anyhow!(
                "--cgroup {}: outside the cgroup v2 mount at {}",
                full.display(),
                mount.display()
            )
        })?;
        Ok(encode_target(&format!("/{}", inside.display())))
    }

    /// The name of this cgroup in pinned state paths: its path in the hierarchy with `/`
    /// (and `%`) escaped, so it is one directory name.
    pub fn target(&self) -> String {
        encode_target(&self.relative)
    }

    /// Opens the directory for attaching and querying.
    pub fn open(&self) -> Result<fs::File> {
        fs::File::open(&self.path).with_context(|| format!("opening cgroup {}", self.path.display()))
    }

    /// Every cgroup of the hierarchy under (and including) this one.
    pub fn walk(&self) -> Vec<Cgroup> {
        let mut found = vec![self.clone()];
        let mut next = 0;
        while next < found.len() {
            let dir = found[next].clone();
            next += 1;
            let Ok(entries) = fs::read_dir(&dir.path) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let relative = if dir.relative == "/" {
                        format!("/{name}")
                    } else {
                        format!("{}/{name}", dir.relative)
                    };
                    found.push(Cgroup {
                        path: entry.path(),
                        relative,
                    });
                }
            }
        }
        found
    }
}

fn encode_target(relative: &str) -> String {
    relative.replace('%', "%25").replace('/', "%2F")
}

/// The cgroup path a pin directory name stands for.
pub fn decode_target(target: &str) -> String {
    target.replace("%2F", "/").replace("%25", "%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_fields_unescape() {
        assert_eq!(
            unescape_mount_field("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
        assert_eq!(unescape_mount_field("/mnt/my\\040cgroups"), "/mnt/my cgroups");
        assert_eq!(unescape_mount_field("/odd\\04"), "/odd\\04");
    }

    #[test]
    fn targets_round_trip() {
        for relative in ["/", "/kubepods.slice/pod%1", "/a/b"] {
            let target = encode_target(relative);
            assert!(!target.contains('/'), "{target}");
            assert_eq!(decode_target(&target), relative);
        }
    }
}
