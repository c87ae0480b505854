//! Daemon sites: real `xlb run` daemons in network namespaces on one
//! fabric bridge, with their scratch directory and bpffs, all removed on
//! drop, also while a failed test unwinds.
//!
//! - [`Ground`]: the topology with its fabric bridge, the scratch directory
//!   and the bpffs that every site stands on; [`Ground::node`] links an xlb
//!   node to the fabric as `eth0`.
//! - [`Node`]: one xlb node: its namespace, its config file, control
//!   socket, state file and pins, and its daemon, started, stopped and
//!   asked through the real command line and control API.
//! - [`Site`], built by [`SiteBuilder`]: the usual single-node site, a
//!   client, the node and decapsulating backends, on 198.18.0.0/24 and,
//!   with [`SiteBuilder::ipv6`], fd00::/64.
//!
//! A test says what differs: its backends, VIPs, families, limits and the
//! rest of its config file. Everything else (checksum offload off on the
//! client, forwarding on the node, the XDP program that a veth receiving
//! XDP_TX frames needs on its peer) is the same on every site.

use std::{
    ffi::OsString,
    fmt::Write as _,
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use xlb::{
    api::{Client, Request, Response, Status},
    dataplane::{AttachMode, Dataplane, Limits, Role},
    topology::{Bridge, Host, Link, LinkOpts, Spawned, Topology},
};

use crate::{bpffs::BpfFs, daemon::await_ready, scratch::Scratch, teardown::Teardown};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);
/// Where a node serves `/metrics`, in its namespace, unless its config
/// says otherwise.
pub const METRICS: &str = "127.0.0.1:9730";
/// Room for the outer header on the encapsulating hops.
pub const MTU: u32 = 1600;
/// A site's node limits unless the test sets its own.
pub const LIMITS: Limits = Limits {
    max_vips: 8,
    max_backends: 64,
    ring_capacity: 3 * 65537,
    conntrack_size: 4096,
};
/// A host that only decapsulates, or only passes: tiny balancer maps.
const DECAP_LIMITS: Limits = Limits {
    max_vips: 1,
    max_backends: 1,
    ring_capacity: 1,
    conntrack_size: 256,
};
/// Long enough for a loaded machine; a guard against hanging, not a target.
const START_PATIENCE: Duration = Duration::from_secs(60);
const STOP_PATIENCE: Duration = Duration::from_secs(10);

/// The namespaces, files and pins of a site. Fields drop in order:
/// namespaces, mount, files.
pub struct Ground {
    pub fabric: Bridge,
    pub topology: Topology,
    pub bpffs: BpfFs,
    pub scratch: Scratch,
    ipv6: bool,
}

impl Ground {
    /// `tag` names the namespaces and the scratch directory. Without
    /// `ipv6`, IPv6 is disabled on every host, the fabric's too, so that
    /// no router or listener message reaches a balancer.
    pub fn new(tag: &str, ipv6: bool) -> Self {
        let scratch = Scratch::new("site", tag);
        let bpffs = BpfFs::at(scratch.dir.join("bpf"));
        let topology = Topology::new(tag).expect("topology");
        let fabric = topology.bridge("fabric").expect("fabric");
        let ground = Self {
            fabric,
            topology,
            bpffs,
            scratch,
            ipv6,
        };
        ground.ipv6_as_asked(ground.fabric.host());
        ground
    }

    fn ipv6_as_asked(&self, host: &Host) {
        if !self.ipv6 {
            for key in [
                "net.ipv6.conf.all.disable_ipv6",
                "net.ipv6.conf.default.disable_ipv6",
            ] {
                host.sysctl(key, "1").expect("disabling IPv6");
            }
        }
    }

    /// A host `name` on the fabric, linked with `opts`.
    pub fn host(&self, name: &str, opts: LinkOpts) -> (Host, Link) {
        let host = self.topology.host(name).expect("a host");
        self.ipv6_as_asked(&host);
        let link = self
            .topology
            .link(&host, &self.fabric, opts)
            .unwrap_or_else(|err| panic!("linking {name}: {err}"));
        (host, link)
    }

