//! One Service to its frontends: cluster IPs, externalIPs, LoadBalancer ingress IPs and
//! nodePorts, each port with its endpoints and the service's affinity timeout.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use super::{
    Frontend, FrontendKind, FrontendState, HealthCheck, NodeInfo, Proto, Scope, Slice,
    endpoints::{Candidate, endpoints_for, local_ready, select, select_local},
    port_u16,
    vecmap::VecMap,
};

/// One service's part of the desired state, computed alone (claims on frontends that
/// another service also wants are settled by the model).
#[derive(Debug, Default)]
pub(super) struct ServiceOut {
    /// Frontend -> its state and the index of the `spec.ports` entry it comes from.
    pub frontends: VecMap<Frontend, (std::sync::Arc<FrontendState>, usize)>,
    /// healthCheckNodePort and what it reports.
    pub health: Option<(u16, HealthCheck)>,
    pub warnings: Vec<String>,
}

/// The frontends of `svc` (called `name`, with its `slices`) into `out`.
pub(super) fn add_service(
    svc: &Service,
    name: &str,
    slices: &[&Slice],
    node: &NodeInfo,
    out: &mut ServiceOut,
) {
    let Some(spec) = &svc.spec else {
        tracing::debug!("Service {name}: no spec; skipped");
        return;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        tracing::debug!("Service {name}: type ExternalName has no data path; skipped");
        return;
    }
    let Some(addrs) = Addresses::of(svc, spec, name, node, &mut out.warnings) else {
        return;
    };
    let mut local_endpoints = BTreeSet::new();
    let keep_sockets = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::KEEP_SOCKETS_ANNOTATION))
        .is_some_and(|v| v == "true");
    for (i, sp) in spec.ports.iter().flatten().enumerate() {
        let Some(port) = Port::parse(sp, i, name, addrs.node_port_type, &mut out.warnings) else {
            continue;
        };
        let candidates = endpoints_for(&port.name, port.proto, slices, node, &mut out.warnings);
        // kube-proxy counts the node's ready endpoints by address, over all ports.
        local_endpoints.extend(local_ready(&candidates).into_iter().map(|e| e.addr));
        let label = if port.name.is_empty() {
            name.to_string()
        } else {
            format!("{name}:{}", port.name)
        };
        let each = PortFrontends {
            svc,
            name,
            index: i,
            label,
            addrs: &addrs,
            port: &port,
            candidates,
            node,
            keep_sockets,
        };
        for (addr, number, kind) in addrs.frontends(&port) {
            each.add(addr, number, kind, out);
        }
    }
    if addrs.external_local {
        add_health_check(spec, name, local_endpoints.len(), out);
    }
}

/// What the frontends of one service port share.
struct PortFrontends<'a> {
    svc: &'a Service,
    /// namespace/name of the service, and `spec.ports[index]`, for warnings.
    name: &'a str,
    index: usize,
    /// namespace/name:port-name, for logs and dumps.
    label: String,
    addrs: &'a Addresses,
    port: &'a Port,
    candidates: Vec<Candidate>,
    node: &'a NodeInfo,
    keep_sockets: bool,
}

impl PortFrontends<'_> {
    /// The frontend `addr`:`number` of `kind` (and its Local-scope twin for external
    /// traffic under externalTrafficPolicy Local) into `out`.
    fn add(&self, addr: IpAddr, number: u16, kind: FrontendKind, out: &mut ServiceOut) {
        let (name, i, addrs) = (self.name, self.index, self.addrs);
        let internal = kind == FrontendKind::ClusterIp;
        let fe = Frontend::new(addr, number, self.port.proto);
        if let Some((other, _)) = out.frontends.get(&fe) {
            out.warnings.push(format!(
                "Service {name}: field spec.ports[{i}]: frontend {fe} is already used by {}; skipped",
                other.service
            ));
            return;
        }
        let family: Vec<Candidate> = self
            .candidates
            .iter()
            .filter(|c| c.endpoint.addr.is_ipv4() == addr.is_ipv4())
            .cloned()
            .collect();
        // Local policy, endpoints only elsewhere: kube-proxy drops, where a service
        // without endpoints is rejected; the two are told apart.
        let anywhere = !select(self.svc, &family, self.node, false).is_empty();
        let state = |endpoints: BTreeSet<super::Endpoint>| {
            std::sync::Arc::new(FrontendState {
                service: self.label.clone(),
                kind,
                policy_local: if internal {
                    addrs.internal_local
                } else {
                    addrs.external_local
                },
                no_local: endpoints.is_empty() && anywhere,
                keep_sockets: self.keep_sockets,
                endpoints,
                affinity_timeout: addrs.affinity_timeout,
                source_ranges: addrs.ranges_for(addr, number, self.port),
            })
        };
        let endpoints = select(self.svc, &family, self.node, internal);
        out.frontends.insert(fe, (state(endpoints), i));
        if !internal && addrs.external_local {
            // Clients outside the node: this node's endpoints only (the socket level
            // keeps using all of them, as kube-proxy does for traffic from the node).
            let twin = Frontend {
                scope: Scope::Local,
                ..fe
            };
            out.frontends
                .insert(twin, (state(select_local(&family)), i));
        }
    }
}

