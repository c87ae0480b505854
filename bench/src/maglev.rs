//! `maglev`: how long building a Maglev ring takes, against the Maglev
//! paper's figures (1.8 ms at M = 65537, 22.9 ms at M = 655373, on 2016
//! hardware, number of backends not given), and how many slots move when one
//! backend of N leaves.
//!
//! Every case is built once and checked before it is timed (every backend
//! holds its due share of slots, to within one slot), so that what is timed
//! is a correct build. The cases are interleaved, one build each in turn, so
//! that all of them see the same machine state; the figure reported is the
//! median of the runs. The thread is pinned to one CPU.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use xlb::maglev::{self, Member};

use crate::{
    machine::{self, Machine},
    results::write_json,
};

const DEFAULT_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/maglev.json");

/// The paper's build times (NSDI 2016), by ring size.
const PAPER_MS: [(u32, f64); 2] = [(65537, 1.8), (655373, 22.9)];
const SIZES: [u32; 2] = [65537, 655373];
const BACKENDS: [usize; 3] = [10, 100, 1000];
/// The paper's disruption figure: removing 1 of 100 backends changes about
/// 1.6% of the slots (the minimum being 1%).
const PAPER_DISRUPTION_100: f64 = 1.6;
const SEED: u64 = 0x5eed_f00d;
/// Backend keys are the addresses `198.19.0.0 + n` (the project's test range).
const FIRST_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Timed builds per case; the figure reported is their median.
    #[arg(long, default_value_t = 15)]
    runs: usize,
    /// How many different backends are removed, one at a time, to measure
    /// disruption (capped at N).
    #[arg(long, default_value_t = 20)]
    removals: usize,
    /// CPU to pin the benchmark to (default: the highest one allowed).
    #[arg(long)]
    cpu: Option<usize>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = DEFAULT_JSON)]
    json: PathBuf,
}

#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Weights {
    /// Every backend weight 1: the paper's setting.
    Equal,
    /// Weights 1-100, pseudo-random (fixed).
    Mixed,
    /// One backend with weight 1000, the others 1: the worst case for a
    /// scheduler that visits every backend every round.
    Skewed,
}

impl Weights {
    fn name(self) -> &'static str {
        match self {
            Weights::Equal => "equal",
            Weights::Mixed => "1-100",
            Weights::Skewed => "1000:1",
        }
    }

    fn of(self, n: usize) -> Vec<u32> {
        match self {
            Weights::Equal => vec![1; n],
            Weights::Mixed => {
                // xorshift32, fixed start: the same weights every run.
                let mut x = 0x9e37_79b9u32;
                (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x % 100 + 1
                    })
                    .collect()
            }
            Weights::Skewed => (0..n).map(|i| if i == 0 { 1000 } else { 1 }).collect(),
        }
    }
}

struct Case {
    size: u32,
    weights: Weights,
    keys: Vec<[u8; 4]>,
    weight_of: Vec<u32>,
    samples_ms: Vec<f64>,
}

impl Case {
    fn new(size: u32, n: usize, weights: Weights) -> Self {
        let keys = (0..n as u32)
            .map(|i| Ipv4Addr::from(u32::from(FIRST_BACKEND) + i).octets())
            .collect();
        Self {
            size,
            weights,
            keys,
            weight_of: weights.of(n),
            samples_ms: Vec::new(),
        }
    }

