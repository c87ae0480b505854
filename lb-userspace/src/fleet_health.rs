//! Health in a fleet on etcd: every node probes for itself (as Maglev's
//! nodes do) and publishes what it sees, so that nodes that disagree about
//! a backend show up.
//!
//! Each node writes one key per backend of the desired state:
//!
//! ```text
//! PREFIX/v1/health/<node>/<vip>/<cluster>/<backend>
//!     {"addr":"198.18.0.21","health":"down","probe":"tcp:80","reason":"unreachable","since":1795815638.1}
//! ```
//!
//! - written only when the view changes (a health transition, a backend
//!   added or removed), never per probe;
//! - attached to the node's lease (`node.health_lease` seconds, kept alive
//!   every third of it): a node that stops, or loses etcd for longer than
//!   that, leaves no view behind;
//! - never read back as configuration: the state follower ignores the
//!   range, and only `xlb fleet health` ([`read`]) reads it.
//!
//! A node publishes only while it holds its name: the key
//! `PREFIX/v1/health/<node>` itself, written on the same lease, says which
//! node that is ([`Holder`]). Two nodes given one name (the same host name
//! and no `node.name`, or one `node.name` twice) would otherwise write over
//! each other's view without anyone noticing. So a node that finds its name
//! held by another node waits out that node's lease and then refuses to
//! start ([`claim_at_start`]); one that loses its name while running (its
//! lease expired during an outage and another node took the name) stops
//! publishing, says so in its log, status and metrics, and takes the name
//! back once it is free. Every write of a view is a transaction that
//! requires the name's key on the writer's own lease.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use crate::{
    api::{self, BackendView, Call, HealthState, Request, Response, Status},
    config::NodeConfig,
    etcd::{EtcdUrl, Layout, Snapshot, StoreMetrics},
    state::Health,
};

/// After a wake-up, the status is read again this much later.
const FOLLOW_UP: Duration = Duration::from_millis(200);
/// How long one request to etcd may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One node's view of one backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthValue {
    pub addr: IpAddr,
    /// What the rings of this node use: "up" or "down".
    pub health: String,
    /// "KIND:PORT" of the probe, None when the backend is not probed.
    pub probe: Option<String>,
    /// Why it is where it is: the last transition's cause ("unreachable",
    /// "passed"), "not probed", or "no transition yet".
    pub reason: String,
    /// When the last transition happened, in seconds since the Unix epoch.
    pub since: Option<f64>,
}

/// A backend's place in the desired state: VIP, cluster, backend.
pub type BackendPath = (String, String, String);

/// What this node sees of every backend it serves (the backends of its
/// status): the health its rings use and its probe's last transition.
pub fn view<'a>(
    backends: impl IntoIterator<Item = &'a BackendView>,
) -> BTreeMap<BackendPath, HealthValue> {
    let mut out = BTreeMap::new();
    for backend in backends {
        let probe = backend.probe.as_ref();
        let reason = match probe {
            None => "not probed",
            Some(p) => p
                .last_transition
                .as_deref()
                .and_then(|t| t.split_once(" (")?.1.strip_suffix(')'))
                .unwrap_or("no transition yet"),
        };
        out.insert(
            (
                backend.vip.clone(),
                backend.cluster.clone(),
                backend.name.clone(),
            ),
            HealthValue {
                addr: backend.addr,
                health: match backend.health {
                    HealthState::Up => "up",
                    HealthState::Down => "down",
                }
                .to_owned(),
                probe: probe.map(|p| format!("{}:{}", p.kind, p.port)),
                reason: reason.to_owned(),
                since: probe.and_then(|p| p.last_transition_unix),
            },
        );
    }
    out
}

/// The key range of one node's view (with the trailing '/').
pub fn node_prefix(layout: &Layout, node: &str) -> String {
    format!("{}{node}/", layout.health_root())
}

fn encode(
    layout: &Layout,
    node: &str,
    view: &BTreeMap<BackendPath, HealthValue>,
) -> BTreeMap<String, Vec<u8>> {
    view.iter()
        .map(|((vip, cluster, backend), value)| {
            let key = format!("{}{vip}/{cluster}/{backend}", node_prefix(layout, node));
            // Plain strings, numbers and an address: cannot fail.
            (key, serde_json::to_vec(value).unwrap_or_default())
        })
        .collect()
}

// ---------------------------------------------------------------------------
// One name, one node.

/// Who publishes under a node name: the value of `PREFIX/v1/health/<node>`,
/// on that node's lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    /// The host name, as the kernel has it.
    pub host: String,
    pub pid: u32,
    /// `node.source_v4` and `node.source_v6`: where the node is found.
    pub addrs: Vec<IpAddr>,
    pub pin_path: PathBuf,
    /// `/etc/machine-id` (the boot id where there is none) and the network
    /// namespace's inode: with `pin_path`, what a later run of the same
    /// node shares with the one before it, and two nodes never share.
    pub machine: String,
    pub netns: u64,
    /// When it took the name, in seconds since the Unix epoch.
    pub since: f64,
}

