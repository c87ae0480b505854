//! `xlb demo`: a small two-cluster site in network namespaces, with real
//! TCP traffic through the real XDP programs.
//!
//! [`Site::build`] creates, on one L2 fabric (a bridge in its own namespace):
//! a client, one xlb node running the balancer natively on its veth, and two
//! clusters ("east", "west") of backends. Each backend holds the VIP on `lo`,
//! strips the IPIP header with xlb's decap program and answers with one line
//! saying who it is, straight to the client (direct server return). The
//! settings direct server return needs on veth (see ENVIRONMENT.md) are all
//! made here: MTU 1600 on the encapsulating hops, tx checksum offload off on
//! the client, forwarding on in the xlb node, an XDP program on the bridge
//! port that receives the node's XDP_TX frames, arp_ignore / arp_announce and
//! rp_filter on the backends.
//!
//! The same [`Site`] backs the end-to-end tests; [`run`] is the demo itself.
//! Everything lives in namespaces of a [`Topology`], removed when the site is
//! dropped or closed, also on Ctrl-C (see [`Cancel`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use lb_common::{
    BACKEND_F_UP, Backend, Counter, FAMILY_V4, PROTO_TCP, Settings, Traffic, VipInfo, VipKey,
    addr_from_ip,
};
use tokio::sync::{mpsc, watch};

use crate::dataplane::nexthop::{NextHopError, NextHopResolver, Resolution};
use crate::dataplane::{AttachMode, Dataplane, DataplaneError, Limits, Role};
use crate::maglev::{self, Member};
use crate::topology::{Bridge, Host, Interface, LinkOpts, Topology, TopologyError};

/// The service every backend offers.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const VIP_PORT: u16 = 80;
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The fabric's subnet, 198.18.0.0/22: client and node in 198.18.0.0/24,
/// cluster k's backends in 198.18.(k+1).0/24. The VIP lies outside it.
const FABRIC_PREFIX_LEN: u8 = 22;
pub const CLUSTERS: [&str; 2] = ["east", "west"];
pub const MAX_BACKENDS_PER_CLUSTER: usize = 250;
/// Maglev ring size: a prime well above 100 times the backend count.
pub const RING_SIZE: u32 = 65537;
/// MTU of every link an encapsulated packet crosses: room for the 20-byte
/// outer IPv4 header on top of the client's 1500.
pub const FABRIC_MTU: u32 = 1600;
/// Every host's interface to the fabric.
const DEV: &str = "eth0";
/// Name of the xlb node's namespace (within the topology).
const NODE_NAME: &str = "xlb1";
const DEFAULT_HASH_SEED: u32 = 0x786c_6221;

/// How long one client connection may take, per step.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a backend waits for a client to speak first (an HTTP request
/// gets an HTTP answer); silent clients such as `nc` get the bare line.
const SERVER_PEEK: Duration = Duration::from_millis(150);
/// How often a backend's accept loop looks at its stop flag.
const SERVER_POLL_MS: i32 = 50;
/// How long next-hop resolution may take per backend (ARP on a veth answers
/// in microseconds; this only bounds a broken setup).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a round waits for its last segments (FIN, ACK) to be counted.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Map sizes of the xlb node.
const NODE_LIMITS: Limits = Limits {
    max_vips: 4,
    max_backends: 512,
    ring_capacity: RING_SIZE,
    conntrack_size: 1 << 16,
};
/// Map sizes of a host that only decapsulates (or passes frames through):
/// its balancer maps stay unused, so they are kept tiny.
const DECAP_LIMITS: Limits = Limits {
    max_vips: 1,
    max_backends: 1,
    ring_capacity: 1,
    conntrack_size: 256,
};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "xlb demo needs root: it creates network namespaces and loads XDP programs \
         (run it as root, e.g. `sudo target/release/xlb demo`)"
    )]
    NotRoot,
    #[error("interrupted")]
    Interrupted,
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Topology {
        context: String,
        #[source]
        source: TopologyError,
    },
    #[error("{context}: {source}")]
    Dataplane {
        context: String,
        #[source]
        source: DataplaneError,
    },
    #[error("{context}: {source}")]
    NextHop {
        context: String,
        #[source]
        source: NextHopError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The site was built but did not behave as it must.
    #[error("check failed: {0}")]
    Check(String),
}

/// Attaches a description of the step to a lower-level error.
trait Context<T> {
    fn context(self, what: impl Into<String>) -> Result<T, DemoError>;
}

trait WithContext {
    fn with(self, context: String) -> DemoError;
}

impl WithContext for TopologyError {
    fn with(self, context: String) -> DemoError {
        DemoError::Topology {
            context,
            source: self,
        }
    }
}

impl WithContext for DataplaneError {
    fn with(self, context: String) -> DemoError {
        DemoError::Dataplane {
            context,
            source: self,
        }
    }
}

impl WithContext for NextHopError {
    fn with(self, context: String) -> DemoError {
        DemoError::NextHop {
            context,
            source: self,
        }
    }
}

impl WithContext for io::Error {
    fn with(self, context: String) -> DemoError {
        DemoError::Io {
            context,
            source: self,
        }
    }
}

impl<T, E: WithContext> Context<T> for Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T, DemoError> {
        self.map_err(|err| err.with(what.into()))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Refuses early, with the reason, where the demo cannot work.
pub fn check_root() -> Result<(), DemoError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DemoError::NotRoot);
    }
    Ok(())
}

/// Set by the signal handler of [`Cancel::on_signals`].
static SIGNALLED: AtomicBool = AtomicBool::new(false);

/// A flag that long-running steps check between their parts: set by hand or
/// by SIGINT, SIGTERM or SIGHUP (see [`Cancel::on_signals`]), it makes them
/// return [`DemoError::Interrupted`], so that the site unwinds and its
/// namespaces are removed.
#[derive(Clone, Debug, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    signals: bool,
}

extern "C" fn on_signal(_signal: libc::c_int) {
    const MESSAGE: &[u8] = b"\ninterrupted: removing the demo's namespaces \
        (Ctrl-\\ quits at once; the next run cleans up then)\n";
    // Only async-signal-safe work here: an atomic swap and write(2).
    if !SIGNALLED.swap(true, Ordering::SeqCst) {
        // SAFETY: writes a static buffer of the length passed.
        unsafe { libc::write(libc::STDERR_FILENO, MESSAGE.as_ptr().cast(), MESSAGE.len()) };
    }
}