    /// An xlb node `name` at `addr` (and `addr_v6`) on the fabric as
    /// `eth0` (its port: `port-NAME`), with its files in the scratch
    /// directory and its pins under `pin_dir`; `xlb` is the command line:
    /// the program, then any arguments it needs before xlb's own. Not
    /// configured, not started.
    pub fn node(
        &self,
        name: &str,
        (addr, addr_v6): (Ipv4Addr, Option<Ipv6Addr>),
        mtu: Option<u32>,
        pin_dir: PathBuf,
        xlb: &[OsString],
    ) -> Node {
        let addrs = [Some(addr.into()), addr_v6.map(IpAddr::from)];
        let opts = addressed(addrs.iter().flatten(), mtu).names("eth0", format!("port-{name}"));
        let (host, _) = self.host(name, opts);
        let dir = self.scratch.dir.join(name);
        fs::create_dir_all(&dir).expect("the node's directory");
        Node {
            host,
            addr,
            addr_v6,
            config: dir.join("xlb.toml"),
            socket: dir.join("run/xlb.sock"),
            state_file: dir.join("state/state.toml"),
            pin_dir,
            dir,
            xlb: xlb.to_vec(),
            daemon: None,
            starts: 0,
        }
    }

    /// What to check after the site is dropped; `pids`: its processes.
    pub fn teardown(&self, pids: impl IntoIterator<Item = u32>) -> Teardown {
        Teardown::of(&self.topology, &self.bpffs, &self.scratch, pids)
    }
}

/// Link options: `addrs` (/24 or /64) and MTU `mtu` if given.
pub fn addressed<'a>(addrs: impl IntoIterator<Item = &'a IpAddr>, mtu: Option<u32>) -> LinkOpts {
    let mut opts = LinkOpts::new();
    for addr in addrs {
        let prefix = if addr.is_ipv4() { 24 } else { 64 };
        opts = opts.addr_a(format!("{addr}/{prefix}"));
    }
    if let Some(mtu) = mtu {
        opts = opts.mtu(mtu);
    }
    opts
}

/// One xlb node and its daemon, which dies with it.
pub struct Node {
    pub host: Host,
    pub addr: Ipv4Addr,
    pub addr_v6: Option<Ipv6Addr>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state_file: PathBuf,
    pub pin_dir: PathBuf,
    dir: PathBuf,
    xlb: Vec<OsString>,
    daemon: Option<Spawned>,
    starts: u32,
}

impl Node {
    /// Writes the config file: the `[node]` table (balancer on `eth0`,
    /// native mode, its addresses as sources, its files) with `node_keys`
    /// added, `[node.limits]`, then `rest`.
    pub fn configure(&self, node_keys: &str, limits: Limits, rest: &str) {
        let mut text = format!(
            "[node]\n\
             interfaces = [\"eth0\"]\n\
             attach_mode = \"native\"\n\
             source_v4 = \"{}\"\n",
            self.addr
        );
        if let Some(v6) = self.addr_v6 {
            let _ = writeln!(text, "source_v6 = \"{v6}\"");
        }
        let _ = write!(
            text,
            "api_socket = \"{}\"\n\
             state_file = \"{}\"\n\
             pin_path = \"{}\"\n\
             {node_keys}\n\
             [node.limits]\n\
             max_vips = {}\n\
             max_backends = {}\n\
             ring_capacity = {}\n\
             conntrack_size = {}\n\n\
             {rest}",
            self.socket.display(),
            self.state_file.display(),
            self.pin_dir.display(),
            limits.max_vips,
            limits.max_backends,
            limits.ring_capacity,
            limits.conntrack_size,
        );
        fs::write(&self.config, text).expect("writing the node's config");
    }

