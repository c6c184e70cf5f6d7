//! `ebpf-net monitor`: a live per-flow view of an interface (like iftop), counted by tc
//! programs into a per-CPU LRU flow table and printed every interval.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde_json::json;

use crate::control::config::{Item, MonitorSection, RunOptions, Sources};
use crate::control::lifecycle::{Applied, Datapath, Report, Storage, Target};
use crate::control::metrics;
use crate::control::run::{self, Shutdown};
use crate::kernel::addr::ip_from_words;
use crate::kernel::attach::{Directions, TcDirection};
use crate::kernel::maps;
use crate::kernel::pin::{MapPin, PinDir, PinSet};
use crate::kernel::skel::monitor::types::{flow_counters, flow_key};
use crate::kernel::skel::monitor::{MonitorSkel, MonitorSkelBuilder};

pub const SUBCOMMAND: &str = "monitor";
pub const PROGRAMS: &[&str] = &["monitor_ingress", "monitor_egress"];
/// Rows of the text table; --json always has every flow.
const TOP_ROWS: usize = 25;

// SAFETY: plain C structs of integers from include/monitor.h.
unsafe impl plain::Plain for flow_key {}
unsafe impl plain::Plain for flow_counters {}

#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    /// interface to watch
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub iface: Option<String>,
    /// which side of the interface to count [default: both]
    #[arg(long, value_enum)]
    pub direction: Option<Directions>,
    /// seconds between reports, fractions allowed [default: 1]
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    pub interval: Option<f64>,
    /// exit after this many reports
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// one JSON object per report instead of a table
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub run: RunOptions,
}

crate::run_args!(MonitorArgs, foreground);

/// What flags and config file say together.
pub struct Settings {
    iface: Item,
    direction: Directions,
    interval: f64,
}

impl Settings {
    fn read(args: &MonitorArgs) -> Result<Self> {
        let file = Sources::<MonitorSection>::read(&args.run)?;
        let iface = file.interface(args.iface.as_ref())?;
        let interval = match (args.interval, file.section().and_then(|s| s.interval.as_ref())) {
            (Some(secs), _) => secs,
            (None, Some(secs)) => parse_interval(&secs.get_ref().to_string()).map_err(|problem| {
                let config = file.config.as_ref().expect("a section comes from a file");
                anyhow::anyhow!("{}: interval {problem}", config.at(secs.span()))
            })?,
            (None, None) => 1.0,
        };
        Ok(Self {
            iface,
            direction: file.value(args.direction, |s| s.direction, Directions::Both),
            interval,
        })
    }
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.05..=86400.0).contains(&secs) => Ok(secs),
        _ => Err("must be a number of seconds between 0.05 and 86400".into()),
    }
}

