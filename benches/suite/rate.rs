//! Packet rate on one core, each load balancer on its real hook, beside the physical limit.
//!
//! Frames come from `rate_source` (bpf/noop.c) run through BPF_PROG_RUN's live-frame mode
//! (Linux 5.18) with the client's veth as its interface: each frame it sends (XDP_TX) crosses
//! to the load balancer's veth, whose XDP program runs in its driver (native mode), as frames
//! from a NIC would. XDP paths send the frame back out (XDP_TX) to the client's veth, where
//! `rate_sink` counts and drops it; the tc and nftables paths pass it to the stack, which
//! forwards it to a backend veth, where `rate_sink` counts it again. The rate is what the sink
//! counted per second of the run, with the whole run pinned to one CPU: veth runs the
//! receiving NAPI on the CPU that sent, so source, load balancer and sink share that core,
//! the same for every path. The limit is a MAC-swap XDP_TX program on the same veth.
//!
//! Every frame is 64 bytes, IPv4 UDP (no UDP checksum, so a new-flow frame needs no L4
//! fix-up). Second passes with `kernel.bpf_stats_enabled` (BPF_ENABLE_STATS), as many rounds
//! as the first, read `run_time_ns / run_cnt` of every program that ran: per-program cost on
//! its real hook under that traffic, beside the do-nothing programs of the same hooks.

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::Program;

use ebpf_net::kernel::addr::Interface;
use ebpf_net::kernel::attach::{prepare_tcx, TcDirection, TcxAttachment, XdpAttachment, XdpMode};
use ebpf_net::kernel::skel::noop::{NoopSkel, NoopSkelBuilder};

use crate::chart::{bar_chart, Bar};
use crate::common::bench::{median, paired_ratio, prog_info, RunTimeStats};
use crate::common::topology::{veth, Netns};
use crate::report::{table, Report};
use crate::Settings;

const FRAME_LEN: usize = 64;
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0x80, 2];
const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0x80, 1];
const LB_BACK_MAC: [u8; 6] = [2, 0, 0, 0, 0x81, 1];
const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 0x81, 2];
/// xdp-lb's backends: one arm, on the client's link (its frames land in the client's sink)
const ARM_BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 0x80, 3];
/// each backend gives xdp-lb's full NAT 31,744 source ports: enough for NEW_FLOWS new flows
const ARM_BACKENDS: u8 = 16;
/// new flows a run makes: within xdp-lb's 262,144 flow slots (a full table refuses new flows
/// rather than evict live ones: that is the flood section's business, not this one's)
const NEW_FLOWS: u32 = 200_000;
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 80, 0, 2), 40000);
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 80, 1), 80);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 81, 0, 2), 8080);
fn arm_backend(i: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 80, 1, 1 + i), 8080)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A 64-byte IPv4 UDP frame, IP header checksum set, UDP checksum 0 (none).
fn udp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: SocketAddrV4, dst: SocketAddrV4) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((FRAME_LEN - 14) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f[34..36].copy_from_slice(&src.port().to_be_bytes());
    f[36..38].copy_from_slice(&dst.port().to_be_bytes());
    f[38..40].copy_from_slice(&((FRAME_LEN - 34) as u16).to_be_bytes());
    f
}

/// Runs `prog` in live-frame mode `frames` times on interface `ifindex` of this thread's
/// namespace; the wall time of the call.
fn live_run(prog: &Program<'_>, ifindex: u32, frame: &[u8], frames: u32) -> Duration {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let mut ctx = [0u32; 6];
    ctx[1] = frame.len() as u32;
    ctx[3] = ifindex;
    // SAFETY: zeroed options, then the fields libbpf reads; the buffers outlive the call.
    let mut opts: libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of_val(&opts) as _;
    opts.data_in = frame.as_ptr().cast();
    opts.data_size_in = frame.len() as u32;
    opts.ctx_in = ctx.as_ptr().cast();
    opts.ctx_size_in = std::mem::size_of_val(&ctx) as u32;
    opts.repeat = frames as i32;
    opts.flags = libbpf_sys::BPF_F_TEST_XDP_LIVE_FRAMES;
    opts.batch_size = 64;
    let began = Instant::now();
    let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(prog.as_fd().as_raw_fd(), &mut opts) };
    let took = began.elapsed();
    assert_eq!(rc, 0, "live-frame run: {}", std::io::Error::last_os_error());
    took
}

