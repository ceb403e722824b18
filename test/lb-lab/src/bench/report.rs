//! The benchmark's report: Markdown tables, each target MET or MISSED, and a bar chart.

use std::fmt::Write as _;

use super::{ColdSync, ControlPlane, DIRECT_AA, DIRECT_HOOKED, POSITIONS, Record};

fn find<'a>(
    r: &'a [Record],
    variant: &str,
    n: usize,
    proto: &str,
    pos: &str,
) -> Option<&'a Record> {
    r.iter()
        .find(|x| x.variant == variant && x.services == n && x.proto == proto && x.position == pos)
}

/// A ratio's median and its min–max over rounds.
fn with_spread(median: f64, min: f64, max: f64) -> String {
    if min.is_nan() || max.is_nan() {
        return format!("{median:.3}");
    }
    format!("{median:.3} ({min:.2}–{max:.2})")
}

fn rate_spread(r: &Record) -> String {
    with_spread(r.rate_vs_direct, r.rate_vs_direct_min, r.rate_vs_direct_max)
}

/// The A/A control's rate ratio to direct at a size and protocol: [median, min, max].
fn noise(records: &[Record], n: usize, proto: &str) -> Option<[f64; 3]> {
    find(records, DIRECT_AA, n, proto, "-")
        .map(|r| [r.rate_vs_direct, r.rate_vs_direct_min, r.rate_vs_direct_max])
}

/// The Markdown report: tables, then each target with MET / MISSED.
pub fn report(records: &[Record], control: &[ControlPlane]) -> String {
    let mut md = String::from(
        "# Benchmark report\n\nRates are requests per second from one sequential client (TCP: connect, request, reply, \
         client closes; UDP: a new socket per request), each run after a short warm-up of its own. The client and the pod \
         servers run on one CPU (the last): left to the scheduler, where a request's server wakes (the client's CPU or \
         an idle one, woken by an interrupt) decided the rate on this VM more than the translation did. The direct \
         variants draw a pod at random per request, as a service draws a backend. Ratios are measured \
         side by side: each round runs every variant once, in an order rotated every round and reversed every other \
         round, and the ratio is taken within the round; the table shows medians over rounds, with their min–max.\n\n\
         | services | proto | variant | position | rate/s | p50 µs | p99 µs | rate / direct | p99 / direct |\n\
         |---:|---|---|---|---:|---:|---:|---|---|\n",
    );
    for r in records {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} |",
            r.services,
            r.proto,
            r.variant,
            r.position,
            r.rate,
            r.p50_us,
            r.p99_us,
            rate_spread(r),
            with_spread(r.p99_vs_direct, r.p99_vs_direct_min, r.p99_vs_direct_max),
        );
    }
    noise_table(&mut md, records);
    control_tables(&mut md, control);
    md.push_str("\n## Targets\n\n");
    let sizes: Vec<usize> = {
        let mut s: Vec<usize> = records.iter().map(|r| r.services).collect();
        s.dedup();
        s
    };
    let mut targets = Targets(&mut md);
    targets.against_direct(records, &sizes);
    targets.against_kube_proxy(records, &sizes);
    targets.control_plane(control);
    md
}

