//! A cluster in network namespaces: an outside client and two (or more) nodes on one
//! LAN, each node a [`Lab`] with pods of its own, routes to the other nodes' pods through
//! their LAN addresses (as a flat, host-gateway pod network has them).
//!
//! ```text
//!  netns <prefix>-lan: bridge br0
//!    |-- client netns  eth0 192.168.77.100/24 fd00:77::100/64  (routes: the LAN only)
//!    |-- node 0 netns  eth0 192.168.77.1/24   fd00:77::1/64    pods 10.244.1-99.0/24    "n0-pod-<i>"
//!    |-- node 1 netns  eth0 192.168.77.2/24   fd00:77::2/64    pods 10.244.101-199.0/24 "n1-pod-<i>"
//!
//! (pods have IPv6 too: fd00:10:244:<subnet>::2, see the lab).
//! ```
//!
//! The client reaches the nodes' addresses and nothing else (no pod, no service range):
//! only what a node translates gets through.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::lab::{
    ChildGuard, Lab, LabSpec, Netns, ProbeOptions, ProbeReport, TransferReport, ip, place, run,
    unique_prefix, veth_pair,
};

/// A running `lb-lab transfer`.
pub struct Transfer(ChildGuard);

impl Transfer {
    /// Waits for the transfer's report.
    pub fn finish(self) -> anyhow::Result<TransferReport> {
        crate::lab::json_report(self.0, "lb-lab transfer")
    }
}

/// The client's address on the LAN.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);

/// Node `k`'s address on the LAN.
pub const fn node_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, k as u8 + 1)
}

/// The client's IPv6 address on the LAN.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);

/// Node `k`'s IPv6 address on the LAN.
pub const fn node_ip6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, k as u16 + 1)
}

pub struct Cluster {
    pub prefix: String,
    pub client: Netns,
    /// A client behind a router (see [`Cluster::add_far_client`]): (router, client).
    pub far: Option<(Netns, Netns)>,
    pub nodes: Vec<Lab>,
    /// The LAN ports' XDP programs (see [`Cluster::accept_xdp`]), attached while open.
    xdp_links: Vec<std::os::fd::OwnedFd>,
    /// Last: the LAN goes when nothing uses it.
    pub lan: Netns,
}

/// The far client's address, behind the router.
pub const FAR_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

impl Cluster {
    /// `nodes` nodes with `pods` pods each, every pod's server answering "NAME from PEER".
    pub fn new(
        lab_bin: &Path,
        tag: &str,
        nodes: usize,
        pods: usize,
        port: u16,
    ) -> anyhow::Result<Self> {
        if nodes == 0 || nodes > 2 || pods == 0 || pods > 99 {
            bail!("a cluster lab has 1 or 2 nodes of 1 to 99 pods");
        }
        let prefix = unique_prefix(tag);
        let lan = Netns::create(&format!("{prefix}-lan"))?;
        ip(&["-n", &lan.name, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lan.name, "link", "set", "br0", "up"])?;
        let client = Netns::create(&format!("{prefix}-client"))?;
        join_lan(&lan, &client, "pc", CLIENT_IP, CLIENT_IP6)?;
        let mut labs = Vec::new();
        for k in 0..nodes {
            let pod_prefix = format!("n{k}-");
            let lab = Lab::build(
                lab_bin,
                &LabSpec {
                    server_args: &["--say-peer"],
                    pod_prefix: &pod_prefix,
                    first_subnet: 100 * k + 1,
                    ..LabSpec::new(&format!("{tag}{k}"), pods, port)
                },
            )?;
            join_lan(&lan, &lab.node, &format!("pn{k}"), node_ip(k), node_ip6(k))?;
            for setting in [
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
            ] {
                lab.node.sysctl(setting)?;
            }
            real_node_rules(&lab.node)?;
            labs.push(lab);
        }
        // Each node routes the other nodes' pod subnets through their LAN address.
        for (k, lab) in labs.iter().enumerate() {
            for (j, other) in labs.iter().enumerate().filter(|(j, _)| *j != k) {
                for pod in &other.pods {
                    let [a, b, c, _] = pod.ip.octets();
                    let net6 = pod.ip6.segments();
                    ip(&[
                        "-n",
                        &lab.node.name,
                        "route",
                        "add",
                        &format!("{a}.{b}.{c}.0/24"),
                        "via",
                        &node_ip(j).to_string(),
                        "dev",
                        "eth0",
                    ])?;
                    ip(&[
                        "-n",
                        &lab.node.name,
                        "-6",
                        "route",
                        "add",
                        &format!(
                            "{:x}:{:x}:{:x}:{:x}::/64",
                            net6[0], net6[1], net6[2], net6[3]
                        ),
                        "via",
                        &node_ip6(j).to_string(),
                        "dev",
                        "eth0",
                    ])?;
                }
            }
        }
        Ok(Self {
            prefix,
            client,
            far: None,
            nodes: labs,
            xdp_links: Vec::new(),
            lan,
        })
    }

