//! `lb-user dump`: the pinned maps as a person wants to read them.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use lb_common::{
    CT_F_CLOSING, CT_F_FIN_ORIG, CT_F_FIN_REPLY, CT_F_REPLY, CT_F_SNAT, CT_F_SYN_SENT, Counters,
    CtKey, CtValue, PROTO_UDP,
};

use crate::{
    datapath::{Snapshot, frontend_of, ip_of, loader::EbpfObject},
    model::FrontendKind,
};

/// Renders the per-program counters as a table.
pub fn render_counters(counters: &[(&str, Counters)]) -> String {
    let mut out = format!(
        "{:<14} {:>12} {:>10} {:>9} {:>14} {:>8}\n",
        "program", "translated", "refused", "no-local", "affinity-hits", "misses"
    );
    for (name, c) in counters {
        let _ = writeln!(
            out,
            "{name:<14} {:>12} {:>10} {:>9} {:>14} {:>8}",
            c.translated, c.refused, c.no_local, c.affinity_hits, c.misses
        );
    }
    out
}

/// Renders the packet level's drops by reason (only the reasons that happened).
pub fn render_drops(drops: &[(&str, u64)]) -> String {
    render_tally("packet-level drops", drops)
}

/// Renders the XDP mode of each interface that has the XDP program (`--acceleration`).
pub fn render_xdp(modes: &[(String, &str)]) -> String {
    if modes.is_empty() {
        return "XDP acceleration: off (tc only)\n".into();
    }
    let each: Vec<String> = modes.iter().map(|(i, m)| format!("{i} {m}")).collect();
    format!("XDP acceleration: {}\n", each.join(", "))
}

/// Renders which object's programs the socket level runs (`None`: none attached).
pub fn render_object(object: Option<EbpfObject>) -> String {
    match object {
        None => "socket level: no programs attached\n".into(),
        Some(EbpfObject::Full) => {
            "socket level: full (a refused connect() gets ECONNREFUSED)\n".into()
        }
        Some(EbpfObject::NoSetRetval) => {
            "socket level: no-set-retval, degraded (this kernel has no \
             bpf_set_retval, or the agent was told to assume so: a refused connect() or sendmsg() \
             gets EPERM instead of ECONNREFUSED)\n"
                .into()
        }
    }
}

/// Renders counts under `title`, only those that happened.
pub fn render_tally(title: &str, tally: &[(&str, u64)]) -> String {
    let happened: Vec<&(&str, u64)> = tally.iter().filter(|(_, n)| *n > 0).collect();
    if happened.is_empty() {
        return format!("{title}: none\n");
    }
    let mut out = format!("{title}:\n");
    for (reason, n) in happened {
        let _ = writeln!(out, "  {reason:<18} {n:>10}");
    }
    out
}

