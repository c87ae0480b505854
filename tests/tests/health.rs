//! Health probes against real servers in network namespaces.
//!
//! - Every failure has its reason: a probe that hangs, a server that
//!   accepts and never answers, a wrong HTTP status, a reset, a refused
//!   port, a wrong body, a silent or closed UDP port.
//! - End to end: the real daemon (`xlb run`) probes two clusters of
//!   backends that serve TCP and HTTP, and a client opens real connections
//!   to the VIP. A backend whose server stops is taken out (no new
//!   connection reaches it, the others keep theirs) and comes back when its
//!   server does; a whole cluster that stops sends everything to the other,
//!   and its return restores the shares.
//!
//! No timing is asserted: waits have generous deadlines and only say how
//! long they waited when they fail.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use xlb::{
    api::{BackendView, Client, HealthState, Request, Response, Status},
    dataplane::{AttachMode, Dataplane, Limits, Role},
    health::{ProbeKind, ProbeSpec, ProbeTarget, ProbeVia, Reason, probe::probe},
    topology::{Host, LinkOpts, Topology},
};
use xlb_tests::{bpffs::BpfFs, privileged, scratch::Scratch};

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const MTU: u32 = 1600;
const DECAP_LIMITS: Limits = Limits {
    max_vips: 1,
    max_backends: 1,
    ring_capacity: 1,
    conntrack_size: 256,
};
/// Generous: a loaded 2-core machine may be slow, never wrong.
const DEADLINE: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Servers: each accepts on its own thread and stops (closing its listener)
// when dropped.

struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `listener` with `handle`, one thread per connection.
    fn spawn(listener: TcpListener, handle: fn(TcpStream, &str), name: String) -> Self {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).expect("blocking stream");
                        let name = name.clone();
                        thread::spawn(move || handle(stream, &name));
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(err) => panic!("accept: {err}"),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads what the client sent first: an HTTP request head, or one line.
fn first_request(stream: &mut TcpStream) -> Vec<u8> {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let head_done = got.windows(4).any(|w| w == b"\r\n\r\n");
        let line_done = got.ends_with(b"\n") && !got.starts_with(b"GET ");
        if head_done || line_done {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

fn http_reply(stream: &mut TcpStream, status: &str, body: &str) {
    let _ = first_request(stream);
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes());
    let _ = stream.shutdown(Shutdown::Write);
}

/// A backend: HTTP GET gets `200 ok backend NAME`; anything else gets
/// `backend NAME` and then each line echoed, until the client closes.
fn backend_service(mut stream: TcpStream, name: &str) {
    let first = first_request(&mut stream);
    if first.starts_with(b"GET ") {
        let body = format!("ok backend {name}\n");
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(reply.as_bytes());
        let _ = stream.shutdown(Shutdown::Write);
        return;
    }
    let _ = stream.set_read_timeout(None);
    if stream
        .write_all(format!("backend {name}\n").as_bytes())
        .is_err()
    {
        return;
    }
    let mut lines = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    while matches!(lines.read_line(&mut line), Ok(n) if n > 0) {
        if stream.write_all(line.as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}

// ---------------------------------------------------------------------------
// Reasons.

fn target(addr: SocketAddr, kind: ProbeKind) -> ProbeTarget {
    ProbeTarget {
        addr: addr.ip(),
        spec: ProbeSpec {
            kind,
            via: ProbeVia::Backend,
            port: addr.port(),
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(400),
            rise: 1,
            fall: 1,
            jitter_permille: 0,
            flap_backoff: Duration::ZERO,
        },
        via_vip: None,
    }
}

fn http(path: &str, body: Option<&str>) -> ProbeKind {
    ProbeKind::Http {
        path: path.into(),
        host: Some("health.test".into()),
        statuses: vec![200],
        body: body.map(Into::into),
    }
}

fn udp(expect: Option<&str>) -> ProbeKind {
    ProbeKind::Udp {
        payload: b"ping".to_vec(),
        expect: expect.map(|e| e.as_bytes().to_vec()),
    }
}

#[test]
fn every_failed_probe_says_why() {
    if !privileged() {
        return;
    }
    let topology = Topology::new("health-reasons").expect("topology");
    let prober = topology.host("prober").expect("host");
    // The peer has no address: nothing answers ARP for .2, so a connect to
    // it hangs until the probe's timeout.
    let peer = topology.host("void").expect("host");
    topology
        .link(&prober, &peer, LinkOpts::new().addr_a("198.18.50.1/24"))
        .expect("link");
    let here = |port| SocketAddr::from(([198, 18, 50, 1], port));
    let listen = |port| {
        prober
            .run_in(move || TcpListener::bind(here(port)))
            .expect("entering the prober")
            .expect("binding")
    };
    let _servers = [
        Server::spawn(
            listen(8001),
            |mut s, _| http_reply(&mut s, "200 OK", "all ok\n"),
            String::new(),
        ),
        Server::spawn(
            listen(8002),
            |mut s, _| http_reply(&mut s, "503 Busy", "busy\n"),
            String::new(),
        ),
        // Accepts, reads the request, never answers.
        Server::spawn(
            listen(8003),
            |mut s, _| {
                let _ = first_request(&mut s);
                thread::sleep(Duration::from_secs(3));
            },
            String::new(),
        ),
        // Accepts and closes with a reset.
        Server::spawn(
            listen(8004),
            |s, _| {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: a valid socket and a linger struct that outlives the call.
                unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&s),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        size_of::<libc::linger>() as libc::socklen_t,
                    )
                };
                drop(s);
            },
            String::new(),
        ),
        Server::spawn(
            listen(8005),
            |mut s, _| http_reply(&mut s, "200 OK", "nope\n"),
            String::new(),
        ),
    ];
    let (echo, silent) = prober
        .run_in(|| {
            (
                UdpSocket::bind(here(9001)).expect("udp"),
                UdpSocket::bind(here(9002)).expect("udp"),
            )
        })
        .expect("entering the prober");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    echo.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let echo_thread = thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !stopped.load(Ordering::SeqCst) {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let mut reply = b"pong ".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = echo.send_to(&reply, from);
            }
        }
    });

    let cases: Vec<(&str, ProbeTarget, Result<(), Reason>)> = vec![
        (
            "tcp to a listener",
            target(here(8001), ProbeKind::Tcp),
            Ok(()),
        ),
        (
            "tcp to a closed port",
            target(here(8009), ProbeKind::Tcp),
            Err(Reason::Refused),
        ),
        (
            "tcp to a host that never answers",
            target(SocketAddr::from(([198, 18, 50, 2], 80)), ProbeKind::Tcp),
            Err(Reason::Timeout),
        ),
        (
            "http 200 with the body",
            target(here(8001), http("/health", Some("ok"))),
            Ok(()),
        ),
        (
            "http 503",
            target(here(8002), http("/", None)),
            Err(Reason::BadStatus(503)),
        ),
        (
            "http that never answers",
            target(here(8003), http("/", None)),
            Err(Reason::Timeout),
        ),
        (
            "http reset",
            target(here(8004), http("/", None)),
            Err(Reason::Reset),
        ),
        (
            "http wrong body",
            target(here(8005), http("/", Some("ok"))),
            Err(Reason::BodyMismatch),
        ),
        ("udp echo", target(here(9001), udp(Some("pong"))), Ok(())),
        (
            "udp echo, wrong reply",
            target(here(9001), udp(Some("hello"))),
            Err(Reason::BodyMismatch),
        ),
        (
            "udp that never answers",
            target(here(9002), udp(None)),
            Err(Reason::Timeout),
        ),
        (
            "udp to a closed port",
            target(here(9003), udp(None)),
            Err(Reason::Refused),
        ),
    ];
    let got: Vec<Result<(), Reason>> = prober
        .run_in(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            cases
                .iter()
                .map(|(_, target, _)| runtime.block_on(probe(target)))
                .collect()
        })
        .expect("entering the prober");
    stop.store(true, Ordering::SeqCst);
    echo_thread.join().expect("echo thread");
    drop(silent);
    let wrong: Vec<String> = cases
        .iter()
        .zip(&got)
        .filter(|((_, _, want), got)| want != *got)
        .map(|((what, _, want), got)| format!("{what}: expected {want:?}, got {got:?}"))
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    let prefix = topology.prefix().to_owned();
    topology.close().expect("teardown");
    assert!(Topology::leftovers(&prefix).expect("listing").is_empty());
}