    /// Lets the nodes' XDP programs send frames back onto the LAN (`XDP_TX`, or a
    /// redirect to the LAN interface): each node's LAN port gets an XDP program that
    /// passes everything ([`crate::xdp_pass`]; a veth whose peer sends with `XDP_TX`
    /// takes the frames in only with a program of its own). The ports also checksum what
    /// they pass to a node in full (transmit checksum offload off), as frames from a real
    /// wire are: a veth otherwise hands on the sender's partial checksum, which XDP (no
    /// skb, no checksum state) cannot update.
    pub fn accept_xdp(&mut self) -> anyhow::Result<()> {
        for k in 0..self.nodes.len() {
            let port = format!("pn{k}");
            run(Command::new("ip").args([
                "netns",
                "exec",
                &self.lan.name,
                "ethtool",
                "-K",
                &port,
                "tx",
                "off",
            ]))
            .with_context(|| format!("checksum offload off at {port}"))?;
            self.xdp_links
                .push(crate::xdp_pass::attach(&self.lan, &port)?);
        }
        Ok(())
    }

    /// A second client, 10.99.0.2, behind a router (192.168.77.254 on the LAN) whose way
    /// to it has a path MTU of `mtu` that neither end knows: the router answers bigger
    /// packets towards the client with fragmentation-needed, sent to their source.
    pub fn add_far_client(&mut self, mtu: u16) -> anyhow::Result<()> {
        let router = Netns::create(&format!("{}-rt", self.prefix))?;
        router.sysctl("net.ipv4.ip_forward=1")?;
        join_lan(
            &self.lan,
            &router,
            "prt",
            Ipv4Addr::new(192, 168, 77, 254),
            Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0xfe),
        )?;
        let far = Netns::create(&format!("{}-far", self.prefix))?;
        veth_pair(&router.name, "eth1", &far.name, "eth0")?;
        for (ns, dev, addr) in [
            (&router, "eth1", "10.99.0.1/24"),
            (&far, "eth0", "10.99.0.2/24"),
        ] {
            ip(&["-n", &ns.name, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
        }
        // The narrow path is a route's MTU: both interfaces stay at 1500, so the client
        // advertises the full MSS and its own packets pass.
        ip(&[
            "-n",
            &router.name,
            "route",
            "replace",
            "10.99.0.0/24",
            "dev",
            "eth1",
            "mtu",
            "lock",
            &mtu.to_string(),
        ])?;
        ip(&[
            "-n",
            &far.name,
            "route",
            "add",
            "default",
            "via",
            "10.99.0.1",
        ])?;
        for node in &self.nodes {
            ip(&[
                "-n",
                &node.node.name,
                "route",
                "add",
                "10.99.0.0/24",
                "via",
                "192.168.77.254",
            ])?;
        }
        self.far = Some((router, far));
        Ok(())
    }

    /// Runs `lab_bin probe` from the outside client.
    pub fn probe(&self, opts: &ProbeOptions) -> anyhow::Result<ProbeReport> {
        self.nodes[0].probe_from(opts, &self.client, false)
    }

    /// `lb-lab transfer` from the outside client, started now; [`Transfer::finish`]
    /// waits for its report.
    pub fn start_transfer(
        &self,
        target: SocketAddr,
        bytes: u64,
        pause: Duration,
    ) -> anyhow::Result<Transfer> {
        self.start_transfer_from(&self.client, target, bytes, pause)
    }

    /// [`Cluster::start_transfer`] from another namespace (the far client's).
    pub fn start_transfer_from(
        &self,
        from: &Netns,
        target: SocketAddr,
        bytes: u64,
        pause: Duration,
    ) -> anyhow::Result<Transfer> {
        start_transfer(&self.nodes[0].lab_bin, from, target, bytes, pause)
    }

    /// `lb-lab http-get` from the outside client: the status code and the body.
    pub fn http_get(&self, target: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        let mut cmd = Command::new(&self.nodes[0].lab_bin);
        cmd.args(["http-get", "--target", &target.to_string(), "--path", path]);
        place(&mut cmd, &self.client, None)?;
        let out = run(&mut cmd)?;
        let (code, body) = out.trim().split_once(' ').unwrap_or((out.trim(), ""));
        Ok((code.parse().context("http-get's status")?, body.to_string()))
    }

    /// A second LAN between the nodes, 10.78.0.0/24 (node `k` at 10.78.0.<k+1> on its
    /// `eth1`), which the nodes' routes to each other's pods now take: the way to a
    /// backend on another node leaves by another interface than the client's (a node
    /// with a NIC for the cluster network). Node 1 is then reachable by its pod routes
    /// only over this LAN: its `eth0` address is removed.
    pub fn add_second_lan(&mut self) -> anyhow::Result<Netns> {
        let lan = Netns::create(&format!("{}-lan2", self.prefix))?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        for (k, node) in self.nodes.iter().enumerate() {
            let port = format!("pm{k}");
            veth_pair(&lan.name, &port, &node.node.name, "eth1")?;
            lan.ip(&["link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("10.78.0.{}/24", k + 1);
            node.node.ip(&["addr", "add", &addr, "dev", "eth1"])?;
            node.node.ip(&["link", "set", "eth1", "up"])?;
            node.node.sysctl("net.ipv4.conf.eth1.rp_filter=0")?;
        }
        for (k, lab) in self.nodes.iter().enumerate() {
            for (j, other) in self.nodes.iter().enumerate().filter(|(j, _)| *j != k) {
                for pod in &other.pods {
                    let [a, b, c, _] = pod.ip.octets();
                    let via = format!("10.78.0.{}", j + 1);
                    lab.node.ip(&[
                        "route",
                        "replace",
                        &format!("{a}.{b}.{c}.0/24"),
                        "via",
                        &via,
                        "dev",
                        "eth1",
                    ])?;
                }
            }
        }
        let n1 = &self.nodes[1].node;
        n1.ip(&["addr", "del", &format!("{}/24", node_ip(1)), "dev", "eth0"])?;
        Ok(lan)
    }

    /// Puts a FORWARD rule that drops every packet to `pod` first on node `k`: what an
    /// iptables-based NetworkPolicy engine writes to isolate a pod.
    pub fn drop_forwarded_to(&self, k: usize, pod: Ipv4Addr) -> anyhow::Result<()> {
        let rule = format!("*filter\n-I FORWARD -d {pod}/32 -j DROP\nCOMMIT\n");
        restore(&self.nodes[k].node, "iptables-nft-restore", &rule)
    }

    /// The packets that [`Cluster::drop_forwarded_to`]'s rule for `pod` dropped on node `k`.
    pub fn forward_drops_to(&self, k: usize, pod: Ipv4Addr) -> anyhow::Result<u64> {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.nodes[k].node.name,
            "iptables-nft",
            "-L",
            "FORWARD",
            "-v",
            "-x",
            "-n",
        ]))?;
        // "pkts bytes target prot opt in out source destination"
        let dst = pod.to_string();
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() >= 9 && f[2] == "DROP" && f[8] == dst)
            .and_then(|f| f[0].parse().ok())
            .with_context(|| format!("no FORWARD drop rule for {pod} on node {k}:\n{out}"))
    }

    /// Routes `addr` (an externalIP or LoadBalancer IP) from the client through node `k`,
    /// as a router or a load balancer in front of the cluster would.
    pub fn route_via(&self, addr: Ipv4Addr, k: usize) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.client.name,
            "route",
            "add",
            &format!("{addr}/32"),
            "via",
            &node_ip(k).to_string(),
        ])
    }
}

