//! `xlb run --store etcd://HOST:PORT[,HOST:PORT…]/PREFIX`: the desired state
//! of a fleet of xlb nodes, kept in etcd, one key per object.
//!
//! Layout (version 1; values are JSON objects, unknown fields refused):
//!
//! ```text
//! PREFIX/v1/vips/<vip>                      {"addr","port","proto","ring_size","affinity"}
//! PREFIX/v1/clusters/<vip>/<cluster>        {"weight","priority"}
//! PREFIX/v1/backends/<vip>/<cluster>/<name> {"addr","weight","admin"}
//! PREFIX/v1/health/<node>/<vip>/<cluster>/<name>  a node's view of health
//! ```
//!
//! The `health` range is written by the nodes themselves (see
//! [`crate::fleet_health`]) and is never read back as configuration.
//!
//! Every node reads the whole prefix once, then watches it from the next
//! revision and rebuilds its desired state from the objects it holds; the
//! reconcile loop writes only what differs, so every node programs the same
//! rings (Maglev is deterministic). A value that does not decode, or whose
//! object the node cannot serve, is reported and skipped: the rest is used.
//!
//! Changes from the control API (`xlb backend drain …` on any node) are made
//! to the store's current state and written in one transaction that
//! compares the `mod_revision` of every key it touches and of their
//! parents: a concurrent edit of the same objects makes it fail, and it is
//! tried again on the new state; edits of different objects never collide.
//!
//! When etcd cannot be reached the node keeps what it programmed, says so
//! in its status and logs, and reconnects with back-off, watching from the
//! revision after the last one it saw (reading everything again when etcd
//! has compacted that revision away).

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, Txn, TxnOp,
    WatchOptions,
};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    api::{Admin, FlowAffinity, Protocol, Request},
    config::{self, NodeConfig},
    daemon::{StateStore, apply_change},
    fleet_health::{ClaimError, Holder, Publisher, claim_at_start},
    state::{AdminState, Backend, Cluster, DesiredState, Health, Vip},
};

/// The layout's version: a new one lives beside it under its own name.
pub const LAYOUT: &str = "v1";
/// How long one request to etcd may take before it counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection back-off: doubled after each failure up to the maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long `xlb run` waits for etcd at start before giving up.
const START_PATIENCE: Duration = Duration::from_secs(15);
/// Transactions tried on a freshly read state before a change is refused.
const CHANGE_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "expected a store such as etcd://127.0.0.1:2379/xlb (etcd://HOST:PORT[,HOST:PORT...]/PREFIX); got {0:?}: {1}"
    )]
    Url(String, &'static str),
    #[error("etcd at {url} unreachable for {}s at start: {source}; xlb did not start (a balancer \
             pinned by an earlier run keeps forwarding what it had)", START_PATIENCE.as_secs())]
    Unreachable {
        url: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "this node needs a name in the fleet (its health view is published under it): {0}; \
         set node.name in the config, such as name = \"lb1\""
    )]
    NodeName(String),
    #[error(transparent)]
    Name(#[from] ClaimError),
}

/// Where the fleet's state lives: endpoints and the key prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    pub endpoints: Vec<String>,
    /// Without a trailing '/'; keys are `PREFIX/v1/...`.
    pub prefix: String,
}

impl FromStr for EtcdUrl {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, StoreError> {
        let bad = |why| StoreError::Url(text.to_owned(), why);
        let rest = text
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("it does not start with etcd://"))?;
        let (hosts, prefix) = rest
            .split_once('/')
            .ok_or_else(|| bad("it has no /PREFIX"))?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(bad("the PREFIX is empty"));
        }
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'))
        {
            return Err(bad(
                "the PREFIX may hold only letters, digits, '/', '.', '_' and '-'",
            ));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| bad("every endpoint needs a :PORT"))?;
            if name.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad("every endpoint must be HOST:PORT"));
            }
            endpoints.push(format!("http://{host}"));
        }
        Ok(Self {
            endpoints,
            prefix: prefix.to_owned(),
        })
    }
}

impl fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        write!(f, "etcd://{}/{}", hosts.join(","), self.prefix)
    }
}

// ---------------------------------------------------------------------------
// The layout: keys and values.

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipValue {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    #[serde(default)]
    pub affinity: FlowAffinity,
}

fn default_ring_size() -> u32 {
    lb_common::DEFAULT_RING_SIZE
}

fn one() -> u32 {
    1
}

fn enabled() -> Admin {
    Admin::Enabled
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterValue {
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub priority: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendValue {
    pub addr: IpAddr,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default = "enabled")]
    pub admin: Admin,
}

