//! `cargo xtask bench etcd`: how long a fleet takes to program what is
//! written in etcd. A real etcd and three real `xlb run --store etcd://...`
//! daemons (this benchmark's own binary, `xlb-bench xlb run ...`), each in
//! its own namespace with the balancer attached (see `xlb_tests::fleet`),
//! share one VIP whose cluster has 1 000 backends.
//!
//! One sample: N backends' weights are written straight into etcd (in
//! transactions of 100 puts, as etcd allows), and the clock runs from the
//! first write (the connection to etcd made) until every node has logged
//! `reconciled (etcd revision R)` for the revision R of the last one, which
//! it does once its maps hold it. The logs are read every millisecond (a
//! millisecond of resolution); `xlb status` is not polled meanwhile, because
//! with 1 000 backends each status call costs the reconcile loop itself
//! milliseconds. After each sample every node's status must show R applied.
//! N = 1, 100 and 1 000; a figure is the median (and the worst) of the runs.

use std::{ffi::OsString, path::PathBuf, thread, time::Duration};

use anyhow::{Result, ensure};
use clap::Parser;
use serde::Serialize;
use xlb::dataplane::Limits;
use xlb_tests::fleet::{Fleet, PREFIX};

use crate::{machine::Machine, results::write_json};

const DEFAULT_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/etcd.json");
const NODES: usize = 3;
const BACKENDS: usize = 1000;
/// A prime with 100 slots per backend for 1 000 backends.
const RING: u32 = 100_003;
const CHANGES: [usize; 3] = [1, 100, 1000];

#[derive(Debug, Parser)]
pub struct Args {
    /// Samples per number of changes.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where to write the results as JSON.
    #[arg(long, default_value = DEFAULT_JSON)]
    json: PathBuf,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    method: Method,
    machine: Machine,
    results: Vec<Row>,
}

#[derive(Serialize)]
struct Method {
    nodes: usize,
    backends: usize,
    ring_size: u32,
    runs: usize,
    note: &'static str,
}

#[derive(Serialize)]
struct Row {
    changes: usize,
    /// From the first write to the last node programming it.
    median_ms: f64,
    max_ms: f64,
    /// Per change, at the median.
    median_us_per_change: f64,
    /// Of that, the reconcile itself (plan, Maglev, map writes) on each
    /// node, as its status reports: median over nodes and runs.
    reconcile_median_ms: f64,
    samples_ms: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

fn backend_key(i: usize) -> String {
    format!("{PREFIX}/v1/backends/web/c/b{i:04}")
}

fn backend_value(i: usize, weight: u32) -> String {
    let addr = 0xc612_0000u32 + 256 + i as u32; // 198.18.1.0 + i
    let addr = std::net::Ipv4Addr::from(addr);
    format!("{{\"addr\":\"{addr}\",\"weight\":{weight}}}")
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let machine = Machine::describe();
    let xlb: Vec<OsString> = vec![std::env::current_exe()?.into(), "xlb".into()];
    let limits = Limits {
        max_vips: 4,
        max_backends: 2 * BACKENDS as u32,
        ring_capacity: 2 * RING,
        conntrack_size: 4096,
    };
    let fleet = Fleet::new("bench", &xlb, NODES, limits);
    fleet.put(&[
        (
            format!("{PREFIX}/v1/vips/web"),
            format!(
                "{{\"addr\":\"198.18.100.1\",\"port\":80,\"proto\":\"tcp\",\"ring_size\":{RING}}}"
            ),
        ),
        (format!("{PREFIX}/v1/clusters/web/c"), "{}".to_owned()),
    ]);
    let all: Vec<(String, String)> = (0..BACKENDS)
        .map(|i| (backend_key(i), backend_value(i, 1)))
        .collect();
    let seeded = fleet.put(&all);
    fleet.converge(seeded);
    for i in 0..NODES {
        let slots: u32 = fleet.rings(i).values().map(|(size, _, _)| *size).sum();
        ensure!(
            slots == RING,
            "node {i} did not program the seeded VIP:\n{}",
            fleet.logs()
        );
    }
    println!(
        "{} nodes on etcd, 1 VIP with {BACKENDS} backends, ring {RING}",
        NODES
    );

    let mut results = Vec::new();
    let mut weight = 1;
    for &changes in &CHANGES {
        let mut samples = Vec::new();
        let mut reconciles = Vec::new();
        for _ in 0..args.runs {
            weight = if weight == 1 { 2 } else { 1 };
            let pairs: Vec<(String, String)> = (0..changes)
                .map(|i| (backend_key(i), backend_value(i, weight)))
                .collect();
            let (revision, start) = fleet.put_timed(&pairs);
            // A node logs this line once the maps hold the revision.
            let programmed = format!("reconciled (etcd revision {revision})");
            let mut pending: Vec<usize> = (0..NODES).collect();
            while !pending.is_empty() {
                pending.retain(|&i| !fleet.log(i).contains(&programmed));
                if !pending.is_empty() {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            samples.push(start.elapsed().as_secs_f64() * 1e3);
            // The status agrees: every node applied that revision.
            fleet.converge(revision);
            for i in 0..NODES {
                let report = fleet.status(i).last_reconcile;
                reconciles.extend(report.map(|r| r.micros as f64 / 1e3));
            }
        }
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let middle = median(&samples);
        results.push(Row {
            changes,
            median_ms: middle,
            max_ms: sorted[sorted.len() - 1],
            median_us_per_change: middle * 1e3 / changes as f64,
            reconcile_median_ms: median(&reconciles),
            samples_ms: samples,
        });
    }
    // Every node ended on the same rings.
    let first = fleet.rings(0);
    for i in 1..NODES {
        ensure!(
            fleet.rings(i) == first,
            "node {i}'s rings differ from node 0's"
        );
    }
    fleet.close();

    let report = Report {
        benchmark: "etcd",
        method: Method {
            nodes: NODES,
            backends: BACKENDS,
            ring_size: RING,
            runs: args.runs,
            note: "time from the first write into etcd (transactions of 100 puts) to the last \
                   node logging that its maps hold the last write's revision (logs read every \
                   millisecond); every node's status then shows that revision applied",
        },
        machine,
        results,
    };
    println!("{}", report.machine.summary());
    println!(
        "{:>8} {:>12} {:>10} {:>16} {:>14}",
        "changes", "median ms", "max ms", "µs per change", "reconcile ms"
    );
    for row in &report.results {
        println!(
            "{:>8} {:>12.2} {:>10.2} {:>16.1} {:>14.2}",
            row.changes,
            row.median_ms,
            row.max_ms,
            row.median_us_per_change,
            row.reconcile_median_ms
        );
    }
    write_json(&args.json, &report)?;
    println!("\nwrote {}", args.json.display());
    Ok(())
}
