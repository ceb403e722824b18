//! `cargo xtask bench`: our socket-level load balancer side by side with a direct
//! connection (the limit) and with kube-proxy's iptables (nf_tables and legacy backends)
//! and nftables modes, each in a lab of its own, variants interleaved round by round;
//! then the NodePort path from outside the node ([`nodeport`]), our tc programs against
//! the same kube-proxy modes. Writes `results.json`, `control_plane.json`,
//! `nodeport.json`, `report.md` and `rates.svg`.

mod api_source;
mod closer;
mod concurrent;
mod nodeport;
mod packets;
mod report;
mod workload;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
pub use concurrent::ConcurrentRecord;
pub(crate) use nodeport::busy_cpu_us;
use nodeport::spread;
pub use report::{report, svg};
use serde::{Deserialize, Serialize};
use workload::{ENDPOINTS, churn, manifests, service_ip, services};

use crate::{
    kube_proxy_rules::{KubeProxy, SvcPort},
    lab::{AgentProcess, Cgroup, ChildGuard, Lab, Netns, place, run},
    load::{LoadMode, LoadReport, LoadSpec},
};

pub const POSITIONS: [&str; 3] = ["first", "middle", "last"];

/// The variants beside `direct`: the same connections to the pods from a second cgroup
/// without programs (the A/A control: its ratio to direct is the noise), and from the
/// cgroup with our programs attached (what the hooks cost connections to no service).
pub const DIRECT_AA: &str = "direct-aa";
pub const DIRECT_HOOKED: &str = "direct-hooked";

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub count: usize,
    pub changes: usize,
    pub out: PathBuf,
    pub lab_bin: PathBuf,
    pub agent_bin: PathBuf,
    /// MB echoed by the NodePort benchmark's bulk transfer.
    pub transfer_mb: u64,
    /// Which benchmarks: "socket", "nodeport", "control" (our agent's cold start and
    /// changes only; part of "socket"), "closer" (the stale-socket closer), "packets"
    /// (the packet rate from outside the node, tc against XDP and kube-proxy).
    pub paths: Vec<String>,
}

/// One line of results.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub variant: String,
    pub services: usize,
    pub proto: String,
    /// Where the measured service sits among the others ("-" for direct).
    pub position: String,
    /// Requests per second (median over rounds).
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Median over rounds of (this rate / direct's rate in the same round).
    pub rate_vs_direct: f64,
    /// Median over rounds of (this p99 / direct's p99 in the same round).
    pub p99_vs_direct: f64,
    /// The least and the most of those ratios over rounds.
    #[serde(default = "nan")]
    pub rate_vs_direct_min: f64,
    #[serde(default = "nan")]
    pub rate_vs_direct_max: f64,
    #[serde(default = "nan")]
    pub p99_vs_direct_min: f64,
    #[serde(default = "nan")]
    pub p99_vs_direct_max: f64,
    /// The machine's busy CPU during the runs, in cores (median over rounds): one
    /// sequential client and its server keep about one core busy; more is other load.
    #[serde(default = "nan")]
    pub busy_cores: f64,
    /// The client's own CPU per request (µs, median over rounds), and its ratio to
    /// direct's in the same round [median, min, max]: what the translation costs the
    /// client, which other load barely moves.
    #[serde(default = "nan")]
    pub client_cpu_us: f64,
    #[serde(default)]
    pub client_cpu_vs_direct: [f64; 3],
}

fn nan() -> f64 {
    f64::NAN
}

/// Control-plane measurements for one size.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlPlane {
    pub services: usize,
    pub endpoints: usize,
    /// Our cold sync, split: reading the manifests, model, diff, map writes.
    pub cold_read_ms: f64,
    pub cold_program_ms: f64,
    pub cold_write_ms: f64,
    /// The cold sync's own elapsed time, and the time from the agent's start to it.
    #[serde(default)]
    pub cold_elapsed_ms: f64,
    #[serde(default)]
    pub start_to_sync_ms: f64,
    /// Full rule loads of the kube-proxy variants (ms), by variant.
    pub cold_rules_ms: BTreeMap<String, f64>,
    /// One EndpointSlice change to the first connection reaching the new backend, by
    /// variant: [p50, p99] in ms.
    pub change_ms: BTreeMap<String, [f64; 2]>,
    /// The first change after the start (not in `change_ms`): the agent's watch or poll,
    /// or kube-proxy's first partial load, still settling in.
    #[serde(default)]
    pub first_change_ms: BTreeMap<String, f64>,
    /// Each socket program's own cost per call (ns) from the kernel's BPF statistics,
    /// over connections (TCP) or datagrams (UDP) to one service: "lb_connect4 (TCP)".
    #[serde(default)]
    pub hook_ns_per_call: BTreeMap<String, f64>,
    pub agent_rss_mib: f64,
    pub maps_memlock_mib: f64,
    /// The same agent, on the same objects served by the (fake) Kubernetes API.
    #[serde(default)]
    pub api: Option<api_source::ApiFigures>,
}