    /// Starts `xlb run --config CONFIG ARGS...` in the node's namespace,
    /// logging to a file of its own for this run, and waits until its
    /// control API answers.
    pub fn start(&mut self, args: &[&str]) {
        assert!(
            self.daemon.is_none(),
            "{}: a daemon runs already",
            self.name()
        );
        self.starts += 1;
        let file = fs::File::create(self.log_path(self.starts)).expect("the daemon log");
        let mut command = self.host.command(&self.xlb[0]);
        command
            .args(&self.xlb[1..])
            .args(["run", "--config"])
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("the daemon log"))
            .stderr(file);
        let process = self.host.spawn(&mut command).expect("starting xlb run");
        await_ready(
            &format!("{}: xlb run", self.name()),
            &process,
            &self.socket,
            START_PATIENCE,
            || self.log(),
        );
        self.daemon = Some(process);
    }

    /// SIGTERM; the exit status and the log once it is gone.
    pub fn stop(&mut self) -> (ExitStatus, String) {
        let pid = self.pid().expect("a running daemon");
        // SAFETY: plain kill(2) of the child this harness started.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
        self.wait_exit()
    }

    /// Waits (a while) for the daemon to exit by itself: its exit status
    /// and log.
    pub fn wait_exit(&mut self) -> (ExitStatus, String) {
        let daemon = self.daemon.take().expect("a running daemon");
        let deadline = Instant::now() + STOP_PATIENCE;
        while daemon.try_wait().expect("polling the daemon").is_none() {
            assert!(
                Instant::now() < deadline,
                "{}: xlb run did not stop within {STOP_PATIENCE:?}:\n{}",
                self.name(),
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
        let status = daemon.wait_with_output().expect("reaping").status;
        (status, self.log())
    }

    /// Fails the test when the daemon exited on its own.
    #[track_caller]
    pub fn assert_running(&self) {
        if let Some(daemon) = &self.daemon
            && let Some(exit) = daemon.try_wait().expect("polling the daemon")
        {
            panic!("{}: xlb run exited ({exit}):\n{}", self.name(), self.log());
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Spawned::pid)
    }

    fn name(&self) -> &str {
        self.host.name()
    }

    fn log_path(&self, run: u32) -> PathBuf {
        self.dir.join(format!("daemon-{run}.log"))
    }

    /// The log of the latest run.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// The logs of every run so far.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for run in 1..=self.starts {
            let _ = writeln!(out, "--- {} run {run}:", self.name());
            out.push_str(&fs::read_to_string(self.log_path(run)).unwrap_or_default());
        }
        out
    }

    /// Runs the command line against the daemon.
    pub fn xlb(&self, args: &[&str]) -> Output {
        self.run_xlb(Command::new(&self.xlb[0]), args)
    }

    /// Runs the command line inside the node's namespace.
    pub fn xlb_inside(&self, args: &[&str]) -> Output {
        self.run_xlb(self.host.command(&self.xlb[0]), args)
    }

    fn run_xlb(&self, mut command: Command, args: &[&str]) -> Output {
        command
            .args(&self.xlb[1..])
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running xlb")
    }

    /// A command that must succeed; its standard output.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        stdout_of_success(args, self.xlb(args), || self.logs())
    }

    /// `GET http://ADDR/PATH` from inside the node: the status code and
    /// body.
    pub fn http_get(&self, addr: &str, path: &str) -> (u16, String) {
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        let addr: SocketAddr = addr.parse().expect("an address");
        let raw = self
            .host
            .run_in(|| -> io::Result<String> {
                let mut stream = TcpStream::connect(addr)?;
                stream.write_all(request.as_bytes())?;
                let mut raw = String::new();
                stream.read_to_string(&mut raw)?;
                Ok(raw)
            })
            .expect("entering the node")
            .unwrap_or_else(|err| panic!("{}: GET http://{addr}{path}: {err}", self.name()));
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("a status code");
        (code, body.to_owned())
    }

    /// `GET /metrics` from inside the node, which must answer it: the
    /// exposition.
    pub fn scrape(&self) -> String {
        let (code, body) = self.http_get(METRICS, "/metrics");
        assert_eq!(code, 200, "{}: GET /metrics: {body}", self.name());
        body
    }

    /// A request through the control API.
    pub fn call(&self, request: &Request) -> Response {
        Client::connect(&self.socket)
            .and_then(|mut client| client.call(request))
            .unwrap_or_else(|err| panic!("{request:?}: {err}\n{}", self.logs()))
    }

    pub fn status(&self) -> Status {
        match self.call(&Request::Status) {
            Response::Status { status } => *status,
            other => panic!("status answered {other:?}"),
        }
    }

    /// The status, if the daemon answers at all.
    pub fn try_status(&self) -> Option<Status> {
        match Client::connect(&self.socket).and_then(|mut c| c.call(&Request::Status)) {
            Ok(Response::Status { status }) => Some(*status),
            _ => None,
        }
    }
}

