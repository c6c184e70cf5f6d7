//! `ebpf-net kube`: the node agent. It watches the cluster's Services and EndpointSlices on
//! the API server (kube-rs reflectors), works out what this node serves
//! ([`translate::node_services`]) and drives the datapaths through the core's
//! [`lifecycle::drive`]: clusterip on the cgroup for ClusterIPs, lb (or xdp-lb) on each
//! interface for NodePorts, LoadBalancer ingress IPs and externalIPs.
//!
//! ```text
//!  API server ── watch ──> stores ── debounce ──> node_services ──┬─> clusterip driver (cgroup)
//!   Services, EndpointSlices          (pure)                       └─> lb driver per -i IFACE
//!                                                                         │ each: pinned, diff-applied
//!  /healthz, /metrics, healthCheckNodePorts  <── outcomes, sync latency ──┘
//! ```
//!
//! Every datapath is pinned as `--persist` pins it: when the agent stops or restarts, the
//! node goes on serving what it last programmed, and the next agent applies the difference.

pub mod http;
pub mod translate;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use prometheus_client::metrics::histogram::Histogram;

use crate::control::lifecycle::{self, Datapath};
use crate::control::metrics::{self, Family};
use crate::control::run::{self, Request, Shutdown};
use crate::datapath::clusterip::{self, Clusterip};
use crate::datapath::lb::{self, Lb};
use crate::datapath::xdp_lb::{self, XdpLb};
use crate::kernel::{netns, pin::PinDir};
use translate::{Cluster, NodeServices, Translator};

pub const SUBCOMMAND: &str = "kube";

/// How long the agent waits after a change for more before it applies them together, and
/// the longest it lets a stream of changes wait.
const DEBOUNCE: Duration = Duration::from_millis(5);
const DEBOUNCE_MAX: Duration = Duration::from_millis(50);

/// The node label endpoints' zone hints refer to.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The cluster autoscaler's taint on a node it is about to remove.
const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(clap::Args, Debug)]
pub struct KubeArgs {
    /// kubeconfig of the API server [default: $KUBECONFIG, else the in-cluster service
    /// account, else ~/.kube/config]
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// this node's name, as endpoints' nodeName give it (Local traffic policies)
    /// [default: the hostname]
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// cgroup v2 directory whose processes get the ClusterIPs, absolute or relative to the
    /// cgroup2 mount [default: the cgroup2 root, i.e. every process]
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// interface NodePort, LoadBalancer and externalIP traffic arrives on (lb on each),
    /// repeatable; none: only ClusterIPs are served
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub ifaces: Vec<String>,
    /// xdp-lb on the interfaces instead of lb
    #[arg(long)]
    pub xdp: bool,
    /// serve Prometheus metrics on ADDR:PORT (`:PORT` for every address)
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// kube-proxy's health endpoint, /healthz and /livez ("off": none)
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:10256")]
    pub healthz: String,
}

/// One update for the drivers: what the node serves, numbered.
struct Update {
    seq: u64,
    services: Arc<NodeServices>,
}

/// What a driver says after an apply.
struct Outcome {
    driver: usize,
    seq: u64,
    result: Result<String>,
    /// the driver ended (failed to start, or stopped)
    ended: bool,
}

/// A datapath the agent drives, on its own thread.
struct Driver {
    name: String,
    updates: mpsc::Sender<Update>,
    /// its pins, for the metrics
    pins: Arc<Mutex<Option<PinDir>>>,
    /// the last update applied
    applied: u64,
}

