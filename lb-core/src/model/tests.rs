//! The model's tests: kube-proxy's rules, one behaviour a test.

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
            Some("EndpointSlice") => objects.slices.push(serde_yaml::from_value(value).unwrap()),
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
        scope: Scope::External,
    }
}

fn eps(list: &[(&str, u16)]) -> BTreeSet<Endpoint> {
    list.iter()
        .map(|(a, p)| Endpoint {
            addr: a.parse().unwrap(),
            port: *p,
            local: false,
        })
        .collect()
}

/// Endpoints on this node (`nodeName: node-a`).
fn local_eps(list: &[(&str, u16)]) -> BTreeSet<Endpoint> {
    eps(list)
        .into_iter()
        .map(|e| Endpoint { local: true, ..e })
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
        w.contains("EndpointSlice shop/web-bad: field endpoints[0].addresses[0]: \"not-an-ip\""),
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
        local_eps(&[("10.0.0.1", 80)])
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
        local_eps(&[("10.0.0.1", 80)])
    );
}

/// One endpoint line: address, node, zone hints, node hints, conditions.
fn ep_line(addr: &str, node: &str, zones: &[&str], nodes: &[&str], conditions: &str) -> String {
    let names = |v: &[&str]| -> String {
        v.iter()
            .map(|n| format!("{{name: {n}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut hints = Vec::new();
    if !zones.is_empty() {
        hints.push(format!("forZones: [{}]", names(zones)));
    }
    if !nodes.is_empty() {
        hints.push(format!("forNodes: [{}]", names(nodes)));
    }
    let mut line = format!("- addresses: [{addr}]\n  nodeName: {node}\n");
    if !hints.is_empty() {
        line += &format!("  hints: {{{}}}\n", hints.join(", "));
    }
    if !conditions.is_empty() {
        line += &format!("  conditions: {conditions}\n");
    }
    line
}

#[test]
fn topology_follows_kube_proxys_topology_mode_from_hints() {
    // (case, endpoints, node object (zone-1 or none), expected addresses), as kube-proxy
    // 1.33's topologyModeFromHints / CategorizeEndpoints decide for node-a.
    let z = |a: &str, zones: &[&str]| ep_line(a, "node-x", zones, &[], "");
    let n = |a: &str, zones: &[&str], nodes: &[&str]| ep_line(a, "node-x", zones, nodes, "");
    let cases: Vec<(&str, String, bool, Vec<&str>)> = vec![
        (
            "zone hints on every ready endpoint: this zone's only, whatever the service asks",
            z("10.0.0.1", &["zone-1"]) + &z("10.0.0.2", &["zone-2"]),
            true,
            vec!["10.0.0.1"],
        ),
        (
            "one ready endpoint without hints: all",
            z("10.0.0.1", &["zone-1"]) + &z("10.0.0.2", &[]),
            true,
            vec!["10.0.0.1", "10.0.0.2"],
        ),
        (
            "a not-ready endpoint without hints does not count",
            z("10.0.0.1", &["zone-1"])
                + &z("10.0.0.2", &["zone-2"])
                + &ep_line("10.0.0.3", "node-x", &[], &[], "{ready: false}"),
            true,
            vec!["10.0.0.1"],
        ),
        (
            "no endpoint hinted for this zone: all",
            z("10.0.0.1", &["zone-3"]) + &z("10.0.0.2", &["zone-2"]),
            true,
            vec!["10.0.0.1", "10.0.0.2"],
        ),
        (
            "the node has no zone: all",
            z("10.0.0.1", &["zone-1"]) + &z("10.0.0.2", &["zone-2"]),
            false,
            vec!["10.0.0.1", "10.0.0.2"],
        ),
        (
            "node hints on every ready endpoint, one for this node: PreferSameNode",
            n("10.0.0.1", &["zone-1"], &["node-a"]) + &n("10.0.0.2", &["zone-1"], &["node-b"]),
            true,
            vec!["10.0.0.1"],
        ),
        (
            "node hints, none for this node: zone hints decide",
            n("10.0.0.1", &["zone-1"], &["node-c"]) + &n("10.0.0.2", &["zone-2"], &["node-b"]),
            true,
            vec!["10.0.0.1"],
        ),
        (
            "node hints on some only: zone hints decide",
            n("10.0.0.1", &["zone-2"], &["node-a"]) + &n("10.0.0.2", &["zone-1"], &[]),
            true,
            vec!["10.0.0.2"],
        ),
        (
            "no ready endpoint: the mode comes from ready ones only, so none; every serving-and-terminating one",
            ep_line(
                "10.0.0.1",
                "node-x",
                &["zone-1"],
                &[],
                "{ready: false, serving: true, terminating: true}",
            ) + &ep_line(
                "10.0.0.2",
                "node-x",
                &["zone-2"],
                &[],
                "{ready: false, serving: true, terminating: true}",
            ),
            true,
            vec!["10.0.0.1", "10.0.0.2"],
        ),
    ];
    for (case, endpoints, zoned, want) in cases {
        let mut yaml = svc_with("", "", &endpoints);
        if zoned {
            yaml += NODE_A_ZONE_1;
        }
        let got: Vec<String> = selected(&yaml).iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(got, want, "{case}");
    }
}

#[test]
fn endpoint_conditions_and_duplicates_follow_kube_proxy() {
    // (case, endpoints, expected addresses). Absent ready and serving are true, absent
    // terminating false; serving-and-terminating endpoints are used only when none is
    // ready; an address listed twice: the first copy, unless a later one is local.
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "no conditions: ready",
            ep_line("10.0.0.1", "node-x", &[], &[], ""),
            vec!["10.0.0.1"],
        ),
        (
            "not ready, terminating, serving absent (true): the fallback",
            ep_line(
                "10.0.0.1",
                "node-x",
                &[],
                &[],
                "{ready: false, terminating: true}",
            ),
            vec!["10.0.0.1"],
        ),
        (
            "not ready, not terminating: unused",
            ep_line("10.0.0.1", "node-x", &[], &[], "{ready: false}"),
            vec![],
        ),
        (
            "terminating but not serving: unused",
            ep_line(
                "10.0.0.1",
                "node-x",
                &[],
                &[],
                "{ready: false, serving: false, terminating: true}",
            ),
            vec![],
        ),
        (
            "a ready endpoint: the terminating ones are not used",
            ep_line(
                "10.0.0.1",
                "node-x",
                &[],
                &[],
                "{ready: false, terminating: true}",
            ) + &ep_line("10.0.0.2", "node-x", &[], &[], "{ready: true}"),
            vec!["10.0.0.2"],
        ),
        (
            "a duplicate: the first copy counts (here not ready)",
            ep_line("10.0.0.1", "node-x", &[], &[], "{ready: false}")
                + &ep_line("10.0.0.1", "node-x", &[], &[], "{ready: true}"),
            vec![],
        ),
        (
            "a duplicate on this node replaces the first copy",
            ep_line("10.0.0.1", "node-x", &[], &[], "{ready: false}")
                + &ep_line("10.0.0.1", "node-a", &[], &[], "{ready: true}"),
            vec!["10.0.0.1"],
        ),
    ];
    for (case, endpoints, want) in cases {
        let got: Vec<String> = selected(&svc_with("", "", &endpoints))
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(got, want, "{case}");
    }
}

#[test]
fn services_and_slices_of_another_proxy_or_headless_are_not_served() {
    let other = svc_with("", "", "- addresses: [10.0.0.1]\n").replacen(
        "metadata: {name: s, namespace: n}",
        "metadata: {name: s, namespace: n, labels: {service.kubernetes.io/service-proxy-name: other}}",
        1,
    );
    assert!(build_from(&other).desired.frontends.is_empty());
    // A slice so labelled is not used (a headless service's), the others are.
    let yaml = svc_with("", "", "- addresses: [10.0.0.1]\n")
        + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s-2\n  namespace: n\n  \
           labels: {kubernetes.io/service-name: s, service.kubernetes.io/headless: ''}\naddressType: IPv4\nports: [{port: 80}]\n\
           endpoints:\n- addresses: [10.0.0.2]\n";
    assert_eq!(selected(&yaml), eps(&[("10.0.0.1", 80)]));
}

#[test]
fn local_policy_with_endpoints_only_elsewhere_is_told_apart_from_no_endpoints() {
    let remote = "- addresses: [10.0.0.2]\n  nodeName: node-b\n";
    let b = build_from(&svc_with(", internalTrafficPolicy: Local", "", remote));
    let state = &b.desired.frontends[&fe("10.96.0.9", 80, Proto::Tcp)];
    assert!(state.endpoints.is_empty() && state.no_local, "{state:?}");
    // Nothing usable anywhere: a service without endpoints, refused as such.
    let unready = "- addresses: [10.0.0.2]\n  nodeName: node-b\n  conditions: {ready: false}\n";
    let b = build_from(&svc_with(", internalTrafficPolicy: Local", "", unready));
    let state = &b.desired.frontends[&fe("10.96.0.9", 80, Proto::Tcp)];
    assert!(state.endpoints.is_empty() && !state.no_local, "{state:?}");
    let b = build_from(&svc_with("", "", remote));
    assert!(!b.desired.frontends[&fe("10.96.0.9", 80, Proto::Tcp)].no_local);
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
    assert!(b.warnings[0].starts_with("EndpointSlice n/s-1: field ports[0].port: 0 is not a port"));
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
    let all: BTreeSet<Endpoint> = local_eps(&[("10.0.0.1", 80)])
        .into_iter()
        .chain(eps(&[("10.0.0.2", 80)]))
        .collect();
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
            (
                fe("10.96.0.9", 80, Proto::Tcp),
                local_eps(&[("10.0.0.1", 80)])
            ),
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
    // --node-ip 127.0.0.1 is no clash with the localhost nodePort.
    let b = build(&objects, Some("node-a"), &["127.0.0.1".parse().unwrap()]);
    assert!(b.warnings.is_empty(), "{:?}", b.warnings);
    assert_eq!(b.desired.frontends.len(), 2);
}

#[test]
fn a_shared_external_ip_and_its_local_twin_go_to_the_same_service() {
    // n/a (Cluster) and n/b (externalTrafficPolicy Local) both list 198.51.100.20:80;
    // a wins it, so the packet level's Local-scope twin is not b's either.
    let svc = |name: &str, ip: &str, node_port: u16, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: n}}\n\
             spec: {{type: NodePort, clusterIP: {ip}, externalIPs: [198.51.100.20], ports: [{{port: 80, nodePort: {node_port}}}]{extra}}}\n---\n"
        )
    };
    let yaml = svc("a", "10.96.0.1", 30080, "")
        + &svc(
            "b",
            "10.96.0.2",
            30081,
            ", externalTrafficPolicy: Local, healthCheckNodePort: 32000",
        );
    let b = build_from(&yaml);
    let x = fe("198.51.100.20", 80, Proto::Tcp);
    assert_eq!(b.desired.frontends[&x].service, "n/a");
    let twin = Frontend {
        scope: Scope::Local,
        ..x
    };
    assert!(
        !b.desired.frontends.contains_key(&twin),
        "{:?}",
        b.desired.frontends.keys()
    );
    assert!(
        b.warnings.iter().any(
            |w| w.contains("frontend 198.51.100.20:80/TCP (ExternalIP) is already used by n/a")
        ),
        "{:?}",
        b.warnings
    );
}