/// A flow decoded from the kernel's key, as shown to users.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Flow {
    pub direction: &'static str,
    pub proto: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl Flow {
    fn from_key(key: &flow_key) -> Self {
        Self {
            direction: if key.direction == 0 { "ingress" } else { "egress" },
            proto: key.proto,
            src: ip_from_words(key.family, key.src),
            sport: key.sport,
            dst: ip_from_words(key.family, key.dst),
            dport: key.dport,
        }
    }

    pub fn proto_name(&self) -> String {
        match self.proto {
            1 => "icmp".into(),
            6 => "tcp".into(),
            17 => "udp".into(),
            58 => "icmpv6".into(),
            other => format!("ip-{other}"),
        }
    }

    fn has_ports(&self) -> bool {
        matches!(self.proto, 6 | 17)
    }

    fn endpoint(&self, addr: IpAddr, port: u16) -> String {
        match (addr, self.has_ports()) {
            (IpAddr::V6(v6), true) => format!("[{v6}]:{port}"),
            (addr, true) => format!("{addr}:{port}"),
            (addr, false) => addr.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Reads the whole flow table, summing each flow's per-CPU counters.
pub fn read_flows(map: &impl MapCore) -> Result<HashMap<Flow, Counters>> {
    let mut flows = HashMap::new();
    for key_bytes in map.keys() {
        let Some(per_cpu) = map
            .lookup_percpu(&key_bytes, MapFlags::ANY)
            .context("reading a flow")?
        else {
            continue; // evicted between listing and reading
        };
        let key: flow_key = maps::from_bytes("flow key", &key_bytes)?;
        let mut sum = Counters::default();
        for cpu in per_cpu {
            let value: flow_counters = maps::from_bytes("flow counters", &cpu)?;
            sum.packets += value.packets;
            sum.bytes += value.bytes;
        }
        flows.insert(Flow::from_key(&key), sum);
    }
    Ok(flows)
}

/// The monitor datapath on the lifecycle: foreground only, several may watch one interface.
pub struct Monitor;

/// What a monitor run prints, and how often.
pub struct Desired {
    settings: Settings,
    json: bool,
    count: Option<u64>,
}

/// How a run prints.
pub struct Printing {
    iface: String,
    direction: Directions,
    interval: f64,
    json: bool,
    count: Option<u64>,
}

/// The loaded programs, and the interval a reload may change.
pub struct Loaded<'obj> {
    skel: MonitorSkel<'obj>,
    iface: String,
    direction: Directions,
    json: bool,
    count: Option<u64>,
    interval: Cell<f64>,
}

impl Datapath for Monitor {
    const NAME: &'static str = SUBCOMMAND;
    const PROGRAMS: &'static [&'static str] = PROGRAMS;
    const EXCLUSIVE: bool = false;
    type Args = MonitorArgs;
    type Desired = Desired;
    type Plan = Printing;
    type Loaded<'obj> = Loaded<'obj>;
    type View = MapHandle;

    fn desired(args: &MonitorArgs) -> Result<Desired> {
        let settings = Settings::read(args)?;
        if args.count == Some(0) {
            bail!("--count 0 would report nothing; give at least 1");
        }
        Ok(Desired {
            settings,
            json: args.json,
            count: args.count,
        })
    }
    fn target(desired: &Desired) -> Result<Target> {
        Target::interface(&desired.settings.iface)
    }
    fn refuse_if_attached(_target: &Target, _pinned: &[u32]) -> Result<()> {
        // counting is read-only: monitors may watch one interface side by side
        Ok(())
    }
    fn plan(desired: &Desired, target: &Target, _persist: bool) -> Result<Printing> {
        Ok(Printing {
            iface: target.iface().name.clone(),
            direction: desired.settings.direction,
            interval: desired.settings.interval,
            json: desired.json,
            count: desired.count,
        })
    }
    fn load<'obj>(
        storage: &'obj mut Storage,
        plan: &Printing,
        _pins: Option<&mut PinSet>,
    ) -> Result<Loaded<'obj>> {
        let skel = MonitorSkelBuilder::default()
            .open(&mut storage[0])
            .context("opening the monitor programs")?
            .load()
            .context("loading the monitor programs")?;
        Ok(Loaded {
            skel,
            iface: plan.iface.clone(),
            direction: plan.direction,
            json: plan.json,
            count: plan.count,
            interval: Cell::new(plan.interval),
        })
    }
    fn apply(loaded: &Loaded<'_>, plan: &Printing) -> Result<Applied> {
        loaded.interval.set(plan.interval);
        Ok(Applied::default())
    }
    fn attach(loaded: &Loaded<'_>, target: &Target, _plan: &Printing) -> Result<Vec<Box<dyn std::any::Any>>> {
        let directions = loaded.direction.tc();
        let mut attachments: Vec<Box<dyn std::any::Any>> = Vec::new();
        for direction in directions {
            let prog = match direction {
                TcDirection::Ingress => &loaded.skel.progs.monitor_ingress,
                TcDirection::Egress => &loaded.skel.progs.monitor_egress,
            };
            attachments.push(crate::kernel::tc::attach_tc(prog, target.iface(), direction)?);
        }
        Ok(attachments)
    }
    fn attach_pinned(
        _loaded: &Loaded<'_>,
        _target: &Target,
        _pins: &PinDir,
        _plan: &Printing,
    ) -> Result<bool> {
        bail!("monitor has no --persist: it counts for whoever watches")
    }
    fn objects<'a>(_loaded: &'a Loaded<'_>) -> Vec<(&'a libbpf_rs::Object, &'static [MapPin])> {
        Vec::new()
    }
    fn check_reload(old: &Desired, new: &Desired) -> Result<()> {
        if new.settings.iface.text != old.settings.iface.text
            || new.settings.direction != old.settings.direction
        {
            bail!("the interface or direction changed; that needs a restart");
        }
        Ok(())
    }
    fn describe(desired: &Desired, _target: &Target, _plan: &Printing) -> String {
        let sides: Vec<&str> = desired.settings.direction.tc().iter().map(|d| d.name()).collect();
        format!("{} every {}s", sides.join("+"), desired.settings.interval)
    }
    fn view(loaded: &Loaded<'_>) -> Result<MapHandle> {
        MapHandle::try_from(&loaded.skel.maps.monitor_flows).context("flow table handle")
    }
    fn view_pinned(_pins: &PinDir) -> Result<MapHandle> {
        bail!("monitor persists nothing")
    }
    fn report(flows: &MapHandle) -> Result<Report> {
        Ok(Report {
            families: flow_families(&read_flows(flows)?),
            ..Report::default()
        })
    }
    fn serve(
        loaded: &Loaded<'_>,
        shutdown: &Shutdown,
        reload: &mut dyn FnMut(run::Request) -> Result<String>,
    ) -> Result<()> {
        let map = MapHandle::try_from(&loaded.skel.maps.monitor_flows).context("flow table handle")?;
        let mut previous: HashMap<Flow, Counters> = HashMap::new();
        let mut last = Instant::now();
        let mut next_report = Instant::now() + Duration::from_secs_f64(loaded.interval.get());
        let mut reports = 0;
        loop {
            match shutdown.next_timeout(next_report.saturating_duration_since(Instant::now())) {
                Some(run::Request::Stop) => break,
                Some(request @ (run::Request::Reload | run::Request::Health)) => {
                    run::log_reload(SUBCOMMAND, request, reload(request));
                    next_report = Instant::now() + Duration::from_secs_f64(loaded.interval.get());
                    continue;
                }
                None => {}
            }
            next_report = Instant::now() + Duration::from_secs_f64(loaded.interval.get());
            let flows = read_flows(&map)?;
            let elapsed = last.elapsed().as_secs_f64();
            last = Instant::now();
            if loaded.json {
                println!("{}", json_report(&flows));
            } else {
                print!("{}", text_report(&loaded.iface, &flows, &previous, elapsed));
            }
            previous = flows;
            reports += 1;
            if loaded.count.is_some_and(|count| reports >= count) {
                break;
            }
        }
        Ok(())
    }
}

