//! Counters the user can read, served in the OpenMetrics text format (prometheus-client)
//! on `--metrics-bind-address` (`/metrics`), with kube-proxy's metric names and histogram
//! buckets where one exists.
//!
//! Every metric is registered once, at start, and the agent updates it through its
//! handle (atomics: no lock, so a scrape never waits for a sync nor a sync for a
//! scrape). The programs' per-CPU counters are read from the pinned maps by a
//! collector at scrape time.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets, linear_buckets},
    },
    registry::Registry,
};
use std::sync::atomic::AtomicU64;

use crate::{datapath::Programmed, model::TRIGGER_TIME_ANNOTATION};

type Labels = Vec<(String, String)>;
type Seconds = Gauge<f64, AtomicU64>;

/// The agent's metrics: the registry they are in, and a handle to each.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// kube-proxy's SyncProxyRulesLatency buckets: 1 ms doubling 15 times.
    sync_duration: Histogram,
    /// kube-proxy's NetworkProgrammingLatency buckets: 0.25 s to 5 min.
    programming: Histogram,
    programming_last: Seconds,
    last_sync_seconds: Seconds,
    last_sync_timestamp: Seconds,
    last_queued_timestamp: Seconds,
    services: Gauge,
    frontends: Gauge,
    backends: Gauge,
    /// Desired frontends not programmed (or not updated) now, for want of room.
    frontends_skipped: Gauge,
    /// Claims on a frontend or health-check port that another Service's claim beat.
    frontend_conflicts: Gauge,
    /// Entries per map name.
    map_entries: Family<Labels, Gauge>,
    /// Frontends a full map kept out, counted per sync and map.
    map_full: Family<Labels, Counter>,
    sync_errors: Counter,
    /// Map writes the periodic reconcile made to undo changes behind the agent's back.
    drift_repairs: Counter,
    map_writes: Counter,
    /// Sockets closed because their backend left the service, and failures doing so.
    sockets_destroyed: Counter,
    socket_destroy_errors: Counter,
    /// Network namespaces the socket closer entered, failed to enter, or could not see
    /// (processes skipped).
    socket_namespaces: Family<Labels, Counter>,
    /// Passes of the socket closer, by whether they looked into every namespace.
    socket_passes: Family<Labels, Counter>,
    /// Sockets the closer looked at, and the time its passes took (wall and CPU).
    sockets_scanned: Counter,
    socket_pass_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    socket_pass_cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

