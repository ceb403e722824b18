//! The packet-rate benchmark: UDP datagrams from the client outside the node at a
//! nodePort, as fast as one sender thread goes (`lb-lab udp-flood`), through the
//! NodePort lab ([`super::nodeport`]) with a node per variant: our agent with tc only,
//! with XDP native and with XDP generic, kube-proxy's iptables-nft and nftables, and
//! direct (forwarded to the pods untranslated: the floor, measured twice as an A/A pair).
//!
//! Forwarded means received at the backends: a counter in each pod's namespace
//! (nftables, at prerouting) counts the datagrams to the sink port and drops them, so no
//! server and no ICMP adds to the cost. Then the drop run: datagrams from random sources
//! outside a LoadBalancer's `loadBalancerSourceRanges` at its IP, which every variant
//! must drop.

use std::{collections::BTreeMap, net::SocketAddrV4, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{
    BenchOptions, median,
    nodeport::{BpfStats, NodePortLab, Plan, busy_cpu_us, fmt3, prog_stats, spread},
    report::Targets,
    round_order,
    workload::{LB_IP, PACKET_NODE_PORT, SINK_PORT, node_port_services, packet_services},
};
use crate::{
    kube_proxy_rules::KubeProxy,
    lab::{Lab, place, run},
    pktgen::FloodReport,
};

/// Our variants: the agent with `--acceleration off`, `native` and `generic`.
pub const TC: &str = super::nodeport::OURS;
pub const XDP_NATIVE: &str = "xdp-native";
pub const XDP_GENERIC: &str = "xdp-generic";
/// The A/A pair's second half: direct again.
pub const DIRECT_AA: &str = "direct-aa";
/// What the ratios are taken against, besides tc.
pub const BASELINE: &str = "iptables-nft";

const PLAN: Plan = Plan {
    ours: &[
        (TC, "off"),
        (XDP_NATIVE, "native"),
        (XDP_GENERIC, "generic"),
    ],
    kube_proxy: &[KubeProxy::IptablesNft, KubeProxy::Nftables],
    accept_xdp: true,
};

/// Each run's length.
const RUN_MS: u64 = 2_000;
/// The path check's runs: 300 ms at 20,000 datagrams a second (6,000 datagrams).
const CHECK_MS: u64 = 300;
const CHECK_RATE: Option<u64> = Some(20_000);
/// The forwarding runs' flows (connected sockets, one source port each).
const FLOWS: usize = 64;
/// The drop run's sources: none of them in the LoadBalancer's ranges (the client).
const FLOOD_NET: &str = "198.18.0.0/15";
/// The pods' counters, in each pod's namespace.
const SINK_TABLE: &str = "lbsink";

/// One run: what the generator sent, what reached the pods, the machine's busy CPU, the
/// path's CPU (the sender's own time and its CPU's ksoftirqd's) and our programs' run
/// time meanwhile.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Sample {
    sent: u64,
    received: u64,
    elapsed_ns: u64,
    cpu_us: f64,
    path_ns: u64,
    bpf_ns: u64,
}

impl Sample {
    /// Packets that reached the pods per second (the drop run: packets dropped).
    fn rate(&self, dropped: bool) -> f64 {
        self.counted(dropped) as f64 * 1e9 / self.elapsed_ns.max(1) as f64
    }

    fn counted(&self, dropped: bool) -> u64 {
        if dropped {
            self.sent.saturating_sub(self.received)
        } else {
            self.received
        }
    }

    /// Busy CPU (the whole machine's) per packet counted, in ns.
    fn cpu_ns(&self, dropped: bool) -> f64 {
        self.cpu_us * 1e3 / self.counted(dropped).max(1) as f64
    }

    fn bpf_ns(&self, dropped: bool) -> f64 {
        self.bpf_ns as f64 / self.counted(dropped).max(1) as f64
    }