// ---------------------------------------------------------------------------
// End to end: the daemon, two clusters, a client.

struct Backend {
    name: String,
    host: Host,
    server: Option<Server>,
    listen: Listen,
    _decap: Dataplane,
}

/// Where a backend's server listens.
#[derive(Clone, Copy)]
enum Listen {
    /// Every address of the host: its own and the VIP.
    Everywhere,
    /// The VIP (on lo) only: reachable through the balancer's tunnel, not
    /// at the backend's own address.
    VipOnly,
}

impl Backend {
    fn start(&mut self) {
        assert!(self.server.is_none());
        let ip = match self.listen {
            Listen::Everywhere => Ipv4Addr::UNSPECIFIED,
            Listen::VipOnly => VIP,
        };
        let listener = self
            .host
            .run_in(|| TcpListener::bind((ip, 80)))
            .expect("entering a backend")
            .expect("binding port 80");
        self.server = Some(Server::spawn(listener, backend_service, self.name.clone()));
    }

    /// Its listener closes: new connections and probes are refused.
    fn kill(&mut self) {
        self.server.take().expect("a running server");
    }
}

/// Fields drop in order: the daemon, the servers, the namespaces, the
/// mount, the files.
struct Site {
    daemon: Option<xlb::topology::Spawned>,
    backends: Vec<Backend>,
    _fabric_pass: Dataplane,
    client: Host,
    topology: Topology,
    _bpffs: BpfFs,
    scratch: Scratch,
    socket: PathBuf,
}

/// The probe tables of the standard site: every 150 ms, east over HTTP,
/// west over TCP.
const PROBES: &str =
    "probe = { interval = 0.15, timeout = 0.1, rise = 2, fall = 2, flap_backoff = 0 }";
const EAST_PROBE: &str = "probe = { kind = \"http\", path = \"/health\", body = \"ok\" }";

impl Site {
    /// Two clusters, `east` and `west`, of two backends each, serving on
    /// every address; east is probed over HTTP, west over TCP, every 150 ms.
    fn build() -> Site {
        Self::build_with("e2e", Listen::Everywhere, "", PROBES, EAST_PROBE, "", "")
    }