#[test]
fn ingress_ips_are_served_whatever_the_type() {
    // kube-proxy reads status.loadBalancer.ingress of every service.
    let status = "status: {loadBalancer: {ingress: [{ip: 203.0.113.5}]}}\n";
    for ty in ["", ", type: NodePort", ", type: LoadBalancer"] {
        let b = build_from(&exposed(ty, status));
        assert!(
            b.desired
                .frontends
                .contains_key(&fe("203.0.113.5", 80, Proto::Tcp)),
            "type {ty:?}: {:?}",
            b.desired.frontends.keys()
        );
    }
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
        warnings
            .contains("Service n/s: field spec.externalIPs[2]: \"300.1.1.1\" is not an IP address"),
        "{warnings}"
    );
    assert!(
        warnings.contains("Service n/s: field status.loadBalancer.ingress[3].ip: \"not-an-ip\""),
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

#[test]
fn external_traffic_policy_local_adds_a_local_scope_for_outside_clients() {
    let yaml = exposed(", type: NodePort, externalTrafficPolicy: Local", "");
    let b = build_from(&yaml);
    assert!(b.warnings.is_empty(), "{:?}", b.warnings);
    let local_scope = |addr: &str| Frontend {
        scope: Scope::Local,
        ..fe(addr, 30080, Proto::Tcp)
    };
    // The node's own clients keep every endpoint; outside clients get node-a's only.
    let all = b.desired.frontends[&fe("192.0.2.1", 30080, Proto::Tcp)]
        .endpoints
        .len();
    assert_eq!(all, 2);
    for addr in ["192.0.2.1", "127.0.0.1"] {
        assert_eq!(
            b.desired.frontends[&local_scope(addr)].endpoints,
            local_eps(&[("10.0.0.1", 80)]),
            "{addr}"
        );
    }
    // The cluster IP has no local scope: externalTrafficPolicy is for external addresses.
    assert!(!b.desired.frontends.contains_key(&Frontend {
        scope: Scope::Local,
        ..fe("10.96.0.9", 80, Proto::Tcp)
    }));
    // Without a local endpoint the local scope is empty: outside clients are dropped.
    let remote_only = yaml.replace("nodeName: node-a", "nodeName: node-c");
    let b = build_from(&remote_only);
    assert!(
        b.desired.frontends[&local_scope("192.0.2.1")]
            .endpoints
            .is_empty()
    );
    // Cluster (the default) has no local scope; an unknown value warns and is Cluster.
    let b = build_from(&exposed(", type: NodePort", ""));
    assert!(!b.desired.frontends.contains_key(&local_scope("192.0.2.1")));
    let b = build_from(&exposed(
        ", type: NodePort, externalTrafficPolicy: Nearby",
        "",
    ));
    assert!(!b.desired.frontends.contains_key(&local_scope("192.0.2.1")));
    assert_eq!(b.warnings.len(), 1, "{:?}", b.warnings);
    assert!(
        b.warnings[0].contains("field spec.externalTrafficPolicy: unknown value \"Nearby\""),
        "{:?}",
        b.warnings
    );
}

#[test]
fn health_check_node_port_counts_this_nodes_endpoints() {
    let yaml = exposed(
        ", type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32100",
        "",
    );
    let b = build_from(&yaml);
    assert!(b.warnings.is_empty(), "{:?}", b.warnings);
    assert_eq!(
        b.health_checks.get(&32100),
        Some(&HealthCheck {
            namespace: "n".into(),
            name: "s".into(),
            local_endpoints: 1,
        })
    );
    // No local endpoint: served, with 0 (the node answers 503).
    let b = build_from(&yaml.replace("nodeName: node-a", "nodeName: node-c"));
    assert_eq!(b.health_checks[&32100].local_endpoints, 0);
    // Cluster policy: no health check; a bad port warns.
    let b = build_from(&exposed(
        ", type: LoadBalancer, healthCheckNodePort: 32100",
        "",
    ));
    assert!(b.health_checks.is_empty());
    let b = build_from(&yaml.replace("32100", "70000"));
    assert!(b.health_checks.is_empty());
    assert!(
        b.warnings[0].contains("field spec.healthCheckNodePort: 70000 is not a port"),
        "{:?}",
        b.warnings
    );
}

#[test]
fn health_check_node_port_counts_ready_endpoints_only() {
    // kube-proxy's LocalReadyEndpoints: this node's endpoint is terminating (still
    // serving): it keeps the traffic, the check counts 0 (503) so load balancers leave.
    let yaml = exposed(
        ", type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32100",
        "",
    )
    .replace(
        "nodeName: node-a\n",
        "nodeName: node-a\n  conditions: {ready: false, serving: true, terminating: true}\n",
    );
    let b = build_from(&yaml);
    assert!(b.warnings.is_empty(), "{:?}", b.warnings);
    assert_eq!(b.health_checks[&32100].local_endpoints, 0);
    let local_scope = Frontend {
        scope: Scope::Local,
        ..fe("192.0.2.1", 30080, Proto::Tcp)
    };
    assert_eq!(
        b.desired.frontends[&local_scope].endpoints,
        local_eps(&[("10.0.0.1", 80)]),
        "the terminating endpoint is still programmed"
    );
    // Not serving any more: neither programmed nor counted.
    let b = build_from(&yaml.replace("serving: true", "serving: false"));
    assert!(b.desired.frontends[&local_scope].endpoints.is_empty());
    assert_eq!(b.health_checks[&32100].local_endpoints, 0);
}

#[test]
fn load_balancer_source_ranges_guard_the_ingress_ips_only() {
    let yaml = exposed(
        ", type: LoadBalancer, externalIPs: [192.0.2.50], \
         loadBalancerSourceRanges: [192.168.77.0/24, 10.1.2.3, '10.9.0.0/33', 'fd00::/64', bogus]",
        "status: {loadBalancer: {ingress: [{ip: 203.0.113.20}]}}\n",
    );
    let b = build_from(&yaml);
    let ranges = |addr: &str, port: u16| {
        b.desired.frontends[&fe(addr, port, Proto::Tcp)]
            .source_ranges
            .clone()
    };
    let want: BTreeSet<(IpAddr, u8)> = [
        ("192.168.77.0".parse().unwrap(), 24),
        ("10.1.2.3".parse().unwrap(), 32),
    ]
    .into();
    assert_eq!(ranges("203.0.113.20", 80), want);
    // Not the cluster IP, the externalIP or the nodePorts.
    assert!(ranges("10.96.0.9", 80).is_empty());
    assert!(ranges("192.0.2.50", 80).is_empty());
    assert!(ranges("192.0.2.1", 30080).is_empty());
    let w = b.warnings.join("\n");
    assert!(w.contains("field spec.loadBalancerSourceRanges[2]: \"10.9.0.0/33\": prefix length \"33\" is not 0-32"), "{w}");
    assert!(
        w.contains("field spec.loadBalancerSourceRanges[4]: \"bogus\": not an IP address or CIDR"),
        "{w}"
    );
    assert!(w.contains("connections from this node's own processes and pods to the LoadBalancer IP are not checked"), "{w}");
    assert_eq!(b.warnings.len(), 3, "{w}");
}

#[test]
fn each_frontend_knows_its_kind_and_the_traffic_policy_that_applies() {
    let status = "status: {loadBalancer: {ingress: [{ip: 203.0.113.5}]}}\n";
    let b = build_from(&exposed(
        ", type: LoadBalancer, externalTrafficPolicy: Cluster, externalIPs: [198.51.100.20]",
        status,
    ));
    let kind = |addr: &str, port: u16| {
        let s = &b.desired.frontends[&fe(addr, port, Proto::Tcp)];
        (s.kind, s.policy_local)
    };
    // internalTrafficPolicy Local (the helper's) applies to the cluster IP only.
    assert_eq!(kind("10.96.0.9", 80), (FrontendKind::ClusterIp, true));
    assert_eq!(kind("198.51.100.20", 80), (FrontendKind::ExternalIp, false));
    assert_eq!(kind("203.0.113.5", 80), (FrontendKind::LoadBalancer, false));
    assert_eq!(kind("192.0.2.1", 30080), (FrontendKind::NodePort, false));
    let b = build_from(&exposed(
        ", type: NodePort, externalTrafficPolicy: Local",
        "",
    ));
    let s = &b.desired.frontends[&fe("192.0.2.1", 30080, Proto::Tcp)];
    assert_eq!((s.kind, s.policy_local), (FrontendKind::NodePort, true));
}

/// A model fed `yaml` as one more change (an apply of each object), then updated.
fn add(model: &mut Model, yaml: &str) {
    let o = objects_from(yaml);
    for s in o.services {
        model.apply(Change::Apply(Object::Service(std::sync::Arc::new(s))));
    }
    model.update();
}

fn owner(model: &Model, addr: &str, port: u16) -> Option<String> {
    model
        .desired()
        .frontends
        .get(&fe(addr, port, Proto::Tcp))
        .map(|s| s.service.clone())
}

fn service_yaml(ns_name: (&str, &str), spec: &str, created: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: {}, name: {}, creationTimestamp: '{created}'}}\nspec: {spec}\n---\n",
        ns_name.0, ns_name.1
    )
}

