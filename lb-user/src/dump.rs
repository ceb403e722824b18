//! `lb-user dump`: the pinned maps as a person wants to read them.

use std::{fmt::Write as _, net::Ipv4Addr};

use lb_common::Counters;

use crate::datapath::{Snapshot, frontend_of};

/// Renders the per-program counters as a table.
pub fn render_counters(counters: &[(&str, Counters)]) -> String {
    let mut out = format!(
        "{:<14} {:>12} {:>10} {:>14} {:>8}\n",
        "program", "translated", "refused", "affinity-hits", "misses"
    );
    for (name, c) in counters {
        let _ = writeln!(
            out,
            "{name:<14} {:>12} {:>10} {:>14} {:>8}",
            c.translated, c.refused, c.affinity_hits, c.misses
        );
    }
    out
}

/// Renders every frontend with its backends, then anything inconsistent.
pub fn render(snap: &Snapshot) -> String {
    let frontends = snap.frontends();
    let mut out = String::new();
    let backends_used: usize = frontends.values().map(|(_, s)| s.len()).sum();
    let _ = writeln!(
        out,
        "{} frontends, {} backends ({} slots)",
        frontends.len(),
        snap.backends.len(),
        backends_used
    );
    for (key, (header, slots)) in &frontends {
        let name = frontend_of(key).map_or_else(
            || {
                format!(
                    "{}:{} proto {}",
                    Ipv4Addr::from(key.addr),
                    key.port,
                    key.proto
                )
            },
            |fe| fe.to_string(),
        );
        let state = if header.count == 0 {
            "no backends: connections are refused".to_string()
        } else {
            format!("{} backends", header.count)
        };
        let _ = writeln!(out, "{name}  rev-nat {}  {state}", header.rev_nat_id);
        for (i, (id, backend)) in slots.iter().enumerate() {
            match backend {
                Some(b) => {
                    let _ = writeln!(
                        out,
                        "  slot {:<3} backend {:<5} {}:{}",
                        i + 1,
                        id,
                        Ipv4Addr::from(b.addr),
                        b.port
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "  slot {:<3} backend {:<5} MISSING (slot or backend entry absent)",
                        i + 1,
                        id
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::Programmed,
        model::{Desired, Endpoint, Frontend, FrontendState, Proto},
    };

    #[test]
    fn renders_frontends_backends_and_refusing_services() {
        let mut d = Desired::default();
        let ep = |last| Endpoint {
            addr: Ipv4Addr::new(10, 244, last, 2),
            port: 8080,
        };
        d.frontends.insert(
            Frontend {
                addr: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                proto: Proto::Tcp,
            },
            FrontendState {
                service: "demo/web:http".into(),
                endpoints: [ep(1), ep(2)].into(),
            },
        );
        d.frontends.insert(
            Frontend {
                addr: Ipv4Addr::new(10, 96, 0, 11),
                port: 53,
                proto: Proto::Udp,
            },
            FrontendState {
                service: "demo/empty".into(),
                endpoints: Default::default(),
            },
        );
        let mut snap = Snapshot::default();
        for op in Programmed::default().plan(&d).ops {
            snap.apply(&op);
        }
        let text = render(&snap);
        assert!(
            text.starts_with("2 frontends, 2 backends (2 slots)\n"),
            "{text}"
        );
        assert!(text.contains("10.96.0.10:80/TCP  rev-nat"), "{text}");
        assert!(
            text.contains("2 backends\n  slot 1   backend 1     10.244.1.2:8080\n"),
            "{text}"
        );
        assert!(
            text.contains("10.96.0.11:53/UDP  rev-nat 2  no backends: connections are refused"),
            "{text}"
        );
    }
}