    /// The path's CPU per packet counted, in ns.
    fn path_ns(&self, dropped: bool) -> f64 {
        self.path_ns as f64 / self.counted(dropped).max(1) as f64
    }

    /// Packets per second of the path's CPU: packets per core.
    fn per_core(&self, dropped: bool) -> f64 {
        1e9 / self.path_ns(dropped)
    }
}

/// One variant at one size: medians over rounds; ratios within each round as [median,
/// min, max] over rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PacketRecord {
    pub variant: String,
    pub services: usize,
    /// Datagrams the client sent per second, and those that reached the pods.
    pub sent_pps: f64,
    pub forwarded_pps: f64,
    /// Per forwarded packet, in ns: the machine's busy CPU (`/proc/stat`: every process
    /// of the machine, other users' too); the path's CPU (the sender process's own time,
    /// which with the kernel's tick accounting includes the softirq work its sends set
    /// off on its CPU, all the way to the pods, plus that CPU's ksoftirqd); that less
    /// direct's in the same round; our programs' own run time (XDP and tc together;
    /// kernel BPF statistics).
    pub cpu_ns_per_packet: f64,
    #[serde(default)]
    pub path_ns_per_packet: f64,
    #[serde(default)]
    pub added_path_ns_per_packet: f64,
    pub bpf_ns_per_packet: f64,
    /// Forwarded packets per core (per second of the path's CPU), and forwarded packets
    /// per second, as ratios to direct, to tc and to iptables-nft.
    pub per_core_vs_direct: [f64; 3],
    pub per_core_vs_tc: [f64; 3],
    pub per_core_vs_baseline: [f64; 3],
    pub pps_vs_direct: [f64; 3],
    pub pps_vs_tc: [f64; 3],
    pub pps_vs_baseline: [f64; 3],
    /// The drop run (not direct): packets dropped per second, CPU and BPF ns per packet
    /// dropped, packets that reached the pods anyway (summed over rounds), and packets
    /// dropped per core as ratios to tc and iptables-nft.
    pub drop_pps: f64,
    pub drop_cpu_ns_per_packet: f64,
    #[serde(default)]
    pub drop_path_ns_per_packet: f64,
    pub drop_bpf_ns_per_packet: f64,
    pub drop_leaked: u64,
    pub drop_per_core_vs_tc: [f64; 3],
    pub drop_per_core_vs_baseline: [f64; 3],
}

/// The sink: in each pod's namespace a named counter of the datagrams to
/// [`SINK_PORT`], which are dropped before any socket sees them.
fn install_sinks(backends: &Lab) -> anyhow::Result<()> {
    let rules = format!(
        "add table ip {SINK_TABLE}\n\
         add counter ip {SINK_TABLE} received\n\
         add chain ip {SINK_TABLE} prerouting {{ type filter hook prerouting priority -300 ; }}\n\
         add rule ip {SINK_TABLE} prerouting udp dport {SINK_PORT} counter name received drop\n"
    );
    for pod in &backends.pods {
        crate::lab::run_with_input(
            Command::new("ip").args(["netns", "exec", &pod.netns.name, "nft", "-f", "-"]),
            &rules,
        )
        .with_context(|| format!("the sink counter in {}", pod.name))?;
    }
    Ok(())
}

/// The packets the pods' sinks have counted so far.
fn received(backends: &Lab) -> anyhow::Result<u64> {
    let mut total = 0;
    for pod in &backends.pods {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            &pod.netns.name,
            "nft",
            "-j",
            "list",
            "counter",
            "ip",
            SINK_TABLE,
            "received",
        ]))?;
        total += counter_packets(&out)
            .with_context(|| format!("the sink counter of {} in {out:?}", pod.name))?;
    }
    Ok(total)
}

/// The packets of the one counter in `nft -j list counter`'s output.
fn counter_packets(json: &str) -> anyhow::Result<u64> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|o| o["counter"]["packets"].as_u64())
        .context("no counter")
}