impl Holder {
    /// This process, as the node `node` configures.
    pub fn this_node(node: &NodeConfig) -> Holder {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let machine = Some(read("/etc/machine-id"))
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| read("/proc/sys/kernel/random/boot_id"));
        Holder {
            host: read("/proc/sys/kernel/hostname"),
            pid: std::process::id(),
            addrs: [
                node.source_v4.map(IpAddr::V4),
                node.source_v6.map(IpAddr::V6),
            ]
            .into_iter()
            .flatten()
            .collect(),
            pin_path: node.pin_path.clone(),
            machine,
            netns: std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino()),
            since: unix_now(),
        }
    }

    /// Another run of the same node (same machine, network namespace and
    /// pins: it takes over the pinned maps too), which may take the name at
    /// once instead of waiting for the old run's lease to expire.
    pub fn same_node(&self, other: &Holder) -> bool {
        !self.machine.is_empty()
            && self.machine == other.machine
            && self.netns == other.netns
            && self.pin_path == other.pin_path
    }

    /// Whether this holder's process, on this machine, still runs beside
    /// the caller: then it is no earlier run but a second daemon, which
    /// keeps its name. (A pid reused after a reboot only costs the wait
    /// for the old lease.)
    fn still_runs(&self) -> bool {
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return false;
        };
        if pid <= 0 || self.pid == std::process::id() {
            return false;
        }
        // SAFETY: signal 0 sends nothing; kill(2) only checks the pid.
        let found = unsafe { libc::kill(pid, 0) } == 0;
        found || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addrs: Vec<String> = self.addrs.iter().map(ToString::to_string).collect();
        write!(
            f,
            "pid {} on host {:?} ({}), pins {}, since {}",
            self.pid,
            self.host,
            if addrs.is_empty() {
                "no source address".to_owned()
            } else {
                addrs.join(", ")
            },
            self.pin_path.display(),
            unix_time(self.since)
        )
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// `2026-11-28 00:31:07 UTC`.
fn unix_time(secs: f64) -> String {
    jiff::Timestamp::from_second(secs.max(0.0) as i64).map_or_else(
        |_| format!("{secs} s after 1970"),
        |at| at.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// The key that says who holds a node name (no trailing '/': the views are
/// under it).
pub fn name_key(layout: &Layout, node: &str) -> String {
    format!("{}{node}", layout.health_root())
}

/// What became of an attempt to take a node name.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// The name is this node's, on `lease`; `from` is the earlier run of
    /// this node it was taken over from.
    Taken { lease: i64, from: Option<Holder> },
    /// Another node holds it, on its lease `lease` (0: none, the key was
    /// written by hand and never expires).
    Held { holder: String, lease: i64 },
}

/// Takes the name `node` for `me` on a new lease of `lease_secs`: when
/// nobody holds it, or when an earlier run of this same node does (whose
/// lease is then revoked, and its leftover view with it). Leaves it to
/// another node that holds it.
pub async fn try_claim(
    client: &mut Client,
    layout: &Layout,
    node: &str,
    me: &Holder,
    lease_secs: u32,
) -> Result<Claim, String> {
    let key = name_key(layout, node);
    // Two attempts race only when the name changes hands in between: a few
    // tries settle it.
    for _ in 0..3 {
        let got = timed(client.get(key.as_str(), None))
            .await
            .map_err(|e| format!("reading {key}: {e}"))?;
        let (guard, from) = match got.kvs().first() {
            None => (
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                None,
            ),
            Some(kv) => {
                let holder = serde_json::from_slice::<Holder>(kv.value());
                match holder {
                    Ok(holder) if holder.same_node(me) && !holder.still_runs() => (
                        Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()),
                        Some((holder, kv.lease())),
                    ),
                    Ok(holder) => {
                        return Ok(Claim::Held {
                            holder: holder.to_string(),
                            lease: kv.lease(),
                        });
                    }
                    Err(err) => {
                        return Ok(Claim::Held {
                            holder: format!(
                                "an unreadable value ({err}): {:?}",
                                String::from_utf8_lossy(kv.value())
                            ),
                            lease: kv.lease(),
                        });
                    }
                }
            }
        };
        let lease = timed(client.lease_grant(lease_secs.into(), None))
            .await
            .map_err(|e| format!("granting a lease: {e}"))?
            .id();
        let mine = Holder {
            since: unix_now(),
            ..me.clone()
        };
        let put = TxnOp::put(
            key.as_str(),
            serde_json::to_vec(&mine).unwrap_or_default(),
            Some(PutOptions::new().with_lease(lease)),
        );
        let done = timed(client.txn(Txn::new().when([guard]).and_then([put])))
            .await
            .map_err(|e| format!("taking {key}: {e}"))?;
        if done.succeeded() {
            let from = match from {
                Some((holder, old)) => {
                    // The earlier run is gone: so is its view, which this
                    // run writes again in full.
                    if old != 0 {
                        let _ = timed(client.lease_revoke(old)).await;
                    }
                    Some(holder)
                }
                None => None,
            };
            return Ok(Claim::Taken { lease, from });
        }
        let _ = timed(client.lease_revoke(lease)).await;
    }
    Err(format!("{key} kept changing hands"))
}