/// Renders the connection-tracking entries, original directions first, with each
/// entry's age at `now_ns` (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`).
pub fn render_conntrack(entries: &[(CtKey, CtValue)], now_ns: u64) -> String {
    let mut sorted: Vec<&(CtKey, CtValue)> = entries.iter().collect();
    sorted.sort_by_key(|(k, v)| (v.flags & CT_F_REPLY, *k));
    let mut out = format!("connection tracking: {} entries\n", entries.len());
    for (k, v) in sorted {
        let at = |addr, port| SocketAddr::new(ip_of(addr), port);
        let mut flags = vec![if v.flags & CT_F_REPLY != 0 {
            "reply"
        } else {
            "original"
        }];
        if v.flags & CT_F_SNAT != 0 {
            flags.push("snat");
        }
        if v.flags & CT_F_CLOSING != 0 {
            flags.push("closing");
        }
        if v.flags & CT_F_SYN_SENT != 0 {
            flags.push("syn-sent");
        }
        for (bit, name) in [
            (CT_F_FIN_ORIG, "fin-client"),
            (CT_F_FIN_REPLY, "fin-backend"),
        ] {
            if v.flags & bit != 0 {
                flags.push(name);
            }
        }
        if v.expired(k.proto, now_ns) {
            flags.push("expired");
        }
        let _ = writeln!(
            out,
            "  {} {} -> {}  =>  {} -> {}  backend {}  [{}]  seen {:.1}s ago",
            if k.proto == PROTO_UDP { "udp" } else { "tcp" },
            at(&k.saddr, k.sport),
            at(&k.daddr, k.dport),
            at(&v.saddr, v.sport),
            at(&v.daddr, v.dport),
            v.backend_id,
            flags.join(" "),
            now_ns.saturating_sub(v.last_seen_ns) as f64 / 1e9
        );
    }
    out
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The Service port a frontend belongs to, its kind and policy, from the names map:
/// "ns/web:http NodePort policy=Local".
fn service_of(snap: &Snapshot, rev_nat_id: u16) -> String {
    snap.names.get(&rev_nat_id).map_or("(no name)".into(), |n| {
        let policy = if n.flags & lb_common::FRONTEND_F_POLICY_LOCAL != 0 {
            " policy=Local"
        } else {
            ""
        };
        format!("{} {}{policy}", n.as_str(), FrontendKind::name_of(n.kind))
    })
}

/// Everything `dump` shows, as one JSON document for scripts: frontends with their
/// Service, scope, affinity and backends; the programs' counters; the packet level's drops.
pub fn render_json(
    snap: &Snapshot,
    counters: &[(&str, Counters)],
    drops: &[(&str, u64)],
) -> serde_json::Value {
    let frontends: Vec<serde_json::Value> = snap
        .frontends()
        .iter()
        .map(|(key, (header, slots))| {
            let fe = frontend_of(key);
            serde_json::json!({
                "address": ip_of(&key.addr).to_string(),
                "port": key.port,
                "protocol": fe.map(|f| format!("{:?}", f.proto).to_uppercase()),
                "scope": fe.map(|f| format!("{:?}", f.scope).to_lowercase()),
                "service": snap.names.get(&header.rev_nat_id).map(|n| n.as_str()),
                "type": snap.names.get(&header.rev_nat_id).map(|n| FrontendKind::name_of(n.kind)),
                "trafficPolicyLocal": snap.names.get(&header.rev_nat_id)
                    .map(|n| n.flags & lb_common::FRONTEND_F_POLICY_LOCAL != 0),
                "revNatId": header.rev_nat_id,
                "noLocalEndpoint": header.flags & lb_common::SVC_F_NO_LOCAL != 0,
                "affinityTimeoutSeconds": header.affinity_timeout,
                "maglevTableSize": snap.maglev.get(key).map(|(size, _)| size),
                "backends": slots.iter().enumerate().map(|(i, (id, b))| serde_json::json!({
                    "slot": i + 1,
                    "id": id,
                    "address": b.map(|b| ip_of(&b.addr).to_string()),
                    "port": b.map(|b| b.port),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let counters: serde_json::Map<String, serde_json::Value> = counters
        .iter()
        .map(|(prog, c)| {
            (
                prog.to_string(),
                serde_json::json!({
                    "translated": c.translated,
                    "refused": c.refused,
                    "noLocal": c.no_local,
                    "affinityHits": c.affinity_hits,
                    "misses": c.misses,
                }),
            )
        })
        .collect();
    let drops: serde_json::Map<String, serde_json::Value> = drops
        .iter()
        .map(|(reason, n)| (reason.to_string(), (*n).into()))
        .collect();
    let maglev_bytes: u64 = snap
        .maglev
        .values()
        .map(|(size, _)| lb_core::maglev::table_bytes(*size))
        .sum();
    serde_json::json!({
        "frontends": frontends,
        "counters": counters,
        "tcDrops": drops,
        "maglev": {"tables": snap.maglev.len(), "bytes": maglev_bytes},
    })
}

/// What in `snap` no frontend accounts for, or a frontend lacks: entries an agent
/// mid-write, a crash or a hand edit left (the agent's periodic reconcile removes them).
pub fn inconsistencies(snap: &Snapshot) -> Vec<String> {
    let frontends = snap.frontends();
    let mut out = Vec::new();
    let ids: std::collections::BTreeSet<u16> =
        frontends.values().map(|(h, _)| h.rev_nat_id).collect();
    let used: std::collections::BTreeSet<u32> = frontends
        .values()
        .flat_map(|(_, slots)| slots.iter().map(|(id, _)| *id))
        .collect();
    for id in snap.backends.keys().filter(|id| !used.contains(id)) {
        out.push(format!("backend {id}: no frontend's slot names it"));
    }
    for id in snap.revnat.keys().filter(|id| !ids.contains(id)) {
        out.push(format!("rev-NAT entry {id}: no frontend has this id"));
    }
    for id in snap.names.keys().filter(|id| !ids.contains(id)) {
        out.push(format!("name {id}: no frontend has this id"));
    }
    for (key, (header, _)) in &frontends {
        if !snap.revnat.contains_key(&header.rev_nat_id) {
            out.push(format!(
                "{}: no rev-NAT entry {}",
                frontend_name(key),
                header.rev_nat_id
            ));
        }
    }
    for key in snap.services.keys().filter(|k| k.slot > 0) {
        let header = snap.services.get(&key.with_slot(0));
        if header.is_none_or(|h| key.slot > h.count) {
            out.push(format!(
                "{} slot {}: beyond its frontend's count",
                frontend_name(key),
                key.slot
            ));
        }
    }
    out
}

fn frontend_name(key: &lb_common::ServiceKey) -> String {
    frontend_of(key).map_or_else(
        || {
            format!(
                "{} proto {}",
                SocketAddr::new(ip_of(&key.addr), key.port),
                key.proto
            )
        },
        |fe| fe.to_string(),
    )
}

/// The Maglev tables' line: how many, their sizes and the memory their entries take.
pub fn render_maglev(snap: &Snapshot) -> String {
    let mut sizes: BTreeMap<u32, usize> = BTreeMap::new();
    for (size, _) in snap.maglev.values() {
        *sizes.entry(*size).or_default() += 1;
    }
    let bytes: u64 = sizes
        .iter()
        .map(|(size, n)| lb_core::maglev::table_bytes(*size) * *n as u64)
        .sum();
    let each: Vec<String> = sizes
        .iter()
        .map(|(size, n)| {
            format!(
                "{n} of {size} entries ({:.1} KiB each)",
                lb_core::maglev::table_bytes(*size) as f64 / 1024.0
            )
        })
        .collect();
    format!(
        "Maglev tables: {}: {}, {:.1} KiB in all",
        snap.maglev.len(),
        each.join(", "),
        bytes as f64 / 1024.0
    )
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
        let name = frontend_name(key);
        let state = if header.count == 0 && header.flags & lb_common::SVC_F_NO_LOCAL != 0 {
            "no backend on this node (traffic policy Local; the service has endpoints elsewhere): connections are refused with EHOSTUNREACH, packets dropped".to_string()
        } else if header.count == 0 {
            "no backends: connections are refused".to_string()
        } else {
            format!("{} backends", header.count)
        };
        let affinity = if header.affinity_timeout == 0 {
            String::new()
        } else {
            let clients = snap
                .affinity
                .keys()
                .filter(|k| k.rev_nat_id == header.rev_nat_id)
                .count();
            format!(
                "  affinity ClientIP {}s ({clients} clients)",
                header.affinity_timeout
            )
        };
        let maglev = snap
            .maglev
            .get(key)
            .map_or(String::new(), |(size, _)| format!("  maglev {size}"));
        let _ = writeln!(
            out,
            "{name}  {}  rev-nat {}  {state}{affinity}{maglev}",
            service_of(snap, header.rev_nat_id),
            header.rev_nat_id
        );
        for (i, (id, backend)) in slots.iter().enumerate() {
            match backend {
                Some(b) => {
                    let _ = writeln!(
                        out,
                        "  slot {:<3} backend {:<5} {}",
                        i + 1,
                        id,
                        SocketAddr::new(ip_of(&b.addr), b.port)
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
    if !snap.maglev.is_empty() {
        let _ = writeln!(out, "{}", render_maglev(snap));
    }
    let odd = inconsistencies(snap);
    if !odd.is_empty() {
        let _ = writeln!(out, "inconsistent ({}):", odd.len());
        for line in odd {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        datapath::Programmed,
        model::{Desired, Endpoint, Frontend, FrontendState, Proto, Scope},
    };

    #[test]
    fn drops_show_only_the_reasons_that_happened() {
        assert_eq!(
            render_drops(&[("no_route", 0)]),
            "packet-level drops: none\n"
        );
        let out = render_drops(&[("no_route", 0), ("no_snat_port", 3)]);
        assert!(out.contains("no_snat_port") && out.contains(" 3"), "{out}");
        assert!(!out.contains("no_route"), "{out}");
        assert_eq!(render_xdp(&[]), "XDP acceleration: off (tc only)\n");
        assert_eq!(
            render_xdp(&[("eth0".into(), "native"), ("eth1".into(), "generic")]),
            "XDP acceleration: eth0 native, eth1 generic\n"
        );
    }

    #[test]
    fn the_socket_levels_object_is_named_with_what_clients_see() {
        assert!(
            render_object(Some(EbpfObject::Full))
                .contains("full (a refused connect() gets ECONNREFUSED)")
        );
        let degraded = render_object(Some(EbpfObject::NoSetRetval));
        assert!(
            degraded.starts_with("socket level: no-set-retval, degraded"),
            "{degraded}"
        );
        assert!(
            degraded.contains("EPERM instead of ECONNREFUSED"),
            "{degraded}"
        );
        assert_eq!(render_object(None), "socket level: no programs attached\n");
    }

    #[test]
    fn renders_conntrack_entries_both_directions() {
        let mapped = |s: &str| crate::datapath::addr_of(s.parse().unwrap());
        let key = CtKey {
            saddr: mapped("192.168.77.100"),
            daddr: mapped("192.168.77.1"),
            sport: 40000,
            dport: 30080,
            proto: lb_common::PROTO_TCP,
            _pad: [0; 3],
        };
        let value = CtValue {
            saddr: mapped("192.168.77.1"),
            daddr: mapped("10.244.101.2"),
            sport: 61000,
            dport: 8080,
            backend_id: 3,
            last_seen_ns: 1_000_000_000,
            flags: CT_F_SNAT,
            _pad: [0; 7],
        };
        let (rk, rv) = value.partner(&key);
        let out = render_conntrack(&[(rk, rv), (key, value)], 3_000_000_000);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "connection tracking: 2 entries");
        assert_eq!(
            lines[1],
            "  tcp 192.168.77.100:40000 -> 192.168.77.1:30080  =>  192.168.77.1:61000 -> 10.244.101.2:8080  backend 3  [original snat]  seen 2.0s ago"
        );
        assert_eq!(
            lines[2],
            "  tcp 10.244.101.2:8080 -> 192.168.77.1:61000  =>  192.168.77.1:30080 -> 192.168.77.100:40000  backend 3  [reply snat]  seen 2.0s ago"
        );
    }

    /// A frontend of `service` at `addr`:`port` with `endpoints` and `affinity_timeout`.
    fn frontend(
        d: &mut Desired,
        (addr, port, proto): (std::net::IpAddr, u16, Proto),
        service: &str,
        endpoints: &[Endpoint],
        affinity_timeout: u32,
    ) {
        let fe = Frontend {
            addr,
            port,
            proto,
            scope: Scope::External,
        };
        let state = FrontendState {
            service: service.into(),
            kind: Default::default(),
            policy_local: false,
            no_local: false,
            keep_sockets: false,
            endpoints: endpoints.iter().copied().collect(),
            affinity_timeout,
            source_ranges: Default::default(),
        };
        d.frontends.insert(fe, state.into());
    }

    /// demo/web (two backends, and an IPv6 frontend with affinity) and demo/empty, as a
    /// first plan writes them.
    fn three_frontends() -> Snapshot {
        let mut d = Desired::default();
        let ep = |addr: &str| Endpoint {
            addr: addr.parse().unwrap(),
            port: 8080,
            local: false,
        };
        let v4 = |last| std::net::IpAddr::from(Ipv4Addr::new(10, 96, 0, last));
        let web = [ep("10.244.1.2"), ep("10.244.2.2")];
        frontend(&mut d, (v4(10), 80, Proto::Tcp), "demo/web:http", &web, 0);
        frontend(&mut d, (v4(11), 53, Proto::Udp), "demo/empty", &[], 0);
        let v6 = ("fd00:96::10".parse().unwrap(), 80, Proto::Tcp);
        frontend(&mut d, v6, "demo/web:http", &[ep("fd00:244:1::2")], 30);
        let mut snap = Snapshot::default();
        for op in Programmed::default().plan(&d).ops() {
            snap.apply(op);
        }
        snap
    }

    #[test]
    fn maglev_tables_are_shown_per_frontend_with_their_memory() {
        let mut snap = three_frontends();
        assert!(!render(&snap).contains("Maglev"));
        let keys: Vec<lb_common::ServiceKey> = snap.frontends().keys().copied().collect();
        snap.maglev.insert(keys[0], (16381, 1));
        snap.maglev.insert(keys[1], (16381, 2));
        snap.maglev.insert(keys[2], (251, 3));
        let text = render(&snap);
        assert!(
            text.contains("Maglev tables: 3: 1 of 251 entries (1.0 KiB each), 2 of 16381 entries (64.0 KiB each), 129.0 KiB in all"),
            "{text}"
        );
        assert!(text.contains("maglev 16381"), "{text}");
        let json = render_json(&snap, &[], &[]);
        assert_eq!(json["maglev"]["tables"], 3);
        assert_eq!(json["maglev"]["bytes"], 2 * 65_544 + 1024);
    }

    #[test]
    fn renders_frontends_backends_and_refusing_services() {
        let snap = three_frontends();
        let text = render(&snap);
        assert!(
            text.starts_with("3 frontends, 3 backends (3 slots)\n"),
            "{text}"
        );
        assert!(
            text.contains("10.96.0.10:80/TCP  demo/web:http ClusterIP  rev-nat"),
            "{text}"
        );
        assert!(
            text.contains("2 backends\n  slot 1   backend 1     10.244.1.2:8080\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "10.96.0.11:53/UDP  demo/empty ClusterIP  rev-nat 2  no backends: connections are refused"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "[fd00:96::10]:80/TCP  demo/web:http ClusterIP  rev-nat 3  1 backends  affinity ClientIP 30s (0 clients)\n  slot 1   backend 3     [fd00:244:1::2]:8080\n"
            ),
            "{text}"
        );
        assert!(!text.contains("inconsistent"), "{text}");
    }

    #[test]
    fn what_no_frontend_accounts_for_is_listed_at_the_end() {
        // What a crash mid-write or a hand edit leaves.
        let mut snap = three_frontends();
        snap.revnat.remove(&1);
        snap.backends.insert(
            99,
            lb_common::Backend {
                addr: crate::datapath::addr_of(Ipv4Addr::new(10, 244, 9, 9).into()),
                port: 1,
                proto: lb_common::PROTO_TCP,
                flags: 0,
            },
        );
        snap.names.remove(&2);
        let text = render(&snap);
        assert!(
            text.ends_with(
                "inconsistent (2):\n  backend 99: no frontend's slot names it\n  10.96.0.10:80/TCP: no rev-NAT entry 1\n"
            ),
            "{text}"
        );
    }
}
