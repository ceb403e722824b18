//! The one recipe that builds lb-ebpf. Used by `cargo xtask build-ebpf` and, through
//! `#[path]`, by lb-user's build script, so both always build the programs the same way.
//! Only `std`: build scripts should not pull dependencies for this.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The target and the toolchain the kernel crate is built with.
pub const BPF_TARGET: &str = "bpfel-unknown-none";
pub const TOOLCHAIN: &str = "nightly";
/// Name of the object inside the target directory.
pub const EBPF_PACKAGE: &str = "lb-ebpf";
/// The feature of lb-ebpf that leaves out `bpf_set_retval` (kernels before 6.1).
pub const NO_SET_RETVAL: &str = "no-set-retval";
/// The objects' file names in the target directory (and in lb-user's OUT_DIR).
pub const OBJECT: &str = "lb-ebpf.o";
pub const OBJECT_NO_SET_RETVAL: &str = "lb-ebpf-no-set-retval.o";

/// The two objects one build makes from lb-ebpf.
#[derive(Debug)]
pub struct Objects {
    /// The programs as written.
    pub full: PathBuf,
    /// Built with [`NO_SET_RETVAL`]: for kernels whose sock_addr programs cannot call
    /// `bpf_set_retval` (before 6.1).
    pub no_set_retval: PathBuf,
}

/// What a fresh machine lacks, as one sentence that says how to fix it.
pub fn check_prerequisites() -> Result<(), String> {
    const FIX: &str = "run `cargo xtask setup` to install it";
    let sysroot = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run `rustup` ({e}); install rustup, then {FIX}"))?;
    if !sysroot.status.success() {
        return Err(format!("the {TOOLCHAIN} Rust toolchain is missing; {FIX}"));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Err(format!(
            "the `rust-src` component of the {TOOLCHAIN} toolchain is missing; {FIX}"
        ));
    }
    if find_in_path("bpf-linker").is_none() {
        return Err(format!("`bpf-linker` is not on PATH; {FIX}"));
    }
    Ok(())
}

/// Looks a program up on PATH (and in ~/.cargo/bin, where `cargo install` puts it).
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into_os_string()))
    {
        dirs.push(Path::new(&home).join("bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The kernel build's flags: BTF (it makes `bpftool map dump` print field names;
/// debuginfo is what BTF is made of), and a `--cfg` for each name in `LB_EBPF_CFG`
/// (comma-separated; the restart tests' second build uses `lb_upgrade_test`).
fn rustflags() -> String {
    let mut flags = vec!["-Cdebuginfo=2".to_string(), "-Clink-arg=--btf".to_string()];
    for cfg in std::env::var("LB_EBPF_CFG").unwrap_or_default().split(',') {
        if !cfg.trim().is_empty() {
            flags.extend(["--cfg".to_string(), cfg.trim().to_string()]);
        }
    }
    flags.join("\x1f")
}

/// Builds lb-ebpf (release, BTF) into `target_dir` twice, without and with the feature
/// [`NO_SET_RETVAL`], and returns the two objects' paths (copied to [`OBJECT`] and
/// [`OBJECT_NO_SET_RETVAL`] there: both builds write the same file). The second build
/// compiles only lb-ebpf again, its dependencies are shared. `workspace` is the
/// repository root.
pub fn build_ebpf(workspace: &Path, target_dir: &Path) -> Result<Objects, String> {
    check_prerequisites()?;
    Ok(Objects {
        full: build_one(workspace, target_dir, None, OBJECT)?,
        no_set_retval: build_one(
            workspace,
            target_dir,
            Some(NO_SET_RETVAL),
            OBJECT_NO_SET_RETVAL,
        )?,
    })
}

/// One build of lb-ebpf with `feature` (if any), its object copied to `target_dir/name`.
fn build_one(
    workspace: &Path,
    target_dir: &Path,
    feature: Option<&str>,
    name: &str,
) -> Result<PathBuf, String> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--release", "--package"])
        .arg(EBPF_PACKAGE)
        .args([
            "--target",
            BPF_TARGET,
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(target_dir)
        .args(feature.map(|f| ["--features", f]).into_iter().flatten())
        .current_dir(workspace.join(EBPF_PACKAGE))
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags());
    // A build script runs with the outer build's settings in its environment; none of
    // them may leak into the kernel build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    // cargo install puts bpf-linker in ~/.cargo/bin, which may not be on PATH.
    if let Some(dir) = find_in_path("bpf-linker").and_then(|l| l.parent().map(Path::to_path_buf)) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(dir).chain(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(dirs) {
            cmd.env("PATH", joined);
        }
    }
    // Nothing on stdout: in a build script, stdout is read by cargo as directives.
    cmd.stdout(std::process::Stdio::from(std::io::stderr()));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building {EBPF_PACKAGE} failed ({status}): {cmd:?}"
        ));
    }
    let object = target_dir
        .join(BPF_TARGET)
        .join("release")
        .join(EBPF_PACKAGE);
    if !object.is_file() {
        return Err(format!(
            "the build of {EBPF_PACKAGE} succeeded but {} is missing",
            object.display()
        ));
    }
    let dest = target_dir.join(name);
    std::fs::copy(&object, &dest)
        .map_err(|e| format!("copying {} to {}: {e}", object.display(), dest.display()))?;
    Ok(dest)
}
