//! `xlb demo`: a small active-active site in network namespaces, with real
//! TCP and UDP traffic through two xlb nodes, each running the real daemon.
//!
//! [`Site::build`] creates, on one L2 fabric (a bridge in its own namespace):
//! a client, two xlb nodes and two clusters ("east", "west") of backends.
//! Each node runs `xlb run` (its own process, with a config the site writes,
//! its maps pinned on a bpffs the site mounts), so the balancer, its rings
//! and its next hops are the daemon's, exactly as deployed. The client
//! reaches the VIP over an ECMP route through both nodes, hashed on the
//! 5-tuple (`fib_multipath_hash_policy = 1`), so both nodes serve at once.
//! Each backend holds the VIP on `lo`, strips the IPIP header with xlb's
//! decap program and answers with one line saying who it is, straight to
//! the client (direct server return). Every host also has an IPv6 address:
//! the VIPs [`WEB6`] (IPv6) and [`WEB46`] (IPv4, port 81) are served by the
//! backends' IPv6 addresses, UDP port 53 of the IPv4 VIP by their IPv4 ones.
//! The settings direct server return
//! needs on veth (see ENVIRONMENT.md) are all made here: MTU 1600 on the
//! encapsulating hops, tx checksum offload off on the client, forwarding on
//! in the nodes, an XDP program on the bridge ports that receive the nodes'
//! XDP_TX frames, arp_ignore / arp_announce and rp_filter on the backends.
//!
//! The daemons probe every backend themselves (HTTP, TCP and UDP, on the
//! backends' own addresses): the site fails a backend only by stopping its
//! servers and then waits, bounded, until both daemons' status shows it
//! down ([`Site::fail_backend`], [`Detection`]).
//!
//! The same [`Site`] backs the end-to-end tests; [`run`] is the demo itself.
//! Everything lives in namespaces of a [`Topology`] and in one scratch
//! directory, removed when the site is dropped or closed, also on Ctrl-C
//! (see [`Cancel`]); [`Footprint`] lists whatever would be left.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt::{self, Write as _};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener,
    TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use lb_common::Counter;

use crate::api::{ApiError, Client, HealthState, Request, Response, Status};
use crate::dataplane::{AttachMode, Dataplane, DataplaneError, Limits, Role};
use crate::topology::{Bridge, Host, Interface, LinkOpts, Spawned, Topology, TopologyError};

/// The service every backend offers: TCP on [`VIP_PORT`], UDP on
/// [`UDP_PORT`], both through the balancer.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const VIP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
/// The daemons' names of the two VIPs.
pub const TCP_VIP_NAME: &str = "web";
pub const UDP_VIP_NAME: &str = "echo";
/// The IPv6 VIP, served by the backends' IPv6 addresses.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
/// The port of the IPv4 VIP that the backends' IPv6 addresses serve.
pub const MIXED_PORT: u16 = 81;

/// A TCP service of the site: its VIP's name in the daemons and where the
/// client reaches it.
#[derive(Clone, Copy, Debug)]
pub struct Service {
    pub name: &'static str,
    pub addr: SocketAddr,
}

/// IPv4 VIP, IPv4 backends (IPIP).
pub const WEB: Service = Service {
    name: TCP_VIP_NAME,
    addr: SocketAddr::V4(SocketAddrV4::new(VIP, VIP_PORT)),
};
/// IPv6 VIP, IPv6 backends (IPv6 in IPv6).
pub const WEB6: Service = Service {
    name: "web6",
    addr: SocketAddr::V6(SocketAddrV6::new(VIP6, VIP_PORT, 0, 0)),
};
/// IPv4 VIP, IPv6 backends (IPv4 in IPv6).
pub const WEB46: Service = Service {
    name: "web46",
    addr: SocketAddr::V4(SocketAddrV4::new(VIP, MIXED_PORT)),
};
const TCP_SERVICES: [Service; 3] = [WEB, WEB6, WEB46];

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// The xlb nodes: namespace names and fabric addresses.
pub const NODES: [(&str, Ipv4Addr); 2] = [
    ("xlb1", Ipv4Addr::new(198, 18, 0, 3)),
    ("xlb2", Ipv4Addr::new(198, 18, 0, 4)),
];
/// The nodes' IPv6 addresses, in the order of [`NODES`].
pub const NODES_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3),
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 4),
];
/// The fabric's IPv6 subnet, fd00::/64; cluster k's backends at
/// fd00::(k+1):(i+1).
const FABRIC_PREFIX_LEN6: u8 = 64;
/// The fabric's subnet, 198.18.0.0/22: client and nodes in 198.18.0.0/24,
/// cluster k's backends in 198.18.(k+1).0/24. The VIP lies outside it.
const FABRIC_PREFIX_LEN: u8 = 22;
pub const CLUSTERS: [&str; 2] = ["east", "west"];
pub const MAX_BACKENDS_PER_CLUSTER: usize = 250;
/// Maglev ring size of each VIP: a prime well above 100 times the backends.
pub const RING_SIZE: u32 = 65537;
/// MTU of every link an encapsulated packet crosses: room for the 20-byte
/// outer IPv4 header (or 40-byte IPv6 one) on top of the client's 1500.
pub const FABRIC_MTU: u32 = 1600;
/// Every host's interface to the fabric.
const DEV: &str = "eth0";
const DEFAULT_HASH_SEED: u32 = 0x786c_6221;

/// How long one client connection may take, per step.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a backend waits for a client to speak first (an HTTP request
/// gets an HTTP answer); silent clients such as `nc` get the bare line.
const SERVER_PEEK: Duration = Duration::from_millis(150);
/// How long a held connection may stay silent before its backend closes it.
const HOLD_IDLE: Duration = Duration::from_secs(120);
/// How often a backend's accept loop looks at its stop flag.
const SERVER_POLL_MS: i32 = 50;
/// How long a daemon may take to answer on its socket after its start, and
/// its next hops to resolve (ARP on a veth answers in microseconds; these
/// only bound a broken setup).
const START_TIMEOUT: Duration = Duration::from_secs(30);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a round waits for its last segments (FIN, ACK) to be counted.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The daemons' health probes, by the kind of the VIP's own: each probe
/// goes to a backend's own address on its VIP's port, so every backend is
/// probed by HTTP on port 80 (IPv4 and IPv6), by a TCP connect on port 81
/// and by UDP on port 53. The intervals are short, so that a demo round
/// waits about a second for a change to be noticed: `fall` failed probes
/// in a row take a backend out, `rise` passes bring it back.
const HTTP_PROBE: &str = "kind = \"http\"\npath = \"/\"\nbody = \"backend \"";
const TCP_PROBE: &str = "kind = \"tcp\"";
const UDP_PROBE: &str = "kind = \"udp\"\nexpect = \"backend \"";
/// Seconds between probes; also each probe's timeout.
pub const PROBE_INTERVAL: f64 = 0.5;
pub const PROBE_FALL: u32 = 2;
pub const PROBE_RISE: u32 = 2;
/// How long the site waits for both daemons to notice a failure or a
/// recovery: many times what the probes need (fall or rise intervals plus
/// jitter and a timeout), for a loaded machine; beyond it, the probes are
/// broken.
const DETECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The demo fails up to two thirds of the site on purpose. Below the
/// default panic threshold (half the backends healthy) a VIP balances over
/// every enabled backend, failed ones included, which would hide what the
/// demo shows; a quarter keeps panic for real disasters.
const PANIC_THRESHOLD: f64 = 0.25;

