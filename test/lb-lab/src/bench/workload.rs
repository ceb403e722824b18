//! The services a benchmark programs: measured ones over the lab's pods, fillers with
//! made-up endpoints, and the churn service whose endpoint changes are timed.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use lb_user::model::Proto;

use crate::kube_proxy_rules::{LoadBalancer, SvcPort};

/// Endpoints per service.
pub const ENDPOINTS: usize = 10;

/// The measured services: up to three (first, middle, last), each with a TCP and a UDP
/// port over the lab's pods; the rest are TCP-only fillers with made-up endpoints.
pub fn services(n: usize, pods: &[Ipv4Addr]) -> (Vec<SvcPort>, Vec<(usize, &'static str)>) {
    let measured: Vec<(usize, &'static str)> = match n {
        0 | 1 => vec![(0, "first")],
        2 => vec![(0, "first"), (1, "last")],
        _ => vec![(0, "first"), (n / 2, "middle"), (n - 1, "last")],
    };
    let mut out = Vec::new();
    for i in 0..n.max(1) {
        let is_measured = measured.iter().any(|(m, _)| *m == i);
        let endpoints: Vec<Ipv4Addr> = if is_measured {
            pods.to_vec()
        } else {
            (0..ENDPOINTS)
                .map(|e| {
                    let k = i * ENDPOINTS + e;
                    Ipv4Addr::new(
                        10,
                        245 + (k / 62_500) as u8,
                        (k / 250 % 250) as u8,
                        (k % 250) as u8 + 1,
                    )
                })
                .collect()
        };
        let base = SvcPort {
            name: format!("bench/svc-{i}"),
            port_name: "tcp".into(),
            ip: service_ip(i),
            port: 80,
            proto: Proto::Tcp,
            target_port: 8080,
            endpoints,
            node_port: None,
            load_balancer: None,
        };
        if is_measured {
            out.push(SvcPort {
                port_name: "udp".into(),
                proto: Proto::Udp,
                ..base.clone()
            });
        }
        out.push(base);
    }
    (out, measured)
}

/// The churn service used by the change measurements: one endpoint, swapped each time.
pub fn churn(pod: Ipv4Addr) -> SvcPort {
    SvcPort {
        name: "bench/churn".into(),
        port_name: "tcp".into(),
        ip: Ipv4Addr::new(10, 97, 0, 1),
        port: 80,
        proto: Proto::Tcp,
        target_port: 8080,
        endpoints: vec![pod],
        node_port: None,
        load_balancer: None,
    }
}

/// The nodePort of the service that the NodePort benchmark measures.
pub const MEASURED_NODE_PORT: u16 = 30_000;

/// The NodePort benchmark's services: `n` TCP services over the same addresses as
/// [`services`], the last one over the lab's pods and with [`MEASURED_NODE_PORT`], and
/// one in ten of the others with a nodePort of its own (a cluster's NodePort services
/// are a minority; the range has room for 2,768 of them).
pub fn node_port_services(n: usize, pods: &[Ipv4Addr]) -> Vec<SvcPort> {
    let last = n.max(1) - 1;
    let (ports, _) = services(n, pods);
    let mut out: Vec<SvcPort> = ports
        .into_iter()
        .filter(|p| p.proto == Proto::Tcp)
        .collect();
    let mut next = MEASURED_NODE_PORT + 1;
    for (i, p) in out.iter_mut().enumerate() {
        if i == last {
            p.endpoints = pods.to_vec();
            p.node_port = Some(MEASURED_NODE_PORT);
        } else if i % 10 == 0 {
            p.node_port = Some(next);
            next += 1;
        }
    }
    out
}

/// The packet-rate benchmark's UDP port at the pods, where a counting sink drops it.
pub const SINK_PORT: u16 = 9999;
/// The nodePort whose forwarding rate the packet-rate benchmark measures.
pub const PACKET_NODE_PORT: u16 = 32_000;
/// The LoadBalancer IP of the drop run: a flood from outside its source ranges.
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

/// The packet-rate benchmark's two UDP services over the lab's pods (to [`SINK_PORT`]):
/// `bench/pkt` on [`PACKET_NODE_PORT`], and `bench/lb`, a LoadBalancer on [`LB_IP`]
/// whose source ranges admit the client alone.
pub fn packet_services(pods: &[Ipv4Addr]) -> Vec<SvcPort> {
    let udp = |name: &str, ip, node_port| SvcPort {
        name: format!("bench/{name}"),
        port_name: "udp".into(),
        ip,
        port: SINK_PORT,
        proto: Proto::Udp,
        target_port: SINK_PORT,
        endpoints: pods.to_vec(),
        node_port: Some(node_port),
        load_balancer: None,
    };
    let lb = LoadBalancer {
        ip: LB_IP,
        source_ranges: vec![format!("{}/32", crate::cluster::CLIENT_IP)],
    };
    vec![
        udp("pkt", Ipv4Addr::new(10, 97, 0, 2), PACKET_NODE_PORT),
        SvcPort {
            load_balancer: Some(lb),
            ..udp("lb", Ipv4Addr::new(10, 97, 0, 3), PACKET_NODE_PORT + 1)
        },
    ]
}

/// Service and EndpointSlice manifests for `ports` (grouped by service name).
pub fn manifests(ports: &[SvcPort]) -> String {
    let mut by_name: BTreeMap<&str, Vec<&SvcPort>> = BTreeMap::new();
    let mut order = Vec::new();
    for p in ports {
        if !by_name.contains_key(p.name.as_str()) {
            order.push(p.name.as_str());
        }
        by_name.entry(&p.name).or_default().push(p);
    }
    let mut out = String::new();
    for name in order {
        let list = &by_name[name];
        let (ns, svc) = name.split_once('/').expect("ns/name");
        let first = list[0];
        let node_port = list.iter().any(|p| p.node_port.is_some());
        let lb = list.iter().find_map(|p| p.load_balancer.as_ref());
        let kind = match (lb, node_port) {
            (Some(_), _) => "LoadBalancer",
            (None, true) => "NodePort",
            (None, false) => "ClusterIP",
        };
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {ns}}}\nspec:\n  type: {kind}\n  clusterIP: {}\n",
            first.ip
        );
        if let Some(lb) = lb.filter(|lb| !lb.source_ranges.is_empty()) {
            let _ = writeln!(
                out,
                "  loadBalancerSourceRanges: [{}]",
                lb.source_ranges.join(", ")
            );
        }
        out.push_str("  ports:\n");
        for p in list {
            let np = p
                .node_port
                .map_or(String::new(), |n| format!(", nodePort: {n}"));
            let _ = writeln!(
                out,
                "  - {{name: {}, port: {}, protocol: {}, targetPort: {}{np}}}",
                p.port_name, p.port, p.proto, p.target_port
            );
        }
        if let Some(lb) = lb {
            let _ = writeln!(
                out,
                "status: {{loadBalancer: {{ingress: [{{ip: {}}}]}}}}",
                lb.ip
            );
        }
        let _ = write!(
            out,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-a, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports:\n"
        );
        for p in list {
            let _ = writeln!(
                out,
                "  - {{name: {}, port: {}, protocol: {}}}",
                p.port_name, p.target_port, p.proto
            );
        }
        out.push_str("endpoints:\n");
        for ep in &first.endpoints {
            let _ = writeln!(out, "  - addresses: [{ep}]");
        }
    }
    out
}

