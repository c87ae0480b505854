//! What xlb counts, for people and for Prometheus.
//!
//! One snapshot type, [`Stats`], is what every consumer reads: the
//! daemon's reconcile loop builds it on request ([`crate::api::Request::Stats`])
//! from the data plane's counter maps (per-CPU values summed by
//! [`crate::dataplane::maps::CounterReader`]), the desired state and the
//! health it knows. `/metrics` ([`serve`]), `xlb stats` and `xlb top` all ask
//! for it through the same request, so they cannot disagree, and nothing
//! here reads or writes a map itself.
//!
//! Besides the snapshot, the daemon keeps a little state of its own in
//! [`Telemetry`]: the reconcile-latency histogram, when each backend's health
//! last changed, and the hook the health prober feeds ([`ProbeMetrics`]).
//!
//! # Label cardinality
//!
//! Every label value comes from the configuration or from a fixed list, never
//! from packets: `vip` (≤ `max_vips`), `cluster`, `backend` (≤
//! `max_backends` series per metric, counted per VIP), `verdict` / `reason`
//! (the 23 data-plane counters), `interface` (the attached interfaces),
//! `address` (probe metrics: ≤ `max_backends`).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{Method, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use lb_common::{Counter, Traffic};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, core::Collector,
};
use serde::{Deserialize, Serialize};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};

use crate::{
    api::{Admin, AttachmentView, Call, HealthState, Protocol, Request, Response, VipView},
    dataplane::maps::{ConnOccupancy, ConnReads, ConnTable, CounterReader},
    etcd::StoreMetrics,
    state::Health,
};

/// Where `/metrics` listens unless the config says otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9730";
/// Connection-table sets read per snapshot to count its flows, through the
/// shared mapping: 4 MiB, 1.2 to 1.9 ms on the test machine (the `conntrack`
/// benchmark), less than the 4096 lookups it replaces (3 to 7 ms) for 16
/// times the sets. A table of up to this many sets (2^18 flows) is counted
/// exactly; a larger one is estimated from this many, with a standard error
/// of at most 0.5/sqrt(sets read) of its capacity, here 0.2% (flows hash
/// uniformly over the sets, and a set holds 0 to 4). Reading every set of
/// the default table would take 13 to 40 ms of the reconcile loop, which
/// takes the snapshot, per scrape: not worth a figure that is already this
/// close.
pub const CONNTRACK_MAPPED_SAMPLE_SETS: u32 = 1 << 16;
/// The same for a table read one map lookup per set (pinned by an xlb from
/// before it was mmapable): 3 to 7 ms of lookups, a standard error of at
/// most 0.8% of capacity.
pub const CONNTRACK_SAMPLE_SETS: u32 = 4096;

// ---------------------------------------------------------------------------
// The snapshot.

/// Packets, bytes and new flows the balancer forwarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl From<Traffic> for TrafficStats {
    fn from(t: Traffic) -> Self {
        Self {
            packets: t.packets,
            bytes: t.bytes,
            new_flows: t.new_flows,
        }
    }
}

impl TrafficStats {
    fn add(&mut self, other: TrafficStats) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStats {
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    #[serde(flatten)]
    pub traffic: TrafficStats,
}

/// A cluster's traffic is the sum of its backends'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStats {
    pub vip: String,
    pub name: String,
    #[serde(flatten)]
    pub traffic: TrafficStats,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStats {
    pub vip: String,
    pub cluster: String,
    pub name: String,
    pub addr: IpAddr,
    pub admin: Admin,
    pub health: HealthState,
    /// Unix time (seconds) of its last health change seen by this daemon;
    /// the daemon's start when it has seen none.
    pub health_since: f64,
    /// Its ring slots over the VIP's ring size: the share of new flows the
    /// data plane gives it.
    pub ring_share: f64,
    #[serde(flatten)]
    pub traffic: TrafficStats,
}

/// The connection table's fill, counted in `sampled_sets` of its `sets`
/// sets (all of them when the table has at most
/// [`CONNTRACK_MAPPED_SAMPLE_SETS`], or [`CONNTRACK_SAMPLE_SETS`] when it
/// is read per syscall) and scaled up: an estimate for large tables.
/// Entries do not expire; they stay until a new flow pushes them out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackStats {
    pub entries: u64,
    pub capacity: u64,
    pub sampled_sets: u32,
    pub sets: u32,
}

