//! The NodePort path from a client outside the node: our tc programs against kube-proxy's
//! rules (iptables with the nf_tables and the legacy backend, nftables), each variant on
//! a node of its own, all on one LAN and in front of the same backends.
//!
//! ```text
//!  netns <prefix>-lan: bridge br0
//!    |-- client           192.168.77.100  the pod range routed via the direct node
//!    |-- backends' node   192.168.77.1    the pods; the client routed via the direct node
//!    |-- direct           192.168.77.10   forwards, translates nothing: the limit
//!    |-- tc-lb            192.168.77.11   our agent, tc programs on eth0
//!    |-- iptables-nft     192.168.77.12   kube-proxy's rules, and so on
//! ```
//!
//! Every connection crosses the same links: client, node, backends' node, pod, and back
//! the same way. The backends are on another node than the one the client connects to
//! (the common case in a cluster of many nodes), so every variant but direct DNATs and
//! SNATs to its own address (externalTrafficPolicy Cluster).
//!
//! CPU is the whole machine's busy time (`/proc/stat`) over a run, per connection or per
//! MB: client, servers and forwarding included, which every variant pays alike; the
//! "added" column subtracts direct's figure from the same round.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{
    BenchOptions, median,
    report::Targets,
    run_load,
    workload::{ENDPOINTS, MEASURED_NODE_PORT, manifests, node_port_services},
};
use crate::{
    cluster::{CLIENT_IP, CLIENT_IP6, join_lan, start_transfer},
    kube_proxy_rules::{KubeProxy, SvcPort},
    lab::{AgentProcess, Cgroup, Lab, Netns, unique_prefix},
    load::LoadMode,
};

/// Our variant's name.
pub const OURS: &str = "tc-lb";
/// What the ratios are taken against.
pub const BASELINE: &str = "iptables-nft";

/// One variant at one size: medians over rounds, ratios taken within each round.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodePortRecord {
    pub variant: String,
    pub services: usize,
    /// TCP connections per second (connect, request, reply, close), one client.
    pub conn_rate: f64,
    pub conn_p99_us: f64,
    /// Connections that failed (timed out or refused), over every round.
    pub conn_errors: usize,
    /// Busy CPU time of the machine per connection.
    pub cpu_us_per_conn: f64,
    /// The same, less direct's in the same round: what the node's translation costs.
    pub added_cpu_us_per_conn: f64,
    /// One TCP connection echoing the transfer's bytes: MB/s each way.
    pub transfer_mb_s: f64,
    pub cpu_us_per_mb: f64,
    /// Ratios to [`BASELINE`] in the same round (median, min, max over rounds).
    pub conn_rate_vs_baseline: [f64; 3],
    pub cpu_per_conn_vs_baseline: [f64; 3],
    pub transfer_vs_baseline: [f64; 3],
    /// Ours only: the tc programs' own run time per packet (the kernel's BPF statistics,
    /// ingress and egress together), on the measured connections' packets and on packets
    /// that are not ours (SYNs to a port with no service), in ns.
    pub bpf_ns_per_service_packet: f64,
    pub bpf_ns_per_other_packet: f64,
    /// Ours only: per packet routed through the node to an address that is not ours.
    pub bpf_ns_per_passing_packet: f64,
    /// Ours only: the programs' run time over the measured connections, per connection.
    pub bpf_ns_per_conn: f64,
    /// A flood of spoofed SYNs at the nodePort: legitimate connections made meanwhile,
    /// how many failed, and the machine's busy CPU over the flood (ms).
    pub flood_legit: usize,
    pub flood_legit_failed: usize,
    pub flood_cpu_ms: f64,
}

/// SYNs in the flood run, sent over [`FLOOD_MS`].
const FLOOD_SYNS: usize = 10_000;
const FLOOD_MS: u64 = 2_000;

