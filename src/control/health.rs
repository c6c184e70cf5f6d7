//! Active health checks of backends, run by a foreground run: a TCP connect, or an HTTP GET
//! with an expected status, every interval with a timeout; `fall` failures in a row make a
//! backend unhealthy (no new flows), `rise` successes in a row healthy again. The checks run
//! in the run's network namespace, from the address the kernel picks towards the backend —
//! the one lb's source NAT uses too.
//!
//! What the checks found is an overlay on the services every datapath syncs
//! ([`overlay`]): the tables give an unhealthy backend a weight of 0, and a change asks the
//! run to apply its plan again ([`Request::Health`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::control::run::Request;
use crate::control::service::{HealthCheck, Service};

/// One backend of one service under a check.
#[derive(Debug, Clone)]
struct Probe {
    service: String,
    backend: SocketAddr,
    check: HealthCheck,
    healthy: bool,
    /// successes (healthy: failures) in a row since the last change
    streak: u32,
    next: Instant,
    /// what the last check said
    last: String,
    changes: u64,
}

#[derive(Default)]
struct State {
    probes: HashMap<(String, SocketAddr), Probe>,
    /// health changes since the run began, for the metric
    changes: u64,
    /// the run's name and where changes go, until the first check starts the thread
    unstarted: Option<(&'static str, Sender<Request>)>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// The services with what the checks last said of their backends (all healthy where nothing
/// checks them: persisted runs, services without a check).
pub fn overlay(services: &[Service]) -> Cow<'_, [Service]> {
    let guard = state();
    // no checks run (every --persist run): the services as given, not a copy of 10,000
    let Some(state) = guard.as_ref() else {
        return Cow::Borrowed(services);
    };
    Cow::Owned(
        services
            .iter()
            .map(|service| {
                let mut service = service.clone();
                let name = service.name();
                for backend in &mut service.backends {
                    backend.healthy = state
                        .probes
                        .get(&(name.clone(), backend.addr))
                        .is_none_or(|probe| probe.healthy);
                }
                service
            })
            .collect(),
    )
}

/// The checks `services` ask for, from now on: new ones start healthy (as Kubernetes'
/// ready endpoints do) and are checked at once; ones that stay keep their state.
pub fn configure(services: &[Service]) {
    let mut guard = state();
    let Some(state) = guard.as_mut() else {
        if services.iter().any(|service| service.check.is_some()) {
            eprintln!("health checks run while a foreground run lasts: with --persist no backend is checked");
        }
        return;
    };
    let mut probes = HashMap::new();
    for service in services {
        let Some(check) = &service.check else { continue };
        let name = service.name();
        for backend in &service.backends {
            let key = (name.clone(), backend.addr);
            let probe = match state.probes.remove(&key) {
                Some(probe) if probe.check == *check => probe,
                _ => Probe {
                    service: name.clone(),
                    backend: backend.addr,
                    check: check.clone(),
                    healthy: true,
                    streak: 0,
                    next: Instant::now(),
                    last: "not checked yet".into(),
                    changes: 0,
                },
            };
            probes.insert(key, probe);
        }
    }
    state.probes = probes;
    // the thread only once there is something to check
    if !state.probes.is_empty() {
        if let Some((subcommand, changed)) = state.unstarted.take() {
            std::thread::Builder::new()
                .name("health".into())
                .spawn(move || run(subcommand, changed))
                .expect("starting the health-check thread");
        }
    }
}

/// Lets a foreground run check its backends (before its first apply); changes are sent as
/// [`Request::Health`]. The checking thread starts with the first check a service asks for
/// and ends with the process.
pub fn start(subcommand: &'static str, changed: Sender<Request>) {
    *state() = Some(State {
        unstarted: Some((subcommand, changed)),
        ..State::default()
    });
}

/// At most this many checks at once; the rest wait for the next turn.
const PARALLEL: usize = 64;

fn run(subcommand: &str, changed: Sender<Request>) {
    loop {
        let now = Instant::now();
        let due: Vec<Probe> = {
            let guard = state();
            let Some(state) = guard.as_ref() else { return };
            let mut due: Vec<Probe> = state.probes.values().filter(|p| p.next <= now).cloned().collect();
            due.sort_by_key(|p| p.next);
            due.truncate(PARALLEL);
            due
        };
        if due.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let results: Vec<(Probe, Result<(), String>)> = std::thread::scope(|scope| {
            let running: Vec<_> = due
                .into_iter()
                .map(|probe| {
                    scope.spawn(move || {
                        let result = check(&probe.check, probe.backend);
                        (probe, result)
                    })
                })
                .collect();
            running
                .into_iter()
                .filter_map(|check| check.join().ok())
                .collect()
        });
        let mut any = false;
        {
            let mut guard = state();
            let Some(state) = guard.as_mut() else { return };
            for (done, result) in results {
                let Some(probe) = state.probes.get_mut(&(done.service.clone(), done.backend)) else {
                    continue;
                };
                probe.next = Instant::now() + probe.check.interval;
                let ok = result.is_ok();
                probe.last = match &result {
                    Ok(()) => "ok".into(),
                    Err(why) => why.clone(),
                };
                if ok == probe.healthy {
                    probe.streak = 0;
                    continue;
                }
                probe.streak += 1;
                let needed = if probe.healthy {
                    probe.check.fall
                } else {
                    probe.check.rise
                };
                if probe.streak < needed {
                    continue;
                }
                probe.healthy = ok;
                probe.streak = 0;
                probe.changes += 1;
                state.changes += 1;
                any = true;
                if ok {
                    eprintln!(
                        "{subcommand}: health: {} backend {} is healthy again ({} checks passed): new flows again",
                        probe.service, probe.backend, probe.check.rise
                    );
                } else {
                    eprintln!(
                        "{subcommand}: health: {} backend {} is unhealthy ({} checks failed, last: {}): no new flows",
                        probe.service, probe.backend, probe.check.fall, probe.last
                    );
                }
            }
        }
        if any && changed.send(Request::Health).is_err() {
            return;
        }
    }
}

/// One check: Ok, or why it failed.
fn check(check: &HealthCheck, backend: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + check.timeout;
    let mut stream =
        TcpStream::connect_timeout(&backend, check.timeout).map_err(|err| format!("connect: {err}"))?;
    let Some(path) = &check.http_path else {
        return Ok(());
    };
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream
        .set_write_timeout(Some(left()))
        .map_err(|err| err.to_string())?;
    let host = match backend {
        SocketAddr::V4(addr) => addr.to_string(),
        SocketAddr::V6(addr) => addr.to_string(),
    };
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: ebpf-net-health\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|err| format!("sending the request: {err}"))?;
    // the status line is all that counts: read until it is complete (bounded)
    let mut head = Vec::with_capacity(64);
    let mut buffer = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        stream
            .set_read_timeout(Some(left()))
            .map_err(|err| err.to_string())?;
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => head.extend_from_slice(&buffer[..read]),
            Err(err) => return Err(format!("reading the answer: {err}")),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let status: Option<u16> = line
        .strip_prefix("HTTP/")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok());
    match status {
        Some(status) if status == check.expect => Ok(()),
        Some(status) => Err(format!("HTTP {status}, expected {}", check.expect)),
        None => Err(format!(
            "not an HTTP answer: {:?}",
            line.chars().take(60).collect::<String>()
        )),
    }
}

