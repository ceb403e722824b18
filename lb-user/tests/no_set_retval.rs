//! The socket level without `bpf_set_retval` (kernels before 6.1): the agent loads its
//! programs built without the helper, translation works as before, and a connect() or
//! sendmsg() to a Service without endpoints fails with EPERM instead of ECONNREFUSED;
//! the log, `lb_kernel_feature` and `lb-user dump` say so. Here the kernel has the
//! helper, so the agent is told to assume it missing (`--assume-missing-kernel-feature`);
//! the same checks without the flag see ECONNREFUSED and the full programs.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

use common::{AGENT_BIN, Fixture, WEB_IP, service, slice};
use lb_lab::lab::{self, ProbeMode, ProbeOptions};

const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 54);

/// A Service with a TCP port 80 and a UDP port 53, and a slice without endpoints.
fn empty_service(name: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
         spec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, targetPort: http}}\n\
         \x20 - {{name: dns, port: 53, protocol: UDP, targetPort: dns}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-a\n  \
         namespace: t\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 8080, protocol: UDP}}]\n\
         endpoints: []\n"
    )
}

/// What one agent's start should show.
struct Expect {
    /// The errno a refused connect() or sendmsg() gets.
    errno: &'static str,
    /// `lb_kernel_feature{name="helper_set_retval"}`.
    feature: u8,
    /// The object `lb-user dump` names (text: what follows "socket level: ").
    object: &'static str,
}

/// Starts an agent with `extra` flags; checks that a Service with a ready endpoint is
/// translated, that one without endpoints is refused with `expect.errno` (TCP connect,
/// connected UDP, unconnected UDP), and what the metric, the log and the dump say.
/// Returns the agent's log and the dump.
fn refusals(tag: &str, extra: &[&str], expect: &Expect) -> (String, String) {
    let port = common::free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut args = vec!["--metrics-bind-address", &bind];
    args.extend_from_slice(extra);
    let fx = Fixture::with_source(tag, 1, &[], None, &args);
    fx.write("web.yaml", &service("web", WEB_IP, 80));
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0])));
    fx.write("empty.yaml", &empty_service("empty", EMPTY_IP));
    fx.wait_answering(SocketAddrV4::new(WEB_IP, 80), ProbeMode::Tcp);

    // Translation is the same with either object.
    let r = fx.probe(WEB_IP, 10);
    assert_eq!(r.total_errors(), 0, "{r:?}");
    assert_eq!(r.replies.get("pod-0"), Some(&10), "{r:?}");

    for (port, mode) in [
        (80, ProbeMode::Tcp),
        (53, ProbeMode::UdpConnected),
        (53, ProbeMode::UdpSendto),
    ] {
        let target = SocketAddrV4::new(EMPTY_IP, port);
        let r = fx
            .lab
            .probe(&ProbeOptions::tcp(target, 5).with_mode(mode), true)
            .unwrap();
        assert_eq!(
            r.errors.get(expect.errno),
            Some(&5),
            "{mode:?} to {target}: {r:?}\n{}",
            fx.agent.log()
        );
    }

    let metrics = common::http_get(port, "/metrics");
    let line = format!(
        "lb_kernel_feature{{name=\"helper_set_retval\"}} {}\n",
        expect.feature
    );
    assert!(metrics.contains(&line), "metrics lack {line:?}:\n{metrics}");

    let dump = lab::run(
        Command::new(AGENT_BIN)
            .arg("dump")
            .arg("--pin-path")
            .arg(&fx.agent.pin_path),
    )
    .unwrap();
    let said = format!("socket level: {}", expect.object);
    assert!(dump.contains(&said), "dump lacks {said:?}:\n{dump}");
    let refused = dump
        .lines()
        .find(|l| l.starts_with("connect4 "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(refused >= Some(10), "connect4's refusals:\n{dump}");
    let json = lab::run(
        Command::new(AGENT_BIN)
            .args(["dump", "-o", "json", "--pin-path"])
            .arg(&fx.agent.pin_path),
    )
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["socketLevel"], expect.object, "{json}");
    (fx.agent.log(), dump)
}

#[test]
fn without_bpf_set_retval_a_refused_connect_gets_eperm_and_translation_works() {
    let (log, dump) = refusals(
        "no-retval",
        &["--assume-missing-kernel-feature", "helper_set_retval"],
        &Expect {
            errno: "EPERM",
            feature: 0,
            object: "no-set-retval",
        },
    );
    assert!(
        dump.contains("socket level: no-set-retval, degraded")
            && dump.contains("gets EPERM instead of ECONNREFUSED"),
        "{dump}"
    );
    for said in [
        "--assume-missing-kernel-feature: helper_set_retval is taken as missing",
        "this kernel has no bpf_set_retval in sock_addr programs",
        "connect() to a Service without endpoints fails with EPERM instead of ECONNREFUSED",
        "object=\"no-set-retval\"",
    ] {
        assert!(log.contains(said), "the log lacks {said:?}:\n{log}");
    }
}

#[test]
fn with_bpf_set_retval_a_refused_connect_gets_econnrefused() {
    // Every kernel the tests run on (6.1 and later) has the helper.
    let (log, _) = refusals(
        "retval",
        &[],
        &Expect {
            errno: "ECONNREFUSED",
            feature: 1,
            object: "full",
        },
    );
    assert!(log.contains("object=\"full\""), "{log}");
    assert!(!log.contains("EPERM instead of"), "{log}");
}
