//! Counters the user can read, served in Prometheus text format on
//! `--metrics-bind-address` (`/metrics`), with kube-proxy's metric names where one exists.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    datapath::Programmed,
    model::{Desired, Objects},
};

/// The EndpointSlice annotation kube-proxy measures network programming latency from.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub syncs_total: u64,
    pub sync_errors_total: u64,
    pub sync_seconds_sum: f64,
    pub last_sync_seconds: f64,
    pub last_sync_timestamp: f64,
    pub last_queued_timestamp: f64,
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Entries per map name.
    pub map_entries: BTreeMap<&'static str, usize>,
    pub map_writes_total: u64,
    pub network_programming_count: u64,
    pub network_programming_seconds_sum: f64,
    pub network_programming_last_seconds: f64,
    /// Trigger time last seen per EndpointSlice (namespace/name).
    trigger_seen: BTreeMap<String, String>,
    seeded: bool,
}

pub type Shared = Arc<Mutex<Metrics>>;

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Metrics {
    /// Records network programming latency for every EndpointSlice whose trigger-time
    /// annotation changed since the last successful sync, measured to `written_at`. The
    /// first sync only learns the annotations (they describe changes from before the
    /// agent started).
    pub fn observe_programming(&mut self, objects: &Objects, written_at: SystemTime) {
        let mut now_seen = BTreeMap::new();
        for slice in &objects.slices {
            let Some(trigger) = slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            else {
                continue;
            };
            let key = format!(
                "{}/{}",
                slice.metadata.namespace.as_deref().unwrap_or("default"),
                slice.metadata.name.as_deref().unwrap_or_default()
            );
            if self.seeded && self.trigger_seen.get(&key) != Some(trigger) {
                match trigger.parse::<k8s_openapi::jiff::Timestamp>() {
                    Ok(t) => {
                        let at = SystemTime::from(t);
                        let latency = written_at
                            .duration_since(at)
                            .unwrap_or(Duration::ZERO)
                            .as_secs_f64();
                        self.network_programming_count += 1;
                        self.network_programming_seconds_sum += latency;
                        self.network_programming_last_seconds = latency;
                    }
                    Err(e) => tracing::warn!(
                        "EndpointSlice {key}: field metadata.annotations[{TRIGGER_TIME_ANNOTATION}]: {trigger:?}: {e}"
                    ),
                }
            }
            now_seen.insert(key, trigger.clone());
        }
        self.trigger_seen = now_seen;
        self.seeded = true;
    }

    /// Records a successful sync of `desired`, now `programmed` with `writes` map writes.
    pub fn record_sync(
        &mut self,
        desired: &Desired,
        programmed: &Programmed,
        writes: usize,
        took: Duration,
    ) {
        self.syncs_total += 1;
        self.sync_seconds_sum += took.as_secs_f64();
        self.last_sync_seconds = took.as_secs_f64();
        self.last_sync_timestamp = unix_now();
        self.services = desired.service_count();
        self.frontends = programmed.frontend_count();
        self.backends = programmed.backend_count();
        self.map_entries = programmed.map_entries();
        self.map_writes_total += writes as u64;
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for Family {
            name,
            kind,
            help,
            samples,
        } in self.families()
        {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (suffix, value) in samples {
                out.push_str(&format!("{name}{suffix} {value}\n"));
            }
        }
        out
    }

    fn families(&self) -> Vec<Family> {
        let one = |v: &dyn ToString| vec![(String::new(), v.to_string())];
        let summary = |sum: f64, count: u64| {
            vec![
                ("_sum".into(), sum.to_string()),
                ("_count".into(), count.to_string()),
            ]
        };
        let entries = self
            .map_entries
            .iter()
            .map(|(m, n)| (format!("{{map=\"{m}\"}}"), n.to_string()))
            .collect();
        vec![
            Family::new(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "summary",
                "How long syncs (model, diff, map writes) took.",
                summary(self.sync_seconds_sum, self.syncs_total),
            ),
            Family::gauge(
                "lb_sync_last_duration_seconds",
                "Duration of the last sync.",
                one(&self.last_sync_seconds),
            ),
            Family::gauge(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "When the last successful sync finished (unix time).",
                one(&self.last_sync_timestamp),
            ),
            Family::gauge(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "When the last change was queued (unix time).",
                one(&self.last_queued_timestamp),
            ),
            Family::new(
                "kubeproxy_network_programming_duration_seconds",
                "summary",
                "From an EndpointSlice's last-change-trigger-time to the map write.",
                summary(
                    self.network_programming_seconds_sum,
                    self.network_programming_count,
                ),
            ),
            Family::gauge(
                "lb_network_programming_last_seconds",
                "Network programming latency of the last observed change.",
                one(&self.network_programming_last_seconds),
            ),
            Family::counter(
                "lb_sync_errors_total",
                "Syncs whose map writes failed.",
                one(&self.sync_errors_total),
            ),
            Family::counter(
                "lb_map_writes_total",
                "Map updates and deletes written.",
                one(&self.map_writes_total),
            ),
            Family::gauge(
                "lb_programmed_services",
                "Services with at least one programmed frontend.",
                one(&self.services),
            ),
            Family::gauge(
                "lb_programmed_frontends",
                "Programmed frontends (address, port, protocol).",
                one(&self.frontends),
            ),
            Family::gauge(
                "lb_programmed_endpoints",
                "Distinct programmed backends (endpoint, protocol).",
                one(&self.backends),
            ),
            Family::gauge("lb_map_entries", "Entries in each BPF map.", entries),
        ]
    }
}

