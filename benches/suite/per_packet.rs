//! Per-packet cost of every program beside a do-nothing program of the same hook.
//!
//! tc and XDP programs: BPF_PROG_TEST_RUN, many single runs, the kernel's own duration of
//! each, median (a rewriting program cannot be timed with `repeat`: every run after the
//! first would see the rewritten packet). cgroup sock_addr programs cannot be test-run; they
//! are timed through the system calls that run them (a UDP connect(), a sendto()), with the
//! program attached for real, beside a do-nothing program of the same hook.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Instant;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ProgramInput, ProgramMut};

use ebpf_net::control::service::parse_services;
use ebpf_net::datapath::ipv6_hp::{
    load_egress, load_ingress, ProbeAddresses, DEFAULT_GLOBAL, DEFAULT_LINK_LOCAL,
};
use ebpf_net::datapath::lb;
use ebpf_net::datapath::proxy::{load_with_rules, Rule};
use ebpf_net::datapath::xdp_lb::{self, Backend, Options};
use ebpf_net::kernel::skel::monitor::MonitorSkelBuilder;
use ebpf_net::kernel::skel::noop::NoopSkelBuilder;

use crate::chart::{bar_chart, Bar};
use crate::common::bench::{median, test_run_median_ns};
use crate::common::cgroup::TestCgroup;
use crate::common::packets::{l4_frame, L4};
use crate::common::topology::{Daemon, Netns};
use crate::report::{table, Report};
use crate::Settings;

/// A veth pair inside one namespace, 10.1.0.1/24 on one end.
const LINK: &str = "ip link add v0 type veth peer name v1 && ip addr add 10.1.0.1/24 dev v0 && \
                    ip link set v0 up && ip link set v1 up";

/// One measured row: hook, program and path, nanoseconds per round.
struct Row {
    hook: &'static str,
    name: String,
    baseline: bool,
    samples: Vec<f64>,
}

impl Row {
    fn new(hook: &'static str, name: &str) -> Self {
        Self {
            hook,
            name: name.to_string(),
            baseline: false,
            samples: Vec::new(),
        }
    }
}

/// Runs `prog` once on `frame`: the state a timed path needs (a flow, a conntrack entry).
fn run_once(prog: &ProgramMut<'_>, frame: &[u8]) {
    let input = ProgramInput {
        data_in: Some(frame),
        ..Default::default()
    };
    prog.test_run(input).expect("test_run");
}

