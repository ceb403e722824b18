//! `/healthz` and `/livez` on `--healthz-bind-address`, as kube-proxy serves them: 200
//! while the datapath follows the cluster (no change has waited longer than the health
//! timeout for a sync), 503 otherwise, and 503 until the first full sync (a DaemonSet's
//! readiness probe holds a new agent back until it has programmed everything). The body
//! is kube-proxy's: `{"lastUpdated": ..., "currentTime": ..., "nodeEligible": true}`.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::http;

/// When the datapath was last brought up to date, and the oldest change still waiting.
#[derive(Clone, Debug)]
pub struct ProxierHealth {
    timeout: Duration,
    last_updated: Option<SystemTime>,
    oldest_queued: Option<SystemTime>,
}

pub type SharedHealth = Arc<Mutex<ProxierHealth>>;

impl ProxierHealth {
    /// `timeout`: how long a change may wait for its sync before the agent is unhealthy
    /// (kube-proxy: twice its sync period, 60 s by default).
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            last_updated: None,
            oldest_queued: None,
        }
    }

    /// A change arrived at `now` (kube-proxy's QueuedUpdate): the oldest one counts.
    pub fn queued(&mut self, now: SystemTime) {
        self.oldest_queued.get_or_insert(now);
    }

    /// A sync succeeded at `now` (kube-proxy's Updated): nothing waits any more.
    pub fn updated(&mut self, now: SystemTime) {
        self.last_updated = Some(now);
        self.oldest_queued = None;
    }

    /// Healthy at `now`: synced at least once, and no change waiting longer than the
    /// timeout.
    pub fn healthy(&self, now: SystemTime) -> bool {
        let waiting_too_long = self.oldest_queued.is_some_and(|q| {
            now.duration_since(q)
                .is_ok_and(|waited| waited > self.timeout)
        });
        self.last_updated.is_some() && !waiting_too_long
    }

    /// The status line and JSON body of `/healthz` and `/livez` at `now`.
    pub fn response(&self, now: SystemTime) -> (&'static str, String) {
        let rfc3339 = |t: SystemTime| {
            k8s_openapi::jiff::Timestamp::try_from(t)
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        let body = serde_json::json!({
            // kube-proxy reports Go's zero time before the first update.
            "lastUpdated": self.last_updated.map_or("0001-01-01T00:00:00Z".to_string(), rfc3339),
            "currentTime": rfc3339(now),
            "nodeEligible": true,
        });
        let status = if self.healthy(now) {
            "200 OK"
        } else {
            "503 Service Unavailable"
        };
        (status, body.to_string())
    }
}

/// Serves `/healthz` and `/livez` until the task is aborted. A bind failure is logged,
/// not fatal: the datapath matters more.
pub fn serve(addr: SocketAddr, health: SharedHealth) -> tokio::task::JoinHandle<()> {
    http::serve(
        addr,
        move |bound| match bound {
            Ok(()) => tracing::info!("serving health on http://{addr}/healthz and /livez"),
            Err(e) => tracing::warn!("--healthz-bind-address {addr}: {e}; health is not served"),
        },
        move |path| {
            Some(match path {
                "/healthz" | "/livez" => {
                    let (status, body) = health
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .response(SystemTime::now());
                    (status, "application/json", body)
                }
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "not found: try /healthz or /livez\n".to_string(),
                ),
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_until_the_first_sync_then_while_a_change_waits_too_long() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let s = Duration::from_secs;
        let mut h = ProxierHealth::new(s(60));
        assert!(!h.healthy(t0), "not ready before the first sync");
        let (status, body) = h.response(t0);
        assert_eq!(status, "503 Service Unavailable");
        assert!(
            body.contains("\"lastUpdated\":\"0001-01-01T00:00:00Z\""),
            "{body}"
        );
        h.updated(t0);
        assert!(
            h.healthy(t0 + s(3600)),
            "nothing waiting: healthy however old"
        );
        // A change waits: healthy up to the timeout, from the oldest change on.
        h.queued(t0 + s(10));
        h.queued(t0 + s(50));
        assert!(h.healthy(t0 + s(70)));
        assert!(!h.healthy(t0 + s(71)));
        let (status, body) = h.response(t0 + s(71));
        assert_eq!(status, "503 Service Unavailable");
        assert!(
            body.contains("\"currentTime\":\"2023-11-14T22:14:31Z\""),
            "{body}"
        );
        assert!(body.contains("\"nodeEligible\":true"), "{body}");
        // The sync lands: healthy again.
        h.updated(t0 + s(72));
        let (status, body) = h.response(t0 + s(72));
        assert_eq!(status, "200 OK");
        assert!(
            body.contains("\"lastUpdated\":\"2023-11-14T22:14:32Z\""),
            "{body}"
        );
    }
}
