//! The scheduler: one tokio task per probe target (no thread per backend),
//! a semaphore bounding the probes in flight, each wait the interval ± the
//! jitter and the first one a random part of the interval, so that probes
//! do not beat in step. Results go to the [`HealthBoard`]; a transition
//! that changes an address's health is published on the daemon's health
//! channel, with the time of the deciding result kept until the reconcile
//! loop reports the maps updated ([`HealthBoard::maps_updated`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Semaphore, watch},
    task::JoinHandle,
};

use super::{Machine, ProbeState, ProbeTarget, Reason, Thresholds, Transition, probe::probe};
use crate::{
    metrics::{ProbeMetrics, ProbeResult},
    state::Health,
};

/// Probes in flight at most, by default: well under the default limit of
/// 1024 open files, and far more than 10 000 targets a second need when
/// probes take milliseconds.
pub const DEFAULT_IN_FLIGHT: usize = 512;

/// A target's probe state, as `xlb status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub kind: String,
    pub port: u16,
    /// Where the probe goes: "backend" (its own address) or "vip" (the
    /// VIP, through the balancer's tunnel).
    #[serde(default)]
    pub via: String,
    /// The address and port it connects to.
    #[serde(default)]
    pub target: String,
    /// "up" or "down".
    pub state: String,
    /// "ok" or the last failure's reason.
    pub last_result: Option<String>,
    /// The last transition: "down (timeout)", "up (passed)".
    pub last_transition: Option<String>,
    /// Its time, in seconds since the Unix epoch.
    pub last_transition_unix: Option<f64>,
    /// Seconds left of a flapping hold-out.
    pub held_out_secs: Option<f64>,
    pub probes: u64,
    pub failures: u64,
}

/// Decision-to-maps latency of health transitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    pub count: u64,
    pub last_micros: u64,
    pub max_micros: u64,
    pub sum_micros: u64,
}

/// Everything the prober counted, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthSnapshot {
    pub targets: usize,
    pub probes: u64,
    /// Failed probes by reason name (`timeout`, `refused`, ...).
    pub failures: BTreeMap<String, u64>,
    pub transitions_down: u64,
    pub transitions_up: u64,
    /// Flapping hold-outs started.
    pub hold_outs: u64,
    /// Targets held out now.
    pub held_out: usize,
    pub latency: LatencyStats,
}

struct Entry {
    target: ProbeTarget,
    machine_state: ProbeState,
    last_result: Option<Result<(), Reason>>,
    last_transition: Option<(Transition, SystemTime)>,
    held_until: Option<Instant>,
    probes: u64,
    failures: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<u64, Entry>,
    ids: HashMap<ProbeTarget, u64>,
    next_id: u64,
    /// Deciding-result times of health changes not yet in the maps.
    pending: Vec<Instant>,
    counts: HealthSnapshot,
}

/// What the prober knows, shared by its tasks, the reconcile loop (status,
/// latency) and metrics.
#[derive(Default)]
pub struct HealthBoard {
    inner: Mutex<Inner>,
}

impl HealthBoard {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A task that panicked mid-update leaves counts, not invariants.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A target's status, `None` when it is not probed.
    pub fn status(&self, target: &ProbeTarget) -> Option<TargetStatus> {
        let inner = self.lock();
        let entry = inner.ids.get(target).and_then(|id| inner.entries.get(id))?;
        let now = Instant::now();
        Some(TargetStatus {
            kind: target.spec.kind.name().into(),
            port: target.spec.port,
            via: target.spec.via.name().into(),
            target: target.socket().to_string(),
            state: entry.machine_state.to_string(),
            last_result: entry.last_result.as_ref().map(|r| match r {
                Ok(()) => "ok".into(),
                Err(reason) => reason.to_string(),
            }),
            last_transition: entry
                .last_transition
                .as_ref()
                .map(|(t, _)| format!("{} ({})", t.to, t.cause)),
            last_transition_unix: entry.last_transition.as_ref().map(|(_, at)| {
                at.duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64()
            }),
            held_out_secs: entry
                .held_until
                .filter(|until| *until > now)
                .map(|until| (until - now).as_secs_f64()),
            probes: entry.probes,
            failures: entry.failures,
        })
    }

    /// Counters and latency, for status and the metrics exporter.
    pub fn snapshot(&self) -> HealthSnapshot {
        let inner = self.lock();
        let now = Instant::now();
        HealthSnapshot {
            targets: inner.entries.len(),
            held_out: inner
                .entries
                .values()
                .filter(|e| e.held_until.is_some_and(|until| until > now))
                .count(),
            ..inner.counts.clone()
        }
    }

    /// The latest health and the deciding times of the changes it holds,
    /// read together so that no time is matched with a change not read.
    pub fn read_health(
        &self,
        rx: &mut watch::Receiver<BTreeMap<IpAddr, Health>>,
    ) -> (BTreeMap<IpAddr, Health>, Vec<Instant>) {
        let mut inner = self.lock();
        let health = rx.borrow_and_update().clone();
        (health, std::mem::take(&mut inner.pending))
    }

