//! Restarts and upgrades drop nothing: the programs stay attached through pinned links
//! while no agent runs, the maps keep serving, and a starting agent replaces the
//! programs in place. A client in the cgroup opens a connection to a ClusterIP every
//! 20 ms throughout; not one may fail.

mod common;

use std::{collections::BTreeSet, path::Path, process::Command, time::Duration};

use common::{AGENT_BIN, Fixture, WEB_IP, service, slice};
use lb_lab::lab::{self, AgentProcess, ProbeOptions, Stop};

/// (link id, program id) of each cgroup link.
type Links = BTreeSet<(u32, u32)>;

/// The cgroup links pinned under the agent's pin path.
fn cgroup_links(fx: &Fixture) -> Links {
    let dir = fx.agent.pin_path.join("links");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("_cg"))
        .map(|e| {
            let fd = lb_user::datapath::sys::obj_get(&e.path()).unwrap();
            let info = lb_user::datapath::sys::link_info(std::os::fd::AsFd::as_fd(&fd)).unwrap();
            (info.id, info.prog_id)
        })
        .collect()
}

/// Runs `restart` (which stops the agent, waits `down`, starts one again) while the
/// client keeps connecting; asserts that every connection succeeded and returns the
/// links before and after.
fn under_load(
    fx: &mut Fixture,
    down: Duration,
    restart: impl FnOnce(&mut AgentProcess, &Path) -> anyhow::Result<()>,
) -> (Links, Links) {
    let before = cgroup_links(fx);
    assert_eq!(
        before.len(),
        lb_user::datapath::loader::CGROUP_PROGRAMS.len(),
        "one pinned link per cgroup program"
    );
    let count = 100 + down.as_millis() as usize / 20;
    let opts = ProbeOptions {
        interval: Duration::from_millis(20),
        timeout: Duration::from_secs(1),
        ..ProbeOptions::tcp((WEB_IP, 80), count)
    };
    let probe = fx.lab.start_probe(&opts).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let log = fx.dir.join("agent-restarted.log");
    restart(&mut fx.agent, &log).unwrap();
    fx.agent.wait_synced(1, Duration::from_secs(20)).unwrap();
    let report = probe.finish().unwrap();
    assert_eq!(report.total_errors(), 0, "{report:?}\n{}", fx.agent.log());
    assert_eq!(report.total_replies(), count);
    (before, cgroup_links(fx))
}

fn fixture(tag: &str) -> Fixture {
    let fx = Fixture::new(tag, 2, &[("web.yaml", service("web", WEB_IP, 80))]);
    fx.write("web-slice.yaml", &slice("web", &fx.pod_ips(&[0, 1])));
    fx.wait_answering((WEB_IP, 80), lab::ProbeMode::Tcp);
    fx
}

/// Also what an upgrade does: the new agent's programs go into the same links.
#[test]
fn sigkill_and_restart_drop_no_connection() {
    let mut fx = fixture("rkill");
    let (before, after) = under_load(&mut fx, Duration::ZERO, |agent, log| {
        agent.restart(Stop::Kill, Duration::ZERO, &[], log)
    });
    let ids = |s: &Links| s.iter().map(|l| l.0).collect::<BTreeSet<_>>();
    // The same links, updated to the new agent's programs.
    assert_eq!(ids(&before), ids(&after));
    assert!(
        before.intersection(&after).next().is_none(),
        "{before:?} {after:?}"
    );
    assert!(fx.agent.log().contains("updated=9"), "{}", fx.agent.log());
}

#[test]
fn sigterm_leaves_the_datapath_serving_until_the_next_agent() {
    let mut fx = fixture("rterm");
    let down = Duration::from_secs(2);
    let (before, after) = under_load(&mut fx, down, |agent, log| {
        agent.restart(Stop::Term, down, &[], log)
    });
    assert_eq!(before.len(), after.len());
}

/// The kernel's tag of each program (a hash of its instructions), by program id.
fn tags(links: &Links) -> BTreeSet<u64> {
    let progs: BTreeSet<u32> = links.iter().map(|(_, prog)| *prog).collect();
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| progs.contains(&p.id()))
        .map(|p| p.tag())
        .collect()
}

