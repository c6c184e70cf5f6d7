//! Under attack: the same spoofed-SYN flood at a 3-backend service through nftables DNAT +
//! masquerade, xdp-lb (default and a 4,096-flow table) and lb on the load-balancer node of
//! the services topology, one after another in one run: established connections that
//! survive, new connections during the flood and in the 10 s after it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::bench::load_rules;
use crate::common::flood::{mac_of, new_connections, new_connections_while, syn_flood, Chatters};
use crate::paths::{ebpf_net, kube_proxy_nft, service_args, NftHook, Topology, ECHO_PORT};
use crate::report::{table, Report};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const PORT: u16 = ECHO_PORT;
const FLOOD: u64 = 150_000;
const FLOOD_LIMIT: Duration = Duration::from_secs(2);
const CHATTERS: usize = 20;
/// the spoofed sources: no route leads there from the load balancer, its answers die
const SPOOFED: [u8; 2] = [10, 71];

#[derive(Clone, Copy)]
enum Path {
    Nft,
    XdpLb,
    XdpLbSmall,
    Lb,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Nft => "nftables DNAT + masquerade",
            Path::XdpLb => "ebpf-net xdp-lb",
            Path::XdpLbSmall => "ebpf-net xdp-lb --max-flows 4096",
            Path::Lb => "ebpf-net lb",
        }
    }
}

/// What one path did under the flood.
struct Outcome {
    sent: u64,
    flood_secs: f64,
    survived: usize,
    during: (usize, usize),
    after: (usize, usize),
}

fn percent((ok, tried): (usize, usize)) -> String {
    if tried == 0 {
        return "-".into();
    }
    format!("{ok}/{tried} ({:.0}%)", ok as f64 * 100.0 / tried as f64)
}

fn run_path(topo: &Topology, path: Path) -> Outcome {
    let services = vec![(VIP, PORT, topo.echo_backends())];
    let target = SocketAddr::V4(SocketAddrV4::new(VIP, PORT));
    match path {
        Path::Nft => {
            topo.lb.exec("sysctl -qw net.ipv4.ip_forward=1");
            load_rules(
                &topo.lb,
                "nft",
                &kube_proxy_nft("ebnattack", NftHook::Prerouting, &services),
            );
        }
        Path::XdpLb | Path::XdpLbSmall | Path::Lb => {
            let sub = if matches!(path, Path::Lb) { "lb" } else { "xdp-lb" };
            let mut args = vec![sub.to_string(), "-i".into(), "eth0".into(), "--persist".into()];
            if matches!(path, Path::XdpLbSmall) {
                args.extend(["--max-flows".into(), "4096".into()]);
            }
            args.extend(service_args(&services));
            ebpf_net(&topo.lb, &args);
        }
    }
    let chatters = Chatters::start(&topo.client, target, CHATTERS);
    std::thread::sleep(Duration::from_millis(300));
    let flooding = AtomicBool::new(true);
    let (flood, during) = std::thread::scope(|scope| {
        let during = scope.spawn(|| {
            new_connections_while(
                &topo.client,
                target,
                &flooding,
                Duration::from_millis(100),
                Duration::from_secs(4),
                40,
            )
        });
        let flood = syn_flood(
            &topo.client,
            "eth0",
            mac_of(&topo.lb, "eth0"),
            SocketAddrV4::new(VIP, PORT),
            SPOOFED,
            FLOOD,
            FLOOD_LIMIT,
        );
        flooding.store(false, Ordering::Relaxed);
        (flood, during.join().unwrap())
    });
    let after = new_connections(
        &topo.client,
        target,
        Duration::from_secs(10),
        Duration::from_millis(500),
        Duration::from_secs(4),
    );
    let survived = chatters.finish().iter().filter(|r| r.is_ok()).count();
    match path {
        Path::Nft => {
            topo.lb
                .exec("nft delete table ip ebnattack && sysctl -qw net.ipv4.ip_forward=0");
        }
        Path::Lb => ebpf_net(&topo.lb, &["down".into(), "lb".into()]),
        Path::XdpLb | Path::XdpLbSmall => ebpf_net(&topo.lb, &["down".into(), "xdp-lb".into()]),
    };
    // the next path starts from empty connection tracking and quiet backends
    for netns in [&topo.client, &topo.lb] {
        netns.exec("conntrack -F >/dev/null 2>&1 || true");
    }
    std::thread::sleep(Duration::from_secs(1));
    Outcome {
        sent: flood.sent,
        flood_secs: flood.elapsed.as_secs_f64(),
        survived,
        during,
        after,
    }
}

pub fn run(report: &mut Report, topo: &Topology) {
    let paths = [Path::Nft, Path::XdpLb, Path::XdpLbSmall, Path::Lb];
    let mut rows = Vec::new();
    for path in paths {
        eprintln!("under attack: {}", path.name());
        let outcome = run_path(topo, path);
        let after_ok = outcome.after.0 * 100 >= outcome.after.1 * 95;
        rows.push(vec![
            path.name().to_string(),
            format!("{} in {:.2} s", outcome.sent, outcome.flood_secs),
            format!("{}/{CHATTERS}", outcome.survived),
            percent(outcome.during),
            percent(outcome.after),
        ]);
        if !matches!(path, Path::Nft) {
            let datapath = if matches!(path, Path::Lb) { "lb" } else { "xdp-lb" };
            report.goal(
                datapath,
                &format!("{}: established connections survive a SYN flood", path.name()),
                format!("{}/{CHATTERS}", outcome.survived),
                Some(outcome.survived == CHATTERS),
            );
            report.goal(
                datapath,
                &format!(
                    "{}: >= 95% of new connections in the 10 s after a SYN flood",
                    path.name()
                ),
                percent(outcome.after),
                Some(after_ok),
            );
        }
    }
    let mut md = String::from("## Under attack\n\n");
    md.push_str(&format!(
        "{FLOOD} spoofed TCP SYNs (random sources in 10.71.0.0/16, random ports; AF_PACKET from the client's namespace, at most {} s) at a service with 3 backends on the load-balancer node, while {CHATTERS} established connections exchange a message every 50 ms. \
         \"during\": a new connection started every 100 ms while the flood runs (4 s each to connect and echo); \"after\": one every 500 ms for the 10 s after it. \
         Each path in turn on the same topology (the services one), conntrack flushed between them; xdp-lb and lb with their defaults (flood detector at 40,000 new flows per second per CPU). \
         nftables is kube-proxy's layout (verdict map, numgen, masquerade).\n\n",
        FLOOD_LIMIT.as_secs()
    ));
    md.push_str(&table(
        &[
            "path",
            "flood sent",
            "established survived",
            "new during",
            "new after (goal >= 95%)",
        ],
        &rows,
    ));
    report.section(md);
}
