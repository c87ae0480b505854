//! Hosts in network namespaces, for the tests, the demo and the live
//! benchmarks: one harness, so every one of them gets the same isolation and
//! the same guaranteed teardown.
//!
//! A [`Topology`] owns namespaces named `xlb.<tag>.<pid>.<start>.<n>.<host>`
//! (`start` is the owning process's start time, in hex clock ticks). Nothing
//! is ever created in the machine's own namespace: veth pairs are created
//! inside one host's namespace with their peer placed directly in the other,
//! so test traffic has no path to the real interfaces. Dropping the topology
//! (also while unwinding from a panic) kills what it spawned and deletes its
//! namespaces, which deletes their interfaces. A process that dies without
//! unwinding (SIGKILL, Ctrl-C) leaves its namespaces behind;
//! [`Topology::new`] removes those because the name says whose they were.
//!
//! Addresses must lie in 198.18.0.0/15 or fd00::/8, the ranges reserved for
//! this project's test traffic; anything else is refused.

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Where `ip netns` keeps its names (iproute2's NETNS_RUN_DIR).
const NETNS_DIR: &str = "/var/run/netns";
/// First field of every namespace name this module creates; the sweep only
/// ever looks at names that start with it.
const SCHEME: &str = "xlb";
/// Keeps namespace names readable in `ip netns list`.
const MAX_LABEL: usize = 20;
/// IFNAMSIZ minus the terminating NUL.
const MAX_IFNAME: usize = 15;
/// veth carrier and operstate are set asynchronously (linkwatch); until then
/// the device's queue discards packets, so `link` waits for it.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// From linux/ethtool.h; libc does not carry the ethtool command numbers.
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// Distinguishes topologies created by one process (parallel tests share a pid).
static NEXT_TOPOLOGY: AtomicU32 = AtomicU32::new(0);

/// What went wrong while building or tearing down a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A command ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    /// A command could not be started at all (e.g. `ip` is not installed).
    #[error("could not start `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    /// A system call or /proc access failed.
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// An argument was refused before anything was created.
    #[error("invalid {what} `{value}`: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    /// An interface never reported carrier.
    #[error("{dev} in {netns} did not come up within {waited:?}")]
    NotRunning {
        netns: String,
        dev: String,
        waited: Duration,
    },
}

type Result<T, E = TopologyError> = std::result::Result<T, E>;

/// A spawned process, shared between its [`Spawned`] guard and the topology
/// so that whichever goes first kills it.
type ChildSlot = Arc<Mutex<Option<Child>>>;

#[derive(Debug, Default)]
struct Shared {
    namespaces: Mutex<Vec<String>>,
    children: Mutex<Vec<ChildSlot>>,
}

/// Poisoning only means another thread panicked while holding the lock; the
/// lists stay valid, and teardown must still run after a panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A set of namespaces that is removed when dropped.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    shared: Arc<Shared>,
}

