//! Our agent on the Kubernetes API source: the benchmark's services and EndpointSlices
//! served by the fake API server (real HTTP, list and watch), the agent started with
//! `--kubeconfig` in the base lab after the manifest agent has stopped. Cold sync, one
//! endpoint change until a connection reaches the new backend, peak RSS.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Instant,
};

use serde::{Deserialize, Serialize};

use super::{
    BenchOptions, ColdSync, p50_p99, start_agent, time_changes, vm_hwm_mib,
    workload::{churn, documents, manifests},
};
use crate::{fake_api::FakeApi, kube_proxy_rules::SvcPort, lab::Lab};

/// The API source's control-plane figures at one size.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApiFigures {
    /// Putting the objects into the fake API server (not the agent's time).
    pub load_ms: f64,
    pub cold: ColdSync,
    /// One EndpointSlice change to the first connection reaching the new backend:
    /// [p50, p99] ms, and the first change after the start apart.
    pub change_ms: [f64; 2],
    pub first_change_ms: f64,
    pub agent_rss_mib: f64,
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The churn service's EndpointSlice with `pod` as its one endpoint.
fn churn_slice(pod: Ipv4Addr) -> String {
    let text = manifests(&[churn(pod)]);
    documents(&text)
        .find(|d| d.contains("kind: EndpointSlice"))
        .expect("manifests write a slice")
        .to_string()
}

/// Serves `ports` (and the churn service) from a fake API server, runs the agent on it
/// in `base`'s cgroup, and measures it.
pub(super) fn measure(
    opts: &BenchOptions,
    base: &Lab,
    ports: &[SvcPort],
    pods: &[Ipv4Addr],
) -> anyhow::Result<ApiFigures> {
    let api = FakeApi::start();
    let start = Instant::now();
    let mut all = ports.to_vec();
    all.push(churn(pods[0]));
    for doc in documents(&manifests(&all)) {
        api.apply(doc);
    }
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let dir = Scratch(std::env::temp_dir().join(format!("{}-api", base.prefix)));
    std::fs::create_dir_all(&dir.0)?;
    let kubeconfig = api.kubeconfig(&dir.0);
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}-api", base.prefix));
    let source = [
        "--kubeconfig".as_ref(),
        kubeconfig.as_os_str(),
        "--hostname-override".as_ref(),
        "bench-node".as_ref(),
    ];
    // Dropped (stopped, its pins removed) before the directory and the server go.
    let (agent, cold) = start_agent(opts, base, &source, &pin, &dir.0.join("agent.log"))?;
    let churn_vip = SocketAddr::new(churn(pods[0]).ip.into(), 80);
    let (first, times) = time_changes(base, churn_vip, opts.changes, |_, to| {
        let slice = churn_slice(pods[to]);
        let start = Instant::now();
        api.apply(&slice);
        Ok(start)
    })?;
    Ok(ApiFigures {
        load_ms,
        cold,
        change_ms: p50_p99(times),
        first_change_ms: first,
        agent_rss_mib: vm_hwm_mib(agent.child.0.id()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_churn_slice_is_one_endpoint_slice() {
        let pod = Ipv4Addr::new(10, 244, 2, 2);
        let slice = churn_slice(pod);
        assert!(slice.starts_with("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice"));
        assert!(slice.contains("addresses: [10.244.2.2]"), "{slice}");
        assert!(!slice.contains("kind: Service"));
    }
}
