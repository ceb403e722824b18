//! The loop against in-memory maps ([`MemoryMaps`], faults on demand) under tokio's
//! paused clock: no root, no kernel, no waiting. What the loop promises: bounded
//! frequency, a failed write read back and planned again, health checks handed over
//! only with a successful write, drift repaired each sync period.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use lb_core::{
    ops::Snapshot,
    plan::Capacity,
    seam::{Datapath, Fault, MemoryMaps},
};
use tokio::sync::{Notify, oneshot};

use super::sync::{Agent, Timing, sync_until_stopped};
use crate::{
    model::{Change, Model, Object, Slice},
    serve::{
        metrics::Metrics,
        proxier_health::{ProxierHealth, SharedHealth},
        service_health::HealthServer,
    },
    source::Source,
};

/// [`MemoryMaps`] the test can look into while the loop owns the agent.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<MemoryMaps>>);

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut MemoryMaps) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }

    /// Each frontend's backend count and backends' ports, as the maps hold them.
    fn backends(&self) -> Vec<(u16, Vec<Option<u16>>)> {
        self.with(|m| {
            m.maps
                .frontends()
                .into_values()
                .map(|(h, slots)| {
                    (
                        h.count,
                        slots.iter().map(|(_, b)| b.map(|b| b.port)).collect(),
                    )
                })
                .collect()
        })
    }
}

impl Datapath for Shared {
    type Error = String;

    fn apply(&mut self, ops: &[lb_core::ops::Op]) -> Result<(), String> {
        self.with(|m| m.apply(ops))
    }

    fn snapshot(&mut self) -> Result<Snapshot, String> {
        self.with(|m| m.snapshot())
    }

    fn capacity(&self) -> Result<Capacity, String> {
        Ok(Capacity::default())
    }
}

/// The agent on in-memory maps (with `fault` queued), fed through a queue.
struct Harness {
    maps: Shared,
    agent: Agent<Shared>,
    metrics: Arc<Metrics>,
    source: Source,
    changed: Notify,
}

impl Harness {
    fn new(fault: Option<Fault>) -> Self {
        let maps = Shared::default();
        if let Some(f) = fault {
            maps.with(|m| m.inject(f));
        }
        let proxier: SharedHealth = Arc::new(Mutex::new(ProxierHealth::new(
            Duration::from_secs(60),
            SystemTime::now(),
        )));
        let metrics = Arc::new(Metrics::new(None));
        let agent = Agent {
            model: Model::new(Some("node-a".into()), Vec::new()),
            capacity: Capacity::default(),
            maps: maps.clone(),
            programmed: None,
            programmed_once: false,
            health_pending: false,
            last_warnings: Vec::new(),
            metrics: metrics.clone(),
            health: HealthServer::new(proxier.clone()),
            proxier_health: proxier,
            packet: None,
            closer: None,
            parts: None,
        };
        Self {
            maps,
            agent,
            metrics,
            source: Source::Queue(Default::default()),
            changed: Notify::new(),
        }
    }
}

/// Queues `changes` and wakes the loop.
fn send(source: &Source, changed: &Notify, changes: [Change; 2]) {
    for c in changes {
        source.push(c);
    }
    changed.notify_one();
}

fn timing(min_sync_period: Duration, sync_period: Duration) -> Timing {
    Timing {
        min_sync_period,
        sync_period,
    }
}

/// Service t/web (ClusterIP 10.96.0.10, port 80; with `health_port`, a LoadBalancer
/// with externalTrafficPolicy Local) and its slice with one endpoint per port in
/// `ports`, on this node.
fn web(ports: &[u16], health_port: Option<u16>) -> [Change; 2] {
    let extra = health_port.map_or(String::new(), |p| {
        format!(", type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: {p}")
    });
    let svc = format!(
        "metadata: {{name: web, namespace: t}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80, targetPort: 8080}}]{extra}}}\n"
    );
    let mut slice = String::from(
        "metadata: {name: web-a, namespace: t, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n",
    );
    for (i, _) in ports.iter().enumerate() {
        slice.push_str(&format!(
            "- {{addresses: [10.244.0.{}], nodeName: node-a}}\n",
            i + 1
        ));
    }
    let slice: Slice = serde_yaml::from_str(&slice).unwrap();
    [
        Change::Apply(Object::Service(Arc::new(
            serde_yaml::from_str(&svc).unwrap(),
        ))),
        Change::Apply(Object::EndpointSlice(Arc::new(slice.slim()))),
    ]
}

