//! `lb-lab`: the one-machine lab. `serve` and `probe` are the pod server and the client
//! the tests use; `demo` shows the load balancer at work in network namespaces; `bench`
//! (with `load` and `waiter` as its clients) compares it with kube-proxy.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_lab::{
    bench, client_pods, demo, dns, flood, ingress,
    lab::{self, ProbeMode, ProbeOptions},
    load, pktgen,
};

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
        /// Answer "NAME from PEER-ADDRESS": who the server sees as the client.
        #[arg(long)]
        say_peer: bool,
    },
    /// The benchmark's load generator: COUNT requests one after the other, round-robin
    /// over the targets, from each of CLIENTS clients; prints rate, latency and the
    /// machine's busy CPU time as JSON.
    Load {
        #[arg(long, required = true)]
        target: Vec<std::net::SocketAddr>,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, value_enum, default_value = "tcp")]
        mode: load::LoadMode,
        /// Requests per client before the clock starts (not counted).
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// Concurrent clients, each COUNT requests.
        #[arg(long, default_value_t = 1)]
        clients: usize,
        /// Each request to a target drawn at random instead of round-robin.
        #[arg(long)]
        random: bool,
        /// Run on this CPU only.
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// For each pod name read from stdin, connect to TARGET until that pod answers; print ok.
    Waiter {
        #[arg(long)]
        target: std::net::SocketAddr,
    },
    /// Hold a TCP connection and a connected UDP socket to SERVICE and a UDP socket
    /// connected to DIRECT; print who answered (JSON); on a line from stdin, print the
    /// first error each socket gives (JSON).
    Hold {
        #[arg(long)]
        service: std::net::SocketAddr,
        #[arg(long)]
        direct: std::net::SocketAddr,
    },
    /// SOCKETS UDP sockets connected to TARGET; prints how many (JSON), then for each
    /// line from stdin how many of them were closed under it (ECONNABORTED).
    HoldMany {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, default_value_t = 100)]
        sockets: usize,
    },
    /// One unconnected UDP socket to TARGET, driven from stdin: `send N` (N exchanges),
    /// `queue` (a datagram whose reply stays queued), `read` (one reply); prints what
    /// answered each line as JSON.
    UdpSocket {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
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
        /// MB echoed through one connection by the NodePort bulk transfer.
        #[arg(long, default_value_t = 300)]
        transfer_mb: u64,
        /// Which benchmarks: socket (ClusterIP, from the node), nodeport (from outside),
        /// control (our agent's cold start and changes only, part of socket), closer
        /// (the stale-socket closer: 10,000 sockets in 100 pods), packets (the packet
        /// rate from outside: tc, XDP native and generic, iptables-nft, nftables).
        #[arg(long, value_delimiter = ',', default_value = "socket,nodeport,closer,packets",
              value_parser = ["socket", "nodeport", "control", "closer", "packets"])]
        paths: Vec<String>,
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
        /// Source port (0: any), so that two runs are one flow (UDP) or one tuple (TCP).
        #[arg(long, default_value_t = 0)]
        source_port: u16,
        /// Pause after each exchange.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// UDP: datagrams of SIZE bytes each way (0: a short line).
        #[arg(long, default_value_t = 0)]
        size: usize,
    },
    /// COUNT TCP SYNs to TARGET from random sources in SOURCE_NET (a raw socket), spread
    /// over DURATION_MS; prints how many were sent (JSON).
    SynFlood {
        #[arg(long)]
        target: std::net::SocketAddrV4,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        duration_ms: u64,
        #[arg(long, default_value = "198.18.0.0/15")]
        source_net: String,
        /// Every SYN from this port (0: random ports).
        #[arg(long, default_value_t = 0)]
        source_port: u16,
    },
    /// UDP datagrams to the targets as fast as one thread sends them (sendmmsg batches),
    /// for DURATION_MS or MAX_PACKETS, over FLOWS connected sockets, or from random
    /// sources of SOURCE_NET (a raw socket); prints what was sent (JSON).
    UdpFlood {
        #[arg(long, required = true)]
        target: Vec<std::net::SocketAddrV4>,
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 100_000_000)]
        max_packets: u64,
        /// UDP payload bytes (18: 64-byte Ethernet frames with the FCS).
        #[arg(long, default_value_t = 18)]
        payload: usize,
        #[arg(long, default_value_t = 64)]
        flows: usize,
        #[arg(long)]
        source_net: Option<String>,
        /// Run on this CPU only.
        #[arg(long)]
        cpu: Option<usize>,
        /// At most RATE datagrams a second (default: as fast as the thread goes).
        #[arg(long)]
        rate: Option<u64>,
    },
    /// BYTES to TARGET and back through one TCP connection (the pod server echoes after
    /// `ECHO BYTES`), pausing PAUSE_MS halfway; prints what came back as JSON.
    Transfer {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// GET http://TARGET/PATH; prints the status code and the body.
    HttpGet {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        /// The Host header (default: TARGET).
        #[arg(long)]
        host: Option<String>,
    },
    /// A cluster DNS server: `<service>.<namespace>.svc.cluster.local` from the Services
    /// and EndpointSlices in MANIFESTS (re-read at each query), UDP and TCP on PORT.
    Dns {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long, default_value_t = 53)]
        port: u16,
    },
    /// Ask SERVER for the A records of NAME as a stub resolver does; prints the answer
    /// as JSON.
    Resolve {
        #[arg(long)]
        server: std::net::SocketAddr,
        #[arg(long)]
        name: String,
        /// Over TCP (default: UDP, then TCP when the answer is truncated).
        #[arg(long)]
        tcp: bool,
    },
    /// An HTTP ingress proxy on PORT: the Ingress objects in MANIFESTS route each
    /// request by its Host header to a Service's ClusterIP.
    Ingress {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
    /// Open CONNECTIONS TCP connections to TARGET (pod servers in echo mode); print who
    /// answered each (JSON); on each line from stdin, print which are still alive.
    HoldTcp {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, default_value_t = 8)]
        connections: usize,
    },
    /// Build a small namespace cluster, run the agent on example manifests, send traffic.
    Demo {
        /// Directory of the demo's Service and EndpointSlice manifests.
        #[arg(long, default_value = "manifests/examples/demo")]
        manifests: PathBuf,
        /// The agent binary (default: lb-user next to this program).
        #[arg(long)]
        agent: Option<PathBuf>,
        #[arg(long, default_value_t = 200)]
        connections: usize,
        /// Run this step only (1-7), after the cluster is set up.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=7))]
        step: Option<u8>,
    },
}