/// Map sizes of the xlb nodes (four VIPs).
const NODE_LIMITS: Limits = Limits {
    max_vips: 8,
    max_backends: 2048,
    ring_capacity: 4 * RING_SIZE,
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
    #[error("xlb demo needs {feature}: {detail}")]
    Unsupported {
        feature: &'static str,
        detail: String,
    },
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
    Api {
        context: String,
        #[source]
        source: ApiError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A daemon refused a request or did not come up.
    #[error("{node}: {message}")]
    Daemon { node: String, message: String },
    /// A daemon's health probes did not notice a failure or a recovery.
    #[error("{node}'s health probes did not notice {what} within {waited:?}: {detail}")]
    Undetected {
        node: String,
        what: String,
        waited: Duration,
        detail: String,
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

impl WithContext for ApiError {
    fn with(self, context: String) -> DemoError {
        DemoError::Api {
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

/// Refuses early, with the reason, where the demo cannot work: without root,
/// without `ip` (iproute2), or on a kernel without network namespaces, BTF
/// or multipath routing.
pub fn check_prerequisites() -> Result<(), DemoError> {
    check_root()?;
    let needs = [
        (
            "/proc/self/ns/net",
            "network namespaces",
            "a kernel with CONFIG_NET_NS",
        ),
        (
            "/sys/kernel/btf/vmlinux",
            "kernel BTF",
            "a kernel with CONFIG_DEBUG_INFO_BTF (the balancer's maps are BTF maps)",
        ),
        (
            "/proc/sys/net/ipv4/fib_multipath_hash_policy",
            "multipath routing",
            "a kernel with CONFIG_IP_ROUTE_MULTIPATH (the client's ECMP route over both nodes)",
        ),
    ];
    for (path, feature, detail) in needs {
        if !Path::new(path).exists() {
            return Err(DemoError::Unsupported {
                feature,
                detail: format!("{path} is missing; run it on {detail}"),
            });
        }
    }
    let ip = std::process::Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !ip.is_ok_and(|s| s.success()) {
        return Err(DemoError::Unsupported {
            feature: "iproute2",
            detail: "`ip` did not run; install it (Debian: apt-get install iproute2)".into(),
        });
    }
    Ok(())
}

/// Refuses without root.
pub fn check_root() -> Result<(), DemoError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DemoError::NotRoot);
    }
    Ok(())
}

/// What to build.
#[derive(Clone, Debug)]
pub struct SiteOptions {
    /// The `xlb` binary the nodes run as their daemon.
    pub xlb: PathBuf,
    /// Backends in each of the two clusters.
    pub backends_per_cluster: usize,
    pub hash_seed: u32,
    /// Namespace names start with `xlb.<tag>.`.
    pub tag: String,
    pub cancel: Cancel,
    /// The MTU of the client's link (default: the kernel's 1500). At the
    /// fabric's MTU, the client's full-size packets no longer fit once
    /// encapsulated, and the nodes answer them with ICMP too-big.
    pub client_mtu: Option<u32>,
}

impl SiteOptions {
    /// Three backends per cluster, the default seed, tag `demo`.
    pub fn new(xlb: impl Into<PathBuf>) -> Self {
        Self {
            xlb: xlb.into(),
            backends_per_cluster: 3,
            hash_seed: DEFAULT_HASH_SEED,
            tag: "demo".into(),
            cancel: Cancel::never(),
            client_mtu: None,
        }
    }
}

/// One backend of the site.
pub struct SiteBackend {
    /// `<cluster>-<n>`, also its namespace's host name and its name in the
    /// daemons' configs.
    pub name: String,
    pub cluster: &'static str,
    pub addr: Ipv4Addr,
    /// Its IPv6 address: the VIPs [`WEB6`] and [`WEB46`] use it.
    pub addr6: Ipv6Addr,
    /// MAC of its interface to the fabric: the source of its replies.
    pub mac: [u8; 6],
    pub host: Host,
    /// Its servers run (the site fails and recovers backends by stopping
    /// and starting them; the daemons' probes notice).
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

/// One xlb node: its namespace and its daemon.
pub struct SiteNode {
    pub name: &'static str,
    pub addr: Ipv4Addr,
    /// MAC of its interface to the fabric: the source of what it forwards.
    pub mac: [u8; 6],
    pub host: Host,
    config: PathBuf,
    socket: PathBuf,
    dir: PathBuf,
    daemon: Option<Spawned>,
    starts: u32,
}

impl SiteNode {
    /// The daemon's control socket (`xlb --socket PATH status`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's config file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The process id of the running daemon.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Spawned::pid)
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.join(format!("daemon-{start}.log"))
    }

    /// Everything the daemon logged, over all its starts.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for k in 1..=self.starts {
            let _ = writeln!(out, "--- {} daemon run {k}:", self.name);
            out.push_str(&fs::read_to_string(self.log_path(k)).unwrap_or_default());
        }
        out
    }

    /// Starts `xlb run` in the node's namespace and returns once its control
    /// API answers.
    fn start(&mut self, xlb: &Path, cancel: &Cancel) -> Result<(), DemoError> {
        if self.daemon.is_some() {
            return Ok(());
        }
        self.starts += 1;
        let log = self.log_path(self.starts);
        let file = fs::File::create(&log).context(format!("creating {}", log.display()))?;
        let err_file = file
            .try_clone()
            .context(format!("opening {}", log.display()))?;
        let mut command = self.host.command(xlb);
        command
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file);
        let process = self
            .host
            .spawn(&mut command)
            .context(format!("starting xlb run on {}", self.name))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            cancel.check()?;
            if let Some(status) = process
                .try_wait()
                .context(format!("polling {}'s daemon", self.name))?
            {
                return Err(DemoError::Daemon {
                    node: self.name.into(),
                    message: format!("xlb run exited at start ({status}):\n{}", self.logs()),
                });
            }
            if Client::connect(&self.socket)
                .and_then(|mut c| c.call(&Request::Status))
                .is_ok()
            {
                break;
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Daemon {
                    node: self.name.into(),
                    message: format!(
                        "xlb run did not answer within {START_TIMEOUT:?}:\n{}",
                        self.logs()
                    ),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.daemon = Some(process);
        Ok(())
    }

    /// Stops the daemon as an operator would (SIGTERM): the balancer stays
    /// attached with its pinned maps and keeps forwarding.
    fn stop(&mut self) -> Result<(), DemoError> {
        let Some(process) = self.daemon.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(process.pid()).unwrap_or(libc::pid_t::MAX);
        // SAFETY: plain kill(2) of the child this site started and has not
        // reaped (so the id is still its own).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = process
                .try_wait()
                .context(format!("polling {}'s daemon", self.name))?
            {
                if !status.success() {
                    return Err(DemoError::Daemon {
                        node: self.name.into(),
                        message: format!("xlb run exited with {status}:\n{}", self.logs()),
                    });
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                // Dropping `process` kills it.
                return Err(DemoError::Daemon {
                    node: self.name.into(),
                    message: format!("xlb run did not stop within {STOP_TIMEOUT:?}"),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// One request to the daemon; a refusal is an error.
    pub fn call(&self, request: &Request) -> Result<Response, DemoError> {
        let response = Client::connect(&self.socket)
            .and_then(|mut c| c.call(request))
            .context(format!("asking {}'s daemon", self.name))?;
        match response {
            Response::Error { message } => Err(DemoError::Daemon {
                node: self.name.into(),
                message,
            }),
            other => Ok(other),
        }
    }

    pub fn status(&self) -> Result<Status, DemoError> {
        match self.call(&Request::Status)? {
            Response::Status { status } => Ok(*status),
            other => Err(DemoError::Daemon {
                node: self.name.into(),
                message: format!("status answered {other:?}"),
            }),
        }
    }

    /// The node's counters now, as `xlb status` reports them.
    pub fn counters(&self) -> Result<NodeCounters, DemoError> {
        let status = self.status()?;
        let mut counters = NodeCounters {
            global: status.counters.clone(),
            ..NodeCounters::default()
        };
        for vip in &status.vips {
            counters.vips.insert(vip.name.clone(), vip.packets);
            for b in &vip.backends {
                *counters.backends.entry(b.name.clone()).or_default() += b.packets;
            }
        }
        Ok(counters)
    }

    /// Waits until the node's kernel knows the MAC of every address in
    /// `addrs`: the daemon's next-hop resolver asks for them at start.
    fn wait_for_neighbours(&self, addrs: &[IpAddr], cancel: &Cancel) -> Result<(), DemoError> {
        let deadline = Instant::now() + RESOLVE_TIMEOUT;
        loop {
            cancel.check()?;
            let out = self
                .host
                .ip(["neigh", "show", "dev", DEV])
                .context(format!("listing {}'s neighbours", self.name))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let missing: Vec<String> = addrs
                .iter()
                .map(ToString::to_string)
                .filter(|a| {
                    !text.lines().any(|line| {
                        line.split(' ').next() == Some(a.as_str()) && line.contains(" lladdr ")
                    })
                })
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Daemon {
                    node: self.name.into(),
                    message: format!(
                        "the daemon did not resolve the MAC of {} within {RESOLVE_TIMEOUT:?}:\n{}",
                        missing.join(", "),
                        self.logs()
                    ),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One node's counters as `xlb status` shows them: the global verdict and
/// reason counters that are not zero, packets per VIP and per backend
/// (summed over the VIPs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCounters {
    pub global: BTreeMap<String, u64>,
    pub vips: BTreeMap<String, u64>,
    pub backends: BTreeMap<String, u64>,
}

impl NodeCounters {
    pub fn global(&self, counter: Counter) -> u64 {
        self.global.get(counter.name()).copied().unwrap_or(0)
    }

    /// Packets the node forwarded for a VIP (by name).
    pub fn vip(&self, name: &str) -> u64 {
        self.vips.get(name).copied().unwrap_or(0)
    }

    /// Packets the node sent to a backend.
    pub fn backend(&self, name: &str) -> u64 {
        self.backends.get(name).copied().unwrap_or(0)
    }

    /// What moved between `before` and `self`.
    pub fn since(&self, before: &NodeCounters) -> NodeCounters {
        let sub = |now: &BTreeMap<String, u64>, then: &BTreeMap<String, u64>| {
            now.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.saturating_sub(then.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect()
        };
        NodeCounters {
            global: sub(&self.global, &before.global),
            vips: sub(&self.vips, &before.vips),
            backends: sub(&self.backends, &before.backends),
        }
    }

    /// The sum of several nodes' counters.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a NodeCounters>) -> NodeCounters {
        let mut total = NodeCounters::default();
        for c in all {
            for (into, from) in [
                (&mut total.global, &c.global),
                (&mut total.vips, &c.vips),
                (&mut total.backends, &c.backends),
            ] {
                for (k, v) in from {
                    *into.entry(k.clone()).or_default() += v;
                }
            }
        }
        total
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
    /// The xlb node the client's segments went to (by their destination
    /// MAC), as the client's ECMP route chose it.
    pub node: Option<&'static str>,
    /// Source MACs of the segments the client received on this connection.
    pub reply_macs: BTreeSet<[u8; 6]>,
    /// Answered, and every reply segment came from the answering backend's
    /// own MAC: it did not pass an xlb node.
    pub direct: bool,
}

/// The result of [`Site::connect`].
#[derive(Clone, Debug)]
pub struct Round {
    /// The VIP's name in the daemons.
    pub service: &'static str,
    pub connections: Vec<ConnectionResult>,
    /// TCP segments the client sent to the VIP, seen on its interface.
    pub client_segments_to_vip: u64,
    /// Segments from the VIP the client received with an xlb node's MAC as
    /// source, i.e. replies that went through a node (0 with DSR).
    pub replies_via_node: u64,
    /// Frames the client-side capture lost (the comparisons above are exact
    /// only when this is 0).
    pub capture_drops: u64,
    /// What each node's counters moved during the round, by node name.
    pub nodes: BTreeMap<&'static str, NodeCounters>,
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
        tally(self.answers().map(|answer| answer.backend.clone()))
    }

    pub fn by_cluster(&self) -> BTreeMap<String, usize> {
        tally(self.answers().map(|answer| answer.cluster.clone()))
    }

    /// Answered connections per xlb node that carried them.
    pub fn by_node(&self) -> BTreeMap<String, usize> {
        tally(
            self.connections
                .iter()
                .filter(|c| c.outcome.is_ok())
                .filter_map(|c| c.node.map(str::to_owned)),
        )
    }

    /// The distinct errors of unanswered connections, with their counts.
    pub fn errors(&self) -> BTreeMap<String, usize> {
        tally(
            self.connections
                .iter()
                .filter_map(|c| c.outcome.as_ref().err().cloned()),
        )
    }

    /// Both nodes' counters together.
    pub fn total(&self) -> NodeCounters {
        NodeCounters::sum(self.nodes.values())
    }

    fn answers(&self) -> impl Iterator<Item = &Answer> {
        self.connections
            .iter()
            .filter_map(|c| c.outcome.as_ref().ok())
    }
}

/// How often each distinct value occurs.
fn tally(values: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for value in values {
        *counts.entry(value).or_default() += 1;
    }
    counts
}

/// The site's scratch directory (configs, sockets, state files, logs) with
/// a private bpffs for the daemons' pins inside: unmounted and removed on
/// drop, also while unwinding.
struct Scratch {
    dir: PathBuf,
    bpffs: Option<PathBuf>,
}

impl Scratch {
    fn new(prefix: &str) -> Result<Self, DemoError> {
        let dir = std::env::temp_dir().join(prefix);
        fs::create_dir_all(&dir).context(format!("creating {}", dir.display()))?;
        let mut scratch = Self { dir, bpffs: None };
        let at = scratch.dir.join("bpf");
        fs::create_dir_all(&at).context(format!("creating {}", at.display()))?;
        let target = CString::new(at.as_os_str().as_bytes())
            .map_err(|_| DemoError::Invalid(format!("{} holds a NUL byte", at.display())))?;
        // SAFETY: NUL-terminated strings that outlive the call; bpffs takes
        // no data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context(format!(
                "mount -t bpf bpf {} (the daemons' pins)",
                at.display()
            ));
        }
        scratch.bpffs = Some(at);
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(at) = self.bpffs.take()
            && let Ok(target) = CString::new(at.as_os_str().as_bytes())
        {
            // SAFETY: a NUL-terminated path that outlives the call. Lazily,
            // so that a descriptor still open does not keep it mounted.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!("umount {}: {}", at.display(), io::Error::last_os_error());
            }
        }
        if let Err(err) = fs::remove_dir_all(&self.dir) {
            eprintln!("removing {}: {err}", self.dir.display());
        }
    }
}

fn mounted(path: &Path) -> bool {
    fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts
            .lines()
            .any(|line| line.split(' ').nth(1) == path.to_str())
    })
}

/// Everything a site put on the machine, to check after teardown that none
/// of it is left: namespaces (with every link, address, route and XDP
/// program, which live only inside them), the scratch directory, the bpffs
/// holding the pins, and the daemon processes.
#[derive(Clone, Debug)]
pub struct Footprint {
    pub prefix: String,
    pub scratch: PathBuf,
    pub bpffs: PathBuf,
    pub pids: Vec<u32>,
}

impl Footprint {
    /// What is still there, one line each; empty after a clean teardown.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = Topology::leftovers(&self.prefix)
            .unwrap_or_else(|err| vec![format!("cannot list namespaces: {err}")])
            .into_iter()
            .map(|ns| format!("namespace {ns}"))
            .collect();
        if mounted(&self.bpffs) {
            left.push(format!("bpffs mounted at {}", self.bpffs.display()));
        }
        if self.scratch.exists() {
            left.push(format!("directory {}", self.scratch.display()));
        }
        for pid in &self.pids {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(*pid as libc::pid_t, 0) } == 0 {
                left.push(format!("process {pid}"));
            }
        }
        left
    }
}

/// A client, two xlb nodes and two clusters of backends in namespaces.
///
/// Fields drop in order: the daemons first, the backends' servers and
/// programs next, the namespaces, then the pins and the files.
pub struct Site {
    nodes: Vec<SiteNode>,
    backends: Vec<SiteBackend>,
    client: Host,
    client_if: Interface,
    xlb: PathBuf,
    cancel: Cancel,
    pids: Vec<u32>,
    _fabric_pass: Vec<Dataplane>,
    _fabric: Bridge,
    topology: Topology,
    scratch: Scratch,
}

fn cidr(addr: impl Into<IpAddr>, len: u8) -> String {
    let addr = addr.into();
    format!("{addr}/{len}")
}

/// The `i`th (from 0) backend addresses of cluster `c`.
fn backend_addrs(c: usize, i: usize) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(198, 18, c as u8 + 1, i as u8 + 1),
        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, c as u16 + 1, i as u16 + 1),
    )
}