/// A cold sync as the agent logs it (ms), and when it came.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ColdSync {
    pub read_ms: f64,
    /// model + diff + map writes.
    pub program_ms: f64,
    pub write_ms: f64,
    pub elapsed_ms: f64,
    /// From the agent's start to its first " synced" log line.
    pub start_to_sync_ms: f64,
}

impl ColdSync {
    /// The first " synced" line of `agent`'s log, which started at `started`.
    fn of(agent: &AgentProcess, started: SystemTime) -> Self {
        let log = agent.log();
        let first = log.lines().find(|l| l.contains(" synced")).unwrap_or("");
        let ms = |key| log_field(first, key).unwrap_or(f64::NAN) / 1e3;
        let start_to_sync_ms = log_time_of_day(first).map_or(f64::NAN, |at| {
            (at - secs_of_day(started)).rem_euclid(86_400.0) * 1e3
        });
        Self {
            read_ms: ms("read_us"),
            program_ms: ms("model_us") + ms("plan_us") + ms("write_us"),
            write_ms: ms("write_us"),
            elapsed_ms: ms("elapsed_us"),
            start_to_sync_ms,
        }
    }
}

/// Starts our agent on `source` (its flags) in `base`'s client cgroup, pinning under
/// `pin`, with no minimum sync period; waits for its first sync and returns its times.
fn start_agent(
    opts: &BenchOptions,
    base: &Lab,
    source: &[&std::ffi::OsStr],
    pin: &Path,
    log: &Path,
) -> anyhow::Result<(AgentProcess, ColdSync)> {
    let mut args = source.to_vec();
    args.extend(["--min-sync-period", "0s", "--poll-interval-ms", "1"].map(std::ffi::OsStr::new));
    let started = SystemTime::now();
    let mut agent = AgentProcess::start(&opts.agent_bin, &args, &base.cgroup.path, pin, log)?;
    agent.wait_synced(1, Duration::from_secs(120))?;
    let cold = ColdSync::of(&agent, started);
    Ok((agent, cold))
}