pub type Shared = Arc<Metrics>;

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Metrics {
    /// Every metric, registered; with `pin_path`, also the programs' counters, the tc
    /// drops and the connection-tracking events read from the maps pinned there at
    /// each scrape.
    pub fn new(pin_path: Option<PathBuf>) -> Self {
        let programming = linear_buckets(0.25, 0.25, 2)
            .chain(linear_buckets(1.0, 1.0, 59))
            .chain(linear_buckets(60.0, 5.0, 12))
            .chain(linear_buckets(120.0, 30.0, 7));
        let mut m = Self {
            registry: Registry::default(),
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            programming: Histogram::new(programming),
            programming_last: Seconds::default(),
            last_sync_seconds: Seconds::default(),
            last_sync_timestamp: Seconds::default(),
            last_queued_timestamp: Seconds::default(),
            services: Gauge::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            frontends_skipped: Gauge::default(),
            frontend_conflicts: Gauge::default(),
            map_entries: Family::default(),
            map_full: Family::default(),
            sync_errors: Counter::default(),
            drift_repairs: Counter::default(),
            map_writes: Counter::default(),
            sockets_destroyed: Counter::default(),
            socket_destroy_errors: Counter::default(),
            socket_namespaces: Family::default(),
            socket_passes: Family::default(),
            sockets_scanned: Counter::default(),
            socket_pass_seconds: Counter::default(),
            socket_pass_cpu_seconds: Counter::default(),
        };
        m.register();
        if let Some(pin_path) = pin_path {
            m.registry
                .register_collector(Box::new(DatapathCollector { pin_path }));
        }
        m
    }

    /// Records network programming latency, to `written_at`, for every EndpointSlice
    /// whose trigger-time annotation changed (`triggers`: namespace/name and the new
    /// value, as [`crate::model::Update`] lists them; the model leaves out the first
    /// sync's, which describe changes from before the agent started).
    pub fn observe_programming(&self, triggers: &[(String, String)], written_at: SystemTime) {
        for (key, trigger) in triggers {
            match trigger.parse::<k8s_openapi::jiff::Timestamp>() {
                Ok(t) => {
                    let latency = written_at
                        .duration_since(SystemTime::from(t))
                        .unwrap_or(Duration::ZERO)
                        .as_secs_f64();
                    self.programming.observe(latency);
                    self.programming_last.set(latency);
                }
                Err(e) => tracing::warn!(
                    "EndpointSlice {key}: field metadata.annotations[{TRIGGER_TIME_ANNOTATION}]: {trigger:?}: {e}"
                ),
            }
        }
    }

    /// Records a successful sync of `services` services, now `programmed` with `writes`
    /// map writes; `full`: the maps that kept a frontend out.
    pub fn record_sync(
        &self,
        services: usize,
        programmed: &Programmed,
        (writes, full): (usize, &[&'static str]),
        took: Duration,
    ) {
        self.sync_duration.observe(took.as_secs_f64());
        self.last_sync_seconds.set(took.as_secs_f64());
        self.last_sync_timestamp.set(unix_now());
        self.services.set(services as i64);
        self.frontends.set(programmed.frontend_count() as i64);
        self.backends.set(programmed.backend_count() as i64);
        for (map, n) in programmed.map_entries() {
            self.map_entries
                .get_or_create(&vec![("map".into(), map.to_string())])
                .set(n as i64);
        }
        self.frontends_skipped.set(programmed.skipped() as i64);
        self.map_writes.inc_by(writes as u64);
        for map in full {
            self.map_full
                .get_or_create(&vec![("map".into(), map.to_string())])
                .inc();
        }
    }

    /// A change was queued now.
    pub fn queued(&self) {
        self.last_queued_timestamp.set(unix_now());
    }

    /// A sync's (or a reconcile's) map writes failed.
    pub fn sync_failed(&self) {
        self.sync_errors.inc();
    }

    /// The periodic reconcile wrote `writes` entries back.
    pub fn drift_repaired(&self, writes: usize) {
        self.drift_repairs.inc_by(writes as u64);
    }

    pub fn set_conflicts(&self, n: usize) {
        self.frontend_conflicts.set(n as i64);
    }

    /// What a pass of the socket closer did.
    pub fn sockets_closed(&self, pass: &crate::datapath::sockets::Report) {
        self.sockets_destroyed.inc_by(pass.destroyed as u64);
        self.socket_destroy_errors.inc_by(pass.errors.len() as u64);
        for (result, n) in [
            ("entered", pass.namespaces.saturating_sub(pass.failed)),
            ("failed", pass.failed),
            ("skipped", pass.skipped),
        ] {
            self.socket_namespaces
                .get_or_create(&vec![("result".into(), result.into())])
                .inc_by(n as u64);
        }
        let result = if pass.unvisited > 0 {
            "out_of_time"
        } else {
            "complete"
        };
        self.socket_passes
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
        self.sockets_scanned.inc_by(pass.scanned as u64);
        self.socket_pass_seconds.inc_by(pass.elapsed.as_secs_f64());
        self.socket_pass_cpu_seconds.inc_by(pass.cpu.as_secs_f64());
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "How long syncs (model, diff, map writes) took",
            self.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to the map write",
            self.programming.clone(),
        );
        for (name, help, g) in [
            (
                "lb_sync_last_duration_seconds",
                "Duration of the last sync",
                &self.last_sync_seconds,
            ),
            (
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "When the last successful sync finished (unix time)",
                &self.last_sync_timestamp,
            ),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "When the last change was queued (unix time)",
                &self.last_queued_timestamp,
            ),
            (
                "lb_network_programming_last_seconds",
                "Network programming latency of the last observed change",
                &self.programming_last,
            ),
        ] {
            r.register(name, help, g.clone());
        }
        self.register_counts();
    }

    /// The gauges of what is programmed, and the counters.
    fn register_counts(&mut self) {
        let r = &mut self.registry;
        for (name, help, g) in [
            (
                "lb_programmed_services",
                "Services with at least one programmed frontend",
                &self.services,
            ),
            (
                "lb_programmed_frontends",
                "Programmed frontends (address, port, protocol)",
                &self.frontends,
            ),
            (
                "lb_programmed_endpoints",
                "Distinct programmed backends (endpoint, protocol)",
                &self.backends,
            ),
            (
                "lb_frontend_conflicts",
                "Claims on a frontend or healthCheckNodePort that another Service holds (each warned in the log)",
                &self.frontend_conflicts,
            ),
            (
                "lb_frontends_skipped",
                "Desired frontends not programmed now because a map is full",
                &self.frontends_skipped,
            ),
        ] {
            r.register(name, help, g.clone());
        }
        for (name, help, c) in [
            (
                "lb_sync_errors",
                "Syncs whose map writes failed",
                &self.sync_errors,
            ),
            (
                "lb_map_writes",
                "Map updates and deletes written",
                &self.map_writes,
            ),
            (
                "lb_drift_repairs",
                "Map writes the periodic reconcile (--sync-period) made to undo changes behind the agent's back",
                &self.drift_repairs,
            ),
            (
                "lb_sockets_destroyed",
                "Sockets closed (SOCK_DESTROY) because the backend they were translated to left its service",
                &self.sockets_destroyed,
            ),
            (
                "lb_socket_destroy_errors",
                "Failures closing such sockets (a namespace, the netlink socket, the map)",
                &self.socket_destroy_errors,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        r.register(
            "lb_map_entries",
            "Entries in each BPF map",
            self.map_entries.clone(),
        );
        r.register(
            "lb_socket_closer_namespaces",
            "Network namespaces the stale-socket closer entered, failed to enter (setns: CAP_SYS_ADMIN), or processes it could not see (hostPID, CAP_SYS_PTRACE), by result",
            self.socket_namespaces.clone(),
        );
        r.register(
            "lb_socket_closer_passes",
            "Passes of the stale-socket closer, by result: complete, or out_of_time (the namespaces left wait for the next pass; --socket-closer-budget)",
            self.socket_passes.clone(),
        );
        r.register(
            "lb_socket_closer_sockets_scanned",
            "Sockets the stale-socket closer looked at in the namespaces it entered",
            self.sockets_scanned.clone(),
        );
        r.register(
            "lb_socket_closer_pass_seconds",
            "Time the stale-socket closer's passes took",
            self.socket_pass_seconds.clone(),
        );
        r.register(
            "lb_socket_closer_cpu_seconds",
            "CPU time (user and system) the stale-socket closer's passes used",
            self.socket_pass_cpu_seconds.clone(),
        );
        r.register(
            "lb_map_full",
            "Frontends a full map kept out, counted when each is first kept out (see the --max-* flags)",
            self.map_full.clone(),
        );
    }
}

/// The programs' counters, the packet level's drops and the connection-tracking events, read from
/// the pinned per-CPU maps at each scrape (left out when they cannot be read).
#[derive(Debug)]
struct DatapathCollector {
    pin_path: PathBuf,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Ok(counters) = crate::datapath::read_counters(&self.pin_path) {
            let events = Family::<Labels, Counter>::default();
            for (prog, c) in counters {
                for (event, n) in [
                    ("translated", c.translated),
                    ("refused", c.refused),
                    ("affinity_hit", c.affinity_hits),
                    ("miss", c.misses),
                    ("no_local", c.no_local),
                ] {
                    events
                        .get_or_create(&vec![
                            ("program".into(), prog.to_string()),
                            ("event".into(), event.to_string()),
                        ])
                        .inc_by(n);
                }
            }
            let help = "What the eBPF programs did, per program and event";
            events.encode(encoder.encode_descriptor(
                "lb_program_events",
                help,
                None,
                events.metric_type(),
            )?)?;
        }
        if let Ok(maps) = crate::datapath::count_socket_entries(&self.pin_path) {
            let family = Family::<Labels, Gauge>::default();
            for (map, n) in maps {
                family
                    .get_or_create(&vec![("map".into(), map.to_string())])
                    .set(n as i64);
            }
            let help = "Entries of the socket level's per-socket maps (socket rev-NAT, sockets): \
                        one per live translated socket and service, deleted when the socket closes";
            family.encode(encoder.encode_descriptor(
                "lb_socket_map_entries",
                help,
                None,
                family.metric_type(),
            )?)?;
        }
        if let Ok(stats) = crate::datapath::loader::program_stats(&self.pin_path) {
            let time = Family::<Labels, Counter<f64, AtomicU64>>::default();
            let runs = Family::<Labels, Counter>::default();
            for (prog, run_time, run_count) in stats {
                let labels = vec![("program".into(), prog.to_string())];
                time.get_or_create(&labels).inc_by(run_time.as_secs_f64());
                runs.get_or_create(&labels).inc_by(run_count);
            }
            let help = "Time the eBPF programs ran, per program, from the kernel's BPF statistics (0 unless they are on: --bpf-stats)";
            time.encode(encoder.encode_descriptor(
                "lb_program_run_seconds",
                help,
                None,
                time.metric_type(),
            )?)?;
            let help = "Runs of the eBPF programs, per program, from the kernel's BPF statistics (0 unless they are on: --bpf-stats); run_seconds / runs is a program's own cost per call";
            runs.encode(encoder.encode_descriptor(
                "lb_program_runs",
                help,
                None,
                runs.metric_type(),
            )?)?;
        }
        if let Ok(drops) = crate::datapath::read_drops(&self.pin_path) {
            let help = "Packets the packet level (tc and XDP) dropped, by reason";
            encode_tally(&mut encoder, ("lb_packet_drops", help), "reason", drops)?;
        }
        if let Ok(events) = crate::datapath::read_ct_events(&self.pin_path) {
            let help = "What the packet level's connection tracking did besides drops, by event";
            encode_tally(&mut encoder, ("lb_ct_events", help), "event", events)?;
        }
        // What the start's probes found (each probed once).
        let features = Family::<Labels, Gauge>::default();
        for (name, has) in crate::datapath::checks::probed() {
            let labels = vec![("name".into(), name.to_string())];
            features.get_or_create(&labels).set(i64::from(has));
        }
        let help = "Whether this kernel has each feature the programs use (1) or lacks it (0), as probed at start; the log says what the agent does without one";
        features.encode(encoder.encode_descriptor(
            "lb_kernel_feature",
            help,
            None,
            features.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Encodes counts by name as one counter family (`name`, `help`) with the name under
/// `label`.
fn encode_tally(
    encoder: &mut DescriptorEncoder,
    (name, help): (&str, &str),
    label: &str,
    tally: Vec<(&'static str, u64)>,
) -> Result<(), std::fmt::Error> {
    let family = Family::<Labels, Counter>::default();
    for (key, n) in tally {
        family
            .get_or_create(&vec![(label.to_string(), key.to_string())])
            .inc_by(n);
    }
    family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)
}

/// Serves `/metrics` until the task is aborted. A bind failure is logged, not fatal: the
/// datapath matters more than the metrics.
pub fn serve(addr: SocketAddr, metrics: Shared) -> tokio::task::JoinHandle<()> {
    super::http::serve(
        addr,
        move |bound| match bound {
            Ok(()) => tracing::info!("serving metrics on http://{addr}/metrics"),
            Err(e) => tracing::warn!("--metrics-bind-address {addr}: {e}; metrics are not served"),
        },
        move |path| {
            Some(match path {
                "/metrics" => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.render(),
                ),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "not found: try /metrics\n".to_string(),
                ),
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programming_latency_is_measured_from_each_changed_trigger() {
        let m = Metrics::new(None);
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(1_767_225_600 + secs);
        m.observe_programming(&[], at(100));
        assert!(
            m.render()
                .contains("kubeproxy_network_programming_duration_seconds_count 0\n")
        );
        let triggers = [
            ("n/a".to_string(), "2026-01-01T00:00:10Z".to_string()),
            ("n/b".to_string(), "2026-01-01T00:00:11.5Z".to_string()),
            ("n/c".to_string(), "yesterday".to_string()),
        ];
        m.observe_programming(&triggers, at(12));
        let text = m.render();
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_count 2\n")
                && text.contains("kubeproxy_network_programming_duration_seconds_sum 2.5\n"),
            "the unreadable one is skipped: {text}"
        );
        // kube-proxy's buckets: 0.5 s and 2 s observed.
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\"} 1\n")
                && text.contains(
                    "kubeproxy_network_programming_duration_seconds_bucket{le=\"2.0\"} 2\n"
                ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "OpenMetrics: {text}");
    }

    #[test]
    fn updates_through_handles_show_in_the_next_scrape() {
        let m = Arc::new(Metrics::new(None));
        let (a, b) = (m.clone(), m.clone());
        // From other threads, with no lock: what the sync and the socket closer do.
        let pass = crate::datapath::sockets::Report {
            destroyed: 3,
            errors: vec!["e".into()],
            namespaces: 2,
            skipped: 5,
            scanned: 40,
            unvisited: 1,
            cpu: Duration::from_millis(250),
            ..Default::default()
        };
        std::thread::spawn(move || a.sockets_closed(&pass))
            .join()
            .unwrap();
        std::thread::spawn(move || b.drift_repaired(2))
            .join()
            .unwrap();
        m.set_conflicts(4);
        m.record_sync(
            7,
            &Programmed::default(),
            (5, &["LB_REVNAT_V2"]),
            Duration::from_millis(3),
        );
        let text = m.render();
        for line in [
            "lb_sockets_destroyed_total 3\n",
            "lb_socket_destroy_errors_total 1\n",
            "lb_socket_closer_namespaces_total{result=\"entered\"} 2\n",
            "lb_socket_closer_namespaces_total{result=\"skipped\"} 5\n",
            "lb_socket_closer_passes_total{result=\"out_of_time\"} 1\n",
            "lb_socket_closer_sockets_scanned_total 40\n",
            "lb_socket_closer_cpu_seconds_total 0.25\n",
            "lb_drift_repairs_total 2\n",
            "lb_frontend_conflicts 4\n",
            "lb_programmed_services 7\n",
            "lb_map_writes_total 5\n",
            "lb_map_full_total{map=\"LB_REVNAT_V2\"} 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1\n",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
    }
}