impl From<ConnOccupancy> for ConntrackStats {
    fn from(o: ConnOccupancy) -> Self {
        Self {
            entries: o.estimate(),
            capacity: o.capacity,
            sampled_sets: o.sampled_sets,
            sets: o.sets,
        }
    }
}

/// One reading of everything xlb counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Unix time (seconds) of the reading: rates are differences of two
    /// readings over the difference of their times.
    pub taken_at: f64,
    pub version: String,
    pub attachments: Vec<AttachmentView>,
    pub vips: Vec<VipStats>,
    pub clusters: Vec<ClusterStats>,
    pub backends: Vec<BackendStats>,
    /// Every global counter of the data plane, by name (zeros included),
    /// in the data plane's order.
    pub counters: Vec<(String, u64)>,
    pub conntrack: ConntrackStats,
    /// Duration of the last successful reconcile (validation, plan and map
    /// writes), microseconds.
    pub last_reconcile_micros: Option<u64>,
}

/// What the daemon hands [`Stats::collect`].
pub struct Sources<'a> {
    pub views: Vec<VipView>,
    pub counters: &'a CounterReader,
    pub conntrack: &'a ConnTable,
    pub health: &'a BTreeMap<IpAddr, Health>,
    pub attachments: Vec<AttachmentView>,
    pub last_reconcile_micros: Option<u64>,
    pub telemetry: &'a Telemetry,
}

