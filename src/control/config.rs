//! `--config FILE`: a TOML file with one table per datapath. Flags override the file's single
//! values and add to its lists; every problem is reported as FILE:LINE.

use std::fmt::Display;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::control::service::Service;
use crate::kernel::attach::{Directions, XdpMode};

/// Options every datapath takes besides its own.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunOptions {
    /// TOML file with this datapath's settings (a `[SUBCOMMAND]` table); flags override its
    /// single values and add to its lists; SIGHUP re-reads it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// serve Prometheus metrics at http://ADDR:PORT/metrics while running in the foreground
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// how tc programs attach: tcx links (Linux 6.6), legacy clsact + cls_bpf filters, or
    /// auto (tcx where the kernel has it)
    #[arg(long, value_enum, default_value = "auto", env = "EBPF_NET_TC")]
    pub tc: crate::kernel::tc::TcMode,
}

impl RunOptions {
    /// `--metrics` serves only while the process runs; `--persist` exits at once.
    pub fn check(&self, persist: bool) -> Result<()> {
        if persist && self.metrics.is_some() {
            bail!("--metrics needs a foreground run; --persist exits at once");
        }
        crate::kernel::tc::check_mode(self.tc)?;
        crate::kernel::tc::set_mode(self.tc);
        Ok(())
    }
}

/// The whole file: every datapath's table is checked, whichever subcommand reads it.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Document {
    pub ipv6_hp: Option<Spanned<Ipv6HpSection>>,
    pub monitor: Option<Spanned<MonitorSection>>,
    pub proxy: Option<Spanned<ProxySection>>,
    pub clusterip: Option<Spanned<ClusteripSection>>,
    pub lb: Option<Spanned<LbSection>>,
    pub xdp_lb: Option<Spanned<XdpLbSection>>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Ipv6HpSection {
    pub interface: Option<Spanned<String>>,
    pub link_local: Option<Spanned<String>>,
    pub global: Option<Spanned<String>>,
    pub remove_nft_table: Option<bool>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MonitorSection {
    pub interface: Option<Spanned<String>>,
    pub direction: Option<Directions>,
    pub interval: Option<Spanned<f64>>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProxySection {
    pub interface: Option<Spanned<String>>,
    #[serde(default)]
    pub map: Vec<Spanned<RuleEntry>>,
}

/// One `[[proxy.map]]`: what `--map FROM=TO` says.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    pub from: String,
    pub to: String,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusteripSection {
    pub cgroup: Option<Spanned<String>>,
    #[serde(default)]
    pub service: Vec<Spanned<ServiceEntry>>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LbSection {
    pub interface: Option<Spanned<String>>,
    pub no_snat: Option<bool>,
    pub flood_rate: Option<u32>,
    #[serde(default)]
    pub service: Vec<Spanned<ServiceEntry>>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct XdpLbSection {
    pub interface: Option<Spanned<String>>,
    pub mode: Option<XdpMode>,
    pub max_flows: Option<Spanned<u32>>,
    pub flood_rate: Option<u32>,
    #[serde(default)]
    pub service: Vec<Spanned<ServiceEntry>>,
}

/// One `[[DATAPATH.service]]`: what `--service [PROTO:]VIP;OPTIONS=BACKEND,...` says.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceEntry {
    pub vip: String,
    pub protocol: Option<String>,
    pub backends: Vec<String>,
    pub affinity: Option<String>,
    pub affinity_timeout: Option<toml::Value>,
    pub check: Option<String>,
    pub check_expect: Option<toml::Value>,
    pub check_interval: Option<toml::Value>,
    pub check_timeout: Option<toml::Value>,
    pub check_rise: Option<toml::Value>,
    pub check_fall: Option<toml::Value>,
}

impl ServiceEntry {
    /// The service options it sets, as `--service` would say them.
    fn options(&self) -> Vec<(String, String)> {
        let text = |value: &toml::Value| match value {
            toml::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let strings = [("affinity", &self.affinity), ("check", &self.check)]
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_string(), value.clone()?)));
        let values = [
            ("affinity-timeout", &self.affinity_timeout),
            ("check-expect", &self.check_expect),
            ("check-interval", &self.check_interval),
            ("check-timeout", &self.check_timeout),
            ("check-rise", &self.check_rise),
            ("check-fall", &self.check_fall),
        ]
        .into_iter()
        .filter_map(|(key, value)| Some((key.to_string(), text(value.as_ref()?))));
        strings.chain(values).collect()
    }
}

/// A list entry in the flags' syntax, with where it came from for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub text: String,
    pub origin: String,
}