/// A report as one line of JSON on stdout.
fn print_json(report: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

/// This binary, and the agent: `agent`, else lb-user beside this binary.
fn lab_and_agent(
    agent: Option<std::path::PathBuf>,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let me = std::env::current_exe().context("finding lb-lab")?;
    let agent = agent.unwrap_or_else(|| me.with_file_name("lb-user"));
    Ok((me, agent))
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Serve {
            name,
            port,
            bench,
            say_peer,
        } => {
            if bench {
                load::serve_bench(&name, port)
            } else {
                lab::serve(&name, port, say_peer)
            }
        }
        Cmd::Load {
            target,
            count,
            mode,
            warmup,
            clients,
            random,
            cpu,
        } => {
            let report = load::load(&load::LoadSpec {
                warmup,
                clients,
                random,
                cpu,
                ..load::LoadSpec::new(&target, count, mode)
            });
            print_json(&report)
        }
        Cmd::Waiter { target } => load::waiter(target),
        Cmd::Hold { service, direct } => load::hold(service, direct),
        Cmd::HoldMany { target, sockets } => client_pods::hold_many(target, sockets),
        Cmd::UdpSocket { target, timeout_ms } => {
            lab::udp_socket(target, Duration::from_millis(timeout_ms))
        }
        Cmd::Bench {
            sizes,
            rounds,
            count,
            changes,
            out,
            agent,
            transfer_mb,
            paths,
        } => lab_and_agent(agent).and_then(|(me, agent)| {
            bench::bench(&bench::BenchOptions {
                sizes,
                rounds: rounds.max(1),
                count: count.max(1),
                changes,
                out,
                lab_bin: me,
                agent_bin: agent,
                transfer_mb: transfer_mb.max(1),
                paths,
            })
        }),
        Cmd::Probe {
            target,
            count,
            timeout_ms,
            mode,
            source_port,
            interval_ms,
            size,
        } => {
            let report = lab::probe(&ProbeOptions {
                target,
                count,
                timeout: Duration::from_millis(timeout_ms),
                mode,
                source_port,
                interval: Duration::from_millis(interval_ms),
                size,
            });
            print_json(&report)
        }
        Cmd::Transfer {
            target,
            bytes,
            pause_ms,
            timeout_ms,
        } => {
            let report = lab::transfer(
                target,
                bytes,
                Duration::from_millis(pause_ms),
                Duration::from_millis(timeout_ms),
            );
            print_json(&report)
        }
        Cmd::SynFlood {
            target,
            count,
            duration_ms,
            source_net,
            source_port,
        } => flood::syn_flood(
            target,
            count,
            Duration::from_millis(duration_ms),
            &source_net,
            source_port,
        )
        .map(|sent| println!("{{\"sent\": {sent}}}")),
        Cmd::UdpFlood {
            target,
            duration_ms,
            max_packets,
            payload,
            flows,
            source_net,
            cpu,
            rate,
        } => pktgen::udp_flood(&pktgen::FloodSpec {
            targets: target,
            duration: Duration::from_millis(duration_ms),
            max_packets,
            payload,
            flows,
            source_net,
            cpu,
            rate,
        })
        .and_then(|r| print_json(&r)),
        Cmd::HttpGet { target, path, host } => match host {
            Some(host) => lab::http_get_as(target, &host, &path),
            None => lab::http_get(target, &path),
        }
        .map(|(code, body)| println!("{code} {body}")),
        Cmd::Dns { manifests, port } => dns::serve(&manifests, port),
        Cmd::Resolve { server, name, tcp } => {
            dns::resolve(server, &name, tcp).and_then(|r| print_json(&r))
        }
        Cmd::Ingress { manifests, port } => ingress::serve(&manifests, port),
        Cmd::HoldTcp {
            target,
            connections,
        } => demo::hold_tcp(target, connections),
        Cmd::Demo {
            manifests,
            agent,
            connections,
            step,
        } => demo::demo(&manifests, agent, connections, step),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-lab: {}", lb_user::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
