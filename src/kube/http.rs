//! The agent's two small HTTP servers, as kube-proxy answers them: `/healthz` (and `/livez`)
//! on `--healthz`, and each `externalTrafficPolicy: Local` load balancer's
//! healthCheckNodePort, which says whether this node has an endpoint of the service (the
//! cloud's load balancer sends the service's traffic only to nodes that answer 200).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::translate::HealthPort;
use super::AgentState;
use crate::kernel::netns;

/// A change older than this not yet in the maps makes /healthz fail (kube-proxy's default).
const STALE_AFTER: Duration = Duration::from_secs(60);
/// Bounds on one request.
const MAX_REQUEST: usize = 4096;
const REQUEST_TIME: Duration = Duration::from_secs(2);

/// The request's path, read within the bounds; None for anything that is not a GET or HEAD
/// of a path.
async fn read_path(stream: &mut TcpStream) -> Option<(bool, String)> {
    let mut buffer = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let read = async {
        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") && buffer.len() < MAX_REQUEST {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    tokio::time::timeout(REQUEST_TIME, read).await.ok()??;
    let text = String::from_utf8_lossy(&buffer);
    let mut words = text.lines().next()?.split_whitespace();
    let head = match words.next()? {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    Some((head, words.next()?.to_string()))
}

async fn answer(stream: &mut TcpStream, head: bool, status: u16, body: &str) {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head {
        response.push_str(body);
    }
    let _ = tokio::time::timeout(REQUEST_TIME, stream.write_all(response.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// RFC 3339 in UTC, as Kubernetes writes times.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rest) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // civil from days (Howard Hinnant's algorithm)
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// /healthz's answer: 200 once the maps hold what the API server had, no change has waited
/// longer than [`STALE_AFTER`] since, and the node is not being removed. /livez (`live`)
/// leaves the node out, as kube-proxy's does: a node being drained is still alive.
pub fn healthz(state: &AgentState, now: SystemTime, live: bool) -> (u16, String) {
    let stale = state
        .pending_since
        .is_some_and(|since| now.duration_since(since).unwrap_or_default() > STALE_AFTER);
    let eligible = state.node_leaving.is_none();
    let healthy = state.last_synced.is_some() && !stale && (live || eligible);
    let updated = state.last_synced.map_or_else(|| "".to_string(), rfc3339);
    (
        if healthy { 200 } else { 503 },
        format!(
            "{{\"lastUpdated\": \"{updated}\",\"currentTime\": \"{}\", \"nodeEligible\": {eligible}}}",
            rfc3339(now)
        ),
    )
}

/// Listens on `listen` (ADDR:PORT) for /healthz and /livez; returns the address.
pub async fn serve_healthz(listen: &str, state: Arc<Mutex<AgentState>>) -> Result<SocketAddr> {
    let addrs =
        crate::control::metrics::parse_listen(listen).with_context(|| format!("--healthz {listen}"))?;
    let listener = TcpListener::bind(addrs.as_slice())
        .await
        .with_context(|| format!("--healthz {listen}: cannot listen"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let Some((head, path)) = read_path(&mut stream).await else {
                    return answer(&mut stream, false, 405, "{}").await;
                };
                let (status, body) = match path.split('?').next() {
                    Some(path @ ("/healthz" | "/livez")) => {
                        healthz(&state.lock().unwrap(), SystemTime::now(), path == "/livez")
                    }
                    _ => (404, "{}".to_string()),
                };
                answer(&mut stream, head, status, &body).await;
            });
        }
    });
    Ok(addr)
}

/// What a healthCheckNodePort says, and the task answering it.
type Answering = (Arc<Mutex<HealthPort>>, tokio::task::JoinHandle<()>);

/// The healthCheckNodePorts this node answers, each on its own listener in the node's
/// network namespace.
pub struct HealthPorts {
    netns: Option<String>,
    /// port -> (what it says, its server)
    ports: tokio::sync::Mutex<BTreeMap<u16, Answering>>,
    state: Arc<Mutex<AgentState>>,
}

impl HealthPorts {
    pub fn new(netns: Option<String>, state: Arc<Mutex<AgentState>>) -> Self {
        Self {
            netns,
            ports: tokio::sync::Mutex::new(BTreeMap::new()),
            state,
        }
    }

    /// A listener on every address of the node's namespace (made on a thread there).
    fn listen(&self, port: u16) -> Result<std::net::TcpListener> {
        let netns = self.netns.clone();
        std::thread::spawn(move || -> Result<std::net::TcpListener> {
            if let Some(name) = &netns {
                netns::enter(name)?;
            }
            // both families where IPv6 is on (bindv6only is off by default), else IPv4
            let listener = std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port))
                .or_else(|_| std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("opening healthCheckNodePort {port} failed"))?
    }

    /// Answers exactly `wanted`, each port with its service's local endpoints.
    pub async fn set(&self, wanted: &[HealthPort]) {
        let mut ports = self.ports.lock().await;
        let wanted: BTreeMap<u16, &HealthPort> = wanted.iter().map(|p| (p.port, p)).collect();
        ports.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, health) in wanted {
            if let Some((shown, _)) = ports.get(&port) {
                *shown.lock().unwrap() = health.clone();
                continue;
            }
            let listener = match self.listen(port).and_then(|l| Ok(TcpListener::from_std(l)?)) {
                Ok(listener) => listener,
                Err(err) => {
                    eprintln!(
                        "kube: service {}/{}: cannot answer its healthCheckNodePort {port}: {err:#}",
                        health.namespace, health.name
                    );
                    continue;
                }
            };
            let shown = Arc::new(Mutex::new(health.clone()));
            let serving = shown.clone();
            let state = self.state.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let health = serving.lock().unwrap().clone();
                    let synced = state.lock().unwrap().last_synced.is_some();
                    tokio::spawn(async move {
                        let Some((head, _)) = read_path(&mut stream).await else {
                            return answer(&mut stream, false, 405, "{}").await;
                        };
                        let status = if health.local_endpoints > 0 && synced {
                            200
                        } else {
                            503
                        };
                        let body = format!(
                            "{{\"service\":{{\"namespace\":\"{}\",\"name\":\"{}\"}},\"localEndpoints\":{},\"serviceProxyHealthy\":{synced}}}",
                            health.namespace, health.name, health.local_endpoints
                        );
                        answer(&mut stream, head, status, &body).await;
                    });
                }
            });
            ports.insert(port, (shown, task));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_796_170_000)),
            "2026-12-02T00:06:40Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn healthz_fails_before_the_first_sync_and_when_a_change_waits_too_long() {
        let now = SystemTime::now();
        let mut state = AgentState::default();
        assert_eq!(healthz(&state, now, false).0, 503);
        state.last_synced = Some(now);
        assert_eq!(healthz(&state, now, false).0, 200);
        state.pending_since = Some(now - Duration::from_secs(10));
        assert_eq!(healthz(&state, now, false).0, 200);
        state.pending_since = Some(now - Duration::from_secs(61));
        assert_eq!(healthz(&state, now, false).0, 503);
    }

    #[test]
    fn a_node_being_removed_fails_healthz_but_not_livez() {
        let now = SystemTime::now();
        let mut state = AgentState {
            last_synced: Some(now),
            ..AgentState::default()
        };
        assert_eq!(healthz(&state, now, false).0, 200);
        state.node_leaving = Some("is being deleted".into());
        let (status, body) = healthz(&state, now, false);
        assert_eq!(status, 503);
        assert!(body.contains("\"nodeEligible\": false"), "{body}");
        assert_eq!(healthz(&state, now, true).0, 200);
    }
}