impl Topology {
    /// Starts an empty topology whose namespace names begin with
    /// `xlb.<tag>.`; `tag` may hold ASCII letters, digits, `_` and `-`.
    ///
    /// First removes namespaces that earlier processes left behind, so a run
    /// that was killed does not leak into the next.
    pub fn new(tag: &str) -> Result<Self> {
        validate_label("tag", tag)?;
        let pid = std::process::id();
        let start = process_start(pid).ok_or_else(|| TopologyError::Io {
            context: format!("reading /proc/{pid}/stat"),
            source: io::Error::other("no start time"),
        })?;
        sweep_stale();
        let n = NEXT_TOPOLOGY.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            prefix: format!("{SCHEME}.{tag}.{pid}.{start:x}.{n}"),
            shared: Arc::default(),
        })
    }

    /// The prefix of every namespace name of this topology; pass it to
    /// [`Topology::leftovers`] after teardown.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Creates a host: a namespace with `lo` up and IPv6 duplicate address
    /// detection off, so addresses are usable the moment they are added.
    pub fn host(&self, name: &str) -> Result<Host> {
        validate_label("host name", name)?;
        let netns = format!("{}.{name}", self.prefix);
        run(Command::new("ip").args(["netns", "add"]).arg(&netns))?;
        // Recorded before anything else can fail, so teardown covers it.
        lock(&self.shared.namespaces).push(netns.clone());
        let host = Host {
            inner: Arc::new(HostInner {
                name: name.to_owned(),
                netns,
                next_if: AtomicU32::new(0),
                shared: Arc::clone(&self.shared),
            }),
        };
        host.ip(["link", "set", "lo", "up"])?;
        // DAD is skipped only when both `all` and the device say 0; `default`
        // covers every device created later, including veth peers moved in.
        host.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        host.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(host)
    }

    /// Creates a "fabric" host holding a Linux bridge `br0`: one L2 segment
    /// for every host linked to it.
    pub fn bridge(&self, name: &str) -> Result<Bridge> {
        let host = self.host(name)?;
        let dev = "br0".to_owned();
        // The fabric has no multicast querier; without snooping the bridge
        // simply floods multicast, which keeps IPv6 neighbour discovery simple.
        host.ip(["link", "add", &dev, "type", "bridge", "mcast_snooping", "0"])?;
        host.ip(["link", "set", &dev, "up"])?;
        Ok(Bridge { host, dev })
    }

    /// Connects `a` to a host or a bridge with a veth pair, both ends up,
    /// and returns once both report carrier.
    ///
    /// The pair is created inside `a`'s namespace with its peer placed
    /// directly in `b`'s, so it never exists in the machine's namespace.
    /// Interfaces default to `eth<k>` on hosts and `port<k>` on bridges.
    pub fn link<'p>(&self, a: &Host, b: impl Into<Peer<'p>>, opts: LinkOpts) -> Result<Link> {
        let (b_host, bridge_dev) = match b.into() {
            Peer::Host(h) => (h, None),
            Peer::Bridge(br) => (&br.host, Some(br.dev.as_str())),
        };
        if bridge_dev.is_some() && !opts.addrs_b.is_empty() {
            return Err(TopologyError::Invalid {
                what: "link option",
                value: opts.addrs_b.join(" "),
                reason: "a bridge port carries no addresses; address the bridge device instead",
            });
        }
        for cidr in opts.addrs_a.iter().chain(&opts.addrs_b) {
            parse_test_cidr(cidr)?;
        }
        if let Some(mtu) = opts.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(TopologyError::Invalid {
                what: "MTU",
                value: mtu.to_string(),
                reason: "must be 68..=65535",
            });
        }
        let a_name = match opts.name_a {
            Some(n) => n,
            None => a.next_ifname("eth"),
        };
        let b_name = match opts.name_b {
            Some(n) => n,
            None => b_host.next_ifname(if bridge_dev.is_some() { "port" } else { "eth" }),
        };
        validate_ifname(&a_name)?;
        validate_ifname(&b_name)?;
        if a.netns() == b_host.netns() && a_name == b_name {
            return Err(TopologyError::Invalid {
                what: "interface name",
                value: a_name,
                reason: "both ends are in one namespace and need different names",
            });
        }

        a.ip([
            "link",
            "add",
            &a_name,
            "type",
            "veth",
            "peer",
            "name",
            &b_name,
            "netns",
            b_host.netns(),
        ])?;
        if let Some(mtu) = opts.mtu {
            let mtu = mtu.to_string();
            a.ip(["link", "set", &a_name, "mtu", &mtu])?;
            b_host.ip(["link", "set", &b_name, "mtu", &mtu])?;
        }
        if let Some(dev) = bridge_dev {
            b_host.ip(["link", "set", &b_name, "master", dev])?;
        }
        a.ip(["link", "set", &a_name, "up"])?;
        b_host.ip(["link", "set", &b_name, "up"])?;
        for cidr in &opts.addrs_a {
            a.add_addr(&a_name, cidr)?;
        }
        for cidr in &opts.addrs_b {
            b_host.add_addr(&b_name, cidr)?;
        }
        a.wait_running(&a_name)?;
        b_host.wait_running(&b_name)?;
        Ok(Link {
            a: a.interface(&a_name)?,
            b: b_host.interface(&b_name)?,
        })
    }

    /// Tears down now and reports the first failure, where `drop` can only
    /// print it.
    pub fn close(self) -> Result<()> {
        self.teardown()
    }

    /// Namespaces named `prefix` or `prefix.*` that still exist.
    pub fn leftovers(prefix: &str) -> Result<Vec<String>> {
        let under = format!("{prefix}.");
        Ok(list_netns()?
            .into_iter()
            .filter(|n| n == prefix || n.starts_with(&under))
            .collect())
    }

    fn teardown(&self) -> Result<()> {
        // Children first: a process still inside a namespace keeps it, and
        // its interfaces, alive after its name is gone.
        let children = std::mem::take(&mut *lock(&self.shared.children));
        for slot in &children {
            kill_slot(slot);
        }
        let namespaces = std::mem::take(&mut *lock(&self.shared.namespaces));
        let mut first_err = None;
        for ns in namespaces.iter().rev() {
            if let Err(e) = remove_netns(ns) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            // Drop cannot return the error, and a leaked namespace must not
            // go unnoticed.
            eprintln!("xlb topology {}: teardown failed: {e}", self.prefix);
        }
    }
}

/// One network namespace of a [`Topology`]. Cheap to clone.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

struct HostInner {
    name: String,
    netns: String,
    next_if: AtomicU32,
    shared: Arc<Shared>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("netns", &self.inner.netns)
            .finish()
    }
}