/// The upgrade test's second agent, whose kernel programs differ (another program tag):
/// `LB_UPGRADE_AGENT` when set (`cargo xtask test` builds it), else built here as xtask
/// does (`LB_EBPF_CFG=lb_upgrade_test`) into `upgrade-variant` beside this test's target
/// directory, where xtask puts it too (cargo rebuilds only what changed). The reason
/// when it cannot be had.
fn upgrade_agent() -> Result<std::path::PathBuf, String> {
    if let Some(path) = std::env::var_os("LB_UPGRADE_AGENT") {
        return Ok(path.into());
    }
    // This test runs from <target>/debug/deps/.
    let exe = std::env::current_exe().map_err(|e| format!("finding this test: {e}"))?;
    let target = exe
        .ancestors()
        .nth(3)
        .ok_or_else(|| format!("{} is not under a target directory", exe.display()))?;
    let variant = target.join("upgrade-variant");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .args(["build", "--package", "lb-user", "--target-dir"])
        .arg(&variant)
        .env("LB_EBPF_CFG", "lb_upgrade_test")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    eprintln!("building the second agent: {build:?}");
    let status = build
        .status()
        .map_err(|e| format!("running {}: {e}", cargo.to_string_lossy()))?;
    if !status.success() {
        return Err(format!("{build:?} failed ({status})"));
    }
    Ok(variant.join("debug/lb-user"))
}

#[test]
fn an_upgrade_to_programs_that_differ_drops_no_connection() {
    let upgraded = match upgrade_agent() {
        Ok(path) => path,
        Err(why) => {
            eprintln!("skipped: no second agent build ({why})");
            return;
        }
    };
    let mut fx = fixture("rupg");
    let (before, after) = under_load(&mut fx, Duration::ZERO, |agent, log| {
        agent.upgrade(upgraded.as_ref(), Stop::Term, Duration::ZERO, log)
    });
    let ids = |s: &Links| s.iter().map(|l| l.0).collect::<BTreeSet<_>>();
    assert_eq!(
        ids(&before),
        ids(&after),
        "updated in place, not re-attached"
    );
    // The kernel runs other programs: connect4's instructions differ.
    let (old, new) = (tags(&before), tags(&after));
    assert!(old != new, "same program tags {old:?}");
    assert!(fx.agent.log().contains("updated=9"), "{}", fx.agent.log());
}

#[test]
fn cleanup_removes_every_link_program_and_pin() {
    let mut fx = fixture("rclean");
    let pin = fx.agent.pin_path.clone();
    let cgroup = fx.lab.cgroup.path.clone();
    // Stopped: the datapath keeps serving.
    let status = fx.agent.child.terminate(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{}", fx.agent.log());
    assert_eq!(fx.probe(WEB_IP, 5).total_replies(), 5);
    let attached = |cg: &std::path::Path| {
        lab::run(Command::new("bpftool").args(["cgroup", "show"]).arg(cg)).unwrap()
    };
    assert!(
        attached(&cgroup).contains("lb_connect4"),
        "{}",
        attached(&cgroup)
    );

    let out = lab::run(
        Command::new(AGENT_BIN)
            .args(["cleanup", "--pin-path"])
            .arg(&pin)
            .arg("--cgroup")
            .arg(&cgroup),
    )
    .unwrap();
    assert!(out.contains("link pins"), "{out}");
    assert!(!pin.exists(), "pins left behind at {}", pin.display());
    let left = attached(&cgroup);
    assert!(!left.contains("lb_"), "programs still attached:\n{left}");
    // Detached: the same client is no longer translated.
    let after = fx.probe(WEB_IP, 3);
    assert_eq!(after.errors.get("ENETUNREACH"), Some(&3), "{after:?}");
    let dump = Command::new(AGENT_BIN)
        .args(["dump", "--pin-path"])
        .arg(&pin)
        .output()
        .unwrap();
    assert!(!dump.status.success());
}