impl Cancel {
    /// A flag only [`Cancel::set`] sets (tests).
    pub fn never() -> Self {
        Self::default()
    }

    /// Catches SIGINT, SIGTERM and SIGHUP from now on, for the rest of the
    /// process: the first sets the flag, later ones are ignored so that
    /// teardown is not cut short.
    pub fn on_signals() -> io::Result<Self> {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: sigaction is plain old data; the handler only does
            // async-signal-safe work.
            let rc = unsafe {
                let mut action: libc::sigaction = zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut())
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self {
            flag: Arc::default(),
            signals: true,
        })
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst) || (self.signals && SIGNALLED.load(Ordering::SeqCst))
    }

    pub fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    pub fn check(&self) -> Result<(), DemoError> {
        if self.is_set() {
            Err(DemoError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Sleeps, waking early (with an error) when the flag is set.
    pub fn sleep(&self, duration: Duration) -> Result<(), DemoError> {
        let end = Instant::now() + duration;
        loop {
            self.check()?;
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct SiteOptions {
    /// Backends in each of the two clusters.
    pub backends_per_cluster: usize,
    pub hash_seed: u32,
    /// Namespace names start with `xlb.<tag>.`.
    pub tag: String,
    pub cancel: Cancel,
}

impl Default for SiteOptions {
    fn default() -> Self {
        Self {
            backends_per_cluster: 3,
            hash_seed: DEFAULT_HASH_SEED,
            tag: "demo".into(),
            cancel: Cancel::never(),
        }
    }
}

/// One backend of the site.
pub struct SiteBackend {
    /// Its index in the balancer's backend table.
    pub id: u32,
    /// `<cluster>-<n>`, also its namespace's host name.
    pub name: String,
    pub cluster: &'static str,
    pub addr: Ipv4Addr,
    /// MAC of its interface to the fabric: the source of its replies.
    pub mac: [u8; 6],
    pub host: Host,
    /// In the ring and marked up.
    pub up: bool,
    server: Option<Server>,
    decap: Dataplane,
}

impl SiteBackend {
    /// Global counters of this backend's decap program.
    pub fn decap_counter(&self, counter: Counter) -> Result<u64, DemoError> {
        self.decap
            .counters
            .global(counter)
            .context(format!("reading {}'s decap counters", self.name))
    }
}

/// The xlb node's counters: global verdicts and reasons, the VIP's traffic
/// and each backend's (by name), all summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCounters {
    pub global: Vec<(Counter, u64)>,
    pub vip: Traffic,
    pub backends: Vec<(String, Traffic)>,
}

impl NodeCounters {
    pub fn global(&self, counter: Counter) -> u64 {
        self.global
            .iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, v)| *v)
    }

    pub fn backend(&self, name: &str) -> Traffic {
        self.backends
            .iter()
            .find(|(n, _)| n == name)
            .map_or_else(Traffic::default, |(_, t)| *t)
    }

    /// What moved between `before` and `self`.
    pub fn since(&self, before: &NodeCounters) -> NodeCounters {
        let sub = |a: &Traffic, b: &Traffic| Traffic {
            packets: a.packets.saturating_sub(b.packets),
            bytes: a.bytes.saturating_sub(b.bytes),
            new_flows: a.new_flows.saturating_sub(b.new_flows),
        };
        NodeCounters {
            global: self
                .global
                .iter()
                .map(|(c, v)| (*c, v.saturating_sub(before.global(*c))))
                .collect(),
            vip: sub(&self.vip, &before.vip),
            backends: self
                .backends
                .iter()
                .map(|(n, t)| (n.clone(), sub(t, &before.backend(n))))
                .collect(),
        }
    }
}

/// What a backend said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub backend: String,
    pub cluster: String,
}

/// One client connection to the VIP.
#[derive(Clone, Debug)]
pub struct ConnectionResult {
    /// The client's port, once the connection was made.
    pub local_port: Option<u16>,
    pub outcome: Result<Answer, String>,
    /// Source MACs of the segments the client received on this connection.
    pub reply_macs: BTreeSet<[u8; 6]>,
    /// Answered, and every reply segment came from the answering backend's
    /// own MAC: it did not pass the xlb node.
    pub direct: bool,
}

/// The result of [`Site::connect`].
#[derive(Clone, Debug)]
pub struct Round {
    pub connections: Vec<ConnectionResult>,
    /// TCP segments the client sent to the VIP, seen on its interface.
    pub client_segments_to_vip: u64,
    /// Segments from the VIP the client received with the xlb node's MAC as
    /// source, i.e. replies that went through the node (0 with DSR).
    pub replies_via_node: u64,
    /// Frames the client-side capture lost (the comparisons above are exact
    /// only when this is 0).
    pub capture_drops: u64,
    /// What the xlb node's counters moved during the round.
    pub node: NodeCounters,
}

impl Round {
    pub fn answered(&self) -> usize {
        self.connections
            .iter()
            .filter(|c| c.outcome.is_ok())
            .count()
    }

    pub fn direct(&self) -> usize {
        self.connections.iter().filter(|c| c.direct).count()
    }

    pub fn by_backend(&self) -> BTreeMap<String, usize> {
        tally(self.answers().map(|answer| &answer.backend))
    }

    pub fn by_cluster(&self) -> BTreeMap<String, usize> {
        tally(self.answers().map(|answer| &answer.cluster))
    }

    /// The distinct errors of unanswered connections, with their counts.
    pub fn errors(&self) -> BTreeMap<String, usize> {
        tally(
            self.connections
                .iter()
                .filter_map(|c| c.outcome.as_ref().err()),
        )
    }

    fn answers(&self) -> impl Iterator<Item = &Answer> {
        self.connections
            .iter()
            .filter_map(|c| c.outcome.as_ref().ok())
    }
}

/// How often each distinct value occurs.
fn tally<'a>(values: impl Iterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for value in values {
        *counts.entry(value.clone()).or_default() += 1;
    }
    counts
}

/// The xlb node: its namespace and its data plane, shared with the task
/// that applies next-hop updates.
struct Node {
    host: Host,
    mac: [u8; 6],
    mode: AttachMode,
    dataplane: Arc<Mutex<Dataplane>>,
}