/// `kernel.bpf_stats_enabled` set while it lives (programs' run_time_ns and run_cnt),
/// then put back as it was.
pub(super) struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    pub(super) fn enable() -> anyhow::Result<Self> {
        let before = std::fs::read_to_string(Self::PATH)
            .context("reading kernel.bpf_stats_enabled")?
            .trim()
            .to_string();
        std::fs::write(Self::PATH, "1").context("setting kernel.bpf_stats_enabled")?;
        Ok(Self(before))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// The summed (run_time_ns, run_cnt) of the tc programs linked under `pin`'s links/.
fn tc_prog_stats(pin: &Path) -> anyhow::Result<(u64, u64)> {
    Ok(prog_stats(pin)?
        .into_iter()
        .filter(|(name, _)| name.starts_with("lb_tc_"))
        .fold((0, 0), |(ns, cnt), (_, (n, c))| (ns + n, cnt + c)))
}

/// (run_time_ns, run_cnt) of each of our programs linked under `pin`'s links/ (by
/// program name: a link pin is `<program>_<interface or cgroup>`), summed over its links.
pub(super) fn prog_stats(pin: &Path) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let json = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = crate::lab::run(std::process::Command::new("bpftool").arg("-j").args(args))?;
        serde_json::from_str(&out).with_context(|| format!("bpftool {args:?} printed {out:?}"))
    };
    let mut stats: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for entry in std::fs::read_dir(pin.join("links")).context("reading the links")? {
        let path = entry?.path();
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // lb_tc_ingress_eth0, lb_connect4_cg1234: the program is all but the last part.
        let Some((program, _)) = file.rsplit_once('_') else {
            continue;
        };
        let link = json(&["link", "show", "pinned", &path.to_string_lossy()])?;
        let id = link["prog_id"].as_u64().context("a link without prog_id")?;
        let prog = json(&["prog", "show", "id", &id.to_string()])?;
        let e = stats.entry(program.to_string()).or_default();
        e.0 += prog["run_time_ns"].as_u64().unwrap_or(0);
        e.1 += prog["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok(stats)
}

/// Run time per run between two [`tc_prog_stats`] readings.
fn ns_per_run(before: (u64, u64), after: (u64, u64)) -> f64 {
    let runs = after.1.saturating_sub(before.1);
    if runs == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 / runs as f64
}

/// One round's figures for one variant.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    bpf_ns_per_packet: f64,
    bpf_ns_per_conn: f64,
    conn_errors: usize,
    conn_rate: f64,
    conn_p99_us: f64,
    cpu_us_per_conn: f64,
    transfer_mb_s: f64,
    cpu_us_per_mb: f64,
}

/// A node of the benchmark: a variant, its LAN address and namespace.
pub(super) struct Node {
    pub(super) variant: String,
    pub(super) addr: Ipv4Addr,
    pub(super) netns: Netns,
}

/// Which nodes a [`NodePortLab`] has besides direct's.
pub(super) struct Plan {
    /// Our agent's nodes: (variant, its `--acceleration`).
    pub(super) ours: &'static [(&'static str, &'static str)],
    pub(super) kube_proxy: &'static [KubeProxy],
    /// Every node's LAN port accepts XDP frames and checksums in full what it passes
    /// to the node (as `Cluster::accept_xdp`), the nodes without XDP too: the same
    /// path for every variant.
    pub(super) accept_xdp: bool,
}

/// The NodePort path's nodes: our tc programs and every kube-proxy mode.
const NODE_PORT_PLAN: Plan = Plan {
    ours: &[(OURS, "off")],
    kube_proxy: &KubeProxy::ALL,
    accept_xdp: false,
};

/// The topology above, with every variant programmed for the benchmark's services.
pub(super) struct NodePortLab {
    /// First: stopped before the namespaces go. By variant.
    agents: Vec<(String, AgentProcess)>,
    agent_cgroups: Vec<Cgroup>,
    dir: PathBuf,
    pub(super) nodes: Vec<Node>,
    pub(super) client: Netns,
    pub(super) backends: Lab,
    /// The LAN ports' XDP pass programs (`Plan::accept_xdp`), detached with their links.
    _xdp_links: Vec<std::os::fd::OwnedFd>,
    /// Last: the LAN goes when nothing uses it.
    _lan: Netns,
}