fn sock(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A program and what it is fed, one frame per run (cycling).
type Case<'a> = (&'static str, &'static str, bool, &'a ProgramMut<'a>, Vec<Vec<u8>>);

/// Times every case in rotated rounds.
fn time_cases(cases: &[Case<'_>], rounds: usize, runs: usize) -> Vec<Row> {
    let mut rows: Vec<Row> = cases
        .iter()
        .map(|(hook, name, baseline, _, _)| Row {
            baseline: *baseline,
            ..Row::new(hook, name)
        })
        .collect();
    for round in 0..rounds {
        for k in 0..cases.len() {
            let i = (k + round) % cases.len();
            let (_, _, _, prog, frames) = &cases[i];
            rows[i].samples.push(test_run_median_ns(prog, frames, runs));
        }
    }
    rows
}

fn tc_rows(settings: &Settings) -> Vec<Row> {
    let netns = Netns::new("bench-pp-tc");
    // lb looks up its source NAT address towards each backend: give them a link
    netns.exec(LINK);
    netns.enter(|| {
        let mut objects: [MaybeUninit<libbpf_rs::OpenObject>; 6] =
            std::array::from_fn(|_| MaybeUninit::uninit());
        let [noop_obj, ingress_obj, egress_obj, monitor_obj, proxy_obj, lb_obj] = &mut objects;
        let noop = NoopSkelBuilder::default().open(noop_obj).unwrap().load().unwrap();
        let addrs = ProbeAddresses {
            link_local: DEFAULT_LINK_LOCAL.parse().unwrap(),
            global: DEFAULT_GLOBAL.parse().unwrap(),
        };
        let flag = ebpf_net::kernel::probe::l4_csum_ipv6_flag();
        let ingress = load_ingress(ingress_obj, &addrs, flag, None).unwrap();
        let egress = load_egress(egress_obj, &addrs, flag, None).unwrap();
        let monitor = MonitorSkelBuilder::default()
            .open(monitor_obj)
            .unwrap()
            .load()
            .unwrap();
        let rule = Rule {
            from: sock("10.96.0.10:80"),
            to: sock("10.1.0.2:8080"),
            origin: String::new(),
        };
        let proxy = load_with_rules(proxy_obj, std::slice::from_ref(&rule)).unwrap();
        let services = parse_services(
            &["10.96.0.20:80=10.1.0.2:8080,10.1.0.3:8080,10.1.0.4:8080".to_string()],
            lb::LIMITS,
        )
        .unwrap();
        let lb = lb::load_with_services(lb_obj, &services, true).unwrap();

        let client = sock("10.0.0.1:40000");
        let probe = l4_frame(
            SocketAddr::new(DEFAULT_LINK_LOCAL.parse().unwrap(), 40000),
            sock("[2001:db8::10]:80"),
            L4::Tcp,
        );
        let probe_reply = l4_frame(
            sock("[2001:db8::10]:80"),
            SocketAddr::new(DEFAULT_GLOBAL.parse().unwrap(), 40000),
            L4::Tcp,
        );
        let other6 = l4_frame(sock("[2001:db8::20]:40000"), sock("[2001:db8::10]:80"), L4::Tcp);
        let other4 = l4_frame(client, sock("10.0.0.2:80"), L4::Tcp);
        let to_proxy = l4_frame(client, rule.from, L4::Tcp);
        let proxy_reply = l4_frame(rule.to, client, L4::Tcp);
        // the proxy's flow exists before its reply is timed
        run_once(&proxy.progs.proxy_egress, &to_proxy);
        let to_vip = l4_frame(client, sock("10.96.0.20:80"), L4::Tcp);
        // a SYN whose conntrack entry lb made on the first run: the lookup finds it
        run_once(&lb.progs.lb_ingress, &to_vip);
        let cases: Vec<Case<'_>> = vec![
            (
                "tc",
                "noop_tc (do nothing)",
                true,
                &noop.progs.noop_tc,
                vec![other4.clone()],
            ),
            (
                "tc",
                "ipv6_hp_ingress: probe rewritten",
                false,
                &ingress.progs.ipv6_hp_ingress,
                vec![probe],
            ),
            (
                "tc",
                "ipv6_hp_egress: reply rewritten",
                false,
                &egress.progs.ipv6_hp_egress,
                vec![probe_reply],
            ),
            (
                "tc",
                "ipv6_hp_ingress: other traffic",
                false,
                &ingress.progs.ipv6_hp_ingress,
                vec![other6],
            ),
            (
                "tc",
                "monitor_ingress: packet counted",
                false,
                &monitor.progs.monitor_ingress,
                vec![other4.clone()],
            ),
            (
                "tc",
                "proxy_egress: request rewritten",
                false,
                &proxy.progs.proxy_egress,
                vec![to_proxy],
            ),
            (
                "tc",
                "proxy_ingress: reply rewritten",
                false,
                &proxy.progs.proxy_ingress,
                vec![proxy_reply],
            ),
            (
                "tc",
                "proxy_egress: other traffic",
                false,
                &proxy.progs.proxy_egress,
                vec![other4.clone()],
            ),
            (
                "tc",
                "lb_ingress: SYN of a tracked flow",
                false,
                &lb.progs.lb_ingress,
                vec![to_vip],
            ),
            (
                "tc",
                "lb_ingress: other traffic",
                false,
                &lb.progs.lb_ingress,
                vec![other4],
            ),
        ];
        let mut rows = time_cases(&cases, settings.rounds, settings.runs);
        // a new flow every run: conntrack allocation, NAT set-up and insertion
        let mut fresh = Row::new("tc", "lb_ingress: SYN of a new flow (conntrack entry made)");
        let runs = settings.runs.min(10_000);
        for round in 0..settings.rounds {
            let frames: Vec<Vec<u8>> = (0..runs)
                .map(|i| {
                    let src = SocketAddr::new(
                        IpAddr::from([10, 2 + round as u8, (i / 250) as u8, (i % 250) as u8 + 1]),
                        30000 + i as u16,
                    );
                    l4_frame(src, sock("10.96.0.20:80"), L4::Tcp)
                })
                .collect();
            fresh
                .samples
                .push(test_run_median_ns(&lb.progs.lb_ingress, &frames, runs));
        }
        rows.push(fresh);
        rows
    })
}

fn xdp_rows(settings: &Settings) -> Vec<Row> {
    let netns = Netns::new("bench-pp-xdp");
    netns.enter(|| {
        let services = parse_services(
            &["10.96.0.10:80=10.1.0.2:8080,10.1.0.3:8080,10.1.0.4:8080".to_string()],
            xdp_lb::LIMITS,
        )
        .unwrap();
        let backend_mac = [2, 0, 0, 0, 0xbb, 1];
        let backends: HashMap<SocketAddr, Backend> = services[0]
            .addrs()
            .iter()
            .map(|b| {
                let backend = Backend {
                    lb_addr: "10.1.0.1".parse().unwrap(),
                    mac: backend_mac,
                };
                (*b, backend)
            })
            .collect();
        let options = Options {
            events: 0,
            max_flows: xdp_lb::DEFAULT_MAX_FLOWS,
            // the detector counts every new flow but never trips: the cost of the normal path
            flood_rate: u32::MAX,
            ports: (1024, 31744),
            seed: Some(1),
        };
        let mut objects: [MaybeUninit<libbpf_rs::OpenObject>; 2] =
            std::array::from_fn(|_| MaybeUninit::uninit());
        let [noop_obj, lb_obj] = &mut objects;
        let noop = NoopSkelBuilder::default().open(noop_obj).unwrap().load().unwrap();
        let skel = xdp_lb::load_with_services(lb_obj, &options, &services, &backends).unwrap();
        let client = sock("10.0.0.1:40000");
        let vip = sock("10.96.0.10:80");
        let request = l4_frame(client, vip, L4::Tcp);
        let prog = xdp_lb::program(&skel);
        run_once(prog, &request);
        let flow = xdp_lb::all_flows(&skel).unwrap().remove(0);
        let reply = l4_frame(flow.backend, SocketAddr::new(flow.lb_addr, flow.lb_port), L4::Tcp);
        let other = l4_frame(client, sock("10.0.0.2:80"), L4::Tcp);
        let cases: Vec<Case<'_>> = vec![
            (
                "XDP",
                "noop_xdp (do nothing, XDP_PASS)",
                true,
                &noop.progs.noop_xdp,
                vec![other.clone()],
            ),
            (
                "XDP",
                "xdp_mac_swap (MACs swapped, XDP_TX)",
                true,
                &noop.progs.xdp_mac_swap,
                vec![request.clone()],
            ),
            (
                "XDP",
                "xdp_lb: client -> backend, known flow",
                false,
                prog,
                vec![request],
            ),
            ("XDP", "xdp_lb: backend -> client", false, prog, vec![reply]),
            ("XDP", "xdp_lb: other traffic", false, prog, vec![other]),
        ];
        let mut rows = time_cases(&cases, settings.rounds, settings.runs);
        // a new flow every run (Maglev pick, source port claim), a fresh table each round
        let mut fresh = Row::new("XDP", "xdp_lb: client -> backend, new flow");
        let frames: Vec<Vec<u8>> = (0..settings.runs)
            .map(|i| {
                let src = SocketAddr::new(
                    IpAddr::from([10, 2, (i / 250) as u8, (i % 250) as u8 + 1]),
                    30000 + (i % 20000) as u16,
                );
                l4_frame(src, vip, L4::Tcp)
            })
            .collect();
        for _ in 0..settings.rounds {
            let mut object = MaybeUninit::uninit();
            let skel = xdp_lb::load_with_services(&mut object, &options, &services, &backends).unwrap();
            fresh
                .samples
                .push(test_run_median_ns(xdp_lb::program(&skel), &frames, settings.runs));
        }
        rows.push(fresh);
        rows
    })
}

