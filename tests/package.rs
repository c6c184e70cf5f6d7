//! Packaging: man pages and completions name every subcommand and flag; the systemd readiness
//! protocol (READY, RELOADING, STOPPING on $NOTIFY_SOCKET); `make install` with PREFIX and
//! DESTDIR; and the Debian package built, installed on this machine for real, a datapath run
//! from its example config through its unit's ExecStart line, then removed and purged with
//! nothing left.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cgroup::TestCgroup;
use common::kernel::scaled;
use common::topology::{output_within, veth, Netns, BIN};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The CLI contract's subcommands (DESIGN.md), plus `completions`: at least these are listed;
/// the checks cover every one `--help` lists.
const CONTRACT: [&str; 10] = [
    "ipv6-hp",
    "monitor",
    "proxy",
    "clusterip",
    "lb",
    "xdp-lb",
    "kube",
    "status",
    "down",
    "completions",
];
/// `make` in the source tree writes build/man and build/completions: one at a time.
static MAKE: Mutex<()> = Mutex::new(());

/// A directory of this test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ebn-pkg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    output_within(Command::new(program).args(args))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ok(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?}: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The subcommands `--help` lists (but `help`), read apart from the clap definition.
fn help_subcommands(bin: &str) -> Vec<String> {
    ok(bin, &["--help"])
        .lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Every `--long` flag `ebpf-net SUB --help` shows.
fn long_flags(bin: &str, sub: &str) -> BTreeSet<String> {
    ok(bin, &[sub, "--help"])
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("--") && word.len() > 2)
        .map(str::to_string)
        .collect()
}

