//! `lb-user`: the agent (`run`) and its inspection tool (`dump`).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_user::{
    agent,
    datapath::{BpfMaps, loader},
    serve::dump,
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
    Run(agent::RunOptions),
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

fn main() -> ExitCode {
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
        Command::Run(opts) => {
            agent::malloc_heaps(&opts);
            // The sync runs on this thread; two workers serve metrics, health and
            // the health checks meanwhile, so a long sync does not fail a probe.
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(agent::run(opts)))
        }
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
        } => print_dump(&pin_path, conntrack, &output),
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

/// `lb-user dump`: the maps under `pin_path` as text or JSON (`output`), with the
/// connection-tracking entries if asked.
fn print_dump(pin_path: &std::path::Path, conntrack: bool, output: &str) -> anyhow::Result<()> {
    BpfMaps::open_pinned(pin_path)
        .and_then(|maps| maps.snapshot())
        .and_then(|snap| {
            let counters = lb_user::datapath::read_counters(pin_path)?;
            let drops = lb_user::datapath::read_drops(pin_path)?;
            let ct_events = lb_user::datapath::read_ct_events(pin_path)?;
            let xdp = lb_user::datapath::loader::xdp_modes(pin_path);
            let object = lb_user::datapath::loader::attached_object(pin_path);
            if output == "json" {
                let mut doc = dump::render_json(&snap, &counters, &drops);
                doc["ctEvents"] = ct_events
                    .iter()
                    .map(|(e, n)| (e.to_string(), serde_json::Value::from(*n)))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                doc["xdp"] = xdp
                    .iter()
                    .map(|(iface, mode)| (iface.clone(), serde_json::Value::from(*mode)))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                doc["socketLevel"] = object.map(|o| o.name()).into();
                if conntrack {
                    let entries = lb_user::datapath::read_conntrack(pin_path)?;
                    doc["conntrackEntries"] = entries.len().into();
                }
                println!("{doc:#}");
                return Ok(());
            }
            print!(
                "{}\n{}\n{}{}{}{}",
                dump::render(&snap),
                dump::render_counters(&counters),
                dump::render_drops(&drops),
                dump::render_tally("conntrack events", &ct_events),
                dump::render_xdp(&xdp),
                dump::render_object(object),
            );
            if conntrack {
                let entries = lb_user::datapath::read_conntrack(pin_path)?;
                print!(
                    "\n{}",
                    dump::render_conntrack(&entries, dump::monotonic_ns())
                );
            }
            Ok(())
        })
        .map_err(anyhow::Error::from)
}
