//! Builds the XDP object from `lb-ebpf` on every build of the controller, so
//! that `cargo build` and `cargo test` never embed a stale data plane.

use std::process::Command;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    check_toolchain()?;
    let metadata = cargo_metadata_root()?;
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: &format!("{metadata}/lb-ebpf"),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

fn cargo_metadata_root() -> anyhow::Result<String> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("lb-userspace has no parent directory"))?;
    Ok(root.display().to_string())
}

/// Fails early, with the command that fixes it, where the eBPF toolchain is
/// incomplete: otherwise cargo's own error is a linker failure deep inside
/// the nested build.
fn check_toolchain() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    if which::which("bpf-linker").is_err() {
        return Err(anyhow!(
            "bpf-linker is not installed. Run `cargo xtask build` (it installs it), \
             or: cargo install bpf-linker --version 0.10.3 --locked"
        ));
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("running `rustup run nightly rustc`: is the nightly toolchain installed?")?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    let core_src = std::path::Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if !core_src.exists() {
        return Err(anyhow!(
            "the nightly toolchain lacks rust-src. Run `cargo xtask build` (it installs it), \
             or: rustup component add rust-src --toolchain nightly"
        ));
    }
    Ok(())
}