const BACKENDS_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
/// LoadBalancer IPs: routed by every node towards the backends' node, as a default
/// route would, so that what a node neither translates nor drops is forwarded.
const LB_NET: &str = "10.200.0.0/16";

fn node_addr(k: usize) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(192, 168, 77, 10 + k as u8),
        Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x10 + k as u16),
    )
}

impl NodePortLab {
    /// The LAN, the client, the backends and a node per variant of `plan`, programmed
    /// for the service ports that `services` gives over the backends' pods.
    pub(super) fn new(
        opts: &BenchOptions,
        plan: &Plan,
        services: &dyn Fn(&[Ipv4Addr]) -> Vec<SvcPort>,
    ) -> anyhow::Result<Self> {
        let prefix = unique_prefix("np");
        let lan = Netns::create(&format!("{prefix}-lan"))?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        let backends = Lab::new_with(&opts.lab_bin, "npb", ENDPOINTS, 8080, &["--bench"])?;
        join_lan(&lan, &backends.node, "pb", BACKENDS_IP, node_addr(90).1)?;
        let client = Netns::create(&format!("{prefix}-client"))?;
        join_lan(&lan, &client, "pc", CLIENT_IP, CLIENT_IP6)?;
        client.sysctl("net.ipv4.tcp_tw_reuse=1")?;
        let mut nodes = Vec::new();
        let mut xdp_links = Vec::new();
        let names = std::iter::once("direct")
            .chain(plan.ours.iter().map(|(v, _)| *v))
            .chain(plan.kube_proxy.iter().map(|m| m.name()));
        for (k, variant) in names.enumerate() {
            let netns = Netns::create(&format!("{prefix}-n{k}"))?;
            let (addr, addr6) = node_addr(k);
            join_lan(&lan, &netns, &format!("pn{k}"), addr, addr6)?;
            for setting in [
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
                // Forwarded out of the interface it came in by: no redirect to the client.
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.eth0.send_redirects=0",
            ] {
                netns.sysctl(setting)?;
            }
            for net in ["10.244.0.0/16", LB_NET] {
                netns.ip(&["route", "add", net, "via", &BACKENDS_IP.to_string()])?;
            }
            if plan.accept_xdp {
                xdp_links.push(accept_xdp(&lan, &format!("pn{k}"))?);
            }
            nodes.push(Node {
                variant: variant.into(),
                addr,
                netns,
            });
        }
        let direct = nodes[0].addr.to_string();
        client.ip(&["route", "add", "10.244.0.0/16", "via", &direct])?;
        backends
            .node
            .ip(&["route", "add", &format!("{CLIENT_IP}/32"), "via", &direct])?;
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(dir.join("manifests"))?;
        let mut lab = Self {
            agents: Vec::new(),
            agent_cgroups: Vec::new(),
            dir,
            nodes,
            client,
            backends,
            _xdp_links: xdp_links,
            _lan: lan,
        };
        let pods: Vec<Ipv4Addr> = lab.backends.pods.iter().map(|p| p.ip).collect();
        lab.program(opts, plan, &services(&pods), &prefix)?;
        Ok(lab)
    }