/// A client, an xlb node and two clusters of backends in namespaces.
///
/// Fields drop in order: the runtime (resolver and update tasks) first, the
/// backends' servers and programs next, the namespaces last.
pub struct Site {
    runtime: tokio::runtime::Runtime,
    /// Keeps the next-hop tracker running; it stops when this is dropped.
    _targets: watch::Sender<BTreeMap<u32, IpAddr>>,
    node: Node,
    backends: Vec<SiteBackend>,
    ring: Vec<u32>,
    vip_id: u32,
    client: Host,
    client_if: Interface,
    cancel: Cancel,
    _fabric_pass: Dataplane,
    _fabric: Bridge,
    topology: Topology,
}

fn cidr(addr: Ipv4Addr, len: u8) -> String {
    format!("{addr}/{len}")
}

/// The `i`th (from 0) backend address of cluster `c`.
fn backend_addr(c: usize, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, c as u8 + 1, i as u8 + 1)
}

impl Site {
    /// Builds the whole site and returns once the VIP is served. Anything
    /// built so far is removed if a step fails or `opts.cancel` is set.
    pub fn build(opts: SiteOptions) -> Result<Site, DemoError> {
        check_root()?;
        let n = opts.backends_per_cluster;
        if !(1..=MAX_BACKENDS_PER_CLUSTER).contains(&n) {
            return Err(DemoError::Invalid(format!(
                "backends per cluster must be 1..={MAX_BACKENDS_PER_CLUSTER}, not {n}"
            )));
        }
        let cancel = opts.cancel.clone();
        // Declared first, so dropped last: whatever fails below, the
        // namespaces go only after everything running inside them.
        let topology = Topology::new(&opts.tag).context("starting the topology")?;
        let fabric = topology
            .bridge("fabric")
            .context("creating the fabric bridge")?;

        // The client: routes the VIP via the xlb node. Its veth leaves TCP
        // checksums to "offload", a state XDP_TX frames lose: turn it off.
        let client = topology.host("client").context("creating the client")?;
        let client_link = topology
            .link(
                &client,
                &fabric,
                LinkOpts::new().addr_a(cidr(CLIENT_ADDR, FABRIC_PREFIX_LEN)),
            )
            .context("linking the client to the fabric")?;
        client
            .set_tx_checksum(&client_link.a.name, false)
            .context("turning tx checksum offload off on the client")?;
        client
            .add_route(&cidr(VIP, 32), &[NODE_ADDR.into()])
            .context("routing the VIP via the xlb node")?;
        cancel.check()?;

        // The xlb node: forwarding on (bpf_fib_lookup wants it), room for
        // the outer header.
        let node_host = topology.host(NODE_NAME).context("creating the xlb node")?;
        let node_link = topology
            .link(
                &node_host,
                &fabric,
                LinkOpts::new()
                    .addr_a(cidr(NODE_ADDR, FABRIC_PREFIX_LEN))
                    .mtu(FABRIC_MTU),
            )
            .context("linking the xlb node to the fabric")?;
        for key in [
            "net.ipv4.ip_forward".to_owned(),
            format!("net.ipv4.conf.{DEV}.forwarding"),
        ] {
            node_host
                .sysctl(&key, "1")
                .context("turning forwarding on in the xlb node")?;
        }
        // The node's XDP_TX frames land on this bridge port; a veth drops
        // XDP frames unless its receiving end has an XDP program. The decap
        // program with no tunnel endpoints passes every frame.
        let fabric_pass = load_decap(fabric.host(), &node_link.b.name, None)
            .map_err(|err| prefix(err, "the fabric port facing the xlb node"))?;
        cancel.check()?;

        let mut backends = Vec::with_capacity(2 * n);
        for (c, cluster) in CLUSTERS.iter().enumerate() {
            for i in 0..n {
                cancel.check()?;
                let id = backends.len() as u32;
                backends.push(build_backend(&topology, &fabric, id, cluster, c, i)?);
            }
        }

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("xlb-demo")
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let handle = runtime.handle().clone();
        // Loaded and attached inside the node's namespace: the interface
        // name and the netlink sockets of the resolver belong to it.
        let (mut dataplane, mode, resolver) = node_host
            .run_in(move || -> Result<_, DemoError> {
                let mut dp = Dataplane::load(NODE_LIMITS).context("loading the data plane")?;
                let mode = dp
                    .attach(Role::Balancer, DEV, AttachMode::Native)
                    .context(format!("attaching the balancer to {DEV}"))?;
                let resolver = handle
                    .block_on(NextHopResolver::new())
                    .context("opening the next-hop resolver")?
                    .with_source(NODE_ADDR.into());
                Ok((dp, mode, resolver))
            })
            .context("entering the xlb node")??;

        let (_, src) = addr_from_ip(NODE_ADDR.into());
        dataplane
            .settings
            .set(Settings {
                hash_seed: opts.hash_seed,
                src_v4: src[0],
                ..Settings::default()
            })
            .context("writing the settings")?;
        for backend in &backends {
            dataplane
                .backends
                .set(backend.id, backend_entry(backend.addr, true))
                .context(format!("programming backend {}", backend.name))?;
        }
        resolve_next_hops(&runtime, &resolver, &mut dataplane, &backends, &cancel)?;
        let ids: Vec<u32> = backends.iter().map(|b| b.id).collect();
        let ring = maglev_ring(&ids, RING_SIZE);
        dataplane
            .rings
            .write(0, &ring)
            .context("writing the VIP's ring")?;
        let vip_id = 0;
        dataplane
            .vips
            .insert(
                vip_key(),
                VipInfo {
                    id: vip_id,
                    ring_offset: 0,
                    ring_size: RING_SIZE,
                    flags: 0,
                    generation: 0,
                },
            )
            .context("programming the VIP")?;

        // From here on the resolver keeps the next hops current.
        let dataplane = Arc::new(Mutex::new(dataplane));
        let targets: BTreeMap<u32, IpAddr> = backends
            .iter()
            .map(|b| (b.id, IpAddr::V4(b.addr)))
            .collect();
        let (targets_tx, targets_rx) = watch::channel(targets);
        let (updates_tx, mut updates_rx) = mpsc::channel(64);
        runtime.spawn(resolver.track(targets_rx, updates_tx));
        let applier = Arc::clone(&dataplane);
        runtime.spawn(async move {
            while let Some((id, hop)) = updates_rx.recv().await {
                if let Err(err) = lock(&applier).set_next_hop(id, hop) {
                    log::warn!("next hop of backend {id}: {err}");
                }
            }
        });

        Ok(Site {
            runtime,
            _targets: targets_tx,
            node: Node {
                host: node_host,
                mac: node_link.a.mac,
                mode,
                dataplane,
            },
            backends,
            ring,
            vip_id,
            client,
            client_if: client_link.a,
            cancel,
            _fabric_pass: fabric_pass,
            _fabric: fabric,
            topology,
        })
    }

