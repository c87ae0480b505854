//! `xlb run --config xlb.toml`: the daemon.
//!
//! Wires the parts together with tokio channels around **one reconcile
//! loop**, the only task that owns the [`Dataplane`] and the [`Reconciler`]:
//!
//! ```text
//!  control API ──(Call: request + oneshot reply)──┐
//!  health prober ──(watch: address → health)────┤
//!  etcd (--store: every revision) ──(watch)───────┼──► reconcile loop ──► maps
//!  next-hop resolver ──(id, next hop)─────────────┘        │
//!        ▲                                                 │
//!        └──────────(watch: backend id → address)──────────┤
//!  health prober ◄──────(watch: probe targets)──────────────┘
//! ```
//!
//! The prober ([`crate::health`]) probes the targets the loop derives from
//! the desired state and the config's `probe` tables; the loop reports each
//! health change's decision-to-maps latency back to its [`HealthBoard`].
//!
//! Start: load the config (errors name file, line and field), take the
//! desired state from the state file when there is a valid one (else from
//! the config), load the data plane pinned at `node.pin_path` (reusing the
//! pinned maps and links of a previous run), write the settings, reconcile,
//! attach the balancer to `node.interfaces`, start the next-hop resolver and
//! the control API.
//!
//! A change from the API is made to a copy of the desired state, validated
//! ([`config::validate_state`]), reconciled, and saved through the
//! [`StateStore`] before the answer goes back; an invalid or failed change
//! leaves everything as it was.
//!
//! SIGTERM or SIGINT: the API stops (its socket is removed), the loop ends
//! after the request it is in, and the process exits 0 **leaving the
//! program attached** through its pinned links, with its pinned maps: packets
//! keep flowing, and the next `xlb run` takes over where this one left.
//! `xlb detach` (no interface) is the way to take everything down.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    future::Future,
    io::{self, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use lb_common::{BACKEND_F_UP, Counter, NextHop, VipInfo, VipKey, ip_from_addr};
use log::{error, info, warn};
use tokio::sync::{mpsc, watch};

use crate::{
    api::{
        AttachmentView, BackendView, Call, ClusterView, Listener, ReconcileReport, Request,
        Response, Status, VipView,
    },
    config::{self, Config, ConfigError, NodeConfig},
    dataplane::{
        AttachMode, Dataplane, DataplaneError, Role, XdpLog, XdpLogger, nexthop::NextHopResolver,
        pinned_links,
    },
    etcd::{EtcdStore, Snapshot, StoreError},
    health::{HealthBoard, ProbeConfig, ProbeTarget, Prober, prober::DEFAULT_IN_FLIGHT},
    metrics::{self, MetricsError, MetricsServer, Stats, Telemetry},
    policy::{self, Locality, Mode, Shares},
    reconcile::{Plan, PlannedBackend, PlannedVip, ReconcileError, Reconciler},
    state::{AdminState, Backend, Cluster, DesiredState, Health, Vip},
};

/// Requests waiting for the loop; more wait in their connections.
const CALL_QUEUE: usize = 64;
/// Next-hop updates waiting for the loop.
const HOP_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{context}: {source}")]
    Dataplane {
        context: String,
        #[source]
        source: DataplaneError,
    },
    #[error("reconciling the desired state: {0}")]
    Reconcile(#[source] ReconcileError),
    #[error("control API: {0}")]
    Api(#[from] crate::api::BindError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the reconcile loop failed: {0}")]
    Loop(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn dp_err(context: impl Into<String>) -> impl FnOnce(DataplaneError) -> DaemonError {
    let context = context.into();
    move |source| DaemonError::Dataplane { context, source }
}

// ---------------------------------------------------------------------------
// Where the desired state lives between runs.

/// The source of truth for VIPs, clusters and backends across restarts:
/// the local state file, or a store a fleet shares ([`EtcdStore`]).
pub trait StateStore: Send {
    /// Where it is, for logs and status.
    fn location(&self) -> PathBuf;
    /// The saved state, `Ok(None)` when nothing was saved yet.
    fn load(&self, node: &NodeConfig) -> Result<Option<DesiredState>, String>;
    /// Keeps `state` for the next start.
    fn save(&mut self, state: &DesiredState) -> Result<(), String>;
    /// Sets a saved state that cannot be used aside, so that it is neither
    /// used nor lost; returns where it went.
    fn reject(&mut self) -> Option<PathBuf>;
    /// A store shared by a fleet (etcd) makes the API's changes itself and
    /// pushes every change, this node's too, into the reconcile loop.
    fn fleet(&self) -> Option<&EtcdStore> {
        None
    }
}

/// `node.state_file`: the whole desired state in the config's `[vip]`
/// format, replaced atomically (a temporary file renamed over it).
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl StateStore for FileStore {
    fn location(&self) -> PathBuf {
        self.path.clone()
    }

    fn load(&self, node: &NodeConfig) -> Result<Option<DesiredState>, String> {
        if !self.path.exists() {
            return Ok(None);
        }
        config::load_state(&self.path, node)
            .map(Some)
            .map_err(|err| err.to_string())
    }

    fn save(&mut self, state: &DesiredState) -> Result<(), String> {
        let describe = |what: &str, err: io::Error| {
            format!("saving the state to {}: {what}: {err}", self.path.display())
        };
        if let Some(dir) = self.path.parent()
            && !dir.as_os_str().is_empty()
        {
            fs::create_dir_all(dir).map_err(|err| describe("creating its directory", err))?;
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let write = || -> io::Result<()> {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(config::to_toml(state).as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)
        };
        write().map_err(|err| {
            let _ = fs::remove_file(&tmp);
            describe("writing", err)
        })
    }

    fn reject(&mut self) -> Option<PathBuf> {
        let mut aside = self.path.clone().into_os_string();
        aside.push(".rejected");
        let aside = PathBuf::from(aside);
        fs::rename(&self.path, &aside).ok().map(|()| aside)
    }
}

// ---------------------------------------------------------------------------
// Start and stop.

/// `xlb run`: loads `config_path` and serves until SIGTERM or SIGINT (or
/// `xlb detach`). Blocks; builds its own tokio runtime.
/// `xlb run`. `xdp_log`, when given, overrides the config's `node.xdp_log`;
/// with `store` (`etcd://...`) the desired state lives there, else in the
/// config's `node.state_file`.
pub fn run(
    config_path: &Path,
    xdp_log: Option<XdpLog>,
    store: Option<&str>,
) -> Result<(), DaemonError> {
    let mut config = config::load(config_path)?;
    if let Some(level) = xdp_log {
        config.node.xdp_log = level;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("xlb")
        .enable_all()
        .build()
        .map_err(|source| DaemonError::Io {
            context: "starting the async runtime".into(),
            source,
        })?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        let store: Box<dyn StateStore> = match store {
            None => Box::new(FileStore::new(&config.node.state_file)),
            Some(url) => Box::new(EtcdStore::open(url.parse()?, &config.node).await?),
        };
        serve(config_path, config, store, shutdown).await
    })
}

/// Resolves on the first SIGTERM or SIGINT. Installed before anything else
/// so that a signal during start is a clean stop too.
fn shutdown_signal() -> Result<impl Future<Output = ()>, DaemonError> {
    use tokio::signal::unix::{SignalKind, signal};
    let io = |source| DaemonError::Io {
        context: "installing the signal handlers".into(),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!("{name}: stopping; the balancer stays attached (pinned) and keeps forwarding");
    })
}

/// The daemon, given its config, a state store and a future that says when
/// to stop. Returns once stopped.
pub async fn serve(
    config_path: &Path,
    config: Config,
    mut store: Box<dyn StateStore>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let Config {
        node,
        state,
        probes,
        metrics,
    } = config;
    let desired = match store.load(&node) {
        Ok(Some(saved)) => {
            info!(
                "desired state from {} ({} VIPs; the config file's [vip] tables are not used)",
                store.location().display(),
                saved.vips.len()
            );
            saved
        }
        Ok(None) => {
            info!(
                "desired state from {} ({} VIPs): no saved state at {}",
                config_path.display(),
                state.vips.len(),
                store.location().display()
            );
            state
        }
        Err(err) => {
            let aside = store.reject();
            error!(
                "the saved state cannot be used: {err}; serving the config file's VIPs instead{}",
                aside
                    .map(|p| format!(" (the saved state was moved to {})", p.display()))
                    .unwrap_or_default()
            );
            state
        }
    };

    // First, so that a second daemon stops before it touches the maps or
    // the links of the one running.
    let listener = Listener::bind(&node.api_socket)?;
    let telemetry = Telemetry::new();
    if let Some(fleet) = store.fleet() {
        telemetry.watch_store(fleet.metrics());
    }
    let metrics_server = match metrics.listen {
        Some(addr) => Some(MetricsServer::bind(addr, telemetry.clone()).await?),
        None => None,
    };
    let mut dataplane = tokio::task::block_in_place(|| open_dataplane(&node))?;
    dataplane
        .settings
        .set(node.settings())
        .map_err(dp_err("writing the settings"))?;
    let mut reconciler = Reconciler::for_node(&node);
    if !dataplane.reused_maps().is_empty() {
        let programmed = tokio::task::block_in_place(|| programmed_in_maps(&dataplane, &desired))
            .map_err(dp_err("reading back the pinned maps"))?;
        info!(
            "taking over {} VIPs and {} backend ids from the pinned maps",
            programmed.vips.len(),
            programmed.backends.len()
        );
        reconciler.resume(programmed);
    }
    // A local store pushes nothing: its sender is gone at once.
    let fleet = store
        .fleet()
        .map_or_else(|| watch::channel(Snapshot::default()).1, EtcdStore::updates);
    let (targets_tx, targets_rx) = watch::channel(BTreeMap::new());
    let (health_tx, health_rx) = watch::channel(BTreeMap::new());
    let publisher = store
        .fleet()
        .map(|fleet| fleet.health_publisher(health_rx.clone()));
    let prober = Prober::new(DEFAULT_IN_FLIGHT).with_metrics(telemetry.probes().clone());
    let (probe_targets, probe_targets_rx) = watch::channel(BTreeSet::new());
    let mut control = Control {
        info: Info {
            config: fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_owned()),
            started: Instant::now(),
        },
        node,
        dataplane,
        reconciler,
        desired: DesiredState::default(),
        health: BTreeMap::new(),
        store,
        targets: targets_tx,
        last: None,
        probes,
        board: prober.board(),
        probe_targets,
        telemetry,
    };
    // Maps before links: a fresh attach finds every VIP programmed, and a
    // restart rewrites what the pinned maps already hold.
    // On failure nothing is undone: what an earlier run left in the pinned
    // maps keeps serving, and the error says what to fix.
    tokio::task::block_in_place(|| control.reconcile_to(desired, "start", false))
        .map_err(DaemonError::Reconcile)?;
    for (interface, mode, node_interface) in interfaces_at_start(&control.node) {
        let got = control
            .dataplane
            .attach(Role::Balancer, &interface, mode)
            .map_err(dp_err(format!("attaching the balancer to {interface}")))?;
        if node_interface {
            info!("{}", attached(&interface, mode, got));
        } else {
            info!(
                "balancer on {interface} (attached at run time, pinned): taken over, {}",
                mode_name(got)
            );
        }
    }

    if let Some(logger) = control.dataplane.take_logger() {
        info!(
            "XDP log lines up to {:?} go to this log",
            control.node.xdp_log
        );
        tokio::spawn(relay_xdp_log(logger));
    }
    let (hops_tx, hops_rx) = mpsc::channel(HOP_QUEUE);
    match NextHopResolver::new().await {
        Ok(mut resolver) => {
            for source in [
                control.node.source_v4.map(IpAddr::V4),
                control.node.source_v6.map(IpAddr::V6),
            ]
            .into_iter()
            .flatten()
            {
                resolver = resolver.with_source(source);
            }
            tokio::spawn(resolver.track(targets_rx, hops_tx));
        }
        Err(err) => warn!(
            "next hops will not be resolved ({err}): the balancer asks the FIB for every packet"
        ),
    }

    info!("control API on {}", listener.path().display());
    let (calls_tx, calls_rx) = mpsc::channel(CALL_QUEUE);
    if let Some(publisher) = publisher {
        tokio::spawn(publisher.run(calls_tx.clone()));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics_task = metrics_server.map(|server| {
        if let Ok(addr) = server.local_addr() {
            info!("Prometheus metrics on http://{addr}/metrics");
        }
        tokio::spawn(server.serve(calls_tx.clone(), stop_rx.clone()))
    });
    let api = tokio::spawn(listener.serve(calls_tx, stop_rx.clone()));
    tokio::spawn(prober.run(probe_targets_rx, health_tx));
    let mut control_loop = tokio::spawn(control.run(calls_rx, hops_rx, health_rx, fleet, stop_rx));

    let ended = tokio::select! {
        () = shutdown => None,
        ended = &mut control_loop => Some(ended),
    };
    let _ = stop_tx.send(true);
    let _ = api.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let ended = match ended {
        Some(ended) => ended,
        None => control_loop.await,
    };
    match ended {
        Ok(End::Stopped(control)) => {
            // Dropping the data plane leaves the pinned links and maps.
            drop(control);
            info!("stopped; the balancer stays attached");
        }
        Ok(End::Detached) => info!("detached everywhere and unpinned; stopped"),
        Err(err) => return Err(DaemonError::Loop(err.to_string())),
    }
    Ok(())
}

/// Relays the XDP programs' log records into this process's log as they
/// come (the ring buffer's descriptor turns readable).
async fn relay_xdp_log(logger: XdpLogger) {
    // SAFETY: the descriptor is the logger's ring buffer, which the AsyncFd
    // owns (and deregisters before closing) for as long as it is registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(err) => {
            warn!("the XDP log cannot be read: {err}");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut ready) => {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
            Err(err) => {
                warn!("the XDP log stopped: {err}");
                return;
            }
        }
    }
}

/// The data plane, reusing what a previous run pinned at `node.pin_path`.
fn open_dataplane(node: &NodeConfig) -> Result<Dataplane, DaemonError> {
    let dataplane = Dataplane::load_pinned_with_log(node.limits, &node.pin_path, node.xdp_log)
        .map_err(dp_err(format!(
            "loading the data plane (pinned at {})",
            node.pin_path.display()
        )))?;
    let reused = dataplane.reused_maps();
    if reused.is_empty() {
        info!(
            "data plane loaded; maps pinned at {}",
            node.pin_path.display()
        );
    } else {
        info!(
            "data plane loaded over the maps pinned at {} ({} reused, {} VIPs in them):              carrying on where the last run stopped",
            node.pin_path.display(),
            reused.len(),
            dataplane.vips.iter().count()
        );
    }
    Ok(dataplane)
}

/// What an earlier run left programmed in the pinned maps, as a plan whose
/// VIPs carry the names `desired` gives their (address, port, protocol),
/// so that the reconciler keeps their ids, ring places and backend ids
/// (see [`Reconciler::resume`]).
///
/// A backend id belongs to the VIP whose ring names it. A programmed id no
/// ring names (a drained or down backend, whose established flows still
/// use it) belongs to the one VIP of `desired` that has a backend at its
/// address without an id yet; if none or several do, it stays unowned and
/// the first apply clears it. VIPs that `desired` lacks get a placeholder
/// name, so that the first apply removes them.
fn programmed_in_maps(
    dataplane: &Dataplane,
    desired: &DesiredState,
) -> Result<Plan, DataplaneError> {
    let by_key: BTreeMap<VipKey, &Vip> =
        desired.vips.values().map(|vip| (vip.key(), vip)).collect();
    let mut plan = Plan::default();
    let mut owner: BTreeMap<u32, u32> = BTreeMap::new();
    for (key, info) in dataplane.vips.iter() {
        let ring = dataplane.rings.read(info.ring_offset, info.ring_size)?;
        for id in &ring {
            owner.entry(*id).or_insert(info.id);
        }
        let name = match by_key.get(key) {
            Some(vip) => vip.name.clone(),
            None => format!("\u{0}gone-{}", info.id),
        };
        plan.vips.insert(
            name,
            PlannedVip {
                key: *key,
                // Plans leave the generation to the VIP table.
                info: VipInfo {
                    generation: 0,
                    ..*info
                },
                ring: Arc::new(ring),
                shares: Shares {
                    backends: Vec::new(),
                    clusters: Vec::new(),
                    levels: Vec::new(),
                    mode: Mode::Empty,
                    locality: Locality::Off,
                    healthy: 0.0,
                },
            },
        );
    }
    let vip_of_id: BTreeMap<u32, &str> = plan
        .vips
        .iter()
        .map(|(name, vip)| (vip.info.id, name.as_str()))
        .collect();
    let mut unowned = Vec::new();
    for id in 0..dataplane.backends.capacity() {
        let entry = dataplane.backends.get(id)?;
        let Some(addr) = ip_from_addr(entry.family, &entry.addr) else {
            continue;
        };
        let backend = PlannedBackend {
            vip_id: owner.get(&id).copied().unwrap_or(u32::MAX),
            addr,
            up: entry.flags & BACKEND_F_UP != 0,
        };
        if backend.vip_id == u32::MAX {
            unowned.push((id, backend));
        } else {
            plan.backends.insert(id, backend);
        }
    }
    for (id, mut backend) in unowned {
        let has_id = |vip_id: u32| {
            plan.backends
                .values()
                .any(|b| b.vip_id == vip_id && b.addr == backend.addr)
        };
        let candidates: Vec<u32> = plan
            .vips
            .values()
            .filter(|planned| {
                vip_of_id
                    .get(&planned.info.id)
                    .and_then(|name| desired.vips.get(*name))
                    .is_some_and(|vip| vip.backends().any(|(_, b)| b.addr == backend.addr))
                    && !has_id(planned.info.id)
            })
            .map(|planned| planned.info.id)
            .collect();
        if let [vip_id] = candidates[..] {
            backend.vip_id = vip_id;
        }
        plan.backends.insert(id, backend);
    }
    Ok(plan)
}

/// Where to attach at start: the configured interfaces, then those a
/// previous run attached at run time (`xlb attach`), whose links are pinned.
/// `true` marks the configured ones.
fn interfaces_at_start(node: &NodeConfig) -> Vec<(String, AttachMode, bool)> {
    let mut interfaces: Vec<(String, AttachMode, bool)> = node
        .interfaces
        .iter()
        .map(|name| (name.clone(), node.attach_mode, true))
        .collect();
    match pinned_links(&node.pin_path) {
        Ok(links) => {
            for link in links {
                if link.role == Some(Role::Balancer)
                    && !interfaces
                        .iter()
                        .any(|(name, _, _)| *name == link.interface)
                {
                    // The pinned link keeps its mode whatever is asked.
                    interfaces.push((link.interface, AttachMode::Auto, false));
                }
            }
        }
        Err(err) => warn!("listing the pinned links: {err}"),
    }
    interfaces
}

/// Says where the balancer went and in which mode, and why when that is
/// not the mode asked.
fn attached(interface: &str, asked: AttachMode, got: AttachMode) -> String {
    let why = match (asked, got) {
        (AttachMode::Auto, AttachMode::Generic) => " (auto: the driver refused native mode)",
        (AttachMode::Auto, _) => " (auto)",
        (asked, got) if asked == got => "",
        _ => " (the mode of its pinned link, kept: `xlb detach` it first to change the mode)",
    };
    format!("balancer attached to {interface}: {}{why}", mode_name(got))
}

fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Native => "native XDP",
        AttachMode::Generic => "generic XDP",
        AttachMode::Auto => "auto",
    }
}

