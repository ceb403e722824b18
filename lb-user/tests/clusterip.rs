//! Integration tests: the real agent loads the real programs into the kernel, attaches
//! them to a test cgroup, and real TCP connections from a client in that cgroup reach
//! real servers in pod namespaces. Needs root. Every test builds its own lab with unique
//! names and tears it down on drop, on failure too.

mod common;

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    process::Command,
    time::{Duration, Instant},
};

use common::{AGENT_BIN, Fixture, OTHER_IP, POD_PORT, WEB_IP, require_root, service, slice};
use lb_lab::lab::{self, ProbeOptions, ProbeReport};

fn names(report: &ProbeReport) -> BTreeSet<&str> {
    report.replies.keys().map(String::as_str).collect()
}

#[test]
fn connections_to_the_cluster_ip_are_spread_over_all_backends() {
    let mut fx = Fixture::new("spread", 3, &[("web.yaml", service("web", WEB_IP, 80))]);
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0, 1, 2])));
    fx.agent.wait_synced(2, Duration::from_secs(10)).unwrap();

    let report = fx.probe(WEB_IP, 300);
    assert_eq!(report.total_errors(), 0, "{report:?}");
    assert_eq!(report.total_replies(), 300);
    assert_eq!(
        names(&report),
        BTreeSet::from(["pod-0", "pod-1", "pod-2"]),
        "{report:?}"
    );
    for (pod, n) in &report.replies {
        assert!(
            (60..=150).contains(n),
            "{pod} got {n} of 300 connections, outside 20%..50%: {report:?}"
        );
    }
}

#[test]
fn manifest_changes_reach_new_connections_within_two_seconds() {
    let mut fx = Fixture::new(
        "change",
        4,
        &[
            ("web.yaml", service("web", WEB_IP, 80)),
            ("other.yaml", service("other", OTHER_IP, 80)),
        ],
    );
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0, 1, 2])));
    fx.write("other-slice.yaml", &slice("other", &fx.pod_ips(&[3])));
    fx.agent.wait_synced(2, Duration::from_secs(10)).unwrap();
    assert_eq!(
        names(&fx.probe(WEB_IP, 60)),
        BTreeSet::from(["pod-0", "pod-1", "pod-2"])
    );

    // Probes in batches until `done` holds for a batch; every batch must be error-free
    // (the service keeps backends throughout), and it must happen within 2 s.
    let converge = |fx: &Fixture, what: &str, done: &dyn Fn(&ProbeReport) -> bool| {
        let start = Instant::now();
        loop {
            let r = fx.probe(WEB_IP, 20);
            assert_eq!(r.total_errors(), 0, "{what}: a connection failed: {r:?}");
            if done(&r) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{what}: not reflected within 2 s; last batch {r:?}\nagent log:\n{}",
                fx.agent.log()
            );
        }
    };

    // A backend is removed. A batch without pod-2 only counts once the agent synced
    // again: before that, 20 connections miss one of 3 backends now and then by chance.
    let syncs = |fx: &Fixture| fx.agent.log().matches(" synced").count();
    let before = syncs(&fx);
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0, 1])));
    converge(&fx, "removing pod-2", &|r| {
        !r.replies.contains_key("pod-2") && syncs(&fx) > before
    });
    let after = fx.probe(WEB_IP, 100);
    assert_eq!(after.total_errors(), 0);
    assert_eq!(
        names(&after),
        BTreeSet::from(["pod-0", "pod-1"]),
        "{after:?}"
    );

    // A backend is added.
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0, 1, 2, 3])));
    converge(&fx, "adding pod-2 and pod-3", &|r| {
        r.replies.contains_key("pod-3") && r.replies.contains_key("pod-2")
    });

    // The service is deleted: its ClusterIP is no longer translated (and is unroutable
    // in the node namespace), while the other service keeps working.
    fx.remove("web.yaml");
    let start = Instant::now();
    loop {
        let r = fx.probe(WEB_IP, 5);
        if r.total_replies() == 0 {
            assert_eq!(
                r.errors.keys().collect::<Vec<_>>(),
                ["ENETUNREACH"],
                "{r:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "service deletion not reflected: {r:?}"
        );
    }
    let other = fx.probe(OTHER_IP, 50);
    assert_eq!(other.total_errors(), 0, "{other:?}");
    assert_eq!(names(&other), BTreeSet::from(["pod-3"]));
}