#[test]
fn a_cluster_ip_is_never_taken_by_another_services_external_ip() {
    // CVE-2020-8554's pattern: aaa/evil (first by name, older) lists zzz/web's ClusterIP
    // as an externalIP. Whichever comes first, web keeps its ClusterIP.
    let web = service_yaml(
        ("zzz", "web"),
        "{clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        "2026-01-02T00:00:00Z",
    );
    let evil = service_yaml(
        ("aaa", "evil"),
        "{clusterIP: 10.96.0.66, externalIPs: [10.96.0.10], ports: [{port: 80}]}",
        "2026-01-01T00:00:00Z",
    );
    for order in [[&web, &evil], [&evil, &web]] {
        let mut model = Model::new(Some("node-a".into()), Vec::new());
        add(&mut model, order[0]);
        add(&mut model, order[1]);
        assert_eq!(owner(&model, "10.96.0.10", 80).as_deref(), Some("zzz/web"));
        assert_eq!(model.conflicts(), 1);
        let w = model.warnings();
        assert!(
            w.iter().any(|w| w.contains("Service aaa/evil: field spec.ports[0]: frontend 10.96.0.10:80/TCP (ExternalIP) is already used by zzz/web (its ClusterIP, a ClusterIP, which no other kind of address may take)")),
            "{w:?}"
        );
    }
    // The full build agrees.
    let b = build_from(&(evil.clone() + &web));
    assert_eq!(
        b.desired.frontends[&fe("10.96.0.10", 80, Proto::Tcp)].service,
        "zzz/web"
    );
}

