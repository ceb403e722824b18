//! Property test of the incremental path: after any sequence of random changes (services,
//! slices and the node added, modified, deleted, relisted), the model updated change by
//! change, and the maps written with the diffs of the changed frontends only, equal what
//! a full rebuild from scratch gives: the same desired state, health checks and
//! warnings, and maps that hold the same frontends, backends, names and ranges (ids
//! aside: they depend on the order of allocation).
//!
//! The random cases come from a seeded generator (no dependency); a failure prints the
//! seed and the step.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{core::v1::Node, core::v1::Service};

use super::{Change, Kind, Model, ObjKey, Object, Objects, build};
use crate::{
    ops::{Snapshot, frontend_of, ip_of},
    plan::Programmed,
};

/// xorshift64*: small, seeded, good enough to pick cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const NAMESPACES: [&str; 2] = ["a", "b"];
const NAMES: [&str; 4] = ["s0", "s1", "s2", "s3"];

/// A random Service: few addresses and ports, so that services collide on frontends
/// and health-check ports.
fn random_service(r: &mut Rng, ns: &str, name: &str) -> Service {
    let ty = r.pick(&["ClusterIP", "NodePort", "LoadBalancer"]);
    let mut ports = String::new();
    for (i, pname) in ["http", "dns"].iter().enumerate().take(1 + r.below(2)) {
        let proto = if r.chance(30) { "UDP" } else { "TCP" };
        let _ = std::fmt::Write::write_fmt(
            &mut ports,
            format_args!(
                "  - {{name: {pname}, port: {}, protocol: {proto}, nodePort: {}}}\n",
                80 + i,
                30000 + r.below(3)
            ),
        );
    }
    let external = if r.chance(40) {
        format!("  externalIPs: [{}]\n", r.pick(&["192.0.2.1", "192.0.2.2"]))
    } else {
        String::new()
    };
    let status = if ty == "LoadBalancer" && r.chance(60) {
        format!(
            "status: {{loadBalancer: {{ingress: [{{ip: {}}}]}}}}\n",
            r.pick(&["198.51.100.1", "198.51.100.2"])
        )
    } else {
        String::new()
    };
    let mut extra = String::new();
    if r.chance(30) {
        extra.push_str("  sessionAffinity: ClientIP\n");
    }
    if ty != "ClusterIP" && r.chance(40) {
        extra.push_str("  externalTrafficPolicy: Local\n");
        extra.push_str(&format!("  healthCheckNodePort: {}\n", 32000 + r.below(2)));
    }
    if r.chance(20) {
        extra.push_str("  internalTrafficPolicy: Local\n");
    }
    if r.chance(20) {
        extra.push_str("  loadBalancerSourceRanges: [203.0.113.0/24]\n");
    }
    if r.chance(20) {
        extra.push_str("  trafficDistribution: PreferClose\n");
    }
    let cluster_ip = format!("10.96.0.{}", 1 + r.below(6));
    let yaml = format!(
        "metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  type: {ty}\n  clusterIP: {cluster_ip}\n{external}{extra}  ports:\n{ports}{status}"
    );
    serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"))
}

/// A random EndpointSlice of service `svc` (sometimes without the label).
fn random_slice(r: &mut Rng, ns: &str, name: &str, svc: &str) -> super::Slice {
    let mut endpoints = String::new();
    for _ in 0..r.below(4) {
        let ready = r.pick(&["true", "false", "null"]);
        let serving = r.pick(&["true", "false", "null"]);
        let terminating = r.pick(&["true", "false"]);
        let zone = r.pick(&["z1", "z2"]);
        let _ = std::fmt::Write::write_fmt(
            &mut endpoints,
            format_args!(
                "- addresses: [10.244.0.{}]\n  nodeName: {}\n  zone: {zone}\n  hints: {{forZones: [{{name: {zone}}}]}}\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n",
                1 + r.below(5),
                r.pick(&["node-a", "node-b"])
            ),
        );
    }
    let labels = if r.chance(90) {
        format!("labels: {{kubernetes.io/service-name: {svc}}}")
    } else {
        String::from("labels: {}")
    };
    let trigger = format!(
        "annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"2026-01-01T00:00:{:02}Z\"}}",
        r.below(60)
    );
    let yaml = format!(
        "metadata: {{name: {name}, namespace: {ns}, {labels}, {trigger}}}\naddressType: IPv4\nports:\n- {{name: http, port: {}, protocol: TCP}}\n- {{name: dns, port: 53, protocol: UDP}}\nendpoints:{}",
        8080 + r.below(2),
        if endpoints.is_empty() {
            " []\n".to_string()
        } else {
            format!("\n{endpoints}")
        }
    );
    serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"))
}

