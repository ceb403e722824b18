//! The benchmark's report: Markdown tables, each target MET or MISSED, and a bar chart.

use std::fmt::Write as _;

use super::{ControlPlane, POSITIONS, Record};

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

/// The Markdown report: tables, then each target with MET / MISSED.
pub fn report(records: &[Record], control: &[ControlPlane]) -> String {
    let mut md = String::from(
        "# Benchmark report\n\nRates are requests per second from one sequential client (TCP: connect, request, reply, \
         client closes; UDP: a new socket per request). Ratios are measured side by side: each round runs every \
         variant once, in rotating order, and the ratio is taken within the round; the table shows medians over rounds.\n\n\
         | services | proto | variant | position | rate/s | p50 µs | p99 µs | rate / direct | p99 / direct |\n\
         |---:|---|---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in records {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.3} | {:.3} |",
            r.services,
            r.proto,
            r.variant,
            r.position,
            r.rate,
            r.p50_us,
            r.p99_us,
            r.rate_vs_direct,
            r.p99_vs_direct
        );
    }
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

/// Our cold sync and memory, then kube-proxy's full loads and every variant's changes.
fn control_tables(md: &mut String, control: &[ControlPlane]) {
    md.push_str("\n## Control plane\n\n| services | endpoints | our cold sync: read ms | model+diff+write ms | of which map writes ms | agent peak RSS MiB | maps memlock MiB |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for c in control {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            c.services,
            c.endpoints,
            c.cold_read_ms,
            c.cold_program_ms,
            c.cold_write_ms,
            c.agent_rss_mib,
            c.maps_memlock_mib
        );
    }
    md.push_str("\nFull rule load of kube-proxy's modes (ms), and one endpoint change until a connection reaches the new backend (p50 / p99 ms):\n\n| services | variant | full load ms | change p50 ms | change p99 ms |\n|---:|---|---:|---:|---:|\n");
    for c in control {
        for (v, [p50, p99]) in &c.change_ms {
            let full = c.cold_rules_ms.get(v).map_or_else(
                || format!("{:.1} (model+diff+write)", c.cold_program_ms),
                |m| format!("{m:.1}"),
            );
            let _ = writeln!(
                md,
                "| {} | {v} | {full} | {p50:.2} | {p99:.2} |",
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
                if let Some(r) = find(records, "socket-lb", n, "tcp", pos) {
                    self.check(
                        format!("TCP rate >= 0.97 x direct, {n} services ({pos})"),
                        r.rate_vs_direct >= 0.97,
                        format!("{:.3}", r.rate_vs_direct),
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
                        format!("{:.3}", r.rate_vs_direct),
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

    /// Cold programming, change latency and RSS at 10k services or more.
    fn control_plane(&mut self, control: &[ControlPlane]) {
        for c in control.iter().filter(|c| c.services >= 10_000) {
            self.check(
                format!(
                    "cold programming of {} services / {} endpoints <= 250 ms",
                    c.services, c.endpoints
                ),
                c.cold_program_ms <= 250.0,
                format!(
                    "{:.1} ms model+diff+write ({:.1} ms reading the manifests before)",
                    c.cold_program_ms, c.cold_read_ms
                ),
            );
            if let Some([_, p99]) = c.change_ms.get("socket-lb") {
                self.check(
                    format!(
                        "one change to datapath p99 <= 5 ms at {} services",
                        c.services
                    ),
                    *p99 <= 5.0,
                    format!("{p99:.2} ms"),
                );
            }
            self.check(
                format!("agent RSS <= 100 MiB at {} services", c.services),
                c.agent_rss_mib <= 100.0,
                format!("{:.1} MiB", c.agent_rss_mib),
            );
        }
    }
}

/// A bar chart of TCP and UDP rate / direct per size and variant (middle position, or
/// first where there is no middle).
pub fn svg(records: &[Record]) -> String {
    const VARIANTS: [(&str, &str); 5] = [
        ("direct", "#888888"),
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
        };
        let records = vec![
            rec("direct", "-", 1.0),
            rec("socket-lb", "last", 0.99),
            rec("iptables-nft", "last", 0.6),
        ];
        let md = report(&records, &[]);
        assert!(
            md.contains("* MET TCP rate >= 0.97 x direct, 10000 services (last): 0.990"),
            "{md}"
        );
        assert!(
            md.contains("* MISSED TCP rate >= 2 x iptables-nft at 10000 services (last): 1.65x"),
            "{md}"
        );
        assert!(svg(&records).starts_with("<svg"));
    }
}
