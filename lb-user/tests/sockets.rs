//! Sockets translated to a backend that leaves its service are closed (SOCK_DESTROY):
//! a TCP connection and a connected UDP socket to a ClusterIP see an error and a new
//! connection reaches a live backend; a UDP socket connected to the pod directly is not
//! touched; a Service annotated to keep its sockets keeps them. Needs root.

mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use common::{Fixture, POD_PORT, WEB_IP, lab_bin};
use lb_lab::client_pods::ClientPod;
use lb_lab::{
    lab::{self, ChildGuard, place},
    load::Held,
};

/// A Service with a TCP and a UDP port 80.
fn service(keep_sockets: bool) -> String {
    let annotations = if keep_sockets {
        ", annotations: {lb-user.dev/keep-sockets: 'true'}"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: t{annotations}}}\n\
         spec:\n  clusterIP: {WEB_IP}\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP}}\n  \
         - {{name: udp, port: 80, protocol: UDP}}\n"
    )
}

fn slice(pods: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-a\n  \
         namespace: t\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\n\
         ports: [{{name: tcp, port: {POD_PORT}, protocol: TCP}}, {{name: udp, port: {POD_PORT}, protocol: UDP}}]\nendpoints:\n"
    );
    for ip in pods {
        s.push_str(&format!("- addresses: [{ip}]\n"));
    }
    s
}

/// `lb-lab hold` in the lab's node namespace and cgroup.
struct Hold {
    child: ChildGuard,
    reader: BufReader<std::process::ChildStdout>,
}