/// Seconds since midnight (UTC) of a log line's RFC 3339 timestamp
/// ("2026-01-02T03:04:05.123456Z  INFO ...").
fn log_time_of_day(line: &str) -> Option<f64> {
    let time = line.get(11..)?.split(['Z', '+', ' ']).next()?;
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// Seconds since midnight (UTC) of `t`.
fn secs_of_day(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(f64::NAN, |d| d.as_secs_f64().rem_euclid(86_400.0))
}

/// A lab whose node has kube-proxy's rules and a route for the service range.
struct RulesLab {
    mode: KubeProxy,
    lab: Lab,
}

fn make_lab(opts: &BenchOptions, tag: &str) -> anyhow::Result<Lab> {
    let lab = Lab::new_with(&opts.lab_bin, tag, ENDPOINTS, 8080, &["--bench"])?;
    lab.node.sysctl("net.ipv4.tcp_tw_reuse=1")?;
    Ok(lab)
}

/// The middle value; the mean of the two middle ones for an even count.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// Runs the load generator in `netns` and `cgroup`. Every variant's client runs in a
/// fresh cgroup of its own (ours with the programs attached, the others without), so no
/// variant pays for another's cgroup.
fn run_load(
    lab_bin: &Path,
    netns: &Netns,
    cgroup: Option<&Cgroup>,
    targets: &[SocketAddr],
    count: usize,
    mode: LoadMode,
) -> anyhow::Result<LoadReport> {
    run_spec(lab_bin, netns, cgroup, &LoadSpec::new(targets, count, mode))
}

/// [`run_load`] as `spec` says (warm-up, concurrent clients).
fn run_spec(
    lab_bin: &Path,
    netns: &Netns,
    cgroup: Option<&Cgroup>,
    spec: &LoadSpec,
) -> anyhow::Result<LoadReport> {
    let mut cmd = Command::new(lab_bin);
    cmd.args(spec.args());
    place(&mut cmd, netns, cgroup)?;
    let out = run(&mut cmd)?;
    serde_json::from_str(out.trim()).with_context(|| format!("load printed {out:?}"))
}

/// A waiter process (see [`crate::load::waiter`]) in a lab's node namespace.
struct Waiter {
    child: ChildGuard,
    reader: BufReader<std::process::ChildStdout>,
}

impl Waiter {
    fn start(lab: &Lab, target: SocketAddr, cgroup: &Cgroup) -> anyhow::Result<Self> {
        let mut cmd = Command::new(&lab.lab_bin);
        cmd.args(["waiter", "--target", &target.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        place(&mut cmd, &lab.node, Some(cgroup))?;
        let mut child = ChildGuard(cmd.spawn().context("starting the waiter")?);
        let reader = BufReader::new(child.0.stdout.take().expect("piped"));
        Ok(Self { child, reader })
    }

    /// Asks for `name` and waits for the answer.
    fn wait_for(&mut self, name: &str) -> anyhow::Result<()> {
        let stdin = self.child.0.stdin.as_mut().expect("piped");
        writeln!(stdin, "{name}")?;
        stdin.flush()?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.trim() != "ok" {
            bail!("the waiter never reached {name} ({line:?})");
        }
        Ok(())
    }
}

fn log_field(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn vm_hwm_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn maps_memlock_mib(pin: &Path) -> f64 {
    let mut total = 0.0;
    for name in lb_common::PINNED_MAPS {
        let out = run(Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(pin.join(name)));
        if let Ok(v) = out.and_then(|o| Ok(serde_json::from_str::<serde_json::Value>(&o)?)) {
            total += v["bytes_memlock"].as_f64().unwrap_or(0.0);
        }
    }
    total / (1024.0 * 1024.0)
}

/// Every variant measured at one size: the labs, our agent and kube-proxy's rules on the
/// same services, the request rates round by round (one client, then one per core), then
/// the endpoint changes; then our agent again on the API source.
fn bench_size(opts: &BenchOptions, n: usize, out: &mut Outputs) -> anyhow::Result<()> {
    let mut cp = ControlPlane {
        services: n,
        endpoints: n * ENDPOINTS,
        ..Default::default()
    };
    eprintln!("bench: {n} services: creating labs");
    let base = make_lab(opts, "bb")?;
    // The direct clients' cgroups: no programs attached.
    let plain = Cgroup::create(&format!("{}-plain", base.prefix))?;
    let plain_aa = Cgroup::create(&format!("{}-plain-aa", base.prefix))?;
    let pods: Vec<Ipv4Addr> = base.pods.iter().map(|p| p.ip).collect();
    let (ports, measured) = services(n, &pods);
    let ours = OurAgent::start(opts, &base, &ports, &pods, &mut cp)?;
    let rule_labs = rules_labs(opts, n, &ports, &pods, &mut cp)?;
    let direct_targets: Vec<SocketAddr> = pods
        .iter()
        .map(|p| SocketAddr::new((*p).into(), 8080))
        .collect();
    let direct = |name: &str, cgroup| Variant {
        name: name.into(),
        position: "-".into(),
        lab: &base,
        targets: direct_targets.clone(),
        cgroup,
    };
    let mut variants = vec![
        direct("direct", &plain),
        direct(DIRECT_AA, &plain_aa),
        direct(DIRECT_HOOKED, &base.cgroup),
    ];
    for (i, pos) in &measured {
        let vip = vec![SocketAddr::new(service_ip(*i).into(), 80)];
        variants.push(Variant {
            name: "socket-lb".into(),
            position: (*pos).into(),
            lab: &base,
            targets: vip.clone(),
            cgroup: &base.cgroup,
        });
        variants.extend(rule_labs.iter().map(|rl| Variant {
            name: rl.mode.name().into(),
            position: (*pos).into(),
            lab: &rl.lab,
            targets: vip.clone(),
            cgroup: &rl.lab.cgroup,
        }));
    }
    let all: Vec<&Variant<'_>> = variants.iter().collect();
    for mode in [LoadMode::Tcp, LoadMode::Udp] {
        let runs = measure_rates(opts, n, &load_spec(opts, mode, 1), &all)?;
        out.records.extend(records_of(n, mode, &runs));
    }
    out.concurrent
        .extend(concurrent::measure(opts, n, &variants, &measured)?);
    if let Some((i, _)) = measured.first() {
        let vip = SocketAddr::new(service_ip(*i).into(), 80);
        cp.hook_ns_per_call = hook_cost(opts, &base, vip, &ours.pin)?;
    }
    eprintln!(
        "bench: {n} services: {} endpoint changes each",
        opts.changes
    );
    ours.time_changes(opts, &base, &pods, &mut cp)?;
    let churn_vip = SocketAddr::new(churn(pods[0]).ip.into(), 80);
    for rl in &rule_labs {
        // kube-proxy's partial rule update.
        let (first, times) = time_changes(&rl.lab, churn_vip, opts.changes, |from, to| {
            let text = rl.mode.change(&churn(pods[from]), &churn(pods[to]));
            let start = Instant::now();
            rl.mode.load(&rl.lab.node.name, &text, true)?;
            Ok(start)
        })?;
        cp.first_change_ms.insert(rl.mode.name().into(), first);
        cp.change_ms.insert(rl.mode.name().into(), p50_p99(times));
    }
    ours.finish(opts, &base, &ports, &pods, cp, out)
}

/// Each socket program's own cost per call from the kernel's BPF statistics (statistics
/// on while it runs): `opts.count` TCP connections, then UDP exchanges, to `vip` from the
/// lab's client cgroup, the programs' run time and count read before and after each.
/// Unlike a rate, noise on the machine cannot blur it.
fn hook_cost(
    opts: &BenchOptions,
    lab: &Lab,
    vip: SocketAddr,
    pin: &Path,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let _stats = nodeport::BpfStats::enable()?;
    let mut out = BTreeMap::new();
    for mode in [LoadMode::Tcp, LoadMode::Udp] {
        let before = nodeport::prog_stats(pin)?;
        run_load(
            &opts.lab_bin,
            &lab.node,
            Some(&lab.cgroup),
            &[vip],
            opts.count,
            mode,
        )?;
        for (prog, (ns, cnt)) in nodeport::prog_stats(pin)? {
            let (ns0, cnt0) = before.get(&prog).copied().unwrap_or_default();
            let runs = cnt.saturating_sub(cnt0);
            if runs > 0 && !prog.starts_with("lb_tc_") {
                let ns = ns.saturating_sub(ns0) as f64 / runs as f64;
                out.insert(format!("{prog} ({})", mode.name()), ns);
            }
        }
    }
    Ok(out)
}

/// Our agent alone at one size (`--paths control`): its cold start, endpoint changes
/// and memory on manifests, then on the API source; no rates and no kube-proxy modes.
fn bench_control(opts: &BenchOptions, n: usize, out: &mut Outputs) -> anyhow::Result<()> {
    let mut cp = ControlPlane {
        services: n,
        endpoints: n * ENDPOINTS,
        ..Default::default()
    };
    eprintln!("bench: {n} services: our agent only");
    let base = make_lab(opts, "bc")?;
    let pods: Vec<Ipv4Addr> = base.pods.iter().map(|p| p.ip).collect();
    let (ports, _) = services(n, &pods);
    let ours = OurAgent::start(opts, &base, &ports, &pods, &mut cp)?;
    ours.time_changes(opts, &base, &pods, &mut cp)?;
    ours.finish(opts, &base, &ports, &pods, cp, out)
}

/// What every size adds to.
#[derive(Default)]
struct Outputs {
    records: Vec<Record>,
    concurrent: Vec<ConcurrentRecord>,
    control: Vec<ControlPlane>,
    node_port: Vec<nodeport::NodePortRecord>,
    closer: Vec<closer::CloserRecord>,
    packets: Vec<packets::PacketRecord>,
}

/// The load of one variant's run: `clients` clients of `opts.count` requests each, after
/// a warm-up of a tenth of that (10 to 200 requests).
fn load_spec(opts: &BenchOptions, mode: LoadMode, clients: usize) -> LoadSpec {
    LoadSpec {
        warmup: (opts.count / 10).clamp(10, 200),
        clients,
        ..LoadSpec::new(&[], opts.count, mode)
    }
}

fn p50_p99(times: Vec<f64>) -> [f64; 2] {
    [median(times.clone()), percentile(times, 0.99)]
}

/// Our agent, on manifests of the benchmark's services, in the base lab.
struct OurAgent {
    agent: AgentProcess,
    dir: PathBuf,
    manifests: PathBuf,
    pin: PathBuf,
}

impl OurAgent {
    /// Writes the manifests, starts the agent, waits for its first sync and records the
    /// cold sync's times in `cp`.
    fn start(
        opts: &BenchOptions,
        base: &Lab,
        ports: &[SvcPort],
        pods: &[Ipv4Addr],
        cp: &mut ControlPlane,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(&base.prefix);
        let mdir = dir.join("manifests");
        std::fs::create_dir_all(&mdir)?;
        std::fs::write(mdir.join("services.yaml"), manifests(ports))?;
        std::fs::write(mdir.join("churn.yaml"), manifests(&[churn(pods[0])]))?;
        let pin = PathBuf::from(format!("/sys/fs/bpf/{}", base.prefix));
        let source = ["--manifests".as_ref(), mdir.as_os_str()];
        let (agent, cold) = start_agent(opts, base, &source, &pin, &dir.join("agent.log"))?;
        cp.cold_read_ms = cold.read_ms;
        cp.cold_program_ms = cold.program_ms;
        cp.cold_write_ms = cold.write_ms;
        cp.cold_elapsed_ms = cold.elapsed_ms;
        cp.start_to_sync_ms = cold.start_to_sync_ms;
        Ok(Self {
            agent,
            dir,
            manifests: mdir,
            pin,
        })
    }

    /// Times `opts.changes` endpoint changes (after a first one) into `cp`.
    fn time_changes(
        &self,
        opts: &BenchOptions,
        base: &Lab,
        pods: &[Ipv4Addr],
        cp: &mut ControlPlane,
    ) -> anyhow::Result<()> {
        let churn_vip = SocketAddr::new(churn(pods[0]).ip.into(), 80);
        let (first, times) =
            time_changes(base, churn_vip, opts.changes, |_, to| self.change(pods, to))?;
        cp.first_change_ms.insert("socket-lb".into(), first);
        cp.change_ms.insert("socket-lb".into(), p50_p99(times));
        Ok(())
    }

    /// Records the agent's memory, stops it (its pins removed) before the API source's
    /// agent attaches to the cgroup, measures that one, and adds `cp` to `out`.
    fn finish(
        self,
        opts: &BenchOptions,
        base: &Lab,
        ports: &[SvcPort],
        pods: &[Ipv4Addr],
        mut cp: ControlPlane,
        out: &mut Outputs,
    ) -> anyhow::Result<()> {
        cp.agent_rss_mib = vm_hwm_mib(self.agent.child.0.id());
        cp.maps_memlock_mib = maps_memlock_mib(&self.pin);
        drop(self);
        eprintln!(
            "bench: {} services: the agent on the API source",
            cp.services
        );
        cp.api = Some(api_source::measure(opts, base, ports, pods)?);
        out.control.push(cp);
        Ok(())
    }

    /// The churn service's manifest replaced (renamed over) with the other pod.
    fn change(&self, pods: &[Ipv4Addr], to: usize) -> anyhow::Result<Instant> {
        let tmp = self.manifests.join(".churn.yaml.tmp");
        std::fs::write(&tmp, manifests(&[churn(pods[to])]))?;
        let start = Instant::now();
        std::fs::rename(&tmp, self.manifests.join("churn.yaml"))?;
        Ok(start)
    }
}

impl Drop for OurAgent {
    fn drop(&mut self) {
        self.agent.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A lab per kube-proxy mode, with its full rules for `ports` (and the churn service)
/// loaded; the load times go to `cp`.
fn rules_labs(
    opts: &BenchOptions,
    n: usize,
    ports: &[SvcPort],
    pods: &[Ipv4Addr],
    cp: &mut ControlPlane,
) -> anyhow::Result<Vec<RulesLab>> {
    let mut labs = Vec::new();
    for mode in KubeProxy::ALL {
        let lab = make_lab(opts, &format!("b{}", &mode.name()[..3]))?;
        // The route a node's default route would give the service range, through the
        // first pod (which drops what is not DNATed: it does not forward), with a node
        // address outside the pod network as source, so kube-proxy's masquerade applies.
        for args in [
            vec!["addr", "add", "169.254.0.1/32", "dev", "lo"],
            vec![
                "route",
                "add",
                "10.96.0.0/12",
                "via",
                "10.244.1.2",
                "dev",
                "veth0",
                "src",
                "169.254.0.1",
            ],
        ] {
            lab.node.ip(&args)?;
        }
        let mut all = ports.to_vec();
        all.push(churn(pods[0]));
        eprintln!("bench: {n} services: loading {} rules", mode.name());
        let took = mode.load(&lab.node.name, &mode.full(&all), false)?;
        cp.cold_rules_ms
            .insert(mode.name().into(), took.as_secs_f64() * 1e3);
        labs.push(RulesLab { mode, lab });
    }
    Ok(labs)
}

/// One endpoint change to the first connection that reaches the new backend, `changes`
/// times after a first one: `change(from, to)` swaps the churn service's pod and returns
/// when it began. Returns the first change's time apart: right after a start it also
/// measures what is still settling in (a watch being set up, first-time code paths).
fn time_changes(
    lab: &Lab,
    churn_vip: SocketAddr,
    changes: usize,
    mut change: impl FnMut(usize, usize) -> anyhow::Result<Instant>,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut times = Vec::new();
    let mut at = 0usize;
    let mut waiter = Waiter::start(lab, churn_vip, &lab.cgroup)?;
    waiter.wait_for("pod-0")?;
    for _ in 0..=changes {
        let next = (at + 1) % 2;
        let start = change(at, next)?;
        waiter.wait_for(&format!("pod-{next}"))?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        at = next;
    }
    let first = times.remove(0);
    Ok((first, times))
}

/// One thing measured: a client in `cgroup` of `lab`'s node, round-robin over `targets`.
struct Variant<'a> {
    name: String,
    position: String,
    lab: &'a Lab,
    targets: Vec<SocketAddr>,
    cgroup: &'a Cgroup,
}

/// (variant, position) -> one report per round.
type Runs = BTreeMap<(String, String), Vec<LoadReport>>;

/// The order of `len` variants in round `round`: rotated by one each round, and backwards
/// every other round, so that no variant always runs right after the same other one (a
/// variant after another lab's finds its lab's servers cold; one after its own lab's
/// finds them warm).
fn round_order(len: usize, round: usize) -> Vec<usize> {
    (0..len)
        .map(|k| {
            let k = if round % 2 == 1 { len - 1 - k } else { k };
            (round + k) % len
        })
        .collect()
}

/// Every variant once per round, in the order [`round_order`] gives, each run as `spec`
/// says with the variant's targets.
fn measure_rates(
    opts: &BenchOptions,
    n: usize,
    spec: &LoadSpec,
    variants: &[&Variant<'_>],
) -> anyhow::Result<Runs> {
    let cpu = sequential_cpu(spec);
    let mut labs: Vec<&Lab> = Vec::new();
    for v in variants {
        if !labs.iter().any(|l| l.prefix == v.lab.prefix) {
            labs.push(v.lab);
        }
    }
    for lab in &labs {
        lab.pin_servers(cpu)?;
    }
    let runs = run_rounds(
        opts,
        n,
        &LoadSpec {
            cpu,
            ..spec.clone()
        },
        variants,
    );
    for lab in &labs {
        lab.pin_servers(None)?;
    }
    runs
}

/// The rounds of [`measure_rates`].
fn run_rounds(
    opts: &BenchOptions,
    n: usize,
    spec: &LoadSpec,
    variants: &[&Variant<'_>],
) -> anyhow::Result<Runs> {
    let mut runs = Runs::new();
    for round in 0..opts.rounds {
        eprintln!(
            "bench: {n} services, {} x{}: round {}",
            spec.mode.name(),
            spec.clients,
            round + 1
        );
        for v in round_order(variants.len(), round)
            .into_iter()
            .map(|k| variants[k])
        {
            // The direct variants draw a pod at random per request, as the service's
            // translation draws a backend: the variants differ only in the translation.
            let spec = LoadSpec {
                targets: v.targets.clone(),
                random: v.targets.len() > 1,
                ..spec.clone()
            };
            let r = run_spec(&v.lab.lab_bin, &v.lab.node, Some(v.cgroup), &spec)?;
            if r.errors > 0 {
                eprintln!(
                    "bench: {} {} {} x{}: {} of {} requests failed",
                    v.name,
                    v.position,
                    spec.mode.name(),
                    spec.clients,
                    r.errors,
                    r.count
                );
            }
            runs.entry((v.name.clone(), v.position.clone()))
                .or_default()
                .push(r);
        }
    }
    Ok(runs)
}

/// The CPU a sequential client and the pod servers run on (the last one), none for
/// concurrent clients. Left to the scheduler, each request's server wakes on the
/// client's CPU or on the other one, and on this VM a wake-up across CPUs (an
/// interrupt to an idle virtual CPU) costs more than the request itself: the same
/// direct run measured 15,000 or 110,000 requests a second by where the servers woke,
/// and a variant's target set (ten pods, or one service address) moved the odds. On
/// one CPU every variant takes the same path and differs only in its translation.
fn sequential_cpu(spec: &LoadSpec) -> Option<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (spec.clients == 1 && cpus > 1).then_some(cpus - 1)
}

/// Ratios of `f` to the same round's `base`, as [median, min, max] over rounds.
fn ratios(runs: &[LoadReport], base: &[LoadReport], f: impl Fn(&LoadReport) -> f64) -> [f64; 3] {
    // A CPU reading below /proc/stat's resolution is 0: no ratio then.
    let ratio = |r, b| if b > 0.0 { r / b } else { f64::NAN };
    spread(
        runs.iter()
            .zip(base)
            .map(|(r, b)| ratio(f(r), f(b)))
            .collect(),
    )
}

/// The medians over rounds, and the ratios to direct taken within each round.
fn records_of(n: usize, mode: LoadMode, runs: &Runs) -> Vec<Record> {
    let direct = &runs[&("direct".to_string(), "-".to_string())];
    let mut records = Vec::new();
    for ((variant, pos), reports) in runs {
        let rate = ratios(reports, direct, LoadReport::rate);
        let p99 = ratios(reports, direct, |r| r.p99_ns as f64);
        records.push(Record {
            variant: variant.clone(),
            services: n,
            proto: mode.name().into(),
            position: pos.clone(),
            rate: median(reports.iter().map(LoadReport::rate).collect()),
            p50_us: median(reports.iter().map(|r| r.p50_ns as f64 / 1e3).collect()),
            p99_us: median(reports.iter().map(|r| r.p99_ns as f64 / 1e3).collect()),
            rate_vs_direct: rate[0],
            p99_vs_direct: p99[0],
            rate_vs_direct_min: rate[1],
            rate_vs_direct_max: rate[2],
            p99_vs_direct_min: p99[1],
            p99_vs_direct_max: p99[2],
            busy_cores: median(reports.iter().map(LoadReport::busy_cores).collect()),
            client_cpu_us: median(
                reports
                    .iter()
                    .map(LoadReport::client_cpu_us_per_request)
                    .collect(),
            ),
            client_cpu_vs_direct: ratios(reports, direct, LoadReport::client_cpu_us_per_request),
        });
    }
    records
}

/// `lb-lab bench`: every size, then the report.
pub fn bench(opts: &BenchOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let mut out = Outputs::default();
    let wants = |p: &str| opts.paths.iter().any(|x| x == p);
    for &n in &opts.sizes {
        if wants("socket") {
            bench_size(opts, n, &mut out)?;
        } else if wants("control") {
            bench_control(opts, n, &mut out)?;
        }
        if wants("nodeport") {
            out.node_port.extend(nodeport::bench_node_port(opts, n)?);
        }
        if wants("packets") {
            out.packets.extend(packets::bench_packets(opts, n)?);
        }
    }
    if wants("closer") {
        out.closer.push(closer::bench_closer(opts)?);
    }
    let write = |name: &str, json: String| std::fs::write(opts.out.join(name), json);
    write("results.json", serde_json::to_string_pretty(&out.records)?)?;
    write(
        "concurrent.json",
        serde_json::to_string_pretty(&out.concurrent)?,
    )?;
    write(
        "control_plane.json",
        serde_json::to_string_pretty(&out.control)?,
    )?;
    write(
        "nodeport.json",
        serde_json::to_string_pretty(&out.node_port)?,
    )?;
    write("closer.json", serde_json::to_string_pretty(&out.closer)?)?;
    write("packets.json", serde_json::to_string_pretty(&out.packets)?)?;
    // The socket level's tables, if it ran (the other paths add theirs).
    let mut md = if out.records.is_empty() && out.control.is_empty() {
        String::from("# Benchmark report\n")
    } else {
        report(&out.records, &out.control)
    };
    if !out.concurrent.is_empty() {
        md.push_str(&concurrent::report(&out.concurrent));
    }
    if !out.node_port.is_empty() {
        md.push_str(&nodeport::node_port_report(&out.node_port));
    }
    if !out.packets.is_empty() {
        md.push_str(&packets::packets_report(&out.packets));
    }
    if !out.closer.is_empty() {
        md.push_str(&closer::closer_report(&out.closer));
    }
    std::fs::write(opts.out.join("report.md"), &md)?;
    std::fs::write(opts.out.join("rates.svg"), svg(&out.records))?;
    println!("{md}");
    println!(
        "bench: wrote results.json, concurrent.json, control_plane.json, nodeport.json, closer.json, packets.json, report.md and rates.svg to {}",
        opts.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_orders_are_permutations_with_changing_neighbours() {
        let len = 5;
        let mut before = std::collections::BTreeSet::new();
        for round in 0..4 {
            let order = round_order(len, round);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..len).collect::<Vec<_>>());
            // Which variant ran right before variant 0 (its predecessor in the round).
            if let Some(at) = order.iter().position(|&k| k == 0).filter(|&at| at > 0) {
                before.insert(order[at - 1]);
            }
        }
        assert_eq!(round_order(3, 0), [0, 1, 2]);
        assert_eq!(round_order(3, 1), [0, 2, 1]);
        assert!(
            before.len() >= 2,
            "variant 0 follows different variants: {before:?}"
        );
    }

    #[test]
    fn ratios_are_taken_within_rounds_with_their_spread() {
        let rep = |count: usize, ms: u64, p99: u64| LoadReport {
            count,
            elapsed_ns: ms * 1_000_000,
            p99_ns: p99,
            ..LoadReport::default()
        };
        let direct = vec![rep(1000, 100, 10), rep(1000, 200, 10), rep(1000, 50, 10)];
        let ours = vec![rep(1000, 110, 11), rep(1000, 200, 12), rep(1000, 40, 10)];
        let mut runs = Runs::new();
        runs.insert(("direct".into(), "-".into()), direct);
        runs.insert(("socket-lb".into(), "first".into()), ours);
        let records = records_of(1, LoadMode::Tcp, &runs);
        let r = records.iter().find(|r| r.variant == "socket-lb").unwrap();
        assert!((r.rate_vs_direct - 1.0).abs() < 1e-9);
        assert!((r.rate_vs_direct_min - 100.0 / 110.0).abs() < 1e-9);
        assert!((r.rate_vs_direct_max - 1.25).abs() < 1e-9);
        assert!((r.p99_vs_direct_max - 1.2).abs() < 1e-9);
        let d = records.iter().find(|r| r.variant == "direct").unwrap();
        assert_eq!([d.rate_vs_direct_min, d.rate_vs_direct_max], [1.0, 1.0]);
    }

    #[test]
    fn medians_of_even_counts_average_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn cold_sync_times_come_from_the_log_timestamp() {
        let line =
            "2026-11-25T14:18:01.250000Z  INFO lb_user::agent: synced services=1 elapsed_us=900";
        assert_eq!(
            log_time_of_day(line),
            Some(14.0 * 3600.0 + 18.0 * 60.0 + 1.25)
        );
        assert_eq!(log_time_of_day("synced"), None);
        assert_eq!(log_field(line, "elapsed_us"), Some(900.0));
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 3 + 61);
        assert_eq!(secs_of_day(t), 61.0);
    }
}
