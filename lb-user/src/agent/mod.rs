//! `lb-user run`: load, attach, then keep the maps equal to what the source says until a
//! signal.
//!
//! Changes are batched like kube-proxy's bounded-frequency runner: a change is applied at
//! once if the last sync is older than `min_sync_period`, else at the end of that period,
//! so a burst of events becomes one sync.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};

use crate::{
    datapath::{self, BpfMaps, checks, iface, loader},
    model,
    serve::{
        metrics::{self, Metrics},
        proxier_health::{self, ProxierHealth, SharedHealth},
        service_health::HealthServer,
    },
    source::{
        Source, SourceSpec,
        api::{self, KubeSource},
        manifest,
    },
};

mod options;
mod sync;
#[cfg(test)]
mod tests;

pub use options::{parse_duration, parse_timeout};

use sync::{Agent, Timing, sync_until_stopped};

pub use options::RunOptions;

/// Closes the sockets translated to backends that left, off the sync path: a thread
/// takes the (frontend, backend) pairs each sync ended; a pass may look into every
/// network namespace, and no sync waits for it.
struct SocketCloser {
    tx: std::sync::mpsc::Sender<BTreeSet<datapath::sockets::Left>>,
}

/// The pairs a pass looks for, and the namespaces already looked into for them.
#[derive(Default)]
struct CloserWork {
    left: BTreeSet<datapath::sockets::Left>,
    done: BTreeSet<datapath::sockets::NsId>,
}

impl CloserWork {
    /// New pairs: every namespace is looked into again.
    fn add(&mut self, more: BTreeSet<datapath::sockets::Left>) {
        self.left.extend(more);
        self.done.clear();
    }
}