/// Runs the loop until `script` is done, then stops it.
async fn run<F: std::future::Future<Output = ()>>(
    agent: &mut Agent<Shared>,
    source: &Source,
    changed: &Notify,
    timing: Timing,
    script: F,
) {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
        "test over"
    };
    let script = async move {
        script.await;
        let _ = stop_tx.send(());
    };
    tokio::join!(
        sync_until_stopped(agent, source, changed, stop, &timing),
        script
    );
}

fn count(text: &str, metric: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn syncs(m: &Metrics) -> u64 {
    count(
        &m.render(),
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
    )
}

/// Sleeps (on the paused clock) until `f` holds, at most a minute.
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within a minute");
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_becomes_one_sync_per_min_sync_period() {
    let mut h = Harness::new(None);
    let (maps, metrics, source, changed) = (&h.maps, &h.metrics, &h.source, &h.changed);
    let timing = timing(Duration::from_secs(1), Duration::ZERO);
    let script = async {
        send(source, changed, web(&[8080], None));
        until("the first sync", || syncs(metrics) == 1).await;
        let started = tokio::time::Instant::now();
        // Ten changes over 2 s, a fifth of a second apart.
        for n in 2..=11 {
            let ports = vec![8080; n];
            send(source, changed, web(&ports, None));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        until("the last change", || maps.backends()[0].0 == 11).await;
        let took = started.elapsed();
        let n = syncs(metrics) - 1;
        // One sync a second at most: the burst of 2 s takes two or three.
        assert!(
            (2..=3).contains(&n),
            "{n} syncs for ten changes in {took:?}"
        );
    };
    run(&mut h.agent, &h.source, &h.changed, timing, script).await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_is_read_back_and_planned_again() {
    // The first write stops after one operation.
    let mut h = Harness::new(Some(Fault::Apply { after: 1 }));
    let (maps, metrics, source, changed) = (&h.maps, &h.metrics, &h.source, &h.changed);
    let timing = timing(Duration::ZERO, Duration::ZERO);
    let script = async {
        send(source, changed, web(&[8080, 8080], None));
        until("the retry", || syncs(metrics) == 1).await;
        let text = metrics.render();
        assert_eq!(count(&text, "lb_sync_errors_total"), 1, "{text}");
        // The retry read the maps back (with the one write the failure left) and wrote
        // the rest.
        assert!(maps.with(|m| m.snapshots) >= 1);
        assert_eq!(maps.backends(), [(2, vec![Some(8080), Some(8080)])]);
    };
    run(&mut h.agent, &h.source, &h.changed, timing, script).await;
}

#[tokio::test(start_paused = true)]
async fn health_checks_are_handed_over_with_the_first_successful_write() {
    let port = {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut h = Harness::new(Some(Fault::Apply { after: 0 }));
    let (metrics, source, changed) = (&h.metrics, &h.source, &h.changed);
    let timing = timing(Duration::ZERO, Duration::ZERO);
    let serving = || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    };
    let script = async {
        send(source, changed, web(&[8080], Some(port)));
        until("the failed write", || {
            count(&metrics.render(), "lb_sync_errors_total") == 1
        })
        .await;
        tokio::task::yield_now().await;
        assert!(!serving().await, "a health check served before its write");
        until("the retry", || syncs(metrics) == 1).await;
        for _ in 0..50 {
            if serving().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the health check on {port} is not served after the write");
    };
    run(&mut h.agent, &h.source, &h.changed, timing, script).await;
}

#[tokio::test(start_paused = true)]
async fn drift_is_repaired_each_sync_period_and_not_before() {
    let mut h = Harness::new(None);
    let (maps, metrics, source, changed) = (&h.maps, &h.metrics, &h.source, &h.changed);
    let timing = timing(Duration::ZERO, Duration::from_secs(30));
    let script = async {
        send(source, changed, web(&[8080, 8080], None));
        until("the first sync", || syncs(metrics) == 1).await;
        let started = tokio::time::Instant::now();
        let want = maps.backends();
        // Something deletes a backend behind the agent's back.
        maps.with(|m| {
            let id = *m.maps.backends.keys().next().unwrap();
            m.maps.backends.remove(&id);
        });
        assert_ne!(maps.backends(), want);
        until("the repair", || maps.backends() == want).await;
        let took = started.elapsed();
        assert!(
            (Duration::from_secs(25)..=Duration::from_secs(31)).contains(&took),
            "repaired after {took:?}, the period is 30 s"
        );
        assert!(count(&metrics.render(), "lb_drift_repairs_total") > 0);
    };
    run(&mut h.agent, &h.source, &h.changed, timing, script).await;
}

/// Service t/NAME on 10.96.0.N port 80 and, with `endpoints`, its slice over
/// 10.244.0.1..=endpoints.
fn service(name: &str, n: u8, endpoints: u8) -> (Change, Option<Change>) {
    let svc = format!(
        "metadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: 10.96.0.{n}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
    );
    let slice = (endpoints > 0).then(|| {
        let eps: Vec<String> = (1..=endpoints)
            .map(|e| format!("- {{addresses: [10.244.0.{e}]}}\n"))
            .collect();
        let slice: Slice = serde_yaml::from_str(&format!(
            "metadata: {{name: {name}-a, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{}",
            eps.concat()
        ))
        .unwrap();
        Change::Apply(Object::EndpointSlice(Arc::new(slice.slim())))
    });
    let svc = Change::Apply(Object::Service(Arc::new(
        serde_yaml::from_str(&svc).unwrap(),
    )));
    (svc, slice)
}

/// The backend count of the frontend 10.96.0.N:80 in the maps; `None` when absent.
fn served(maps: &Shared, n: u8) -> Option<u16> {
    let addr = std::net::Ipv4Addr::new(10, 96, 0, n);
    maps.with(|m| {
        m.maps.frontends().into_iter().find_map(|(k, (h, _))| {
            let fe = lb_core::ops::frontend_of(&k)?;
            (fe.addr == std::net::IpAddr::from(addr) && fe.port == 80).then_some(h.count)
        })
    })
}

#[tokio::test]
async fn a_first_sync_in_parts_removes_nothing_and_refuses_nothing_before_its_end() {
    // An earlier agent left `kept` (whose objects come in the last part) and `old`
    // (whose objects are gone).
    let mut earlier = Harness::new(None);
    for (svc, slice) in [service("kept", 1, 2), service("old", 2, 1)] {
        earlier.source.push(svc);
        earlier.source.push(slice.unwrap());
    }
    earlier.agent.sync(&earlier.source);
    let mut h = Harness::new(None);
    h.maps = earlier.maps.clone();
    h.agent.maps = earlier.maps.clone();
    assert_eq!((served(&h.maps, 1), served(&h.maps, 2)), (Some(2), Some(1)));
    let dir = std::env::temp_dir().join(format!("lb-first-parts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (source, feed) = crate::source::PartFeeder::source(dir.clone());
    // Part 1: `new` with its slice, and `late`, whose slice comes in part 2.
    let (new_svc, new_slice) = service("new", 3, 1);
    let (late_svc, _) = service("late", 4, 0);
    feed.part(vec![new_svc, new_slice.unwrap(), late_svc]);
    h.agent.sync(&source);
    assert!(source.reading_first());
    assert_eq!(served(&h.maps, 3), Some(1), "a part is served at once");
    assert_eq!(
        served(&h.maps, 4),
        None,
        "no slice yet: not refused, not there"
    );
    assert_eq!((served(&h.maps, 1), served(&h.maps, 2)), (Some(2), Some(1)));
    // Part 2: `late`'s slice (three endpoints) and `kept`, changed (one endpoint).
    let (_, late_slice3) = service("late", 4, 3);
    let (kept_svc, kept_slice) = service("kept", 1, 1);
    feed.part(vec![late_slice3.unwrap(), kept_svc, kept_slice.unwrap()]);
    h.agent.sync(&source);
    assert_eq!(served(&h.maps, 4), Some(3));
    assert_eq!(
        (served(&h.maps, 1), served(&h.maps, 2)),
        (Some(2), Some(1)),
        "what the maps held stays until the end"
    );
    assert_eq!(syncs(&h.metrics), 0, "parts are not syncs");
    // A file written while the parts came is read at the end with them.
    let written = "apiVersion: v1\nkind: Service\nmetadata: {name: written, namespace: t}\n\
                   spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n";
    std::fs::write(dir.join("written.yaml"), written).unwrap();
    // The end: `kept` as read, `old` gone, one sync counted.
    feed.last(Vec::new());
    h.agent.sync(&source);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!source.reading_first());
    assert_eq!((served(&h.maps, 1), served(&h.maps, 2)), (Some(1), None));
    assert_eq!((served(&h.maps, 3), served(&h.maps, 4)), (Some(1), Some(3)));
    assert_eq!(served(&h.maps, 5), Some(0), "no endpoints: refused");
    assert_eq!(syncs(&h.metrics), 1);
}
