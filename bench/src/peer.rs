//! `peer`: xlb's generator against one users know, Debian's `trafgen`
//! (netsniff-ng, PF_PACKET with a TX ring), on the same path in the same
//! run: generator host -> veth -> xlb node (the real balancer, native XDP)
//! -> veth -> backend sink. Both send the same frame (an established TCP
//! flow's ACK to the VIP) from one pinned CPU.

use std::{path::PathBuf, process::Stdio, time::Duration, time::Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use xlb::pktgen::{self, Kind, Limit};

use crate::{
    live::{LivePath, NodeProgram},
    machine::Machine,
    plot,
    results::write_json,
};

const DEFAULT_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/peer.json");
const DEFAULT_SVG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/peer.svg");

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A short run
    #[arg(long)]
    pub quick: bool,
    /// Packets each generator sends (default 3 000 000, or 500 000 with --quick)
    #[arg(long)]
    pub count: Option<u64>,
    #[arg(long, default_value = DEFAULT_JSON)]
    pub json: PathBuf,
    #[arg(long, default_value = DEFAULT_SVG)]
    pub svg: PathBuf,
}

#[derive(Debug, Serialize)]
struct GeneratorResult {
    generator: &'static str,
    sent: u64,
    delivered: u64,
    seconds: f64,
    sent_pps: f64,
    delivered_pps: f64,
}

#[derive(Debug, Serialize)]
struct PeerReport {
    benchmark: &'static str,
    method: &'static str,
    frame_size: usize,
    results: Vec<GeneratorResult>,
    /// xlb pktgen's sending rate over trafgen's.
    sent_ratio: f64,
    machine: Machine,
}

pub fn run(args: &Args) -> Result<()> {
    if which_trafgen().is_none() {
        bail!("trafgen is missing: run `cargo xtask setup` (it installs Debian's netsniff-ng)");
    }
    let count = args
        .count
        .unwrap_or(if args.quick { 500_000 } else { 3_000_000 });
    let cpu = *pktgen::allowed_cpus().last().context("no CPU")?;
    let mut path = LivePath::build("bench-peer")?;
    path.use_program(NodeProgram::Xlb)?;
    let packets = path.packets(Kind::TcpAck, 1, pktgen::MIN_FRAME.max(64));
    // The flow enters the connection table once, before either run.
    path.send(packets.clone(), Limit::Count(1), 1, None)?;

    let (report, delivered) = path.send(packets.clone(), Limit::Count(count), 1, None)?;
    let ours = GeneratorResult {
        generator: "xlb pktgen (XDP live frames)",
        sent: report.sent,
        delivered,
        seconds: report.elapsed.as_secs_f64(),
        sent_pps: report.rate(),
        delivered_pps: delivered as f64 / report.elapsed.as_secs_f64(),
    };

    let config = std::env::temp_dir().join(format!("xlb-bench-trafgen-{}.cfg", std::process::id()));
    let bytes: Vec<String> = packets
        .frame()
        .iter()
        .map(|b| format!("0x{b:02x}"))
        .collect();
    std::fs::write(&config, format!("{{ {} }}\n", bytes.join(", ")))
        .with_context(|| format!("writing {}", config.display()))?;
    let before = path.sink.counts()?.0;
    let start = Instant::now();
    let out = path
        .gen_host
        .command("taskset")
        .args([
            "-c",
            &cpu.to_string(),
            "trafgen",
            "--dev",
            "eth0",
            "--cpus",
            "1",
            "--num",
        ])
        .arg(count.to_string())
        .arg("--conf")
        .arg(&config)
        .stdout(Stdio::null())
        .output()
        .context("running trafgen")?;
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(&config);
    ensure!(
        out.status.success(),
        "trafgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(50));
    let delivered = path.sink.counts()?.0 - before;
    let theirs = GeneratorResult {
        generator: "trafgen (netsniff-ng, PF_PACKET TX ring)",
        sent: count,
        delivered,
        seconds: elapsed.as_secs_f64(),
        sent_pps: count as f64 / elapsed.as_secs_f64(),
        delivered_pps: delivered as f64 / elapsed.as_secs_f64(),
    };
    let sent_ratio = ours.sent_pps / theirs.sent_pps;
    println!(
        "peer: {count} packets of {} B, one CPU ({cpu}), through xlb to the backend sink",
        packets.size
    );
    println!(
        "{:<42} {:>10} {:>14} {:>10}",
        "generator", "sent Mpps", "delivered Mpps", "loss"
    );
    for r in [&ours, &theirs] {
        println!(
            "{:<42} {:>10.3} {:>14.3} {:>10}",
            r.generator,
            r.sent_pps / 1e6,
            r.delivered_pps / 1e6,
            r.sent.saturating_sub(r.delivered)
        );
    }
    println!("xlb pktgen sends {sent_ratio:.2}x trafgen's rate");
    plot::bars(
        &args.svg,
        "xlb pktgen vs trafgen, same path, one CPU (Mpps)",
        "Mpps",
        &["sent".to_owned(), "delivered through xlb".to_owned()],
        &[
            (
                "xlb pktgen",
                vec![ours.sent_pps / 1e6, ours.delivered_pps / 1e6],
            ),
            (
                "trafgen",
                vec![theirs.sent_pps / 1e6, theirs.delivered_pps / 1e6],
            ),
        ],
    )?;
    let mut machine = Machine::describe();
    machine.pinned_cpu = Some(cpu);
    println!("{}", machine.summary());
    write_json(
        &args.json,
        &PeerReport {
            benchmark: "peer",
            method: "both generators send the same 64-byte TCP ACK of one established flow from one pinned CPU into the generator's veth; trafgen's time is the wall time of its process (start-up included); delivered = the backend sink's count",
            frame_size: packets.size,
            results: vec![ours, theirs],
            sent_ratio,
            machine,
        },
    )?;
    println!("wrote {} and {}", args.json.display(), args.svg.display());
    Ok(())
}

fn which_trafgen() -> Option<PathBuf> {
    ["/usr/sbin/trafgen", "/usr/bin/trafgen"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}