/// Why `xlb run --store` did not start.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "node name {node:?} is in use in the fleet at {url} by another node: {holder} (key {key}, \
         held for longer than its lease). Two nodes must not share a name, since each publishes \
         its health view under it: {hint}"
    )]
    InUse {
        node: String,
        url: String,
        key: String,
        holder: String,
        hint: String,
    },
    #[error("etcd at {url}: taking node name {node:?}: {why}")]
    Store {
        node: String,
        url: String,
        why: String,
    },
}

/// How often a node waiting for its name looks again.
const CLAIM_POLL: Duration = Duration::from_millis(250);

/// Takes the node's name at start. A name held by another node may be a
/// node that stopped (its lease runs out on its own): that lease's time is
/// waited out, plus a second. A name still held then belongs to a live
/// node, and this one refuses to start. `named` says whether the name is
/// `node.name` (else it is the host name), for the hint.
pub async fn claim_at_start(
    client: &mut Client,
    url: &EtcdUrl,
    node: &str,
    named: bool,
    me: &Holder,
    lease_secs: u32,
) -> Result<(i64, Option<Holder>), ClaimError> {
    let layout = Layout::new(&url.prefix);
    let store_error = |why| ClaimError::Store {
        node: node.to_owned(),
        url: url.to_string(),
        why,
    };
    let mut deadline = None;
    loop {
        match try_claim(client, &layout, node, me, lease_secs)
            .await
            .map_err(store_error)?
        {
            Claim::Taken { lease, from } => return Ok((lease, from)),
            Claim::Held { holder, lease } => {
                let now = Instant::now();
                let deadline = match deadline {
                    Some(at) => at,
                    None => {
                        let ttl = match timed(client.lease_time_to_live(lease, None)).await {
                            Ok(alive) if alive.granted_ttl() > 0 => alive.granted_ttl() as u64,
                            _ => lease_secs.into(),
                        };
                        let wait = Duration::from_secs(ttl + 1);
                        warn!(
                            "etcd at {url}: node name {node:?} is held by {holder}; waiting up to \
                             {wait:?} for it to expire, in case that node has stopped"
                        );
                        *deadline.insert(now + wait)
                    }
                };
                if now >= deadline {
                    let hint = if named {
                        "give this node (or the other) another node.name in its config, \
                         or stop the other node"
                            .to_owned()
                    } else {
                        format!(
                            "this node has no node.name and goes by its host name {node:?}: \
                             set node.name in its config to a name no other node uses, \
                             such as name = \"{node}-2\""
                        )
                    };
                    return Err(ClaimError::InUse {
                        node: node.to_owned(),
                        url: url.to_string(),
                        key: name_key(&layout, node),
                        holder,
                        hint,
                    });
                }
                tokio::time::sleep(CLAIM_POLL).await;
            }
        }
    }
}

/// Publishes a node's view for as long as the daemon runs.
pub struct Publisher {
    pub url: EtcdUrl,
    pub layout: Layout,
    pub client: Client,
    pub node: String,
    pub lease_secs: u32,
    /// Who this node is, for the name's key.
    pub holder: Holder,
    /// The lease the name was taken on at start, if it was.
    pub lease: Option<i64>,
    /// Wake-ups: the prober's health and the store's revisions.
    pub health: watch::Receiver<BTreeMap<IpAddr, Health>>,
    pub states: watch::Receiver<Snapshot>,
    /// Where a name held by another node shows.
    pub metrics: Arc<StoreMetrics>,
}

/// What the publisher holds between rounds.
#[derive(Default)]
struct Published {
    /// The lease the name (and every key written) hangs on.
    lease: Option<i64>,
    /// Key → value as written under `lease`.
    keys: BTreeMap<String, Vec<u8>>,
    renew_at: Option<Instant>,
}

/// How a round ended, when etcd answered.
enum Round {
    Published,
    /// Another node holds the name: nothing was written.
    NameHeld,
}

