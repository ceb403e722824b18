//! kube-proxy's own rules, generated as kube-proxy writes them, for the benchmarks to
//! compare against: iptables mode (`iptables-restore` input, the same text for the
//! nf_tables and the legacy backend) and nftables mode (`nft -f` input). Pure text
//! generation, and [`KubeProxy::load`], which loads it into a namespace of the benchmark's.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_user::model::Proto;

/// The pod network (kube-proxy's --cluster-cidr): traffic from outside it is masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// One service port and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcPort {
    /// `namespace/name`.
    pub name: String,
    pub port_name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub target_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
    /// The nodePort, for a NodePort service (externalTrafficPolicy Cluster).
    pub node_port: Option<u16>,
    /// Its LoadBalancer ingress IP and source ranges, for a LoadBalancer service.
    pub load_balancer: Option<LoadBalancer>,
}

/// A LoadBalancer service's ingress IP and `loadBalancerSourceRanges` (CIDRs; empty:
/// every source).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadBalancer {
    pub ip: Ipv4Addr,
    pub source_ranges: Vec<String>,
}

impl SvcPort {
    /// kube-proxy's ServicePortName: `namespace/name:port`.
    fn port_name(&self) -> String {
        format!("{}:{}", self.name, self.port_name)
    }

    /// Whether traffic from outside reaches it (a nodePort or a LoadBalancer IP): it
    /// then has an external chain.
    fn external(&self) -> bool {
        self.node_port.is_some() || self.load_balancer.is_some()
    }

    /// The source ranges of its LoadBalancer IP, if it has some: it then has a firewall.
    fn source_ranges(&self) -> Option<&[String]> {
        self.load_balancer
            .as_ref()
            .map(|lb| lb.source_ranges.as_slice())
            .filter(|r| !r.is_empty())
    }

    fn proto_lower(&self) -> &'static str {
        match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// 16 characters of base32 from a hash of `text`, like kube-proxy's chain name suffixes
/// (it uses SHA-256; any stable hash serves here).
fn chain_hash(text: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    for seed in [0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4] {
        let mut h = seed;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for i in 0..8 {
            out.push(ALPHABET[((h >> (i * 5)) & 31) as usize] as char);
        }
    }
    out
}

fn svc_chain(sp: &SvcPort) -> String {
    format!(
        "KUBE-SVC-{}",
        chain_hash(&format!("{}{}", sp.port_name(), sp.proto))
    )
}

/// kube-proxy's KUBE-EXT chain: what traffic from outside the node goes through.
fn ext_chain(sp: &SvcPort) -> String {
    format!(
        "KUBE-EXT-{}",
        chain_hash(&format!("{}{}", sp.port_name(), sp.proto))
    )
}

/// kube-proxy's KUBE-FW chain: a LoadBalancer IP's source ranges.
fn fw_chain(sp: &SvcPort) -> String {
    format!(
        "KUBE-FW-{}",
        chain_hash(&format!("{}{}", sp.port_name(), sp.proto))
    )
}

fn sep_chain(sp: &SvcPort, ep: Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!(
            "{}{}{ep}:{}",
            sp.port_name(),
            sp.proto,
            sp.target_port
        ))
    )
}

/// The rules of one service port: its KUBE-SVC chain and its KUBE-SEP chains.
fn iptables_service_rules(sp: &SvcPort, out: &mut String) {
    let svc = svc_chain(sp);
    let name = sp.port_name();
    let p = sp.proto_lower();
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        sp.ip, sp.port
    );
    if sp.external() {
        // externalTrafficPolicy Cluster: everything from outside is masqueraded.
        let ext = ext_chain(sp);
        let _ = writeln!(
            out,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(out, "-A {ext} -j {svc}");
    }
    if let Some(ranges) = sp.source_ranges() {
        // Sources in range go on to the external chain; the rest leave the chain
        // untranslated, and KUBE-PROXY-FIREWALL (filter) drops them.
        let (fw, ext) = (fw_chain(sp), ext_chain(sp));
        for cidr in ranges {
            let _ = writeln!(
                out,
                "-A {fw} -m comment --comment \"{name} loadbalancer IP\" -s {cidr} -j {ext}"
            );
        }
        let _ = writeln!(
            out,
            "-A {fw} -m comment --comment \"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\""
        );
    }
    let n = sp.endpoints.len();
    for (i, ep) in sp.endpoints.iter().enumerate() {
        let sep = sep_chain(sp, *ep);
        let target = format!("{ep}:{}", sp.target_port);
        if i + 1 < n {
            // kube-proxy: endpoint i of n is taken with probability 1/(n-i).
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{name} -> {target}\" -m statistic --mode random --probability {:.10} -j {sep}",
                1.0 / (n - i) as f64
            );
        } else {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{name} -> {target}\" -j {sep}"
            );
        }
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {name} -s {ep}/32 -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {name} -m {p} -p {p} -j DNAT --to-destination {target}"
        );
    }
}