    pub fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(VIP, VIP_PORT)
    }

    /// Prefix of every namespace of the site (see [`Topology::leftovers`]).
    pub fn prefix(&self) -> &str {
        self.topology.prefix()
    }

    pub fn client(&self) -> &Host {
        &self.client
    }

    /// The client's interface to the fabric.
    pub fn client_interface(&self) -> &Interface {
        &self.client_if
    }

    pub fn node(&self) -> &Host {
        &self.node.host
    }

    pub fn node_mac(&self) -> [u8; 6] {
        self.node.mac
    }

    /// The mode the balancer got on the node's interface.
    pub fn node_attach_mode(&self) -> AttachMode {
        self.node.mode
    }

    /// The interface every host of the site has on the fabric.
    pub fn interface_name(&self) -> &'static str {
        DEV
    }

    pub fn backends(&self) -> &[SiteBackend] {
        &self.backends
    }

    pub fn backend(&self, name: &str) -> Option<&SiteBackend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The VIP's ring, as last written.
    pub fn ring(&self) -> &[u32] {
        &self.ring
    }

    /// The xlb node's counters now.
    pub fn counters(&self) -> Result<NodeCounters, DemoError> {
        let dp = lock(&self.node.dataplane);
        let global = dp
            .counters
            .all_global()
            .context("reading the global counters")?;
        let vip = dp
            .counters
            .vip(self.vip_id)
            .context("reading the VIP's counters")?;
        let backends = self
            .backends
            .iter()
            .map(|b| {
                dp.counters
                    .backend(b.id)
                    .map(|t| (b.name.clone(), t))
                    .context(format!("reading {}'s counters", b.name))
            })
            .collect::<Result<_, _>>()?;
        Ok(NodeCounters {
            global,
            vip,
            backends,
        })
    }

    /// Opens `count` TCP connections from the client to the VIP, one after
    /// the other, each saying `who` and reading the backend's line, while
    /// capturing the client's interface to see where replies come from.
    pub fn connect(&self, count: usize) -> Result<Round, DemoError> {
        let capture = PacketCapture::open(&self.client, &self.client_if.name)?;
        let before = self.counters()?;
        let vip = SocketAddr::V4(self.vip());
        let cancel = self.cancel.clone();
        let results = self
            .client
            .run_in(move || -> Result<Vec<_>, DemoError> {
                (0..count)
                    .map(|_| {
                        cancel.check()?;
                        Ok(connect_once(vip))
                    })
                    .collect()
            })
            .context("entering the client")??;

        // The last segments (the client's FIN and ACK) are still on their
        // way: wait until the node has counted what the client sent.
        let mut frames = Vec::new();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut sent;
        let mut node;
        loop {
            thread::sleep(Duration::from_millis(20));
            frames.extend(capture.frames().context("reading the client capture")?);
            sent = frames
                .iter()
                .filter_map(|f| f.tcp4().filter(|_| f.outgoing))
                .filter(|t| t.dst == VIP && t.dport == VIP_PORT)
                .count() as u64;
            node = self.counters()?.since(&before);
            if node.vip.packets >= sent || Instant::now() >= deadline {
                break;
            }
        }
        let capture_drops = capture.drops().context("reading the capture's drops")?;

        let mut macs: BTreeMap<u16, BTreeSet<[u8; 6]>> = BTreeMap::new();
        let mut replies_via_node = 0;
        for tcp in frames
            .iter()
            .filter(|f| !f.outgoing)
            .filter_map(Frame::tcp4)
            .filter(|t| t.src == VIP && t.sport == VIP_PORT)
        {
            macs.entry(tcp.dport).or_default().insert(tcp.smac);
            if tcp.smac == self.node.mac {
                replies_via_node += 1;
            }
        }
        let connections = results
            .into_iter()
            .map(|(local_port, outcome)| {
                let reply_macs = local_port
                    .and_then(|port| macs.remove(&port))
                    .unwrap_or_default();
                let direct = match &outcome {
                    Ok(answer) => self.backend(&answer.backend).is_some_and(|b| {
                        !reply_macs.is_empty() && reply_macs.iter().all(|m| *m == b.mac)
                    }),
                    Err(_) => false,
                };
                ConnectionResult {
                    local_port,
                    outcome,
                    reply_macs,
                    direct,
                }
            })
            .collect();
        Ok(Round {
            connections,
            client_segments_to_vip: sent,
            replies_via_node,
            capture_drops,
            node,
        })
    }

    /// Fails a backend: its server stops, it is marked down (so the
    /// connection table lets go of its flows) and the ring is rebuilt
    /// without it. Returns how many ring slots changed.
    pub fn fail_backend(&mut self, name: &str) -> Result<usize, DemoError> {
        let index = self
            .backends
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| DemoError::Invalid(format!("no backend named {name}")))?;
        if !self.backends[index].up {
            return Ok(0);
        }
        if self.backends.iter().filter(|b| b.up).count() == 1 {
            return Err(DemoError::Invalid(format!(
                "{name} is the last backend up; the demo keeps at least one"
            )));
        }
        let backend = &mut self.backends[index];
        if let Some(mut server) = backend.server.take() {
            server.stop();
        }
        backend.up = false;
        let (id, addr) = (backend.id, backend.addr);
        let up: Vec<u32> = self
            .backends
            .iter()
            .filter(|b| b.up)
            .map(|b| b.id)
            .collect();
        let ring = maglev_ring(&up, RING_SIZE);
        let moved = {
            let mut dp = lock(&self.node.dataplane);
            dp.backends
                .set(id, backend_entry(addr, false))
                .context(format!("marking {name} down"))?;
            dp.rings
                .update(0, &self.ring, &ring)
                .context("rewriting the VIP's ring")?
        };
        self.ring = ring;
        Ok(moved)
    }

    /// Drains a backend: the ring is rebuilt without it, but it stays up and
    /// keeps serving, so the connection table keeps its established flows
    /// on it. Returns how many ring slots changed.
    pub fn drain_backend(&mut self, name: &str) -> Result<usize, DemoError> {
        let backend = self
            .backends
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| DemoError::Invalid(format!("no backend named {name}")))?;
        let id = backend.id;
        let ring: Vec<u32> = {
            let rest: Vec<u32> = self
                .backends
                .iter()
                .filter(|b| b.up && b.id != id)
                .map(|b| b.id)
                .collect();
            if rest.is_empty() {
                return Err(DemoError::Invalid(format!(
                    "{name} is the last backend in the ring; the demo keeps at least one"
                )));
            }
            maglev_ring(&rest, RING_SIZE)
        };
        let moved = lock(&self.node.dataplane)
            .rings
            .update(0, &self.ring, &ring)
            .context("rewriting the VIP's ring")?;
        self.ring = ring;
        Ok(moved)
    }

    /// Attaches or detaches the decap program on every backend. Without it,
    /// encapsulated packets reach the backends' stacks as IPIP, which this
    /// kernel cannot decapsulate: only useful to look at them on the wire.
    pub fn set_decap(&mut self, on: bool) -> Result<(), DemoError> {
        for backend in &mut self.backends {
            let attached = backend.decap.attachments().next().is_some();
            if attached == on {
                continue;
            }
            let name = backend.name.clone();
            let decap = &mut backend.decap;
            backend
                .host
                .run_in(|| {
                    if on {
                        decap.attach(Role::Decap, DEV, AttachMode::Native).map(drop)
                    } else {
                        decap.detach(Role::Decap, DEV)
                    }
                })
                .context(format!("entering {name}"))?
                .context(format!("switching {name}'s decap program"))?;
        }
        Ok(())
    }

    /// Commands a user can run against the live site.
    pub fn try_commands(&self) -> Vec<(String, &'static str)> {
        let client = self.client.netns();
        let node = self.node.host.netns();
        let vip = self.vip();
        let mut commands = vec![
            (
                format!("ip netns exec {client} curl -s http://{VIP}/"),
                "one HTTP request through the VIP",
            ),
            (
                format!(
                    "ip netns exec {client} sh -c 'for i in $(seq 30); do curl -s http://{VIP}/; done | sort | uniq -c'"
                ),
                "30 requests, counted per backend",
            ),
            (
                format!("ip netns exec {client} nc {} {}", vip.ip(), vip.port()),
                "raw TCP (any netcat); the backend answers after 150 ms of silence",
            ),
            (
                format!("ip -n {node} -s link show {DEV}"),
                "the xlb node's interface: prog/xdp attached, packet counts",
            ),
        ];
        if let Some(b) = self.backends.iter().find(|b| b.up) {
            commands.push((
                format!("ip netns exec {} ss -tn", b.host.netns()),
                "a backend's connections (the VIP on lo talks to the client directly)",
            ));
        }
        commands
    }

    /// Tears the site down now and reports the first failure (dropping the
    /// site does the same but can only print it).
    pub fn close(self) -> Result<(), DemoError> {
        let Site {
            runtime,
            _targets,
            node,
            backends,
            _fabric_pass,
            topology,
            ..
        } = self;
        drop(_targets);
        drop(runtime);
        drop(node);
        drop(backends);
        drop(_fabric_pass);
        topology.close().context("removing the namespaces")
    }
}

