//! Sources: where the Service, EndpointSlice and Node objects come from. Both report
//! [`Change`]s (an object added or modified, deleted, or a kind listed anew), which is
//! all the model sees; no source touches BPF.
//!
//! * [`manifest`]: a YAML/JSON file or directory, watched ([`inotify`]) and polled
//!   for changes;
//! * [`api`]: the Kubernetes API, through kube-rs reflectors.

pub mod api;
pub mod inotify;
pub use lb_core::manifest;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::{sync::Notify, task::JoinHandle};

use crate::model::{Change, Kind, Model, ObjKey};

/// Where the objects come from.
pub enum SourceSpec {
    /// A YAML/JSON file or directory, polled for changes.
    Manifests(PathBuf),
    /// The Kubernetes API (`--kubeconfig`, else inferred).
    Kube { kubeconfig: Option<PathBuf> },
}

/// A started source. Dropping it stops its watches or its poller.
pub enum Source {
    Manifests {
        path: PathBuf,
        cache: std::sync::Mutex<manifest::Cache>,
        poller: JoinHandle<()>,
        /// The first read, in parts, until its last part is handed over.
        first: std::sync::Mutex<Option<FirstRead>>,
    },
    Kube(api::KubeSource),
    /// Changes handed in by the caller ([`Source::push`]): tests of the loop, or a
    /// program that embeds the agent.
    Queue(std::sync::Mutex<Vec<Change>>),
}

impl Source {
    /// Queues `change` for the next sync (a [`Source::Queue`] only; the caller notifies
    /// the loop).
    pub fn push(&self, change: Change) {
        if let Self::Queue(q) = self {
            q.lock().unwrap_or_else(|p| p.into_inner()).push(change);
        }
    }

    /// Starts polling `path` every `every`, and at once on inotify's news of it;
    /// `changed` is notified at start (once no file is being written, at most twice the
    /// settle time) and after each change, once the changed files have settled (see
    /// [`settle_time`]) or are known to be written whole (see [`inotify`]).
    ///
    /// The first read runs on a thread of its own ([`FirstRead`]): the objects come in
    /// parts, each notified, so that the first sync programs a part while the next is
    /// parsed.
    pub fn manifests(path: PathBuf, every: Duration, changed: Arc<Notify>) -> Self {
        let settle = settle_time(every);
        let limits = manifest::Limits::default();
        let complete = manifest::Complete::default();
        let wake = Arc::new(Notify::new());
        if let Err(why) = inotify::start(path.clone(), limits, complete.clone(), wake.clone()) {
            tracing::info!(
                "manifest changes are found by the poll alone (every {every:?}, a file read \
                 once unwritten for {settle:?}): {why}"
            );
        }
        let first = FirstRead::start(path.clone(), settle, limits, &complete, changed.clone());
        let poller = Poller {
            every,
            settle,
            limits,
            view: manifest::Settled::with_complete(complete.clone()),
            wake,
        };
        Self::Manifests {
            poller: poller.spawn(path.clone(), changed),
            path,
            cache: std::sync::Mutex::new(
                manifest::Cache::new(settle, limits).with_complete(complete),
            ),
            first: std::sync::Mutex::new(first),
        }
    }

    /// Whether the source is still handing its first objects over in parts: the sync
    /// then programs what it has without removing anything (see [`FirstRead`]).
    pub fn reading_first(&self) -> bool {
        match self {
            Self::Manifests { first, .. } => {
                first.lock().unwrap_or_else(|p| p.into_inner()).is_some()
            }
            Self::Kube(_) | Self::Queue(_) => false,
        }
    }

