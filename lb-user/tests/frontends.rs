//! Everything a process on the node can ask of a Service besides a ClusterIP over IPv4:
//! ClientIP session affinity, nodePorts on node addresses and localhost, externalIPs and
//! LoadBalancer ingress IPs, IPv6 and dual-stack services. Real programs, real sockets.

mod common;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use common::{Fixture, POD_PORT};
use lb_lab::lab::{self, ProbeMode, ProbeOptions, ProbeReport};

/// A Service `name` in namespace t with `spec_extra` lines (indented by two spaces), one
/// TCP port 80 -> http, and its IPv4 slice over `pods`.
fn service_yaml(name: &str, spec_extra: &str, pods: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n{spec_extra}\
         \x20 ports:\n  - {{name: http, port: 80, targetPort: http, nodePort: 30080}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-a\n  namespace: t\n  \
         labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: {POD_PORT}, protocol: TCP}}]\nendpoints:\n"
    );
    for ip in pods {
        s.push_str(&format!("- addresses: [{ip}]\n"));
    }
    s
}

fn probe(fx: &Fixture, target: SocketAddr, count: usize) -> ProbeReport {
    probe_mode(fx, target, count, ProbeMode::Tcp)
}

fn probe_mode(fx: &Fixture, target: SocketAddr, count: usize, mode: ProbeMode) -> ProbeReport {
    fx.lab
        .probe(&ProbeOptions::tcp(target, count).with_mode(mode), true)
        .unwrap_or_else(|e| panic!("probe failed: {e:#}\nagent log:\n{}", fx.agent.log()))
}

/// The one backend that answered every one of `count` connections.
fn single_backend(report: &ProbeReport, count: usize, what: &str) -> String {
    assert_eq!(report.total_errors(), 0, "{what}: {report:?}");
    assert_eq!(
        report.replies.len(),
        1,
        "{what}: not one backend: {report:?}"
    );
    let (name, n) = report.replies.iter().next().unwrap();
    assert_eq!(*n, count, "{what}: {report:?}");
    name.clone()
}

fn counters(fx: &Fixture, program: &str) -> lb_common::Counters {
    lb_user::datapath::read_counters(&fx.agent.pin_path)
        .unwrap()
        .into_iter()
        .find(|(name, _)| *name == program)
        .unwrap()
        .1
}

const STICKY: &str = "10.96.0.10";
const BRIEF: &str = "10.96.0.11";

#[test]
fn client_ip_affinity_keeps_each_namespace_on_one_backend_until_the_timeout() {
    // Pods 0-3 are backends; pod 4 is the second client namespace.
    let mut fx = Fixture::new("aff", 5, &[]);
    let backends = fx.pod_ips(&[0, 1, 2, 3]);
    fx.write(
        "sticky.yaml",
        &service_yaml(
            "sticky",
            &format!("  clusterIP: {STICKY}\n  sessionAffinity: ClientIP\n"),
            &backends,
        ),
    );
    fx.write(
        "brief.yaml",
        &service_yaml(
            "brief",
            &format!(
                "  clusterIP: {BRIEF}\n  sessionAffinity: ClientIP\n  \
                 sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 1}}}}\n"
            ),
            &backends,
        ),
    );
    let sticky: SocketAddr = format!("{STICKY}:80").parse().unwrap();
    let brief: SocketAddr = format!("{BRIEF}:80").parse().unwrap();
    fx.wait_answering(sticky, ProbeMode::Tcp);
    fx.wait_answering(brief, ProbeMode::Tcp);

    // 100 connections from the node's namespace: one backend.
    let node_choice = single_backend(&probe(&fx, sticky, 100), 100, "from the node");
    // 100 from a pod's namespace: one backend too (whichever it is).
    let pod_ns = &fx.lab.pods[4].netns;
    let report = fx
        .lab
        .probe_from(&ProbeOptions::tcp(sticky, 100), pod_ns, true)
        .unwrap();
    single_backend(&report, 100, "from pod-4's namespace");
    assert!(
        counters(&fx, "connect4").affinity_hits >= 198,
        "{:?}",
        counters(&fx, "connect4")
    );
    let dump = lab::run(
        std::process::Command::new(common::AGENT_BIN)
            .args(["dump", "--pin-path"])
            .arg(&fx.agent.pin_path),
    )
    .unwrap();
    assert!(
        dump.contains("affinity ClientIP 10800s (2 clients)"),
        "{dump}"
    );

    // The remembered backend leaves the service: the node's namespace chooses again,
    // without a failed connection.
    let gone: usize = node_choice
        .trim_start_matches("pod-")
        .parse()
        .expect("pod-N");
    let remaining: Vec<Ipv4Addr> = (0..4)
        .filter(|i| *i != gone)
        .map(|i| fx.lab.pods[i].ip)
        .collect();
    fx.write(
        "sticky.yaml",
        &service_yaml(
            "sticky",
            &format!("  clusterIP: {STICKY}\n  sessionAffinity: ClientIP\n"),
            &remaining,
        ),
    );
    fx.agent.wait_synced(2, Duration::from_secs(5)).unwrap();
    let moved = lab::wait_for(Duration::from_secs(3), || {
        let r = probe(&fx, sticky, 1);
        (r.total_errors() == 0 && !r.replies.contains_key(&node_choice)).then_some(())
    });
    assert!(moved.is_some(), "still sent to {node_choice}");
    let next = single_backend(&probe(&fx, sticky, 50), 50, "after the backend left");
    assert_ne!(next, node_choice);

    // timeoutSeconds 1: after a second without connections the choice is made again.
    let first = single_backend(&probe(&fx, brief, 20), 20, "brief");
    let mut seen = BTreeSet::from([first.clone()]);
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(1_200));
        let round = single_backend(&probe(&fx, brief, 5), 5, "brief, one round");
        seen.insert(round);
        if seen.len() > 1 {
            break;
        }
    }
    assert!(
        seen.len() > 1,
        "12 expiries all chose {first} again (4 backends): affinity never expired"
    );
}

