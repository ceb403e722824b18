//! healthCheckNodePort, as kube-proxy serves it: for each service with
//! `externalTrafficPolicy: Local` and a healthCheckNodePort, HTTP on that port answers
//! 200 while this node has a local endpoint and 503 otherwise, with
//! `{"service": {"namespace", "name"}, "localEndpoints": N}`, so a cloud load balancer
//! sends only to nodes that can serve the service without a hop.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::task::JoinHandle;

use super::http;
use crate::model::HealthCheck;

type Checks = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The health-check listeners, one per port, following the model.
#[derive(Default)]
pub struct HealthServer {
    checks: Checks,
    listeners: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthServer {
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
                let task = listen(addr, check.clone(), self.checks.clone());
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

/// The status and JSON body for one check.
pub fn response(check: &HealthCheck) -> (&'static str, String) {
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let status = if check.local_endpoints > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    (status, body)
}

fn listen(addr: SocketAddr, first: HealthCheck, checks: Checks) -> JoinHandle<()> {
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
            let (status, body) = response(&check);
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
        let (status, body) = response(&check);
        assert_eq!(status, "200 OK");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["namespace"], "shop");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
        check.local_endpoints = 0;
        assert_eq!(response(&check).0, "503 Service Unavailable");
    }
}