/// The A/A control (the noise floor) and direct connections through the hooks.
fn noise_table(md: &mut String, records: &[Record]) {
    md.push_str(
        "\n## Noise floor and the hooks' cost\n\n\
         direct-aa is the direct client again from a second cgroup without programs: the same thing measured \
         twice, so its ratio to direct is 1.00 up to noise. Its min–max over rounds is the noise floor: a \
         variant's ratio to direct that lies within it cannot be told from direct. direct-hooked connects to \
         the pods directly from the cgroup with our programs attached: what the hooks cost connections that are \
         not to a service. Busy cores: the machine's busy CPU during direct's runs (/proc/stat); one \
         sequential client and its server keep about one core busy, more is other load on the machine, which \
         widens the noise floor. Client CPU: the client thread's own CPU time per request (its system \
         calls, and the socket programs they run), which other load barely moves, as a ratio to direct's in \
         the same round.\n\n\
         | services | proto | direct-aa / direct (noise floor) | direct-hooked / direct | socket-lb / direct (first) | busy cores | client CPU µs direct | client CPU aa / direct | client CPU hooked / direct | client CPU socket-lb / direct (first) |\n\
         |---:|---|---|---|---|---:|---:|---|---|---|\n",
    );
    let mut groups: Vec<(usize, &str)> = records
        .iter()
        .filter(|r| r.variant == DIRECT_AA)
        .map(|r| (r.services, r.proto.as_str()))
        .collect();
    groups.dedup();
    for (n, proto) in groups {
        let cell =
            |variant, pos| find(records, variant, n, proto, pos).map_or("-".into(), rate_spread);
        let busy = find(records, "direct", n, proto, "-").map_or(f64::NAN, |r| r.busy_cores);
        let cpu = find(records, "direct", n, proto, "-").map_or(f64::NAN, |r| r.client_cpu_us);
        let cpu_cell = |variant, pos| {
            find(records, variant, n, proto, pos).map_or("-".into(), |r| {
                let [m, lo, hi] = r.client_cpu_vs_direct;
                with_spread(m, lo, hi)
            })
        };
        let _ = writeln!(
            md,
            "| {n} | {proto} | {} | {} | {} | {busy:.2} | {cpu:.1} | {} | {} | {} |",
            cell(DIRECT_AA, "-"),
            cell(DIRECT_HOOKED, "-"),
            cell("socket-lb", "first"),
            cpu_cell(DIRECT_AA, "-"),
            cpu_cell(DIRECT_HOOKED, "-"),
            cpu_cell("socket-lb", "first"),
        );
    }
}

fn cold_row(md: &mut String, c: &ControlPlane, source: &str, cold: &ColdSync, rss: f64) {
    let _ = writeln!(
        md,
        "| {} | {} | {source} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {rss:.1} |",
        c.services,
        c.endpoints,
        cold.start_to_sync_ms,
        cold.elapsed_ms,
        cold.read_ms,
        cold.program_ms,
        cold.read_ms + cold.program_ms,
        cold.write_ms,
    );
}

/// The manifest source's cold sync as [`ColdSync`].
fn manifest_cold(c: &ControlPlane) -> ColdSync {
    ColdSync {
        read_ms: c.cold_read_ms,
        program_ms: c.cold_program_ms,
        write_ms: c.cold_write_ms,
        elapsed_ms: c.cold_elapsed_ms,
        start_to_sync_ms: c.start_to_sync_ms,
    }
}

/// Our cold sync and memory (both sources), then kube-proxy's full loads and every
/// variant's changes.
fn control_tables(md: &mut String, control: &[ControlPlane]) {
    hook_cost_table(md, control);
    md.push_str("\n## Control plane\n\nOur agent's first sync, on manifests and on the Kubernetes API (a fake API server over real HTTP, the same objects): from the agent's start to its first sync logged, the sync's own elapsed time and its parts (read: the time the sync spent reading, the manifest source's parts waited for and handed over as its reader parses them from the agent's start, or the API's stores read; on manifests the first sync is made in parts and its times span them all).\n\n| services | endpoints | source | start to synced ms | sync elapsed ms | read ms | model+diff+write ms | read+model+write ms | of which map writes ms | agent peak RSS MiB |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for c in control {
        cold_row(md, c, "manifests", &manifest_cold(c), c.agent_rss_mib);
        if let Some(api) = &c.api {
            cold_row(md, c, "api", &api.cold, api.agent_rss_mib);
        }
    }
    md.push_str("\nMaps' locked memory (MiB) and the time to put the objects into the fake API server (not the agent's):\n\n| services | maps memlock MiB | API objects loaded in ms |\n|---:|---:|---:|\n");
    for c in control {
        let load = c
            .api
            .as_ref()
            .map_or("-".into(), |a| format!("{:.0}", a.load_ms));
        let _ = writeln!(
            md,
            "| {} | {:.1} | {load} |",
            c.services, c.maps_memlock_mib
        );
    }
    md.push_str("\nFull rule load of kube-proxy's modes (ms), and one endpoint change until a connection reaches the new backend (p50 / p99 ms; ours: a manifest renamed over, or an EndpointSlice applied to the API), the first change after the start apart:\n\n| services | variant | full load ms | change p50 ms | change p99 ms | first change ms |\n|---:|---|---:|---:|---:|---:|\n");
    for c in control {
        let ours = |program_ms: f64| format!("{program_ms:.1} (model+diff+write)");
        let rows = c.change_ms.iter().map(|(v, times)| {
            let full = c
                .cold_rules_ms
                .get(v)
                .map_or_else(|| ours(c.cold_program_ms), |m| format!("{m:.1}"));
            let first = c.first_change_ms.get(v).copied().unwrap_or(f64::NAN);
            (v.clone(), full, *times, first)
        });
        let api = c.api.as_ref().map(|a| {
            let v = "socket-lb (api)".to_string();
            (v, ours(a.cold.program_ms), a.change_ms, a.first_change_ms)
        });
        for (v, full, [p50, p99], first) in rows.chain(api) {
            let _ = writeln!(
                md,
                "| {} | {v} | {full} | {p50:.2} | {p99:.2} | {first:.2} |",
                c.services
            );
        }
    }
}

