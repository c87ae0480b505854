//! `control`: how fast the controller turns a change into programmed
//! rings. For 10, 100 and 1000 backends per VIP and 1, 10 and 100 VIPs
//! (every VIP served by the same backends, as when one fleet serves many
//! services): the Maglev build time of one ring, and the time from a
//! backend's health change to every ring rebuilt and written into the
//! kernel's maps, through the real reconcile (`Reconciler::plan` and
//! `apply`, minimal map writes) on a loaded data plane.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context, Result};
use lb_common::DEFAULT_RING_SIZE;
use serde::Serialize;
use xlb::{
    dataplane::{Dataplane, Limits},
    maglev::{self, Member},
    reconcile::{NodeOptions, Reconciler},
    state::{Backend, Cluster, DesiredState, Health, Proto, Vip},
};

use crate::{machine::Machine, plot, results::write_json};

const DEFAULT_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/control.json");
const DEFAULT_SVG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/control.svg");
const SEED: u32 = 0x786c_6221;
/// Backend ids are per VIP and backend; the data plane holds at most this.
const MAX_BACKEND_IDS: u32 = 65_536;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A short run: fewer repetitions
    #[arg(long)]
    pub quick: bool,
    /// Changes timed per case (each a backend going down, then up again)
    #[arg(long)]
    pub runs: Option<usize>,
    #[arg(long, default_value = DEFAULT_JSON)]
    pub json: PathBuf,
    #[arg(long, default_value = DEFAULT_SVG)]
    pub svg: PathBuf,
}

#[derive(Debug, Serialize)]
struct Case {
    backends: u32,
    vips: u32,
    ring_size: u32,
    /// `None` with the reason when the case does not fit the data plane.
    skipped: Option<String>,
    maglev_build_ms: Option<f64>,
    /// Median, over runs, of plan + apply after one backend's health
    /// changed: every VIP's ring rebuilt and its changed slots written.
    change_to_programmed_ms: Option<f64>,
    change_samples_ms: Vec<f64>,
    /// Median of the apply part alone: the changed slots, backends and
    /// VIPs written to the maps.
    apply_ms: Option<f64>,
    ring_slots_written: Option<usize>,
}

#[derive(Debug, Serialize)]
struct ControlReport {
    benchmark: &'static str,
    method: &'static str,
    cases: Vec<Case>,
    machine: Machine,
}

fn backend_addr(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + n))
}

fn ring_size(backends: u32) -> u32 {
    // The config's rule: at least 100 slots per backend.
    maglev::smallest_prime_at_least((backends * 100).max(DEFAULT_RING_SIZE))
        .unwrap_or(DEFAULT_RING_SIZE)
}

fn desired(vips: u32, backends: u32, ring: u32) -> DesiredState {
    let mut state = DesiredState::default();
    for v in 0..vips {
        let name = format!("vip{v}");
        let addr = IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(198, 18, 100, 0)) + v,
        ));
        let mut vip = Vip::new(name.clone(), addr, 80, Proto::Tcp);
        vip.ring_size = ring;
        let mut cluster = Cluster::new("main", 1, 0);
        for b in 0..backends {
            let backend = Backend::new(format!("b{b}"), backend_addr(b), 1);
            cluster.backends.insert(backend.name.clone(), backend);
        }
        vip.clusters.insert("main".to_owned(), cluster);
        state.vips.insert(name, vip);
    }
    state
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn measure(vips: u32, backends: u32, runs: usize) -> Result<Case> {
    let ring = ring_size(backends);
    let mut case = Case {
        backends,
        vips,
        ring_size: ring,
        skipped: None,
        maglev_build_ms: None,
        change_to_programmed_ms: None,
        change_samples_ms: Vec::new(),
        apply_ms: None,
        ring_slots_written: None,
    };
    let keys: Vec<[u8; 4]> = (0..backends).map(|b| b.to_be_bytes()).collect();
    let members: Vec<Member<'_>> = keys
        .iter()
        .zip(0..)
        .map(|(k, id)| Member::new(k, id, 1))
        .collect();
    let mut builds: Vec<f64> = (0..runs.max(3))
        .map(|_| {
            let start = Instant::now();
            let built = maglev::build(&members, ring, u64::from(SEED));
            let ms = start.elapsed().as_secs_f64() * 1e3;
            built.map(|_| ms)
        })
        .collect::<Result<_, _>>()?;
    case.maglev_build_ms = Some(median(&mut builds));
    if vips * backends > MAX_BACKEND_IDS {
        case.skipped = Some(format!(
            "{vips} VIPs x {backends} backends need {} backend ids; the data plane holds at most {MAX_BACKEND_IDS}",
            vips * backends
        ));
        return Ok(case);
    }
    let limits = Limits {
        max_vips: vips,
        max_backends: vips * backends,
        ring_capacity: vips * ring,
        conntrack_size: 4096,
    };
    let mut dp = Dataplane::load(limits).context("loading the data plane (are you root?)")?;
    let mut reconciler = Reconciler::new(
        NodeOptions {
            hash_seed: SEED,
            ..NodeOptions::default()
        },
        &limits,
    );
    let state = desired(vips, backends, ring);
    let healthy: BTreeMap<IpAddr, Health> = BTreeMap::new();
    let plan = reconciler.plan(&state, &healthy)?;
    reconciler.apply(plan, &mut dp)?;
    let down = BTreeMap::from([(backend_addr(0), Health::Down)]);
    let mut slots = 0;
    let mut applies = Vec::new();
    for run in 0..runs {
        let health = if run % 2 == 0 { &down } else { &healthy };
        let start = Instant::now();
        let plan = reconciler.plan(&state, health)?;
        let planned = Instant::now();
        let applied = reconciler.apply(plan, &mut dp)?;
        case.change_samples_ms
            .push(start.elapsed().as_secs_f64() * 1e3);
        applies.push(planned.elapsed().as_secs_f64() * 1e3);
        slots = applied.ring_slots_written;
    }
    case.ring_slots_written = Some(slots);
    case.change_to_programmed_ms = Some(median(&mut case.change_samples_ms.clone()));
    case.apply_ms = Some(median(&mut applies));
    Ok(case)
}

