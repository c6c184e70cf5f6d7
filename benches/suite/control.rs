//! The control plane: programming 10,000 services with 10 backends each, and changing one
//! backend afterwards, through `clusterip --persist` and `lb --persist` versus nftables
//! loading the same in kube-proxy's layout.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Instant;

use crate::common::bench::median;
use crate::common::cgroup::TestCgroup;
use crate::common::topology::{veth, Netns, BIN};
use crate::paths::{kube_proxy_nft, service_args, NftHook, Svc};
use crate::report::{table, Report};
use crate::Settings;

const SERVICES: usize = 10_000;
const BACKENDS: usize = 10;
/// What backend 3 of service 5,000 becomes (inside 10.128.0.0/9, unused by the others).
const NEW_BACKEND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 250, 0, 1)), 8080);

/// Backend `k` of service `i`: 100,000 distinct addresses in 10.128.0.0/9.
fn backend(i: usize, k: usize) -> SocketAddr {
    let n = (i * BACKENDS + k) as u32;
    SocketAddr::new(Ipv4Addr::from(0x0a80_0000 + n + 1).into(), 8080)
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn services(changed: bool) -> Vec<Svc> {
    (0..SERVICES)
        .map(|i| {
            let mut backends: Vec<SocketAddr> = (0..BACKENDS).map(|k| backend(i, k)).collect();
            if changed && i == SERVICES / 2 {
                // one backend of one service replaced by a new address
                backends[3] = NEW_BACKEND;
            }
            (vip(i), 80, backends)
        })
        .collect()
}

/// Runs ebpf-net and returns how long it took. 10,000 services of 10 backends are about 2 MB
/// of arguments, more than execve takes with the default 8 MB stack limit (a quarter of it):
/// the child gets a 64 MB stack limit, as an operator passing that many flags would need.
fn timed(args: &[String]) -> f64 {
    let mut command = Command::new(BIN);
    command.args(args);
    // SAFETY: setrlimit is async-signal-safe; it only changes the child's limit.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64 << 20,
                rlim_max: libc::RLIM_INFINITY,
            };
            libc::setrlimit(libc::RLIMIT_STACK, &limit);
            Ok(())
        });
    }
    let began = Instant::now();
    let out = command.output().unwrap();
    let secs = began.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "ebpf-net {:?}: {}",
        &args[..args.len().min(4)],
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