impl Stats {
    /// Reads the counters of every programmed VIP and backend. A map read
    /// that fails counts as zero (and is logged): a scrape should not fail
    /// for one entry.
    pub fn collect(sources: Sources<'_>) -> Stats {
        let read = |what: &str, result: Result<Traffic, _>| match result {
            Ok(traffic) => TrafficStats::from(traffic),
            Err(err) => {
                log::warn!("reading the counters of {what}: {err}");
                TrafficStats::default()
            }
        };
        let mut vips = Vec::new();
        let mut clusters = Vec::new();
        let mut backends = Vec::new();
        for view in &sources.views {
            let traffic = view.id.map_or_else(TrafficStats::default, |id| {
                read(&view.name, sources.counters.vip(id))
            });
            vips.push(VipStats {
                name: view.name.clone(),
                addr: view.addr,
                port: view.port,
                proto: view.proto,
                traffic,
            });
            let mut by_cluster: BTreeMap<&str, TrafficStats> = view
                .clusters
                .iter()
                .map(|c| (c.name.as_str(), TrafficStats::default()))
                .collect();
            for b in &view.backends {
                let traffic = b.id.map_or_else(TrafficStats::default, |id| {
                    read(
                        &format!("{}/{}/{}", b.vip, b.cluster, b.name),
                        sources.counters.backend(id),
                    )
                });
                by_cluster
                    .entry(b.cluster.as_str())
                    .or_default()
                    .add(traffic);
                backends.push(BackendStats {
                    vip: b.vip.clone(),
                    cluster: b.cluster.clone(),
                    name: b.name.clone(),
                    addr: b.addr,
                    admin: b.admin,
                    health: sources
                        .health
                        .get(&b.addr)
                        .copied()
                        .unwrap_or_default()
                        .into(),
                    health_since: unix_secs(sources.telemetry.health_since(b.addr)),
                    ring_share: if view.ring_size == 0 {
                        0.0
                    } else {
                        f64::from(b.slots) / f64::from(view.ring_size)
                    },
                    traffic,
                });
            }
            clusters.extend(by_cluster.into_iter().map(|(name, traffic)| ClusterStats {
                vip: view.name.clone(),
                name: name.to_owned(),
                traffic,
            }));
        }
        let counters = Counter::ALL
            .iter()
            .map(|c| {
                let value = sources.counters.global(*c).unwrap_or_else(|err| {
                    log::warn!("reading the counter {}: {err}", c.name());
                    0
                });
                (c.name().to_owned(), value)
            })
            .collect();
        let max_sets = match sources.conntrack.reads() {
            ConnReads::Mapped => CONNTRACK_MAPPED_SAMPLE_SETS,
            ConnReads::PerSetSyscall => CONNTRACK_SAMPLE_SETS,
        };
        let conntrack = match sources.conntrack.occupancy(max_sets) {
            Ok(o) => o.into(),
            Err(err) => {
                log::warn!("reading the connection table: {err}");
                ConntrackStats::default()
            }
        };
        Stats {
            taken_at: unix_secs(SystemTime::now()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            attachments: sources.attachments,
            vips,
            clusters,
            backends,
            counters,
            conntrack,
            last_reconcile_micros: sources.last_reconcile_micros,
        }
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Which of the data plane's global counters end a packet's path (exactly
/// one per packet, by program); the others count events on the way.
pub fn verdict_of(counter: Counter) -> Option<&'static str> {
    use Counter::*;
    match counter {
        PassNotIp | PassNotVip | PassMalformed | DropMalformed | DropFragment | DropNoBackend
        | DropTooBig | DropNoRoute | DropEncapFailed | Tx | Redirect | IcmpTooBig => {
            Some("balancer")
        }
        DecapOk | DecapPassNotTunnel | DecapDropMalformed => Some("decap"),
        ProbeEncap | ProbeDropNoBackend | ProbeDropNoRoute | ProbeDropMalformed
        | ProbeDropTooBig | ProbeDropEncapFailed => Some("probe_egress"),
        Fragment | Ipv4Options | ConnHit | ConnMiss | ConnInsertFailed | ConnEvicted
        | ConnBackendDown | FibLookup | GatewayFallback | IcmpLimited => None,
    }
}

// ---------------------------------------------------------------------------
// What the daemon measures itself.

/// The daemon's own measurements, shared by the reconcile loop (which
/// records) and the `/metrics` server (which reads). Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<TelemetryInner>,
}

struct TelemetryInner {
    started: SystemTime,
    reconcile: Histogram,
    reconcile_failures: prometheus::IntCounter,
    health_since: Mutex<BTreeMap<IpAddr, SystemTime>>,
    probes: ProbeMetrics,
    /// The fleet store's state, when the node runs on etcd.
    store: OnceLock<Arc<StoreMetrics>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        let reconcile = Histogram::with_opts(
            HistogramOpts::new(
                "xlb_reconcile_duration_seconds",
                "Time from a change (API call, health change, start) to its map writes done: plan and apply.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
        )
        .expect("valid histogram options");
        let reconcile_failures = prometheus::IntCounter::new(
            "xlb_reconcile_failures_total",
            "Reconciles the data plane refused; what was programmed before stayed.",
        )
        .expect("valid counter options");
        Self {
            inner: Arc::new(TelemetryInner {
                started: SystemTime::now(),
                reconcile,
                reconcile_failures,
                health_since: Mutex::new(BTreeMap::new()),
                probes: ProbeMetrics::new(),
                store: OnceLock::new(),
            }),
        }
    }

    /// A reconcile that was written to the maps, and how long it took.
    pub fn reconciled(&self, took: Duration) {
        self.inner.reconcile.observe(took.as_secs_f64());
    }

    pub fn reconcile_failed(&self) {
        self.inner.reconcile_failures.inc();
    }

    /// Notes the time of every address whose health differs between the two.
    pub fn health_changed(
        &self,
        before: &BTreeMap<IpAddr, Health>,
        after: &BTreeMap<IpAddr, Health>,
    ) {
        let now = SystemTime::now();
        let mut since = self
            .inner
            .health_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for addr in before.keys().chain(after.keys()) {
            let was = before.get(addr).copied().unwrap_or_default();
            let is = after.get(addr).copied().unwrap_or_default();
            if was != is {
                since.insert(*addr, now);
            }
        }
    }

    fn health_since(&self, addr: IpAddr) -> SystemTime {
        let since = self
            .inner
            .health_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        since.get(&addr).copied().unwrap_or(self.inner.started)
    }

    /// The health prober's counters and histograms (see [`ProbeMetrics`]).
    pub fn probes(&self) -> &ProbeMetrics {
        &self.inner.probes
    }

    /// Exports the fleet store's revisions and troubles with every scrape,
    /// so that an operator sees whether the fleet has converged.
    /// Set once, at start; a second store is ignored.
    pub fn watch_store(&self, store: Arc<StoreMetrics>) {
        let _ = self.inner.store.set(store);
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let mut all: Vec<Box<dyn Collector>> = vec![
            Box::new(self.inner.reconcile.clone()),
            Box::new(self.inner.reconcile_failures.clone()),
        ];
        all.extend(self.inner.probes.collectors());
        if let Some(store) = self.inner.store.get() {
            all.extend(store_collectors(store));
        }
        all
    }
}

/// How a health probe ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Ok,
    Failed,
    Timeout,
}

impl ProbeResult {
    fn label(self) -> &'static str {
        match self {
            ProbeResult::Ok => "ok",
            ProbeResult::Failed => "failed",
            ProbeResult::Timeout => "timeout",
        }
    }
}