/// Starts a driver thread for datapath `D`: it enters `netns`, waits for the first update,
/// then runs [`lifecycle::drive`] with the desired states `make` builds from each update.
fn spawn_driver<D: Datapath>(
    index: usize,
    name: String,
    netns: Option<String>,
    make: impl Fn(&NodeServices) -> Result<D::Desired> + Send + 'static,
    target_key: impl Fn(&str) -> Result<PinDir> + Send + 'static,
    outcomes: tokio::sync::mpsc::UnboundedSender<Outcome>,
) -> Result<Driver> {
    let (tx, rx) = mpsc::channel::<Update>();
    let pins = Arc::new(Mutex::new(None));
    let shown = pins.clone();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let said = outcomes.clone();
            let end = move |seq, result: Result<String>| {
                let _ = said.send(Outcome {
                    driver: index,
                    seq,
                    result,
                    ended: true,
                });
            };
            if let Some(name) = &netns {
                if let Err(err) = netns::enter(name) {
                    return end(0, Err(err));
                }
            }
            let netns_key = match netns::current_key() {
                Ok(key) => key,
                Err(err) => return end(0, Err(err)),
            };
            match target_key(&netns_key) {
                Ok(dir) => *shown.lock().unwrap() = Some(dir),
                Err(err) => return end(0, Err(err)),
            }
            // the newest of what is waiting: older updates are part of it
            let latest = |first: Update| -> Update {
                let mut update = first;
                while let Ok(newer) = rx.try_recv() {
                    update = newer;
                }
                update
            };
            let Ok(first) = rx.recv() else { return };
            let first = latest(first);
            let desired = match make(&first.services) {
                Ok(desired) => desired,
                Err(err) => return end(first.seq, Err(err)),
            };
            let mut seq = first.seq;
            let mut next = |result: Result<String>| -> Option<D::Desired> {
                let _ = outcomes.send(Outcome {
                    driver: index,
                    seq,
                    result,
                    ended: false,
                });
                loop {
                    let update = latest(rx.recv().ok()?);
                    seq = update.seq;
                    match make(&update.services) {
                        Ok(desired) => return Some(desired),
                        Err(err) => {
                            let _ = outcomes.send(Outcome {
                                driver: index,
                                seq,
                                result: Err(err),
                                ended: false,
                            });
                        }
                    }
                }
            };
            let result = lifecycle::drive::<D>(&netns_key, desired, &mut next);
            end(seq, result.map(|()| String::new()));
        })
        .context("starting a driver thread")?;
    Ok(Driver {
        name,
        updates: tx,
        pins,
        applied: 0,
    })
}

/// The addresses of `ifaces` in `netns` that NodePorts are served on: every address but
/// loopback and IPv6 link-local ones.
fn node_addresses(netns: Option<&str>, ifaces: &[String]) -> Result<Vec<IpAddr>> {
    let netns = netns.map(str::to_string);
    let ifaces = ifaces.to_vec();
    std::thread::spawn(move || -> Result<Vec<IpAddr>> {
        if let Some(name) = &netns {
            netns::enter(name)?;
        }
        for iface in &ifaces {
            crate::kernel::addr::Interface::by_name(iface).with_context(|| format!("-i {iface}"))?;
        }
        let mut found = Vec::new();
        for ifaddr in nix::ifaddrs::getifaddrs().context("listing the node's addresses")? {
            if !ifaces.contains(&ifaddr.interface_name) {
                continue;
            }
            let Some(addr) = ifaddr.address else { continue };
            let ip = if let Some(v4) = addr.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
            if !ip.is_loopback() && !link_local && !found.contains(&ip) {
                found.push(ip);
            }
        }
        Ok(found)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("listing the node's addresses failed"))?
}

/// The agent's own numbers, for /metrics and /healthz.
#[derive(Default)]
pub struct AgentState {
    /// when the maps last held everything the API server had (None: not yet)
    pub last_synced: Option<SystemTime>,
    /// the last change not yet in the maps, since when
    pub pending_since: Option<SystemTime>,
    pub syncs: u64,
    pub sync_failures: u64,
    pub watch_errors: u64,
    pub services: usize,
    pub cluster_keys: usize,
    pub external_keys: usize,
    /// per healthCheckNodePort: local endpoints
    pub health_ports: BTreeMap<u16, translate::HealthPort>,
    /// why the node is being removed (/healthz fails, /livez does not), None while it stays
    pub node_leaving: Option<String>,
}

/// Runs the agent until SIGINT or SIGTERM. `netns`: the node's network namespace (`-n`),
/// where the interfaces are; the API server is reached from the namespace it started in.
pub fn run(args: &KubeArgs, netns: Option<&str>) -> Result<()> {
    let shutdown = Shutdown::install()?;
    let node = match &args.node_name {
        Some(name) => name.clone(),
        None => nix::unistd::gethostname()
            .context("reading the hostname (give --node-name)")?
            .to_string_lossy()
            .into_owned(),
    };
    if args.xdp && args.ifaces.is_empty() {
        bail!("--xdp puts xdp-lb on the interfaces: give them with -i IFACE");
    }
    // one agent per cgroup: a second would fight the first over the same tables
    let cgroup = crate::kernel::cgroup::Cgroup::resolve(args.cgroup.as_deref())?;
    let (_instance, orphan) =
        crate::control::instance::Instance::claim(SUBCOMMAND, netns::HOST_KEY, &cgroup.target(), false)?;
    if let Some(orphan) = orphan {
        eprintln!(
            "{SUBCOMMAND}: taking over from a killed agent (pid {})",
            orphan.pid
        );
    }
    let node_addresses = node_addresses(netns, &args.ifaces)?;
    // the interfaces exist: before anything runs on them, lb needs Linux 6.1, xdp-lb does not
    if !args.xdp && !args.ifaces.is_empty() {
        crate::kernel::probe::require_kfuncs(lb::SUBCOMMAND, &lb::KFUNCS).context(
            "-i puts lb on the interfaces (--xdp puts xdp-lb there, which needs no conntrack kfunc; without -i, ClusterIPs only)",
        )?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the agent's runtime")?;
    runtime.block_on(agent(args, netns, node, node_addresses, shutdown))
}

async fn client(args: &KubeArgs) -> Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no API server configured (--kubeconfig, KUBECONFIG, or in a pod)")?,
    };
    kube::Client::try_from(config).context("connecting to the API server")
}