/// Re-labels an error with the host it concerns.
fn prefix(err: DemoError, what: &str) -> DemoError {
    match err {
        DemoError::Topology { context, source } => DemoError::Topology {
            context: format!("{what}: {context}"),
            source,
        },
        DemoError::Dataplane { context, source } => DemoError::Dataplane {
            context: format!("{what}: {context}"),
            source,
        },
        other => other,
    }
}

fn vip_key() -> VipKey {
    let (family, addr) = addr_from_ip(VIP.into());
    VipKey {
        addr,
        port: VIP_PORT.to_be(),
        proto: PROTO_TCP,
        family,
    }
}

fn backend_entry(addr: Ipv4Addr, up: bool) -> Backend {
    let (_, addr) = addr_from_ip(addr.into());
    Backend {
        addr,
        family: FAMILY_V4,
        flags: if up { BACKEND_F_UP } else { 0 },
        _pad: [0; 2],
    }
}

/// Loads the data plane in `host`'s namespace and attaches the decap program
/// natively to `dev`, accepting tunnels to `endpoint` (none: pass everything).
fn load_decap(host: &Host, dev: &str, endpoint: Option<IpAddr>) -> Result<Dataplane, DemoError> {
    host.run_in(|| -> Result<Dataplane, DemoError> {
        let mut dp = Dataplane::load(DECAP_LIMITS).context("loading the data plane")?;
        if let Some(addr) = endpoint {
            dp.decap
                .add(addr)
                .context(format!("adding tunnel endpoint {addr}"))?;
        }
        dp.attach(Role::Decap, dev, AttachMode::Native)
            .context(format!("attaching the decap program to {dev}"))?;
        Ok(dp)
    })
    .context(format!("entering {}", host.name()))?
}

