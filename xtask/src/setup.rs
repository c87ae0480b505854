//! `cargo xtask setup`: installs what the build and the tests need, skipping
//! whatever is already there. Safe to run any number of times.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::run::{capture, cmd, describe, run};

/// The bpf-linker release that works with this machine's nightly: 0.10.x
/// loads the nightly's own libLLVM at run time; 0.11+ wants a system LLVM
/// 21-23 that Debian does not ship.
pub const BPF_LINKER_VERSION: &str = "0.10.3";

/// Debian packages the build or the tests need. Add names here: `setup` runs
/// `apt-get update` once and installs only the ones `dpkg-query` reports
/// missing.
pub const DEBIAN_PACKAGES: &[&str] = &[
    // promtool and the Prometheus server: the metrics tests check /metrics
    // with `promtool check metrics` and scrape it with a real Prometheus.
    "prometheus",
    // trafgen: the generator `cargo xtask bench peer` compares xlb's pktgen with.
    "netsniff-ng",
    // protoc: etcd-client generates its gRPC code from .proto files at build time.
    "protobuf-compiler",
    // ...and the well-known types (google/protobuf/*.proto) its files import.
    "libprotobuf-dev",
    // The fleet tests start a real etcd on loopback (`xlb run --store etcd://...`).
    "etcd-server",
];

const BPFFS: &str = "/sys/fs/bpf";

/// What the setup is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Building only: a bpffs that cannot be mounted is only a warning.
    Build,
    /// Loading programs (tests, demo, benchmarks): everything is required.
    Run,
}

pub fn setup(purpose: Purpose) -> Result<()> {
    step("setup: checking the build's prerequisites");
    add_cargo_bin_to_path();
    check_rustup()?;
    check_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_debian_packages(DEBIAN_PACKAGES)?;
    if let Err(err) = ensure_bpffs() {
        match purpose {
            Purpose::Run => return Err(err),
            // The build does not touch bpffs; only loading programs does.
            Purpose::Build => eprintln!("warning: {err:#}"),
        }
    }
    step("setup: done");
    Ok(())
}

fn step(msg: &str) {
    eprintln!("xtask: {msg}");
}

pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
}

/// `cargo install` puts bpf-linker in `$CARGO_HOME/bin`; make sure this run
/// (and the cargo builds it starts) finds it there even if the shell's PATH
/// lacks that directory.
fn add_cargo_bin_to_path() {
    let Some(bin) = cargo_home().map(|h| h.join("bin")) else {
        return;
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let joined: OsString =
        std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(&path)))
            .unwrap_or(path);
    step(&format!("adding {} to PATH for this run", bin.display()));
    // SAFETY: xtask is single-threaded; nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("PATH", joined) };
}

fn check_rustup() -> Result<()> {
    if which::which("rustup").is_ok() {
        return Ok(());
    }
    bail!(
        "rustup is not installed (xlb needs stable for userspace and nightly for the eBPF crate). \
         Install it with:\n  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y\n\
         then run:\n  rustup toolchain install nightly --component rust-src"
    )
}

/// The eBPF crate is built with `rustup run nightly cargo`, i.e. the
/// toolchain named plain `nightly` (not a dated one).
fn check_nightly() -> Result<()> {
    let out = capture(&mut cmd("rustup", &["toolchain", "list"]))?;
    let list = String::from_utf8_lossy(&out.stdout);
    let has_nightly = list.lines().any(|line| {
        line.strip_prefix("nightly-")
            .and_then(|rest| rest.chars().next())
            .is_some_and(|c| !c.is_ascii_digit())
    });
    if has_nightly {
        step("nightly toolchain: present");
        return Ok(());
    }
    bail!(
        "the nightly toolchain is not installed (the eBPF crate needs it). Run:\n  \
         rustup toolchain install nightly --component rust-src"
    )
}

