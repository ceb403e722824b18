//! lb-lab: the test bench of the load balancer, kept apart from the agent it drives.
//!
//! * [`lab`]: a one-machine cluster in network namespaces (node, pods, a client cgroup),
//!   pod servers and probes, and the agent as a process;
//! * [`cluster`]: an outside client and two nodes on one LAN, for the packet level;
//! * [`client_pods`]: many client pods holding many sockets, for the socket closer;
//! * [`fake_api`]: a fake Kubernetes API server over real HTTP, for the API source;
//! * [`load`]: the benchmark's load generator and servers;
//! * [`kube_proxy_rules`]: kube-proxy's iptables and nftables rules, to compare against;
//! * [`bench`]: `cargo xtask bench`, side by side with a direct connection and kube-proxy;
//! * [`xdp_pass`]: an XDP program that passes everything, for the LAN side of a veth;
//! * [`dns`], [`ingress`]: the demo's cluster DNS server and ingress proxy;
//! * [`demo`]: `cargo xtask demo`.
//!
//! The `lb-lab` binary runs inside the lab's namespaces (pod servers, probes, the load
//! generator); [`binary`] finds it and the agent for tests.

pub mod bench;
pub mod client_pods;
pub mod cluster;
pub mod demo;
pub mod dns;
pub mod fake_api;
pub mod flood;
pub mod ingress;
pub mod kube_proxy_rules;
pub mod lab;
pub mod load;
pub mod pktgen;
pub mod xdp_pass;

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// A binary of this workspace (`lb-lab`, `lb-user`): `$LB_LAB_BIN` / `$LB_USER_BIN` if
/// set, else next to the running executable or one directory up (a test runs from
/// `target/<profile>/deps`, the binaries live in `target/<profile>`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe()?;
    let candidates: Vec<PathBuf> = me
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{name} not found (looked in {candidates:?}); build it with `cargo build -p {}` \
             (`cargo xtask test` does), or set {var}",
                if name == "lb-user" {
                    "lb-user"
                } else {
                    "lb-lab"
                }
            )
        })
}

/// Every object in the `.yaml` files of `dir` (multi-document; `kind: List` items too).
pub fn manifest_objects(dir: &Path) -> anyhow::Result<Vec<serde_yaml::Value>> {
    use serde::Deserialize as _;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc)
                .with_context(|| format!("{}: not YAML", file.display()))?;
            match v["items"].as_sequence() {
                Some(items) if v["kind"].as_str() == Some("List") => out.extend(items.clone()),
                _ => out.push(v),
            }
        }
    }
    Ok(out)
}
