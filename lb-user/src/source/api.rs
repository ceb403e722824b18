//! The Kubernetes API source: kube-rs watchers for Services, EndpointSlices and this
//! agent's own Node, whose events become the model's [`Change`]s.
//!
//! Every event is queued as it arrives and handed over at the next sync: a sync costs
//! what changed, and no copy of the cluster is kept here (the model holds the objects).
//! A watch that ends, drops or expires (410 Gone) makes the watcher relist; the relisted
//! objects are held back until the list is complete and then handed over as one
//! [`Change::Relist`], so the datapath is never flushed while the agent catches up.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};

use crate::model::{Change, Kind, Object, Slice, slice::slim_meta};

/// kube-proxy's selector: services (and their slices) handled by another proxy, and
/// headless ones, are not watched at all.
pub const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// A client from `--kubeconfig FILE`, else the usual inference: in-cluster service
/// account, then KUBECONFIG, then ~/.kube/config. Plain `http://` servers work too.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
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
    Client::try_from(config).context("creating the Kubernetes client")
}

/// What the watch tasks queued for the next sync.
#[derive(Default)]
struct Pending {
    changes: Vec<Change>,
    /// Objects of a relist in progress, by kind.
    relisting: BTreeMap<Kind, Vec<Object>>,
    /// Kinds whose first list is complete.
    listed: BTreeSet<Kind>,
}

/// The three watches. Dropping it stops them.
pub struct KubeSource {
    pending: Arc<Mutex<Pending>>,
    listed: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts the watches; `changed` is notified after every change queued.
    pub fn start(client: Client, node_name: &str, changed: Arc<Notify>) -> Self {
        let selector = watcher::Config::default().labels(PROXY_SELECTOR);
        let feed = Feed {
            pending: Arc::default(),
            changed,
            listed: Arc::new(Notify::new()),
        };
        let tasks = vec![
            feed.watch(
                Api::<Service>::all(client.clone()),
                selector.clone(),
                |mut o| {
                    slim_meta(&mut o.metadata);
                    Object::Service(Arc::new(o))
                },
            ),
            // Straight into the slim type: no copy of what the model never reads.
            feed.watch(Api::<Slice>::all(client.clone()), selector, |o| {
                Object::EndpointSlice(Arc::new(o.slim()))
            }),
            feed.watch(
                Api::<Node>::all(client),
                watcher::Config::default().fields(&format!("metadata.name={node_name}")),
                |o| Object::Node(Arc::new(o)),
            ),
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
struct Feed {
    pending: Arc<Mutex<Pending>>,
    changed: Arc<Notify>,
    listed: Arc<Notify>,
}

impl Feed {
    /// One watch, its events queued as changes.
    fn watch<K>(
        &self,
        api: Api<K>,
        config: watcher::Config,
        wrap: fn(K) -> Object,
    ) -> JoinHandle<()>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Default,
    {
        let what = K::kind(&K::DynamicType::default()).to_string();
        let (pending, changed, listed) = (
            self.pending.clone(),
            self.changed.clone(),
            self.listed.clone(),
        );
        let stream = watcher(api, config)
            .default_backoff()
            .modify(|o| o.managed_fields_mut().clear());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(
                            "watching {what}: {e}; retrying (the datapath is kept as it is)"
                        );
                        continue;
                    }
                };
                let mut p = lock(&pending);
                match event {
                    watcher::Event::Apply(o) => p.changes.push(Change::Apply(wrap(o))),
                    watcher::Event::Delete(o) => {
                        let obj = wrap(o);
                        p.changes.push(Change::Delete(obj.kind(), obj.key()));
                    }
                    watcher::Event::Init => {
                        p.relisting.insert(kind_of(&what), Vec::new());
                        continue;
                    }
                    watcher::Event::InitApply(o) => {
                        let obj = wrap(o);
                        p.relisting.entry(obj.kind()).or_default().push(obj);
                        continue;
                    }
                    watcher::Event::InitDone => {
                        let kind = kind_of(&what);
                        let list = p.relisting.remove(&kind).unwrap_or_default();
                        p.changes.push(Change::Relist(kind, list));
                        if p.listed.insert(kind) {
                            listed.notify_one();
                        }
                    }
                }
                drop(p);
                changed.notify_one();
            }
        })
    }
}

fn kind_of(what: &str) -> Kind {
    match what {
        "Service" => Kind::Service,
        "EndpointSlice" => Kind::EndpointSlice,
        _ => Kind::Node,
    }
}