/// The targets, each written as a line with MET or MISSED.
pub(super) struct Targets<'a>(pub(super) &'a mut String);

impl Targets<'_> {
    pub(super) fn check(&mut self, name: String, ok: bool, detail: String) {
        let _ = writeln!(
            self.0,
            "* {} {name}: {detail}",
            if ok { "MET" } else { "MISSED" }
        );
    }

    /// Socket-LB rate and p99 against a direct connection, at every size and position.
    fn against_direct(&mut self, records: &[Record], sizes: &[usize]) {
        for &n in sizes {
            for pos in POSITIONS {
                let detail = |r: &Record| match noise(records, n, &r.proto) {
                    Some([_, lo, hi]) => {
                        format!("{} (A/A noise floor {lo:.2}–{hi:.2})", rate_spread(r))
                    }
                    None => rate_spread(r),
                };
                if let Some(r) = find(records, "socket-lb", n, "tcp", pos) {
                    self.check(
                        format!("TCP rate >= 0.97 x direct, {n} services ({pos})"),
                        r.rate_vs_direct >= 0.97,
                        detail(r),
                    );
                    self.check(
                        format!("TCP p99 <= 1.05 x direct, {n} services ({pos})"),
                        r.p99_vs_direct <= 1.05,
                        format!("{:.3}", r.p99_vs_direct),
                    );
                }
                if let Some(r) = find(records, "socket-lb", n, "udp", pos) {
                    self.check(
                        format!("UDP rate >= 0.95 x direct, {n} services ({pos})"),
                        r.rate_vs_direct >= 0.95,
                        detail(r),
                    );
                }
            }
        }
    }

    /// Socket-LB against kube-proxy: 2x iptables-nft at 10k services, and not slower than
    /// any mode at one service.
    fn against_kube_proxy(&mut self, records: &[Record], sizes: &[usize]) {
        if let Some(&max) = sizes.iter().max().filter(|m| **m >= 10_000) {
            for pos in POSITIONS {
                if let (Some(us), Some(them)) = (
                    find(records, "socket-lb", max, "tcp", pos),
                    find(records, "iptables-nft", max, "tcp", pos),
                ) {
                    let x = us.rate_vs_direct / them.rate_vs_direct;
                    self.check(
                        format!("TCP rate >= 2 x iptables-nft at {max} services ({pos})"),
                        x >= 2.0,
                        format!("{x:.2}x"),
                    );
                }
            }
        }
        if sizes.contains(&1) {
            for proto in ["tcp", "udp"] {
                if let Some(us) = find(records, "socket-lb", 1, proto, "first") {
                    for kp in ["iptables-nft", "iptables-legacy", "nftables"] {
                        if let Some(them) = find(records, kp, 1, proto, "first") {
                            let x = us.rate_vs_direct / them.rate_vs_direct;
                            self.check(
                                format!("{proto} not slower than {kp} at 1 service"),
                                x >= 1.0,
                                format!("{x:.3}x"),
                            );
                        }
                    }
                }
            }
        }
    }

    /// Cold programming, cold start, change latency and RSS at 10k services or more, for
    /// both sources.
    fn control_plane(&mut self, control: &[ControlPlane]) {
        for c in control.iter().filter(|c| c.services >= 10_000) {
            let n = c.services;
            self.check(
                format!(
                    "cold programming of {n} services / {} endpoints <= 250 ms",
                    c.endpoints
                ),
                c.cold_program_ms <= 250.0,
                format!(
                    "{:.1} ms model+diff+write ({:.1} ms reading the manifests before)",
                    c.cold_program_ms, c.cold_read_ms
                ),
            );
            let manifest = (
                "manifests",
                manifest_cold(c),
                c.change_ms.get("socket-lb").copied(),
                c.agent_rss_mib,
            );
            let api = c
                .api
                .as_ref()
                .map(|a| ("api", a.cold, Some(a.change_ms), a.agent_rss_mib));
            for (source, cold, change, rss) in std::iter::once(manifest).chain(api) {
                let start = cold.read_ms + cold.program_ms;
                self.check(
                    format!(
                        "cold start (read + model + write) <= 250 ms at {n} services ({source})"
                    ),
                    start <= 250.0,
                    format!(
                        "{start:.1} ms ({:.1} read + {:.1} model+diff+write)",
                        cold.read_ms, cold.program_ms
                    ),
                );
                if let Some([_, p99]) = change {
                    self.check(
                        format!("one change to datapath p99 <= 5 ms at {n} services ({source})"),
                        p99 <= 5.0,
                        format!("{p99:.2} ms"),
                    );
                }
                self.check(
                    format!("agent RSS <= 100 MiB at {n} services ({source})"),
                    rss <= 100.0,
                    format!("{rss:.1} MiB"),
                );
            }
        }
    }
}