/// The hook the health prober (issue 4) feeds: one call per probe, one per
/// health transition. Exported as `xlb_probe_duration_seconds{address}`,
/// `xlb_probes_total{address,result}` and
/// `xlb_health_transition_duration_seconds{to}` (from the first probe that
/// disagreed with the old state to the state change: the rise/fall delay).
#[derive(Clone)]
pub struct ProbeMetrics {
    duration: HistogramVec,
    results: IntCounterVec,
    transitions: HistogramVec,
}

impl ProbeMetrics {
    fn new() -> Self {
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "xlb_probe_duration_seconds",
                "Health probe round trip, by backend address.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["address"],
        )
        .expect("valid histogram options");
        let results = IntCounterVec::new(
            Opts::new(
                "xlb_probes_total",
                "Health probes by backend address and result.",
            ),
            &["address", "result"],
        )
        .expect("valid counter options");
        let transitions = HistogramVec::new(
            HistogramOpts::new(
                "xlb_health_transition_duration_seconds",
                "From the first probe that disagreed with a backend's health to the change.",
            )
            .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            &["to"],
        )
        .expect("valid histogram options");
        Self {
            duration,
            results,
            transitions,
        }
    }

    /// One probe of `address`, its result and round trip.
    pub fn probe(&self, address: IpAddr, result: ProbeResult, took: Duration) {
        let address = address.to_string();
        self.results
            .with_label_values(&[address.as_str(), result.label()])
            .inc();
        self.duration
            .with_label_values(&[address.as_str()])
            .observe(took.as_secs_f64());
    }

    /// A backend's health changed to `to`, `after` the first probe that
    /// disagreed with the old state.
    pub fn transition(&self, to: Health, after: Duration) {
        let to = HealthState::from(to).to_string();
        self.transitions
            .with_label_values(&[to.as_str()])
            .observe(after.as_secs_f64());
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.duration.clone()),
            Box::new(self.results.clone()),
            Box::new(self.transitions.clone()),
        ]
    }
}