impl Site {
    /// Builds the whole site and returns once both daemons serve the VIPs
    /// and know every backend's MAC. Anything built so far is removed if a
    /// step fails or `opts.cancel` is set.
    pub fn build(opts: SiteOptions) -> Result<Site, DemoError> {
        check_prerequisites()?;
        let n = opts.backends_per_cluster;
        if !(1..=MAX_BACKENDS_PER_CLUSTER).contains(&n) {
            return Err(DemoError::Invalid(format!(
                "backends per cluster must be 1..={MAX_BACKENDS_PER_CLUSTER}, not {n}"
            )));
        }
        let cancel = opts.cancel.clone();
        let topology = Topology::new(&opts.tag).context("starting the topology")?;
        let scratch = Scratch::new(topology.prefix())?;
        let fabric = topology
            .bridge("fabric")
            .context("creating the fabric bridge")?;

        // The client: routes the VIP over both xlb nodes, hashing on the
        // 5-tuple so that each connection keeps its path. Its veth leaves
        // TCP checksums to "offload", a state XDP_TX frames lose: off.
        let client = topology.host("client").context("creating the client")?;
        let mut client_link_opts = LinkOpts::new().addr_a(cidr(CLIENT_ADDR, FABRIC_PREFIX_LEN));
        if let Some(mtu) = opts.client_mtu {
            client_link_opts = client_link_opts.mtu(mtu);
        }
        let client_link = topology
            .link(&client, &fabric, client_link_opts)
            .context("linking the client to the fabric")?;
        client
            .set_tx_checksum(&client_link.a.name, false)
            .context("turning tx checksum offload off on the client")?;
        client
            .sysctl("net.ipv4.fib_multipath_hash_policy", "1")
            .context("hashing the client's ECMP route on the 5-tuple")?;
        let gateways: Vec<IpAddr> = NODES.iter().map(|(_, a)| IpAddr::V4(*a)).collect();
        client
            .add_route(&cidr(VIP, 32), &gateways)
            .context("routing the VIP over both xlb nodes")?;
        client
            .add_addr(&client_link.a.name, &cidr(CLIENT_ADDR6, FABRIC_PREFIX_LEN6))
            .context("giving the client its IPv6 address")?;
        client
            .sysctl("net.ipv6.fib_multipath_hash_policy", "1")
            .context("hashing the client's IPv6 ECMP route on the 5-tuple")?;
        let gateways6: Vec<IpAddr> = NODES_V6.iter().map(|a| IpAddr::V6(*a)).collect();
        client
            .add_route(&cidr(VIP6, 128), &gateways6)
            .context("routing the IPv6 VIP over both xlb nodes")?;
        cancel.check()?;

        let mut backends = Vec::with_capacity(2 * n);
        for (c, cluster) in CLUSTERS.iter().enumerate() {
            for i in 0..n {
                cancel.check()?;
                backends.push(build_backend(&topology, &fabric, cluster, c, i)?);
            }
        }

        let bpffs = scratch.bpffs.clone().unwrap_or_default();
        let mut nodes = Vec::new();
        let mut fabric_pass = Vec::new();
        for ((name, addr), addr6) in NODES.into_iter().zip(NODES_V6) {
            cancel.check()?;
            let (node, pass) = build_node(
                &topology,
                &fabric,
                name,
                (addr, addr6),
                &scratch.dir,
                &bpffs,
                &node_vips(&backends),
                opts.hash_seed,
            )?;
            nodes.push(node);
            fabric_pass.push(pass);
        }
        let mut site = Site {
            nodes,
            backends,
            client,
            client_if: client_link.a,
            xlb: opts.xlb,
            cancel,
            pids: Vec::new(),
            _fabric_pass: fabric_pass,
            _fabric: fabric,
            topology,
            scratch,
        };
        for k in 0..site.nodes.len() {
            site.start_daemon(k)?;
        }
        Ok(site)
    }