pub fn run(args: &Args) -> Result<()> {
    let runs = args.runs.unwrap_or(if args.quick { 4 } else { 10 });
    println!(
        "control: Maglev build and backend change -> all rings programmed (plan + apply), median of {runs}"
    );
    println!(
        "{:>9} {:>5} {:>8} {:>10} {:>12} {:>10} {:>12}",
        "backends", "VIPs", "ring", "build ms", "change ms", "apply ms", "slots"
    );
    let mut cases = Vec::new();
    for backends in [10, 100, 1000] {
        for vips in [1, 10, 100] {
            let case = measure(vips, backends, runs)?;
            match (&case.skipped, case.change_to_programmed_ms) {
                (Some(reason), _) => println!(
                    "{backends:>9} {vips:>5} {:>8} {:>10.2} {:>12} {:>10} {:>12}  ({reason})",
                    case.ring_size,
                    case.maglev_build_ms.unwrap_or(f64::NAN),
                    "-",
                    "-",
                    "-"
                ),
                (None, Some(ms)) => println!(
                    "{backends:>9} {vips:>5} {:>8} {:>10.2} {ms:>12.2} {:>10.2} {:>12}",
                    case.ring_size,
                    case.maglev_build_ms.unwrap_or(f64::NAN),
                    case.apply_ms.unwrap_or(f64::NAN),
                    case.ring_slots_written.unwrap_or(0)
                ),
                (None, None) => {}
            }
            cases.push(case);
        }
    }
    let series: Vec<(String, Vec<(f64, f64)>)> = [1u32, 10, 100]
        .iter()
        .map(|&vips| {
            (
                format!("{vips} VIP(s): change -> programmed"),
                cases
                    .iter()
                    .filter(|c| c.vips == vips)
                    .filter_map(|c| Some((f64::from(c.backends), c.change_to_programmed_ms?)))
                    .collect(),
            )
        })
        .chain(std::iter::once((
            "one Maglev ring build".to_owned(),
            cases
                .iter()
                .filter(|c| c.vips == 1)
                .filter_map(|c| Some((f64::from(c.backends), c.maglev_build_ms?)))
                .collect(),
        )))
        .collect();
    plot::lines(
        &args.svg,
        "Backend change to all rings programmed (plan + apply), ms",
        "backends per VIP (log scale)",
        "ms",
        &series,
    )?;
    let machine = Machine::describe();
    println!("{}", machine.summary());
    write_json(
        &args.json,
        &ControlReport {
            benchmark: "control",
            method: "every VIP has one cluster of the same N backends (weight 1), ring = smallest prime >= max(65537, 100 N); after a first full apply, one backend's health alternates Down / Up; each change is timed from Reconciler::plan to the end of Reconciler::apply (rings rebuilt, changed slots, backends and VIPs written to the kernel's maps); apply_ms is the apply part alone (ring slots stored through the shared mapping of RINGS)",
            cases,
            machine,
        },
    )?;
    println!("wrote {} and {}", args.json.display(), args.svg.display());
    Ok(())
}
