//! The deployment manifests against the binary: every flag the DaemonSet passes is one
//! the agent accepts, every ConfigMap key is used and every one used exists, the image
//! is the one `cargo xtask image` builds, and the kustomization lists every file. (CI
//! validates the same files against the Kubernetes schemas with kubernetes-validate.)

use std::{collections::BTreeSet, path::Path, process::Command};

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_lb-user");

fn deploy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn docs(text: &str) -> Vec<serde_yaml::Value> {
    text.split("\n---")
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect()
}

/// The `--help` text of `lb-user SUBCOMMAND`.
fn help(subcommand: &str) -> String {
    let out = Command::new(AGENT_BIN)
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lb-user {subcommand} is not a command"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn strs(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_flag_of_the_daemonset_is_one_the_agent_accepts() {
    let ds = &docs(&deploy("daemonset.yaml"))[0];
    let spec = &ds["spec"]["template"]["spec"];
    let mut containers: Vec<&serde_yaml::Value> = Vec::new();
    for list in ["initContainers", "containers"] {
        containers.extend(spec[list].as_sequence().unwrap().iter());
    }
    let mut used_keys = BTreeSet::new();
    for c in containers {
        assert_eq!(c["image"].as_str(), Some("localhost/lb-user:dev"));
        let args = strs(&c["args"]);
        let subcommand = &args[0];
        let help = help(subcommand);
        for arg in &args[1..] {
            let flag = arg.split('=').next().unwrap();
            assert!(
                flag.starts_with("--") && help.contains(&format!("{flag} ")),
                "lb-user {subcommand} does not take {flag} ({arg})"
            );
            // $(KEY) references: environment variables of the container.
            for part in arg.split("$(").skip(1) {
                used_keys.insert(part.split(')').next().unwrap().to_string());
            }
        }
    }
    let config = &docs(&deploy("config.yaml"))[0];
    let keys: BTreeSet<String> = config["data"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let downward = BTreeSet::from(["NODE_NAME".to_string(), "NODE_IP".to_string()]);
    let expected: BTreeSet<String> = keys.union(&downward).cloned().collect();
    assert_eq!(
        used_keys, expected,
        "ConfigMap keys and $(KEY) references differ"
    );
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let k: serde_yaml::Value = serde_yaml::from_str(&deploy("kustomization.yaml")).unwrap();
    let listed: BTreeSet<String> = strs(&k["resources"]).into_iter().collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/deploy");
    let files: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}

#[test]
fn the_cluster_role_grants_only_reads_of_what_the_agent_watches_and_events() {
    let rbac = docs(&deploy("rbac.yaml"));
    let role = rbac
        .iter()
        .find(|d| d["kind"].as_str() == Some("ClusterRole"))
        .unwrap();
    let mut grants = BTreeSet::new();
    for rule in role["rules"].as_sequence().unwrap() {
        for r in strs(&rule["resources"]) {
            for v in strs(&rule["verbs"]) {
                grants.insert(format!("{r}:{v}"));
            }
        }
    }
    let want: BTreeSet<String> = [
        "services:list",
        "services:watch",
        "nodes:list",
        "nodes:watch",
        "endpointslices:list",
        "endpointslices:watch",
        "events:create",
        "events:patch",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(grants, want);
}
