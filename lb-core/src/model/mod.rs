//! The pure model: Service and EndpointSlice objects in, the desired datapath state out.
//! No BPF and no I/O here; this is where kube-proxy's rules live.
//!
//! Rules implemented (kube-proxy's):
//! * Services of type ExternalName, headless services (`clusterIP: None`) and services
//!   without a clusterIP have no data path. Services and EndpointSlices labelled
//!   `service.kubernetes.io/service-proxy-name` (another proxy's) or
//!   `service.kubernetes.io/headless` are not looked at, whichever the source (kube-proxy's
//!   watch selector).
//! * Every `spec.ports[]` entry of a service is one frontend per cluster IP (IPv4 and
//!   IPv6: dual-stack services have one of each), protocol TCP (default) or UDP; SCTP is
//!   refused with a warning.
//! * The same port is also a frontend on every `spec.externalIPs` address and every
//!   `status.loadBalancer.ingress[].ip` (not with `ipMode: Proxy`), whatever the type. Its
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
//!   port is ready, the serving-and-terminating ones are used (`serving` absent counts as
//!   true). An address listed in several slices counts once: the first copy, unless a
//!   later one is on this node. kube-proxy uses `addresses[0]` of each endpoint; so do we.
//! * Topology: when every ready endpoint has node hints and one is for this node, only
//!   those (`PreferSameNode`); else when every ready endpoint has zone hints and one is for
//!   this node's zone, only those (`PreferSameZone`, `PreferClose`); else all.
//! * A frontend with no usable endpoint stays, with zero backends: connections to it are
//!   refused (kube-proxy's REJECT), not sent into the void.
//!
//! [`build`] is here; `service.rs` turns one Service into its frontends and `endpoints.rs`
//! selects each frontend's endpoints.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service};
use lb_common::{PROTO_TCP, PROTO_UDP};

mod endpoints;
mod service;
pub mod slice;
mod state;
mod vecmap;

pub use endpoints::{NodeInfo, ZONE_LABEL};
pub use slice::Slice;
pub use state::{
    Change, Kind, Model, ObjKey, Object, TRIGGER_TIME_ANNOTATION, Update, duplicate_warning,
};

/// The objects the model works from, as every source emits them.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<Slice>,
    pub nodes: Vec<Node>,
}

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service annotated `"true"` keeps its clients' sockets when a backend leaves (by
/// default the agent closes the sockets it translated to that backend, so that the
/// application reconnects to a live one).
pub const KEEP_SOCKETS_ANNOTATION: &str = "lb-user.dev/keep-sockets";
/// Labels that keep a Service (and its EndpointSlices) away from kube-proxy: another
/// proxy serves it, or it is headless. The API watch filters on them
/// (`source::api::PROXY_SELECTOR`); the model applies them too, whatever the source.
pub const NOT_OURS_LABELS: [&str; 2] = [
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];

/// The object's labels keep it away from kube-proxy ([`NOT_OURS_LABELS`]).
pub fn not_ours(labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    labels.is_some_and(|l| NOT_OURS_LABELS.iter().any(|n| l.contains_key(*n)))
}

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
    pub scope: Scope,
}

impl Frontend {
    /// A frontend of the external scope (what the socket level uses).
    pub const fn new(addr: IpAddr, port: u16, proto: Proto) -> Self {
        Self {
            addr,
            port,
            proto,
            scope: Scope::External,
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )?;
        match self.scope {
            Scope::External => Ok(()),
            Scope::Local => f.write_str(" (local scope)"),
        }
    }
}

/// Which backends a frontend entry lists (`lb_common::SCOPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every usable endpoint: the socket level, and the packet level unless the service
    /// has `externalTrafficPolicy: Local`.
    External,
    /// This node's endpoints only: the packet level's choice for an external address of
    /// a service with `externalTrafficPolicy: Local`.
    Local,
}

impl Scope {
    pub const fn number(self) -> u8 {
        match self {
            Self::External => lb_common::SCOPE_EXTERNAL,
            Self::Local => lb_common::SCOPE_LOCAL,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::SCOPE_EXTERNAL => Some(Self::External),
            lb_common::SCOPE_LOCAL => Some(Self::Local),
            _ => None,
        }
    }
}

/// A backend pod address and target port (the protocol is the frontend's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node (its `nodeName`): the packet level sends to it
    /// without SNAT.
    pub local: bool,
}

