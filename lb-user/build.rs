//! Builds the eBPF programs (lb-ebpf) with the same recipe as `cargo xtask build-ebpf`
//! and leaves the two objects (with and without `bpf_set_retval`) in OUT_DIR, from where
//! the agent embeds them.

#[path = "../xtask/src/ebpf_build.rs"]
mod ebpf_build;

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("lb-user lives in the workspace")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    for dir in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
        "xtask/src/ebpf_build.rs",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=LB_EBPF_CFG");
    // Both objects (with and without bpf_set_retval); the loader embeds both.
    match ebpf_build::build_ebpf(&workspace, &out_dir.join("ebpf-target")) {
        Ok(objects) => {
            for (object, name) in [
                (&objects.full, ebpf_build::OBJECT),
                (&objects.no_set_retval, ebpf_build::OBJECT_NO_SET_RETVAL),
            ] {
                let dest = out_dir.join(name);
                std::fs::copy(object, &dest).unwrap_or_else(|e| {
                    panic!("copying {} to {}: {e}", object.display(), dest.display())
                });
            }
        }
        Err(msg) => {
            println!("cargo:warning={msg}");
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}
