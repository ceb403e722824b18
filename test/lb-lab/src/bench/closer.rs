//! The stale-socket closer at scale: 100 client pods (a network namespace and a cgroup
//! each) hold 100 UDP sockets each, connected through our programs to one service's only
//! backend; the backend is swapped and the agent's closer destroys all 10,000 sockets.
//! Reported: the time from the change until every socket was seen closed, and the
//! closer's own figures from its log (passes, namespaces, sockets looked at, time
//! reading the map, wall and CPU time of the passes).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{BenchOptions, log_field, make_lab, manifests, start_agent, workload::churn};
use lb_user::model::Proto;

use crate::client_pods::ClientPod;

/// Client pods, and UDP sockets in each.
pub const PODS: usize = 100;
pub const SOCKETS_PER_POD: usize = 100;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CloserRecord {
    pub namespaces: usize,
    pub sockets: usize,
    pub destroyed: usize,
    pub passes: usize,
    /// Namespaces entered, and sockets looked at in them, over all passes.
    pub entered: usize,
    pub scanned: usize,
    /// From the change (the manifest renamed into place) until every holder saw all
    /// its sockets closed, polled every 50 ms.
    pub change_to_closed_ms: f64,
    /// Over the passes: their time, the part reading the socket rev-NAT map, their CPU.
    pub pass_ms: f64,
    pub read_ms: f64,
    pub cpu_ms: f64,
}

/// Sums of the closer's log fields over its passes since line `from` of the log.
fn closer_passes(log: &str, from: usize) -> CloserRecord {
    let mut r = CloserRecord::default();
    for line in log.lines().skip(from) {
        if !line.contains("closed the sockets translated to backends") {
            continue;
        }
        let field = |k: &str| log_field(line, k).unwrap_or(0.0);
        r.passes += 1;
        r.destroyed += field("destroyed") as usize;
        r.entered += field("namespaces") as usize;
        r.scanned += field("scanned") as usize;
        r.pass_ms += field("pass_us") / 1000.0;
        r.read_ms += field("read_us") / 1000.0;
        r.cpu_ms += field("cpu_us") / 1000.0;
    }
    r
}

pub fn bench_closer(opts: &BenchOptions) -> anyhow::Result<CloserRecord> {
    eprintln!("bench: the socket closer: {PODS} pods x {SOCKETS_PER_POD} UDP sockets");
    let base = make_lab(opts, "cls")?;
    let pods: Vec<_> = base.pods.iter().map(|p| p.ip).collect();
    let udp = |pod| {
        let mut p = churn(pod);
        p.proto = Proto::Udp;
        p.port_name = "udp".into();
        p
    };
    let dir = std::env::temp_dir().join(&base.prefix);
    let mdir = dir.join("manifests");
    std::fs::create_dir_all(&mdir)?;
    std::fs::write(mdir.join("churn.yaml"), manifests(&[udp(pods[0])]))?;
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", base.prefix));
    let source = ["--manifests".as_ref(), mdir.as_os_str()];
    let (agent, _) = start_agent(opts, &base, &source, &pin, &dir.join("agent.log"))?;
    let target = SocketAddr::new(udp(pods[0]).ip.into(), 80);
    let mut clients = Vec::with_capacity(PODS);
    for i in 0..PODS {
        clients.push(
            ClientPod::start(
                &opts.lab_bin,
                &base.prefix,
                &base.cgroup,
                i,
                target,
                SOCKETS_PER_POD,
            )
            .with_context(|| format!("client pod {i}"))?,
        );
    }
    let from = agent.log().lines().count();
    let tmp = mdir.join(".churn.yaml.tmp");
    std::fs::write(&tmp, manifests(&[udp(pods[1])]))?;
    let start = Instant::now();
    std::fs::rename(&tmp, mdir.join("churn.yaml"))?;
    let mut open: Vec<usize> = (0..PODS).collect();
    let deadline = start + Duration::from_secs(120);
    while !open.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "{} of {PODS} pods still hold open sockets after 120 s:\n{}",
                open.len(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut still = Vec::new();
        for i in open {
            if clients[i].check()?.aborted < SOCKETS_PER_POD {
                still.push(i);
            }
        }
        open = still;
    }
    let change_to_closed_ms = start.elapsed().as_secs_f64() * 1000.0;
    drop(clients);
    let record = CloserRecord {
        namespaces: PODS,
        sockets: PODS * SOCKETS_PER_POD,
        change_to_closed_ms,
        ..closer_passes(&agent.log(), from)
    };
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(record)
}

pub fn closer_report(records: &[CloserRecord]) -> String {
    let mut md = String::from(
        "\n## The stale-socket closer\n\n\
         Client pods (a network namespace and a cgroup each) hold connected UDP sockets to \
         one service's only backend, which is then swapped; the closer destroys every socket \
         (`lb-user.dev` agent log, summed over its passes).\n\n\
         | pods | sockets | destroyed | passes | namespaces entered | sockets looked at | map read ms | pass ms | CPU ms | CPU us / socket | change to all closed ms |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in records {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
            r.namespaces,
            r.sockets,
            r.destroyed,
            r.passes,
            r.entered,
            r.scanned,
            r.read_ms,
            r.pass_ms,
            r.cpu_ms,
            r.cpu_ms * 1000.0 / r.destroyed.max(1) as f64,
            r.change_to_closed_ms
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_are_summed_from_the_log_after_the_change() {
        let log = "\
x INFO lb_user::agent: closed the sockets translated to backends that left their service destroyed=9 namespaces=9
x INFO lb_user::agent::sync: synced services=1
x INFO lb_user::agent: closed the sockets translated to backends that left their service destroyed=60 stale=60 namespaces=6 unvisited=4 scanned=600 pass_us=1000000 read_us=2500 cpu_us=500000
x INFO lb_user::agent: closed the sockets translated to backends that left their service destroyed=40 stale=40 namespaces=4 unvisited=0 scanned=400 pass_us=700000 read_us=1500 cpu_us=300000
";
        let r = closer_passes(log, 1);
        assert_eq!(
            (r.passes, r.destroyed, r.entered, r.scanned),
            (2, 100, 10, 1000)
        );
        assert_eq!((r.pass_ms, r.read_ms, r.cpu_ms), (1700.0, 4.0, 800.0));
    }
}
