//! `conntrack`: what reading the connection table costs the controller,
//! through a shared mapping of `CONNTRACK` against one map lookup per set
//! (the way a table pinned before it was mmapable is still read), on the
//! same table: the scan of a restart (`newest_generation`, every set) for
//! the default 2^21-flow table and a 2^24-flow one, and a /metrics scrape's
//! occupancy count for several sample sizes, with its error against the
//! exact count. Also the daemon's resident size during a mapped scan.
//!
//! The table is filled through the map (one update per set, before any
//! timing): 0 to 4 flows a set, 2 on average, so half full, with random
//! generations. What a scan costs does not depend on which flows are there.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{Array, Map, MapData, MapInfo};
use lb_common::{FLOW_WAYS, FlowEntry, FlowSet, map_names};
use serde::Serialize;
use xlb::{
    dataplane::{ConnReads, ConnTable, Dataplane, Limits, Role},
    metrics::{CONNTRACK_MAPPED_SAMPLE_SETS, CONNTRACK_SAMPLE_SETS},
};

use crate::{machine::Machine, results::write_json};

const DEFAULT_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/conntrack.json");
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A short run: the default table only, fewer repetitions
    #[arg(long)]
    pub quick: bool,
    /// Timed repetitions of each mapped read (the median is reported)
    #[arg(long)]
    pub runs: Option<usize>,
    #[arg(long, default_value = DEFAULT_JSON)]
    pub json: PathBuf,
}

#[derive(Debug, Serialize)]
struct Scan {
    /// Median over runs, milliseconds.
    mapped_ms: f64,
    per_set_syscall_ms: f64,
    speedup: f64,
    mapped_ns_per_set: f64,
    per_set_syscall_ns_per_set: f64,
}

#[derive(Debug, Serialize)]
struct Scrape {
    reads: &'static str,
    max_sets: u32,
    sampled_sets: u32,
    /// Median over runs, milliseconds.
    ms: f64,
    /// What /metrics reads with this kind of table.
    metrics: bool,
    estimate: u64,
    exact: u64,
    /// (estimate - exact) / capacity.
    error_of_capacity: f64,
}

#[derive(Debug, Serialize)]
struct Table {
    flows: u64,
    sets: u32,
    table_mib: f64,
    flows_stored: u64,
    restart_scan: Scan,
    scrapes: Vec<Scrape>,
    /// The largest growth of VmRSS seen during a mapped scan of every set.
    rss_growth_during_scan_mib: f64,
    rss_growth_after_scan_mib: f64,
}

#[derive(Debug, Serialize)]
struct ConntrackReport {
    benchmark: &'static str,
    method: &'static str,
    tables: Vec<Table>,
    machine: Machine,
}

/// SplitMix64: a fixed, well-spread fill.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes 0 to 4 flows into every set; returns the flows and the newest
/// generation written.
fn fill(table: &mut Array<MapData, FlowSet>, sets: u32) -> Result<(u64, u32)> {
    let mut flows = 0;
    let mut newest = 0;
    for index in 0..sets {
        let r = mix(u64::from(index));
        let used = (r % (FLOW_WAYS as u64 + 1)) as usize;
        if used == 0 {
            continue;
        }
        let mut set = FlowSet::default();
        for (way, entry) in set.ways.iter_mut().take(used).enumerate() {
            let r = mix(r ^ way as u64);
            let generation = (r >> 48) as u16 % 1000 + 1;
            newest = newest.max(u32::from(generation));
            *entry = FlowEntry {
                fingerprint: r | 1,
                backend_id: (r >> 16) as u16,
                vip_id: (r >> 32) as u16 % 512,
                vip_generation: generation,
                _pad: 0,
            };
        }
        table.set(index, set, 0).context("filling CONNTRACK")?;
        flows += used as u64;
    }
    Ok((flows, newest))
}

/// The `CONNTRACK` the balancer of `dp` uses, opened a second time.
fn conntrack_map(dp: &Dataplane) -> Result<Array<MapData, FlowSet>> {
    let ids = dp.program(Role::Balancer)?.info()?.map_ids()?;
    for id in ids.unwrap_or_default() {
        if MapInfo::from_id(id)?.name_as_str() == Some(map_names::CONNTRACK) {
            return Ok(Array::try_from(Map::Array(MapData::from_id(id)?))?);
        }
    }
    bail!("the balancer uses no map named {}", map_names::CONNTRACK)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn timed<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut samples = Vec::new();
    let mut last = None;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let value = f()?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
        last = Some(value);
    }
    Ok((median(samples), last.expect("at least one run")))
}

fn rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kib / 1024.0)
}