    /// Hands the changes since the last call to `model`; returns warnings about what
    /// could not be read.
    pub fn drain(&self, model: &mut Model) -> Result<Vec<String>, manifest::ManifestError> {
        let (changes, warnings): (Vec<Change>, Vec<String>) = match self {
            Self::Manifests {
                path, cache, first, ..
            } => {
                let mut first = first.lock().unwrap_or_else(|p| p.into_inner());
                match first.as_ref().and_then(|f| f.take(cache)) {
                    Some(Taken::Part(changes)) => (changes, Vec::new()),
                    Some(Taken::Last(result)) => {
                        *first = None;
                        let (mut changes, _) = result?;
                        // A file written while it was read: the poller's news of it came
                        // while parts did, so it is looked at now.
                        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
                        let (more, warnings) = cache.refresh(path, SystemTime::now())?;
                        changes.extend(more);
                        (changes, warnings)
                    }
                    None => {
                        // Read (or the reader gone): from now on, by the poller's news.
                        *first = None;
                        cache
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .refresh(path, SystemTime::now())?
                    }
                }
            }
            Self::Kube(k) => (k.take_changes(), Vec::new()),
            Self::Queue(q) => (
                std::mem::take(&mut *q.lock().unwrap_or_else(|p| p.into_inner())),
                Vec::new(),
            ),
        };
        for change in changes {
            model.apply(change);
        }
        Ok(warnings)
    }

    /// Since when the source has been out of sync with its objects (the API: a kind
    /// relisting or its watch failing); `None` while in sync, and always for manifests
    /// (an unreadable path keeps the sync from succeeding instead).
    pub fn unsynced_since(&self) -> Option<std::time::SystemTime> {
        match self {
            Self::Kube(k) => k.unsynced_since(),
            Self::Manifests { .. } | Self::Queue(_) => None,
        }
    }

    /// Where an object of the manifests is defined ("FILE, document N"); `None` for an
    /// object the source does not hold, and for the API source.
    pub fn origin(&self, kind: Kind, key: &ObjKey) -> Option<String> {
        match self {
            Self::Manifests { cache, .. } => cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .origin(kind, key),
            Self::Kube(_) | Self::Queue(_) => None,
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Self::Manifests { poller, .. } = self {
            poller.abort();
        }
    }
}

/// The manifest source's first read, on a thread of its own: the objects of every
/// [`manifest::PART_DOCUMENTS`] documents are handed over as soon as they are parsed
/// ([`manifest::Cache::read_first`]), so that the first sync programs one part while
/// the next is parsed, instead of parsing everything first.
pub struct FirstRead {
    parts: std::sync::mpsc::Receiver<Part>,
}

/// What the first read's thread sends: a part, then the read cache, with what the parts
/// did not say and the warnings.
enum Part {
    Objects(Vec<Change>),
    Last(ReadFirst),
}

type ReadFirst = Result<(manifest::Cache, Vec<Change>, Vec<String>), manifest::ManifestError>;

/// What [`FirstRead::take`] found.
enum Taken {
    /// The changes of the parts read so far: the first read goes on.
    Part(Vec<Change>),
    /// The last changes (or the error that ended the read): the first read is over.
    Last(Result<(Vec<Change>, Vec<String>), manifest::ManifestError>),
}

/// How long a sync waits for the first read's next part (a bound: it goes on without).
const FIRST_PART_WAIT: Duration = Duration::from_secs(5);

impl FirstRead {
    /// Starts reading `path` on a thread; `changed` is notified after each part. `None`
    /// when no thread could be started (the first sync then reads it all).
    fn start(
        path: PathBuf,
        settle: Duration,
        limits: manifest::Limits,
        complete: &manifest::Complete,
        changed: Arc<Notify>,
    ) -> Option<Self> {
        let (tx, parts) = std::sync::mpsc::channel();
        let mut cache = manifest::Cache::new(settle, limits).with_complete(complete.clone());
        let spawned = std::thread::Builder::new()
            .name("lb-manifests".into())
            .spawn(move || {
                wait_until_written(&path, &limits, settle);
                let read = cache.read_first(&path, SystemTime::now(), |part| {
                    let _ = tx.send(Part::Objects(part));
                    changed.notify_one();
                });
                let _ = tx.send(Part::Last(read.map(|(rest, w)| (cache, rest, w))));
                changed.notify_one();
            });
        match spawned {
            Ok(_) => Some(Self { parts }),
            Err(e) => {
                tracing::warn!("starting the manifest reader: {e}; the first sync reads them");
                None
            }
        }
    }

