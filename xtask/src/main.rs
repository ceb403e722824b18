//! `cargo xtask`: setup, builds, the demo and the test run.

mod ebpf_build;
mod image;
// The upgrade test's previous agent: one recipe, shared with that test.
#[path = "../../lb-user/tests/common/previous_agent.rs"]
mod previous_agent;
mod vm;

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (idempotent): nightly rust-src, bpf-linker, Debian packages.
    Setup,
    /// Build the eBPF programs (lb-ebpf, with BTF) into target/ebpf: the object as
    /// written and the one without bpf_set_retval (kernels before 6.1).
    BuildEbpf,
    /// Build everything: the eBPF programs and every host binary.
    Build,
    /// Run the demo: two nodes and an outside client in namespaces, an agent per node on
    /// manifests/examples/demo, and seven checked steps (DNS, ClusterIP, NodePort,
    /// LoadBalancer with externalTrafficPolicy Local, Ingress, a rolling update, dump).
    Demo {
        /// Run this step only (1-7), after the cluster is set up.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=7))]
        step: Option<u8>,
    },
    /// Run every test (unit and integration; needs root) and fail if none ran.
    Test {
        /// Instead: run the integration tests in a qemu guest that boots Debian's newest
        /// kernel of this series (e.g. 6.1), fetched by package name into target/kernels/.
        #[arg(long, value_name = "SERIES")]
        kernel: Option<String>,
        /// With --kernel: only this integration test binary (lb-user/tests/NAME.rs);
        /// repeatable.
        #[arg(long = "test", value_name = "NAME", requires = "kernel")]
        tests: Vec<String>,
    },
    /// cargo fmt --check and cargo clippy -D warnings over the workspace.
    Lint,
    /// The agent's image: a static binary on `FROM scratch`, built with podman, saved
    /// as an OCI archive to target/image/lb-user.oci.tar.
    Image,
    /// Benchmarks side by side with direct connections and kube-proxy's modes (root);
    /// the report goes to target/bench/. Arguments go to `lb-lab bench`.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Debian packages the tests and the demo use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "dnsmasq-base",
    "dnsutils",
    "iptables",
    "nftables",
    // The packet level's TTL test (a traceroute through a nodePort).
    "traceroute",
    // The image: a static (musl) build, and podman with the runc runtime.
    "musl-tools",
    "podman",
    "runc",
];

/// The workspace root, found at run time (`cargo locate-project --workspace` from the
/// current directory), never from the path xtask was compiled in: a copied checkout
/// whose target/ came along must build and test itself, not the original.
fn workspace() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let here = std::env::current_dir().unwrap_or_else(|_| ".".into());
        locate_workspace(&here).unwrap_or_else(|e| {
            eprintln!("xtask: {e:#}");
            std::process::exit(1)
        })
    })
    .clone()
}

/// The workspace that `dir` is in.
fn locate_workspace(dir: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .context("running `cargo locate-project --workspace`")?;
    if !out.status.success() {
        bail!("`cargo locate-project --workspace` failed: run cargo xtask inside the repository");
    }
    let manifest = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let root = manifest
        .parent()
        .context("the workspace manifest has no parent directory")?;
    if !root.join(ebpf_build::EBPF_PACKAGE).is_dir() {
        bail!(
            "{} is not this project's workspace (no {} in it): run cargo xtask inside the repository",
            root.display(),
            ebpf_build::EBPF_PACKAGE
        );
    }
    Ok(root.to_path_buf())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace());
    cmd
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root (it creates network namespaces and loads BPF programs); run it as root, e.g. `sudo -E cargo xtask ...`"
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => build_ebpf().map(|o| {
            println!("{}", o.full.display());
            println!("{}", o.no_set_retval.display());
        }),
        Cmd::Build => build(),
        Cmd::Demo { step } => demo(step),
        Cmd::Test { kernel: None, .. } => test(),
        Cmd::Test {
            kernel: Some(series),
            tests,
        } => vm::test(&series, &tests),
        Cmd::Lint => lint(),
        Cmd::Image => ensure_setup()
            .and_then(|()| image::image())
            .map(|p| println!("{}", p.display())),
        Cmd::Bench { args } => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn setup() -> anyhow::Result<()> {
    // 1. rust-src (for -Z build-std=core on bpfel-unknown-none) and clippy for the nightly
    //    toolchain. An installed nightly is kept as it is: updating it could move LLVM
    //    away from the version bpf-linker was built against.
    let nightly = || {
        output(Command::new("rustup").args(["run", ebpf_build::TOOLCHAIN, "rustc", "--version"]))
    };
    if nightly().is_none() {
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            ebpf_build::TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
    }
    status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "clippy",
        "--toolchain",
        ebpf_build::TOOLCHAIN,
    ]))?;
    // 2. bpf-linker, built against the nightly toolchain's own LLVM.
    install_bpf_linker()?;
    // 3. Debian packages.
    install_apt_packages(APT_PACKAGES)?;
    ebpf_build::check_prerequisites().map_err(anyhow::Error::msg)?;
    eprintln!("setup: everything is installed");
    Ok(())
}