impl Publisher {
    /// Writes the view whenever health or the desired state changes, keeps
    /// the lease alive, and starts over on a new lease when the old one is
    /// gone. It reads the view from the reconcile loop's status, through
    /// `calls` as the control API does. Ends when the daemon drops its
    /// channels.
    pub async fn run(mut self, calls: mpsc::Sender<Call>) {
        let renew_every = Duration::from_secs(self.lease_secs.into()) / 3;
        let mut published = Published::default();
        if let Some(lease) = self.lease.take() {
            self.announce(lease);
            published.lease = Some(lease);
            published.renew_at = Some(Instant::now() + renew_every);
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            let wait = match self.round(&mut published, renew_every, &calls).await {
                Ok(Round::Published) => {
                    backoff = BACKOFF_MIN;
                    published
                        .renew_at
                        .unwrap_or_else(|| Instant::now() + renew_every)
                }
                // Looked at again now and then; health changes do not free
                // the name.
                Ok(Round::NameHeld) if calls.is_closed() => return,
                Ok(Round::NameHeld) => {
                    tokio::time::sleep(BACKOFF_MAX).await;
                    continue;
                }
                // The daemon stops.
                Err(_) if calls.is_closed() => return,
                Err(err) => {
                    warn!(
                        "etcd at {}: publishing node {:?}'s health view: {err}; trying again in {backoff:?}",
                        self.url, self.node
                    );
                    let at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    at
                }
            };
            let woken = tokio::select! {
                changed = self.health.changed() => changed.is_ok(),
                changed = self.states.changed() => changed.is_ok(),
                () = tokio::time::sleep_until(wait) => continue,
            };
            if !woken {
                return;
            }
            // The loop answers calls before it takes in a change, so the
            // status read now may predate it: read once more a moment later.
            let follow_up = tokio::time::sleep(FOLLOW_UP);
            if matches!(
                self.round(&mut published, renew_every, &calls).await,
                Ok(Round::Published)
            ) {
                follow_up.await;
            }
        }
    }

    fn announce(&self, lease: i64) {
        info!(
            "etcd at {}: node {:?} publishes its health view under {} (lease {lease:x}, {} s)",
            self.url,
            self.node,
            node_prefix(&self.layout, &self.node),
            self.lease_secs
        );
    }

    /// Takes the name on a new lease; says so when another node holds it,
    /// and when it no longer does.
    async fn claim(&mut self) -> Result<Option<i64>, String> {
        let claim = try_claim(
            &mut self.client,
            &self.layout,
            &self.node,
            &self.holder,
            self.lease_secs,
        )
        .await?;
        let mut held = self
            .metrics
            .name_held_by
            .lock()
            .map_err(|_| "a poisoned lock".to_owned())?;
        match claim {
            Claim::Taken { lease, .. } => {
                if held.take().is_some() {
                    info!(
                        "etcd at {}: node name {:?} is this node's again",
                        self.url, self.node
                    );
                }
                self.announce(lease);
                Ok(Some(lease))
            }
            Claim::Held { holder, .. } => {
                if held.as_ref() != Some(&holder) {
                    error!(
                        "etcd at {}: node name {:?} is held by another node: {holder}; this node \
                         does not publish its health view while it is (two nodes must not share \
                         a name: set node.name in one of their configs)",
                        self.url, self.node
                    );
                    if held.is_none() {
                        self.metrics.name_conflicts.fetch_add(1, Ordering::Relaxed);
                    }
                    *held = Some(holder);
                }
                Ok(None)
            }
        }
    }