/// One backend: VIP on `lo`, ARP and rp_filter settings for direct server
/// return, the decap program, and the server.
fn build_backend(
    topology: &Topology,
    fabric: &Bridge,
    id: u32,
    cluster: &'static str,
    c: usize,
    i: usize,
) -> Result<SiteBackend, DemoError> {
    let name = format!("{cluster}-{}", i + 1);
    let addr = backend_addr(c, i);
    let host = topology
        .host(&name)
        .context(format!("creating backend {name}"))?;
    let link = topology
        .link(
            &host,
            fabric,
            LinkOpts::new()
                .addr_a(cidr(addr, FABRIC_PREFIX_LEN))
                .mtu(FABRIC_MTU),
        )
        .context(format!("linking {name} to the fabric"))?;
    host.add_addr("lo", &cidr(VIP, 32))
        .context(format!("adding the VIP to {name}'s lo"))?;
    // The VIP must not be announced on the fabric (only the xlb node's
    // route leads to it), and the client's packets arrive with a source
    // the strict reverse-path filter may not expect.
    let sysctls = [
        ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.all.arp_announce", "2"),
        ("net.ipv4.conf.eth0.arp_ignore", "1"),
        ("net.ipv4.conf.eth0.arp_announce", "2"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.eth0.rp_filter", "0"),
        ("net.ipv4.conf.lo.rp_filter", "0"),
    ];
    for (key, value) in sysctls {
        host.sysctl(key, value)
            .context(format!("setting {key} on {name}"))?;
    }
    let decap = load_decap(&host, DEV, Some(addr.into())).map_err(|err| prefix(err, &name))?;
    let server = Server::start(&host, &name, cluster)?;
    Ok(SiteBackend {
        id,
        name,
        cluster,
        addr,
        mac: link.a.mac,
        host,
        up: true,
        server: Some(server),
        decap,
    })
}

/// Resolves every backend's next hop through the node's resolver and writes
/// it. The first lookup of a backend makes the kernel send an ARP request;
/// lookups repeat until it is answered.
fn resolve_next_hops(
    runtime: &tokio::runtime::Runtime,
    resolver: &NextHopResolver,
    dataplane: &mut Dataplane,
    backends: &[SiteBackend],
    cancel: &Cancel,
) -> Result<(), DemoError> {
    let deadline = Instant::now() + RESOLVE_TIMEOUT;
    let mut pending: Vec<&SiteBackend> = backends.iter().collect();
    loop {
        let mut still = Vec::new();
        for backend in pending {
            let resolution = runtime
                .block_on(resolver.resolve(backend.addr.into()))
                .context(format!("resolving the next hop of {}", backend.name))?;
            match resolution {
                Resolution::Resolved(hop) => dataplane
                    .set_next_hop(backend.id, Some(hop))
                    .context(format!("writing the next hop of {}", backend.name))?,
                Resolution::Pending { .. } => still.push(backend),
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let names: Vec<&str> = still.iter().map(|b| b.name.as_str()).collect();
            return Err(DemoError::Check(format!(
                "the xlb node could not resolve the MAC of {} within {RESOLVE_TIMEOUT:?}",
                names.join(", ")
            )));
        }
        pending = still;
        cancel.sleep(Duration::from_millis(20))?;
    }
}

/// Opens one connection to the VIP, says `who` and reads the backend's line.
/// Returns the client's port (once connected) and the answer.
fn connect_once(vip: SocketAddr) -> (Option<u16>, Result<Answer, String>) {
    let mut stream = match TcpStream::connect_timeout(&vip, CONNECT_TIMEOUT) {
        Ok(stream) => stream,
        Err(err) => return (None, Err(format!("connect: {err}"))),
    };
    let port = stream.local_addr().ok().map(|a| a.port());
    let mut exchange = || -> io::Result<String> {
        stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
        stream.write_all(b"who\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    };
    let outcome = match exchange() {
        Ok(reply) => parse_answer(&reply).ok_or_else(|| format!("unexpected reply {reply:?}")),
        Err(err) => Err(format!("exchange: {err}")),
    };
    (port, outcome)
}

fn parse_answer(reply: &str) -> Option<Answer> {
    let mut words = reply.trim_end().split(' ');
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("backend"), Some(backend), Some("cluster"), Some(cluster))
            if words.next().is_none() =>
        {
            Some(Answer {
                backend: backend.to_owned(),
                cluster: cluster.to_owned(),
            })
        }
        _ => None,
    }
}

/// A backend's TCP server on VIP:80: answers every connection with
/// "backend <name> cluster <cluster>", as HTTP if asked in HTTP.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(host: &Host, name: &str, cluster: &str) -> Result<Self, DemoError> {
        let listener = host
            .run_in(|| TcpListener::bind((VIP, VIP_PORT)))
            .context(format!("entering {name}"))?
            .context(format!("binding {VIP}:{VIP_PORT} in {name}"))?;
        let line = format!("backend {name} cluster {cluster}\n");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(format!("server-{name}"))
            .spawn(move || serve(listener, line, stopped))
            .context(format!("starting {name}'s server"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting and closes the listening socket: new connections to
    /// this backend are refused from now on.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(listener: TcpListener, line: String, stop: Arc<AtomicBool>) {
    let mut poll = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: `poll` is one valid pollfd whose fd outlives the call.
        let ready = unsafe { libc::poll(&mut poll, 1, SERVER_POLL_MS) };
        if ready <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let line = line.clone();
                // One thread per connection, so a silent client does not
                // hold up the others.
                let _ = thread::Builder::new()
                    .name("server-conn".into())
                    .spawn(move || answer(stream, &line));
            }
            Err(err) => log::debug!("accept: {err}"),
        }
    }
}

const HTTP_METHODS: [&[u8]; 7] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
];

fn answer(mut stream: TcpStream, line: &str) {
    let _ = stream.set_read_timeout(Some(SERVER_PEEK));
    let _ = stream.set_write_timeout(Some(CONNECT_TIMEOUT));
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                request.extend_from_slice(&buf[..n]);
                let http = HTTP_METHODS.iter().any(|m| request.starts_with(m));
                let complete = request.windows(4).any(|w| w == b"\r\n\r\n");
                if !http || complete || request.len() > 16 * 1024 {
                    break;
                }
            }
        }
    }
    let reply = if HTTP_METHODS.iter().any(|m| request.starts_with(m)) {
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{line}",
            line.len()
        )
    } else {
        line.to_owned()
    };
    if stream.write_all(reply.as_bytes()).is_err() {
        return;
    }
    // Close gracefully: FIN first, then wait for the client's, so that
    // nothing unread turns the close into a reset.
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(CONNECT_TIMEOUT));
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// The VIP's ring over `backend_ids`, equal weights, from the controller's
/// Maglev engine (a backend's identity is its id: the demo never renumbers).
pub fn maglev_ring(backend_ids: &[u32], size: u32) -> Vec<u32> {
    let keys: Vec<[u8; 4]> = backend_ids.iter().map(|id| id.to_be_bytes()).collect();
    let members: Vec<Member<'_>> = keys
        .iter()
        .zip(backend_ids)
        .map(|(key, id)| Member::new(key, *id, 1))
        .collect();
    // Callers always pass at least one backend and a prime size.
    maglev::build(&members, size, 0).unwrap_or_default()
}

/// An AF_PACKET socket on one interface: every frame in and out, as the
/// interface sees it (after XDP on the receive side).
pub struct PacketCapture {
    fd: OwnedFd,
    ifindex: u32,
}

/// One captured frame.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Sent by this host (`PACKET_OUTGOING`), else received.
    pub outgoing: bool,
    pub data: Vec<u8>,
}

/// The fields of an Ethernet / IPv4 / TCP frame the demo looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tcp4 {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
}

