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
//! - Via the VIP, for an IPv4 VIP (IPIP) and an IPv6 one (IP6IP6): servers
//!   that listen on the VIP only are up when probed through the balancer's
//!   tunnel and refused at their own addresses.
//!
//! No timing is asserted: waits have generous deadlines and only say how
//! long they waited when they fail.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use xlb::{
    api::{BackendView, HealthState, Status},
    dataplane::Limits,
    health::{ProbeKind, ProbeSpec, ProbeTarget, ProbeVia, Reason, probe::probe},
    topology::{LinkOpts, Topology},
};
use xlb_tests::{privileged, site::Site};

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");
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

/// The backends: e1 and e2 (cluster east), w1 and w2 (west), and the last
/// part of their addresses.
const BACKENDS: [(&str, u8); 4] = [("e1", 11), ("e2", 12), ("w1", 21), ("w2", 22)];

/// The family of a site's VIP and backends.
#[derive(Clone, Copy)]
enum Family {
    V4,
    /// IPv6 VIP and backends (IP6IP6).
    V6,
}

impl Family {
    fn vip(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(198, 18, 100, 1).into(),
            Family::V6 => Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1).into(),
        }
    }

    /// Backend `name`'s address.
    fn addr(self, name: &str) -> IpAddr {
        let (_, host) = BACKENDS
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a backend");
        match self {
            Family::V4 => Ipv4Addr::new(198, 18, 0, *host).into(),
            Family::V6 => Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, (*host).into()).into(),
        }
    }
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

/// `[node.policy]` lines and the probe tables (a table line or nothing) of
/// VIP `web` and of its clusters.
struct Probes<'a> {
    policy: &'a str,
    vip: &'a str,
    east: &'a str,
    west: &'a str,
}

/// The probe tables of the standard site: every 150 ms, east over HTTP,
/// west over TCP.
const PROBES: &str =
    "probe = { interval = 0.15, timeout = 0.1, rise = 2, fall = 2, flap_backoff = 0 }";
const EAST_PROBE: &str = "probe = { kind = \"http\", path = \"/health\", body = \"ok\" }";

/// A site (`xlb_tests::site`) whose daemon probes VIP `web`, port 80, on
/// two clusters of two backends, each backend serving port 80 until its
/// server is killed. Fields drop in order: servers, then the site.
struct Probed {
    servers: BTreeMap<String, Server>,
    site: Site,
    family: Family,
    listen: Listen,
}

impl Probed {
    /// Two clusters, `east` and `west`, of two IPv4 backends each, serving
    /// on every address; east is probed over HTTP, west over TCP, every
    /// 150 ms.
    fn build() -> Probed {
        let probes = Probes {
            policy: "",
            vip: PROBES,
            east: EAST_PROBE,
            west: "",
        };
        Self::build_with("e2e", Family::V4, Listen::Everywhere, probes, "")
    }

    /// The same site in `family`, servers listening as `listen` says, the
    /// `probes` given, and `more_vips` at the end of the config.
    fn build_with(
        name: &str,
        family: Family,
        listen: Listen,
        probes: Probes<'_>,
        more_vips: &str,
    ) -> Probed {
        let vip = family.vip();
        let [e1, e2, w1, w2] = BACKENDS.map(|(name, _)| family.addr(name));
        let mut site = Site::builder(&format!("health-{name}"), XLB)
            .vip(vip)
            .vips_on_backends()
            .probes_via_vip()
            // Ring storage for web's 65537 slots and a small (4099) second VIP.
            .limits(Limits {
                max_vips: 4,
                max_backends: 16,
                ring_capacity: 69636,
                conntrack_size: 4096,
            })
            .config(&format!(
                "[node.policy]\n{}\n\
                 [vip.web]\naddr = \"{vip}\"\nport = 80\n{}\n\
                 [vip.web.cluster.east]\n{}\n\
                 backend.e1 = {{ addr = \"{e1}\" }}\nbackend.e2 = {{ addr = \"{e2}\" }}\n\
                 [vip.web.cluster.west]\n{}\n\
                 backend.w1 = {{ addr = \"{w1}\" }}\nbackend.w2 = {{ addr = \"{w2}\" }}\n\
                 {more_vips}",
                probes.policy, probes.vip, probes.east, probes.west
            ));
        if let Family::V6 = family {
            site = site.ipv6();
        }
        for (name, _) in BACKENDS {
            site = site.backend(name, &family.addr(name).to_string());
        }
        let mut probed = Probed {
            servers: BTreeMap::new(),
            site: site.build(),
            family,
            listen,
        };
        for (name, _) in BACKENDS {
            probed.serve(name);
        }
        probed.site.node.start(&[]);
        probed
    }

    /// Backend `name`'s server starts.
    fn serve(&mut self, name: &str) {
        let ip = match self.listen {
            Listen::Everywhere if self.family.vip().is_ipv4() => Ipv4Addr::UNSPECIFIED.into(),
            Listen::Everywhere => Ipv6Addr::UNSPECIFIED.into(),
            Listen::VipOnly => self.family.vip(),
        };
        let listener = self
            .site
            .backend(name)
            .host
            .run_in(|| TcpListener::bind((ip, 80)))
            .expect("entering a backend")
            .expect("binding port 80");
        let server = Server::spawn(listener, backend_service, name.to_owned());
        assert!(self.servers.insert(name.to_owned(), server).is_none());
    }

    /// Backend `name`'s listener closes: new connections and probes are
    /// refused.
    fn kill(&mut self, name: &str) {
        self.servers.remove(name).expect("a running server");
    }

