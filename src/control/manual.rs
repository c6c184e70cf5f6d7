//! Man pages (clap_mangen) and shell completions (clap_complete) made from the clap definition
//! itself, so neither can drift from the flags: `ebpf-net completions SHELL` and the build's
//! `ebpf-net man-pages DIR` (the Makefile runs it; the package ships what it wrote).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap_complete::Shell;

/// ebpf-net is run by root for the node: section 8, system administration.
pub const SECTION: &str = "8";

/// Writes the completion script of `shell` for the whole command tree to `out`.
pub fn completions(command: clap::Command, shell: Shell, out: &mut dyn Write) {
    // clap_complete offers hidden subcommands too: leave out `man-pages`, the build's
    let name = command.get_name().to_string();
    let mut shown = clap::Command::new(name.clone())
        .version(command.get_version().unwrap_or_default().to_string())
        .args(command.get_arguments().cloned())
        .subcommands(subcommands(&command).cloned());
    clap_complete::generate(shell, &mut shown, name, out);
}

/// The subcommands a user types: every one but the hidden ones and clap's `help`.
pub fn subcommands(command: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    command
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
}

/// Writes `ebpf-net.8` and one `ebpf-net-SUBCOMMAND.8` per subcommand into `dir`; returns
/// the files written.
pub fn write_man_pages(mut command: clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // global flags (--netns) and "ebpf-net lb" usage lines reach the subcommands
    command.build();
    let name = command.get_name().to_string();
    let mut pages = vec![(name.clone(), command.clone())];
    for sub in subcommands(&command) {
        let page = format!("{name}-{}", sub.get_name());
        pages.push((page.clone(), sub.clone().name(page)));
    }
    let mut written = Vec::new();
    for (page, command) in pages {
        let path = dir.join(format!("{page}.{SECTION}"));
        let mut text = Vec::new();
        clap_mangen::Man::new(command)
            .section(SECTION)
            .render(&mut text)
            .with_context(|| format!("rendering {page}({SECTION})"))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
