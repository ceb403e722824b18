//! Startup checks: each way the agent cannot start gives an error that names the cause,
//! before anything is loaded or attached.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use common::{AGENT_BIN, Fixture, WEB_IP, require_root, service};
use lb_lab::lab::{self, Cgroup};

/// `lb-user run` on an empty manifest directory with `cgroup` and `pin`, through
/// `wrapper` (a command that runs the agent, e.g. with fewer privileges) if given;
/// waits for it to exit (it must, within 20 s).
fn run_agent(wrapper: &[&str], cgroup: &Path, pin: &Path) -> Output {
    run_agent_with(wrapper, cgroup, pin, &[])
}

/// [`run_agent`] with more flags.
fn run_agent_with(wrapper: &[&str], cgroup: &Path, pin: &Path, flags: &[&str]) -> Output {
    let dir = std::env::temp_dir().join(lab::unique_prefix("start"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new(wrapper.first().copied().unwrap_or(AGENT_BIN));
    if !wrapper.is_empty() {
        cmd.args(&wrapper[1..]).arg(AGENT_BIN);
    }
    cmd.args([
        "run",
        "--metrics-bind-address",
        "",
        "--healthz-bind-address",
        "",
    ])
    .arg("--manifests")
    .arg(&dir)
    .arg("--cgroup")
    .arg(cgroup)
    .arg("--pin-path")
    .arg(pin)
    .args(flags);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = child.spawn().unwrap();
    let exited = lab::wait_for(Duration::from_secs(20), || child.try_wait().unwrap());
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pin_path(tag: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{}", lab::unique_prefix(tag)))
}

#[test]
fn without_the_capabilities_the_agent_says_which_are_missing() {
    require_root();
    let cgroup = Cgroup::create(&lab::unique_prefix("caps")).unwrap();
    let pin = pin_path("caps");
    // As nobody, with every capability dropped.
    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];
    let out = run_agent(&wrapper, &cgroup.path, &pin);
    lb_user::datapath::loader::remove_pins(&pin);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("lacks CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN"),
        "{err}"
    );
}

#[test]
fn a_second_agent_on_the_same_pin_path_is_refused() {
    let fx = Fixture::new("twice", 1, &[("web.yaml", service("web", WEB_IP, 80))]);
    let out = run_agent(&[], &fx.lab.cgroup.path, &fx.agent.pin_path);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("another agent is running on it"), "{err}");
    // The first one is untouched and keeps serving.
    assert!(fx.agent.log().matches(" synced").count() >= 1);
    assert_eq!(fx.probe(WEB_IP, 1).errors.get("ECONNREFUSED"), Some(&1));
    // Nor does `cleanup` pull the maps from under it.
    let cleanup = Command::new(AGENT_BIN)
        .args(["cleanup", "--pin-path"])
        .arg(&fx.agent.pin_path)
        .output()
        .unwrap();
    assert!(!cleanup.status.success());
    assert!(stderr(&cleanup).contains("another agent is running on it"));
    assert!(fx.agent.pin_path.join(lb_common::MAP_SERVICES).exists());
}

#[test]
fn maps_pinned_with_another_layout_are_refused_by_name() {
    require_root();
    let cgroup = Cgroup::create(&lab::unique_prefix("layout")).unwrap();
    let pin = pin_path("layout");
    std::fs::create_dir_all(&pin).unwrap();
    // A map under our name whose entries are not ours.
    let map = pin.join(lb_common::MAP_CT);
    lab::run(
        Command::new("bpftool")
            .args(["map", "create"])
            .arg(&map)
            .args(["type", "hash", "key", "4", "value", "4", "entries", "16"])
            .args(["name", "LB_CT_V1"]),
    )
    .unwrap();
    let out = run_agent(&[], &cgroup.path, &pin);
    let _ = std::fs::remove_file(&map);
    lb_user::datapath::loader::remove_pins(&pin);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("pinned map {}", map.display()))
            && err.contains("4-byte keys and 4-byte values")
            && err.contains("lb-user cleanup"),
        "{err}"
    );
    // Nothing was attached.
    let attached = lab::run(
        Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&cgroup.path),
    )
    .unwrap();
    assert!(!attached.contains("lb_"), "{attached}");
}

#[test]
fn a_pin_path_off_the_bpf_filesystem_is_refused() {
    require_root();
    let cgroup = Cgroup::create(&lab::unique_prefix("bpffs")).unwrap();
    let pin = std::env::temp_dir().join(lab::unique_prefix("notbpf"));
    let out = run_agent(&[], &cgroup.path, &pin);
    let _ = std::fs::remove_dir_all(&pin);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("not on a bpf filesystem"), "{err}");
}

#[test]
fn a_packet_level_interface_that_is_not_ethernet_is_refused_by_name() {
    require_root();
    // A tun device (IP packets, no Ethernet header), as WireGuard has too.
    let ns = lab::Netns::create(&lab::unique_prefix("tun")).unwrap();
    ns.ip(&["tuntap", "add", "dev", "tun0", "mode", "tun"])
        .unwrap();
    ns.ip(&["addr", "add", "10.98.0.1/24", "dev", "tun0"])
        .unwrap();
    ns.ip(&["link", "set", "tun0", "up"]).unwrap();
    let cgroup = Cgroup::create(&lab::unique_prefix("tunc")).unwrap();
    let pin = pin_path("tun");
    let netns = format!("--net=/var/run/netns/{}", ns.name);
    let out = run_agent_with(
        &["nsenter", &netns],
        &cgroup.path,
        &pin,
        &["--interface", "tun0"],
    );
    let _ = std::fs::remove_dir_all(&pin);
    assert!(!out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("--interface tun0: interface tun0 is not Ethernet"),
        "{err}"
    );
}
