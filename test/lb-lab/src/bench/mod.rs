//! `cargo xtask bench`: our socket-level load balancer side by side with a direct
//! connection (the limit) and with kube-proxy's iptables (nf_tables and legacy backends)
//! and nftables modes, each in a lab of its own, variants interleaved round by round;
//! then the NodePort path from outside the node ([`nodeport`]), our tc programs against
//! the same kube-proxy modes. Writes `results.json`, `control_plane.json`,
//! `nodeport.json`, `report.md` and `rates.svg`.

mod nodeport;
mod report;
mod workload;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
pub use report::{report, svg};
use serde::{Deserialize, Serialize};
use workload::{ENDPOINTS, churn, manifests, service_ip, services};

use crate::{
    kube_proxy_rules::{KubeProxy, SvcPort},
    lab::{AgentProcess, Cgroup, ChildGuard, Lab, Netns, place, run},
    load::{LoadMode, LoadReport},
};

pub const POSITIONS: [&str; 3] = ["first", "middle", "last"];

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
    /// Which benchmarks: "socket", "nodeport".
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
    /// Full rule loads of the kube-proxy variants (ms), by variant.
    pub cold_rules_ms: BTreeMap<String, f64>,
    /// One EndpointSlice change to the first connection reaching the new backend, by
    /// variant: [p50, p99] in ms.
    pub change_ms: BTreeMap<String, [f64; 2]>,
    pub agent_rss_mib: f64,
    pub maps_memlock_mib: f64,
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