/// Mean ns of one system call through the attached cgroup program, over `calls` calls.
fn per_call(calls: usize, mut call: impl FnMut()) -> f64 {
    let began = Instant::now();
    for _ in 0..calls {
        call();
    }
    began.elapsed().as_nanos() as f64 / calls as f64
}

fn cgroup_rows(settings: &Settings, cgroup: &TestCgroup) -> Vec<Row> {
    let netns = Netns::new("bench-pp-cg");
    let vip = sock("10.96.0.10:9");
    // a backend address of this namespace: the translated datagrams stay on loopback
    let backend = sock("10.1.0.2:9");
    // this process is in `cgroup` already (main)
    let mut noop_obj = MaybeUninit::uninit();
    let noop = NoopSkelBuilder::default()
        .open(&mut noop_obj)
        .unwrap()
        .load()
        .unwrap();
    let calls = settings.runs;
    // connect() and sendto() of a UDP socket in this namespace; the VIP has a route only so
    // that the untranslated call works too
    netns.exec(LINK);
    netns.exec("ip addr add 10.1.0.2/24 dev v1 && ip route add 10.96.0.0/16 dev lo");
    let measure = |round_samples: &mut [Vec<f64>; 2]| {
        netns.enter(|| {
            let sink = UdpSocket::bind(backend).unwrap();
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
            let connect = per_call(calls, || socket.connect(vip).unwrap());
            let send = per_call(calls, || {
                let _ = sender.send_to(b"x", vip);
            });
            drop(sink);
            round_samples[0].push(connect);
            round_samples[1].push(send);
        })
    };
    // states: do-nothing programs attached, clusterip attached
    let mut noop_samples: [Vec<f64>; 2] = Default::default();
    let mut cip_samples: [Vec<f64>; 2] = Default::default();
    let cgroup_fd = std::fs::File::open(&cgroup.path).unwrap();
    for round in 0..settings.rounds {
        for state in [round % 2, (round + 1) % 2] {
            if state == 0 {
                let links = [
                    noop.progs
                        .noop_connect4
                        .attach_cgroup(cgroup_fd.as_raw_fd())
                        .unwrap(),
                    noop.progs
                        .noop_sendmsg4
                        .attach_cgroup(cgroup_fd.as_raw_fd())
                        .unwrap(),
                ];
                measure(&mut noop_samples);
                drop(links);
            } else {
                let service = format!("{vip}={backend}");
                let daemon =
                    Daemon::start(&["clusterip", "--cgroup", cgroup.path_str(), "--service", &service]);
                measure(&mut cip_samples);
                drop(daemon);
            }
        }
    }
    let [noop_connect, noop_send] = noop_samples;
    let [cip_connect, cip_send] = cip_samples;
    vec![
        Row {
            hook: "cgroup sock_addr (per call)",
            name: "noop_connect4: UDP connect()".into(),
            baseline: true,
            samples: noop_connect,
        },
        Row {
            hook: "cgroup sock_addr (per call)",
            name: "cip_connect4: UDP connect() to a VIP".into(),
            baseline: false,
            samples: cip_connect,
        },
        Row {
            hook: "cgroup sock_addr (per call)",
            name: "noop_sendmsg4: UDP sendto()".into(),
            baseline: true,
            samples: noop_send,
        },
        Row {
            hook: "cgroup sock_addr (per call)",
            name: "cip_sendmsg4: UDP sendto() a VIP".into(),
            baseline: false,
            samples: cip_send,
        },
    ]
}