/// The pod network of every node (IPv4, IPv6): what the CNI's rules below name.
pub const POD_CIDR: &str = "10.244.0.0/16";
pub const POD_CIDR6: &str = "fd00:10:244::/48";

/// What a real node's netfilter carries besides the load balancer, loaded into every
/// node of a cluster lab: the CNI's masquerade of pod traffic that leaves the pod network
/// (flannel, Calico `natOutgoing`, ip-masq-agent, AWS-SNAT), kube-proxy's (and Docker's,
/// Calico's) drop of conntrack-INVALID packets in FORWARD, and a FORWARD policy of DROP
/// with an ACCEPT for the pod network (as Docker leaves it). The same for IPv6.
pub const REAL_NODE_RULES: &str = "\
*nat
-A POSTROUTING -s {pods} ! -d {pods} -j MASQUERADE
COMMIT
*filter
:FORWARD DROP [0:0]
-A FORWARD -m conntrack --ctstate INVALID -j DROP
-A FORWARD -s {pods} -j ACCEPT
-A FORWARD -d {pods} -j ACCEPT
COMMIT
";

/// Loads [`REAL_NODE_RULES`] into `node` (iptables and ip6tables, nf_tables backend).
pub fn real_node_rules(node: &Netns) -> anyhow::Result<()> {
    for (cmd, pods) in [
        ("iptables-nft-restore", POD_CIDR),
        ("ip6tables-nft-restore", POD_CIDR6),
    ] {
        restore(node, cmd, &REAL_NODE_RULES.replace("{pods}", pods))?;
    }
    Ok(())
}