/// One decoded key: what it names and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Object {
    Vip(String, VipValue),
    Cluster([String; 2], ClusterValue),
    Backend([String; 3], BackendValue),
}

/// The keys of the layout under one prefix.
#[derive(Clone, Debug)]
pub struct Layout {
    root: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        Self {
            root: format!("{prefix}/{LAYOUT}/"),
        }
    }

    /// Every key of the layout starts with this.
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn vip(&self, vip: &str) -> String {
        format!("{}vips/{vip}", self.root)
    }

    /// Where the nodes publish their views of health (see
    /// [`crate::fleet_health`]).
    pub fn health_root(&self) -> String {
        format!("{}health/", self.root)
    }

    pub fn cluster(&self, vip: &str, cluster: &str) -> String {
        format!("{}clusters/{vip}/{cluster}", self.root)
    }

    pub fn backend(&self, vip: &str, cluster: &str, backend: &str) -> String {
        format!("{}backends/{vip}/{cluster}/{backend}", self.root)
    }

    /// Every key of `state`, with its value.
    pub fn encode(&self, state: &DesiredState) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for vip in state.vips.values() {
            let value = VipValue {
                addr: vip.addr,
                port: vip.port,
                proto: vip.proto.into(),
                ring_size: vip.ring_size,
                affinity: vip.affinity.into(),
            };
            out.insert(self.vip(&vip.name), json(&value));
            for cluster in vip.clusters.values() {
                let value = ClusterValue {
                    weight: cluster.weight,
                    priority: cluster.priority,
                };
                out.insert(self.cluster(&vip.name, &cluster.name), json(&value));
                for backend in cluster.backends.values() {
                    let value = BackendValue {
                        addr: backend.addr,
                        weight: backend.weight,
                        admin: backend.admin.into(),
                    };
                    out.insert(
                        self.backend(&vip.name, &cluster.name, &backend.name),
                        json(&value),
                    );
                }
            }
        }
        out
    }

    /// Decodes one key's value; `Ok(None)` for keys outside the layout's
    /// objects (another layout version's, for instance).
    fn decode(&self, key: &str, value: &[u8]) -> Result<Option<Object>, String> {
        let Some(rest) = key.strip_prefix(&self.root) else {
            return Ok(None);
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let names = |n: usize| -> Result<Vec<String>, String> {
            if parts.len() != n + 1 || parts[1..].iter().any(|p| p.is_empty()) {
                return Err(format!(
                    "expected {}<{}>",
                    parts[0],
                    ["vip", "cluster", "backend"][..n].join(">/<")
                ));
            }
            Ok(parts[1..].iter().map(|p| (*p).to_owned()).collect())
        };
        let text = std::str::from_utf8(value).map_err(|e| format!("not UTF-8: {e}"))?;
        let object = match parts[0] {
            "vips" => {
                let [vip] = <[String; 1]>::try_from(names(1)?).expect("one name");
                Object::Vip(vip, serde_json::from_str(text).map_err(|e| e.to_string())?)
            }
            "clusters" => {
                let names = <[String; 2]>::try_from(names(2)?).expect("two names");
                Object::Cluster(
                    names,
                    serde_json::from_str(text).map_err(|e| e.to_string())?,
                )
            }
            "backends" => {
                let names = <[String; 3]>::try_from(names(3)?).expect("three names");
                Object::Backend(
                    names,
                    serde_json::from_str(text).map_err(|e| e.to_string())?,
                )
            }
            other => return Err(format!("{other:?} is no kind of object of layout {LAYOUT}")),
        };
        Ok(Some(object))
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of numbers, addresses and enums: cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A value the node did not apply, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Malformed {
    pub key: String,
    pub problem: String,
}

/// What the store holds, key by key, and the desired state built from it.
#[derive(Clone, Debug, Default)]
struct Cache {
    /// The last revision seen (every event up to it is in `objects`).
    revision: i64,
    /// Key → (mod_revision, decoded object or why not).
    objects: BTreeMap<String, (i64, Result<Object, String>)>,
    /// The nodes' published health views, raw: only counted, never applied.
    health: BTreeMap<String, Vec<u8>>,
}

impl Cache {
    fn put(&mut self, layout: &Layout, key: &str, value: &[u8], mod_revision: i64) {
        if key.starts_with(&layout.health_root()) {
            self.health.insert(key.to_owned(), value.to_vec());
            return;
        }
        match layout.decode(key, value) {
            Ok(Some(object)) => {
                self.objects
                    .insert(key.to_owned(), (mod_revision, Ok(object)));
            }
            Ok(None) => {}
            Err(why) => {
                self.objects
                    .insert(key.to_owned(), (mod_revision, Err(why)));
            }
        }
    }

    /// The desired state of every usable object, and the others with the
    /// reason they were skipped.
    fn state(&self, layout: &Layout, node: &NodeConfig) -> (DesiredState, Vec<Malformed>) {
        let mut malformed = Vec::new();
        let mut state = DesiredState::default();
        let mut skip = |key: &str, problem: String| {
            malformed.push(Malformed {
                key: key.to_owned(),
                problem,
            })
        };
        // Parents before children, whatever the key order.
        for kind in 0..3 {
            for (key, (_, object)) in &self.objects {
                match (kind, object) {
                    (0, Err(why)) => skip(key, why.clone()),
                    (0, Ok(Object::Vip(name, v))) => {
                        let mut vip = Vip::new(name.clone(), v.addr, v.port, v.proto.into());
                        vip.ring_size = v.ring_size;
                        vip.affinity = v.affinity.into();
                        state.vips.insert(name.clone(), vip);
                    }
                    (1, Ok(Object::Cluster([vip, name], c))) => match state.vips.get_mut(vip) {
                        Some(v) => {
                            v.clusters.insert(
                                name.clone(),
                                Cluster::new(name.clone(), c.weight, c.priority),
                            );
                        }
                        None => skip(key, format!("its VIP {vip:?} is not in the store")),
                    },
                    (2, Ok(Object::Backend([vip, cluster, name], b))) => {
                        match state
                            .vips
                            .get_mut(vip)
                            .and_then(|v| v.clusters.get_mut(cluster))
                        {
                            Some(c) => {
                                let mut backend = Backend::new(name.clone(), b.addr, b.weight);
                                backend.admin = admin_state(b.admin);
                                c.backends.insert(name.clone(), backend);
                            }
                            None => skip(
                                key,
                                format!("its cluster {vip}/{cluster} is not in the store"),
                            ),
                        }
                    }
                    _ => {}
                }
            }
        }
        // Objects the node cannot serve go, one by one, with the problem
        // found; the rest is checked again.
        while let Err(problems) = config::validate_state(node, &state) {
            let Some(problem) = problems.first() else {
                break;
            };
            let Some(key) = remove_object(layout, &mut state, &problem.path) else {
                // A problem no object can be blamed for: serve nothing
                // rather than something invalid.
                skip(layout.root(), problem.to_string());
                state = DesiredState::default();
                break;
            };
            skip(&key, problem.to_string());
        }
        (state, malformed)
    }
}

fn admin_state(admin: Admin) -> AdminState {
    match admin {
        Admin::Enabled => AdminState::Enabled,
        Admin::Drained => AdminState::Drained,
        Admin::Disabled => AdminState::Disabled,
    }
}

/// Removes the deepest object a validation path names
/// (`vip."web".cluster."east".backend."b1".addr`); returns its key, or
/// None when the path names no object the state holds.
fn remove_object(layout: &Layout, state: &mut DesiredState, path: &str) -> Option<String> {
    let quoted: Vec<&str> = path.split('"').skip(1).step_by(2).collect();
    match quoted[..] {
        [vip, cluster, backend, ..] if path.contains(".backend.") => {
            let vip_state = state.vips.get_mut(vip)?;
            vip_state
                .clusters
                .get_mut(cluster)?
                .backends
                .remove(backend)?;
            Some(layout.backend(vip, cluster, backend))
        }
        [vip, cluster, ..] if path.contains(".cluster.") => {
            state.vips.get_mut(vip)?.clusters.remove(cluster)?;
            Some(layout.cluster(vip, cluster))
        }
        [vip, ..] => {
            state.vips.remove(vip)?;
            Some(layout.vip(vip))
        }
        [] => None,
    }
}

// ---------------------------------------------------------------------------
// The store a node runs on.

/// What the watch has delivered: the state to program, at a revision.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub state: Arc<DesiredState>,
    pub malformed: Arc<Vec<Malformed>>,
}

/// The node's link to the store, as counters and gauges that the status
/// (and a metrics exporter) read without asking the reconcile loop.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// The revision whose state is programmed in the maps.
    pub applied_revision: AtomicI64,
    /// The last revision the watch delivered.
    pub seen_revision: AtomicI64,
    pub connected: AtomicBool,
    /// Values skipped at the last revision.
    pub malformed_now: AtomicU64,
    /// Times a value was found malformed (each key once per revision it was written at).
    pub malformed_total: AtomicU64,
    /// Times the watch was lost and set up again.
    pub reconnects: AtomicU64,
    /// Snapshots the data plane refused (the previous one stays programmed).
    pub apply_failures: AtomicU64,
    /// Backends whose health the nodes' published views disagree on.
    pub health_disagreements: AtomicU64,
    /// The other node that holds this node's name, while one does (this
    /// node then publishes no view).
    pub name_held_by: Mutex<Option<String>>,
    /// Times another node was found holding this node's name at run time.
    pub name_conflicts: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// When the link last failed, in ms since the Unix epoch (0: never);
    /// kept after a reconnection, unlike `last_error`.
    pub last_error_unix_ms: AtomicU64,
}