    /// One round: the name on a lease if there is none, a keep-alive when
    /// due, then the keys that differ from what was written.
    async fn round(
        &mut self,
        published: &mut Published,
        renew_every: Duration,
        calls: &mpsc::Sender<Call>,
    ) -> Result<Round, String> {
        let lease = match published.lease {
            Some(lease) => lease,
            None => {
                let Some(lease) = self.claim().await? else {
                    return Ok(Round::NameHeld);
                };
                *published = Published {
                    lease: Some(lease),
                    keys: BTreeMap::new(),
                    renew_at: Some(Instant::now() + renew_every),
                };
                lease
            }
        };
        if published.renew_at.is_none_or(|at| at <= Instant::now()) {
            let kept = timed(async {
                let (mut keeper, mut answers) = self.client.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                answers.message().await
            })
            .await;
            let expired = match kept {
                Ok(alive) => alive.is_none_or(|a| a.ttl() <= 0),
                // The client takes an expired lease for an error, like a
                // lost link; etcd tells them apart.
                Err(err) => {
                    let left = timed(self.client.lease_time_to_live(lease, None))
                        .await
                        .map_err(|e| format!("keeping lease {lease:x} alive: {err}; {e}"))?;
                    left.ttl() <= 0
                }
            };
            if expired {
                // Expired (etcd gone for longer than the lease): its keys
                // are gone too, the name's among them; it is taken again
                // and everything written on a new lease.
                *published = Published::default();
                return Err(format!("lease {lease:x} expired"));
            }
            published.renew_at = Some(Instant::now() + renew_every);
        }

        self.states.borrow_and_update();
        self.health.borrow_and_update();
        let status = status(calls).await?;
        let backends = status.vips.iter().flat_map(|v| &v.backends);
        let now = encode(&self.layout, &self.node, &view(backends));
        let mut ops: Vec<TxnOp> = now
            .iter()
            .filter(|(key, value)| published.keys.get(*key) != Some(*value))
            .map(|(key, value)| {
                TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        ops.extend(
            published
                .keys
                .keys()
                .filter(|key| !now.contains_key(*key))
                .map(|key| TxnOp::delete(key.clone(), None)),
        );
        if ops.is_empty() {
            return Ok(Round::Published);
        }
        // Only while the name is this node's: never over another's view.
        let mine = Compare::lease(name_key(&self.layout, &self.node), CompareOp::Equal, lease);
        // etcd refuses transactions of more than 128 operations by default.
        for chunk in ops.chunks(100) {
            let done = timed(
                self.client
                    .txn(Txn::new().when([mine.clone()]).and_then(chunk.to_vec())),
            )
            .await
            .map_err(|e| format!("writing: {e}"))?;
            if !done.succeeded() {
                *published = Published::default();
                let _ = timed(self.client.lease_revoke(lease)).await;
                return Err(format!(
                    "{} is no longer on this node's lease (deleted, or taken by another node); \
                     taking the name again",
                    name_key(&self.layout, &self.node)
                ));
            }
        }
        published.keys = now;
        Ok(Round::Published)
    }
}

async fn status(calls: &mpsc::Sender<Call>) -> Result<Status, String> {
    let (reply, answer) = oneshot::channel();
    let call = Call {
        request: Request::Status,
        reply,
    };
    let stopping = "the daemon is stopping";
    calls.send(call).await.map_err(|_| stopping.to_owned())?;
    match answer.await.map_err(|_| stopping.to_owned())? {
        Response::Status { status } => Ok(*status),
        other => Err(format!("the daemon answered {other:?} to a status request")),
    }
}

async fn timed<T>(call: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

// ---------------------------------------------------------------------------
// Reading every node's view: `xlb fleet health`.

/// One backend as every node that publishes it sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendViews {
    pub vip: String,
    pub cluster: String,
    pub backend: String,
    /// Node → its view.
    pub views: BTreeMap<String, HealthValue>,
    /// The nodes publishing it do not all say the same "health".
    pub disagree: bool,
}

/// Every node's published view, at one revision of the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetHealth {
    pub store: String,
    pub revision: i64,
    /// Nodes that hold their name or publish a view.
    pub nodes: Vec<String>,
    /// Node name → the node that holds it.
    #[serde(default)]
    pub holders: BTreeMap<String, Holder>,
    pub backends: Vec<BackendViews>,
    /// Keys under the health range that do not decode, with why.
    pub unreadable: Vec<(String, String)>,
}

/// `xlb fleet health`'s exit status, for scripts and monitoring checks:
/// what was found is never confused with not having looked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Verdict {
    /// Every node that publishes sees every backend alike, every value
    /// reads, and at least `--min-nodes` nodes publish.
    Agree = 0,
    /// Nodes see a backend differently, a value does not read, or fewer
    /// nodes than `--min-nodes` publish.
    Disagree = 1,
    /// Nothing was checked: bad arguments, no store to read (no daemon at
    /// the socket, or one not on etcd), etcd unreachable.
    Unchecked = 2,
}

impl FleetHealth {
    pub fn disagreements(&self) -> usize {
        self.backends.iter().filter(|b| b.disagree).count()
    }

    /// What the fleet's views say, `min_nodes` being the fewest nodes that
    /// should publish.
    pub fn verdict(&self, min_nodes: usize) -> Verdict {
        if self.disagreements() > 0 || !self.unreadable.is_empty() || self.nodes.len() < min_nodes {
            Verdict::Disagree
        } else {
            Verdict::Agree
        }
    }
}

