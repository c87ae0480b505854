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

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::Path,
    process::ExitCode,
    time::Duration,
};

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use crate::{
    api::{self, BackendView, Call, HealthState, Request, Response, Status},
    etcd::{EtcdUrl, Layout, Snapshot},
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

/// Publishes a node's view for as long as the daemon runs.
pub struct Publisher {
    pub url: EtcdUrl,
    pub layout: Layout,
    pub client: Client,
    pub node: String,
    pub lease_secs: u32,
    /// Wake-ups: the prober's health and the store's revisions.
    pub health: watch::Receiver<BTreeMap<IpAddr, Health>>,
    pub states: watch::Receiver<Snapshot>,
}

/// What the publisher holds between rounds.
#[derive(Default)]
struct Published {
    lease: Option<i64>,
    /// Key → value as written under `lease`.
    keys: BTreeMap<String, Vec<u8>>,
    renew_at: Option<Instant>,
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
        let mut backoff = BACKOFF_MIN;
        loop {
            let wait = match self.round(&mut published, renew_every, &calls).await {
                Ok(()) => {
                    backoff = BACKOFF_MIN;
                    published
                        .renew_at
                        .unwrap_or_else(|| Instant::now() + renew_every)
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
            if self
                .round(&mut published, renew_every, &calls)
                .await
                .is_ok()
            {
                follow_up.await;
            }
        }
    }

    /// One round: a lease if there is none, a keep-alive when due, then the
    /// keys that differ from what was written.
    async fn round(
        &mut self,
        published: &mut Published,
        renew_every: Duration,
        calls: &mpsc::Sender<Call>,
    ) -> Result<(), String> {
        let lease = match published.lease {
            Some(lease) => lease,
            None => {
                let granted = timed(self.client.lease_grant(self.lease_secs.into(), None))
                    .await
                    .map_err(|e| format!("granting a lease: {e}"))?;
                info!(
                    "etcd at {}: node {:?} publishes its health view under {} (lease {:x}, {} s)",
                    self.url,
                    self.node,
                    node_prefix(&self.layout, &self.node),
                    granted.id(),
                    granted.ttl()
                );
                *published = Published {
                    lease: Some(granted.id()),
                    keys: BTreeMap::new(),
                    renew_at: Some(Instant::now() + renew_every),
                };
                granted.id()
            }
        };
        if published.renew_at.is_none_or(|at| at <= Instant::now()) {
            let alive = timed(async {
                let (mut keeper, mut answers) = self.client.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                answers.message().await
            })
            .await
            .map_err(|e| format!("keeping lease {lease:x} alive: {e}"))?;
            if alive.is_none_or(|a| a.ttl() <= 0) {
                // Expired (etcd gone for longer than the lease): its keys
                // are gone too; everything is written again on a new one.
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
            return Ok(());
        }
        // etcd refuses transactions of more than 128 operations by default.
        for chunk in ops.chunks(100) {
            timed(self.client.txn(Txn::new().and_then(chunk.to_vec())))
                .await
                .map_err(|e| format!("writing: {e}"))?;
        }
        published.keys = now;
        Ok(())
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
    pub nodes: Vec<String>,
    pub backends: Vec<BackendViews>,
    /// Keys under the health range that do not decode, with why.
    pub unreadable: Vec<(String, String)>,
}

impl FleetHealth {
    pub fn disagreements(&self) -> usize {
        self.backends.iter().filter(|b| b.disagree).count()
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
    let mut unreadable = Vec::new();
    let mut backends: BTreeMap<BackendPath, BTreeMap<String, HealthValue>> = BTreeMap::new();
    for (key, value) in pairs {
        let parts: Vec<&str> = key
            .strip_prefix(&root)
            .map(|rest| rest.split('/').collect())
            .unwrap_or_default();
        let [node, vip, cluster, backend] = parts[..] else {
            unreadable.push((
                key,
                "expected health/<node>/<vip>/<cluster>/<backend>".into(),
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

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Every node's published view of its backends' health, one column per
    /// node, marking the backends the nodes disagree on
    Health {
        /// The fleet's store (default: the one the daemon at --socket runs on)
        #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]/PREFIX")]
        store: Option<String>,
    },
}

/// `xlb fleet ...`: reads the store given, or the one the daemon at
/// `socket` runs on.
pub fn command(command: FleetCommand, socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let FleetCommand::Health { store } = command;
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
    Ok(ExitCode::SUCCESS)
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
}
