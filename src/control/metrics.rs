//! `--metrics ADDR:PORT`: Prometheus metrics of a foreground run, read from its per-CPU maps
//! at every scrape and encoded by prometheus-client.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub type Labels = Vec<(String, String)>;

/// One metric family as read at a scrape: a name (counters without `_total`, which the
/// encoder adds), its help, and one value per label set.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: String,
    pub help: String,
    pub gauge: bool,
    pub samples: Vec<(Labels, u64)>,
}

impl Family {
    pub fn counter(name: &str, help: &str) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
            gauge: false,
            samples: Vec::new(),
        }
    }

    pub fn gauge(name: &str, help: &str) -> Self {
        Self {
            gauge: true,
            ..Self::counter(name, help)
        }
    }

    pub fn add(&mut self, labels: &[(&str, &str)], value: u64) {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.push((labels, value));
    }
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

/// Parses `--metrics ADDR:PORT` (IPv6 in brackets).
pub fn parse_listen(text: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| {
        anyhow::anyhow!("--metrics {text}: expected ADDR:PORT, e.g. 127.0.0.1:9465 or [::1]:9465")
    })
}

fn answer(mut stream: TcpStream, source: &Source) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // the headers are read and ignored; bounded so a client cannot make us buffer forever
    for _ in 0..100 {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = if method != "GET" {
        ("405 Method Not Allowed", "text/plain", "only GET\n".to_string())
    } else if path != "/metrics" && !path.starts_with("/metrics?") {
        (
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n".to_string(),
        )
    } else {
        match source().and_then(render) {
            Ok(text) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(err) => ("500 Internal Server Error", "text/plain", format!("{err:#}\n")),
        }
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// Starts the exporter when `--metrics` is given and returns where it listens. It binds
/// first, so a bad or taken address fails before anything is attached, then answers
/// `GET /metrics` on a thread of its own, one connection at a time, until the process exits.
pub fn serve(listen: Option<&String>, source: impl FnOnce() -> Result<Source>) -> Result<Option<SocketAddr>> {
    let Some(text) = listen else {
        return Ok(None);
    };
    let listener =
        TcpListener::bind(parse_listen(text)?).with_context(|| format!("--metrics {text}: cannot listen"))?;
    let addr = listener.local_addr()?;
    let source = source()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // a client that misbehaves costs one connection, never the datapath
                let _ = answer(stream, &source);
            }
        })
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
}
