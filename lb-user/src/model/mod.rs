//! The pure model: Service and EndpointSlice objects in, the desired datapath state out.
//! No BPF and no I/O here; this is where kube-proxy's rules live.
//!
//! Rules implemented (kube-proxy's):
//! * Services of type ExternalName, headless services (`clusterIP: None`) and services
//!   without a clusterIP have no data path.
//! * Every `spec.ports[]` entry of a service is one frontend per cluster IP (IPv4 and
//!   IPv6: dual-stack services have one of each), protocol TCP (default) or UDP; SCTP is
//!   refused with a warning.
//! * The same port is also a frontend on every `spec.externalIPs` address and, for type
//!   LoadBalancer, every `status.loadBalancer.ingress[].ip` (not with `ipMode: Proxy`). Its
//!   `nodePort` (types NodePort and LoadBalancer) is a frontend on each node address and on
//!   127.0.0.1. These external frontends balance over all of the service's endpoints: for
//!   traffic from the node itself kube-proxy ignores both traffic policies' Local.
//! * Endpoints come from the EndpointSlices labelled `kubernetes.io/service-name=<svc>` in
//!   the service's namespace, `addressType` IPv4 or IPv6; a frontend uses the endpoints of
//!   its own family. The backend port is the slice port whose name and protocol equal the
//!   service port's (the slice already carries the resolved number of a named or numeric
//!   targetPort).
//! * `sessionAffinity: ClientIP` gives every frontend of the service its affinity timeout
//!   (`sessionAffinityConfig.clientIP.timeoutSeconds`, default 10800, 1..=86400).
//! * An endpoint is used when `conditions.ready` is true or absent; when no endpoint of a
//!   port is ready, the serving-and-terminating ones are used. An address listed in several
//!   slices counts once. kube-proxy uses `addresses[0]` of each endpoint; so do we.
//! * A frontend with no usable endpoint stays, with zero backends: connections to it are
//!   refused (kube-proxy's REJECT), not sent into the void.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{PROTO_TCP, PROTO_UDP};

/// The objects the model works from, as every source emits them.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Self::Tcp),
            PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }

    /// Kubernetes' protocol field; absent means TCP.
    fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Err("SCTP is not supported by this load balancer".to_string()),
            other => Err(format!("unknown protocol {other:?} (want TCP or UDP)")),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// One address:port:protocol that connections are balanced from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

/// A backend pod address and target port (the protocol is the frontend's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", SocketAddr::new(self.addr, self.port))
    }
}

/// What one frontend should balance to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// `namespace/name:port-name` of the service port, for logs and dumps.
    pub service: String,
    pub endpoints: BTreeSet<Endpoint>,
    /// ClientIP affinity timeout in seconds; 0 = no affinity.
    pub affinity_timeout: u32,
}

/// The whole desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, FrontendState>,
}

impl Desired {
    /// Number of distinct services (namespace/name) with at least one frontend.
    pub fn service_count(&self) -> usize {
        self.frontends
            .values()
            .map(|f| f.service.split(':').next().unwrap_or_default())
            .collect::<BTreeSet<_>>()
            .len()
    }
}

/// The model's result: the state plus a warning for every object or field it skipped.
#[derive(Debug, Default)]
pub struct Built {
    pub desired: Desired,
    pub warnings: Vec<String>,
}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<no name>")
    )
}

