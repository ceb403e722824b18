//! The Kubernetes API source: reflectors (kube-rs watcher + store) for Services,
//! EndpointSlices and this agent's own Node.
//!
//! A watch that ends, drops or expires (410 Gone) makes the watcher relist; the reflector
//! store keeps serving the previous objects until the relist is complete and then swaps
//! the whole snapshot, so the datapath is never flushed while the agent catches up.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};

use crate::model::Objects;

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

/// The three reflectors. Dropping it stops the watches.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts the watches; `changed` is notified after every change that reached a store.
    pub fn start(client: Client, node_name: &str, changed: Arc<Notify>) -> Self {
        let selector = watcher::Config::default().labels(PROXY_SELECTOR);
        let (services, t1) = reflect(
            Api::<Service>::all(client.clone()),
            selector.clone(),
            "Services",
            changed.clone(),
        );
        let (slices, t2) = reflect(
            Api::<EndpointSlice>::all(client.clone()),
            selector,
            "EndpointSlices",
            changed.clone(),
        );
        let (nodes, t3) = reflect(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            "Node",
            changed,
        );
        Self {
            services,
            slices,
            nodes,
            tasks: vec![t1, t2, t3],
        }
    }

    /// Waits until every store holds a complete first list.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        Ok(())
    }

    /// A copy of what the stores hold now.
    pub fn objects(&self) -> Objects {
        fn copy<K: Clone + Resource>(store: &Store<K>) -> Vec<K>
        where
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            store.state().iter().map(|o| (**o).clone()).collect()
        }
        Objects {
            services: copy(&self.services),
            slices: copy(&self.slices),
            nodes: copy(&self.nodes),
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    changed: Arc<Notify>,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                // A relist (Init, InitApply...) reaches the store as one swap at InitDone.
                Ok(
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
                ) => {
                    changed.notify_one();
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(e) => {
                    tracing::warn!("watching {what}: {e}; retrying (the datapath is kept as it is)")
                }
            }
        }
    });
    (reader, task)
}