/// One metric family: its samples are (label set or suffix, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, String)>,
}

impl Family {
    fn new(
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        samples: Vec<(String, String)>,
    ) -> Self {
        Self {
            name,
            kind,
            help,
            samples,
        }
    }

    fn gauge(name: &'static str, help: &'static str, samples: Vec<(String, String)>) -> Self {
        Self::new(name, "gauge", help, samples)
    }

    fn counter(name: &'static str, help: &'static str, samples: Vec<(String, String)>) -> Self {
        Self::new(name, "counter", help, samples)
    }
}

/// Serves `/metrics` until the task is aborted. A bind failure is logged, not fatal: the
/// datapath matters more than the metrics.
pub fn serve(
    addr: SocketAddr,
    metrics: Shared,
    pin_path: std::path::PathBuf,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("--metrics-bind-address {addr}: {e}; metrics are not served");
                return;
            }
        };
        tracing::info!("serving metrics on http://{addr}/metrics");
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            let pin_path = pin_path.clone();
            tokio::spawn(async move {
                let Some(path) = super::http::request_path(&mut conn).await else {
                    return;
                };
                let (status, body) = match path.as_str() {
                    "/metrics" => {
                        let mut body = metrics.lock().map(|m| m.render()).unwrap_or_default();
                        body.push_str(&render_counters(&pin_path));
                        body.push_str(&render_drops(&pin_path));
                        ("200 OK", body)
                    }
                    _ => ("404 Not Found", "not found: try /metrics\n".to_string()),
                };
                super::http::respond(&mut conn, status, "text/plain; version=0.0.4", &body).await;
            });
        }
    })
}

/// The tc programs' drops by reason, read from the pinned per-CPU map at scrape time.
fn render_drops(pin_path: &std::path::Path) -> String {
    let Ok(drops) = crate::datapath::read_drops(pin_path) else {
        return String::new();
    };
    let mut out = String::from(
        "# HELP lb_tc_drops_total Packets the tc programs dropped, by reason.\n\
         # TYPE lb_tc_drops_total counter\n",
    );
    for (reason, n) in drops {
        out.push_str(&format!("lb_tc_drops_total{{reason=\"{reason}\"}} {n}\n"));
    }
    out
}

/// The programs' counters, read from the pinned per-CPU map at scrape time.
fn render_counters(pin_path: &std::path::Path) -> String {
    let Ok(counters) = crate::datapath::read_counters(pin_path) else {
        return String::new();
    };
    let mut out = String::from(
        "# HELP lb_program_events_total What the eBPF programs did, per program and event.\n\
         # TYPE lb_program_events_total counter\n",
    );
    for (prog, c) in counters {
        for (event, n) in [
            ("translated", c.translated),
            ("refused", c.refused),
            ("affinity_hit", c.affinity_hits),
            ("miss", c.misses),
        ] {
            out.push_str(&format!(
                "lb_program_events_total{{program=\"{prog}\",event=\"{event}\"}} {n}\n"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    fn slice(name: &str, trigger: &str) -> EndpointSlice {
        let mut s = EndpointSlice::default();
        s.metadata.name = Some(name.into());
        s.metadata.annotations =
            Some([(TRIGGER_TIME_ANNOTATION.to_string(), trigger.to_string())].into());
        s
    }

    #[test]
    fn programming_latency_counts_changed_triggers_after_the_first_sync() {
        let mut m = Metrics::default();
        let t0 = "2026-01-01T00:00:00Z";
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(1_767_225_600 + secs);
        let mut objects = Objects {
            slices: vec![slice("a", t0)],
            ..Objects::default()
        };
        m.observe_programming(&objects, at(100));
        assert_eq!(
            m.network_programming_count, 0,
            "startup state is not a change"
        );
        m.observe_programming(&objects, at(101));
        assert_eq!(m.network_programming_count, 0, "unchanged trigger time");
        objects.slices = vec![
            slice("a", "2026-01-01T00:00:10Z"),
            slice("b", "2026-01-01T00:00:11.5Z"),
        ];
        m.observe_programming(&objects, at(12));
        assert_eq!(m.network_programming_count, 2);
        assert!(
            (m.network_programming_seconds_sum - 2.5).abs() < 1e-6,
            "{m:?}"
        );
        let text = m.render();
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_count 2\n"),
            "{text}"
        );
    }
}