impl Item {
    /// Entries given as repeated flags: `--service TEXT`.
    pub fn flags(flag: &str, texts: &[String]) -> Vec<Item> {
        texts
            .iter()
            .map(|text| Item {
                text: text.clone(),
                origin: format!("{flag} {text}"),
            })
            .collect()
    }

    /// Prefixes a problem with where the entry came from.
    pub fn fail(&self, problem: impl Display) -> anyhow::Error {
        anyhow!("{}: {problem:#}", self.origin)
    }
}

/// A parsed config file, kept with its text to turn byte offsets into line numbers.
#[derive(Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// the byte offset where each line starts
    line_starts: Vec<usize>,
    pub doc: Document,
}

impl ConfigFile {
    /// Reads and checks the whole file; a syntax or schema error names FILE:LINE:COLUMN.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(path, text)
    }

    pub fn parse(path: &Path, text: String) -> Result<Self> {
        match toml::from_str::<Document>(&text) {
            Ok(doc) => Ok(Self {
                path: path.to_path_buf(),
                line_starts: std::iter::once(0)
                    .chain(text.match_indices('\n').map(|(at, _)| at + 1))
                    .collect(),
                doc,
            }),
            Err(err) => {
                let at = match err.span() {
                    Some(span) => location(path, &text, span.start),
                    None => path.display().to_string(),
                };
                bail!("{at}: {}", err.message().trim())
            }
        }
    }

    /// Reads `path` when given.
    pub fn load(path: Option<&Path>) -> Result<Option<Self>> {
        path.map(Self::read).transpose()
    }

    /// "FILE:LINE" of a value in the file (a binary search over the line starts: a file
    /// of 10,000 services names every entry's line).
    pub fn at(&self, span: Range<usize>) -> String {
        let line = self.line_starts.partition_point(|&start| start <= span.start);
        format!("{}:{line}", self.path.display())
    }

    /// The datapath's table; a file given to a datapath must say something about it.
    pub fn section<'a, T>(&self, table: &'a Option<Spanned<T>>, name: &str) -> Result<&'a T> {
        table
            .as_ref()
            .map(Spanned::get_ref)
            .ok_or_else(|| anyhow!("{}: no [{name}] table", self.path.display()))
    }

    /// Services of a table, each naming its line in errors.
    pub fn services(&self, entries: &[Spanned<ServiceEntry>]) -> Result<Vec<Service>> {
        entries
            .iter()
            .map(|entry| {
                let origin = format!("{}: service {}", self.at(entry.span()), entry.get_ref().vip);
                let entry = entry.get_ref();
                Service::from_entry(
                    &entry.vip,
                    entry.protocol.as_deref(),
                    &entry.backends,
                    &entry.options(),
                    origin.clone(),
                )
                .map_err(|err| anyhow!("{origin}: {err:#}"))
            })
            .collect()
    }

    /// Proxy rules as items in the `--map` syntax, each naming its line.
    pub fn rules(&self, entries: &[Spanned<RuleEntry>]) -> Vec<Item> {
        entries
            .iter()
            .map(|entry| Item {
                text: format!("{}={}", entry.get_ref().from, entry.get_ref().to),
                origin: format!("{}: map {}", self.at(entry.span()), entry.get_ref().from),
            })
            .collect()
    }

    /// A string value as an item, naming its line and key.
    pub fn item(&self, key: &str, value: &Spanned<String>) -> Item {
        Item {
            text: value.get_ref().clone(),
            origin: format!("{}: {key}", self.at(value.span())),
        }
    }
}

fn location(path: &Path, text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
    format!("{}:{line}:{column}", path.display())
}