fn median(v: Vec<f64>) -> f64 {
    percentile(v, 0.5)
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
    let mut cmd = Command::new(lab_bin);
    cmd.arg("load")
        .args(["--count", &count.to_string(), "--mode", mode.name()]);
    for t in targets {
        cmd.args(["--target", &t.to_string()]);
    }
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
/// same services, the request rates round by round, then the endpoint changes.
fn bench_size(
    opts: &BenchOptions,
    n: usize,
    records: &mut Vec<Record>,
) -> anyhow::Result<ControlPlane> {
    let mut cp = ControlPlane {
        services: n,
        endpoints: n * ENDPOINTS,
        ..Default::default()
    };
    eprintln!("bench: {n} services: creating labs");
    let base = make_lab(opts, "bb")?;
    // The direct client's cgroup: no programs attached.
    let plain = Cgroup::create(&format!("{}-plain", base.prefix))?;
    let pods: Vec<Ipv4Addr> = base.pods.iter().map(|p| p.ip).collect();
    let (ports, measured) = services(n, &pods);
    let ours = OurAgent::start(opts, &base, &ports, &pods, &mut cp)?;
    let rule_labs = rules_labs(opts, n, &ports, &pods, &mut cp)?;
    let direct_targets: Vec<SocketAddr> = pods
        .iter()
        .map(|p| SocketAddr::new((*p).into(), 8080))
        .collect();
    let mut variants = vec![Variant {
        name: "direct".into(),
        position: "-".into(),
        lab: &base,
        targets: direct_targets,
        cgroup: &plain,
    }];
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
    for mode in [LoadMode::Tcp, LoadMode::Udp] {
        let runs = measure_rates(opts, n, mode, &variants)?;
        records.extend(records_of(n, mode, &runs));
    }
    eprintln!(
        "bench: {n} services: {} endpoint changes each",
        opts.changes
    );
    let churn_vip = SocketAddr::new(churn(pods[0]).ip.into(), 80);
    let times = time_changes(&base, churn_vip, opts.changes, |_, to| {
        ours.change(&pods, to)
    })?;
    cp.change_ms.insert("socket-lb".into(), p50_p99(times));
    for rl in &rule_labs {
        // kube-proxy's partial rule update.
        let times = time_changes(&rl.lab, churn_vip, opts.changes, |from, to| {
            let text = rl.mode.change(&churn(pods[from]), &churn(pods[to]));
            let start = Instant::now();
            rl.mode.load(&rl.lab.node.name, &text, true)?;
            Ok(start)
        })?;
        cp.change_ms.insert(rl.mode.name().into(), p50_p99(times));
    }
    cp.agent_rss_mib = vm_hwm_mib(ours.agent.child.0.id());
    cp.maps_memlock_mib = maps_memlock_mib(&ours.pin);
    Ok(cp)
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
        let mut agent = AgentProcess::start(
            &opts.agent_bin,
            &[
                "--manifests".as_ref(),
                mdir.as_os_str(),
                "--min-sync-period".as_ref(),
                "0s".as_ref(),
                "--poll-interval-ms".as_ref(),
                "1".as_ref(),
            ],
            &base.cgroup.path,
            &pin,
            &dir.join("agent.log"),
        )?;
        agent.wait_synced(1, Duration::from_secs(120))?;
        let log = agent.log();
        let first = log.lines().find(|l| l.contains(" synced")).unwrap_or("");
        let ms = |key| log_field(first, key).unwrap_or(f64::NAN) / 1e3;
        cp.cold_read_ms = ms("read_us");
        cp.cold_program_ms = ms("model_us") + ms("plan_us") + ms("write_us");
        cp.cold_write_ms = ms("write_us");
        Ok(Self {
            agent,
            dir,
            manifests: mdir,
            pin,
        })
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
/// times: `change(from, to)` swaps the churn service's pod and returns when it began.
fn time_changes(
    lab: &Lab,
    churn_vip: SocketAddr,
    changes: usize,
    mut change: impl FnMut(usize, usize) -> anyhow::Result<Instant>,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    let mut at = 0usize;
    let mut waiter = Waiter::start(lab, churn_vip, &lab.cgroup)?;
    waiter.wait_for("pod-0")?;
    for _ in 0..changes {
        let next = (at + 1) % 2;
        let start = change(at, next)?;
        waiter.wait_for(&format!("pod-{next}"))?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        at = next;
    }
    Ok(times)
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

/// Every variant once per round, in an order rotated every round.
fn measure_rates(
    opts: &BenchOptions,
    n: usize,
    mode: LoadMode,
    variants: &[Variant<'_>],
) -> anyhow::Result<Runs> {
    let mut runs = Runs::new();
    let len = variants.len();
    for round in 0..opts.rounds {
        eprintln!("bench: {n} services, {}: round {}", mode.name(), round + 1);
        // Interleave: round r starts with variant r.
        for v in (0..len).map(|k| &variants[(round + k) % len]) {
            let r = run_load(
                &v.lab.lab_bin,
                &v.lab.node,
                Some(v.cgroup),
                &v.targets,
                opts.count,
                mode,
            )?;
            if r.errors > 0 {
                eprintln!(
                    "bench: {} {} {}: {} of {} requests failed",
                    v.name,
                    v.position,
                    mode.name(),
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

/// The medians over rounds, and the ratios to direct taken within each round.
fn records_of(n: usize, mode: LoadMode, runs: &Runs) -> Vec<Record> {
    let direct = &runs[&("direct".to_string(), "-".to_string())];
    let mut records = Vec::new();
    for ((variant, pos), reports) in runs {
        let rate_ratio: Vec<f64> = reports
            .iter()
            .zip(direct)
            .map(|(r, d)| r.rate() / d.rate())
            .collect();
        let p99_ratio: Vec<f64> = reports
            .iter()
            .zip(direct)
            .map(|(r, d)| r.p99_ns as f64 / d.p99_ns as f64)
            .collect();
        records.push(Record {
            variant: variant.clone(),
            services: n,
            proto: mode.name().into(),
            position: pos.clone(),
            rate: median(reports.iter().map(LoadReport::rate).collect()),
            p50_us: median(reports.iter().map(|r| r.p50_ns as f64 / 1e3).collect()),
            p99_us: median(reports.iter().map(|r| r.p99_ns as f64 / 1e3).collect()),
            rate_vs_direct: median(rate_ratio),
            p99_vs_direct: median(p99_ratio),
        });
    }
    records
}

/// `lb-lab bench`: every size, then the report.
pub fn bench(opts: &BenchOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let mut records = Vec::new();
    let mut control = Vec::new();
    let mut node_port = Vec::new();
    let wants = |p: &str| opts.paths.iter().any(|x| x == p);
    for &n in &opts.sizes {
        if wants("socket") {
            control.push(bench_size(opts, n, &mut records)?);
        }
        if wants("nodeport") {
            node_port.extend(nodeport::bench_node_port(opts, n)?);
        }
    }
    let json = serde_json::to_string_pretty(&records)?;
    std::fs::write(opts.out.join("results.json"), json)?;
    std::fs::write(
        opts.out.join("control_plane.json"),
        serde_json::to_string_pretty(&control)?,
    )?;
    std::fs::write(
        opts.out.join("nodeport.json"),
        serde_json::to_string_pretty(&node_port)?,
    )?;
    let mut md = report(&records, &control);
    if !node_port.is_empty() {
        md.push_str(&nodeport::node_port_report(&node_port));
    }
    std::fs::write(opts.out.join("report.md"), &md)?;
    std::fs::write(opts.out.join("rates.svg"), svg(&records))?;
    println!("{md}");
    println!(
        "bench: wrote results.json, control_plane.json, nodeport.json, report.md and rates.svg to {}",
        opts.out.display()
    );
    Ok(())
}
