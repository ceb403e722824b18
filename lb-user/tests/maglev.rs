//! Maglev for external traffic (`--lb-algorithm maglev`), with real traffic: an outside
//! client, two nodes on a LAN each with its own agent, and pods behind both. Every
//! flow's backend is checked against the one the Maglev table computed here names (the
//! same table and 5-tuple hash as the agent and the programs). Needs root.

mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{AGENT_BIN, POD_PORT, packet_cluster, sync_timeout, write_atomic};
use lb_lab::{
    cluster::{CLIENT_IP, Cluster, node_ip},
    lab::{AgentProcess, ProbeMode, ProbeOptions},
};

/// The LoadBalancer IP of the service, routed by the client to one node or the other.
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// The service's UDP port.
const UDP_PORT: u16 = 53;
const NODE_PORT: u16 = 30080;

/// A cluster lab (two nodes, `pods` pods each) with an agent per node in maglev mode.
struct Fixture {
    agents: Vec<AgentProcess>,
    cluster: Cluster,
    dir: PathBuf,
}

impl Fixture {
    /// The lab with a LoadBalancer service over `on` (node, pod) pairs; the client's
    /// route to the LoadBalancer IP goes by node 0.
    fn new(tag: &str, pods: usize, on: &[(usize, usize)]) -> Self {
        let acceleration = common::acceleration();
        let cluster = packet_cluster(tag, pods, acceleration.as_deref());
        let dir = std::env::temp_dir().join(&cluster.prefix);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        let mut fx = Self {
            agents: Vec::new(),
            cluster,
            dir,
        };
        fx.write_service(on);
        for k in 0..fx.cluster.nodes.len() {
            let agent = fx.start_agent(k, acceleration.as_deref(), "");
            fx.agents.push(agent);
        }
        for a in &mut fx.agents {
            a.wait_synced(1, sync_timeout()).expect("agent ready");
        }
        fx.cluster.route_via(LB_IP, 0).unwrap();
        fx
    }