impl Frame {
    /// The frame as Ethernet / IPv4 / TCP, if it is one (no VLAN tag).
    pub fn tcp4(&self) -> Option<Tcp4> {
        let d = &self.data;
        if d.len() < 14 + 20 || d[12..14] != [0x08, 0x00] || d[14] >> 4 != 4 || d[23] != 6 {
            return None;
        }
        let ihl = usize::from(d[14] & 0x0f) * 4;
        let tcp = d.get(14 + ihl..14 + ihl + 14)?;
        let mac = |at: usize| -> [u8; 6] { d[at..at + 6].try_into().unwrap_or_default() };
        let ip = |at: usize| Ipv4Addr::new(d[at], d[at + 1], d[at + 2], d[at + 3]);
        Some(Tcp4 {
            dmac: mac(0),
            smac: mac(6),
            src: ip(26),
            dst: ip(30),
            sport: u16::from_be_bytes([tcp[0], tcp[1]]),
            dport: u16::from_be_bytes([tcp[2], tcp[3]]),
            flags: tcp[13],
        })
    }
}

impl PacketCapture {
    /// Starts capturing on `dev` in `host`'s namespace.
    pub fn open(host: &Host, dev: &str) -> Result<Self, DemoError> {
        let iface = host
            .interface(dev)
            .context(format!("looking up {dev} in {}", host.name()))?;
        let ifindex = iface.ifindex;
        let fd = host
            .run_in(move || open_packet_socket(ifindex))
            .context(format!("entering {}", host.name()))?
            .context(format!("opening a packet socket on {dev}"))?;
        let capture = Self { fd, ifindex };
        // Whatever came in between socket() and bind() may be from any
        // interface: start clean.
        capture.frames().context("draining the new packet socket")?;
        capture.drops().context("reading the packet socket")?;
        Ok(capture)
    }

    /// Every frame captured since the last call, without waiting.
    pub fn frames(&self) -> io::Result<Vec<Frame>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: sockaddr_ll is plain old data.
            let mut from: libc::sockaddr_ll = unsafe { zeroed() };
            let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buffer and address point at live memory of the sizes
            // passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(frames),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(err),
                };
            }
            if from.sll_ifindex as u32 != self.ifindex {
                continue;
            }
            frames.push(Frame {
                outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
                data: buf[..n as usize].to_vec(),
            });
        }
    }

    /// Frames the kernel dropped for this socket since the last call.
    pub fn drops(&self) -> io::Result<u64> {
        // SAFETY: tpacket_stats is plain old data.
        let mut stats: libc::tpacket_stats = unsafe { zeroed() };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `stats` is live and of the size passed.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut stats).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stats.tp_drops.into())
    }
}

fn open_packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // A round's frames must all fit; root may exceed rmem_max.
    let size: libc::c_int = 8 << 20;
    // SAFETY: `size` is a live c_int of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    // SAFETY: sockaddr_ll is plain old data.
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a live sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Options of [`run`].
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub backends_per_cluster: usize,
    /// Connections per round.
    pub connections: usize,
    /// Stay up after the rounds until `cancel` is set.
    pub keep: bool,
    pub cancel: Cancel,
}

/// The demo: builds the site, runs a round of connections, fails a backend,
/// runs another, prints what happened, and removes the site.
pub fn run(opts: DemoOptions) -> Result<(), DemoError> {
    check_root()?;
    if opts.connections == 0 {
        return Err(DemoError::Invalid(
            "--connections must be at least 1".into(),
        ));
    }
    let n = opts.backends_per_cluster;
    println!(
        "xlb demo: client -> VIP {VIP}:{VIP_PORT}/tcp -> xlb node -> {} x {n} backends ({})",
        CLUSTERS.len(),
        CLUSTERS.join(", ")
    );
    let started = Instant::now();
    // Ctrl-C also reaches the `ip` commands the build runs; whatever error
    // that causes is the interruption.
    let interrupted = |err: DemoError| {
        if opts.cancel.is_set() {
            DemoError::Interrupted
        } else {
            err
        }
    };
    let mut site = Site::build(SiteOptions {
        backends_per_cluster: n,
        cancel: opts.cancel.clone(),
        ..SiteOptions::default()
    })
    .map_err(interrupted)?;
    println!(
        "site ready in {:.1} s, in namespaces {}.*: balancer in {} XDP on {NODE_NAME}/{DEV}, \
         decap XDP on {} backends, next hops resolved over netlink",
        started.elapsed().as_secs_f64(),
        site.prefix(),
        match site.node_attach_mode() {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
            AttachMode::Auto => "automatic-mode",
        },
        site.backends().len(),
    );
    let result = drive(&mut site, &opts).map_err(interrupted);
    if let Err(DemoError::Interrupted) = result {
        drop(site);
        return result;
    }
    print!("removing the namespaces... ");
    let _ = io::stdout().flush();
    let closed = site.close();
    println!("{}", if closed.is_ok() { "done" } else { "failed" });
    result.and(closed)
}

fn drive(site: &mut Site, opts: &DemoOptions) -> Result<(), DemoError> {
    let first = site.connect(opts.connections)?;
    println!();
    println!("round 1: {}", round_summary(&first, None));
    let victim = site.backends()[0].name.clone();
    let moved = site.fail_backend(&victim)?;
    println!(
        "{victim} fails: its server stops, it is marked down, and {moved} of {RING_SIZE} ring \
         slots ({:.1}%) move to the others",
        100.0 * moved as f64 / f64::from(RING_SIZE)
    );
    let second = site.connect(opts.connections)?;
    println!("round 2: {}", round_summary(&second, Some(&victim)));
    println!();
    print!("{}", spread_table(site, &first, &second));
    println!();
    print!("{}", counters_summary(site, &first, &second)?);

    let mut problems = check_round(site, &first, "round 1", None);
    problems.extend(check_round(site, &second, "round 2", Some(&victim)));
    if !problems.is_empty() {
        return Err(DemoError::Check(problems.join("; ")));
    }
    if opts.keep {
        keep_running(site)?;
    }
    Ok(())
}

fn round_summary(round: &Round, failed: Option<&str>) -> String {
    let total = round.connections.len();
    let mut s = format!(
        "{total} connections, {} answered, {} replies straight from the backend (DSR)",
        round.answered(),
        round.direct()
    );
    if let Some(name) = failed {
        let reached = round.by_backend().get(name).copied().unwrap_or(0);
        let _ = write!(s, ", {reached} reached {name}");
    }
    for (err, count) in round.errors() {
        let _ = write!(s, "\n  {count} failed: {err}");
    }
    s
}

