//! Socket-level translation beyond TCP connect(): UDP (connected and unconnected, with
//! replies that come back from the service address), a real DNS server and client,
//! getpeername(), refusal of UDP to a service without endpoints, and the counters.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::Duration,
};

use common::{AGENT_BIN, Fixture, WEB_IP, service, slice};
use lb_lab::lab::{self, ProbeMode, ProbeOptions};

const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 54);

/// A service with a UDP port `port` -> `target` (named "dns"), and its slice.
fn udp_service(name: &str, ip: Ipv4Addr, port: u16, target: u16, pods: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
         spec:\n  clusterIP: {ip}\n  ports:\n  - {{name: dns, port: {port}, protocol: UDP, targetPort: dns}}\n\
         \x20 - {{name: dns-tcp, port: {port}, protocol: TCP, targetPort: dns-tcp}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-a\n  namespace: t\n  \
         labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
         ports: [{{name: dns, port: {target}, protocol: UDP}}, {{name: dns-tcp, port: {target}, protocol: TCP}}]\nendpoints:\n"
    );
    if pods.is_empty() {
        s.push_str("[]\n");
    }
    for ip in pods {
        s.push_str(&format!("- addresses: [{ip}]\n"));
    }
    s
}

#[test]
fn udp_datagrams_are_balanced_and_replies_come_from_the_service() {
    let fx = Fixture::new("udp", 3, &[]);
    fx.write(
        "dns.yaml",
        &udp_service("udp", DNS_IP, 53, 8080, &fx.pod_ips(&[0, 1, 2])),
    );
    let target = SocketAddrV4::new(DNS_IP, 53);
    fx.wait_answering(target, ProbeMode::UdpSendto);
    for mode in [
        ProbeMode::UdpSendto,
        ProbeMode::UdpConnected,
        ProbeMode::Tcp,
    ] {
        let r = fx
            .lab
            .probe(&ProbeOptions::tcp(target, 90).with_mode(mode), true)
            .unwrap();
        // A reply from a backend address, or a getpeername() that shows the backend,
        // counts as an error in the probe.
        assert_eq!(r.total_errors(), 0, "{mode:?}: {r:?}");
        assert_eq!(r.total_replies(), 90, "{mode:?}: {r:?}");
        assert_eq!(r.replies.len(), 3, "{mode:?} reaches every pod: {r:?}");
    }
    let dump = lab::run(
        Command::new(AGENT_BIN)
            .arg("dump")
            .arg("--pin-path")
            .arg(&fx.agent.pin_path),
    )
    .unwrap();
    let translated = |prog: &str| -> u64 {
        let line = dump
            .lines()
            .find(|l| l.starts_with(prog))
            .unwrap_or_else(|| panic!("no counters for {prog}:\n{dump}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!(translated("sendmsg4") >= 90, "{dump}");
    assert!(translated("recvmsg4") >= 90, "{dump}");
    assert!(translated("connect4") >= 180, "{dump}");
    assert!(translated("getpeername4") >= 180, "{dump}");
}

#[test]
fn udp_to_a_service_without_endpoints_is_refused() {
    let fx = Fixture::new("udp-refuse", 1, &[]);
    fx.write("empty.yaml", &udp_service("empty", EMPTY_IP, 53, 8080, &[]));
    fx.write("web.yaml", &service("web", WEB_IP, 80));
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0])));
    fx.wait_answering(SocketAddrV4::new(WEB_IP, 80), ProbeMode::Tcp);
    let target = SocketAddrV4::new(EMPTY_IP, 53);
    for mode in [ProbeMode::UdpSendto, ProbeMode::UdpConnected] {
        let r = fx
            .lab
            .probe(&ProbeOptions::tcp(target, 5).with_mode(mode), true)
            .unwrap();
        assert_eq!(r.errors.get("ECONNREFUSED"), Some(&5), "{mode:?}: {r:?}");
    }
}