/// The do-nothing program a row is compared with: the same hook's; xdp-lb's load-balancing
/// paths against the least an XDP load balancer does.
fn reference(hook: &str, name: &str) -> &'static str {
    match hook {
        "XDP" if name.starts_with("xdp_lb: client") || name.starts_with("xdp_lb: backend") => "xdp_mac_swap",
        "XDP" => "noop_xdp",
        "tc" => "noop_tc",
        _ if name.contains("connect") => "noop_connect4",
        _ => "noop_sendmsg4",
    }
}

pub fn run(report: &mut Report, settings: &Settings, cgroup: &TestCgroup) {
    let mut rows = tc_rows(settings);
    rows.extend(xdp_rows(settings));
    rows.extend(cgroup_rows(settings, cgroup));

    let mut md = format!(
        "## Per-packet cost of every program\n\nBPF_PROG_TEST_RUN for tc and XDP programs: median of {} rounds, each the median of {} single runs timed by the kernel (a single timed run costs about 80 ns however little the program does). cgroup sock_addr programs cannot be test-run: they are timed as the system call that runs them (UDP `connect()`, `sendto()`), attached for real, against a do-nothing program on the same hooks; that number includes the system call. Ratios are to the do-nothing program of the same hook.\n\n",
        settings.rounds, settings.runs
    );
    let mut table_rows = Vec::new();
    let mut bars = Vec::new();
    let ns_of = |prefix: &str| {
        let row = rows.iter().find(|row| row.name.starts_with(prefix)).unwrap();
        median(row.samples.clone())
    };
    let mut worst_xdp: f64 = 0.0;
    for row in &rows {
        let ns = median(row.samples.clone());
        let reference = reference(row.hook, &row.name);
        let ratio = ns / ns_of(reference);
        if row.name.starts_with("xdp_lb: client -> backend, known") || row.name.starts_with("xdp_lb: backend")
        {
            worst_xdp = worst_xdp.max(ratio);
        }
        table_rows.push(vec![
            row.hook.to_string(),
            row.name.clone(),
            format!("{ns:.0}"),
            format!("{ratio:.2}x {reference}"),
        ]);
        bars.push(Bar {
            group: row.hook.to_string(),
            label: row.name.clone(),
            value: ns,
            baseline: row.baseline,
        });
    }
    md.push_str(&table(&["hook", "program: path", "ns", "vs"], &table_rows));
    report.section(md + "\n");
    report.chart(
        "per-packet.svg",
        "Per-packet cost per program",
        bar_chart(
            "Per-packet (per-call) cost of each program, ns; grey: do-nothing baselines",
            "nanoseconds (median)",
            &bars,
        ),
    );
    report.goal(
        "xdp-lb",
        "full path within 2x of a MAC-swap XDP_TX program",
        format!("worst of client->backend and backend->client: {worst_xdp:.2}x"),
        Some(worst_xdp <= 2.0),
    );
}