impl Hold {
    fn start(fx: &Fixture, direct: SocketAddr) -> (Self, Held) {
        let mut cmd = Command::new(lab_bin());
        cmd.args(["hold", "--service", &format!("{WEB_IP}:80")])
            .args(["--direct", &direct.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        place(&mut cmd, &fx.lab.node, Some(&fx.lab.cgroup)).unwrap();
        let mut child = ChildGuard(cmd.spawn().expect("starting lb-lab hold"));
        let reader = BufReader::new(child.0.stdout.take().expect("piped"));
        let mut hold = Self { child, reader };
        let first = hold.report();
        (hold, first)
    }

    fn report(&mut self) -> Held {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("lb-lab hold said {line:?}: {e}"))
    }

    /// Asks for the errors the sockets give now (each waits up to 3 s for one).
    fn check(&mut self) -> Held {
        let stdin = self.child.0.stdin.as_mut().expect("piped");
        writeln!(stdin, "check").unwrap();
        stdin.flush().unwrap();
        self.report()
    }
}

fn pod_index(name: &str) -> usize {
    name.trim_start_matches("pod-").parse().unwrap()
}

/// A fixture with four pods behind the TCP and UDP service, answering; the agent runs
/// with exactly the DaemonSet's capabilities, and `args`.
fn fixture(tag: &str, keep_sockets: bool, args: &[&str]) -> Fixture {
    let args: Vec<&str> = ["--poll-interval-ms", "20"]
        .iter()
        .chain(args)
        .copied()
        .collect();
    let fx = Fixture::as_daemonset(tag, 4, &[("web.yaml", service(keep_sockets))], &args);
    fx.write("web-slice.yaml", &slice(&fx.pod_ips(&[0, 1, 2, 3])));
    fx.wait_answering(SocketAddr::new(WEB_IP.into(), 80), lab::ProbeMode::Tcp);
    fx
}

/// Removes from the slice the pods that the held sockets use and pod 0 (the direct
/// socket's); returns the pods kept.
fn remove_used(fx: &Fixture, held: &Held) -> Vec<usize> {
    let used: BTreeSet<usize> = [pod_index(&held.tcp), pod_index(&held.udp), 0].into();
    let kept: Vec<usize> = (0..4).filter(|i| !used.contains(i)).collect();
    fx.write("web-slice.yaml", &slice(&fx.pod_ips(&kept)));
    kept
}

#[test]
fn sockets_to_a_backend_that_leaves_see_an_error_and_direct_ones_do_not() {
    let fx = fixture("sockd", false, &[]);
    let direct = SocketAddr::new(fx.pod_ips(&[0])[0].into(), POD_PORT);
    let (mut hold, held) = Hold::start(&fx, direct);
    assert_eq!(held.direct, "pod-0");
    let kept = remove_used(&fx, &held);
    let after = hold.check();
    assert_eq!(
        (after.tcp_error.as_str(), after.udp_error.as_str()),
        ("ConnectionAborted", "ConnectionAborted"),
        "{after:?}\n{}",
        fx.agent.log()
    );
    assert_eq!(after.direct_error, "none", "the direct socket is untouched");
    assert_eq!(after.direct_after, "pod-0", "and still talks to its pod");
    // A new connection reaches a backend that stayed.
    let report = fx.probe(WEB_IP, 10);
    let names: BTreeSet<usize> = report.replies.keys().map(|n| pod_index(n)).collect();
    assert!(
        !names.is_empty() && names.iter().all(|i| kept.contains(i)),
        "{report:?}"
    );
    let log = fx.agent.log();
    assert!(
        log.contains("closed the sockets translated to backends that left their service"),
        "{log}"
    );
}

#[test]
fn a_service_annotated_to_keep_its_sockets_keeps_them() {
    let fx = fixture("sockk", true, &[]);
    let direct = SocketAddr::new(fx.pod_ips(&[0])[0].into(), POD_PORT);
    let (mut hold, held) = Hold::start(&fx, direct);
    remove_used(&fx, &held);
    // The removal is programmed before the sockets are asked.
    lab::wait_for(Duration::from_secs(5), || {
        let r = fx.probe(WEB_IP, 40);
        (r.total_replies() == 40).then_some(())?;
        r.replies
            .keys()
            .all(|n| ![pod_index(&held.tcp), pod_index(&held.udp), 0].contains(&pod_index(n)))
            .then_some(())
    })
    .expect("the slice change reaches the datapath");
    let after = hold.check();
    assert_ne!(after.tcp_error, "ConnectionAborted", "{after:?}");
    assert_eq!(after.udp_error, "none", "{after:?}");
}

/// The socket level's per-socket map entries, from the agent's pins.
fn socket_entries(fx: &Fixture) -> usize {
    lb_user::datapath::count_socket_entries(&fx.agent.pin_path)
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn long_lived_sockets_keep_their_rev_nat_entries_through_many_short_connections() {
    // The smallest socket rev-NAT map: short connections twice its size would push
    // every older entry out if closed sockets left theirs behind.
    let fx = fixture("sockl", false, &["--max-sock-revnat", "1024"]);
    let direct = SocketAddr::new(fx.pod_ips(&[0])[0].into(), POD_PORT);
    let (mut hold, held) = Hold::start(&fx, direct);
    let service = SocketAddr::new(WEB_IP.into(), 80);
    let mut udp = fx.lab.udp_socket(service).unwrap();
    let queued = udp.ask("queue").unwrap();
    assert_eq!(queued.total_errors(), 0, "{queued:?}");
    let before = socket_entries(&fx);
    // 2048 connections, each closed after getpeername() checked the service address.
    let short = fx.probe(WEB_IP, 2048);
    assert_eq!(short.total_replies(), 2048, "{short:?}");
    let after = socket_entries(&fx);
    assert!(
        after <= before + 8,
        "closed sockets' entries are gone: {before} before, {after} after"
    );
    // The queued reply still comes from the service address.
    let read = udp.ask("read").unwrap();
    assert_eq!(read.total_replies(), 1, "{read:?}");
    assert_eq!(read.total_errors(), 0, "{read:?}");
    // And the held sockets are still found and closed when their backends leave.
    remove_used(&fx, &held);
    let closed = hold.check();
    assert_eq!(
        (closed.tcp_error.as_str(), closed.udp_error.as_str()),
        ("ConnectionAborted", "ConnectionAborted"),
        "{closed:?}\n{}",
        fx.agent.log()
    );
}

#[test]
fn a_service_deleted_while_the_agent_was_down_keeps_its_sockets_if_annotated() {
    let mut fx = fixture("sockg", true, &[]);
    let direct = SocketAddr::new(fx.pod_ips(&[0])[0].into(), POD_PORT);
    let (mut hold, _) = Hold::start(&fx, direct);
    // The agent is killed at once; the Service goes 300 ms later, while it is down; it
    // starts again after 1 s and finds the Service's frontends only in the maps.
    let manifests = fx.dir.join("manifests");
    let remover = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        for f in ["web.yaml", "web-slice.yaml"] {
            std::fs::remove_file(manifests.join(f)).unwrap();
        }
    });
    let log = fx.dir.join("agent-2.log");
    fx.agent
        .restart(lab::Stop::Kill, Duration::from_secs(1), &[], &log)
        .unwrap();
    remover.join().unwrap();
    fx.agent.wait_synced(1, Duration::from_secs(20)).unwrap();
    let r = fx.probe(WEB_IP, 1);
    assert_eq!(r.total_replies(), 0, "the Service is gone: {r:?}");
    let after = hold.check();
    assert_ne!(after.tcp_error, "ConnectionAborted", "{after:?}");
    assert_eq!(after.udp_error, "none", "{after:?}");
}