/// A full `iptables-restore` input (filter and nat tables) for `services`, in order: the
/// first service port is the first rule of KUBE-SERVICES.
pub fn iptables_restore(services: &[SvcPort]) -> String {
    let mut out = String::new();
    out.push_str(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    for sp in services {
        if let (Some(lb), Some(_)) = (&sp.load_balancer, sp.source_ranges()) {
            let p = sp.proto_lower();
            let _ = writeln!(
                out,
                "-A KUBE-PROXY-FIREWALL -m comment --comment \"{} traffic not accepted by {}\" -m {p} -p {p} -d {}/32 --dport {} -j DROP",
                sp.port_name(),
                fw_chain(sp),
                lb.ip,
                sp.port
            );
        }
    }
    out.push_str("COMMIT\n");
    out.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for sp in services {
        let _ = writeln!(out, ":{} - [0:0]", svc_chain(sp));
        if sp.external() {
            let _ = writeln!(out, ":{} - [0:0]", ext_chain(sp));
        }
        if sp.source_ranges().is_some() {
            let _ = writeln!(out, ":{} - [0:0]", fw_chain(sp));
        }
        for ep in &sp.endpoints {
            let _ = writeln!(out, ":{} - [0:0]", sep_chain(sp, *ep));
        }
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    for sp in services {
        let p = sp.proto_lower();
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {}",
            sp.port_name(),
            sp.ip,
            sp.port,
            svc_chain(sp)
        );
        if let Some(lb) = &sp.load_balancer {
            let to = match sp.source_ranges() {
                Some(_) => fw_chain(sp),
                None => ext_chain(sp),
            };
            let _ = writeln!(
                out,
                "-A KUBE-SERVICES -m comment --comment \"{} loadbalancer IP\" -m {p} -p {p} -d {}/32 --dport {} -j {to}",
                sp.port_name(),
                lb.ip,
                sp.port,
            );
        }
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for sp in services {
        if let Some(node_port) = sp.node_port {
            let p = sp.proto_lower();
            let _ = writeln!(
                out,
                "-A KUBE-NODEPORTS -m comment --comment {} -m {p} -p {p} --dport {node_port} -j {}",
                sp.port_name(),
                ext_chain(sp)
            );
        }
    }
    for sp in services {
        iptables_service_rules(sp, &mut out);
    }
    out.push_str("COMMIT\n");
    // nfacct is not always there; kube-proxy only adds that rule when it is.
    out.replace(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP\n",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    )
}

/// The `iptables-restore --noflush` input of kube-proxy's partial sync when one service
/// port's endpoints change from `old` to `new`: its chains rewritten, stale ones deleted.
pub fn iptables_change(old: &SvcPort, new: &SvcPort) -> String {
    let mut out = String::from("*nat\n");
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(new));
    if new.external() {
        let _ = writeln!(out, ":{} - [0:0]", ext_chain(new));
    }
    if new.source_ranges().is_some() {
        let _ = writeln!(out, ":{} - [0:0]", fw_chain(new));
    }
    for ep in &new.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(new, *ep));
    }
    let stale: Vec<String> = old
        .endpoints
        .iter()
        .filter(|e| !new.endpoints.contains(e))
        .map(|ep| sep_chain(old, *ep))
        .collect();
    // Stale chains are declared (flushed) first, then deleted, as kube-proxy does.
    for chain in &stale {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    iptables_service_rules(new, &mut out);
    for chain in &stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

fn nft_svc_chain(sp: &SvcPort) -> String {
    format!(
        "service-{}-{}/{}/{}",
        &chain_hash(&format!("{}{}", sp.port_name(), sp.proto))[..8],
        sp.name,
        sp.proto_lower(),
        sp.port_name
    )
}

fn nft_ext_chain(sp: &SvcPort) -> String {
    nft_svc_chain(sp).replacen("service-", "external-", 1)
}

fn nft_fw_chain(sp: &SvcPort) -> String {
    nft_svc_chain(sp).replacen("service-", "firewall-", 1)
}

fn nft_ep_chain(sp: &SvcPort, ep: Ipv4Addr) -> String {
    format!(
        "endpoint-{}-{}/{}/{}__{ep}/{}",
        &chain_hash(&format!("{}{}{ep}", sp.port_name(), sp.proto))[..8],
        sp.name,
        sp.proto_lower(),
        sp.port_name,
        sp.target_port
    )
}

const NFT_T: &str = "ip kube-proxy";

/// The chains of one service port and their rules (nftables mode).
fn nft_service_rules(sp: &SvcPort, out: &mut String) {
    let svc = nft_svc_chain(sp);
    let p = sp.proto_lower();
    let _ = writeln!(out, "add chain {NFT_T} {svc}");
    let _ = writeln!(
        out,
        "add rule {NFT_T} {svc} ip daddr {} {p} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        sp.ip, sp.port
    );
    let mut vmap = Vec::new();
    for (i, ep) in sp.endpoints.iter().enumerate() {
        let chain = nft_ep_chain(sp, *ep);
        let _ = writeln!(out, "add chain {NFT_T} {chain}");
        let _ = writeln!(
            out,
            "add rule {NFT_T} {chain} ip saddr {ep} jump mark-for-masquerade"
        );
        let _ = writeln!(
            out,
            "add rule {NFT_T} {chain} meta l4proto {p} dnat to {ep}:{}",
            sp.target_port
        );
        vmap.push(format!("{i} : goto {chain}"));
    }
    let _ = writeln!(
        out,
        "add rule {NFT_T} {svc} numgen random mod {} vmap {{ {} }}",
        sp.endpoints.len(),
        vmap.join(" , ")
    );
    if sp.external() {
        // externalTrafficPolicy Cluster: everything from outside is masqueraded.
        let ext = nft_ext_chain(sp);
        let _ = writeln!(out, "add chain {NFT_T} {ext}");
        let _ = writeln!(out, "add rule {NFT_T} {ext} jump mark-for-masquerade");
        let _ = writeln!(out, "add rule {NFT_T} {ext} goto {svc}");
    }
    if let Some(ranges) = sp.source_ranges() {
        // The firewall chain drops every source out of range (filter, before DNAT).
        let fw = nft_fw_chain(sp);
        let _ = writeln!(out, "add chain {NFT_T} {fw}");
        let _ = writeln!(
            out,
            "add rule {NFT_T} {fw} ip saddr != {{ {} }} drop",
            ranges.join(", ")
        );
    }
}

/// A full `nft -f` input for kube-proxy's nftables mode: a `service-ips` verdict map from
/// (address, protocol, port) to a per-service chain, `numgen` to pick an endpoint.
pub fn nft_ruleset(services: &[SvcPort]) -> String {
    let mut out = format!(
        "add table {NFT_T} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {NFT_T} mark-for-masquerade\n\
         add rule {NFT_T} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {NFT_T} masquerading\n\
         add rule {NFT_T} masquerading mark and 0x4000 == 0 return\n\
         add rule {NFT_T} masquerading mark set mark xor 0x4000\n\
         add rule {NFT_T} masquerading masquerade fully-random\n\
         add chain {NFT_T} services\n\
         add chain {NFT_T} service-endpoints-check\n\
         add chain {NFT_T} filter-output {{ type filter hook output priority -110 ; }}\n\
         add rule {NFT_T} filter-output ct state new jump service-endpoints-check\n\
         add chain {NFT_T} firewall-check\n\
         add chain {NFT_T} filter-prerouting {{ type filter hook prerouting priority -110 ; }}\n\
         add rule {NFT_T} filter-prerouting ct state new jump firewall-check\n\
         add chain {NFT_T} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule {NFT_T} nat-output jump services\n\
         add chain {NFT_T} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add rule {NFT_T} nat-prerouting jump services\n\
         add chain {NFT_T} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add rule {NFT_T} nat-postrouting jump masquerading\n\
         add map {NFT_T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {NFT_T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add map {NFT_T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map {NFT_T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
         add rule {NFT_T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add rule {NFT_T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add rule {NFT_T} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {NFT_T} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n"
    );
    for sp in services {
        nft_service_rules(sp, &mut out);
    }
    for sp in services {
        let _ = writeln!(
            out,
            "add element {NFT_T} service-ips {{ {} . {} . {} : goto {} }}",
            sp.ip,
            sp.proto_lower(),
            sp.port,
            nft_svc_chain(sp)
        );
        if let Some(node_port) = sp.node_port {
            let _ = writeln!(
                out,
                "add element {NFT_T} service-nodeports {{ {} . {node_port} : goto {} }}",
                sp.proto_lower(),
                nft_ext_chain(sp)
            );
        }
        nft_load_balancer_elements(sp, &mut out);
    }
    out
}

/// A LoadBalancer IP's elements: to the external chain, and to the firewall chain if
/// it has source ranges.
fn nft_load_balancer_elements(sp: &SvcPort, out: &mut String) {
    let Some(lb) = &sp.load_balancer else {
        return;
    };
    let (p, port) = (sp.proto_lower(), sp.port);
    let _ = writeln!(
        out,
        "add element {NFT_T} service-ips {{ {} . {p} . {port} : goto {} }}",
        lb.ip,
        nft_ext_chain(sp)
    );
    if sp.source_ranges().is_some() {
        let _ = writeln!(
            out,
            "add element {NFT_T} firewall-ips {{ {} . {p} . {port} : goto {} }}",
            lb.ip,
            nft_fw_chain(sp)
        );
    }
}

/// kube-proxy's nftables partial sync for one service port whose endpoints change.
pub fn nft_change(old: &SvcPort, new: &SvcPort) -> String {
    let mut out = format!("flush chain {NFT_T} {}\n", nft_svc_chain(new));
    if new.external() {
        let _ = writeln!(out, "flush chain {NFT_T} {}", nft_ext_chain(new));
    }
    if new.source_ranges().is_some() {
        let _ = writeln!(out, "flush chain {NFT_T} {}", nft_fw_chain(new));
    }
    let mut body = String::new();
    nft_service_rules(new, &mut body);
    // The service chain exists already: only its rules (and new endpoint chains) are added.
    for line in body.lines() {
        if line == format!("add chain {NFT_T} {}", nft_svc_chain(new)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
        let _ = writeln!(out, "delete chain {NFT_T} {}", nft_ep_chain(old, *ep));
    }
    out
}

/// A kube-proxy mode and how its rules are loaded.
#[derive(Clone, Copy, Debug)]
pub enum KubeProxy {
    IptablesNft,
    IptablesLegacy,
    Nftables,
}

impl KubeProxy {
    pub const ALL: [Self; 3] = [Self::IptablesNft, Self::IptablesLegacy, Self::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Self::IptablesNft => "iptables-nft",
            Self::IptablesLegacy => "iptables-legacy",
            Self::Nftables => "nftables",
        }
    }

    pub fn full(self, ports: &[SvcPort]) -> String {
        match self {
            Self::Nftables => nft_ruleset(ports),
            _ => iptables_restore(ports),
        }
    }

    pub fn change(self, old: &SvcPort, new: &SvcPort) -> String {
        match self {
            Self::Nftables => nft_change(old, new),
            _ => iptables_change(old, new),
        }
    }

    /// Loads `rules` in `netns` (`partial`: kube-proxy's --noflush partial sync).
    pub fn load(self, netns: &str, rules: &str, partial: bool) -> anyhow::Result<Duration> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]);
        match self {
            Self::IptablesNft => cmd.arg("iptables-nft-restore"),
            Self::IptablesLegacy => cmd.arg("iptables-legacy-restore"),
            Self::Nftables => cmd.args(["nft", "-f", "-"]),
        };
        if partial && !matches!(self, Self::Nftables) {
            cmd.arg("--noflush");
        }
        let start = Instant::now();
        crate::lab::run_with_input(&mut cmd, rules)
            .with_context(|| format!("{} rules did not load", self.name()))?;
        Ok(start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(eps: &[[u8; 4]]) -> SvcPort {
        SvcPort {
            name: "bench/svc-1".into(),
            port_name: "http".into(),
            ip: Ipv4Addr::new(10, 96, 0, 1),
            port: 80,
            proto: Proto::Tcp,
            target_port: 8080,
            endpoints: eps.iter().map(|e| Ipv4Addr::from(*e)).collect(),
            node_port: None,
            load_balancer: None,
        }
    }

    #[test]
    fn node_ports_go_through_an_external_chain_that_masquerades() {
        let np = SvcPort {
            node_port: Some(30080),
            ..sp(&[[10, 244, 1, 2], [10, 244, 2, 2]])
        };
        let rules = iptables_restore(&[sp(&[[10, 244, 3, 2]]), np.clone()]);
        let (ext, svc) = (ext_chain(&np), svc_chain(&np));
        assert_eq!(rules.matches(&format!(":{ext} - [0:0]")).count(), 1);
        assert!(rules.contains(&format!(
            "-A KUBE-NODEPORTS -m comment --comment bench/svc-1:http -m tcp -p tcp --dport 30080 -j {ext}"
        )));
        assert!(rules.contains(&format!("-A {ext} -j {svc}")));
        let masq = rules
            .lines()
            .position(|l| l.starts_with(&format!("-A {ext}")) && l.ends_with("KUBE-MARK-MASQ"));
        let jump = rules
            .lines()
            .position(|l| l == format!("-A {ext} -j {svc}"));
        assert!(
            masq.is_some() && masq < jump,
            "masquerade mark before the jump"
        );
        // Only the NodePort service has one.
        assert_eq!(rules.matches("-A KUBE-NODEPORTS").count(), 1);
        assert!(iptables_change(&np, &np).contains(&format!(":{ext} - [0:0]")));

        let nft = nft_ruleset(std::slice::from_ref(&np));
        let ext = nft_ext_chain(&np);
        assert!(ext.starts_with("external-"));
        assert!(nft.contains(&format!(
            "add element ip kube-proxy service-nodeports {{ tcp . 30080 : goto {ext} }}"
        )));
        assert!(nft.contains(&format!(
            "add rule ip kube-proxy {ext} jump mark-for-masquerade"
        )));
        assert!(nft.contains(&format!(
            "add rule ip kube-proxy {ext} goto {}",
            nft_svc_chain(&np)
        )));
        let change = nft_change(&np, &np);
        assert!(change.contains(&format!("flush chain ip kube-proxy {ext}")));
    }

    #[test]
    fn load_balancer_source_ranges_go_through_a_firewall_chain_and_drop_the_rest() {
        let lb = SvcPort {
            proto: Proto::Udp,
            node_port: Some(32001),
            load_balancer: Some(LoadBalancer {
                ip: Ipv4Addr::new(10, 200, 0, 1),
                source_ranges: vec!["192.168.77.100/32".into(), "203.0.113.0/24".into()],
            }),
            ..sp(&[[10, 244, 1, 2]])
        };
        let rules = iptables_restore(std::slice::from_ref(&lb));
        let (fw, ext) = (fw_chain(&lb), ext_chain(&lb));
        assert!(rules.contains(&format!(":{fw} - [0:0]")));
        assert!(rules.contains(&format!(
            "-A KUBE-SERVICES -m comment --comment \"bench/svc-1:http loadbalancer IP\" -m udp -p udp -d 10.200.0.1/32 --dport 80 -j {fw}"
        )));
        for cidr in ["192.168.77.100/32", "203.0.113.0/24"] {
            assert!(rules.contains(&format!(
                "-A {fw} -m comment --comment \"bench/svc-1:http loadbalancer IP\" -s {cidr} -j {ext}"
            )));
        }
        // What falls through is dropped in the filter table, forwarded or local.
        let filter = rules.split("*nat").next().unwrap();
        assert!(filter.contains(&format!(
            "-A KUBE-PROXY-FIREWALL -m comment --comment \"bench/svc-1:http traffic not accepted by {fw}\" -m udp -p udp -d 10.200.0.1/32 --dport 80 -j DROP"
        )));
        assert!(filter.contains("-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"));
        assert!(iptables_change(&lb, &lb).contains(&format!(":{fw} - [0:0]")));
        // Without ranges: straight to the external chain, no firewall.
        let open = SvcPort {
            load_balancer: Some(LoadBalancer {
                ip: Ipv4Addr::new(10, 200, 0, 2),
                source_ranges: vec![],
            }),
            ..lb.clone()
        };
        let rules = iptables_restore(std::slice::from_ref(&open));
        assert!(rules.contains(&format!("-d 10.200.0.2/32 --dport 80 -j {ext}")));
        assert!(!rules.contains("KUBE-FW-"));

        let nft = nft_ruleset(std::slice::from_ref(&lb));
        let fw = nft_fw_chain(&lb);
        assert!(fw.starts_with("firewall-"));
        assert!(nft.contains(&format!(
            "add rule ip kube-proxy {fw} ip saddr != {{ 192.168.77.100/32, 203.0.113.0/24 }} drop"
        )));
        assert!(nft.contains(&format!(
            "add element ip kube-proxy firewall-ips {{ 10.200.0.1 . udp . 80 : goto {fw} }}"
        )));
        assert!(nft.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.200.0.1 . udp . 80 : goto {} }}",
            nft_ext_chain(&lb)
        )));
        assert!(
            nft.contains(
                "add rule ip kube-proxy filter-prerouting ct state new jump firewall-check"
            )
        );
        assert!(nft_change(&lb, &lb).contains(&format!("flush chain ip kube-proxy {fw}")));
    }

    #[test]
    fn iptables_rules_have_kube_proxy_structure_and_probabilities() {
        let rules = iptables_restore(&[sp(&[[10, 244, 1, 2], [10, 244, 2, 2], [10, 244, 3, 2]])]);
        let svc = svc_chain(&sp(&[]));
        assert!(rules.contains(&format!(
            "-A KUBE-SERVICES -m comment --comment \"bench/svc-1:http cluster IP\" -m tcp -p tcp -d 10.96.0.1/32 --dport 80 -j {svc}"
        )));
        assert!(rules.contains("--probability 0.3333333333"));
        assert!(rules.contains("--probability 0.5000000000"));
        assert_eq!(rules.matches("-j DNAT --to-destination").count(), 3);
        assert_eq!(rules.matches("COMMIT").count(), 2);
        // The nodeports jump stays the last rule of KUBE-SERVICES.
        let last_services_rule = rules
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(last_services_rule.contains("KUBE-NODEPORTS"));
        let change = iptables_change(&sp(&[[10, 244, 1, 2]]), &sp(&[[10, 244, 2, 2]]));
        assert!(change.starts_with("*nat\n"));
        assert!(change.contains(&format!(
            "-X {}",
            sep_chain(&sp(&[]), [10, 244, 1, 2].into())
        )));
        assert!(change.contains("--to-destination 10.244.2.2:8080"));
    }

    #[test]
    fn nft_rules_map_service_to_chain_and_pick_with_numgen() {
        let rules = nft_ruleset(&[sp(&[[10, 244, 1, 2], [10, 244, 2, 2]])]);
        assert!(rules.contains(
            "add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 : goto service-"
        ));
        assert!(rules.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(rules.contains("dnat to 10.244.2.2:8080"));
        let change = nft_change(&sp(&[[10, 244, 1, 2]]), &sp(&[[10, 244, 2, 2]]));
        assert!(change.starts_with("flush chain ip kube-proxy service-"));
        assert!(change.contains("delete chain ip kube-proxy endpoint-"));
        assert!(!change.contains("add chain ip kube-proxy service-"));
    }

    #[test]
    fn chain_names_are_stable_and_distinct() {
        assert_eq!(chain_hash("a"), chain_hash("a"));
        assert_ne!(chain_hash("a"), chain_hash("b"));
        assert_eq!(chain_hash("x").len(), 16);
    }
}
