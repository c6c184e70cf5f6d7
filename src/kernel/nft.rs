//! Running `nft` in the current network namespace.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

fn spawn_error(err: std::io::Error) -> anyhow::Error {
    if err.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!("nft is not installed (apt-get install nftables)")
    } else {
        anyhow::Error::new(err).context("running nft")
    }
}

/// `nft ARGS`; stdout, or its stderr as the error.
pub fn run(args: &[&str]) -> Result<String> {
    let output = Command::new("nft").args(args).output().map_err(spawn_error)?;
    if !output.status.success() {
        bail!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Loads a ruleset fragment with `nft -f -` (atomically: all of it or nothing).
pub fn apply(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())
        .context("writing to nft")?;
    let output = child.wait_with_output().context("running nft")?;
    if !output.status.success() {
        bail!("nft -f: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}