fn port_u16(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// Turns the objects into the desired state for the node `node_name` (None: no node
/// context, so internalTrafficPolicy Local services get no endpoints and no topology).
/// `node_ips` are the node addresses for nodePorts; empty means the Node object's.
pub fn build(objects: &Objects, node_name: Option<&str>, node_ips: &[IpAddr]) -> Built {
    let node = &NodeInfo::from_objects(node_name, node_ips, objects);
    let mut built = Built::default();
    // Slices by (namespace, service name).
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &objects.slices {
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            built.warnings.push(format!(
                "EndpointSlice {}: field metadata.labels: no {SERVICE_NAME_LABEL} label; skipped",
                ns_name(&slice.metadata)
            ));
            continue;
        };
        let ns = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        slices.entry((ns, svc.clone())).or_default().push(slice);
    }

    let mut services: Vec<&Service> = objects.services.iter().collect();
    services.sort_by_key(|s| ns_name(&s.metadata));
    let mut seen_services = BTreeSet::new();
    for svc in services {
        let name = ns_name(&svc.metadata);
        if !seen_services.insert(name.clone()) {
            built.warnings.push(format!(
                "Service {name}: defined more than once; the first definition is used"
            ));
            continue;
        }
        let ns = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let svc_name = svc.metadata.name.clone().unwrap_or_default();
        let svc_slices = slices
            .get(&(ns, svc_name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        add_service(svc, &name, svc_slices, node, &mut built);
    }
    for ((ns, svc), list) in &slices {
        if !seen_services.contains(&format!("{ns}/{svc}")) {
            for slice in list {
                built.warnings.push(format!(
                    "EndpointSlice {}: field metadata.labels[{SERVICE_NAME_LABEL}]: service {ns}/{svc} does not exist (yet); skipped",
                    ns_name(&slice.metadata)
                ));
            }
        }
    }
    built
}

fn cluster_ips(svc: &Service, name: &str, warnings: &mut Vec<String>) -> Vec<IpAddr> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let (field, ips): (&str, Vec<&String>) = match &spec.cluster_ips {
        Some(list) if !list.is_empty() => ("spec.clusterIPs", list.iter().collect()),
        _ => ("spec.clusterIP", spec.cluster_ip.iter().collect()),
    };
    let mut out = Vec::new();
    for (i, ip) in ips.into_iter().enumerate() {
        let field = if field == "spec.clusterIPs" {
            format!("{field}[{i}]")
        } else {
            field.to_string()
        };
        match ip.as_str() {
            "" => tracing::debug!("Service {name}: no cluster IP; no data path"),
            "None" => tracing::debug!("Service {name}: headless; no data path"),
            text => match text.parse::<IpAddr>() {
                Ok(ip) => out.push(ip),
                Err(_) => warnings.push(format!(
                    "Service {name}: field {field}: {text:?} is not an IP address; skipped"
                )),
            },
        }
    }
    out
}

/// The ClientIP affinity timeout of a service, 0 for none.
fn affinity_timeout(svc: &Service, name: &str, warnings: &mut Vec<String>) -> u32 {
    const DEFAULT: u32 = 10_800;
    const MAX: i32 = 86_400;
    let Some(spec) = &svc.spec else { return 0 };
    match spec.session_affinity.as_deref() {
        None | Some("None") => return 0,
        Some("ClientIP") => {}
        Some(other) => {
            warnings.push(format!(
                "Service {name}: field spec.sessionAffinity: unknown value {other:?} (want None or ClientIP); no affinity"
            ));
            return 0;
        }
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match timeout {
        None => DEFAULT,
        Some(t) if (1..=MAX).contains(&t) => t as u32,
        Some(t) => {
            warnings.push(format!(
                "Service {name}: field spec.sessionAffinityConfig.clientIP.timeoutSeconds: {t} is out of range (1-{MAX}); the default {DEFAULT} is used"
            ));
            DEFAULT
        }
    }
}

/// The addresses besides the cluster IPs that a service port is reachable on, with the
/// field each came from: externalIPs and (type LoadBalancer) ingress IPs.
fn external_ips(svc: &Service, name: &str, warnings: &mut Vec<String>) -> Vec<(IpAddr, String)> {
    let mut out = Vec::new();
    let Some(spec) = &svc.spec else { return out };
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        match text.parse::<IpAddr>() {
            Ok(ip) => out.push((ip, format!("spec.externalIPs[{i}]"))),
            Err(_) => warnings.push(format!(
                "Service {name}: field spec.externalIPs[{i}]: {text:?} is not an IP address; skipped"
            )),
        }
    }
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return out;
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let field = format!("status.loadBalancer.ingress[{i}]");
        let Some(text) = &ing.ip else {
            tracing::debug!("Service {name}: {field} has no ip (hostname only); skipped");
            continue;
        };
        if ing.ip_mode.as_deref() == Some("Proxy") {
            // The load balancer proxies: traffic reaches the node addressed to the node,
            // so kube-proxy does not short-circuit the ingress IP.
            tracing::debug!("Service {name}: {field} has ipMode Proxy; not a frontend");
            continue;
        }
        match text.parse::<IpAddr>() {
            Ok(ip) => out.push((ip, format!("{field}.ip"))),
            Err(_) => warnings.push(format!(
                "Service {name}: field {field}.ip: {text:?} is not an IP address; skipped"
            )),
        }
    }
    out
}

