//! The command line: parses the arguments, then runs the daemon, the demo,
//! or one control-API call whose answer it prints. Nothing here touches the
//! data plane: runtime commands go through [`crate::api::Client`].

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

use crate::{
    api::{
        ApiError, AttachKind, BackendView, Client, ClusterView, FlowAffinity, Protocol, Request,
        Response, Status, VipView, endpoint,
    },
    config::DEFAULT_API_SOCKET,
    daemon,
    dataplane::XdpLog,
    demo::{self, Cancel, DemoError, DemoOptions, MAX_BACKENDS_PER_CLUSTER},
    doctor, monitor,
};

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
                  encapsulates packets (IP in IP) so that backends answer clients directly.\n\n\
                  `xlb run --config xlb.toml` starts the daemon; the other commands (vip, \
                  cluster, backend, status, attach, detach) change or show it at run time \
                  through its control socket."
)]
pub struct Cli {
    /// The running daemon's control socket (node.api_socket of its config)
    #[arg(long, global = true, value_name = "PATH",
          default_value = DEFAULT_API_SOCKET)]
    socket: PathBuf,
    /// Print the daemon's answer as JSON instead of a table
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: load the balancer, attach it, keep its maps in step
    /// with the desired state, serve the control API
    #[command(long_about = RUN_ABOUT)]
    Run(RunArgs),
    /// VIPs: the virtual addresses served
    #[command(subcommand)]
    Vip(VipCommand),
    /// Clusters: the groups of backends that serve a VIP together
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Backends: the hosts a cluster sends flows to
    #[command(subcommand)]
    Backend(BackendCommand),
    /// The daemon, its interfaces, and every VIP with its clusters and
    /// backends, their health and their share of the ring
    Status,
    /// Put the balancer on an interface (of the daemon's network namespace)
    Attach(AttachArgs),
    /// Take the balancer off an interface; without one, off every
    /// interface, removing its pinned maps and links, and stop the daemon
    Detach(DetachArgs),
    /// Counters of every VIP, cluster and backend and of the data plane,
    /// with their rates over an interval (--json for scripts)
    Stats(StatsArgs),
    /// A live view of packet and byte rates per VIP, cluster and backend,
    /// with health, sorted by rate (q or Ctrl-C quits)
    Top(TopArgs),
    /// Build a small active-active site in network namespaces (two xlb
    /// nodes behind ECMP, two clusters), send real TCP connections through
    /// it, fail a backend and a cluster, show what happened.
    #[command(long_about = DEMO_ABOUT)]
    Demo(DemoArgs),
    /// Check this host's settings for direct server return (as an xlb node
    /// or a backend) and print the command that fixes each problem
    #[command(long_about = DOCTOR_ABOUT)]
    Doctor(DoctorArgs),
    /// Generate packets in the kernel (XDP live frames): TCP SYN, TCP ACK
    /// or UDP over IPv4 or IPv6, many flows, at a rate or flat out
    Pktgen(crate::pktgen::PktgenArgs),
    /// A fleet on etcd: what its nodes publish (`fleet health`)
    #[command(subcommand)]
    Fleet(crate::fleet_health::FleetCommand),
}

const RUN_ABOUT: &str = "\
Run the xlb daemon with a TOML config (see lb-userspace/xlb.example.toml).

It loads the XDP program with its maps pinned under node.pin_path, writes the
node settings, programs every VIP's Maglev ring, attaches the balancer to
node.interfaces (native XDP, or generic where native is refused with
attach_mode = \"auto\"; the log says which), resolves the backends' next hops,
and serves the control API on node.api_socket.

Runtime changes (xlb vip|cluster|backend ...) are saved to node.state_file;
when that file exists at start it replaces the config file's [vip] tables.

SIGTERM or SIGINT stops the daemon and leaves the balancer attached with its
maps (pinned): packets keep flowing, and the next `xlb run` takes over.
`xlb detach` takes everything down.

Logs go to stderr; RUST_LOG=debug (or warn, ...) sets the level (info by default).";

#[derive(Debug, Args)]
struct RunArgs {
    /// The config file
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Keep VIPs, clusters and backends in etcd, shared by a fleet of
    /// nodes, instead of node.state_file (see README, "A fleet on etcd")
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]/PREFIX")]
    store: Option<String>,
    /// The XDP program's log level, overriding node.xdp_log (its lines go
    /// to this log); off costs nothing per packet
    #[arg(long, value_enum, value_name = "LEVEL")]
    xdp_log: Option<XdpLog>,
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// Seconds between the two readings the rates come from
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_interval)]
    interval: f64,
}