/// What `xlb status` shows of the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub url: String,
    pub connected: bool,
    pub applied_revision: i64,
    pub seen_revision: i64,
    pub malformed: Vec<Malformed>,
    pub malformed_total: u64,
    pub reconnects: u64,
    pub apply_failures: u64,
    pub last_error: Option<String>,
    /// The name this node publishes its health view under.
    #[serde(default)]
    pub node: String,
    /// Another node that holds that name, while one does: this node then
    /// publishes nothing.
    #[serde(default)]
    pub name_held_by: Option<String>,
}

/// `--store etcd://...`: the desired state of the fleet, followed by a
/// background task that pushes every change into [`Self::updates`].
pub struct EtcdStore {
    url: EtcdUrl,
    layout: Layout,
    client: Client,
    node: NodeConfig,
    /// `node.name`, or the host name.
    node_name: String,
    /// This node, as its name's key in the store says.
    holder: Holder,
    /// The lease the name was taken on at start.
    lease: i64,
    updates: watch::Receiver<Snapshot>,
    metrics: Arc<StoreMetrics>,
}

impl EtcdStore {
    /// Connects, reads the whole prefix (waiting for etcd up to
    /// [`START_PATIENCE`]), takes the node's name (refusing one that
    /// another node holds, see [`claim_at_start`]) and starts following
    /// the prefix. Call inside a runtime.
    pub async fn open(url: EtcdUrl, node: &NodeConfig) -> Result<Self, StoreError> {
        let node_name = node_name(node)?;
        let layout = Layout::new(&url.prefix);
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // A store cut off (not closed) shows in seconds, not when TCP
            // gives up.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let deadline = tokio::time::Instant::now() + START_PATIENCE;
        let mut backoff = BACKOFF_MIN;
        let (client, cache) = loop {
            let attempt = async {
                let mut client = Client::connect(&url.endpoints, Some(options.clone())).await?;
                let cache = read_all(&mut client, &layout).await?;
                Ok::<_, etcd_client::Error>((client, cache))
            };
            match attempt.await {
                Ok(found) => break found,
                Err(source) if tokio::time::Instant::now() >= deadline => {
                    return Err(StoreError::Unreachable {
                        url: url.to_string(),
                        source,
                    });
                }
                Err(err) => {
                    warn!("etcd at {url}: {err}; trying again in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        };
        // Before anything is programmed: a node that would share its name
        // stops here.
        let holder = Holder::this_node(node);
        let mut claiming = client.clone();
        let (lease, earlier) = claim_at_start(
            &mut claiming,
            &url,
            &node_name,
            node.name.is_some(),
            &holder,
            node.health_lease,
        )
        .await?;
        if let Some(earlier) = earlier {
            info!(
                "etcd at {url}: node name {node_name:?} taken over from this node's previous run ({earlier})"
            );
        }
        let metrics = Arc::new(StoreMetrics::default());
        let first = snapshot(&cache, &layout, node, &metrics);
        metrics
            .malformed_total
            .store(first.malformed.len() as u64, Ordering::Relaxed);
        info!(
            "etcd at {url}: {} VIPs at revision {}",
            first.state.vips.len(),
            first.revision
        );
        metrics.connected.store(true, Ordering::Relaxed);
        let (tx, updates) = watch::channel(first);
        let follower = Follower {
            url: url.clone(),
            layout: layout.clone(),
            client: client.clone(),
            node: node.clone(),
            cache,
            tx,
            metrics: metrics.clone(),
        };
        follower.count_disagreements();
        tokio::spawn(follower.run());
        Ok(Self {
            url,
            layout,
            client,
            node: node.clone(),
            node_name,
            holder,
            lease,
            updates,
            metrics,
        })
    }

    /// The task that publishes this node's view of health (run one): it
    /// reads the view again whenever the prober's `health` or the store
    /// changes, on the lease the name was taken on at start.
    pub fn health_publisher(&self, health: watch::Receiver<BTreeMap<IpAddr, Health>>) -> Publisher {
        Publisher {
            url: self.url.clone(),
            layout: self.layout.clone(),
            client: self.client.clone(),
            node: self.node_name.clone(),
            lease_secs: self.node.health_lease,
            holder: self.holder.clone(),
            lease: Some(self.lease),
            health,
            states: self.updates(),
            metrics: self.metrics.clone(),
        }
    }

    /// Every snapshot the watch builds, the first one included.
    pub fn updates(&self) -> watch::Receiver<Snapshot> {
        self.updates.clone()
    }

    pub fn metrics(&self) -> Arc<StoreMetrics> {
        self.metrics.clone()
    }

    pub fn status(&self) -> StoreStatus {
        let m = &self.metrics;
        StoreStatus {
            url: self.url.to_string(),
            connected: m.connected.load(Ordering::Relaxed),
            applied_revision: m.applied_revision.load(Ordering::Relaxed),
            seen_revision: m.seen_revision.load(Ordering::Relaxed),
            malformed: self.updates.borrow().malformed.as_ref().clone(),
            malformed_total: m.malformed_total.load(Ordering::Relaxed),
            reconnects: m.reconnects.load(Ordering::Relaxed),
            apply_failures: m.apply_failures.load(Ordering::Relaxed),
            last_error: m.last_error.lock().map(|e| e.clone()).unwrap_or_default(),
            node: self.node_name.clone(),
            name_held_by: m.name_held_by.lock().map(|h| h.clone()).unwrap_or_default(),
        }
    }

    /// Makes one change of the control API in the store: on the store's
    /// current state, in a transaction that fails if any key it touches (or
    /// their parents) changed meanwhile, tried again on the new state.
    /// Returns what it did and the revision it was written at.
    pub async fn change(&self, request: &Request) -> Result<(String, i64), String> {
        let unreachable = |err: String| {
            format!(
                "etcd at {} did not answer ({err}): nothing was changed",
                self.url
            )
        };
        for _ in 0..CHANGE_ATTEMPTS {
            let mut client = self.client.clone();
            let cache = tokio::time::timeout(REQUEST_TIMEOUT, read_all(&mut client, &self.layout))
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .map_err(|e| unreachable(e.to_string()))?;
            let (current, _) = cache.state(&self.layout, &self.node);
            let mut next = current.clone();
            let message = apply_change(&mut next, request)?;
            if let Err(problems) = config::validate_state(&self.node, &next) {
                let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
                return Err(all.join("; "));
            }
            let txn = self.transaction(&cache, &current, &next);
            let response = tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn))
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .map_err(|e| unreachable(e.to_string()))?;
            if response.succeeded() {
                let revision = response.header().map_or(0, |h| h.revision());
                return Ok((message, revision));
            }
            info!(
                "{message}: a concurrent edit touched the same objects; trying again on the new state"
            );
        }
        Err(format!(
            "{request:?}: the objects kept changing under this edit ({CHANGE_ATTEMPTS} tries); nothing was changed, try again"
        ))
    }

    /// Puts and deletes that turn `current` into `next`, guarded by the
    /// revisions `cache` read of every key touched and of their parents.
    fn transaction(&self, cache: &Cache, current: &DesiredState, next: &DesiredState) -> Txn {
        let before = self.layout.encode(current);
        let after = self.layout.encode(next);
        let mut guarded: BTreeMap<String, ()> = BTreeMap::new();
        let mut ops = Vec::new();
        for (key, value) in &after {
            if before.get(key) != Some(value) {
                ops.push(TxnOp::put(key.clone(), value.clone(), None));
                guarded.insert(key.clone(), ());
            }
        }
        for key in before.keys().filter(|k| !after.contains_key(*k)) {
            ops.push(TxnOp::delete(key.clone(), None));
            guarded.insert(key.clone(), ());
            // Children go with their parent, those written meanwhile too.
            for prefix in children_prefixes(&self.layout, key) {
                ops.push(TxnOp::delete(
                    prefix,
                    Some(DeleteOptions::new().with_prefix()),
                ));
            }
        }
        let parents: Vec<String> = guarded
            .keys()
            .flat_map(|k| parent_keys(&self.layout, k))
            .collect();
        for key in parents {
            guarded.insert(key, ());
        }
        let compares: Vec<Compare> = guarded
            .keys()
            .map(|key| match cache.objects.get(key) {
                Some((revision, _)) => {
                    Compare::mod_revision(key.clone(), CompareOp::Equal, *revision)
                }
                None => Compare::version(key.clone(), CompareOp::Equal, 0),
            })
            .collect();
        Txn::new().when(compares).and_then(ops)
    }
}

/// `node.name`, or else the host name when it is a valid name.
fn node_name(node: &NodeConfig) -> Result<String, StoreError> {
    if let Some(name) = &node.name {
        return Ok(name.clone());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| StoreError::NodeName(format!("no node.name, and the host name: {e}")))?;
    let host = host.trim();
    config::check_name(host)
        .map(|()| host.to_owned())
        .map_err(|why| StoreError::NodeName(format!("no node.name, and the host name: {why}")))
}

/// The prefixes of the children of a VIP or cluster key.
fn children_prefixes(layout: &Layout, key: &str) -> Vec<String> {
    let Some(rest) = key.strip_prefix(layout.root()) else {
        return Vec::new();
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts[..] {
        ["vips", vip] => vec![
            format!("{}clusters/{vip}/", layout.root()),
            format!("{}backends/{vip}/", layout.root()),
        ],
        ["clusters", vip, cluster] => vec![format!("{}backends/{vip}/{cluster}/", layout.root())],
        _ => Vec::new(),
    }
}

/// The keys of the VIP and cluster an object belongs to.
fn parent_keys(layout: &Layout, key: &str) -> Vec<String> {
    let Some(rest) = key.strip_prefix(layout.root()) else {
        return Vec::new();
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts[..] {
        ["clusters", vip, _] => vec![layout.vip(vip)],
        ["backends", vip, cluster, _] => vec![layout.vip(vip), layout.cluster(vip, cluster)],
        _ => Vec::new(),
    }
}

async fn read_all(client: &mut Client, layout: &Layout) -> Result<Cache, etcd_client::Error> {
    let response = client
        .get(layout.root(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut cache = Cache {
        revision: response.header().map_or(0, |h| h.revision()),
        ..Cache::default()
    };
    for kv in response.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        cache.put(layout, &key, kv.value(), kv.mod_revision());
    }
    Ok(cache)
}

fn snapshot(cache: &Cache, layout: &Layout, node: &NodeConfig, metrics: &StoreMetrics) -> Snapshot {
    let (state, malformed) = cache.state(layout, node);
    for m in &malformed {
        warn!("etcd: skipping {}: {}", m.key, m.problem);
    }
    metrics
        .seen_revision
        .store(cache.revision, Ordering::Relaxed);
    metrics
        .malformed_now
        .store(malformed.len() as u64, Ordering::Relaxed);
    Snapshot {
        revision: cache.revision,
        state: Arc::new(state),
        malformed: Arc::new(malformed),
    }
}

/// The background task that keeps the cache in step with etcd.
struct Follower {
    url: EtcdUrl,
    layout: Layout,
    client: Client,
    node: NodeConfig,
    cache: Cache,
    tx: watch::Sender<Snapshot>,
    metrics: Arc<StoreMetrics>,
}

impl Follower {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let Err(err) = self.follow(&mut backoff).await else {
                continue;
            };
            if self.tx.is_closed() {
                return;
            }
            let was = self.metrics.connected.swap(false, Ordering::Relaxed);
            let applied = self.metrics.applied_revision.load(Ordering::Relaxed);
            if let Ok(mut last) = self.metrics.last_error.lock() {
                *last = Some(err.clone());
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            self.metrics
                .last_error_unix_ms
                .store(now.as_millis() as u64, Ordering::Relaxed);
            if was {
                self.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            warn!(
                "etcd at {}: {err}; forwarding with the state of revision {applied}; trying again in {backoff:?}",
                self.url
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Watches from the revision after the cache's until the watch breaks
    /// (says why), or ends because etcd compacted that revision away (then
    /// everything was read again, and the caller watches again at once).
    async fn follow(&mut self, backoff: &mut Duration) -> Result<(), String> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.cache.revision + 1);
        let mut stream = match self.client.watch(self.layout.root(), Some(options)).await {
            Ok(stream) => stream,
            Err(err) => return Err(format!("watching {}: {err}", self.layout.root())),
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Err("the watch ended".to_owned()),
                Err(err) => return Err(format!("the watch broke: {err}")),
            };
            if response.canceled() && response.compact_revision() == 0 {
                return Err(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason()
                ));
            }
            if response.compact_revision() > 0 {
                info!(
                    "etcd at {}: revision {} is compacted away (oldest kept {}); reading everything again",
                    self.url,
                    self.cache.revision + 1,
                    response.compact_revision()
                );
                match tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    read_all(&mut self.client, &self.layout),
                )
                .await
                {
                    Ok(Ok(cache)) => {
                        self.cache = cache;
                        self.publish(Vec::new());
                        self.count_disagreements();
                    }
                    Ok(Err(err)) => return Err(format!("reading {}: {err}", self.layout.root())),
                    Err(err) => return Err(format!("reading {}: {err}", self.layout.root())),
                }
                return Ok(());
            }
            if response.created() && !self.metrics.connected.swap(true, Ordering::Relaxed) {
                info!(
                    "etcd at {}: connected again, catching up from revision {}",
                    self.url,
                    self.cache.revision + 1
                );
                *backoff = BACKOFF_MIN;
                if let Ok(mut last) = self.metrics.last_error.lock() {
                    *last = None;
                }
            }
            if response.events().is_empty() {
                continue;
            }
            let mut written = Vec::new();
            let health_before = self.cache.health.len();
            let mut health_written = false;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                health_written |= key.starts_with(&self.layout.health_root());
                match event.event_type() {
                    EventType::Put => {
                        self.cache
                            .put(&self.layout, &key, kv.value(), kv.mod_revision());
                        written.push(key);
                    }
                    EventType::Delete => {
                        self.cache.objects.remove(&key);
                        self.cache.health.remove(&key);
                    }
                }
                self.cache.revision = self.cache.revision.max(kv.mod_revision());
            }
            self.publish(written);
            if health_written || self.cache.health.len() != health_before {
                self.count_disagreements();
            }
        }
    }

    /// After the reconcile loop has its snapshot: parsing every view is
    /// the slow part, and only the metrics wait for it.
    fn count_disagreements(&self) {
        let views = self
            .cache
            .health
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()));
        let fleet = crate::fleet_health::gather(&self.layout, String::new(), 0, views);
        self.metrics
            .health_disagreements
            .store(fleet.disagreements() as u64, Ordering::Relaxed);
    }

