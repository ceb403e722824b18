//! The pure model: Service and EndpointSlice objects in, the desired datapath state out.
//! No BPF and no I/O here; this is where kube-proxy's rules live.
//!
//! Rules implemented (kube-proxy's):
//! * Services of type ExternalName, headless services (`clusterIP: None`) and services
//!   without a clusterIP have no data path.
//! * Every `spec.ports[]` entry of a service is one frontend per cluster IP (IPv4 so far),
//!   protocol TCP (default) or UDP; SCTP is refused with a warning.
//! * Endpoints come from the EndpointSlices labelled `kubernetes.io/service-name=<svc>` in
//!   the service's namespace, `addressType: IPv4`. The backend port is the slice port whose
//!   name and protocol equal the service port's (the slice already carries the resolved
//!   number of a named or numeric targetPort).
//! * An endpoint is used when `conditions.ready` is true or absent; when no endpoint of a
//!   port is ready, the serving-and-terminating ones are used. An address listed in several
//!   slices counts once. kube-proxy uses `addresses[0]` of each endpoint; so do we.
//! * A frontend with no usable endpoint stays, with zero backends: connections to it are
//!   refused (kube-proxy's REJECT), not sent into the void.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{PROTO_TCP, PROTO_UDP};

use crate::manifest::Objects;

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
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// A backend pod address and target port (the protocol is the frontend's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// What one frontend should balance to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// `namespace/name:port-name` of the service port, for logs and dumps.
    pub service: String,
    pub endpoints: BTreeSet<Endpoint>,
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
pub fn build(objects: &Objects, node_name: Option<&str>) -> Built {
    let node = &NodeInfo::from_objects(node_name, objects);
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

fn cluster_ips(svc: &Service, name: &str, warnings: &mut Vec<String>) -> Vec<Ipv4Addr> {
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
            text => match text.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(v4)) => out.push(v4),
                Ok(std::net::IpAddr::V6(_)) => {
                    tracing::debug!("Service {name}: {field} {text}: IPv6 is not handled yet")
                }
                Err(_) => warnings.push(format!(
                    "Service {name}: field {field}: {text:?} is not an IP address; skipped"
                )),
            },
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
        let port_name = sp.name.clone().unwrap_or_default();
        let candidates = endpoints_for(&port_name, proto, slices, &mut built.warnings);
        let endpoints = select(svc, &candidates, node);
        let label = if port_name.is_empty() {
            name.to_string()
        } else {
            format!("{name}:{port_name}")
        };
        for ip in &ips {
            let fe = Frontend {
                addr: *ip,
                port,
                proto,
            };
            if let Some(other) = built.desired.frontends.get(&fe) {
                built.warnings.push(format!(
                    "Service {name}: field spec.ports[{i}]: frontend {fe} is already used by {}; port skipped",
                    other.service
                ));
                continue;
            }
            built.desired.frontends.insert(
                fe,
                FrontendState {
                    service: label.clone(),
                    endpoints: endpoints.clone(),
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
        if slice.address_type != "IPv4" {
            tracing::debug!(
                "EndpointSlice {slice_name}: addressType {} is not handled yet; skipped",
                slice.address_type
            );
            continue;
        }
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
            let Ok(addr) = text.parse::<Ipv4Addr>() else {
                warnings.push(format!(
                    "EndpointSlice {slice_name}: field endpoints[{k}].addresses[0]: {text:?} is not an IPv4 address; endpoint skipped"
                ));
                continue;
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

/// The node the agent programs: its name (for internalTrafficPolicy Local) and zone (for
/// topology-aware routing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: Option<String>,
    pub zone: Option<String>,
}

impl NodeInfo {
    /// The zone comes from the Node object's `topology.kubernetes.io/zone` label.
    pub fn from_objects(name: Option<&str>, objects: &Objects) -> Self {
        let zone = name.and_then(|n| {
            objects
                .nodes
                .iter()
                .find(|node| node.metadata.name.as_deref() == Some(n))
                .and_then(|node| node.metadata.labels.as_ref())
                .and_then(|l| l.get(ZONE_LABEL))
                .filter(|z| !z.is_empty())
                .cloned()
        });
        Self {
            name: name.map(str::to_string),
            zone,
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

/// kube-proxy's endpoint selection for traffic to a cluster IP.
fn select(svc: &Service, candidates: &[Candidate], node: &NodeInfo) -> BTreeSet<Endpoint> {
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
    if internal_local {
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
    use crate::manifest::{Loaded, parse_into};

    fn build_from(yaml: &str) -> Built {
        let mut loaded = Loaded::default();
        parse_into(yaml, "t.yaml", &mut loaded);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        build(&loaded.objects, Some("node-a"))
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
        let mut loaded = Loaded::default();
        parse_into(&yaml, "t.yaml", &mut loaded);
        let b = build(&loaded.objects, Some("node-a"));
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
    fn non_ipv4_slices_are_not_used() {
        let yaml = svc_with("", "", "- addresses: [10.0.0.1]\n")
            .replace("addressType: IPv4", "addressType: IPv6");
        assert!(selected(&yaml).is_empty());
    }

    #[test]
    fn a_slice_whose_service_does_not_exist_warns() {
        let mut loaded = Loaded::default();
        parse_into(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: early-1\n  namespace: n\n  \
             labels: {kubernetes.io/service-name: early}\naddressType: IPv4\nendpoints: []\n",
            "t.yaml",
            &mut loaded,
        );
        let b = build(&loaded.objects, Some("node-a"));
        assert_eq!(b.warnings.len(), 1);
        assert!(
            b.warnings[0].starts_with("EndpointSlice n/early-1: field metadata.labels[kubernetes.io/service-name]: service n/early does not exist"),
            "{}",
            b.warnings[0]
        );
    }
}