fn measure(flows: u32, runs: usize, syscall_runs: usize) -> Result<Table> {
    let limits = Limits {
        max_vips: 16,
        max_backends: 64,
        ring_capacity: 65_537,
        conntrack_size: flows,
    };
    let dp = Dataplane::load(limits).context("loading the data plane (are you root?)")?;
    let table: &ConnTable = &dp.conntrack;
    let sets = table.geometry().sets;
    ensure!(
        table.reads() == ConnReads::Mapped,
        "a freshly loaded CONNTRACK is mmapable"
    );
    let (stored, newest) = fill(&mut conntrack_map(&dp)?, sets)?;
    let mapped = table.reader(ConnReads::Mapped).context("a mapped reader")?;
    let syscall = table
        .reader(ConnReads::PerSetSyscall)
        .context("a reader per syscall")?;

    let (mapped_ms, got) = timed(runs, || Ok(mapped.newest_generation()?))?;
    ensure!(
        got == newest,
        "mapped newest generation {got}, wrote {newest}"
    );
    let (syscall_ms, got) = timed(syscall_runs, || Ok(syscall.newest_generation()?))?;
    ensure!(
        got == newest,
        "per-syscall newest generation {got}, wrote {newest}"
    );
    let per_set = |ms: f64| ms * 1e6 / f64::from(sets);
    let restart_scan = Scan {
        mapped_ms,
        per_set_syscall_ms: syscall_ms,
        speedup: syscall_ms / mapped_ms,
        mapped_ns_per_set: per_set(mapped_ms),
        per_set_syscall_ns_per_set: per_set(syscall_ms),
    };

    let capacity = table.geometry().capacity();
    let mut scrapes = Vec::new();
    let mut budgets = vec![
        (ConnReads::PerSetSyscall, CONNTRACK_SAMPLE_SETS),
        (ConnReads::Mapped, CONNTRACK_SAMPLE_SETS),
        (ConnReads::Mapped, CONNTRACK_MAPPED_SAMPLE_SETS),
        (ConnReads::Mapped, 1 << 19),
        (ConnReads::Mapped, sets),
    ];
    budgets.dedup_by_key(|(reads, max_sets)| (*reads, (*max_sets).min(sets)));
    for (reads, max_sets) in budgets {
        let reader = table.reader(reads).context("a reader")?;
        let (ms, o) = timed(runs, || Ok(reader.occupancy(max_sets)?))?;
        scrapes.push(Scrape {
            reads: match reads {
                ConnReads::Mapped => "mapped",
                ConnReads::PerSetSyscall => "per_set_syscall",
            },
            max_sets,
            sampled_sets: o.sampled_sets,
            ms,
            metrics: max_sets
                == match reads {
                    ConnReads::Mapped => CONNTRACK_MAPPED_SAMPLE_SETS,
                    ConnReads::PerSetSyscall => CONNTRACK_SAMPLE_SETS,
                },
            estimate: o.estimate(),
            exact: stored,
            error_of_capacity: (o.estimate() as f64 - stored as f64) / capacity as f64,
        });
    }

    let before = rss_mib()?;
    let mut peak = before;
    let mut rss_error = None;
    mapped.scan(0..sets, |index, _| {
        // Once per 4 MiB chunk, at its last set, while it is mapped.
        if index % (1 << 16) == (1 << 16) - 1 || index == sets - 1 {
            match rss_mib() {
                Ok(now) => peak = peak.max(now),
                Err(err) => rss_error = Some(err),
            }
        }
    })?;
    if let Some(err) = rss_error {
        return Err(err);
    }
    let after = rss_mib()?;

    Ok(Table {
        flows: table.geometry().capacity(),
        sets,
        table_mib: f64::from(sets) * size_of::<FlowSet>() as f64 / MIB,
        flows_stored: stored,
        restart_scan,
        scrapes,
        rss_growth_during_scan_mib: peak - before,
        rss_growth_after_scan_mib: after - before,
    })
}

pub fn run(args: &Args) -> Result<()> {
    let runs = args.runs.unwrap_or(if args.quick { 3 } else { 9 });
    let sizes: &[u32] = if args.quick {
        &[1 << 21]
    } else {
        &[1 << 21, 1 << 24]
    };
    println!(
        "conntrack: reading the connection table mapped vs one lookup per set (median of {runs}; per syscall: of {})",
        runs.min(3)
    );
    let mut tables = Vec::new();
    for &flows in sizes {
        let t = measure(flows, runs, runs.min(3))?;
        let s = &t.restart_scan;
        println!(
            "\n{} flows ({} sets, {:.0} MiB, {} stored)",
            t.flows, t.sets, t.table_mib, t.flows_stored
        );
        println!(
            "  restart scan (newest generation, every set): mapped {:.1} ms ({:.1} ns/set), per syscall {:.0} ms ({:.0} ns/set): {:.0}x",
            s.mapped_ms,
            s.mapped_ns_per_set,
            s.per_set_syscall_ms,
            s.per_set_syscall_ns_per_set,
            s.speedup
        );
        println!(
            "  resident size during a mapped scan: +{:.1} MiB at most, +{:.1} MiB after",
            t.rss_growth_during_scan_mib, t.rss_growth_after_scan_mib
        );
        println!(
            "  {:>16} {:>9} {:>9} {:>9} {:>10} {:>10} {:>12}",
            "scrape reads", "max sets", "sampled", "ms", "estimate", "exact", "err/capacity"
        );
        for c in &t.scrapes {
            println!(
                "  {:>16} {:>9} {:>9} {:>9.2} {:>10} {:>10} {:>11.3}%{}",
                c.reads,
                c.max_sets,
                c.sampled_sets,
                c.ms,
                c.estimate,
                c.exact,
                c.error_of_capacity * 100.0,
                if c.metrics { "  <- /metrics" } else { "" }
            );
        }
        tables.push(t);
    }
    let machine = Machine::describe();
    println!("\n{}", machine.summary());
    write_json(
        &args.json,
        &ConntrackReport {
            benchmark: "conntrack",
            method: "Dataplane::load with the given conntrack_size; CONNTRACK filled through the map (0-4 flows a set by a fixed hash, half full); restart_scan times ConnReader::newest_generation over every set through the shared mapping (4 MiB chunks mapped and unmapped in turn) and through one bpf_map_lookup_elem per set, on the same table; scrapes time ConnReader::occupancy(max_sets) as /metrics calls it and compare its estimate with the flows written; VmRSS is read at the end of each mapped chunk of a full scan",
            tables,
            machine,
        },
    )?;
    println!("wrote {}", args.json.display());
    Ok(())
}