    /// The same site with servers listening as `listen` says, `policy`
    /// lines for `[node.policy]`, the VIP's, east's and west's probe
    /// tables given (a table line or nothing), and `more_vips` at the end
    /// of the config.
    fn build_with(
        name: &str,
        listen: Listen,
        policy: &str,
        vip_probe: &str,
        east_probe: &str,
        west_probe: &str,
        more_vips: &str,
    ) -> Site {
        let scratch = Scratch::new("health", name);
        let bpffs = BpfFs::at(scratch.dir.join("bpf"));
        let topology = Topology::new(&format!("health-{name}")).expect("topology");
        let fabric = topology.bridge("fabric").expect("fabric");
        let client = topology.host("client").expect("client");
        let link = topology
            .link(
                &client,
                &fabric,
                LinkOpts::new().addr_a(format!("{CLIENT}/24")),
            )
            .expect("linking the client");
        client
            .add_route(&format!("{VIP}/32"), &[NODE.into()])
            .expect("route");
        client
            .set_tx_checksum(&link.a.name, false)
            .expect("tx checksum off");
        let node = topology.host("node").expect("node");
        topology
            .link(
                &node,
                &fabric,
                LinkOpts::new()
                    .addr_a(format!("{NODE}/24"))
                    .mtu(MTU)
                    .names("eth0", "port-node"),
            )
            .expect("linking the node");
        for key in ["net.ipv4.ip_forward", "net.ipv4.conf.eth0.forwarding"] {
            node.sysctl(key, "1").expect("forwarding on");
        }
        // Via-VIP probes route to the VIP out of the balancer's interface;
        // the gateway only has to answer ARP: the probe egress program
        // rewrites the frame for the backend's next hop.
        node.add_route(&format!("{VIP}/32"), &[CLIENT.into()])
            .expect("the node's route to the VIP");
        let fabric_pass = fabric
            .host()
            .run_in(|| {
                let mut dp = Dataplane::load(DECAP_LIMITS).expect("loading the pass program");
                dp.attach(Role::Decap, "port-node", AttachMode::Native)
                    .expect("attaching the pass program");
                dp
            })
            .expect("entering the fabric");
        let mut backends = Vec::new();
        for (c, cluster) in ["east", "west"].iter().enumerate() {
            for i in 0..2 {
                let name = format!("{}{}", &cluster[..1], i + 1);
                let addr = Ipv4Addr::new(198, 18, 0, 11 + 10 * c as u8 + i);
                let host = topology.host(&name).expect("backend");
                topology
                    .link(
                        &host,
                        &fabric,
                        LinkOpts::new().addr_a(format!("{addr}/24")).mtu(MTU),
                    )
                    .expect("linking a backend");
                host.add_addr("lo", &format!("{VIP}/32"))
                    .expect("VIP on lo");
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
                let decap = host
                    .run_in(|| {
                        let mut dp = Dataplane::load(DECAP_LIMITS).expect("loading decap");
                        dp.decap.add(addr.into()).expect("tunnel endpoint");
                        dp.attach(Role::Decap, "eth0", AttachMode::Native)
                            .expect("attaching decap");
                        dp
                    })
                    .expect("entering a backend");
                let mut backend = Backend {
                    name,
                    host,
                    server: None,
                    listen,
                    _decap: decap,
                };
                backend.start();
                backends.push(backend);
            }
        }
        let dir = &scratch.dir;
        let socket = dir.join("xlb.sock");
        let config = dir.join("xlb.toml");
        // Ring storage for web's 65537 slots and a small (4099) second VIP.
        fs::write(
            &config,
            format!(
                "[node]\ninterfaces = [\"eth0\"]\nattach_mode = \"native\"\n\
                 source_v4 = \"{NODE}\"\napi_socket = \"{}\"\nstate_file = \"{}\"\npin_path = \"{}\"\n\
                 [node.limits]\nmax_vips = 4\nmax_backends = 16\nring_capacity = 69636\nconntrack_size = 4096\n\
                 [node.policy]\n{policy}\n\
                 [vip.web]\naddr = \"{VIP}\"\nport = 80\n{vip_probe}\n\
                 [vip.web.cluster.east]\n{east_probe}\n\
                 backend.e1 = {{ addr = \"198.18.0.11\" }}\nbackend.e2 = {{ addr = \"198.18.0.12\" }}\n\
                 [vip.web.cluster.west]\n{west_probe}\n\
                 backend.w1 = {{ addr = \"198.18.0.21\" }}\nbackend.w2 = {{ addr = \"198.18.0.22\" }}\n\
                 {more_vips}",
                socket.display(),
                dir.join("state.toml").display(),
                bpffs.pin_dir().display(),
            ),
        )
        .expect("writing the config");
        let log = fs::File::create(dir.join("daemon.log")).expect("log");
        let mut command = node.command(XLB);
        command
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let daemon = node.spawn(&mut command).expect("starting xlb run");
        let mut site = Site {
            daemon: Some(daemon),
            backends,
            _fabric_pass: fabric_pass,
            client,
            topology,
            _bpffs: bpffs,
            scratch,
            socket,
        };
        site.wait("the daemon's API", |_| true);
        site
    }

    fn log(&self) -> String {
        fs::read_to_string(self.scratch.dir.join("daemon.log")).unwrap_or_default()
    }

    fn status(&self) -> Option<Status> {
        match Client::connect(&self.socket).and_then(|mut c| c.call(&Request::Status)) {
            Ok(Response::Status { status }) => Some(*status),
            _ => None,
        }
    }