/// Runs [`setup`] first when anything it installs is missing, so that on a fresh machine
/// `cargo xtask demo` and `cargo xtask test` are each one command.
fn ensure_setup() -> anyhow::Result<()> {
    let ready =
        ebpf_build::check_prerequisites().is_ok() && missing_apt_packages(APT_PACKAGES).is_empty();
    if ready {
        return Ok(());
    }
    eprintln!("xtask: installing what is missing first (`cargo xtask setup`)");
    setup()
}

fn install_bpf_linker() -> anyhow::Result<()> {
    if let Some(linker) = ebpf_build::find_in_path("bpf-linker")
        && output(Command::new(&linker).arg("--version")).is_some()
    {
        eprintln!("setup: {} is installed", linker.display());
        return Ok(());
    }
    let sysroot = output(Command::new("rustup").args([
        "run",
        ebpf_build::TOOLCHAIN,
        "rustc",
        "--print",
        "sysroot",
    ]))
    .context("cannot find the nightly toolchain's sysroot")?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", libdir.display()))?;
    // "libLLVM.so.22.1-rust-1.97.0-nightly" -> 22
    let major: String = llvm
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .trim_start_matches("libLLVM.so.")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    // The linker keeps an rpath to this directory: it must outlive the build (not /tmp).
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home).join(".local/share/lb/bpf-linker-llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("linking {} to {}", link.display(), llvm.display()))?;
    status(
        cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// The Debian packages of `packages` that are not installed.
fn missing_apt_packages(packages: &[&'static str]) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect()
}

fn install_apt_packages(packages: &[&'static str]) -> anyhow::Result<()> {
    let missing = missing_apt_packages(packages);
    if missing.is_empty() {
        eprintln!("setup: Debian packages {packages:?} are installed");
        return Ok(());
    }
    require_root("installing Debian packages")?;
    status(Command::new("apt-get").args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn build_ebpf() -> anyhow::Result<ebpf_build::Objects> {
    let ws = workspace();
    ebpf_build::build_ebpf(&ws, &ws.join("target/ebpf")).map_err(anyhow::Error::msg)
}

fn build() -> anyhow::Result<()> {
    let objects = build_ebpf()?;
    eprintln!(
        "eBPF objects: {} and {}",
        objects.full.display(),
        objects.no_set_retval.display()
    );
    // The host binaries: every member but the kernel crate, which only builds for BPF
    // (lb-user's build script builds it, with build_ebpf's recipe).
    status(cargo().args([
        "build",
        "--workspace",
        "--exclude",
        ebpf_build::EBPF_PACKAGE,
        "--bins",
    ]))
}

/// The agent and the lab binaries, which the demo and the benchmarks run.
fn build_lab(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--quiet", "--bins"])
        .args(["--package", "lb-user", "--package", "lb-lab"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)
}

/// `lb-lab demo` on manifests/examples/demo, all steps or `--step N`.
fn demo(step: Option<u8>) -> anyhow::Result<()> {
    require_root("the demo")?;
    ensure_setup()?;
    build_lab(false)?;
    let ws = workspace();
    let mut cmd = Command::new(ws.join("target/debug/lb-lab"));
    cmd.args(["demo", "--manifests", "manifests/examples/demo"])
        .current_dir(&ws);
    if let Some(n) = step {
        cmd.args(["--step", &n.to_string()]);
    }
    status(&mut cmd)
}

/// Release build, then `lb-lab bench ARGS` (sizes, rounds, ...; `--help` lists them).
fn bench(args: &[String]) -> anyhow::Result<()> {
    require_root("the benchmarks")?;
    ensure_setup()?;
    build_lab(true)?;
    let ws = workspace();
    status(
        Command::new(ws.join("target/release/lb-lab"))
            .arg("bench")
            .args(args)
            .current_dir(&ws),
    )
}

fn lint() -> anyhow::Result<()> {
    status(cargo().args(["fmt", "--all", "--check"]))?;
    // The default members: every host crate (lb-ebpf only builds for BPF, below).
    status(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The kernel crate is not a default member and only builds for the BPF target; both
    // of its objects (with and without bpf_set_retval).
    for features in [None, Some(ebpf_build::NO_SET_RETVAL)] {
        status(
            Command::new("rustup")
                .args(["run", ebpf_build::TOOLCHAIN, "cargo", "clippy", "--release"])
                .args(["--target", ebpf_build::BPF_TARGET, "-Z", "build-std=core"])
                .args(features.map(|f| ["--features", f]).into_iter().flatten())
                .args(["--", "-D", "warnings"])
                .current_dir(workspace().join(ebpf_build::EBPF_PACKAGE))
                .env_remove("RUSTC")
                .env_remove("CARGO"),
        )?;
    }
    Ok(())
}

/// What the integration tests need besides the workspace's binaries, as the environment
/// they read: the image's archive and podman settings (the image test), the upgrade
/// test's second agent, whose kernel programs differ, and the previous version's agent
/// (`LB_PREVIOUS_AGENT`, left unset with the reason printed when the git history lacks
/// that version). Builds them.
fn test_env() -> anyhow::Result<Vec<(&'static str, OsString)>> {
    let archive = image::image()?;
    let target = workspace().join("target");
    // First: both builds leave their binary at upgrade-variant/debug/lb-user, and the
    // previous agent is copied away from there before the variant build.
    let previous = match previous_agent::has_previous_version(&workspace()) {
        Ok(()) => Some(
            previous_agent::build_previous_agent(&workspace(), &target)
                .map_err(anyhow::Error::msg)?,
        ),
        Err(why) => {
            eprintln!("xtask: the upgrade test from the previous version will skip: {why}");
            None
        }
    };
    let variant = target.join("upgrade-variant");
    status(
        cargo()
            .args(["build", "--quiet", "--package", "lb-user", "--target-dir"])
            .arg(&variant)
            .env("LB_EBPF_CFG", "lb_upgrade_test"),
    )?;
    let mut env = vec![
        ("LB_UPGRADE_AGENT", variant.join("debug/lb-user").into()),
        ("LB_IMAGE_ARCHIVE", archive.into()),
        ("LB_CONTAINERS_CONF", image::containers_conf()?.into()),
    ];
    if let Some(path) = previous {
        env.push(("LB_PREVIOUS_AGENT", path.into()));
    }
    Ok(env)
}

/// The tests that a line of test output says passed:
/// "test result: ok. 20 passed; 0 failed; ..." -> 20.
fn count_passed(line: &str) -> usize {
    line.strip_prefix("test result: ")
        .and_then(|rest| rest.split(". ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// XDP modes the packet-level tests run in once more each, after the whole suite (which
/// runs them with tc only): `LB_TEST_ACCELERATION` of the [`PACKET_TESTS`].
const PACKET_TEST_MODES: [&str; 2] = ["native", "generic"];

/// The test binaries of the packet level (lb-user's `tests/NAME.rs`).
const PACKET_TESTS: [&str; 2] = ["packet", "maglev"];

fn test() -> anyhow::Result<()> {
    require_root("`cargo xtask test`")?;
    ensure_setup()?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .envs(test_env()?);
    let mut passed = run_tests(&mut cmd)?;
    for mode in PACKET_TEST_MODES {
        let mut cmd = cargo();
        // `--workspace`, as the whole suite: the same features, so the same test
        // binaries, not a rebuild of lb-user's for its own feature set.
        cmd.args(["test", "--workspace"])
            .args(PACKET_TESTS.iter().flat_map(|t| ["--test", t]))
            .env("LB_TEST_ACCELERATION", mode);
        passed += run_tests(&mut cmd)?;
    }
    eprintln!("xtask test: {passed} tests passed");
    Ok(())
}

/// Runs a `cargo test` command, its output shown as it comes: how many tests passed.
/// Fails when one failed or none ran.
fn run_tests(cmd: &mut Command) -> anyhow::Result<usize> {
    cmd.stdout(Stdio::piped());
    eprintln!("+ {cmd:?}");
    let mut child = cmd.spawn().context("cannot run cargo test")?;
    let mut passed = 0usize;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        passed += count_passed(&line);
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("tests failed ({st})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_is_the_one_around_the_current_directory() {
        let root = std::env::temp_dir().join(format!("lb-xtask-ws-{}", std::process::id()));
        let sub = root.join("lb-user/src");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::create_dir_all(root.join(ebpf_build::EBPF_PACKAGE)).unwrap();
        std::fs::write(root.join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
        let found = locate_workspace(&sub);
        // A workspace that is not ours is refused, not used.
        std::fs::remove_dir(root.join(ebpf_build::EBPF_PACKAGE)).unwrap();
        let foreign = locate_workspace(&sub);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found.unwrap(), root);
        assert!(foreign.is_err());
    }
}
