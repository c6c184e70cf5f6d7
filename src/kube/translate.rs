//! What the cluster asks of this node, from the API server's objects: the ClusterIP services
//! of the cgroup datapath (clusterip) and the external ones (NodePort, LoadBalancer ingress,
//! externalIPs) of the interface datapath (lb or xdp-lb). Pure: the same objects give the same
//! services, so the agent can recompute everything after any event and apply the difference.
//!
//! The rules are kube-proxy's: services named by `service.kubernetes.io/service-proxy-name`
//! and headless ones are someone else's; EndpointSlices join by `kubernetes.io/service-name`
//! and by port name and protocol; ready endpoints take new flows, serving-and-terminating ones
//! only when no endpoint is ready (else they drain); `Local` traffic policies keep this
//! node's endpoints only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service as K8sService, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::control::service::{self, Backend, BackendState, Protocol, Service};

/// The label that gives a service to another proxy.
pub const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label that joins an EndpointSlice to its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What this node serves.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeServices {
    /// ClusterIPs, one per family, port and protocol: clusterip on the cgroup
    pub cluster: Vec<Service>,
    /// NodePorts on the node's addresses, LoadBalancer ingress IPs and externalIPs: lb or
    /// xdp-lb on the interfaces
    pub external: Vec<Service>,
    /// healthCheckNodePort of each `externalTrafficPolicy: Local` load balancer
    pub health_ports: Vec<HealthPort>,
    /// services or ports this node does not serve, one line each, for the log
    pub skipped: Vec<String>,
    /// services the cluster has that this node serves (of `cluster` and `external`)
    pub count: usize,
}

/// A healthCheckNodePort: answers 200 while the node has an endpoint of the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPort {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// An endpoint of one service port, as the slices say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    hints: Hints,
}

/// What an endpoint's topology hints say of this node: None when it has none, else whether
/// they name this node (`forNodes`) or its zone (`forZones`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct Hints {
    for_node: Option<bool>,
    for_zone: Option<bool>,
}

/// Which of a service port's endpoints this node may use, from their hints (kube-proxy's
/// topology-aware routing): when every ready endpoint has same-node hints and one names
/// this node, those; else the same with zone hints; else all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    Any,
    Node,
    Zone,
}

impl Topology {
    fn of<'a>(endpoints: impl Iterator<Item = &'a Endpoint> + Clone) -> Self {
        let ready = endpoints.filter(|e| e.ready);
        let usable = |hint: fn(&Hints) -> Option<bool>| {
            ready.clone().all(|e| hint(&e.hints).is_some())
                && ready.clone().any(|e| hint(&e.hints) == Some(true))
        };
        if usable(|h| h.for_node) {
            Topology::Node
        } else if usable(|h| h.for_zone) {
            Topology::Zone
        } else {
            Topology::Any
        }
    }

    fn allows(self, endpoint: &Endpoint) -> bool {
        match self {
            Topology::Any => true,
            Topology::Node => endpoint.hints.for_node == Some(true),
            Topology::Zone => endpoint.hints.for_zone == Some(true),
        }
    }
}

/// The objects the agent watches, by namespace and name.
pub struct Cluster<'a> {
    pub services: &'a [&'a K8sService],
    pub slices: &'a [&'a EndpointSlice],
    /// this node's name (endpoints' `nodeName`)
    pub node: &'a str,
    /// this node's `topology.kubernetes.io/zone` (endpoints' zone hints)
    pub zone: Option<&'a str>,
    /// addresses NodePorts are served on
    pub node_addresses: &'a [IpAddr],
}

fn protocol_of(text: Option<&str>) -> Result<Protocol, String> {
    match text.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(format!("protocol {other} is not supported (TCP and UDP are)")),
    }
}

/// Every endpoint of each (slice port name, protocol), per service, from the slices.
type SliceIndex = BTreeMap<(String, String), BTreeMap<(String, Protocol), BTreeSet<Endpoint>>>;

fn index_slices(slices: &[&EndpointSlice], node: &str, zone: Option<&str>) -> SliceIndex {
    let mut index = SliceIndex::new();
    for slice in slices {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue; // FQDN slices are not for proxies
        }
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        let by_port = index.entry((namespace, service.clone())).or_default();
        for port in slice.ports.iter().flatten() {
            let (Some(number), Ok(protocol)) = (port.port, protocol_of(port.protocol.as_deref())) else {
                continue;
            };
            let Ok(number) = u16::try_from(number) else {
                continue;
            };
            let endpoints = by_port
                .entry((port.name.clone().unwrap_or_default(), protocol))
                .or_default();
            for endpoint in &slice.endpoints {
                // kube-proxy uses an endpoint's first address
                let Some(ip) = endpoint.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                    continue;
                };
                let conditions = endpoint.conditions.as_ref();
                // unset ready and serving mean true; unset terminating false
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                let hints = endpoint.hints.as_ref();
                let for_nodes = hints.and_then(|h| h.for_nodes.as_ref()).filter(|n| !n.is_empty());
                let for_zones = hints.and_then(|h| h.for_zones.as_ref()).filter(|z| !z.is_empty());
                endpoints.insert(Endpoint {
                    addr: SocketAddr::new(ip, number),
                    ready,
                    serving,
                    terminating,
                    local: endpoint.node_name.as_deref() == Some(node),
                    hints: Hints {
                        for_node: for_nodes.map(|nodes| nodes.iter().any(|n| n.name == node)),
                        for_zone: for_zones.map(|zones| zones.iter().any(|z| Some(z.name.as_str()) == zone)),
                    },
                });
            }
        }
    }
    index
}