    /// Polls the status until `done` holds; fails after [`DEADLINE`].
    fn wait(&mut self, what: &str, done: impl Fn(&Status) -> bool) -> Status {
        let started = Instant::now();
        loop {
            if let Some(daemon) = &self.daemon
                && let Some(exit) = daemon.try_wait().expect("polling the daemon")
            {
                panic!("xlb run exited ({exit}):\n{}", self.log());
            }
            if let Some(status) = self.status()
                && done(&status)
            {
                return status;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "waited {:?} for {what}:\n{}",
                started.elapsed(),
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn backend(&mut self, name: &str) -> &mut Backend {
        self.backends
            .iter_mut()
            .find(|b| b.name == name)
            .expect("a backend")
    }

    /// `count` new connections to the VIP: who answered each.
    fn connect(&self, count: usize) -> BTreeMap<String, usize> {
        self.client
            .run_in(|| {
                let mut by = BTreeMap::new();
                for _ in 0..count {
                    let (_, name) = open();
                    *by.entry(name).or_default() += 1;
                }
                by
            })
            .expect("entering the client")
    }

    /// `count` connections kept open, each with the backend that answered.
    fn hold(&self, count: usize) -> Vec<(TcpStream, String)> {
        self.client
            .run_in(|| (0..count).map(|_| open()).collect())
            .expect("entering the client")
    }
}

/// Opens one connection to the VIP and reads the answering backend's name.
fn open() -> (TcpStream, String) {
    let vip = SocketAddr::from((VIP, 80));
    let mut stream = TcpStream::connect_timeout(&vip, IO_TIMEOUT).expect("connecting to the VIP");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.write_all(b"who\n").expect("sending");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .expect("reading the backend's line");
    let name = line
        .trim_end()
        .strip_prefix("backend ")
        .unwrap_or_else(|| panic!("unexpected answer {line:?}"))
        .to_owned();
    (stream, name)
}

/// Each held connection still echoes.
fn assert_alive(held: &mut [(TcpStream, String)], what: &str) {
    for (stream, name) in held.iter_mut() {
        let echoed = stream.write_all(b"still there?\n").and_then(|()| {
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut line = String::new();
            reader.read_line(&mut line)?;
            Ok(line)
        });
        match echoed {
            Ok(line) if line == "still there?\n" => {}
            other => panic!("{what}: the connection to {name} broke: {other:?}"),
        }
    }
}

fn backend_view<'a>(status: &'a Status, name: &str) -> &'a BackendView {
    status.vips[0]
        .backends
        .iter()
        .find(|b| b.name == name)
        .expect("the backend in status")
}

/// The reason its probe gave for the backend's last change of health.
fn last_transition<'a>(status: &'a Status, name: &str) -> Option<&'a str> {
    let probe = backend_view(status, name).probe.as_ref();
    probe.expect("a probed backend").last_transition.as_deref()
}

fn is(status: &Status, name: &str, health: HealthState) -> bool {
    backend_view(status, name).health == health
}

fn shares(status: &Status) -> BTreeMap<String, f64> {
    status.vips[0]
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.share))
        .collect()
}