    /// Starts node `k`'s daemon (again) and waits until it serves, has
    /// resolved the backends' MACs and its probes have found the backends
    /// that are down.
    pub fn start_daemon(&mut self, k: usize) -> Result<(), DemoError> {
        let (xlb, cancel) = (self.xlb.clone(), self.cancel.clone());
        self.node_mut(k)?.start(&xlb, &cancel)?;
        self.pids.extend(self.nodes[k].daemon_pid());
        let addrs: Vec<IpAddr> = self
            .backends
            .iter()
            .flat_map(|b| [IpAddr::V4(b.addr), IpAddr::V6(b.addr6)])
            .collect();
        self.nodes[k].wait_for_neighbours(&addrs, &self.cancel)?;
        // A daemon starts with every backend up; its probes take the
        // failed ones out again.
        let down: Vec<String> = self
            .backends
            .iter()
            .filter(|b| !b.up)
            .map(|b| b.name.clone())
            .collect();
        if !down.is_empty() {
            self.wait_for_health(&down, HealthState::Down, Instant::now())?;
        }
        Ok(())
    }

    /// Stops node `k`'s daemon with SIGTERM; its balancer keeps forwarding.
    pub fn stop_daemon(&mut self, k: usize) -> Result<(), DemoError> {
        self.node_mut(k)?.stop()
    }

    fn node_mut(&mut self, k: usize) -> Result<&mut SiteNode, DemoError> {
        let count = self.nodes.len();
        self.nodes
            .get_mut(k)
            .ok_or_else(|| DemoError::Invalid(format!("no node {k}; the site has {count}")))
    }

