//! `lb-lab demo` (`cargo xtask demo`): Kubernetes Service networking end to end on the
//! two-node lab of the packet tests ([`crate::cluster`]: an outside client and two nodes
//! on a LAN, each node with four pods, its agent and a real node's firewall rules), from
//! the manifests of `manifests/examples/demo`, in seven checked steps:
//!
//! 1. DNS: a pod resolves Services through the cluster DNS (`lb-lab dns`) behind the
//!    kube-dns ClusterIP, over UDP and TCP;
//! 2. ClusterIP from a pod, spread over the backends of both nodes;
//! 3. NodePort from the outside client, on each node;
//! 4. a LoadBalancer IP with externalTrafficPolicy Local, and its healthCheckNodePort;
//! 5. an ingress proxy (`lb-lab ingress`) behind a LoadBalancer IP, routing by Host;
//! 6. a rolling update: a backend terminates, then goes;
//! 7. `lb-user dump` on node 0.
//!
//! Each step prints what happened with counts and checks it: the demo fails (non-zero
//! exit) when a step does not show what it says. Everything it creates (namespaces,
//! cgroups, processes, pins, the manifests' copy) is removed when it ends, on failure too.
//!
//! Pods (the lab names them `n<node>-pod-<i>`):
//!
//! ```text
//!  node 0 (192.168.77.1)                       node 1 (192.168.77.2)
//!   n0-pod-0 10.244.1.2  demo/web               n1-pod-0 10.244.101.2  demo/web
//!   n0-pod-1 10.244.2.2  demo/web               n1-pod-1 10.244.102.2  demo/web
//!   n0-pod-2 10.244.3.2  demo/api               n1-pod-2 10.244.103.2  kube-system/kube-dns
//!   n0-pod-3 10.244.4.2  the client pod         n1-pod-3 10.244.104.2  ingress/ingress
//! ```

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    cluster::{CLIENT_IP, Cluster, node_ip},
    dns::{Data, Resolved},
    lab::{AgentProcess, ChildGuard, ProbeOptions, ProbeReport, place, run, wait_for},
};

const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const NODE_PORT: u16 = 30080;
const API_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const HEALTH_PORT: u16 = 32100;
const INGRESS_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const POD_PORT: u16 = 8080;
/// Pods per node, and the roles of the pods that are not web's (node, index).
const PODS: usize = 4;
const CLIENT_POD: (usize, usize) = (0, 3);
const DNS_POD: (usize, usize) = (1, 2);
const INGRESS_POD: (usize, usize) = (1, 3);
/// The web pods' names (as they answer) and addresses.
const WEB_PODS: [(&str, Ipv4Addr); 4] = [
    ("n0-pod-0", Ipv4Addr::new(10, 244, 1, 2)),
    ("n0-pod-1", Ipv4Addr::new(10, 244, 2, 2)),
    ("n1-pod-0", Ipv4Addr::new(10, 244, 101, 2)),
    ("n1-pod-1", Ipv4Addr::new(10, 244, 102, 2)),
];
pub const STEPS: u8 = 7;

/// The running demo: the cluster, the agents, the DNS and ingress pods' processes.
/// Fields drop in order: processes first, then the agents (programs detached, pins
/// removed), then the namespaces and cgroups, then the scratch directory.
struct Demo {
    system_pods: Vec<ChildGuard>,
    agents: Vec<AgentProcess>,
    cluster: Cluster,
    live: PathBuf,
    agent_bin: PathBuf,
    connections: usize,
    _work: Defer,
}