    /// kube-proxy's rules on their nodes, our agents (each pinning under
    /// /sys/fs/bpf/`prefix`-aK, each with a cgroup of its own) on theirs, for `ports`.
    fn program(
        &mut self,
        opts: &BenchOptions,
        plan: &Plan,
        ports: &[SvcPort],
        prefix: &str,
    ) -> anyhow::Result<()> {
        let n = ports.len();
        for node in &self.nodes {
            if let Some(mode) = plan.kube_proxy.iter().find(|m| m.name() == node.variant) {
                eprintln!("bench: {n} service ports: loading {} rules", mode.name());
                mode.load(&node.netns.name, &mode.full(ports), false)?;
            }
        }
        let mdir = self.dir.join("manifests");
        std::fs::write(mdir.join("services.yaml"), manifests(ports))?;
        // Started together, then waited for: their cold starts overlap.
        for (k, (variant, acceleration)) in plan.ours.iter().enumerate() {
            let cgroup = Cgroup::create(&format!("{prefix}-agent{k}"))?;
            let node = self.node(variant);
            let node_ip = node.addr.to_string();
            let agent = AgentProcess::start_in(
                Some(&node.netns),
                &opts.agent_bin,
                &[
                    "--manifests".as_ref(),
                    mdir.as_os_str(),
                    "--node-ip".as_ref(),
                    node_ip.as_ref(),
                    "--acceleration".as_ref(),
                    acceleration.as_ref(),
                ],
                &cgroup.path,
                &PathBuf::from(format!("/sys/fs/bpf/{prefix}-a{k}")),
                &self.dir.join(format!("agent-{variant}.log")),
            )?;
            self.agent_cgroups.push(cgroup);
            self.agents.push((variant.to_string(), agent));
        }
        for (_, agent) in &mut self.agents {
            agent.wait_synced(1, Duration::from_secs(120))?;
        }
        Ok(())
    }

    /// The agent on `variant`'s node, if it is one of ours.
    pub(super) fn agent(&self, variant: &str) -> Option<&AgentProcess> {
        self.agents
            .iter()
            .find(|(v, _)| v == variant)
            .map(|(_, a)| a)
    }

    pub(super) fn node(&self, variant: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.variant == variant)
            .expect("every variant has a node")
    }

    /// Where a variant's client connects: the pods themselves for direct, else the
    /// node's nodePort.
    fn targets(&self, node: &Node) -> Vec<SocketAddr> {
        if node.variant == "direct" {
            self.backends
                .pods
                .iter()
                .map(|p| SocketAddr::new(p.ip.into(), 8080))
                .collect()
        } else {
            vec![SocketAddr::new(node.addr.into(), MEASURED_NODE_PORT)]
        }
    }

    /// One round's figures for `node`'s variant.
    fn sample(&self, opts: &BenchOptions, node: &Node, round: usize) -> anyhow::Result<Sample> {
        let targets = self.targets(node);
        let pin = self.agent(&node.variant).map(|a| a.pin_path.clone());
        let stats_before = pin.as_deref().map(tc_prog_stats).transpose()?;
        let before = busy_cpu_us()?;
        let load = run_load(
            &self.backends.lab_bin,
            &self.client,
            None,
            &targets,
            opts.count,
            LoadMode::Tcp,
        )?;
        let conn_cpu = busy_cpu_us()? - before;
        let (bpf_ns_per_packet, bpf_ns_per_conn) = match (pin.as_deref(), stats_before) {
            (Some(pin), Some(b)) => {
                let after = tc_prog_stats(pin)?;
                let ns = after.0.saturating_sub(b.0) as f64;
                (ns_per_run(b, after), ns / load.count.max(1) as f64)
            }
            _ => (0.0, 0.0),
        };
        if load.errors > 0 {
            eprintln!(
                "bench: nodePort via {}: {} of {} connections failed",
                node.variant, load.errors, load.count
            );
            if let Some(agent) = self.agent(&node.variant) {
                let counters = lb_user::datapath::read_counters(&agent.pin_path)?;
                let drops = lb_user::datapath::read_drops(&agent.pin_path)?;
                eprintln!(
                    "{}{}",
                    lb_user::serve::dump::render_counters(&counters),
                    lb_user::serve::dump::render_drops(&drops)
                );
            }
        }
        let bytes = opts.transfer_mb * 1_000_000;
        let target = targets[round % targets.len()];
        let before = busy_cpu_us()?;
        let report = start_transfer(
            &self.backends.lab_bin,
            &self.client,
            target,
            bytes,
            Duration::ZERO,
        )?
        .finish()?;
        let transfer_cpu = busy_cpu_us()? - before;
        if !report.intact || report.error.is_some() {
            bail!(
                "nodePort via {}: the transfer failed: {report:?}",
                node.variant
            );
        }
        let secs = report.elapsed_ns as f64 / 1e9;
        Ok(Sample {
            bpf_ns_per_packet,
            bpf_ns_per_conn,
            conn_errors: load.errors,
            conn_rate: load.rate(),
            conn_p99_us: load.p99_ns as f64 / 1e3,
            cpu_us_per_conn: conn_cpu / (load.count - load.errors).max(1) as f64,
            transfer_mb_s: opts.transfer_mb as f64 / secs,
            cpu_us_per_mb: transfer_cpu / opts.transfer_mb as f64,
        })
    }
}