// ---------------------------------------------------------------------------
// The reconcile loop.

struct Info {
    config: PathBuf,
    started: Instant,
}

/// Everything the reconcile loop owns.
struct Control {
    info: Info,
    node: NodeConfig,
    dataplane: Dataplane,
    reconciler: Reconciler,
    /// What is programmed (the last state that reconciled).
    desired: DesiredState,
    health: BTreeMap<IpAddr, Health>,
    store: Box<dyn StateStore>,
    targets: watch::Sender<BTreeMap<u32, IpAddr>>,
    last: Option<ReconcileReport>,
    /// The config's `probe` tables: what to probe for the desired state.
    probes: ProbeConfig,
    board: Arc<HealthBoard>,
    probe_targets: watch::Sender<BTreeSet<ProbeTarget>>,
    telemetry: Telemetry,
}

enum End {
    Stopped(Box<Control>),
    Detached,
}

impl Control {
    async fn run(
        mut self,
        mut calls: mpsc::Receiver<Call>,
        mut hops: mpsc::Receiver<(u32, Option<NextHop>)>,
        mut health: watch::Receiver<BTreeMap<IpAddr, Health>>,
        mut fleet: watch::Receiver<Snapshot>,
        mut stop: watch::Receiver<bool>,
    ) -> End {
        let mut fleet_open = self.store.fleet().is_some();
        if fleet_open {
            // The state programmed at start is this snapshot's.
            let first = fleet.borrow_and_update().clone();
            tokio::task::block_in_place(|| self.fleet_changed(first));
        }
        let mut health_open = true;
        let mut hops_open = true;
        loop {
            tokio::select! {
                biased;
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return End::Stopped(Box::new(self));
                    }
                }
                call = calls.recv() => {
                    let Some(Call { request, reply }) = call else {
                        return End::Stopped(Box::new(self));
                    };
                    if request == (Request::Detach { interface: None }) {
                        let response = tokio::task::block_in_place(|| self.detach_all());
                        let _ = reply.send(response);
                        return End::Detached;
                    }
                    let response = tokio::task::block_in_place(|| self.handle(request));
                    let _ = reply.send(response);
                }
                changed = health.changed(), if health_open => {
                    if changed.is_err() {
                        health_open = false;
                        continue;
                    }
                    let (next, decided) = self.board.read_health(&mut health);
                    tokio::task::block_in_place(|| self.health_changed(next, &decided));
                }
                changed = fleet.changed(), if fleet_open => {
                    if changed.is_err() {
                        fleet_open = false;
                        continue;
                    }
                    let next = fleet.borrow_and_update().clone();
                    tokio::task::block_in_place(|| self.fleet_changed(next));
                }
                hop = hops.recv(), if hops_open => match hop {
                    Some((id, hop)) => self.next_hop(id, hop),
                    None => hops_open = false,
                },
            }
        }
    }

    /// Plans `next`, writes the difference, and makes it the desired state.
    /// On failure the desired state stays as it was and, with `restore`, so
    /// does what is programmed: the previous state is reconciled again, in
    /// case the write broke off half-way. (At start there is no previous
    /// state to go back to, only what the pinned maps hold: that stays.)
    fn reconcile_to(
        &mut self,
        next: DesiredState,
        why: &str,
        restore: bool,
    ) -> Result<ReconcileReport, ReconcileError> {
        let started = Instant::now();
        let result = self
            .reconciler
            .plan(&next, &self.health)
            .and_then(|plan| self.write(plan));
        match result {
            Ok(mut report) => {
                self.telemetry.reconciled(started.elapsed());
                report.micros = started.elapsed().as_micros() as u64;
                info!("reconciled ({why}): {report}");
                self.desired = next;
                self.last = Some(report);
                self.probe_desired();
                Ok(report)
            }
            Err(err) if !restore => {
                self.telemetry.reconcile_failed();
                Err(err)
            }
            Err(err) => {
                self.telemetry.reconcile_failed();
                error!("reconcile ({why}) failed: {err}");
                // Forget the failed plan's ids and rewrite what was there.
                let previous = self.desired.clone();
                if let Err(again) = self
                    .reconciler
                    .plan(&previous, &self.health)
                    .and_then(|plan| self.write(plan))
                {
                    error!("restoring the previous state failed too: {again}");
                }
                Err(err)
            }
        }
    }

    fn write(&mut self, plan: Plan) -> Result<ReconcileReport, ReconcileError> {
        let targets = plan.next_hop_targets();
        let applied = self.reconciler.apply(plan, &mut self.dataplane)?;
        self.targets.send_if_modified(|current| {
            let changed = *current != targets;
            *current = targets;
            changed
        });
        Ok(ReconcileReport {
            vips_written: applied.vips_written,
            vips_removed: applied.vips_removed,
            backends_written: applied.backends_written,
            backends_removed: applied.backends_removed,
            ring_slots_written: applied.ring_slots_written,
            micros: 0,
        })
    }

    /// `decided`: when the probe results behind the change came in.
    fn health_changed(&mut self, health: BTreeMap<IpAddr, Health>, decided: &[Instant]) {
        if health == self.health {
            return;
        }
        let before = std::mem::replace(&mut self.health, health);
        let desired = self.desired.clone();
        match self.reconcile_to(desired, "health changed", true) {
            Ok(_) => {
                self.board.maps_updated(decided, Instant::now());
                self.telemetry.health_changed(&before, &self.health);
            }
            // Keep what is programmed and try again on the next change.
            Err(_) => self.health = before,
        }
    }

    /// Hands the prober the targets of the desired state.
    fn probe_desired(&mut self) {
        let reconciler = &self.reconciler;
        let (targets, problems) = self.probes.targets(&self.desired, |vip, addr| {
            reconciler.known_backend_id(vip, addr)
        });
        let targets: BTreeSet<ProbeTarget> = targets.into_values().collect();
        let changed = self.probe_targets.send_if_modified(|current| {
            let changed = *current != targets;
            *current = targets;
            changed
        });
        if changed {
            for p in problems {
                warn!(
                    "VIP {:?}: a backend is not probed: probe.{}: {}",
                    p.vip, p.field, p.message
                );
            }
        }
    }

    /// The probe state of one backend, when it is probed.
    fn probe_status(
        &self,
        vip: &Vip,
        cluster: &Cluster,
        backend: &Backend,
    ) -> Option<crate::health::TargetStatus> {
        let settings = self
            .probes
            .settings(&vip.name, &cluster.name, &backend.name)?;
        let spec = settings.resolve(vip.port, vip.proto).ok()?;
        let id = || self.reconciler.known_backend_id(&vip.name, backend.addr);
        self.board
            .status(&ProbeTarget::new(vip, backend, spec, id)?)
    }

    /// Programs what the fleet's store holds at a new revision; returns the
    /// reconcile's report when something had to be written. A snapshot the
    /// data plane refuses leaves the previous one programmed.
    fn fleet_changed(&mut self, snapshot: Snapshot) -> Option<ReconcileReport> {
        let metrics = self.store.fleet()?.metrics();
        let mut report = None;
        if *snapshot.state != self.desired {
            let why = format!("etcd revision {}", snapshot.revision);
            match self.reconcile_to(snapshot.state.as_ref().clone(), &why, true) {
                Ok(done) => report = Some(done),
                Err(_) => {
                    metrics.apply_failures.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        metrics
            .applied_revision
            .fetch_max(snapshot.revision, Ordering::Relaxed);
        report
    }

    /// A change on a node of a fleet: written to the store, then applied
    /// here as soon as the watch brings it back, before the answer goes.
    fn change_in_store(&mut self, request: &Request) -> Response {
        let Some(store) = self.store.fleet() else {
            return Response::error("internal: no shared store");
        };
        let mut updates = store.updates();
        let runtime = tokio::runtime::Handle::current();
        let (message, revision) = match runtime.block_on(store.change(request)) {
            Ok(done) => done,
            Err(refusal) => return Response::error(refusal),
        };
        let seen = runtime.block_on(async {
            let wait = updates.wait_for(|s| s.revision >= revision);
            match tokio::time::timeout(Duration::from_secs(5), wait).await {
                Ok(Ok(snapshot)) => Some(snapshot.clone()),
                _ => None,
            }
        });
        match seen {
            Some(snapshot) => Response::Changed {
                message: format!("{message} (etcd revision {revision})"),
                reconcile: self.fleet_changed(snapshot),
            },
            None => Response::Changed {
                message: format!(
                    "{message}: written to etcd at revision {revision}; not seen back yet, \
                     applied here once the watch delivers it"
                ),
                reconcile: None,
            },
        }
    }

    fn next_hop(&mut self, id: u32, hop: Option<NextHop>) {
        // An update may arrive for an id a reconcile has just removed; the
        // resolver sends the right answer once it sees the new targets.
        if !self.reconciler.programmed().backends.contains_key(&id) {
            return;
        }
        match self.dataplane.set_next_hop(id, hop) {
            Ok(()) => log::debug!("next hop of backend {id}: {hop:?}"),
            Err(err) => warn!("next hop of backend {id}: {err}"),
        }
    }

    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::VipList => Response::Vips {
                vips: self.vip_views(),
            },
            Request::ClusterList { vip } => match self.select(vip.as_deref()) {
                Ok(vips) => Response::Clusters {
                    clusters: vips.into_iter().flat_map(|v| v.clusters).collect(),
                },
                Err(message) => Response::error(message),
            },
            Request::BackendList { vip } => match self.select(vip.as_deref()) {
                Ok(vips) => Response::Backends {
                    backends: vips.into_iter().flat_map(|v| v.backends).collect(),
                },
                Err(message) => Response::error(message),
            },
            Request::Status => Response::Status {
                status: Box::new(self.status()),
            },
            Request::Stats => Response::Stats {
                stats: Box::new(self.stats()),
            },
            Request::Attach { interface, mode } => self.attach(&interface, mode.into()),
            Request::Detach {
                interface: Some(interface),
            } => self.detach(&interface),
            Request::Detach { interface: None } => {
                Response::error("internal: detach-all is the loop's to handle")
            }
            change => self.change(&change),
        }
    }

    /// A change of the desired state: made on a copy, validated,
    /// reconciled, saved; or refused with nothing changed.
    fn change(&mut self, request: &Request) -> Response {
        if self.store.fleet().is_some() {
            return self.change_in_store(request);
        }
        let mut next = self.desired.clone();
        let message = match apply_change(&mut next, request) {
            Ok(message) => message,
            Err(refusal) => return Response::error(refusal),
        };
        if let Err(problems) = config::validate_state(&self.node, &next) {
            let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Response::error(all.join("; "));
        }
        let report = match self.reconcile_to(next, &message, true) {
            Ok(report) => report,
            Err(err) => {
                return Response::error(format!("{message}: refused by the data plane: {err}"));
            }
        };
        if let Err(err) = self.store.save(&self.desired) {
            error!("{err}");
            return Response::error(format!(
                "{message}, and applied, but NOT saved (a restart would undo it): {err}"
            ));
        }
        Response::Changed {
            message,
            reconcile: Some(report),
        }
    }

    fn attach(&mut self, interface: &str, mode: AttachMode) -> Response {
        if let Some((_, _, got)) = self
            .dataplane
            .attachments()
            .find(|(role, name, _)| *role == Role::Balancer && *name == interface)
        {
            return Response::error(format!(
                "the balancer is already attached to {interface} ({}); `xlb detach {interface}` first",
                mode_name(got)
            ));
        }
        match self.dataplane.attach(Role::Balancer, interface, mode) {
            Ok(got) => {
                let message = attached(interface, mode, got);
                info!("{message}");
                Response::Changed {
                    message,
                    reconcile: None,
                }
            }
            Err(err) => Response::error(format!("attaching to {interface}: {err}")),
        }
    }

    fn detach(&mut self, interface: &str) -> Response {
        match self.dataplane.detach(Role::Balancer, interface) {
            Ok(()) => {
                let message = format!("balancer detached from {interface}");
                info!("{message}");
                Response::Changed {
                    message,
                    reconcile: None,
                }
            }
            Err(err) => Response::error(format!("detaching from {interface}: {err}")),
        }
    }

    /// Off every interface, every pin removed (maps included): what
    /// `xlb detach` without an interface does. The daemon stops after.
    fn detach_all(self) -> Response {
        let pin_dir = self.node.pin_path.clone();
        match self.dataplane.detach_all() {
            Ok(unpinned) => {
                let message = format!(
                    "balancer detached from {}; {} pinned map(s) under {} removed; the daemon stops",
                    if unpinned.interfaces.is_empty() {
                        "no interface".to_owned()
                    } else {
                        unpinned.interfaces.join(", ")
                    },
                    unpinned.maps.len(),
                    pin_dir.display()
                );
                info!("{message}");
                Response::Changed {
                    message,
                    reconcile: None,
                }
            }
            Err(err) => {
                error!("detaching everywhere: {err}");
                Response::error(format!(
                    "detaching everywhere: {err}; the daemon stops (what is left of the pins \
                     under {} goes with `xlb detach --config FILE` while no daemon runs)",
                    pin_dir.display()
                ))
            }
        }
    }

    // -- views ---------------------------------------------------------------

    fn select(&self, vip: Option<&str>) -> Result<Vec<VipView>, String> {
        let views = self.vip_views();
        match vip {
            None => Ok(views),
            Some(name) => {
                let found: Vec<VipView> = views.into_iter().filter(|v| v.name == name).collect();
                if found.is_empty() {
                    Err(unknown_vip(&self.desired, name))
                } else {
                    Ok(found)
                }
            }
        }
    }

    fn vip_views(&self) -> Vec<VipView> {
        self.desired
            .vips
            .values()
            .map(|vip| self.vip_view(vip))
            .collect()
    }

    fn vip_view(&self, vip: &Vip) -> VipView {
        let programmed = self.reconciler.programmed();
        let planned = programmed.vips.get(&vip.name);
        let health = |b: &Backend| self.health.get(&b.addr).copied().unwrap_or_default();
        let shares = match planned {
            Some(planned) => planned.shares.clone(),
            None => policy::shares(vip, health, &self.node.policy),
        };
        // Backend id → address for this VIP, and slots per address.
        let ids: BTreeMap<IpAddr, u32> = planned
            .map(|planned| {
                programmed
                    .backends
                    .iter()
                    .filter(|(_, b)| b.vip_id == planned.info.id)
                    .map(|(id, b)| (b.addr, *id))
                    .collect()
            })
            .unwrap_or_default();
        let mut slots: BTreeMap<IpAddr, u32> = BTreeMap::new();
        if let Some(planned) = planned {
            for id in planned.ring.iter() {
                if let Some(b) = programmed.backends.get(id) {
                    *slots.entry(b.addr).or_default() += 1;
                }
            }
        }
        let traffic = |id: Option<u32>| {
            id.and_then(|id| self.dataplane.counters.backend(id).ok())
                .map(|t| (t.packets, t.bytes))
                .unwrap_or((0, 0))
        };
        let backends: Vec<BackendView> = vip
            .backends()
            .map(|(cluster, backend)| {
                let share = shares
                    .backends
                    .iter()
                    .filter(|s| s.cluster == cluster.name && s.backend == backend.name)
                    .fold(0.0, |sum, s| sum + s.share);
                let id = ids.get(&backend.addr).copied();
                let (packets, bytes) = traffic(id);
                BackendView {
                    vip: vip.name.clone(),
                    cluster: cluster.name.clone(),
                    name: backend.name.clone(),
                    addr: backend.addr,
                    weight: backend.weight,
                    admin: backend.admin.into(),
                    health: health(backend).into(),
                    share,
                    slots: slots.get(&backend.addr).copied().unwrap_or(0),
                    id,
                    packets,
                    bytes,
                    probe: self.probe_status(vip, cluster, backend),
                }
            })
            .collect();
        let clusters = vip
            .clusters
            .values()
            .map(|cluster| {
                let share = shares.clusters.iter().find(|c| c.name == cluster.name);
                ClusterView {
                    vip: vip.name.clone(),
                    name: cluster.name.clone(),
                    weight: cluster.weight,
                    priority: cluster.priority,
                    backends: cluster.backends.len(),
                    share: share.map_or(0.0, |c| c.share),
                    capacity: share.map_or(0.0, |c| c.capacity),
                    healthy: share.and_then(|c| c.healthy),
                }
            })
            .collect();
        let (packets, bytes) = planned
            .and_then(|p| self.dataplane.counters.vip(p.info.id).ok())
            .map(|t| (t.packets, t.bytes))
            .unwrap_or((0, 0));
        VipView {
            name: vip.name.clone(),
            addr: vip.addr,
            port: vip.port,
            proto: vip.proto.into(),
            ring_size: vip.ring_size,
            affinity: vip.affinity.into(),
            id: planned.map(|p| p.info.id),
            mode: shares.mode.to_string(),
            healthy: shares.healthy,
            locality: shares.locality.to_string(),
            slots: planned.map_or(0, |p| p.ring.len() as u32),
            clusters,
            backends,
            packets,
            bytes,
        }
    }

    fn stats(&self) -> Stats {
        Stats::collect(metrics::Sources {
            views: self.vip_views(),
            counters: &self.dataplane.counters,
            conntrack: &self.dataplane.conntrack,
            health: &self.health,
            attachments: self.balancer_attachments(),
            last_reconcile_micros: self.last.map(|r| r.micros),
            telemetry: &self.telemetry,
        })
    }

    fn balancer_attachments(&self) -> Vec<AttachmentView> {
        self.dataplane
            .attachments()
            .filter(|(role, _, _)| *role == Role::Balancer)
            .map(|(_, interface, mode)| AttachmentView {
                interface: interface.to_owned(),
                mode: mode.into(),
            })
            .collect()
    }

    fn status(&self) -> Status {
        let counters = Counter::ALL
            .iter()
            .filter_map(|c| {
                let value = self.dataplane.counters.global(*c).ok()?;
                (value != 0).then(|| (c.name().to_owned(), value))
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_secs: self.info.started.elapsed().as_secs(),
            config: self.info.config.clone(),
            state_file: self.store.location(),
            pin_path: self.node.pin_path.clone(),
            attachments: self
                .dataplane
                .attachments()
                .filter(|(role, _, _)| *role == Role::Balancer)
                .map(|(_, interface, mode)| AttachmentView {
                    interface: interface.to_owned(),
                    mode: mode.into(),
                })
                .collect(),
            vips: self.vip_views(),
            last_reconcile: self.last,
            counters,
            health: (!self.probes.is_empty()).then(|| self.board.snapshot()),
            store: self.store.fleet().map(EtcdStore::status),
        }
    }
}

// ---------------------------------------------------------------------------
// Changes of the desired state, as the API asks them. Pure: the caller
// validates the result and reconciles it.

fn names<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    let all: Vec<&str> = keys.map(String::as_str).collect();
    if all.is_empty() {
        "none".to_owned()
    } else {
        all.join(", ")
    }
}