/// The demo, all steps or step `only`, after the cluster is set up.
pub fn demo(
    manifests: &Path,
    agent: Option<PathBuf>,
    connections: usize,
    only: Option<u8>,
) -> anyhow::Result<()> {
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
    println!(
        "== lb demo: Kubernetes Service networking with eBPF, two nodes and a client outside =="
    );
    let started = std::time::Instant::now();
    catch_interrupt();
    let mut demo = Demo::set_up(&me, &agent_bin, manifests, connections.max(20))?;
    let steps: [(u8, Step); 7] = [
        (1, Demo::dns),
        (2, Demo::cluster_ip),
        (3, Demo::node_port),
        (4, Demo::load_balancer_local),
        (5, Demo::ingress),
        (6, Demo::rolling_update),
        (7, Demo::dump),
    ];
    for (n, step) in steps {
        if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("interrupted before step {n}; cleaning up");
        }
        if only.is_none_or(|o| o == n) {
            step(&mut demo).with_context(|| format!("step {n} of {STEPS}"))?;
        }
    }
    println!(
        "\nTearing down: agents stopped (programs detached, pins removed), pods, nodes, LAN and cgroups deleted."
    );
    drop(demo);
    println!(
        "Done: every step checked, in {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Set by Ctrl-C (SIGINT).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Ctrl-C does not end the demo at once: the terminal's SIGINT still ends its children
/// (a handler is not inherited across exec), so the running step fails, or the next one
/// does not start, and the guards remove what the demo made.
fn catch_interrupt() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
}

/// One step of the demo.
type Step = fn(&mut Demo) -> anyhow::Result<()>;

fn step(n: u8, text: &str) {
    println!("\n[{n}/{STEPS}] {text}");
}

/// Prints `CHECKED: what` when `ok`, else fails with what was claimed.
fn check(ok: bool, what: &str) -> anyhow::Result<()> {
    if !ok {
        bail!("NOT as claimed: {what}");
    }
    println!("      CHECKED: {what}");
    Ok(())
}