#[test]
fn a_new_service_does_not_take_a_node_port_or_an_external_ip_in_use() {
    let old = service_yaml(
        ("zzz", "old"),
        "{type: NodePort, clusterIP: 10.96.0.1, externalIPs: [198.51.100.9], ports: [{port: 80, nodePort: 30080}]}",
        "2026-01-02T00:00:00Z",
    );
    // Older by its timestamp and first by name: neither counts against a holder.
    let new = service_yaml(
        ("aaa", "new"),
        "{type: NodePort, clusterIP: 10.96.0.2, externalIPs: [198.51.100.9], ports: [{port: 80, nodePort: 30080}]}",
        "2026-01-01T00:00:00Z",
    );
    let mut model = Model::new(Some("node-a".into()), Vec::new());
    add(&mut model, &old);
    add(&mut model, &new);
    assert_eq!(
        owner(&model, "127.0.0.1", 30080).as_deref(),
        Some("zzz/old")
    );
    assert_eq!(
        owner(&model, "198.51.100.9", 80).as_deref(),
        Some("zzz/old")
    );
    assert_eq!(model.conflicts(), 2);
    assert!(
        model
            .warnings()
            .iter()
            .any(|w| w.contains("(its NodePort, held before this claim was made)")),
        "{:?}",
        model.warnings()
    );
    // A change to the holder (a new port) does not make its claims new.
    add(
        &mut model,
        &old.replace("ports: [", "ports: [{port: 81, name: b}, "),
    );
    assert_eq!(
        owner(&model, "127.0.0.1", 30080).as_deref(),
        Some("zzz/old")
    );
    // The holder lets go: the other claimant takes over.
    model.apply(Change::Delete(Kind::Service, ("zzz".into(), "old".into())));
    model.update();
    assert_eq!(
        owner(&model, "127.0.0.1", 30080).as_deref(),
        Some("aaa/new")
    );
    assert_eq!(model.conflicts(), 0);
}

