//! `cargo xtask bench`: our socket-level load balancer side by side with a direct
//! connection (the limit) and with kube-proxy's iptables (nf_tables and legacy backends)
//! and nftables modes, each in a lab of its own, variants interleaved round by round.
//! Writes `results.json`, `control_plane.json`, `report.md` and `rates.svg`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{
    bench_rules::{self, SvcPort},
    lab::{self, AgentProcess, Cgroup, ChildGuard, Lab, place, run},
    model::Proto,
};

// ---------------------------------------------------------------------------------------
// The load generator and the server (run inside the lab's namespaces).

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoadMode {
    /// connect, send a request, read the reply, close (the client closes first).
    Tcp,
    /// A new UDP socket per request: sendto, recvfrom.
    Udp,
}

impl LoadMode {
    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One load run: `count` requests one after the other, round-robin over the targets.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub count: usize,
    pub errors: usize,
    pub elapsed_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        (self.count - self.errors) as f64 / (self.elapsed_ns as f64 / 1e9)
    }
}

/// One request; the reply line (the server's name).
fn tcp_once(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET\n")?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while !buf[..got].contains(&b'\n') {
        let n = s.read(&mut buf[got..])?;
        if n == 0 || got + n == buf.len() {
            break;
        }
        got += n;
    }
    Ok(String::from_utf8_lossy(&buf[..got]).trim().to_string())
}

fn udp_once(target: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let s = lab::udp_socket_for(target)?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"GET\n", target)?;
    let mut buf = [0u8; 64];
    s.recv_from(&mut buf)?;
    Ok(())
}

/// `lb-lab load`: the load generator.
pub fn load(targets: &[SocketAddr], count: usize, mode: LoadMode, timeout: Duration) -> LoadReport {
    let mut lat = Vec::with_capacity(count);
    let mut errors = 0;
    let start = Instant::now();
    for i in 0..count {
        let t = targets[i % targets.len()];
        let t0 = Instant::now();
        let r = match mode {
            LoadMode::Tcp => tcp_once(t, timeout).map(drop),
            LoadMode::Udp => udp_once(t, timeout),
        };
        match r {
            Ok(()) => lat.push(t0.elapsed().as_nanos() as u64),
            Err(_) => errors += 1,
        }
    }
    let elapsed_ns = start.elapsed().as_nanos() as u64;
    lat.sort_unstable();
    let pct = |p: f64| -> u64 {
        if lat.is_empty() {
            0
        } else {
            lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]
        }
    };
    LoadReport {
        count,
        errors,
        elapsed_ns,
        p50_ns: pct(0.50),
        p99_ns: pct(0.99),
    }
}