/// A datapath's table of the config file: where it sits in the document, and the keys
/// several datapaths share.
pub trait Section: Sized + 'static {
    /// The table's name, `[xdp-lb]`: the subcommand's.
    const TABLE: &'static str;
    fn of(doc: &Document) -> &Option<Spanned<Self>>;
    /// `interface = "eth0"`, for the datapaths on an interface.
    fn interface(&self) -> Option<&Option<Spanned<String>>> {
        None
    }
    /// `[[TABLE.service]]` entries, for the load balancers.
    fn services(&self) -> Option<&Vec<Spanned<ServiceEntry>>> {
        None
    }
}

macro_rules! section {
    ($section:ty, $table:literal, $field:ident $(, $method:ident: $key:ident as $ty:ty)*) => {
        impl Section for $section {
            const TABLE: &'static str = $table;
            fn of(doc: &Document) -> &Option<Spanned<Self>> {
                &doc.$field
            }
            $(fn $method(&self) -> Option<&$ty> {
                Some(&self.$key)
            })*
        }
    };
}

type InterfaceKey = Option<Spanned<String>>;
type ServiceKeys = Vec<Spanned<ServiceEntry>>;
section!(Ipv6HpSection, "ipv6-hp", ipv6_hp, interface: interface as InterfaceKey);
section!(MonitorSection, "monitor", monitor, interface: interface as InterfaceKey);
section!(ProxySection, "proxy", proxy, interface: interface as InterfaceKey);
section!(ClusteripSection, "clusterip", clusterip, services: service as ServiceKeys);
section!(LbSection, "lb", lb, interface: interface as InterfaceKey, services: service as ServiceKeys);
section!(XdpLbSection, "xdp-lb", xdp_lb, interface: interface as InterfaceKey, services: service as ServiceKeys);

/// What a datapath's settings are read from besides its own flags: the `--config` file, when
/// given, and the datapath's table in it. Every datapath's settings start here; SIGHUP reads
/// them again.
pub struct Sources<S> {
    pub config: Option<ConfigFile>,
    table: std::marker::PhantomData<S>,
}

impl<S: Section> Sources<S> {
    /// Reads the file of `--config`; a file given to a datapath must have its table.
    pub fn read(run: &RunOptions) -> Result<Self> {
        let config = ConfigFile::load(run.config.as_deref())?;
        section_of(config.as_ref(), S::of, S::TABLE)?;
        Ok(Self {
            config,
            table: std::marker::PhantomData,
        })
    }

    /// The datapath's table, when a file was given.
    pub fn section(&self) -> Option<&S> {
        let config = self.config.as_ref()?;
        S::of(&config.doc).as_ref().map(Spanned::get_ref)
    }

    /// `-i IFACE`, else the table's `interface`.
    pub fn interface(&self, flag: Option<&String>) -> Result<Item> {
        interface(
            flag,
            self.config.as_ref(),
            self.section().and_then(S::interface),
            S::TABLE,
        )
    }

    /// `--service` flags and the table's services, checked together against `limits`.
    pub fn services(
        &self,
        flags: &[Service],
        limits: crate::control::service::Limits,
    ) -> Result<Vec<Service>> {
        let items = services(
            flags,
            self.config.as_ref(),
            self.section().and_then(S::services),
            S::TABLE,
        )?;
        crate::control::service::check_services(items, limits)
    }

    /// A setting given once: the flag's value, else the table's, else `default`.
    pub fn value<T>(&self, flag: Option<T>, key: impl FnOnce(&S) -> Option<T>, default: T) -> T {
        flag.or_else(|| self.section().and_then(key)).unwrap_or(default)
    }
}

/// This datapath's table of the config file, when a file is given.
pub fn section_of<'a, T>(
    config: Option<&'a ConfigFile>,
    table: impl Fn(&'a Document) -> &'a Option<Spanned<T>>,
    name: &str,
) -> Result<Option<&'a T>> {
    config
        .map(|config| config.section(table(&config.doc), name))
        .transpose()
}