/// Our packet-level programs' (run_time_ns, run_cnt) under `pin`, by program (XDP and
/// tc).
fn packet_progs(pin: &std::path::Path) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    Ok(prog_stats(pin)?
        .into_iter()
        .filter(|(name, _)| name.starts_with("lb_tc_") || name.starts_with("lb_xdp"))
        .collect())
}

/// The programs' summed run time between two [`packet_progs`] readings, and a line
/// saying how often each ran per packet sent and for how long per run.
fn prog_delta(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    sent: u64,
) -> (u64, String) {
    let mut total = 0;
    let mut line = Vec::new();
    for (name, (ns, cnt)) in after {
        let (ns0, cnt0) = before.get(name).copied().unwrap_or_default();
        let (ns, cnt) = (ns.saturating_sub(ns0), cnt.saturating_sub(cnt0));
        total += ns;
        line.push(format!(
            "{name} {:.2} runs/packet {:.0} ns/run",
            cnt as f64 / sent.max(1) as f64,
            ns as f64 / cnt.max(1) as f64
        ));
    }
    (total, line.join(", "))
}

/// The CPU time of `cpu`'s ksoftirqd so far (user and system), in ns: softirq work
/// that the kernel deferred to it instead of doing it on the way out of a send.
fn ksoftirqd_ns(cpu: usize) -> anyhow::Result<u64> {
    let name = format!("ksoftirqd/{cpu}");
    for entry in std::fs::read_dir("/proc")
        .context("listing /proc")?
        .flatten()
    {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat"))?;
        return task_cpu_ns(&stat).with_context(|| format!("{name}'s stat {stat:?}"));
    }
    bail!("no {name} thread")
}

/// utime + stime of a `/proc/PID/stat` line, in ns.
fn task_cpu_ns(stat: &str) -> Option<u64> {
    // The fields after the command, which may hold spaces, start with the state (3).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000_000 / hz)
}

/// The CPU the generator runs on: the last one (see `sequential_cpu` in the socket
/// benchmark), so that a run's path (sender, bridge, node, pods) stays on one CPU.
fn sender_cpu() -> Option<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus > 1).then_some(cpus - 1)
}

/// The packet-rate lab: the NodePort lab with the packets plan and sinks.
struct PacketLab {
    lab: NodePortLab,
    lab_bin: std::path::PathBuf,
}

impl PacketLab {
    fn new(opts: &BenchOptions, n: usize) -> anyhow::Result<Self> {
        let lab = NodePortLab::new(opts, &PLAN, &|pods| {
            let mut ports = node_port_services(n, pods);
            ports.extend(packet_services(pods));
            ports
        })?;
        install_sinks(&lab.backends)?;
        Ok(Self {
            lab,
            lab_bin: opts.lab_bin.clone(),
        })
    }

    /// The node a variant's packets go through (the A/A pair's: direct's).
    fn node_of(&self, variant: &str) -> &super::nodeport::Node {
        self.lab.node(if variant == DIRECT_AA {
            "direct"
        } else {
            variant
        })
    }

    /// Where a variant's forwarding run sends: the pods through the direct node, or
    /// the node's nodePort.
    fn forward_targets(&self, variant: &str) -> Vec<SocketAddrV4> {
        if variant == "direct" || variant == DIRECT_AA {
            return self
                .lab
                .backends
                .pods
                .iter()
                .map(|p| SocketAddrV4::new(p.ip, SINK_PORT))
                .collect();
        }
        vec![SocketAddrV4::new(
            self.node_of(variant).addr,
            PACKET_NODE_PORT,
        )]
    }

    /// The LoadBalancer IP routed via `variant`'s node.
    fn route_lb_via(&self, variant: &str) -> anyhow::Result<()> {
        let via = self.node_of(variant).addr.to_string();
        self.lab
            .client
            .ip(&["route", "replace", &format!("{LB_IP}/32"), "via", &via])
    }