/// `lb-lab serve --bench`: read the request line, answer with the name, then wait for
/// the client to close first. Several threads accept, so a client never waits on a
/// previous connection's close.
pub fn serve_bench(name: &str, port: u16) -> anyhow::Result<()> {
    let (tcp, reply) = lab::start_server(name, port)?;
    let mut threads = Vec::new();
    for _ in 0..4 {
        let listener = tcp.try_clone()?;
        let reply = reply.clone();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 64];
                let mut got = 0;
                while !buf[..got].contains(&b'\n') {
                    match conn.read(&mut buf[got..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                    if got == buf.len() {
                        break;
                    }
                }
                if conn.write_all(reply.as_bytes()).is_err() {
                    continue;
                }
                // Until EOF: the client closes first.
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// `lb-lab waiter`: for each name read from stdin, connects to `target` again and again
/// until that server answers (at most 5 s), then prints "ok" (or "timeout").
pub fn waiter(target: SocketAddr) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let want = line?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut ok = false;
        while Instant::now() < deadline {
            if tcp_once(target, Duration::from_secs(1)).is_ok_and(|name| name == want.trim()) {
                ok = true;
                break;
            }
        }
        writeln!(out, "{}", if ok { "ok" } else { "timeout" })?;
        out.flush()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The benchmark.

pub const ENDPOINTS: usize = 10;
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

/// The measured services: up to three (first, middle, last), each with a TCP and a UDP
/// port over the lab's pods; the rest are TCP-only fillers with made-up endpoints.
fn services(n: usize, pods: &[Ipv4Addr]) -> (Vec<SvcPort>, Vec<(usize, &'static str)>) {
    let measured: Vec<(usize, &'static str)> = match n {
        0 | 1 => vec![(0, "first")],
        2 => vec![(0, "first"), (1, "last")],
        _ => vec![(0, "first"), (n / 2, "middle"), (n - 1, "last")],
    };
    let mut out = Vec::new();
    for i in 0..n.max(1) {
        let is_measured = measured.iter().any(|(m, _)| *m == i);
        let endpoints: Vec<Ipv4Addr> = if is_measured {
            pods.to_vec()
        } else {
            (0..ENDPOINTS)
                .map(|e| {
                    let k = i * ENDPOINTS + e;
                    Ipv4Addr::new(
                        10,
                        245 + (k / 62_500) as u8,
                        (k / 250 % 250) as u8,
                        (k % 250) as u8 + 1,
                    )
                })
                .collect()
        };
        let base = SvcPort {
            name: format!("bench/svc-{i}"),
            port_name: "tcp".into(),
            ip: service_ip(i),
            port: 80,
            proto: Proto::Tcp,
            target_port: 8080,
            endpoints,
        };
        if is_measured {
            out.push(SvcPort {
                port_name: "udp".into(),
                proto: Proto::Udp,
                ..base.clone()
            });
        }
        out.push(base);
    }
    (out, measured)
}

/// The churn service used by the change measurements: one endpoint, swapped each time.
fn churn(pod: Ipv4Addr) -> SvcPort {
    SvcPort {
        name: "bench/churn".into(),
        port_name: "tcp".into(),
        ip: Ipv4Addr::new(10, 97, 0, 1),
        port: 80,
        proto: Proto::Tcp,
        target_port: 8080,
        endpoints: vec![pod],
    }
}

/// Service and EndpointSlice manifests for `ports` (grouped by service name).
fn manifests(ports: &[SvcPort]) -> String {
    let mut by_name: BTreeMap<&str, Vec<&SvcPort>> = BTreeMap::new();
    let mut order = Vec::new();
    for p in ports {
        if !by_name.contains_key(p.name.as_str()) {
            order.push(p.name.as_str());
        }
        by_name.entry(&p.name).or_default().push(p);
    }
    let mut out = String::new();
    for name in order {
        let list = &by_name[name];
        let (ns, svc) = name.split_once('/').expect("ns/name");
        let first = list[0];
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {ns}}}\nspec:\n  clusterIP: {}\n  ports:\n",
            first.ip
        );
        for p in list {
            let _ = writeln!(
                out,
                "  - {{name: {}, port: {}, protocol: {}, targetPort: {}}}",
                p.port_name, p.port, p.proto, p.target_port
            );
        }
        let _ = write!(
            out,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-a, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports:\n"
        );
        for p in list {
            let _ = writeln!(
                out,
                "  - {{name: {}, port: {}, protocol: {}}}",
                p.port_name, p.target_port, p.proto
            );
        }
        out.push_str("endpoints:\n");
        for ep in &first.endpoints {
            let _ = writeln!(out, "  - addresses: [{ep}]");
        }
    }
    out
}

/// A kube-proxy mode and how its rules are loaded.
#[derive(Clone, Copy, Debug)]
enum KubeProxy {
    IptablesNft,
    IptablesLegacy,
    Nftables,
}

impl KubeProxy {
    const ALL: [Self; 3] = [Self::IptablesNft, Self::IptablesLegacy, Self::Nftables];

    fn name(self) -> &'static str {
        match self {
            Self::IptablesNft => "iptables-nft",
            Self::IptablesLegacy => "iptables-legacy",
            Self::Nftables => "nftables",
        }
    }

    fn full(self, ports: &[SvcPort]) -> String {
        match self {
            Self::Nftables => bench_rules::nft_ruleset(ports),
            _ => bench_rules::iptables_restore(ports),
        }
    }

    fn change(self, old: &SvcPort, new: &SvcPort) -> String {
        match self {
            Self::Nftables => bench_rules::nft_change(old, new),
            _ => bench_rules::iptables_change(old, new),
        }
    }

    /// Loads `rules` in `netns` (`partial`: kube-proxy's --noflush partial sync).
    fn load(self, netns: &str, rules: &str, partial: bool) -> anyhow::Result<Duration> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]);
        match self {
            Self::IptablesNft => cmd.arg("iptables-nft-restore"),
            Self::IptablesLegacy => cmd.arg("iptables-legacy-restore"),
            Self::Nftables => cmd.args(["nft", "-f", "-"]),
        };
        if partial && !matches!(self, Self::Nftables) {
            cmd.arg("--noflush");
        }
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!(
                "{} rules did not load: {}",
                self.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(took)
    }
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