/// The backends of a service port for one address family: ready endpoints active,
/// serving-and-terminating ones draining (active when none is ready), others left out;
/// node-local ones only for a Local policy, else those the topology hints give this node.
fn backends(endpoints: &BTreeSet<Endpoint>, v4: bool, local_only: bool) -> Vec<Backend> {
    // an endpoint in two slices (a slice being replaced) once, its readiest view
    let mut by_addr: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    for endpoint in endpoints {
        if endpoint.addr.is_ipv4() != v4 || (local_only && !endpoint.local) {
            continue;
        }
        by_addr
            .entry(endpoint.addr)
            .and_modify(|seen| {
                if endpoint.ready && !seen.ready {
                    *seen = *endpoint
                }
            })
            .or_insert(*endpoint);
    }
    let topology = if local_only {
        Topology::Any
    } else {
        Topology::of(by_addr.values())
    };
    by_addr.retain(|_, endpoint| topology.allows(endpoint));
    let any_ready = by_addr.values().any(|e| e.ready);
    by_addr
        .values()
        .filter_map(|endpoint| {
            let state = if endpoint.ready {
                BackendState::Active
            } else if endpoint.serving && endpoint.terminating {
                if any_ready {
                    BackendState::Draining
                } else {
                    BackendState::Active
                }
            } else {
                return None;
            };
            let mut backend = Backend::new(endpoint.addr);
            backend.state = state;
            Some(backend)
        })
        .collect()
}

fn parse_ips(texts: impl IntoIterator<Item = impl AsRef<str>>) -> Vec<IpAddr> {
    texts
        .into_iter()
        .filter_map(|text| text.as_ref().parse().ok())
        .collect()
}

/// One service of ours: `vip` for `port`, backends of the VIP's family.
#[allow(clippy::too_many_arguments)]
fn service_for(
    vip: IpAddr,
    port: u16,
    protocol: Protocol,
    endpoints: Option<&BTreeSet<Endpoint>>,
    local_only: bool,
    affinity: Option<Duration>,
    origin: &str,
) -> Result<Service, String> {
    let backends = endpoints
        .map(|endpoints| backends(endpoints, vip.is_ipv4(), local_only))
        .unwrap_or_default();
    let mut service = Service::new(SocketAddr::new(vip, port), backends, origin.to_string())
        .map_err(|err| format!("{origin}: {err:#}"))?;
    service.protocol = Some(protocol);
    service.affinity = affinity;
    // Local: the client's address reaches the backend (the endpoint is on this node)
    service.keep_source = local_only;
    Ok(service)
}

/// One Service's share of [`NodeServices`].
#[derive(Debug, Default, Clone)]
struct Part {
    cluster: Vec<Service>,
    external: Vec<Service>,
    health_port: Option<HealthPort>,
    skipped: Vec<String>,
    served: bool,
}

/// What the cluster's services and slices ask of this node.
pub fn node_services(cluster: &Cluster<'_>) -> NodeServices {
    let index = index_slices(cluster.slices, cluster.node, cluster.zone);
    let mut sorted: Vec<&K8sService> = cluster.services.to_vec();
    sort_services(&mut sorted);
    let parts: Vec<Part> = sorted
        .into_iter()
        .filter_map(|k8s| {
            let key = (
                k8s.metadata.namespace.clone().unwrap_or_default(),
                k8s.metadata.name.clone().unwrap_or_default(),
            );
            service_part(k8s, index.get(&key), cluster.node_addresses)
        })
        .collect();
    assemble(parts.iter())
}

fn sort_services(services: &mut [&K8sService]) {
    services.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
}