impl SocketCloser {
    fn start(
        pin_path: PathBuf,
        cgroup: PathBuf,
        budget: Duration,
        metrics: metrics::Shared,
    ) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<BTreeSet<datapath::sockets::Left>>();
        let spawned = std::thread::Builder::new()
            .name("lb-sockets".into())
            .spawn(move || {
                let mut logged = BTreeSet::new();
                let mut work = CloserWork::default();
                // Ends when the agent (the sender) is gone.
                while let Some(()) = Self::wait(&rx, &mut work, budget) {
                    let pass = datapath::sockets::Pass {
                        pin_dir: &pin_path,
                        cgroup: &cgroup,
                        left: &work.left,
                        budget,
                    };
                    let report = pass.run(&mut work.done);
                    Self::log(&report, &mut logged);
                    metrics.sockets_closed(&report);
                    if report.unvisited == 0 {
                        work = CloserWork::default();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("starting the socket closer: {e}; stale sockets stay open");
        }
        Self { tx }
    }

    /// Waits for pairs to look for (none when the agent is gone). A pass that ran out
    /// of time goes on after a pause as long as itself, with any pairs that came
    /// meanwhile; a new one waits for a sync's pairs. Either lets the connections that
    /// follow a change go first, and gathers the rest of a burst into one pass.
    fn wait(
        rx: &std::sync::mpsc::Receiver<BTreeSet<datapath::sockets::Left>>,
        work: &mut CloserWork,
        budget: Duration,
    ) -> Option<()> {
        if work.left.is_empty() {
            work.add(rx.recv().ok()?);
            std::thread::sleep(Duration::from_millis(20));
        } else {
            std::thread::sleep(budget);
        }
        loop {
            match rx.try_recv() {
                Ok(more) => work.add(more),
                Err(std::sync::mpsc::TryRecvError::Empty) => return Some(()),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
            }
        }
    }

    fn log(report: &datapath::sockets::Report, logged: &mut BTreeSet<String>) {
        if report.destroyed > 0 || report.unvisited > 0 {
            tracing::info!(
                destroyed = report.destroyed,
                stale = report.stale,
                namespaces = report.namespaces,
                unvisited = report.unvisited,
                scanned = report.scanned,
                pass_us = report.elapsed.as_micros() as u64,
                read_us = report.read.as_micros() as u64,
                cpu_us = report.cpu.as_micros() as u64,
                "closed the sockets translated to backends that left their service"
            );
        }
        for e in &report.errors {
            // Once each: the same cause comes back every pass.
            if logged.insert(e.clone()) {
                tracing::warn!("closing sockets to backends that left: {e}; said once");
            }
        }
    }

    fn close(&self, left: BTreeSet<datapath::sockets::Left>) {
        if !left.is_empty() {
            let _ = self.tx.send(left);
        }
    }
}

/// The tc programs and the interfaces they are on: the `--interface`s, else those that
/// carry the node's addresses (`--node-ip`, else the Node object's, followed as they
/// change). Owns the loaded object, whose programs it attaches.
struct PacketLevel {
    ebpf: aya::Ebpf,
    pin_path: PathBuf,
    interfaces: Vec<String>,
    /// No `--interface` and no `--node-ip`: the Node object's addresses decide.
    follow_node: bool,
    /// The addresses the interfaces were last chosen for.
    attached_for: Option<Vec<std::net::IpAddr>>,
    /// `--acceleration`.
    acceleration: loader::Acceleration,
    /// Without TCX: the clsact filters this start created, detached if it fails (with
    /// the programs), kept once it has succeeded ([`PacketLevel::keep_filters`]).
    new_filters: loader::NewFilters,
    /// The start has succeeded: new filters are kept at once.
    started: bool,
}

impl PacketLevel {
    /// The start succeeded: the clsact filters it created stay when the agent exits.
    fn keep_filters(&mut self) {
        self.started = true;
        loader::keep_filters(&mut self.ebpf, std::mem::take(&mut self.new_filters));
    }

    /// Attaches the tc programs to the interfaces for `node_addrs`, with their SNAT
    /// addresses, and reserves the SNAT port range.
    fn attach(&mut self, node_addrs: &[std::net::IpAddr]) -> anyhow::Result<()> {
        let addrs = iface::addresses().context("listing the node's addresses")?;
        let ifaces =
            iface::resolve(&self.interfaces, node_addrs, &addrs).map_err(anyhow::Error::msg)?;
        // The addresses first: programs replacing an older agent's in its links use them
        // from their first packet (an upgrade's new interfaces map starts empty).
        datapath::maps::write_ifaces(&mut self.ebpf, &ifaces)?;
        let created = loader::attach_tc(&mut self.ebpf, &self.pin_path, &ifaces)?;
        self.new_filters.extend(created);
        if self.started {
            self.keep_filters();
        }
        let xdp = loader::attach_xdp(&mut self.ebpf, &self.pin_path, &ifaces, self.acceleration)?;
        for (iface, mode) in xdp {
            tracing::info!(%iface, mode = mode.name(), "XDP program attached");
        }
        self.attached_for = Some(node_addrs.to_vec());
        if ifaces.is_empty() {
            tracing::info!(
                "packet level off: no --interface, and no interface carries a node address ({node_addrs:?})"
            );
            return Ok(());
        }
        if let Err(e) = iface::reserve_snat_ports() {
            tracing::warn!(
                "reserving the SNAT ports {}-{} in net.ipv4.ip_local_reserved_ports: {e}; a host socket may take one",
                lb_common::SNAT_PORT_MIN,
                lb_common::SNAT_PORT_MAX
            );
        }
        for i in &ifaces {
            if i.addr4.is_none() && i.addr6.is_none() {
                tracing::warn!(iface = %i.name, "no address: flows to backends on other nodes cannot be SNATed here and are dropped");
            }
            tracing::info!(iface = %i.name, ifindex = i.ifindex, snat4 = ?i.addr4, snat6 = ?i.addr6, "tc programs attached");
        }
        Ok(())
    }

    /// Follows the Node object's addresses (when no flag fixed the interfaces): the
    /// interfaces are chosen again when they change. An error is logged, not fatal.
    fn follow(&mut self, node_addrs: &[std::net::IpAddr]) {
        let real: Vec<std::net::IpAddr> = node_addrs
            .iter()
            .copied()
            .filter(|a| !a.is_loopback())
            .collect();
        if !self.follow_node || real.is_empty() || self.attached_for.as_deref() == Some(&real) {
            return;
        }
        tracing::info!(addresses = ?real, "the Node object's addresses choose the packet level's interfaces");
        if let Err(e) = self.attach(&real) {
            tracing::warn!("attaching the tc programs for the Node's addresses: {e:#}");
        }
    }
}

/// How many malloc heaps the process may have, set before any thread starts (glibc reads
/// the limit once, when a thread other than the first allocates for the first time, and
/// otherwise makes up to eight per core, one per thread that allocates).
///
/// * On the Kubernetes API, one: the first sync's large transient allocations, made on
///   several threads, would otherwise stay spread over several heaps (a higher peak).
/// * On manifests, eight: the reader's thread parses while the sync's models the parts
///   already read, and on one heap they took turns on its lock (the model took twice as
///   long). Eight is a heap for each of the agent's threads (the sync's, the runtime's
///   two, the reader's, inotify's, the socket closer's, the map writers'), so none
///   shares one by the order in which they first allocate.
pub fn malloc_heaps(opts: &RunOptions) {
    let heaps = if opts.manifests.is_some() { 8 } else { 1 };
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, heaps);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = heaps;
}

/// SIGTERM and SIGINT, the two ways the agent is asked to stop.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        })
    }

    /// Waits for either signal; returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Everything `run` started; dropped in order at the end.