/// What a watch event means here: which watch (0 Services, 1 EndpointSlices), and whether it
/// changed the stores ([`is_sync_point`]) or failed.
type Watched = (usize, std::result::Result<Option<bool>, String>);

async fn agent(
    args: &KubeArgs,
    netns: Option<&str>,
    node: String,
    node_addresses: Vec<IpAddr>,
    shutdown: Shutdown,
) -> Result<()> {
    let client = client(args).await?;
    // the API server answers before anything is attached: a wrong kubeconfig is one line
    let version = client
        .apiserver_version()
        .await
        .context("the API server does not answer")?;
    let state = Arc::new(Mutex::new(AgentState::default()));
    // fine enough around the 100 ms goal to read a p99 off it
    let latency = Histogram::new([
        0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0,
        30.0,
    ]);
    let healthz = match args.healthz.as_str() {
        "off" => None,
        listen => Some(http::serve_healthz(listen, state.clone()).await?),
    };

    // the drivers
    let (outcome_tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    let mut drivers = Vec::new();
    let cgroup = args.cgroup.clone();
    drivers.push(spawn_driver::<Clusterip>(
        0,
        clusterip::SUBCOMMAND.to_string(),
        None,
        move |services| clusterip::Settings::driven(cgroup.as_deref(), services.cluster.clone()),
        {
            let cgroup = args.cgroup.clone();
            move |_| {
                let target = crate::kernel::cgroup::Cgroup::resolve(cgroup.as_deref())?.target();
                Ok(PinDir::new(clusterip::SUBCOMMAND, netns::HOST_KEY, &target))
            }
        },
        outcome_tx.clone(),
    )?);
    for iface in &args.ifaces {
        let index = drivers.len();
        let netns = netns.map(str::to_string);
        let name = iface.clone();
        let key = iface.clone();
        let driver = if args.xdp {
            spawn_driver::<XdpLb>(
                index,
                format!("{} {iface}", xdp_lb::SUBCOMMAND),
                netns,
                move |services| xdp_lb::Settings::driven(&name, services.external.clone()),
                move |netns_key| Ok(PinDir::new(xdp_lb::SUBCOMMAND, netns_key, &key)),
                outcome_tx.clone(),
            )?
        } else {
            spawn_driver::<Lb>(
                index,
                format!("{} {iface}", lb::SUBCOMMAND),
                netns,
                move |services| lb::Settings::driven(&name, services.external.clone()),
                move |netns_key| Ok(PinDir::new(lb::SUBCOMMAND, netns_key, &key)),
                outcome_tx.clone(),
            )?
        };
        drivers.push(driver);
    }
    drop(outcome_tx);

    // metrics: the agent's own and every driven datapath's, read from their pins; per service,
    // not per endpoint (metrics::set_per_backend says why)
    metrics::set_per_backend(false);
    let metrics_state = state.clone();
    let metrics_latency = latency.clone();
    let metrics_pins: Vec<(String, Arc<Mutex<Option<PinDir>>>)> =
        drivers.iter().map(|d| (d.name.clone(), d.pins.clone())).collect();
    let metrics_at = metrics::serve(args.metrics.as_ref(), move || {
        Ok(Arc::new(move || {
            let mut families = agent_families(&metrics_state.lock().unwrap(), &metrics_latency);
            for (name, pins) in &metrics_pins {
                let Some(pins) = pins.lock().unwrap().clone() else {
                    continue;
                };
                if !pins.exists() {
                    continue;
                }
                let subcommand = name.split(' ').next().unwrap_or_default();
                if let Some(datapath) = crate::datapath::REGISTRY.iter().find(|d| d.name() == subcommand) {
                    families.extend(datapath.report_pinned(&pins)?.families);
                }
            }
            Ok(families)
        }) as metrics::Source)
    })?;
    if let Some(addr) = metrics_at {
        eprintln!("{SUBCOMMAND}: metrics at http://{addr}/metrics");
    }
    if let Some(addr) = healthz {
        eprintln!("{SUBCOMMAND}: healthz at http://{addr}/healthz");
    }

    // signals, into the runtime
    let (signal_tx, mut signals) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let request = shutdown.next();
            if signal_tx.send(request).is_err() || request == Request::Stop {
                break;
            }
        })
        .context("starting the signal thread")?;

    // the watches
    let (services, service_writer) = reflector::store::<K8sService>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let service_stream = reflector::reflector(
        service_writer,
        watcher(Api::<K8sService>::all(client.clone()), watcher::Config::default()).modify(slim),
    )
    .default_backoff()
    .map(|event| -> Watched { (0, event.map(|e| is_sync_point(&e)).map_err(|e| e.to_string())) });
    let slice_stream = reflector::reflector(
        slice_writer,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(slim),
    )
    .default_backoff()
    .map(|event| -> Watched { (1, event.map(|e| is_sync_point(&e)).map_err(|e| e.to_string())) });
    // this node alone: its zone (topology hints) and whether it is being removed (/healthz)
    let (nodes, node_writer) = reflector::store::<Node>();
    let node_stream = reflector::reflector(
        node_writer,
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
        )
        .modify(|node: &mut Node| {
            slim(node);
            node.status = None; // its image list alone can be tens of KiB
        }),
    )
    .default_backoff()
    .map(|event| -> Watched { (2, event.map(|e| is_sync_point(&e)).map_err(|e| e.to_string())) });
    let mut events =
        futures::stream::select_all([service_stream.boxed(), slice_stream.boxed(), node_stream.boxed()]);

    let health_ports = http::HealthPorts::new(netns.map(str::to_string), state.clone());
    let mut ready_printed = false;
    let mut synced_once = [false; 3];
    let mut changed_at: Option<Instant> = None;
    let mut last_event = Instant::now();
    let mut seq = 0u64;
    // update number -> when its first change arrived
    let mut pending: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut last_sent: Option<Arc<NodeServices>> = None;
    // each Service worked out again only when it or its slices changed
    let mut translator = Translator::default();
    let mut failing_watch = [false; 3];
    loop {
        let deadline = changed_at
            .filter(|_| synced_once == [true; 3])
            .map(|first| (last_event + DEBOUNCE).min(first + DEBOUNCE_MAX));
        tokio::select! {
            event = events.next() => {
                let Some((which, result)) = event else { bail!("the watches ended") };
                match result {
                    Ok(change) => {
                        if failing_watch[which] {
                            failing_watch[which] = false;
                            eprintln!("{SUBCOMMAND}: the {} watch is back", watch_name(which));
                        }
                        if let Some(init_done) = change {
                            if init_done {
                                synced_once[which] = true;
                            }
                            last_event = Instant::now();
                            changed_at.get_or_insert(last_event);
                            state.lock().unwrap().pending_since.get_or_insert_with(SystemTime::now);
                        }
                    }
                    Err(err) => {
                        state.lock().unwrap().watch_errors += 1;
                        if !failing_watch[which] {
                            failing_watch[which] = true;
                            eprintln!("{SUBCOMMAND}: the {} watch failed, retrying: {err}", watch_name(which));
                        }
                    }
                }
            }
            _ = sleep_until(deadline) => {
                let first = changed_at.take().expect("a deadline comes from a change");
                run::phase("kube: change debounced");
                let this_node = nodes.get(&reflector::ObjectRef::new(&node));
                let leaving = this_node.as_deref().and_then(leaving);
                {
                    let mut shared = state.lock().unwrap();
                    if leaving != shared.node_leaving {
                        match &leaving {
                            Some(why) => eprintln!("{SUBCOMMAND}: node {node} {why}: /healthz answers 503"),
                            None => eprintln!("{SUBCOMMAND}: node {node} stays: /healthz answers 200 again"),
                        }
                        shared.node_leaving = leaving;
                    }
                }
                let zone = this_node.as_deref().and_then(zone_of);
                let computed = Arc::new(compute(&mut translator, &services, &slices, &node, zone, &node_addresses));
                run::phase("kube: services worked out");
                let same = last_sent.as_deref() == Some(&*computed);
                run::phase("kube: compared with the last update");
                if same {
                    // nothing this node serves changed (another node's endpoint, a label)
                    let mut state = state.lock().unwrap();
                    if pending.is_empty() {
                        state.last_synced = Some(SystemTime::now());
                        state.pending_since = None;
                    }
                    continue;
                }
                for line in &computed.skipped {
                    if !last_sent.as_ref().is_some_and(|last| last.skipped.contains(line)) {
                        eprintln!("{SUBCOMMAND}: not served: {line}");
                    }
                }
                seq += 1;
                pending.insert(seq, first);
                for driver in &drivers {
                    let _ = driver.updates.send(Update { seq, services: computed.clone() });
                }
                {
                    let mut state = state.lock().unwrap();
                    state.services = computed.count;
                    state.cluster_keys = computed.cluster.iter().map(|s| s.keys().len()).sum();
                    state.external_keys = computed.external.iter().map(|s| s.keys().len()).sum();
                }
                health_ports.set(&computed.health_ports).await;
                last_sent = Some(computed);
            }
            outcome = outcomes.recv() => {
                let Some(outcome) = outcome else { bail!("every datapath driver ended") };
                let driver = &mut drivers[outcome.driver];
                match (&outcome.result, outcome.ended) {
                    (Err(err), _) if !ready_printed => {
                        bail!("{}: {err:#}", driver.name)
                    }
                    (Err(err), ended) => {
                        state.lock().unwrap().sync_failures += 1;
                        eprintln!("{SUBCOMMAND}: {}: update failed, kept what runs: {err:#}", driver.name);
                        if ended {
                            bail!("{} stopped", driver.name);
                        }
                        continue;
                    }
                    (Ok(_), true) => continue,
                    (Ok(line), false) => {
                        driver.applied = outcome.seq;
                        if !line.is_empty() {
                            eprintln!("{SUBCOMMAND}: {}: {line}", driver.name);
                        }
                    }
                }
                // an update is in the maps once every driver applied it (or a later one)
                let done = drivers.iter().map(|d| d.applied).min().unwrap_or(0);
                let finished: Vec<u64> = pending.range(..=done).map(|(s, _)| *s).collect();
                for s in finished {
                    let first = pending.remove(&s).expect("listed");
                    latency.observe(first.elapsed().as_secs_f64());
                    let mut state = state.lock().unwrap();
                    state.syncs += 1;
                    if pending.is_empty() && changed_at.is_none() {
                        state.last_synced = Some(SystemTime::now());
                        state.pending_since = None;
                    }
                }
                if !ready_printed && done > 0 && pending.is_empty() {
                    ready_printed = true;
                    record_driven(args.cgroup.as_deref(), &drivers)?;
                    let state = state.lock().unwrap();
                    run::announce_ready(
                        SUBCOMMAND,
                        &format!(
                            "node {node}, API server {} {}: {} services: {} ClusterIP keys on {}; {} external keys{}",
                            version.git_version,
                            client_url(args),
                            state.services,
                            state.cluster_keys,
                            args.cgroup.as_deref().map_or("cgroup /".to_string(), |path| format!("cgroup {path}")),
                            state.external_keys,
                            if args.ifaces.is_empty() {
                                " (no -i: not served)".to_string()
                            } else {
                                format!(" on {}", args.ifaces.join(", "))
                            }
                        ),
                    );
                }
            }
            request = signals.recv() => {
                match request.unwrap_or(Request::Stop) {
                    Request::Stop => break,
                    _ => {
                        // SIGHUP: everything again, as after a watch restart
                        changed_at.get_or_insert(Instant::now());
                        last_sent = None;
                        translator = Translator::default();
                        eprintln!("{SUBCOMMAND}: reloading: every service again");
                        // serving all along: systemd's reload ends here, the sync goes on
                        crate::control::notify::ready("kube: reloading: every service again");
                    }
                }
            }
        }
    }
    // the drivers end when their channels close; what they pinned goes on serving
    let names: Vec<String> = drivers.iter().map(|d| d.name.clone()).collect();
    drop(drivers);
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), outcomes.recv()).await {}
    eprintln!(
        "{SUBCOMMAND}: stopped; {} stay pinned and serving (`ebpf-net down` removes them)",
        names.join(", ")
    );
    Ok(())
}