impl NodePortLab {
    /// The tc programs' run time per packet that is not ours: `count` SYNs to a port of
    /// our node where no service is (the node's own traffic: its stack answers them), and
    /// `count` SYNs routed through the node to an address that is not ours (traffic to
    /// pods or elsewhere; the node has no route for it and drops them).
    fn other_packet_cost(&self, opts: &BenchOptions, count: usize) -> anyhow::Result<(f64, f64)> {
        let Some(agent) = self.agent(OURS) else {
            return Ok((0.0, 0.0));
        };
        let ours = self.node(OURS).addr;
        let cost = |target: std::net::SocketAddrV4| -> anyhow::Result<f64> {
            let before = tc_prog_stats(&agent.pin_path)?;
            self.flood(opts, target, count, 0)?;
            Ok(ns_per_run(before, tc_prog_stats(&agent.pin_path)?))
        };
        let to_node = cost(std::net::SocketAddrV4::new(ours, 9))?;
        self.client.ip(&[
            "route",
            "replace",
            "10.245.0.0/16",
            "via",
            &ours.to_string(),
        ])?;
        let passing = cost(std::net::SocketAddrV4::new(Ipv4Addr::new(10, 245, 0, 1), 9))?;
        Ok((to_node, passing))
    }

    /// `count` spoofed SYNs from the client to `target` over `ms`.
    fn flood(
        &self,
        opts: &BenchOptions,
        target: std::net::SocketAddrV4,
        count: usize,
        ms: u64,
    ) -> anyhow::Result<crate::lab::ChildGuard> {
        let mut cmd = std::process::Command::new(&opts.lab_bin);
        cmd.args(["syn-flood", "--target", &target.to_string()])
            .args([
                "--count",
                &count.to_string(),
                "--duration-ms",
                &ms.to_string(),
            ])
            .stdout(std::process::Stdio::null());
        crate::lab::place(&mut cmd, &self.client, None)?;
        let mut child = crate::lab::ChildGuard(cmd.spawn().context("starting lb-lab syn-flood")?);
        if ms == 0 {
            child.0.wait()?;
        }
        Ok(child)
    }

    /// A SYN flood at `node`'s nodePort while a client makes connections: (connections,
    /// failed, the machine's busy CPU over the flood in ms).
    fn flood_run(&self, opts: &BenchOptions, node: &Node) -> anyhow::Result<(usize, usize, f64)> {
        let target = std::net::SocketAddrV4::new(node.addr, MEASURED_NODE_PORT);
        let before = busy_cpu_us()?;
        let mut flood = self.flood(opts, target, FLOOD_SYNS, FLOOD_MS)?;
        // 8 batches of 5 connections, spread over the flood (1 s timeout each).
        let (mut made, mut failed) = (0, 0);
        for _ in 0..8 {
            let r = run_load(
                &self.backends.lab_bin,
                &self.client,
                None,
                &[target.into()],
                5,
                LoadMode::Tcp,
            )?;
            (made, failed) = (made + r.count, failed + r.errors);
            std::thread::sleep(Duration::from_millis(FLOOD_MS / 8));
        }
        flood.0.wait()?;
        let cpu_ms = (busy_cpu_us()? - before) / 1e3;
        Ok((made, failed, cpu_ms))
    }
}