struct Running {
    /// With the loaded object: dropping it closes the programs (the pinned links keep
    /// them attached).
    agent: Agent,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Keeps the kernel's BPF statistics on (`--bpf-stats`) while it is open.
    _bpf_stats: Option<std::os::fd::OwnedFd>,
    /// Released last, when the agent is gone.
    _pin_lock: loader::PinLock,
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let client = check_source(&opts.source(), &api_timeouts(&opts)).await?;
    let changed = Arc::new(Notify::new());
    // The manifests' first read (a thread of its own) goes on while the programs load.
    let manifests = match opts.source() {
        SourceSpec::Manifests(path) => Some(Source::manifests(
            path,
            opts.poll_interval(),
            changed.clone(),
        )),
        SourceSpec::Kube { .. } => None,
    };
    let mut running = attach(&opts)?;
    let mut signals = StopSignals::install()?;
    let source = match manifests {
        Some(m) => Some(m),
        None => start_source(&opts, client, changed.clone(), &mut signals).await?,
    };
    if let Some(source) = source {
        let timing = Timing {
            min_sync_period: opts.min_sync_period,
            sync_period: opts.sync_period,
        };
        sync_until_stopped(
            &mut running.agent,
            &source,
            &changed,
            signals.recv(),
            &timing,
        )
        .await;
    }
    shutdown(running, &opts);
    Ok(())
}

fn api_timeouts(opts: &RunOptions) -> api::ApiTimeouts {
    api::ApiTimeouts::with_request(opts.api_timeout)
}

/// Fails early on an unusable manifest path; makes the API client.
async fn check_source(
    spec: &SourceSpec,
    timeouts: &api::ApiTimeouts,
) -> anyhow::Result<Option<kube::Client>> {
    match spec {
        SourceSpec::Manifests(path) => {
            manifest::manifest_files(path)?;
            Ok(None)
        }
        SourceSpec::Kube { kubeconfig } => {
            Ok(Some(api::client(kubeconfig.as_deref(), timeouts).await?))
        }
    }
}

