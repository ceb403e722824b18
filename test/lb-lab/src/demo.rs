//! `lb-lab demo`: a node and three pods in network namespaces, the agent on the example
//! manifests, and traffic, printed step by step.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context as _;

use crate::lab::{self, AgentProcess, Lab, ProbeOptions, ProbeReport};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

fn print_report(report: &ProbeReport) {
    let total = report.total_replies() + report.total_errors();
    for (name, n) in report.replies.iter().chain(report.errors.iter()) {
        let pct = 100.0 * *n as f64 / total.max(1) as f64;
        let bar = "#".repeat((pct / 2.0).round() as usize);
        println!("      {name:<14} {n:>4}  {pct:5.1}%  {bar}");
    }
}

fn step(n: usize, text: &str) {
    println!("\n[{n}/6] {text}");
}

/// The demo, step by step; everything it creates is removed at the end, or on failure.
pub fn demo(manifests: &Path, agent: Option<PathBuf>, connections: usize) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("locating lb-lab")?;
    let agent_bin = agent.unwrap_or_else(|| me.with_file_name("lb-user"));
    anyhow::ensure!(
        agent_bin.is_file(),
        "agent binary {} not found (build it with `cargo build -p lb-user`, or run `cargo xtask demo`)",
        agent_bin.display()
    );
    anyhow::ensure!(
        manifests.is_dir(),
        "manifest directory {} not found (run the demo from the repository root)",
        manifests.display()
    );
    println!("== lb demo: socket-level service load balancing with eBPF, in network namespaces ==");
    let lab = create_lab(&me)?;
    let work = std::env::temp_dir().join(&lab.prefix);
    let cleanup_work = Defer(work.clone());
    let live_manifests = copy_manifests(manifests, &work)?;
    let mut agent = start_agent(&agent_bin, &lab, &live_manifests, &work)?;

    step(
        3,
        &format!(
            "{connections} TCP connections from a client in the cgroup to the ClusterIP {CLUSTER_IP}:80 (service demo/web)"
        ),
    );
    let target = SocketAddrV4::new(CLUSTER_IP, 80);
    print_report(&lab.probe(&ProbeOptions::tcp(target, connections), true)?);

    step(4, "What the maps hold: lb-user dump");
    let dump = lab::run(
        Command::new(&agent_bin)
            .arg("dump")
            .arg("--pin-path")
            .arg(&agent.pin_path),
    )?;
    for line in dump.lines() {
        println!("      {line}");
    }

    step(
        5,
        "pod-2 stops being ready (EndpointSlice edited); new connections avoid it",
    );
    make_pod_unready(&live_manifests.join("web-endpointslice.yaml"), 2)?;
    agent.wait_synced(2, Duration::from_secs(10))?;
    print_report(&lab.probe(&ProbeOptions::tcp(target, connections), true)?);
    println!("      and demo/empty ({EMPTY_IP}:80, no endpoints) refuses at once:");
    print_report(&lab.probe(&ProbeOptions::tcp(SocketAddrV4::new(EMPTY_IP, 80), 3), true)?);

    step(
        6,
        "A client outside the cgroup is not translated: the ClusterIP is unroutable in the node namespace",
    );
    print_report(&lab.probe(&ProbeOptions::tcp(target, 3), false)?);

    println!(
        "\nTearing down: agent stopped (programs detached, pins removed), namespaces and cgroup deleted."
    );
    drop(agent);
    drop(lab);
    drop(cleanup_work);
    println!("Done.");
    Ok(())
}

/// Step 1: the node, three pods and the client cgroup.
fn create_lab(lab_bin: &Path) -> anyhow::Result<Lab> {
    step(
        1,
        "Creating a node namespace and 3 pod namespaces, each pod running a server that answers with its name",
    );
    let lab = Lab::new(lab_bin, "demo", 3, 8080)?;
    println!(
        "      node netns {}  (routes to the pods only: nothing else is reachable)",
        lab.node.name
    );
    for p in &lab.pods {
        println!("      {}  {}:8080  netns {}", p.name, p.ip, p.netns.name);
    }
    println!("      client cgroup {}", lab.cgroup.path.display());
    Ok(lab)
}

/// A copy of the example manifests under `work`, which the demo may change.
fn copy_manifests(manifests: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let live = work.join("manifests");
    std::fs::create_dir_all(&live)?;
    for entry in std::fs::read_dir(manifests)? {
        let entry = entry?;
        std::fs::copy(entry.path(), live.join(entry.file_name()))?;
    }
    Ok(live)
}

/// Step 2: the agent on the manifests, attached to the lab's cgroup, until its first sync.
fn start_agent(
    agent_bin: &Path,
    lab: &Lab,
    manifests: &Path,
    work: &Path,
) -> anyhow::Result<AgentProcess> {
    let pin_path = PathBuf::from(format!("/sys/fs/bpf/{}", lab.prefix));
    step(
        2,
        "Starting the agent on the example manifests (a copy, so the demo can change it)",
    );
    println!(
        "      {} run --manifests {} --cgroup {} --pin-path {}",
        agent_bin.display(),
        manifests.display(),
        lab.cgroup.path.display(),
        pin_path.display()
    );
    let mut agent = AgentProcess::start(
        agent_bin,
        &["--manifests".as_ref(), manifests.as_os_str()],
        &lab.cgroup.path,
        &pin_path,
        &work.join("agent.log"),
    )?;
    agent.wait_synced(1, Duration::from_secs(15))?;
    for line in agent.log().lines() {
        println!("      agent: {line}");
    }
    Ok(agent)
}

/// Sets `ready: false` on endpoint `index` of the EndpointSlice in `path`.
fn make_pod_unready(path: &Path, index: usize) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut slice: serde_yaml::Value = serde_yaml::from_str(&text)?;
    slice["endpoints"][index]["conditions"]["ready"] = serde_yaml::Value::Bool(false);
    std::fs::write(path, serde_yaml::to_string(&slice)?)?;
    Ok(())
}

/// Removes a scratch directory on drop.
struct Defer(PathBuf);

impl Drop for Defer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