#[test]
fn processes_outside_the_cgroup_are_not_affected() {
    let fx = Fixture::new("outside", 1, &[("web.yaml", service("web", WEB_IP, 80))]);
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0])));
    let inside = lab::wait_for(Duration::from_secs(5), || {
        let r = fx.probe(WEB_IP, 1);
        (r.total_replies() == 1).then_some(r)
    });
    assert!(
        inside.is_some(),
        "the client in the cgroup never reached the service"
    );

    let outside = fx
        .lab
        .probe(&ProbeOptions::tcp(SocketAddrV4::new(WEB_IP, 80), 10), false)
        .unwrap();
    assert_eq!(outside.total_replies(), 0, "{outside:?}");
    assert_eq!(outside.errors.get("ENETUNREACH"), Some(&10), "{outside:?}");
    // The pod itself stays reachable directly from outside the cgroup.
    let direct = fx
        .lab
        .probe(
            &ProbeOptions::tcp(SocketAddrV4::new(fx.lab.pods[0].ip, POD_PORT), 3),
            false,
        )
        .unwrap();
    assert_eq!(direct.replies.get("pod-0"), Some(&3), "{direct:?}");
}

#[test]
fn a_service_without_endpoints_refuses_and_bad_objects_do_not_break_the_others() {
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: t}\n\
               spec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}\n---\n\
               apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-bad\n  \
               namespace: t\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\n\
               ports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [10.244.999.1]\n---\n\
               this is: [not valid\n";
    let fx = Fixture::new(
        "refuse",
        1,
        &[
            ("web.yaml", service("web", WEB_IP, 80)),
            (
                "empty.yaml",
                service("empty", OTHER_IP, 80) + "---\n" + &slice("empty", &[]),
            ),
            ("bad.yaml", bad.to_string()),
        ],
    );
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0])));
    let ok = lab::wait_for(Duration::from_secs(5), || {
        let r = fx.probe(WEB_IP, 5);
        (r.replies.get("pod-0") == Some(&5)).then_some(r)
    });
    assert!(ok.is_some(), "web never answered:\n{}", fx.agent.log());

    let refused = fx.probe(OTHER_IP, 10);
    assert_eq!(refused.errors.get("ECONNREFUSED"), Some(&10), "{refused:?}");

    let log = fx.agent.log();
    for expected in [
        "Service t/broken: field spec.clusterIP: \"10.96.0.999\"",
        "EndpointSlice t/web-bad: field endpoints[0].addresses[0]: \"10.244.999.1\"",
        "bad.yaml: document 3: not valid YAML",
    ] {
        assert!(
            log.contains(expected),
            "missing warning {expected:?} in:\n{log}"
        );
    }
}