fn add_service(
    svc: &Service,
    name: &str,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    built: &mut Built,
) {
    let Some(spec) = &svc.spec else {
        tracing::debug!("Service {name}: no spec; skipped");
        return;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        tracing::debug!("Service {name}: type ExternalName has no data path; skipped");
        return;
    }
    let ips = cluster_ips(svc, name, &mut built.warnings);
    if ips.is_empty() {
        return;
    }
    let affinity_timeout = affinity_timeout(svc, name, &mut built.warnings);
    let families: BTreeSet<bool> = ips.iter().map(IpAddr::is_ipv4).collect();
    let mut externals = Vec::new();
    for (ip, field) in external_ips(svc, name, &mut built.warnings) {
        if families.contains(&ip.is_ipv4()) {
            externals.push(ip);
        } else {
            built.warnings.push(format!(
                "Service {name}: field {field}: {ip} is not of the family of any cluster IP; skipped"
            ));
        }
    }
    let node_port_type = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut node_addrs: Vec<IpAddr> = node
        .addresses
        .iter()
        .filter(|a| families.contains(&a.is_ipv4()))
        .copied()
        .collect();
    if families.contains(&true) {
        // kube-proxy (iptables mode) also accepts nodePorts on localhost.
        node_addrs.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    for (i, sp) in spec.ports.iter().flatten().enumerate() {
        let proto = match Proto::parse(sp.protocol.as_deref()) {
            Ok(p) => p,
            Err(why) => {
                built.warnings.push(format!(
                    "Service {name}: field spec.ports[{i}].protocol: {why}; port skipped"
                ));
                continue;
            }
        };
        let Some(port) = port_u16(sp.port) else {
            built.warnings.push(format!(
                "Service {name}: field spec.ports[{i}].port: {} is not a port (1-65535); port skipped",
                sp.port
            ));
            continue;
        };
        let node_port = match sp.node_port {
            Some(n) if node_port_type => match port_u16(n) {
                Some(n) => Some(n),
                None => {
                    built.warnings.push(format!(
                        "Service {name}: field spec.ports[{i}].nodePort: {n} is not a port (1-65535); no node port"
                    ));
                    None
                }
            },
            _ => None,
        };
        let port_name = sp.name.clone().unwrap_or_default();
        let candidates = endpoints_for(&port_name, proto, slices, &mut built.warnings);
        let label = if port_name.is_empty() {
            name.to_string()
        } else {
            format!("{name}:{port_name}")
        };
        // (address, port, internal): cluster IPs follow internalTrafficPolicy.
        let mut frontends: Vec<(IpAddr, u16, bool)> =
            ips.iter().map(|ip| (*ip, port, true)).collect();
        frontends.extend(externals.iter().map(|ip| (*ip, port, false)));
        if let Some(np) = node_port {
            frontends.extend(node_addrs.iter().map(|ip| (*ip, np, false)));
        }
        for (addr, port, internal) in frontends {
            let fe = Frontend { addr, port, proto };
            if let Some(other) = built.desired.frontends.get(&fe) {
                built.warnings.push(format!(
                    "Service {name}: field spec.ports[{i}]: frontend {fe} is already used by {}; skipped",
                    other.service
                ));
                continue;
            }
            let family: Vec<Candidate> = candidates
                .iter()
                .filter(|c| c.endpoint.addr.is_ipv4() == addr.is_ipv4())
                .cloned()
                .collect();
            built.desired.frontends.insert(
                fe,
                FrontendState {
                    service: label.clone(),
                    endpoints: select(svc, &family, node, internal),
                    affinity_timeout,
                },
            );
        }
    }
}

/// One endpoint of a service port with what the selection rules look at.
#[derive(Clone, Debug)]
struct Candidate {
    endpoint: Endpoint,
    ready: bool,
    serving: bool,
    terminating: bool,
    node_name: Option<String>,
    /// `hints.forZones[].name`; empty when the endpoint has no zone hints.
    zone_hints: BTreeSet<String>,
}

/// The usable endpoints of one service port, over all of the service's slices.
fn endpoints_for(
    port_name: &str,
    proto: Proto,
    slices: &[&EndpointSlice],
    warnings: &mut Vec<String>,
) -> Vec<Candidate> {
    // By endpoint: an address listed in several slices counts once (the ready copy wins).
    let mut candidates: BTreeMap<Endpoint, Candidate> = BTreeMap::new();
    for slice in slices {
        let slice_name = ns_name(&slice.metadata);
        let want_v4 = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            other => {
                tracing::debug!(
                    "EndpointSlice {slice_name}: addressType {other} has no data path; skipped"
                );
                continue;
            }
        };
        let mut target = None;
        for (j, p) in slice.ports.iter().flatten().enumerate() {
            let same_name = p.name.as_deref().unwrap_or("") == port_name;
            if !same_name || Proto::parse(p.protocol.as_deref()) != Ok(proto) {
                continue;
            }
            match p.port.map(port_u16) {
                Some(Some(n)) => target = Some(n),
                Some(None) => warnings.push(format!(
                    "EndpointSlice {slice_name}: field ports[{j}].port: {} is not a port (1-65535); skipped",
                    p.port.unwrap_or_default()
                )),
                None => tracing::debug!("EndpointSlice {slice_name}: ports[{j}] has no port number"),
            }
        }
        let Some(target) = target else {
            continue;
        };
        for (k, ep) in slice.endpoints.iter().enumerate() {
            let Some(text) = ep.addresses.first() else {
                continue;
            };
            let addr = match text.parse::<IpAddr>() {
                Ok(a) if a.is_ipv4() == want_v4 => a,
                _ => {
                    warnings.push(format!(
                        "EndpointSlice {slice_name}: field endpoints[{k}].addresses[0]: {text:?} is not an {} address; endpoint skipped",
                        slice.address_type
                    ));
                    continue;
                }
            };
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let candidate = Candidate {
                endpoint: Endpoint { addr, port: target },
                ready,
                serving: cond.and_then(|c| c.serving).unwrap_or(ready),
                terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                node_name: ep.node_name.clone(),
                zone_hints: ep
                    .hints
                    .as_ref()
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|zones| zones.iter().map(|z| z.name.clone()).collect())
                    .unwrap_or_default(),
            };
            match candidates.get(&candidate.endpoint) {
                Some(existing) if existing.ready || !candidate.ready => {}
                _ => {
                    candidates.insert(candidate.endpoint, candidate);
                }
            }
        }
    }
    candidates.into_values().collect()
}

