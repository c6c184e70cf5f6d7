//! `--metrics ADDR:PORT`: Prometheus metrics of a foreground run, read from its per-CPU maps
//! at every scrape, encoded by prometheus-client, served over HTTP/1 with size, time and
//! concurrency limits. (tiny_http, the maintained synchronous server, reads a header line
//! without a bound: tiny-http issue #56; so the few lines of HTTP/1 needed are here.)

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// A sample's labels: names are always literals, so only the values are allocated (at
/// 100,000 backends a scrape holds 300,000 samples).
pub type Labels = Vec<(&'static str, String)>;

/// One metric family as read at a scrape: a name (counters without `_total`, which the
/// encoder adds), its help, and one value per label set.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: String,
    pub help: String,
    pub gauge: bool,
    pub samples: Vec<(Labels, u64)>,
    /// a histogram instead of the samples
    pub histogram: Option<Histogram>,
}

impl Family {
    pub fn counter(name: &str, help: &str) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
            gauge: false,
            samples: Vec::new(),
            histogram: None,
        }
    }

    /// A histogram the process keeps (observed as things happen, not read from maps).
    pub fn histogram(name: &str, help: &str, histogram: Histogram) -> Self {
        Self {
            histogram: Some(histogram),
            ..Self::counter(name, help)
        }
    }

    pub fn gauge(name: &str, help: &str) -> Self {
        Self {
            gauge: true,
            ..Self::counter(name, help)
        }
    }

    pub fn add(&mut self, labels: &[(&'static str, &str)], value: u64) {
        let labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.samples.push((labels, value));
    }
}

/// Whether services' families go down to each backend (`ebpf_net_backend_*`). The Kubernetes
/// agent turns it off: at 10,000 Services x 10 endpoints that is 300,000 series and 34 MB of
/// text per scrape (kube-proxy and Cilium export no per-endpoint series either); `status
/// --json` still has every backend.
static PER_BACKEND: AtomicBool = AtomicBool::new(true);

pub fn set_per_backend(on: bool) {
    PER_BACKEND.store(on, Ordering::Relaxed);
}

pub fn per_backend() -> bool {
    PER_BACKEND.load(Ordering::Relaxed)
}

/// Reads every family; runs on the exporter's thread at each scrape.
pub type Source = Arc<dyn Fn() -> Result<Vec<Family>> + Send + Sync>;

struct Scrape {
    families: Vec<Family>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrape({} families)", self.families.len())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.families {
            if let Some(histogram) = &family.histogram {
                let metric =
                    encoder.encode_descriptor(&family.name, &family.help, None, MetricType::Histogram)?;
                histogram.encode(metric)?;
                continue;
            }
            let kind = if family.gauge {
                MetricType::Gauge
            } else {
                MetricType::Counter
            };
            let mut metric = encoder.encode_descriptor(&family.name, &family.help, None, kind)?;
            if let [(labels, value)] = family.samples.as_slice() {
                if labels.is_empty() {
                    // no labels: no `{}` either
                    encode_value(metric, family.gauge, *value)?;
                    continue;
                }
            }
            for (labels, value) in &family.samples {
                encode_value(metric.encode_family(labels)?, family.gauge, *value)?;
            }
        }
        Ok(())
    }
}

fn encode_value(
    metric: prometheus_client::encoding::MetricEncoder<'_>,
    gauge: bool,
    value: u64,
) -> Result<(), std::fmt::Error> {
    if gauge {
        ConstGauge::new(value as i64).encode(metric)
    } else {
        ConstCounter::new(value).encode(metric)
    }
}

/// The whole exposition of one scrape, in the OpenMetrics text format.
pub fn render(families: Vec<Family>) -> Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { families }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).context("encoding metrics")?;
    Ok(text)
}

/// Parses `--metrics ADDR:PORT` (IPv6 in brackets); `:PORT` means every address.
pub fn parse_listen(text: &str) -> Result<Vec<SocketAddr>> {
    let bad = || {
        anyhow::anyhow!(
            "--metrics {text}: expected ADDR:PORT or :PORT, e.g. 127.0.0.1:9465, [::1]:9465 or :9465"
        )
    };
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        // IPv6's any address takes IPv4 too (unless bindv6only); IPv4's alone where the
        // namespace has no IPv6
        return Ok(vec![
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        ]);
    }
    text.parse().map(|addr| vec![addr]).map_err(|_| bad())
}