/// Runs the load generator in `lab`'s node namespace and in `cgroup`. Every variant's
/// client runs in a fresh cgroup of its own (ours with the programs attached, the others
/// without), so no variant pays for another's cgroup.
fn run_load(
    lab: &Lab,
    targets: &[SocketAddr],
    count: usize,
    mode: LoadMode,
    cgroup: &Cgroup,
) -> anyhow::Result<LoadReport> {
    let mut cmd = Command::new(&lab.lab_bin);
    cmd.arg("load")
        .args(["--count", &count.to_string(), "--mode", mode.name()]);
    for t in targets {
        cmd.args(["--target", &t.to_string()]);
    }
    place(&mut cmd, &lab.node, Some(cgroup))?;
    let out = run(&mut cmd)?;
    serde_json::from_str(out.trim()).with_context(|| format!("load printed {out:?}"))
}

/// A waiter process (see [`waiter`]) in a lab's node namespace.
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

/// Every variant measured at one size.
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
    let mut churn_pod = 0usize;

    // Ours: the agent on manifests of the same services.
    let dir = std::env::temp_dir().join(&base.prefix);
    let mdir = dir.join("manifests");
    std::fs::create_dir_all(&mdir)?;
    std::fs::write(mdir.join("services.yaml"), manifests(&ports))?;
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
    cp.cold_read_ms = log_field(first, "read_us").unwrap_or(f64::NAN) / 1e3;
    cp.cold_program_ms = (log_field(first, "model_us").unwrap_or(f64::NAN)
        + log_field(first, "plan_us").unwrap_or(f64::NAN)
        + log_field(first, "write_us").unwrap_or(f64::NAN))
        / 1e3;
    cp.cold_write_ms = log_field(first, "write_us").unwrap_or(f64::NAN) / 1e3;

    // kube-proxy's modes, each in its own lab.
    let mut rule_labs = Vec::new();
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
            let mut full = vec!["-n", lab.node.name.as_str()];
            full.extend(args);
            lab::ip(&full)?;
        }
        let mut all = ports.clone();
        all.push(churn(pods[0]));
        eprintln!("bench: {n} services: loading {} rules", mode.name());
        let took = mode.load(&lab.node.name, &mode.full(&all), false)?;
        cp.cold_rules_ms
            .insert(mode.name().into(), took.as_secs_f64() * 1e3);
        rule_labs.push(RulesLab { mode, lab });
    }

    let direct_targets: Vec<SocketAddr> = pods
        .iter()
        .map(|p| SocketAddr::new((*p).into(), 8080))
        .collect();
    for mode in [LoadMode::Tcp, LoadMode::Udp] {
        // (variant, position) -> per-round reports
        let mut runs: BTreeMap<(String, String), Vec<LoadReport>> = BTreeMap::new();
        for round in 0..opts.rounds {
            eprintln!("bench: {n} services, {}: round {}", mode.name(), round + 1);
            // (variant, position, lab, targets, cgroup)
            let mut plan: Vec<(String, String, &Lab, Vec<SocketAddr>, &Cgroup)> = vec![(
                "direct".into(),
                "-".into(),
                &base,
                direct_targets.clone(),
                &plain,
            )];
            for (i, pos) in &measured {
                let vip = vec![SocketAddr::new(service_ip(*i).into(), 80)];
                plan.push((
                    "socket-lb".into(),
                    (*pos).into(),
                    &base,
                    vip.clone(),
                    &base.cgroup,
                ));
                for rl in &rule_labs {
                    plan.push((
                        rl.mode.name().into(),
                        (*pos).into(),
                        &rl.lab,
                        vip.clone(),
                        &rl.lab.cgroup,
                    ));
                }
            }
            // Interleave: rotate the order every round.
            let len = plan.len();
            plan.rotate_left(round % len);
            for (variant, pos, lab, targets, cg) in plan {
                let r = run_load(lab, &targets, opts.count, mode, cg)?;
                if r.errors > 0 {
                    eprintln!(
                        "bench: {variant} {pos} {}: {} of {} requests failed",
                        mode.name(),
                        r.errors,
                        r.count
                    );
                }
                runs.entry((variant, pos)).or_default().push(r);
            }
        }
        let direct = runs[&("direct".to_string(), "-".to_string())].clone();
        for ((variant, pos), reports) in &runs {
            let rate_ratio: Vec<f64> = reports
                .iter()
                .zip(&direct)
                .map(|(r, d)| r.rate() / d.rate())
                .collect();
            let p99_ratio: Vec<f64> = reports
                .iter()
                .zip(&direct)
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
    }

    // One change to the first connection that reaches the new backend.
    eprintln!(
        "bench: {n} services: {} endpoint changes each",
        opts.changes
    );
    let churn_vip = SocketAddr::new(churn(pods[0]).ip.into(), 80);
    let mut ours = Vec::new();
    let mut waiter = Waiter::start(&base, churn_vip, &base.cgroup)?;
    waiter.wait_for("pod-0")?;
    for _ in 0..opts.changes {
        let next = (churn_pod + 1) % 2;
        let tmp = mdir.join(".churn.yaml.tmp");
        std::fs::write(&tmp, manifests(&[churn(pods[next])]))?;
        let start = Instant::now();
        std::fs::rename(&tmp, mdir.join("churn.yaml"))?;
        waiter.wait_for(&format!("pod-{next}"))?;
        ours.push(start.elapsed().as_secs_f64() * 1e3);
        churn_pod = next;
    }
    cp.change_ms.insert(
        "socket-lb".into(),
        [median(ours.clone()), percentile(ours, 0.99)],
    );
    for rl in &rule_labs {
        let mut times = Vec::new();
        let mut at = 0usize;
        let mut waiter = Waiter::start(&rl.lab, churn_vip, &rl.lab.cgroup)?;
        waiter.wait_for("pod-0")?;
        for _ in 0..opts.changes {
            let next = (at + 1) % 2;
            let text = rl.mode.change(&churn(pods[at]), &churn(pods[next]));
            let start = Instant::now();
            rl.mode.load(&rl.lab.node.name, &text, true)?;
            waiter.wait_for(&format!("pod-{next}"))?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
            at = next;
        }
        cp.change_ms.insert(
            rl.mode.name().into(),
            [median(times.clone()), percentile(times, 0.99)],
        );
    }
    cp.agent_rss_mib = vm_hwm_mib(agent.child.0.id());
    cp.maps_memlock_mib = maps_memlock_mib(&pin);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(cp)
}