    /// The parts sent since the last call: waits (at most [`FIRST_PART_WAIT`]) for the
    /// first of them. At the last part, the read cache replaces `cache`. `None` when the
    /// reading thread is gone without its last part.
    fn take(&self, cache: &std::sync::Mutex<manifest::Cache>) -> Option<Taken> {
        use std::sync::mpsc::RecvTimeoutError;
        let mut changes = Vec::new();
        let mut next = match self.parts.recv_timeout(FIRST_PART_WAIT) {
            Ok(part) => Some(part),
            Err(RecvTimeoutError::Timeout) => return Some(Taken::Part(changes)),
            Err(RecvTimeoutError::Disconnected) => return None,
        };
        while let Some(part) = next {
            match part {
                Part::Objects(part) => changes.extend(part),
                Part::Last(read) => {
                    let last = read.map(|(read, rest, warnings)| {
                        *cache.lock().unwrap_or_else(|p| p.into_inner()) = read;
                        changes.extend(rest);
                        (changes, warnings)
                    });
                    return Some(Taken::Last(last));
                }
            }
            next = self.parts.try_recv().ok();
        }
        Some(Taken::Part(changes))
    }
}

/// A manifest source whose first read the caller hands over, part by part (tests of the
/// first sync in parts).
#[cfg(test)]
pub(crate) struct PartFeeder(std::sync::mpsc::Sender<Part>);

#[cfg(test)]
impl PartFeeder {
    /// The manifest source on `path`, reading first what is fed (no poller).
    pub(crate) fn source(path: PathBuf) -> (Source, Self) {
        let (tx, parts) = std::sync::mpsc::channel();
        let source = Source::Manifests {
            path,
            cache: Default::default(),
            poller: tokio::spawn(async {}),
            first: std::sync::Mutex::new(Some(FirstRead { parts })),
        };
        (source, Self(tx))
    }

    pub(crate) fn part(&self, changes: Vec<Change>) {
        self.0.send(Part::Objects(changes)).unwrap();
    }

    /// The end of the first read: `rest` as what the parts did not say.
    pub(crate) fn last(&self, rest: Vec<Change>) {
        let cache = manifest::Cache::default();
        self.0
            .send(Part::Last(Ok((cache, rest, Vec::new()))))
            .unwrap();
    }
}

/// Waits until no manifest file is being written, at most twice the settle time (as
/// the poller's first notification does), so that files written just before the start
/// are in the first read.
fn wait_until_written(path: &std::path::Path, limits: &manifest::Limits, settle: Duration) {
    let started = Instant::now();
    let mut view = manifest::Settled::default();
    let step = (settle / 4).max(Duration::from_millis(1));
    loop {
        view.observe(path, limits, settle, SystemTime::now());
        if view.young() == 0 || started.elapsed() >= settle.saturating_mul(2) {
            return;
        }
        std::thread::sleep(step);
    }
}

/// How long a manifest file must stay unwritten before it is read: one poll interval
/// (a file is read once a poll found it unchanged since the last write, by its age), at
/// most 500 ms. Short with the short polls of tests and benchmarks, so a change arrives
/// in milliseconds (two intervals made the one-change p99 at 10k services 6.5 ms, one
/// 3.6 ms).
pub fn settle_time(every: Duration) -> Duration {
    every.min(Duration::from_millis(500))
}

/// The manifest poller: looks at the files every `every`, and at once when `wake` is
/// notified (inotify's news).
struct Poller {
    every: Duration,
    settle: Duration,
    limits: manifest::Limits,
    view: manifest::Settled,
    wake: Arc<Notify>,
}

impl Poller {
    /// Notifies `changed` whenever the settled view of the manifests changes: a file
    /// written is reported once it has settled (or is known whole), a file removed at
    /// once. The view is looked at every `every` and at each wake, so the notification
    /// comes at most one poll after the settle time. The first notification (the first
    /// sync) waits until no file is being written, at most twice the settle time, so that
    /// files written just before the start are in it.
    fn spawn(mut self, path: PathBuf, changed: Arc<Notify>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let started = Instant::now();
            let mut first = true;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = self.wake.notified() => {}
                }
                let news = (self.view).observe(&path, &self.limits, self.settle, SystemTime::now());
                let writing = self.view.young() > 0;
                if first && writing && started.elapsed() < self.settle.saturating_mul(2) {
                    continue;
                }
                if news || first {
                    first = false;
                    changed.notify_one();
                }
            }
        })
    }
}

/// kube-proxy's node name rule: --hostname-override, else NODE_NAME, else the hostname,
/// lower-cased.
pub fn node_name(override_: Option<&str>) -> String {
    override_
        .map(str::to_string)
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default()
        .to_lowercase()
}
