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
/// waits for it to exit (it must, within the agents' sync timeout: 20 s, longer under
/// emulation, where loading the programs alone takes about 15 s).
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
    let exited = lab::wait_for(common::sync_timeout(), || child.try_wait().unwrap());
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
        err.contains(
            "lacks CAP_BPF (or CAP_SYS_ADMIN), CAP_PERFMON (or CAP_SYS_ADMIN), CAP_NET_ADMIN"
        ),
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

/// Whether any program of ours is attached to `cgroup`.
fn attached(cgroup: &Path) -> String {
    lab::run(Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup)).unwrap()
}

#[test]
fn without_cap_perfmon_the_agent_says_so_before_pinning_anything() {
    require_root();
    let cgroup = Cgroup::create(&lab::unique_prefix("perfmon")).unwrap();
    let pin = pin_path("perfmon");
    // Root with CAP_BPF and CAP_NET_ADMIN, but neither CAP_PERFMON nor CAP_SYS_ADMIN.
    let wrapper = ["setpriv", "--bounding-set=-perfmon,-sys_admin"];
    let out = run_agent(&wrapper, &cgroup.path, &pin);
    let pinned = pin.exists();
    lb_user::datapath::loader::remove_pins(&pin);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("lacks CAP_PERFMON (or CAP_SYS_ADMIN) ("),
        "{err}"
    );
    assert!(!err.contains("CAP_BPF"), "{err}");
    assert!(!pinned, "the pin directory was made before the check");
}

#[test]
fn a_pin_directory_another_user_could_change_is_refused() {
    require_root();
    let cgroup = Cgroup::create(&lab::unique_prefix("trust")).unwrap();
    let pin = pin_path("trust");
    std::fs::create_dir_all(&pin).unwrap();
    let chmod = |mode: u32| {
        std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap()
    };
    let refused = |want: &str| {
        let out = run_agent(&[], &cgroup.path, &pin);
        assert!(!out.status.success(), "{want}: started");
        let err = stderr(&out);
        assert!(err.contains(want), "want {want:?}:\n{err}");
        assert!(!attached(&cgroup.path).contains("lb_"), "{want}: attached");
    };
    std::os::unix::fs::chown(&pin, Some(65534), None).unwrap();
    refused("owned by uid 65534");
    std::os::unix::fs::chown(&pin, Some(0), None).unwrap();
    chmod(0o777);
    refused("owned by uid 0 with mode 777");
    // Another agent's map, behind a symlink under our name.
    chmod(0o700);
    std::os::unix::fs::symlink(
        "/sys/fs/bpf/elsewhere/LB_BACKENDS",
        pin.join(lb_common::MAP_BACKENDS),
    )
    .unwrap();
    refused("is a symlink (to /sys/fs/bpf/elsewhere/LB_BACKENDS");
    let _ = std::fs::remove_file(pin.join(lb_common::MAP_BACKENDS));
    lb_user::datapath::loader::remove_pins(&pin);
}

#[test]
fn the_agent_mounts_the_bpf_filesystem_for_root_alone() {
    require_root();
    let cgroup = Cgroup::create(&lab::unique_prefix("mount")).unwrap();
    // In a mount namespace of its own without /sys/fs/bpf mounted: the agent mounts it,
    // then stops at an interface that does not exist; the shell prints the mode. The
    // namespace's bpf filesystem, and every pin in it, goes with the shell.
    let script = "umount /sys/fs/bpf && \"$0\" \"$@\"; echo \"mode $(stat -c %a /sys/fs/bpf)\" >&2";
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
    ];
    let pin = Path::new("/sys/fs/bpf/lb-mount-test");
    let out = run_agent_with(&wrapper, &cgroup.path, pin, &["--interface", "lbnope0"]);
    let err = stderr(&out);
    assert!(
        err.contains("mounted a bpf filesystem at /sys/fs/bpf (mode 0700)"),
        "{err}"
    );
    // The kernel adds the sticky bit to a bpf filesystem's root whatever the mode.
    assert!(err.contains("mode 1700\n"), "{err}");
    assert!(!pin.exists(), "pinned in the machine's bpf filesystem");
}

#[test]
fn cleanup_refuses_a_path_off_the_bpf_filesystem() {
    let dir = std::env::temp_dir().join(lab::unique_prefix("notpins"));
    std::fs::create_dir_all(dir.join("links")).unwrap();
    for f in [lb_common::MAP_SERVICES, "links/precious"] {
        std::fs::write(dir.join(f), "data").unwrap();
    }
    let out = Command::new(AGENT_BIN)
        .args(["cleanup", "--pin-path"])
        .arg(&dir)
        .output()
        .unwrap();
    let kept = dir.join("links/precious").exists() && dir.join(lb_common::MAP_SERVICES).exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not on a bpf filesystem"),
        "{}",
        stderr(&out)
    );
    assert!(kept, "cleanup deleted files off bpffs");
}