#[test]
fn claims_made_together_go_to_the_older_service() {
    let svc = |ns: &str, created: &str| {
        let ip = if ns == "aaa" { 1 } else { 2 };
        service_yaml(
            (ns, "s"),
            &format!(
                "{{type: NodePort, clusterIP: 10.96.0.{ip}, ports: [{{port: 80, nodePort: 30080}}]}}"
            ),
            created,
        )
    };
    let b = build_from(&(svc("aaa", "2026-03-01T00:00:00Z") + &svc("zzz", "2025-03-01T00:00:00Z")));
    assert_eq!(
        b.desired.frontends[&fe("127.0.0.1", 30080, Proto::Tcp)].service,
        "zzz/s"
    );
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("(its NodePort, the older Service)")),
        "{:?}",
        b.warnings
    );
    // Equal timestamps: namespace/name decides.
    let b = build_from(&(svc("zzz", "2025-03-01T00:00:00Z") + &svc("aaa", "2025-03-01T00:00:00Z")));
    assert_eq!(
        b.desired.frontends[&fe("127.0.0.1", 30080, Proto::Tcp)].service,
        "aaa/s"
    );
}

#[test]
fn warnings_can_say_where_their_object_is_defined() {
    let b = objects_from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: n}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 70000}]}\n",
    );
    let mut model = Model::new(Some("node-a".into()), Vec::new());
    model.replace(b);
    model.update();
    let origin = |kind: Kind, key: &ObjKey| {
        (kind == Kind::Service && key.1 == "a").then(|| "svc.yaml, document 2".to_string())
    };
    let w = model.located_warnings(origin);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("svc.yaml, document 2: Service n/a: field spec.ports[0]"),
        "{w:?}"
    );
    assert_eq!(model.warnings()[0], w[0]["svc.yaml, document 2: ".len()..]);
}