/// Where the client talks to, for the ready line.
fn client_url(args: &KubeArgs) -> String {
    match &args.kubeconfig {
        Some(path) => format!("(--kubeconfig {})", path.display()),
        None => "(inferred)".to_string(),
    }
}

/// Where an agent notes the datapaths it drives, which stay pinned after it stops, for
/// `ebpf-net down kube`: /run/ebpf-net/kube/CGROUP-TARGET, a line "SUBCOMMAND NETNS TARGET"
/// each.
fn driven_record(cgroup_target: &str) -> std::path::PathBuf {
    std::path::Path::new(crate::control::instance::RUN_ROOT)
        .join(SUBCOMMAND)
        .join(cgroup_target)
}

fn record_driven(cgroup: Option<&str>, drivers: &[Driver]) -> Result<()> {
    let target = crate::kernel::cgroup::Cgroup::resolve(cgroup)?.target();
    let lines: String = drivers
        .iter()
        .filter_map(|driver| driver.pins.lock().unwrap().clone())
        .map(|pins| format!("{} {} {}\n", pins.subcommand, pins.netns, pins.target))
        .collect();
    let path = driven_record(&target);
    std::fs::create_dir_all(path.parent().expect("under the run directory"))
        .and_then(|()| std::fs::write(&path, lines))
        .with_context(|| format!("writing {}", path.display()))
}

