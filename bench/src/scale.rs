//! `scale`: how much kernel memory xlb's maps take, read from the kernel
//! (`memlock` in /proc/self/fdinfo of each map the loaded programs use),
//! at the default limits (512 VIPs x 4096 backends, 2M-flow connection
//! table) and as each limit grows.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
};

use anyhow::{Context, Result};
use aya::maps::MapInfo;
use lb_common::DEFAULT_RING_SIZE;
use serde::Serialize;
use xlb::dataplane::{Dataplane, Limits, Role};

use crate::{machine::Machine, plot, results::write_json};

const DEFAULT_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/scale.json");
const DEFAULT_SVG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/scale.svg");
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A short run: fewer sizes per limit
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value = DEFAULT_JSON)]
    pub json: PathBuf,
    #[arg(long, default_value = DEFAULT_SVG)]
    pub svg: PathBuf,
}

#[derive(Debug, Serialize)]
struct MapMemory {
    name: String,
    max_entries: u32,
    memlock_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Footprint {
    max_vips: u32,
    max_backends: u32,
    ring_capacity: u32,
    conntrack_size: u32,
    total_bytes: u64,
    maps: Vec<MapMemory>,
}

#[derive(Debug, Serialize)]
struct Growth {
    /// The limit that varies; the others stay at their defaults.
    limit: &'static str,
    points: Vec<(u32, u64)>,
}

#[derive(Debug, Serialize)]
struct ScaleReport {
    benchmark: &'static str,
    method: &'static str,
    default: Footprint,
    growth: Vec<Growth>,
    machine: Machine,
}

/// The default limits with one of them set to a size.
type WithLimit = fn(Limits, u32) -> Limits;

fn measure(limits: Limits) -> Result<Footprint> {
    let dp = Dataplane::load(limits).context("loading the data plane (are you root?)")?;
    let mut ids = BTreeSet::new();
    for role in [Role::Balancer, Role::Decap] {
        let info = dp.program(role)?.info()?;
        ids.extend(info.map_ids()?.unwrap_or_default());
    }
    let mut maps = Vec::new();
    for id in ids {
        let info = MapInfo::from_id(id)?;
        let fd = info.fd()?;
        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))
                .context("reading fdinfo")?;
        let memlock = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no memlock in a map's fdinfo")?;
        maps.push(MapMemory {
            name: info.name_as_str().unwrap_or("?").to_owned(),
            max_entries: info.max_entries(),
            memlock_bytes: memlock,
        });
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.memlock_bytes));
    Ok(Footprint {
        max_vips: limits.max_vips,
        max_backends: limits.max_backends,
        ring_capacity: limits.ring_capacity,
        conntrack_size: limits.conntrack_size,
        total_bytes: maps.iter().map(|m| m.memlock_bytes).sum(),
        maps,
    })
}

pub fn run(args: &Args) -> Result<()> {
    let base = Limits::default();
    let default = measure(base)?;
    println!(
        "scale: kernel memory of xlb's maps (memlock), {} VIPs x {} backends, {} ring slots, {} flows",
        base.max_vips, base.max_backends, base.ring_capacity, base.conntrack_size
    );
    for m in &default.maps {
        println!(
            "  {:<16} {:>10} entries {:>10.2} MiB",
            m.name,
            m.max_entries,
            m.memlock_bytes as f64 / MIB
        );
    }
    println!(
        "  {:<16} {:>10}         {:>10.2} MiB",
        "total",
        "",
        default.total_bytes as f64 / MIB
    );

    let pick = |all: Vec<u32>| -> Vec<u32> {
        if args.quick {
            all.into_iter().step_by(2).collect()
        } else {
            all
        }
    };
    let conntrack: Vec<u32> = pick((16..=24).map(|b| 1u32 << b).collect());
    let vips: Vec<u32> = pick(vec![32, 64, 128, 256, 512, 1024]);
    let backends: Vec<u32> = pick(vec![1024, 4096, 16384, 65536]);
    let mut growth = Vec::new();
    let series: [(&'static str, Vec<u32>, WithLimit); 3] = [
        ("conntrack_size (flows)", conntrack, |l, n| Limits {
            conntrack_size: n,
            ..l
        }),
        ("max_vips (rings of 65537 slots each)", vips, |l, n| {
            Limits {
                max_vips: n,
                ring_capacity: n * DEFAULT_RING_SIZE,
                ..l
            }
        }),
        ("max_backends", backends, |l, n| Limits {
            max_backends: n,
            ..l
        }),
    ];
    for (limit, sizes, with) in series {
        let mut points = Vec::new();
        for n in sizes {
            let footprint = measure(with(base, n))?;
            println!(
                "  {limit} = {n}: {:.1} MiB",
                footprint.total_bytes as f64 / MIB
            );
            points.push((n, footprint.total_bytes));
        }
        growth.push(Growth { limit, points });
    }
    plot::lines(
        &args.svg,
        "Kernel memory of xlb's maps as one limit grows (others at defaults)",
        "limit (entries; log scale)",
        "MiB (memlock, all maps)",
        &growth
            .iter()
            .map(|g| {
                (
                    g.limit.to_owned(),
                    g.points
                        .iter()
                        .map(|(n, b)| (f64::from(*n), *b as f64 / MIB))
                        .collect(),
                )
            })
            .collect::<Vec<_>>(),
    )?;
    let machine = Machine::describe();
    println!("{}", machine.summary());
    write_json(
        &args.json,
        &ScaleReport {
            benchmark: "scale",
            method: "Dataplane::load with the limits given; for every map the balancer and decap programs use, memlock from /proc/self/fdinfo (the kernel's own accounting of the map's memory)",
            default,
            growth,
            machine,
        },
    )?;
    println!("wrote {} and {}", args.json.display(), args.svg.display());
    Ok(())
}
