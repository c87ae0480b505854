//! The command line: parses the arguments and calls the library.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use xlb::demo::{self, Cancel, DemoError, DemoOptions, MAX_BACKENDS_PER_CLUSTER};

/// Exit status after an interruption (SIGINT, SIGTERM, SIGHUP): 128 + SIGINT,
/// as shells report it.
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "xlb",
    version,
    about = "xlb: a layer-4 load balancer in XDP/eBPF",
    long_about = "xlb: a layer-4 load balancer in XDP/eBPF. It spreads the TCP and UDP flows \
                  of virtual IPs over backends with a Maglev hash and a connection table, and \
                  encapsulates packets (IP in IP) so that backends answer clients directly."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a small two-cluster site in network namespaces, send real TCP
    /// connections through the balancer, fail a backend, show what happened.
    #[command(long_about = DEMO_ABOUT)]
    Demo(DemoArgs),
}

const DEMO_ABOUT: &str = "\
Build a small site in network namespaces and send real traffic through xlb.

The site, all on one L2 fabric (a bridge) and on 198.18.0.0/15 addresses only:
  - a client, which routes the VIP 198.18.100.1 via the xlb node;
  - one xlb node, running the balancer in native XDP on its interface: it
    looks the VIP up, picks a backend from a Maglev ring, encapsulates the
    packet in IPIP and sends it to the backend;
  - two clusters, east and west, of backends: each strips the outer header
    with xlb's decap program, holds the VIP on lo and answers every TCP
    connection on port 80 with \"backend <name> cluster <cluster>\" (an HTTP
    response if asked in HTTP), directly to the client (direct server return).

The demo opens --connections connections from the client and shows how they
spread over clusters and backends, checks that every reply came straight from
the backend, then fails one backend (its server stops, it is marked down and
the ring is rebuilt without it) and runs the connections again. With --keep it
stays up afterwards and prints commands (curl, nc, ip) to try against it.

Everything it creates is removed on exit, Ctrl-C included.

Needs root and a kernel with XDP on veth (Linux 5.9 or later).

Exit status: 0 on success, 1 on any error or failed check, 2 on bad usage,
130 when interrupted before the end (with --keep, Ctrl-C is the normal end: 0).";

#[derive(Debug, Args)]
struct DemoArgs {
    /// Backends in each of the two clusters
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u16).range(1..=MAX_BACKENDS_PER_CLUSTER as i64))]
    backends: u16,
    /// TCP connections the client opens in each round
    #[arg(long, value_name = "N", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    connections: u32,
    /// Stay up after the rounds until Ctrl-C, printing commands to try
    #[arg(long)]
    keep: bool,
}

/// Runs the parsed command; errors are reported by the caller.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => demo_command(args),
    }
}

fn demo_command(args: DemoArgs) -> anyhow::Result<ExitCode> {
    // Refused before anything else, so the reason is the first thing said.
    demo::check_root()?;
    let cancel = Cancel::on_signals()?;
    let result = demo::run(DemoOptions {
        backends_per_cluster: usize::from(args.backends),
        connections: args.connections as usize,
        keep: args.keep,
        cancel,
    });
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(DemoError::Interrupted) => {
            eprintln!("interrupted; the demo's namespaces were removed");
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn demo_defaults_and_bounds() {
        let cli = Cli::try_parse_from(["xlb", "demo"]).unwrap();
        let Command::Demo(args) = cli.command;
        assert_eq!((args.backends, args.connections, args.keep), (3, 60, false));
        let cli = Cli::try_parse_from([
            "xlb",
            "demo",
            "--backends",
            "5",
            "--connections",
            "7",
            "--keep",
        ])
        .unwrap();
        let Command::Demo(args) = cli.command;
        assert_eq!((args.backends, args.connections, args.keep), (5, 7, true));
        assert!(Cli::try_parse_from(["xlb", "demo", "--backends", "0"]).is_err());
        assert!(Cli::try_parse_from(["xlb", "demo", "--backends", "251"]).is_err());
        assert!(Cli::try_parse_from(["xlb", "demo", "--connections", "0"]).is_err());
    }
}