fn spread_table(site: &Site, first: &Round, second: &Round) -> String {
    let (one, two) = (first.by_backend(), second.by_backend());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<10} {:<12} {:>8} {:>8}   {:>12} {:>10}",
        "backend", "address", "round 1", "round 2", "xlb packets", "new flows"
    );
    for b in site.backends() {
        let traffic = |r: &Round| r.node.backend(&b.name);
        let (t1, t2) = (traffic(first), traffic(second));
        let round2 = if b.up {
            two.get(&b.name).copied().unwrap_or(0).to_string()
        } else {
            format!("down {}", two.get(&b.name).copied().unwrap_or(0))
        };
        let _ = writeln!(
            s,
            "{:<10} {:<12} {:>8} {:>8}   {:>12} {:>10}",
            b.name,
            b.addr.to_string(),
            one.get(&b.name).copied().unwrap_or(0),
            round2,
            t1.packets + t2.packets,
            t1.new_flows + t2.new_flows,
        );
    }
    let (c1, c2) = (first.by_cluster(), second.by_cluster());
    for cluster in CLUSTERS {
        let _ = writeln!(
            s,
            "{:<23} {:>8} {:>8}",
            format!("cluster {cluster}"),
            c1.get(cluster).copied().unwrap_or(0),
            c2.get(cluster).copied().unwrap_or(0),
        );
    }
    s
}

fn counters_summary(site: &Site, first: &Round, second: &Round) -> Result<String, DemoError> {
    let vip_packets = first.node.vip.packets + second.node.vip.packets;
    let sent = first.client_segments_to_vip + second.client_segments_to_vip;
    let via_node = first.replies_via_node + second.replies_via_node;
    let all = site.counters()?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "xlb node: forwarded {vip_packets} packets for the VIP ({:.1} KB, {} new flows); the client \
         sent {sent} segments to the VIP; {via_node} replies came back through the node",
        (first.node.vip.bytes + second.node.vip.bytes) as f64 / 1000.0,
        first.node.vip.new_flows + second.node.vip.new_flows,
    );
    let nonzero: Vec<String> = all
        .global
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(c, v)| format!("{} {v}", c.name()))
        .collect();
    let _ = writeln!(s, "counters: {}", nonzero.join(", "));
    Ok(s)
}

/// What must hold for a round; each problem as one sentence.
pub fn check_round(site: &Site, round: &Round, label: &str, failed: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    let total = round.connections.len();
    if round.answered() != total {
        problems.push(format!(
            "{label}: {} of {total} connections unanswered",
            total - round.answered()
        ));
    }
    if round.direct() != round.answered() {
        problems.push(format!(
            "{label}: {} answered connections had replies not straight from their backend",
            round.answered() - round.direct()
        ));
    }
    if round.replies_via_node != 0 {
        problems.push(format!(
            "{label}: {} reply segments came from the xlb node's MAC",
            round.replies_via_node
        ));
    }
    if round.capture_drops == 0 && round.node.vip.packets != round.client_segments_to_vip {
        problems.push(format!(
            "{label}: the client sent {} segments to the VIP but the xlb node forwarded {}",
            round.client_segments_to_vip, round.node.vip.packets
        ));
    }
    if let Some(name) = failed {
        if let Some(count) = round.by_backend().get(name) {
            problems.push(format!(
                "{label}: {count} connections reached {name}, which is down"
            ));
        }
    } else if total >= 20 && round.by_cluster().len() < CLUSTERS.len() {
        problems.push(format!(
            "{label}: only clusters {:?} answered",
            round.by_cluster().keys().collect::<Vec<_>>()
        ));
    }
    let misattributed = round
        .connections
        .iter()
        .filter_map(|c| c.outcome.as_ref().ok())
        .filter(|a| {
            site.backend(&a.backend)
                .is_none_or(|b| b.cluster != a.cluster)
        })
        .count();
    if misattributed > 0 {
        problems.push(format!(
            "{label}: {misattributed} answers named a backend or cluster the site does not have"
        ));
    }
    problems
}

/// Leaves the site up, printing how to use it and, every two seconds, the
/// new flows the xlb node saw.
fn keep_running(site: &Site) -> Result<(), DemoError> {
    println!();
    println!("The site stays up until Ctrl-C. Try, as root:");
    for (command, what) in site.try_commands() {
        println!("  {command}");
        println!("      # {what}");
    }
    println!("New flows through the xlb node are reported below.");
    let mut last = site.counters()?;
    loop {
        if site.cancel.sleep(Duration::from_secs(2)).is_err() {
            return Ok(());
        }
        let now = site.counters()?;
        let delta = now.since(&last);
        if delta.vip.new_flows > 0 {
            let per: Vec<String> = delta
                .backends
                .iter()
                .filter(|(_, t)| t.new_flows > 0)
                .map(|(n, t)| format!("{n} +{}", t.new_flows))
                .collect();
            println!("  +{} new flows: {}", delta.vip.new_flows, per.join(", "));
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        assert_eq!(
            parse_answer("backend east-1 cluster east\n"),
            Some(Answer {
                backend: "east-1".into(),
                cluster: "east".into()
            })
        );
        assert_eq!(parse_answer("HTTP/1.0 200 OK"), None);
        assert_eq!(parse_answer("backend a cluster b c"), None);
    }

    #[test]
    fn frames_parse_as_tcp4() {
        let mut d = vec![0u8; 14 + 20 + 20];
        d[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        d[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        d[12..14].copy_from_slice(&[0x08, 0x00]);
        d[14] = 0x45;
        d[23] = 6;
        d[26..30].copy_from_slice(&[198, 18, 0, 2]);
        d[30..34].copy_from_slice(&[198, 18, 100, 1]);
        d[34..36].copy_from_slice(&40000u16.to_be_bytes());
        d[36..38].copy_from_slice(&80u16.to_be_bytes());
        d[47] = 0x02;
        let frame = Frame {
            outgoing: true,
            data: d,
        };
        let t = frame.tcp4().unwrap();
        assert_eq!((t.src, t.dst), (CLIENT_ADDR, VIP));
        assert_eq!((t.sport, t.dport, t.flags), (40000, 80, 0x02));
        assert_eq!((t.dmac, t.smac), ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]));
        let short = Frame {
            outgoing: false,
            data: frame.data[..40].to_vec(),
        };
        assert_eq!(short.tcp4(), None);
    }
}
