//! xlb's benchmarks. Each subcommand is one benchmark; every figure it
//! reports is a ratio to a floor measured in the same run, on the same
//! machine state, because absolute nanoseconds drift with the VM's mood.
//!
//! Run through `cargo xtask bench NAME [ARGS]`, which sets the machine up
//! first, or `cargo run --release -p xlb-bench -- NAME [ARGS]` (as root).

mod dataplane;
mod etcd;
mod machine;
mod maglev;
mod results;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "xlb's benchmarks (run as root, in release mode)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Per-packet cost of the XDP balancer through BPF_PROG_TEST_RUN, as
    /// ratios to two floor programs measured in the same run.
    Dataplane(dataplane::Args),
    /// Maglev ring build time (M = 65537 and 655373, N = 10, 100, 1000) as
    /// ratios to the Maglev paper's, and the slots moved when a backend
    /// leaves.
    Maglev(maglev::Args),
    /// Time from a write in etcd to rings programmed on every node of a
    /// fleet of three, for 1, 100 and 1 000 backend changes.
    Etcd(etcd::Args),
    /// The `xlb` command line itself: the etcd benchmark runs its daemons
    /// as `xlb-bench xlb run ...`.
    #[command(hide = true)]
    Xlb {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Dataplane(args) => dataplane::run(&args),
        Bench::Maglev(args) => maglev::run(&args),
        Bench::Etcd(args) => etcd::run(&args),
        Bench::Xlb { args } => return xlb(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `xlb-bench xlb ARGS`: what `xlb ARGS` does.
fn xlb(args: Vec<std::ffi::OsString>) -> ExitCode {
    let level = if args.first().is_some_and(|a| a == "run") {
        "info"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    let cli = xlb::cli::Cli::parse_from(std::iter::once("xlb".into()).chain(args));
    match xlb::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