/// What one Service asks of this node, given its endpoints (from [`index_slices`]); None: not
/// ours (another proxy's, ExternalName, headless, no spec).
fn service_part(
    k8s: &K8sService,
    ports_index: Option<&BTreeMap<(String, Protocol), BTreeSet<Endpoint>>>,
    node_addresses: &[IpAddr],
) -> Option<Part> {
    let namespace = k8s.metadata.namespace.clone().unwrap_or_default();
    let name = k8s.metadata.name.clone().unwrap_or_default();
    let spec = k8s.spec.as_ref()?;
    if k8s
        .metadata
        .labels
        .as_ref()
        .is_some_and(|labels| labels.contains_key(PROXY_NAME_LABEL))
    {
        return None;
    }
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return None;
    }
    let cluster_ips: Vec<IpAddr> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => parse_ips(ips),
        (_, Some(ip)) => parse_ips([ip]),
        _ => Vec::new(),
    };
    if spec.cluster_ip.as_deref() == Some("None") {
        return None; // headless: DNS only
    }
    let mut out = Part::default();
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let seconds = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .filter(|s| *s > 0)
            .map_or(service::DEFAULT_AFFINITY, |s| Duration::from_secs(s as u64));
        seconds
    });
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let mut external_vips: Vec<IpAddr> = parse_ips(spec.external_ips.iter().flatten());
    if kind == "LoadBalancer" {
        for ingress in k8s
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
        {
            // ipMode Proxy: the cloud's load balancer proxies, its traffic is not for the VIP
            if ingress.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            external_vips.extend(parse_ips(ingress.ip.iter()));
        }
    }
    let endpoints_of = |port: &ServicePort, protocol: Protocol| {
        ports_index.and_then(|ports| ports.get(&(port.name.clone().unwrap_or_default(), protocol)))
    };
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let origin = if port_name.is_empty() {
            format!("service {namespace}/{name} port {}", port.port)
        } else {
            format!("service {namespace}/{name} port {port_name}")
        };
        let protocol = match protocol_of(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(problem) => {
                out.skipped.push(format!("{origin}: {problem}"));
                continue;
            }
        };
        let Ok(number) = u16::try_from(port.port) else {
            continue;
        };
        let endpoints = endpoints_of(port, protocol);
        let push = |out: &mut Part, external: bool, vip: IpAddr, number: u16, local: bool| match service_for(
            vip, number, protocol, endpoints, local, affinity, &origin,
        ) {
            Ok(service) => {
                if external {
                    out.external.push(service);
                } else {
                    out.cluster.push(service);
                }
                out.served = true;
            }
            Err(problem) => out.skipped.push(problem),
        };
        for vip in &cluster_ips {
            push(&mut out, false, *vip, number, internal_local);
        }
        for vip in &external_vips {
            push(&mut out, true, *vip, number, external_local);
        }
        if matches!(kind, "NodePort" | "LoadBalancer") {
            if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
                // a NodePort on every node address of a family the service has
                let families: BTreeSet<bool> = cluster_ips.iter().map(IpAddr::is_ipv4).collect();
                for address in node_addresses {
                    if families.is_empty() || families.contains(&address.is_ipv4()) {
                        push(&mut out, true, *address, node_port, external_local);
                    }
                }
            }
        }
    }
    if kind == "LoadBalancer" && external_local {
        if let Some(port) = spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()) {
            let local: BTreeSet<SocketAddr> = ports_index
                .into_iter()
                .flat_map(|ports| ports.values().flatten())
                .filter(|e| e.local && e.ready)
                .map(|e| SocketAddr::new(e.addr.ip(), 0))
                .collect();
            out.health_port = Some(HealthPort {
                port,
                namespace: namespace.clone(),
                name: name.clone(),
                local_endpoints: local.len(),
            });
        }
    }
    Some(out)
}

/// The node's services from every Service's part, in the order of the Services.
fn assemble<'a>(parts: impl Iterator<Item = &'a Part>) -> NodeServices {
    let mut out = NodeServices::default();
    for part in parts {
        out.cluster.extend(part.cluster.iter().cloned());
        out.external.extend(part.external.iter().cloned());
        out.health_ports.extend(part.health_port.clone());
        out.skipped.extend(part.skipped.iter().cloned());
        if part.served {
            out.count += 1;
        }
    }
    // two services of the cluster on one VIP (an externalIP given twice): the first keeps it
    for list in [&mut out.cluster, &mut out.external] {
        let mut seen = BTreeSet::new();
        list.retain(|service| {
            let fresh = service.keys().iter().all(|key| seen.insert(*key));
            if !fresh {
                out.skipped.push(format!(
                    "{}: {} is served for another service already",
                    service.origin, service.vip
                ));
            }
            fresh
        });
    }
    out
}

/// [`node_services`] that remembers each Service's part and works a Service out again only
/// when it or one of its slices changed (by resourceVersion): an EndpointSlice update at
/// 10,000 Services parses one slice, not 10,000, and sorts nothing. The same result as
/// [`node_services`] on the same objects.
#[derive(Default)]
pub struct Translator {
    /// namespace -> name -> the resourceVersion its part was worked out from
    services: HashMap<String, HashMap<String, Seen>>,
    /// slice uid -> its resourceVersion, and the service it is of
    slices: HashMap<String, (Seen, ServiceKey)>,
    /// every served Service's part, in the output's order
    parts: BTreeMap<ServiceKey, Arc<Part>>,
    /// bumped by each call: what a call did not see is gone
    generation: u64,
    node: String,
    zone: Option<String>,
    node_addresses: Vec<IpAddr>,
}

/// (namespace, name)
type ServiceKey = (String, String);

