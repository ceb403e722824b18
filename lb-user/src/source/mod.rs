//! Sources: where the Service, EndpointSlice and Node objects come from. Both report
//! [`Change`]s (an object added or modified, deleted, or a kind listed anew), which is
//! all the model sees; no source touches BPF.
//!
//! * [`manifest`]: a YAML/JSON file or directory, polled for changes;
//! * [`api`]: the Kubernetes API, through kube-rs reflectors.

pub mod api;
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

    /// Starts polling `path` every `every`; `changed` is notified at start (once no file
    /// is being written, at most twice the settle time) and after each change, once the
    /// changed files have settled (see [`settle_time`]).
    pub fn manifests(path: PathBuf, every: Duration, changed: Arc<Notify>) -> Self {
        let settle = settle_time(every);
        let limits = manifest::Limits::default();
        Self::Manifests {
            poller: poll_manifests(path.clone(), every, settle, limits, changed),
            path,
            cache: std::sync::Mutex::new(manifest::Cache::new(settle, limits)),
        }
    }

    /// Hands the changes since the last call to `model`; returns warnings about what
    /// could not be read.
    pub fn drain(&self, model: &mut Model) -> Result<Vec<String>, manifest::ManifestError> {
        let (changes, warnings): (Vec<Change>, Vec<String>) = match self {
            Self::Manifests { path, cache, .. } => cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refresh(path, SystemTime::now())?,
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

/// How long a manifest file must stay unwritten before it is read: one poll interval
/// (a file is read once a poll found it unchanged since the last write, by its age), at
/// most 500 ms. Short with the short polls of tests and benchmarks, so a change arrives
/// in milliseconds (two intervals made the one-change p99 at 10k services 6.5 ms, one
/// 3.6 ms).
pub fn settle_time(every: Duration) -> Duration {
    every.min(Duration::from_millis(500))
}

/// Notifies `changed` whenever the settled view of the manifests changes: a file written
/// is reported once it has settled, a file removed at once. The view is looked at every
/// `every`, so the notification comes at most one poll after the settle time. The first
/// notification (the first sync) waits until no file is being written, at most twice the
/// settle time, so that files written just before the start are in it.
fn poll_manifests(
    path: PathBuf,
    every: Duration,
    settle: Duration,
    limits: manifest::Limits,
    changed: Arc<Notify>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut view = manifest::Settled::default();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = Instant::now();
        let mut first = true;
        loop {
            tick.tick().await;
            let news = view.observe(&path, &limits, settle, SystemTime::now());
            if first && view.young() > 0 && started.elapsed() < settle.saturating_mul(2) {
                continue;
            }
            if news || first {
                first = false;
                changed.notify_one();
            }
        }
    })
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