/// A bar chart of TCP and UDP rate / direct per size and variant (middle position, or
/// first where there is no middle).
pub fn svg(records: &[Record]) -> String {
    const VARIANTS: [(&str, &str); 6] = [
        ("direct", "#888888"),
        ("direct-hooked", "#bbbbbb"),
        ("socket-lb", "#2a9d8f"),
        ("iptables-nft", "#e76f51"),
        ("iptables-legacy", "#f4a261"),
        ("nftables", "#264653"),
    ];
    let mut groups: Vec<(usize, String)> = records
        .iter()
        .map(|r| (r.services, r.proto.clone()))
        .collect();
    groups.sort();
    groups.dedup();
    let (w_bar, gap, h) = (18.0, 30.0, 300.0);
    let group_w = w_bar * VARIANTS.len() as f64 + gap;
    let width = 80.0 + group_w * groups.len() as f64 + 160.0;
    let max = records
        .iter()
        .map(|r| r.rate_vs_direct)
        .fold(1.2f64, f64::max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <text x=\"10\" y=\"16\" font-size=\"13\">Request rate relative to a direct connection (higher is better)</text>\n",
        h + 80.0
    );
    let y = |v: f64| 30.0 + h - v / max * h;
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = writeln!(
            s,
            "<line x1=\"60\" x2=\"{}\" y1=\"{0:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"30\" y=\"{:.1}\">{tick:.2}</text>",
            width - 150.0,
            y(tick) + 4.0
        )
        .map(|_| ());
    }
    for (gi, (n, proto)) in groups.iter().enumerate() {
        let x0 = 70.0 + gi as f64 * group_w;
        for (vi, (variant, color)) in VARIANTS.iter().enumerate() {
            let rec = find(records, variant, *n, proto, "middle")
                .or_else(|| find(records, variant, *n, proto, "first"))
                .or_else(|| find(records, variant, *n, proto, "-"));
            if let Some(r) = rec {
                let x = x0 + vi as f64 * w_bar;
                let _ = writeln!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{variant} {n} {proto}: {:.3}</title></rect>",
                    y(r.rate_vs_direct),
                    w_bar - 2.0,
                    30.0 + h - y(r.rate_vs_direct),
                    r.rate_vs_direct
                );
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{x0:.1}\" y=\"{:.1}\">{n} svc {proto}</text>",
            h + 50.0
        );
    }
    for (vi, (variant, color)) in VARIANTS.iter().enumerate() {
        let yy = 40.0 + vi as f64 * 18.0;
        let x = width - 140.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{yy}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{variant}</text>",
            x + 16.0,
            yy + 10.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The socket programs' own cost per call, by size: flat when the lookup does not grow
/// with the number of services.
fn hook_cost_table(md: &mut String, control: &[ControlPlane]) {
    if control.iter().all(|c| c.hook_ns_per_call.is_empty()) {
        return;
    }
    md.push_str(
        "\n## The socket programs' own cost\n\nEach program's run time per call from the kernel's BPF \
         statistics (`BPF_ENABLE_STATS`: run_time_ns / run_cnt), over connections (TCP) or exchanges (UDP) \
         to one service from the client cgroup: a figure that the machine's noise cannot blur, which \
         should stay flat as the number of services grows.\n\n| services | program (traffic) | ns per call |\n|---:|---|---:|\n",
    );
    for c in control {
        for (prog, ns) in &c.hook_ns_per_call {
            let _ = writeln!(md, "| {} | {prog} | {ns:.0} |", c.services);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_marks_targets_met_and_missed() {
        let rec = |variant: &str, pos: &str, ratio: f64| Record {
            variant: variant.into(),
            services: 10_000,
            proto: "tcp".into(),
            position: pos.into(),
            rate: 1000.0 * ratio,
            p50_us: 10.0,
            p99_us: 20.0,
            rate_vs_direct: ratio,
            p99_vs_direct: 1.0,
            rate_vs_direct_min: ratio - 0.05,
            rate_vs_direct_max: ratio + 0.05,
            p99_vs_direct_min: 1.0,
            p99_vs_direct_max: 1.0,
            busy_cores: 1.0,
            client_cpu_us: 20.0 * ratio,
            client_cpu_vs_direct: [ratio, ratio, ratio],
        };
        let records = vec![
            rec("direct", "-", 1.0),
            rec(DIRECT_AA, "-", 1.01),
            rec(DIRECT_HOOKED, "-", 0.98),
            rec("socket-lb", "last", 0.99),
            rec("iptables-nft", "last", 0.6),
        ];
        let cold = ColdSync {
            read_ms: 100.0,
            program_ms: 200.0,
            write_ms: 50.0,
            elapsed_ms: 300.0,
            start_to_sync_ms: 400.0,
        };
        let control = ControlPlane {
            services: 10_000,
            endpoints: 100_000,
            cold_read_ms: 50.0,
            cold_program_ms: 150.0,
            change_ms: [("socket-lb".to_string(), [1.0, 4.0])].into(),
            agent_rss_mib: 90.0,
            api: Some(super::super::api_source::ApiFigures {
                cold,
                change_ms: [2.0, 6.0],
                agent_rss_mib: 120.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let md = report(&records, &[control]);
        assert!(
            md.contains(
                "* MET TCP rate >= 0.97 x direct, 10000 services (last): 0.990 (0.94–1.04) \
                 (A/A noise floor 0.96–1.06)"
            ),
            "{md}"
        );
        assert!(
            md.contains("| 10000 | tcp | 1.010 (0.96–1.06) | 0.980 (0.93–1.03) | - | 1.00 |"),
            "{md}"
        );
        for line in [
            "* MET cold start (read + model + write) <= 250 ms at 10000 services (manifests): 200.0 ms",
            "* MISSED cold start (read + model + write) <= 250 ms at 10000 services (api): 300.0 ms",
            "* MET one change to datapath p99 <= 5 ms at 10000 services (manifests): 4.00 ms",
            "* MISSED one change to datapath p99 <= 5 ms at 10000 services (api): 6.00 ms",
            "* MET agent RSS <= 100 MiB at 10000 services (manifests): 90.0 MiB",
            "* MISSED agent RSS <= 100 MiB at 10000 services (api): 120.0 MiB",
            "| 10000 | socket-lb (api) | 200.0 (model+diff+write) | 2.00 | 6.00 | 0.00 |",
        ] {
            assert!(md.contains(line), "{line}\n{md}");
        }
        assert!(
            md.contains("* MISSED TCP rate >= 2 x iptables-nft at 10000 services (last): 1.65x"),
            "{md}"
        );
        assert!(svg(&records).starts_with("<svg"));
    }
}