struct Seen {
    version: String,
    generation: u64,
}

/// A slice's identity and version; None without a resourceVersion (not from an API server).
fn slice_version(slice: &EndpointSlice) -> Option<(&str, &str)> {
    let id = slice.metadata.uid.as_deref().or(slice.metadata.name.as_deref())?;
    Some((id, slice.metadata.resource_version.as_deref()?))
}

/// The (namespace, service) a slice is of, by its `kubernetes.io/service-name` label.
fn slice_service(slice: &EndpointSlice) -> Option<(&str, &str)> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((slice.metadata.namespace.as_deref().unwrap_or_default(), service))
}

impl Translator {
    pub fn node_services(&mut self, cluster: &Cluster<'_>) -> NodeServices {
        if self.node != cluster.node
            || self.zone.as_deref() != cluster.zone
            || self.node_addresses != cluster.node_addresses
        {
            *self = Self {
                node: cluster.node.to_string(),
                zone: cluster.zone.map(str::to_string),
                node_addresses: cluster.node_addresses.to_vec(),
                ..Self::default()
            };
        }
        self.generation += 1;
        let generation = self.generation;
        // services whose slices changed, came or went: namespace -> names
        let mut touched: HashMap<String, BTreeSet<String>> = HashMap::new();
        let mut touch = |(namespace, name): (&str, &str)| {
            touched
                .entry(namespace.to_string())
                .or_default()
                .insert(name.to_string());
        };
        for slice in cluster.slices {
            let Some(service) = slice_service(slice) else {
                continue;
            };
            let Some((id, version)) = slice_version(slice) else {
                return self.uncached(cluster);
            };
            match self.slices.get_mut(id) {
                Some((seen, _)) if seen.version == version => seen.generation = generation,
                Some((seen, of)) => {
                    touch((&of.0, &of.1));
                    touch(service);
                    *seen = Seen {
                        version: version.to_string(),
                        generation,
                    };
                    *of = (service.0.to_string(), service.1.to_string());
                }
                None => {
                    touch(service);
                    let seen = Seen {
                        version: version.to_string(),
                        generation,
                    };
                    let of = (service.0.to_string(), service.1.to_string());
                    self.slices.insert(id.to_string(), (seen, of));
                }
            }
        }
        self.slices.retain(|_, (seen, of)| {
            let kept = seen.generation == generation;
            if !kept {
                touched.entry(of.0.clone()).or_default().insert(of.1.clone());
            }
            kept
        });
        crate::control::run::phase("kube:   slices checked");
        // the Services to work out again: changed, new, or with touched slices
        let mut changed: Vec<&K8sService> = Vec::new();
        for k8s in cluster.services {
            let namespace = k8s.metadata.namespace.as_deref().unwrap_or_default();
            let name = k8s.metadata.name.as_deref().unwrap_or_default();
            let Some(version) = k8s.metadata.resource_version.as_deref() else {
                return self.uncached(cluster);
            };
            let names = match self.services.get_mut(namespace) {
                Some(names) => names,
                None => self.services.entry(namespace.to_string()).or_default(),
            };
            let slices_changed = touched.get(namespace).is_some_and(|names| names.contains(name));
            match names.get_mut(name) {
                Some(seen) if seen.version == version && !slices_changed => seen.generation = generation,
                Some(seen) => {
                    *seen = Seen {
                        version: version.to_string(),
                        generation,
                    };
                    changed.push(k8s);
                }
                None => {
                    names.insert(
                        name.to_string(),
                        Seen {
                            version: version.to_string(),
                            generation,
                        },
                    );
                    changed.push(k8s);
                }
            }
        }
        // Services gone
        for (namespace, names) in &mut self.services {
            names.retain(|name, seen| {
                let kept = seen.generation == generation;
                if !kept {
                    self.parts.remove(&(namespace.clone(), name.clone()));
                }
                kept
            });
        }
        self.services.retain(|_, names| !names.is_empty());
        crate::control::run::phase("kube:   services checked");
        if !changed.is_empty() {
            // their slices, found without reading any slice's endpoints
            let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = changed
                .iter()
                .map(|k8s| {
                    let key = (
                        k8s.metadata.namespace.as_deref().unwrap_or_default(),
                        k8s.metadata.name.as_deref().unwrap_or_default(),
                    );
                    (key, Vec::new())
                })
                .collect();
            for slice in cluster.slices {
                if let Some(list) = slice_service(slice).and_then(|key| slices_of.get_mut(&key)) {
                    list.push(slice);
                }
            }
            for k8s in changed {
                let namespace = k8s.metadata.namespace.clone().unwrap_or_default();
                let name = k8s.metadata.name.clone().unwrap_or_default();
                let slices = &slices_of[&(namespace.as_str(), name.as_str())];
                let index = index_slices(slices, cluster.node, cluster.zone);
                match service_part(k8s, index.values().next(), cluster.node_addresses) {
                    Some(part) => self.parts.insert((namespace, name), Arc::new(part)),
                    None => self.parts.remove(&(namespace, name)),
                };
            }
        }
        crate::control::run::phase("kube:   changed services worked out");
        assemble(self.parts.values().map(|part| &**part))
    }