#[derive(Debug, Args)]
struct TopArgs {
    /// Seconds between refreshes
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_interval)]
    interval: f64,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.1..=3600.0).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "{s:?}: expected seconds from 0.1 to 3600, e.g. 1 or 0.5"
        )),
    }
}

#[derive(Debug, Subcommand)]
enum VipCommand {
    /// Add a VIP (then give it clusters and backends)
    Add {
        name: String,
        /// ADDR:PORT, e.g. 198.18.100.1:80 or [fd00::1]:53; port 0 takes
        /// every port
        #[arg(value_name = "ADDR:PORT", value_parser = parse_endpoint)]
        endpoint: SocketAddr,
        #[arg(long, value_enum, default_value_t = Protocol::Tcp)]
        proto: Protocol,
        /// Maglev ring slots: a prime, at least 100 per backend [default: 65537]
        #[arg(long, value_name = "N")]
        ring_size: Option<u32>,
        /// Hash each flow (flow) or each client address (client) [default: flow]
        #[arg(long, value_enum)]
        affinity: Option<FlowAffinity>,
    },
    /// Delete a VIP, with its clusters and backends
    Del { name: String },
    /// List the VIPs
    List,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Add a cluster to a VIP
    Add {
        vip: String,
        name: String,
        /// Its share of the VIP's traffic, relative to the other clusters of
        /// its priority [default: 1]
        #[arg(long, value_name = "W")]
        weight: Option<u32>,
        /// 0 is served first; higher levels take what lower ones cannot
        /// [default: 0]
        #[arg(long, value_name = "P")]
        priority: Option<u32>,
    },
    /// Delete a cluster, with its backends
    Del { vip: String, name: String },
    /// Set a cluster's weight
    Weight {
        vip: String,
        name: String,
        weight: u32,
    },
    /// Set a cluster's priority
    Priority {
        vip: String,
        name: String,
        priority: u32,
    },
    /// List the clusters of every VIP, or of one
    List { vip: Option<String> },
}

#[derive(Debug, Subcommand)]
enum BackendCommand {
    /// Add a backend to a cluster
    Add {
        vip: String,
        cluster: String,
        name: String,
        /// Where encapsulated packets go
        addr: IpAddr,
        /// Share within its cluster; 0 drains [default: 1]
        #[arg(long, value_name = "W")]
        weight: Option<u32>,
    },
    /// Delete a backend: its flows move on
    Del(BackendRef),
    /// No new flows for a backend; its established flows stay
    Drain(BackendRef),
    /// Put a drained (or disabled) backend back in service
    Undrain(BackendRef),
    /// Set a backend's weight within its cluster
    Weight {
        #[command(flatten)]
        backend: BackendRef,
        weight: u32,
    },
    /// List the backends of every VIP, or of one
    List { vip: Option<String> },
}

#[derive(Debug, Args)]
struct BackendRef {
    vip: String,
    cluster: String,
    name: String,
}

#[derive(Debug, Args)]
struct AttachArgs {
    interface: String,
    #[arg(long, value_enum, default_value_t = AttachKind::Auto)]
    mode: AttachKind,
}

