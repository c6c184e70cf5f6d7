//! Counters declared once: every stats struct of include/*.h gets one list of (name, kind,
//! help) in field order, and the status text, `--json` and Prometheus all read that list.
//! A field added in C without a declaration fails the build (the sizes differ) and the
//! BTF check in tests/counters.rs (the names differ).

use anyhow::Result;
use libbpf_rs::btf::types::Struct;
use libbpf_rs::btf::Btf;
use serde_json::{json, Map, Value};

use crate::control::metrics::Family;

/// How a counter is shown: an event (`ebpf_net_events_total`), an error
/// (`ebpf_net_errors_total`), or traffic per backend or rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Event,
    Error,
    Traffic,
}

/// One u64 field of a C stats struct.
#[derive(Debug, Clone, Copy)]
pub struct Counter {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

/// A C struct made only of u64 counters, declared once with [`declare_counters!`].
pub trait Counters: plain::Plain + Default + Copy + 'static {
    /// The struct's name in include/*.h (and so in the program's BTF).
    const C_STRUCT: &'static str;
    /// Its fields, in order.
    const FIELDS: &'static [Counter];

    /// The values, in field order.
    fn values(&self) -> Vec<u64> {
        crate::kernel::maps::as_bytes(self)
            .chunks_exact(8)
            .map(|word| u64::from_ne_bytes(word.try_into().expect("8 bytes")))
            .collect()
    }

    /// The counters from map bytes (a struct of u64 words).
    fn from_words(words: &[u64]) -> Result<Self> {
        let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_ne_bytes()).collect();
        crate::kernel::maps::from_bytes(Self::C_STRUCT, &bytes)
    }

    /// Field-wise sum.
    fn sum<'a>(all: impl IntoIterator<Item = &'a Self>) -> Self {
        let mut total = vec![0u64; Self::FIELDS.len()];
        for one in all {
            for (sum, value) in total.iter_mut().zip(one.values()) {
                *sum += value;
            }
        }
        Self::from_words(&total).expect("same layout")
    }

    /// `{ "name": value, ... }`.
    fn json(&self) -> Map<String, Value> {
        Self::FIELDS
            .iter()
            .zip(self.values())
            .map(|(field, value)| (field.name.to_string(), json!(value)))
            .collect()
    }

    /// The value of the first field of `kind`s, summed; for one-line summaries.
    fn total_of(&self, kind: Kind) -> u64 {
        Self::FIELDS
            .iter()
            .zip(self.values())
            .filter(|(field, _)| field.kind == kind)
            .map(|(_, value)| value)
            .sum()
    }
}

/// Declares a C counter struct once: `declare_counters!(lb_counters, [(new_flows, Event,
/// "help"), ...])`. The build fails when the C struct has more or fewer fields.
#[macro_export]
macro_rules! declare_counters {
    ($ty:ty, $c_name:literal, [$(($name:ident, $kind:ident, $help:literal)),* $(,)?]) => {
        // SAFETY: a C struct of u64 counters from include/*.h.
        unsafe impl plain::Plain for $ty {}
        impl $crate::control::counters::Counters for $ty {
            const C_STRUCT: &'static str = $c_name;
            const FIELDS: &'static [$crate::control::counters::Counter] = &[$(
                $crate::control::counters::Counter {
                    name: stringify!($name),
                    kind: $crate::control::counters::Kind::$kind,
                    help: $help,
                }
            ),*];
        }
        const _: () = assert!(
            size_of::<$ty>() == 8 * <$ty as $crate::control::counters::Counters>::FIELDS.len(),
            concat!("struct ", $c_name, " has a field without a counter declaration (or a declaration without a field)")
        );
    };
}

/// `ebpf_net_events_total{datapath,event}` and `ebpf_net_errors_total{datapath,error}` of a
/// datapath's counters.
pub fn event_families<T: Counters>(datapath: &str, counters: &T) -> Vec<Family> {
    let mut events = Family::counter("ebpf_net_events", "datapath events, by kind");
    let mut errors = Family::counter(
        "ebpf_net_errors",
        "packets or flows a datapath could not handle, by cause",
    );
    for (field, value) in T::FIELDS.iter().zip(counters.values()) {
        match field.kind {
            Kind::Error => errors.add(&[("datapath", datapath), ("error", field.name)], value),
            Kind::Event => events.add(&[("datapath", datapath), ("event", field.name)], value),
            // traffic has families of its own (per backend, per rule, rewrites)
            Kind::Traffic => {}
        }
    }
    vec![events, errors]
}

/// The field names of a struct in a program's BTF, or why not.
pub fn btf_fields(btf: &Btf<'_>, name: &str) -> Result<Vec<String>> {
    let found: Struct<'_> = btf
        .type_by_name(name)
        .ok_or_else(|| anyhow::anyhow!("no struct {name} in the program's BTF"))?;
    Ok(found
        .iter()
        .map(|member| {
            member
                .name
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect())
}

/// Checks a declaration against the C struct in a program's BTF: same names, same order.
pub fn check_declaration<T: Counters>(btf: &Btf<'_>) -> Result<()> {
    let in_c = btf_fields(btf, T::C_STRUCT)?;
    let declared: Vec<&str> = T::FIELDS.iter().map(|field| field.name).collect();
    anyhow::ensure!(
        in_c == declared,
        "struct {} has fields {in_c:?} in C but {declared:?} declared in Rust",
        T::C_STRUCT
    );
    Ok(())
}

/// Per-backend and per-service families of a service report: every field F becomes
/// `ebpf_net_backend_F_total{datapath,service,backend}` and `ebpf_net_service_F_total`;
/// each backend's share of new flows `ebpf_net_backend_weight{datapath,service,backend}`
/// (0: it takes none: draining, down or unhealthy). `service` is `tcp:VIP:PORT`,
/// `udp:VIP:PORT`, or `VIP:PORT` for a service of both. Per service only where
/// [`crate::control::metrics::per_backend`] is off.
pub fn service_families<T: Counters>(
    datapath: &str,
    report: &[crate::control::service::ServiceReport<T>],
) -> Vec<Family> {
    let per_backend = crate::control::metrics::per_backend();
    let mut families = Vec::new();
    for (index, field) in T::FIELDS.iter().enumerate() {
        let mut backend = Family::counter(
            &format!("ebpf_net_backend_{}", field.name),
            &format!("{}, per backend", field.help),
        );
        let mut service = Family::counter(
            &format!("ebpf_net_service_{}", field.name),
            &format!("{}, per service", field.help),
        );
        for entry in report {
            let vip = entry.name();
            for b in entry.backends.iter().filter(|_| per_backend) {
                backend.add(
                    &[
                        ("datapath", datapath),
                        ("service", &vip),
                        ("backend", &b.backend.to_string()),
                    ],
                    b.counters.values()[index],
                );
            }
            service.add(
                &[("datapath", datapath), ("service", &vip)],
                entry.totals().values()[index],
            );
        }
        if per_backend {
            families.push(backend);
        }
        families.push(service);
    }
    if !per_backend {
        return families;
    }
    let mut weight = Family::gauge(
        "ebpf_net_backend_weight",
        "a backend's share of new flows; 0 while it takes none (draining, down, unhealthy)",
    );
    for entry in report {
        let vip = entry.name();
        for b in &entry.backends {
            weight.add(
                &[
                    ("datapath", datapath),
                    ("service", &vip),
                    ("backend", &b.backend.to_string()),
                ],
                u64::from(b.weight),
            );
        }
    }
    families.push(weight);
    families
}
