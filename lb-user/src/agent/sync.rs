//! The agent's core, which knows the kernel only through [`Datapath`]: one sync (source
//! -> model -> plan -> map writes), the periodic reconcile, and the bounded-frequency
//! loop that runs them.
//!
//! Changes are batched like kube-proxy's bounded-frequency runner: a change is applied at
//! once if the last sync is older than `min_sync_period`, else at the end of that period,
//! so a burst of events becomes one sync.

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime},
};

use lb_core::seam::Datapath;
use tokio::{sync::Notify, time::Instant};

use super::{PacketLevel, SocketCloser};
use crate::{
    datapath::{self, BpfMaps, Programmed},
    model,
    serve::{metrics, proxier_health::SharedHealth, service_health::HealthServer},
    source::Source,
};

/// The loop's clock settings (`--min-sync-period`, `--sync-period`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Timing {
    /// The shortest time between two syncs.
    pub min_sync_period: Duration,
    /// How often the maps are read back and drift repaired; zero: never.
    pub sync_period: Duration,
}

/// One agent: the model, the maps and what is programmed in them.
pub(super) struct Agent<D: Datapath = BpfMaps> {
    pub(super) model: model::Model,
    pub(super) maps: D,
    /// The maps' capacities, read from them at start.
    pub(super) capacity: datapath::plan::Capacity,
    /// What the maps hold; `None` until the first sync and after a failed write (then
    /// they are read back).
    pub(super) programmed: Option<Programmed>,
    /// A sync has succeeded (the health checks were handed over at least once).
    pub(super) programmed_once: bool,
    /// The health checks changed in a sync whose writes have not succeeded yet.
    pub(super) health_pending: bool,
    pub(super) last_warnings: Vec<String>,
    pub(super) metrics: metrics::Shared,
    pub(super) health: HealthServer,
    pub(super) proxier_health: SharedHealth,
    /// The tc programs (none in tests of the loop).
    pub(super) packet: Option<PacketLevel>,
    /// The stale-socket closer (none in tests of the loop).
    pub(super) closer: Option<SocketCloser>,
    /// The first sync so far, while the source hands its objects over in parts.
    pub(super) parts: Option<FirstParts>,
}

/// How long each step of one sync took.
#[derive(Clone, Copy, Default)]
struct SyncTimes {
    read: Duration,
    model: Duration,
    plan: Duration,
    write: Duration,
    total: Duration,
}

/// A first sync made in parts (the manifest source hands its objects over as it parses
/// them): each part's sync adds what it can, and the sync after the last part plans in
/// full and is logged as the first sync, its times spanning every part. The time
/// between two parts' syncs (waiting for the source) counts as reading.
#[derive(Clone, Copy)]
pub(super) struct FirstParts {
    started: Instant,
    /// When the last part's sync ended.
    ended: Instant,
    /// The parts' steps, summed.
    times: SyncTimes,
    count: usize,
}

impl FirstParts {
    /// The times of a sync that started at `started` after these parts: each step with
    /// the parts', the time since the last part's sync as reading.
    fn add(&self, started: Instant, t: &SyncTimes) -> SyncTimes {
        SyncTimes {
            read: self.times.read + started.duration_since(self.ended) + t.read,
            model: self.times.model + t.model,
            plan: self.times.plan + t.plan,
            write: self.times.write + t.write,
            total: self.started.elapsed(),
        }
    }
}