/// `ebpf-net down kube [--cgroup PATH]`: removes what the agent of that cgroup drove and left
/// pinned (and the record of an agent killed), in this network namespace (`-n` as the agent
/// had it); refused while that agent runs.
pub fn down(cgroup: Option<&str>, netns_key: &str) -> Result<()> {
    let target = crate::kernel::cgroup::Cgroup::target_of(cgroup)?;
    let running = crate::control::instance::all()
        .into_iter()
        .find(|claim| claim.alive && claim.record.subcommand == SUBCOMMAND && claim.record.target == target);
    if let Some(claim) = running {
        bail!(
            "the agent on {} runs (pid {}): stop it first (SIGTERM), then down",
            claim.target_display(),
            claim.record.pid
        );
    }
    let path = driven_record(&target);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let mut only: Vec<(String, String, String)> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split(' ');
            Some((words.next()?.into(), words.next()?.into(), words.next()?.into()))
        })
        .collect();
    if let Some((subcommand, netns, target)) = only
        .iter()
        .find(|(_, netns, _)| netns != netns_key && netns != netns::HOST_KEY)
    {
        bail!(
            "the agent drove {subcommand} on {target} in network namespace {netns}: \
             run `ebpf-net -n {netns} down kube`"
        );
    }
    // a killed agent's own record
    only.push((SUBCOMMAND.into(), netns::HOST_KEY.into(), target.clone()));
    crate::control::status::down(
        &crate::datapath::REGISTRY,
        &crate::control::status::DownScope {
            subcommand: None,
            target: None,
            default_cgroup: None,
            all: false,
            only: Some(&only),
        },
        netns_key,
    )?;
    match std::fs::remove_file(&path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn watch_name(which: usize) -> &'static str {
    ["Service", "EndpointSlice", "Node"][which]
}