    pub fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(VIP, VIP_PORT)
    }

    /// Prefix of every namespace of the site (see [`Topology::leftovers`]).
    pub fn prefix(&self) -> &str {
        self.topology.prefix()
    }

    /// What to look for after teardown.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            prefix: self.prefix().to_owned(),
            scratch: self.scratch.dir.clone(),
            bpffs: self.scratch.bpffs.clone().unwrap_or_default(),
            pids: self.pids.clone(),
        }
    }

    pub fn client(&self) -> &Host {
        &self.client
    }

    /// The client's interface to the fabric.
    pub fn client_interface(&self) -> &Interface {
        &self.client_if
    }

    pub fn nodes(&self) -> &[SiteNode] {
        &self.nodes
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

    /// Every node's counters now, by node name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, NodeCounters>, DemoError> {
        self.nodes
            .iter()
            .map(|n| Ok((n.name, n.counters()?)))
            .collect()
    }

    /// Sends one request to every node's daemon (an operator changing the
    /// fleet); the answers in node order.
    pub fn call_all(&self, request: &Request) -> Result<Vec<Response>, DemoError> {
        self.nodes.iter().map(|n| n.call(request)).collect()
    }

    /// Routes the client's traffic to the VIP through the given nodes only
    /// (by index; several make an ECMP route again): what a router does when
    /// a node joins or leaves the fabric.
    pub fn route_via(&self, nodes: &[usize]) -> Result<(), DemoError> {
        let mut args: Vec<String> = vec!["-4".into(), "route".into(), "replace".into()];
        args.push(cidr(VIP, 32));
        for k in nodes {
            let (_, addr) = NODES
                .get(*k)
                .ok_or_else(|| DemoError::Invalid(format!("no node {k}")))?;
            if nodes.len() > 1 {
                args.push("nexthop".into());
            }
            args.extend(["via".into(), addr.to_string()]);
        }
        if nodes.is_empty() {
            return Err(DemoError::Invalid("route_via needs a node".into()));
        }
        self.client
            .ip(args)
            .context("changing the client's route to the VIP")?;
        Ok(())
    }

    /// Opens `count` TCP connections from the client to the VIP, one after
    /// the other, each reading its backend's line, while capturing the
    /// client's interface to see which node carried each connection and
    /// where replies came from.
    pub fn connect(&self, count: usize) -> Result<Round, DemoError> {
        self.connect_to(WEB, count)
    }

    /// [`Site::connect`] to any of the TCP services.
    pub fn connect_to(&self, service: Service, count: usize) -> Result<Round, DemoError> {
        let capture = PacketCapture::open(&self.client, &self.client_if.name)?;
        let before = self.counters()?;
        let vip = service.addr;
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
        // way: wait until the nodes have counted what the client sent.
        let mut frames = Vec::new();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut sent;
        let mut nodes;
        loop {
            thread::sleep(Duration::from_millis(20));
            frames.extend(capture.frames().context("reading the client capture")?);
            sent = frames
                .iter()
                .filter_map(|f| f.tcp().filter(|_| f.outgoing))
                .filter(|t| t.dst == vip.ip() && t.dport == vip.port())
                .count() as u64;
            let now = self.counters()?;
            nodes = now
                .iter()
                .map(|(name, c)| (*name, c.since(&before[name])))
                .collect::<BTreeMap<_, _>>();
            let forwarded = NodeCounters::sum(nodes.values()).vip(service.name);
            if forwarded >= sent || Instant::now() >= deadline {
                break;
            }
        }
        let capture_drops = capture.drops().context("reading the capture's drops")?;

        let node_of_mac: BTreeMap<[u8; 6], &'static str> =
            self.nodes.iter().map(|n| (n.mac, n.name)).collect();
        let mut carried_by: BTreeMap<u16, &'static str> = BTreeMap::new();
        for tcp in frames
            .iter()
            .filter(|f| f.outgoing)
            .filter_map(Frame::tcp)
            .filter(|t| t.dst == vip.ip() && t.dport == vip.port())
        {
            if let Some(node) = node_of_mac.get(&tcp.dmac) {
                carried_by.insert(tcp.sport, node);
            }
        }
        let mut macs: BTreeMap<u16, BTreeSet<[u8; 6]>> = BTreeMap::new();
        let mut replies_via_node = 0;
        for tcp in frames
            .iter()
            .filter(|f| !f.outgoing)
            .filter_map(Frame::tcp)
            .filter(|t| t.src == vip.ip() && t.sport == vip.port())
        {
            macs.entry(tcp.dport).or_default().insert(tcp.smac);
            if node_of_mac.contains_key(&tcp.smac) {
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
                    node: local_port.and_then(|p| carried_by.get(&p).copied()),
                    outcome,
                    reply_macs,
                    direct,
                }
            })
            .collect();
        Ok(Round {
            service: service.name,
            connections,
            client_segments_to_vip: sent,
            replies_via_node,
            capture_drops,
            nodes,
        })
    }

    /// Sends one UDP datagram from the client's `port` (0: any) to the
    /// VIP's UDP service and returns the backend that answered.
    pub fn udp_ask(&self, port: u16) -> Result<Answer, DemoError> {
        let to = SocketAddr::from((VIP, UDP_PORT));
        let reply = self
            .client
            .run_in(move || -> io::Result<String> {
                let socket = UdpSocket::bind((CLIENT_ADDR, port))?;
                socket.set_read_timeout(Some(CONNECT_TIMEOUT))?;
                socket.connect(to)?;
                socket.send(b"who\n")?;
                let mut buf = [0u8; 512];
                let n = socket.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            })
            .context("entering the client")?
            .context(format!("asking {to} over UDP from port {port}"))?;
        parse_answer(&reply)
            .ok_or_else(|| DemoError::Check(format!("unexpected UDP reply {reply:?}")))
    }

    /// Opens a connection that stays open (see [`Held`]).
    pub fn hold(&self) -> Result<Held, DemoError> {
        let vip = SocketAddr::V4(self.vip());
        let stream = self
            .client
            .run_in(move || TcpStream::connect_timeout(&vip, CONNECT_TIMEOUT))
            .context("entering the client")?
            .context(format!("connecting to {vip}"))?;
        Held::start(stream)
    }

    /// Fails a backend the way a host fails: its servers stop, so its
    /// ports refuse. Nobody tells the daemons: this returns once both
    /// daemons' own health probes have taken it out of every VIP (their
    /// status shows it down, which is the health their rings are built
    /// from), with how long each took.
    pub fn fail_backend(&mut self, name: &str) -> Result<Detection, DemoError> {
        self.fail_backends(&[name.to_owned()])
    }

    /// Fails every backend of a cluster at once (see [`Site::fail_backend`]).
    pub fn fail_cluster(&mut self, cluster: &str) -> Result<Detection, DemoError> {
        let names = self.cluster_members(cluster)?;
        self.fail_backends(&names)
    }

    /// Fails several backends at once (see [`Site::fail_backend`]); those
    /// already down are left as they are. At least one backend stays up.
    pub fn fail_backends(&mut self, names: &[String]) -> Result<Detection, DemoError> {
        let failing = self.backends_now(names, true)?;
        if failing.is_empty() {
            return Ok(Detection::default());
        }
        if self.backends.iter().filter(|b| b.up).count() == failing.len() {
            return Err(DemoError::Invalid(format!(
                "failing {} would leave no backend up; the demo keeps at least one",
                names.join(", ")
            )));
        }
        let names = self.names_of(&failing);
        let slots = self.tcp_slots(&names)?;
        for &i in &failing {
            let backend = &mut self.backends[i];
            if let Some(mut server) = backend.server.take() {
                server.stop();
            }
            backend.up = false;
        }
        let noticed = self.wait_for_health(&names, HealthState::Down, Instant::now())?;
        Ok(Detection { noticed, slots })
    }

    /// Brings a failed backend back: its servers start again, and this
    /// returns once both daemons' probes have put it back in service.
    pub fn recover_backend(&mut self, name: &str) -> Result<Detection, DemoError> {
        self.recover_backends(&[name.to_owned()])
    }

    pub fn recover_cluster(&mut self, cluster: &str) -> Result<Detection, DemoError> {
        let names = self.cluster_members(cluster)?;
        self.recover_backends(&names)
    }

    /// Brings several failed backends back at once (see
    /// [`Site::recover_backend`]); those up are left as they are.
    pub fn recover_backends(&mut self, names: &[String]) -> Result<Detection, DemoError> {
        let recovering = self.backends_now(names, false)?;
        if recovering.is_empty() {
            return Ok(Detection::default());
        }
        for &i in &recovering {
            let backend = &mut self.backends[i];
            backend.server = Some(Server::start(
                &backend.host,
                &backend.name,
                backend.cluster,
                backend.addr,
            )?);
            backend.up = true;
        }
        let names = self.names_of(&recovering);
        let noticed = self.wait_for_health(&names, HealthState::Up, Instant::now())?;
        let slots = self.tcp_slots(&names)?;
        Ok(Detection { noticed, slots })
    }

    /// The indices of the named backends that are `up` (or down) now,
    /// each once.
    fn backends_now(&self, names: &[String], up: bool) -> Result<Vec<usize>, DemoError> {
        let mut found = Vec::new();
        for name in names {
            let index = self.backend_index(name)?;
            if self.backends[index].up == up && !found.contains(&index) {
                found.push(index);
            }
        }
        Ok(found)
    }

    fn names_of(&self, indices: &[usize]) -> Vec<String> {
        indices
            .iter()
            .map(|&i| self.backends[i].name.clone())
            .collect()
    }

    /// Drains a backend on every node, as an operator would with `xlb
    /// backend drain`: no new flows, but it keeps serving, so established
    /// flows stay with it. Returns the ring slots the first node rewrote.
    pub fn drain_backend(&mut self, name: &str) -> Result<usize, DemoError> {
        let cluster = self.backends[self.backend_index(name)?].cluster.to_owned();
        let mut moved = None;
        let names = TCP_SERVICES.map(|s| s.name);
        for vip_name in names.into_iter().chain([UDP_VIP_NAME]) {
            let request = Request::BackendDrain {
                vip: vip_name.into(),
                cluster: cluster.clone(),
                name: name.to_owned(),
            };
            for response in self.call_all(&request)? {
                if let Response::Changed {
                    reconcile: Some(report),
                    ..
                } = response
                    && vip_name == TCP_VIP_NAME
                {
                    moved.get_or_insert(report.ring_slots_written);
                }
            }
        }
        Ok(moved.unwrap_or(0))
    }

    fn cluster_members(&self, cluster: &str) -> Result<Vec<String>, DemoError> {
        let names: Vec<String> = self
            .backends
            .iter()
            .filter(|b| b.cluster == cluster)
            .map(|b| b.name.clone())
            .collect();
        if names.is_empty() {
            return Err(DemoError::Invalid(format!("no cluster named {cluster}")));
        }
        Ok(names)
    }

    fn backend_index(&self, name: &str) -> Result<usize, DemoError> {
        self.backends
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| DemoError::Invalid(format!("no backend named {name}")))
    }

    /// Ring slots of the TCP VIP that the first node gives these backends.
    fn tcp_slots(&self, names: &[String]) -> Result<u32, DemoError> {
        let Some(node) = self.nodes.first() else {
            return Ok(0);
        };
        Ok(node
            .status()?
            .vips
            .iter()
            .filter(|v| v.name == TCP_VIP_NAME)
            .flat_map(|v| &v.backends)
            .filter(|b| names.contains(&b.name))
            .map(|b| b.slots)
            .sum())
    }

    /// Waits until every node's daemon shows `names` in state `health` in
    /// every VIP, and returns, per node, how long after `since` it first
    /// did. A node that has not after [`DETECT_TIMEOUT`] is an error that
    /// says what its probes saw.
    fn wait_for_health(
        &self,
        names: &[String],
        health: HealthState,
        since: Instant,
    ) -> Result<Vec<(&'static str, Duration)>, DemoError> {
        let mut noticed: Vec<Option<Duration>> = vec![None; self.nodes.len()];
        loop {
            self.cancel.check()?;
            for (node, when) in self.nodes.iter().zip(&mut noticed) {
                if when.is_none() && lagging(&node.status()?, names, health).is_empty() {
                    *when = Some(since.elapsed());
                }
            }
            if noticed.iter().all(Option::is_some) {
                return Ok(self
                    .nodes
                    .iter()
                    .zip(noticed)
                    .map(|(node, when)| (node.name, when.unwrap_or_default()))
                    .collect());
            }
            if since.elapsed() >= DETECT_TIMEOUT {
                let (node, _) = self
                    .nodes
                    .iter()
                    .zip(&noticed)
                    .find(|(_, when)| when.is_none())
                    .unwrap_or((&self.nodes[0], &None));
                return Err(DemoError::Undetected {
                    node: node.name.into(),
                    what: format!("{} {health}", names.join(", ")),
                    waited: DETECT_TIMEOUT,
                    detail: lagging(&node.status()?, names, health).join("; "),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
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
    pub fn try_commands(&self) -> Vec<(String, String)> {
        let client = self.client.netns();
        let xlb = self.xlb.display();
        let mut commands = vec![(
            format!("ip netns exec {client} curl -s http://{VIP}/"),
            "one HTTP request through the VIP".to_owned(),
        )];
        commands.push((
            format!(
                "ip netns exec {client} sh -c 'for i in $(seq 30); do curl -s http://{VIP}/; done | sort | uniq -c'"
            ),
            "30 requests, counted per backend".into(),
        ));
        commands.push((
            format!("ip netns exec {client} curl -s http://[{VIP6}]/"),
            "the IPv6 VIP, served by the backends' IPv6 addresses (IPv6 in IPv6)".into(),
        ));
        for node in &self.nodes {
            commands.push((
                format!("{xlb} --socket {} status", node.socket.display()),
                format!(
                    "{}'s daemon: VIPs, clusters, backends, shares, health probes, counters",
                    node.name
                ),
            ));
        }
        if let Some(node) = self.nodes.first() {
            commands.push((
                format!("{xlb} --socket {} top", node.socket.display()),
                format!("{}'s traffic per VIP and backend, live", node.name),
            ));
        }
        if let (Some(node), Some(b)) = (self.nodes.first(), self.backends.first()) {
            commands.push((
                format!(
                    "{xlb} --socket {} backend drain {TCP_VIP_NAME} {} {}",
                    node.socket.display(),
                    b.cluster,
                    b.name
                ),
                format!(
                    "take {} out on {} only (undrain brings it back)",
                    b.name, node.name
                ),
            ));
            commands.push((
                format!("ip -n {} -s link show {DEV}", node.host.netns()),
                format!(
                    "{}'s interface: prog/xdp attached, packet counts",
                    node.name
                ),
            ));
            commands.push((
                format!("ip netns exec {} ss -tn", b.host.netns()),
                "a backend's connections (the VIP on lo talks to the client directly)".into(),
            ));
        }
        commands
    }

    /// Tears the site down now and reports the first failure (dropping the
    /// site does the same but can only print it). The daemons get SIGTERM
    /// first, as an operator would stop them.
    pub fn close(mut self) -> Result<(), DemoError> {
        let mut first = None;
        for node in &mut self.nodes {
            if let Err(err) = node.stop() {
                first.get_or_insert(err);
            }
        }
        let Site {
            nodes,
            backends,
            _fabric_pass,
            topology,
            scratch,
            ..
        } = self;
        drop(nodes);
        drop(backends);
        drop(_fabric_pass);
        let closed = topology.close().context("removing the namespaces");
        drop(scratch);
        match first {
            Some(err) => Err(err),
            None => closed,
        }
    }
}

/// How the daemons' probes noticed a change: per node, the time from the
/// change (servers stopped or started) to the node's status showing it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Detection {
    pub noticed: Vec<(&'static str, Duration)>,
    /// Ring slots of the TCP VIP (on the first node) that the backends had
    /// before they failed, or have after they came back.
    pub slots: u32,
}

impl fmt::Display for Detection {
    /// "xlb1 in 0.9 s, xlb2 in 1.0 s"
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, (node, took)) in self.noticed.iter().enumerate() {
            let sep = if k == 0 { "" } else { ", " };
            write!(f, "{sep}{node} in {:.1} s", took.as_secs_f64())?;
        }
        Ok(())
    }
}

/// The backends of `names` that `status` does not show in state `health`,
/// in some VIP, each with what its probe last saw; empty once it agrees. A
/// name the status lacks altogether is lagging too.
fn lagging(status: &Status, names: &[String], health: HealthState) -> Vec<String> {
    let mut lagging = Vec::new();
    for name in names {
        let views: Vec<_> = status
            .vips
            .iter()
            .flat_map(|v| &v.backends)
            .filter(|b| &b.name == name)
            .collect();
        if views.is_empty() {
            lagging.push(format!("{name}: not in any VIP"));
        }
        for view in views.into_iter().filter(|b| b.health != health) {
            let probe = view.probe.as_ref().map_or_else(
                || "not probed".to_owned(),
                |p| {
                    format!(
                        "{} probe on port {} {}, last result {}",
                        p.kind,
                        p.port,
                        p.state,
                        p.last_result.as_deref().unwrap_or("none")
                    )
                },
            );
            lagging.push(format!(
                "{name} in {}: health {}, {probe}",
                view.vip, view.health
            ));
        }
    }
    lagging
}

/// The VIPs' `[vip]` tables, each over every backend of both clusters: TCP
/// on port 80 and UDP on port 53 of the IPv4 VIP by the backends' IPv4
/// addresses; TCP on port 80 of the IPv6 VIP and on port 81 of the IPv4 VIP
/// by their IPv6 addresses. Each VIP probes its backends' own addresses on
/// its port (see [`HTTP_PROBE`]).
fn node_vips(backends: &[SiteBackend]) -> String {
    let mut s = String::new();
    let vips = [
        (WEB.name, WEB.addr, "tcp", false, HTTP_PROBE),
        (
            UDP_VIP_NAME,
            SocketAddr::from((VIP, UDP_PORT)),
            "udp",
            false,
            UDP_PROBE,
        ),
        (WEB6.name, WEB6.addr, "tcp", true, HTTP_PROBE),
        (WEB46.name, WEB46.addr, "tcp", true, TCP_PROBE),
    ];
    for (name, addr, proto, v6_backends, probe) in vips {
        let _ = writeln!(
            s,
            "\n[vip.{name}]\naddr = \"{}\"\nport = {}\nproto = \"{proto}\"\nring_size = {RING_SIZE}",
            addr.ip(),
            addr.port()
        );
        let _ = writeln!(
            s,
            "\n[vip.{name}.probe]\n{probe}\ninterval = {PROBE_INTERVAL}\ntimeout = {PROBE_INTERVAL}\n\
             fall = {PROBE_FALL}\nrise = {PROBE_RISE}"
        );
        for cluster in CLUSTERS {
            let _ = writeln!(s, "\n[vip.{name}.cluster.{cluster}]");
            for b in backends.iter().filter(|b| b.cluster == cluster) {
                let _ = writeln!(
                    s,
                    "backend.{} = {{ addr = \"{}\" }}",
                    b.name,
                    if v6_backends {
                        IpAddr::V6(b.addr6)
                    } else {
                        IpAddr::V4(b.addr)
                    }
                );
            }
        }
    }
    s
}

/// One xlb node: forwarding on (bpf_fib_lookup wants it), room for the
/// outer header, the pass program on its bridge port, and the daemon's
/// config. The daemon itself starts later, in [`Site::start_daemon`].
#[allow(clippy::too_many_arguments)]
fn build_node(
    topology: &Topology,
    fabric: &Bridge,
    name: &'static str,
    (addr, addr6): (Ipv4Addr, Ipv6Addr),
    scratch: &Path,
    bpffs: &Path,
    vips: &str,
    hash_seed: u32,
) -> Result<(SiteNode, Dataplane), DemoError> {
    let host = topology
        .host(name)
        .context(format!("creating xlb node {name}"))?;
    let link = topology
        .link(
            &host,
            fabric,
            LinkOpts::new()
                .addr_a(cidr(addr, FABRIC_PREFIX_LEN))
                .addr_a(cidr(addr6, FABRIC_PREFIX_LEN6))
                .mtu(FABRIC_MTU),
        )
        .context(format!("linking {name} to the fabric"))?;
    for key in [
        "net.ipv4.ip_forward".to_owned(),
        format!("net.ipv4.conf.{DEV}.forwarding"),
        "net.ipv6.conf.all.forwarding".to_owned(),
        format!("net.ipv6.conf.{DEV}.forwarding"),
    ] {
        host.sysctl(&key, "1")
            .context(format!("turning forwarding on in {name}"))?;
    }
    // The node's XDP_TX frames land on this bridge port; a veth drops XDP
    // frames unless its receiving end has an XDP program. The decap program
    // with no tunnel endpoints passes every frame.
    let pass = load_decap(fabric.host(), &link.b.name, &[])
        .map_err(|err| prefix(err, &format!("the fabric port facing {name}")))?;
    let dir = scratch.join(name);
    fs::create_dir_all(&dir).context(format!("creating {}", dir.display()))?;
    let config = dir.join("xlb.toml");
    let socket = dir.join("xlb.sock");
    let text = format!(
        "# {name} of the xlb demo, written by `xlb demo`.\n\
         [node]\n\
         interfaces = [\"{DEV}\"]\n\
         attach_mode = \"native\"\n\
         hash_seed = {hash_seed:#x}\n\
         source_v4 = \"{addr}\"\n\
         source_v6 = \"{addr6}\"\n\
         api_socket = \"{}\"\n\
         state_file = \"{}\"\n\
         pin_path = \"{}\"\n\
         [node.policy]\n\
         panic_threshold = {PANIC_THRESHOLD}\n\
         [node.limits]\n\
         max_vips = {}\n\
         max_backends = {}\n\
         ring_capacity = {}\n\
         conntrack_size = {}\n{vips}",
        socket.display(),
        dir.join("state.toml").display(),
        bpffs.join(name).display(),
        NODE_LIMITS.max_vips,
        NODE_LIMITS.max_backends,
        NODE_LIMITS.ring_capacity,
        NODE_LIMITS.conntrack_size,
    );
    fs::write(&config, text).context(format!("writing {}", config.display()))?;
    Ok((
        SiteNode {
            name,
            addr,
            mac: link.a.mac,
            host,
            config,
            socket,
            dir,
            daemon: None,
            starts: 0,
        },
        pass,
    ))
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

/// Loads the data plane in `host`'s namespace and attaches the decap program
/// natively to `dev`, accepting tunnels to `endpoints` (none: pass everything).
fn load_decap(host: &Host, dev: &str, endpoints: &[IpAddr]) -> Result<Dataplane, DemoError> {
    host.run_in(|| -> Result<Dataplane, DemoError> {
        let mut dp = Dataplane::load(DECAP_LIMITS).context("loading the data plane")?;
        for &addr in endpoints {
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
    cluster: &'static str,
    c: usize,
    i: usize,
) -> Result<SiteBackend, DemoError> {
    let name = format!("{cluster}-{}", i + 1);
    let (addr, addr6) = backend_addrs(c, i);
    let host = topology
        .host(&name)
        .context(format!("creating backend {name}"))?;
    let link = topology
        .link(
            &host,
            fabric,
            LinkOpts::new()
                .addr_a(cidr(addr, FABRIC_PREFIX_LEN))
                .addr_a(cidr(addr6, FABRIC_PREFIX_LEN6))
                .mtu(FABRIC_MTU),
        )
        .context(format!("linking {name} to the fabric"))?;
    for vip in [cidr(VIP, 32), cidr(VIP6, 128)] {
        host.add_addr("lo", &vip)
            .context(format!("adding {vip} to {name}'s lo"))?;
    }
    // The VIP must not be announced on the fabric (only the nodes' route
    // leads to it), and the client's packets arrive with a source the strict
    // reverse-path filter may not expect.
    for (key, value) in crate::doctor::BACKEND_SYSCTLS_V4 {
        let key = key.replace("{dev}", DEV);
        host.sysctl(&key, value)
            .context(format!("setting {key} on {name}"))?;
    }
    let decap =
        load_decap(&host, DEV, &[addr.into(), addr6.into()]).map_err(|err| prefix(err, &name))?;
    let server = Server::start(&host, &name, cluster, addr)?;
    Ok(SiteBackend {
        name,
        cluster,
        addr,
        addr6,
        mac: link.a.mac,
        host,
        up: true,
        server: Some(server),
        decap,
    })
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

/// A long-lived connection: opened with `hold`, after which its backend
/// answers every line with its name until the client closes. It shows
/// whether the connection still reaches the same backend after changes.
pub struct Held {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The backend that answered first.
    pub backend: Answer,
    pub local_port: u16,
}

impl Held {
    fn start(stream: TcpStream) -> Result<Self, DemoError> {
        let reader = stream
            .try_clone()
            .map(BufReader::new)
            .context("cloning the held connection")?;
        stream
            .set_read_timeout(Some(CONNECT_TIMEOUT))
            .context("setting a read timeout")?;
        let local_port = stream
            .local_addr()
            .context("reading the client port")?
            .port();
        let mut held = Self {
            stream,
            reader,
            backend: Answer {
                backend: String::new(),
                cluster: String::new(),
            },
            local_port,
        };
        held.stream.write_all(b"hold\n").context("sending hold")?;
        held.backend = held.read_answer()?;
        Ok(held)
    }

    /// Sends one line and returns who answered.
    pub fn ask(&mut self) -> Result<Answer, DemoError> {
        self.stream
            .write_all(b"again\n")
            .context("writing on the held connection")?;
        self.read_answer()
    }

    fn read_answer(&mut self) -> Result<Answer, DemoError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading on the held connection")?;
        if n == 0 {
            return Err(DemoError::Check("the held connection was closed".into()));
        }
        parse_answer(&line).ok_or_else(|| DemoError::Check(format!("unexpected reply {line:?}")))
    }
}

/// A backend's servers: TCP on ports 80 and 81 of every address (so of the
/// IPv4 and IPv6 VIPs) answers every connection with "backend <name>
/// cluster <cluster>" (as HTTP if asked in HTTP; line by line if asked to
/// `hold`), UDP on VIP:53 answers every datagram with it. UDP is bound to
/// the VIP itself: a reply from a wildcard socket would leave from the
/// host's own address, which the client does not expect. A second UDP
/// socket on the backend's own address answers the daemons' UDP probes,
/// which (like every probe here) go to that address, not to the VIP.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(host: &Host, name: &str, cluster: &str, addr: Ipv4Addr) -> Result<Self, DemoError> {
        let (listeners, udp) = host
            .run_in(|| -> io::Result<_> {
                // [::] takes IPv4 too (as mapped addresses): one socket per
                // port for both VIPs.
                Ok((
                    vec![
                        TcpListener::bind((Ipv6Addr::UNSPECIFIED, VIP_PORT))?,
                        TcpListener::bind((Ipv6Addr::UNSPECIFIED, MIXED_PORT))?,
                    ],
                    vec![
                        UdpSocket::bind((VIP, UDP_PORT))?,
                        UdpSocket::bind((addr, UDP_PORT))?,
                    ],
                ))
            })
            .context(format!("entering {name}"))?
            .context(format!(
                "binding [::]:{VIP_PORT} and [::]:{MIXED_PORT}/tcp, {VIP}:{UDP_PORT} and \
                 {addr}:{UDP_PORT}/udp in {name}"
            ))?;
        let line = format!("backend {name} cluster {cluster}\n");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(format!("server-{name}"))
            .spawn(move || serve(&listeners, &udp, &line, &stopped))
            .context(format!("starting {name}'s server"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting and closes the sockets: new connections to this
    /// backend are refused from now on.
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

fn serve(listeners: &[TcpListener], udp: &[UdpSocket], line: &str, stop: &AtomicBool) {
    let mut polls: Vec<libc::pollfd> = udp
        .iter()
        .map(AsRawFd::as_raw_fd)
        .chain(listeners.iter().map(AsRawFd::as_raw_fd))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: `polls` holds valid pollfds, as many as passed, whose fds
        // outlive the call.
        let ready = unsafe {
            libc::poll(
                polls.as_mut_ptr(),
                polls.len() as libc::nfds_t,
                SERVER_POLL_MS,
            )
        };
        if ready <= 0 {
            continue;
        }
        for (listener, poll) in listeners.iter().zip(&polls[udp.len()..]) {
            if poll.revents == 0 {
                continue;
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    let line = line.to_owned();
                    // One thread per connection, so a silent client does not
                    // hold up the others.
                    let _ = thread::Builder::new()
                        .name("server-conn".into())
                        .spawn(move || answer(stream, &line));
                }
                Err(err) => log::debug!("accept: {err}"),
            }
        }
        for (socket, poll) in udp.iter().zip(&polls) {
            if poll.revents == 0 {
                continue;
            }
            let mut buf = [0u8; 512];
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(line.as_bytes(), from);
            }
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
    if request.starts_with(b"hold\n") {
        return hold(stream, line);
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

/// A held connection: one answer now and one per line received, until the
/// client closes or stays silent for [`HOLD_IDLE`].
fn hold(stream: TcpStream, line: &str) {
    let _ = stream.set_read_timeout(Some(HOLD_IDLE));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    if writer.write_all(line.as_bytes()).is_err() {
        return;
    }
    for request in BufReader::new(stream).lines() {
        if request.is_err() || writer.write_all(line.as_bytes()).is_err() {
            return;
        }
    }
}

/// Options of [`run`].
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The `xlb` binary the nodes run as their daemon (this one).
    pub xlb: PathBuf,
    pub backends_per_cluster: usize,
    /// Connections per round.
    pub connections: usize,
    /// Stay up after the rounds until `cancel` is set.
    pub keep: bool,
    pub cancel: Cancel,
}

/// One step of the demo: what changed before the round, and the round.
struct Step {
    label: String,
    round: Round,
    /// A backend or cluster that was down during the round.
    down: Vec<String>,
}

/// The demo: builds the site, runs rounds of connections while a backend
/// and then a whole cluster fail and come back, prints what happened, and
/// removes the site.
pub fn run(opts: DemoOptions) -> Result<(), DemoError> {
    check_prerequisites()?;
    if opts.connections == 0 {
        return Err(DemoError::Invalid(
            "--connections must be at least 1".into(),
        ));
    }
    let n = opts.backends_per_cluster;
    println!(
        "xlb demo: client -> ECMP -> VIP {VIP}:{VIP_PORT}/tcp on 2 xlb nodes ({}) -> {} x {n} backends ({})",
        NODES.map(|(name, _)| name).join(", "),
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
        ..SiteOptions::new(&opts.xlb)
    })
    .map_err(interrupted)?;
    let modes: Vec<String> = site
        .nodes()
        .iter()
        .map(|node| {
            let mode = node
                .status()
                .ok()
                .and_then(|s| s.attachments.first().map(|a| format!("{:?}", a.mode)))
                .unwrap_or_else(|| "?".into())
                .to_lowercase();
            format!("{} ({mode} XDP on {DEV})", node.name)
        })
        .collect();
    println!(
        "site ready in {:.1} s, in namespaces {}.*: `xlb run` on {}; decap XDP on {} backends",
        started.elapsed().as_secs_f64(),
        site.prefix(),
        modes.join(" and "),
        site.backends().len(),
    );
    println!(
        "health probes of both daemons, to every backend's own address: HTTP on port \
         {VIP_PORT} (IPv4 and IPv6), TCP on {MIXED_PORT}, UDP on {UDP_PORT}; every \
         {PROBE_INTERVAL} s, down after {PROBE_FALL} failures, up after {PROBE_RISE} passes"
    );
    let result = drive(&mut site, &opts).map_err(interrupted);
    if let Err(DemoError::Interrupted) = result {
        drop(site);
        return result;
    }
    print!("removing the namespaces, daemons and pins... ");
    let _ = io::stdout().flush();
    let closed = site.close();
    println!("{}", if closed.is_ok() { "done" } else { "failed" });
    result.and(closed)
}

fn drive(site: &mut Site, opts: &DemoOptions) -> Result<(), DemoError> {
    let count = opts.connections;
    let mut steps: Vec<Step> = Vec::new();
    let mut round = |site: &Site, label: String, down: Vec<String>| -> Result<(), DemoError> {
        let round = site.connect(count)?;
        println!("{label}: {}", round_summary(&round, &down));
        steps.push(Step { label, round, down });
        Ok(())
    };
    println!();
    round(site, "round 1, all up".into(), vec![])?;

    let victim = site.backends()[0].name.clone();
    let detected = site.fail_backend(&victim)?;
    println!(
        "  {victim} fails: its server stops; noticed by the probes of {detected}; its {} of \
         {RING_SIZE} ring slots ({:.1}%) go to the others",
        detected.slots,
        100.0 * f64::from(detected.slots) / f64::from(RING_SIZE)
    );
    round(
        site,
        format!("round 2, {victim} down"),
        vec![victim.clone()],
    )?;

    let cluster = CLUSTERS[1];
    let members: Vec<String> = site
        .backends()
        .iter()
        .filter(|b| b.cluster == cluster)
        .map(|b| b.name.clone())
        .collect();
    // With one backend per cluster, failing both would leave nothing to
    // serve: the victim comes back first.
    if members.len() == 1 {
        let detected = site.recover_backend(&victim)?;
        println!("  {victim} comes back: noticed by the probes of {detected}");
    }
    let detected = site.fail_cluster(cluster)?;
    println!(
        "  cluster {cluster} fails: every server in it stops; noticed by the probes of \
         {detected}; its {} ring slots go to the others",
        detected.slots
    );
    let down: Vec<String> = site
        .backends()
        .iter()
        .filter(|b| !b.up)
        .map(|b| b.name.clone())
        .collect();
    round(
        site,
        format!("round 3, {} down", down_label(&down, &members, cluster)),
        down.clone(),
    )?;

    let detected = site.recover_backends(&down)?;
    let label = down_label(&down, &members, cluster);
    let verb = if label.contains(" and ") {
        "come"
    } else {
        "comes"
    };
    println!(
        "  {label} {verb} back: the servers start; noticed by the probes of {detected}; \
         {} ring slots go back to them",
        detected.slots
    );
    round(site, "round 4, all up again".into(), vec![])?;

    println!();
    print!("{}", spread_table(site, &steps));
    println!();
    print!("{}", counters_summary(site, &steps)?);

    let problems: Vec<String> = steps
        .iter()
        .flat_map(|s| check_round(site, &s.round, &s.label, &s.down))
        .collect();
    if !problems.is_empty() {
        return Err(DemoError::Check(problems.join("; ")));
    }
    if opts.keep {
        keep_running(site)?;
    }
    Ok(())
}

/// "east-1 and west" for the backends `down`, naming a cluster whose
/// `members` are all down by the cluster.
fn down_label(down: &[String], members: &[String], cluster: &str) -> String {
    let mut parts: Vec<String> = down
        .iter()
        .filter(|name| !members.contains(name))
        .cloned()
        .collect();
    if members.iter().all(|m| down.contains(m)) {
        parts.push(cluster.to_owned());
    }
    parts.join(" and ")
}

fn round_summary(round: &Round, down: &[String]) -> String {
    let total = round.connections.len();
    let nodes: Vec<String> = round
        .by_node()
        .into_iter()
        .map(|(n, c)| format!("{n} {c}"))
        .collect();
    let clusters: Vec<String> = round
        .by_cluster()
        .into_iter()
        .map(|(n, c)| format!("{n} {c}"))
        .collect();
    let mut s = format!(
        "{total} connections, {} answered, {} straight from the backend (DSR); via {}; clusters {}",
        round.answered(),
        round.direct(),
        nodes.join(", "),
        clusters.join(", "),
    );
    let by_backend = round.by_backend();
    let reached: usize = down.iter().filter_map(|d| by_backend.get(d)).sum();
    if !down.is_empty() {
        let _ = write!(s, "; {reached} reached a failed backend");
    }
    for (err, count) in round.errors() {
        let _ = write!(s, "\n  {count} failed: {err}");
    }
    s
}

fn spread_table(site: &Site, steps: &[Step]) -> String {
    let mut s = String::new();
    let _ = write!(s, "{:<12} {:<12}", "connections", "address");
    for k in 1..=steps.len() {
        let _ = write!(s, " {:>8}", format!("round {k}"));
    }
    let _ = writeln!(s, "   {:>11}", "xlb packets");
    let cell = |step: &Step, name: &str, count: usize| {
        if step.down.iter().any(|d| d == name) {
            format!("down {count}")
        } else {
            count.to_string()
        }
    };
    for b in site.backends() {
        let _ = write!(s, "{:<12} {:<12}", b.name, b.addr.to_string());
        let mut packets = 0;
        for step in steps {
            let count = step.round.by_backend().get(&b.name).copied().unwrap_or(0);
            let _ = write!(s, " {:>8}", cell(step, &b.name, count));
            packets += step.round.total().backend(&b.name);
        }
        let _ = writeln!(s, "   {packets:>11}");
    }
    for cluster in CLUSTERS {
        let _ = write!(s, "{:<25}", format!("cluster {cluster}"));
        for step in steps {
            let count = step.round.by_cluster().get(cluster).copied().unwrap_or(0);
            let _ = write!(s, " {count:>8}");
        }
        let _ = writeln!(s);
    }
    for node in site.nodes() {
        let _ = write!(
            s,
            "{:<12} {:<12}",
            format!("via {}", node.name),
            node.addr.to_string()
        );
        let mut packets = 0;
        for step in steps {
            let count = step.round.by_node().get(node.name).copied().unwrap_or(0);
            let _ = write!(s, " {count:>8}");
            packets += step
                .round
                .nodes
                .get(node.name)
                .map_or(0, |c| c.vip(TCP_VIP_NAME));
        }
        let _ = writeln!(s, "   {packets:>11}");
    }
    s
}

fn counters_summary(site: &Site, steps: &[Step]) -> Result<String, DemoError> {
    let sent: u64 = steps.iter().map(|s| s.round.client_segments_to_vip).sum();
    let via_node: u64 = steps.iter().map(|s| s.round.replies_via_node).sum();
    let forwarded: u64 = steps
        .iter()
        .map(|s| s.round.total().vip(TCP_VIP_NAME))
        .sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "the client sent {sent} segments to the VIP; the xlb nodes forwarded {forwarded}; \
         {via_node} replies came back through a node"
    );
    for node in site.nodes() {
        let now = node.counters()?;
        let nonzero: Vec<String> = now.global.iter().map(|(c, v)| format!("{c} {v}")).collect();
        let _ = writeln!(s, "{} counters: {}", node.name, nonzero.join(", "));
    }
    Ok(s)
}

/// What must hold for a round; each problem as one sentence. `down` names
/// the backends that were failed during it.
pub fn check_round(site: &Site, round: &Round, label: &str, down: &[String]) -> Vec<String> {
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
            "{label}: {} reply segments came from an xlb node's MAC",
            round.replies_via_node
        ));
    }
    let forwarded = round.total().vip(round.service);
    if round.capture_drops == 0 && forwarded != round.client_segments_to_vip {
        problems.push(format!(
            "{label}: the client sent {} segments to the VIP but the xlb nodes forwarded {forwarded}",
            round.client_segments_to_vip
        ));
    }
    let by_backend = round.by_backend();
    for name in down {
        if let Some(count) = by_backend.get(name) {
            problems.push(format!(
                "{label}: {count} connections reached {name}, which is down"
            ));
        }
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
/// packets each node forwarded to each backend.
fn keep_running(site: &Site) -> Result<(), DemoError> {
    println!();
    println!("The site stays up until Ctrl-C. Try, as root:");
    for (command, what) in site.try_commands() {
        println!("  {command}");
        println!("      # {what}");
    }
    println!("Packets through the xlb nodes are reported below as they come.");
    let mut last = site.counters()?;
    loop {
        if site.cancel.sleep(Duration::from_secs(2)).is_err() {
            return Ok(());
        }
        let now = site.counters()?;
        for (node, counters) in &now {
            let delta = counters.since(&last[node]);
            let per: Vec<String> = delta
                .backends
                .iter()
                .filter(|(_, p)| **p > 0)
                .map(|(n, p)| format!("{n} +{p}"))
                .collect();
            if !per.is_empty() {
                println!("  {node}: {} packets to {}", per.len(), per.join(", "));
            }
        }
        last = now;
    }
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

/// The fields of an Ethernet / IP / TCP frame the demo looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
}

impl Frame {
    /// The frame as Ethernet / IPv4 or IPv6 / TCP, if it is one (no VLAN
    /// tag, no IPv6 extension header).
    pub fn tcp(&self) -> Option<Tcp> {
        let d = &self.data;
        let ip = d.get(14..)?;
        let (src, dst, l4): (IpAddr, IpAddr, usize) = match (d.get(12..14)?, ip.first()? >> 4) {
            ([0x08, 0x00], 4) if ip.len() >= 20 && ip[9] == 6 => {
                let v4 = |at: usize| IpAddr::from([ip[at], ip[at + 1], ip[at + 2], ip[at + 3]]);
                (v4(12), v4(16), usize::from(ip[0] & 0x0f) * 4)
            }
            ([0x86, 0xdd], 6) if ip.len() >= 40 && ip[6] == 6 => {
                let v6 = |at: usize| -> Option<IpAddr> {
                    let bytes: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
                    Some(IpAddr::from(bytes))
                };
                (v6(8)?, v6(24)?, 40)
            }
            _ => return None,
        };
        let tcp = ip.get(l4..l4 + 14)?;
        let mac = |at: usize| -> [u8; 6] { d[at..at + 6].try_into().unwrap_or_default() };
        Some(Tcp {
            dmac: mac(0),
            smac: mac(6),
            src,
            dst,
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
    fn frames_parse_as_tcp() {
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
        let t = frame.tcp().unwrap();
        assert_eq!((t.src, t.dst), (CLIENT_ADDR.into(), VIP.into()));
        assert_eq!((t.sport, t.dport, t.flags), (40000, 80, 0x02));
        assert_eq!((t.dmac, t.smac), ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]));
        let short = Frame {
            outgoing: false,
            data: frame.data[..40].to_vec(),
        };
        assert_eq!(short.tcp(), None);
    }

    #[test]
    fn frames_parse_as_tcp6() {
        let mut d = vec![0u8; 14 + 40 + 20];
        d[12..14].copy_from_slice(&[0x86, 0xdd]);
        d[14] = 0x60;
        d[20] = 6;
        d[22..38].copy_from_slice(&CLIENT_ADDR6.octets());
        d[38..54].copy_from_slice(&VIP6.octets());
        d[54..56].copy_from_slice(&40000u16.to_be_bytes());
        d[56..58].copy_from_slice(&80u16.to_be_bytes());
        d[67] = 0x12;
        let frame = Frame {
            outgoing: false,
            data: d,
        };
        let t = frame.tcp().unwrap();
        assert_eq!((t.src, t.dst), (CLIENT_ADDR6.into(), VIP6.into()));
        assert_eq!((t.sport, t.dport, t.flags), (40000, 80, 0x12));
        // A UDP packet is not TCP.
        let mut udp = frame.clone();
        udp.data[20] = 17;
        assert_eq!(udp.tcp(), None);
    }
}
