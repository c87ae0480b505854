//! xlb's benchmarks. Each subcommand is one benchmark; every figure it
//! reports is a ratio to a floor measured in the same run, on the same
//! machine state, because absolute nanoseconds drift with the VM's mood.
//!
//! Run through `cargo xtask bench NAME [ARGS]`, which sets the machine up
//! first, or `cargo run --release -p xlb-bench -- NAME [ARGS]` (as root).

mod conntrack;
mod control;
mod dataplane;
mod etcd;
mod health;
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
    /// Without a benchmark name: run a short version of every benchmark,
    /// writing under bench/results/quick/ (the full results stay as they are)
    #[arg(long)]
    quick: bool,
    #[command(subcommand)]
    bench: Option<Bench>,
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
    /// Health probes: prober CPU for 10 000 targets at 1 s, and the time
    /// from a health change to the maps written for 1 000 backends.
    Health(health::Args),
    /// Packets per second through xlb on veths (pktgen -> xlb node ->
    /// backend sink) against a floor program on the same path, for 1, 100
    /// and 100 000 flows, established and new.
    Live(live::Args),
    /// xlb pktgen's rate against Debian's trafgen on the same path.
    Peer(peer::Args),
    /// Kernel memory of the maps at the default limits, and as each grows.
    Scale(scale::Args),
    /// Maglev build time and backend change -> all rings programmed, for
    /// 10/100/1000 backends x 1/10/100 VIPs.
    Control(control::Args),
    /// Reading the connection table through its shared mapping against one
    /// lookup per set: a restart's scan (2M and 16M flows) and a /metrics
    /// scrape's occupancy count, with its error.
    Conntrack(conntrack::Args),
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

/// The short versions `--quick` runs, in order: name, then arguments.
const QUICK: &[&[&str]] = &[
    &[
        "dataplane",
        "--rounds",
        "2",
        "--calls",
        "5000",
        "--warmup",
        "500",
    ],
    &["maglev", "--runs", "3", "--removals", "3"],
    &[
        "health",
        "--targets",
        "1000",
        "--seconds",
        "3",
        "--changes",
        "50",
    ],
    &["control", "--quick"],
    &["conntrack", "--quick"],
    &["scale", "--quick"],
    &["live", "--quick"],
    &["peer", "--quick"],
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (cli.bench, cli.quick) {
        (Some(Bench::Xlb { args }), _) => return xlb(args),
        (Some(bench), _) => run(bench),
        (None, true) => quick(),
        (None, false) => Err(anyhow::anyhow!(
            "name a benchmark (dataplane, maglev, health, etcd, live, peer, control, conntrack, scale; see --help), \
             or give --quick for a short run of all of them"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn quick() -> anyhow::Result<()> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/results/quick");
    for args in QUICK {
        let name = args[0];
        println!("\n=== {name} (quick) ===");
        let mut argv: Vec<String> = std::iter::once("xlb-bench")
            .chain(args.iter().copied())
            .map(str::to_owned)
            .collect();
        argv.extend(["--json".to_owned(), format!("{dir}/{name}.json")]);
        if ["live", "peer", "control", "scale"].contains(&name) {
            argv.extend(["--svg".to_owned(), format!("{dir}/{name}.svg")]);
        }
        let bench = Cli::try_parse_from(argv)?
            .bench
            .expect("every quick entry names a benchmark");
        run(bench).map_err(|e| e.context(format!("{name} (quick)")))?;
    }
    Ok(())
}

fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Dataplane(args) => dataplane::run(&args),
        Bench::Maglev(args) => maglev::run(&args),
        Bench::Health(args) => health::run(&args),
        Bench::Live(args) => live::run(&args),
        Bench::Peer(args) => peer::run(&args),
        Bench::Scale(args) => scale::run(&args),
        Bench::Control(args) => control::run(&args),
        Bench::Conntrack(args) => conntrack::run(&args),
        Bench::Etcd(args) => etcd::run(&args),
        Bench::Xlb { .. } => Err(anyhow::anyhow!(
            "`xlb` runs the xlb command line, not a benchmark"
        )),
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