#[test]
fn a_real_dns_client_gets_answers_from_a_dns_service_over_udp_and_tcp() {
    let mut fx = Fixture::new("dns", 2, &[]);
    for i in 0..2 {
        // Each pod's DNS server answers whoami.test with an address naming the pod.
        let mut dnsmasq = Command::new("dnsmasq");
        dnsmasq.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--port=53",
            "--user=root",
            "--pid-file=",
            "--log-facility=-",
        ]);
        dnsmasq.arg(format!("--address=/whoami.test/192.0.2.{}", i + 1));
        dnsmasq.stdout(std::process::Stdio::null());
        dnsmasq.stderr(std::process::Stdio::null());
        fx.lab.spawn_in_pod(i, dnsmasq).unwrap();
    }
    fx.write(
        "dns.yaml",
        &udp_service("dns", DNS_IP, 53, 53, &fx.pod_ips(&[0, 1])),
    );
    let dig = |tcp: bool| -> anyhow::Result<String> {
        let mut cmd = Command::new("dig");
        cmd.args([
            "@10.96.0.53",
            "whoami.test",
            "+short",
            "+time=1",
            "+tries=1",
        ]);
        if tcp {
            cmd.arg("+tcp");
        }
        fx.lab.run_client(cmd).map(|s| s.trim().to_string())
    };
    let ready = lab::wait_for(Duration::from_secs(5), || {
        dig(false).ok().filter(|a| a.starts_with("192.0.2."))
    });
    assert!(ready.is_some(), "no DNS answer:\n{}", fx.agent.log());
    for tcp in [false, true] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let answer = dig(tcp).unwrap_or_else(|e| panic!("dig (tcp: {tcp}): {e:#}"));
            assert!(
                answer == "192.0.2.1" || answer == "192.0.2.2",
                "tcp: {tcp}: {answer:?}"
            );
            seen.insert(answer);
        }
        assert_eq!(seen.len(), 2, "tcp: {tcp}: both DNS pods answer");
    }
}

/// The one pod that answered every exchange of `r`, with no error.
fn only_pod(r: &lab::ProbeReport, count: usize) -> String {
    assert_eq!(r.total_errors(), 0, "{r:?}");
    assert_eq!(r.total_replies(), count, "{r:?}");
    assert_eq!(r.replies.len(), 1, "one socket, one pod: {r:?}");
    r.replies.keys().next().unwrap().clone()
}

#[test]
fn an_unconnected_udp_socket_keeps_its_backend_while_it_stays() {
    let fx = Fixture::new("udp-stick", 4, &[]);
    let name = |i: usize| format!("pod-{i}");
    let index = |n: &str| -> usize { n.trim_start_matches("pod-").parse().unwrap() };
    let write = |pods: &[usize]| {
        fx.write(
            "dns.yaml",
            &udp_service("stick", DNS_IP, 53, 8080, &fx.pod_ips(pods)),
        );
    };
    // Waits until new sockets reach only `pods` (the change is programmed).
    let wait_only = |pods: &[usize]| {
        let ok = lab::wait_for(Duration::from_secs(5), || {
            let r = fx
                .lab
                .probe(
                    &ProbeOptions::tcp(SocketAddrV4::new(DNS_IP, 53), 30)
                        .with_mode(ProbeMode::UdpSendto),
                    true,
                )
                .ok()?;
            r.replies
                .keys()
                .all(|n| pods.contains(&index(n)))
                .then_some(())
        });
        assert!(ok.is_some(), "never only {pods:?}:\n{}", fx.agent.log());
    };
    write(&[0, 1, 2]);
    let target = SocketAddrV4::new(DNS_IP, 53);
    fx.wait_answering(target, ProbeMode::UdpSendto);
    // 100 datagrams from one socket: one pod; many sockets: every pod.
    let one = fx
        .lab
        .probe(
            &ProbeOptions::tcp(target, 100).with_mode(ProbeMode::UdpSendtoFlow),
            true,
        )
        .unwrap();
    only_pod(&one, 100);
    let many = fx
        .lab
        .probe(
            &ProbeOptions::tcp(target, 60).with_mode(ProbeMode::UdpSendto),
            true,
        )
        .unwrap();
    assert_eq!(
        many.replies.len(),
        3,
        "sockets spread over the pods: {many:?}"
    );

    let mut sock = fx.lab.udp_socket(target.into()).unwrap();
    let x = index(&only_pod(&sock.ask("send 20").unwrap(), 20));
    // Another pod comes, one that is not the socket's goes: it stays (its slot may move).
    let y = (0..3).find(|i| *i != x).unwrap();
    write(&[x, y, 3]);
    wait_only(&[x, y, 3]);
    assert_eq!(only_pod(&sock.ask("send 20").unwrap(), 20), name(x));
    let z = (0..4).find(|i| *i != x && *i != y).unwrap();
    write(&[x, z]);
    wait_only(&[x, z]);
    assert_eq!(
        only_pod(&sock.ask("send 20").unwrap(), 20),
        name(x),
        "stays on pod-{x}"
    );
    // Its pod leaves: the next datagram reaches a live one, and the socket stays there.
    write(&[y, z]);
    wait_only(&[y, z]);
    let after = index(&only_pod(&sock.ask("send 20").unwrap(), 20));
    assert!(after == y || after == z, "pod-{after}");
}