#[test]
fn dump_and_bpftool_show_the_maps() {
    let mut fx = Fixture::new("dump", 2, &[("web.yaml", service("web", WEB_IP, 80))]);
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0, 1])));
    fx.agent.wait_synced(2, Duration::from_secs(10)).unwrap();
    let pin = fx.agent.pin_path.clone();

    let dump = lab::run(
        Command::new(AGENT_BIN)
            .arg("dump")
            .arg("--pin-path")
            .arg(&pin),
    )
    .unwrap();
    // Each frontend with the Service it belongs to.
    let line = dump
        .lines()
        .find(|l| l.starts_with("10.96.0.10:80/TCP  "))
        .unwrap_or_else(|| panic!("{dump}"));
    assert!(
        line.contains("  t/web:http ClusterIP  ") && line.ends_with("rev-nat 1  2 backends"),
        "{line}"
    );
    assert!(
        dump.contains("10.244.1.2:8080") && dump.contains("10.244.2.2:8080"),
        "{dump}"
    );

    // BTF: bpftool prints the field names of our key and value types.
    let services = pin.join(lb_common::MAP_SERVICES);
    let bpftool = lab::run(
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&services),
    )
    .unwrap();
    for field in [
        "\"addr\"",
        "\"port\"",
        "\"slot\"",
        "\"backend_id\"",
        "\"rev_nat_id\"",
    ] {
        assert!(
            bpftool.contains(field),
            "bpftool output lacks {field}:\n{bpftool}"
        );
    }

    assert_eq!(fx.probe(WEB_IP, 10).total_replies(), 10);

    // The same for scripts.
    let json = lab::run(
        Command::new(AGENT_BIN)
            .args(["dump", "--output", "json", "--pin-path"])
            .arg(&pin),
    )
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let fe = &doc["frontends"][0];
    assert_eq!(fe["address"], "10.96.0.10", "{json}");
    assert_eq!(fe["port"], 80);
    assert_eq!(fe["protocol"], "TCP");
    assert_eq!(fe["service"], "t/web:http", "{json}");
    assert_eq!(fe["backends"].as_array().unwrap().len(), 2);
    assert!(doc["counters"]["connect4"]["translated"].as_u64().unwrap() >= 10);

    // A reader that stops early (`lb-user dump | head -1`) ends the dump quietly.
    let mut child = Command::new(AGENT_BIN)
        .args(["dump", "--conntrack", "--pin-path"])
        .arg(&pin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // The pipe's reader is gone before the first write.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // The lab's cgroup is not the root: the agent says what processes outside it lack.
    let log = fx.agent.log();
    assert!(
        log.contains("--cgroup is not the root of the cgroup v2 hierarchy")
            && log.contains("nodePort work for them"),
        "{log}"
    );
}

#[test]
fn bad_command_line_arguments_give_clear_errors() {
    require_root();
    let dir = std::env::temp_dir().join(lab::unique_prefix("args"));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(AGENT_BIN)
        .args(["run", "--manifests"])
        .arg(&dir)
        .args(["--cgroup", "/tmp", "--pin-path"])
        .arg(format!("/sys/fs/bpf/{}", lab::unique_prefix("args")))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cgroup /tmp: not a cgroup v2 directory"),
        "{err}"
    );
}

/// Syncs that eleven manifest changes cost an agent with `--min-sync-period period`
/// (changes seen within a millisecond): written as a burst within about 250 ms, or
/// `paced`: each written once the agent has applied the one before (bounded waits), so
/// that the count does not depend on how fast the agent is.
fn burst_syncs(period: &str, paced: bool) -> usize {
    let mut fx = Fixture::with_source(
        &format!("burst{}", period.trim_end_matches('s')),
        3,
        &[("web.yaml", service("web", WEB_IP, 80))],
        None,
        &["--min-sync-period", period, "--poll-interval-ms", "1"],
    );
    let before = fx.agent.syncs();
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0])));
    fx.agent
        .wait_sync_after(before, common::sync_timeout())
        .unwrap();
    // The burst starts a full period after the last sync, so its first change is
    // applied at once (the period's own semantics: this wait is what is tested).
    std::thread::sleep(Duration::from_millis(1100));
    let before = fx.agent.syncs();
    for i in 0..10 {
        let synced = fx.agent.syncs();
        fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[(i + 1) % 2])));
        if paced {
            fx.agent
                .wait_sync_after(synced, common::sync_timeout())
                .unwrap();
        } else {
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[2])));
    let reached = lab::wait_for(common::sync_timeout(), || {
        (fx.probe(WEB_IP, 5).replies.get("pod-2") == Some(&5)).then_some(())
    });
    assert!(
        reached.is_some(),
        "the last change never arrived:\n{}",
        fx.agent.log()
    );
    fx.agent.syncs() - before
}

