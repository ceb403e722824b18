//! A bad edit of a live manifest removes nothing: the real agent keeps serving a
//! service (real connections from a client in the cgroup) while its file is broken and
//! while it is rewritten in place, applies the file once it is whole again, and removes
//! the service when the file is deleted.

mod common;

use std::{collections::BTreeSet, io::Write as _, time::Duration};

use common::{Fixture, WEB_IP, service, slice};
use lb_lab::lab::{self, ProbeMode, ProbeOptions};

/// Waits (up to 5 s) until the agent's log holds `text`.
fn wait_log(fx: &Fixture, text: &str) {
    let found = lab::wait_for(Duration::from_secs(5), || {
        fx.agent.log().contains(text).then_some(())
    });
    assert!(
        found.is_some(),
        "no {text:?} in the log:\n{}",
        fx.agent.log()
    );
}

/// Twenty connections to the service, every one answered; the pods that answered.
fn serving(fx: &Fixture, when: &str) -> BTreeSet<String> {
    let report = fx.probe(WEB_IP, 20);
    assert_eq!(
        report.total_replies(),
        20,
        "{when}: {report:?}\n{}",
        fx.agent.log()
    );
    report.replies.into_keys().collect()
}

#[test]
fn a_live_service_survives_a_broken_file_and_a_rewrite_in_place_and_goes_with_its_file() {
    let web = service("web", WEB_IP, 80);
    // Polls every 50 ms: a file is read once unwritten for 100 ms.
    let fx = Fixture::with_source(
        "medit",
        2,
        &[("web.yaml", web.clone())],
        None,
        &["--poll-interval-ms", "50"],
    );
    let both = format!("{web}---\n{}", slice("web", &fx.pod_ips(&[0, 1])));
    fx.write("web.yaml", &both);
    fx.wait_answering((WEB_IP, 80), ProbeMode::Tcp);

    // Document 1 (the Service) broken: the file's objects stay, with a warning.
    fx.write("web.yaml", &both.replacen("{name: web,", "{name: [web,", 1));
    wait_log(&fx, "web.yaml: document 1 broken: keeping the 2 objects");
    assert_eq!(serving(&fx, "document 1 broken").len(), 2);

    // Rewritten in place, to pod 1 only, while a client keeps connecting: truncated,
    // half written (cut inside the slice's labels), then the rest.
    let next = format!("{web}---\n{}", slice("web", &fx.pod_ips(&[1])));
    let cut = next.find("service-name: we").unwrap() + "service-name: we".len();
    let client = fx
        .lab
        .start_probe(&ProbeOptions {
            interval: Duration::from_millis(20),
            ..ProbeOptions::tcp((WEB_IP, 80), 100)
        })
        .unwrap();
    let path = fx.dir.join("manifests/web.yaml");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&next.as_bytes()[..cut]).unwrap();
    assert_eq!(serving(&fx, "half written").len(), 2);
    // Once the half has settled it is read, and kept out.
    wait_log(&fx, "web.yaml: document 2 broken: keeping the 2 objects");
    assert_eq!(serving(&fx, "half written, read").len(), 2);
    file.write_all(&next.as_bytes()[cut..]).unwrap();
    drop(file);
    let pod1 = lab::wait_for(Duration::from_secs(5), || {
        let pods = serving(&fx, "written whole");
        (pods.len() == 1).then_some(pods)
    });
    assert_eq!(pod1, Some(BTreeSet::from(["pod-1".to_string()])));
    let report = client.finish().unwrap();
    assert_eq!(report.total_errors(), 0, "{report:?}\n{}", fx.agent.log());
    assert_eq!(report.total_replies(), 100);

    // Deleted: the service goes.
    fx.remove("web.yaml");
    let gone = lab::wait_for(Duration::from_secs(5), || {
        (fx.probe(WEB_IP, 1).total_replies() == 0).then_some(())
    });
    assert!(gone.is_some(), "still served:\n{}", fx.agent.log());
}
