//! The lab itself, without the agent: pods answer with their names over TCP and UDP,
//! and a service address means nothing to a client without the programs (root).
//! This test also makes `cargo test` build the `lb-lab` binary, which the agent's
//! integration tests run inside their namespaces.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::Path,
};

use lb_lab::lab::{Lab, ProbeMode, ProbeOptions};

#[test]
fn pods_answer_with_their_names_and_nothing_else_is_reachable() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the lab needs root");
    let lab = Lab::new(Path::new(env!("CARGO_BIN_EXE_lb-lab")), "self", 2, 8080).unwrap();
    for (i, pod) in lab.pods.iter().enumerate() {
        let target = SocketAddr::V4(SocketAddrV4::new(pod.ip, 8080));
        for mode in [
            ProbeMode::Tcp,
            ProbeMode::UdpConnected,
            ProbeMode::UdpSendto,
        ] {
            let report = lab
                .probe(&ProbeOptions::tcp(target, 3).with_mode(mode), false)
                .unwrap();
            assert_eq!(
                report.replies.get(&format!("pod-{i}")),
                Some(&3),
                "{mode:?} to {target}: {report:?}"
            );
        }
    }
    // A ClusterIP without the agent: the node namespace has no route for it.
    let report = lab
        .probe(
            &ProbeOptions::tcp(SocketAddrV4::new([10, 96, 0, 10].into(), 80), 1),
            true,
        )
        .unwrap();
    assert_eq!(report.total_replies(), 0, "{report:?}");
    assert_eq!(report.total_errors(), 1, "{report:?}");
}
