//! Sources: where the Service, EndpointSlice and Node objects come from. Both report
//! [`Change`]s (an object added or modified, deleted, or a kind listed anew), which is
//! all the model sees; no source touches BPF.
//!
//! * [`manifest`]: a YAML/JSON file or directory, polled for changes;
//! * [`api`]: the Kubernetes API, through kube-rs reflectors.

pub mod api;
pub mod manifest;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{sync::Notify, task::JoinHandle};

use crate::model::{Change, Model};

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
}

impl Source {
    /// Starts polling `path` every `every`; `changed` is notified at once and after each
    /// change.
    pub fn manifests(path: PathBuf, every: Duration, changed: Arc<Notify>) -> Self {
        Self::Manifests {
            poller: poll_manifests(path.clone(), every, changed),
            path,
            cache: Default::default(),
        }
    }

    /// Hands the changes since the last call to `model`; returns warnings about what
    /// could not be read.
    pub fn drain(&self, model: &mut Model) -> Result<Vec<String>, manifest::ManifestError> {
        let (changes, warnings): (Vec<Change>, Vec<String>) = match self {
            Self::Manifests { path, cache, .. } => cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refresh(path)?,
            Self::Kube(k) => (k.take_changes(), Vec::new()),
        };
        for change in changes {
            model.apply(change);
        }
        Ok(warnings)
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Self::Manifests { poller, .. } = self {
            poller.abort();
        }
    }
}

/// Notifies `changed` whenever the manifests' fingerprint changes (and once at start).
fn poll_manifests(path: PathBuf, every: Duration, changed: Arc<Notify>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = manifest::fingerprint(&path);
            if seen.as_ref() != Some(&now) {
                seen = Some(now);
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