#[test]
fn failed_backends_and_clusters_leave_the_rings_and_come_back() {
    if !privileged() {
        return;
    }
    let mut site = Site::build();
    let all_probed = |s: &Status| {
        s.vips[0]
            .backends
            .iter()
            .all(|b| b.probe.as_ref().is_some_and(|p| p.probes >= 2))
    };
    let start = site.wait("every backend probed", all_probed);
    let initial = shares(&start);
    assert!(
        start.vips[0]
            .backends
            .iter()
            .all(|b| b.health == HealthState::Up)
    );
    let kinds: BTreeMap<String, String> = start.vips[0]
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.probe.as_ref().unwrap().kind.clone()))
        .collect();
    assert_eq!(
        kinds["e1"], "http",
        "east's cluster table overrides the kind"
    );
    assert_eq!(kinds["w1"], "tcp", "west takes the VIP's");

    // Connections held open across every change below.
    let mut held = site.hold(40);

    // One backend's server stops.
    site.backend("e1").kill();
    let down = site.wait("e1 down", |s| is(s, "e1", HealthState::Down));
    let e1 = backend_view(&down, "e1");
    assert_eq!(e1.slots, 0, "e1 left the ring");
    let probe = e1.probe.as_ref().unwrap();
    assert_eq!(probe.state, "down");
    assert_eq!(probe.last_transition.as_deref(), Some("down (refused)"));
    let health = down.health.as_ref().expect("probe counters in status");
    assert!(
        health.transitions_down >= 1 && health.latency.count >= 1,
        "{health:?}"
    );
    // The probe in flight when the listener closed may end in a reset;
    // every later one is refused, and `fall` = 2 failures decide.
    let failures = |reason: &str| health.failures.get(reason).copied().unwrap_or(0);
    assert!(
        failures("refused") >= 1 && failures("refused") + failures("reset") >= 2,
        "{health:?}"
    );
    let after = site.connect(60);
    assert_eq!(
        after.get("e1"),
        None,
        "no new connection reaches e1: {after:?}"
    );
    // e1's server still serves its established connections, but their
    // next packets no longer reach it: the connection table does not pin
    // them, another backend gets them and resets them.
    let (mut on_e1, rest): (Vec<_>, Vec<_>) = held.into_iter().partition(|(_, n)| n == "e1");
    held = rest;
    assert!(!on_e1.is_empty(), "some held connection is on e1");
    for (stream, _) in &mut on_e1 {
        let mut reply = [0u8; 64];
        let echoed = stream
            .write_all(b"still there?\n")
            .and_then(|()| stream.read(&mut reply));
        assert!(
            !matches!(echoed, Ok(n) if n > 0),
            "a flow to the dead backend moved: {echoed:?}"
        );
    }
    assert_alive(&mut held, "after e1 went down");

    // It comes back after rise probes.
    site.backend("e1").start();
    let up = site.wait("e1 up", |s| is(s, "e1", HealthState::Up));
    assert_eq!(last_transition(&up, "e1"), Some("up (passed)"));
    assert_eq!(shares(&up), initial, "shares are back to the weights");
    let back = site.connect(80);
    assert!(
        back.get("e1").is_some_and(|n| *n > 0),
        "e1 takes connections again: {back:?}"
    );
    assert_alive(&mut held, "after e1 came back");

    // The whole east cluster stops: everything goes west.
    site.backend("e1").kill();
    site.backend("e2").kill();
    site.wait("east down", |s| {
        is(s, "e1", HealthState::Down) && is(s, "e2", HealthState::Down)
    });
    let west_only = site.connect(60);
    assert!(
        west_only.keys().all(|name| name.starts_with('w')),
        "only west answers: {west_only:?}"
    );
    held.retain(|(_, name)| name.starts_with('w'));
    assert!(!held.is_empty());
    assert_alive(&mut held, "while east is down");

    // East returns: the shares are the weights' again.
    site.backend("e1").start();
    site.backend("e2").start();
    let restored = site.wait("east up", |s| {
        is(s, "e1", HealthState::Up) && is(s, "e2", HealthState::Up)
    });
    assert_eq!(shares(&restored), initial);
    let both = site.connect(80);
    assert!(
        both.keys().any(|n| n.starts_with('e')) && both.keys().any(|n| n.starts_with('w')),
        "both clusters answer: {both:?}"
    );
    assert_alive(&mut held, "after east came back");

    // SIGTERM; then everything goes.
    let daemon = site.daemon.take().expect("daemon");
    // SAFETY: plain kill(2) of the child this test started.
    unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGTERM) };
    let _ = daemon.wait_with_output();
    drop(held);
    let prefix = site.topology.prefix().to_owned();
    drop(site);
    assert!(Topology::leftovers(&prefix).expect("listing").is_empty());
}

/// Echoes UDP datagrams on `socket` until `stop`.
fn udp_echo(socket: UdpSocket, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    })
}

