//! The Kubernetes API source: a list-then-watch loop per kind (Services, EndpointSlices
//! and this agent's own Node) whose events become the model's [`Change`]s.
//!
//! Every event is queued as it arrives and handed over at the next sync: a sync costs
//! what changed, and no copy of the cluster is kept here (the model holds the objects).
//! A watch resumes from the last resourceVersion it saw (an event or a bookmark); one that
//! expires (410 Gone) makes the kind list again, and the listed objects are handed over
//! as one [`Change::Relist`] once the list is complete, so the datapath is never flushed
//! while the agent catches up.
//!
//! Faults, as client-go's reflector handles them:
//!
//! * **Timeouts** ([`ApiTimeouts`]): connecting, each LIST page and each WATCH until its
//!   response head are abandoned after `--api-timeout` (60 s; connecting at most 30 s, as
//!   client-go's dialer). A watch asks the server to end it after a random 5-10 minutes
//!   (client-go's `timeoutSeconds`), and is abandoned 30 s after that if the server does
//!   not end it; the client's read timeout (a backstop for any request) is longer than
//!   that, so a quiet watch is never cut by it.
//! * **Backoff** ([`Backoff`]): every failure (a request that fails or times out, a watch
//!   error, a 410, a watch that ends within a second of opening with no event) waits
//!   0.8 s doubling to 30 s, each wait jittered up to twice as long (client-go's
//!   `wait.Jitter` with factor 1); the waits start over only after two minutes without a
//!   failure, never because a list or a watch started.
//! * **Logs**: a kind that goes bad is logged once ("watching Service: <error>; retrying
//!   with backoff"), each retry after that at debug level with the count, and once when
//!   its watch works again ("watching Service: recovered after N failures").
//! * **Health**: each kind records since when it has been out of sync (from the start
//!   until its watch stands, from a relist's start, from a failure); the oldest is
//!   [`KubeSource::unsynced_since`], which the agent's `/healthz` and `/livez` weigh.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    api::{ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};

use crate::model::{Change, Kind, Object, Slice, slice::slim_meta};

/// kube-proxy's selector: services (and their slices) handled by another proxy, and
/// headless ones, are not watched at all.
pub const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Objects per LIST page (client-go's and kube-runtime's page size).
const PAGE_SIZE: u32 = 500;
/// A watch that ends this soon after it was opened, with no event, is a failure
/// (client-go: "very short watch").
const SHORT_WATCH: Duration = Duration::from_secs(1);
/// How long past its `timeoutSeconds` a watch may run before it is abandoned.
const WATCH_MARGIN: Duration = Duration::from_secs(30);

/// How long each request to the API may take.
#[derive(Clone, Copy, Debug)]
pub struct ApiTimeouts {
    /// Each LIST page, and each WATCH until its response head, is abandoned after this
    /// (`--api-timeout`, 60 s); connecting, after this or 30 s, whichever is shorter.
    pub request: Duration,
    /// A watch asks the server to end it after a random time between this and twice this
    /// (client-go: 5 minutes), and is abandoned [`WATCH_MARGIN`] after that.
    pub watch: Duration,
}

impl Default for ApiTimeouts {
    fn default() -> Self {
        Self {
            request: Duration::from_secs(60),
            watch: Duration::from_secs(300),
        }
    }
}

impl ApiTimeouts {
    /// The defaults, with `request` for the LIST / WATCH bound.
    pub fn with_request(request: Duration) -> Self {
        Self {
            request,
            ..Self::default()
        }
    }

    /// Sets the client's own timeouts: connect, write, and a read timeout longer than
    /// the longest quiet watch.
    fn apply(&self, config: &mut Config) {
        config.connect_timeout = Some(self.request.min(Duration::from_secs(30)));
        config.write_timeout = Some(self.request);
        config.read_timeout = Some(self.watch * 2 + WATCH_MARGIN * 2);
        // The read timeout counts from each request, not from when a pooled connection
        // went idle.
        config.reset_reader_on_write = true;
    }
}

/// A client from `--kubeconfig FILE`, else the usual inference: in-cluster service
/// account, then KUBECONFIG, then ~/.kube/config. Plain `http://` servers work too.
pub async fn client(kubeconfig: Option<&Path>, timeouts: &ApiTimeouts) -> anyhow::Result<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context(
            "no Kubernetes API configuration (not in a cluster, no KUBECONFIG, no ~/.kube/config); \
             pass --kubeconfig FILE, or --manifests PATH to run without a cluster",
        )?,
    };
    timeouts.apply(&mut config);
    Client::try_from(config).context("creating the Kubernetes client")
}