impl Endpoint {
    /// An endpoint on another node (or of unknown node).
    pub const fn remote(addr: IpAddr, port: u16) -> Self {
        Self {
            addr,
            port,
            local: false,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", SocketAddr::new(self.addr, self.port))
    }
}

/// What kind of address a frontend is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrontendKind {
    #[default]
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    pub const fn number(self) -> u8 {
        match self {
            Self::ClusterIp => lb_common::FRONTEND_CLUSTER_IP,
            Self::NodePort => lb_common::FRONTEND_NODE_PORT,
            Self::ExternalIp => lb_common::FRONTEND_EXTERNAL_IP,
            Self::LoadBalancer => lb_common::FRONTEND_LOAD_BALANCER,
        }
    }

    /// As Kubernetes spells it; "-" for an unknown number.
    pub fn name_of(number: u8) -> &'static str {
        match number {
            lb_common::FRONTEND_CLUSTER_IP => "ClusterIP",
            lb_common::FRONTEND_NODE_PORT => "NodePort",
            lb_common::FRONTEND_EXTERNAL_IP => "ExternalIP",
            lb_common::FRONTEND_LOAD_BALANCER => "LoadBalancer",
            _ => "-",
        }
    }
}

/// What one frontend should balance to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// `namespace/name:port-name` of the service port, for logs and dumps.
    pub service: String,
    /// What kind of address it is, and whether the traffic policy that applies to it
    /// (internal for a cluster IP, external for the others) is Local; for dumps.
    pub kind: FrontendKind,
    pub policy_local: bool,
    /// No endpoint here, while the service has some elsewhere: the Local policy keeps
    /// them out (kube-proxy drops; connections are refused with EHOSTUNREACH, where a
    /// service without endpoints gets ECONNREFUSED).
    pub no_local: bool,
    /// The Service asks that sockets to a backend that leaves are not closed
    /// ([`KEEP_SOCKETS_ANNOTATION`]).
    pub keep_sockets: bool,
    pub endpoints: BTreeSet<Endpoint>,
    /// ClientIP affinity timeout in seconds; 0 = no affinity.
    pub affinity_timeout: u32,
    /// `loadBalancerSourceRanges` (network, prefix length) guarding this frontend for
    /// clients outside the node; empty = any client.
    pub source_ranges: BTreeSet<(IpAddr, u8)>,
}

/// The whole desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Shared with the model's per-service results (not a copy of each).
    pub frontends: BTreeMap<Frontend, std::sync::Arc<FrontendState>>,
}

impl Desired {
    /// Number of distinct services (namespace/name) with at least one frontend (counted
    /// over every frontend; [`Model::service_count`] keeps the count).
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
    /// This node's addresses (`--node-ip`, else the Node object's): nodePorts are served
    /// on them, and the interfaces that carry them get the packet level by default.
    pub node_addresses: Vec<IpAddr>,
    /// healthCheckNodePort -> what it reports (services with
    /// `externalTrafficPolicy: Local`).
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub warnings: Vec<String>,
}

/// What a service's healthCheckNodePort answers: kube-proxy's JSON, 200 while this node
/// has a ready local endpoint (and the agent is healthy), 503 otherwise (so load
/// balancers skip the node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// This node's ready endpoints, by address (kube-proxy's `LocalReadyEndpoints`):
    /// serving-and-terminating ones are left out, though they still get the traffic.
    pub local_endpoints: usize,
}

pub(crate) fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<no name>")
    )
}

pub(crate) fn port_u16(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// Turns the objects into the desired state for the node `node_name` (None: no node
/// context, so internalTrafficPolicy Local services get no endpoints and no topology).
/// `node_ips` are the node addresses for nodePorts; empty means the Node object's.
///
/// A one-shot full build; the agent keeps a [`Model`] and updates it change by change,
/// which leaves the same state (the property tests check it).
pub fn build(objects: &Objects, node_name: Option<&str>, node_ips: &[IpAddr]) -> Built {
    let mut model = Model::new(node_name.map(str::to_string), node_ips.to_vec());
    let mut warnings = model.replace(objects.clone());
    model.update();
    warnings.extend(model.warnings());
    Built {
        desired: model.desired().clone(),
        node_addresses: model.node_addresses().to_vec(),
        health_checks: model.health_checks().clone(),
        warnings,
    }
}

#[cfg(test)]
mod incremental_tests;
#[cfg(test)]
mod tests;
