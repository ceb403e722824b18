//! `lb-user run`: load, attach, then keep the maps equal to the manifests until a signal.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    datapath::{BpfMaps, Programmed},
    loader, manifest, model,
};

pub struct RunOptions {
    pub manifests: PathBuf,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    /// How often the manifest path is checked for changes.
    pub poll_interval: Duration,
    /// aya-log level for the programs' own messages (0 = off, 4 = debug).
    pub bpf_log_level: u8,
    /// Leave the pinned maps in place at exit.
    pub keep_pins: bool,
}

/// One agent: the loaded programs, their maps, and what is programmed in them.
struct Agent {
    maps: BpfMaps,
    programmed: Option<Programmed>,
    last_warnings: Vec<String>,
}

impl Agent {
    /// One sync: manifests -> model -> diff -> map writes.
    fn sync(&mut self, opts: &RunOptions) {
        let started = Instant::now();
        let loaded = match manifest::load(&opts.manifests) {
            Ok(l) => l,
            Err(e) => {
                // Keep the datapath as it is: a missing file is not "no services".
                tracing::error!("{e}; keeping the current datapath");
                return;
            }
        };
        let built = model::build(&loaded.objects);
        let warnings: Vec<String> = loaded.warnings.into_iter().chain(built.warnings).collect();
        if warnings != self.last_warnings {
            for w in &warnings {
                tracing::warn!("{w}");
            }
            self.last_warnings = warnings;
        }
        let programmed = match self.programmed.take() {
            Some(p) => p,
            None => match self.maps.snapshot() {
                Ok(snap) => Programmed::adopt(&snap),
                Err(e) => {
                    tracing::error!("reading the maps back: {e}; will retry");
                    return;
                }
            },
        };
        let mut programmed = programmed;
        let plan = programmed.plan(&built.desired);
        for w in &plan.warnings {
            tracing::warn!("{w}");
        }
        match self.maps.apply(&plan.ops) {
            Ok(()) => {
                tracing::info!(
                    services = built.desired.service_count(),
                    frontends = programmed.frontend_count(),
                    backends = programmed.backend_count(),
                    map_writes = plan.ops.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "synced"
                );
                self.programmed = Some(programmed);
            }
            Err(e) => {
                // What the maps hold is now uncertain: read them back on the next sync.
                tracing::error!("{e}; the maps will be read back and the sync retried");
                self.programmed = None;
            }
        }
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    manifest::manifest_files(&opts.manifests)?;
    let cgroup = loader::open_cgroup(&opts.cgroup)?;
    let mut ebpf = loader::load_and_attach(&opts.pin_path, &cgroup, opts.bpf_log_level)?;
    tracing::info!(
        cgroup = %opts.cgroup.display(),
        pin_path = %opts.pin_path.display(),
        programs = ?loader::PROGRAMS,
        "programs attached"
    );
    let logger = if opts.bpf_log_level > 0 {
        Some(spawn_bpf_logger(&mut ebpf)?)
    } else {
        None
    };
    let mut agent = Agent {
        maps: BpfMaps::from_ebpf(&mut ebpf)?,
        programmed: None,
        last_warnings: Vec::new(),
    };

    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut tick = tokio::time::interval(opts.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: detaching"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: detaching"); break; }
            _ = tick.tick() => {
                let now = manifest::fingerprint(&opts.manifests);
                if seen.as_ref() != Some(&now) || agent.programmed.is_none() {
                    seen = Some(now);
                    agent.sync(&opts);
                }
            }
        }
    }
    if let Some(task) = logger {
        task.abort();
    }
    drop(agent);
    drop(ebpf); // closes the links: the programs are detached
    if !opts.keep_pins {
        loader::remove_pins(&opts.pin_path);
    }
    tracing::info!("stopped");
    Ok(())
}

fn spawn_bpf_logger(ebpf: &mut aya::Ebpf) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let logger = aya_log::EbpfLogger::init(ebpf).context("starting the eBPF log reader")?;
    // SAFETY: the logger owns its ring buffer fd and keeps it open, unchanged, until it
    // is dropped together with the AsyncFd.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("polling the eBPF log ring buffer: {}", e.into_parts().1))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