    /// Node `k`'s agent (its log file named with `log_suffix`).
    fn start_agent(&self, k: usize, acceleration: Option<&str>, log_suffix: &str) -> AgentProcess {
        let node = &self.cluster.nodes[k];
        let manifests = self.dir.join("manifests");
        let (name, ip) = (format!("node-{k}"), node_ip(k).to_string());
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--manifests".as_ref(),
            manifests.as_os_str(),
            "--hostname-override".as_ref(),
            name.as_ref(),
            "--node-ip".as_ref(),
            ip.as_ref(),
            "--lb-algorithm".as_ref(),
            "maglev".as_ref(),
        ];
        if let Some(mode) = acceleration {
            args.extend(["--acceleration".as_ref(), std::ffi::OsStr::new(mode)]);
        }
        let pin = self.pin_path(k);
        let log = self.dir.join(format!("agent-{k}{log_suffix}.log"));
        AgentProcess::start_in(
            Some(&node.node),
            Path::new(AGENT_BIN),
            &args,
            &node.cgroup.path,
            &pin,
            &log,
        )
        .expect("starting an agent")
    }

    /// Writes the service with the endpoints `on` ((node, pod) pairs).
    fn write_service(&self, on: &[(usize, usize)]) {
        let mut endpoints = String::new();
        for &(k, i) in on {
            endpoints.push_str(&format!(
                "- addresses: [{}]\n  nodeName: node-{k}\n  conditions: {{ready: true}}\n",
                self.cluster.nodes[k].pods[i].ip
            ));
        }
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: t}}\n\
             spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.50\n  ports:\n  \
             - {{name: dns, port: {UDP_PORT}, targetPort: {POD_PORT}, nodePort: {NODE_PORT}, protocol: UDP}}\n\
             status: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-a\n  \
             namespace: t\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\n\
             ports: [{{name: dns, port: {POD_PORT}, protocol: UDP}}]\nendpoints:\n{endpoints}"
        );
        write_atomic(&self.dir.join("manifests/all.yaml"), &yaml);
    }

    /// The client's route to the LoadBalancer IP goes by node `k` from now on.
    fn route_via(&self, k: usize) {
        let out = Command::new("ip")
            .args(["-n", &self.cluster.client.name, "route", "replace"])
            .arg(format!("{LB_IP}/32"))
            .args(["via", &node_ip(k).to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    /// One UDP flow from each of `ports` to the LoadBalancer IP: the pod that answered
    /// each (a flow without an answer is a failure).
    fn flows(&self, ports: &[u16]) -> BTreeMap<u16, String> {
        let target = SocketAddr::from(SocketAddrV4::new(LB_IP, UDP_PORT));
        // Eight probes at a time: the flows are independent.
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let workers: Vec<_> = ports
                .chunks(ports.len().div_ceil(8).max(1))
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|&port| (port, self.one_flow(target, port)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("a probe thread"))
                .collect()
        });
        answers.into_iter().collect()
    }

    /// The pod that answers a datagram from source port `port` (two tries: the first
    /// datagram of a run may wait on neighbour resolution past the timeout).
    fn one_flow(&self, target: SocketAddr, port: u16) -> String {
        let opts = ProbeOptions {
            timeout: Duration::from_millis(1000),
            source_port: port,
            ..ProbeOptions::tcp(target, 1).with_mode(ProbeMode::UdpFlow)
        };
        let mut last = None;
        for _ in 0..2 {
            let report = self
                .cluster
                .probe(&opts)
                .unwrap_or_else(|e| panic!("probe from port {port}: {e:#}"));
            if let Some(reply) = report.replies.keys().next() {
                return reply.split(" from ").next().unwrap_or(reply).to_string();
            }
            last = Some(report);
        }
        panic!("no answer to the flow from port {port}: {last:?}");
    }

    /// The pod that the Maglev table over the pods `on` names for the flow from `port`,
    /// computed as the agent builds the table and the programs hash the flow.
    fn predicted(&self, on: &[(usize, usize)], port: u16) -> String {
        let pods: Vec<&lb_lab::lab::Pod> = on
            .iter()
            .map(|&(k, i)| &self.cluster.nodes[k].pods[i])
            .collect();
        let backends: Vec<lb_core::maglev::Backend> = pods
            .iter()
            .map(|p| lb_core::maglev::Backend {
                addr: p.ip.into(),
                port: POD_PORT,
            })
            .collect();
        let table = lb_core::maglev::table(&backends, lb_core::maglev::DEFAULT_TABLE_SIZE);
        let hash = lb_common::flow_hash(
            &lb_common::v4_mapped(CLIENT_IP.octets()),
            &lb_common::v4_mapped(LB_IP.octets()),
            port,
            UDP_PORT,
            lb_common::PROTO_UDP,
        );
        let entry = table[(hash % lb_core::maglev::DEFAULT_TABLE_SIZE) as usize];
        pods[entry as usize].name.clone()
    }

    fn predicted_all(&self, on: &[(usize, usize)], ports: &[u16]) -> BTreeMap<u16, String> {
        ports.iter().map(|&p| (p, self.predicted(on, p))).collect()
    }

    /// Writes the service with the endpoints `on` and waits until both agents synced it.
    fn change_service(&mut self, on: &[(usize, usize)], syncs: usize) {
        self.write_service(on);
        for a in &mut self.agents {
            a.wait_synced(syncs, sync_timeout())
                .expect("the change synced");
        }
    }

    /// Where node `k`'s agent pins its maps.
    fn pin_path(&self, k: usize) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.cluster.nodes[k].prefix))
    }

    /// Deletes every connection-tracking entry of node `k` (whether its agent runs or
    /// not).
    fn flush_conntrack(&self, k: usize) {
        let pin = self.pin_path(k).join(lb_common::MAP_CT);
        let map = aya::maps::MapData::from_pin(&pin).expect("the pinned conntrack map");
        let mut ct: aya::maps::HashMap<_, lb_common::CtKey, lb_common::CtValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(map)).unwrap();
        let keys: Vec<lb_common::CtKey> = ct.keys().flatten().collect();
        assert!(!keys.is_empty(), "node {k} tracks no flow");
        for k in &keys {
            let _ = ct.remove(k);
        }
        assert_eq!(ct.keys().count(), 0);
    }

    /// What `lb-user dump --output json` says of node `k`'s Maglev tables (the count and
    /// memory) and of its frontends (each with its table's size).
    fn tables(&self, k: usize) -> (serde_json::Value, serde_json::Value) {
        let doc: serde_json::Value =
            serde_json::from_str(&self.dump(k, &["--output", "json"])).expect("JSON");
        (doc["maglev"].clone(), doc["frontends"].clone())
    }

    /// `lb-user dump` of node `k`'s agent.
    fn dump(&self, k: usize, args: &[&str]) -> String {
        let out = Command::new(AGENT_BIN)
            .arg("dump")
            .args(args)
            .arg("--pin-path")
            .arg(&self.agents[k].pin_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (k, a) in self.agents.iter().enumerate() {
                eprintln!("agent {k} log:\n{}", a.log());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every pod of both nodes: (node, pod) pairs.
fn all_pods(pods: usize) -> Vec<(usize, usize)> {
    (0..2)
        .flat_map(|k| (0..pods).map(move |i| (k, i)))
        .collect()
}

#[test]
fn two_nodes_choose_the_same_backend_for_the_same_flow() {
    let on = all_pods(2);
    let fx = Fixture::new("mg", 2, &on);
    let ports: Vec<u16> = (41_000..41_040).collect();
    let via0 = fx.flows(&ports);
    assert_eq!(via0, fx.predicted_all(&on, &ports), "through node 0");
    // Every backend got some of the flows (4 backends, 40 flows).
    let mut pods: Vec<&String> = via0.values().collect();
    pods.sort();
    pods.dedup();
    assert_eq!(pods.len(), 4, "{via0:?}");
    // The load balancer's way to the IP changes: node 1, which never saw these flows,
    // sends each to the same backend.
    fx.route_via(1);
    let via1 = fx.flows(&ports);
    assert_eq!(via1, via0, "through node 1");
    // Memory reported: the dump names the tables and their size.
    let dump = fx.dump(1, &[]);
    let line = dump
        .lines()
        .find(|l| l.starts_with("Maglev tables"))
        .unwrap_or_else(|| panic!("no Maglev line in:\n{dump}"));
    assert!(
        line.contains("16381 entries") && line.contains("KiB"),
        "{line}"
    );
}

#[test]
fn removing_one_of_four_backends_moves_about_a_quarter_of_the_flows() {
    let on = all_pods(2);
    let mut fx = Fixture::new("mr", 2, &on);
    let ports: Vec<u16> = (42_000..42_200).collect();
    let before = fx.flows(&ports);
    assert_eq!(before, fx.predicted_all(&on, &ports));
    let gone = fx.cluster.nodes[1].pods[1].name.clone();
    let kept: Vec<(usize, usize)> = on.iter().copied().filter(|&p| p != (1, 1)).collect();
    fx.change_service(&kept, 2);
    // Through node 0, which tracks every flow: the flows of the surviving backends stay
    // (their entries say so), those of the one gone start over on the new table.
    let again = fx.flows(&ports);
    let predicted = fx.predicted_all(&kept, &ports);
    for (port, pod) in &before {
        let want = if *pod == gone { &predicted[port] } else { pod };
        assert_eq!(&again[port], want, "the flow from port {port}");
    }
    // Through node 1, which tracks none of them: the table alone chooses.
    fx.route_via(1);
    let fresh = fx.flows(&ports);
    assert_eq!(fresh, predicted, "through node 1");
    let moved = ports.iter().filter(|p| fresh[p] != before[p]).count();
    let of_gone = ports.iter().filter(|p| before[p] == gone).count();
    let survivors_moved = moved - of_gone;
    eprintln!(
        "{moved} of {} flows moved: {of_gone} of the backend gone, {survivors_moved} of the others",
        ports.len()
    );
    // About 1/4 of the flows were the gone backend's, and they had to move; of the
    // others almost none moved (Maglev's minimal disruption, a few entries in a hundred).
    assert!(
        (25..=80).contains(&of_gone),
        "{of_gone} of 200 on the gone backend"
    );
    assert!(
        survivors_moved <= 10,
        "{survivors_moved} flows of surviving backends moved"
    );
}

#[test]
fn a_flow_whose_conntrack_entry_is_deleted_stays_on_its_backend() {
    let on = all_pods(2);
    let fx = Fixture::new("mc", 2, &on);
    let ports: Vec<u16> = (43_000..43_030).collect();
    let before = fx.flows(&ports);
    assert_eq!(before, fx.predicted_all(&on, &ports));
    // Node 0 loses every connection-tracking entry.
    fx.flush_conntrack(0);
    let after = fx.flows(&ports);
    assert_eq!(after, before);
}

#[test]
fn a_restarted_agent_keeps_the_tables_and_the_flows_their_backends() {
    let on = all_pods(2);
    let mut fx = Fixture::new("mk", 2, &on);
    let ports: Vec<u16> = (44_000..44_030).collect();
    let before = fx.flows(&ports);
    assert_eq!(before, fx.predicted_all(&on, &ports));
    // The first agent wrote the tables (and said so).
    assert!(
        fx.agents[0].log().contains("Maglev tables:"),
        "{}",
        fx.agents[0].log()
    );
    let tables = fx.tables(0);
    assert!(tables.0["tables"].as_u64().unwrap() > 0, "{tables:?}");
    fx.agents.remove(0).kill();
    // No agent on node 0: the pinned tables keep choosing, connection tracking lost.
    fx.flush_conntrack(0);
    assert_eq!(fx.flows(&ports), before, "with the agent down");
    let acceleration = std::env::var("LB_TEST_ACCELERATION")
        .ok()
        .filter(|a| !a.is_empty() && a != "off");
    let mut again = fx.start_agent(0, acceleration.as_deref(), "-restarted");
    again.wait_synced(1, sync_timeout()).unwrap();
    fx.agents.insert(0, again);
    // The restarted agent adopted the tables as they were: it wrote none.
    assert!(
        !fx.agents[0].log().contains("Maglev tables:"),
        "{}",
        fx.agents[0].log()
    );
    assert_eq!(fx.tables(0), tables);
    fx.flush_conntrack(0);
    assert_eq!(fx.flows(&ports), before, "after the restart");
}
