//! What the suite writes: Markdown sections, the goals checked, charts, and the machine it
//! ran on.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// A goal from a datapath issue, checked against this run.
pub struct Goal {
    pub datapath: &'static str,
    pub goal: String,
    pub measured: String,
    /// None: no goal was set; the number is reported
    pub met: Option<bool>,
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "reported",
    }
}

#[derive(Default)]
pub struct Report {
    pub sections: Vec<String>,
    pub goals: Vec<Goal>,
    /// file name under docs/bench/, SVG text, alt text
    pub charts: Vec<(String, String, String)>,
}

impl Report {
    pub fn section(&mut self, text: String) {
        print!("{text}");
        self.sections.push(text);
    }

    pub fn goal(&mut self, datapath: &'static str, goal: &str, measured: String, met: Option<bool>) {
        println!("goal {datapath}: {goal}: {measured} ({})", verdict(met));
        self.goals.push(Goal {
            datapath,
            goal: goal.to_string(),
            measured,
            met,
        });
    }

    pub fn chart(&mut self, file: &str, alt: &str, svg: String) {
        self.charts.push((file.to_string(), svg, alt.to_string()));
    }

    /// Writes `dir/BENCHMARKS.md` and the charts under `dir/bench/`.
    pub fn write(&self, dir: &Path, elapsed_secs: f64) -> std::io::Result<()> {
        std::fs::create_dir_all(dir.join("bench"))?;
        let mut md = String::from("# ebpf-net benchmarks\n\n");
        md.push_str(
            "Written by `make bench` (`cargo bench --bench suite`); every number below comes from \
             one run on the machine described here. Paths that are compared take turns in rotated \
             rounds of the same run, and ratios are paired per round (each round's value over the \
             reference's value in the same round, then the median), so drift of a noisy VM between \
             rounds cancels. Do not compare numbers across runs or machines; compare the ratios.\n\n",
        );
        let _ = writeln!(md, "## Machine\n\n{}", machine());
        let _ = writeln!(md, "The whole suite took {:.0} s.\n", elapsed_secs);
        md.push_str("## Goals\n\n| datapath | goal | measured | verdict |\n|---|---|---|---|\n");
        for goal in &self.goals {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                goal.datapath,
                goal.goal,
                goal.measured,
                verdict(goal.met)
            );
        }
        md.push('\n');
        if !self.charts.is_empty() {
            md.push_str("## Charts\n\n");
            for (file, svg, alt) in &self.charts {
                std::fs::write(dir.join("bench").join(file), svg)?;
                let _ = writeln!(md, "![{alt}](bench/{file})\n");
            }
        }
        for section in &self.sections {
            md.push_str(section);
            md.push('\n');
        }
        std::fs::write(dir.join("BENCHMARKS.md"), md)
    }
}

fn command(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// CPU, memory, kernel, distribution, tool versions, the commit measured.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|name| name.trim_matches('"').to_string())
        .unwrap_or_else(|| "unknown".into());
    // `command` says "unknown" for empty output: a clean tree (or no git)
    let changes = command("git", &["status", "--porcelain", "--untracked-files=no"]);
    let dirty = if changes == "unknown" {
        ""
    } else {
        " (with uncommitted changes)"
    };
    format!(
        "| | |\n|---|---|\n| CPU | {cpu}, {cpus} CPUs |\n| memory | {mem_gib:.1} GiB |\n| kernel | {} |\n| system | {os} |\n| nftables | {} |\n| iptables | {} |\n| iperf3 | {} |\n| ebpf-net commit | {}{dirty} |\n| date | {} |\n",
        command("uname", &["-r"]),
        command("nft", &["--version"]),
        command("iptables", &["--version"]),
        command("iperf3", &["--version"]).lines().next().unwrap_or("unknown"),
        command("git", &["rev-parse", "--short", "HEAD"]),
        command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    )
}

/// A Markdown table: the first column left-aligned, the others right-aligned.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut md = format!("| {} |\n|", headers.join(" | "));
    for i in 0..headers.len() {
        md.push_str(if i == 0 { "---|" } else { "---:|" });
    }
    md.push('\n');
    for row in rows {
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
    md
}