/// The store's figures as they are at this scrape: revisions and the link
/// as gauges, the store's own running counts as counters.
fn store_collectors(store: &StoreMetrics) -> Vec<Box<dyn Collector>> {
    let gauge = |name: &str, help: &str, value: i64| -> Box<dyn Collector> {
        let gauge = IntGauge::new(name, help).expect("valid gauge options");
        gauge.set(value);
        Box::new(gauge)
    };
    let counter = |name: &str, help: &str, n: &AtomicU64| -> Box<dyn Collector> {
        let counter = prometheus::IntCounter::new(name, help).expect("valid counter options");
        counter.inc_by(n.load(Ordering::Relaxed));
        Box::new(counter)
    };
    let last_error = prometheus::Gauge::new(
        "xlb_store_last_error_timestamp_seconds",
        "When the link to etcd last failed, in seconds since the Unix epoch (0: never).",
    )
    .expect("valid gauge options");
    last_error.set(store.last_error_unix_ms.load(Ordering::Relaxed) as f64 / 1000.0);
    vec![
        gauge(
            "xlb_store_applied_revision",
            "The etcd revision whose state is programmed in this node's maps; equal on every node of a converged fleet.",
            store.applied_revision.load(Ordering::Relaxed),
        ),
        gauge(
            "xlb_store_seen_revision",
            "The last etcd revision this node's watch delivered.",
            store.seen_revision.load(Ordering::Relaxed),
        ),
        gauge(
            "xlb_store_connected",
            "1 while this node's watch on etcd is up, 0 while it reconnects (it forwards with the last applied state).",
            i64::from(store.connected.load(Ordering::Relaxed)),
        ),
        gauge(
            "xlb_store_malformed_values",
            "Values in the store skipped (never applied) at the last revision seen.",
            i64::try_from(store.malformed_now.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        ),
        counter(
            "xlb_store_malformed_values_total",
            "Malformed values seen, each key once per revision it was written at.",
            &store.malformed_total,
        ),
        counter(
            "xlb_store_reconnects_total",
            "Times the watch on etcd was lost and set up again.",
            &store.reconnects,
        ),
        counter(
            "xlb_store_apply_failures_total",
            "Store revisions the data plane refused (the previous one stayed programmed).",
            &store.apply_failures,
        ),
        Box::new(last_error),
        gauge(
            "xlb_fleet_health_disagreements",
            "Backends the fleet's nodes publish different health for (their views in etcd; see xlb fleet health).",
            i64::try_from(store.health_disagreements.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        ),
        gauge(
            "xlb_fleet_node_name_held_elsewhere",
            "1 while another node holds this node's name in etcd: this node then publishes no health view (give one of them another node.name).",
            i64::from(store.name_held_by.lock().is_ok_and(|h| h.is_some())),
        ),
        counter(
            "xlb_fleet_node_name_conflicts_total",
            "Times this node found its name held by another node while running (after its lease expired).",
            &store.name_conflicts,
        ),
    ]
}

// ---------------------------------------------------------------------------
// The Prometheus text format.

/// The exposition of one snapshot and the daemon's own measurements, in the
/// Prometheus text format (version 0.0.4).
pub fn exposition(stats: &Stats, telemetry: &Telemetry) -> String {
    let registry = Registry::new();
    for collector in snapshot_collectors(stats)
        .into_iter()
        .chain(telemetry.collectors())
    {
        registry
            .register(collector)
            .expect("metric names are unique");
    }
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("encoding to memory");
    String::from_utf8(out).expect("the text format is UTF-8")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter options")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid gauge options")
}

/// The three traffic counters of one level (vip, cluster, backend).
struct TrafficVecs {
    packets: IntCounterVec,
    bytes: IntCounterVec,
    new_flows: IntCounterVec,
}

impl TrafficVecs {
    fn new(level: &str, labels: &[&str]) -> Self {
        let name = |what: &str| format!("xlb_{level}_{what}_total");
        Self {
            packets: counter_vec(
                &name("packets"),
                &format!("Packets the balancer forwarded, per {level}."),
                labels,
            ),
            bytes: counter_vec(
                &name("bytes"),
                &format!("Bytes (frames as received) the balancer forwarded, per {level}."),
                labels,
            ),
            new_flows: counter_vec(
                &name("new_flows"),
                &format!("Flows the balancer placed by the ring (first packets), per {level}."),
                labels,
            ),
        }
    }

    fn set(&self, labels: &[&str], traffic: &TrafficStats) {
        self.packets
            .with_label_values(labels)
            .inc_by(traffic.packets);
        self.bytes.with_label_values(labels).inc_by(traffic.bytes);
        self.new_flows
            .with_label_values(labels)
            .inc_by(traffic.new_flows);
    }

    fn collectors(self) -> [Box<dyn Collector>; 3] {
        [
            Box::new(self.packets),
            Box::new(self.bytes),
            Box::new(self.new_flows),
        ]
    }
}

fn snapshot_collectors(stats: &Stats) -> Vec<Box<dyn Collector>> {
    let mut all: Vec<Box<dyn Collector>> = Vec::new();

    let vip = TrafficVecs::new("vip", &["vip"]);
    for v in &stats.vips {
        vip.set(&[&v.name], &v.traffic);
    }
    let cluster = TrafficVecs::new("cluster", &["vip", "cluster"]);
    for c in &stats.clusters {
        cluster.set(&[&c.vip, &c.name], &c.traffic);
    }
    let backend_labels = ["vip", "cluster", "backend"];
    let backend = TrafficVecs::new("backend", &backend_labels);
    let up = gauge_vec(
        "xlb_backend_up",
        "1 while the backend is healthy (health probes; up until probes say otherwise), else 0.",
        &backend_labels,
    );
    let admin = gauge_vec(
        "xlb_backend_admin_state",
        "The backend's administrative state: 1 for the state it is in.",
        &["vip", "cluster", "backend", "state"],
    );
    let since = gauge_vec(
        "xlb_backend_health_last_change_timestamp_seconds",
        "Unix time of the backend's last health change seen by this daemon (its start if none).",
        &backend_labels,
    );
    let share = gauge_vec(
        "xlb_backend_ring_share_ratio",
        "The backend's Maglev ring slots over the ring size: its share of new flows.",
        &backend_labels,
    );
    for b in &stats.backends {
        let labels = [b.vip.as_str(), b.cluster.as_str(), b.name.as_str()];
        backend.set(&labels, &b.traffic);
        up.with_label_values(&labels)
            .set(f64::from(u8::from(b.health == HealthState::Up)));
        for state in [Admin::Enabled, Admin::Drained, Admin::Disabled] {
            let name = state.to_string();
            admin
                .with_label_values(&[labels[0], labels[1], labels[2], name.as_str()])
                .set(f64::from(u8::from(b.admin == state)));
        }
        since.with_label_values(&labels).set(b.health_since);
        share.with_label_values(&labels).set(b.ring_share);
    }
    all.extend(vip.collectors());
    all.extend(cluster.collectors());
    all.extend(backend.collectors());
    all.extend([up, admin, since, share].map(|g| Box::new(g) as Box<dyn Collector>));

    let verdicts = counter_vec(
        "xlb_verdict_packets_total",
        "Packets by the verdict that ended their path, per XDP program (one verdict per packet).",
        &["program", "verdict"],
    );
    let reasons = counter_vec(
        "xlb_event_packets_total",
        "Packets that met an event on their path (connection table, fragments, FIB, ...).",
        &["event"],
    );
    for (name, value) in &stats.counters {
        let counter = Counter::ALL.iter().find(|c| c.name() == name);
        match counter.and_then(|c| verdict_of(*c)) {
            Some(program) => verdicts.with_label_values(&[program, name]).inc_by(*value),
            None => reasons.with_label_values(&[name]).inc_by(*value),
        }
    }
    all.push(Box::new(verdicts));
    all.push(Box::new(reasons));

    let entries = IntGauge::new(
        "xlb_conntrack_entries",
        "Connection-table entries holding a flow: exact for tables of up to 262144 flows, \
         else scaled up from 65536 sets (standard error at most 0.2% of capacity; 4096 sets \
         and 0.8% for a table pinned before it was mmapable).",
    )
    .expect("valid gauge options");
    entries.set(saturating_i64(stats.conntrack.entries));
    let capacity = IntGauge::new(
        "xlb_conntrack_capacity_entries",
        "Connection-table entries in all.",
    )
    .expect("valid gauge options");
    capacity.set(saturating_i64(stats.conntrack.capacity));
    all.push(Box::new(entries));
    all.push(Box::new(capacity));

    let attached = IntGaugeVec::new(
        Opts::new(
            "xlb_attachment_info",
            "The balancer's XDP attachments: 1 per interface, with its mode (native or generic).",
        ),
        &["interface", "mode"],
    )
    .expect("valid gauge options");
    for a in &stats.attachments {
        let mode = a.mode.to_string();
        attached
            .with_label_values(&[a.interface.as_str(), mode.as_str()])
            .set(1);
    }
    all.push(Box::new(attached));

    let build = IntGaugeVec::new(
        Opts::new("xlb_build_info", "The running xlb's version."),
        &["version"],
    )
    .expect("valid gauge options");
    build.with_label_values(&[stats.version.as_str()]).set(1);
    all.push(Box::new(build));

    let last = Gauge::new(
        "xlb_last_reconcile_duration_seconds",
        "Duration of the last reconcile that was written to the maps.",
    )
    .expect("valid gauge options");
    last.set(stats.last_reconcile_micros.unwrap_or(0) as f64 / 1e6);
    all.push(Box::new(last));
    all
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------
// The HTTP endpoint.

/// `/metrics` could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for /metrics on {addr}: {source} (set [metrics] listen, or enabled = false)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The bound `/metrics` socket.
pub struct MetricsServer {
    listener: TcpListener,
    telemetry: Telemetry,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr, telemetry: Telemetry) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self {
            listener,
            telemetry,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `GET /metrics` until `stop` turns true. Each scrape asks the
    /// reconcile loop for a [`Stats`] through `calls`, as the control API
    /// does: the loop stays the only reader of the maps.
    pub async fn serve(self, calls: mpsc::Sender<Call>, mut stop: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                    continue;
                }
                accepted = self.listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    log::warn!("/metrics: accepting a connection: {err}");
                    continue;
                }
            };
            let calls = calls.clone();
            let telemetry = self.telemetry.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let calls = calls.clone();
                    let telemetry = telemetry.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &calls, &telemetry).await) }
                });
                if let Err(err) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    log::debug!("/metrics connection: {err}");
                }
            });
        }
    }
}

