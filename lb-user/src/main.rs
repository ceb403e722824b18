//! `lb-user`: the agent (`run`) and its inspection tool (`dump`).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use lb_user::{agent, datapath::BpfMaps, dump, loader};

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
enum Command {
    /// Load and attach the programs, then keep the maps in sync with the manifests.
    Run {
        /// A YAML/JSON file or a directory of them with Service and EndpointSlice objects.
        #[arg(long)]
        manifests: PathBuf,
        /// cgroup v2 directory whose processes get service translation.
        #[arg(long)]
        cgroup: PathBuf,
        /// Directory (on a bpf filesystem) where the maps are pinned.
        #[arg(long, default_value = loader::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// How often to look for changed manifests, in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_interval_ms: u64,
        /// Forward the programs' own debug messages (aya-log) to this log.
        #[arg(long)]
        bpf_debug: bool,
        /// Leave the pinned maps in place at exit (for inspection with bpftool).
        #[arg(long)]
        keep_pins: bool,
    },
    /// Print the services and backends held in the pinned maps.
    Dump {
        #[arg(long, default_value = loader::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
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
    let result = match cli.command {
        Command::Run {
            manifests,
            cgroup,
            pin_path,
            poll_interval_ms,
            bpf_debug,
            keep_pins,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                rt.block_on(agent::run(agent::RunOptions {
                    manifests,
                    cgroup,
                    pin_path,
                    poll_interval: Duration::from_millis(poll_interval_ms.max(10)),
                    bpf_log_level: if bpf_debug { 4 } else { 0 },
                    keep_pins,
                }))
            }),
        Command::Dump { pin_path } => BpfMaps::open_pinned(&pin_path)
            .and_then(|maps| maps.snapshot())
            .map(|snap| print!("{}", dump::render(&snap)))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-user: {}", lb_user::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
