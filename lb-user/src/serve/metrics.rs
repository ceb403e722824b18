//! Counters the user can read, served in the OpenMetrics text format (prometheus-client)
//! on `--metrics-bind-address` (`/metrics`), with kube-proxy's metric names and histogram
//! buckets where one exists.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::text::encode,
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

/// The EndpointSlice annotation kube-proxy measures network programming latency from.

#[derive(Clone, Debug)]
pub struct Metrics {
    /// kube-proxy's SyncProxyRulesLatency buckets: 1 ms doubling 15 times.
    sync_duration: Histogram,
    /// kube-proxy's NetworkProgrammingLatency buckets: 0.25 s to 5 min.
    programming: Histogram,
    pub sync_errors_total: u64,
    /// Map writes the periodic reconcile made to undo changes behind the agent's back.
    pub drift_repairs_total: u64,
    pub last_sync_seconds: f64,
    pub last_sync_timestamp: f64,
    pub last_queued_timestamp: f64,
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Entries per map name.
    pub map_entries: BTreeMap<&'static str, usize>,
    /// Frontends a full map kept out, counted per sync and map.
    pub map_full_total: BTreeMap<&'static str, u64>,
    /// Desired frontends not programmed (or not updated) now, for want of room.
    pub frontends_skipped: usize,
    /// Claims on a frontend or health-check port that another Service's claim beat.
    pub frontend_conflicts: usize,
    /// Sockets closed because their backend left the service, and failures doing so.
    pub sockets_destroyed_total: u64,
    pub socket_destroy_errors_total: u64,
    pub map_writes_total: u64,
    pub network_programming_count: u64,
    pub network_programming_seconds_sum: f64,
    pub network_programming_last_seconds: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        let programming = linear_buckets(0.25, 0.25, 2)
            .chain(linear_buckets(1.0, 1.0, 59))
            .chain(linear_buckets(60.0, 5.0, 12))
            .chain(linear_buckets(120.0, 30.0, 7));
        Self {
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            programming: Histogram::new(programming),
            sync_errors_total: 0,
            drift_repairs_total: 0,
            last_sync_seconds: 0.0,
            last_sync_timestamp: 0.0,
            last_queued_timestamp: 0.0,
            services: 0,
            frontends: 0,
            backends: 0,
            map_entries: BTreeMap::new(),
            map_full_total: BTreeMap::new(),
            frontends_skipped: 0,
            frontend_conflicts: 0,
            sockets_destroyed_total: 0,
            socket_destroy_errors_total: 0,
            map_writes_total: 0,
            network_programming_count: 0,
            network_programming_seconds_sum: 0.0,
            network_programming_last_seconds: 0.0,
        }
    }
}