impl Host {
    /// The name given to [`Topology::host`].
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The namespace's full name, as `ip netns` knows it.
    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    /// Runs `ip -n <netns> args...`: the escape hatch for anything the
    /// helpers do not cover (`advmss`, policy routing, neighbours, ...).
    pub fn ip<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(Command::new("ip").arg("-n").arg(self.netns()).args(args))
    }

    /// A command that runs `program` inside this namespace (through
    /// `ip netns exec`, which also shows it this namespace's /sys), with
    /// stdin closed. Add arguments and stdio, then `output()` it or pass it
    /// to [`Host::spawn`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"])
            .arg(self.netns())
            .arg(program)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `program args...` in the namespace to completion; a non-zero exit
    /// is an error carrying its stderr.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(self.command(program).args(args))
    }

    /// Starts a command made by [`Host::command`] in the background. The
    /// process (with everything it forks: it leads its own process group) is
    /// killed when the guard is dropped, or at the latest when the topology is.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Spawned> {
        let mut args = cmd.get_args();
        let in_namespace = cmd.get_program() == "ip"
            && args.next() == Some(OsStr::new("netns"))
            && args.next() == Some(OsStr::new("exec"))
            && args.next() == Some(OsStr::new(self.netns()));
        if !in_namespace {
            return Err(TopologyError::Invalid {
                what: "command",
                value: describe(cmd),
                reason: "not made by Host::command for this host, so it would not run in its namespace",
            });
        }
        let command = describe(cmd);
        let child = cmd
            .process_group(0)
            .spawn()
            .map_err(|source| TopologyError::Spawn {
                command: command.clone(),
                source,
            })?;
        let pid = child.id();
        let slot: ChildSlot = Arc::new(Mutex::new(Some(child)));
        let mut children = lock(&self.inner.shared.children);
        children.retain(|s| lock(s).is_some());
        children.push(Arc::clone(&slot));
        Ok(Spawned { slot, pid, command })
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns
    /// its result; a panic in `f` continues in the caller.
    ///
    /// Sockets opened and XDP programs attached inside `f` belong to this
    /// namespace and may be used from any thread afterwards. Note that such a
    /// socket keeps the namespace alive until it is closed, and that
    /// `/proc/net` (which follows the main thread) still shows the caller's
    /// namespace; `/proc/thread-self/net` and `/proc/sys/net` show this one.
    pub fn run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = netns_path(self.netns());
        // Opened here so a missing namespace is an error, not a thread panic.
        let ns = File::open(&path).map_err(|source| TopologyError::Io {
            context: format!("opening {}", path.display()),
            source,
        })?;
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("netns-{}", self.name()))
                .spawn_scoped(scope, move || {
                    // SAFETY: `ns` is an open namespace file; setns only
                    // changes this thread, which exists only to run `f`.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    drop(ns);
                    Ok(f())
                })
                .map_err(|source| TopologyError::Io {
                    context: format!("starting a thread for {}", self.netns()),
                    source,
                })?;
            match handle.join() {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(source)) => Err(TopologyError::Io {
                    context: format!("setns into {}", self.netns()),
                    source,
                }),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Adds an address (`198.18.0.1/24`, `fd00::1/64`) to `dev`.
    pub fn add_addr(&self, dev: &str, cidr: &str) -> Result<()> {
        let (addr, _) = parse_test_cidr(cidr)?;
        validate_ifname(dev)?;
        if addr.is_ipv6() {
            // Also skips DAD on devices that predate the host's sysctls.
            self.ip(["addr", "add", cidr, "dev", dev, "nodad"])?;
        } else {
            self.ip(["addr", "add", cidr, "dev", dev])?;
        }
        Ok(())
    }

    /// Adds a route to `dest` (a CIDR or `default`) via one gateway, or with
    /// several, an ECMP multipath route (`nexthop via X nexthop via Y`).
    /// How flows spread over the paths is governed by
    /// `net.ipv4.fib_multipath_hash_policy` / `net.ipv6.fib_multipath_hash_policy`.
    pub fn add_route(&self, dest: &str, via: &[IpAddr]) -> Result<()> {
        let Some(first) = via.first() else {
            return Err(TopologyError::Invalid {
                what: "route",
                value: dest.to_owned(),
                reason: "needs at least one gateway",
            });
        };
        let v6 = first.is_ipv6();
        if dest != "default" {
            let (addr, _) = parse_test_cidr(dest)?;
            if addr.is_ipv6() != v6 {
                return Err(TopologyError::Invalid {
                    what: "route",
                    value: dest.to_owned(),
                    reason: "destination and gateways are of different address families",
                });
            }
        }
        for gw in via {
            if gw.is_ipv6() != v6 {
                return Err(TopologyError::Invalid {
                    what: "gateway",
                    value: gw.to_string(),
                    reason: "gateways of one route must share an address family",
                });
            }
            if !in_test_range(*gw) {
                return Err(outside_test_range("gateway", gw.to_string()));
            }
        }
        let mut args = vec![
            if v6 { "-6" } else { "-4" }.to_owned(),
            "route".into(),
            "add".into(),
            dest.into(),
        ];
        if let [gw] = via {
            args.extend(["via".into(), gw.to_string()]);
        } else {
            for gw in via {
                args.extend(["nexthop".into(), "via".into(), gw.to_string()]);
            }
        }
        self.ip(args)?;
        Ok(())
    }

    /// Writes a `net.*` sysctl in this namespace, e.g.
    /// `sysctl("net.ipv4.conf.eth0.forwarding", "1")`. Use the slash form
    /// (`net/ipv4/conf/eth0.10/forwarding`) for interface names with dots.
    /// Only `net.*` is accepted: other sysctls are not per namespace, and
    /// writing them would change the machine itself.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key)?;
        self.run_in(|| std::fs::write(&path, value))?
            .map_err(|source| TopologyError::Io {
                context: format!(
                    "writing {value:?} to {} in {}",
                    path.display(),
                    self.netns()
                ),
                source,
            })
    }

    /// Reads a `net.*` sysctl in this namespace, without the trailing newline.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key)?;
        let value = self
            .run_in(|| std::fs::read_to_string(&path))?
            .map_err(|source| TopologyError::Io {
                context: format!("reading {} in {}", path.display(), self.netns()),
                source,
            })?;
        Ok(value.trim_end().to_owned())
    }

    /// Turns tx checksum offload of `dev` on or off: the same feature bits as
    /// `ethtool -K dev tx off`, without needing ethtool. Off is what a veth
    /// client needs when an XDP_TX hop follows: the half-done checksum state
    /// does not survive the conversion to an XDP frame.
    pub fn set_tx_checksum(&self, dev: &str, on: bool) -> Result<()> {
        validate_ifname(dev)?;
        self.in_netns_io(&format!("setting tx checksum of {dev}"), || {
            let sock = IfSocket::new()?;
            sock.ethtool(dev, ETHTOOL_STXCSUM, u32::from(on))?;
            if sock.ethtool(dev, ETHTOOL_GTXCSUM, 0)? != u32::from(on) {
                return Err(io::Error::other("the device does not allow changing it"));
            }
            Ok(())
        })
    }

    /// Whether tx checksum offload of `dev` is on.
    pub fn tx_checksum(&self, dev: &str) -> Result<bool> {
        validate_ifname(dev)?;
        self.in_netns_io(&format!("reading tx checksum of {dev}"), || {
            Ok(IfSocket::new()?.ethtool(dev, ETHTOOL_GTXCSUM, 0)? != 0)
        })
    }

    /// Name, ifindex (in this namespace) and MAC address of `dev`.
    pub fn interface(&self, dev: &str) -> Result<Interface> {
        validate_ifname(dev)?;
        let (ifindex, mac) = self.in_netns_io(&format!("looking up {dev}"), || {
            let sock = IfSocket::new()?;
            Ok((sock.ifindex(dev)?, sock.mac(dev)?))
        })?;
        Ok(Interface {
            netns: self.netns().to_owned(),
            name: dev.to_owned(),
            ifindex,
            mac,
        })
    }

    fn wait_running(&self, dev: &str) -> Result<()> {
        let running = self.in_netns_io(&format!("waiting for {dev}"), || {
            let sock = IfSocket::new()?;
            let deadline = Instant::now() + LINK_UP_TIMEOUT;
            loop {
                if sock.flags(dev)? & libc::IFF_RUNNING != 0 {
                    return Ok(true);
                }
                if Instant::now() >= deadline {
                    return Ok(false);
                }
                thread::sleep(Duration::from_millis(5));
            }
        })?;
        if running {
            Ok(())
        } else {
            Err(TopologyError::NotRunning {
                netns: self.netns().to_owned(),
                dev: dev.to_owned(),
                waited: LINK_UP_TIMEOUT,
            })
        }
    }

    fn in_netns_io<T: Send>(
        &self,
        what: &str,
        f: impl FnOnce() -> io::Result<T> + Send,
    ) -> Result<T> {
        self.run_in(f)?.map_err(|source| TopologyError::Io {
            context: format!("{what} in {}", self.netns()),
            source,
        })
    }

    fn next_ifname(&self, base: &str) -> String {
        format!(
            "{base}{}",
            self.inner.next_if.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// A host holding the Linux bridge every linked host is plugged into.
#[derive(Clone, Debug)]
pub struct Bridge {
    host: Host,
    dev: String,
}

impl Bridge {
    /// The fabric namespace, e.g. to turn off tx checksum on a port.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The bridge device's name in the fabric namespace.
    pub fn dev(&self) -> &str {
        &self.dev
    }
}

/// The far side of a [`Topology::link`]: another host, or a bridge port.
#[derive(Clone, Copy, Debug)]
pub enum Peer<'a> {
    Host(&'a Host),
    Bridge(&'a Bridge),
}

impl<'a> From<&'a Host> for Peer<'a> {
    fn from(h: &'a Host) -> Self {
        Peer::Host(h)
    }
}

impl<'a> From<&'a Bridge> for Peer<'a> {
    fn from(b: &'a Bridge) -> Self {
        Peer::Bridge(b)
    }
}

/// Addresses, MTU and names for a [`Topology::link`]; side `a` is the host
/// passed first.
#[derive(Clone, Debug, Default)]
pub struct LinkOpts {
    addrs_a: Vec<String>,
    addrs_b: Vec<String>,
    mtu: Option<u32>,
    name_a: Option<String>,
    name_b: Option<String>,
}

impl LinkOpts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an address (`198.18.0.1/24`, `fd00::1/64`) on side `a`.
    pub fn addr_a(mut self, cidr: impl Into<String>) -> Self {
        self.addrs_a.push(cidr.into());
        self
    }

    /// Adds an address on side `b` (not allowed when `b` is a bridge).
    pub fn addr_b(mut self, cidr: impl Into<String>) -> Self {
        self.addrs_b.push(cidr.into());
        self
    }

    /// MTU of both ends; encapsulating hops need room for the outer header.
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// Interface names instead of `eth<k>` / `port<k>` (at most 15 bytes).
    pub fn names(mut self, a: impl Into<String>, b: impl Into<String>) -> Self {
        self.name_a = Some(a.into());
        self.name_b = Some(b.into());
        self
    }
}