#[test]
fn node_ports_external_ips_and_load_balancer_ips_reach_the_backends() {
    const NODE_IP: &str = "198.51.100.10";
    let fx = Fixture::with_source("np", 3, &[], None, &["--node-ip", NODE_IP]);
    lab::ip(&[
        "-n",
        &fx.lab.node.name,
        "addr",
        "add",
        &format!("{NODE_IP}/32"),
        "dev",
        "lo",
    ])
    .unwrap();
    let spec = "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalIPs: [203.0.113.10]\n";
    let yaml = service_yaml("lb", spec, &fx.pod_ips(&[0, 1, 2])).replace(
        "\n---\napiVersion: discovery",
        "\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.20}, {ip: 203.0.113.30, ipMode: Proxy}]}}\n---\napiVersion: discovery",
    );
    fx.write("lb.yaml", &yaml);
    let cluster: SocketAddr = "10.96.0.10:80".parse().unwrap();
    fx.wait_answering(cluster, ProbeMode::Tcp);
    for target in [
        format!("{NODE_IP}:30080"),
        "127.0.0.1:30080".into(),
        "203.0.113.10:80".into(),
        "203.0.113.20:80".into(),
    ] {
        let target: SocketAddr = target.parse().unwrap();
        let r = probe(&fx, target, 60);
        assert_eq!(r.total_replies(), 60, "{target}: {r:?}");
        assert!(r.replies.len() >= 2, "{target}: not balanced: {r:?}");
    }
    // Not frontends: the ingress IP with ipMode Proxy (no route: unreachable), and the
    // node address at the service port (a local address where nothing listens).
    let proxy = probe(&fx, "203.0.113.30:80".parse().unwrap(), 2);
    assert_eq!(proxy.errors.get("ENETUNREACH"), Some(&2), "{proxy:?}");
    let wrong_port = probe(&fx, format!("{NODE_IP}:80").parse().unwrap(), 2);
    assert_eq!(
        wrong_port.errors.get("ECONNREFUSED"),
        Some(&2),
        "{wrong_port:?}"
    );
}

/// A dual-stack Service: IPv4 and IPv6 cluster IPs, TCP and UDP port 80, one slice of
/// each family over `pods` (lab pod indexes).
fn dual_stack_yaml(fx: &Fixture, pods: &[usize]) -> String {
    let mut s = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: dual, namespace: t}\nspec:\n  \
         ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
         clusterIPs: [10.96.0.10, 'fd00:96::10']\n  ports:\n  \
         - {name: http, port: 80, targetPort: 8080}\n  \
         - {name: udp, port: 80, protocol: UDP, targetPort: 8080}\n",
    );
    for (family, suffix) in [("IPv4", "4"), ("IPv6", "6")] {
        s.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dual-{suffix}\n  \
             namespace: t\n  labels: {{kubernetes.io/service-name: dual}}\naddressType: {family}\n\
             ports: [{{name: http, port: 8080}}, {{name: udp, port: 8080, protocol: UDP}}]\nendpoints:\n"
        ));
        for i in pods {
            let pod = &fx.lab.pods[*i];
            let ip = if family == "IPv4" {
                pod.ip.to_string()
            } else {
                pod.ip6.to_string()
            };
            s.push_str(&format!("- addresses: ['{ip}']\n"));
        }
    }
    s
}

