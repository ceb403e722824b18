//! The image `cargo xtask image` builds, run as the DaemonSet runs it: privileged, on the
//! host network, with the host's bpffs and cgroup v2 mounted. The containerised agent
//! translates a ClusterIP for a lab client, and `lb-user dump` in the container shows it.
//! `cargo xtask test` builds the image and passes its archive in `LB_IMAGE_ARCHIVE`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{AGENT_BIN, POD_PORT, WEB_IP, require_root, service, slice};
use lb_lab::lab::{self, Lab, ProbeOptions};

/// The name `podman load` gives the image (xtask's `IMAGE`).
const IMAGE: &str = "localhost/lb-user:dev";

fn podman(conf: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf);
    cmd
}

/// A container, removed on drop (on failure too), its log printed if the test failed;
/// then the pins its agent left.
struct Container {
    name: String,
    conf: PathBuf,
    pin: PathBuf,
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(out) = podman(&self.conf).args(["logs", &self.name]).output()
        {
            eprintln!("container log:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let _ = podman(&self.conf)
            .args(["rm", "-f", "-t", "5", &self.name])
            .output();
        lb_user::datapath::loader::remove_pins(&self.pin);
    }
}

#[test]
fn the_image_runs_the_agent_as_the_daemonset_does() {
    require_root();
    let (Some(archive), Some(conf)) = (
        std::env::var_os("LB_IMAGE_ARCHIVE").map(PathBuf::from),
        std::env::var_os("LB_CONTAINERS_CONF").map(PathBuf::from),
    ) else {
        panic!(
            "no image: run the tests with `cargo xtask test`, which builds it (`cargo xtask image`)"
        );
    };
    lab::run(podman(&conf).arg("load").arg("--input").arg(&archive)).expect("podman load");

    let lab = Lab::new(&common::lab_bin(), "img", 2, POD_PORT).unwrap();
    let dir = std::env::temp_dir().join(&lab.prefix);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let pods: Vec<_> = lab.pods.iter().map(|p| p.ip).collect();
    common::write_atomic(&dir.join("manifests/web.yaml"), &service("web", WEB_IP, 80));
    common::write_atomic(&dir.join("manifests/slice.yaml"), &slice("web", &pods));
    let cgroup_root = lb_user::datapath::loader::mount_point("cgroup2").unwrap();
    let cgroup = lab.cgroup.path.strip_prefix(&cgroup_root).unwrap();
    let pin = format!("/sys/fs/bpf/{}", lab.prefix);

    let container = Container {
        name: lab.prefix.clone(),
        conf: conf.clone(),
        pin: pin.clone().into(),
    };
    lab::run(
        podman(&conf)
            .args(["run", "--detach", "--name", &container.name])
            .args(["--privileged", "--network=host"])
            .args(["--volume", "/sys/fs/bpf:/sys/fs/bpf"])
            .arg("--volume")
            .arg(format!("{}:/sys/fs/cgroup", cgroup_root.display()))
            .arg("--volume")
            .arg(format!("{}:/manifests:ro", dir.join("manifests").display()))
            .arg(IMAGE)
            .args(["run", "--manifests", "/manifests"])
            .arg(format!("--cgroup=/sys/fs/cgroup/{}", cgroup.display()))
            .arg(format!("--pin-path={pin}"))
            .args(["--metrics-bind-address=", "--healthz-bind-address="]),
    )
    .expect("podman run");

    // The lab's client reaches both pods through the ClusterIP.
    let answered = lab::wait_for(Duration::from_secs(20), || {
        let r = lab.probe(&ProbeOptions::tcp((WEB_IP, 80), 20), true).ok()?;
        (r.total_errors() == 0 && r.replies.len() == 2).then_some(r)
    });
    assert!(
        answered.is_some(),
        "the ClusterIP never answered from both pods"
    );

    // `lb-user dump` inside the container.
    let dump = lab::run(
        podman(&conf)
            .args(["exec", &container.name, "/lb-user", "dump"])
            .arg(format!("--pin-path={pin}")),
    )
    .unwrap();
    assert!(dump.contains("10.96.0.10:80/TCP"), "{dump}");
    assert!(dump.contains(&format!("{}:{POD_PORT}", pods[0])), "{dump}");

    // Stopped as the kubelet stops it (SIGTERM): the datapath stays; then cleaned up.
    lab::run(podman(&conf).args(["stop", "-t", "10", &container.name])).unwrap();
    assert_eq!(
        lab.probe(&ProbeOptions::tcp((WEB_IP, 80), 3), true)
            .unwrap()
            .total_replies(),
        3
    );
    lab::run(podman(&conf).args(["rm", &container.name])).unwrap();
    let out = lab::run(
        Command::new(AGENT_BIN)
            .args(["cleanup", "--pin-path", &pin, "--cgroup"])
            .arg(&lab.cgroup.path),
    )
    .unwrap();
    assert!(out.contains("link pins"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
