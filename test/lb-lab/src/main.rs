//! `lb-lab`: the one-machine lab. `serve` and `probe` are the pod server and the client
//! the tests use; `demo` shows the load balancer at work in network namespaces; `bench`
//! (with `load` and `waiter` as its clients) compares it with kube-proxy.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_user::lab::{self, AgentProcess, Lab, ProbeMode, ProbeOptions, ProbeReport};

#[derive(Parser)]
#[command(
    name = "lb-lab",
    about = "Pods, clients and a demo in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer every TCP connection and UDP datagram on PORT with NAME (runs until killed).
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        /// Benchmark protocol: read the request, answer, wait for the client to close.
        #[arg(long)]
        bench: bool,
    },
    /// The benchmark's load generator: COUNT requests one after the other, round-robin
    /// over the targets; prints rate and latency as JSON.
    Load {
        #[arg(long, required = true)]
        target: Vec<std::net::SocketAddr>,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, value_enum, default_value = "tcp")]
        mode: lb_user::bench::LoadMode,
    },
    /// For each pod name read from stdin, connect to TARGET until that pod answers; print ok.
    Waiter {
        #[arg(long)]
        target: std::net::SocketAddr,
    },
    /// Run the benchmarks (see `cargo xtask bench`).
    Bench {
        /// Numbers of services to measure at.
        #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
        sizes: Vec<usize>,
        /// Rounds; each runs every variant once.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Requests per variant per round.
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Endpoint changes measured per variant and size.
        #[arg(long, default_value_t = 50)]
        changes: usize,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// The agent binary (default: lb-user next to this program).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// Exchange COUNT requests with TARGET and print, as JSON, who answered and which errors.
    Probe {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        #[arg(long, value_enum, default_value = "tcp")]
        mode: ProbeMode,
    },
    /// Build a small namespace cluster, run the agent on example manifests, send traffic.
    Demo {
        /// Directory of the demo's Service and EndpointSlice manifests.
        #[arg(long, default_value = "manifests/examples/demo")]
        manifests: PathBuf,
        /// The agent binary (default: lb-user next to this program).
        #[arg(long)]
        agent: Option<PathBuf>,
        #[arg(long, default_value_t = 300)]
        connections: usize,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Serve { name, port, bench } => {
            if bench {
                lb_user::bench::serve_bench(&name, port)
            } else {
                lab::serve(&name, port)
            }
        }
        Cmd::Load {
            target,
            count,
            mode,
        } => {
            let report = lb_user::bench::load(&target, count, mode, Duration::from_secs(1));
            serde_json::to_string(&report)
                .map(|s| println!("{s}"))
                .map_err(Into::into)
        }
        Cmd::Waiter { target } => lb_user::bench::waiter(target),
        Cmd::Bench {
            sizes,
            rounds,
            count,
            changes,
            out,
            agent,
        } => std::env::current_exe()
            .context("finding lb-lab")
            .and_then(|me| {
                let agent = agent.unwrap_or_else(|| me.with_file_name("lb-user"));
                lb_user::bench::bench(&lb_user::bench::BenchOptions {
                    sizes,
                    rounds: rounds.max(1),
                    count: count.max(1),
                    changes,
                    out,
                    lab_bin: me,
                    agent_bin: agent,
                })
            }),
        Cmd::Probe {
            target,
            count,
            timeout_ms,
            mode,
        } => {
            let report = lab::probe(&ProbeOptions {
                target,
                count,
                timeout: Duration::from_millis(timeout_ms),
                mode,
            });
            serde_json::to_string(&report)
                .map(|s| println!("{s}"))
                .map_err(Into::into)
        }
        Cmd::Demo {
            manifests,
            agent,
            connections,
        } => demo(&manifests, agent, connections),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-lab: {}", lb_user::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

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

fn demo(manifests: &Path, agent: Option<PathBuf>, connections: usize) -> anyhow::Result<()> {
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

    step(
        1,
        "Creating a node namespace and 3 pod namespaces, each pod running a server that answers with its name",
    );
    let lab = Lab::new(&me, "demo", 3, 8080)?;
    println!(
        "      node netns {}  (routes to the pods only: nothing else is reachable)",
        lab.node.name
    );
    for p in &lab.pods {
        println!("      {}  {}:8080  netns {}", p.name, p.ip, p.netns.name);
    }
    println!("      client cgroup {}", lab.cgroup.path.display());

    let work = std::env::temp_dir().join(&lab.prefix);
    std::fs::create_dir_all(&work)?;
    let cleanup_work = Defer(work.clone());
    let live_manifests = work.join("manifests");
    std::fs::create_dir_all(&live_manifests)?;
    for entry in std::fs::read_dir(manifests)? {
        let entry = entry?;
        std::fs::copy(entry.path(), live_manifests.join(entry.file_name()))?;
    }
    let pin_path = PathBuf::from(format!("/sys/fs/bpf/{}", lab.prefix));
    step(
        2,
        "Starting the agent on the example manifests (a copy, so the demo can change it)",
    );
    println!(
        "      {} run --manifests {} --cgroup {} --pin-path {}",
        agent_bin.display(),
        live_manifests.display(),
        lab.cgroup.path.display(),
        pin_path.display()
    );
    let mut agent = AgentProcess::start(
        &agent_bin,
        &["--manifests".as_ref(), live_manifests.as_os_str()],
        &lab.cgroup.path,
        &pin_path,
        &work.join("agent.log"),
    )?;
    agent.wait_synced(1, Duration::from_secs(15))?;
    for line in agent.log().lines() {
        println!("      agent: {line}");
    }

    step(
        3,
        &format!(
            "{connections} TCP connections from a client in the cgroup to the ClusterIP {CLUSTER_IP}:80 (service demo/web)"
        ),
    );
    let target = SocketAddrV4::new(CLUSTER_IP, 80);
    let report = lab.probe(&ProbeOptions::tcp(target, connections), true)?;
    print_report(&report);

    step(4, "What the maps hold: lb-user dump");
    let dump = lab::run(
        Command::new(&agent_bin)
            .arg("dump")
            .arg("--pin-path")
            .arg(&pin_path),
    )?;
    for line in dump.lines() {
        println!("      {line}");
    }

    step(
        5,
        "pod-2 stops being ready (EndpointSlice edited); new connections avoid it",
    );
    let slice_path = live_manifests.join("web-endpointslice.yaml");
    let text = std::fs::read_to_string(&slice_path)?;
    let mut slice: serde_yaml::Value = serde_yaml::from_str(&text)?;
    slice["endpoints"][2]["conditions"]["ready"] = serde_yaml::Value::Bool(false);
    std::fs::write(&slice_path, serde_yaml::to_string(&slice)?)?;
    agent.wait_synced(2, Duration::from_secs(10))?;
    let report = lab.probe(&ProbeOptions::tcp(target, connections), true)?;
    print_report(&report);
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

/// Removes a scratch directory on drop.
struct Defer(PathBuf);

impl Drop for Defer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