/// Via-VIP probes go where a client's packets go: to the VIP, in the
/// balancer's tunnel, to exactly one backend. Every server here listens on
/// the VIP only, so a probe of a backend's own address is refused: east,
/// probed through the VIP (HTTP on `web`, UDP on `web-udp`), is up; west,
/// probed at the backends' own addresses, is down. East's probes then
/// follow its servers, each backend's on its own.
#[test]
fn via_vip_probes_reach_the_vip_on_each_backend_through_the_tunnel() {
    if !privileged() {
        return;
    }
    let mut site = Site::build_with(
        "via-vip",
        Listen::VipOnly,
        // West stays down all along: with one of four backends up, panic
        // would send connections to every backend, the dead one included.
        "panic_threshold = 0",
        "probe = { interval = 0.15, timeout = 0.1, rise = 2, fall = 2, flap_backoff = 0, via = \"vip\" }",
        EAST_PROBE,
        "probe = { via = \"backend\" }",
        "[vip.web-udp]\naddr = \"198.18.100.1\"\nport = 9001\nproto = \"udp\"\nring_size = 4099\n\
         probe = { kind = \"udp\", via = \"vip\", payload = \"hello\", expect = \"hello\", \
         interval = 0.15, timeout = 0.1, rise = 2, fall = 2, flap_backoff = 0 }\n\
         [vip.web-udp.cluster.east]\n\
         backend.e1 = { addr = \"198.18.0.11\" }\nbackend.e2 = { addr = \"198.18.0.12\" }\n",
    );
    let stop_echo = Arc::new(AtomicBool::new(false));
    let echoes: Vec<JoinHandle<()>> = ["e1", "e2"]
        .iter()
        .map(|name| {
            let socket = site
                .backend(name)
                .host
                .run_in(|| UdpSocket::bind((VIP, 9001)))
                .expect("entering a backend")
                .expect("binding the VIP's UDP port");
            udp_echo(socket, Arc::clone(&stop_echo))
        })
        .collect();
    let settled = site.wait("east up through the VIP, west down at its addresses", |s| {
        ["e1", "e2"].iter().all(|b| {
            backend_view(s, b)
                .probe
                .as_ref()
                .is_some_and(|p| p.probes >= 3 && p.state == "up")
        }) && is(s, "w1", HealthState::Down)
            && is(s, "w2", HealthState::Down)
    });
    for name in ["e1", "e2"] {
        let probe = backend_view(&settled, name).probe.clone().unwrap();
        assert_eq!(
            (
                probe.kind.as_str(),
                probe.via.as_str(),
                probe.target.as_str()
            ),
            ("http", "vip", "198.18.100.1:80"),
            "{name}"
        );
        assert_eq!(probe.last_result.as_deref(), Some("ok"), "{name}");
    }
    for (name, addr) in [("w1", "198.18.0.21:80"), ("w2", "198.18.0.22:80")] {
        let probe = backend_view(&settled, name).probe.clone().unwrap();
        assert_eq!(
            (
                probe.kind.as_str(),
                probe.via.as_str(),
                probe.target.as_str()
            ),
            ("tcp", "backend", addr)
        );
        assert_eq!(probe.last_transition.as_deref(), Some("down (refused)"));
    }
    let udp = site.wait("the UDP probes through the VIP pass", |s| {
        s.vips[1].backends.iter().all(|b| {
            b.probe
                .as_ref()
                .is_some_and(|p| p.probes >= 3 && p.last_result.as_deref() == Some("ok"))
        })
    });
    assert_eq!(udp.vips[1].name, "web-udp");
    for b in &udp.vips[1].backends {
        let probe = b.probe.as_ref().unwrap();
        assert_eq!(
            (
                probe.kind.as_str(),
                probe.via.as_str(),
                probe.target.as_str(),
                probe.state.as_str()
            ),
            ("udp", "vip", "198.18.100.1:9001", "up"),
            "{}",
            b.name
        );
    }
    let encapsulated = settled.counters.get("probe_encap").copied().unwrap_or(0);
    assert!(
        encapsulated >= 6,
        "every via-VIP probe packet went through the egress program: {:?}",
        settled.counters
    );
    assert!(
        !settled.counters.keys().any(|c| c.starts_with("probe_drop")),
        "{:?}",
        settled.counters
    );
    let clients = site.connect(30);
    assert!(
        clients.keys().all(|name| name.starts_with('e')),
        "only the backends up take connections: {clients:?}"
    );

    // e1's server dies: only its probes fail, through the VIP.
    site.backend("e1").kill();
    let down = site.wait("e1 down through the VIP", |s| {
        is(s, "e1", HealthState::Down)
    });
    assert_eq!(last_transition(&down, "e1"), Some("down (refused)"));
    assert_eq!(backend_view(&down, "e2").health, HealthState::Up);
    let only_e2 = site.connect(20);
    assert_eq!(only_e2.keys().collect::<Vec<_>>(), ["e2"], "{only_e2:?}");

    // And it comes back when its server does.
    site.backend("e1").start();
    let up = site.wait("e1 up again", |s| is(s, "e1", HealthState::Up));
    assert_eq!(last_transition(&up, "e1"), Some("up (passed)"));

    let daemon = site.daemon.take().expect("daemon");
    // SAFETY: plain kill(2) of the child this test started.
    unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGTERM) };
    let _ = daemon.wait_with_output();
    stop_echo.store(true, Ordering::SeqCst);
    for echo in echoes {
        echo.join().expect("a UDP echo thread");
    }
    let prefix = site.topology.prefix().to_owned();
    drop(site);
    assert!(Topology::leftovers(&prefix).expect("listing").is_empty());
}