/// Metrics of the flow table: flows, packets and bytes by direction and protocol.
fn flow_families(flows: &HashMap<Flow, Counters>) -> Vec<metrics::Family> {
    let mut totals: std::collections::BTreeMap<(&str, String), (u64, Counters)> = Default::default();
    for (flow, counters) in flows {
        let entry = totals.entry((flow.direction, flow.proto_name())).or_default();
        entry.0 += 1;
        entry.1.packets += counters.packets;
        entry.1.bytes += counters.bytes;
    }
    let mut count = metrics::Family::gauge(
        "ebpf_net_monitor_flows",
        "flows in the table, by direction and protocol",
    );
    let mut packets = metrics::Family::gauge(
        "ebpf_net_monitor_packets",
        "packets of the flows in the table (a gauge: evicted flows leave it)",
    );
    let mut bytes = metrics::Family::gauge(
        "ebpf_net_monitor_bytes",
        "bytes of the flows in the table (a gauge: evicted flows leave it)",
    );
    for ((direction, proto), (flows, counters)) in &totals {
        let labels = [("direction", *direction), ("proto", proto.as_str())];
        count.add(&labels, *flows);
        packets.add(&labels, counters.packets);
        bytes.add(&labels, counters.bytes);
    }
    vec![count, packets, bytes]
}