#[derive(Debug, Args)]
struct DetachArgs {
    interface: Option<String>,
    /// The daemon's config: talk to its node.api_socket, and when no daemon
    /// runs there, remove the pins under its node.pin_path directly (taking
    /// the balancer off every interface it was left on)
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

const DEMO_ABOUT: &str = "\
Build a small active-active site in network namespaces and send real traffic
through xlb.

The site, all on one L2 fabric (a bridge) and on 198.18.0.0/15 addresses only:
  - a client, which reaches the VIP 198.18.100.1 over an ECMP route through
    both xlb nodes, hashed on the 5-tuple (fib_multipath_hash_policy = 1);
  - two xlb nodes, xlb1 and xlb2, each running this binary's `xlb run` with a
    generated config (TCP VIP on port 80, UDP VIP on port 53), the balancer in
    native XDP: it picks a backend from the Maglev ring (the same on both
    nodes), encapsulates the packet in IPIP and sends it to the backend;
  - two clusters, east and west, of --backends backends each: each strips the
    outer header with xlb's decap program, holds the VIP on lo and answers
    every TCP connection with \"backend <name> cluster <cluster>\" (an HTTP
    response if asked in HTTP), directly to the client (direct server return).

The demo opens --connections connections per round and shows how they spread
over nodes, clusters and backends, checks that every reply came straight from
its backend and that the nodes forwarded exactly what the client sent, then
fails one backend, then a whole cluster, and brings them back, a round after
each step. A failure is detected by the demo itself (it stops the server and
drains the backend on both daemons). With --keep it stays up afterwards and
prints commands (curl, xlb status against each node's socket, ...) to try.

Everything it creates is removed on exit, Ctrl-C included.

Needs root, iproute2, and a kernel with XDP on veth (Linux 5.9 or later), BTF
and multipath routing; without one of them it refuses, saying which.

Exit status: 0 on success, 1 on any error or failed check, 2 on bad usage,
130 when interrupted before the end (with --keep, Ctrl-C is the normal end: 0).";

const DOCTOR_ABOUT: &str = "\
Check this host's settings for direct server return and print, for each
problem, what is wrong and the exact command that fixes it. Nothing is changed.

On a backend (--role backend): a decapsulator (xlb's decap program, or the
kernel's tunl0 up), every VIP on lo, arp_ignore >= 1 and arp_announce = 2 on
the interfaces, rp_filter not strict, and an MTU that fits a client's packet
plus the outer header (or routes with a small enough advmss).

On an xlb node (--role node --config xlb.toml): the balancer attached to each
of node.interfaces and its mode, forwarding on them, and for every backend of
the config a route, a resolved neighbour (MAC) and an MTU toward it that fits
the encapsulated packet.

Without --role, the role is guessed: node if --config is given or the
balancer is attached here, backend if the decap program is attached or lo
holds an address other than loopback.

Runs in the current network namespace (`ip netns exec NS xlb doctor ...`).
Exit status: 0 when no problem was found (warnings allowed), 1 otherwise.";

#[derive(Debug, Args)]
struct DoctorArgs {
    /// What this host is [default: detected]
    #[arg(long, value_enum)]
    role: Option<doctor::HostRole>,
    /// The node's config: which interfaces and backends to check
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A VIP this backend serves (repeat for several) [default: the
    /// addresses on lo]
    #[arg(long, value_name = "ADDR")]
    vip: Vec<IpAddr>,
    /// The largest packet clients send, for the MTU/MSS check
    #[arg(long, value_name = "BYTES", default_value_t = doctor::DEFAULT_CLIENT_MTU,
          value_parser = clap::value_parser!(u32).range(576..=65000))]
    client_mtu: u32,
}

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

fn parse_endpoint(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not ADDR:PORT; write e.g. 198.18.100.1:80 or [fd00::1]:53"))
}

/// The whole program: logging, parsing, running, the exit status. The
/// `xlb` binary is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon says what it does; one-shot commands only what goes wrong.
    let level = match cli.command {
        Command::Run(_) => "info",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: many of xlb's
/// errors already say their cause in their own message.
fn one_line(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let said = cause.to_string();
        if !text.contains(&said) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&said);
        }
    }
    text.replace('\n', " ")
}

