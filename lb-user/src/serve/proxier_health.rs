//! `/healthz` and `/livez` on `--healthz-bind-address`, as kube-proxy serves them: 200
//! while the datapath follows the cluster (no change has waited longer than the health
//! timeout for a sync), 503 otherwise. The start counts as a change: `/livez` turns 503
//! only when the first sync has not come within the timeout (a liveness probe does not
//! kill an agent still listing a big cluster), and `/healthz` stays 503 until that first
//! full sync (a readiness probe holds a rolling update until the new agent has programmed
//! everything). The body is kube-proxy's:
//! `{"lastUpdated": ..., "currentTime": ..., "nodeEligible": true}`.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::http;

/// When the datapath was last brought up to date, the oldest change still waiting, and
/// since when the source has been out of sync.
#[derive(Clone, Debug)]
pub struct ProxierHealth {
    timeout: Duration,
    last_updated: Option<SystemTime>,
    oldest_queued: Option<SystemTime>,
    /// Since when the source has been unable to follow the cluster (a list not done, a
    /// watch failing): updates wait there, unseen. Only the source clears it.
    source_unsynced: Option<SystemTime>,
}

pub type SharedHealth = Arc<Mutex<ProxierHealth>>;

impl ProxierHealth {
    /// `timeout`: how long a change may wait for its sync before the agent is unhealthy
    /// (kube-proxy: twice its sync period, 60 s by default); the agent `started` then,
    /// which is the first change.
    pub fn new(timeout: Duration, started: SystemTime) -> Self {
        Self {
            timeout,
            last_updated: None,
            oldest_queued: Some(started),
            source_unsynced: None,
        }
    }

    /// Since when the source has been out of sync (`None`: it follows the cluster). An
    /// update not seen yet counts as queued from then on; a sync does not clear it.
    pub fn source_stalled(&mut self, since: Option<SystemTime>) {
        self.source_unsynced = since;
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

    /// Live at `now`: no change (the start included) has waited longer than the timeout,
    /// and the source has not been out of sync for longer either.
    pub fn live(&self, now: SystemTime) -> bool {
        let too_old = |since: Option<SystemTime>| {
            since.is_some_and(|q| {
                now.duration_since(q)
                    .is_ok_and(|waited| waited > self.timeout)
            })
        };
        !too_old(self.oldest_queued) && !too_old(self.source_unsynced)
    }

    /// Healthy (ready) at `now`: live, and synced at least once.
    pub fn healthy(&self, now: SystemTime) -> bool {
        self.last_updated.is_some() && self.live(now)
    }

    /// The status line and JSON body of `/healthz` (`ready`) or `/livez` at `now`.
    pub fn response(&self, now: SystemTime, ready: bool) -> (&'static str, String) {
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
        let ok = if ready {
            self.healthy(now)
        } else {
            self.live(now)
        };
        let status = if ok {
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
        move |path| Some(answer(&health, path)),
    )
}

/// The answer to a request for `path` now: `/healthz` or `/livez`, else 404.
pub fn answer(health: &SharedHealth, path: &str) -> http::Response {
    match path {
        "/healthz" | "/livez" => {
            let (status, body) = health
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .response(SystemTime::now(), path == "/healthz");
            (status, "application/json", body)
        }
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /healthz or /livez\n".to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_until_the_first_sync_then_while_a_change_waits_too_long() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let s = Duration::from_secs;
        let mut h = ProxierHealth::new(s(60), t0);
        assert!(!h.healthy(t0), "not ready before the first sync");
        // But live while the first sync may still come.
        assert_eq!(h.response(t0 + s(60), false).0, "200 OK");
        assert_eq!(h.response(t0 + s(61), false).0, "503 Service Unavailable");
        let (status, body) = h.response(t0, true);
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
        let (status, body) = h.response(t0 + s(71), true);
        assert_eq!(status, "503 Service Unavailable");
        assert!(
            body.contains("\"currentTime\":\"2023-11-14T22:14:31Z\""),
            "{body}"
        );
        assert!(body.contains("\"nodeEligible\":true"), "{body}");
        // The sync lands: healthy again.
        h.updated(t0 + s(72));
        let (status, body) = h.response(t0 + s(72), true);
        assert_eq!(status, "200 OK");
        assert!(
            body.contains("\"lastUpdated\":\"2023-11-14T22:14:32Z\""),
            "{body}"
        );
    }

    #[test]
    fn a_stalled_source_turns_both_503_after_the_timeout_and_a_sync_does_not_clear_it() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let s = Duration::from_secs;
        let mut h = ProxierHealth::new(s(60), t0);
        h.updated(t0);
        h.source_stalled(Some(t0 + s(10)));
        assert!(
            h.healthy(t0 + s(70)),
            "stalled, but not longer than the timeout"
        );
        assert!(!h.healthy(t0 + s(71)));
        assert!(!h.live(t0 + s(71)));
        // Syncs keep coming (nothing new from the source): still unhealthy.
        h.updated(t0 + s(72));
        assert_eq!(h.response(t0 + s(72), true).0, "503 Service Unavailable");
        assert_eq!(h.response(t0 + s(72), false).0, "503 Service Unavailable");
        // The source follows again.
        h.source_stalled(None);
        assert_eq!(h.response(t0 + s(73), true).0, "200 OK");
        assert_eq!(h.response(t0 + s(73), false).0, "200 OK");
    }
}