/// A single value: the flag's when given, else the file's, else none.
pub fn pick(
    flag: Option<&String>,
    flag_name: &str,
    file: Option<(&ConfigFile, &Option<Spanned<String>>, &str)>,
) -> Option<Item> {
    if let Some(text) = flag {
        return Some(Item {
            text: text.clone(),
            origin: format!("{flag_name} {text}"),
        });
    }
    let (config, value, key) = file?;
    value.as_ref().map(|value| config.item(key, value))
}

/// Like [`pick`], for a value the datapath cannot run without.
pub fn require(
    flag: Option<&String>,
    flag_name: &str,
    config: Option<&ConfigFile>,
    value: Option<&Option<Spanned<String>>>,
    key: &str,
    table: &str,
) -> Result<Item> {
    let file = config.zip(value).map(|(config, value)| (config, value, key));
    pick(flag, flag_name, file).ok_or_else(|| match config {
        Some(config) => anyhow!(
            "no {key}: give {flag_name} or `{key}` in the [{table}] table of {}",
            config.path.display()
        ),
        None => anyhow!("no {key}: give {flag_name} (or --config FILE)"),
    })
}

/// The interface of an interface datapath: `-i` or the table's `interface`.
pub fn interface(
    flag: Option<&String>,
    config: Option<&ConfigFile>,
    value: Option<&Option<Spanned<String>>>,
    table: &str,
) -> Result<Item> {
    require(flag, "-i", config, value, "interface", table)
}

/// Services from `--service` flags and the table's `[[TABLE.service]]` entries; at least one.
pub fn services(
    flags: &[Service],
    config: Option<&ConfigFile>,
    entries_of_table: Option<&Vec<Spanned<ServiceEntry>>>,
    table: &str,
) -> Result<Vec<Service>> {
    let from_file = config
        .zip(entries_of_table)
        .map(|(c, e)| c.services(e))
        .transpose()?;
    entries(
        flags.to_vec(),
        from_file.unwrap_or_default(),
        "services",
        "--service",
        &format!("{table}.service"),
    )
}