/// Both ends of a veth pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub a: Interface,
    pub b: Interface,
}

/// One network interface, as seen inside its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub netns: String,
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// Guard for a background process started by [`Host::spawn`]: dropping it
/// kills the process group with SIGKILL and reaps it.
#[derive(Debug)]
pub struct Spawned {
    slot: ChildSlot,
    pid: u32,
    command: String,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child's stdout, if the command piped it and it was not taken yet.
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        lock(&self.slot).as_mut().and_then(|c| c.stdout.take())
    }

    /// The child's stderr, if the command piped it and it was not taken yet.
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        lock(&self.slot).as_mut().and_then(|c| c.stderr.take())
    }

    /// The exit status if the process has ended, without waiting.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        match lock(&self.slot).as_mut() {
            Some(child) => child
                .try_wait()
                .map_err(|source| self.io_error("polling", source)),
            None => Ok(None),
        }
    }

    /// Waits for the process to end by itself and collects what it wrote to
    /// piped stdout/stderr. Topology teardown still kills it if it never ends.
    pub fn wait_with_output(self) -> Result<Output> {
        // Taken out of the slot so the wait does not hold the lock that
        // teardown needs.
        let child = lock(&self.slot).take();
        match child {
            Some(child) => child
                .wait_with_output()
                .map_err(|source| self.io_error("waiting for", source)),
            None => Err(self.io_error("waiting for", io::Error::other("already reaped"))),
        }
    }

    fn io_error(&self, what: &str, source: io::Error) -> TopologyError {
        TopologyError::Io {
            context: format!("{what} `{}` (pid {})", self.command, self.pid),
            source,
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        kill_slot(&self.slot);
    }
}