    /// `lb-lab udp-flood` in the client's namespace.
    fn flood(
        &self,
        targets: &[SocketAddrV4],
        source_net: Option<&str>,
        ms: u64,
        rate: Option<u64>,
    ) -> anyhow::Result<FloodReport> {
        let mut cmd = Command::new(&self.lab_bin);
        cmd.arg("udp-flood");
        for t in targets {
            cmd.args(["--target", &t.to_string()]);
        }
        cmd.args(["--duration-ms", &ms.to_string()])
            .args(["--flows", &FLOWS.to_string()]);
        if let Some(net) = source_net {
            cmd.args(["--source-net", net]);
        }
        if let Some(rate) = rate {
            cmd.args(["--rate", &rate.to_string()]);
        }
        if let Some(cpu) = sender_cpu() {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        place(&mut cmd, &self.lab.client, None)?;
        let out = run(&mut cmd)?;
        serde_json::from_str(out.trim()).with_context(|| format!("udp-flood printed {out:?}"))
    }

    /// One run of `ms` against `variant`: forwarding, or (`source_net`) the drop run; as
    /// fast as the sender goes, or paced at `rate` datagrams a second.
    fn sample(
        &self,
        variant: &str,
        targets: &[SocketAddrV4],
        source_net: Option<&str>,
        ms: u64,
        rate: Option<u64>,
    ) -> anyhow::Result<Sample> {
        let pin = self.lab.agent(variant).map(|a| a.pin_path.clone());
        let received_before = received(&self.lab.backends)?;
        let bpf_before = pin.as_deref().map(packet_progs).transpose()?;
        let cpu = sender_cpu().unwrap_or(0);
        let softirq_before = ksoftirqd_ns(cpu)?;
        let cpu_before = busy_cpu_us()?;
        let report = self.flood(targets, source_net, ms, rate)?;
        // What is still on its way lands (the pods are two hops on).
        std::thread::sleep(Duration::from_millis(50));
        let cpu_us = busy_cpu_us()? - cpu_before;
        let softirq_ns = ksoftirqd_ns(cpu)?.saturating_sub(softirq_before);
        let bpf_ns = match (pin.as_deref(), bpf_before) {
            (Some(pin), Some(before)) => {
                let (ns, line) = prog_delta(&before, &packet_progs(pin)?, report.sent);
                eprintln!("bench: packets via {variant}: {line}");
                ns
            }
            _ => 0,
        };
        let received = received(&self.lab.backends)? - received_before;
        Ok(Sample {
            sent: report.sent,
            received,
            elapsed_ns: report.elapsed_ns,
            cpu_us,
            path_ns: report.cpu_ns + softirq_ns,
            bpf_ns,
        })
    }

    /// A short paced run per variant: each forwards at least three quarters of what it is
    /// sent (the paths work and are warm), and the LoadBalancer IP forwards the client
    /// (inside its ranges) through each node that the drop run floods. Paced, because a
    /// flood loses datagrams wherever a queue is full (the veth rings, before any program
    /// runs), the more so on a busy machine: that is the runs' measure, not a broken path.
    /// A path that does not forward, or forwards to one node's pods only, still fails.
    fn check_paths(&self, forward: &[&str], drop: &[&str]) -> anyhow::Result<()> {
        let check = |what: String, s: Sample| {
            eprintln!("bench: path check, {what}: {} of {}", s.received, s.sent);
            if s.received * 4 < s.sent * 3 || s.sent == 0 {
                bail!(
                    "{what}: {} of {} datagrams reached the pods",
                    s.received,
                    s.sent
                );
            }
            Ok(())
        };
        for v in forward {
            let s = self.sample(v, &self.forward_targets(v), None, CHECK_MS, CHECK_RATE)?;
            check(format!("packets via {v}"), s)?;
        }
        for v in drop {
            self.route_lb_via(v)?;
            let lb = [SocketAddrV4::new(LB_IP, SINK_PORT)];
            let s = self.sample(v, &lb, None, CHECK_MS, CHECK_RATE)?;
            check(format!("the LoadBalancer IP via {v}, from the client"), s)?;
        }
        Ok(())
    }
}

/// The forwarding runs' variants and the drop run's.
const FORWARD: [&str; 7] = [
    "direct",
    DIRECT_AA,
    TC,
    XDP_NATIVE,
    XDP_GENERIC,
    "iptables-nft",
    "nftables",
];
const DROP: [&str; 5] = [TC, XDP_NATIVE, XDP_GENERIC, "iptables-nft", "nftables"];

/// Each variant's samples, round by round: forwarding and the drop run.
type Runs = BTreeMap<String, (Vec<Sample>, Vec<Sample>)>;

/// `lb-lab bench`'s packet-rate part at `n` services.
pub fn bench_packets(opts: &BenchOptions, n: usize) -> anyhow::Result<Vec<PacketRecord>> {
    eprintln!("bench: packets, {n} services: creating the nodes");
    let lab = PacketLab::new(opts, n)?;
    lab.check_paths(&FORWARD, &DROP)?;
    let _stats = BpfStats::enable()?;
    let mut runs = Runs::new();
    let flood_target = [SocketAddrV4::new(LB_IP, SINK_PORT)];
    for round in 0..opts.rounds {
        eprintln!("bench: packets, {n} services: round {}", round + 1);
        for v in round_order(FORWARD.len(), round)
            .into_iter()
            .map(|k| FORWARD[k])
        {
            let s = lab.sample(v, &lab.forward_targets(v), None, RUN_MS, None)?;
            runs.entry(v.into()).or_default().0.push(s);
        }
        for v in round_order(DROP.len(), round).into_iter().map(|k| DROP[k]) {
            lab.route_lb_via(v)?;
            let s = lab.sample(v, &flood_target, Some(FLOOD_NET), RUN_MS, None)?;
            runs.entry(v.into()).or_default().1.push(s);
        }
    }
    Ok(records_of(n, &runs))
}

/// Ratios of `f` over the rounds of `v` to those of `base`, round by round.
fn ratios(v: &[Sample], base: Option<&Vec<Sample>>, f: impl Fn(&Sample) -> f64) -> [f64; 3] {
    let Some(base) = base.filter(|b| !b.is_empty() && !v.is_empty()) else {
        return [f64::NAN; 3];
    };
    spread(v.iter().zip(base).map(|(s, b)| f(s) / f(b)).collect())
}

/// Medians over rounds, ratios within rounds.
fn records_of(n: usize, runs: &Runs) -> Vec<PacketRecord> {
    let fwd = |v: &str| runs.get(v).map(|r| &r.0);
    let drop = |v: &str| runs.get(v).map(|r| &r.1);
    let med = |v: &[Sample], f: &dyn Fn(&Sample) -> f64| median(v.iter().map(f).collect());
    runs.iter()
        .map(|(variant, (f, d))| {
            let core = |s: &Sample| s.per_core(false);
            let pps = |s: &Sample| s.rate(false);
            let drop_core = |s: &Sample| s.per_core(true);
            PacketRecord {
                variant: variant.clone(),
                services: n,
                sent_pps: med(f, &|s| s.sent as f64 * 1e9 / s.elapsed_ns.max(1) as f64),
                forwarded_pps: med(f, &pps),
                cpu_ns_per_packet: med(f, &|s| s.cpu_ns(false)),
                path_ns_per_packet: med(f, &|s| s.path_ns(false)),
                added_path_ns_per_packet: fwd("direct").map_or(f64::NAN, |direct| {
                    median(
                        f.iter()
                            .zip(direct)
                            .map(|(s, d)| s.path_ns(false) - d.path_ns(false))
                            .collect(),
                    )
                }),
                bpf_ns_per_packet: med(f, &|s| s.bpf_ns(false)),
                per_core_vs_direct: ratios(f, fwd("direct"), core),
                per_core_vs_tc: ratios(f, fwd(TC), core),
                per_core_vs_baseline: ratios(f, fwd(BASELINE), core),
                pps_vs_direct: ratios(f, fwd("direct"), pps),
                pps_vs_tc: ratios(f, fwd(TC), pps),
                pps_vs_baseline: ratios(f, fwd(BASELINE), pps),
                drop_pps: med(d, &|s| s.rate(true)),
                drop_cpu_ns_per_packet: med(d, &|s| s.cpu_ns(true)),
                drop_path_ns_per_packet: med(d, &|s| s.path_ns(true)),
                drop_bpf_ns_per_packet: med(d, &|s| s.bpf_ns(true)),
                drop_leaked: d.iter().map(|s| s.received).sum(),
                drop_per_core_vs_tc: ratios(d, drop(TC), drop_core),
                drop_per_core_vs_baseline: ratios(d, drop(BASELINE), drop_core),
            }
        })
        .collect()
}

/// A ratio [median, min, max], or "-" where there is none.
fn cell(r: [f64; 3]) -> String {
    if r[0].is_nan() { "-".into() } else { fmt3(r) }
}

/// The packet-rate section of report.md: the forwarding table, the drop run's, the
/// targets.
pub fn packets_report(records: &[PacketRecord]) -> String {
    use std::fmt::Write as _;
    let mut md = String::from(
        "\n## Packet rate from outside the node\n\n\
         One sender thread (on the last CPU) sends 46-byte UDP datagrams over 64 flows at a nodePort for 2 s, as fast \
         as it can; the backends are on another node, so the node DNATs and SNATs. Forwarded: datagrams that reached \
         the pods (a counter in each pod's namespace, which drops them: no server, no ICMP). Each variant has a node of \
         its own; tc-lb is our agent with `--acceleration off`, xdp-native and xdp-generic with XDP. direct sends to the \
         pods through a node that translates nothing, twice (direct-aa): the A/A pair's ratio is the noise floor. Per \
         forwarded packet: machine CPU is the machine's busy time (`/proc/stat`, other users of the machine included); \
         path CPU is the sender's own CPU time plus its CPU's ksoftirqd's: the kernel runs a packet's whole way (client, \
         bridge, node, backends' node, pod) on the sender's CPU, in the softirq its send sets off, which its tick \
         accounting charges to the sender; \"added\" is path CPU less direct's in the same round; BPF ns is our programs' \
         own run time (XDP and tc together). Packets per core: forwarded packets per second of path CPU. Ratios within \
         each round: median (min–max over rounds).\n\n\
         | services | variant | sent/s | forwarded/s | machine CPU ns/packet | path CPU ns/packet | added ns/packet | BPF ns/packet | per core vs tc | per core vs ipt-nft | forwarded/s vs tc | forwarded/s vs ipt-nft |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---|---|---|---|\n",
    );
    for r in records {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
            r.services,
            r.variant,
            r.sent_pps,
            r.forwarded_pps,
            r.cpu_ns_per_packet,
            r.path_ns_per_packet,
            r.added_path_ns_per_packet,
            r.bpf_ns_per_packet,
            cell(r.per_core_vs_tc),
            cell(r.per_core_vs_baseline),
            cell(r.pps_vs_tc),
            cell(r.pps_vs_baseline),
        );
    }
    for r in records.iter().filter(|r| r.variant == DIRECT_AA) {
        let _ = writeln!(
            md,
            "\nA/A floor at {} services (direct-aa / direct): packets per core {}, forwarded/s {}.",
            r.services,
            cell(r.per_core_vs_direct),
            cell(r.pps_vs_direct)
        );
    }
    md.push_str(
        "\n### Drop run: a flood from outside a LoadBalancer's source ranges\n\n\
         One sender thread sends datagrams from random sources of 198.18.0.0/15 at a LoadBalancer IP whose \
         `loadBalancerSourceRanges` admit the client alone, for 2 s: every variant must drop them all (kube-proxy in \
         its firewall chains, our agent in tc or XDP). Dropped/s; machine CPU, path CPU and our programs' run time \
         per dropped packet; leaked: flood packets that reached the pods (all rounds); packets dropped per second of \
         path CPU as ratios.\n\n\
         | services | variant | dropped/s | machine CPU ns/packet | path CPU ns/packet | BPF ns/packet | leaked | per core vs tc | per core vs ipt-nft |\n\
         |---:|---|---:|---:|---:|---:|---:|---|---|\n",
    );
    for r in records.iter().filter(|r| r.drop_pps > 0.0) {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            r.services,
            r.variant,
            r.drop_pps,
            r.drop_cpu_ns_per_packet,
            r.drop_path_ns_per_packet,
            r.drop_bpf_ns_per_packet,
            r.drop_leaked,
            cell(r.drop_per_core_vs_tc),
            cell(r.drop_per_core_vs_baseline),
        );
    }
    packet_targets(&mut md, records);
    md
}