/// Runs the parsed command; errors are reported by the caller.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let request = match cli.command {
        Command::Demo(args) => return demo_command(args),
        Command::Doctor(args) => return doctor_command(args),
        Command::Pktgen(args) => return crate::pktgen::command(args),
        Command::Fleet(command) => {
            return Ok(fleet_command(command, &cli.socket, cli.json));
        }
        Command::Run(args) => {
            daemon::run(&args.config, args.xdp_log, args.store.as_deref())?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Vip(command) => vip_request(command),
        Command::Cluster(command) => cluster_request(command),
        Command::Backend(command) => backend_request(command),
        Command::Status => Request::Status,
        Command::Attach(args) => Request::Attach {
            interface: args.interface,
            mode: args.mode,
        },
        Command::Detach(args) => return detach_command(args, cli.json, &cli.socket),
        Command::Stats(args) => {
            let interval = Duration::from_secs_f64(args.interval);
            return monitor::stats_command(&cli.socket, cli.json, interval);
        }
        Command::Top(args) => {
            return monitor::top_command(&cli.socket, Duration::from_secs_f64(args.interval));
        }
    };
    let response = Client::connect(&cli.socket)?.call(&request)?;
    print_response(&response, cli.json)?;
    Ok(ExitCode::SUCCESS)
}

fn print_response(response: &Response, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", json(response)?);
    } else {
        print!("{}", render(response));
    }
    Ok(())
}

