//! `cargo xtask demo` as CI runs it: `lb-lab demo` on manifests/examples/demo, every
//! step checked by the demo itself (it exits non-zero when a step does not show what it
//! says), and nothing left behind. Needs root.

mod common;

use std::{path::Path, process::Command};

use common::{AGENT_BIN, lab_bin, require_root};

/// `lb-lab demo ARGS` from the repository root: whether it succeeded, its output, its PID.
fn demo(args: &[&str]) -> (bool, String, u32) {
    demo_on("manifests/examples/demo", args)
}

/// [`demo`] on the manifests in `manifests`.
fn demo_on(manifests: &str, args: &[&str]) -> (bool, String, u32) {
    require_root();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace");
    let child = Command::new(lab_bin())
        .args(["demo", "--manifests", manifests, "--agent", AGENT_BIN])
        .args(args)
        .current_dir(root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting lb-lab demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("lb-lab demo's output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, pid)
}

/// The namespaces a demo run (its PID) left.
fn left_behind(pid: u32) -> Vec<String> {
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| {
            l.starts_with(&format!("lbdemo-{pid}-")) || l.contains(&format!("demo0-{pid}-"))
        })
        .map(String::from)
        .collect()
}

#[test]
fn the_demo_runs_every_step_and_each_is_checked() {
    let (ok, out, pid) = demo(&[]);
    assert!(ok, "the demo failed:\n{out}");
    for n in 1..=7 {
        assert!(
            out.contains(&format!("\n[{n}/7] ")),
            "step {n} missing:\n{out}"
        );
    }
    let checked = out.matches("CHECKED: ").count();
    assert!(checked >= 20, "{checked} checks:\n{out}");
    assert!(!out.contains("NOT as claimed"), "{out}");
    assert_eq!(left_behind(pid), Vec::<String>::new(), "{out}");
}

#[test]
fn one_step_runs_alone() {
    let (ok, out, pid) = demo(&["--step", "4"]);
    assert!(ok, "the demo's step 4 failed:\n{out}");
    assert!(out.contains("\n[4/7] "), "{out}");
    assert!(
        !out.contains("\n[3/7] ") && !out.contains("\n[5/7] "),
        "{out}"
    );
    assert_eq!(out.matches("CHECKED: ").count(), 4, "{out}");
    assert_eq!(left_behind(pid), Vec::<String>::new(), "{out}");
}

#[test]
fn a_step_that_does_not_show_what_it_says_fails_the_demo() {
    // The api pod said to be on node 1 (it is on node 0): node 0 then has no local
    // endpoint for the LoadBalancer IP and drops what the client sends it.
    let dir = std::env::temp_dir().join(format!("lb-demo-wrong-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for entry in std::fs::read_dir(root.join("manifests/examples/demo")).unwrap() {
        let path = entry.unwrap().path();
        let mut text = std::fs::read_to_string(&path).unwrap();
        if path.file_name().unwrap() == "api.yaml" {
            text = text.replace("nodeName: node-0", "nodeName: node-1");
        }
        std::fs::write(dir.join(path.file_name().unwrap()), text).unwrap();
    }
    let (ok, out, pid) = demo_on(dir.to_str().unwrap(), &["--step", "4"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!ok, "the demo passed a wrong step 4:\n{out}");
    assert!(
        out.contains("step 4 of 7: NOT as claimed: 20 of 20 answered by n0-pod-2"),
        "{out}"
    );
    assert_eq!(left_behind(pid), Vec::<String>::new(), "{out}");
}