/// The checks by service, then backend.
fn sorted(state: &State) -> Vec<&Probe> {
    let mut probes: Vec<&Probe> = state.probes.values().collect();
    probes.sort_by(|a, b| (&a.service, a.backend).cmp(&(&b.service, b.backend)));
    probes
}

/// Every checked backend, for `--json` and the exit summary: service, backend, healthy,
/// last result, changes.
pub fn snapshot() -> Vec<Value> {
    let guard = state();
    let Some(state) = guard.as_ref() else {
        return Vec::new();
    };
    sorted(state)
        .into_iter()
        .map(|probe| {
            json!({
                "service": probe.service,
                "backend": probe.backend.to_string(),
                "healthy": probe.healthy,
                "last": probe.last,
                "changes": probe.changes,
            })
        })
        .collect()
}

/// (checked, unhealthy, changes since start) for metrics and summaries.
pub fn totals() -> (u64, u64, u64) {
    let guard = state();
    let Some(state) = guard.as_ref() else {
        return (0, 0, 0);
    };
    let unhealthy = state.probes.values().filter(|p| !p.healthy).count() as u64;
    (state.probes.len() as u64, unhealthy, state.changes)
}

/// The health of every checked backend as metric families:
/// `ebpf_net_backend_healthy{datapath,service,backend}` (1 or 0) and
/// `ebpf_net_health_changes_total{datapath}`. Nothing when nothing is checked.
pub fn families(datapath: &str) -> Vec<crate::control::metrics::Family> {
    use crate::control::metrics::Family;
    let guard = state();
    let Some(state) = guard.as_ref().filter(|state| !state.probes.is_empty()) else {
        return Vec::new();
    };
    let mut healthy = Family::gauge(
        "ebpf_net_backend_healthy",
        "1 while a backend passes its health check, 0 while it gets no new flows for failing it",
    );
    for probe in sorted(state) {
        let backend = probe.backend.to_string();
        healthy.add(
            &[
                ("datapath", datapath),
                ("service", &probe.service),
                ("backend", &backend),
            ],
            u64::from(probe.healthy),
        );
    }
    let mut changes = Family::counter(
        "ebpf_net_health_changes",
        "backends that turned healthy or unhealthy",
    );
    changes.add(&[("datapath", datapath)], state.changes);
    vec![healthy, changes]
}