/// The cluster IP of bench service `i`.
fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250) as u8 + 1)
}

/// `lb-lab bench`: every size, then the report.
pub fn bench(opts: &BenchOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let mut records = Vec::new();
    let mut control = Vec::new();
    for &n in &opts.sizes {
        control.push(bench_size(opts, n, &mut records)?);
    }
    let json = serde_json::to_string_pretty(&records)?;
    std::fs::write(opts.out.join("results.json"), json)?;
    std::fs::write(
        opts.out.join("control_plane.json"),
        serde_json::to_string_pretty(&control)?,
    )?;
    let md = report(&records, &control);
    std::fs::write(opts.out.join("report.md"), &md)?;
    std::fs::write(opts.out.join("rates.svg"), svg(&records))?;
    println!("{md}");
    println!(
        "bench: wrote results.json, control_plane.json, report.md and rates.svg to {}",
        opts.out.display()
    );
    Ok(())
}

fn find<'a>(
    r: &'a [Record],
    variant: &str,
    n: usize,
    proto: &str,
    pos: &str,
) -> Option<&'a Record> {
    r.iter()
        .find(|x| x.variant == variant && x.services == n && x.proto == proto && x.position == pos)
}

/// The Markdown report: tables, then each target with MET / MISSED.
pub fn report(records: &[Record], control: &[ControlPlane]) -> String {
    let mut md = String::from(
        "# Benchmark report\n\nRates are requests per second from one sequential client (TCP: connect, request, reply, \
         client closes; UDP: a new socket per request). Ratios are measured side by side: each round runs every \
         variant once, in rotating order, and the ratio is taken within the round; the table shows medians over rounds.\n\n\
         | services | proto | variant | position | rate/s | p50 µs | p99 µs | rate / direct | p99 / direct |\n\
         |---:|---|---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in records {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.3} | {:.3} |",
            r.services,
            r.proto,
            r.variant,
            r.position,
            r.rate,
            r.p50_us,
            r.p99_us,
            r.rate_vs_direct,
            r.p99_vs_direct
        );
    }
    md.push_str("\n## Control plane\n\n| services | endpoints | our cold sync: read ms | model+diff+write ms | of which map writes ms | agent peak RSS MiB | maps memlock MiB |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for c in control {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            c.services,
            c.endpoints,
            c.cold_read_ms,
            c.cold_program_ms,
            c.cold_write_ms,
            c.agent_rss_mib,
            c.maps_memlock_mib
        );
    }
    md.push_str("\nFull rule load of kube-proxy's modes (ms), and one endpoint change until a connection reaches the new backend (p50 / p99 ms):\n\n| services | variant | full load ms | change p50 ms | change p99 ms |\n|---:|---|---:|---:|---:|\n");
    for c in control {
        for (v, [p50, p99]) in &c.change_ms {
            let full = c.cold_rules_ms.get(v).map_or_else(
                || format!("{:.1} (model+diff+write)", c.cold_program_ms),
                |m| format!("{m:.1}"),
            );
            let _ = writeln!(
                md,
                "| {} | {v} | {full} | {p50:.2} | {p99:.2} |",
                c.services
            );
        }
    }
    md.push_str("\n## Targets\n\n");
    let mut check = |name: String, ok: bool, detail: String| {
        let _ = writeln!(
            md,
            "* {} {name}: {detail}",
            if ok { "MET" } else { "MISSED" }
        );
    };
    let sizes: Vec<usize> = {
        let mut s: Vec<usize> = records.iter().map(|r| r.services).collect();
        s.dedup();
        s
    };
    for &n in &sizes {
        for pos in POSITIONS {
            if let Some(r) = find(records, "socket-lb", n, "tcp", pos) {
                check(
                    format!("TCP rate >= 0.97 x direct, {n} services ({pos})"),
                    r.rate_vs_direct >= 0.97,
                    format!("{:.3}", r.rate_vs_direct),
                );
                check(
                    format!("TCP p99 <= 1.05 x direct, {n} services ({pos})"),
                    r.p99_vs_direct <= 1.05,
                    format!("{:.3}", r.p99_vs_direct),
                );
            }
            if let Some(r) = find(records, "socket-lb", n, "udp", pos) {
                check(
                    format!("UDP rate >= 0.95 x direct, {n} services ({pos})"),
                    r.rate_vs_direct >= 0.95,
                    format!("{:.3}", r.rate_vs_direct),
                );
            }
        }
    }
    if let Some(&max) = sizes.iter().max().filter(|m| **m >= 10_000) {
        for pos in POSITIONS {
            if let (Some(us), Some(them)) = (
                find(records, "socket-lb", max, "tcp", pos),
                find(records, "iptables-nft", max, "tcp", pos),
            ) {
                let x = us.rate_vs_direct / them.rate_vs_direct;
                check(
                    format!("TCP rate >= 2 x iptables-nft at {max} services ({pos})"),
                    x >= 2.0,
                    format!("{x:.2}x"),
                );
            }
        }
    }
    if sizes.contains(&1) {
        for proto in ["tcp", "udp"] {
            if let Some(us) = find(records, "socket-lb", 1, proto, "first") {
                for kp in ["iptables-nft", "iptables-legacy", "nftables"] {
                    if let Some(them) = find(records, kp, 1, proto, "first") {
                        let x = us.rate_vs_direct / them.rate_vs_direct;
                        check(
                            format!("{proto} not slower than {kp} at 1 service"),
                            x >= 1.0,
                            format!("{x:.3}x"),
                        );
                    }
                }
            }
        }
    }
    for c in control.iter().filter(|c| c.services >= 10_000) {
        check(
            format!(
                "cold programming of {} services / {} endpoints <= 250 ms",
                c.services, c.endpoints
            ),
            c.cold_program_ms <= 250.0,
            format!(
                "{:.1} ms model+diff+write ({:.1} ms reading the manifests before)",
                c.cold_program_ms, c.cold_read_ms
            ),
        );
        if let Some([_, p99]) = c.change_ms.get("socket-lb") {
            check(
                format!(
                    "one change to datapath p99 <= 5 ms at {} services",
                    c.services
                ),
                *p99 <= 5.0,
                format!("{p99:.2} ms"),
            );
        }
        check(
            format!("agent RSS <= 100 MiB at {} services", c.services),
            c.agent_rss_mib <= 100.0,
            format!("{:.1} MiB", c.agent_rss_mib),
        );
    }
    md
}

