//! `lb-user run`: load, attach, then keep the maps equal to what the source says until a
//! signal.
//!
//! Changes are batched like kube-proxy's bounded-frequency runner: a change is applied at
//! once if the last sync is older than `min_sync_period`, else at the end of that period,
//! so a burst of events becomes one sync.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};

use crate::{
    datapath::{BpfMaps, Programmed},
    kube_source::{self, KubeSource},
    loader,
    manifest::{self, Objects},
    metrics::{self, Metrics},
    model,
};

/// Where the objects come from.
pub enum SourceSpec {
    /// A YAML/JSON file or directory, polled for changes.
    Manifests(PathBuf),
    /// The Kubernetes API (`--kubeconfig`, else inferred).
    Kube { kubeconfig: Option<PathBuf> },
}

pub struct RunOptions {
    pub source: SourceSpec,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    /// This node's name (internalTrafficPolicy Local, topology, the Node watch).
    pub node_name: String,
    /// This node's addresses for nodePorts (`--node-ip`); empty: the Node object's.
    pub node_ips: Vec<std::net::IpAddr>,
    /// How often the manifest path is checked for changes.
    pub poll_interval: Duration,
    /// The shortest time between two syncs (kube-proxy's --min-sync-period).
    pub min_sync_period: Duration,
    pub metrics_addr: Option<SocketAddr>,
    /// aya-log level for the programs' own messages (0 = off, 4 = debug).
    pub bpf_log_level: u8,
    /// Leave the pinned maps in place at exit.
    pub keep_pins: bool,
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

/// A started source.
enum Source {
    Manifests {
        path: PathBuf,
        cache: std::sync::Mutex<manifest::Cache>,
        poller: tokio::task::JoinHandle<()>,
    },
    Kube(KubeSource),
}

impl Source {
    /// The objects now, with warnings about what could not be read.
    fn objects(&self) -> Result<(Objects, Vec<String>), manifest::ManifestError> {
        match self {
            Self::Manifests { path, cache, .. } => cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .load(path)
                .map(|l| (l.objects, l.warnings)),
            Self::Kube(k) => Ok((k.objects(), Vec::new())),
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

/// Notifies `changed` whenever the manifests' fingerprint changes (and once at start).
fn poll_manifests(
    path: PathBuf,
    every: Duration,
    changed: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
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

/// One agent: the maps and what is programmed in them.
struct Agent {
    maps: BpfMaps,
    programmed: Option<Programmed>,
    last_warnings: Vec<String>,
    node_name: String,
    node_ips: Vec<std::net::IpAddr>,
    metrics: metrics::Shared,
}

impl Agent {
    /// One sync: source -> model -> diff -> map writes.
    fn sync(&mut self, source: &Source) {
        let started = Instant::now();
        let (objects, read_warnings) = match source.objects() {
            Ok(o) => o,
            Err(e) => {
                // Keep the datapath as it is: an unreadable path is not "no services".
                tracing::error!("{e}; keeping the current datapath");
                return;
            }
        };
        let read = started.elapsed();
        let built = model::build(&objects, Some(&self.node_name), &self.node_ips);
        let modelled = started.elapsed();
        let warnings: Vec<String> = read_warnings.into_iter().chain(built.warnings).collect();
        if warnings != self.last_warnings {
            for w in &warnings {
                tracing::warn!("{w}");
            }
            self.last_warnings = warnings;
        }
        let mut programmed = match self.programmed.take() {
            Some(p) => p,
            None => match self.maps.snapshot() {
                Ok(snap) => Programmed::adopt(&snap),
                Err(e) => {
                    tracing::error!("reading the maps back: {e}; will retry");
                    return;
                }
            },
        };
        let planning = Instant::now();
        let plan = programmed.plan(&built.desired);
        let planned = planning.elapsed();
        for w in &plan.warnings {
            tracing::warn!("{w}");
        }
        let writing = Instant::now();
        let result = self.maps.apply(&plan.ops);
        let written = writing.elapsed();
        let written_at = SystemTime::now();
        let elapsed = started.elapsed();
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                tracing::info!(
                    services = built.desired.service_count(),
                    frontends = programmed.frontend_count(),
                    backends = programmed.backend_count(),
                    map_writes = plan.ops.len(),
                    elapsed_us = elapsed.as_micros() as u64,
                    read_us = read.as_micros() as u64,
                    model_us = (modelled - read).as_micros() as u64,
                    plan_us = planned.as_micros() as u64,
                    write_us = written.as_micros() as u64,
                    "synced"
                );
                m.syncs_total += 1;
                m.sync_seconds_sum += elapsed.as_secs_f64();
                m.last_sync_seconds = elapsed.as_secs_f64();
                m.last_sync_timestamp = metrics::unix_now();
                m.services = built.desired.service_count();
                m.frontends = programmed.frontend_count();
                m.backends = programmed.backend_count();
                m.map_entries = programmed.map_entries();
                m.map_writes_total += plan.ops.len() as u64;
                m.observe_programming(&objects, written_at);
                self.programmed = Some(programmed);
            }
            Err(e) => {
                // What the maps hold is now uncertain: read them back on the next sync.
                tracing::error!("{e}; the maps will be read back and the sync retried");
                m.sync_errors_total += 1;
                self.programmed = None;
            }
        }
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    if let SourceSpec::Manifests(path) = &opts.source {
        manifest::manifest_files(path)?;
    }
    let client = match &opts.source {
        SourceSpec::Kube { kubeconfig } => Some(kube_source::client(kubeconfig.as_deref()).await?),
        SourceSpec::Manifests(_) => None,
    };
    let cgroup = loader::open_cgroup(&opts.cgroup)?;
    let mut ebpf = loader::load_and_attach(&opts.pin_path, &cgroup, opts.bpf_log_level)?;
    tracing::info!(
        cgroup = %opts.cgroup.display(),
        pin_path = %opts.pin_path.display(),
        node = %opts.node_name,
        programs = ?loader::PROGRAMS,
        "programs attached"
    );
    let logger = if opts.bpf_log_level > 0 {
        Some(spawn_bpf_logger(&mut ebpf)?)
    } else {
        None
    };
    let metrics: metrics::Shared = Arc::new(Mutex::new(Metrics::default()));
    let metrics_task = opts
        .metrics_addr
        .map(|a| metrics::serve(a, metrics.clone(), opts.pin_path.clone()));
    let mut agent = Agent {
        maps: BpfMaps::from_ebpf(&mut ebpf)?,
        programmed: None,
        last_warnings: Vec::new(),
        node_name: opts.node_name.clone(),
        node_ips: opts.node_ips.clone(),
        metrics: metrics.clone(),
    };

    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let changed = Arc::new(Notify::new());
    let source = match (&opts.source, client) {
        (SourceSpec::Manifests(path), _) => Source::Manifests {
            path: path.clone(),
            cache: Default::default(),
            poller: poll_manifests(path.clone(), opts.poll_interval, changed.clone()),
        },
        (SourceSpec::Kube { .. }, Some(client)) => {
            let k = KubeSource::start(client, &opts.node_name, changed.clone());
            tracing::info!("waiting for the first list of Services, EndpointSlices and the Node");
            let stopped = tokio::select! {
                r = k.wait_ready() => { r?; false }
                _ = sigterm.recv() => true,
                _ = sigint.recv() => true,
            };
            if stopped {
                shutdown(agent, ebpf, &opts);
                return Ok(());
            }
            Source::Kube(k)
        }
        (SourceSpec::Kube { .. }, None) => unreachable!("the client is made above"),
    };

    let mut last_sync: Option<Instant> = None;
    loop {
        let retry = agent.programmed.is_none() && last_sync.is_some();
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: detaching"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: detaching"); break; }
            _ = changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
        }
        metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_queued_timestamp = metrics::unix_now();
        // Bounded frequency: wait out the rest of the minimum period; changes arriving
        // meanwhile are folded into this sync.
        if let Some(wait) = last_sync.map(|t| opts.min_sync_period.saturating_sub(t.elapsed()))
            && !wait.is_zero()
        {
            tokio::select! {
                _ = sigterm.recv() => { tracing::info!("SIGTERM: detaching"); break; }
                _ = sigint.recv() => { tracing::info!("SIGINT: detaching"); break; }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        agent.sync(&source);
        last_sync = Some(Instant::now());
    }
    drop(source);
    if let Some(task) = logger {
        task.abort();
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    shutdown(agent, ebpf, &opts);
    Ok(())
}

fn shutdown(agent: Agent, ebpf: aya::Ebpf, opts: &RunOptions) {
    drop(agent);
    drop(ebpf); // closes the links: the programs are detached
    if !opts.keep_pins {
        loader::remove_pins(&opts.pin_path);
    }
    tracing::info!("stopped");
}

fn spawn_bpf_logger(ebpf: &mut aya::Ebpf) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let logger = aya_log::EbpfLogger::init(ebpf).context("starting the eBPF log reader")?;
    // SAFETY: the logger owns its ring buffer fd and keeps it open, unchanged, until it
    // is dropped together with the AsyncFd.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("polling the eBPF log ring buffer: {}", e.into_parts().1))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