    /// The maps now reflect the changes decided at `decided`.
    pub fn maps_updated(&self, decided: &[Instant], at: Instant) {
        let mut inner = self.lock();
        let latency = &mut inner.counts.latency;
        for when in decided {
            let micros = at.saturating_duration_since(*when).as_micros() as u64;
            latency.count += 1;
            latency.last_micros = micros;
            latency.max_micros = latency.max_micros.max(micros);
            latency.sum_micros += micros;
        }
    }

    fn add(&self, target: &ProbeTarget) -> u64 {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.ids.insert(target.clone(), id);
        inner.entries.insert(
            id,
            Entry {
                target: target.clone(),
                machine_state: ProbeState::Up,
                last_result: None,
                last_transition: None,
                held_until: None,
                probes: 0,
                failures: 0,
            },
        );
        id
    }

    fn remove(&self, target: &ProbeTarget, health: &watch::Sender<BTreeMap<IpAddr, Health>>) {
        let mut inner = self.lock();
        if let Some(id) = inner.ids.remove(target) {
            inner.entries.remove(&id);
        }
        publish(&mut inner, target.addr, None, health);
    }

    /// One result: counted, and published when it changes its address's
    /// health.
    fn record(
        &self,
        id: u64,
        result: Result<(), Reason>,
        machine: &Machine,
        transition: Option<Transition>,
        health: &watch::Sender<BTreeMap<IpAddr, Health>>,
    ) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.counts.probes += 1;
        if let Err(reason) = &result {
            *inner
                .counts
                .failures
                .entry(reason.name().into())
                .or_default() += 1;
        }
        let Some(entry) = inner.entries.get_mut(&id) else {
            return;
        };
        entry.probes += 1;
        entry.failures += u64::from(result.is_err());
        entry.last_result = Some(result);
        entry.machine_state = machine.state();
        let Some(transition) = transition else {
            return;
        };
        let target = entry.target.label();
        let kind = entry.target.spec.kind.name();
        let addr = entry.target.addr;
        let decided = transition.at;
        match transition.to {
            ProbeState::Down => inner.counts.transitions_down += 1,
            ProbeState::Up => inner.counts.transitions_up += 1,
        }
        if let Some(until) = transition.held_until {
            inner.counts.hold_outs += 1;
            entry.held_until = Some(until);
            warn!(
                "health: {kind} {target} {} ({}), flapping: held out for {:.1} s",
                transition.to,
                transition.cause,
                (until - decided).as_secs_f64()
            );
        } else {
            info!(
                "health: {kind} {target} {} ({})",
                transition.to, transition.cause
            );
        }
        entry.last_transition = Some((transition, SystemTime::now()));
        publish(inner, addr, Some(decided), health);
    }
}

/// Recomputes `addr`'s health from its targets and publishes a change.
fn publish(
    inner: &mut Inner,
    addr: IpAddr,
    decided: Option<Instant>,
    health: &watch::Sender<BTreeMap<IpAddr, Health>>,
) {
    let states: Vec<ProbeState> = inner
        .entries
        .values()
        .filter(|e| e.target.addr == addr)
        .map(|e| e.machine_state)
        .collect();
    let next = if states.contains(&ProbeState::Down) {
        Some(Health::Down)
    } else if states.is_empty() {
        None
    } else {
        Some(Health::Up)
    };
    let changed = health.send_if_modified(|map| {
        // Up is the default: an address is in the map only while down.
        let before = map.get(&addr).copied();
        match next {
            Some(Health::Down) => map.insert(addr, Health::Down),
            _ => map.remove(&addr),
        };
        before != map.get(&addr).copied()
    });
    if changed && let Some(at) = decided {
        inner.pending.push(at);
    }
}

/// Runs the probes of the targets it is given.
pub struct Prober {
    board: Arc<HealthBoard>,
    in_flight: Arc<Semaphore>,
    metrics: Option<ProbeMetrics>,
}

impl Prober {
    /// At most `in_flight` probes at a time.
    pub fn new(in_flight: usize) -> Self {
        Self {
            board: Arc::default(),
            in_flight: Arc::new(Semaphore::new(in_flight.max(1))),
            metrics: None,
        }
    }

