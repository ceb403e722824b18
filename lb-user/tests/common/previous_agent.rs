//! The previous version's agent, which the upgrade test (tests/upgrade.rs) starts from:
//! the source of [`PREVIOUS_VERSION`] taken from git history (`git archive`, no worktree
//! registered) and built with `cargo build -p lb-user`. One recipe, used by that test and,
//! through `#[path]`, by `cargo xtask test` (which hands it over as `LB_PREVIOUS_AGENT`).
//! Only `std`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The commit whose agent the upgrade test replaces: 910d406 is the last before 741e597
/// renamed the packet level's maps (LB_TC_IFACES_V2 -> LB_IFACES_V3, LB_COUNTERS_V4 ->
/// LB_COUNTERS_V5), so the test upgrades across that layout change. Move it forward to
/// the last commit before the next layout change when one lands.
pub const PREVIOUS_VERSION: &str = "910d406";

/// Where the previous agent's binary goes: `<target>/upgrade-from/lb-user-<commit>`.
pub fn previous_agent_path(target: &Path) -> PathBuf {
    target
        .join("upgrade-from")
        .join(format!("lb-user-{PREVIOUS_VERSION}"))
}

/// Whether `repo`'s git history holds [`PREVIOUS_VERSION`]; the reason when it does not
/// (no git, an archive without history, a shallow clone).
pub fn has_previous_version(repo: &Path) -> Result<(), String> {
    let spec = format!("{PREVIOUS_VERSION}^{{commit}}");
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["cat-file", "-e", &spec])
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.success() {
        return Err(format!(
            "commit {PREVIOUS_VERSION} is not in the git history of {} (an archive or a \
             shallow clone)",
            repo.display()
        ));
    }
    Ok(())
}

/// The previous version's agent, built once: kept at [`previous_agent_path`] and reused.
///
/// The source goes to `<target>/upgrade-from/src-<commit>` and builds with `--target-dir
/// <target>/upgrade-variant`, which already holds every dependency compiled (the
/// upgrade-variant build's), so only the workspace crates and the kernel programs build.
/// The copy's workspace version becomes `0.1.0-<commit>`: cargo names a path crate's
/// artifacts by its path inside its workspace, which is the same in both copies, so
/// without another version the two builds would share (and overwrite) the same files.
/// Run it before the upgrade-variant build, whose binary takes the shared
/// `upgrade-variant/debug/lb-user` back.
pub fn build_previous_agent(repo: &Path, target: &Path) -> Result<PathBuf, String> {
    let binary = previous_agent_path(target);
    if binary.is_file() {
        return Ok(binary);
    }
    has_previous_version(repo)?;
    let src = target
        .join("upgrade-from")
        .join(format!("src-{PREVIOUS_VERSION}"));
    extract(repo, &src)?;
    set_version(&src.join("Cargo.toml"))?;
    let variant = target.join("upgrade-variant");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .args(["build", "--quiet", "--package", "lb-user", "--target-dir"])
        .arg(&variant)
        .current_dir(&src)
        // The kernel programs as that version built them, no test variant's cfg.
        .env_remove("LB_EBPF_CFG")
        .env_remove("CARGO_TARGET_DIR");
    eprintln!("building the previous agent ({PREVIOUS_VERSION}): {build:?}");
    let status = build
        .status()
        .map_err(|e| format!("running {}: {e}", cargo.to_string_lossy()))?;
    if !status.success() {
        return Err(format!("{build:?} failed ({status})"));
    }
    let built = variant.join("debug/lb-user");
    let partial = binary.with_extension("partial");
    std::fs::copy(&built, &partial)
        .and_then(|_| std::fs::rename(&partial, &binary))
        .map_err(|e| format!("copying {} to {}: {e}", built.display(), binary.display()))?;
    let _ = std::fs::remove_dir_all(&src);
    Ok(binary)
}

/// `git archive PREVIOUS_VERSION | tar -x -C src`, into an emptied `src`.
fn extract(repo: &Path, src: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(src);
    std::fs::create_dir_all(src).map_err(|e| format!("creating {}: {e}", src.display()))?;
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", PREVIOUS_VERSION])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git archive: {e}"))?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(src)
        .stdin(archive.stdout.take().expect("piped"))
        .status()
        .map_err(|e| format!("cannot run tar: {e}"));
    let git = archive
        .wait()
        .map_err(|e| format!("waiting for git archive: {e}"))?;
    let tar = tar?;
    if !git.success() || !tar.success() {
        return Err(format!(
            "git archive {PREVIOUS_VERSION} | tar -x -C {} failed (git {git}, tar {tar})",
            src.display()
        ));
    }
    Ok(())
}

/// Sets `[workspace.package] version` of the manifest at `path` to `0.1.0-<commit>` (see
/// [`build_previous_agent`]).
fn set_version(path: &Path) -> Result<(), String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let (head, section) = text
        .split_once("[workspace.package]\n")
        .ok_or_else(|| format!("{}: no [workspace.package]", path.display()))?;
    let line = section
        .lines()
        .take_while(|l| !l.starts_with('['))
        .find(|l| l.starts_with("version = \""))
        .ok_or_else(|| format!("{}: [workspace.package] has no version", path.display()))?;
    let version = line
        .trim_start_matches("version = \"")
        .trim_end_matches('"');
    let tagged = format!("version = \"{version}-{PREVIOUS_VERSION}\"");
    let section = section.replacen(line, &tagged, 1);
    std::fs::write(path, format!("{head}[workspace.package]\n{section}"))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}