    /// Polls the status until `done` holds; fails after [`DEADLINE`].
    fn wait(&self, what: &str, done: impl Fn(&Status) -> bool) -> Status {
        let started = Instant::now();
        loop {
            self.site.node.assert_running();
            if let Some(status) = self.site.node.try_status()
                && done(&status)
            {
                return status;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "waited {:?} for {what}:\n{}",
                started.elapsed(),
                self.site.node.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `count` new connections to the VIP, one after the other: who
    /// answered each.
    fn connect(&self, count: usize) -> BTreeMap<String, usize> {
        let vip = self.family.vip();
        self.site
            .client
            .run_in(|| {
                let mut by = BTreeMap::new();
                for _ in 0..count {
                    let (_, name) = open(vip);
                    *by.entry(name).or_default() += 1;
                }
                by
            })
            .expect("entering the client")
    }

    /// `count` connections kept open, each with the backend that answered.
    fn hold(&self, count: usize) -> Vec<(TcpStream, String)> {
        let vip = self.family.vip();
        self.site
            .client
            .run_in(|| (0..count).map(|_| open(vip)).collect())
            .expect("entering the client")
    }

    /// Stops the servers and the daemon; nothing may be left.
    fn close(self) {
        drop(self.servers);
        self.site.close();
    }
}

/// Opens one connection to the VIP and reads the answering backend's name.
fn open(vip: IpAddr) -> (TcpStream, String) {
    let vip = SocketAddr::from((vip, 80));
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
    let mut site = Probed::build();
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
    site.kill("e1");
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
    site.serve("e1");
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
    site.kill("e1");
    site.kill("e2");
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
    site.serve("e1");
    site.serve("e2");
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

    drop(held);
    site.close();
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
    via_vip_probes("via-vip", Family::V4);
}

/// The same with an IPv6 VIP and IPv6 backends: the probes leave the node
/// in IP6IP6.
#[test]
fn via_vip_probes_reach_an_ipv6_vip_on_each_backend_through_the_tunnel() {
    if !privileged() {
        return;
    }
    via_vip_probes("via-vip6", Family::V6);
}

fn via_vip_probes(name: &str, family: Family) {
    let vip = family.vip();
    let (e1, e2) = (family.addr("e1"), family.addr("e2"));
    let mut site = Probed::build_with(
        name,
        family,
        Listen::VipOnly,
        Probes {
            // West stays down all along: with one of four backends up, panic
            // would send connections to every backend, the dead one included.
            policy: "panic_threshold = 0",
            vip: "probe = { interval = 0.15, timeout = 0.1, rise = 2, fall = 2, flap_backoff = 0, via = \"vip\" }",
            east: EAST_PROBE,
            west: "probe = { via = \"backend\" }",
        },
        &format!(
            "[vip.web-udp]\naddr = \"{vip}\"\nport = 9001\nproto = \"udp\"\nring_size = 4099\n\
             probe = {{ kind = \"udp\", via = \"vip\", payload = \"hello\", expect = \"hello\", \
             interval = 0.15, timeout = 0.1, rise = 2, fall = 2, flap_backoff = 0 }}\n\
             [vip.web-udp.cluster.east]\n\
             backend.e1 = {{ addr = \"{e1}\" }}\nbackend.e2 = {{ addr = \"{e2}\" }}\n"
        ),
    );
    let stop_echo = Arc::new(AtomicBool::new(false));
    let echoes: Vec<JoinHandle<()>> = ["e1", "e2"]
        .iter()
        .map(|name| {
            let socket = site
                .site
                .backend(name)
                .host
                .run_in(|| UdpSocket::bind((vip, 9001)))
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
            ("http", "vip", SocketAddr::new(vip, 80).to_string().as_str()),
            "{name}"
        );
        assert_eq!(probe.last_result.as_deref(), Some("ok"), "{name}");
    }
    for name in ["w1", "w2"] {
        let addr = SocketAddr::new(family.addr(name), 80).to_string();
        let probe = backend_view(&settled, name).probe.clone().unwrap();
        assert_eq!(
            (
                probe.kind.as_str(),
                probe.via.as_str(),
                probe.target.as_str()
            ),
            ("tcp", "backend", addr.as_str())
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
            (
                "udp",
                "vip",
                SocketAddr::new(vip, 9001).to_string().as_str(),
                "up"
            ),
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
    // The doctor finds the node's route to the VIP where the probes need it.
    let doctor = site
        .site
        .node
        .host
        .command(XLB)
        .args(["doctor", "--role", "node", "--config"])
        .arg(&site.site.node.config)
        .output()
        .expect("running xlb doctor");
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        report.contains(&format!(
            "ok    route to VIP {vip} for via-VIP probes: dev eth0"
        )),
        "{report}"
    );
    let clients = site.connect(30);
    assert!(
        clients.keys().all(|name| name.starts_with('e')),
        "only the backends up take connections: {clients:?}"
    );

    // e1's server dies: only its probes fail, through the VIP.
    site.kill("e1");
    let down = site.wait("e1 down through the VIP", |s| {
        is(s, "e1", HealthState::Down)
    });
    assert_eq!(last_transition(&down, "e1"), Some("down (refused)"));
    assert_eq!(backend_view(&down, "e2").health, HealthState::Up);
    let only_e2 = site.connect(20);
    assert_eq!(only_e2.keys().collect::<Vec<_>>(), ["e2"], "{only_e2:?}");

    // And it comes back when its server does.
    site.serve("e1");
    let up = site.wait("e1 up again", |s| is(s, "e1", HealthState::Up));
    assert_eq!(last_transition(&up, "e1"), Some("up (passed)"));

    stop_echo.store(true, Ordering::SeqCst);
    for echo in echoes {
        echo.join().expect("a UDP echo thread");
    }
    site.close();
}