pub type Shared = Arc<Mutex<Metrics>>;

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Metrics {
    /// Records network programming latency, to `written_at`, for every EndpointSlice
    /// whose trigger-time annotation changed (`triggers`: namespace/name and the new
    /// value, as [`crate::model::Update`] lists them; the model leaves out the first
    /// sync's, which describe changes from before the agent started).
    pub fn observe_programming(&mut self, triggers: &[(String, String)], written_at: SystemTime) {
        for (key, trigger) in triggers {
            match trigger.parse::<k8s_openapi::jiff::Timestamp>() {
                Ok(t) => {
                    let latency = written_at
                        .duration_since(SystemTime::from(t))
                        .unwrap_or(Duration::ZERO)
                        .as_secs_f64();
                    self.programming.observe(latency);
                    self.network_programming_count += 1;
                    self.network_programming_seconds_sum += latency;
                    self.network_programming_last_seconds = latency;
                }
                Err(e) => tracing::warn!(
                    "EndpointSlice {key}: field metadata.annotations[{TRIGGER_TIME_ANNOTATION}]: {trigger:?}: {e}"
                ),
            }
        }
    }

    /// Records a successful sync of `services` services, now `programmed` with `writes`
    /// map writes.
    pub fn record_sync(
        &mut self,
        services: usize,
        programmed: &Programmed,
        writes: usize,
        took: Duration,
    ) {
        self.sync_duration.observe(took.as_secs_f64());
        self.last_sync_seconds = took.as_secs_f64();
        self.last_sync_timestamp = unix_now();
        self.services = services;
        self.frontends = programmed.frontend_count();
        self.backends = programmed.backend_count();
        self.map_entries = programmed.map_entries();
        self.frontends_skipped = programmed.skipped();
        self.map_writes_total += writes as u64;
    }

    /// The OpenMetrics text of every metric: the agent's own, then the programs'
    /// counters and the tc drops read from the pinned maps under `pin_path` (left out
    /// when they cannot be read).
    pub fn render(&self, pin_path: Option<&std::path::Path>) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        if let Some(dir) = pin_path {
            register_datapath(&mut registry, dir);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }

    fn register(&self, r: &mut Registry) {
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
        let seconds: [(&str, &str, f64); 4] = [
            (
                "lb_sync_last_duration_seconds",
                "Duration of the last sync",
                self.last_sync_seconds,
            ),
            (
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "When the last successful sync finished (unix time)",
                self.last_sync_timestamp,
            ),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "When the last change was queued (unix time)",
                self.last_queued_timestamp,
            ),
            (
                "lb_network_programming_last_seconds",
                "Network programming latency of the last observed change",
                self.network_programming_last_seconds,
            ),
        ];
        for (name, help, value) in seconds {
            let g = Gauge::<f64, AtomicU64>::default();
            g.set(value);
            r.register(name, help, g);
        }
        let counts: [(&str, &str, usize); 4] = [
            (
                "lb_programmed_services",
                "Services with at least one programmed frontend",
                self.services,
            ),
            (
                "lb_programmed_frontends",
                "Programmed frontends (address, port, protocol)",
                self.frontends,
            ),
            (
                "lb_programmed_endpoints",
                "Distinct programmed backends (endpoint, protocol)",
                self.backends,
            ),
            (
                "lb_frontend_conflicts",
                "Claims on a frontend or healthCheckNodePort that another Service holds (each warned in the log)",
                self.frontend_conflicts,
            ),
        ];
        for (name, help, value) in counts {
            let g = Gauge::<i64>::default();
            g.set(value as i64);
            r.register(name, help, g);
        }
        for (name, help, value) in [
            (
                "lb_sync_errors",
                "Syncs whose map writes failed",
                self.sync_errors_total,
            ),
            (
                "lb_map_writes",
                "Map updates and deletes written",
                self.map_writes_total,
            ),
            (
                "lb_drift_repairs",
                "Map writes the periodic reconcile (--sync-period) made to undo changes behind the agent's back",
                self.drift_repairs_total,
            ),
            (
                "lb_sockets_destroyed",
                "Sockets closed (SOCK_DESTROY) because the backend they were translated to left its service",
                self.sockets_destroyed_total,
            ),
            (
                "lb_socket_destroy_errors",
                "Failures closing such sockets (a namespace, the netlink socket, the map)",
                self.socket_destroy_errors_total,
            ),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(value);
            r.register(name, help, c);
        }
        let entries = Family::<Vec<(String, String)>, Gauge>::default();
        for (map, n) in &self.map_entries {
            entries
                .get_or_create(&vec![("map".into(), map.to_string())])
                .set(*n as i64);
        }
        r.register("lb_map_entries", "Entries in each BPF map", entries);
        let full = Family::<Vec<(String, String)>, Counter>::default();
        for (map, n) in &self.map_full_total {
            full.get_or_create(&vec![("map".into(), map.to_string())])
                .inc_by(*n);
        }
        r.register(
            "lb_map_full",
            "Frontends a full map kept out, counted when each is first kept out (see the --max-* flags)",
            full,
        );
        let skipped = Gauge::<i64>::default();
        skipped.set(self.frontends_skipped as i64);
        r.register(
            "lb_frontends_skipped",
            "Desired frontends not programmed now because a map is full",
            skipped,
        );
    }
}

/// The programs' counters and the tc drops, read from the pinned per-CPU maps now.
fn register_datapath(r: &mut Registry, pin_path: &std::path::Path) {
    if let Ok(counters) = crate::datapath::read_counters(pin_path) {
        let events = Family::<Vec<(String, String)>, Counter>::default();
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
        r.register(
            "lb_program_events",
            "What the eBPF programs did, per program and event",
            events,
        );
    }
    if let Ok(drops) = crate::datapath::read_drops(pin_path) {
        register_tally(
            r,
            ("lb_tc_drops", "Packets the tc programs dropped, by reason"),
            "reason",
            drops,
        );
    }
    if let Ok(events) = crate::datapath::read_ct_events(pin_path) {
        register_tally(
            r,
            (
                "lb_ct_events",
                "What the tc programs' connection tracking did besides drops, by event",
            ),
            "event",
            events,
        );
    }
}

/// Registers counts by name as one counter family (`name`, `help`) with the name under
/// `label`.
fn register_tally(
    r: &mut Registry,
    (name, help): (&str, &str),
    label: &str,
    tally: Vec<(&'static str, u64)>,
) {
    let family = Family::<Vec<(String, String)>, Counter>::default();
    for (key, n) in tally {
        family
            .get_or_create(&vec![(label.to_string(), key.to_string())])
            .inc_by(n);
    }
    r.register(name, help, family);
}

/// Serves `/metrics` until the task is aborted. A bind failure is logged, not fatal: the
/// datapath matters more than the metrics.
pub fn serve(
    addr: SocketAddr,
    metrics: Shared,
    pin_path: std::path::PathBuf,
) -> tokio::task::JoinHandle<()> {
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
                    metrics
                        .lock()
                        .map(|m| m.render(Some(&pin_path)))
                        .unwrap_or_default(),
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
        let mut m = Metrics::default();
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(1_767_225_600 + secs);
        m.observe_programming(&[], at(100));
        assert_eq!(m.network_programming_count, 0);
        let triggers = [
            ("n/a".to_string(), "2026-01-01T00:00:10Z".to_string()),
            ("n/b".to_string(), "2026-01-01T00:00:11.5Z".to_string()),
            ("n/c".to_string(), "yesterday".to_string()),
        ];
        m.observe_programming(&triggers, at(12));
        assert_eq!(
            m.network_programming_count, 2,
            "the unreadable one is skipped"
        );
        assert!(
            (m.network_programming_seconds_sum - 2.5).abs() < 1e-6,
            "{m:?}"
        );
        let text = m.render(None);
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_count 2\n"),
            "{text}"
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
}