/// client-go's reflector backoff: 0.8 s doubling to 30 s, each wait jittered up to
/// twice as long; it starts over once two minutes passed since the last wait began.
#[derive(Debug)]
pub struct Backoff {
    /// The next wait before jitter.
    next: Duration,
    /// When the last wait began.
    last: Option<Instant>,
}

impl Backoff {
    pub const INITIAL: Duration = Duration::from_millis(800);
    pub const CAP: Duration = Duration::from_secs(30);
    pub const RESET_AFTER: Duration = Duration::from_secs(120);

    pub fn new() -> Self {
        Self {
            next: Self::INITIAL,
            last: None,
        }
    }

    /// The wait after a failure at `now`; `jitter` (in [0, 1]) lengthens it by up to
    /// as much again.
    pub fn delay(&mut self, now: Instant, jitter: f64) -> Duration {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) > Self::RESET_AFTER)
        {
            self.next = Self::INITIAL;
        }
        self.last = Some(now);
        let base = self.next;
        self.next = (base * 2).min(Self::CAP);
        base.mul_f64(1.0 + jitter.clamp(0.0, 1.0))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// A random number in [0, 1) (std's randomly keyed hasher: enough for jitter).
fn random_unit() -> f64 {
    use std::hash::BuildHasher as _;
    let bits = std::hash::RandomState::new().hash_one(SystemTime::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// A kind's failures in a row, so that a change of state is logged once.
#[derive(Debug, Default)]
pub struct Streak {
    failures: u32,
}

impl Streak {
    /// Counts a failure; `true` for the first of a run.
    pub fn fail(&mut self) -> bool {
        self.failures += 1;
        self.failures == 1
    }

    /// The watch works: the length of the run of failures this ends, if any.
    pub fn recover(&mut self) -> Option<u32> {
        (self.failures > 0).then(|| std::mem::take(&mut self.failures))
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// What the watch tasks queued for the next sync, and how in sync each kind is.
#[derive(Default)]
struct Pending {
    changes: Vec<Change>,
    /// Kinds whose first list is complete.
    listed: BTreeSet<Kind>,
    /// Kinds out of sync (listing, or their watch failing), since when.
    unsynced: BTreeMap<Kind, SystemTime>,
}

/// The three watches. Dropping it stops them.
pub struct KubeSource {
    pending: Arc<Mutex<Pending>>,
    listed: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts the watches; `changed` is notified after every change queued, and when a
    /// kind goes out of sync or back.
    pub fn start(
        client: Client,
        node_name: &str,
        changed: Arc<Notify>,
        timeouts: ApiTimeouts,
    ) -> Self {
        let now = SystemTime::now();
        let pending = Pending {
            unsynced: [Kind::Service, Kind::EndpointSlice, Kind::Node]
                .into_iter()
                .map(|k| (k, now))
                .collect(),
            ..Pending::default()
        };
        let feed = Feed {
            pending: Arc::new(Mutex::new(pending)),
            changed,
            listed: Arc::new(Notify::new()),
        };
        let proxied = Selectors {
            labels: Some(PROXY_SELECTOR.to_string()),
            fields: None,
        };
        let this_node = Selectors {
            labels: None,
            fields: Some(format!("metadata.name={node_name}")),
        };
        let tasks = vec![
            feed.spawn(
                Api::<Service>::all(client.clone()),
                proxied.clone(),
                timeouts,
                |mut o| {
                    slim_meta(&mut o.metadata);
                    Object::Service(Arc::new(o))
                },
            ),
            // Straight into the slim type: no copy of what the model never reads.
            feed.spawn(Api::<Slice>::all(client.clone()), proxied, timeouts, |o| {
                Object::EndpointSlice(Arc::new(o.slim()))
            }),
            feed.spawn(Api::<Node>::all(client), this_node, timeouts, |o| {
                Object::Node(Arc::new(o))
            }),
        ];
        Self {
            pending: feed.pending,
            listed: feed.listed,
            tasks,
        }
    }

    /// Waits until every kind's first list is complete.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        loop {
            let notified = self.listed.notified();
            if lock(&self.pending).listed.len() == 3 {
                return Ok(());
            }
            notified.await;
        }
    }

    /// The changes queued since the last call.
    pub fn take_changes(&self) -> Vec<Change> {
        std::mem::take(&mut lock(&self.pending).changes)
    }

    /// Since when the source has been out of sync (the oldest of its kinds: a list not
    /// done yet, or a watch failing); `None` while every kind's watch stands.
    pub fn unsynced_since(&self) -> Option<SystemTime> {
        lock(&self.pending).unsynced.values().min().copied()
    }
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Where the watch tasks put what they see.
#[derive(Clone)]
struct Feed {
    pending: Arc<Mutex<Pending>>,
    changed: Arc<Notify>,
    listed: Arc<Notify>,
}

impl Feed {
    /// Starts the list-then-watch loop of one kind.
    fn spawn<K>(
        &self,
        api: Api<K>,
        selectors: Selectors,
        timeouts: ApiTimeouts,
        wrap: fn(K) -> Object,
    ) -> JoinHandle<()>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Default,
    {
        let what = K::kind(&K::DynamicType::default()).to_string();
        let watch = Watch {
            kind: kind_of(&what),
            what,
            api,
            selectors,
            timeouts,
            wrap,
            feed: self.clone(),
            backoff: Backoff::new(),
            streak: Streak::default(),
            listed: false,
        };
        tokio::spawn(watch.run())
    }

    /// Queues a change and notifies.
    fn push(&self, change: Change) {
        lock(&self.pending).changes.push(change);
        self.changed.notify_one();
    }

    /// `kind` is out of sync from `now` on, unless it already was.
    fn unsynced(&self, kind: Kind, now: SystemTime) {
        let mut p = lock(&self.pending);
        if let std::collections::btree_map::Entry::Vacant(e) = p.unsynced.entry(kind) {
            e.insert(now);
            drop(p);
            self.changed.notify_one();
        }
    }

    /// `kind` is in sync again.
    fn synced(&self, kind: Kind) {
        if lock(&self.pending).unsynced.remove(&kind).is_some() {
            self.changed.notify_one();
        }
    }

    /// A complete list of `kind`, handed over as one change.
    fn relisted(&self, kind: Kind, objects: Vec<Object>) {
        let mut p = lock(&self.pending);
        p.changes.push(Change::Relist(kind, objects));
        let first = p.listed.insert(kind);
        drop(p);
        if first {
            self.listed.notify_one();
        }
        self.changed.notify_one();
    }
}

#[derive(Clone, Debug)]
struct Selectors {
    labels: Option<String>,
    fields: Option<String>,
}

/// How one step of the loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Watch (again) at once from this resourceVersion.
    Resume(String),
    /// A failure: after a backoff, watch from this resourceVersion, or list when `None`.
    Failed(String, Option<String>),
}

/// One kind's list-then-watch loop.
struct Watch<K: Resource> {
    kind: Kind,
    /// The kind's name, for the logs.
    what: String,
    api: Api<K>,
    selectors: Selectors,
    timeouts: ApiTimeouts,
    wrap: fn(K) -> Object,
    feed: Feed,
    backoff: Backoff,
    streak: Streak,
    /// A list has completed: later lists (after a 410) read the current state, as
    /// client-go's do, not the API server's watch cache, which may lag behind what the
    /// watch already delivered.
    listed: bool,
}

impl<K> Watch<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    /// Lists, then watches from the list's resourceVersion, for ever: a watch that ends
    /// is reopened where it stopped, a failure is retried after a backoff, an expired
    /// resourceVersion makes it list again.
    async fn run(mut self) {
        let mut from: Option<String> = None;
        loop {
            let step = match from.take() {
                None => self.list().await,
                Some(rv) => self.watch(rv).await,
            };
            match step {
                Step::Resume(rv) => from = Some(rv),
                Step::Failed(error, resume) => {
                    from = resume;
                    self.failed(&error);
                    let wait = self.backoff.delay(Instant::now(), random_unit());
                    tracing::debug!(
                        failures = self.streak.failures(),
                        wait_ms = wait.as_millis() as u64,
                        "watching {}: backing off",
                        self.what
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// A failure: out of sync from now on; logged when it is the first of a run.
    fn failed(&mut self, error: &str) {
        self.feed.unsynced(self.kind, SystemTime::now());
        if self.streak.fail() {
            tracing::warn!("watching {}: {error}; retrying with backoff", self.what);
        } else {
            tracing::debug!(
                failures = self.streak.failures(),
                "watching {}: {error}; retrying",
                self.what
            );
        }
    }

    /// The watch stands (it delivered an event, or stayed open a while): in sync.
    fn recovered(&mut self) {
        self.feed.synced(self.kind);
        if let Some(n) = self.streak.recover() {
            tracing::info!("watching {}: recovered after {n} failures", self.what);
        }
    }

    /// Lists every page; hands the objects over as one relist.
    async fn list(&mut self) -> Step {
        self.feed.unsynced(self.kind, SystemTime::now());
        let mut params = ListParams {
            label_selector: self.selectors.labels.clone(),
            field_selector: self.selectors.fields.clone(),
            limit: Some(PAGE_SIZE),
            ..ListParams::default()
        };
        if !self.listed {
            // The first list may come from the API server's cache (resourceVersion=0).
            params = params.match_any();
        }
        let mut objects = Vec::new();
        let rv = loop {
            let page =
                match tokio::time::timeout(self.timeouts.request, self.api.list(&params)).await {
                    Err(_) => return Step::Failed(self.no_answer("LIST"), None),
                    Ok(Err(e)) => return Step::Failed(format!("LIST: {e}"), None),
                    Ok(Ok(page)) => page,
                };
            objects.extend(page.items.into_iter().map(|mut o| {
                o.managed_fields_mut().clear();
                (self.wrap)(o)
            }));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params.continue_token = Some(token),
                None => break page.metadata.resource_version.filter(|v| !v.is_empty()),
            }
        };
        let Some(rv) = rv else {
            return Step::Failed("LIST: the answer has no resourceVersion".into(), None);
        };
        self.feed.relisted(self.kind, objects);
        self.listed = true;
        Step::Resume(rv)
    }

    fn no_answer(&self, verb: &str) -> String {
        format!("{verb}: no answer within {:?}", self.timeouts.request)
    }

    /// One watch from `rv`, until the server ends it, it fails, or it runs past its
    /// timeout.
    async fn watch(&mut self, rv: String) -> Step {
        let asked = self.timeouts.watch.mul_f64(1.0 + random_unit());
        let params = WatchParams {
            label_selector: self.selectors.labels.clone(),
            field_selector: self.selectors.fields.clone(),
            timeout: Some(asked.as_secs().max(1) as u32),
            bookmarks: true,
            ..WatchParams::default()
        };
        let opened = tokio::time::Instant::now();
        let stream =
            match tokio::time::timeout(self.timeouts.request, self.api.watch(&params, &rv)).await {
                Err(_) => return Step::Failed(self.no_answer("WATCH"), Some(rv)),
                Ok(Err(kube::Error::Api(s))) if s.code == 410 => {
                    return Step::Failed(format!("WATCH: {} (410 Gone)", s.message), None);
                }
                Ok(Err(e)) => return Step::Failed(format!("WATCH: {e}"), Some(rv)),
                Ok(Ok(stream)) => stream,
            };
        let mut stream = std::pin::pin!(stream);
        let deadline = opened + asked + WATCH_MARGIN;
        let (mut rv, mut stands) = (rv, false);
        loop {
            // Until the watch stands, wake when it has been open long enough to.
            let wake = if stands {
                deadline
            } else {
                (opened + SHORT_WATCH).min(deadline)
            };
            let item = match tokio::time::timeout_at(wake, stream.next()).await {
                Err(_) if !stands => {
                    stands = true;
                    self.recovered();
                    continue;
                }
                Err(_) => {
                    tracing::debug!("watching {}: not ended by the server; reopening", self.what);
                    return Step::Resume(rv);
                }
                Ok(None) => break,
                Ok(Some(item)) => item,
            };
            match self.event(item, &mut rv) {
                Ok(()) if !stands => {
                    stands = true;
                    self.recovered();
                }
                Ok(()) => {}
                Err(step) => return step,
            }
        }
        if stands {
            Step::Resume(rv)
        } else {
            let ms = opened.elapsed().as_millis();
            Step::Failed(
                format!("the watch ended at once ({ms} ms, no event)"),
                Some(rv),
            )
        }
    }

    /// One item of a watch stream: queued, or the step that ends the watch.
    fn event(&self, item: kube::Result<WatchEvent<K>>, rv: &mut String) -> Result<(), Step> {
        let resume = || Some(rv.clone());
        let event = item.map_err(|e| Step::Failed(format!("WATCH: {e}"), resume()))?;
        let (mut object, deleted) = match event {
            WatchEvent::Added(o) | WatchEvent::Modified(o) => (o, false),
            WatchEvent::Deleted(o) => (o, true),
            WatchEvent::Bookmark(b) => {
                // An empty one would make the next watch start from "any" and miss
                // the deletions in between.
                if !b.metadata.resource_version.is_empty() {
                    *rv = b.metadata.resource_version;
                }
                return Ok(());
            }
            WatchEvent::Error(s) if s.code == 410 => {
                return Err(Step::Failed(
                    format!("the watch expired: {} (410 Gone)", s.message),
                    None,
                ));
            }
            WatchEvent::Error(s) => {
                return Err(Step::Failed(
                    format!("WATCH: {} ({})", s.message, s.code),
                    resume(),
                ));
            }
        };
        let Some(version) = object.resource_version().filter(|v| !v.is_empty()) else {
            return Err(Step::Failed(
                "WATCH: an event without resourceVersion".into(),
                None,
            ));
        };
        *rv = version;
        object.managed_fields_mut().clear();
        let object = (self.wrap)(object);
        self.feed.push(if deleted {
            Change::Delete(object.kind(), object.key())
        } else {
            Change::Apply(object)
        });
        Ok(())
    }
}

fn kind_of(what: &str) -> Kind {
    match what {
        "Service" => Kind::Service,
        "EndpointSlice" => Kind::EndpointSlice,
        _ => Kind::Node,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_starts_over_only_after_quiet() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Backoff::new();
        // No jitter: 0.8, 1.6, 3.2, ... up to 30 s.
        let waits: Vec<Duration> = (0..8).map(|i| b.delay(t0 + s(i), 0.0)).collect();
        assert_eq!(waits[0], Duration::from_millis(800));
        assert_eq!(waits[1], Duration::from_millis(1600));
        assert_eq!(waits[5], Duration::from_millis(25_600));
        assert_eq!(waits[6], s(30));
        assert_eq!(waits[7], s(30));
        // Full jitter doubles a wait at most.
        assert_eq!(b.delay(t0 + s(8), 1.0), s(60));
        assert_eq!(b.delay(t0 + s(9), 7.0), s(60), "jitter is clamped");
        // Failures that keep coming, however far apart within two minutes, keep the cap.
        assert_eq!(b.delay(t0 + s(9) + s(119), 0.0), s(30));
        // Two quiet minutes: from the start again.
        assert_eq!(
            b.delay(t0 + s(128) + s(121), 0.0),
            Duration::from_millis(800)
        );
        // Random jitter stays within [0, 1).
        for _ in 0..100 {
            let r = random_unit();
            assert!((0.0..1.0).contains(&r), "{r}");
        }
    }

    #[test]
    fn a_run_of_failures_is_reported_once_at_each_end() {
        let mut s = Streak::default();
        assert_eq!(s.recover(), None, "no failure: nothing to report");
        assert!(s.fail(), "the first failure is logged");
        assert!(!s.fail());
        assert!(!s.fail());
        assert_eq!(s.failures(), 3);
        assert_eq!(s.recover(), Some(3));
        assert_eq!(s.recover(), None, "recovered once");
        assert!(s.fail(), "a new run is logged again");
    }

    #[test]
    fn timeouts_bound_requests_and_outlast_the_quiet_watch() {
        let t = ApiTimeouts::with_request(Duration::from_secs(2));
        let mut config = Config::new("http://127.0.0.1:1".parse().unwrap());
        t.apply(&mut config);
        assert_eq!(config.connect_timeout, Some(Duration::from_secs(2)));
        assert_eq!(config.write_timeout, Some(Duration::from_secs(2)));
        // A watch may run up to twice `watch` plus the margin: the read timeout is longer.
        assert!(config.read_timeout.unwrap() > t.watch * 2 + WATCH_MARGIN);
        let mut config = Config::new("http://127.0.0.1:1".parse().unwrap());
        ApiTimeouts::default().apply(&mut config);
        assert_eq!(config.connect_timeout, Some(Duration::from_secs(30)));
    }
}