fn unknown_vip(state: &DesiredState, name: &str) -> String {
    format!("no VIP named {name:?} (VIPs: {})", names(state.vips.keys()))
}

fn vip_mut<'a>(state: &'a mut DesiredState, name: &str) -> Result<&'a mut Vip, String> {
    if !state.vips.contains_key(name) {
        return Err(unknown_vip(state, name));
    }
    Ok(state.vips.get_mut(name).expect("checked above"))
}

fn cluster_mut<'a>(
    state: &'a mut DesiredState,
    vip: &str,
    name: &str,
) -> Result<&'a mut Cluster, String> {
    let v = vip_mut(state, vip)?;
    if !v.clusters.contains_key(name) {
        return Err(format!(
            "VIP {vip:?} has no cluster {name:?} (clusters: {})",
            names(v.clusters.keys())
        ));
    }
    Ok(v.clusters.get_mut(name).expect("checked above"))
}

fn backend_mut<'a>(
    state: &'a mut DesiredState,
    vip: &str,
    cluster: &str,
    name: &str,
) -> Result<&'a mut Backend, String> {
    let c = cluster_mut(state, vip, cluster)?;
    if !c.backends.contains_key(name) {
        return Err(format!(
            "cluster {vip}/{cluster} has no backend {name:?} (backends: {})",
            names(c.backends.keys())
        ));
    }
    Ok(c.backends.get_mut(name).expect("checked above"))
}

