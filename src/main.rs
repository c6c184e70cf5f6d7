//! The `ebpf-net` command line: parse, check privileges, enter the namespace, dispatch.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use ebpf_net::control::lifecycle;
use ebpf_net::control::manual;
use ebpf_net::control::status;
use ebpf_net::datapath::clusterip::{self, Clusterip, ClusteripArgs};
use ebpf_net::datapath::ipv6_hp::{self, Ipv6Hp, Ipv6HpArgs};
use ebpf_net::datapath::lb::{self, Lb, LbArgs};
use ebpf_net::datapath::monitor::{Monitor, MonitorArgs};
use ebpf_net::datapath::proxy::{self, Proxy, ProxyArgs};
use ebpf_net::datapath::xdp_lb::{self, XdpLb, XdpLbArgs};
use ebpf_net::datapath::REGISTRY;
use ebpf_net::kernel::{netns, probe};
use ebpf_net::kube::{self, KubeArgs};

/// eBPF service networking for a Linux node.
#[derive(Parser, Debug)]
#[command(name = "ebpf-net", version, about)]
struct Cli {
    /// work inside this network namespace (like `ip -n`), keeping the host's /sys/fs/bpf
    #[arg(short = 'n', long, global = true, value_name = "NAME")]
    netns: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Azure SLB IPv6 health-probe fix: link-local probe source <-> global address
    #[command(name = "ipv6-hp")]
    Ipv6Hp(Ipv6HpArgs),
    /// live per-flow packet and byte counters of an interface
    Monitor(MonitorArgs),
    /// rewrite destination ip:port of outgoing packets per rule, and the replies back
    Proxy(ProxyArgs),
    /// ClusterIP at the socket: connects to a service VIP go straight to a backend
    Clusterip(ClusteripArgs),
    /// L4 load balancer on the kernel's conntrack: tc makes the entry, conntrack NATs the flow
    Lb(LbArgs),
    /// one-arm L4 load balancer in XDP: Maglev, per-flow state, full NAT, flow events
    #[command(name = "xdp-lb")]
    XdpLb(XdpLbArgs),
    /// node agent: the Services of a Kubernetes API server on this node (clusterip on a
    /// cgroup, lb or xdp-lb on interfaces); with -n, the interfaces' namespace
    Kube(KubeArgs),
    /// show what ebpf-net has persisted (every namespace) and attached (this namespace)
    Status {
        /// machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// remove persisted state of this namespace (clusterip: of the root cgroup), or of one
    /// subcommand / interface / cgroup; --all: everything, every namespace and cgroup
    Down {
        /// only this datapath
        subcommand: Option<Datapath>,
        /// only this interface
        #[arg(
            short = 'i',
            long = "interface",
            value_name = "IFACE",
            conflicts_with = "cgroup"
        )]
        iface: Option<String>,
        /// only this cgroup (clusterip), absolute or relative to the cgroup2 mount
        #[arg(long, value_name = "PATH")]
        cgroup: Option<String>,
        /// every namespace (including ones that no longer exist) and every cgroup
        #[arg(long)]
        all: bool,
    },
    /// print the completion script of a shell (bash: `source <(ebpf-net completions bash)`)
    Completions {
        /// the shell to complete in
        shell: clap_complete::Shell,
    },
    /// write the man pages, ebpf-net.8 and ebpf-net-SUBCOMMAND.8, into DIR (what `make`
    /// and the package install)
    #[command(name = "man-pages", hide = true)]
    ManPages {
        /// where to write them
        dir: std::path::PathBuf,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Datapath {
    #[value(name = "ipv6-hp")]
    Ipv6Hp,
    Proxy,
    Clusterip,
    Lb,
    #[value(name = "xdp-lb")]
    XdpLb,
    /// what a Kubernetes agent drove (clusterip on its cgroup, lb or xdp-lb on its interfaces)
    Kube,
}

impl Datapath {
    fn subcommand(self) -> &'static str {
        match self {
            Datapath::Ipv6Hp => ipv6_hp::SUBCOMMAND,
            Datapath::Proxy => proxy::SUBCOMMAND,
            Datapath::Clusterip => clusterip::SUBCOMMAND,
            Datapath::Lb => lb::SUBCOMMAND,
            Datapath::XdpLb => xdp_lb::SUBCOMMAND,
            Datapath::Kube => ebpf_net::kube::SUBCOMMAND,
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // made from the command line's definition alone: no privileges, no kernel
    match &cli.command {
        Command::Completions { shell } => {
            manual::completions(Cli::command(), *shell, &mut std::io::stdout());
            return Ok(());
        }
        Command::ManPages { dir } => {
            manual::write_man_pages(Cli::command(), dir)?;
            return Ok(());
        }
        _ => {}
    }
    probe::require_privileges()?;
    // clusterip serves a cgroup's processes in every namespace: --netns only says where its
    // health checks run
    if let (Some(_), Command::Clusterip(args)) = (&cli.netns, &cli.command) {
        if !args.services.iter().any(|service| service.check.is_some()) {
            bail!("clusterip attaches to a cgroup, whose processes it serves in every network namespace; drop --netns (it only says where health checks of --service ...;check=... run)");
        }
    }
    if let Command::Kube(args) = &cli.command {
        // the API server is reached from here; the datapaths work in the node's namespace
        return kube::run(args, cli.netns.as_deref());
    }
    if let Some(name) = &cli.netns {
        netns::enter(name)?;
    }
    let netns_key = netns::current_key()?;
    match &cli.command {
        Command::Ipv6Hp(args) => lifecycle::run::<Ipv6Hp>(args, &netns_key),
        Command::Monitor(args) => lifecycle::run::<Monitor>(args, &netns_key),
        Command::Proxy(args) => lifecycle::run::<Proxy>(args, &netns_key),
        Command::Clusterip(args) => lifecycle::run::<Clusterip>(args, &netns_key),
        Command::Lb(args) => lifecycle::run::<Lb>(args, &netns_key),
        Command::XdpLb(args) => lifecycle::run::<XdpLb>(args, &netns_key),
        Command::Kube(_) => unreachable!("the agent runs before --netns is entered"),
        Command::Completions { .. } | Command::ManPages { .. } => {
            unreachable!("written before privileges are checked")
        }
        Command::Status { json } => status::status(&REGISTRY, *json, &netns_key),
        Command::Down {
            subcommand,
            iface,
            cgroup,
            all,
        } => {
            if matches!(subcommand, Some(Datapath::Kube)) {
                if iface.is_some() || *all {
                    bail!("down kube takes --cgroup (the agent's), not -i or --all");
                }
                return ebpf_net::kube::down(cgroup.as_deref(), &netns_key);
            }
            let target = match cgroup {
                Some(path) => Some(ebpf_net::kernel::cgroup::Cgroup::target_of(Some(path))?),
                None => iface.clone(),
            };
            // what `clusterip` without --cgroup attaches to is all `down` without it removes
            let default_cgroup = match (cgroup, all) {
                (None, false) => Some(ebpf_net::kernel::cgroup::Cgroup::target_of(None)?),
                _ => None,
            };
            status::down(
                &REGISTRY,
                &status::DownScope {
                    subcommand: subcommand.map(Datapath::subcommand),
                    target: target.as_deref(),
                    default_cgroup: default_cgroup.as_deref(),
                    all: *all,
                    only: None,
                },
                &netns_key,
            )
        }
    }
}

fn main() -> ExitCode {
    // Behave like other CLI tools when piped into `head`: die quietly on SIGPIPE.
    // SAFETY: restoring a default signal disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    ebpf_net::control::run::phase("start");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) if err.kind() == clap::error::ErrorKind::ValueValidation => {
            // "--service TEXT: problem", as for the same entry in a config file
            use clap::error::{ContextKind, ContextValue};
            let context = |kind| match err.get(kind) {
                Some(ContextValue::String(text)) => text.clone(),
                _ => String::new(),
            };
            let flag = context(ContextKind::InvalidArg);
            let flag = flag.split_whitespace().next().unwrap_or_default();
            let problem = std::error::Error::source(&err)
                .map(|source| format!("{source:#}"))
                .unwrap_or_default();
            eprintln!(
                "ebpf-net: {flag} {}: {problem}",
                context(ContextKind::InvalidValue)
            );
            return ExitCode::from(2);
        }
        Err(err) => {
            // One line naming the problem, without clap's usage and tip lines.
            let rendered = err.render().to_string();
            let problem: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("ebpf-net: {}", problem.join(" ").trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    ebpf_net::control::run::phase("command line parsed");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ebpf-net: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
