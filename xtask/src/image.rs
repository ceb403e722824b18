//! `cargo xtask image`: the agent as a static binary (musl) in an image on `FROM scratch`,
//! built with podman and saved as an OCI archive under target/image/.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{cargo, output, status, workspace};

/// The static target the image's binary is built for.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The image's name, as `podman load` gives it back.
pub const IMAGE: &str = "localhost/lb-user:dev";

/// Where the image's files go.
pub fn image_dir() -> PathBuf {
    workspace().join("target/image")
}

/// The OCI archive `cargo xtask image` writes.
pub fn archive() -> PathBuf {
    image_dir().join("lb-user.oci.tar")
}

/// podman's settings on these machines: the runc runtime, and ulimits the VM allows.
/// Written next to the image; every podman call here points `CONTAINERS_CONF` at it.
pub fn containers_conf() -> anyhow::Result<PathBuf> {
    let path = image_dir().join("containers.conf");
    std::fs::create_dir_all(image_dir())?;
    std::fs::write(
        &path,
        "# Written by cargo xtask image.\n[containers]\n\
         default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
         [engine]\nruntime = \"runc\"\n",
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `podman ARGS` with our containers.conf.
pub fn podman(conf: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf);
    cmd
}

/// Builds the static binary, the image, and its archive; returns the archive's path.
pub fn image() -> anyhow::Result<PathBuf> {
    if !output(Command::new("rustup").args(["target", "list", "--installed"]))
        .is_some_and(|t| t.lines().any(|l| l.trim() == MUSL_TARGET))
    {
        status(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }
    status(
        cargo()
            .args([
                "build",
                "--release",
                "--package",
                "lb-user",
                "--target",
                MUSL_TARGET,
            ])
            .env(format!("CC_{}", MUSL_TARGET.replace('-', "_")), "musl-gcc"),
    )?;
    let binary = workspace().join(format!("target/{MUSL_TARGET}/release/lb-user"));
    let context = image_dir().join("context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&binary, context.join("lb-user"))
        .with_context(|| format!("copying {}", binary.display()))?;
    let conf = containers_conf()?;
    status(
        podman(&conf)
            .args(["build", "--file"])
            .arg(workspace().join("Containerfile"))
            .args(["--tag", IMAGE])
            .arg(&context),
    )?;
    let archive = archive();
    let _ = std::fs::remove_file(&archive);
    status(
        podman(&conf)
            .args(["save", "--format", "oci-archive", "--output"])
            .arg(&archive)
            .arg(IMAGE),
    )?;
    eprintln!("image: {IMAGE}, saved to {}", archive.display());
    Ok(archive)
}