/// Applies one change request to `state` and says what it did; refuses
/// (with the reason) a request that names something missing, or adds
/// something that exists. Field values are checked afterwards by
/// [`config::validate_state`].
pub fn apply_change(state: &mut DesiredState, request: &Request) -> Result<String, String> {
    match request {
        Request::VipAdd {
            name,
            addr,
            port,
            proto,
            ring_size,
            affinity,
        } => {
            if state.vips.contains_key(name) {
                return Err(format!(
                    "VIP {name:?} exists already; `xlb vip del {name}` first to replace it"
                ));
            }
            let mut vip = Vip::new(name.clone(), *addr, *port, (*proto).into());
            if let Some(size) = ring_size {
                vip.ring_size = *size;
            }
            if let Some(affinity) = affinity {
                vip.affinity = (*affinity).into();
            }
            let shown = crate::api::endpoint(*addr, *port);
            state.vips.insert(name.clone(), vip);
            Ok(format!("VIP {name} added ({shown}/{proto})"))
        }
        Request::VipDel { name } => {
            vip_mut(state, name)?;
            state.vips.remove(name);
            Ok(format!("VIP {name} deleted"))
        }
        Request::ClusterAdd {
            vip,
            name,
            weight,
            priority,
        } => {
            let v = vip_mut(state, vip)?;
            if v.clusters.contains_key(name) {
                return Err(format!("VIP {vip:?} has a cluster {name:?} already"));
            }
            let cluster = Cluster::new(name.clone(), weight.unwrap_or(1), priority.unwrap_or(0));
            let message = format!(
                "cluster {vip}/{name} added (weight {}, priority {})",
                cluster.weight, cluster.priority
            );
            v.clusters.insert(name.clone(), cluster);
            Ok(message)
        }
        Request::ClusterDel { vip, name } => {
            cluster_mut(state, vip, name)?;
            vip_mut(state, vip)?.clusters.remove(name);
            Ok(format!("cluster {vip}/{name} deleted, with its backends"))
        }
        Request::ClusterWeight { vip, name, weight } => {
            let c = cluster_mut(state, vip, name)?;
            let before = std::mem::replace(&mut c.weight, *weight);
            Ok(format!("cluster {vip}/{name}: weight {before} → {weight}"))
        }
        Request::ClusterPriority {
            vip,
            name,
            priority,
        } => {
            let c = cluster_mut(state, vip, name)?;
            let before = std::mem::replace(&mut c.priority, *priority);
            Ok(format!(
                "cluster {vip}/{name}: priority {before} → {priority}"
            ))
        }
        Request::BackendAdd {
            vip,
            cluster,
            name,
            addr,
            weight,
        } => {
            let c = cluster_mut(state, vip, cluster)?;
            if c.backends.contains_key(name) {
                return Err(format!(
                    "cluster {vip}/{cluster} has a backend {name:?} already"
                ));
            }
            let backend = Backend::new(name.clone(), *addr, weight.unwrap_or(1));
            let message = format!(
                "backend {vip}/{cluster}/{name} added ({addr}, weight {})",
                backend.weight
            );
            c.backends.insert(name.clone(), backend);
            Ok(message)
        }
        Request::BackendDel { vip, cluster, name } => {
            backend_mut(state, vip, cluster, name)?;
            cluster_mut(state, vip, cluster)?.backends.remove(name);
            Ok(format!("backend {vip}/{cluster}/{name} deleted"))
        }
        Request::BackendDrain { vip, cluster, name } => {
            let b = backend_mut(state, vip, cluster, name)?;
            b.admin = AdminState::Drained;
            Ok(format!(
                "backend {vip}/{cluster}/{name} drained: no new flows, established ones stay"
            ))
        }
        Request::BackendUndrain { vip, cluster, name } => {
            let b = backend_mut(state, vip, cluster, name)?;
            let before = std::mem::replace(&mut b.admin, AdminState::Enabled);
            Ok(format!(
                "backend {vip}/{cluster}/{name}: {before} → enabled"
            ))
        }
        Request::BackendWeight {
            vip,
            cluster,
            name,
            weight,
        } => {
            let b = backend_mut(state, vip, cluster, name)?;
            let before = std::mem::replace(&mut b.weight, *weight);
            Ok(format!(
                "backend {vip}/{cluster}/{name}: weight {before} → {weight}"
            ))
        }
        Request::VipList
        | Request::ClusterList { .. }
        | Request::BackendList { .. }
        | Request::Status
        | Request::Stats
        | Request::Attach { .. }
        | Request::Detach { .. } => Err(format!("{request:?} changes no desired state")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Protocol;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn with_web() -> DesiredState {
        let mut state = DesiredState::default();
        for request in [
            Request::VipAdd {
                name: "web".into(),
                addr: ip("198.18.100.1"),
                port: 80,
                proto: Protocol::Tcp,
                ring_size: Some(1009),
                affinity: None,
            },
            Request::ClusterAdd {
                vip: "web".into(),
                name: "east".into(),
                weight: Some(2),
                priority: None,
            },
            Request::BackendAdd {
                vip: "web".into(),
                cluster: "east".into(),
                name: "e1".into(),
                addr: ip("198.18.1.1"),
                weight: None,
            },
        ] {
            apply_change(&mut state, &request).unwrap();
        }
        state
    }

    #[test]
    fn changes_build_the_state_the_config_would() {
        let state = with_web();
        let web = &state.vips["web"];
        assert_eq!(web.ring_size, 1009);
        let east = &web.clusters["east"];
        assert_eq!((east.weight, east.priority), (2, 0));
        assert_eq!(east.backends["e1"].weight, 1);

        let mut drained = state.clone();
        let message = apply_change(
            &mut drained,
            &Request::BackendDrain {
                vip: "web".into(),
                cluster: "east".into(),
                name: "e1".into(),
            },
        )
        .unwrap();
        assert!(message.contains("drained"), "{message}");
        assert_eq!(
            drained.vips["web"].clusters["east"].backends["e1"].admin,
            AdminState::Drained
        );
    }

    #[test]
    fn unknown_or_existing_names_are_refused_with_what_exists() {
        let mut state = with_web();
        let before = state.clone();
        for (request, fragment) in [
            (
                Request::VipDel { name: "api".into() },
                "no VIP named \"api\" (VIPs: web)",
            ),
            (
                Request::ClusterWeight {
                    vip: "web".into(),
                    name: "west".into(),
                    weight: 1,
                },
                "VIP \"web\" has no cluster \"west\" (clusters: east)",
            ),
            (
                Request::BackendDrain {
                    vip: "web".into(),
                    cluster: "east".into(),
                    name: "e9".into(),
                },
                "cluster web/east has no backend \"e9\" (backends: e1)",
            ),
            (
                Request::VipAdd {
                    name: "web".into(),
                    addr: ip("198.18.100.2"),
                    port: 80,
                    proto: Protocol::Tcp,
                    ring_size: None,
                    affinity: None,
                },
                "exists already",
            ),
        ] {
            let err = apply_change(&mut state, &request).unwrap_err();
            assert!(err.contains(fragment), "{err}");
            assert_eq!(state, before);
        }
    }

    #[test]
    fn invalid_values_are_left_to_validation() {
        let mut state = with_web();
        apply_change(
            &mut state,
            &Request::VipAdd {
                name: "odd".into(),
                addr: ip("198.18.100.3"),
                port: 80,
                proto: Protocol::Udp,
                ring_size: Some(65536),
                affinity: None,
            },
        )
        .unwrap();
        let node = NodeConfig {
            source_v4: Some("198.18.0.1".parse().unwrap()),
            ..NodeConfig::default()
        };
        let problems = config::validate_state(&node, &state).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.path == "vip.\"odd\".ring_size" && p.message.contains("not prime")),
            "{problems:?}"
        );
    }

    #[test]
    fn the_file_store_saves_atomically_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("xlb-store-test-{}", std::process::id()));
        let path = dir.join("deeper/state.toml");
        let node = NodeConfig {
            source_v4: Some("198.18.0.1".parse().unwrap()),
            ..NodeConfig::default()
        };
        let mut store = FileStore::new(&path);
        assert_eq!(store.load(&node), Ok(None));
        let state = with_web();
        store.save(&state).unwrap();
        assert_eq!(store.load(&node), Ok(Some(state)));
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("state.toml")]);

        fs::write(&path, "[vip.x]\nport = 1\n").unwrap();
        let err = store.load(&node).unwrap_err();
        assert!(err.contains("state.toml:1"), "{err}");
        let aside = store.reject().unwrap();
        assert!(aside.ends_with("state.toml.rejected"));
        assert_eq!(store.load(&node), Ok(None));
        fs::remove_dir_all(&dir).unwrap();
    }
}
