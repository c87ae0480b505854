//! `health`: what health probing costs and how fast it acts.
//!
//! 1. Prober CPU: 10 000 targets probed with TCP connects every second
//!    (jitter 10%), against one listener in a private network namespace
//!    (the targets are 10 000 loopback addresses, 127.1.0.0 + n, all
//!    local in the namespace). The prober runs on one current-thread tokio
//!    runtime, so its thread's CPU time (getrusage RUSAGE_THREAD) is all of
//!    it; the listener drains its queue on another thread, not counted.
//!    Goal: under one core.
//! 2. Transition latency for 1 000 backends: a VIP of two clusters of 500,
//!    programmed into the real maps; each round one backend changes health
//!    and the time from that change to the maps written (plan: policy and
//!    Maglev ring; apply: backend entry and the ring slots that move) is
//!    measured. This is the reconcile loop's part of "deciding probe
//!    result -> maps updated"; the daemon measures the whole of it for
//!    every transition and shows it in `xlb status`. Goal: under 10 ms.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, TcpListener},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use xlb::{
    dataplane::{Dataplane, Limits},
    health::{ProbeKind, ProbeSpec, ProbeTarget, ProbeVia, Prober},
    policy::PolicyOptions,
    reconcile::{NodeOptions, Reconciler},
    state::{Backend, Cluster, DesiredState, Health, Proto, Vip},
    topology::Topology,
};

use crate::{machine::Machine, results::write_json};

const DEFAULT_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/health.json");
const PORT: u16 = 8080;
const CPU_GOAL_CORES: f64 = 1.0;
const LATENCY_GOAL_MS: f64 = 10.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Probe targets of the CPU measurement.
    #[arg(long, default_value_t = 10_000)]
    targets: u32,
    /// Seconds of CPU measurement, after one interval of warm-up.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Probes in flight at most.
    #[arg(long, default_value_t = xlb::health::prober::DEFAULT_IN_FLIGHT)]
    in_flight: usize,
    /// Backends of the latency measurement.
    #[arg(long, default_value_t = 1000)]
    backends: u32,
    /// Health changes timed.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    #[arg(long, default_value = DEFAULT_JSON)]
    json: PathBuf,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    cpu: CpuReport,
    latency: LatencyReport,
}

#[derive(Serialize)]
struct CpuReport {
    targets: u32,
    interval_secs: f64,
    wall_secs: f64,
    cpu_secs: f64,
    cores: f64,
    goal_cores: f64,
    probes: u64,
    probes_per_sec: f64,
    failures: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct LatencyReport {
    backends: u32,
    changes: usize,
    ring_size: u32,
    median_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    goal_ms: f64,
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(
        args.targets > 0 && args.targets <= 60_000,
        "--targets must be 1..=60000"
    );
    ensure!(
        args.backends >= 2 && args.changes > 0,
        "--backends >= 2, --changes >= 1"
    );
    let machine = Machine::describe();
    raise_open_files();
    let cpu = prober_cpu(args)?;
    let latency = transition_latency(args)?;
    let report = Report {
        machine,
        cpu,
        latency,
    };
    print_report(&report);
    write_json(&args.json, &report)?;
    println!("\nwritten: {}", args.json.display());
    Ok(())
}

/// Sockets in flight plus the listener's: more than the usual 1024.
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct that outlives the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn thread_cpu() -> Duration {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn prober_cpu(args: &Args) -> Result<CpuReport> {
    let interval = Duration::from_secs(1);
    let topology = Topology::new("bench-health").context("topology")?;
    let host = topology.host("probes").context("namespace")?;
    let listener = host
        .run_in(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)))
        .context("entering the namespace")?
        .context("binding the listener")?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    // Accepts and drops: the prober's resets have closed them already.
    let drain = thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok(_) => {}
                Err(err) if err.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1));
                }
                Err(_) => {}
            }
        }
    });
    let targets: BTreeSet<ProbeTarget> = (0..args.targets)
        .map(|n| ProbeTarget {
            addr: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + n)),
            spec: ProbeSpec {
                kind: ProbeKind::Tcp,
                via: ProbeVia::Backend,
                port: PORT,
                interval,
                timeout: Duration::from_millis(500),
                rise: 2,
                fall: 3,
                jitter_permille: 100,
                flap_backoff: Duration::from_secs(30),
            },
            via_vip: None,
        })
        .collect();
    let seconds = args.seconds;
    let in_flight = args.in_flight;
    let measured = host
        .run_in(
            move || -> Result<(Duration, Duration, xlb::health::HealthSnapshot, u64)> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let prober = Prober::new(in_flight);
                    let board = prober.board();
                    let (_targets_tx, targets_rx) = tokio::sync::watch::channel(targets);
                    let (health_tx, _health_rx) = tokio::sync::watch::channel(BTreeMap::new());
                    let task = tokio::spawn(prober.run(targets_rx, health_tx));
                    // One interval: every target has started.
                    tokio::time::sleep(interval + interval / 2).await;
                    let before = board.snapshot().probes;
                    let (cpu0, wall0) = (thread_cpu(), Instant::now());
                    tokio::time::sleep(Duration::from_secs(seconds)).await;
                    let (cpu, wall) = (thread_cpu() - cpu0, wall0.elapsed());
                    let snapshot = board.snapshot();
                    task.abort();
                    Ok((cpu, wall, snapshot.clone(), snapshot.probes - before))
                })
            },
        )
        .context("entering the namespace")??;
    stop.store(true, Ordering::Relaxed);
    let _ = drain.join();
    topology.close().context("teardown")?;
    let (cpu, wall, snapshot, probes) = measured;
    Ok(CpuReport {
        targets: args.targets,
        interval_secs: interval.as_secs_f64(),
        wall_secs: wall.as_secs_f64(),
        cpu_secs: cpu.as_secs_f64(),
        cores: cpu.as_secs_f64() / wall.as_secs_f64(),
        goal_cores: CPU_GOAL_CORES,
        probes,
        probes_per_sec: probes as f64 / wall.as_secs_f64(),
        failures: snapshot.failures,
    })
}

