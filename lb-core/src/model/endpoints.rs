//! Endpoint selection, kube-proxy's: ready endpoints (else serving and terminating),
//! internalTrafficPolicy Local, and topology-aware routing by zone hints.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::{Node, Service};

use super::{Endpoint, Proto, Slice, ns_name, port_u16};

/// One endpoint of a service port with what the selection rules look at.
#[derive(Clone, Debug)]
pub(super) struct Candidate {
    pub(super) endpoint: Endpoint,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// `hints.forZones[].name`; empty when the endpoint has no zone hints.
    zone_hints: BTreeSet<String>,
    /// `hints.forNodes[].name`; empty when the endpoint has no node hints.
    node_hints: BTreeSet<String>,
}

/// The usable endpoints of one service port, over all of the service's slices.
pub(super) fn endpoints_for(
    port_name: &str,
    proto: Proto,
    slices: &[&Slice],
    node: &NodeInfo,
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
            let Some(text) = &ep.address else {
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
            // kube-proxy's reading: a missing ready or serving condition is true, a
            // missing terminating one false.
            let cond = ep.conditions.as_ref();
            let hints = ep.hints.as_deref();
            let names = |list: Option<&Vec<super::slice::Named>>| -> BTreeSet<String> {
                list.into_iter().flatten().map(|h| h.name.clone()).collect()
            };
            let candidate = Candidate {
                endpoint: Endpoint {
                    addr,
                    port: target,
                    local: node.name.is_some() && ep.node_name == node.name,
                },
                ready: cond.and_then(|c| c.ready).unwrap_or(true),
                serving: cond.and_then(|c| c.serving).unwrap_or(true),
                terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                zone_hints: names(hints.and_then(|h| h.for_zones.as_ref())),
                node_hints: names(hints.and_then(|h| h.for_nodes.as_ref())),
            };
            // kube-proxy's rule for an address listed twice: the first copy stays,
            // unless the later one is on this node.
            if !candidates.contains_key(&candidate.endpoint) || candidate.endpoint.local {
                candidates.insert(candidate.endpoint, candidate);
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
    pub fn of(name: Option<&str>, node_ips: &[IpAddr], node: Option<&Node>) -> Self {
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

/// Which endpoints topology-aware routing keeps (kube-proxy's topology mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// No hints to follow: every endpoint.
    Any,
    /// `PreferSameNode`: the endpoints hinted for this node.
    SameNode,
    /// `PreferSameZone` (and `PreferClose`, topology-aware hints): the endpoints hinted
    /// for this node's zone.
    SameZone,
}

/// kube-proxy's `topologyModeFromHints`: node hints are followed when every ready
/// endpoint has them and one is for this node; else zone hints, when every ready
/// endpoint has them and one is for this node's zone; else none. (The EndpointSlice
/// controller writes hints only for services that ask; kube-proxy looks at the hints
/// alone.)
fn topology_mode(candidates: &[Candidate], node: &NodeInfo) -> Topology {
    let (mut all_node, mut for_node, mut all_zone, mut for_zone) = (true, false, true, false);
    for c in candidates.iter().filter(|c| c.ready) {
        if c.node_hints.is_empty() {
            all_node = false;
        } else {
            for_node |= hinted(&c.node_hints, &node.name);
        }
        if c.zone_hints.is_empty() {
            all_zone = false;
        } else {
            for_zone |= hinted(&c.zone_hints, &node.zone);
        }
    }
    if all_node && for_node {
        Topology::SameNode
    } else if all_zone && for_zone {
        Topology::SameZone
    } else {
        Topology::Any
    }
}

impl Topology {
    /// kube-proxy's `availableForTopology`.
    fn admits(self, c: &Candidate, node: &NodeInfo) -> bool {
        match self {
            Self::Any => true,
            Self::SameNode => hinted(&c.node_hints, &node.name),
            Self::SameZone => hinted(&c.zone_hints, &node.zone),
        }
    }
}

/// `name` (this node's name or zone, if known) is among `hints`.
fn hinted(hints: &BTreeSet<String>, name: &Option<String>) -> bool {
    name.as_ref().is_some_and(|n| hints.contains(n))
}

/// The endpoints a client outside the node may reach through an external address of a
/// service with `externalTrafficPolicy: Local`: this node's ready ones, else its
/// serving-and-terminating ones (kube-proxy's local endpoints for external traffic).
pub(super) fn select_local(candidates: &[Candidate]) -> BTreeSet<Endpoint> {
    let pick = |f: &dyn Fn(&Candidate) -> bool| -> BTreeSet<Endpoint> {
        candidates
            .iter()
            .filter(|c| c.endpoint.local && f(c))
            .map(|c| c.endpoint)
            .collect()
    };
    let ready = local_ready(candidates);
    if !ready.is_empty() {
        return ready;
    }
    pick(&|c| c.serving && c.terminating)
}

/// This node's ready endpoints: what a healthCheckNodePort counts (kube-proxy's
/// `LocalReadyEndpoints`). Serving-and-terminating ones still get the traffic when no
/// local one is ready, but are not counted, so load balancers move off the node.
pub(super) fn local_ready(candidates: &[Candidate]) -> BTreeSet<Endpoint> {
    candidates
        .iter()
        .filter(|c| c.endpoint.local && c.ready)
        .map(|c| c.endpoint)
        .collect()
}

/// kube-proxy's endpoint selection (`CategorizeEndpoints`): for a cluster IP
/// (`internal`, internalTrafficPolicy applies) or for an external frontend reached from
/// this node (all cluster endpoints): the ready ones that topology admits, else the
/// serving-and-terminating ones it admits.
pub(super) fn select(
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
        return select_local(candidates);
    }
    let topology = topology_mode(candidates, node);
    let ready = pick(&|c| c.ready && topology.admits(c, node));
    if !ready.is_empty() {
        return ready;
    }
    pick(&|c| c.serving && c.terminating && topology.admits(c, node))
}