/// The service's healthCheckNodePort, if it has one, reporting `local_endpoints` (this
/// node's ready endpoints).
fn add_health_check(spec: &ServiceSpec, name: &str, local_endpoints: usize, out: &mut ServiceOut) {
    let Some(value) = spec.health_check_node_port else {
        return;
    };
    let Some(port) = port_u16(value) else {
        out.warnings.push(format!(
            "Service {name}: field spec.healthCheckNodePort: {value} is not a port (1-65535); no health check served"
        ));
        return;
    };
    let (namespace, svc_name) = name.split_once('/').unwrap_or(("default", name));
    out.health = Some((
        port,
        HealthCheck {
            namespace: namespace.to_string(),
            name: svc_name.to_string(),
            local_endpoints,
        },
    ));
}

/// Where a service is reachable, whatever the port.
struct Addresses {
    cluster: Vec<IpAddr>,
    /// externalIPs and LoadBalancer ingress IPs of a cluster IP's family.
    external: Vec<IpAddr>,
    /// Node addresses of a cluster IP's family (and 127.0.0.1), for nodePorts.
    node: Vec<IpAddr>,
    /// Type NodePort or LoadBalancer: the ports' nodePorts are served.
    node_port_type: bool,
    /// `externalTrafficPolicy: Local`: clients outside the node reach only this node's
    /// endpoints through the external addresses and nodePorts.
    external_local: bool,
    /// `internalTrafficPolicy: Local` (the cluster IPs).
    internal_local: bool,
    affinity_timeout: u32,
    /// The LoadBalancer ingress IPs among `external`: `loadBalancerSourceRanges` guards
    /// them.
    ingress: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`, checked (address, prefix length).
    source_ranges: Vec<(IpAddr, u8)>,
}

impl Addresses {
    /// `None` for a service without a cluster IP (headless or none): no data path.
    fn of(
        svc: &Service,
        spec: &ServiceSpec,
        name: &str,
        node: &NodeInfo,
        warnings: &mut Vec<String>,
    ) -> Option<Self> {
        let cluster = cluster_ips(svc, name, warnings);
        if cluster.is_empty() {
            return None;
        }
        let affinity_timeout = affinity_timeout(svc, name, warnings);
        let families: BTreeSet<bool> = cluster.iter().map(IpAddr::is_ipv4).collect();
        let mut external = Vec::new();
        let mut ingress = Vec::new();
        for (ip, field) in external_ips(svc, name, warnings) {
            if families.contains(&ip.is_ipv4()) {
                external.push(ip);
                if field.starts_with("status.") {
                    ingress.push(ip);
                }
            } else {
                warnings.push(format!(
                    "Service {name}: field {field}: {ip} is not of the family of any cluster IP; skipped"
                ));
            }
        }
        let mut node_addrs: Vec<IpAddr> = node
            .addresses
            .iter()
            .filter(|a| families.contains(&a.is_ipv4()))
            .copied()
            .collect();
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        if families.contains(&true) && !node_addrs.contains(&localhost) {
            // kube-proxy (iptables mode) also accepts nodePorts on localhost.
            node_addrs.push(localhost);
        }
        Some(Self {
            cluster,
            external,
            node: node_addrs,
            node_port_type: matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")),
            external_local: external_traffic_local(spec, name, warnings),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            source_ranges: source_ranges(spec, name, !ingress.is_empty(), warnings),
            ingress,
            affinity_timeout,
        })
    }

    /// The source ranges that guard frontend `addr`:`number` of `port` (a LoadBalancer
    /// ingress IP at the service port), of `addr`'s family.
    fn ranges_for(&self, addr: IpAddr, number: u16, port: &Port) -> BTreeSet<(IpAddr, u8)> {
        if number != port.port || !self.ingress.contains(&addr) {
            return BTreeSet::new();
        }
        self.source_ranges
            .iter()
            .filter(|(net, _)| net.is_ipv4() == addr.is_ipv4())
            .copied()
            .collect()
    }

    /// (address, port, kind) of every frontend of `port`: cluster IPs (which follow
    /// internalTrafficPolicy), external addresses, then the node addresses at the nodePort.
    fn frontends(&self, port: &Port) -> Vec<(IpAddr, u16, FrontendKind)> {
        let mut out: Vec<(IpAddr, u16, FrontendKind)> = self
            .cluster
            .iter()
            .map(|ip| (*ip, port.port, FrontendKind::ClusterIp))
            .collect();
        out.extend(self.external.iter().map(|ip| {
            let kind = if self.ingress.contains(ip) {
                FrontendKind::LoadBalancer
            } else {
                FrontendKind::ExternalIp
            };
            (*ip, port.port, kind)
        }));
        if let Some(np) = port.node_port {
            out.extend(self.node.iter().map(|ip| (*ip, np, FrontendKind::NodePort)));
        }
        out
    }
}

/// `spec.externalTrafficPolicy` is `Local` (absent or `Cluster`: not; anything else
/// warns and counts as `Cluster`).
fn external_traffic_local(spec: &ServiceSpec, name: &str, warnings: &mut Vec<String>) -> bool {
    match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            warnings.push(format!(
                "Service {name}: field spec.externalTrafficPolicy: unknown value {other:?} (want Cluster or Local); Cluster is used"
            ));
            false
        }
    }
}

/// `spec.loadBalancerSourceRanges` as (network address, prefix length); a bad entry
/// warns and is skipped. They guard the LoadBalancer ingress IPs for clients outside the
/// node (the packet level); the socket level cannot see a client's source address at
/// connect() time, which the warning says.
fn source_ranges(
    spec: &ServiceSpec,
    name: &str,
    has_ingress: bool,
    warnings: &mut Vec<String>,
) -> Vec<(IpAddr, u8)> {
    let mut out = Vec::new();
    for (i, text) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match parse_cidr(text) {
            Ok(net) => out.push(net),
            Err(why) => warnings.push(format!(
                "Service {name}: field spec.loadBalancerSourceRanges[{i}]: {text:?}: {why}; skipped"
            )),
        }
    }
    if !out.is_empty() && has_ingress {
        warnings.push(format!(
            "Service {name}: field spec.loadBalancerSourceRanges: enforced for clients outside the node; connections from this node's own processes and pods to the LoadBalancer IP are not checked"
        ));
    }
    out
}

/// "10.0.0.0/8" (host bits cleared) or a bare address (a /32 or /128).
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match text.trim().split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text.trim(), None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| "not an IP address or CIDR".to_string())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = match len {
        None => max,
        Some(l) => l
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("prefix length {l:?} is not 0-{max}"))?,
    };
    let masked = match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::from((u32::from(v4) & mask).to_be_bytes())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::from((u128::from(v6) & mask).to_be_bytes())
        }
    };
    Ok((masked, len))
}

/// One `spec.ports[]` entry, checked.
struct Port {
    name: String,
    proto: Proto,
    port: u16,
    node_port: Option<u16>,
}

impl Port {
    /// `spec.ports[i]`; `None` (with a warning) when its protocol or port is unusable. A
    /// bad nodePort only loses the node port.
    fn parse(
        sp: &ServicePort,
        i: usize,
        name: &str,
        node_port_type: bool,
        warnings: &mut Vec<String>,
    ) -> Option<Self> {
        let proto = match Proto::parse(sp.protocol.as_deref()) {
            Ok(p) => p,
            Err(why) => {
                warnings.push(format!(
                    "Service {name}: field spec.ports[{i}].protocol: {why}; port skipped"
                ));
                return None;
            }
        };
        let Some(port) = port_u16(sp.port) else {
            warnings.push(format!(
                "Service {name}: field spec.ports[{i}].port: {} is not a port (1-65535); port skipped",
                sp.port
            ));
            return None;
        };
        let node_port = match sp.node_port {
            Some(n) if node_port_type => {
                let checked = port_u16(n);
                if checked.is_none() {
                    warnings.push(format!(
                        "Service {name}: field spec.ports[{i}].nodePort: {n} is not a port (1-65535); no node port"
                    ));
                }
                checked
            }
            _ => None,
        };
        Some(Self {
            name: sp.name.clone().unwrap_or_default(),
            proto,
            port,
            node_port,
        })
    }
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
/// field each came from: externalIPs and LoadBalancer ingress IPs (whatever the
/// service's type, as kube-proxy serves them).
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