impl<D: Datapath> Agent<D> {
    /// One sync: the source's changes -> the model (the services they touch) -> the diff
    /// of the frontends that changed -> map writes. After a failed write, or for the
    /// first sync, the maps are read back and every frontend is diffed.
    pub(super) fn sync(&mut self, source: &Source) {
        let started = Instant::now();
        let read_warnings = match source.drain(&mut self.model) {
            Ok(w) => w,
            Err(e) => {
                // Keep the datapath as it is: an unreadable path is not "no services".
                tracing::error!("{e}; keeping the current datapath");
                return;
            }
        };
        let read = started.elapsed();
        // A part of the first sync: the rest of the objects are still to come.
        let part = source.reading_first();
        let update = self.model.update();
        self.health_pending |= update.health_changed;
        let modelled = started.elapsed();
        if !part {
            let mut warnings = read_warnings;
            warnings.extend(
                self.model
                    .located_warnings(|kind, key| source.origin(kind, key)),
            );
            self.warn_once(warnings);
        }
        let planning = Instant::now();
        let Some((programmed, mut plan)) = self.plan(part, &update.changed) else {
            return;
        };
        let planned = planning.elapsed();
        for w in &plan.warnings {
            tracing::warn!("{w}");
        }
        let writing = Instant::now();
        let writes = plan.len();
        // Each group's operations freed once written (a first sync plans ~12 MiB of them).
        let result = (plan.groups.drain(..)).try_for_each(|g| self.maps.apply(&g));
        let times = SyncTimes {
            read,
            model: modelled - read,
            plan: planned,
            write: writing.elapsed(),
            total: started.elapsed(),
        };
        let written_at = SystemTime::now();
        if part && result.is_ok() {
            self.part_synced(started, &times, programmed, writes);
            return;
        }
        let times = self.with_parts(part, started, times);
        let m = &self.metrics;
        match result {
            Ok(()) => {
                let services = self.model.service_count();
                log_sync(services, update.services, &programmed, writes, &times);
                m.record_sync(services, &programmed, (writes, &plan.full), times.total);
                m.set_conflicts(self.model.conflicts());
                m.observe_programming(&update.triggers, written_at);
                let first = self.programmed_once;
                self.programmed = Some(programmed);
                self.programmed_once = true;
                if std::mem::take(&mut self.health_pending) || !first {
                    self.health.update(self.model.health_checks());
                }
                if !first {
                    trim_heap();
                }
                self.proxier_health
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .updated(written_at);
                if let Some(p) = &mut self.packet {
                    p.follow(self.model.node_addresses());
                }
                self.close_sockets(std::mem::take(&mut plan.left));
            }
            Err(e) => {
                // What the maps hold is now uncertain: read them back on the next sync.
                tracing::error!("{e}; the maps will be read back and the sync retried");
                m.sync_failed();
                self.programmed = None;
            }
        }
    }

    /// The plan of this sync: the changed frontends, or every one after the maps were
    /// read back (the first sync, a failed write); while parts of a first sync come,
    /// only the frontends the maps lack ([`Programmed::plan_new`]), and what they left
    /// at its end ([`Programmed::plan_rest`]). `None` when the maps could not be read
    /// back.
    fn plan(
        &mut self,
        part: bool,
        changed: &BTreeSet<lb_core::model::Frontend>,
    ) -> Option<(Programmed, datapath::plan::Plan)> {
        let (mut p, full) = match self.programmed.take() {
            Some(p) => (p, false),
            None => {
                let mut p = self.read_back()?;
                p.set_capacity(self.capacity);
                (p, true)
            }
        };
        let desired = self.model.desired();
        let plan = if part {
            p.plan_new(desired, changed)
        } else if full {
            p.plan(desired)
        } else if self.parts.is_some() {
            p.plan_rest(desired, changed)
        } else {
            p.plan_changes(desired, changed)
        };
        Some((p, plan))
    }

    /// The times to log for a sync that started at `started`: with the parts', for the
    /// sync that completes a first sync made in parts (which is then over).
    fn with_parts(&mut self, part: bool, started: Instant, times: SyncTimes) -> SyncTimes {
        match self.parts.take() {
            Some(parts) if !part => parts.add(started, &times),
            kept => {
                self.parts = kept;
                times
            }
        }
    }

    /// A part of a first sync made in parts written: logged, its times kept for the sync
    /// that completes it. Health and metrics wait for that sync.
    fn part_synced(
        &mut self,
        started: Instant,
        times: &SyncTimes,
        programmed: Programmed,
        writes: usize,
    ) {
        let parts = match self.parts {
            Some(parts) => FirstParts {
                times: parts.add(started, times),
                ended: Instant::now(),
                count: parts.count + 1,
                ..parts
            },
            None => FirstParts {
                started,
                ended: Instant::now(),
                times: *times,
                count: 1,
            },
        };
        tracing::debug!(
            part = parts.count,
            frontends = programmed.frontend_count(),
            map_writes = writes,
            elapsed_us = times.total.as_micros() as u64,
            read_us = times.read.as_micros() as u64,
            model_us = times.model.as_micros() as u64,
            plan_us = times.plan.as_micros() as u64,
            write_us = times.write.as_micros() as u64,
            "first sync in parts: a part programmed"
        );
        self.parts = Some(parts);
        self.programmed = Some(programmed);
    }

    /// Logs the model's and the source's warnings when they differ from the last sync's.
    fn warn_once(&mut self, warnings: Vec<String>) {
        if warnings != self.last_warnings {
            for w in &warnings {
                tracing::warn!("{w}");
            }
            self.last_warnings = warnings;
        }
    }