/// `ip netns exec NODE CMD --noflush` with `rules` on its input.
pub fn restore(node: &Netns, cmd: &str, rules: &str) -> anyhow::Result<()> {
    crate::lab::run_with_input(
        Command::new("ip").args(["netns", "exec", &node.name, cmd, "--noflush"]),
        rules,
    )
}

/// `lab_bin transfer` from `from`, started now; [`Transfer::finish`] waits for its report.
pub fn start_transfer(
    lab_bin: &Path,
    from: &Netns,
    target: SocketAddr,
    bytes: u64,
    pause: Duration,
) -> anyhow::Result<Transfer> {
    let mut cmd = Command::new(lab_bin);
    cmd.args(["transfer", "--target", &target.to_string()])
        .args(["--bytes", &bytes.to_string()])
        .args(["--pause-ms", &pause.as_millis().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null());
    place(&mut cmd, from, None)?;
    Ok(Transfer(ChildGuard(
        cmd.spawn().context("starting lb-lab transfer")?,
    )))
}

/// A veth from `member`'s `eth0` (with `addr`/24 and `addr6`/64) to the LAN's bridge
/// (port `port`).
pub(crate) fn join_lan(
    lan: &Netns,
    member: &Netns,
    port: &str,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
) -> anyhow::Result<()> {
    veth_pair(&lan.name, port, &member.name, "eth0")?;
    ip(&["-n", &lan.name, "link", "set", port, "master", "br0", "up"])?;
    ip(&[
        "-n",
        &member.name,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    // nodad: usable at once.
    ip(&[
        "-n",
        &member.name,
        "addr",
        "add",
        &format!("{addr6}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ip(&["-n", &member.name, "link", "set", "eth0", "up"])
}