async fn answer<B>(
    request: &hyper::Request<B>,
    calls: &mpsc::Sender<Call>,
    telemetry: &Telemetry,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    let text = "text/plain; charset=utf-8";
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            text,
            "xlb serves /metrics only\n".into(),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "GET /metrics\n".into(),
        );
    }
    match snapshot(calls).await {
        Ok(stats) => reply(
            StatusCode::OK,
            prometheus::TEXT_FORMAT,
            exposition(&stats, telemetry),
        ),
        Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, text, format!("{why}\n")),
    }
}

async fn snapshot(calls: &mpsc::Sender<Call>) -> Result<Stats, String> {
    let (reply, answer) = oneshot::channel();
    calls
        .send(Call {
            request: Request::Stats,
            reply,
        })
        .await
        .map_err(|_| "the daemon is stopping".to_owned())?;
    match answer.await {
        Ok(Response::Stats { stats }) => Ok(*stats),
        Ok(Response::Error { message }) => Err(message),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(_) => Err("the daemon is stopping".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicI64;

    use super::*;

    #[test]
    fn a_node_on_etcd_exports_the_revision_it_applied() {
        let telemetry = Telemetry::new();
        let without: Vec<String> = telemetry
            .collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect();
        assert!(!without.iter().any(|name| name.starts_with("xlb_store_")));

        let store = Arc::new(StoreMetrics {
            applied_revision: AtomicI64::new(42),
            seen_revision: AtomicI64::new(43),
            reconnects: AtomicU64::new(2),
            last_error_unix_ms: AtomicU64::new(1_795_815_638_500),
            name_held_by: std::sync::Mutex::new(Some("pid 7 on host \"lb\"".into())),
            name_conflicts: AtomicU64::new(1),
            ..StoreMetrics::default()
        });
        telemetry.watch_store(Arc::clone(&store));
        let registry = Registry::new();
        for collector in telemetry.collectors() {
            registry.register(collector).expect("unique names");
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .expect("encoding");
        let text = String::from_utf8(out).expect("UTF-8");
        for line in [
            "xlb_store_applied_revision 42",
            "xlb_store_seen_revision 43",
            "xlb_store_connected 0",
            "xlb_store_reconnects_total 2",
            "xlb_store_last_error_timestamp_seconds 1795815638.5",
            "xlb_fleet_node_name_held_elsewhere 1",
            "xlb_fleet_node_name_conflicts_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
    }
}