fn transition_latency(args: &Args) -> Result<LatencyReport> {
    // A prime of at least 100 x the backends.
    let ring_size = [65537u32, 131071, 262147, 524287, 1048573]
        .into_iter()
        .find(|size| *size as u64 >= 100 * args.backends as u64)
        .context("--backends: at most 10485")?;
    let limits = Limits {
        max_vips: 2,
        max_backends: args.backends,
        ring_capacity: ring_size,
        conntrack_size: 1024,
    };
    let mut dataplane = Dataplane::load(limits).context("loading the data plane")?;
    let mut reconciler = Reconciler::new(
        NodeOptions {
            hash_seed: 0x786c_6221,
            policy: PolicyOptions::default(),
        },
        &limits,
    );
    let mut vip = Vip::new("web", "198.18.100.1".parse()?, 80, Proto::Tcp);
    vip.ring_size = ring_size;
    let addrs: Vec<IpAddr> = (0..args.backends)
        .map(|n| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + n)))
        .collect();
    for (c, name) in ["east", "west"].iter().enumerate() {
        let mut cluster = Cluster::new(*name, 1, 0);
        for (i, addr) in addrs.iter().enumerate().filter(|(i, _)| i % 2 == c) {
            let b = format!("b{i}");
            cluster
                .backends
                .insert(b.clone(), Backend::new(b, *addr, 1));
        }
        vip.clusters.insert((*name).into(), cluster);
    }
    let state = DesiredState {
        vips: [("web".to_string(), vip)].into(),
    };
    let mut health: BTreeMap<IpAddr, Health> = BTreeMap::new();
    let plan = reconciler.plan(&state, &health)?;
    reconciler.apply(plan, &mut dataplane)?;
    let mut times = Vec::with_capacity(args.changes);
    for k in 0..args.changes {
        // Down, then up again: every other change brings one back.
        let addr = addrs[(k / 2 * 7919) % addrs.len()];
        let decided = Instant::now();
        if health.remove(&addr).is_none() {
            health.insert(addr, Health::Down);
        }
        let plan = reconciler.plan(&state, &health)?;
        reconciler.apply(plan, &mut dataplane)?;
        times.push(decided.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok(LatencyReport {
        backends: args.backends,
        changes: args.changes,
        ring_size,
        median_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
        goal_ms: LATENCY_GOAL_MS,
    })
}

fn print_report(r: &Report) {
    println!("\nxlb health probes");
    println!("{}", r.machine.summary());
    let c = &r.cpu;
    println!(
        "\nprober CPU: {} TCP targets every {} s, {:.0} probes/s over {:.1} s: {:.3} s of CPU = {:.2} cores (goal < {}), {:.1}% of the goal",
        c.targets,
        c.interval_secs,
        c.probes_per_sec,
        c.wall_secs,
        c.cpu_secs,
        c.cores,
        c.goal_cores,
        100.0 * c.cores / c.goal_cores
    );
    if !c.failures.is_empty() {
        println!("  failed probes: {:?}", c.failures);
    }
    let l = &r.latency;
    println!(
        "transition latency, {} backends (ring {}), {} changes: median {:.2} ms, p99 {:.2} ms, max {:.2} ms (goal < {} ms); median / goal = {:.3}",
        l.backends,
        l.ring_size,
        l.changes,
        l.median_ms,
        l.p99_ms,
        l.max_ms,
        l.goal_ms,
        l.median_ms / l.goal_ms
    );
}