/// The node's `topology.kubernetes.io/zone` label, which endpoints' zone hints name.
fn zone_of(node: &Node) -> Option<&str> {
    node.metadata.labels.as_ref()?.get(ZONE_LABEL).map(String::as_str)
}

/// Why the node is on its way out, as kube-proxy's /healthz sees it (KEP-3836): deleted, or
/// tainted by the cluster autoscaler for removal. Load balancers then stop sending to it.
fn leaving(node: &Node) -> Option<String> {
    if node.metadata.deletion_timestamp.is_some() {
        return Some("is being deleted".to_string());
    }
    let taints = node.spec.as_ref()?.taints.as_ref()?;
    taints
        .iter()
        .any(|taint| taint.key == AUTOSCALER_TAINT)
        .then(|| format!("has the {AUTOSCALER_TAINT} taint"))
}

/// Drops what the agent never reads before an object is stored: managedFields (an
/// EndpointSlice's lists every endpoint again) and annotations (kubectl's
/// last-applied-configuration repeats the whole object). At 10,000 Services of 10
/// endpoints the agent's RSS went from 186 to 130 MiB.
fn slim<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

/// Whether a watch event changes what the stores hold: Some(true) at the end of a (re)list,
/// Some(false) for an object, None while a relist is under way (the store swaps at its end).
fn is_sync_point<K>(event: &watcher::Event<K>) -> Option<bool> {
    match event {
        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Some(false),
        watcher::Event::InitDone => Some(true),
        watcher::Event::Init | watcher::Event::InitApply(_) => None,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => futures::future::pending().await,
    }
}