fn nft_timed(netns: &Netns, rules: &str) -> f64 {
    let file = std::env::temp_dir().join(format!("ebpf-net-bench-ctl-{}", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let began = Instant::now();
    netns.exec(&format!("nft -f {}", file.display()));
    let secs = began.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(file);
    secs
}

/// The one-backend change as kube-proxy makes it, in one transaction: a new endpoint chain
/// (`to`, DNAT to `addr`), the service chain rewritten to pick it in place of endpoint chain
/// `from`, which is deleted. Swapping `from` and `to` undoes it, so it can be timed again.
fn nft_replace_endpoint(table: &str, from: &str, to: &str, addr: SocketAddr) -> String {
    let i = SERVICES / 2;
    let picks: Vec<String> = (0..BACKENDS)
        .map(|k| {
            let chain = if k.to_string() == from {
                to.to_string()
            } else {
                k.to_string()
            };
            format!("{k} : goto sep-{i}-{chain}")
        })
        .collect();
    format!(
        "add chain ip {table} sep-{i}-{to}\nadd rule ip {table} sep-{i}-{to} meta l4proto tcp dnat to {addr}\n\
         flush chain ip {table} svc-{i}\nadd rule ip {table} svc-{i} numgen random mod {BACKENDS} vmap {{ {} }}\n\
         delete chain ip {table} sep-{i}-{from}\n",
        picks.join(", ")
    )
}

pub fn run(report: &mut Report, settings: &Settings, cgroup: &TestCgroup) {
    let before = services(false);
    let after = services(true);
    // lb needs an interface, and a route to every backend (its source NAT address)
    let node = Netns::new("bench-ctl");
    let peer = Netns::new("bench-ctl-peer");
    veth(&node, "eth0", &peer, "eth0");
    node.exec("ip addr add 10.255.255.254/9 dev eth0 && ip link set eth0 up");

    let mut clusterip = (Vec::new(), Vec::new());
    let mut lb = (Vec::new(), Vec::new());
    let mut nft = (Vec::new(), Vec::new());
    for round in 0..settings.control_rounds {
        eprintln!("control plane round {round}");
        let mut cip = vec![
            "clusterip".to_string(),
            "--cgroup".into(),
            cgroup.path_str().into(),
            "--persist".into(),
        ];
        let cip_after = [cip.clone(), service_args(&after)].concat();
        cip.extend(service_args(&before));
        clusterip.0.push(timed(&cip));
        clusterip.1.push(timed(&cip_after));
        timed(&[
            "down".into(),
            "clusterip".into(),
            "--cgroup".into(),
            cgroup.path_str().into(),
        ]);

        let mut lb_args = vec![
            "--netns".to_string(),
            node.name.clone(),
            "lb".into(),
            "-i".into(),
            "eth0".into(),
            "--persist".into(),
        ];
        let lb_after = [lb_args.clone(), service_args(&after)].concat();
        lb_args.extend(service_args(&before));
        lb.0.push(timed(&lb_args));
        lb.1.push(timed(&lb_after));
        timed(&["--netns".into(), node.name.clone(), "down".into(), "lb".into()]);
    }
    // one round: nft takes minutes to load this
    eprintln!("control plane: nftables");
    nft.0.push(nft_timed(
        &node,
        &kube_proxy_nft("ebnctl", NftHook::Prerouting, &before),
    ));
    for _ in 0..settings.control_rounds {
        let (new, old) = (NEW_BACKEND, backend(SERVICES / 2, 3));
        nft.1
            .push(nft_timed(&node, &nft_replace_endpoint("ebnctl", "3", "new", new)));
        nft.1
            .push(nft_timed(&node, &nft_replace_endpoint("ebnctl", "new", "3", old)));
    }
    node.exec("nft delete table ip ebnctl");
    let nft_load = median(nft.0.clone());
    let nft_change_secs = median(nft.1.clone());
    let row = |name: &str, (load, change): &(Vec<f64>, Vec<f64>)| {
        let (load, change) = (median(load.clone()), median(change.clone()));
        vec![
            name.to_string(),
            format!("{load:.2}"),
            format!("{:.3}x", load / nft_load),
            format!("{change:.3}"),
            format!("{:.2}x", change / nft_change_secs),
        ]
    };
    let rows = vec![
        row("ebpf-net clusterip --persist", &clusterip),
        row("ebpf-net lb --persist", &lb),
        row("nftables, kube-proxy layout (nft -f)", &nft),
    ];
    let mut md = format!(
        "## Control plane: 10,000 services x 10 backends\n\n\
         Time to program all of it from nothing, and to change one backend of one service afterwards: ebpf-net median of {} rounds; the nftables load once (it takes minutes), its one-backend change median of {} changes back and forth. \
         For ebpf-net that is the whole command: process start, parsing 10,000 `--service` arguments, loading or reusing the pinned maps and programs, writing only the difference; a re-run with one backend changed rewrites that one service. \
         For nftables it is `nft -f` of kube-proxy's layout (100,000 endpoint chains, 10,000 service chains, one verdict map), and for the change kube-proxy's transaction (a new endpoint chain, the service chain rewritten, the old endpoint chain deleted). Time ratios: lower is better.\n\n",
        settings.control_rounds,
        2 * settings.control_rounds
    );
    md.push_str(&table(
        &[
            "path",
            "program 10k x 10 (s)",
            "vs nftables",
            "change one backend (s)",
            "vs nftables",
        ],
        &rows,
    ));
    report.section(md + "\n");
}