/// A bar chart of TCP and UDP rate / direct per size and variant (middle position, or
/// first where there is no middle).
pub fn svg(records: &[Record]) -> String {
    const VARIANTS: [(&str, &str); 5] = [
        ("direct", "#888888"),
        ("socket-lb", "#2a9d8f"),
        ("iptables-nft", "#e76f51"),
        ("iptables-legacy", "#f4a261"),
        ("nftables", "#264653"),
    ];
    let mut groups: Vec<(usize, String)> = records
        .iter()
        .map(|r| (r.services, r.proto.clone()))
        .collect();
    groups.sort();
    groups.dedup();
    let (w_bar, gap, h) = (18.0, 30.0, 300.0);
    let group_w = w_bar * VARIANTS.len() as f64 + gap;
    let width = 80.0 + group_w * groups.len() as f64 + 160.0;
    let max = records
        .iter()
        .map(|r| r.rate_vs_direct)
        .fold(1.2f64, f64::max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <text x=\"10\" y=\"16\" font-size=\"13\">Request rate relative to a direct connection (higher is better)</text>\n",
        h + 80.0
    );
    let y = |v: f64| 30.0 + h - v / max * h;
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = writeln!(
            s,
            "<line x1=\"60\" x2=\"{}\" y1=\"{0:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"30\" y=\"{:.1}\">{tick:.2}</text>",
            width - 150.0,
            y(tick) + 4.0
        )
        .map(|_| ());
    }
    for (gi, (n, proto)) in groups.iter().enumerate() {
        let x0 = 70.0 + gi as f64 * group_w;
        for (vi, (variant, color)) in VARIANTS.iter().enumerate() {
            let rec = find(records, variant, *n, proto, "middle")
                .or_else(|| find(records, variant, *n, proto, "first"))
                .or_else(|| find(records, variant, *n, proto, "-"));
            if let Some(r) = rec {
                let x = x0 + vi as f64 * w_bar;
                let _ = writeln!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{variant} {n} {proto}: {:.3}</title></rect>",
                    y(r.rate_vs_direct),
                    w_bar - 2.0,
                    30.0 + h - y(r.rate_vs_direct),
                    r.rate_vs_direct
                );
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{x0:.1}\" y=\"{:.1}\">{n} svc {proto}</text>",
            h + 50.0
        );
    }
    for (vi, (variant, color)) in VARIANTS.iter().enumerate() {
        let yy = 40.0 + vi as f64 * 18.0;
        let x = width - 140.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{yy}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{variant}</text>",
            x + 16.0,
            yy + 10.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_place_measured_ports_first_middle_last_with_real_pods() {
        let pods = [Ipv4Addr::new(10, 244, 1, 2)];
        let (ports, measured) = services(1000, &pods);
        assert_eq!(measured, [(0, "first"), (500, "middle"), (999, "last")]);
        // 1000 TCP ports plus a UDP port for each measured service.
        assert_eq!(ports.len(), 1003);
        assert_eq!(ports[0].proto, Proto::Udp);
        assert_eq!(ports[0].endpoints, pods);
        assert_eq!(ports[2].endpoints.len(), ENDPOINTS);
        let ips: std::collections::BTreeSet<_> = ports
            .iter()
            .filter(|p| p.proto == Proto::Tcp)
            .map(|p| p.ip)
            .collect();
        assert_eq!(ips.len(), 1000, "distinct cluster IPs");
        let (big, _) = services(10_000, &pods);
        let eps: std::collections::BTreeSet<_> = big
            .iter()
            .filter(|p| p.proto == Proto::Tcp)
            .flat_map(|p| p.endpoints.clone())
            .collect();
        assert!(eps.len() > 99_000, "made-up endpoints are distinct");
    }

    #[test]
    fn manifests_of_the_bench_services_load_into_the_model() {
        let pods = [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 2)];
        let (ports, _) = services(5, &pods);
        let mut loaded = crate::manifest::Loaded::default();
        crate::manifest::parse_into(&manifests(&ports), "bench.yaml", &mut loaded);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let built = crate::model::build(&loaded.objects, None, &[]);
        assert!(built.warnings.is_empty(), "{:?}", built.warnings);
        // 5 TCP frontends + 3 UDP ones, each with its endpoints.
        assert_eq!(built.desired.frontends.len(), 8);
        assert!(
            built
                .desired
                .frontends
                .values()
                .all(|f| !f.endpoints.is_empty())
        );
    }

    #[test]
    fn report_marks_targets_met_and_missed() {
        let rec = |variant: &str, pos: &str, ratio: f64| Record {
            variant: variant.into(),
            services: 10_000,
            proto: "tcp".into(),
            position: pos.into(),
            rate: 1000.0 * ratio,
            p50_us: 10.0,
            p99_us: 20.0,
            rate_vs_direct: ratio,
            p99_vs_direct: 1.0,
        };
        let records = vec![
            rec("direct", "-", 1.0),
            rec("socket-lb", "last", 0.99),
            rec("iptables-nft", "last", 0.6),
        ];
        let md = report(&records, &[]);
        assert!(
            md.contains("* MET TCP rate >= 0.97 x direct, 10000 services (last): 0.990"),
            "{md}"
        );
        assert!(
            md.contains("* MISSED TCP rate >= 2 x iptables-nft at 10000 services (last): 1.65x"),
            "{md}"
        );
        assert!(svg(&records).starts_with("<svg"));
    }
}