fn random_node(r: &mut Rng) -> Node {
    let yaml = format!(
        "metadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: {}}}}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n",
        r.pick(&["z1", "z2"]),
        r.pick(&["172.16.0.1", "172.16.0.2"])
    );
    serde_yaml::from_str(&yaml).unwrap()
}

/// The truth: what the objects are after the changes so far.
#[derive(Default)]
struct Truth {
    objects: BTreeMap<(Kind, ObjKey), Object>,
}

impl Truth {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Apply(o) => {
                self.objects.insert((o.kind(), o.key()), o.clone());
            }
            Change::Delete(kind, key) => {
                self.objects.remove(&(*kind, key.clone()));
            }
            Change::Relist(kind, list) => {
                self.objects.retain(|(k, _), _| k != kind);
                for o in list {
                    self.objects.insert((o.kind(), o.key()), o.clone());
                }
            }
        }
    }

    fn objects(&self) -> Objects {
        let mut out = Objects::default();
        for o in self.objects.values() {
            match o {
                Object::Service(s) => out.services.push((**s).clone()),
                Object::EndpointSlice(s) => out.slices.push((**s).clone()),
                Object::Node(n) => out.nodes.push((**n).clone()),
            }
        }
        out
    }
}

fn random_change(r: &mut Rng, truth: &Truth) -> Change {
    let ns = r.pick(&NAMESPACES);
    let name = r.pick(&NAMES);
    let slice_name = format!("{name}-{}", r.below(2));
    let key = (ns.to_string(), name.to_string());
    match r.below(100) {
        0..30 => Change::Apply(Object::Service(random_service(r, ns, name).into())),
        30..40 => Change::Delete(Kind::Service, key),
        40..75 => Change::Apply(Object::EndpointSlice(
            random_slice(r, ns, &slice_name, name).into(),
        )),
        75..85 => Change::Delete(Kind::EndpointSlice, (ns.to_string(), slice_name)),
        85..90 => Change::Apply(Object::Node(random_node(r).into())),
        90..92 => Change::Delete(Kind::Node, (String::new(), "node-a".into())),
        _ => {
            // A relist of one kind: a random part of what exists, plus a new version of
            // one object.
            let kind = [Kind::Service, Kind::EndpointSlice][r.below(2)];
            let mut list: Vec<Object> = truth
                .objects
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .filter(|_| r.chance(80))
                .map(|(_, o)| o.clone())
                .collect();
            list.retain(|o| o.key() != key && o.key() != (ns.to_string(), slice_name.clone()));
            list.push(match kind {
                Kind::Service => Object::Service(random_service(r, ns, name).into()),
                _ => Object::EndpointSlice(random_slice(r, ns, &slice_name, name).into()),
            });
            Change::Relist(kind, list)
        }
    }
}

/// The maps as a person reads them: frontend -> header fields but the rev-NAT id,
/// backends (sorted), name, rev-NAT entry and source ranges. Also checks that nothing
/// dangles and nothing is left over.
type FrontendRow = (
    u16,
    u32,
    u32,
    Vec<(std::net::IpAddr, u16, u8, u8)>,
    String,
    (std::net::IpAddr, u16),
    BTreeSet<(u128, u8)>,
);

