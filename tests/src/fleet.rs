//! A fleet site: a real etcd (Debian's etcd-server) and several real
//! `xlb run --store etcd://...` daemons, each in a namespace of its own with
//! the balancer attached to its `eth0`, all on one bridge in 198.18.0.0/24.
//!
//! etcd runs in the `store` namespace at 198.18.0.50 (client port 2379,
//! peer port 2380: the namespace makes them unique), with its data in the
//! site's scratch directory, so that it can be killed and started again on
//! the same data. Everything (daemons, etcd, namespaces, the bpffs mount
//! holding every node's pins, the scratch directory) is removed on drop,
//! also while a failed test unwinds.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData};
use etcd_client::{Client as EtcdClient, Txn, TxnOp};
use lb_common::{Backend as BackendEntry, VipInfo, VipKey, ip_from_addr, map_names};
use xlb::{
    api::Status,
    dataplane::Limits,
    topology::{Host, Spawned},
};

use crate::{
    bpffs::{pinned, pinned_ring},
    site::{Ground, Node, addressed, stdout_of_success},
};

pub const STORE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 50);
pub const PREFIX: &str = "fleet";
/// Every node serves /metrics here, in its own namespace.
pub use crate::site::METRICS;
/// Seconds a node's published health view outlives it (`node.health_lease`).
pub const HEALTH_LEASE: u32 = 3;
/// Long enough for a loaded machine; a guard against hanging, not a target.
const PATIENCE: Duration = Duration::from_secs(60);
/// etcd refuses transactions of more operations than this by default.
const TXN_OPS: usize = 100;

/// The kernel's view of one node: per VIP its entry's ring size and flags
/// and its ring as the backend addresses the slots name (ids may differ
/// between nodes; what Maglev decides may not).
pub type Rings = BTreeMap<VipKey, (u32, u32, Vec<Option<IpAddr>>)>;

/// Fields drop in order: daemons, etcd, namespaces, mount, files.
pub struct Fleet {
    pub nodes: Vec<Node>,
    etcd: Option<Spawned>,
    pub store: Host,
    ground: Ground,
    etcd_starts: u32,
}

impl Fleet {
    /// Builds the site, starts etcd and `nodes` daemons, and waits until
    /// every daemon answers. `xlb` is the command line: the program, then
    /// any arguments it needs before xlb's own.
    pub fn new(tag: &str, xlb: &[OsString], nodes: usize, limits: Limits) -> Fleet {
        Self::with_config(tag, xlb, nodes, limits, "")
    }

    /// [`Self::new`], with `extra` appended to every node's config (such
    /// as `[vip.NAME]` tables for their `probe` tables).
    pub fn with_config(
        tag: &str,
        xlb: &[OsString],
        nodes: usize,
        limits: Limits,
        extra: &str,
    ) -> Fleet {
        let ground = Ground::new(&format!("fleet-{tag}"), true);
        let (store, _) = ground.host("store", addressed(&[STORE_ADDR.into()], None));
        let mut fleet = Fleet {
            nodes: Vec::new(),
            etcd: None,
            store,
            ground,
            etcd_starts: 0,
        };
        fleet.start_etcd();
        for i in 0..nodes {
            let name = format!("n{i}");
            let addr = Ipv4Addr::new(198, 18, 0, 3 + i as u8);
            let pin_dir = fleet.ground.bpffs.path().join(&name);
            let node = fleet.ground.node(&name, (addr, None), None, pin_dir, xlb);
            node.configure(
                &format!("name = \"{name}\"\nhealth_lease = {HEALTH_LEASE}"),
                limits,
                &format!("[metrics]\nlisten = \"{METRICS}\"\n{extra}"),
            );
            fleet.nodes.push(node);
        }
        for i in 0..nodes {
            fleet.start_node(i);
        }
        fleet
    }

    pub fn store_url(&self) -> String {
        format!("etcd://{STORE_ADDR}:2379/{PREFIX}")
    }

    fn endpoint() -> String {
        format!("http://{STORE_ADDR}:2379")
    }