/// The standard output of `xlb ARGS`, which must have succeeded; else a
/// failure with its error output and `logs`.
#[track_caller]
pub fn stdout_of_success(args: &[&str], out: Output, logs: impl FnOnce() -> String) -> String {
    assert!(
        out.status.success(),
        "xlb {}: {}\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A backend host: the decap program on its `eth0` takes the node's
/// tunnel and counts what arrived.
pub struct SiteBackend {
    pub name: String,
    pub host: Host,
    pub decap: Dataplane,
}

/// A client, an xlb node and backends on one bridge. Fields drop in order:
/// the daemon first, the programs next, the namespaces, the mount, the
/// files last.
pub struct Site {
    pub node: Node,
    pub backends: Vec<SiteBackend>,
    _fabric_pass: Dataplane,
    pub client: Host,
    ground: Ground,
}

/// What a [`Site`] is made of; see [`Site::builder`].
pub struct SiteBuilder {
    tag: String,
    xlb: OsString,
    ipv6: bool,
    spare: bool,
    backends: Vec<(String, IpAddr)>,
    vips: Vec<IpAddr>,
    vips_on_backends: bool,
    probes_via_vip: bool,
    limits: Limits,
    config: String,
}

impl Site {
    /// A site named `tag` whose daemon is `xlb` (the program's path). By
    /// default: the client at 198.18.0.2, the node at 198.18.0.3, no
    /// backend, IPv6 disabled on every host (so that no router or listener
    /// message reaches the balancer), [`LIMITS`], no VIP.
    pub fn builder(tag: &str, xlb: &str) -> SiteBuilder {
        SiteBuilder {
            tag: tag.to_owned(),
            xlb: xlb.into(),
            ipv6: false,
            spare: false,
            backends: Vec::new(),
            vips: Vec::new(),
            vips_on_backends: false,
            probes_via_vip: false,
            limits: LIMITS,
            config: String::new(),
        }
    }

    pub fn backend(&self, name: &str) -> &SiteBackend {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        &self.ground.scratch.dir
    }

    /// Stops the daemon if it runs (it must exit 0 on SIGTERM), tears
    /// down and checks that nothing is left.
    pub fn close(mut self) {
        let pid = self.node.pid();
        if pid.is_some() {
            let (status, log) = self.node.stop();
            assert!(status.success(), "xlb run exited with {status}:\n{log}");
        }
        let teardown = self.ground.teardown(pid);
        drop(self);
        teardown.assert_clean();
    }
}

impl SiteBuilder {
    /// IPv6 on: the client gets fd00::2, the node fd00::3 (its
    /// `source_v6`, forwarding on), and backends may have IPv6 addresses.
    pub fn ipv6(mut self) -> Self {
        self.ipv6 = true;
        self
    }

    /// A second interface on the node, `eth1` (its peer, on the client,
    /// has no address), for `xlb attach`.
    pub fn spare_interface(mut self) -> Self {
        self.spare = true;
        self
    }

    /// A backend host `name` at `addr` on the fabric.
    pub fn backend(mut self, name: &str, addr: &str) -> Self {
        let addr = addr.parse().expect("a backend address");
        self.backends.push((name.to_owned(), addr));
        self
    }

    /// The client routes `addr` to the node.
    pub fn vip(mut self, addr: impl Into<IpAddr>) -> Self {
        self.vips.push(addr.into());
        self
    }

    /// Every backend holds every VIP on `lo`, as a DSR backend does, and
    /// does not answer ARP for it.
    pub fn vips_on_backends(mut self) -> Self {
        self.vips_on_backends = true;
        self
    }

    /// The node routes every VIP out of `eth0` via the client: what
    /// via-VIP probes need (the gateway only has to answer ARP or ND; the
    /// probe egress program rewrites the frame for the backend's next hop).
    pub fn probes_via_vip(mut self) -> Self {
        self.probes_via_vip = true;
        self
    }

    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Appended to the config file, after `[node.limits]`.
    pub fn config(mut self, text: &str) -> Self {
        self.config.push_str(text);
        self
    }

    /// Builds the site and writes the node's config; the daemon is not
    /// started yet.
    pub fn build(self) -> Site {
        let ground = Ground::new(&self.tag, self.ipv6);
        // The address of `vip`'s family among `v4` and `v6`, as a route.
        let route = |vip: &IpAddr, v4: Ipv4Addr, v6: Ipv6Addr| match vip {
            IpAddr::V4(_) => (format!("{vip}/32"), IpAddr::V4(v4)),
            IpAddr::V6(_) => (format!("{vip}/128"), IpAddr::V6(v6)),
        };

        let mut client_addrs = vec![IpAddr::V4(CLIENT)];
        if self.ipv6 {
            client_addrs.push(IpAddr::V6(CLIENT_V6));
        }
        let (client, link) = ground.host("client", addressed(&client_addrs, None));
        client
            .set_tx_checksum(&link.a.name, false)
            .expect("tx checksum off");
        for vip in &self.vips {
            let (dest, via) = route(vip, NODE, NODE_V6);
            client
                .add_route(&dest, &[via])
                .expect("routing the VIP via the node");
        }

        let node_v6 = self.ipv6.then_some(NODE_V6);
        let pin_dir = ground.bpffs.pin_dir();
        let node = ground.node("node", (NODE, node_v6), Some(MTU), pin_dir, &[self.xlb]);
        let mut forwarding = vec!["net.ipv4.ip_forward", "net.ipv4.conf.eth0.forwarding"];
        if self.ipv6 {
            forwarding.push("net.ipv6.conf.all.forwarding");
        }
        for key in forwarding {
            node.host.sysctl(key, "1").expect("forwarding on");
        }
        if self.spare {
            ground
                .topology
                .link(&node.host, &client, LinkOpts::new().names("eth1", "spare"))
                .expect("linking the node's spare interface");
        }
        if self.probes_via_vip {
            for vip in &self.vips {
                let (dest, via) = route(vip, CLIENT, CLIENT_V6);
                node.host
                    .add_route(&dest, &[via])
                    .expect("the node's route to the VIP");
            }
        }
        node.configure("", self.limits, &self.config);
        // The node's XDP_TX frames land on this port: a veth drops them
        // unless its receiving end has an XDP program.
        let fabric_pass = ground
            .fabric
            .host()
            .run_in(|| {
                let mut dp = Dataplane::load(DECAP_LIMITS).expect("loading the pass program");
                dp.attach(Role::Decap, "port-node", AttachMode::Native)
                    .expect("attaching the pass program");
                dp
            })
            .expect("entering the fabric");

        let backends = self
            .backends
            .iter()
            .map(|(name, addr)| {
                assert!(
                    self.ipv6 || addr.is_ipv4(),
                    "backend {name}: an IPv6 backend needs an IPv6 site"
                );
                let (host, _) = ground.host(name, addressed([addr], Some(MTU)));
                if self.vips_on_backends {
                    hold_vips(&host, &self.vips);
                }
                let decap = host
                    .run_in(|| {
                        let mut dp = Dataplane::load(DECAP_LIMITS).expect("loading decap");
                        dp.decap.add(*addr).expect("tunnel endpoint");
                        dp.attach(Role::Decap, "eth0", AttachMode::Native)
                            .expect("attaching decap");
                        dp
                    })
                    .expect("entering a backend");
                SiteBackend {
                    name: name.clone(),
                    host,
                    decap,
                }
            })
            .collect();
        Site {
            node,
            backends,
            _fabric_pass: fabric_pass,
            client,
            ground,
        }
    }
}

/// `vips` on the backend's `lo`, answering neither ARP for them nor
/// dropping the tunnel's packets by reverse-path filtering.
fn hold_vips(host: &Host, vips: &[IpAddr]) {
    for vip in vips {
        let len = if vip.is_ipv4() { 32 } else { 128 };
        host.add_addr("lo", &format!("{vip}/{len}"))
            .expect("the VIP on lo");
    }
    for (key, value) in [
        ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.all.arp_announce", "2"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.eth0.rp_filter", "0"),
        ("net.ipv4.conf.lo.rp_filter", "0"),
    ] {
        host.sysctl(key, value).expect("sysctl");
    }
}