    /// Objects without resourceVersions (not from an API server): worked out whole, nothing kept.
    fn uncached(&mut self, cluster: &Cluster<'_>) -> NodeServices {
        *self = Self::default();
        node_services(cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceSpec, ServiceStatus};
    use k8s_openapi::api::discovery::v1::{Endpoint as K8sEndpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    fn svc(name: &str, spec: ServiceSpec) -> K8sService {
        K8sService {
            metadata: meta(name, &[]),
            spec: Some(spec),
            status: None,
        }
    }

    /// A ClusterIP Service of one TCP port 80 named `port_name`.
    fn tcp_service(name: &str, ip: &str, port_name: &str) -> K8sService {
        svc(
            name,
            ServiceSpec {
                cluster_ip: Some(ip.into()),
                cluster_ips: Some(vec![ip.into()]),
                ports: Some(vec![port(port_name, 80, "TCP")]),
                ..ServiceSpec::default()
            },
        )
    }

    fn port(name: &str, number: i32, protocol: &str) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port: number,
            protocol: Some(protocol.into()),
            ..ServicePort::default()
        }
    }

    /// (address, ready, serving, terminating, node)
    type Ep<'a> = (&'a str, bool, bool, bool, &'a str);

    fn slice(
        service: &str,
        family: &str,
        ports: &[(&str, i32, &str)],
        endpoints: &[Ep<'_>],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: meta(&format!("{service}-x"), &[(SERVICE_NAME_LABEL, service)]),
            address_type: family.into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, number, protocol)| EndpointPort {
                        name: Some(name.to_string()),
                        port: Some(*number),
                        protocol: Some(protocol.to_string()),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
            endpoints: endpoints
                .iter()
                .map(|(addr, ready, serving, terminating, node)| K8sEndpoint {
                    addresses: vec![addr.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        serving: Some(*serving),
                        terminating: Some(*terminating),
                    }),
                    node_name: Some(node.to_string()),
                    ..K8sEndpoint::default()
                })
                .collect(),
        }
    }

    fn run(services: &[K8sService], slices: &[EndpointSlice], node_addresses: &[IpAddr]) -> NodeServices {
        let services: Vec<&K8sService> = services.iter().collect();
        let slices: Vec<&EndpointSlice> = slices.iter().collect();
        node_services(&Cluster {
            services: &services,
            slices: &slices,
            node: "me",
            zone: Some("zone-a"),
            node_addresses,
        })
    }

    fn text(services: &[Service]) -> Vec<String> {
        services
            .iter()
            .map(|s| {
                let backends: Vec<String> = s.backends.iter().map(|b| b.to_string()).collect();
                format!(
                    "{}:{}={}{}",
                    s.protocol.map_or("both", |p| p.name()),
                    s.vip,
                    if backends.is_empty() {
                        "reject".into()
                    } else {
                        backends.join(",")
                    },
                    s.affinity
                        .map(|a| format!(" affinity {}s", a.as_secs()))
                        .unwrap_or_default()
                )
            })
            .collect()
    }

    const READY: bool = true;

    #[test]
    fn cluster_ips_per_family_port_and_protocol_join_slices_by_port_name() {
        let service = svc(
            "dns",
            ServiceSpec {
                cluster_ips: Some(vec!["10.96.0.10".into(), "fd00::10".into()]),
                ports: Some(vec![port("dns", 53, "UDP"), port("dns-tcp", 53, "TCP")]),
                ..ServiceSpec::default()
            },
        );
        let v4 = slice(
            "dns",
            "IPv4",
            &[("dns", 5353, "UDP"), ("dns-tcp", 5354, "TCP")],
            &[
                ("10.0.0.1", READY, true, false, "a"),
                ("10.0.0.2", READY, true, false, "b"),
            ],
        );
        let v6 = slice(
            "dns",
            "IPv6",
            &[("dns", 5353, "UDP")],
            &[("fd00::1", READY, true, false, "a")],
        );
        let out = run(&[service], &[v4, v6], &[]);
        assert_eq!(
            text(&out.cluster),
            [
                "udp:10.96.0.10:53=10.0.0.1:5353,10.0.0.2:5353",
                "udp:[fd00::10]:53=[fd00::1]:5353",
                "tcp:10.96.0.10:53=10.0.0.1:5354,10.0.0.2:5354",
                // no IPv6 endpoint for the TCP port: refused, not missing
                "tcp:[fd00::10]:53=reject",
            ]
        );
        assert!(out.external.is_empty());
        assert_eq!(out.count, 1);
    }

    #[test]
    fn readiness_terminating_endpoints_drain_and_serve_only_without_ready_ones() {
        let service = tcp_service("web", "10.96.0.20", "");
        let mixed = slice(
            "web",
            "IPv4",
            &[("", 8080, "TCP")],
            &[
                ("10.0.0.1", READY, true, false, "a"),
                ("10.0.0.2", false, true, true, "a"),
                ("10.0.0.3", false, false, true, "a"),
                ("10.0.0.4", false, false, false, "a"),
            ],
        );
        let out = run(std::slice::from_ref(&service), &[mixed], &[]);
        assert_eq!(
            text(&out.cluster),
            ["tcp:10.96.0.20:80=10.0.0.1:8080,10.0.0.2:8080;state=draining"]
        );
        let only_terminating = slice(
            "web",
            "IPv4",
            &[("", 8080, "TCP")],
            &[("10.0.0.2", false, true, true, "a")],
        );
        let out = run(&[service], &[only_terminating], &[]);
        assert_eq!(text(&out.cluster), ["tcp:10.96.0.20:80=10.0.0.2:8080"]);
    }

    #[test]
    fn headless_other_proxies_external_names_and_sctp_are_not_served() {
        let mut other = tcp_service("other", "10.96.0.30", "");
        other.metadata.labels = Some([(PROXY_NAME_LABEL.to_string(), "x".to_string())].into());
        let headless = svc(
            "headless",
            ServiceSpec {
                cluster_ip: Some("None".into()),
                ports: Some(vec![port("", 80, "TCP")]),
                ..ServiceSpec::default()
            },
        );
        let sctp = svc(
            "sctp",
            ServiceSpec {
                cluster_ip: Some("10.96.0.31".into()),
                ports: Some(vec![port("s", 9, "SCTP"), port("t", 9, "TCP")]),
                ..ServiceSpec::default()
            },
        );
        let name = svc(
            "name",
            ServiceSpec {
                type_: Some("ExternalName".into()),
                external_name: Some("example.org".into()),
                ..ServiceSpec::default()
            },
        );
        let out = run(&[other, headless, sctp, name], &[], &[]);
        assert_eq!(text(&out.cluster), ["tcp:10.96.0.31:9=reject"]);
        assert_eq!(
            out.skipped,
            ["service ns/sctp port s: protocol SCTP is not supported (TCP and UDP are)"]
        );
    }

    #[test]
    fn node_ports_load_balancer_ips_external_ips_affinity_and_local_policies() {
        let mut lb = svc(
            "lb",
            ServiceSpec {
                type_: Some("LoadBalancer".into()),
                cluster_ips: Some(vec!["10.96.0.40".into()]),
                external_ips: Some(vec!["192.0.2.7".into()]),
                ports: Some(vec![ServicePort {
                    node_port: Some(30080),
                    ..port("http", 80, "TCP")
                }]),
                external_traffic_policy: Some("Local".into()),
                health_check_node_port: Some(31000),
                session_affinity: Some("ClientIP".into()),
                ..ServiceSpec::default()
            },
        );
        lb.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    LoadBalancerIngress {
                        ip: Some("198.51.100.1".into()),
                        ..LoadBalancerIngress::default()
                    },
                    LoadBalancerIngress {
                        ip: Some("198.51.100.2".into()),
                        ip_mode: Some("Proxy".into()),
                        ..LoadBalancerIngress::default()
                    },
                ]),
            }),
            ..ServiceStatus::default()
        });
        let slices = [slice(
            "lb",
            "IPv4",
            &[("http", 8080, "TCP")],
            &[
                ("10.0.0.1", READY, true, false, "me"),
                ("10.0.0.2", READY, true, false, "other"),
            ],
        )];
        let node: [IpAddr; 2] = ["172.16.0.5".parse().unwrap(), "fd00:1::5".parse().unwrap()];
        let out = run(&[lb], &slices, &node);
        // the ClusterIP serves every endpoint (internalTrafficPolicy Cluster)
        assert_eq!(
            text(&out.cluster),
            ["tcp:10.96.0.40:80=10.0.0.1:8080,10.0.0.2:8080 affinity 10800s"]
        );
        // external ones this node's only; the IPv6 node address not (an IPv4 service)
        assert_eq!(
            text(&out.external),
            [
                "tcp:192.0.2.7:80=10.0.0.1:8080 affinity 10800s",
                "tcp:198.51.100.1:80=10.0.0.1:8080 affinity 10800s",
                "tcp:172.16.0.5:30080=10.0.0.1:8080 affinity 10800s",
            ]
        );
        assert_eq!(
            out.health_ports,
            [HealthPort {
                port: 31000,
                namespace: "ns".into(),
                name: "lb".into(),
                local_endpoints: 1
            }]
        );
    }

    #[test]
    fn internal_local_keeps_node_endpoints_and_refuses_without_them() {
        let service = svc(
            "loc",
            ServiceSpec {
                cluster_ip: Some("10.96.0.50".into()),
                ports: Some(vec![port("", 80, "TCP")]),
                internal_traffic_policy: Some("Local".into()),
                ..ServiceSpec::default()
            },
        );
        let elsewhere = slice(
            "loc",
            "IPv4",
            &[("", 80, "TCP")],
            &[("10.0.0.9", READY, true, false, "other")],
        );
        assert_eq!(
            text(&run(std::slice::from_ref(&service), &[elsewhere], &[]).cluster),
            ["tcp:10.96.0.50:80=reject"]
        );
        let here = slice(
            "loc",
            "IPv4",
            &[("", 80, "TCP")],
            &[("10.0.0.8", READY, true, false, "me")],
        );
        assert_eq!(
            text(&run(&[service], &[here], &[]).cluster),
            ["tcp:10.96.0.50:80=10.0.0.8:80"]
        );
    }

    #[test]
    fn an_endpoint_in_two_slices_is_one_backend() {
        let service = tcp_service("dup", "10.96.0.60", "");
        let mut second = slice(
            "dup",
            "IPv4",
            &[("", 80, "TCP")],
            &[("10.0.0.1", false, true, true, "a")],
        );
        second.metadata.name = Some("dup-y".into());
        let first = slice(
            "dup",
            "IPv4",
            &[("", 80, "TCP")],
            &[("10.0.0.1", READY, true, false, "a")],
        );
        assert_eq!(
            text(&run(&[service], &[first, second], &[]).cluster),
            ["tcp:10.96.0.60:80=10.0.0.1:80"]
        );
    }

    #[test]
    fn translator_reuses_unchanged_services_and_matches_node_services() {
        let versioned = |mut meta: ObjectMeta, version: u32| {
            meta.resource_version = Some(version.to_string());
            meta.uid = Some(format!("uid-{}", meta.name.clone().unwrap()));
            meta
        };
        let spec = |ip: &str| ServiceSpec {
            cluster_ip: Some(ip.into()),
            cluster_ips: Some(vec![ip.into()]),
            ports: Some(vec![port("http", 80, "TCP")]),
            ..ServiceSpec::default()
        };
        let mut services: Vec<K8sService> = (0..3)
            .map(|i| {
                let mut service = svc(&format!("s{i}"), spec(&format!("10.96.0.{}", i + 1)));
                service.metadata = versioned(service.metadata, 1);
                service
            })
            .collect();
        let endpoint = |addr: &'static str| -> Ep<'static> { (addr, READY, true, false, "me") };
        let mut slices: Vec<EndpointSlice> = (0..3)
            .map(|i| {
                let mut s = slice(
                    &format!("s{i}"),
                    "IPv4",
                    &[("http", 8080, "TCP")],
                    &[endpoint("10.1.0.1")],
                );
                s.metadata = versioned(s.metadata, 1);
                s
            })
            .collect();
        let mut translator = Translator::default();
        let check = |translator: &mut Translator, services: &[K8sService], slices: &[EndpointSlice]| {
            let service_refs: Vec<&K8sService> = services.iter().collect();
            let slice_refs: Vec<&EndpointSlice> = slices.iter().collect();
            let cluster = Cluster {
                services: &service_refs,
                slices: &slice_refs,
                node: "me",
                zone: Some("zone-a"),
                node_addresses: &[],
            };
            let cached = translator.node_services(&cluster);
            assert_eq!(cached, node_services(&cluster));
            text(&cached.cluster)
        };
        assert_eq!(
            check(&mut translator, &services, &slices),
            [
                "tcp:10.96.0.1:80=10.1.0.1:8080",
                "tcp:10.96.0.2:80=10.1.0.1:8080",
                "tcp:10.96.0.3:80=10.1.0.1:8080"
            ]
        );
        // a slice changed (new resourceVersion): that service again
        slices[1] = slice("s1", "IPv4", &[("http", 8080, "TCP")], &[endpoint("10.1.0.2")]);
        slices[1].metadata = versioned(slices[1].metadata.clone(), 2);
        assert_eq!(
            check(&mut translator, &services, &slices)[1],
            "tcp:10.96.0.2:80=10.1.0.2:8080"
        );
        // a slice gone, a service gone, a service changed
        slices.remove(0);
        services.remove(2);
        services[1].spec = Some(spec("10.96.0.9"));
        services[1].metadata.resource_version = Some("2".into());
        assert_eq!(
            check(&mut translator, &services, &slices),
            ["tcp:10.96.0.1:80=reject", "tcp:10.96.0.9:80=10.1.0.2:8080"]
        );
        // objects without resourceVersions: worked out whole
        services[0].metadata.resource_version = None;
        check(&mut translator, &services, &slices);
    }

    /// (address, zone hint, node hint)
    type Hinted<'a> = (&'a str, Option<&'a str>, Option<&'a str>);

    #[test]
    fn topology_hints_narrow_cluster_endpoints_as_kube_proxy_does() {
        use k8s_openapi::api::discovery::v1::{EndpointHints, ForNode, ForZone};
        let service = tcp_service("web", "10.96.0.80", "http");
        // the node's zone, and its endpoints' hints -> the ClusterIP's backends
        let hinted = |zone: Option<&str>, endpoints: &[Hinted<'_>]| {
            let eps: Vec<Ep<'_>> = endpoints
                .iter()
                .map(|(a, ..)| (*a, READY, true, false, "other"))
                .collect();
            let mut s = slice("web", "IPv4", &[("http", 8080, "TCP")], &eps);
            for (endpoint, (_, zone, node)) in s.endpoints.iter_mut().zip(endpoints) {
                if zone.is_some() || node.is_some() {
                    endpoint.hints = Some(EndpointHints {
                        for_zones: zone.map(|z| vec![ForZone { name: z.into() }]),
                        for_nodes: node.map(|n| vec![ForNode { name: n.into() }]),
                    });
                }
            }
            let (services, slices) = (vec![&service], vec![&s]);
            let cluster = Cluster {
                services: &services,
                slices: &slices,
                node: "me",
                zone,
                node_addresses: &[],
            };
            text(&node_services(&cluster).cluster)
        };
        let both = "tcp:10.96.0.80:80=10.1.0.1:8080,10.1.0.2:8080";
        let zoned = [
            ("10.1.0.1", Some("zone-a"), None),
            ("10.1.0.2", Some("zone-b"), None),
        ];
        #[rustfmt::skip]
        let cases: [(&str, Option<&str>, [Hinted<'_>; 2], &str); 5] = [
            ("every endpoint hinted, one for this node's zone (zone-a): that one",
             Some("zone-a"), zoned, "tcp:10.96.0.80:80=10.1.0.1:8080"),
            ("an endpoint without hints: all",
             Some("zone-a"), [("10.1.0.1", Some("zone-a"), None), ("10.1.0.2", None, None)], both),
            ("hints for other zones only: all",
             Some("zone-a"), [("10.1.0.1", Some("zone-b"), None), ("10.1.0.2", Some("zone-c"), None)], both),
            ("same-node hints (PreferSameNode) before zone hints",
             Some("zone-a"),
             [("10.1.0.1", Some("zone-a"), Some("other")), ("10.1.0.2", Some("zone-a"), Some("me"))],
             "tcp:10.96.0.80:80=10.1.0.2:8080"),
            ("a node without a zone label: zone hints cannot apply", None, zoned, both),
        ];
        for (what, zone, endpoints, expected) in cases {
            assert_eq!(hinted(zone, &endpoints), [expected], "{what}");
        }
    }

    /// Where an update's time goes at 10,000 Services x 10 endpoints, without an API server:
    /// `cargo test --release --lib -- --ignored translator_at_scale --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn translator_at_scale() {
        use std::time::Instant;
        let n = 10_000;
        let services: Vec<K8sService> = (0..n)
            .map(|i| {
                let mut service = tcp_service(
                    &format!("svc-{i}"),
                    &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    "http",
                );
                service.metadata.resource_version = Some("1".into());
                service.metadata.uid = Some(format!("s{i}"));
                service
            })
            .collect();
        let endpoints = |i: usize, v: usize| -> Vec<String> {
            (0..10)
                .map(|e| {
                    format!(
                        "10.{}.{}.{}",
                        128 + v % 64,
                        (i * 10 + e) / 250 % 250,
                        (i * 10 + e) % 250 + 1
                    )
                })
                .collect()
        };
        let make_slice = |i: usize, v: usize| {
            let addrs = endpoints(i, v);
            let eps: Vec<Ep<'_>> = addrs
                .iter()
                .map(|a| (a.as_str(), READY, true, false, "other"))
                .collect();
            let mut s = slice(&format!("svc-{i}"), "IPv4", &[("http", 8080, "TCP")], &eps);
            s.metadata.name = Some(format!("svc-{i}-1"));
            s.metadata.resource_version = Some(v.to_string());
            s.metadata.uid = Some(format!("e{i}"));
            s
        };
        let mut slices: Vec<EndpointSlice> = (0..n).map(|i| make_slice(i, 1)).collect();
        let mut translator = Translator::default();
        let mut last = None;
        let mut times = Vec::new();
        for round in 0..30 {
            let i = round * 7919 % n;
            slices[i] = make_slice(i, round + 2);
            let began = Instant::now();
            let service_refs: Vec<&K8sService> = services.iter().collect();
            let slice_refs: Vec<&EndpointSlice> = slices.iter().collect();
            let cluster = Cluster {
                services: &service_refs,
                slices: &slice_refs,
                node: "me",
                zone: None,
                node_addresses: &[],
            };
            let out = translator.node_services(&cluster);
            let worked_out = began.elapsed();
            let same = last.as_ref() == Some(&out);
            let compared = began.elapsed();
            assert!(!same, "round {round}: an endpoint changed");
            last = Some(out);
            times.push((
                worked_out.as_secs_f64() * 1e3,
                (compared - worked_out).as_secs_f64() * 1e3,
            ));
        }
        for (round, (work, compare)) in times.iter().enumerate() {
            eprintln!("round {round}: worked out {work:.2} ms, compared {compare:.2} ms");
        }
    }
}