/// Checks man pages in `dir` (`ebpf-net.8[.gz]`, `ebpf-net-SUB.8[.gz]`): one per subcommand,
/// each naming every flag of its `--help`.
fn check_man_pages(dir: &Path, gzipped: bool) {
    let suffix = if gzipped { ".8.gz" } else { ".8" };
    let read = |name: &str| -> String {
        let path = dir.join(format!("{name}{suffix}"));
        let raw = if gzipped {
            ok("gzip", &["-dc", path.to_str().unwrap()])
        } else {
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        // troff escapes the hyphens of flags
        raw.replace("\\-", "-")
    };
    let root = read("ebpf-net");
    let subcommands = help_subcommands(BIN);
    for sub in &subcommands {
        assert!(
            root.contains(&format!("ebpf-net-{sub}")),
            "ebpf-net(8) lists no {sub}"
        );
        let page = read(&format!("ebpf-net-{sub}"));
        assert!(
            page.contains(&format!(".TH ebpf-net-{sub} 8")),
            "ebpf-net-{sub}(8) title"
        );
        for flag in long_flags(BIN, sub) {
            assert!(page.contains(&flag), "ebpf-net-{sub}(8) does not mention {flag}");
        }
    }
    let mut pages: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ebpf-net"))
        .collect();
    pages.sort();
    let mut expected: Vec<String> = std::iter::once("ebpf-net".to_string())
        .chain(subcommands.iter().map(|sub| format!("ebpf-net-{sub}")))
        .map(|name| format!("{name}{suffix}"))
        .collect();
    expected.sort();
    assert_eq!(pages, expected, "man pages in {}", dir.display());
}

/// Checks a completion script: every subcommand, and (bash, fish: flags are listed per
/// subcommand) every flag; no hidden `man-pages`.
fn check_completions(shell: &str, script: &str) {
    for sub in &help_subcommands(BIN) {
        assert!(script.contains(sub.as_str()), "{shell} completion lacks {sub}");
        for flag in long_flags(BIN, sub) {
            let spelled = match shell {
                // fish: `-l interface`
                "fish" => format!("-l {}", &flag[2..]),
                _ => flag.clone(),
            };
            assert!(script.contains(&spelled), "{shell} completion lacks {sub} {flag}");
        }
    }
    assert!(
        !script.contains("man-pages"),
        "{shell} completion offers the hidden man-pages"
    );
}

#[test]
fn man_pages_and_completions_name_every_subcommand_and_flag() {
    // the contract's subcommands are among what --help lists (and so checked below)
    let listed = help_subcommands(BIN);
    for sub in CONTRACT {
        assert!(
            listed.iter().any(|name| name == sub),
            "--help lacks {sub}: {listed:?}"
        );
    }
    assert!(
        !ok(BIN, &["--help"]).contains("man-pages"),
        "man-pages is for the build"
    );

    // what the Makefile's `docs` runs
    let dir = TempDir::new("man");
    ok(BIN, &["man-pages", dir.0.to_str().unwrap()]);
    check_man_pages(&dir.0, false);
    if have("man") {
        let shown = ok("man", &["-l", dir.0.join("ebpf-net-lb.8").to_str().unwrap()]);
        assert!(
            shown.contains("SYNOPSIS") && shown.contains("ebpf-net-lb"),
            "{shown}"
        );
    }

    for shell in ["bash", "zsh", "fish"] {
        let script = ok(BIN, &["completions", shell]);
        check_completions(shell, &script);
        // the script parses in its shell, where the shell is here
        if have(shell) {
            let file = dir.0.join(format!("completion.{shell}"));
            std::fs::write(&file, &script).unwrap();
            ok(shell, &["-n", file.to_str().unwrap()]);
        } else {
            eprintln!("{shell} is not installed: its completion script was not parsed");
        }
    }
    let refused = run(BIN, &["completions", "tcsh"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
}

/// The receiving end of `NOTIFY_SOCKET`, as systemd's.
struct NotifySocket {
    socket: UnixDatagram,
    /// the value of NOTIFY_SOCKET
    name: String,
    _dir: Option<TempDir>,
}

impl NotifySocket {
    /// An abstract socket, `@name`: reached only from this network namespace.
    fn abstract_name(tag: &str) -> Self {
        let name = format!("ebn-notify-{tag}-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        Self {
            socket: UnixDatagram::bind_addr(&addr).unwrap(),
            name: format!("@{name}"),
            _dir: None,
        }
    }

    /// A socket file, as systemd's /run/systemd/notify: reached from any network namespace.
    fn path(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let path = dir.0.join("notify");
        Self {
            socket: UnixDatagram::bind(&path).unwrap(),
            name: path.to_str().unwrap().to_string(),
            _dir: Some(dir),
        }
    }

    /// The next message, waiting up to `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let len = self.socket.recv(&mut buf).ok()?;
        Some(text(&buf[..len]))
    }

    /// The next message, which must start with `first_line`; fails at once when the process
    /// has exited instead.
    fn expect(&self, first_line: &str, process: &mut Process) -> String {
        let deadline = Instant::now() + scaled(Duration::from_secs(30));
        let message = loop {
            if let Some(message) = self.next(Duration::from_millis(100)) {
                break message;
            }
            if process.has_exited() || Instant::now() > deadline {
                // what it logged on the way out
                std::thread::sleep(Duration::from_millis(100));
                panic!("no {first_line} on NOTIFY_SOCKET: {:?}", process.stderr());
            }
        };
        assert!(
            message.lines().next() == Some(first_line),
            "expected {first_line}, got {message:?}: {:?}",
            process.stderr()
        );
        message
    }
}

/// A process with its stderr collected; SIGTERM then SIGKILL on drop.
struct Process {
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Process {
    fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ebpf-net");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&stderr);
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Self {
            child: Some(child),
            stderr,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| child.try_wait().unwrap().is_some())
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// SIGTERM (systemd's KillSignal) and the exit code, waiting a bounded time.
    fn stop(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + scaled(Duration::from_secs(10));
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// READY=1 at the ready line, RELOADING=1 with the monotonic clock on SIGHUP and READY=1 once
/// the reload is applied (or refused: the run goes on), STOPPING=1 on SIGTERM; an abstract
/// socket name (`@...`), on clusterip, which stays in this namespace.
#[test]
fn notify_socket_gets_ready_reloading_and_stopping() {
    let cgroup = TestCgroup::new("pkgnotify");
    let dir = TempDir::new("notifyconf");
    let config = dir.0.join("node.toml");
    let write_config = |services: &[&str]| {
        let mut text = format!("[clusterip]\ncgroup = \"{}\"\n", cgroup.path_str());
        for vip in services {
            text.push_str(&format!(
                "[[clusterip.service]]\nvip = \"{vip}\"\nbackends = [\"10.251.0.2:80\"]\n"
            ));
        }
        std::fs::write(&config, text).unwrap();
    };
    write_config(&["10.251.9.1:80"]);
    let notify = NotifySocket::abstract_name("clusterip");
    let mut process = Process::spawn(
        Command::new(BIN)
            .args(["clusterip", "--config", config.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &notify.name),
    );
    let ready = notify.expect("READY=1", &mut process);
    assert!(
        ready.contains("STATUS=clusterip: ready: ") && ready.contains("10.251.9.1:80"),
        "{ready:?}"
    );

    write_config(&["10.251.9.1:80", "10.251.9.2:80"]);
    let before = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    process.signal(libc::SIGHUP);
    let reloading = notify.expect("RELOADING=1", &mut process);
    let usec: u64 = reloading
        .lines()
        .find_map(|line| line.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC: {reloading:?}"))
        .parse()
        .unwrap();
    let before_usec = before.tv_sec() as u64 * 1_000_000 + before.tv_nsec() as u64 / 1_000;
    assert!(
        usec >= before_usec && usec < before_usec + 10_000_000,
        "MONOTONIC_USEC={usec}, sent at {before_usec}"
    );
    let reloaded = notify.expect("READY=1", &mut process);
    assert!(reloaded.contains("STATUS=clusterip: reloaded: "), "{reloaded:?}");
    assert!(reloaded.contains("1 added"), "{reloaded:?}");

    // a file that does not parse: refused, the run goes on, and systemd hears it is done
    std::fs::write(&config, "[clusterip\n").unwrap();
    process.signal(libc::SIGHUP);
    notify.expect("RELOADING=1", &mut process);
    let refused = notify.expect("READY=1", &mut process);
    assert!(
        refused.contains("reload failed, kept the running configuration"),
        "{refused:?}"
    );

    let code = process.stop();
    assert_eq!(notify.next(Duration::from_secs(5)).as_deref(), Some("STOPPING=1"));
    assert_eq!(code, Some(0), "{:?}", process.stderr());
    assert!(notify.next(Duration::from_millis(200)).is_none());
}

/// What a systemd unit (with its drop-ins) says, read from the installed files: this machine
/// may have no systemd running to start it.
struct Unit {
    exec_start: Vec<String>,
    exec_reload: Vec<String>,
    capabilities: BTreeSet<String>,
    no_new_privileges: bool,
}

impl Unit {
    fn load(dir: &Path, template: &str, instance: &str) -> Self {
        let base = dir.join(template);
        let dropins = dir.join(format!("{}.d", template.replace("@.", &format!("@{instance}."))));
        let mut files = vec![base];
        if let Ok(entries) = std::fs::read_dir(&dropins) {
            let mut confs: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
            confs.sort();
            files.extend(confs);
        }
        let mut unit = Unit {
            exec_start: Vec::new(),
            exec_reload: Vec::new(),
            capabilities: BTreeSet::new(),
            no_new_privileges: false,
        };
        let mut bounding: Option<BTreeSet<String>> = None;
        for file in files {
            let content = std::fs::read_to_string(&file).unwrap();
            for line in content.lines().filter(|line| !line.starts_with('#')) {
                let Some((key, value)) = line.split_once('=') else {
                    continue;
                };
                let words = || {
                    value
                        .split_whitespace()
                        .map(|word| word.replace("%i", instance))
                        .collect::<Vec<_>>()
                };
                match key.trim() {
                    "ExecStart" => unit.exec_start = words(),
                    "ExecReload" => unit.exec_reload = words(),
                    "NoNewPrivileges" => unit.no_new_privileges = value.trim() == "yes",
                    // systemd.exec(5): lines OR, "~" lines AND NOT
                    "CapabilityBoundingSet" => {
                        let names = words();
                        bounding = Some(match value.trim().strip_prefix('~') {
                            Some(rest) => {
                                let removed: BTreeSet<String> =
                                    rest.split_whitespace().map(str::to_string).collect();
                                let all = bounding.clone().expect("~ after a positive set");
                                all.difference(&removed).cloned().collect()
                            }
                            None => bounding.unwrap_or_default().into_iter().chain(names).collect(),
                        })
                    }
                    _ => {}
                }
            }
        }
        unit.capabilities = bounding.expect("the unit sets CapabilityBoundingSet");
        unit
    }

    /// ExecStart as systemd would run it: its capability bounding set (root's capabilities
    /// are cut to it at exec), no_new_privs, systemd's environment and NOTIFY_SOCKET; in
    /// `netns` as `NetworkNamespacePath=` would put it (the host's mounts, so its /sys/fs/bpf).
    fn start(&self, netns: &Netns, notify: &NotifySocket) -> Process {
        let bounding = std::iter::once("-all".to_string())
            .chain(
                self.capabilities
                    .iter()
                    .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase())),
            )
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new("setpriv");
        command.arg(format!("--bounding-set={bounding}"));
        if self.no_new_privileges {
            command.arg("--no-new-privs");
        }
        command
            .arg("--")
            .args(&self.exec_start)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("NOTIFY_SOCKET", &notify.name);
        let ns = std::fs::File::open(format!("/run/netns/{}", netns.name)).unwrap();
        let fd = ns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; `ns` outlives the spawn.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let process = Process::spawn(&mut command);
        drop(ns);
        process
    }

    /// ExecReload, with $MAINPID.
    fn reload(&self, main: &Process) {
        let pid = main.pid().to_string();
        let words: Vec<String> = self
            .exec_reload
            .iter()
            .map(|word| word.replace("$MAINPID", &pid))
            .collect();
        let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
        ok(&words[0], &args);
    }
}

/// Installed by this test: purged on drop, whatever happened.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = dpkg(&["--purge", "ebpf-net"]);
    }
}

/// dpkg, waiting out another dpkg's lock (a minute at most).
fn dpkg(args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let output = run("dpkg", args);
        if output.status.success() || !text(&output.stderr).contains("lock") || Instant::now() > deadline {
            return output;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn dpkg_ok(args: &[&str]) -> String {
    let output = dpkg(args);
    assert!(
        output.status.success(),
        "dpkg {args:?}: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout) + &text(&output.stderr)
}

/// `Status:` of a package as dpkg knows it ("" when it knows nothing of it).
fn package_status(name: &str) -> String {
    text(&run("dpkg-query", &["-W", "-f=${db:Status-Abbrev}", name]).stdout)
        .trim()
        .to_string()
}

/// `make TARGET VARS...` in the source tree, one at a time.
fn make(args: &[&str]) -> String {
    let _guard = MAKE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let output = output_within(
        Command::new("make")
            .arg("-C")
            .arg(ROOT)
            .arg("PREBUILT=1")
            .args(args),
    );
    assert!(
        output.status.success(),
        "make {args:?}: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

#[test]
fn make_install_honours_prefix_and_destdir() {
    let dest = TempDir::new("destdir");
    let destdir = format!("DESTDIR={}", dest.0.display());
    make(&["install", &destdir, "PREFIX=/opt/ebn"]);
    let at = |path: &str| dest.0.join(path.trim_start_matches('/'));
    assert!(at("/opt/ebn/bin/ebpf-net").is_file());
    // what the build wrote: a page per subcommand, completions, the objects for tc by hand
    check_man_pages(&at("/opt/ebn/share/man/man8"), true);
    check_completions(
        "bash",
        &std::fs::read_to_string(at("/opt/ebn/share/bash-completion/completions/ebpf-net")).unwrap(),
    );
    assert!(at("/opt/ebn/share/zsh/site-functions/_ebpf-net").is_file());
    assert!(at("/opt/ebn/share/fish/vendor_completions.d/ebpf-net.fish").is_file());
    assert!(at("/opt/ebn/lib/ebpf-net/bpf/ingress.o").is_file());
    let unit = std::fs::read_to_string(at("/opt/ebn/lib/systemd/system/ebpf-net@.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/ebn/bin/ebpf-net %i --config /etc/ebpf-net/node.toml"),
        "{unit}"
    );
    assert!(at("/opt/ebn/lib/systemd/system/ebpf-net@lb.service.d/modules.conf").is_file());
    assert!(at("/etc/ebpf-net/node.toml").is_file());

    // an edited config survives another install and the uninstall
    std::fs::write(at("/etc/ebpf-net/node.toml"), "# mine\n").unwrap();
    make(&["install", &destdir, "PREFIX=/opt/ebn"]);
    make(&["uninstall", &destdir, "PREFIX=/opt/ebn"]);
    assert_eq!(
        std::fs::read_to_string(at("/etc/ebpf-net/node.toml")).unwrap(),
        "# mine\n"
    );
    let left: Vec<String> = ok("find", &[dest.0.to_str().unwrap(), "-type", "f"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(left, vec![at("/etc/ebpf-net/node.toml").display().to_string()]);
}

/// The whole life of the package on this machine: build (cargo-deb), `dpkg -i`, the units
/// verified by systemd-analyze, monitor and ipv6-hp from the example /etc/ebpf-net/node.toml
/// run through their units' ExecStart (capabilities, no_new_privs, NOTIFY_SOCKET) on an eth0 of
/// a namespace made here, reloaded through ExecReload, stopped; `dpkg -r` keeps the config,
/// `dpkg --purge` leaves nothing of it.
#[test]
fn debian_package_installs_runs_its_units_and_purges() {
    for tool in ["dpkg", "dpkg-deb", "setpriv", "systemd-analyze", "make"] {
        if !have(tool) {
            eprintln!("skipped: {tool} is not installed (scripts/setup installs it)");
            return;
        }
    }
    if !run("cargo", &["deb", "--version"]).status.success() {
        eprintln!("skipped: cargo-deb is not installed (scripts/setup installs it)");
        return;
    }
    let status = package_status("ebpf-net");
    if !status.is_empty() && !status.starts_with("un") && !status.starts_with("pn") {
        eprintln!("skipped: a package ebpf-net is on this machine already ({status}); not touching it");
        return;
    }

    let out = TempDir::new("deb");
    // --fast: less compression, the same files
    make(&["deb", &format!("DEB_OUT={}", out.0.display()), "DEB_FLAGS=--fast"]);
    let deb = std::fs::read_dir(&out.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("make deb wrote a .deb");
    let deb = deb.to_str().unwrap();
    let fields = ok("dpkg-deb", &["-f", deb, "Depends"]);
    for dep in ["libelf1", "zlib1g", "libc6", "nftables", "kmod"] {
        assert!(fields.contains(dep), "Depends lacks {dep}: {fields}");
    }
    let listing = ok("dpkg-deb", &["-c", deb]);
    let shipped: Vec<String> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(|path| format!("/{}", path.trim_start_matches("./").trim_end_matches('/')))
        .filter(|path| path != "/")
        .collect();
    let existed: BTreeSet<String> = shipped
        .iter()
        .filter(|p| Path::new(p).exists())
        .cloned()
        .collect();
    if existed.contains("/usr/bin/ebpf-net") {
        eprintln!("skipped: /usr/bin/ebpf-net is there without the package (make install PREFIX=/usr?); not overwriting it");
        return;
    }

    let installed = Installed;
    dpkg_ok(&["-i", deb]);
    assert_eq!(package_status("ebpf-net"), "ii");
    assert_eq!(
        ok("/usr/bin/ebpf-net", &["--version"]).trim(),
        format!("ebpf-net {}", env!("CARGO_PKG_VERSION"))
    );
    check_man_pages(Path::new("/usr/share/man/man8"), true);
    check_completions(
        "bash",
        &std::fs::read_to_string("/usr/share/bash-completion/completions/ebpf-net").unwrap(),
    );
    check_completions(
        "zsh",
        &std::fs::read_to_string("/usr/share/zsh/vendor-completions/_ebpf-net").unwrap(),
    );
    check_completions(
        "fish",
        &std::fs::read_to_string("/usr/share/fish/vendor_completions.d/ebpf-net.fish").unwrap(),
    );
    assert_eq!(
        ok("dpkg-query", &["-W", "-f=${Conffiles}", "ebpf-net"])
            .split_whitespace()
            .next(),
        Some("/etc/ebpf-net/node.toml")
    );

    // the units as installed, drop-ins included: no complaint (man pages are checked too)
    let mut verify = vec!["verify"];
    if !have("man") {
        verify.push("--man=no");
    }
    let units = [
        "ebpf-net@ipv6-hp.service",
        "ebpf-net@monitor.service",
        "ebpf-net@lb.service",
        "ebpf-net-persist@lb.service",
        "ebpf-net-persist@clusterip.service",
    ];
    verify.extend(units);
    // without a running systemd, the verifying manager leaves its unit-load stamp behind
    let stamp = Path::new("/run/systemd/systemd-units-load");
    let stamp_is_ours = !Path::new("/run/systemd/system").exists() && !stamp.exists();
    let verified = run("systemd-analyze", &verify);
    if stamp_is_ours {
        let _ = std::fs::remove_file(stamp);
    }
    assert!(
        verified.status.success() && verified.stderr.is_empty(),
        "systemd-analyze {verify:?}: {}{}",
        text(&verified.stdout),
        text(&verified.stderr)
    );

    // monitor then ipv6-hp, from the example config, on an eth0 of a namespace of ours
    let node = Netns::new("pkgnode");
    let peer = Netns::new("pkgpeer");
    veth(&node, "eth0", &peer, "eth1");
    let dir = Path::new("/lib/systemd/system");
    let monitor = Unit::load(dir, "ebpf-net@.service", "monitor");
    assert!(
        !monitor.capabilities.contains("CAP_SYS_ADMIN"),
        "{:?}",
        monitor.capabilities
    );
    let ipv6_hp = Unit::load(dir, "ebpf-net@.service", "ipv6-hp");
    assert_eq!(
        ipv6_hp.exec_start,
        [
            "/usr/bin/ebpf-net",
            "ipv6-hp",
            "--config",
            "/etc/ebpf-net/node.toml"
        ]
    );
    let lb = Unit::load(dir, "ebpf-net@.service", "lb");
    assert!(
        lb.capabilities.contains("CAP_SYS_MODULE"),
        "{:?}",
        lb.capabilities
    );

    let monitor_notify = NotifySocket::path("notify-monitor");
    let mut monitor_run = monitor.start(&node, &monitor_notify);
    let ready = monitor_notify.expect("READY=1", &mut monitor_run);
    assert!(ready.contains("STATUS=monitor: ready: eth0"), "{ready:?}");
    let notify = NotifySocket::path("notify-ipv6-hp");
    let mut ipv6_hp_run = ipv6_hp.start(&node, &notify);
    let ready = notify.expect("READY=1", &mut ipv6_hp_run);
    assert!(
        ready.contains("STATUS=ipv6-hp: ready: eth0: ingress fe80::1234:5678:9abc"),
        "{ready:?}"
    );
    let shown = ok("/usr/bin/ebpf-net", &["-n", &node.name, "status"]);
    // status lists every namespace's runs (other tests' too): ours are the lines naming ours
    let ours = |shown: &str| -> Vec<String> {
        shown
            .lines()
            .filter(|line| line.contains(&node.name))
            .map(str::to_string)
            .collect()
    };
    assert!(
        ours(&shown)
            .iter()
            .any(|line| line.starts_with("  ipv6-hp") && line.contains("running: pid")),
        "{shown}"
    );

    ipv6_hp.reload(&ipv6_hp_run);
    notify.expect("RELOADING=1", &mut ipv6_hp_run);
    let reloaded = notify.expect("READY=1", &mut ipv6_hp_run);
    assert!(reloaded.contains("STATUS=ipv6-hp: reloaded: "), "{reloaded:?}");

    for (run, notify) in [(&mut ipv6_hp_run, &notify), (&mut monitor_run, &monitor_notify)] {
        let code = run.stop();
        assert_eq!(notify.next(Duration::from_secs(5)).as_deref(), Some("STOPPING=1"));
        assert_eq!(code, Some(0), "{:?}", run.stderr());
    }
    let shown = ok("/usr/bin/ebpf-net", &["-n", &node.name, "status"]);
    assert_eq!(
        ours(&shown),
        [format!("attached in network namespace {}: none", node.name)],
        "{shown}"
    );

    // remove: the config stays; purge: nothing the package brought stays
    dpkg_ok(&["-r", "ebpf-net"]);
    assert_eq!(package_status("ebpf-net"), "rc");
    assert!(!Path::new("/usr/bin/ebpf-net").exists());
    assert!(!dir.join("ebpf-net@.service").exists());
    assert!(Path::new("/etc/ebpf-net/node.toml").exists());
    dpkg_ok(&["--purge", "ebpf-net"]);
    drop(installed);
    let status = package_status("ebpf-net");
    assert!(
        status.is_empty() || status.starts_with("un") || status.starts_with("pn"),
        "{status}"
    );
    let left: Vec<&String> = shipped
        .iter()
        .filter(|path| !existed.contains(*path) && Path::new(path).exists())
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(!Path::new("/etc/ebpf-net").exists());
}