    /// The periodic reconcile: the maps are read back and planned against the desired
    /// state in full, so whatever changed behind the agent's back (an entry deleted or
    /// rewritten by hand, by another tool, by a bug) is written again. Counted in
    /// `lb_drift_repairs` and logged when it wrote anything. Changes waiting for a sync
    /// are not taken in: the desired state is the one the maps were last synced to.
    pub(super) fn reconcile(&mut self) {
        let Some(programmed) = &self.programmed else {
            return; // The next sync reads the maps back anyway.
        };
        if self.parts.is_some() {
            return; // A first sync in parts: the maps hold only what the parts added.
        }
        let started = Instant::now();
        let mut fresh = match self.maps.snapshot() {
            Ok(snap) => programmed.readopt(&snap),
            Err(e) => {
                tracing::warn!("reconcile: reading the maps back: {e}; tried again next period");
                return;
            }
        };
        let mut plan = fresh.plan(self.model.desired());
        let result = plan.groups.iter().try_for_each(|g| self.maps.apply(g));
        match result {
            Ok(()) if plan.is_empty() => {
                tracing::debug!(
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "reconcile: the maps hold what was programmed"
                );
            }
            Ok(()) => {
                self.metrics.drift_repaired(plan.len());
                let what: Vec<String> = plan.ops().take(5).map(ToString::to_string).collect();
                tracing::warn!(
                    map_writes = plan.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "reconcile: the maps had changed behind the agent's back; repaired ({}{})",
                    what.join("; "),
                    if plan.len() > 5 { "; ..." } else { "" }
                );
                self.close_sockets(std::mem::take(&mut plan.left));
            }
            Err(e) => {
                tracing::error!("reconcile: {e}; the maps will be read back and the sync retried");
                self.metrics.sync_failed();
                self.programmed = None;
                return;
            }
        }
        self.programmed = Some(fresh);
    }

    /// What the maps hold, read back (adopting the maps an earlier agent left, or
    /// re-reading them after a failed write).
    fn read_back(&mut self) -> Option<Programmed> {
        match self.maps.snapshot() {
            Ok(snap) => Some(Programmed::adopt(&snap)),
            Err(e) => {
                tracing::error!("reading the maps back: {e}; will retry");
                None
            }
        }
    }

    fn close_sockets(&self, left: BTreeSet<datapath::sockets::Left>) {
        if let Some(c) = &self.closer {
            c.close(left);
        }
    }
}

/// Hands the heap's free memory back to the system (after the first sync's peak).
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn log_sync(
    services: usize,
    recomputed: usize,
    programmed: &Programmed,
    writes: usize,
    t: &SyncTimes,
) {
    let us = |d: Duration| d.as_micros() as u64;
    tracing::info!(
        services,
        recomputed,
        frontends = programmed.frontend_count(),
        backends = programmed.backend_count(),
        map_writes = writes,
        elapsed_us = us(t.total),
        read_us = us(t.read),
        model_us = us(t.model),
        plan_us = us(t.plan),
        write_us = us(t.write),
        "synced"
    );
}

/// The bounded-frequency loop: a sync after each change (or a second after a failed
/// one, and every second while a full map keeps frontends out), at most one per
/// `min_sync_period`, until a signal.
pub(super) async fn sync_until_stopped<D: Datapath>(
    agent: &mut Agent<D>,
    source: &Source,
    changed: &Notify,
    stop: impl Future<Output = &'static str>,
    opts: &Timing,
) {
    let mut stop = std::pin::pin!(stop);
    let mut last_sync: Option<Instant> = None;
    let period = (!opts.sync_period.is_zero()).then_some(opts.sync_period);
    let mut next_reconcile = period.map(|p| tokio::time::Instant::now() + p);
    loop {
        // After a failed write, or while a full map keeps frontends out: again in a second.
        let skipped = agent.programmed.as_ref().is_some_and(|p| p.skipped() > 0);
        let retry = (agent.programmed.is_none() || skipped) && last_sync.is_some();
        tokio::select! {
            name = &mut stop => { tracing::info!("{name}: stopping"); return; }
            _ = changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
            _ = sleep_until(next_reconcile), if next_reconcile.is_some() => {
                agent.reconcile();
                next_reconcile = period.map(|p| tokio::time::Instant::now() + p);
                continue;
            }
        }
        agent.metrics.queued();
        {
            let mut health = agent
                .proxier_health
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            health.queued(SystemTime::now());
            // A source out of sync keeps health down whatever the syncs do.
            health.source_stalled(source.unsynced_since());
        }
        // Bounded frequency: wait out the rest of the minimum period; changes arriving
        // meanwhile are folded into this sync.
        if let Some(wait) = last_sync.map(|t| opts.min_sync_period.saturating_sub(t.elapsed()))
            && !wait.is_zero()
        {
            tokio::select! {
                name = &mut stop => { tracing::info!("{name}: stopping"); return; }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        agent.sync(source);
        last_sync = Some(Instant::now());
    }
}

/// Sleeps until `at` (forever without one).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