/// The node the agent programs: its name (for internalTrafficPolicy Local), zone (for
/// topology-aware routing) and addresses (for nodePorts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: Option<String>,
    pub zone: Option<String>,
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    /// The zone comes from the Node object's `topology.kubernetes.io/zone` label; the
    /// addresses are `node_ips` or, when that is empty, the Node's InternalIP and
    /// ExternalIP addresses.
    pub fn from_objects(name: Option<&str>, node_ips: &[IpAddr], objects: &Objects) -> Self {
        let node = name.and_then(|n| {
            objects
                .nodes
                .iter()
                .find(|node| node.metadata.name.as_deref() == Some(n))
        });
        let zone = node
            .and_then(|node| node.metadata.labels.as_ref())
            .and_then(|l| l.get(ZONE_LABEL))
            .filter(|z| !z.is_empty())
            .cloned();
        let mut addresses: Vec<IpAddr> = node_ips.to_vec();
        if addresses.is_empty() {
            let listed = node
                .and_then(|n| n.status.as_ref())
                .and_then(|s| s.addresses.as_ref());
            for a in listed.into_iter().flatten() {
                if !matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
                    continue;
                }
                match a.address.parse::<IpAddr>() {
                    Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
                    Ok(_) => {}
                    Err(_) => tracing::warn!(
                        "Node {}: field status.addresses: {:?} is not an IP address; skipped",
                        name.unwrap_or_default(),
                        a.address
                    ),
                }
            }
        }
        Self {
            name: name.map(str::to_string),
            zone,
            addresses,
        }
    }
}

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";

/// kube-proxy's `canUseTopology`: the service asks for it (trafficDistribution PreferClose,
/// or the topology-mode annotation Auto), the node has a zone, every ready endpoint has
/// zone hints, and at least one is hinted for this node's zone.
fn can_use_topology(svc: &Service, candidates: &[Candidate], node: &NodeInfo) -> bool {
    let annotations = svc.metadata.annotations.as_ref();
    let annotation = annotations
        .and_then(|a| a.get(TOPOLOGY_MODE_ANNOTATION))
        .or_else(|| annotations.and_then(|a| a.get(TOPOLOGY_HINTS_ANNOTATION)))
        .map(String::as_str);
    let prefer_close = svc
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref())
        == Some("PreferClose");
    if !prefer_close && !matches!(annotation, Some("Auto" | "auto")) {
        return false;
    }
    let Some(zone) = &node.zone else {
        return false;
    };
    let mut for_zone = false;
    for c in candidates.iter().filter(|c| c.ready) {
        if c.zone_hints.is_empty() {
            return false;
        }
        for_zone |= c.zone_hints.contains(zone);
    }
    for_zone
}

/// kube-proxy's endpoint selection: for a cluster IP (`internal`, internalTrafficPolicy
/// applies) or for an external frontend reached from this node (all cluster endpoints).
fn select(
    svc: &Service,
    candidates: &[Candidate],
    node: &NodeInfo,
    internal: bool,
) -> BTreeSet<Endpoint> {
    let pick = |f: &dyn Fn(&Candidate) -> bool| -> BTreeSet<Endpoint> {
        candidates
            .iter()
            .filter(|c| f(c))
            .map(|c| c.endpoint)
            .collect()
    };
    let internal_local = svc
        .spec
        .as_ref()
        .and_then(|s| s.internal_traffic_policy.as_deref())
        == Some("Local");
    if internal && internal_local {
        // Only endpoints on this node; ready ones, else serving-and-terminating ones.
        let local = |c: &Candidate| node.name.is_some() && c.node_name == node.name;
        let ready = pick(&|c| c.ready && local(c));
        if !ready.is_empty() {
            return ready;
        }
        return pick(&|c| c.serving && c.terminating && local(c));
    }
    let topology = can_use_topology(svc, candidates, node);
    let zone = node.zone.clone().unwrap_or_default();
    let ready = pick(&|c| c.ready && (!topology || c.zone_hints.contains(&zone)));
    if !ready.is_empty() {
        return ready;
    }
    pick(&|c| c.serving && c.terminating)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize as _;

    /// The objects of a multi-document YAML text (the model's tests need no source).
    fn objects_from(yaml: &str) -> Objects {
        let mut objects = Objects::default();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_yaml::Value::deserialize(doc).expect("YAML");
            match value.get("kind").and_then(|k| k.as_str()) {
                Some("Service") => objects
                    .services
                    .push(serde_yaml::from_value(value).unwrap()),
                Some("EndpointSlice") => {
                    objects.slices.push(serde_yaml::from_value(value).unwrap())
                }
                Some("Node") => objects.nodes.push(serde_yaml::from_value(value).unwrap()),
                None if value.is_null() => {}
                other => panic!("unexpected kind {other:?}"),
            }
        }
        objects
    }

    fn build_from(yaml: &str) -> Built {
        build(&objects_from(yaml), Some("node-a"), &[])
    }

    fn fe(addr: &str, port: u16, proto: Proto) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            proto,
        }
    }

    fn eps(list: &[(&str, u16)]) -> BTreeSet<Endpoint> {
        list.iter()
            .map(|(a, p)| Endpoint {
                addr: a.parse().unwrap(),
                port: *p,
            })
            .collect()
    }

    const WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.1.2]
  conditions: {ready: true}