/// What one connection may cost: the request line and headers in at most `MAX_HEAD` bytes
/// within `HEAD_DEADLINE`, every read and write done within `IO_TIMEOUT`, and no more than
/// `MAX_CONNECTIONS` answered at once (the next ones get a 503 at once). A client that
/// sends 100 MiB costs 8 KiB; one that sends a byte every few seconds holds one of the
/// connections for `HEAD_DEADLINE`, never the exporter.
const MAX_HEAD: usize = 8 * 1024;
const HEAD_DEADLINE: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 8;

/// A request as far as the exporter cares.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Get(String),
    Head(String),
    /// another method: 405
    Other(String),
}

/// Why a request head could not be read: each has its answer, or none (the client left).
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    TooLarge,
    Timeout,
    Malformed,
    Closed,
}

/// Reads the request line and headers, up to the blank line, within the limits.
fn read_head(
    stream: &mut impl Read,
    deadline: Instant,
    set_timeout: impl Fn(Duration),
) -> Result<Request, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&head) {
            return parse_request(&head[..end]);
        }
        if head.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::Timeout);
        }
        set_timeout(left.min(IO_TIMEOUT));
        let room = (MAX_HEAD - head.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(HeadError::Timeout)
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(HeadError::Closed),
        }
    }
}

/// Where the head ends (the blank line), also with bare `\n` line ends.
fn head_end(head: &[u8]) -> Option<usize> {
    let crlf = head.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = head.windows(2).position(|w| w == b"\n\n");
    crlf.into_iter().chain(lf).min()
}

fn parse_request(head: &[u8]) -> Result<Request, HeadError> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line)
        .map_err(|_| HeadError::Malformed)?
        .trim_end();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HeadError::Malformed);
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    Ok(match method {
        "GET" => Request::Get(path),
        "HEAD" => Request::Head(path),
        _ => Request::Other(method.to_string()),
    })
}

/// A response: status line, content type and body; HEAD sends all but the body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    extra: &'static str,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            extra: "",
            body: body.to_string(),
        }
    }

    fn send(&self, stream: &mut TcpStream, with_body: bool) -> std::io::Result<()> {
        let head = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len(),
            self.extra
        );
        stream.write_all(head.as_bytes())?;
        if with_body {
            stream.write_all(self.body.as_bytes())?;
        }
        stream.flush()
    }
}

const INDEX: &str = "<html><head><title>ebpf-net</title></head><body>\
<h1>ebpf-net</h1><p><a href=\"/metrics\">Metrics</a></p></body></html>\n";

fn respond(request: &Request, source: &Source) -> Response {
    let path = match request {
        Request::Get(path) | Request::Head(path) => path,
        Request::Other(_) => {
            return Response {
                extra: "Allow: GET, HEAD\r\n",
                ..Response::text("405 Method Not Allowed", "only GET and HEAD\n")
            }
        }
    };
    match path.as_str() {
        "/metrics" => match source().and_then(render) {
            Ok(text) => Response {
                status: "200 OK",
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                extra: "",
                body: text,
            },
            Err(err) => Response::text("500 Internal Server Error", &format!("{err:#}\n")),
        },
        "/" => Response {
            status: "200 OK",
            content_type: "text/html; charset=utf-8",
            extra: "",
            body: INDEX.to_string(),
        },
        _ => Response::text("404 Not Found", "metrics are at /metrics\n"),
    }
}

fn answer(mut stream: TcpStream, source: &Source) -> std::io::Result<()> {
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let deadline = Instant::now() + HEAD_DEADLINE;
    let reader = stream.try_clone()?;
    let request = read_head(&mut &reader, deadline, |timeout| {
        let _ = reader.set_read_timeout(Some(timeout));
    });
    let (response, with_body) = match request {
        Ok(request) => {
            let with_body = !matches!(request, Request::Head(_));
            (respond(&request, source), with_body)
        }
        Err(HeadError::TooLarge) => (
            Response::text(
                "431 Request Header Fields Too Large",
                "request line and headers over 8 KiB\n",
            ),
            true,
        ),
        Err(HeadError::Timeout) => (Response::text("408 Request Timeout", "request too slow\n"), true),
        Err(HeadError::Malformed) => (Response::text("400 Bad Request", "not an HTTP/1 request\n"), true),
        Err(HeadError::Closed) => return Ok(()),
    };
    response.send(&mut stream, with_body)?;
    // the rest of what the client sends is never read: closing drops it
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

/// Counts the connections being answered; one is given back when its guard drops.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Option<Self> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(active)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: TcpListener, source: Source) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else {
            // out of file descriptors, say: let the others finish rather than spin
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let Some(slot) = Slot::take(&active) else {
            // every connection busy: say so at once rather than queue behind slow clients
            let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
            let _ =
                Response::text("503 Service Unavailable", "too many connections\n").send(&mut stream, true);
            continue;
        };
        let source = Arc::clone(&source);
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || {
                let _slot = slot;
                // a client that misbehaves costs one connection, never the datapath
                let _ = answer(stream, &source);
            });
        if spawned.is_err() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Starts the exporter when `--metrics` is given and returns where it listens. It binds