#[test]
fn a_size_flag_that_differs_from_a_pinned_map_is_refused_with_the_way_to_resize() {
    require_root();
    let cgroup = Cgroup::create(&lab::unique_prefix("size")).unwrap();
    let pin = pin_path("size");
    std::fs::create_dir_all(&pin).unwrap();
    // The connection-tracking map, pinned with this build's layout and 4,096 entries.
    let (_, key, value) = lb_user::datapath::loader::expected_layout()
        .into_iter()
        .find(|(n, _, _)| *n == lb_common::MAP_CT)
        .unwrap();
    let map = pin.join(lb_common::MAP_CT);
    lab::run(
        Command::new("bpftool")
            .args(["map", "create"])
            .arg(&map)
            .args([
                "type",
                "lru_hash",
                "key",
                &key.to_string(),
                "value",
                &value.to_string(),
            ])
            .args(["entries", "4096", "name", "LB_CT"]),
    )
    .unwrap();
    let out = run_agent_with(&[], &cgroup.path, &pin, &["--ct-max-entries", "8192"]);
    let _ = std::fs::remove_file(&map);
    lb_user::datapath::loader::remove_pins(&pin);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("holds 4096 entries, --ct-max-entries asks for 8192")
            && err.contains("lb-user cleanup --pin-path"),
        "{err}"
    );
    assert!(!attached(&cgroup.path).contains("lb_"));
}

/// The programs attached to `cgroup` as "attach type, name" lines (program ids left
/// out: a start that adopts the links updates them to its own programs).
fn attached_names(cgroup: &Path) -> Vec<String> {
    attached(cgroup)
        .lines()
        .skip(1)
        .map(|l| {
            l.split_whitespace()
                .filter(|w| !w.bytes().all(|b| b.is_ascii_digit()))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// The pins under `pin` (maps, and links under links/), by path.
fn pins(pin: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = [pin.to_path_buf(), pin.join("links")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()))
        .collect();
    all.sort();
    all
}

/// An interface name no test creates: the start fails after the cgroup programs are
/// attached (the packet level comes after them).
const NO_SUCH_IFACE: &str = "lb-nosuch0";

#[test]
fn a_start_that_fails_after_attaching_leaves_nothing_behind() {
    require_root();
    let cgroup = Cgroup::create(&lab::unique_prefix("failstart")).unwrap();
    let pin = pin_path("failstart");
    let out = run_agent_with(&[], &cgroup.path, &pin, &["--interface", NO_SUCH_IFACE]);
    let left = pins(&pin);
    let pin_dir_left = pin.exists();
    lb_user::datapath::loader::remove_pins(&pin);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("--interface {NO_SUCH_IFACE}: no such interface")),
        "{err}"
    );
    // It failed after attaching every cgroup program.
    assert!(err.contains("attached=9"), "{err}");
    assert!(err.contains("the start failed: removed the"), "{err}");
    assert!(left.is_empty() && !pin_dir_left, "left behind: {left:?}");
    // Unpinned links are released by the kernel shortly after (bounded wait).
    let detached = lab::wait_for(Duration::from_secs(5), || {
        (!attached(&cgroup.path).contains("lb_")).then_some(())
    });
    assert!(detached.is_some(), "{}", attached(&cgroup.path));
}

#[test]
fn a_failed_start_on_an_earlier_agents_pins_keeps_them() {
    let mut fx = Fixture::new("failadopt", 1, &[("web.yaml", service("web", WEB_IP, 80))]);
    let (pin, cgroup) = (fx.agent.pin_path.clone(), fx.lab.cgroup.path.clone());
    // Stopped: its pins stay and keep serving.
    let status = fx.agent.child.terminate(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{}", fx.agent.log());
    let (pins_before, attached_before) = (pins(&pin), attached_names(&cgroup));
    assert!(
        attached_before.iter().filter(|l| l.contains("lb_")).count() == 9,
        "{attached_before:?}"
    );

    let out = run_agent_with(&[], &cgroup, &pin, &["--interface", NO_SUCH_IFACE]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("updated=9"), "it adopted the links: {err}");
    assert!(
        err.contains("the start failed: removed the 0 pins"),
        "{err}"
    );
    assert_eq!(pins(&pin), pins_before);
    assert_eq!(attached_names(&cgroup), attached_before);
    // The earlier agent's datapath still serves: no endpoints, so refused at once.
    assert_eq!(fx.probe(WEB_IP, 1).errors.get("ECONNREFUSED"), Some(&1));
}
