//! The lab of scripts/lab for tests: up on creation (or not), `down` on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::topology::{output_within, sh, BIN};

pub const LAB_BIN: &str = env!("CARGO_BIN_EXE_ebpf-net-lab");

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin_dir() -> PathBuf {
    Path::new(BIN).parent().unwrap().to_path_buf()
}

/// A lab of this test's own name; `scripts/lab down` on drop, also when the test fails.
pub struct Lab {
    pub name: String,
}

impl Lab {
    pub fn new(tag: &str) -> Self {
        Self {
            name: format!("ebnt{tag}{}", std::process::id()),
        }
    }

    /// `scripts/lab ARGS` on this lab.
    pub fn lab(&self, args: &[&str]) -> Output {
        output_within(
            Command::new(root().join("scripts/lab"))
                .args(args)
                .env("EBPF_NET_LAB", &self.name)
                .env("EBPF_NET_BIN_DIR", bin_dir()),
        )
    }

    pub fn namespaces(&self) -> Vec<String> {
        sh("ip netns list")
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|ns| ns.starts_with(&format!("{}-", self.name)))
            .map(str::to_string)
            .collect()
    }

    /// `ebpf-net-lab ARGS` from a lab node through `scripts/lab exec`.
    pub fn request(&self, node: &str, args: &[&str]) -> Output {
        let mut full = vec!["exec", node, LAB_BIN];
        full.extend(args);
        self.lab(&full)
    }
}

impl Lab {
    /// `scripts/lab up`, or the test fails with what it printed.
    pub fn up(tag: &str) -> Self {
        let lab = Self::new(tag);
        let up = lab.lab(&["up"]);
        assert!(
            up.status.success(),
            "lab up: {}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        lab
    }

    /// The namespace of a node.
    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.name)
    }

    /// The lab's cgroup, which `exec client*` joins.
    pub fn cgroup(&self) -> String {
        format!("{}/{}", super::cgroup::cgroup2_root().display(), self.name)
    }

    /// `ebpf-net-lab ARGS` from a node, in the background: its stdout lines arrive on the
    /// receiver as printed; the child is killed on drop of the returned guard.
    pub fn spawn_request(&self, node: &str, args: &[&str]) -> Background {
        let mut child = Command::new(root().join("scripts/lab"))
            .args(["exec", node, LAB_BIN])
            .args(args)
            .env("EBPF_NET_LAB", &self.name)
            .env("EBPF_NET_BIN_DIR", bin_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ebpf-net-lab");
        let (tx, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Background { child, lines }
    }
}

/// A background request; killed on drop.
pub struct Background {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Background {
    /// Waits (bounded) for a line containing `needle`; everything read so far on failure.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        Err(seen)
    }

    /// Waits (bounded) for the exit; its status and every line it printed meanwhile.
    pub fn finish(mut self, timeout: Duration) -> (bool, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(50));
        let lines = self.lines.try_iter().collect();
        (status.is_some_and(|s| s.success()), lines)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.lab(&["down"]);
    }
}