/// The checks before anything is loaded: what refuses the start (capabilities, kernel
/// features), and what only warns (a --cgroup below the root, a socket closer without
/// what it needs).
fn preflight(cgroup: &std::path::Path, assume_missing: &[&'static str]) -> anyhow::Result<()> {
    checks::check_capabilities(checks::effective_capabilities())
        .map_err(|e| anyhow::anyhow!("starting the agent: {e}"))?;
    checks::assume_missing(assume_missing);
    checks::check_kernel(&checks::needed(), checks::probe)
        .map_err(|e| anyhow::anyhow!("starting the agent: {e}"))?;
    let root = loader::mount_point("cgroup2");
    if root.as_deref() != Some(cgroup) {
        tracing::warn!(
            cgroup = %cgroup.display(),
            "--cgroup is not the root of the cgroup v2 hierarchy ({}): processes outside it get no \
             translation, so neither ClusterIPs nor the node's own address:nodePort work for them \
             (the packet level sees only the external interfaces); kube-proxy serves every local process",
            root.map_or("none mounted".into(), |r| r.display().to_string())
        );
    }
    let closer_lacks = checks::socket_closer_missing(checks::effective_capabilities());
    if !closer_lacks.is_empty() {
        tracing::warn!(
            "this process lacks {}: sockets translated to a backend that leaves its Service stay open \
             (the DaemonSet in manifests/deploy grants them, with hostPID)",
            closer_lacks.join(" and ")
        );
    }
    Ok(())
}

/// Starts the metrics server and the proxier health server (each if its address is
/// set), their tasks added to `tasks`.
fn serve_metrics_and_health(
    opts: &RunOptions,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> (metrics::Shared, SharedHealth) {
    let metrics: metrics::Shared = Arc::new(Metrics::new(Some(opts.pin_path.clone())));
    if let Some(addr) = opts.metrics_bind_address.0 {
        tasks.push(metrics::serve(addr, metrics.clone()));
    }
    let proxier_health: SharedHealth = Arc::new(Mutex::new(ProxierHealth::new(
        opts.healthz_timeout,
        SystemTime::now(),
    )));
    if let Some(addr) = opts.healthz_bind_address.0 {
        tasks.push(proxier_health::serve(addr, proxier_health.clone()));
    }
    (metrics, proxier_health)
}

/// Loads and attaches the programs, opens their maps, starts the log reader and the
/// metrics server.
fn attach(opts: &RunOptions) -> anyhow::Result<Running> {
    // Read once: without --cgroup it is looked up in /proc/mounts.
    let cgroup = opts.cgroup();
    preflight(&cgroup, &opts.assume_missing_kernel_features)?;
    let object = loader::EbpfObject::for_kernel(checks::has(checks::SET_RETVAL));
    let (mut ebpf, mut pin_lock) = loader::load_and_attach(
        &opts.pin_path,
        &cgroup,
        opts.bpf_log_level(),
        &opts.map_sizes,
        object,
    )?;
    tracing::info!(
        cgroup = %cgroup.display(),
        pin_path = %opts.pin_path.display(),
        node = %opts.node_name(),
        programs = ?loader::CGROUP_PROGRAMS,
        object = object.name(),
        "programs attached"
    );
    let follow_node = opts.interfaces.is_empty() && opts.node_ips.is_empty();
    let mut tasks = Vec::new();
    if opts.bpf_log_level() > 0 {
        tasks.push(spawn_bpf_logger(&mut ebpf)?);
    }
    let (metrics, proxier_health) = serve_metrics_and_health(opts, &mut tasks);
    let mut maps = BpfMaps::from_ebpf(&mut ebpf)?;
    maps.set_maglev(opts.maglev());
    let mut packet = PacketLevel {
        ebpf,
        pin_path: opts.pin_path.clone(),
        interfaces: opts.interfaces.clone(),
        follow_node,
        attached_for: None,
        acceleration: opts.acceleration,
        new_filters: Vec::new(),
        started: false,
    };
    if follow_node {
        // The tc links an earlier agent pinned stay as they are until the Node's
        // addresses are known (the first sync).
        tracing::info!(
            "no --interface and no --node-ip: the Node object's addresses will choose the packet level's interfaces"
        );
    } else {
        packet.attach(&opts.node_ips)?;
    }
    let closer = SocketCloser::start(
        opts.pin_path.clone(),
        cgroup,
        opts.socket_closer_budget,
        metrics.clone(),
    );
    let mut agent = Agent {
        model: model::Model::new(Some(opts.node_name()), opts.node_ips.clone()),
        capacity: maps.capacity()?,
        maps,
        programmed: None,
        programmed_once: false,
        health_pending: false,
        last_warnings: Vec::new(),
        metrics,
        health: HealthServer::new(proxier_health.clone()),
        closer: Some(closer),
        parts: None,
        proxier_health,
        packet: Some(packet),
    };
    let bpf_stats = opts.bpf_stats.then(enable_bpf_stats).flatten();
    // From here a failure no longer undoes what this start pinned or attached.
    if let Some(p) = agent.packet.as_mut() {
        p.keep_filters();
    }
    pin_lock.started();
    Ok(Running {
        agent,
        tasks,
        _bpf_stats: bpf_stats,
        _pin_lock: pin_lock,
    })
}

/// Starts the source; for the API, waits for the first complete list. `None` when a
/// signal came first.
async fn start_source(
    opts: &RunOptions,
    client: Option<kube::Client>,
    changed: Arc<Notify>,
    signals: &mut StopSignals,
) -> anyhow::Result<Option<Source>> {
    match (&opts.source(), client) {
        (SourceSpec::Manifests(path), _) => Ok(Some(Source::manifests(
            path.clone(),
            opts.poll_interval(),
            changed,
        ))),
        (SourceSpec::Kube { .. }, Some(client)) => {
            let k = KubeSource::start(client, &opts.node_name(), changed, api_timeouts(opts));
            tracing::info!("waiting for the first list of Services, EndpointSlices and the Node");
            tokio::select! {
                r = k.wait_ready() => { r?; Ok(Some(Source::Kube(k))) }
                name = signals.recv() => { tracing::info!("{name} before the first list"); Ok(None) }
            }
        }
        (SourceSpec::Kube { .. }, None) => unreachable!("check_source makes the client"),
    }
}

/// Turns the kernel's BPF statistics on for as long as the returned descriptor is open;
/// a failure is logged, not fatal.
fn enable_bpf_stats() -> Option<std::os::fd::OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => {
            tracing::info!(
                "--bpf-stats: the kernel's BPF statistics are on (lb_program_run_seconds, lb_program_runs)"
            );
            Some(fd)
        }
        Err(e) => {
            tracing::warn!(
                "--bpf-stats: turning the kernel's BPF statistics on: {e} (needs CAP_SYS_ADMIN); lb_program_run_seconds stays 0"
            );
            None
        }
    }
}

fn shutdown(running: Running, opts: &RunOptions) {
    let Running {
        agent,
        tasks,
        _bpf_stats,
        _pin_lock: pin_lock,
    } = running;
    for task in tasks {
        task.abort();
    }
    // The pinned links keep the programs attached, and the pinned maps their state.
    drop(agent);
    drop(pin_lock);
    if opts.cleanup_on_exit {
        // Our pins only: a sweep of the cgroup by program name could take another
        // agent's links (`lb-user cleanup --cgroup` does that, when asked).
        match loader::cleanup(&opts.pin_path, None) {
            Ok(report) => tracing::info!("--cleanup-on-exit: {report}"),
            Err(e) => tracing::warn!("--cleanup-on-exit: {e:#}"),
        }
        tracing::info!("stopped");
    } else {
        tracing::info!(
            "stopped; the programs stay attached and keep serving (`lb-user cleanup` removes them)"
        );
    }
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