fn nightly_has_rust_src() -> Result<bool> {
    let out = capture(&mut cmd(
        "rustup",
        &["run", "nightly", "rustc", "--print", "sysroot"],
    ))?;
    if !out.status.success() {
        bail!(
            "`rustup run nightly rustc --print sysroot` failed ({}); is the nightly toolchain \
             complete? Run:\n  rustup toolchain install nightly --component rust-src",
            describe(out.status)
        );
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // The same test as lb-userspace's build script.
    Ok(Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists())
}

fn ensure_rust_src() -> Result<()> {
    if nightly_has_rust_src()? {
        step("nightly rust-src: present");
        return Ok(());
    }
    step("nightly rust-src: missing (needed for -Z build-std=core), installing");
    run(&mut cmd(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    ))
    .context(
        "could not install rust-src (no network?). When online, run:\n  \
         rustup component add rust-src --toolchain nightly",
    )?;
    if !nightly_has_rust_src()? {
        bail!("rust-src was installed but the nightly sysroot still lacks library/core");
    }
    Ok(())
}

/// The version bpf-linker on PATH reports, or None when there is none.
fn bpf_linker_version() -> Result<Option<String>> {
    if which::which("bpf-linker").is_err() {
        return Ok(None);
    }
    let out = capture(&mut cmd("bpf-linker", &["--version"]))?;
    if !out.status.success() {
        return Ok(Some(format!("unknown ({})", describe(out.status))));
    }
    // "bpf-linker 0.10.3"
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(Some(
        text.split_whitespace()
            .nth(1)
            .unwrap_or("unknown")
            .to_owned(),
    ))
}

fn ensure_bpf_linker() -> Result<()> {
    match bpf_linker_version()? {
        Some(v) if v == BPF_LINKER_VERSION => {
            step(&format!("bpf-linker {v}: present"));
            return Ok(());
        }
        Some(v) => step(&format!(
            "bpf-linker {v} found, {BPF_LINKER_VERSION} needed: installing (one to three minutes)"
        )),
        None => step(&format!(
            "bpf-linker: missing, installing {BPF_LINKER_VERSION} (one to three minutes)"
        )),
    }
    let install = format!("cargo install bpf-linker --version {BPF_LINKER_VERSION} --locked");
    run(&mut cmd(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ],
    ))
    .with_context(|| {
        format!("could not install bpf-linker (no network?). When online, run:\n  {install}")
    })?;
    match bpf_linker_version()? {
        Some(v) if v == BPF_LINKER_VERSION => {
            step(&format!("bpf-linker {v}: installed"));
            Ok(())
        }
        found => {
            let at = which::which("bpf-linker")
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "nowhere on PATH".to_owned());
            Err(anyhow!(
                "after `{install}`, bpf-linker on PATH is {} (at {at}): put {} first in PATH",
                found.as_deref().unwrap_or("missing"),
                cargo_home().map_or("$CARGO_HOME/bin".to_owned(), |h| h
                    .join("bin")
                    .display()
                    .to_string()),
            ))
        }
    }
}

fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let list = packages.join(" ");
    if which::which("dpkg-query").is_err() {
        bail!("not a Debian system (no dpkg-query): install these packages yourself: {list}");
    }
    let mut args = vec!["-W", "-f=${Package} ${db:Status-Status}\\n"];
    args.extend_from_slice(packages);
    // dpkg-query exits 1 when some package is unknown; the output still
    // lists the known ones.
    let out = capture(&mut cmd("dpkg-query", &args))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_suffix(" installed"))
        .map(|name| name.split(':').next().unwrap_or(name))
        .collect();
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect();
    if missing.is_empty() {
        step(&format!("Debian packages: all present ({list})"));
        return Ok(());
    }
    let missing_list = missing.join(" ");
    let fix =
        format!("apt-get update && apt-get install -y --no-install-recommends {missing_list}");
    if !is_root() {
        bail!("missing Debian packages: {missing_list}. As root, run:\n  {fix}");
    }
    step(&format!(
        "Debian packages missing: {missing_list}, installing"
    ));
    run(cmd("apt-get", &["update"]).env("DEBIAN_FRONTEND", "noninteractive")).with_context(
        || format!("apt-get update failed (no network?). When online, run:\n  {fix}"),
    )?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend_from_slice(&missing);
    run(cmd("apt-get", &install).env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("could not install Debian packages. Run:\n  {fix}"))
}

/// Makes sure `toolchain` (None: the one `cargo` runs, i.e. the active one)
/// has `components`, adding the missing ones with rustup.
pub fn ensure_components(toolchain: Option<&str>, components: &[&str]) -> Result<()> {
    let mut list = vec!["component", "list", "--installed"];
    if let Some(t) = toolchain {
        list.extend(["--toolchain", t]);
    }
    let out = capture(&mut cmd("rustup", &list))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Lines look like "clippy-x86_64-unknown-linux-gnu" or "rust-src".
    let missing: Vec<&str> = components
        .iter()
        .copied()
        .filter(|c| {
            !text
                .lines()
                .any(|l| l == *c || l.strip_prefix(c).is_some_and(|r| r.starts_with('-')))
        })
        .collect();
    let name = toolchain.unwrap_or("active");
    if missing.is_empty() {
        step(&format!(
            "{name} toolchain components: {} present",
            components.join(", ")
        ));
        return Ok(());
    }
    let mut add = vec!["component", "add"];
    add.extend_from_slice(&missing);
    if let Some(t) = toolchain {
        add.extend(["--toolchain", t]);
    }
    let fix = format!("rustup {}", add.join(" "));
    run(&mut cmd("rustup", &add)).with_context(|| {
        format!(
            "could not add {} (no network?). Run:\n  {fix}",
            missing.join(", ")
        )
    })
}

fn bpffs_mounted() -> Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next(), fields.next(), fields.next());
        dir == Some(BPFFS) && fstype == Some("bpf")
    }))
}

fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted()? {
        step(&format!("bpffs at {BPFFS}: mounted"));
        return Ok(());
    }
    let fix = format!("mount -t bpf bpf {BPFFS}");
    if !is_root() {
        bail!("bpffs is not mounted at {BPFFS} and mounting needs root. Run:\n  sudo {fix}");
    }
    step(&format!("bpffs at {BPFFS}: not mounted, mounting"));
    run(&mut cmd("mount", &["-t", "bpf", "bpf", BPFFS]))
        .with_context(|| format!("could not mount bpffs. Run:\n  {fix}"))
}