#[test]
fn a_burst_of_changes_becomes_few_syncs() {
    // With a period, the burst's first change is applied at once and the others wait
    // for the end of the period: one or two syncs (three if one straddles).
    let batched = burst_syncs("1s", false);
    assert!((1..=3).contains(&batched), "{batched} syncs for one burst");
    // The control: without a period, every change is applied by itself (each written
    // after the last was applied, however fast the agent is).
    let unbatched = burst_syncs("0s", true);
    assert!(
        unbatched >= 11,
        "{unbatched} syncs without a period for 11 changes"
    );
}

#[test]
fn healthz_and_livez_follow_kube_proxys_semantics() {
    let port = common::free_port();
    let bind = format!("127.0.0.1:{port}");
    let fx = Fixture::with_source(
        "healthz",
        1,
        &[("web.yaml", service("web", WEB_IP, 80))],
        None,
        &["--healthz-bind-address", &bind, "--healthz-timeout", "1s"],
    );
    let target: std::net::SocketAddr = bind.parse().unwrap();
    let get = |path: &str| lab::http_get(target, path).unwrap();
    let wait_for_status = |want: u16| {
        lab::wait_for(Duration::from_secs(10), || {
            let (code, body) = get("/healthz");
            (code == want).then_some(body)
        })
        .unwrap_or_else(|| panic!("/healthz never answered {want}:\n{}", fx.agent.log()))
    };
    // Synced: healthy, with kube-proxy's body.
    let body = wait_for_status(200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    for field in ["lastUpdated", "currentTime"] {
        let t = json[field].as_str().unwrap_or_default();
        assert!(t.ends_with('Z') && t.len() >= 20, "{field}: {body}");
    }
    assert_eq!(json["nodeEligible"], true, "{body}");
    assert_eq!(get("/livez").0, 200);
    assert_eq!(get("/nothing").0, 404);
    // The manifests vanish: the agent keeps the datapath but cannot sync the change;
    // once it has waited longer than the timeout, /healthz says so.
    let manifests = fx.dir.join("manifests");
    let away = fx.dir.join("away");
    std::fs::rename(&manifests, &away).unwrap();
    wait_for_status(503);
    assert_eq!(get("/livez").0, 503);
    // The datapath still holds the service (no endpoints: refused, not unreachable).
    let r = fx.probe(WEB_IP, 1);
    assert_eq!(r.errors.get("ECONNREFUSED"), Some(&1), "{r:?}");
    std::fs::rename(&away, &manifests).unwrap();
    wait_for_status(200);
}

#[test]
fn a_full_map_leaves_a_service_out_with_a_warning_until_another_makes_room() {
    // Room for one frontend: of two services, the first planned (by address: web's
    // 10.96.0.10) is programmed, "other" waits.
    let fx = Fixture::with_source(
        "full",
        2,
        &[
            ("web.yaml", service("web", WEB_IP, 80)),
            ("other.yaml", service("other", OTHER_IP, 80)),
        ],
        None,
        &["--max-services", "1"],
    );
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0])));
    fx.write("other-slice.yaml", &slice("other", &fx.pod_ips(&[1])));
    let web = lab::wait_for(Duration::from_secs(5), || {
        let r = fx.probe(WEB_IP, 1);
        (r.total_replies() == 1).then_some(r)
    });
    assert!(
        web.is_some(),
        "the service that fits is served: {}",
        fx.agent.log()
    );
    let log = fx.agent.log();
    let warning = "t/other:http (10.96.0.11:80/TCP): map LB_REVNAT_V2 is full (1 entries, --max-services); not programmed until there is room";
    assert!(log.contains(warning), "{log}");
    let r = fx.probe(OTHER_IP, 3);
    assert_eq!(r.total_replies(), 0, "other has no room yet: {r:?}");

    // web goes: other gets its room, with no change to other itself.
    fx.remove("web.yaml");
    let other = lab::wait_for(Duration::from_secs(5), || {
        let r = fx.probe(OTHER_IP, 1);
        (r.total_replies() == 1).then_some(r)
    });
    let log = fx.agent.log();
    assert!(
        other.is_some(),
        "other is programmed once there is room: {log}"
    );
    assert!(
        log.matches(warning).count() == 1,
        "retries do not repeat the warning: {log}"
    );
}