/// `xlb detach`: through the daemon; with `--config` and no daemon
/// running, straight on the pins.
fn detach_command(
    args: DetachArgs,
    as_json: bool,
    socket: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let request = Request::Detach {
        interface: args.interface.clone(),
    };
    let Some(config_path) = args.config else {
        print_response(&Client::connect(socket)?.call(&request)?, as_json)?;
        return Ok(ExitCode::SUCCESS);
    };
    let node = crate::config::load(&config_path)?.node;
    match Client::connect(&node.api_socket) {
        Ok(mut client) => {
            print_response(&client.call(&request)?, as_json)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(ApiError::NotRunning { .. }) if args.interface.is_none() => {
            let unpinned = crate::dataplane::remove_pinned(&node.pin_path)?;
            let message = format!(
                "no xlb daemon was running; balancer detached from {}; {} pinned map(s) under {} removed",
                if unpinned.interfaces.is_empty() {
                    "no interface".to_owned()
                } else {
                    unpinned.interfaces.join(", ")
                },
                unpinned.maps.len(),
                node.pin_path.display()
            );
            print_response(
                &Response::Changed {
                    message,
                    reconcile: None,
                },
                as_json,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(ApiError::NotRunning { socket }) => Err(anyhow::anyhow!(
            "no xlb daemon at {}: start it to detach one interface, or run `xlb detach --config {}` \
             (no interface) to take everything down",
            socket.display(),
            config_path.display()
        )),
        Err(err) => Err(err.into()),
    }
}

fn json(response: &Response) -> anyhow::Result<String> {
    // Lists print as bare arrays, status as its object: what a script wants.
    Ok(match response {
        Response::Vips { vips } => serde_json::to_string_pretty(vips)?,
        Response::Clusters { clusters } => serde_json::to_string_pretty(clusters)?,
        Response::Backends { backends } => serde_json::to_string_pretty(backends)?,
        Response::Status { status } => serde_json::to_string_pretty(status)?,
        other => serde_json::to_string_pretty(other)?,
    })
}

fn vip_request(command: VipCommand) -> Request {
    match command {
        VipCommand::Add {
            name,
            endpoint,
            proto,
            ring_size,
            affinity,
        } => Request::VipAdd {
            name,
            addr: endpoint.ip(),
            port: endpoint.port(),
            proto,
            ring_size,
            affinity,
        },
        VipCommand::Del { name } => Request::VipDel { name },
        VipCommand::List => Request::VipList,
    }
}

fn cluster_request(command: ClusterCommand) -> Request {
    match command {
        ClusterCommand::Add {
            vip,
            name,
            weight,
            priority,
        } => Request::ClusterAdd {
            vip,
            name,
            weight,
            priority,
        },
        ClusterCommand::Del { vip, name } => Request::ClusterDel { vip, name },
        ClusterCommand::Weight { vip, name, weight } => {
            Request::ClusterWeight { vip, name, weight }
        }
        ClusterCommand::Priority {
            vip,
            name,
            priority,
        } => Request::ClusterPriority {
            vip,
            name,
            priority,
        },
        ClusterCommand::List { vip } => Request::ClusterList { vip },
    }
}

fn backend_request(command: BackendCommand) -> Request {
    match command {
        BackendCommand::Add {
            vip,
            cluster,
            name,
            addr,
            weight,
        } => Request::BackendAdd {
            vip,
            cluster,
            name,
            addr,
            weight,
        },
        BackendCommand::Del(BackendRef { vip, cluster, name }) => {
            Request::BackendDel { vip, cluster, name }
        }
        BackendCommand::Drain(BackendRef { vip, cluster, name }) => {
            Request::BackendDrain { vip, cluster, name }
        }
        BackendCommand::Undrain(BackendRef { vip, cluster, name }) => {
            Request::BackendUndrain { vip, cluster, name }
        }
        BackendCommand::Weight {
            backend: BackendRef { vip, cluster, name },
            weight,
        } => Request::BackendWeight {
            vip,
            cluster,
            name,
            weight,
        },
        BackendCommand::List { vip } => Request::BackendList { vip },
    }
}

fn demo_command(args: DemoArgs) -> anyhow::Result<ExitCode> {
    // Refused before anything else, so the reason is the first thing said.
    demo::check_prerequisites()?;
    let cancel = Cancel::on_signals()?;
    let result = demo::run(DemoOptions {
        xlb: std::env::current_exe()?,
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

/// `xlb fleet ...`: a check whose exit status scripts read, so that "could
/// not look" never passes for a finding (see [`crate::fleet_health::Verdict`]).
fn fleet_command(
    command: crate::fleet_health::FleetCommand,
    socket: &std::path::Path,
    as_json: bool,
) -> ExitCode {
    match crate::fleet_health::command(command, socket, as_json) {
        Ok(verdict) => ExitCode::from(verdict as u8),
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::from(crate::fleet_health::Verdict::Unchecked as u8)
        }
    }
}

fn doctor_command(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let report = doctor::diagnose(&doctor::DoctorOptions {
        role: args.role,
        config: args.config,
        vips: args.vip,
        client_mtu: Some(args.client_mtu),
    })?;
    print!("{report}");
    Ok(if report.healthy() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

// ---------------------------------------------------------------------------
// Printing.

/// Left-aligned columns, two spaces apart, each as wide as its widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>], indent: &str) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::from(indent);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

fn render(response: &Response) -> String {
    match response {
        Response::Changed { message, reconcile } => {
            let mut out = format!("{message}\n");
            if let Some(report) = reconcile {
                let _ = writeln!(out, "reconciled: {report}");
            }
            out
        }
        Response::Vips { vips } => vip_table(vips),
        Response::Clusters { clusters } => cluster_table(clusters, true, ""),
        Response::Backends { backends } => backend_table(backends, true, ""),
        Response::Status { status } => status_text(status),
        Response::Stats { stats } => {
            let rates = monitor::Rates::between(stats, stats);
            monitor::stats_text(stats, &rates)
        }
        Response::Error { message } => format!("error: {message}\n"),
    }
}

fn vip_table(vips: &[VipView]) -> String {
    if vips.is_empty() {
        return "no VIPs\n".to_owned();
    }
    let rows: Vec<Vec<String>> = vips
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                endpoint(v.addr, v.port),
                v.proto.to_string(),
                v.ring_size.to_string(),
                v.affinity.to_string(),
                v.clusters.len().to_string(),
                v.backends.len().to_string(),
                v.mode.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "ADDRESS", "PROTO", "RING", "AFFINITY", "CLUSTERS", "BACKENDS", "MODE",
        ],
        &rows,
        "",
    )
}

fn cluster_table(clusters: &[ClusterView], with_vip: bool, indent: &str) -> String {
    if clusters.is_empty() {
        return format!("{indent}no clusters\n");
    }
    let rows: Vec<Vec<String>> = clusters
        .iter()
        .map(|c| {
            let mut row = Vec::new();
            if with_vip {
                row.push(c.vip.clone());
            }
            row.extend([
                c.name.clone(),
                c.priority.to_string(),
                c.weight.to_string(),
                c.backends.to_string(),
                percent(c.capacity),
                c.healthy.map_or("-".to_owned(), percent),
                percent(c.share),
            ]);
            row
        })
        .collect();
    let mut header = Vec::new();
    if with_vip {
        header.push("VIP");
    }
    header.extend([
        "CLUSTER", "PRIORITY", "WEIGHT", "BACKENDS", "CAPACITY", "HEALTHY", "SHARE",
    ]);
    table(&header, &rows, indent)
}

fn backend_table(backends: &[BackendView], with_vip: bool, indent: &str) -> String {
    if backends.is_empty() {
        return format!("{indent}no backends\n");
    }
    let rows: Vec<Vec<String>> = backends
        .iter()
        .map(|b| {
            let mut row = Vec::new();
            if with_vip {
                row.push(b.vip.clone());
            }
            row.extend([
                b.cluster.clone(),
                b.name.clone(),
                b.addr.to_string(),
                b.weight.to_string(),
                b.admin.to_string(),
                b.health.to_string(),
                percent(b.share),
                b.slots.to_string(),
                b.packets.to_string(),
                probe_text(b.probe.as_ref()),
            ]);
            row
        })
        .collect();
    let mut header = Vec::new();
    if with_vip {
        header.push("VIP");
    }
    header.extend([
        "CLUSTER", "BACKEND", "ADDRESS", "WEIGHT", "ADMIN", "HEALTH", "SHARE", "SLOTS", "PACKETS",
        "PROBE",
    ]);
    table(&header, &rows, indent)
}

/// `http:80 down, last: down (timeout) 12s ago, held out 18s`, or `-`
/// when the backend is not probed; a probe through the VIP says so
/// (`tcp:80 via VIP up`).
fn probe_text(probe: Option<&crate::health::TargetStatus>) -> String {
    let Some(p) = probe else {
        return "-".into();
    };
    let via = if p.via == "vip" { " via VIP" } else { "" };
    let mut out = format!("{}:{}{via} {}", p.kind, p.port, p.state);
    if let (Some(last), Some(at)) = (&p.last_transition, p.last_transition_unix) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let _ = write!(
            out,
            ", last: {last} {} ago",
            duration((now - at).max(0.0) as u64)
        );
    }
    if let Some(held) = p.held_out_secs {
        let _ = write!(out, ", flapping: held out {}", duration(held.ceil() as u64));
    }
    out
}

fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

fn store_text(out: &mut String, store: &crate::etcd::StoreStatus) {
    let link = if store.connected {
        "connected".to_owned()
    } else {
        format!(
            "UNREACHABLE ({}): forwarding with the last applied state",
            store.last_error.as_deref().unwrap_or("no answer")
        )
    };
    let _ = writeln!(
        out,
        "store:      {} revision {} applied (seen {}), {link}",
        store.url, store.applied_revision, store.seen_revision
    );
    let _ = writeln!(
        out,
        "            reconnects {}, malformed values seen {}, refused by the data plane {}",
        store.reconnects, store.malformed_total, store.apply_failures
    );
    match &store.name_held_by {
        Some(holder) => {
            let _ = writeln!(
                out,
                "node name:  {} HELD BY ANOTHER NODE ({holder}): this node publishes no health \
                 view; give one of the two another node.name",
                store.node
            );
        }
        None if !store.node.is_empty() => {
            let _ = writeln!(
                out,
                "node name:  {} (publishes its health view)",
                store.node
            );
        }
        None => {}
    }
    for bad in &store.malformed {
        let _ = writeln!(out, "  skipped {}: {}", bad.key, bad.problem);
    }
}

fn status_text(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "xlb {} (pid {}), up {}",
        status.version,
        status.pid,
        duration(status.uptime_secs)
    );
    let attached = if status.attachments.is_empty() {
        "nowhere (xlb attach IFACE)".to_owned()
    } else {
        status
            .attachments
            .iter()
            .map(|a| format!("{} ({})", a.interface, a.mode))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "attached:   {attached}");
    let _ = writeln!(out, "config:     {}", status.config.display());
    let _ = writeln!(out, "state file: {}", status.state_file.display());
    let _ = writeln!(out, "pins:       {}", status.pin_path.display());
    if let Some(report) = &status.last_reconcile {
        let _ = writeln!(out, "last reconcile: {report}");
    }
    if !status.counters.is_empty() {
        let counters: Vec<String> = status
            .counters
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        let _ = writeln!(out, "counters:   {}", counters.join(" "));
    }
    if let Some(h) = &status.health {
        let failures: Vec<String> = h
            .failures
            .iter()
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect();
        let mean = h
            .latency
            .sum_micros
            .checked_div(h.latency.count)
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "probes:     {} targets, {} probes, failures {}, {} down / {} up transitions, \
             {} held out; decision to maps: last {} µs, mean {mean} µs, max {} µs",
            h.targets,
            h.probes,
            if failures.is_empty() {
                "none".into()
            } else {
                failures.join(" ")
            },
            h.transitions_down,
            h.transitions_up,
            h.held_out,
            h.latency.last_micros,
            h.latency.max_micros,
        );
    }
    if let Some(store) = &status.store {
        store_text(&mut out, store);
    }
    if status.vips.is_empty() {
        out.push_str("\nno VIPs\n");
    }
    for vip in &status.vips {
        let _ = writeln!(
            out,
            "\nVIP {} {}/{}: ring {} ({} slots programmed), affinity {}, mode {}, \
             {} healthy, locality {}, {} packets",
            vip.name,
            endpoint(vip.addr, vip.port),
            vip.proto,
            vip.ring_size,
            vip.slots,
            vip.affinity,
            vip.mode,
            percent(vip.healthy),
            vip.locality,
            vip.packets
        );
        out.push_str(&cluster_table(&vip.clusters, false, "  "));
        if !vip.backends.is_empty() {
            out.push('\n');
        }
        out.push_str(&backend_table(&vip.backends, false, "  "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_probe_column_shows_state_last_transition_and_hold_out() {
        assert_eq!(probe_text(None), "-");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let probe = crate::health::TargetStatus {
            kind: "http".into(),
            port: 8080,
            via: "backend".into(),
            target: "198.18.1.10:8080".into(),
            state: "down".into(),
            last_result: Some("ok".into()),
            last_transition: Some("down (bad status 503)".into()),
            last_transition_unix: Some(now - 12.2),
            held_out_secs: Some(17.5),
            probes: 40,
            failures: 9,
        };
        assert_eq!(
            probe_text(Some(&probe)),
            "http:8080 down, last: down (bad status 503) 12s ago, flapping: held out 18s"
        );
        let through_vip = crate::health::TargetStatus {
            via: "vip".into(),
            target: "198.18.100.1:80".into(),
            port: 80,
            kind: "tcp".into(),
            state: "up".into(),
            last_transition: None,
            last_transition_unix: None,
            held_out_secs: None,
            ..probe
        };
        assert_eq!(probe_text(Some(&through_vip)), "tcp:80 via VIP up");
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("xlb").chain(args.iter().copied()))
    }

    #[test]
    fn demo_defaults_and_bounds() {
        let Command::Demo(args) = parse(&["demo"]).unwrap().command else {
            panic!("demo");
        };
        assert_eq!((args.backends, args.connections, args.keep), (3, 60, false));
        let Command::Demo(args) =
            parse(&["demo", "--backends", "5", "--connections", "7", "--keep"])
                .unwrap()
                .command
        else {
            panic!("demo");
        };
        assert_eq!((args.backends, args.connections, args.keep), (5, 7, true));
        assert!(parse(&["demo", "--backends", "0"]).is_err());
        assert!(parse(&["demo", "--backends", "251"]).is_err());
        assert!(parse(&["demo", "--connections", "0"]).is_err());
    }

    fn request(args: &[&str]) -> Request {
        let cli = parse(args).unwrap();
        match cli.command {
            Command::Vip(c) => vip_request(c),
            Command::Cluster(c) => cluster_request(c),
            Command::Backend(c) => backend_request(c),
            Command::Status => Request::Status,
            Command::Attach(a) => Request::Attach {
                interface: a.interface,
                mode: a.mode,
            },
            other => panic!("not an API command: {other:?}"),
        }
    }

    #[test]
    fn commands_become_requests() {
        assert_eq!(
            request(&[
                "vip",
                "add",
                "dns",
                "[fd00::53]:53",
                "--proto",
                "udp",
                "--ring-size",
                "4099",
                "--affinity",
                "client"
            ]),
            Request::VipAdd {
                name: "dns".into(),
                addr: "fd00::53".parse().unwrap(),
                port: 53,
                proto: Protocol::Udp,
                ring_size: Some(4099),
                affinity: Some(FlowAffinity::Client),
            }
        );
        assert_eq!(
            request(&["backend", "weight", "web", "east", "e1", "3"]),
            Request::BackendWeight {
                vip: "web".into(),
                cluster: "east".into(),
                name: "e1".into(),
                weight: 3,
            }
        );
        assert_eq!(
            request(&[
                "cluster",
                "add",
                "web",
                "east",
                "--weight",
                "2",
                "--priority",
                "1"
            ]),
            Request::ClusterAdd {
                vip: "web".into(),
                name: "east".into(),
                weight: Some(2),
                priority: Some(1),
            }
        );
        assert_eq!(
            request(&["attach", "eth0"]),
            Request::Attach {
                interface: "eth0".into(),
                mode: AttachKind::Auto
            }
        );
        assert_eq!(
            request(&["backend", "list"]),
            Request::BackendList { vip: None }
        );
    }

    #[test]
    fn bad_arguments_are_refused_by_the_parser() {
        let err = parse(&["vip", "add", "web", "198.18.100.1"]).unwrap_err();
        assert!(err.to_string().contains("is not ADDR:PORT"), "{err}");
        assert!(parse(&["backend", "add", "web", "east", "e1", "198.18.1"]).is_err());
        assert!(parse(&["attach", "eth0", "--mode", "turbo"]).is_err());
        let Command::Detach(detach) = parse(&["detach", "--config", "/etc/xlb.toml"])
            .unwrap()
            .command
        else {
            panic!("detach");
        };
        assert_eq!(
            (detach.interface, detach.config),
            (None, Some(PathBuf::from("/etc/xlb.toml")))
        );
        let cli = parse(&["--socket", "/tmp/x.sock", "status", "--json"]).unwrap();
        assert_eq!(cli.socket, PathBuf::from("/tmp/x.sock"));
        assert!(cli.json);
    }

    #[test]
    fn tables_align() {
        let text = table(
            &["A", "BB"],
            &[
                vec!["xxx".into(), "y".into()],
                vec!["z".into(), "wwww".into()],
            ],
            "  ",
        );
        assert_eq!(text, "  A    BB\n  xxx  y\n  z    wwww\n");
    }
}