fn compute(
    translator: &mut Translator,
    services: &Store<K8sService>,
    slices: &Store<EndpointSlice>,
    node: &str,
    zone: Option<&str>,
    node_addresses: &[IpAddr],
) -> NodeServices {
    let services = services.state();
    let slices = slices.state();
    let service_refs: Vec<&K8sService> = services.iter().map(|s| s.as_ref()).collect();
    let slice_refs: Vec<&EndpointSlice> = slices.iter().map(|s| s.as_ref()).collect();
    translator.node_services(&Cluster {
        services: &service_refs,
        slices: &slice_refs,
        node,
        zone,
        node_addresses,
    })
}

fn agent_families(state: &AgentState, latency: &Histogram) -> Vec<Family> {
    let mut families = Vec::new();
    let mut services = Family::gauge(
        "ebpf_net_kube_services",
        "services of the cluster this node serves",
    );
    services.add(&[], state.services as u64);
    families.push(services);
    let mut keys = Family::gauge(
        "ebpf_net_kube_service_keys",
        "VIP:port:protocol entries programmed, by kind",
    );
    keys.add(&[("kind", "cluster")], state.cluster_keys as u64);
    keys.add(&[("kind", "external")], state.external_keys as u64);
    families.push(keys);
    let mut syncs = Family::counter(
        "ebpf_net_kube_syncs",
        "updates of the cluster applied to the maps",
    );
    syncs.add(&[], state.syncs);
    families.push(syncs);
    let mut failures = Family::counter(
        "ebpf_net_kube_sync_failures",
        "updates a datapath could not apply (it kept what ran)",
    );
    failures.add(&[], state.sync_failures);
    families.push(failures);
    let mut watch = Family::counter(
        "ebpf_net_kube_watch_errors",
        "failed or restarted watches of the API server",
    );
    watch.add(&[], state.watch_errors);
    families.push(watch);
    families.push(Family::histogram(
        "ebpf_net_kube_sync_latency_seconds",
        "from a change on the API server (as the watch delivers it) to the maps holding it",
        latency.clone(),
    ));
    families
}