/// The entries of a pinned map, as bpftool prints them (hex bytes of key and value).
fn bpftool_entries(map: &std::path::Path) -> Vec<(Vec<String>, Vec<String>)> {
    let out = lab::run(
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(map)
            .arg("-j"),
    )
    .unwrap();
    let bytes = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().to_string())
            .collect()
    };
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect()
}

/// `bpftool map ACTION pinned MAP key hex KEY [value hex VALUE]`.
fn bpftool_edit(map: &std::path::Path, action: &str, key: &[String], value: Option<&[String]>) {
    let hex = |b: &[String]| {
        b.iter()
            .map(|x| x.trim_start_matches("0x").to_string())
            .collect::<Vec<_>>()
    };
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", action, "pinned"])
        .arg(map)
        .args(["key", "hex"])
        .args(hex(key));
    if let Some(v) = value {
        cmd.args(["value", "hex"]).args(hex(v));
    }
    lab::run(&mut cmd).unwrap();
}

/// The maps as a person reads them, backend and rev-NAT ids aside: each frontend's
/// header flags and count, its backends, its rev-NAT entry and its name.
fn view(s: &lb_user::datapath::ops::Snapshot) -> Vec<String> {
    s.frontends()
        .into_iter()
        .map(|(key, (header, slots))| {
            let backends: BTreeSet<String> = slots
                .iter()
                .map(|(_, b)| format!("{:?}", b.map(|b| (b.addr, b.port, b.proto, b.flags))))
                .collect();
            let revnat = s.revnat.get(&header.rev_nat_id).map(|r| (r.addr, r.port));
            let name = s.names.get(&header.rev_nat_id).map(|n| format!("{n:?}"));
            format!(
                "{key:?} {} {} {backends:?} {revnat:?} {name:?}",
                header.flags, header.count
            )
        })
        .collect()
}

#[test]
fn the_periodic_reconcile_repairs_entries_changed_behind_the_agents_back() {
    let port = common::free_port();
    let bind = format!("127.0.0.1:{port}");
    let fx = Fixture::with_source(
        "drift",
        2,
        &[("web.yaml", service("web", WEB_IP, 80))],
        None,
        &["--sync-period", "1s", "--metrics-bind-address", &bind],
    );
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0, 1])));
    let both = || {
        let r = fx.probe(WEB_IP, 20);
        (r.total_replies() == 20 && r.replies.len() == 2).then_some(r)
    };
    assert!(
        lab::wait_for(Duration::from_secs(5), both).is_some(),
        "{}",
        fx.agent.log()
    );
    let pin = &fx.agent.pin_path;
    let maps = lb_user::datapath::BpfMaps::open_pinned(pin).unwrap();
    let before = view(&maps.snapshot().unwrap());
    // Drift: a backend zeroed (its connections go nowhere), a rev-NAT entry and a
    // frontend's name deleted.
    let backends = pin.join(lb_common::MAP_BACKENDS);
    let (key, value) = bpftool_entries(&backends).remove(0);
    let zeros = vec!["0x00".to_string(); value.len()];
    bpftool_edit(&backends, "update", &key, Some(&zeros));
    for map in [lb_common::MAP_REVNAT, lb_common::MAP_NAMES] {
        let map = pin.join(map);
        let (key, _) = bpftool_entries(&map).remove(0);
        bpftool_edit(&map, "delete", &key, None);
    }
    assert_ne!(view(&maps.snapshot().unwrap()), before);
    // Within a period or two the maps hold what they held, and both pods answer.
    let repaired = lab::wait_for(Duration::from_secs(5), || {
        (view(&maps.snapshot().unwrap()) == before).then_some(())
    });
    assert!(repaired.is_some(), "not repaired:\n{}", fx.agent.log());
    assert!(both().is_some(), "{}", fx.agent.log());
    let metrics = common::http_get(port, "/metrics");
    assert!(
        metrics.contains("lb_drift_repairs_total ")
            && !metrics.contains("lb_drift_repairs_total 0\n"),
        "{metrics}"
    );
    assert!(
        fx.agent
            .log()
            .contains("reconcile: the maps had changed behind the agent's back; repaired")
    );
}

