//! `lb-user`: the agent (`run`) and its inspection tool (`dump`).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use lb_user::{
    agent,
    datapath::{BpfMaps, loader},
    serve::dump,
    source::{self, SourceSpec},
};

#[derive(Parser)]
#[command(
    name = "lb-user",
    version,
    about = "eBPF service load balancer agent (a kube-proxy replacement)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once, at start; boxing would only obscure the flags"
)]
enum Command {
    /// Load and attach the programs, then keep the maps in sync with the Kubernetes API
    /// (default) or with manifest files (--manifests).
    Run {
        /// Read Service, EndpointSlice and Node objects from this YAML/JSON file or
        /// directory instead of the Kubernetes API.
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Kubeconfig file (default: in-cluster service account, then KUBECONFIG, then
        /// ~/.kube/config).
        #[arg(long, conflicts_with = "manifests")]
        kubeconfig: Option<PathBuf>,
        /// This node's name (default: the NODE_NAME environment variable, then the hostname).
        #[arg(long)]
        hostname_override: Option<String>,
        /// An address of this node on which nodePorts are served (repeatable; default:
        /// the Node object's InternalIP and ExternalIP addresses). 127.0.0.1 always is.
        #[arg(long = "node-ip", value_name = "ADDR")]
        node_ips: Vec<std::net::IpAddr>,
        /// An external interface of the node for the packet level (tc programs: NodePort,
        /// externalIPs and LoadBalancer IPs for clients outside the node); repeatable.
        /// Default: the interfaces that carry a node address (--node-ip, else the Node
        /// object's, followed as they change).
        #[arg(long = "interface", value_name = "IF")]
        interfaces: Vec<String>,
        /// The maps' capacities (a map already pinned keeps the size it was made with).
        #[command(flatten)]
        map_sizes: loader::MapSizes,
        /// cgroup v2 directory whose processes get service translation (and every one
        /// below it). Default: the root of the cgroup v2 hierarchy, the whole node.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Directory (on a bpf filesystem) where the maps are pinned.
        #[arg(long, default_value = loader::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Shortest time between two syncs: a burst of changes becomes one sync
        /// (a duration as Go writes them: 1s, 250ms, 1m30s, 0).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        min_sync_period: Duration,
        /// How often the maps are read back and whatever changed behind the agent's back
        /// is repaired (kube-proxy's --sync-period); 0 to never.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        sync_period: Duration,
        /// Where to serve /metrics; empty to disable.
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_bind_address: String,
        /// Where to serve /healthz and /livez (kube-proxy's semantics); empty to disable.
        #[arg(long, default_value = "0.0.0.0:10256")]
        healthz_bind_address: String,
        /// How long a change may wait for its sync before /healthz answers 503
        /// (kube-proxy: twice its sync period).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        healthz_timeout: Duration,
        /// How long the Kubernetes API may take to answer each LIST page and to start
        /// each WATCH before the request is abandoned and retried with backoff (also the
        /// connect timeout, at most 30s). Watches themselves last 5-10 minutes.
        #[arg(long, default_value = "60s", value_parser = parse_timeout)]
        api_timeout: Duration,
        /// How often to look for changed manifests, in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_interval_ms: u64,
        /// Forward the programs' own debug messages (aya-log) to this log.
        #[arg(long)]
        bpf_debug: bool,
        /// At exit, detach the programs and remove the pins (as `lb-user cleanup` does).
        /// Without it, a stopped agent leaves the datapath serving, as kube-proxy's rules
        /// outlive kube-proxy, and the next agent adopts it.
        #[arg(long)]
        cleanup_on_exit: bool,
    },
    /// Reserve the packet level's SNAT ports in this network namespace's
    /// net.ipv4.ip_local_reserved_ports, so no host socket takes one (the DaemonSet's
    /// privileged init step; `run` also tries, and warns when it cannot).
    ReservePorts,
    /// Detach every program the agent attached and remove its pins: the maps, the cgroup
    /// and tc links under --pin-path, and with --cgroup also every link on that cgroup of
    /// a program named like ours, pinned or not, whoever attached it (needs
    /// CAP_SYS_ADMIN to list the system's links).
    Cleanup {
        #[arg(long, default_value = loader::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// A cgroup v2 directory an agent attached to.
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Print the services and backends held in the pinned maps.
    Dump {
        #[arg(long, default_value = loader::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Also the packet level's connection-tracking entries (its live NAT flows).
        #[arg(long)]
        conntrack: bool,
        /// `text` for people, `json` for scripts.
        #[arg(long, short, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Print the version and the map layout (each pinned map's name and entry sizes).
    Version,
}

/// Durations as kube-proxy's flags take them (Go's time.ParseDuration): a sequence of
/// decimal numbers, each with a unit (ns, us, µs, ms, s, m, h): "1s", "250ms", "1.5s",
/// "1m30s"; "0" alone needs none.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err("empty: give a duration such as 30s or 1m30s".into());
    }
    let mut secs = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: add a unit (ms, s, m, h)"))?;
        let (number, tail) = rest.split_at(digits);
        let n: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        secs += n * match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)"
                ));
            }
        };
        rest = tail;
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

/// A Go-style duration that is not zero (a timeout).
fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("{text:?}: a timeout must be longer than 0")),
        d => Ok(d),
    }
}

fn parse_bind(flag: &str, text: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{flag} {text:?}: {e} (want IP:PORT)"))
}