    /// Sends the state of the cache to the reconcile loop; counts the
    /// malformed values among those just written.
    fn publish(&mut self, written: Vec<String>) {
        let next = snapshot(&self.cache, &self.layout, &self.node, &self.metrics);
        let fresh = next
            .malformed
            .iter()
            .filter(|m| written.contains(&m.key))
            .count();
        self.metrics
            .malformed_total
            .fetch_add(fresh as u64, Ordering::Relaxed);
        let _ = self.tx.send(next);
    }
}

impl StateStore for EtcdStore {
    fn location(&self) -> std::path::PathBuf {
        self.url.to_string().into()
    }

    fn load(&self, _node: &NodeConfig) -> Result<Option<DesiredState>, String> {
        Ok(Some(self.updates.borrow().state.as_ref().clone()))
    }

    fn save(&mut self, _state: &DesiredState) -> Result<(), String> {
        // Changes reach etcd through `change`, never as a whole state.
        Ok(())
    }

    fn reject(&mut self) -> Option<std::path::PathBuf> {
        None
    }

    fn fleet(&self) -> Option<&EtcdStore> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeConfig {
        NodeConfig {
            source_v4: Some("198.18.0.1".parse().unwrap()),
            ..NodeConfig::default()
        }
    }

    fn web() -> DesiredState {
        let mut vip = Vip::new(
            "web",
            "198.18.100.1".parse().unwrap(),
            80,
            crate::state::Proto::Tcp,
        );
        vip.ring_size = 1009;
        let mut east = Cluster::new("east", 2, 0);
        let mut e1 = Backend::new("e1", "198.18.1.1".parse().unwrap(), 3);
        e1.admin = AdminState::Drained;
        east.backends.insert("e1".into(), e1);
        vip.clusters.insert("east".into(), east);
        let mut state = DesiredState::default();
        state.vips.insert("web".into(), vip);
        state
    }