/// A first sync of 1,000 services with 10 endpoints each (made-up addresses) writes
/// 10,000 backends and 11,000 services-map entries: runs long enough to be written by
/// two threads at once. Every entry is there, and a service added after them answers.
#[test]
fn a_first_sync_of_a_thousand_services_writes_every_entry() {
    let mut bulk = String::new();
    for i in 0..1000u32 {
        let ip = std::net::Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250) as u8 + 1);
        let endpoints: Vec<std::net::Ipv4Addr> = (0..10)
            .map(|e| {
                let k = i * 10 + e;
                std::net::Ipv4Addr::new(10, 250, (k / 250) as u8, (k % 250) as u8 + 1)
            })
            .collect();
        let name = format!("bulk-{i}");
        bulk.push_str(&format!(
            "---\n{}---\n{}",
            service(&name, ip, 80),
            slice(&name, &endpoints)
        ));
    }
    let mut fx = Fixture::new("bulk", 2, &[("bulk.yaml", bulk)]);
    fx.write("web.yaml", &service("web", WEB_IP, 80));
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0, 1])));
    fx.agent.wait_synced(2, common::sync_timeout()).unwrap();
    fx.wait_answering(SocketAddrV4::new(WEB_IP, 80), lab::ProbeMode::Tcp);

    let snap = lb_user::datapath::BpfMaps::open_pinned(&fx.agent.pin_path)
        .and_then(|m| m.snapshot())
        .unwrap();
    assert_eq!(snap.backends.len(), 10_000 + 2);
    // A header and a slot per endpoint for each frontend.
    assert_eq!(snap.services.len(), 1000 * 11 + 3);
    assert_eq!(snap.revnat.len(), 1001);
    assert_eq!(snap.names.len(), 1001);
    assert_eq!(snap.frontend_ports.len(), 1001);
    let report = fx.probe(WEB_IP, 40);
    assert_eq!(report.total_errors(), 0, "{report:?}");
    assert_eq!(
        names(&report),
        BTreeSet::from(["pod-0", "pod-1"]),
        "{report:?}"
    );
}

#[test]
fn bpf_stats_give_each_programs_own_cost_per_call() {
    let port = common::free_port();
    let bind = format!("127.0.0.1:{port}");
    let fx = Fixture::with_source(
        "bpfstats",
        1,
        &[("web.yaml", service("web", WEB_IP, 80))],
        None,
        &["--bpf-stats", "--metrics-bind-address", &bind],
    );
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0])));
    let answered = lab::wait_for(Duration::from_secs(5), || {
        (fx.probe(WEB_IP, 1).total_replies() == 1).then_some(())
    });
    assert!(answered.is_some(), "{}", fx.agent.log());
    assert_eq!(fx.probe(WEB_IP, 20).total_replies(), 20);
    let metrics = common::http_get(port, "/metrics");
    let value = |name: &str| -> f64 {
        let line = format!("{name}{{program=\"lb_connect4\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line)?.parse().ok())
            .unwrap_or_else(|| panic!("no {line:?} in:\n{metrics}"))
    };
    let (runs, seconds) = (
        value("lb_program_runs_total"),
        value("lb_program_run_seconds_total"),
    );
    assert!(runs >= 21.0, "connect4 ran {runs} times for 21 connections");
    // Its own cost per call: more than nothing, less than a millisecond.
    let per_call = seconds / runs;
    assert!(per_call > 0.0 && per_call < 1e-3, "{per_call} s a call");
    assert!(
        fx.agent
            .log()
            .contains("--bpf-stats: the kernel's BPF statistics are on")
    );
}