fn kill_slot(slot: &ChildSlot) {
    let child = lock(slot).take();
    if let Some(mut child) = child {
        // The child leads its own process group (`Host::spawn`), so this
        // also reaches what it forked. The unreaped child keeps the id from
        // being reused.
        if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: plain kill(2) on a process group we created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A socket whose only purpose is to carry interface ioctls; it must be
/// created inside the namespace, since ioctls act on the socket's namespace.
struct IfSocket(OwnedFd);

impl IfSocket {
    fn new() -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn request(dev: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // Callers validated `dev` (at most 15 bytes), so the name stays
        // NUL-terminated by the zeroed tail.
        for (dst, src) in ifr.ifr_name.iter_mut().zip(dev.bytes().take(MAX_IFNAME)) {
            *dst = src as libc::c_char;
        }
        ifr
    }

    fn ioctl(&self, request: libc::c_ulong, ifr: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: every request used here reads and writes a `struct ifreq`
        // (SIOCETHTOOL through the pointer it carries, which the caller
        // keeps alive for the duration of the call).
        if unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, ifr as *mut libc::ifreq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn ifindex(&self, dev: &str) -> io::Result<u32> {
        let mut ifr = Self::request(dev);
        self.ioctl(libc::SIOCGIFINDEX, &mut ifr)?;
        // SAFETY: SIOCGIFINDEX filled in the ifindex member.
        let index = unsafe { ifr.ifr_ifru.ifru_ifindex };
        u32::try_from(index).map_err(|_| io::Error::other("negative ifindex"))
    }

    fn mac(&self, dev: &str) -> io::Result<[u8; 6]> {
        let mut ifr = Self::request(dev);
        self.ioctl(libc::SIOCGIFHWADDR, &mut ifr)?;
        // SAFETY: SIOCGIFHWADDR filled in the hwaddr member.
        let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
        let mut mac = [0u8; 6];
        for (dst, src) in mac.iter_mut().zip(data) {
            *dst = src as u8;
        }
        Ok(mac)
    }

    fn flags(&self, dev: &str) -> io::Result<libc::c_int> {
        let mut ifr = Self::request(dev);
        self.ioctl(libc::SIOCGIFFLAGS, &mut ifr)?;
        // SAFETY: SIOCGIFFLAGS filled in the flags member. The kernel's
        // flags are a 16-bit field here, so reinterpret rather than sign-extend.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        Ok(libc::c_int::from(flags as u16))
    }

    /// One legacy `struct ethtool_value` command; returns the value the
    /// kernel wrote back.
    fn ethtool(&self, dev: &str, cmd: u32, data: u32) -> io::Result<u32> {
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        let mut value = EthtoolValue { cmd, data };
        let mut ifr = Self::request(dev);
        ifr.ifr_ifru.ifru_data = (&raw mut value).cast::<libc::c_char>();
        self.ioctl(libc::SIOCETHTOOL, &mut ifr)?;
        Ok(value.data)
    }
}

/// Runs a command to completion; a non-zero exit becomes an error with its
/// stderr.
fn run(cmd: &mut Command) -> Result<Output> {
    let command = describe(cmd);
    // A process group of its own: a second Ctrl-C at the terminal reaches
    // the whole foreground group, and must not kill the `ip netns del` of
    // a teardown already under way.
    let output = cmd
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .map_err(|source| TopologyError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(TopologyError::Command {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

fn list_netns() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        // No namespace was ever named on this machine.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TopologyError::Io {
                context: format!("listing {NETNS_DIR}"),
                source,
            });
        }
    };
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect())
}

/// Kills whatever still runs in the namespace, then deletes its name. The
/// kill catches processes that escaped their group (daemons) or belong to a
/// dead run; without it the namespace and its veths would outlive the name.
fn remove_netns(name: &str) -> Result<()> {
    if let Ok(out) = run(Command::new("ip").args(["netns", "pids", name])) {
        let me = std::process::id();
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<libc::pid_t>().ok())
        {
            if u32::try_from(pid).is_ok_and(|p| p != me) {
                // SAFETY: plain kill(2); the pid was just read from the
                // namespace we are deleting.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    run(Command::new("ip").args(["netns", "del", name]))?;
    Ok(())
}

/// Removes namespaces of this scheme whose owning process is gone. Best
/// effort: another process may be sweeping the same names concurrently.
fn sweep_stale() {
    let Ok(names) = list_netns() else { return };
    for name in names {
        if let Some((pid, start)) = owner_of(&name)
            && process_start(pid) != Some(start)
        {
            let _ = remove_netns(&name);
        }
    }
}

/// The (pid, start time) encoded in a name of this scheme.
fn owner_of(name: &str) -> Option<(u32, u64)> {
    let mut fields = name.split('.');
    if fields.next()? != SCHEME {
        return None;
    }
    let _tag = fields.next()?;
    let pid = fields.next()?.parse().ok()?;
    let start = u64::from_str_radix(fields.next()?, 16).ok()?;
    Some((pid, start))
}

/// Start time of a live process (clock ticks since boot). Together with the
/// pid it names a process uniquely, so a reused pid is not mistaken for the
/// owner of old namespaces.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after its closing parenthesis start with field 3, and the start
    // time is field 22.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

fn validate_label(what: &'static str, value: &str) -> Result<()> {
    let reason = if value.is_empty() || value.len() > MAX_LABEL {
        "must be 1 to 20 characters"
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        "may hold only ASCII letters, digits, `_` and `-`"
    } else {
        return Ok(());
    };
    Err(TopologyError::Invalid {
        what,
        value: value.to_owned(),
        reason,
    })
}

/// The kernel's rules for interface names (dev_valid_name).
fn validate_ifname(name: &str) -> Result<()> {
    let reason = if name.is_empty() || name.len() > MAX_IFNAME {
        "must be 1 to 15 bytes"
    } else if name == "." || name == ".." {
        "is reserved"
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        "may not contain `/`, `:`, NUL or whitespace"
    } else {
        return Ok(());
    };
    Err(TopologyError::Invalid {
        what: "interface name",
        value: name.to_owned(),
        reason,
    })
}

/// 198.18.0.0/15 (RFC 2544 benchmarking) and fd00::/8 (unique local): test
/// traffic uses only these, so that a mistake can never address a real network.
fn in_test_range(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 198 && o[1] & 0xfe == 18
        }
        IpAddr::V6(a) => a.octets()[0] == 0xfd,
    }
}

fn outside_test_range(what: &'static str, value: String) -> TopologyError {
    TopologyError::Invalid {
        what,
        value,
        reason: "test addresses must lie in 198.18.0.0/15 or fd00::/8",
    }
}

/// Parses `addr/len` whose whole network lies in the test ranges.
fn parse_test_cidr(cidr: &str) -> Result<(IpAddr, u8)> {
    let invalid = |reason| TopologyError::Invalid {
        what: "address",
        value: cidr.to_owned(),
        reason,
    };
    let (addr, len) = cidr
        .split_once('/')
        .ok_or_else(|| invalid("expected ADDRESS/PREFIX-LENGTH"))?;
    let addr: IpAddr = addr.parse().map_err(|_| invalid("not an IP address"))?;
    let len: u8 = len.parse().map_err(|_| invalid("bad prefix length"))?;
    // The shortest prefix that still stays inside the test range.
    let (shortest, longest) = if addr.is_ipv4() { (15, 32) } else { (8, 128) };
    if len > longest {
        return Err(invalid("bad prefix length"));
    }
    if !in_test_range(addr) || len < shortest {
        return Err(outside_test_range("address", cidr.to_owned()));
    }
    Ok((addr, len))
}

fn sysctl_path(key: &str) -> Result<PathBuf> {
    let invalid = |reason| TopologyError::Invalid {
        what: "sysctl",
        value: key.to_owned(),
        reason,
    };
    let rel = if key.contains('/') {
        key.to_owned()
    } else {
        key.replace('.', "/")
    };
    let mut parts = rel.split('/');
    if parts.next() != Some("net") {
        return Err(invalid(
            "only net.* sysctls are per namespace; others would change the machine",
        ));
    }
    if parts.any(|p| p.is_empty() || p == "." || p == "..") {
        return Err(invalid("malformed key"));
    }
    Ok(PathBuf::from("/proc/sys").join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
    use std::panic::{AssertUnwindSafe, catch_unwind};

    /// Skips (returns false) only when not root and CI is unset: in CI a
    /// missing privilege must fail loudly instead of passing silently.
    fn privileged() -> bool {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "topology tests need root, and CI is set, so they may not be skipped"
        );
        eprintln!("skipping: topology tests need root");
        false
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
    }

    /// A client in `from` connects to a listener in `to` and they swap a
    /// message each way: reachability plus a working reverse path.
    fn tcp_exchange(from: &Host, to: &Host, to_addr: IpAddr, from_addr: IpAddr) {
        let listener = to
            .run_in(|| TcpListener::bind(SocketAddr::new(to_addr, 0)))
            .unwrap()
            .unwrap();
        let target = listener.local_addr().unwrap();
        let mut client = from
            .run_in(|| TcpStream::connect_timeout(&target, Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        let (mut server, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), from_addr);
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    fn ping_available() -> bool {
        Command::new("ping")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn assert_gone(prefix: &str) {
        assert_eq!(Topology::leftovers(prefix).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn topology_two_hosts_on_a_bridge_reach_each_other_v4_and_v6() {
        if !privileged() {
            return;
        }
        let topo = Topology::new("reach").unwrap();
        let fabric = topo.bridge("fabric").unwrap();
        let a = topo.host("a").unwrap();
        let b = topo.host("b").unwrap();
        let la = topo
            .link(
                &a,
                &fabric,
                LinkOpts::new()
                    .addr_a("198.18.0.1/24")
                    .addr_a("fd00:18::1/64")
                    .mtu(1600),
            )
            .unwrap();
        let lb = topo
            .link(
                &b,
                &fabric,
                LinkOpts::new()
                    .addr_a("198.18.0.2/24")
                    .addr_a("fd00:18::2/64")
                    .mtu(1600),
            )
            .unwrap();

        assert_eq!((la.a.name.as_str(), la.b.name.as_str()), ("eth0", "port0"));
        assert_eq!((lb.a.name.as_str(), lb.b.name.as_str()), ("eth0", "port1"));
        assert_eq!(la.a.netns, a.netns());
        assert_eq!(la.b.netns, fabric.host().netns());
        assert_ne!(la.a.mac, [0; 6]);
        assert_ne!(la.a.mac, lb.a.mac);
        // ifindexes are per namespace; check them against the kernel's view.
        let shown =
            String::from_utf8(a.ip(["-o", "link", "show", "dev", "eth0"]).unwrap().stdout).unwrap();
        assert!(
            shown.starts_with(&format!("{}: eth0@", la.a.ifindex)),
            "{shown}"
        );
        let mac = la.a.mac.map(|b| format!("{b:02x}")).join(":");
        assert!(shown.contains(&mac), "{shown} lacks {mac}");
        assert!(shown.contains("mtu 1600"), "{shown}");
        let port = String::from_utf8(
            fabric
                .host()
                .ip(["-o", "link", "show", "dev", "port0"])
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(port.contains("master br0"), "{port}");

        tcp_exchange(&a, &b, v4("198.18.0.2"), v4("198.18.0.1"));
        tcp_exchange(&b, &a, v6("fd00:18::1"), v6("fd00:18::2"));
        if ping_available() {
            a.exec("ping", ["-c1", "-W1", "198.18.0.2"]).unwrap();
            a.exec("ping", ["-c1", "-W1", "fd00:18::2"]).unwrap();
        }

        let prefix = topo.prefix().to_owned();
        assert_eq!(Topology::leftovers(&prefix).unwrap().len(), 3);
        topo.close().unwrap();
        assert_gone(&prefix);
    }

    #[test]
    fn topology_host_to_host_link_and_ecmp_routes() {
        if !privileged() {
            return;
        }
        let topo = Topology::new("ecmp").unwrap();
        let fabric = topo.bridge("fabric").unwrap();
        let client = topo.host("client").unwrap();
        topo.link(
            &client,
            &fabric,
            LinkOpts::new()
                .addr_a("198.18.1.1/24")
                .addr_a("fd00:1::1/64"),
        )
        .unwrap();
        client
            .sysctl("net.ipv4.fib_multipath_hash_policy", "1")
            .unwrap();

        client
            .add_route("198.19.0.0/24", &[v4("198.18.1.2"), v4("198.18.1.3")])
            .unwrap();
        let route = client.ip(["-4", "route", "show", "198.19.0.0/24"]).unwrap();
        let route = String::from_utf8(route.stdout).unwrap();
        assert_eq!(route.matches("nexthop via").count(), 2, "{route}");
        assert!(
            route.contains("198.18.1.2") && route.contains("198.18.1.3"),
            "{route}"
        );

        client
            .add_route("fd00:99::/64", &[v6("fd00:1::2"), v6("fd00:1::3")])
            .unwrap();
        let route = client.ip(["-6", "route", "show", "fd00:99::/64"]).unwrap();
        let route = String::from_utf8(route.stdout).unwrap();
        assert_eq!(route.matches("nexthop via").count(), 2, "{route}");

        client.add_route("default", &[v4("198.18.1.2")]).unwrap();
        let route = String::from_utf8(
            client
                .ip(["-4", "route", "show", "default"])
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(route.contains("default via 198.18.1.2"), "{route}");

        // A direct host-to-host pair, both ends addressed.
        let server = topo.host("server").unwrap();
        let direct = topo
            .link(
                &client,
                &server,
                LinkOpts::new()
                    .addr_a("198.18.2.1/30")
                    .addr_b("198.18.2.2/30")
                    .names("to-server", "to-client"),
            )
            .unwrap();
        assert_eq!(direct.b.name, "to-client");
        tcp_exchange(&client, &server, v4("198.18.2.2"), v4("198.18.2.1"));

        // Refused before anything reaches the kernel.
        assert!(matches!(
            client.add_route("8.8.8.0/24", &[v4("198.18.1.2")]),
            Err(TopologyError::Invalid { .. })
        ));
        assert!(matches!(
            client.add_route("198.19.1.0/24", &[v4("10.0.0.1")]),
            Err(TopologyError::Invalid { .. })
        ));
        assert!(matches!(
            client.add_route("198.19.1.0/24", &[v4("198.18.1.2"), v6("fd00:1::2")]),
            Err(TopologyError::Invalid { .. })
        ));
        assert!(matches!(
            client.add_route("198.19.1.0/24", &[]),
            Err(TopologyError::Invalid { .. })
        ));
        assert!(matches!(
            client.add_addr("lo", "10.1.2.3/8"),
            Err(TopologyError::Invalid { .. })
        ));
        assert!(matches!(
            topo.link(&client, &fabric, LinkOpts::new().addr_b("198.18.1.9/24")),
            Err(TopologyError::Invalid { .. })
        ));
        // A kernel refusal names the command and carries ip's message.
        match client.add_route("198.19.0.0/24", &[v4("198.18.1.2")]) {
            Err(TopologyError::Command {
                command, stderr, ..
            }) => {
                assert!(command.starts_with("ip -n xlb.ecmp."), "{command}");
                assert!(!stderr.is_empty());
            }
            other => panic!("expected a command error, got {other:?}"),
        }
    }

    #[test]
    fn topology_tx_checksum_off_reads_back_via_ioctl() {
        if !privileged() {
            return;
        }
        let topo = Topology::new("csum").unwrap();
        let a = topo.host("a").unwrap();
        let b = topo.host("b").unwrap();
        let link = topo.link(&a, &b, LinkOpts::new()).unwrap();
        assert!(
            a.tx_checksum(&link.a.name).unwrap(),
            "veth starts with tx checksum offload on"
        );
        a.set_tx_checksum(&link.a.name, false).unwrap();
        assert!(!a.tx_checksum(&link.a.name).unwrap());
        // Only that end changed.
        assert!(b.tx_checksum(&link.b.name).unwrap());
        a.set_tx_checksum(&link.a.name, true).unwrap();
        assert!(a.tx_checksum(&link.a.name).unwrap());
        assert!(matches!(
            a.tx_checksum("nosuchdev"),
            Err(TopologyError::Io { .. })
        ));
    }

    #[test]
    fn topology_sysctls_stay_in_the_namespace() {
        if !privileged() {
            return;
        }
        let topo = Topology::new("sysctl").unwrap();
        let h = topo.host("h").unwrap();
        assert_eq!(
            h.read_sysctl("net.ipv6.conf.default.accept_dad").unwrap(),
            "0"
        );
        let root_before = std::fs::read_to_string("/proc/sys/net/ipv4/conf/lo/forwarding").unwrap();
        let flipped = if root_before.trim() == "1" { "0" } else { "1" };
        h.sysctl("net.ipv4.conf.lo.forwarding", flipped).unwrap();
        assert_eq!(
            h.read_sysctl("net/ipv4/conf/lo/forwarding").unwrap(),
            flipped
        );
        // Cross-checked through a separate process in the namespace.
        let seen = h
            .exec("cat", ["/proc/sys/net/ipv4/conf/lo/forwarding"])
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&seen.stdout).trim(), flipped);
        let root_after = std::fs::read_to_string("/proc/sys/net/ipv4/conf/lo/forwarding").unwrap();
        assert_eq!(root_before, root_after, "the machine's own sysctl changed");
        assert!(matches!(
            h.sysctl("kernel.hostname", "x"),
            Err(TopologyError::Invalid { .. })
        ));
        assert!(matches!(
            h.sysctl("net/../kernel/x", "1"),
            Err(TopologyError::Invalid { .. })
        ));
    }

    #[test]
    fn topology_teardown_kills_children_and_removes_namespaces() {
        if !privileged() {
            return;
        }
        let topo = Topology::new("down").unwrap();
        let fabric = topo.bridge("fabric").unwrap();
        let h = topo.host("h").unwrap();
        topo.link(&h, &fabric, LinkOpts::new().addr_a("198.18.3.1/24"))
            .unwrap();
        let kept = h.spawn(h.command("sleep").arg("1000")).unwrap();
        let dropped = h.spawn(h.command("sleep").arg("1000")).unwrap();
        let dropped_pid = dropped.pid();
        assert!(dropped.try_wait().unwrap().is_none());
        drop(dropped);
        assert!(!PathBuf::from(format!("/proc/{dropped_pid}")).exists());

        // Something the guards do not know: a process started outside spawn.
        let mut stray = Command::new("ip")
            .args(["netns", "exec", h.netns(), "sleep", "1000"])
            .spawn()
            .unwrap();
        // It joins the namespace only once `ip` has run setns.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !String::from_utf8_lossy(
            &run(Command::new("ip").args(["netns", "pids", h.netns()]))
                .unwrap()
                .stdout,
        )
        .split_whitespace()
        .any(|p| p == stray.id().to_string())
        {
            assert!(
                Instant::now() < deadline,
                "stray never entered the namespace"
            );
            thread::sleep(Duration::from_millis(5));
        }

        let finished = h
            .spawn(h.command("echo").arg("hello").stdout(Stdio::piped()))
            .unwrap();
        let out = finished.wait_with_output().unwrap();
        assert_eq!(out.stdout, b"hello\n");

        assert!(matches!(
            h.spawn(Command::new("sleep").arg("1")),
            Err(TopologyError::Invalid { .. })
        ));

        let kept_pid = kept.pid();
        let prefix = topo.prefix().to_owned();
        drop(topo);
        assert_gone(&prefix);
        assert!(!PathBuf::from(format!("/proc/{kept_pid}")).exists());
        // The stray was SIGKILLed by teardown.
        let status = stray.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        // The guard outlived its topology; dropping it now must be harmless.
        drop(kept);
    }

    #[test]
    fn topology_teardown_runs_when_a_test_panics() {
        if !privileged() {
            return;
        }
        let mut prefix = None;
        let mut child_pid = None;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let topo = Topology::new("panic").unwrap();
            prefix = Some(topo.prefix().to_owned());
            let fabric = topo.bridge("fabric").unwrap();
            let h = topo.host("h").unwrap();
            topo.link(&h, &fabric, LinkOpts::new().addr_a("198.18.4.1/24"))
                .unwrap();
            let child = h.spawn(h.command("sleep").arg("1000")).unwrap();
            child_pid = Some(child.pid());
            // Leaked on purpose: only the topology is left to kill it.
            std::mem::forget(child);
            h.run_in::<_, ()>(|| panic!("deliberate panic inside the namespace"))
                .unwrap();
        }));
        let payload = result.expect_err("the closure must have panicked");
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"deliberate panic inside the namespace")
        );
        assert_gone(&prefix.unwrap());
        assert!(!PathBuf::from(format!("/proc/{}", child_pid.unwrap())).exists());
    }

    #[test]
    fn topology_sweeps_namespaces_of_dead_processes() {
        if !privileged() {
            return;
        }
        /// Deletes the fake namespaces even if an assertion fails.
        struct Cleanup(Vec<String>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                for n in &self.0 {
                    let _ = Command::new("ip").args(["netns", "del", n]).output();
                }
            }
        }
        let mut dead = Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        let me = std::process::id();
        let my_start = process_start(me).unwrap();
        let names = Cleanup(vec![
            format!("xlb.sweep.{}.1.0.h", dead.id()),
            // Our pid, but another process's start time: a reused pid.
            format!("xlb.sweep.{me}.{:x}.0.h", my_start + 1),
            // Ours, alive: must survive.
            format!("xlb.sweep.{me}.{my_start:x}.4000000000.h"),
        ]);
        // Tests in other threads build topologies too, and their sweeps
        // may remove a dead process's namespace while `ip netns add` is
        // still making it; that add then fails, and the namespace is gone
        // as the test wants. The live one is never swept: its add must work.
        for (i, n) in names.0.iter().enumerate() {
            let added = run(Command::new("ip").args(["netns", "add", n]));
            if i == 2 || list_netns().unwrap().contains(n) {
                added.unwrap();
            }
        }
        let _topo = Topology::new("sweep").unwrap();
        let left = list_netns().unwrap();
        assert!(!left.contains(&names.0[0]));
        assert!(!left.contains(&names.0[1]));
        assert!(left.contains(&names.0[2]));
    }

    #[test]
    fn topology_validation() {
        assert!(matches!(
            Topology::new("a.b"),
            Err(TopologyError::Invalid { .. })
        ));
        assert!(matches!(
            Topology::new(""),
            Err(TopologyError::Invalid { .. })
        ));
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("exactly15bytes_").is_ok());
        assert!(validate_ifname("sixteen_bytes_xx").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("..").is_err());
        assert!(parse_test_cidr("198.18.0.1/24").is_ok());
        assert!(parse_test_cidr("198.19.255.1/32").is_ok());
        assert!(parse_test_cidr("198.18.0.0/15").is_ok());
        assert!(parse_test_cidr("198.18.0.0/14").is_err());
        assert!(parse_test_cidr("198.20.0.1/24").is_err());
        assert!(parse_test_cidr("10.0.0.1/8").is_err());
        assert!(parse_test_cidr("fd00::1/64").is_ok());
        assert!(parse_test_cidr("fc00::1/64").is_err());
        assert!(parse_test_cidr("2001:db8::1/64").is_err());
        assert!(parse_test_cidr("198.18.0.1/33").is_err());
        assert!(parse_test_cidr("198.18.0.1").is_err());
        assert_eq!(owner_of("xlb.t.123.ff.0.h"), Some((123, 255)));
        assert_eq!(owner_of("other.t.123.ff.0.h"), None);
        assert_eq!(owner_of("xlb.t.abc.ff.0.h"), None);
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert!(sysctl_path("vm.swappiness").is_err());
        assert!(process_start(std::process::id()).is_some());
    }
}