fn sorted_by_bytes(flows: &HashMap<Flow, Counters>) -> Vec<(&Flow, &Counters)> {
    let mut rows: Vec<_> = flows.iter().collect();
    rows.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(b.1.packets.cmp(&a.1.packets)));
    rows
}

pub fn json_report(flows: &HashMap<Flow, Counters>) -> serde_json::Value {
    let rows: Vec<_> = sorted_by_bytes(flows)
        .into_iter()
        .map(|(flow, counters)| {
            json!({
                "direction": flow.direction,
                "proto": flow.proto_name(),
                "src": flow.src.to_string(),
                "sport": flow.sport,
                "dst": flow.dst.to_string(),
                "dport": flow.dport,
                "packets": counters.packets,
                "bytes": counters.bytes,
            })
        })
        .collect();
    json!({ "flows": rows })
}

fn text_report(
    iface: &str,
    flows: &HashMap<Flow, Counters>,
    previous: &HashMap<Flow, Counters>,
    elapsed: f64,
) -> String {
    let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / elapsed.max(1e-3);
    let (total, total_before) = (sum_counters(flows), sum_counters(previous));
    let mut out = format!(
        "\n{iface}: {} flows, {} packets, {} ({}/s, {})\n",
        flows.len(),
        total.packets,
        human_bytes(total.bytes as f64),
        human_count(rate(total.packets, total_before.packets)),
        human_bits(8.0 * rate(total.bytes, total_before.bytes)),
    );
    out += &format!(
        "{:<8} {:<13} {:<45} {:<45} {:>10} {:>10} {:>8} {:>11}\n",
        "DIR", "PROTO", "SOURCE", "DESTINATION", "PACKETS", "BYTES", "PKT/S", "RATE"
    );
    let rows = sorted_by_bytes(flows);
    for (flow, counters) in rows.iter().take(TOP_ROWS) {
        let before = previous.get(flow).copied().unwrap_or_default();
        let proto = match flow.proto {
            1 | 58 => format!("{} {}/{}", flow.proto_name(), flow.sport, flow.dport),
            _ => flow.proto_name(),
        };
        out += &format!(
            "{:<8} {:<13} {:<45} {:<45} {:>10} {:>10} {:>8} {:>11}\n",
            flow.direction,
            proto,
            flow.endpoint(flow.src, flow.sport),
            flow.endpoint(flow.dst, flow.dport),
            counters.packets,
            human_bytes(counters.bytes as f64),
            human_count(rate(counters.packets, before.packets)),
            human_bits(8.0 * rate(counters.bytes, before.bytes)),
        );
    }
    if rows.len() > TOP_ROWS {
        out += &format!("({} more flows; --json lists all)\n", rows.len() - TOP_ROWS);
    }
    out
}

fn sum_counters(flows: &HashMap<Flow, Counters>) -> Counters {
    flows.values().fold(Counters::default(), |sum, c| Counters {
        packets: sum.packets + c.packets,
        bytes: sum.bytes + c.bytes,
    })
}

fn scaled(value: f64, base: f64, units: &[&str]) -> String {
    let mut value = value;
    let mut unit = 0;
    while value >= base && unit + 1 < units.len() {
        value /= base;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", units[0])
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

pub fn human_bytes(bytes: f64) -> String {
    scaled(bytes, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB"])
}

pub fn human_bits(bits_per_sec: f64) -> String {
    scaled(bits_per_sec, 1000.0, &["b/s", "kb/s", "Mb/s", "Gb/s", "Tb/s"])
}

fn human_count(per_sec: f64) -> String {
    scaled(per_sec, 1000.0, &["", "k", "M", "G"])
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bits(2_500_000.0), "2.5 Mb/s");
        assert_eq!(human_count(12.0), "12");
        assert_eq!(human_count(12_345.0), "12.3 k");
    }

    #[test]
    fn interval_bounds() {
        assert!(parse_interval("0.5").is_ok());
        for bad in ["0", "-1", "nan", "inf", "x", "100000"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
