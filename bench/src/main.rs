//! xlb's benchmarks. Each subcommand is one benchmark; every figure it
//! reports is a ratio to a floor measured in the same run, on the same
//! machine state, because absolute nanoseconds drift with the VM's mood.
//!
//! Run through `cargo xtask bench NAME [ARGS]`, which sets the machine up
//! first, or `cargo run --release -p xlb-bench -- NAME [ARGS]` (as root).

mod dataplane;
mod live;
mod machine;
mod maglev;
mod peer;
mod plot;
mod results;
mod scale;

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
    /// Packets per second through xlb on veths (pktgen -> xlb node ->
    /// backend sink) against a floor program on the same path, for 1, 100
    /// and 100 000 flows, established and new.
    Live(live::Args),
    /// xlb pktgen's rate against Debian's trafgen on the same path.
    Peer(peer::Args),
    /// Kernel memory of the maps at the default limits, and as each grows.
    Scale(scale::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Dataplane(args) => dataplane::run(&args),
        Bench::Maglev(args) => maglev::run(&args),
        Bench::Live(args) => live::run(&args),
        Bench::Peer(args) => peer::run(&args),
        Bench::Scale(args) => scale::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