impl Drop for NodePortLab {
    fn drop(&mut self) {
        // Stopped (and their pins removed) before their cgroups and namespaces go.
        self.agents.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The LAN port `port` (in `lan`) takes in the XDP frames that its node sends back (an
/// XDP pass program of its own, as `Cluster::accept_xdp` does), and hands the node fully
/// checksummed packets (transmit checksum offload off). The link keeps the program.
fn accept_xdp(lan: &Netns, port: &str) -> anyhow::Result<std::os::fd::OwnedFd> {
    crate::lab::run(std::process::Command::new("ip").args([
        "netns", "exec", &lan.name, "ethtool", "-K", port, "tx", "off",
    ]))
    .with_context(|| format!("checksum offload off at {port}"))?;
    crate::xdp_pass::attach(lan, port)
}

/// The machine's busy CPU time so far (every CPU: user, nice, system, irq and softirq;
/// not idle, iowait or the hypervisor's steal), in µs.
pub(crate) fn busy_cpu_us() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    busy_of(&stat).context("no cpu line in /proc/stat")
}

/// user + nice + system + irq + softirq of /proc/stat's first line, in µs.
fn busy_of(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| f.get(i).copied().unwrap_or(0))
        .sum();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some(busy as f64 * 1e6 / hz as f64)
}

/// `lb-lab bench`'s NodePort part at `n` services: every variant once per round, in an
/// order rotated every round.
pub fn bench_node_port(opts: &BenchOptions, n: usize) -> anyhow::Result<Vec<NodePortRecord>> {
    eprintln!("bench: nodePort, {n} services: creating the nodes");
    let lab = NodePortLab::new(opts, &NODE_PORT_PLAN, &|pods| node_port_services(n, pods))?;
    // Warm-up, and a check that every variant answers.
    for node in &lab.nodes {
        let r = run_load(
            &lab.backends.lab_bin,
            &lab.client,
            None,
            &lab.targets(node),
            20,
            LoadMode::Tcp,
        )?;
        if r.errors > 0 {
            bail!(
                "nodePort via {}: {} of 20 warm-up connections failed",
                node.variant,
                r.errors
            );
        }
    }
    let _stats = BpfStats::enable()?;
    let mut runs: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    let len = lab.nodes.len();
    for round in 0..opts.rounds {
        eprintln!("bench: nodePort, {n} services: round {}", round + 1);
        for node in (0..len).map(|k| &lab.nodes[(round + k) % len]) {
            let s = lab.sample(opts, node, round)?;
            runs.entry(node.variant.clone()).or_default().push(s);
        }
    }
    let mut records = records_of(n, &runs);
    eprintln!("bench: nodePort, {n} services: packets that are not ours, SYN floods");
    let (to_node, passing) = lab.other_packet_cost(opts, 5_000)?;
    for r in &mut records {
        if r.variant == OURS {
            r.bpf_ns_per_other_packet = to_node;
            r.bpf_ns_per_passing_packet = passing;
        }
        if r.variant != "direct" {
            let node = lab.node(&r.variant);
            (r.flood_legit, r.flood_legit_failed, r.flood_cpu_ms) = lab.flood_run(opts, node)?;
        }
    }
    Ok(records)
}

pub(super) fn spread(v: Vec<f64>) -> [f64; 3] {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    [median(v), min, max]
}

/// Medians over rounds; ratios within each round.
fn records_of(n: usize, runs: &BTreeMap<String, Vec<Sample>>) -> Vec<NodePortRecord> {
    let direct = &runs["direct"];
    let base = &runs[BASELINE];
    let ratio = |v: &[Sample], f: fn(&Sample) -> f64| -> [f64; 3] {
        // A CPU reading below /proc/stat's resolution is 0: no ratio then.
        spread(
            v.iter()
                .zip(base)
                .map(|(s, b)| if f(b) > 0.0 { f(s) / f(b) } else { f64::NAN })
                .collect(),
        )
    };
    runs.iter()
        .map(|(variant, v)| NodePortRecord {
            variant: variant.clone(),
            services: n,
            conn_rate: median(v.iter().map(|s| s.conn_rate).collect()),
            conn_p99_us: median(v.iter().map(|s| s.conn_p99_us).collect()),
            conn_errors: v.iter().map(|s| s.conn_errors).sum(),
            cpu_us_per_conn: median(v.iter().map(|s| s.cpu_us_per_conn).collect()),
            added_cpu_us_per_conn: median(
                v.iter()
                    .zip(direct)
                    .map(|(s, d)| s.cpu_us_per_conn - d.cpu_us_per_conn)
                    .collect(),
            ),
            transfer_mb_s: median(v.iter().map(|s| s.transfer_mb_s).collect()),
            cpu_us_per_mb: median(v.iter().map(|s| s.cpu_us_per_mb).collect()),
            conn_rate_vs_baseline: ratio(v, |s| s.conn_rate),
            cpu_per_conn_vs_baseline: ratio(v, |s| s.cpu_us_per_conn),
            transfer_vs_baseline: ratio(v, |s| s.transfer_mb_s),
            bpf_ns_per_service_packet: median(v.iter().map(|s| s.bpf_ns_per_packet).collect()),
            bpf_ns_per_conn: median(v.iter().map(|s| s.bpf_ns_per_conn).collect()),
            ..NodePortRecord::default()
        })
        .collect()
}

pub(super) fn fmt3(r: [f64; 3]) -> String {
    format!("{:.2} ({:.2}–{:.2})", r[0], r[1], r[2])
}

/// The NodePort section of report.md: a table, then the targets.
pub fn node_port_report(records: &[NodePortRecord]) -> String {
    use std::fmt::Write as _;
    let mut md = String::from(
        "\n## NodePort from outside the node\n\n\
         A client outside the node connects to a node's nodePort; the backends are on another node, so the node \
         DNATs and SNATs (direct: the same path, forwarded without translation). Each variant has a node of its \
         own; each round runs every variant once, in rotating order. CPU is the machine's busy time per connection \
         (or per MB), client and servers included; \"added\" is that less direct's in the same round. Ratios are to \
         iptables-nft within each round: median (min–max over rounds).\n\n\
         | services | variant | conn/s | p99 µs | failed | CPU µs/conn | added µs/conn | conn/s vs ipt-nft | CPU/conn vs ipt-nft | transfer MB/s | CPU µs/MB | transfer vs ipt-nft |\n\
         |---:|---|---:|---:|---:|---:|---:|---|---|---:|---:|---|\n",
    );
    for r in records {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {} | {:.1} | {:.1} | {} | {} | {:.0} | {:.0} | {} |",
            r.services,
            r.variant,
            r.conn_rate,
            r.conn_p99_us,
            r.conn_errors,
            r.cpu_us_per_conn,
            r.added_cpu_us_per_conn,
            fmt3(r.conn_rate_vs_baseline),
            fmt3(r.cpu_per_conn_vs_baseline),
            r.transfer_mb_s,
            r.cpu_us_per_mb,
            fmt3(r.transfer_vs_baseline),
        );
    }
    md.push_str(
        "\n### The programs' own cost, and a SYN flood\n\n\
         Our tc programs' run time from the kernel's BPF statistics (`kernel.bpf_stats_enabled`: \
         run_time_ns and run_cnt, ingress and egress together): per connection and per program run over the \
         measured connections, and per run on packets that are not ours: SYNs to a port of the node where no service is \
         (the node's own traffic), and SYNs routed through the node to an address that is not ours (traffic to pods). Then 10,000 spoofed SYNs in 2 s at each variant's nodePort while a client makes 40 \
         connections (8 batches of 5 spread over it, 1 s timeout each): how many failed, and the machine's busy CPU over the flood.\n\n\
         | services | variant | BPF ns/connection | BPF ns/run, service packets | BPF ns/run, to the node | BPF ns/run, through the node | flood: failed / connections | flood CPU ms |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in records.iter().filter(|r| r.variant != "direct") {
        let bpf = |v: f64| {
            if r.variant == OURS {
                format!("{v:.0}")
            } else {
                "-".into()
            }
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} / {} | {:.0} |",
            r.services,
            r.variant,
            bpf(r.bpf_ns_per_conn),
            bpf(r.bpf_ns_per_service_packet),
            bpf(r.bpf_ns_per_other_packet),
            bpf(r.bpf_ns_per_passing_packet),
            r.flood_legit_failed,
            r.flood_legit,
            r.flood_cpu_ms,
        );
    }
    md.push_str(
        "\n### NodePort targets\n\nThroughput \"not below\" allows the noise that direct shows: direct \
         translates nothing, so it is at least as fast as iptables-nft, and where it measures below 1.00 that \
         much is noise; the bar is min(1.00, direct's ratio).\n\n",
    );
    let mut targets = Targets(&mut md);
    for r in records.iter().filter(|r| r.variant == OURS) {
        let n = r.services;
        let direct = records
            .iter()
            .find(|d| d.variant == "direct" && d.services == n);
        let bar = |f: fn(&NodePortRecord) -> [f64; 3]| direct.map_or(1.0, |d| f(d)[0].min(1.0));
        if n >= 10_000 {
            targets.check(
                format!("nodePort CPU per connection <= 0.7 x iptables-nft at {n} services"),
                r.cpu_per_conn_vs_baseline[0] <= 0.7,
                fmt3(r.cpu_per_conn_vs_baseline),
            );
        }
        targets.check(
            format!("nodePort under a SYN flood: at most 1 connection in 20 fails at {n} services"),
            r.flood_legit_failed * 20 <= r.flood_legit,
            format!("{} of {} failed", r.flood_legit_failed, r.flood_legit),
        );
        let rate_bar = bar(|d| d.conn_rate_vs_baseline);
        targets.check(
            format!("nodePort connection rate not below iptables-nft at {n} services"),
            r.conn_rate_vs_baseline[0] >= rate_bar,
            format!("{} (bar {rate_bar:.2})", fmt3(r.conn_rate_vs_baseline)),
        );
        let transfer_bar = bar(|d| d.transfer_vs_baseline);
        targets.check(
            format!("nodePort transfer throughput not below iptables-nft at {n} services"),
            r.transfer_vs_baseline[0] >= transfer_bar,
            format!("{} (bar {transfer_bar:.2})", fmt3(r.transfer_vs_baseline)),
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_leaves_out_idle_and_iowait() {
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  10 1 5 1000 7 2 3 1 0 0\ncpu0 10 1 5 1000 7 2 3 1 0 0\n";
        assert_eq!(busy_of(stat), Some(21.0 * 1e6 / hz));
        assert_eq!(busy_of("intr 5\n"), None);
    }

    #[test]
    fn ratios_are_taken_within_rounds_against_iptables_nft() {
        let s = |rate: f64, cpu: f64| Sample {
            conn_rate: rate,
            cpu_us_per_conn: cpu,
            transfer_mb_s: rate,
            ..Sample::default()
        };
        let mut runs = BTreeMap::new();
        runs.insert("direct".to_string(), vec![s(100.0, 10.0), s(50.0, 10.0)]);
        runs.insert(BASELINE.to_string(), vec![s(50.0, 40.0), s(25.0, 40.0)]);
        runs.insert(OURS.to_string(), vec![s(100.0, 20.0), s(50.0, 20.0)]);
        let records = records_of(10_000, &runs);
        let ours = records.iter().find(|r| r.variant == OURS).unwrap();
        // Rates halve in round 2 for everyone: the ratio stays 2.
        assert_eq!(ours.conn_rate_vs_baseline, [2.0, 2.0, 2.0]);
        assert_eq!(ours.cpu_per_conn_vs_baseline, [0.5, 0.5, 0.5]);
        assert_eq!(ours.added_cpu_us_per_conn, 10.0);
        let md = node_port_report(&records);
        assert!(
            md.contains(
                "* MET nodePort CPU per connection <= 0.7 x iptables-nft at 10000 services: 0.50"
            ),
            "{md}"
        );
        assert!(
            md.contains("* MET nodePort transfer throughput not below iptables-nft"),
            "{md}"
        );
    }
}