/// run_time_ns and run_cnt of every loaded program, by id, with its name.
fn prog_stats() -> BTreeMap<u32, (String, u64, u64)> {
    let mut all = BTreeMap::new();
    let mut id = 0u32;
    // SAFETY: the libbpf calls get the next id and an fd we then own.
    while unsafe { libbpf_sys::bpf_prog_get_next_id(id, &mut id) } == 0 {
        let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
        if fd < 0 {
            continue;
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let info = prog_info(fd.as_fd());
        let name: String = info
            .name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8 as char)
            .collect();
        all.insert(id, (name, info.run_time_ns, info.run_cnt));
    }
    all
}

/// The programs we care about, by name: each path's and the do-nothing ones.
const PROGRAMS: [&str; 7] = [
    "rate_source",
    "rate_sink",
    "xdp_mac_swap",
    "noop_xdp",
    "noop_tc",
    "xdp_lb",
    "lb_ingress",
];

/// Per program name: (run_time_ns, run_cnt) gained between two snapshots.
fn stats_delta(
    before: &BTreeMap<u32, (String, u64, u64)>,
    after: &BTreeMap<u32, (String, u64, u64)>,
) -> RunStats {
    let mut gained = RunStats::new();
    for (id, (name, ns, cnt)) in after {
        if !PROGRAMS.contains(&name.as_str()) {
            continue;
        }
        let (ns0, cnt0) = before.get(id).map_or((0, 0), |(_, ns, cnt)| (*ns, *cnt));
        if cnt > &cnt0 {
            let entry = gained.entry(name.clone()).or_default();
            entry.0 += ns - ns0;
            entry.1 += cnt - cnt0;
        }
    }
    gained
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Path {
    MacSwap,
    XdpLbKnown,
    XdpLbNew,
    XdpLbReply,
    Direct,
    Lb,
    Nft,
}

impl Path {
    const ALL: [Path; 7] = [
        Path::MacSwap,
        Path::XdpLbKnown,
        Path::XdpLbReply,
        Path::XdpLbNew,
        Path::Direct,
        Path::Lb,
        Path::Nft,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::MacSwap => "MAC-swap XDP_TX (the limit)",
            Path::XdpLbKnown => "xdp-lb, known flow",
            Path::XdpLbNew => "xdp-lb, a new flow every frame",
            Path::XdpLbReply => "xdp-lb, backend reply",
            Path::Direct => "XDP_PASS + forwarding, no NAT (direct)",
            Path::Lb => "lb (tc + conntrack NAT)",
            Path::Nft => "nftables DNAT + masquerade",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Path::MacSwap => "mac-swap",
            Path::XdpLbKnown => "xdp-lb-known",
            Path::XdpLbNew => "xdp-lb-new",
            Path::XdpLbReply => "xdp-lb-reply",
            Path::Direct => "direct",
            Path::Lb => "lb",
            Path::Nft => "nft",
        }
    }

    /// What is set up on the load balancer for this path.
    fn group(self) -> Group {
        match self {
            Path::MacSwap => Group::MacSwap,
            Path::XdpLbKnown | Path::XdpLbNew | Path::XdpLbReply => Group::XdpLb,
            Path::Direct => Group::Direct,
            Path::Lb => Group::Lb,
            Path::Nft => Group::Nft,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Group {
    MacSwap,
    XdpLb,
    Direct,
    Lb,
    Nft,
}

const GROUPS: [Group; 5] = [Group::MacSwap, Group::XdpLb, Group::Direct, Group::Lb, Group::Nft];

struct Lab {
    client: Netns,
    lb: Netns,
    backend: Netns,
    client_if: u32,
}

fn lab() -> Lab {
    let client = Netns::new("rate-c");
    let lb = Netns::new("rate-lb");
    let backend = Netns::new("rate-b");
    veth(&client, "cl0", &lb, "lb0");
    veth(&lb, "lb1", &backend, "be0");
    client.exec(&format!(
        "ip link set cl0 address {} && ip addr add 10.80.0.2/16 dev cl0",
        mac_text(CLIENT_MAC)
    ));
    // the backend's sink drops ARP too: its neighbour, the load balancer, is written down
    backend.exec(&format!(
        "ip link set be0 address {} && ip addr add 10.81.0.2/24 dev be0 && \
         ip neigh replace 10.81.0.1 lladdr {} dev be0 nud permanent",
        mac_text(BACKEND_MAC),
        mac_text(LB_BACK_MAC)
    ));
    lb.exec(&format!(
        "ip link set lb0 address {} && ip link set lb1 address {} && \
         ip addr add 10.80.0.1/16 dev lb0 && ip addr add 10.81.0.1/24 dev lb1 && \
         ip neigh replace 10.80.0.2 lladdr {} dev lb0 nud permanent && \
         ip neigh replace 10.81.0.2 lladdr {} dev lb1 nud permanent && \
         sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.lb0.rp_filter=0",
        mac_text(LB_MAC),
        mac_text(LB_BACK_MAC),
        mac_text(CLIENT_MAC),
        mac_text(BACKEND_MAC)
    ));
    client.move_this_thread();
    let client_if = Interface::by_name("cl0").unwrap().index;
    Lab {
        client,
        lb,
        backend,
        client_if,
    }
}

/// What a group attached; dropped (or taken down) when the group is done.
#[derive(Default)]
struct Setup {
    xdp: Option<XdpAttachment>,
    tc: Option<TcxAttachment>,
    daemon: Option<&'static str>,
    nft: bool,
}

fn setup(lab: &Lab, skel: &NoopSkel<'_>, group: Group) -> Setup {
    let mut done = Setup::default();
    lab.lb.move_this_thread();
    let lb0 = Interface::by_name("lb0").unwrap();
    match group {
        Group::MacSwap => {
            done.xdp = Some(XdpAttachment::attach(&skel.progs.xdp_mac_swap, &lb0, XdpMode::Native).unwrap());
        }
        Group::XdpLb => {
            let backends: Vec<String> = (0..ARM_BACKENDS)
                .map(|i| format!("{}@{}", arm_backend(i), mac_text(ARM_BACKEND_MAC)))
                .collect();
            let service = format!("{VIP}={}", backends.join(","));
            let out = lab.lb.ebpf_net(&[
                "xdp-lb",
                "-i",
                "lb0",
                "--mode",
                "native",
                "--flood-rate",
                "0",
                "--service",
                &service,
                "--persist",
            ]);
            assert!(
                out.status.success(),
                "xdp-lb: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            done.daemon = Some("xdp-lb");
        }
        Group::Direct | Group::Lb | Group::Nft => {
            done.xdp = Some(XdpAttachment::attach(&skel.progs.noop_xdp, &lb0, XdpMode::Native).unwrap());
            match group {
                Group::Direct => {
                    done.tc =
                        Some(TcxAttachment::attach(&skel.progs.noop_tc, &lb0, TcDirection::Ingress).unwrap());
                }
                Group::Lb => {
                    let service = format!("udp:{VIP}={BACKEND}");
                    let out = lab
                        .lb
                        .ebpf_net(&["lb", "-i", "lb0", "--service", &service, "--persist"]);
                    assert!(
                        out.status.success(),
                        "lb: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    done.daemon = Some("lb");
                }
                _ => {
                    crate::common::bench::load_rules(&lab.lb, "nft", &nft_rules());
                    done.nft = true;
                }
            }
        }
    }
    lab.client.move_this_thread();
    done
}

fn teardown(lab: &Lab, setup: Setup) {
    drop(setup.xdp);
    drop(setup.tc);
    if let Some(datapath) = setup.daemon {
        let out = lab.lb.ebpf_net(&["down", datapath]);
        assert!(
            out.status.success(),
            "down {datapath}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if setup.nft {
        lab.lb
            .exec("nft delete table ip rate && conntrack -F 2>/dev/null || true");
    }
}

/// kube-proxy's nftables layout for the one UDP service (see paths.rs for TCP).
fn nft_rules() -> String {
    format!(
        "table ip rate {{\n chain sep {{\n  meta l4proto udp dnat to {BACKEND}\n }}\n \
         chain svc {{\n  numgen random mod 1 vmap {{ 0 : goto sep }}\n }}\n \
         map services {{\n  type ipv4_addr . inet_proto . inet_service : verdict\n  elements = {{ {} . udp . {} : goto svc }}\n }}\n \
         chain prerouting {{\n  type nat hook prerouting priority dstnat; policy accept;\n  ip daddr . meta l4proto . th dport vmap @services\n }}\n \
         chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n  ct status dnat masquerade\n }}\n}}\n",
        VIP.ip(),
        VIP.port()
    )
}

fn sink_frames(skel: &NoopSkel<'_>) -> u64 {
    let bss = skel.maps.bss_data.as_deref().unwrap();
    // SAFETY: the kernel writes this counter while we read it
    unsafe { std::ptr::read_volatile(&bss.rate_sink_frames) }
}

/// The frame a path's source sends; for replies, written from the last frame xdp-lb sent
/// towards the backend (its source address and port are the flow's on the backend leg).
fn frame_of(path: Path, skel: &mut NoopSkel<'_>, lab: &Lab) -> [u8; FRAME_LEN] {
    match path {
        Path::MacSwap | Path::XdpLbKnown | Path::XdpLbNew | Path::Lb | Path::Nft => {
            udp_frame(LB_MAC, CLIENT_MAC, CLIENT, VIP)
        }
        Path::Direct => udp_frame(LB_MAC, CLIENT_MAC, CLIENT, BACKEND),
        Path::XdpLbReply => {
            // one frame of the known flow, kept by the sink
            let known = udp_frame(LB_MAC, CLIENT_MAC, CLIENT, VIP);
            set_source(skel, &known, false);
            skel.maps.bss_data.as_deref_mut().unwrap().rate_sink_keep = 1;
            live_run(&skel.progs.rate_source, lab.client_if, &known, 1);
            std::thread::sleep(Duration::from_millis(20));
            let bss = skel.maps.bss_data.as_deref_mut().unwrap();
            bss.rate_sink_keep = 0;
            // SAFETY: the sink wrote it before the frame counter moved; nothing writes it now
            let sent = unsafe { std::ptr::read_volatile(&bss.rate_sink_last) };
            let node = SocketAddrV4::new(
                Ipv4Addr::new(sent[26], sent[27], sent[28], sent[29]),
                u16::from_be_bytes([sent[34], sent[35]]),
            );
            let to = SocketAddrV4::new(
                Ipv4Addr::new(sent[30], sent[31], sent[32], sent[33]),
                u16::from_be_bytes([sent[36], sent[37]]),
            );
            assert!(
                (0..ARM_BACKENDS).any(|i| arm_backend(i) == to),
                "xdp-lb's frame towards its backend: {sent:?}"
            );
            udp_frame(LB_MAC, ARM_BACKEND_MAC, to, node)
        }
    }
}

/// The backend answers the flow once, from a socket of its own, as a UDP service does: the
/// flow is then one conntrack has seen both ways (lb sends such a flow's datagrams on itself,
/// past the stack; nftables' NAT is the same either way). Source NAT kept the client's port.
fn answer(lab: &Lab) {
    let node = SocketAddrV4::new(Ipv4Addr::new(10, 81, 0, 1), CLIENT.port());
    lab.backend.enter(|| {
        let socket = std::net::UdpSocket::bind(BACKEND).expect("the backend's socket");
        socket.send_to(b"reply", node).expect("the backend's reply");
    });
    std::thread::sleep(Duration::from_millis(20));
    let entry = lab.lb.exec(&format!(
        "conntrack -L -p udp --orig-dst {} 2>/dev/null",
        VIP.ip()
    ));
    assert!(
        entry.contains("dport=") && !entry.contains("UNREPLIED"),
        "the backend's answer did not reach the flow's entry: {entry}"
    );
}

fn set_source(skel: &mut NoopSkel<'_>, frame: &[u8; FRAME_LEN], new_flows: bool) {
    let bss = skel.maps.bss_data.as_deref_mut().unwrap();
    bss.rate_frame = *frame;
    bss.rate_new_flows = u32::from(new_flows);
}

/// One measured run: frames the sink got per second.
fn measure(skel: &mut NoopSkel<'_>, lab: &Lab, path: Path, frames: u32) -> (f64, f64) {
    let frame = frame_of(path, skel, lab);
    set_source(skel, &frame, path == Path::XdpLbNew);
    let frames = if path == Path::XdpLbNew {
        frames.min(NEW_FLOWS)
    } else {
        frames
    };
    // a first frame makes the flow (and its conntrack entry) known
    live_run(&skel.progs.rate_source, lab.client_if, &frame, 1000);
    std::thread::sleep(Duration::from_millis(20));
    if matches!(path, Path::Lb | Path::Nft) {
        answer(lab);
    }
    let before = sink_frames(skel);
    let took = live_run(&skel.progs.rate_source, lab.client_if, &frame, frames);
    std::thread::sleep(Duration::from_millis(20));
    let got = sink_frames(skel) - before;
    let secs = took.as_secs_f64();
    (got as f64 / secs / 1e6, got as f64 / f64::from(frames))
}

/// `EBPF_NET_RATE_ONLY=xdp-lb-known,lb` (paths: mac-swap, xdp-lb-known, xdp-lb-reply,
/// xdp-lb-new, direct, lb, nft): only those paths, their rates and bpf_stats printed, no report
/// written (for a profiler run beside it, or two builds compared; `EBPF_NET_RATE_ROUNDS=N`).
fn chosen_paths() -> Vec<Path> {
    let Ok(only) = std::env::var("EBPF_NET_RATE_ONLY") else {
        return Path::ALL.to_vec();
    };
    let chosen: Vec<Path> = Path::ALL
        .into_iter()
        .filter(|p| only.split(',').any(|name| name == p.short()))
        .collect();
    assert!(
        !chosen.is_empty(),
        "EBPF_NET_RATE_ONLY={only}: none of {}",
        Path::ALL.map(Path::short).join(", ")
    );
    chosen
}

pub fn run(report: &mut Report, settings: &Settings) {
    // a thread of its own: it moves between namespaces and pins itself to a CPU
    let section = std::thread::scope(|scope| scope.spawn(|| measure_all(settings)).join().unwrap());
    if std::env::var_os("EBPF_NET_RATE_ONLY").is_some() {
        for (path, rounds) in &section.stats {
            for round in rounds {
                for (prog, (ns, cnt)) in round {
                    eprintln!("rate: {}: {prog} {:.1} ns", path.name(), *ns as f64 / *cnt as f64);
                }
            }
        }
        return;
    }
    write_report(report, &section);
}

/// program -> (run_time_ns, run_cnt) gained in one run
type RunStats = BTreeMap<String, (u64, u64)>;

struct Measured {
    frames: u32,
    cpu: usize,
    mpps: BTreeMap<Path, Vec<f64>>,
    delivered: BTreeMap<Path, Vec<f64>>,
    /// per path, per round
    stats: BTreeMap<Path, Vec<RunStats>>,
}

fn measure_all(settings: &Settings) -> Measured {
    let frames: u32 = if settings.rate_rounds >= 5 {
        2_000_000
    } else {
        200_000
    };
    // EBPF_NET_RATE_ROUNDS: more rounds for a comparison of two builds (with EBPF_NET_RATE_ONLY)
    let rounds = std::env::var("EBPF_NET_RATE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(settings.rate_rounds)
        .max(2);
    // the last CPU: the first takes most of the machine's interrupts
    let cpu = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
    // the run, and the NAPI work it triggers, stay on it
    crate::common::pin_this_thread(cpu);
    let lab = lab();
    let mut object = MaybeUninit::uninit();
    let mut open = NoopSkelBuilder::default()
        .open(&mut object)
        .expect("opening noop");
    prepare_tcx(&mut open.progs.noop_tc, TcDirection::Ingress);
    let mut skel = open.load().expect("loading noop");
    // the sinks, in the drivers of the client's and the backend's veths (their NAPI also
    // makes XDP_TX towards them arrive)
    lab.backend.move_this_thread();
    let be0 = Interface::by_name("be0").unwrap();
    let backend_sink = XdpAttachment::attach(&skel.progs.rate_sink, &be0, XdpMode::Native).unwrap();
    lab.client.move_this_thread();
    let cl0 = Interface::by_name("cl0").unwrap();
    let client_sink = XdpAttachment::attach(&skel.progs.rate_sink, &cl0, XdpMode::Native).unwrap();

    let paths = chosen_paths();
    let groups: Vec<Group> = GROUPS
        .into_iter()
        .filter(|g| paths.iter().any(|p| p.group() == *g))
        .collect();
    let mut mpps: BTreeMap<Path, Vec<f64>> = BTreeMap::new();
    let mut delivered: BTreeMap<Path, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for k in 0..groups.len() {
            let group = groups[(k + round) % groups.len()];
            let done = setup(&lab, &skel, group);
            for path in paths.iter().copied().filter(|p| p.group() == group) {
                let (rate, share) = measure(&mut skel, &lab, path, frames);
                eprintln!(
                    "rate: {}: {rate:.2} Mpps, {:.1}% arrived",
                    path.name(),
                    share * 100.0
                );
                mpps.entry(path).or_default().push(rate);
                delivered.entry(path).or_default().push(share);
            }
            teardown(&lab, done);
        }
    }
    // bpf_stats: the rounds again, statistics on; a round's programs are compared with each
    // other (this machine's speed drifts between rounds)
    let mut stats: BTreeMap<Path, Vec<_>> = BTreeMap::new();
    {
        let _on = RunTimeStats::enable();
        for round in 0..rounds {
            for k in 0..groups.len() {
                let group = groups[(k + round) % groups.len()];
                let done = setup(&lab, &skel, group);
                for path in paths.iter().copied().filter(|p| p.group() == group) {
                    let before = prog_stats();
                    measure(&mut skel, &lab, path, frames / 2);
                    stats
                        .entry(path)
                        .or_default()
                        .push(stats_delta(&before, &prog_stats()));
                }
                teardown(&lab, done);
            }
        }
    }
    drop(client_sink);
    drop(backend_sink);
    drop(lab);
    Measured {
        frames,
        cpu,
        mpps,
        delivered,
        stats,
    }
}

fn write_report(report: &mut Report, m: &Measured) {
    let rate = |path: Path| median(m.mpps[&path].clone());
    // each round measured every path once: ratios within a round, their median
    let paired = |path: Path, reference: Path| paired_ratio(&m.mpps[&path], &m.mpps[&reference]);
    let limit = rate(Path::MacSwap);
    let nft = rate(Path::Nft);
    let mut md = format!(
        "## Packet rate on one core\n\nFrames injected with BPF_PROG_RUN's live-frame mode (`rate_source` in bpf/noop.c) on a client veth; the load balancer's veth runs each path's XDP program in its driver (native), tc programs and nftables behind an XDP_PASS; frames XDP_TX'd back or forwarded to a backend veth are counted and dropped by `rate_sink`. Everything on CPU {} (veth runs the receiving NAPI on the sending CPU), 64-byte IPv4 UDP frames, {} frames a run, median of {} rounds, paths rotated; ratios are paired per round (each round's rate over the reference's in the same round), their median. Mpps is what the sink received per second; the limit is a MAC-swap XDP_TX program on the same veth. xdp-lb runs with `--flood-rate 0` (its new-flow guard off) and 262,144 flow slots: a new flow every frame fills them and then evicts. For lb and nftables the backend answers the flow once before the run (a UDP service's reply): conntrack has seen it both ways, and lb sends its datagrams to the backend itself, past the stack (nftables' path is the same either way).\n\n",
        m.cpu,
        m.frames,
        m.mpps[&Path::MacSwap].len()
    );
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    for path in Path::ALL {
        let r = rate(path);
        let share = median(m.delivered[&path].clone());
        rows.push(vec![
            path.name().to_string(),
            format!("{r:.2}"),
            format!("{:.2}x", paired(path, Path::MacSwap)),
            format!("{:.2}x", paired(path, Path::Nft)),
            format!("{:.1}%", share * 100.0),
        ]);
        bars.push(Bar {
            group: if path.group() == Group::MacSwap || path.group() == Group::XdpLb {
                "XDP_TX".into()
            } else {
                "to a backend".into()
            },
            label: path.name().to_string(),
            value: r,
            baseline: matches!(path, Path::MacSwap | Path::Direct),
        });
    }
    md.push_str(&table(
        &["path", "Mpps", "vs limit", "vs nftables", "frames arrived"],
        &rows,
    ));
    md.push_str(&format!("\n### Per-program cost under that traffic (bpf_stats)\n\n`kernel.bpf_stats_enabled` on (BPF_ENABLE_STATS) for {} more rounds of every path, rotated as above: `run_time_ns / run_cnt` of each program that ran, on its real hook, the median over rounds; ratios paired per round, their median. `rate_source` and `rate_sink` are the harness; noop_xdp and noop_tc are the do-nothing programs of the XDP and tc hooks, xdp_mac_swap the least an XDP load balancer does.\n\n", m.mpps[&Path::MacSwap].len()));
    let mut stat_rows = Vec::new();
    // ns per run of `prog` on `path`, each round
    let per_round = |path: Path, prog: &str| -> Vec<f64> {
        m.stats.get(&path).map_or(Vec::new(), |rounds| {
            rounds
                .iter()
                .filter_map(|round| round.get(prog))
                .map(|(ns, cnt)| *ns as f64 / *cnt as f64)
                .collect()
        })
    };
    let per = |path: Path, prog: &str| -> Option<f64> {
        let each = per_round(path, prog);
        (!each.is_empty()).then(|| median(each))
    };
    let swap = per_round(Path::MacSwap, "xdp_mac_swap");
    let swap_ns = per(Path::MacSwap, "xdp_mac_swap").unwrap_or(f64::NAN);
    let versus = |path: Path, prog: &str| -> Option<f64> {
        let each = per_round(path, prog);
        (!each.is_empty() && each.len() == swap.len()).then(|| paired_ratio(&each, &swap))
    };
    for path in Path::ALL {
        let programs: std::collections::BTreeSet<&String> =
            m.stats[&path].iter().flat_map(|r| r.keys()).collect();
        for prog in programs {
            let runs: u64 = m.stats[&path]
                .iter()
                .filter_map(|r| r.get(prog))
                .map(|(_, cnt)| cnt)
                .sum();
            let each = per(path, prog).unwrap_or(f64::NAN);
            let vs = match prog.as_str() {
                "xdp_lb" => versus(path, prog).map_or(String::new(), |r| format!("{r:.2}x xdp_mac_swap")),
                "lb_ingress" => {
                    let tc = per_round(Path::Direct, "noop_tc");
                    let lb = per_round(path, prog);
                    if tc.len() == lb.len() && !tc.is_empty() {
                        format!("{:.2}x noop_tc", paired_ratio(&lb, &tc))
                    } else {
                        String::new()
                    }
                }
                _ => String::new(),
            };
            stat_rows.push(vec![
                path.name().to_string(),
                prog.clone(),
                runs.to_string(),
                format!("{each:.1}"),
                vs,
            ]);
        }
    }
    md.push_str(&table(
        &["path", "program", "runs", "ns per run", "vs"],
        &stat_rows,
    ));
    report.section(md + "\n");
    report.chart(
        "rate.svg",
        "Packet rate per path, Mpps on one core",
        bar_chart(
            "Packet rate on one core, Mpps (64-byte UDP); grey: the limit and the direct path",
            "Mpps (median)",
            &bars,
        ),
    );
    let known = rate(Path::XdpLbKnown);
    let (to_limit, to_nft) = (
        paired(Path::XdpLbKnown, Path::MacSwap),
        paired(Path::XdpLbKnown, Path::Nft),
    );
    report.goal(
        "xdp-lb",
        "known flow at >= 0.5x the MAC-swap XDP_TX rate",
        format!("{to_limit:.2}x ({known:.2} vs {limit:.2} Mpps)"),
        Some(to_limit >= 0.5),
    );
    report.goal(
        "xdp-lb",
        "known flow at >= 3x nftables DNAT",
        format!("{to_nft:.2}x ({known:.2} vs {nft:.2} Mpps)"),
        Some(to_nft >= 3.0),
    );
    let (worst_path, worst) = [Path::XdpLbKnown, Path::XdpLbReply]
        .into_iter()
        .filter_map(|p| versus(p, "xdp_lb").map(|r| (p, r)))
        .fold((Path::XdpLbKnown, f64::NAN), |(wp, w), (p, r)| {
            if w.is_nan() || r > w {
                (p, r)
            } else {
                (wp, w)
            }
        });
    report.goal(
        "xdp-lb",
        "per packet <= 2x MAC swap by bpf_stats (known flow, reply)",
        format!(
            "{worst:.2}x, {} (median {:.1} vs {swap_ns:.1} ns)",
            worst_path.name(),
            per(worst_path, "xdp_lb").unwrap_or(f64::NAN)
        ),
        Some(worst <= 2.0),
    );
    let lb = rate(Path::Lb);
    let lb_to_nft = paired(Path::Lb, Path::Nft);
    report.goal(
        "lb",
        "packet rate at or above nftables DNAT",
        format!("{lb_to_nft:.2}x ({lb:.2} vs {nft:.2} Mpps)"),
        Some(lb_to_nft >= 1.0),
    );
}