/// `bpftool map show` of a pinned map.
fn map_show(map: &std::path::Path) -> serde_json::Value {
    let out = lab::run(
        Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(map),
    )
    .unwrap();
    serde_json::from_str(&out).unwrap()
}

/// Whether map `name` under `pin` was made preallocated (its flags lack
/// `BPF_F_NO_PREALLOC`).
fn preallocated(pin: &std::path::Path, name: &str) -> bool {
    let show = map_show(&pin.join(name));
    show["flags"].as_u64().unwrap() & 1 == 0
}

#[test]
fn the_services_and_backends_maps_are_preallocated_unless_asked_not_to() {
    use lb_common::{MAP_BACKENDS, MAP_REVNAT, MAP_SERVICES};
    let mut fx = Fixture::new("prealloc", 2, &[("web.yaml", service("web", WEB_IP, 80))]);
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0, 1])));
    fx.agent.wait_synced(2, Duration::from_secs(10)).unwrap();
    let r = fx.probe(WEB_IP, 20);
    assert_eq!(r.total_replies(), 20, "{r:?}");
    let pin = fx.agent.pin_path.clone();
    for name in [MAP_SERVICES, MAP_BACKENDS] {
        let show = map_show(&pin.join(name));
        assert!(preallocated(&pin, name), "{name}: {show}");
        assert!(
            show["btf_id"].as_u64().unwrap_or(0) > 0,
            "{name} carries the object's BTF: {show}"
        );
        // bpftool names the fields through it.
        let dump = lab::run(
            Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(pin.join(name)),
        )
        .unwrap();
        assert!(
            dump.contains("\"formatted\"") && dump.contains("\"addr\""),
            "{dump}"
        );
    }
    assert!(!preallocated(&pin, MAP_REVNAT), "the others are not");

    // A restart that asks for maps that are not preallocated keeps the pinned ones, says
    // so, and serves with them.
    let log = fx.dir.join("agent-2.log");
    fx.agent
        .restart(
            lab::Stop::Term,
            Duration::ZERO,
            &["--preallocate-maps=false"],
            &log,
        )
        .unwrap();
    fx.agent.wait_synced(1, common::sync_timeout()).unwrap();
    let text = fx.agent.log();
    assert!(
        text.contains("a map already pinned keeps how it was made") && text.contains(MAP_SERVICES),
        "{text}"
    );
    assert!(preallocated(&pin, MAP_SERVICES) && preallocated(&pin, MAP_BACKENDS));
    let r = fx.probe(WEB_IP, 20);
    assert_eq!(r.total_replies(), 20, "{r:?}");
    drop(fx);

    // Made anew with --preallocate-maps=false: memory as entries are written.
    let fx = Fixture::with_source(
        "noprealloc",
        1,
        &[("web.yaml", service("web", WEB_IP, 80))],
        None,
        &["--preallocate-maps=false"],
    );
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0])));
    let served = lab::wait_for(Duration::from_secs(5), || {
        (fx.probe(WEB_IP, 1).total_replies() == 1).then_some(())
    });
    assert!(served.is_some(), "{}", fx.agent.log());
    for name in [MAP_SERVICES, MAP_BACKENDS] {
        assert!(!preallocated(&fx.agent.pin_path, name), "{name}");
    }
}