fn logical(maps: &Snapshot, ctx: &str) -> BTreeMap<String, FrontendRow> {
    let mut out = BTreeMap::new();
    let mut ids = BTreeSet::new();
    let mut backends_used = BTreeSet::new();
    for (key, (header, slots)) in maps.frontends() {
        let fe = frontend_of(&key).unwrap_or_else(|| panic!("{ctx}: bad key {key:?}"));
        let id = header.rev_nat_id;
        assert!(ids.insert(id), "{ctx}: rev-NAT id {id} used twice");
        let mut backends: Vec<_> = slots
            .iter()
            .map(|(bid, b)| {
                backends_used.insert(*bid);
                let b = b.unwrap_or_else(|| panic!("{ctx}: {fe}: backend {bid} missing"));
                (ip_of(&b.addr), b.port, b.proto, b.flags)
            })
            .collect();
        backends.sort();
        let revnat = maps
            .revnat
            .get(&id)
            .unwrap_or_else(|| panic!("{ctx}: {fe}: no rev-NAT entry"));
        let name = maps
            .names
            .get(&id)
            .unwrap_or_else(|| panic!("{ctx}: {fe}: no name"));
        let ranges = maps
            .source_ranges
            .iter()
            .filter(|(rid, _, _)| *rid == id)
            .map(|(_, a, p)| (u128::from_be_bytes(*a), *p))
            .collect();
        out.insert(
            fe.to_string(),
            (
                header.count,
                header.affinity_timeout,
                u32::from(header.flags),
                backends,
                format!("{name:?}"),
                (ip_of(&revnat.addr), revnat.port),
                ranges,
            ),
        );
    }
    assert_eq!(
        maps.revnat.keys().copied().collect::<BTreeSet<_>>(),
        ids,
        "{ctx}: rev-NAT entries without a frontend"
    );
    assert_eq!(
        maps.names.keys().copied().collect::<BTreeSet<_>>(),
        ids,
        "{ctx}: names without a frontend"
    );
    assert_eq!(
        maps.backends.keys().copied().collect::<BTreeSet<_>>(),
        backends_used,
        "{ctx}: backends no slot uses"
    );
    assert!(
        maps.source_ranges.iter().all(|(id, _, _)| ids.contains(id)),
        "{ctx}: source ranges without a frontend"
    );
    assert_eq!(
        maps.frontend_ports,
        maps.frontends()
            .keys()
            .map(|k| crate::ops::frontend_port(&frontend_of(k).unwrap()))
            .collect::<BTreeSet<_>>(),
        "{ctx}: the frontend ports are those of the frontends"
    );
    out
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn incremental_updates_leave_what_a_full_rebuild_leaves() {
    for seed in 1..=60u64 {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut truth = Truth::default();
        let mut model = Model::new(Some("node-a".into()), Vec::new());
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        for step in 0..80 {
            let ctx = format!("seed {seed} step {step}");
            for _ in 0..1 + r.below(3) {
                let change = random_change(&mut r, &truth);
                truth.apply(&change);
                model.apply(change);
            }
            let update = model.update();
            let full = build(&truth.objects(), Some("node-a"), &[]);
            // Who wins a contested frontend depends on the order of the claims, which a
            // full rebuild does not know: the rest must be equal (the ranking has tests
            // of its own).
            let (contested, ports) = (model.contested_frontends(), model.contested_ports());
            let uncontested = |d: &super::Desired| {
                let mut d = d.clone();
                d.frontends.retain(|fe, _| !contested.contains(fe));
                d
            };
            assert_eq!(
                uncontested(model.desired()),
                uncontested(&full.desired),
                "{ctx}: desired state"
            );
            let health = |h: &BTreeMap<u16, super::HealthCheck>| {
                let mut h = h.clone();
                h.retain(|p, _| !ports.contains(p));
                h
            };
            assert_eq!(
                health(model.health_checks()),
                health(&full.health_checks),
                "{ctx}"
            );
            assert_eq!(model.node_addresses(), &full.node_addresses[..], "{ctx}");
            let plain = |w: Vec<String>| {
                sorted(w)
                    .into_iter()
                    .filter(|w| !w.contains(" is already "))
                    .collect::<Vec<_>>()
            };
            assert_eq!(plain(model.warnings()), plain(full.warnings), "{ctx}");

            let plan = prog.plan_changes(model.desired(), &update.changed);
            for op in plan.ops() {
                maps.apply(op);
            }
            let mut fresh_maps = Snapshot::default();
            for op in Programmed::default().plan(&full.desired).ops() {
                fresh_maps.apply(op);
            }
            let names: BTreeSet<String> = contested.iter().map(|fe| fe.to_string()).collect();
            let logical = |m: &Snapshot| {
                let mut l = logical(m, &ctx);
                l.retain(|fe, _| !names.contains(fe));
                l
            };
            assert_eq!(
                logical(&maps),
                logical(&fresh_maps),
                "{ctx}: the maps after incremental diffs"
            );
        }
    }
}

#[test]
fn an_unchanged_object_changes_nothing_and_triggers_count_after_the_first_update() {
    let mut r = Rng(7);
    let mut model = Model::new(Some("node-a".into()), Vec::new());
    let svc = random_service(&mut r, "a", "s0");
    let mut slice = random_slice(&mut r, "a", "s0-0", "s0");
    slice.metadata.labels =
        Some([(super::SERVICE_NAME_LABEL.to_string(), "s0".to_string())].into());
    model.apply(Change::Apply(Object::Service(svc.clone().into())));
    model.apply(Change::Apply(Object::EndpointSlice(slice.clone().into())));
    let first = model.update();
    assert!(!first.changed.is_empty());
    assert!(first.triggers.is_empty(), "startup state is not a change");
    // The same objects again (new copies, as a relist brings): nothing to do.
    model.apply(Change::Relist(
        Kind::Service,
        vec![Object::Service(svc.into())],
    ));
    model.apply(Change::Apply(Object::EndpointSlice(slice.clone().into())));
    let again = model.update();
    assert_eq!((again.changed.len(), again.services), (0, 0));
    // A new trigger time is reported once.
    let mut moved = slice;
    moved.metadata.annotations = Some(
        [(
            super::TRIGGER_TIME_ANNOTATION.to_string(),
            "2026-01-01T00:01:00Z".to_string(),
        )]
        .into(),
    );
    model.apply(Change::Apply(Object::EndpointSlice(moved.into())));
    let third = model.update();
    assert_eq!(
        third.triggers,
        [("a/s0-0".to_string(), "2026-01-01T00:01:00Z".to_string())]
    );
    assert_eq!(third.services, 1, "only its service is recomputed");
}

/// What a periodic reconcile does (`Programmed::readopt` of the maps read back, then a
/// full plan) repairs one kind of drift at a time, and writes nothing without drift.
#[test]
fn a_reconcile_repairs_each_kind_of_drift_and_writes_nothing_without() {
    let mut r = Rng(0x5eed_0001);
    let mut truth = Truth::default();
    let mut model = Model::new(Some("node-a".into()), Vec::new());
    for _ in 0..60 {
        let change = random_change(&mut r, &truth);
        truth.apply(&change);
        model.apply(change);
    }
    model.update();
    let mut prog = Programmed::default();
    let mut maps = Snapshot::default();
    for op in prog.plan(model.desired()).ops() {
        maps.apply(op);
    }
    let want = logical(&maps, "programmed");
    assert!(want.len() > 3, "a few frontends: {}", want.len());
    let reconcile = |prog: &mut Programmed, maps: &mut Snapshot| {
        let mut fresh = prog.readopt(maps);
        let plan = fresh.plan(model.desired());
        for op in plan.ops() {
            maps.apply(op);
        }
        *prog = fresh;
        plan.len()
    };
    assert_eq!(reconcile(&mut prog, &mut maps), 0, "no drift, no write");
    type Drift = fn(&mut Snapshot);
    let drifts: [(&str, Drift); 9] = [
        ("a rev-NAT entry deleted", |m| {
            let id = *m.revnat.keys().next().unwrap();
            m.revnat.remove(&id);
        }),
        ("a rev-NAT entry changed", |m| {
            m.revnat.values_mut().next().unwrap().port ^= 1;
        }),
        ("a backend deleted", |m| {
            let id = *m.backends.keys().next().unwrap();
            m.backends.remove(&id);
        }),
        ("a backend changed", |m| {
            m.backends.values_mut().next().unwrap().port ^= 1;
        }),
        ("a slot deleted", |m| {
            let k = *m.services.keys().find(|k| k.slot > 0).unwrap();
            m.services.remove(&k);
        }),
        ("a header deleted", |m| {
            let k = *m.services.keys().find(|k| k.slot == 0).unwrap();
            m.services.remove(&k);
        }),
        ("a header's count changed", |m| {
            let v = m.services.iter_mut().find(|(k, _)| k.slot == 0).unwrap().1;
            v.count += 1;
        }),
        ("a name deleted", |m| {
            let id = *m.names.keys().next().unwrap();
            m.names.remove(&id);
        }),
        ("a frontend port deleted", |m| {
            let k = *m.frontend_ports.iter().next().unwrap();
            m.frontend_ports.remove(&k);
        }),
    ];
    for (what, drift) in drifts {
        drift(&mut maps);
        assert_ne!(
            logical_or_dangling(&maps),
            Some(want.clone()),
            "{what}: no drift made"
        );
        let writes = reconcile(&mut prog, &mut maps);
        assert!(writes > 0, "{what}: nothing written");
        assert_eq!(logical(&maps, what), want, "{what}: not repaired");
        assert_eq!(
            reconcile(&mut prog, &mut maps),
            0,
            "{what}: a second reconcile wrote"
        );
    }
}

/// [`logical`], or `None` where it finds something dangling.
fn logical_or_dangling(maps: &Snapshot) -> Option<BTreeMap<String, FrontendRow>> {
    let maps = maps.clone();
    std::panic::catch_unwind(move || logical(&maps, "drifted")).ok()
}
