//! healthCheckNodePort, as kube-proxy serves it (pkg/proxy/healthcheck/service_health.go,
//! `hcHandler.ServeHTTP`): for each service with `externalTrafficPolicy: Local` and a
//! healthCheckNodePort, HTTP on that port answers 200 while this node has a ready local
//! endpoint and the agent is healthy (`ProxierHealth::healthy`, what `/healthz` says
//! before the node's eligibility), 503 otherwise, with
//! `{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": B}`
//! and `X-Content-Type-Options: nosniff`, so a cloud load balancer sends only to nodes
//! that can serve the service without a hop and whose agent follows the cluster.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tokio::task::JoinHandle;

use super::{http, proxier_health::SharedHealth};
use crate::model::HealthCheck;

type Checks = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The health-check listeners, one per port, following the model.
pub struct HealthServer {
    checks: Checks,
    /// The agent's own health, which every check reports too.
    proxier: SharedHealth,
    listeners: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthServer {
    /// No listeners yet; the checks will report `proxier`'s health.
    pub fn new(proxier: SharedHealth) -> Self {
        Self {
            checks: Checks::default(),
            proxier,
            listeners: BTreeMap::new(),
        }
    }

    /// Serves exactly `checks` from now on: new ports get a listener, gone ones lose it,
    /// the others answer with the new counts. Call from within the runtime.
    pub fn update(&mut self, checks: &BTreeMap<u16, HealthCheck>) {
        *self.checks.lock().unwrap_or_else(|p| p.into_inner()) = checks.clone();
        self.listeners.retain(|port, task| {
            let keep = checks.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, check) in checks {
            if !self.listeners.contains_key(port) {
                let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), *port);
                let task = listen(addr, check, self.checks.clone(), self.proxier.clone());
                self.listeners.insert(*port, task);
            }
        }
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

/// The status and JSON body for one check while the agent is `healthy` or not:
/// kube-proxy's, 200 only with a ready local endpoint and a healthy proxier.
pub fn response(check: &HealthCheck, healthy: bool) -> (&'static str, String) {
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": healthy,
    })
    .to_string();
    let status = if check.local_endpoints > 0 && healthy {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    (status, body)
}

fn listen(
    addr: SocketAddr,
    first: &HealthCheck,
    checks: Checks,
    proxier: SharedHealth,
) -> JoinHandle<()> {
    let service = format!("{}/{}", first.namespace, first.name);
    http::serve(
        addr,
        move |bound| match bound {
            Ok(()) => tracing::info!(service = %service, "serving the health check on {addr}"),
            Err(e) => tracing::warn!(
                service = %service,
                "field spec.healthCheckNodePort: cannot listen on {addr}: {e}; no health check served"
            ),
        },
        move |_path| {
            let check = checks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&addr.port())
                .cloned()?;
            let healthy = proxier
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .healthy(SystemTime::now());
            let (status, body) = response(&check, healthy);
            Some((status, "application/json", body))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_kube_proxy() {
        let mut check = HealthCheck {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let (status, body) = response(&check, true);
        assert_eq!(status, "200 OK");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["namespace"], "shop");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);
        check.local_endpoints = 0;
        assert_eq!(response(&check, true).0, "503 Service Unavailable");
    }

    #[test]
    fn an_unhealthy_agent_fails_the_check_with_its_local_endpoints() {
        let check = HealthCheck {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let (status, body) = response(&check, false);
        assert_eq!(status, "503 Service Unavailable");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["serviceProxyHealthy"], false, "{body}");
        assert_eq!(v["localEndpoints"], 2, "{body}");
    }

    #[tokio::test]
    async fn the_listener_reports_the_shared_health() {
        use super::super::proxier_health::ProxierHealth;
        use std::time::Duration;
        let t0 = SystemTime::now();
        // Started an hour ago with a 1 s timeout and never synced: unhealthy.
        let proxier: SharedHealth = Arc::new(Mutex::new(ProxierHealth::new(
            Duration::from_secs(1),
            t0 - Duration::from_secs(3600),
        )));
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut server = HealthServer::new(proxier.clone());
        let check = HealthCheck {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 1,
        };
        server.update(&BTreeMap::from([(port, check)]));
        let body = get_body(port).await;
        assert!(body.starts_with("HTTP/1.1 503"), "{body}");
        assert!(body.contains("\"serviceProxyHealthy\":false"), "{body}");
        proxier.lock().unwrap().updated(SystemTime::now());
        let body = get_body(port).await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("\"serviceProxyHealthy\":true"), "{body}");
    }

    /// GET / on 127.0.0.1:`port` (retried for up to 5 s while the listener starts): the
    /// whole response.
    async fn get_body(port: u16) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        for _ in 0..50 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap();
                let mut out = String::new();
                let read = s.read_to_string(&mut out);
                tokio::time::timeout(std::time::Duration::from_secs(5), read)
                    .await
                    .unwrap()
                    .unwrap();
                return out;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("nothing listens on {port}");
    }
}