/// Builds the fleet's views from the keys of the health range.
pub fn gather(
    layout: &Layout,
    store: String,
    revision: i64,
    pairs: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> FleetHealth {
    let root = layout.health_root();
    let mut nodes = BTreeSet::new();
    let mut holders = BTreeMap::new();
    let mut unreadable = Vec::new();
    let mut backends: BTreeMap<BackendPath, BTreeMap<String, HealthValue>> = BTreeMap::new();
    for (key, value) in pairs {
        let parts: Vec<&str> = key
            .strip_prefix(&root)
            .map(|rest| rest.split('/').collect())
            .unwrap_or_default();
        if let [node] = parts[..] {
            match serde_json::from_slice::<Holder>(&value) {
                Ok(holder) => {
                    nodes.insert(node.to_owned());
                    holders.insert(node.to_owned(), holder);
                }
                Err(err) => {
                    let why = format!("who holds node {node:?}: {err}");
                    unreadable.push((key, why));
                }
            }
            continue;
        }
        let [node, vip, cluster, backend] = parts[..] else {
            unreadable.push((
                key,
                "expected health/<node> or health/<node>/<vip>/<cluster>/<backend>".into(),
            ));
            continue;
        };
        match serde_json::from_slice::<HealthValue>(&value) {
            Ok(view) => {
                nodes.insert(node.to_owned());
                backends
                    .entry((vip.to_owned(), cluster.to_owned(), backend.to_owned()))
                    .or_default()
                    .insert(node.to_owned(), view);
            }
            Err(err) => unreadable.push((key, err.to_string())),
        }
    }
    FleetHealth {
        store,
        revision,
        nodes: nodes.into_iter().collect(),
        holders,
        backends: backends
            .into_iter()
            .map(|((vip, cluster, backend), views)| {
                let seen: BTreeSet<&str> = views.values().map(|v| v.health.as_str()).collect();
                BackendViews {
                    vip,
                    cluster,
                    backend,
                    disagree: seen.len() > 1,
                    views,
                }
            })
            .collect(),
        unreadable,
    }
}

/// Reads every node's published view from the store at `url`.
pub async fn read(url: &EtcdUrl) -> Result<FleetHealth, String> {
    let layout = Layout::new(&url.prefix);
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(REQUEST_TIMEOUT);
    let unreachable = |e: etcd_client::Error| format!("etcd at {url}: {e}");
    let mut client = Client::connect(&url.endpoints, Some(options))
        .await
        .map_err(unreachable)?;
    let got = client
        .get(layout.health_root(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(unreachable)?;
    let revision = got.header().map_or(0, |h| h.revision());
    let pairs = got.kvs().iter().map(|kv| {
        (
            String::from_utf8_lossy(kv.key()).into_owned(),
            kv.value().to_vec(),
        )
    });
    Ok(gather(&layout, url.to_string(), revision, pairs))
}

/// The views as a table: one row per backend, one column per node, and
/// `DISAGREE` where nodes see a backend differently.
pub fn text(fleet: &FleetHealth) -> String {
    let mut out = format!(
        "health views in {} at revision {}: {} node{} ({})\n",
        fleet.store,
        fleet.revision,
        fleet.nodes.len(),
        if fleet.nodes.len() == 1 { "" } else { "s" },
        fleet.nodes.join(", ")
    );
    for (node, holder) in &fleet.holders {
        let _ = writeln!(out, "  {node}: {holder}");
    }
    let mut rows = vec![
        ["VIP", "CLUSTER", "BACKEND", "ADDRESS"]
            .into_iter()
            .map(str::to_owned)
            .chain(fleet.nodes.iter().cloned())
            .chain([String::new()])
            .collect::<Vec<String>>(),
    ];
    for b in &fleet.backends {
        let addr = b.views.values().next().map(|v| v.addr.to_string());
        let mut row = vec![
            b.vip.clone(),
            b.cluster.clone(),
            b.backend.clone(),
            addr.unwrap_or_default(),
        ];
        for node in &fleet.nodes {
            row.push(match b.views.get(node) {
                Some(v) if v.health == "down" => format!("down ({})", v.reason),
                Some(v) => v.health.clone(),
                None => "-".to_owned(),
            });
        }
        row.push(if b.disagree { "DISAGREE" } else { "" }.to_owned());
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{} of {} backends seen differently by the nodes",
        fleet.disagreements(),
        fleet.backends.len()
    );
    for (key, why) in &fleet.unreadable {
        let _ = writeln!(out, "unreadable {key}: {why}");
    }
    out
}

const HEALTH_ABOUT: &str = "\
Every node's published view of its backends' health, read from etcd: one row
per backend, one column per node, DISAGREE where the nodes' health differs,
and who holds each node name (pid, host, source addresses).

The store is --store etcd://..., or else the one the daemon at --socket runs
on. --json prints the same as a document.

Exit status, for scripts and monitoring checks:
  0  every node that publishes sees every backend alike (and at least
     --min-nodes nodes publish);
  1  nodes see a backend differently, a value under PREFIX/v1/health does not
     read, or fewer than --min-nodes nodes publish (the output says which);
  2  nothing was checked: bad arguments, no daemon at --socket or one not on
     etcd, etcd unreachable (the error says why).";

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Every node's published view of its backends' health, one column per
    /// node, marking the backends the nodes disagree on (exit status 0:
    /// agree, 1: disagree, 2: could not check)
    #[command(long_about = HEALTH_ABOUT)]
    Health {
        /// The fleet's store (default: the one the daemon at --socket runs on)
        #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]/PREFIX")]
        store: Option<String>,
        /// Fewer nodes publishing than this is a finding (exit status 1):
        /// a node that stopped, or cannot reach etcd, publishes nothing
        #[arg(long, value_name = "N", default_value_t = 0)]
        min_nodes: usize,
    },
}

/// `xlb fleet ...`: reads the store given, or the one the daemon at
/// `socket` runs on, prints what it found and says what that is. An error
/// means nothing could be checked.
pub fn command(command: FleetCommand, socket: &Path, json: bool) -> anyhow::Result<Verdict> {
    let FleetCommand::Health { store, min_nodes } = command;
    let url = match store {
        Some(url) => url,
        None => match api::Client::connect(socket)?.call(&Request::Status)? {
            Response::Status { status } => match status.store {
                Some(store) => store.url,
                None => anyhow::bail!(
                    "the daemon at {} does not run on etcd (xlb run --store); give --store etcd://...",
                    socket.display()
                ),
            },
            other => anyhow::bail!("the daemon answered {other:?} to a status request"),
        },
    };
    let url: EtcdUrl = url.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fleet = runtime.block_on(read(&url)).map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&fleet)?);
    } else {
        print!("{}", text(&fleet));
    }
    if fleet.nodes.len() < min_nodes {
        let said = format!(
            "{} node{} publish{}, {min_nodes} expected (--min-nodes)",
            fleet.nodes.len(),
            if fleet.nodes.len() == 1 { "" } else { "s" },
            if fleet.nodes.len() == 1 { "es" } else { "" },
        );
        // Beside a JSON document, not in it.
        if json {
            eprintln!("{said}");
        } else {
            println!("{said}");
        }
    }
    Ok(fleet.verdict(min_nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn up(addr: &str) -> HealthValue {
        HealthValue {
            addr: addr.parse().unwrap(),
            health: "up".into(),
            probe: Some("tcp:80".into()),
            reason: "no transition yet".into(),
            since: None,
        }
    }

    #[test]
    fn the_view_is_the_health_the_rings_use() {
        let backend = |name: &str, addr: &str, health| BackendView {
            vip: "web".into(),
            cluster: "east".into(),
            name: name.into(),
            addr: addr.parse().unwrap(),
            weight: 1,
            admin: crate::api::Admin::Enabled,
            health,
            share: 0.5,
            slots: 0,
            id: None,
            packets: 0,
            bytes: 0,
            probe: None,
        };
        let backends = [
            backend("e1", "198.18.0.21", HealthState::Up),
            backend("e2", "198.18.0.22", HealthState::Down),
        ];
        let got = view(&backends);
        let path = |b: &str| ("web".to_owned(), "east".to_owned(), b.to_owned());
        assert_eq!(got.len(), 2);
        assert_eq!(got[&path("e1")].health, "up");
        assert_eq!(got[&path("e1")].reason, "not probed");
        assert_eq!(got[&path("e1")].probe, None);
        assert_eq!(got[&path("e2")].health, "down");
        assert_eq!(got[&path("e2")].addr, ip("198.18.0.22"));
    }

    #[test]
    fn nodes_that_see_a_backend_differently_are_marked() {
        let layout = Layout::new("xlb");
        let down = HealthValue {
            health: "down".into(),
            reason: "unreachable".into(),
            since: Some(1.5),
            ..up("198.18.0.21")
        };
        let json = |v: &HealthValue| serde_json::to_vec(v).unwrap();
        let pairs = vec![
            (
                "xlb/v1/health/n0/web/east/e1".to_owned(),
                json(&up("198.18.0.21")),
            ),
            ("xlb/v1/health/n1/web/east/e1".to_owned(), json(&down)),
            (
                "xlb/v1/health/n0/web/east/e2".to_owned(),
                json(&up("198.18.0.22")),
            ),
            (
                "xlb/v1/health/n1/web/east/e2".to_owned(),
                json(&up("198.18.0.22")),
            ),
            ("xlb/v1/health/n1/web/east".to_owned(), b"{}".to_vec()),
            (
                "xlb/v1/health/n2/web/east/e3".to_owned(),
                b"{\"addr\":".to_vec(),
            ),
        ];
        let fleet = gather(&layout, "etcd://h:1/xlb".into(), 7, pairs);
        assert_eq!(fleet.nodes, ["n0", "n1"]);
        assert_eq!(fleet.disagreements(), 1);
        assert!(fleet.backends[0].disagree && !fleet.backends[1].disagree);
        assert_eq!(fleet.unreadable.len(), 2, "{:?}", fleet.unreadable);
        let shown = text(&fleet);
        let e1 = shown
            .lines()
            .find(|l| l.split_whitespace().take(3).eq(["web", "east", "e1"]))
            .unwrap_or_else(|| panic!("no row for e1:\n{shown}"));
        assert!(
            e1.contains("down (unreachable)") && e1.ends_with("DISAGREE"),
            "{shown}"
        );
        assert!(
            shown.contains("1 of 2 backends seen differently"),
            "{shown}"
        );
    }

    fn holder(pid: u32, netns: u64) -> Holder {
        Holder {
            host: "lb-a".into(),
            pid,
            addrs: vec![ip("198.18.0.3")],
            pin_path: "/sys/fs/bpf/xlb".into(),
            machine: "3d1219c7".into(),
            netns,
            since: 1_795_815_638.0,
        }
    }

    #[test]
    fn a_later_run_of_the_same_node_is_told_from_another_node() {
        let first = holder(7, 4_026_531_833);
        assert!(holder(8, 4_026_531_833).same_node(&first));
        // Another namespace of the same machine, other pins, another
        // machine: another node, whatever its host name.
        assert!(!holder(8, 4_026_532_000).same_node(&first));
        let elsewhere = Holder {
            pin_path: "/sys/fs/bpf/xlb2".into(),
            ..holder(8, 4_026_531_833)
        };
        assert!(!elsewhere.same_node(&first));
        let other_machine = Holder {
            machine: "99aa".into(),
            ..holder(8, 4_026_531_833)
        };
        assert!(!other_machine.same_node(&first));
        // Without a machine identity nothing can be told: never the same.
        let unknown = Holder {
            machine: String::new(),
            ..holder(8, 4_026_531_833)
        };
        assert!(!unknown.same_node(&unknown.clone()));
        assert_eq!(
            first.to_string(),
            "pid 7 on host \"lb-a\" (198.18.0.3), pins /sys/fs/bpf/xlb, since 2026-11-27 21:40:38 UTC"
        );
        assert_eq!(unix_time(951_782_400.0), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn a_run_whose_process_lives_is_a_second_daemon_not_an_earlier_run() {
        let with_pid = |pid| Holder {
            pid,
            ..holder(0, 1)
        };
        assert!(with_pid(std::os::unix::process::parent_id()).still_runs());
        assert!(!with_pid(std::process::id()).still_runs(), "this very run");
        let mut ended = std::process::Command::new("true").spawn().unwrap();
        ended.wait().unwrap();
        assert!(!with_pid(ended.id()).still_runs());
        assert!(!with_pid(0).still_runs() && !with_pid(u32::MAX).still_runs());
    }

    #[test]
    fn who_holds_each_name_is_read_beside_the_views() {
        let layout = Layout::new("xlb");
        let pairs = vec![
            (
                "xlb/v1/health/n0".to_owned(),
                serde_json::to_vec(&holder(7, 1)).unwrap(),
            ),
            (
                "xlb/v1/health/n0/web/east/e1".to_owned(),
                serde_json::to_vec(&up("198.18.0.21")).unwrap(),
            ),
            // A node with no backend yet holds its name all the same.
            (
                "xlb/v1/health/n1".to_owned(),
                serde_json::to_vec(&holder(9, 2)).unwrap(),
            ),
            ("xlb/v1/health/n2".to_owned(), b"lb-c".to_vec()),
        ];
        let fleet = gather(&layout, "etcd://h:1/xlb".into(), 7, pairs);
        assert_eq!(fleet.nodes, ["n0", "n1"]);
        assert_eq!(fleet.holders["n1"].pid, 9);
        assert_eq!(fleet.unreadable.len(), 1, "{:?}", fleet.unreadable);
        assert!(fleet.unreadable[0].1.contains("who holds node \"n2\""));
        let shown = text(&fleet);
        assert!(
            shown.contains("\n  n0: pid 7 on host \"lb-a\" (198.18.0.3)"),
            "{shown}"
        );
    }

    #[test]
    fn the_verdict_tells_agreement_from_disagreement_and_from_not_looking() {
        assert_eq!(
            [Verdict::Agree, Verdict::Disagree, Verdict::Unchecked].map(|v| v as u8),
            [0, 1, 2]
        );
        let layout = Layout::new("xlb");
        let fleet = |pairs: &[(&str, &HealthValue)]| {
            let pairs = pairs
                .iter()
                .map(|(k, v)| (format!("xlb/v1/health/{k}"), serde_json::to_vec(v).unwrap()));
            gather(&layout, "etcd://h:1/xlb".into(), 7, pairs)
        };
        let up = up("198.18.0.21");
        let down = HealthValue {
            health: "down".into(),
            ..up.clone()
        };
        let agree = fleet(&[("n0/web/east/e1", &up), ("n1/web/east/e1", &up)]);
        assert_eq!(agree.verdict(0), Verdict::Agree);
        assert_eq!(agree.verdict(2), Verdict::Agree);
        assert_eq!(agree.verdict(3), Verdict::Disagree, "a node missing");
        let disagree = fleet(&[("n0/web/east/e1", &up), ("n1/web/east/e1", &down)]);
        assert_eq!(disagree.verdict(0), Verdict::Disagree);
        let unreadable = fleet(&[("n0/web/east", &up)]);
        assert_eq!(unreadable.verdict(0), Verdict::Disagree);
        // Nobody publishes: nothing disagrees, unless nodes are expected.
        let empty = fleet(&[]);
        assert_eq!(empty.verdict(0), Verdict::Agree);
        assert_eq!(empty.verdict(1), Verdict::Disagree);
    }
}