    fn members(&self) -> Vec<Member<'_>> {
        (0u32..)
            .zip(self.keys.iter().zip(&self.weight_of))
            .map(|(id, (key, &weight))| Member::new(key, id, weight))
            .collect()
    }

    fn build(&self) -> Result<Vec<u32>> {
        maglev::build(&self.members(), self.size, SEED).map_err(Into::into)
    }

    /// Every backend's slots within one of its due `M·w/W`.
    fn check(&self, ring: &[u32]) -> Result<()> {
        ensure!(
            ring.len() == self.size as usize,
            "ring of {} slots",
            ring.len()
        );
        let mut counts = vec![0u64; self.keys.len()];
        for &id in ring {
            *counts
                .get_mut(id as usize)
                .with_context(|| format!("slot holds unknown backend {id}"))? += 1;
        }
        let total: u64 = self.weight_of.iter().map(|&w| u64::from(w)).sum();
        for (id, (&count, &weight)) in counts.iter().zip(&self.weight_of).enumerate() {
            let due = f64::from(self.size) * f64::from(weight) / total as f64;
            ensure!(
                (count as f64 - due).abs() < 1.0,
                "M = {}, N = {}: backend {id} has {count} slots, due {due:.2}",
                self.size,
                self.keys.len()
            );
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    method: Method,
    machine: Machine,
    builds: Vec<BuildResult>,
    disruption: Vec<Disruption>,
}

#[derive(Debug, Serialize)]
struct Method {
    runs: usize,
    removals: usize,
    seed: u64,
    keys: String,
    note: &'static str,
}

#[derive(Debug, Serialize)]
struct BuildResult {
    size: u32,
    backends: usize,
    weights: Weights,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    samples_ms: Vec<f64>,
    paper_ms: Option<f64>,
    /// `median_ms / paper_ms`: below 1 is faster than the paper.
    ratio_to_paper: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Disruption {
    size: u32,
    backends: usize,
    removals: usize,
    /// Share of slots that changed when one backend left, in %: mean and
    /// largest over the removals.
    changed_pct_mean: f64,
    changed_pct_max: f64,
    /// The removed backend's own slots (they must change), in %: mean.
    minimum_pct_mean: f64,
    /// `changed - minimum`: slots that moved between the other backends.
    excess_pct_mean: f64,
    excess_pct_max: f64,
    /// Adding the backend back gave the original ring, every time.
    restored: bool,
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(args.removals > 0, "--removals must be at least 1");
    let mut machine = Machine::describe();
    let cpu = machine::pin(args.cpu)?;
    machine.pinned_cpu = Some(cpu);

    let mut cases: Vec<Case> = Vec::new();
    for &size in &SIZES {
        for &n in &BACKENDS {
            cases.push(Case::new(size, n, Weights::Equal));
        }
        cases.push(Case::new(size, 1000, Weights::Mixed));
        cases.push(Case::new(size, 1000, Weights::Skewed));
    }
    for case in &cases {
        case.check(&case.build()?)?;
    }
    println!("verified: every case's ring gives every backend its due share to within one slot");

    for run in 0..args.runs {
        // One build per case in turn, starting one case later each run.
        let count = cases.len();
        for k in 0..count {
            let case = &mut cases[(run + k) % count];
            let members = case.members();
            let start = Instant::now();
            let ring = maglev::build(&members, case.size, SEED)?;
            let elapsed = start.elapsed();
            std::hint::black_box(&ring);
            case.samples_ms.push(elapsed.as_secs_f64() * 1e3);
        }
    }
    let builds: Vec<BuildResult> = cases.iter().map(build_result).collect();

    let mut disruption = Vec::new();
    for &size in &SIZES {
        for &n in &BACKENDS {
            disruption.push(measure_disruption(size, n, args.removals)?);
        }
    }

    let report = Report {
        benchmark: "maglev",
        method: Method {
            runs: args.runs,
            removals: args.removals,
            seed: SEED,
            keys: format!("IPv4 addresses {FIRST_BACKEND} + n, 4 bytes each"),
            note: "build time of xlb::maglev::build (allocation included), median of the runs; \
                   the paper (NSDI 2016) gives 1.8 ms at M = 65537 and 22.9 ms at M = 655373 on \
                   2016 hardware without saying for how many backends",
        },
        machine,
        builds,
        disruption,
    };
    print_report(&report);
    write_json(&args.json, &report)?;
    println!("\nwrote {}", args.json.display());
    Ok(())
}

fn build_result(case: &Case) -> BuildResult {
    let mut sorted = case.samples_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = sorted[sorted.len() / 2];
    let paper_ms = PAPER_MS
        .iter()
        .find(|(size, _)| *size == case.size)
        .map(|(_, ms)| *ms);
    BuildResult {
        size: case.size,
        backends: case.keys.len(),
        weights: case.weights,
        median_ms,
        min_ms: sorted[0],
        max_ms: sorted[sorted.len() - 1],
        samples_ms: case.samples_ms.clone(),
        paper_ms,
        ratio_to_paper: paper_ms.map(|paper| median_ms / paper),
    }
}

/// Removes `removals` backends of `n` (spread over the key order), one at a
/// time, and counts the slots that change; then adds each back.
fn measure_disruption(size: u32, n: usize, removals: usize) -> Result<Disruption> {
    let case = Case::new(size, n, Weights::Equal);
    let all = case.members();
    let before = maglev::build(&all, size, SEED)?;
    let removals = removals.min(n);
    let mut changed = Vec::with_capacity(removals);
    let mut minimum = Vec::with_capacity(removals);
    let mut restored = true;
    for j in 0..removals {
        let gone = (j * n / removals) as u32;
        let rest: Vec<Member<'_>> = all.iter().copied().filter(|m| m.id != gone).collect();
        let after = maglev::build(&rest, size, SEED)?;
        let mut moved = 0u64;
        let mut own = 0u64;
        for (old, new) in before.iter().zip(&after) {
            moved += u64::from(old != new);
            own += u64::from(*old == gone);
        }
        changed.push(moved as f64 * 100.0 / f64::from(size));
        minimum.push(own as f64 * 100.0 / f64::from(size));
        restored &= maglev::build(&all, size, SEED)? == before;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let excess: Vec<f64> = changed.iter().zip(&minimum).map(|(c, m)| c - m).collect();
    Ok(Disruption {
        size,
        backends: n,
        removals,
        changed_pct_mean: mean(&changed),
        changed_pct_max: max(&changed),
        minimum_pct_mean: mean(&minimum),
        excess_pct_mean: mean(&excess),
        excess_pct_max: max(&excess),
        restored,
    })
}

fn print_report(report: &Report) {
    let m = &report.machine;
    println!(
        "\nxlb Maglev ring build: median of {} builds per case, seed {:#x}",
        report.method.runs, report.method.seed
    );
    println!("{}", m.summary());
    println!();
    println!(
        "{:>8} {:>6} {:>8} {:>10} {:>17} {:>9} {:>8}",
        "M", "N", "weights", "median ms", "range ms", "paper ms", "x paper"
    );
    println!("{}", "-".repeat(72));
    for b in &report.builds {
        println!(
            "{:>8} {:>6} {:>8} {:>10.3} {:>17} {:>9} {:>8}",
            b.size,
            b.backends,
            b.weights.name(),
            b.median_ms,
            format!("{:.3}-{:.3}", b.min_ms, b.max_ms),
            b.paper_ms.map_or("-".into(), |ms| format!("{ms:.1}")),
            b.ratio_to_paper
                .map_or("-".into(), |ratio| format!("{ratio:.3}")),
        );
    }
    println!(
        "\nx paper: our median / the paper's time for the same M (below 1 is faster); the \
         paper does not say\nfor how many backends, nor with what weights, so every N is \
         compared with the same figure."
    );

    println!(
        "\nDisruption: one of N equal backends removed ({} different ones in turn)",
        report.method.removals
    );
    println!(
        "{:>8} {:>6} {:>10} {:>10} {:>10} {:>14} {:>9}",
        "M", "N", "changed %", "minimum %", "excess %", "excess max %", "restored"
    );
    println!("{}", "-".repeat(73));
    for d in &report.disruption {
        println!(
            "{:>8} {:>6} {:>10.3} {:>10.3} {:>10.3} {:>14.3} {:>9}",
            d.size,
            d.backends,
            d.changed_pct_mean,
            d.minimum_pct_mean,
            d.excess_pct_mean,
            d.excess_pct_max,
            if d.restored { "yes" } else { "NO" }
        );
    }
    println!(
        "\nminimum: the removed backend's own slots; excess: slots that moved between the \
         others.\nThe paper: removing 1 of 100 changes about {PAPER_DISRUPTION_100}% (minimum \
         1%); 1 of 3, 33.4% (minimum 33.3%)."
    );
    let by_n: BTreeMap<usize, f64> = report
        .disruption
        .iter()
        .filter(|d| d.size == 65537)
        .map(|d| (d.backends, d.changed_pct_mean))
        .collect();
    if let Some(changed) = by_n.get(&100) {
        println!(
            "here, at M = 65537: {changed:.2}% ({:.2}x the paper's)",
            changed / PAPER_DISRUPTION_100
        );
    }
}