- addresses: [10.244.2.2]
- addresses: [10.244.3.2]
  conditions: {ready: false}
";

    #[test]
    fn ports_protocols_named_target_and_ready_endpoints() {
        let b = build_from(WEB);
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        let http = &b.desired.frontends[&fe("10.96.0.10", 80, Proto::Tcp)];
        assert_eq!(http.service, "shop/web:http");
        assert_eq!(
            http.endpoints,
            eps(&[("10.244.1.2", 8080), ("10.244.2.2", 8080)]),
            "ready absent counts as ready; ready=false is left out"
        );
        let dns = &b.desired.frontends[&fe("10.96.0.10", 53, Proto::Udp)];
        assert_eq!(
            dns.endpoints,
            eps(&[("10.244.1.2", 5353), ("10.244.2.2", 5353)]),
            "named targetPort resolved through the slice's port of the same name"
        );
        assert_eq!(b.desired.frontends.len(), 2);
        assert_eq!(b.desired.service_count(), 1);
    }

    #[test]
    fn headless_external_name_and_no_cluster_ip_have_no_frontend() {
        let b = build_from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: e}\nspec: {type: ExternalName, externalName: example.com}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: n}\nspec: {ports: [{port: 80}]}\n",
        );
        assert!(b.desired.frontends.is_empty());
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
    }

    #[test]
    fn no_slices_means_a_frontend_without_backends() {
        let b = build_from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: lonely}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n",
        );
        let f = &b.desired.frontends[&fe("10.96.0.5", 80, Proto::Tcp)];
        assert!(f.endpoints.is_empty());
        assert_eq!(f.service, "default/lonely");
    }

    #[test]
    fn slices_of_other_services_or_namespaces_are_not_used() {
        let yaml = WEB.replace("namespace: shop\n  labels", "namespace: other\n  labels");
        let b = build_from(&yaml);
        assert!(
            b.desired.frontends[&fe("10.96.0.10", 80, Proto::Tcp)]
                .endpoints
                .is_empty()
        );
    }

    #[test]
    fn several_slices_are_joined_and_duplicates_counted_once() {
        let yaml = format!(
            "{WEB}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-def\n  namespace: shop\n  \
             labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints:\n- addresses: [10.244.1.2]\n- addresses: [10.244.4.2]\n"
        );
        let b = build_from(&yaml);
        assert_eq!(
            b.desired.frontends[&fe("10.96.0.10", 80, Proto::Tcp)].endpoints,
            eps(&[
                ("10.244.1.2", 8080),
                ("10.244.2.2", 8080),
                ("10.244.4.2", 8080)
            ])
        );
    }

    #[test]
    fn terminating_serving_endpoints_are_the_fallback_only() {
        let slice = |conds: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {{clusterIP: 10.96.0.7, ports: [{{port: 80}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s-1\n  labels: {{kubernetes.io/service-name: s}}\n\
                 addressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n{conds}"
            )
        };
        let only_terminating = slice(
            "- addresses: [10.0.0.1]\n  conditions: {ready: false, serving: true, terminating: true}\n\
             - addresses: [10.0.0.2]\n  conditions: {ready: false, serving: false, terminating: true}\n",
        );
        let b = build_from(&only_terminating);
        assert_eq!(
            b.desired.frontends[&fe("10.96.0.7", 80, Proto::Tcp)].endpoints,
            eps(&[("10.0.0.1", 80)])
        );
        let with_ready = slice(
            "- addresses: [10.0.0.1]\n  conditions: {ready: false, serving: true, terminating: true}\n\
             - addresses: [10.0.0.3]\n  conditions: {ready: true}\n",
        );
        let b = build_from(&with_ready);
        assert_eq!(
            b.desired.frontends[&fe("10.96.0.7", 80, Proto::Tcp)].endpoints,
            eps(&[("10.0.0.3", 80)])
        );
    }

    #[test]
    fn bad_values_warn_with_object_and_field_and_the_rest_works() {
        let yaml = format!(
            "{WEB}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad-ip}}\nspec: {{clusterIP: 10.96.0.300, ports: [{{port: 80}}]}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: sctp}}\nspec: {{clusterIP: 10.96.0.11, ports: [{{port: 80, protocol: SCTP}}, {{port: 81}}]}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: big}}\nspec: {{clusterIP: 10.96.0.12, ports: [{{port: 70000}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-bad\n  namespace: shop\n  \
             labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints:\n- addresses: [not-an-ip]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: orphan}}\naddressType: IPv4\nendpoints: []\n"
        );
        let b = build_from(&yaml);
        let w = b.warnings.join("\n");
        assert!(
            w.contains("Service default/bad-ip: field spec.clusterIP: \"10.96.0.300\""),
            "{w}"
        );
        assert!(
            w.contains("Service default/sctp: field spec.ports[0].protocol: SCTP"),
            "{w}"
        );
        assert!(
            w.contains("Service default/big: field spec.ports[0].port: 70000"),
            "{w}"
        );
        assert!(
            w.contains(
                "EndpointSlice shop/web-bad: field endpoints[0].addresses[0]: \"not-an-ip\""
            ),
            "{w}"
        );
        assert!(
            w.contains("EndpointSlice default/orphan: field metadata.labels"),
            "{w}"
        );
        assert_eq!(b.warnings.len(), 5, "{w}");
        assert!(
            b.desired
                .frontends
                .contains_key(&fe("10.96.0.11", 81, Proto::Tcp))
        );
        assert_eq!(
            b.desired.frontends[&fe("10.96.0.10", 80, Proto::Tcp)]
                .endpoints
                .len(),
            2,
            "the good service keeps its endpoints"
        );
    }

    #[test]
    fn dual_cluster_ips_and_clashing_frontends() {
        let b = build_from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIPs: [10.96.0.1, 'fd00::1'], ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}, {port: 81}]}\n",
        );
        assert_eq!(
            b.desired.frontends[&fe("10.96.0.1", 80, Proto::Tcp)].service,
            "default/a"
        );
        assert_eq!(
            b.desired.frontends[&fe("10.96.0.1", 81, Proto::Tcp)].service,
            "default/b"
        );
        assert_eq!(b.warnings.len(), 1, "{:?}", b.warnings);
        assert!(b.warnings[0].contains("already used by default/a"));
    }

    /// A service with `spec_extra` and `annotations`, and one slice whose endpoints are
    /// given as YAML list items.
    fn svc_with(spec_extra: &str, annotations: &str, endpoints: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: n{annotations}}}\n\
             spec: {{clusterIP: 10.96.0.9, ports: [{{port: 80}}]{spec_extra}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s-1\n  namespace: n\n  \
             labels: {{kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n{endpoints}"
        )
    }

    const NODE_A_ZONE_1: &str = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {topology.kubernetes.io/zone: zone-1}\n";

    fn selected(yaml: &str) -> BTreeSet<Endpoint> {
        let b = build_from(yaml);
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        b.desired.frontends[&fe("10.96.0.9", 80, Proto::Tcp)]
            .endpoints
            .clone()
    }

    #[test]
    fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
        let eps_yaml = "- addresses: [10.0.0.1]\n  nodeName: node-a\n\
                        - addresses: [10.0.0.2]\n  nodeName: node-b\n\
                        - addresses: [10.0.0.3]\n";
        assert_eq!(
            selected(&svc_with(", internalTrafficPolicy: Local", "", eps_yaml)),
            eps(&[("10.0.0.1", 80)])
        );
        assert_eq!(
            selected(&svc_with(", internalTrafficPolicy: Cluster", "", eps_yaml)).len(),
            3
        );
        // No local endpoint: nothing (connections are refused), even with remote ones.
        let remote_only = "- addresses: [10.0.0.2]\n  nodeName: node-b\n";
        assert!(selected(&svc_with(", internalTrafficPolicy: Local", "", remote_only)).is_empty());
        // Local terminating-but-serving endpoints are the fallback.
        let terminating = "- addresses: [10.0.0.1]\n  nodeName: node-a\n  conditions: {ready: false, serving: true, terminating: true}\n\
                           - addresses: [10.0.0.2]\n  nodeName: node-b\n";
        assert_eq!(
            selected(&svc_with(", internalTrafficPolicy: Local", "", terminating)),
            eps(&[("10.0.0.1", 80)])
        );
    }

    #[test]
    fn prefer_close_and_topology_mode_auto_use_zone_hints() {
        let hinted = "- addresses: [10.0.0.1]\n  hints: {forZones: [{name: zone-1}]}\n\
                      - addresses: [10.0.0.2]\n  hints: {forZones: [{name: zone-2}]}\n";
        let zone1 = eps(&[("10.0.0.1", 80)]);
        let both = eps(&[("10.0.0.1", 80), ("10.0.0.2", 80)]);
        let prefer_close = ", trafficDistribution: PreferClose";
        let auto = ", annotations: {service.kubernetes.io/topology-mode: Auto}";
        assert_eq!(
            selected(&(svc_with(prefer_close, "", hinted) + NODE_A_ZONE_1)),
            zone1
        );
        assert_eq!(
            selected(&(svc_with("", auto, hinted) + NODE_A_ZONE_1)),
            zone1
        );
        // Not asked for: hints are ignored.
        assert_eq!(selected(&(svc_with("", "", hinted) + NODE_A_ZONE_1)), both);
        // The node has no zone (no Node object): hints are ignored.
        assert_eq!(selected(&svc_with(prefer_close, "", hinted)), both);
        // One ready endpoint without hints disables topology for the service.
        let partly = "- addresses: [10.0.0.1]\n  hints: {forZones: [{name: zone-1}]}\n- addresses: [10.0.0.2]\n";
        assert_eq!(
            selected(&(svc_with(prefer_close, "", partly) + NODE_A_ZONE_1)),
            both
        );
        // No endpoint is hinted for this zone: all are used.
        let elsewhere = "- addresses: [10.0.0.1]\n  hints: {forZones: [{name: zone-3}]}\n\
                         - addresses: [10.0.0.2]\n  hints: {forZones: [{name: zone-2}]}\n";
        assert_eq!(
            selected(&(svc_with(prefer_close, "", elsewhere) + NODE_A_ZONE_1)),
            both
        );
    }

    #[test]
    fn duplicate_endpoint_prefers_the_ready_copy() {
        let dup = "- addresses: [10.0.0.1]\n  conditions: {ready: false}\n- addresses: [10.0.0.1]\n  conditions: {ready: true}\n";
        assert_eq!(selected(&svc_with("", "", dup)), eps(&[("10.0.0.1", 80)]));
    }

    #[test]
    fn slice_port_out_of_range_warns_and_leaves_the_port_without_endpoints() {
        let yaml = svc_with("", "", "- addresses: [10.0.0.1]\n").replace(
            "ports: [{port: 80}]\nendpoints",
            "ports: [{port: 0}]\nendpoints",
        );
        let objects = objects_from(&yaml);
        let b = build(&objects, Some("node-a"), &[]);
        assert_eq!(b.warnings.len(), 1, "{:?}", b.warnings);
        assert!(
            b.warnings[0].starts_with("EndpointSlice n/s-1: field ports[0].port: 0 is not a port")
        );
        assert!(
            b.desired.frontends[&fe("10.96.0.9", 80, Proto::Tcp)]
                .endpoints
                .is_empty()
        );
    }

    #[test]
    fn slice_addresses_must_match_the_address_type_and_fqdn_slices_are_skipped() {
        let yaml = svc_with("", "", "- addresses: [10.0.0.1]\n")
            .replace("addressType: IPv4", "addressType: IPv6");
        let b = build_from(&yaml);
        assert!(
            b.desired.frontends[&fe("10.96.0.9", 80, Proto::Tcp)]
                .endpoints
                .is_empty()
        );
        assert_eq!(b.warnings.len(), 1, "{:?}", b.warnings);
        assert!(
            b.warnings[0]
                .contains("field endpoints[0].addresses[0]: \"10.0.0.1\" is not an IPv6 address"),
            "{}",
            b.warnings[0]
        );
        let fqdn = svc_with("", "", "- addresses: [db.example.com]\n")
            .replace("addressType: IPv4", "addressType: FQDN");
        assert!(selected(&fqdn).is_empty());
    }

    const DUAL: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: d, namespace: n}\n\
        spec: {clusterIPs: [10.96.0.9, 'fd00:96::9'], ipFamilies: [IPv4, IPv6], ports: [{port: 80, targetPort: 8080}]}\n---\n\
        apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: d-4, namespace: n, labels: {kubernetes.io/service-name: d}}\n\
        addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]\n---\n\
        apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: d-6, namespace: n, labels: {kubernetes.io/service-name: d}}\n\
        addressType: IPv6\nports: [{port: 8080}]\nendpoints: [{addresses: ['fd00:244::1']}]\n";

    #[test]
    fn dual_stack_frontends_use_the_endpoints_of_their_family() {
        let b = build_from(DUAL);
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        assert_eq!(
            b.desired.frontends[&fe("10.96.0.9", 80, Proto::Tcp)].endpoints,
            eps(&[("10.0.0.1", 8080), ("10.0.0.2", 8080)])
        );
        assert_eq!(
            b.desired.frontends[&fe("fd00:96::9", 80, Proto::Tcp)].endpoints,
            eps(&[("fd00:244::1", 8080)])
        );
        assert_eq!(
            fe("fd00:96::9", 80, Proto::Tcp).to_string(),
            "[fd00:96::9]:80/TCP"
        );
    }

    #[test]
    fn session_affinity_client_ip_timeout_default_range_and_bad_values() {
        let timeout = |extra: &str| {
            let b = build_from(&svc_with(extra, "", "- addresses: [10.0.0.1]\n"));
            (
                b.desired.frontends[&fe("10.96.0.9", 80, Proto::Tcp)].affinity_timeout,
                b.warnings,
            )
        };
        assert_eq!(timeout(""), (0, vec![]));
        assert_eq!(timeout(", sessionAffinity: None"), (0, vec![]));
        assert_eq!(timeout(", sessionAffinity: ClientIP"), (10_800, vec![]));
        assert_eq!(
            timeout(
                ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}"
            ),
            (5, vec![])
        );
        let (t, w) = timeout(
            ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}",
        );
        assert_eq!(t, 10_800);
        assert!(
            w[0].contains(
                "field spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is out of range"
            ),
            "{w:?}"
        );
        let (t, w) = timeout(", sessionAffinity: Cookie");
        assert_eq!(t, 0);
        assert!(
            w[0].contains("field spec.sessionAffinity: unknown value \"Cookie\""),
            "{w:?}"
        );
    }

    /// A NodePort/LoadBalancer service `s` in namespace `n` (ports 80 -> nodePort 30080)
    /// with internalTrafficPolicy Local, a local and a remote endpoint, and node-a's Node.
    fn exposed(spec_extra: &str, status: &str) -> String {
        svc_with(
            &format!(", internalTrafficPolicy: Local{spec_extra}"),
            "",
            "- addresses: [10.0.0.1]\n  nodeName: node-a\n- addresses: [10.0.0.2]\n  nodeName: node-b\n",
        )
        .replace("ports: [{port: 80}]", "ports: [{port: 80, nodePort: 30080}]")
        .replace("\n---\napiVersion: discovery", &format!("\n{status}---\napiVersion: discovery"))
            + "---\napiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n\
               status: {addresses: [{type: InternalIP, address: 192.0.2.1}, {type: Hostname, address: node-a}, {type: ExternalIP, address: 'fd00:1::1'}]}\n"
    }

    #[test]
    fn node_ports_on_node_addresses_and_localhost_use_all_endpoints() {
        let b = build_from(&exposed(", type: NodePort", ""));
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        let all = eps(&[("10.0.0.1", 80), ("10.0.0.2", 80)]);
        let got: BTreeMap<Frontend, BTreeSet<Endpoint>> = b
            .desired
            .frontends
            .iter()
            .map(|(f, s)| (*f, s.endpoints.clone()))
            .collect();
        assert_eq!(
            got,
            BTreeMap::from([
                // The cluster IP follows internalTrafficPolicy Local ...
                (fe("10.96.0.9", 80, Proto::Tcp), eps(&[("10.0.0.1", 80)])),
                // ... the node ports do not (traffic from the node itself). The IPv6
                // node address has no IPv6 cluster IP to go with: not used.
                (fe("192.0.2.1", 30080, Proto::Tcp), all.clone()),
                (fe("127.0.0.1", 30080, Proto::Tcp), all.clone()),
            ])
        );
        // --node-ip replaces the Node's addresses.
        let objects = objects_from(&exposed(", type: NodePort", ""));
        let b = build(&objects, Some("node-a"), &["198.51.100.7".parse().unwrap()]);
        let addrs: Vec<String> = b.desired.frontends.keys().map(|f| f.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "10.96.0.9:80/TCP",
                "127.0.0.1:30080/TCP",
                "198.51.100.7:30080/TCP"
            ]
        );
        // A ClusterIP service keeps no node port even if one is written down.
        let b = build_from(&exposed("", ""));
        assert_eq!(b.desired.frontends.len(), 1);
    }

    #[test]
    fn external_ips_and_load_balancer_ingress_ips_are_frontends() {
        let status = "status: {loadBalancer: {ingress: [{ip: 203.0.113.5}, {ip: 203.0.113.6, ipMode: Proxy}, {hostname: lb.example.com}, {ip: 'not-an-ip'}]}}\n";
        let yaml = exposed(
            ", type: LoadBalancer, externalIPs: [198.51.100.20, 'fd00::20', '300.1.1.1']",
            status,
        );
        let b = build_from(&yaml);
        let addrs: BTreeSet<String> = b.desired.frontends.keys().map(|f| f.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "10.96.0.9:80/TCP",
                "127.0.0.1:30080/TCP",
                "192.0.2.1:30080/TCP",
                "198.51.100.20:80/TCP",
                "203.0.113.5:80/TCP",
            ]
            .map(String::from)
            .into()
        );
        assert_eq!(
            b.desired.frontends[&fe("203.0.113.5", 80, Proto::Tcp)]
                .endpoints
                .len(),
            2
        );
        let warnings = b.warnings.join("\n");
        assert_eq!(b.warnings.len(), 3, "{warnings}");
        assert!(warnings.contains("Service n/s: field spec.externalIPs[1]: fd00::20 is not of the family of any cluster IP"), "{warnings}");
        assert!(
            warnings.contains(
                "Service n/s: field spec.externalIPs[2]: \"300.1.1.1\" is not an IP address"
            ),
            "{warnings}"
        );
        assert!(
            warnings
                .contains("Service n/s: field status.loadBalancer.ingress[3].ip: \"not-an-ip\""),
            "{warnings}"
        );
    }

    #[test]
    fn a_slice_whose_service_does_not_exist_warns() {
        let objects = objects_from(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: early-1\n  namespace: n\n  \
             labels: {kubernetes.io/service-name: early}\naddressType: IPv4\nendpoints: []\n",
        );
        let b = build(&objects, Some("node-a"), &[]);
        assert_eq!(b.warnings.len(), 1);
        assert!(
            b.warnings[0].starts_with("EndpointSlice n/early-1: field metadata.labels[kubernetes.io/service-name]: service n/early does not exist"),
            "{}",
            b.warnings[0]
        );
    }
}