fn main() -> ExitCode {
    lb_user::agent::one_heap();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Dump { .. } | Command::Version) {
        // Printing commands end quietly when their reader goes (`lb-user dump | head`),
        // as other command-line tools do, instead of panicking on EPIPE.
        // SAFETY: restores the default action of one signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Run {
            manifests,
            kubeconfig,
            hostname_override,
            node_ips,
            interfaces,
            map_sizes,
            cgroup,
            pin_path,
            min_sync_period,
            sync_period,
            metrics_bind_address,
            healthz_bind_address,
            healthz_timeout,
            api_timeout,
            poll_interval_ms,
            bpf_debug,
            cleanup_on_exit,
        } => parse_bind("--metrics-bind-address", &metrics_bind_address)
            .and_then(|m| {
                Ok((
                    m,
                    parse_bind("--healthz-bind-address", &healthz_bind_address)?,
                ))
            })
            .and_then(|(metrics_addr, healthz_addr)| {
                let opts = agent::RunOptions {
                    source: match manifests {
                        Some(path) => SourceSpec::Manifests(path),
                        None => SourceSpec::Kube { kubeconfig },
                    },
                    cgroup: cgroup.unwrap_or_else(|| {
                        loader::mount_point("cgroup2").unwrap_or_else(|| "/sys/fs/cgroup".into())
                    }),
                    pin_path,
                    node_name: source::node_name(hostname_override.as_deref()),
                    node_ips,
                    interfaces,
                    map_sizes,
                    poll_interval: Duration::from_millis(poll_interval_ms.max(1)),
                    min_sync_period,
                    sync_period,
                    metrics_addr,
                    healthz_addr,
                    healthz_timeout,
                    api_timeout,
                    bpf_log_level: if bpf_debug { 4 } else { 0 },
                    cleanup_on_exit,
                };
                // The sync runs on this thread; two workers serve metrics, health and
                // the health checks meanwhile, so a long sync does not fail a probe.
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(agent::run(opts)))
            }),
        Command::Version => {
            println!("lb-user {}", env!("CARGO_PKG_VERSION"));
            println!("map layout (name: key bytes, value bytes):");
            for (name, key, value) in loader::expected_layout() {
                println!("  {name}: {key}, {value}");
            }
            Ok(())
        }
        Command::Dump {
            pin_path,
            conntrack,
            output,
        } => BpfMaps::open_pinned(&pin_path)
            .and_then(|maps| maps.snapshot())
            .and_then(|snap| {
                let counters = lb_user::datapath::read_counters(&pin_path)?;
                let drops = lb_user::datapath::read_drops(&pin_path)?;
                let ct_events = lb_user::datapath::read_ct_events(&pin_path)?;
                if output == "json" {
                    let mut doc = dump::render_json(&snap, &counters, &drops);
                    doc["ctEvents"] = ct_events
                        .iter()
                        .map(|(e, n)| (e.to_string(), serde_json::Value::from(*n)))
                        .collect::<serde_json::Map<_, _>>()
                        .into();
                    if conntrack {
                        let entries = lb_user::datapath::read_conntrack(&pin_path)?;
                        doc["conntrackEntries"] = entries.len().into();
                    }
                    println!("{doc:#}");
                    return Ok(());
                }
                print!(
                    "{}\n{}\n{}{}",
                    dump::render(&snap),
                    dump::render_counters(&counters),
                    dump::render_drops(&drops),
                    dump::render_tally("conntrack events", &ct_events)
                );
                if conntrack {
                    let entries = lb_user::datapath::read_conntrack(&pin_path)?;
                    print!(
                        "\n{}",
                        dump::render_conntrack(&entries, dump::monotonic_ns())
                    );
                }
                Ok(())
            })
            .map_err(anyhow::Error::from),
        Command::ReservePorts => lb_user::datapath::iface::reserve_snat_ports()
            .map(|()| {
                println!(
                    "reserved {}-{} in net.ipv4.ip_local_reserved_ports",
                    lb_common::SNAT_PORT_MIN,
                    lb_common::SNAT_PORT_MAX
                )
            })
            .map_err(|e| {
                anyhow::anyhow!(
                    "writing /proc/sys/net/ipv4/ip_local_reserved_ports: {e} (needs a writable /proc/sys: root, or a privileged container)"
                )
            }),
        Command::Cleanup { pin_path, cgroup } => {
            loader::cleanup(&pin_path, cgroup.as_deref()).map(|report| println!("{report}"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-user: {}", lb_user::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kube_proxy_flags() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1h2m3.5s"),
            Ok(Duration::from_millis(3_723_500))
        );
        assert_eq!(parse_duration("1500us"), Ok(Duration::from_micros(1500)));
        assert!(parse_duration("1m30").unwrap_err().contains("add a unit"));
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(parse_duration("10").unwrap_err().contains("add a unit"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert_eq!(parse_timeout("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_timeout("0").unwrap_err().contains("longer than 0"));
    }

    #[test]
    fn metrics_address_may_be_disabled() {
        assert_eq!(parse_bind("--metrics-bind-address", "").unwrap(), None);
        assert!(
            parse_bind("--metrics-bind-address", "127.0.0.1:10249")
                .unwrap()
                .is_some()
        );
        let err = parse_bind("--healthz-bind-address", "localhost").unwrap_err();
        assert!(
            err.to_string().starts_with("--healthz-bind-address"),
            "{err}"
        );
    }
}
