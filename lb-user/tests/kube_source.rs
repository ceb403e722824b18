//! The Kubernetes source (kube-rs client, list-then-watch loops, the change queue,
//! backoff) against a fake API server over real HTTP: lists, watches, bookmarks, 410 Gone,
//! dropped watch connections, and faults (stalled LISTs at start and on a relist, 500s,
//! watches closed at once, truncated streams, endless 410s), each with its recovery and
//! a bounded request rate. And, as root, a change served by that server reaching a real
//! connection, and /healthz turning 503 while a relist stalls.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Fixture, OTHER_IP, WEB_IP, service, slice};
use lb_lab::fake_api::{FakeApi, Fault, Kind};
use lb_user::{
    model::{Model, Objects},
    source::api::{ApiTimeouts, KubeSource},
};
use tokio::sync::Notify;

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {topology.kubernetes.io/zone: zone-1}\n";

/// A scratch directory, removed on drop (on failure too).
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

fn scratch(tag: &str) -> Scratch {
    let dir = std::env::temp_dir().join(lb_lab::lab::unique_prefix(tag));
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// A source and the model its changes are handed to, as the agent's sync does.
struct Watched {
    src: KubeSource,
    model: std::sync::Mutex<Model>,
}

impl Watched {
    /// The objects after the changes queued so far.
    fn objects(&self) -> Objects {
        let mut model = self.model.lock().unwrap();
        for change in self.src.take_changes() {
            model.apply(change);
        }
        model.objects()
    }
}

/// The source's bound on a LIST page or a WATCH start here: a stalled one is abandoned
/// after it (production: 60 s).
const API_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts a source against `api`, without waiting for its first list.
async fn start(api: &FakeApi, dir: &std::path::Path) -> (Watched, Arc<Notify>) {
    let timeouts = ApiTimeouts::with_request(API_TIMEOUT);
    let client = lb_user::source::api::client(Some(&api.kubeconfig(dir)), &timeouts)
        .await
        .expect("client from a plain-HTTP kubeconfig");
    let changed = Arc::new(Notify::new());
    let src = KubeSource::start(client, "node-a", changed.clone(), timeouts);
    let model = std::sync::Mutex::new(Model::new(Some("node-a".into()), Vec::new()));
    (Watched { src, model }, changed)
}

/// Starts a source against `api` and waits for its first complete list.
async fn source(api: &FakeApi, dir: &std::path::Path) -> (Watched, Arc<Notify>) {
    let (src, changed) = start(api, dir).await;
    tokio::time::timeout(Duration::from_secs(10), src.src.wait_ready())
        .await
        .expect("stores ready within 10 s")
        .unwrap();
    (src, changed)
}

/// Waits (bounded) until `f` holds for the fake API server.
async fn wait_until(api: &FakeApi, what: &str, f: impl Fn(&FakeApi) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f(api) {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (bounded) until `f` holds for the source's objects.
async fn until(src: &Watched, what: &str, f: impl Fn(&Objects) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f(&src.objects()) {
        assert!(Instant::now() < deadline, "{what}: not seen within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn endpoint_count(o: &Objects) -> usize {
    o.slices.iter().map(|s| s.endpoints.len()).sum()
}

fn pods(n: usize) -> Vec<std::net::Ipv4Addr> {
    (0..n)
        .map(|i| std::net::Ipv4Addr::new(10, 244, i as u8 + 1, 2))
        .collect()
}

fn count(requests: &[String], prefix: &str) -> usize {
    requests.iter().filter(|r| r.starts_with(prefix)).count()
}

#[tokio::test]
async fn lists_then_follows_watch_events_with_kube_proxy_selectors() {
    let api = FakeApi::start();
    api.apply(&service("web", WEB_IP, 80));
    api.apply(&slice("web", &pods(2)));
    api.apply(NODE);
    api.apply("apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n");
    // Not ours: another proxy's service and a headless one's slice are never listed.
    api.apply(&service("mine-not", OTHER_IP, 80).replace(
        "name: mine-not, namespace: t}",
        "name: mine-not, namespace: t, labels: {service.kubernetes.io/service-proxy-name: other}}",
    ));
    let dir = scratch("kube-list");
    let (src, changed) = source(&api, &dir).await;
    let o = src.objects();
    assert_eq!(o.services.len(), 1, "{:?}", o.services);
    assert_eq!(o.slices.len(), 1);
    assert_eq!(endpoint_count(&o), 2);
    let nodes: Vec<_> = o
        .nodes
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(nodes, ["node-a"], "only this agent's Node is watched");

    // A change arrives through the watch and notifies.
    api.apply(&slice("web", &pods(3)));
    tokio::time::timeout(Duration::from_secs(5), changed.notified())
        .await
        .expect("notified of the change");
    until(&src, "slice update", |o| endpoint_count(o) == 3).await;
    api.delete(Kind::Service, "t", "web");
    until(&src, "service deletion", |o| o.services.is_empty()).await;
    let reqs = api.requests();
    assert_eq!(count(&reqs, "LIST services"), 1, "{reqs:?}");
    assert!(count(&reqs, "WATCH services") >= 1, "{reqs:?}");
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_the_last_bookmark_without_relisting() {
    let api = FakeApi::start();
    api.apply(&service("web", WEB_IP, 80));
    api.apply(&slice("web", &pods(1)));
    api.apply(NODE);
    let dir = scratch("kube-drop");
    let (src, _changed) = source(&api, &dir).await;

    // Unrelated objects move the resourceVersion on; a bookmark tells the watches.
    api.apply("apiVersion: v1\nkind: Node\nmetadata: {name: node-z}\n");
    wait_until(&api, "the three watches open", |api| {
        ["services", "endpointslices", "nodes"]
            .iter()
            .all(|r| count(&api.requests(), &format!("WATCH {r}")) >= 1)
    })
    .await;
    let bookmark = api.bookmark();
    wait_until(&api, "the bookmark written to the three watches", |api| {
        api.bookmarks_sent() >= 3
    })
    .await;
    api.drop_watches();
    api.apply(&slice("web", &pods(4)));
    until(&src, "change after the dropped watch", |o| {
        endpoint_count(o) == 4
    })
    .await;

    let reqs = api.requests();
    assert_eq!(
        count(&reqs, "LIST endpointslices"),
        1,
        "no relist: {reqs:?}"
    );
    assert!(
        reqs.contains(&format!("WATCH services rv={bookmark}")),
        "the services watch resumed from the bookmark {bookmark}: {reqs:?}"
    );
}

#[tokio::test]
async fn an_expired_watch_relists_and_the_model_is_never_emptied() {
    let api = FakeApi::start();
    api.apply(&service("web", WEB_IP, 80));
    api.apply(&slice("web", &pods(2)));
    api.apply(NODE);
    let dir = scratch("kube-gone");
    let (src, _changed) = source(&api, &dir).await;
    let src = Arc::new(src);

    // Sample the store continuously while the relist happens.
    let stop = Arc::new(AtomicBool::new(false));
    let min_seen = Arc::new(AtomicUsize::new(usize::MAX));
    let sampler = {
        let (src, stop, min_seen) = (src.clone(), stop.clone(), min_seen.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let o = src.objects();
                min_seen.fetch_min(o.services.len().min(o.slices.len()), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    // The watches must be open first: one started after the compaction, from the
    // current resourceVersion, is valid and gets no 410.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ["services", "endpointslices", "nodes"]
        .iter()
        .any(|r| count(&api.requests(), &format!("WATCH {r}")) < 1)
    {
        assert!(
            Instant::now() < deadline,
            "no watches: {:?}",
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    api.compact(); // open watches get 410 Gone; their resourceVersion is too old now
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&api.requests(), "LIST endpointslices") < 2
        || count(&api.requests(), "LIST services") < 2
    {
        assert!(
            Instant::now() < deadline,
            "no relist after 410: {:?}",
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.apply(&slice("web", &pods(5)));
    until(&src, "the change after the relist", |o| {
        endpoint_count(o) == 5
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();

    let reqs = api.requests();
    assert!(
        count(&reqs, "LIST services") >= 2,
        "a relist after 410: {reqs:?}"
    );
    assert!(count(&reqs, "LIST endpointslices") >= 2, "{reqs:?}");
    assert_eq!(
        min_seen.load(Ordering::Relaxed),
        1,
        "the model kept the service and its slice throughout the relist"
    );
}

#[test]
fn an_api_change_reaches_a_real_connection() {
    let api = FakeApi::start();
    // The slice carries the trigger-time annotation the controller sets.
    let annotated = |ips: &[std::net::Ipv4Addr]| {
        let stamp = k8s_openapi::jiff::Timestamp::now().to_string();
        slice("web", ips).replace(
            "  name: web-a\n",
            &format!(
                "  name: web-a\n  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{stamp}\"}}\n"
            ),
        )
    };
    api.apply(&service("web", WEB_IP, 80));
    api.apply(NODE);
    let port = common::free_port().to_string();
    let bind = format!("127.0.0.1:{port}");
    let fx = Fixture::with_source(
        "kube",
        2,
        &[],
        Some(&api),
        &["--metrics-bind-address", &bind],
    );
    api.apply(&annotated(&fx.pod_ips(&[0])));
    let reached = |pod: &'static str| {
        lb_lab::lab::wait_for(Duration::from_secs(2), || {
            let r = fx.probe(WEB_IP, 10);
            (r.replies.get(pod) == Some(&10)).then_some(())
        })
    };
    assert!(
        reached("pod-0").is_some(),
        "pod-0 never reached:\n{}",
        fx.agent.log()
    );

    // The endpoint moves to pod-1: new connections follow within 2 s, none fails.
    let start = Instant::now();
    api.apply(&annotated(&fx.pod_ips(&[1])));
    loop {
        let r = fx.probe(WEB_IP, 10);
        assert_eq!(r.total_errors(), 0, "{r:?}");
        if r.replies.get("pod-1") == Some(&10) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "not reflected within 2 s: {r:?}\n{}",
            fx.agent.log()
        );
    }
    // The counters: what is programmed, and the latency from the trigger time to the write.
    let metrics = common::http_get(port.parse().unwrap(), "/metrics");
    for line in [
        "lb_programmed_services 1\n",
        "lb_programmed_endpoints 1\n",
        "lb_map_entries{map=\"LB_SERVICES_V2\"} 2\n",
        "kubeproxy_network_programming_duration_seconds_count 2\n",
        // The programs' counters and the tc drops, read from the maps.
        "lb_program_events_total{program=\"connect4\",event=\"translated\"} ",
        "lb_tc_drops_total{reason=\"no_snat_port\"} 0\n",
    ] {
        assert!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
    }
    // The watch dropping does not disturb the datapath.
    api.drop_watches();
    let r = fx.probe(WEB_IP, 20);
    assert_eq!(r.replies.get("pod-1"), Some(&20), "{r:?}");
}