/// "A 10.96.0.20, CNAME docs.example.org"
fn show_answers(r: &Resolved) -> String {
    r.answers
        .iter()
        .map(|a| match &a.data {
            Data::A(ip) => format!("A {ip}"),
            Data::Cname(t) => format!("CNAME {t}"),
            Data::Other(t) => format!("type {t}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Replies by server and whom it saw, with a bar each, then the errors.
fn print_report(report: &ProbeReport) {
    let total = report.total_replies() + report.total_errors();
    for (name, n) in report.replies.iter().chain(report.errors.iter()) {
        let pct = 100.0 * *n as f64 / total.max(1) as f64;
        let bar = "#".repeat((pct / 4.0).round() as usize);
        println!("      {name:<28} {n:>4}  {pct:5.1}%  {bar}");
    }
}

/// The replies of `report` by server: "n0-pod-0 from 10.244.4.2" -> ("n0-pod-0", peer).
fn by_server(report: &ProbeReport) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for (reply, n) in &report.replies {
        let (pod, peer) = reply.split_once(" from ").unwrap_or((reply, "?"));
        *out.entry((pod.to_string(), peer.to_string())).or_default() += n;
    }
    out
}

impl Demo {
    /// The cluster, the manifests' copy, the DNS and ingress pods' servers, an agent on
    /// each node, and the client's routes to the LoadBalancer IPs.
    fn set_up(
        lab_bin: &Path,
        agent_bin: &Path,
        manifests: &Path,
        connections: usize,
    ) -> anyhow::Result<Self> {
        println!(
            "\nSetting up: an outside client and 2 nodes on a LAN (netns), {PODS} pods per node, \
             a real node's iptables rules on each"
        );
        let cluster = Cluster::new(lab_bin, "demo", 2, PODS, POD_PORT)?;
        let work = std::env::temp_dir().join(&cluster.prefix);
        let work_guard = Defer(work.clone());
        let live = copy_manifests(manifests, &work)?;
        let mut demo = Self {
            system_pods: Vec::new(),
            agents: Vec::new(),
            cluster,
            live,
            agent_bin: agent_bin.to_path_buf(),
            connections,
            _work: work_guard,
        };
        for (k, lab) in demo.cluster.nodes.iter().enumerate() {
            let pods: Vec<String> = lab
                .pods
                .iter()
                .map(|p| format!("{} {}", p.name, p.ip))
                .collect();
            println!("      node-{k} {}  pods: {}", node_ip(k), pods.join(", "));
        }
        println!("      client {CLIENT_IP} (routes: the LAN only)");
        let live = demo.live.clone();
        let live = live.to_string_lossy();
        demo.start_in_pod(DNS_POD, &["dns", "--manifests", &live, "--port", "53"])?;
        demo.start_in_pod(
            INGRESS_POD,
            &["ingress", "--manifests", &live, "--port", "80"],
        )?;
        println!("      n1-pod-2: `lb-lab dns` on port 53; n1-pod-3: `lb-lab ingress` on port 80");
        for k in 0..demo.cluster.nodes.len() {
            let agent = demo.start_agent(k)?;
            demo.agents.push(agent);
        }
        for (k, agent) in demo.agents.iter_mut().enumerate() {
            agent.wait_synced(1, Duration::from_secs(30))?;
            println!("      agent on node-{k}: first sync done");
        }
        demo.cluster.route_via(API_LB_IP, 0)?;
        demo.cluster.route_via(INGRESS_LB_IP, 1)?;
        println!(
            "      client routes (the cloud load balancer's choice): {API_LB_IP} via node-0, \
             {INGRESS_LB_IP} via node-1"
        );
        Ok(demo)
    }

    /// `lb-lab ARGS` in pod `at`'s namespace and its node's cgroup, once it says "ready".
    fn start_in_pod(&mut self, at: (usize, usize), args: &[&str]) -> anyhow::Result<()> {
        let node = &self.cluster.nodes[at.0];
        let mut cmd = Command::new(&node.lab_bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        place(&mut cmd, &node.pods[at.1].netns, Some(&node.cgroup))?;
        let mut child = ChildGuard(cmd.spawn().with_context(|| format!("starting {cmd:?}"))?);
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().context("piped")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("{cmd:?} did not start (printed {line:?})");
        }
        self.system_pods.push(child);
        Ok(())
    }

    /// Node `k`'s agent on the manifests' copy, attached to the node's cgroup (its pods)
    /// and its LAN interface (the node's address).
    fn start_agent(&self, k: usize) -> anyhow::Result<AgentProcess> {
        let node = &self.cluster.nodes[k];
        let (name, ip) = (format!("node-{k}"), node_ip(k).to_string());
        let pin = PathBuf::from(format!("/sys/fs/bpf/{}", node.prefix));
        let args: [&std::ffi::OsStr; 6] = [
            "--manifests".as_ref(),
            self.live.as_os_str(),
            "--hostname-override".as_ref(),
            name.as_ref(),
            "--node-ip".as_ref(),
            ip.as_ref(),
        ];
        if k == 0 {
            println!(
                "      agent: lb-user run --manifests {} --hostname-override node-K --node-ip NODE_IP \
                 --cgroup <node's cgroup> --pin-path /sys/fs/bpf/<node>",
                self.live.display()
            );
        }
        let log = self.live.with_file_name(format!("agent-{k}.log"));
        AgentProcess::start_in(
            Some(&node.node),
            &self.agent_bin,
            &args,
            &node.cgroup.path,
            &pin,
            &log,
        )
    }

    /// `lb-lab ARGS` run to completion in pod `at` (its node's cgroup): its output.
    fn run_in_pod(&self, at: (usize, usize), args: &[&str]) -> anyhow::Result<String> {
        let node = &self.cluster.nodes[at.0];
        let mut cmd = Command::new(&node.lab_bin);
        cmd.args(args);
        place(&mut cmd, &node.pods[at.1].netns, Some(&node.cgroup))?;
        run(&mut cmd)
    }

    /// `lb-lab ARGS` run to completion from the outside client: its output.
    fn run_outside(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.cluster.nodes[0].lab_bin);
        cmd.args(args);
        place(&mut cmd, &self.cluster.client, None)?;
        run(&mut cmd)
    }

    /// A probe from the client pod.
    fn probe_from_pod(&self, opts: &ProbeOptions) -> anyhow::Result<ProbeReport> {
        let node = &self.cluster.nodes[CLIENT_POD.0];
        node.probe_from(opts, &node.pods[CLIENT_POD.1].netns, true)
    }

    /// `lb-lab resolve` from the client pod.
    fn resolve(&self, name: &str, tcp: bool) -> anyhow::Result<Resolved> {
        let server = SocketAddrV4::new(DNS_IP, 53).to_string();
        let mut args = vec!["resolve", "--server", &server, "--name", name];
        if tcp {
            args.push("--tcp");
        }
        let out = self.run_in_pod(CLIENT_POD, &args)?;
        serde_json::from_str(out.trim()).with_context(|| format!("resolve printed {out:?}"))
    }

    /// Step 1: names resolved from a pod through the kube-dns ClusterIP.
    fn dns(&mut self) -> anyhow::Result<()> {
        step(
            1,
            &format!(
                "DNS: the client pod (n0-pod-3) asks the cluster DNS at the kube-dns ClusterIP {DNS_IP}:53 \
                 (its pod n1-pod-2 is on node 1)"
            ),
        );
        let a = |ips: &[Ipv4Addr]| ips.iter().map(|ip| Data::A(*ip)).collect::<Vec<_>>();
        let dns = SocketAddr::from(SocketAddrV4::new(DNS_IP, 53));
        let web_pods: Vec<Ipv4Addr> = WEB_PODS.iter().map(|(_, ip)| *ip).collect();
        let cases = [
            (
                "web.demo.svc.cluster.local",
                false,
                a(&[WEB_IP]),
                "ClusterIP Service: its ClusterIP",
            ),
            (
                "web.demo.svc.cluster.local",
                true,
                a(&[WEB_IP]),
                "the same over TCP",
            ),
            (
                "web-pods.demo.svc.cluster.local",
                false,
                a(&web_pods),
                "headless Service: its ready pods",
            ),
            (
                "docs.demo.svc.cluster.local",
                false,
                vec![Data::Cname("docs.example.org".into())],
                "ExternalName Service: a CNAME",
            ),
        ];
        for (name, tcp, want, what) in cases {
            let r = self.resolve(name, tcp)?;
            let proto = if tcp { "TCP" } else { "UDP" };
            println!(
                "      {name:<34} {proto}  {} {} (answered from {})",
                r.rcode,
                show_answers(&r),
                r.from
            );
            let got: Vec<Data> = r.answers.iter().map(|x| x.data.clone()).collect();
            check(
                r.rcode == "NOERROR" && got == want && r.from == dns,
                &format!("{what}, {} answer(s), from {dns} over {proto}", want.len()),
            )?;
        }
        let r = self.resolve("nope.demo.svc.cluster.local", false)?;
        println!("      nope.demo.svc.cluster.local        UDP  {}", r.rcode);
        check(r.rcode == "NXDOMAIN", "a name no Service has: NXDOMAIN")
    }

    /// Step 2: connections from a pod to web's ClusterIP.
    fn cluster_ip(&mut self) -> anyhow::Result<()> {
        let n = self.connections;
        step(
            2,
            &format!(
                "ClusterIP: {n} TCP connections from the client pod (n0-pod-3, 10.244.4.2) to demo/web {WEB_IP}:80"
            ),
        );
        let report = self.probe_from_pod(&ProbeOptions::tcp(SocketAddrV4::new(WEB_IP, 80), n))?;
        print_report(&report);
        let servers = by_server(&report);
        let pods: std::collections::BTreeSet<&str> =
            servers.keys().map(|(p, _)| p.as_str()).collect();
        check(
            report.total_replies() == n && report.total_errors() == 0,
            &format!("{n} of {n} answered, and getpeername() said {WEB_IP}:80 on every one"),
        )?;
        check(
            pods.len() == 4
                && ["n0-", "n1-"]
                    .iter()
                    .all(|k| pods.iter().any(|p| p.starts_with(k))),
            "spread over the 4 web pods, on both nodes",
        )?;
        check(
            servers.keys().all(|(_, peer)| peer == "10.244.4.2"),
            "each backend saw the client pod's own address (translated at connect(), no NAT)",
        )
    }

    /// Step 3: web's nodePort from the outside client, on each node.
    fn node_port(&mut self) -> anyhow::Result<()> {
        let n = self.connections / 2;
        step(
            3,
            &format!(
                "NodePort: {n} connections from the outside client ({CLIENT_IP}) to each node's :{NODE_PORT}"
            ),
        );
        for k in 0..2 {
            let target = SocketAddrV4::new(node_ip(k), NODE_PORT);
            println!("      to node-{k} {target}:");
            let opts = ProbeOptions {
                timeout: Duration::from_millis(800),
                ..ProbeOptions::tcp(target, n)
            };
            let report = self.cluster.probe(&opts)?;
            print_report(&report);
            let servers = by_server(&report);
            let here = format!("n{k}-");
            check(
                report.total_errors() == 0 && servers.len() == 4,
                &format!("{n} of {n} answered, by the 4 web pods of both nodes"),
            )?;
            let node = node_ip(k).to_string();
            let client = CLIENT_IP.to_string();
            check(
                servers.keys().all(|(pod, peer)| {
                    if pod.starts_with(&here) {
                        *peer == client
                    } else {
                        *peer == node
                    }
                }),
                &format!(
                    "externalTrafficPolicy Cluster: pods on the other node saw node-{k} ({node}, SNAT); \
                     node-{k}'s own pods saw the client (DNAT only)"
                ),
            )?;
        }
        Ok(())
    }

    /// Step 4: api's LoadBalancer IP (externalTrafficPolicy Local) and its health check.
    fn load_balancer_local(&mut self) -> anyhow::Result<()> {
        let n = 20;
        step(
            4,
            &format!(
                "LoadBalancer {API_LB_IP}:80 with externalTrafficPolicy Local (demo/api: one pod, n0-pod-2 on node 0)"
            ),
        );
        let target = SocketAddrV4::new(API_LB_IP, 80);
        let report = self.cluster.probe(&ProbeOptions::tcp(target, n))?;
        println!("      {n} connections, the load balancer sending them to node-0:");
        print_report(&report);
        let client = CLIENT_IP.to_string();
        check(
            report.total_errors() == 0
                && by_server(&report)
                    .keys()
                    .all(|(pod, peer)| pod == "n0-pod-2" && *peer == client),
            &format!(
                "{n} of {n} answered by n0-pod-2, which saw the client's own address {client}"
            ),
        )?;
        for (k, want, local) in [(0, 200, 1), (1, 503, 0)] {
            let target = SocketAddrV4::new(node_ip(k), HEALTH_PORT).to_string();
            let out = self.run_outside(&["http-get", "--target", &target])?;
            let (code, body) = out.trim().split_once(' ').unwrap_or((out.trim(), ""));
            println!("      GET http://{target}/  ->  {code} {body}");
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            check(
                code == want.to_string() && v["localEndpoints"] == local,
                &format!("node-{k}'s healthCheckNodePort says {want}, localEndpoints {local}"),
            )?;
        }
        // What the load balancer would not do: send the traffic to node 1 anyway.
        let via = |k: usize| {
            let (addr, hop) = (format!("{API_LB_IP}/32"), node_ip(k).to_string());
            self.cluster
                .client
                .ip(&["route", "replace", &addr, "via", &hop])
        };
        via(1)?;
        let opts = ProbeOptions {
            timeout: Duration::from_millis(500),
            ..ProbeOptions::tcp(target, 3)
        };
        let report = self.cluster.probe(&opts);
        via(0)?;
        let report = report?;
        println!("      3 connections sent to node-1 instead:");
        print_report(&report);
        check(
            report.total_replies() == 0,
            "node-1 (no local endpoint) dropped them: 0 of 3 answered",
        )
    }

    /// Step 5: the ingress proxy behind its LoadBalancer IP, by Host header.
    fn ingress(&mut self) -> anyhow::Result<()> {
        let n = 12;
        step(
            5,
            &format!(
                "Ingress: the outside client sends HTTP to {INGRESS_LB_IP}:80 (ingress/ingress, the proxy in \
                 n1-pod-3), which routes by Host to Services by ClusterIP"
            ),
        );
        let target = SocketAddrV4::new(INGRESS_LB_IP, 80).to_string();
        for (host, want) in [
            ("web.example.com", "demo/web"),
            ("api.example.com", "demo/api"),
        ] {
            let mut bodies: BTreeMap<String, usize> = BTreeMap::new();
            for _ in 0..n {
                let out = self.run_outside(&["http-get", "--target", &target, "--host", host])?;
                *bodies.entry(out.trim().to_string()).or_default() += 1;
            }
            println!("      Host: {host} ({n} requests)");
            for (body, count) in &bodies {
                println!("        {count:>3} x {body}");
            }
            let pods: Vec<&str> = bodies
                .keys()
                .filter_map(|b| b.strip_prefix("200 ")?.split(' ').next())
                .collect();
            let ok = bodies
                .keys()
                .all(|b| b.starts_with("200 ") && b.ends_with("from 10.244.104.2"));
            let right = match want {
                "demo/web" => {
                    pods.len() >= 2 && pods.iter().all(|p| WEB_PODS.iter().any(|(w, _)| w == p))
                }
                _ => pods == ["n0-pod-2"],
            };
            check(
                ok && right,
                &format!(
                    "{n} of {n} got 200 from {want}'s pods ({} of them), reached from the proxy pod",
                    pods.len()
                ),
            )?;
        }
        let out = self.run_outside(&[
            "http-get",
            "--target",
            &target,
            "--host",
            "other.example.com",
        ])?;
        println!("      Host: other.example.com  ->  {}", out.trim());
        check(out.starts_with("404 "), "a host no Ingress rule names: 404")
    }

    /// Step 7: what node 0's maps hold.
    fn dump(&mut self) -> anyhow::Result<()> {
        step(
            7,
            "lb-user dump on node-0: frontends with their Services, backends, counters",
        );
        let dump = run(Command::new(&self.agent_bin)
            .arg("dump")
            .arg("--pin-path")
            .arg(&self.agents[0].pin_path))?;
        for line in dump.lines() {
            println!("      {line}");
        }
        let names = [
            "demo/web",
            "demo/api",
            "kube-system/kube-dns",
            "ingress/ingress",
        ];
        check(
            names.iter().all(|n| dump.contains(n)),
            "the dump names the frontends' Services: demo/web, demo/api, kube-system/kube-dns, ingress/ingress",
        )?;
        check(
            dump.contains(&format!("{WEB_IP}:80")) && dump.contains(&format!(":{NODE_PORT}")),
            &format!("web's ClusterIP {WEB_IP}:80 and nodePort {NODE_PORT} are frontends"),
        )
    }
}

/// Step 6, apart for its length: a rolling update of one web pod.
impl Demo {
    fn rolling_update(&mut self) -> anyhow::Result<()> {
        let held = 16;
        step(
            6,
            &format!(
                "A rolling update: the client pod holds {held} connections to demo/web; one web pod \
                 terminates, then goes"
            ),
        );
        let mut hold = self.hold(held)?;
        let first = hold.status()?;
        let victim = pick_victim(&first)?;
        let on_victim = first
            .iter()
            .filter(|s| s.starts_with(&format!("{victim} ")))
            .count();
        println!("      held: {} (by server)", summary(&first));
        let before = self.closer_passes();
        println!(
            "      {victim} becomes terminating (ready: false, serving: true, terminating: true)"
        );
        self.change(victim, Edit::Terminating)?;
        wait_for(Duration::from_secs(5), || {
            (self.closer_passes() > before).then_some(())
        })
        .context("node-0's agent did not log closing the sockets within 5 s")?;
        let after = hold.status()?;
        println!("      held now: {}", summary(&after));
        let closed = after.iter().filter(|s| s.contains("ECONNABORTED")).count();
        let alive = after.iter().filter(|s| s.ends_with("alive")).count();
        check(
            closed == on_victim && alive == held - on_victim,
            &format!(
                "the {on_victim} connection(s) to {victim} were closed (ECONNABORTED), the other {} live on",
                held - on_victim
            ),
        )?;
        self.new_connections_avoid(victim)?;
        let r = self.resolve("web-pods.demo.svc.cluster.local", false)?;
        println!(
            "      web-pods.demo.svc.cluster.local now: {}",
            show_answers(&r)
        );
        let victim_ip = WEB_PODS
            .iter()
            .find(|(n, _)| *n == victim)
            .map(|(_, ip)| Data::A(*ip));
        check(
            r.answers.len() == 3
                && r.answers
                    .iter()
                    .all(|a| Some(&a.data) != victim_ip.as_ref()),
            &format!("the headless Service's DNS answer lost {victim}: 3 pods"),
        )?;
        println!("      {victim} goes (its endpoint removed, its server stopped)");
        self.change(victim, Edit::Remove)?;
        let (k, i) = web_pod_index(victim)?;
        self.cluster.nodes[k].stop_server(i);
        self.new_connections_avoid(victim)?;
        let last = hold.status()?;
        check(
            last.iter().filter(|s| s.ends_with("alive")).count() == held - on_victim,
            &format!(
                "the other {} held connections are still alive",
                held - on_victim
            ),
        )
    }

    /// `lb-lab hold-tcp` in the client pod.
    fn hold(&self, connections: usize) -> anyhow::Result<HoldTcp> {
        let node = &self.cluster.nodes[CLIENT_POD.0];
        let mut cmd = Command::new(&node.lab_bin);
        cmd.args([
            "hold-tcp",
            "--target",
            &SocketAddrV4::new(WEB_IP, 80).to_string(),
        ])
        .args(["--connections", &connections.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        place(&mut cmd, &node.pods[CLIENT_POD.1].netns, Some(&node.cgroup))?;
        let mut child = ChildGuard(cmd.spawn().context("starting lb-lab hold-tcp")?);
        let reader = BufReader::new(child.0.stdout.take().context("piped")?);
        Ok(HoldTcp { child, reader })
    }

    /// The socket closer's passes that closed something, logged by node 0's agent.
    fn closer_passes(&self) -> usize {
        self.agents[0]
            .log()
            .matches("closed the sockets translated to backends that left")
            .count()
    }

    /// Makes `edit` to `victim`'s endpoint and waits for both agents' sync after it.
    fn change(&mut self, victim: &str, edit: Edit) -> anyhow::Result<()> {
        let before: Vec<usize> = self.agents.iter().map(AgentProcess::syncs).collect();
        self.edit_slices(victim, edit)?;
        for (agent, before) in self.agents.iter_mut().zip(before) {
            agent.wait_sync_after(before, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Connections from the client pod after a change: all answered, none by `victim`.
    fn new_connections_avoid(&self, victim: &str) -> anyhow::Result<()> {
        let n = self.connections / 2;
        let report = self.probe_from_pod(&ProbeOptions::tcp(SocketAddrV4::new(WEB_IP, 80), n))?;
        print_report(&report);
        let servers = by_server(&report);
        check(
            report.total_errors() == 0
                && servers.len() == 3
                && servers.keys().all(|(p, _)| p != victim),
            &format!("{n} new connections: {n} answered, by the 3 other pods, none by {victim}"),
        )
    }

    /// Edits `victim`'s endpoint in every EndpointSlice of the manifests' copy (web's and
    /// web-pods'), each file rewritten atomically.
    fn edit_slices(&self, victim: &str, edit: Edit) -> anyhow::Result<()> {
        let ip = WEB_PODS
            .iter()
            .find(|(n, _)| *n == victim)
            .map(|(_, ip)| ip.to_string())
            .context("not a web pod")?;
        for file in ["web.yaml", "web-pods.yaml"] {
            let path = self.live.join(file);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut out = Vec::new();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let mut v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)?;
                if let Some(eps) = v.get_mut("endpoints").and_then(|e| e.as_sequence_mut()) {
                    edit_endpoints(eps, &ip, edit);
                }
                out.push(serde_yaml::to_string(&v)?);
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, out.join("---\n"))?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Edit {
    Terminating,
    Remove,
}

/// Marks the endpoint with address `ip` terminating, or removes it.
fn edit_endpoints(eps: &mut Vec<serde_yaml::Value>, ip: &str, edit: Edit) {
    let is_it = |ep: &serde_yaml::Value| {
        ep["addresses"]
            .as_sequence()
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(ip)))
    };
    match edit {
        Edit::Remove => eps.retain(|ep| !is_it(ep)),
        Edit::Terminating => {
            for ep in eps.iter_mut().filter(|ep| is_it(ep)) {
                let c = &mut ep["conditions"];
                c["ready"] = false.into();
                c["serving"] = true.into();
                c["terminating"] = true.into();
            }
        }
    }
}

/// The web pod holding the most connections (a pod on node 1 when tied): the one the
/// update replaces, so that some held connection shows what happens to it.
fn pick_victim(held: &[String]) -> anyhow::Result<&'static str> {
    WEB_PODS
        .iter()
        .map(|(name, _)| {
            (
                held.iter()
                    .filter(|s| s.starts_with(&format!("{name} ")))
                    .count(),
                *name,
            )
        })
        .filter(|(n, _)| *n > 0)
        .max()
        .map(|(_, name)| name)
        .context("no held connection reached a web pod")
}

/// (node, pod index) of web pod `name` ("n1-pod-0").
fn web_pod_index(name: &str) -> anyhow::Result<(usize, usize)> {
    let (node, pod) = name
        .strip_prefix('n')
        .and_then(|r| r.split_once("-pod-"))
        .context("not a pod name")?;
    Ok((node.parse()?, pod.parse()?))
}

/// "n0-pod-0 x4 alive, n1-pod-1 x3 ECONNABORTED, ..." from statuses "POD from PEER: STATE".
fn summary(statuses: &[String]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for s in statuses {
        let pod = s.split(' ').next().unwrap_or_default();
        let state = s.rsplit(": ").next().unwrap_or_default();
        *counts.entry(format!("{pod} {state}")).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| {
            let (pod, state) = k.split_once(' ').unwrap_or((k, ""));
            format!("{pod} x{n} {state}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A running `lb-lab hold-tcp`.
struct HoldTcp {
    child: ChildGuard,
    reader: BufReader<std::process::ChildStdout>,
}

impl HoldTcp {
    /// Each connection's "POD from PEER: STATE" now.
    fn status(&mut self) -> anyhow::Result<Vec<String>> {
        let stdin = self.child.0.stdin.as_mut().context("piped")?;
        writeln!(stdin, "status")?;
        stdin.flush()?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        serde_json::from_str(line.trim()).with_context(|| format!("hold-tcp printed {line:?}"))
    }
}

/// `lb-lab hold-tcp`: `connections` TCP connections to `target`, each asking the pod
/// server to echo (so it stays open); for each line from stdin, prints each
/// connection's "POD from PEER: STATE" as JSON, STATE `alive` (a byte echoed back) or
/// the error it gives. Ends at the end of stdin.
pub fn hold_tcp(target: SocketAddr, connections: usize) -> anyhow::Result<()> {
    let mut conns = Vec::new();
    for _ in 0..connections {
        let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .with_context(|| format!("connecting to {target}"))?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        c.write_all(b"ECHO 1000000\n")?;
        let mut reader = BufReader::new(c.try_clone()?);
        let mut who = String::new();
        reader.read_line(&mut who)?;
        conns.push((c, who.trim().to_string()));
    }
    let mut out = std::io::stdout();
    for line in std::io::stdin().lines() {
        line?;
        let statuses: Vec<String> = conns
            .iter_mut()
            .map(|(c, who)| format!("{who}: {}", ping(c)))
            .collect();
        writeln!(out, "{}", serde_json::to_string(&statuses)?)?;
        out.flush()?;
    }
    Ok(())
}

/// `alive` when a byte sent comes back within 1 s, else what went wrong.
fn ping(c: &mut TcpStream) -> String {
    let name = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ECONNABORTED) => "ECONNABORTED".to_string(),
        Some(libc::ECONNRESET) => "ECONNRESET".to_string(),
        Some(libc::EPIPE) => "EPIPE".to_string(),
        _ => format!("{:?}", e.kind()),
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
    if let Err(e) = c.write_all(b".") {
        return name(e);
    }
    let mut b = [0u8; 1];
    match c.read(&mut b) {
        Ok(1) => "alive".into(),
        Ok(_) => "closed".into(),
        Err(e) => name(e),
    }
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

/// Removes a scratch directory on drop.
struct Defer(PathBuf);

impl Drop for Defer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_update_replaces_a_pod_that_holds_connections() {
        let held: Vec<String> = [
            "n0-pod-0 from x: alive",
            "n1-pod-1 from x: alive",
            "n1-pod-1 from x: alive",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(pick_victim(&held).unwrap(), "n1-pod-1");
        assert!(pick_victim(&[]).is_err());
        assert_eq!(web_pod_index("n1-pod-0").unwrap(), (1, 0));
        assert_eq!(summary(&held), "n0-pod-0 x1 alive, n1-pod-1 x2 alive");
    }

    #[test]
    fn an_endpoint_becomes_terminating_then_goes() {
        let mut eps: Vec<serde_yaml::Value> = serde_yaml::from_str(
            "- {addresses: [10.244.1.2], conditions: {ready: true}}\n- {addresses: [10.244.2.2]}\n",
        )
        .unwrap();
        edit_endpoints(&mut eps, "10.244.2.2", Edit::Terminating);
        assert_eq!(eps[1]["conditions"]["ready"], false);
        assert_eq!(eps[1]["conditions"]["terminating"], true);
        assert_eq!(eps[0]["conditions"]["ready"], true);
        edit_endpoints(&mut eps, "10.244.2.2", Edit::Remove);
        assert_eq!(eps.len(), 1);
    }
}
