//! `cargo xtask`: xlb's one entry point for setting up, building, testing,
//! linting, benchmarking and running the demo.

mod run;
mod setup;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::run::{cmd, describe, exec, exit_code, run, status};
use crate::setup::{Purpose, ensure_components, is_root, setup};

/// The eBPF crate only builds for bpfel-unknown-none (lb-userspace's build
/// script builds it); a host build of it fails, and its `xlb` bin would
/// collide with the controller's target/release/xlb.
const EBPF_CRATE: &str = "lb-ebpf";

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test and run xlb"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build needs (nightly rust-src, bpf-linker 0.10.3),
    /// mount bpffs; skips whatever is already there.
    Setup,
    /// Setup, then build everything in release mode (this includes the XDP
    /// object, embedded in target/release/xlb).
    Build,
    /// Setup, then run the whole test suite in release mode (needs root).
    ///
    /// ARGS go to `cargo test` as they are, e.g.
    /// `cargo xtask test maglev -- --nocapture` (all crates) or
    /// `cargo xtask test -p xlb-tests -- --nocapture` (one crate).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build, then run `target/release/xlb demo ARGS` (needs root).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Setup, then run a benchmark: `cargo run --release -p xlb-bench -- NAME ARGS`.
    Bench {
        /// Benchmark name, then its arguments.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "NAME [ARGS]"
        )]
        args: Vec<OsString>,
    },
    /// Check formatting (rustfmt) and lints (clippy, warnings are errors),
    /// for the userspace crates and for the eBPF crate on its own target.
    Lint,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup(Purpose::Run).map(|()| ExitCode::SUCCESS),
        Cmd::Build => build().map(|_| ExitCode::SUCCESS),
        Cmd::Test { .. } => test(raw_args_after("test")),
        Cmd::Demo { args } => demo(args),
        Cmd::Bench { args } => bench(args),
        Cmd::Lint => lint().map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // The context (what failed, and the command that fixes it)
            // first, then its causes; no backtrace.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Where this workspace lives (xtask's parent), so commands work from any
/// subdirectory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::env::current_dir().unwrap_or_default().join(dir),
        None => workspace_root().join("target"),
    }
}

/// The arguments after the subcommand exactly as given. clap would drop a
/// leading `--`, which for `cargo test` means "arguments for the test
/// binaries" (`cargo xtask test -- --nocapture`).
fn raw_args_after(subcommand: &str) -> Vec<OsString> {
    let mut args = std::env::args_os().skip(1);
    match args.next() {
        Some(first) if first == subcommand => args.collect(),
        _ => Vec::new(),
    }
}

fn build() -> Result<PathBuf> {
    setup(Purpose::Build)?;
    run(&mut cmd(
        "cargo",
        &["build", "--release", "--workspace", "--exclude", EBPF_CRATE],
    ))?;
    let bin = target_dir().join("release/xlb");
    if !bin.exists() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    let shown = bin.strip_prefix(workspace_root()).unwrap_or(&bin);
    println!("xlb built: {} (XDP object embedded)", shown.display());
    Ok(bin)
}

fn test(args: Vec<OsString>) -> Result<ExitCode> {
    if !is_root() {
        bail!(
            "xlb's tests load XDP programs and create network namespaces, so they run as root; \
             run `cargo xtask test` in a root shell (e.g. `sudo -i`)"
        );
    }
    setup(Purpose::Run)?;
    let mut c = cmd("cargo", &["test"]);
    // `--workspace` would override a `-p` given by the user.
    if !selects_packages(&args) {
        c.args(["--workspace", "--exclude", EBPF_CRATE]);
    }
    c.arg("--release").args(args);
    let st = status(&mut c)?;
    if !st.success() {
        eprintln!("error: `{}` failed ({})", run::display(&c), describe(st));
    }
    Ok(ExitCode::from(exit_code(st).clamp(0, 255) as u8))
}

/// Whether cargo arguments (before any `--`) name packages themselves.
fn selects_packages(args: &[OsString]) -> bool {
    args.iter()
        .map(|a| a.to_string_lossy())
        .take_while(|a| a != "--")
        .any(|a| a == "--package" || a.starts_with("--package=") || a.starts_with("-p"))
}

fn demo(args: Vec<OsString>) -> Result<ExitCode> {
    let bin = build()?;
    let mut c = cmd(&bin, &["demo"]);
    c.args(args);
    // exec: Ctrl-C goes straight to the demo, which then removes its
    // namespaces, and its exit code is ours.
    Err(exec(&mut c))
}

fn bench(args: Vec<OsString>) -> Result<ExitCode> {
    setup(Purpose::Run)?;
    let mut c = cmd("cargo", &["run", "--release", "-p", "xlb-bench", "--"]);
    c.args(args);
    Err(exec(&mut c))
}

fn lint() -> Result<()> {
    // Clippy runs lb-userspace's build script, which builds the eBPF object.
    setup(Purpose::Build)?;
    ensure_components(None, &["rustfmt", "clippy"])?;
    ensure_components(Some("nightly"), &["clippy"])?;
    let checks: [(&str, Vec<&str>); 3] = [
        ("cargo", vec!["fmt", "--all", "--", "--check"]),
        (
            "cargo",
            vec![
                "clippy",
                "--workspace",
                "--exclude",
                EBPF_CRATE,
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        // The eBPF crate, linted for the target it is built for.
        (
            "rustup",
            vec![
                "run",
                "nightly",
                "cargo",
                "clippy",
                "-p",
                EBPF_CRATE,
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    // Run every check, so one report shows all problems.
    let failed: Vec<String> = checks
        .iter()
        .filter_map(|(program, args)| run(&mut cmd(program, args)).err())
        .map(|e| format!("{e:#}"))
        .collect();
    if failed.is_empty() {
        eprintln!("xtask: lint: clean");
        Ok(())
    } else {
        bail!("lint failed:\n  {}", failed.join("\n  "))
    }
}