/// The packet-rate goals, per size.
fn packet_targets(md: &mut String, records: &[PacketRecord]) {
    md.push_str(
        "\n### Packet-rate targets\n\nPackets per core is per second of the path's CPU, the sender's included: the sender \
         and the way to the node cost every variant alike, so a node that cost nothing would still not double it. The drop run's bar is \
         2x iptables-nft's packets dropped per core (\"far ahead\"), with no flood packet reaching a pod.\n\n",
    );
    let mut targets = Targets(md);
    for r in records.iter().filter(|r| r.variant == XDP_NATIVE) {
        let n = r.services;
        let floor = records
            .iter()
            .find(|a| a.variant == DIRECT_AA && a.services == n)
            .map_or(String::new(), |a| {
                format!(
                    " (A/A floor {:.2}–{:.2})",
                    a.per_core_vs_direct[1], a.per_core_vs_direct[2]
                )
            });
        targets.check(
            format!("XDP native at least 2x tc in packets per second per core at {n} services"),
            r.per_core_vs_tc[0] >= 2.0,
            format!("{}{floor}", cell(r.per_core_vs_tc)),
        );
        targets.check(
            format!("drop run: XDP native at least 2x iptables-nft in packets dropped per core, none leaked, at {n} services"),
            r.drop_per_core_vs_baseline[0] >= 2.0 && r.drop_leaked == 0,
            format!("{}, {} leaked", cell(r.drop_per_core_vs_baseline), r.drop_leaked),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(received: u64, cpu_us: f64) -> Sample {
        Sample {
            sent: 1000,
            received,
            elapsed_ns: 1_000_000,
            cpu_us: cpu_us * 2.0,
            path_ns: (cpu_us * 1e3) as u64,
            bpf_ns: 50_000,
        }
    }

    #[test]
    fn per_core_and_rates_count_forwarded_or_dropped_packets() {
        let x = s(800, 1000.0);
        assert_eq!(x.rate(false), 800_000.0);
        assert_eq!(x.rate(true), 200_000.0);
        assert_eq!(x.path_ns(false), 1250.0);
        assert_eq!(x.path_ns(true), 5000.0);
        assert_eq!(x.cpu_ns(false), 2500.0);
        assert_eq!(x.per_core(false), 800_000.0);
        assert_eq!(x.bpf_ns(false), 62.5);
    }

    #[test]
    fn ratios_are_per_core_within_rounds_against_tc_and_iptables_nft() {
        let mut runs = Runs::new();
        // Round 2 halves everyone's rate: ratios stay.
        runs.insert(
            "direct".into(),
            (vec![s(1000, 500.0), s(500, 250.0)], vec![]),
        );
        runs.insert(
            DIRECT_AA.into(),
            (vec![s(1000, 550.0), s(500, 250.0)], vec![]),
        );
        runs.insert(
            TC.into(),
            (vec![s(1000, 1000.0), s(500, 500.0)], vec![s(0, 1000.0); 2]),
        );
        runs.insert(
            XDP_NATIVE.into(),
            (vec![s(1000, 400.0), s(500, 200.0)], vec![s(0, 200.0); 2]),
        );
        runs.insert(
            BASELINE.into(),
            (
                vec![s(1000, 2000.0), s(500, 1000.0)],
                vec![s(0, 800.0), s(1, 800.0)],
            ),
        );
        let records = records_of(100, &runs);
        let r = |v: &str| records.iter().find(|r| r.variant == v).unwrap();
        let xdp = r(XDP_NATIVE);
        assert_eq!(xdp.per_core_vs_tc, [2.5, 2.5, 2.5]);
        assert_eq!(xdp.per_core_vs_baseline, [5.0, 5.0, 5.0]);
        assert_eq!(xdp.pps_vs_tc, [1.0, 1.0, 1.0]);
        assert_eq!(xdp.drop_per_core_vs_tc, [5.0, 5.0, 5.0]);
        assert_eq!(r(BASELINE).drop_leaked, 1);
        assert!(
            r("direct").drop_per_core_vs_tc[0].is_nan(),
            "direct has no drop run"
        );
        let aa = r(DIRECT_AA).per_core_vs_direct;
        assert!(
            (aa[1] - 500.0 / 550.0).abs() < 1e-9 && aa[2] == 1.0,
            "{aa:?}"
        );
        let md = packets_report(&records);
        assert!(
            md.contains("* MET XDP native at least 2x tc in packets per second per core at 100 services: 2.50 (2.50–2.50) (A/A floor 0.91–1.00)"),
            "{md}"
        );
        assert!(
            md.contains("* MET drop run: XDP native at least 2x iptables-nft"),
            "{md}"
        );
        assert!(
            md.contains(
                "A/A floor at 100 services (direct-aa / direct): packets per core 0.95 (0.91–1.00)"
            ),
            "{md}"
        );
        // direct has no row in the drop table.
        let drop_table = md.split("### Drop run").nth(1).unwrap();
        assert!(!drop_table.contains("| direct |"), "{md}");
    }

    #[test]
    fn a_tasks_cpu_time_is_its_utime_and_stime() {
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let stat = "24 (ksoftirqd/1) S 2 0 0 0 -1 69238848 0 0 0 0 7 5 0 0 20 0 1 0 9 0 0";
        assert_eq!(task_cpu_ns(stat), Some(12 * 1_000_000_000 / hz));
        let odd = "9 (a) b) R 2 0 0 0 -1 0 0 0 0 0 1 2 0 0";
        assert_eq!(task_cpu_ns(odd), Some(3 * 1_000_000_000 / hz));
        assert_eq!(task_cpu_ns("garbage"), None);
    }

    #[test]
    fn program_run_times_are_summed_between_readings() {
        let before = BTreeMap::from([("lb_xdp".to_string(), (1000, 10))]);
        let after = BTreeMap::from([
            ("lb_xdp".to_string(), (3000, 20)),
            ("lb_tc_egress".to_string(), (500, 5)),
        ]);
        let (ns, line) = prog_delta(&before, &after, 10);
        assert_eq!(ns, 2500);
        assert_eq!(
            line,
            "lb_tc_egress 0.50 runs/packet 100 ns/run, lb_xdp 1.00 runs/packet 200 ns/run"
        );
    }

    #[test]
    fn the_sink_counter_is_read_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "ip", "name": "received", "table": "lbsink", "handle": 1, "packets": 42, "bytes": 0}}]}"#;
        assert_eq!(counter_packets(json).unwrap(), 42);
        assert!(counter_packets(r#"{"nftables": []}"#).is_err());
    }
}
