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

/// Service web with one endpoint and this node, served by a fake API that a source
/// watches, in sync; with the scratch directory of its kubeconfig.
async fn web_watched(tag: &str) -> (FakeApi, Scratch, Watched) {
    let api = FakeApi::start();
    api.apply(&service("web", WEB_IP, 80));
    api.apply(&slice("web", &pods(1)));
    api.apply(NODE);
    let dir = scratch(tag);
    let (src, _changed) = source(&api, &dir).await;
    wait_watching(&api).await;
    in_sync(&src).await;
    (api, dir, src)
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
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f(&src.objects()) {
        assert!(Instant::now() < deadline, "{what}: not seen within 15 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until every kind has a watch open.
async fn wait_watching(api: &FakeApi) {
    wait_until(api, "the three watches open", |api| {
        ["services", "endpointslices", "nodes"]
            .iter()
            .all(|r| count(&api.requests(), &format!("WATCH {r}")) >= 1)
    })
    .await;
}

/// Waits (bounded) until the source says each kind follows the cluster again.
async fn in_sync(src: &Watched) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Some(since) = src.src.unsynced_since() {
        assert!(
            Instant::now() < deadline,
            "still out of sync (since {since:?}) after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The requests starting with `prefix` made during the next `window`.
async fn made_during(api: &FakeApi, prefix: &str, window: Duration) -> usize {
    let before = count(&api.requests(), prefix);
    tokio::time::sleep(window).await;
    count(&api.requests(), prefix) - before
}

/// The most requests of one kind in [`RATE_WINDOW`] that a backoff allows: one, then
/// waits of at least 0.8 s and 1.6 s (0.8 + 1.6 + 3.2 s is longer than the window).
/// Without backoff a closed watch is reopened about 75 times a second.
const RATE_WINDOW: Duration = Duration::from_secs(4);
const MAX_IN_WINDOW: usize = 4;

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

    // Each watch resumes on its own (after its own backoff): the services watch may
    // come back after the slices' change is seen.
    let resumed = format!("WATCH services rv={bookmark}");
    wait_until(
        &api,
        "the services watch resumed from the bookmark",
        |api| api.requests().contains(&resumed),
    )
    .await;
    let reqs = api.requests();
    assert_eq!(
        count(&reqs, "LIST endpointslices"),
        1,
        "no relist: {reqs:?}"
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
    let tcx = format!(
        "lb_kernel_feature{{name=\"tcx\"}} {}\n",
        u8::from(kernel_at_least(6, 6))
    );
    for line in [
        "lb_programmed_services 1\n",
        "lb_programmed_endpoints 1\n",
        "lb_map_entries{map=\"LB_SERVICES_V2\"} 2\n",
        "kubeproxy_network_programming_duration_seconds_count 2\n",
        // The programs' counters and the packet level's drops, read from the maps.
        "lb_program_events_total{program=\"connect4\",event=\"translated\"} ",
        "lb_packet_drops_total{reason=\"no_snat_port\"} 0\n",
        // Every probe's socket is closed: its entries went with it.
        "lb_socket_map_entries{map=\"LB_SOCK_REVNAT_V2\"} 0\n",
        "lb_socket_map_entries{map=\"LB_SOCKS_V1\"} 0\n",
        // What the start probed of the kernel: every kernel the tests run on has
        // bpf_set_retval in sock_addr programs; TCX came with 6.6 (6.1 has none).
        "lb_kernel_feature{name=\"helper_set_retval\"} 1\n",
        tcx.as_str(),
    ] {
        assert!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
    }
    // The watch dropping does not disturb the datapath.
    api.drop_watches();
    let r = fx.probe(WEB_IP, 20);
    assert_eq!(r.replies.get("pod-1"), Some(&20), "{r:?}");
}

#[tokio::test]
async fn a_list_that_never_answers_is_abandoned_and_retried_with_backoff_until_it_does() {
    let api = FakeApi::start();
    api.apply(&service("web", WEB_IP, 80));
    api.apply(&slice("web", &pods(1)));
    api.apply(NODE);
    api.fail(Fault::StallLists);
    let dir = scratch("kube-stall-start");
    let (src, _changed) = start(&api, &dir).await;
    tokio::time::sleep(RATE_WINDOW).await;
    let lists = count(&api.requests(), "LIST services");
    // Abandoned after API_TIMEOUT and tried again, but not more often than the backoff.
    assert!(
        (2..=MAX_IN_WINDOW).contains(&lists),
        "{lists} LISTs in {RATE_WINDOW:?}: {:?}",
        api.requests()
    );
    assert!(
        src.src.unsynced_since().is_some(),
        "out of sync while no list answers"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(10), src.src.wait_ready())
            .await
            .is_err(),
        "not ready before a list answered"
    );
    api.heal();
    tokio::time::timeout(Duration::from_secs(15), src.src.wait_ready())
        .await
        .expect("ready within 15 s of the server answering")
        .unwrap();
    let o = src.objects();
    assert_eq!((o.services.len(), endpoint_count(&o)), (1, 1));
    in_sync(&src).await;
}

#[tokio::test]
async fn a_relist_that_stalls_after_a_410_recovers_and_drops_what_was_deleted_meanwhile() {
    let api = FakeApi::start();
    api.apply(&service("web", WEB_IP, 80));
    api.apply(&service("other", OTHER_IP, 80));
    api.apply(NODE);
    let dir = scratch("kube-stall-relist");
    let (src, _changed) = source(&api, &dir).await;
    wait_watching(&api).await;
    in_sync(&src).await;
    api.fail(Fault::StallLists);
    api.compact(); // every watch gets 410 Gone: each kind lists again, and stalls
    wait_until(&api, "the relist", |api| {
        count(&api.requests(), "LIST services") >= 2
    })
    .await;
    // No watch is open now: the deletion can reach the source only through a list.
    api.delete(Kind::Service, "t", "other");
    // The window opens one LIST into the relist: the next may come only after that
    // one's timeout (1 s) and a backoff of up to 3.2 s, so none in the window is fine.
    let lists = made_during(&api, "LIST services", RATE_WINDOW).await;
    assert!(
        lists <= MAX_IN_WINDOW,
        "{lists} LISTs in {RATE_WINDOW:?}: {:?}",
        api.requests()
    );
    wait_until(&api, "a retry of the stalled relist", |api| {
        count(&api.requests(), "LIST services") >= 3
    })
    .await;
    assert!(
        src.src.unsynced_since().is_some(),
        "a stalled relist is out of sync"
    );
    assert_eq!(
        src.objects().services.len(),
        2,
        "the model is kept while the relist stalls"
    );
    api.heal();
    until(&src, "the service deleted during the stall gone", |o| {
        o.services.len() == 1
    })
    .await;
    in_sync(&src).await;
}

#[tokio::test]
async fn lists_answered_500_are_retried_with_backoff() {
    let api = FakeApi::start();
    api.apply(&service("web", WEB_IP, 80));
    api.apply(NODE);
    api.fail(Fault::Status500);
    let dir = scratch("kube-500");
    let (src, _changed) = start(&api, &dir).await;
    tokio::time::sleep(RATE_WINDOW).await;
    let lists = count(&api.requests(), "LIST services");
    assert!(
        (2..=MAX_IN_WINDOW).contains(&lists),
        "{lists} LISTs in {RATE_WINDOW:?}: {:?}",
        api.requests()
    );
    assert!(src.src.unsynced_since().is_some());
    api.heal();
    tokio::time::timeout(Duration::from_secs(15), src.src.wait_ready())
        .await
        .expect("ready within 15 s of the server answering")
        .unwrap();
    assert_eq!(src.objects().services.len(), 1);
    in_sync(&src).await;
}

#[tokio::test]
async fn watches_closed_at_once_are_reopened_with_backoff_and_resume() {
    let (api, _dir, src) = web_watched("kube-close").await;
    api.fail(Fault::CloseWatches);
    api.drop_watches();
    let watches = made_during(&api, "WATCH services", RATE_WINDOW).await;
    assert!(
        (1..=MAX_IN_WINDOW).contains(&watches),
        "{watches} WATCHes in {RATE_WINDOW:?}: {:?}",
        api.requests()
    );
    assert!(
        src.src.unsynced_since().is_some(),
        "watches that end at once are out of sync"
    );
    api.apply(&slice("web", &pods(3)));
    api.heal();
    until(&src, "the change made while watches closed", |o| {
        endpoint_count(o) == 3
    })
    .await;
    in_sync(&src).await;
    let reqs = api.requests();
    assert_eq!(
        count(&reqs, "LIST endpointslices"),
        1,
        "resumed, no relist: {reqs:?}"
    );
}

#[tokio::test]
async fn a_stream_cut_in_the_middle_of_an_event_is_resumed_with_backoff() {
    let (api, _dir, src) = web_watched("kube-truncate").await;
    api.fail(Fault::Truncate);
    api.apply(&slice("web", &pods(3)));
    let watches = made_during(&api, "WATCH endpointslices", RATE_WINDOW).await;
    assert!(
        (1..=MAX_IN_WINDOW).contains(&watches),
        "{watches} WATCHes in {RATE_WINDOW:?}: {:?}",
        api.requests()
    );
    assert_eq!(
        endpoint_count(&src.objects()),
        1,
        "half an event is never applied"
    );
    assert!(src.src.unsynced_since().is_some());
    api.heal();
    until(&src, "the event once it arrives whole", |o| {
        endpoint_count(o) == 3
    })
    .await;
    in_sync(&src).await;
}

#[tokio::test]
async fn watches_that_keep_expiring_relist_with_backoff() {
    let (api, _dir, src) = web_watched("kube-410").await;
    api.fail(Fault::Gone);
    api.compact();
    api.apply(&slice("web", &pods(2)));
    let lists = made_during(&api, "LIST endpointslices", RATE_WINDOW).await;
    assert!(
        (1..=MAX_IN_WINDOW).contains(&lists),
        "{lists} LISTs in {RATE_WINDOW:?}: {:?}",
        api.requests()
    );
    assert!(
        src.src.unsynced_since().is_some(),
        "a watch that cannot stand is out of sync"
    );
    api.heal();
    in_sync(&src).await;
    // The watch follows again: a change arrives without another list.
    let lists = count(&api.requests(), "LIST endpointslices");
    api.apply(&slice("web", &pods(4)));
    until(&src, "a change through the watch", |o| {
        endpoint_count(o) == 4
    })
    .await;
    assert_eq!(count(&api.requests(), "LIST endpointslices"), lists);
}

#[test]
fn dropping_the_fake_api_ends_it_with_a_stalled_list_open() {
    use std::io::{Read as _, Write as _};
    let api = FakeApi::start();
    api.fail(Fault::StallLists);
    let mut conn = std::net::TcpStream::connect(api.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"GET /api/v1/services HTTP/1.1\r\nHost: fake\r\n\r\n")
        .unwrap();
    let stalled = lb_lab::lab::wait_for(Duration::from_secs(5), || {
        (count(&api.requests(), "LIST services") == 1).then_some(())
    });
    assert!(stalled.is_some(), "{:?}", api.requests());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(api);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the server stops within 5 s of being dropped");
    let mut rest = Vec::new();
    let read = conn.read_to_end(&mut rest);
    assert!(
        matches!(read, Ok(0)) || read.is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the stalled connection is closed, unanswered: {rest:?}"
    );
}

#[test]
fn health_is_503_while_a_relist_stalls_past_the_timeout_and_200_after() {
    let api = FakeApi::start();
    api.apply(&service("web", WEB_IP, 80));
    api.apply(&service("other", OTHER_IP, 80));
    api.apply(NODE);
    let (healthz, metrics) = (common::free_port(), common::free_port());
    let (healthz_bind, metrics_bind) = (
        format!("127.0.0.1:{healthz}"),
        format!("127.0.0.1:{metrics}"),
    );
    let fx = Fixture::with_source(
        "kube-hz",
        1,
        &[],
        Some(&api),
        &[
            "--healthz-bind-address",
            &healthz_bind,
            "--metrics-bind-address",
            &metrics_bind,
            "--healthz-timeout",
            "2s",
            "--api-timeout",
            "1s",
        ],
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], healthz));
    let status = |path: &str| lb_lab::lab::http_get(addr, path).map_or(0, |(code, _)| code);
    let both = |code: u16| {
        lb_lab::lab::wait_for(Duration::from_secs(20), || {
            (status("/healthz") == code && status("/livez") == code).then_some(())
        })
    };
    assert!(both(200).is_some(), "never healthy:\n{}", fx.agent.log());
    let programmed = |n: usize| {
        common::http_get(metrics, "/metrics").contains(&format!("lb_programmed_services {n}\n"))
    };
    assert!(programmed(2));
    let watching = lb_lab::lab::wait_for(Duration::from_secs(10), || {
        let reqs = api.requests();
        ["services", "endpointslices", "nodes"]
            .iter()
            .all(|r| count(&reqs, &format!("WATCH {r}")) >= 1)
            .then_some(())
    });
    assert!(watching.is_some(), "no watches: {:?}", api.requests());

    // Every watch expires and every relist stalls: 503 once that lasts past 2 s.
    api.fail(Fault::StallLists);
    api.compact();
    assert!(
        both(503).is_some(),
        "healthy while stalled:\n{}",
        fx.agent.log()
    );
    assert!(
        programmed(2),
        "the datapath is kept while the source stalls"
    );
    api.delete(Kind::Service, "t", "other");
    api.heal();
    assert!(
        both(200).is_some(),
        "not healthy after recovery:\n{}",
        fx.agent.log()
    );
    let gone = lb_lab::lab::wait_for(Duration::from_secs(5), || programmed(1).then_some(()));
    assert!(
        gone.is_some(),
        "the service deleted during the stall is still programmed"
    );
    let log = fx.agent.log();
    assert!(
        log.matches("watching Service: ").count() <= 3,
        "one line going bad, one recovering (and the same for the first list):\n{log}"
    );
    assert!(log.contains("watching Service: recovered after"), "{log}");
}

/// Whether the running kernel's release (/proc/sys/kernel/osrelease, "6.1.0-57-amd64")
/// is `major.minor` or newer.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let found = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    found >= (major, minor)
}