/// The list entries of flags and file together; at least one.
pub fn entries<T>(
    flag_items: Vec<T>,
    file_items: Vec<T>,
    what: &str,
    flag: &str,
    table_key: &str,
) -> Result<Vec<T>> {
    // the file's first, then the flags'; without a file, the flags as they are (not moved
    // one by one: 10,000 services)
    let mut items = file_items;
    if items.is_empty() {
        items = flag_items;
    } else {
        items.extend(flag_items);
    }
    if items.is_empty() {
        bail!("no {what}: give {flag} or [[{table_key}]] entries in --config FILE");
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile> {
        ConfigFile::parse(Path::new("node.toml"), text.to_string())
    }

    #[test]
    fn every_table_parses_and_items_name_their_lines() {
        let config = parse(
            "[lb]\ninterface = \"eth0\"\nno-snat = true\n\n[[lb.service]]\nvip = \"10.96.0.10:80\"\nbackends = [\"10.1.0.2:8080\", \"10.1.0.3:8080\"]\n\n[xdp-lb]\nmode = \"generic\"\nmax-flows = 4096\n\n[monitor]\ndirection = \"ingress\"\ninterval = 0.5\n\n[[proxy.map]]\nfrom = \"10.0.0.1:80\"\nto = \"10.0.0.2:8080\"\n",
        )
        .unwrap();
        let lb = config.section(&config.doc.lb, "lb").unwrap();
        let items = config.services(&lb.service).unwrap();
        assert_eq!(
            items[0],
            Service::parse("10.96.0.10:80=10.1.0.2:8080,10.1.0.3:8080")
                .map(|s| Service {
                    origin: items[0].origin.clone(),
                    ..s
                })
                .unwrap()
        );
        assert_eq!(items[0].origin, "node.toml:5: service 10.96.0.10:80");
        assert_eq!(lb.no_snat, Some(true));
        let xdp = config.section(&config.doc.xdp_lb, "xdp-lb").unwrap();
        assert_eq!(xdp.mode, Some(XdpMode::Generic));
        let proxy = config.section(&config.doc.proxy, "proxy").unwrap();
        assert_eq!(config.rules(&proxy.map)[0].text, "10.0.0.1:80=10.0.0.2:8080");
        assert!(config.section(&config.doc.clusterip, "clusterip").is_err());
    }

    #[test]
    fn service_options_are_keys_of_the_file() {
        let config = parse(
            "[xdp-lb]\ninterface = \"eth0\"\n[[xdp-lb.service]]\nvip = \"10.96.0.10:80\"\nprotocol = \"tcp\"\nbackends = [\"10.1.0.2:8080;weight=2\", \"10.1.0.3:8080;state=draining\"]\naffinity = \"client\"\naffinity-timeout = 600\ncheck = \"http:/healthz\"\ncheck-interval = 1.5\ncheck-timeout = 1\ncheck-fall = 4\n[[xdp-lb.service]]\nvip = \"10.96.0.10:80\"\nprotocol = \"udp\"\nbackends = [\"reject\"]\n",
        )
        .unwrap();
        let section = config.section(&config.doc.xdp_lb, "xdp-lb").unwrap();
        let services = config.services(&section.service).unwrap();
        let from_flag = Service::parse(
            "tcp:10.96.0.10:80;affinity=client;affinity-timeout=600;check=http:/healthz;check-interval=1.5;check-timeout=1;check-fall=4=10.1.0.2:8080;weight=2,10.1.0.3:8080;state=draining",
        )
        .unwrap();
        assert_eq!(
            services[0],
            Service {
                origin: services[0].origin.clone(),
                ..from_flag
            }
        );
        assert!(services[1].backends.is_empty());
        let bad = parse("[lb]\ninterface = \"eth0\"\n[[lb.service]]\nvip = \"10.96.0.10:80\"\nbackends = [\"10.1.0.2:80\"]\ncheck-rise = 0\n")
            .unwrap();
        let section = bad.section(&bad.doc.lb, "lb").unwrap();
        let err = bad.services(&section.service).unwrap_err().to_string();
        assert!(
            err.starts_with("node.toml:3: service 10.96.0.10:80: check-rise=0"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        for (text, expected) in [
            (
                "[lb]\ninterface = \"eth0\"\nbogus = 1\n",
                "node.toml:3:1: unknown field `bogus`",
            ),
            (
                "[lb]\n[[lb.service]]\nvip = \"10.0.0.1:80\"\n",
                "node.toml:2:1: missing field `backends`",
            ),
            ("[lb\n", "node.toml:1:4:"),
            (
                "[xdp-lb]\nmode = \"fast\"\n",
                "node.toml:2:8: unknown variant `fast`",
            ),
            ("[lbb]\n", "node.toml:1:2: unknown field `lbb`"),
            ("[lb]\nno-snat = \"yes\"\n", "node.toml:2:11: invalid type"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.starts_with(expected),
                "{text:?}: got {err:?}, expected {expected:?}"
            );
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn flags_win_over_single_values_and_add_to_lists() {
        let config = parse("[lb]\ninterface = \"eth0\"\n[[lb.service]]\nvip = \"10.96.0.10:80\"\nbackends = [\"10.1.0.2:80\"]\n").unwrap();
        let lb = config.section(&config.doc.lb, "lb").unwrap();
        let flag = "eth1".to_string();
        let from_flag = require(
            Some(&flag),
            "-i",
            Some(&config),
            Some(&lb.interface),
            "interface",
            "lb",
        )
        .unwrap();
        assert_eq!(from_flag.text, "eth1");
        let from_file = require(None, "-i", Some(&config), Some(&lb.interface), "interface", "lb").unwrap();
        assert_eq!(
            (from_file.text.as_str(), from_file.origin.as_str()),
            ("eth0", "node.toml:2: interface")
        );
        let items = entries(
            vec![Service::parse("10.96.0.11:80=10.1.0.3:80").unwrap()],
            config.services(&lb.service).unwrap(),
            "services",
            "--service",
            "lb.service",
        )
        .unwrap();
        assert_eq!(items.len(), 2);
        assert!(entries::<Service>(vec![], vec![], "services", "--service", "lb.service").is_err());
    }
}