/// first, so a bad or taken address fails before anything is attached, then answers
/// `GET` and `HEAD` of `/metrics` (and `/`, a page pointing to it) on threads of its own,
/// within the limits above, until the process exits. Bound to an address other hosts can
/// reach, it says so on stderr: the counters name every service and backend.
pub fn serve(listen: Option<&String>, source: impl FnOnce() -> Result<Source>) -> Result<Option<SocketAddr>> {
    let Some(text) = listen else {
        return Ok(None);
    };
    let mut tried = Vec::new();
    let mut listener = None;
    for addr in parse_listen(text)? {
        match TcpListener::bind(addr) {
            Ok(bound) => {
                listener = Some(bound);
                break;
            }
            Err(err) => tried.push(err),
        }
    }
    let listener = match (listener, tried.into_iter().next()) {
        (Some(listener), _) => listener,
        (None, Some(err)) => return Err(err).with_context(|| format!("--metrics {text}: cannot listen")),
        (None, None) => bail!("--metrics {text}: no address to listen on"),
    };
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "ebpf-net: warning: --metrics {text} listens on {addr}, reachable from other hosts: \
             its counters name every service and backend (127.0.0.1:{} keeps them on this node)",
            addr.port()
        );
    }
    let source = source()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || accept_loop(listener, source))
        .context("starting the metrics thread")?;
    Ok(Some(addr))
}

/// `ebpf_net_rewrites_total{datapath,direction}`: packets (or socket calls) translated.
pub fn rewrites(datapath: &str, by_direction: &[(&str, u64)]) -> Family {
    let mut family = Family::counter(
        "ebpf_net_rewrites",
        "packets or socket calls translated, by direction",
    );
    for (direction, value) in by_direction {
        family.add(&[("datapath", datapath), ("direction", direction)], *value);
    }
    family
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_and_without_labels() {
        let mut flows = Family::gauge("ebpf_net_xdp_lb_flows", "flows");
        flows.add(&[], 3);
        let text = render(vec![flows, rewrites("lb", &[("in", 4)])]).unwrap();
        for line in [
            "# TYPE ebpf_net_xdp_lb_flows gauge",
            "ebpf_net_xdp_lb_flows 3",
            "ebpf_net_rewrites_total{datapath=\"lb\",direction=\"in\"} 4",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    fn head(bytes: &[u8]) -> Result<Request, HeadError> {
        read_head(&mut &bytes[..], Instant::now() + HEAD_DEADLINE, |_| {})
    }

    #[test]
    fn requests_are_read_within_the_limits() {
        assert_eq!(
            head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Request::Get("/metrics".into()))
        );
        assert_eq!(head(b"HEAD / HTTP/1.0\n\n"), Ok(Request::Head("/".into())));
        assert_eq!(
            head(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Ok(Request::Other("POST".into()))
        );
        assert_eq!(head(b"GET /metrics\r\n\r\n"), Err(HeadError::Malformed));
        assert_eq!(head(b"GET / HTTP/1.1\r\nHost: a\r\n"), Err(HeadError::Closed));
        let mut huge = b"GET /".to_vec();
        huge.resize(MAX_HEAD * 4, b'a');
        assert_eq!(head(&huge), Err(HeadError::TooLarge));
    }

    #[test]
    fn colon_port_means_every_address() {
        let addrs = parse_listen(":9100").unwrap();
        assert!(
            addrs.iter().all(|a| a.ip().is_unspecified() && a.port() == 9100),
            "{addrs:?}"
        );
        assert_eq!(parse_listen("[::1]:9").unwrap(), vec!["[::1]:9".parse().unwrap()]);
        assert!(parse_listen(":x").is_err() && parse_listen("9100").is_err());
    }
}