    /// Starts etcd on its data directory (kept from an earlier start) and
    /// waits until it answers.
    pub fn start_etcd(&mut self) {
        assert!(self.etcd.is_none(), "etcd runs already");
        self.etcd_starts += 1;
        let log = fs::File::create(
            self.ground
                .scratch
                .dir
                .join(format!("etcd-{}.log", self.etcd_starts)),
        )
        .expect("etcd log");
        let client = Self::endpoint();
        let peer = format!("http://{STORE_ADDR}:2380");
        let mut command = self.store.command("etcd");
        command
            .arg("--name=store")
            .arg(format!(
                "--data-dir={}",
                self.ground.scratch.dir.join("etcd").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=store={peer}"))
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log);
        self.etcd = Some(self.store.spawn(&mut command).expect("starting etcd"));
        let deadline = Instant::now() + PATIENCE;
        while self.try_revision().is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not answer:\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills etcd (SIGKILL: the hardest way a store can go).
    pub fn kill_etcd(&mut self) {
        drop(self.etcd.take().expect("etcd runs"));
    }

    pub fn start_node(&mut self, i: usize) {
        let url = self.store_url();
        self.nodes[i].start(&["--store", &url]);
    }

    /// SIGTERM to node `i`'s daemon, waiting (a while) for it to exit.
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Another host on the fabric at `addr` (a backend, say).
    pub fn host(&self, name: &str, addr: Ipv4Addr) -> Host {
        self.ground.host(name, addressed(&[addr.into()], None)).0
    }

    /// Every key under `prefix` in etcd, with its value.
    pub fn get_prefix(&self, prefix: &str) -> BTreeMap<String, String> {
        let prefix = prefix.to_owned();
        self.etcd_call(async move |c| {
            let got = c
                .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                .await?;
            Ok(got
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                })
                .collect())
        })
        .expect("reading etcd")
    }

    /// `GET /metrics` from inside node `i`.
    pub fn scrape(&self, i: usize) -> String {
        self.nodes[i].scrape()
    }