    /// Also counts and times every probe in `metrics` (for `/metrics`).
    pub fn with_metrics(mut self, metrics: ProbeMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn board(&self) -> Arc<HealthBoard> {
        Arc::clone(&self.board)
    }

    /// Probes `targets` (the set may change at any time) and publishes
    /// health on `health` until `targets` closes.
    pub async fn run(
        self,
        mut targets: watch::Receiver<BTreeSet<ProbeTarget>>,
        health: watch::Sender<BTreeMap<IpAddr, Health>>,
    ) {
        let health = Arc::new(health);
        let mut tasks: HashMap<ProbeTarget, JoinHandle<()>> = HashMap::new();
        loop {
            let wanted = targets.borrow_and_update().clone();
            tasks.retain(|target, task| {
                let keep = wanted.contains(target);
                if !keep {
                    task.abort();
                    self.board.remove(target, &health);
                }
                keep
            });
            for target in wanted {
                if tasks.contains_key(&target) {
                    continue;
                }
                let id = self.board.add(&target);
                let task = tokio::spawn(probe_loop(
                    id,
                    target.clone(),
                    Arc::clone(&self.board),
                    Arc::clone(&self.in_flight),
                    Arc::clone(&health),
                    self.metrics.clone(),
                ));
                tasks.insert(target, task);
            }
            if targets.changed().await.is_err() {
                break;
            }
        }
        for task in tasks.values() {
            task.abort();
        }
    }
}

/// A small per-task generator for jitter (splitmix64): no shared state,
/// no dependency, and nothing here needs more than spread.
struct Jitter(u64);

impl Jitter {
    fn new(target: &ProbeTarget) -> Self {
        Self(RandomState::new().hash_one(target))
    }

    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `interval` ± `permille`/1000 of it.
    fn wait(&mut self, interval: Duration, permille: u32) -> Duration {
        let spread = f64::from(permille.min(1000)) / 1000.0;
        interval.mul_f64(1.0 + spread * (2.0 * self.next() - 1.0))
    }
}

async fn probe_loop(
    id: u64,
    target: ProbeTarget,
    board: Arc<HealthBoard>,
    in_flight: Arc<Semaphore>,
    health: Arc<watch::Sender<BTreeMap<IpAddr, Health>>>,
    metrics: Option<ProbeMetrics>,
) {
    let spec = &target.spec;
    let mut machine = Machine::new(Thresholds {
        rise: spec.rise,
        fall: spec.fall,
        interval: spec.interval,
        flap_backoff: spec.flap_backoff,
    });
    let mut jitter = Jitter::new(&target);
    tokio::time::sleep(spec.interval.mul_f64(jitter.next())).await;
    loop {
        let started = tokio::time::Instant::now();
        let result = {
            let Ok(_permit) = in_flight.acquire().await else {
                return;
            };
            let probed = Instant::now();
            let result = probe(&target).await;
            if let Some(metrics) = &metrics {
                let outcome = match &result {
                    Ok(()) => ProbeResult::Ok,
                    Err(Reason::Timeout) => ProbeResult::Timeout,
                    Err(_) => ProbeResult::Failed,
                };
                metrics.probe(target.addr, outcome, probed.elapsed());
            }
            result
        };
        let transition = machine.observe(result.clone(), Instant::now());
        board.record(id, result, &machine, transition, &health);
        let wait = jitter.wait(spec.interval, spec.jitter_permille);
        tokio::time::sleep_until(started + wait).await;
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr, TcpListener};

    use super::*;
    use crate::health::{ProbeKind, ProbeSpec, ProbeVia};

    const DEADLINE: Duration = Duration::from_secs(30);

    /// Polls `board` until `done` holds for the target's status.
    async fn until(
        board: &HealthBoard,
        target: &ProbeTarget,
        done: impl Fn(&TargetStatus) -> bool,
    ) -> TargetStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = board.status(target)
                && done(&status)
            {
                return status;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "waited {:?}: {:?}",
                started.elapsed(),
                board.status(target)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// On loopback: a listener that comes and goes is a flapping backend.
    #[tokio::test]
    async fn a_flapping_target_is_held_out_and_published_down() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding");
        let addr: SocketAddr = listener.local_addr().expect("address");
        let target = ProbeTarget {
            addr: addr.ip(),
            spec: ProbeSpec {
                kind: ProbeKind::Tcp,
                via: ProbeVia::Backend,
                port: addr.port(),
                interval: Duration::from_millis(20),
                timeout: Duration::from_millis(20),
                rise: 1,
                fall: 1,
                jitter_permille: 100,
                // Far longer than the test: it must still hold at the end.
                flap_backoff: Duration::from_secs(600),
            },
            via_vip: None,
        };
        let prober = Prober::new(4);
        let board = prober.board();
        let (_targets, targets_rx) = watch::channel(BTreeSet::from([target.clone()]));
        let (health_tx, mut health) = watch::channel(BTreeMap::new());
        let task = tokio::spawn(prober.run(targets_rx, health_tx));

        let mut listener = Some(listener);
        for _ in 0..3 {
            until(&board, &target, |s| s.state == "up").await;
            drop(listener.take());
            until(&board, &target, |s| s.state == "down").await;
            listener = Some(TcpListener::bind(addr).expect("binding again"));
        }
        // Listening again, passing every probe, and held out all the same.
        let held = until(&board, &target, |s| s.last_result.as_deref() == Some("ok")).await;
        let probes = held.probes;
        let later = until(&board, &target, |s| s.probes >= probes + 5).await;
        assert_eq!(later.state, "down");
        assert!(later.held_out_secs.is_some_and(|s| s > 0.0), "{later:?}");
        assert_eq!(later.last_transition.as_deref(), Some("down (refused)"));
        let snapshot = board.snapshot();
        assert_eq!(
            (
                snapshot.hold_outs,
                snapshot.held_out,
                snapshot.transitions_down
            ),
            (1, 1, 3)
        );
        let (published, decided) = board.read_health(&mut health);
        assert_eq!(published.get(&addr.ip()), Some(&Health::Down));
        assert!(!decided.is_empty(), "the deciding times wait for the maps");
        task.abort();
    }
}
