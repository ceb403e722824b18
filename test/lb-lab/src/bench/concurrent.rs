//! Concurrent clients: one per core, each making sequential TCP connections, for direct,
//! our socket-level LB and kube-proxy's modes; the machine's busy CPU time per
//! connection (`/proc/stat`, steal excluded: client, servers and the kernel between
//! them), and ratios to iptables-nft within each round.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{
    BenchOptions, DIRECT_AA, DIRECT_HOOKED, Runs, Variant, load_spec, measure_rates, median,
    nodeport::{BASELINE, fmt3},
    ratios,
};
use crate::load::{LoadMode, LoadReport};

/// One variant at one size with concurrent clients: medians over rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConcurrentRecord {
    pub variant: String,
    pub services: usize,
    pub position: String,
    pub clients: usize,
    /// Connections per second, every client's together.
    pub conn_rate: f64,
    pub p99_us: f64,
    /// Connections that failed, over every round.
    pub errors: usize,
    pub cpu_us_per_conn: f64,
    /// The same, less direct's in the same round: what the variant adds.
    pub added_cpu_us_per_conn: f64,
    /// Ratios to [`BASELINE`] in the same round: [median, min, max] over rounds.
    pub cpu_per_conn_vs_baseline: [f64; 3],
    pub conn_rate_vs_baseline: [f64; 3],
}

/// Clients: one per core.
fn clients() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// Direct, and every service variant at the measured position last in `measured` (the
/// one kube-proxy's rules reach last), each round in the rates' changing order.
pub(super) fn measure(
    opts: &BenchOptions,
    n: usize,
    variants: &[Variant<'_>],
    measured: &[(usize, &str)],
) -> anyhow::Result<Vec<ConcurrentRecord>> {
    let Some(&(_, pos)) = measured.last() else {
        return Ok(Vec::new());
    };
    let chosen: Vec<&Variant<'_>> = variants
        .iter()
        .filter(|v| {
            (v.name == "direct" || v.position == pos)
                && v.name != DIRECT_AA
                && v.name != DIRECT_HOOKED
        })
        .collect();
    let runs = measure_rates(opts, n, &load_spec(opts, LoadMode::Tcp, clients()), &chosen)?;
    Ok(records_of(n, &runs))
}

fn records_of(n: usize, runs: &Runs) -> Vec<ConcurrentRecord> {
    let find = |name: &str| runs.iter().find(|((v, _), _)| v == name).map(|(_, r)| r);
    let (Some(direct), Some(base)) = (find("direct"), find(BASELINE)) else {
        return Vec::new();
    };
    runs.iter()
        .map(|((variant, position), v)| ConcurrentRecord {
            variant: variant.clone(),
            services: n,
            position: position.clone(),
            clients: v.first().map_or(0, |r| r.clients),
            conn_rate: median(v.iter().map(LoadReport::rate).collect()),
            p99_us: median(v.iter().map(|r| r.p99_ns as f64 / 1e3).collect()),
            errors: v.iter().map(|r| r.errors).sum(),
            cpu_us_per_conn: median(v.iter().map(LoadReport::cpu_us_per_request).collect()),
            added_cpu_us_per_conn: median(
                v.iter()
                    .zip(direct)
                    .map(|(r, d)| r.cpu_us_per_request() - d.cpu_us_per_request())
                    .collect(),
            ),
            cpu_per_conn_vs_baseline: ratios(v, base, LoadReport::cpu_us_per_request),
            conn_rate_vs_baseline: ratios(v, base, LoadReport::rate),
        })
        .collect()
}

/// The concurrent section of report.md.
pub(super) fn report(records: &[ConcurrentRecord]) -> String {
    let mut md = String::from(
        "\n## Concurrent clients\n\n\
         One client per core, all at once, each making sequential TCP connections (connect, request, reply, \
         client closes). CPU is the machine's busy time (/proc/stat, steal excluded) per connection, client, \
         servers and the kernel between them included; \"added\" is that less direct's in the same round. Ratios \
         are to iptables-nft within each round: median (min–max over rounds).\n\n\
         | services | variant | position | clients | conn/s | p99 µs | failed | CPU µs/conn | added µs/conn | CPU/conn vs ipt-nft | conn/s vs ipt-nft |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for r in records {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {:.1} | {:.1} | {} | {} |",
            r.services,
            r.variant,
            r.position,
            r.clients,
            r.conn_rate,
            r.p99_us,
            r.errors,
            r.cpu_us_per_conn,
            r.added_cpu_us_per_conn,
            fmt3(r.cpu_per_conn_vs_baseline),
            fmt3(r.conn_rate_vs_baseline),
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_connection_is_compared_within_rounds() {
        let rep = |cpu_us: f64| LoadReport {
            count: 100,
            elapsed_ns: 1_000_000_000,
            cpu_us,
            clients: 2,
            ..LoadReport::default()
        };
        let mut runs = Runs::new();
        runs.insert(
            ("direct".into(), "-".into()),
            vec![rep(1000.0), rep(2000.0)],
        );
        runs.insert(
            (BASELINE.into(), "last".into()),
            vec![rep(4000.0), rep(8000.0)],
        );
        runs.insert(
            ("socket-lb".into(), "last".into()),
            vec![rep(2000.0), rep(4000.0)],
        );
        let records = records_of(100, &runs);
        let ours = records.iter().find(|r| r.variant == "socket-lb").unwrap();
        // The machine is twice as busy in round 2 for everyone: the ratio stays 0.5.
        assert_eq!(ours.cpu_per_conn_vs_baseline, [0.5, 0.5, 0.5]);
        assert_eq!(ours.cpu_us_per_conn, 30.0);
        assert_eq!(ours.added_cpu_us_per_conn, 15.0);
        assert_eq!(ours.clients, 2);
        assert!(report(&records).contains("| 100 | socket-lb | last | 2 | 100 |"));
    }
}