    /// Runs etcd calls from the store's namespace.
    fn etcd_call<R: Send>(
        &self,
        call: impl AsyncFnOnce(&mut EtcdClient) -> Result<R, etcd_client::Error> + Send,
    ) -> Result<R, etcd_client::Error> {
        self.store
            .run_in(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async {
                    let options = etcd_client::ConnectOptions::new()
                        .with_connect_timeout(Duration::from_secs(2))
                        .with_timeout(Duration::from_secs(5));
                    let mut client = EtcdClient::connect([Self::endpoint()], Some(options)).await?;
                    call(&mut client).await
                })
            })
            .expect("entering the store's namespace")
    }

    fn try_revision(&self) -> Result<i64, etcd_client::Error> {
        self.etcd_call(async |c| {
            let got = c.get("/", None).await?;
            Ok(got.header().map_or(0, |h| h.revision()))
        })
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        self.try_revision().expect("asking etcd its revision")
    }

    /// Writes `pairs` (in transactions of at most 100 puts); returns the
    /// revision of the last write.
    pub fn put(&self, pairs: &[(String, String)]) -> i64 {
        self.put_timed(pairs).0
    }

    /// [`Self::put`], also saying when the first write left (after the
    /// connection to etcd was made).
    pub fn put_timed(&self, pairs: &[(String, String)]) -> (i64, Instant) {
        let pairs = pairs.to_vec();
        self.etcd_call(async move |c| {
            let started = Instant::now();
            let mut revision = 0;
            for chunk in pairs.chunks(TXN_OPS) {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
                    .collect();
                let done = c.txn(Txn::new().and_then(ops)).await?;
                revision = done.header().map_or(0, |h| h.revision());
            }
            Ok((revision, started))
        })
        .expect("writing to etcd")
    }

    /// Compacts etcd's history up to its current revision: a watch can no
    /// longer start before it.
    pub fn compact(&self) {
        let revision = self.revision();
        self.etcd_call(async move |c| c.compact(revision, None).await.map(drop))
            .expect("compacting etcd");
    }

    /// Takes node `i`'s link down or up: the node is cut off from the store
    /// without either side closing a connection.
    pub fn cut_off(&self, i: usize, cut: bool) {
        let state = if cut { "down" } else { "up" };
        self.nodes[i]
            .host
            .ip(["link", "set", "eth0", state])
            .expect("setting the node's link");
    }

    /// Runs the command line against node `i`.
    pub fn xlb(&self, i: usize, args: &[&str]) -> Output {
        self.nodes[i].xlb(args)
    }

    /// Runs the command line inside node `i`'s namespace (where etcd can
    /// be reached).
    pub fn xlb_inside(&self, i: usize, args: &[&str]) -> Output {
        self.nodes[i].xlb_inside(args)
    }

    /// A command that must succeed on node `i`; its standard output.
    pub fn ok(&self, i: usize, args: &[&str]) -> String {
        stdout_of_success(args, self.xlb(i, args), || self.logs())
    }

    pub fn status(&self, i: usize) -> Status {
        self.nodes[i].status()
    }

    /// The store revision node `i` has programmed, and whether its watch
    /// is up.
    pub fn applied(&self, i: usize) -> (i64, bool) {
        self.status(i)
            .store
            .map_or((0, false), |s| (s.applied_revision, s.connected))
    }

    /// Waits until every node watches the store again and has programmed
    /// `revision` (or a later one). Both: after an outage in which nothing
    /// was written, a node still waiting out its reconnection back-off has
    /// applied `revision` already, yet it is not watching: it sees the next
    /// change only once it reconnects, up to the back-off's 5 s later.
    pub fn converge(&self, revision: i64) {
        let deadline = Instant::now() + PATIENCE;
        for i in 0..self.nodes.len() {
            loop {
                let (applied, connected) = self.applied(i);
                if connected && applied >= revision {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {i} is still at revision {applied} of {revision} (watch {}):\n{}",
                    if connected { "up" } else { "down" },
                    self.logs()
                );
                thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// What node `i`'s kernel maps hold.
    pub fn rings(&self, i: usize) -> Rings {
        read_rings(&self.nodes[i].pin_dir)
    }

    /// Node `i`'s log so far, every run of it.
    pub fn log(&self, i: usize) -> String {
        self.nodes[i].logs()
    }

    pub fn logs(&self) -> String {
        let mut out: String = self.nodes.iter().map(Node::logs).collect();
        for k in 1..=self.etcd_starts {
            let log = fs::read_to_string(self.ground.scratch.dir.join(format!("etcd-{k}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            out.push_str(&format!("--- etcd run {k} (last lines):\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Stops everything and checks that nothing is left: namespaces,
    /// mount, files, processes.
    pub fn close(mut self) {
        let pids: Vec<u32> = self
            .nodes
            .iter()
            .filter_map(Node::pid)
            .chain(self.etcd.as_ref().map(Spawned::pid))
            .collect();
        for node in &mut self.nodes {
            if node.pid().is_some() {
                node.stop();
            }
        }
        let teardown = self.ground.teardown(pids);
        drop(self);
        teardown.assert_clean();
    }
}

/// Every VIP's ring in a node's pinned maps, by backend address.
pub fn read_rings(pin_dir: &Path) -> Rings {
    let vips: HashMap<MapData, VipKey, VipInfo> =
        HashMap::try_from(Map::HashMap(pinned(pin_dir, map_names::VIPS))).expect("VIPS");
    let backends: Array<MapData, BackendEntry> =
        Array::try_from(Map::Array(pinned(pin_dir, map_names::BACKENDS))).expect("BACKENDS");
    let mut out = Rings::new();
    for entry in vips.iter() {
        let (key, info) = entry.expect("reading VIPS");
        let ring = pinned_ring(pin_dir, info.ring_offset, info.ring_size)
            .into_iter()
            .map(|id| {
                let backend = backends.get(&id, 0).ok()?;
                ip_from_addr(backend.family, &backend.addr)
            })
            .collect();
        out.insert(key, (info.ring_size, info.flags, ring));
    }
    out
}