#[test]
fn ipv6_and_dual_stack_services_are_balanced_at_socket_level() {
    let fx = Fixture::new("v6", 3, &[]);
    fx.write("dual.yaml", &dual_stack_yaml(&fx, &[0, 1, 2]));
    fx.write(
        "empty6.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty6, namespace: t}\n\
         spec: {clusterIPs: ['fd00:96::20'], ipFamilies: [IPv6], ports: [{port: 80}]}\n",
    );
    let v6: SocketAddr = "[fd00:96::10]:80".parse().unwrap();
    fx.wait_answering(v6, ProbeMode::Tcp);
    // TCP over IPv6, getpeername() checked by every probe.
    let r = probe(&fx, v6, 90);
    assert_eq!(r.total_replies(), 90, "{r:?}");
    assert_eq!(r.replies.len(), 3, "not all backends used: {r:?}");
    // UDP over IPv6: connected, and unconnected with replies from the service address.
    for mode in [ProbeMode::UdpConnected, ProbeMode::UdpSendto] {
        let r = probe_mode(&fx, v6, 30, mode);
        assert_eq!(r.total_replies(), 30, "{mode:?}: {r:?}");
        assert!(r.replies.len() >= 2, "{mode:?}: {r:?}");
    }
    // The IPv4 cluster IP of the same service, and the same through an IPv6 socket
    // (an IPv4-mapped destination, as dual-stack programs use).
    for target in ["10.96.0.10:80", "[::ffff:10.96.0.10]:80"] {
        let r = probe(&fx, target.parse().unwrap(), 30);
        assert_eq!(r.total_replies(), 30, "{target}: {r:?}");
    }
    let c6 = counters(&fx, "connect6");
    assert!(c6.translated >= 90 + 30 + 30, "{c6:?}");
    assert!(counters(&fx, "sendmsg6").translated >= 30);
    assert!(counters(&fx, "recvmsg6").translated >= 30);
    assert!(counters(&fx, "getpeername6").translated >= 90);
    // An IPv6 service without endpoints refuses.
    let refused = probe(&fx, "[fd00:96::20]:80".parse().unwrap(), 2);
    assert_eq!(refused.errors.get("ECONNREFUSED"), Some(&2), "{refused:?}");
    // Not a service: untouched, and unreachable from the node (no IPv6 default route).
    let other = probe(&fx, "[fd00:96::99]:80".parse().unwrap(), 1);
    assert_eq!(other.total_replies(), 0, "{other:?}");
}

#[test]
fn a_service_takes_neither_another_services_cluster_ip_nor_its_node_port() {
    // t/web holds ClusterIP 10.96.0.10 and nodePort 30080 (pod-0). t/evil, first by
    // name, lists that ClusterIP as an externalIP and asks for the same nodePort (pod-1).
    let port = common::free_port();
    let bind = format!("127.0.0.1:{port}");
    let args = ["--metrics-bind-address", &bind];
    let fx = Fixture::with_source("conflict", 2, &[], None, &args);
    let web = "  type: NodePort\n  clusterIP: 10.96.0.10\n";
    fx.write("web.yaml", &service_yaml("web", web, &fx.pod_ips(&[0])));
    let cluster: SocketAddr = "10.96.0.10:80".parse().unwrap();
    fx.wait_answering(cluster, ProbeMode::Tcp);
    let evil = "  type: NodePort\n  clusterIP: 10.96.0.11\n  externalIPs: [10.96.0.10]\n";
    fx.write("evil.yaml", &service_yaml("evil", evil, &fx.pod_ips(&[1])));
    fx.wait_answering(
        "10.96.0.11:80".parse::<SocketAddr>().unwrap(),
        ProbeMode::Tcp,
    );
    for target in ["10.96.0.10:80", "127.0.0.1:30080"] {
        let r = probe(&fx, target.parse().unwrap(), 8);
        assert_eq!(single_backend(&r, 8, target), "pod-0", "{target}: {r:?}");
    }
    let metrics = common::http_get(port, "/metrics");
    assert!(
        metrics.contains("lb_frontend_conflicts 2\n"),
        "the externalIP and the nodePort claims lost:\n{metrics}"
    );
    let log = fx.agent.log();
    assert!(
        log.contains(
            "frontend 10.96.0.10:80/TCP (ExternalIP) is already used by t/web (its ClusterIP"
        ),
        "{log}"
    );
    // web goes: evil's claims win now.
    fx.remove("web.yaml");
    let moved = lab::wait_for(Duration::from_secs(5), || {
        let r = probe(&fx, "127.0.0.1:30080".parse().unwrap(), 4);
        (r.replies.get("pod-1") == Some(&4)).then_some(())
    });
    assert!(
        moved.is_some(),
        "the nodePort never went to evil:\n{}",
        fx.agent.log()
    );
}