/// The documents of a multi-document YAML text such as [`manifests`] writes.
pub fn documents(text: &str) -> impl Iterator<Item = &str> {
    text.split("---\n").filter(|d| !d.trim().is_empty())
}

/// The cluster IP of bench service `i`.
pub fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250) as u8 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_place_measured_ports_first_middle_last_with_real_pods() {
        let pods = [Ipv4Addr::new(10, 244, 1, 2)];
        let (ports, measured) = services(1000, &pods);
        assert_eq!(measured, [(0, "first"), (500, "middle"), (999, "last")]);
        // 1000 TCP ports plus a UDP port for each measured service.
        assert_eq!(ports.len(), 1003);
        assert_eq!(ports[0].proto, Proto::Udp);
        assert_eq!(ports[0].endpoints, pods);
        assert_eq!(ports[2].endpoints.len(), ENDPOINTS);
        let ips: std::collections::BTreeSet<_> = ports
            .iter()
            .filter(|p| p.proto == Proto::Tcp)
            .map(|p| p.ip)
            .collect();
        assert_eq!(ips.len(), 1000, "distinct cluster IPs");
        let (big, _) = services(10_000, &pods);
        let eps: std::collections::BTreeSet<_> = big
            .iter()
            .filter(|p| p.proto == Proto::Tcp)
            .flat_map(|p| p.endpoints.clone())
            .collect();
        assert!(eps.len() > 99_000, "made-up endpoints are distinct");
    }

    #[test]
    fn manifests_of_the_bench_services_load_into_the_model() {
        let pods = [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 2)];
        let (ports, _) = services(5, &pods);
        let mut loaded = lb_user::source::manifest::Loaded::default();
        lb_user::source::manifest::parse_into(&manifests(&ports), "bench.yaml", &mut loaded);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let built = lb_user::model::build(&loaded.objects, None, &[]);
        assert!(built.warnings.is_empty(), "{:?}", built.warnings);
        assert_eq!(
            documents(&manifests(&ports)).count(),
            10,
            "a Service and a slice each"
        );
        // 5 TCP frontends + 3 UDP ones, each with its endpoints.
        assert_eq!(built.desired.frontends.len(), 8);
        assert!(
            built
                .desired
                .frontends
                .values()
                .all(|f| !f.endpoints.is_empty())
        );
    }

    #[test]
    fn node_port_services_measure_the_last_over_the_pods() {
        let pods = [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 2)];
        let ports = node_port_services(10_000, &pods);
        assert_eq!(ports.len(), 10_000);
        assert!(ports.iter().all(|p| p.proto == Proto::Tcp));
        let last = ports.last().unwrap();
        assert_eq!(last.node_port, Some(MEASURED_NODE_PORT));
        assert_eq!(last.endpoints, pods);
        let node_ports: std::collections::BTreeSet<_> =
            ports.iter().filter_map(|p| p.node_port).collect();
        assert_eq!(node_ports.len(), 1001, "distinct");
        assert!(node_ports.iter().all(|p| (30_000..=32_767).contains(p)));
        assert_eq!(node_port_services(1, &pods).len(), 1);
        assert_eq!(
            node_port_services(1, &pods)[0].node_port,
            Some(MEASURED_NODE_PORT)
        );

        // They load into the model as NodePort frontends on the node's address.
        let mut loaded = lb_user::source::manifest::Loaded::default();
        let small = node_port_services(11, &pods);
        lb_user::source::manifest::parse_into(&manifests(&small), "np.yaml", &mut loaded);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let node: std::net::IpAddr = Ipv4Addr::new(192, 168, 77, 11).into();
        let built = lb_user::model::build(&loaded.objects, None, &[node]);
        assert!(built.warnings.is_empty(), "{:?}", built.warnings);
        // 11 cluster IPs, and 2 nodePorts on the node's address and on 127.0.0.1.
        assert_eq!(built.desired.frontends.len(), 15);
        let on_node = built.desired.frontends.keys().filter(|f| f.addr == node);
        let ports: Vec<u16> = on_node.map(|f| f.port).collect();
        assert_eq!(ports, [MEASURED_NODE_PORT, MEASURED_NODE_PORT + 1]);
    }

    #[test]
    fn packet_services_load_as_a_node_port_and_a_guarded_load_balancer() {
        let pods = [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 2)];
        let text = manifests(&packet_services(&pods));
        assert!(text.contains("  type: LoadBalancer\n  clusterIP: 10.97.0.3\n  loadBalancerSourceRanges: [192.168.77.100/32]\n  ports:\n"), "{text}");
        assert!(
            text.contains("status: {loadBalancer: {ingress: [{ip: 10.200.0.1}]}}\n"),
            "{text}"
        );
        let mut loaded = lb_user::source::manifest::Loaded::default();
        lb_user::source::manifest::parse_into(&text, "pkt.yaml", &mut loaded);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let node: std::net::IpAddr = Ipv4Addr::new(192, 168, 77, 11).into();
        let built = lb_user::model::build(&loaded.objects, None, &[node]);
        // The one warning: the ranges guard clients outside the node only.
        assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
        assert!(built.warnings[0].contains("spec.loadBalancerSourceRanges"));
        let f = |addr: std::net::IpAddr, port| {
            built
                .desired
                .frontends
                .iter()
                .find(|(k, _)| k.addr == addr && k.port == port)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("no frontend {addr}:{port}"))
        };
        assert_eq!(f(node, PACKET_NODE_PORT).endpoints.len(), 2);
        let lb = f(LB_IP.into(), SINK_PORT);
        let client: std::net::IpAddr = crate::cluster::CLIENT_IP.into();
        assert_eq!(
            lb.source_ranges.iter().copied().collect::<Vec<_>>(),
            [(client, 32)]
        );
        assert!(
            f(node, PACKET_NODE_PORT + 1).source_ranges.is_empty(),
            "the nodePort is not guarded"
        );
    }
}