/// The value of the metric line that starts with `name` (0 if absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn sockets_in_many_pods_are_closed_over_passes_each_entering_a_namespace_once() {
    // Passes short enough to enter one namespace each: the rest wait for the next pass.
    let port = common::free_port();
    let metrics_bind = format!("127.0.0.1:{port}");
    let fx = fixture(
        "sockm",
        false,
        &[
            "--socket-closer-budget",
            "1ms",
            "--metrics-bind-address",
            &metrics_bind,
        ],
    );
    // The service at one pod (in the datapath before the sockets connect), which then
    // leaves.
    fx.write("web-slice.yaml", &slice(&fx.pod_ips(&[0])));
    // 40 connections in a row to pod 0: four pods would give that once in 4^39 tries.
    lab::wait_for(Duration::from_secs(5), || {
        let r = fx.probe(WEB_IP, 40);
        (r.replies.get("pod-0") == Some(&40)).then_some(())
    })
    .expect("the service at pod 0 only");
    let service = SocketAddr::new(WEB_IP.into(), 80);
    let (pods, per_pod) = (4, 25);
    let mut clients: Vec<ClientPod> = (0..pods)
        .map(|i| {
            ClientPod::start(
                &lab_bin(),
                &fx.lab.prefix,
                &fx.lab.cgroup,
                i,
                service,
                per_pod,
            )
            .unwrap()
        })
        .collect();
    let before = common::http_get(port, "/metrics");
    fx.write("web-slice.yaml", &slice(&fx.pod_ips(&[1])));
    let mut closed = vec![0; pods];
    let all = lab::wait_for(Duration::from_secs(20), || {
        for (n, c) in closed.iter_mut().zip(&mut clients) {
            *n = c.check().unwrap().aborted;
        }
        closed.iter().all(|&n| n == per_pod).then_some(())
    });
    assert!(all.is_some(), "closed {closed:?}\n{}", fx.agent.log());
    // The pass's counters are recorded once its sockets are closed: wait for them.
    let destroyed = |text: &str| {
        metric(text, "lb_sockets_destroyed_total ") - metric(&before, "lb_sockets_destroyed_total ")
    };
    let after = lab::wait_for(Duration::from_secs(5), || {
        let text = common::http_get(port, "/metrics");
        (destroyed(&text) >= (pods * per_pod) as f64).then_some(text)
    })
    .unwrap_or_else(|| common::http_get(port, "/metrics"));
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    assert_eq!(destroyed(&after), (pods * per_pod) as f64, "{after}");
    // At least one pass ran out of time and the next went on with the namespaces left;
    // each namespace was entered once for these pairs.
    assert!(
        delta("lb_socket_closer_passes_total{result=\"out_of_time\"} ") >= 1.0,
        "{after}"
    );
    let entered = delta("lb_socket_closer_namespaces_total{result=\"entered\"} ");
    assert!(
        (pods as f64..=pods as f64 + 1.0).contains(&entered),
        "{pods} pods' namespaces (and the node's) entered once: {entered}\n{after}"
    );
    assert!(delta("lb_socket_closer_sockets_scanned_total ") >= (pods * per_pod) as f64);
    assert!(
        delta("lb_socket_closer_cpu_seconds_total ") > 0.0,
        "{after}"
    );
}