    fn cache(layout: &Layout, pairs: &[(String, Vec<u8>)]) -> Cache {
        let mut cache = Cache::default();
        for (revision, (key, value)) in pairs.iter().enumerate() {
            cache.put(layout, key, value, revision as i64 + 1);
        }
        cache
    }

    #[test]
    fn urls_name_endpoints_and_a_prefix() {
        let url: EtcdUrl = "etcd://10.0.0.1:2379,10.0.0.2:2379/lb/prod/"
            .parse()
            .unwrap();
        assert_eq!(
            url.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(url.prefix, "lb/prod");
        assert_eq!(
            url.to_string(),
            "etcd://10.0.0.1:2379,10.0.0.2:2379/lb/prod"
        );
        for (bad, why) in [
            ("http://h:1/x", "etcd://"),
            ("etcd://h:1", "no /PREFIX"),
            ("etcd://h:1/", "PREFIX is empty"),
            ("etcd://h/x", ":PORT"),
            ("etcd://h:99999/x", "HOST:PORT"),
            ("etcd://h:1/a b", "only letters"),
        ] {
            let err = bad.parse::<EtcdUrl>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn one_key_per_object_and_back() {
        let layout = Layout::new("xlb");
        let keys = layout.encode(&web());
        let names: Vec<&str> = keys.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "xlb/v1/backends/web/east/e1",
                "xlb/v1/clusters/web/east",
                "xlb/v1/vips/web"
            ]
        );
        assert_eq!(
            String::from_utf8_lossy(&keys["xlb/v1/backends/web/east/e1"]),
            r#"{"addr":"198.18.1.1","weight":3,"admin":"drained"}"#
        );
        let pairs: Vec<(String, Vec<u8>)> = keys.into_iter().collect();
        let (state, malformed) = cache(&layout, &pairs).state(&layout, &node());
        assert_eq!(state, web());
        assert!(malformed.is_empty(), "{malformed:?}");
    }

    #[test]
    fn bad_values_are_skipped_with_the_reason_and_the_rest_is_served() {
        let layout = Layout::new("xlb");
        let mut pairs: Vec<(String, Vec<u8>)> = layout.encode(&web()).into_iter().collect();
        for (key, value) in [
            ("xlb/v1/backends/web/east/torn", r#"{"addr": "#),
            ("xlb/v1/backends/web/gone/b9", r#"{"addr": "198.18.1.9"}"#),
            (
                "xlb/v1/backends/web/east/self",
                r#"{"addr": "198.18.100.1"}"#,
            ),
            ("xlb/v1/widgets/x", "{}"),
            ("xlb/v1/vips/a/b", "{}"),
            ("xlb/v2/vips/web", "whatever a later layout holds"),
            (
                "xlb/v1/health/n0/web/east/e1",
                r#"{"not": "configuration"}"#,
            ),
        ] {
            pairs.push((key.to_owned(), value.as_bytes().to_vec()));
        }
        let cache = cache(&layout, &pairs);
        assert_eq!(cache.health.len(), 1, "a node's health view is kept aside");
        let (state, malformed) = cache.state(&layout, &node());
        assert_eq!(state, web());
        let found: Vec<(&str, &str)> = malformed
            .iter()
            .map(|m| (m.key.as_str(), m.problem.as_str()))
            .collect();
        let expect = [
            ("xlb/v1/backends/web/east/torn", "EOF while parsing"),
            ("xlb/v1/vips/a/b", "expected vips<vip>"),
            ("xlb/v1/widgets/x", "\"widgets\" is no kind of object"),
            (
                "xlb/v1/backends/web/gone/b9",
                "cluster web/gone is not in the store",
            ),
            ("xlb/v1/backends/web/east/self", "the VIP's own address"),
        ];
        assert_eq!(found.len(), expect.len(), "{found:?}");
        for ((key, problem), (want_key, want)) in found.iter().zip(expect) {
            assert_eq!(*key, want_key);
            assert!(problem.contains(want), "{key}: {problem}");
        }
    }

    #[test]
    fn a_change_is_guarded_by_the_keys_it_touches_and_their_parents() {
        let layout = Layout::new("xlb");
        let pairs: Vec<(String, Vec<u8>)> = layout.encode(&web()).into_iter().collect();
        let current = web();
        let mut next = current.clone();
        let request = Request::BackendAdd {
            vip: "web".into(),
            cluster: "east".into(),
            name: "e2".into(),
            addr: "198.18.1.2".parse().unwrap(),
            weight: None,
        };
        apply_change(&mut next, &request).unwrap();
        let before = layout.encode(&current);
        let after = layout.encode(&next);
        let touched: Vec<&String> = after
            .keys()
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        assert_eq!(touched, ["xlb/v1/backends/web/east/e2"]);
        assert_eq!(
            parent_keys(&layout, touched[0]),
            ["xlb/v1/vips/web", "xlb/v1/clusters/web/east"]
        );
        assert_eq!(
            children_prefixes(&layout, "xlb/v1/vips/web"),
            ["xlb/v1/clusters/web/", "xlb/v1/backends/web/"]
        );
        // Every key of the cache keeps its revision for the comparisons.
        let cache = cache(&layout, &pairs);
        assert!(cache.objects.values().all(|(revision, _)| *revision > 0));
    }
}
