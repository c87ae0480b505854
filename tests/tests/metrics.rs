//! Counters out, end to end: the real `xlb run` in a network namespace with
//! real traffic through its VIP, read back through `/metrics`, a real
//! Prometheus server, `xlb stats`, `xlb top` in a pseudo-terminal, and the
//! XDP program's own debug log.
//!
//! - [`metrics_equal_the_maps_after_known_traffic`]: after a known number of
//!   datagrams in a known number of flows, every figure `/metrics` serves
//!   (per VIP, cluster and backend, every global counter, the connection
//!   table's entries) equals what the pinned maps hold, summed over CPUs;
//!   the VIP's moved by exactly that traffic; `promtool check metrics`
//!   accepts the exposition; `xlb stats --json` reports the same totals.
//! - [`prometheus_scrapes_a_rate_for_the_vip`]: a Prometheus server (on the
//!   node's loopback, a temporary data directory, a one-second scrape
//!   interval) scrapes the daemon while a stream flows to one VIP of two;
//!   its HTTP API gives a packet rate above zero for that VIP and zero for
//!   the idle one.
//! - [`top_draws_rows_and_quits_on_q_or_ctrl_c`]: `xlb top` in a real
//!   pseudo-terminal draws the VIP's row and exits 0 on `q`, and again on
//!   Ctrl-C.
//! - [`xdp_debug_log_reaches_the_daemon_log_when_on`]: with `--xdp-log
//!   debug` the balancer's verdict lines reach the daemon's log; without,
//!   none do.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use lb_common::{FlowSet, Traffic, map_names};
use xlb::{
    api::{Client, Request, Response, Status},
    dataplane::{AttachMode, Dataplane, Limits, Role},
    topology::{Host, LinkOpts, Spawned, Topology},
};
use xlb_tests::{
    Pacing, UdpStream,
    bpffs::{BpfFs, pinned, pinned_counters},
    daemon::await_ready,
    exposition::{Exposition, promtool_check},
    privileged,
    scratch::Scratch,
};

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const IDLE_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const PORT: u16 = 5353;
const MTU: u32 = 1600;
/// A connection table of 1024 sets: fewer than the exporter samples, so its
/// entry count is exact.
const LIMITS: Limits = Limits {
    max_vips: 4,
    max_backends: 16,
    ring_capacity: 4 * 65537,
    conntrack_size: 4096,
};
const DECAP_LIMITS: Limits = Limits {
    max_vips: 1,
    max_backends: 1,
    ring_capacity: 1,
    conntrack_size: 256,
};
const METRICS: &str = "127.0.0.1:9730";
const PROMETHEUS: &str = "127.0.0.1:9090";
const DEADLINE: Duration = Duration::from_secs(60);

const VIPS: &str = "\
[vip.web]
addr = \"198.18.100.1\"
port = 5353
proto = \"udp\"

[vip.web.cluster.east]
backend.e1 = { addr = \"198.18.0.11\" }

[vip.web.cluster.west]
backend.w1 = { addr = \"198.18.0.12\" }

[vip.idle]
addr = \"198.18.100.2\"
port = 5353
proto = \"udp\"

[vip.idle.cluster.east]
backend.e1 = { addr = \"198.18.0.11\" }
";

// ---------------------------------------------------------------------------
// The site: a client, the xlb node and two decapsulating backends on one
// bridge, a scratch directory and a private bpffs; all removed on drop.

/// Fields drop in order: processes, programs, namespaces, mount, files.
struct Site {
    daemon: Option<Spawned>,
    prometheus: Option<Spawned>,
    _backends: Vec<(Dataplane, Host)>,
    _fabric_pass: Dataplane,
    client: Host,
    node: Host,
    topology: Topology,
    _bpffs: BpfFs,
    scratch: Scratch,
    config: PathBuf,
    socket: PathBuf,
    pin_dir: PathBuf,
}

impl Site {
    fn build(tag: &str, extra_config: &str) -> Site {
        let scratch = Scratch::new("metrics", tag);
        let bpffs = BpfFs::at(scratch.dir.join("bpf"));
        let topology = Topology::new(&format!("metrics-{tag}")).expect("topology");
        let fabric = topology.bridge("fabric").expect("fabric");
        let host = |name: &str| {
            let host = topology.host(name).expect("host");
            host.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
                .expect("IPv6 off");
            host
        };
        fabric
            .host()
            .sysctl("net.ipv6.conf.all.disable_ipv6", "1")
            .expect("IPv6 off");
        let client = host("client");
        let link = topology
            .link(
                &client,
                &fabric,
                LinkOpts::new().addr_a(format!("{CLIENT}/24")),
            )
            .expect("linking the client");
        for vip in [VIP, IDLE_VIP] {
            client
                .add_route(&format!("{vip}/32"), &[NODE.into()])
                .expect("routing the VIP via the node");
        }
        client
            .set_tx_checksum(&link.a.name, false)
            .expect("tx checksum off");
        let node = host("node");
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
        // The node's XDP_TX frames land on this port, which drops them
        // unless it runs an XDP program.
        let fabric_pass = fabric
            .host()
            .run_in(|| {
                let mut dp = Dataplane::load(DECAP_LIMITS).expect("loading the pass program");
                dp.attach(Role::Decap, "port-node", AttachMode::Native)
                    .expect("attaching the pass program");
                dp
            })
            .expect("entering the fabric");
        let backends = (0..2u8)
            .map(|i| {
                let addr = Ipv4Addr::new(198, 18, 0, 11 + i);
                let host = host(&format!("b{}", i + 1));
                topology
                    .link(
                        &host,
                        &fabric,
                        LinkOpts::new().addr_a(format!("{addr}/24")).mtu(MTU),
                    )
                    .expect("linking a backend");
                let dp = host
                    .run_in(|| {
                        let mut dp = Dataplane::load(DECAP_LIMITS).expect("loading decap");
                        dp.decap.add(addr.into()).expect("tunnel endpoint");
                        dp.attach(Role::Decap, "eth0", AttachMode::Native)
                            .expect("attaching decap");
                        dp
                    })
                    .expect("entering a backend");
                (dp, host)
            })
            .collect();
        let dir = &scratch.dir;
        let config = dir.join("xlb.toml");
        let socket = dir.join("xlb.sock");
        let pin_dir = bpffs.pin_dir();
        fs::write(
            &config,
            format!(
                "[node]\ninterfaces = [\"eth0\"]\nattach_mode = \"native\"\nsource_v4 = \"{NODE}\"\n\
                 api_socket = \"{}\"\nstate_file = \"{}\"\npin_path = \"{}\"\n\
                 [node.limits]\nmax_vips = {}\nmax_backends = {}\nring_capacity = {}\nconntrack_size = {}\n\
                 {extra_config}\n{VIPS}",
                socket.display(),
                dir.join("state.toml").display(),
                pin_dir.display(),
                LIMITS.max_vips,
                LIMITS.max_backends,
                LIMITS.ring_capacity,
                LIMITS.conntrack_size,
            ),
        )
        .expect("writing the config");
        Site {
            daemon: None,
            prometheus: None,
            _backends: backends,
            _fabric_pass: fabric_pass,
            client,
            node,
            topology,
            _bpffs: bpffs,
            scratch,
            config,
            socket,
            pin_dir,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.scratch.dir.join("daemon.log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `xlb run` in the node and waits until its API answers.
    fn start(&mut self, args: &[&str]) {
        let file = fs::File::create(self.log_path()).expect("the daemon log");
        let mut command = self.node.command(XLB);
        command
            .args(["run", "--config"])
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        let daemon = self.node.spawn(&mut command).expect("starting xlb run");
        await_ready("xlb run", &daemon, &self.socket, DEADLINE, || self.log());
        self.daemon = Some(daemon);
    }

    /// SIGTERM; the daemon must exit 0.
    fn stop(&mut self) {
        let daemon = self.daemon.take().expect("a running daemon");
        // SAFETY: kill(2) of the child this test started.
        assert_eq!(unsafe { libc::kill(daemon.pid() as i32, libc::SIGTERM) }, 0);
        let status = daemon.wait_with_output().expect("reaping").status;
        assert!(status.success(), "xlb run exited {status}:\n{}", self.log());
    }

    fn status(&self) -> Status {
        match Client::connect(&self.socket)
            .and_then(|mut c| c.call(&Request::Status))
            .expect("status")
        {
            Response::Status { status } => *status,
            other => panic!("status answered {other:?}"),
        }
    }

    /// `GET http://ADDR/PATH` from inside the node; the status code and body.
    fn http_get(&self, addr: &str, path: &str) -> (u16, String) {
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        let addr: SocketAddr = addr.parse().expect("an address");
        let raw = self
            .node
            .run_in(|| -> io::Result<String> {
                let mut stream = TcpStream::connect(addr)?;
                stream.write_all(request.as_bytes())?;
                let mut raw = String::new();
                stream.read_to_string(&mut raw)?;
                Ok(raw)
            })
            .expect("entering the node")
            .unwrap_or_else(|err| panic!("GET http://{addr}{path}: {err}"));
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("a status code");
        (code, body.to_owned())
    }

    fn scrape(&self) -> String {
        let (code, body) = self.http_get(METRICS, "/metrics");
        assert_eq!(code, 200, "GET /metrics: {body}");
        body
    }

    /// Datagrams from the client until both backends' next hops are known
    /// and every datagram gets through.
    fn wait_until_forwarding(&self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let before = self.vip_traffic("web").packets;
            self.send(VIP, 16, 1);
            thread::sleep(Duration::from_millis(50));
            if self.vip_traffic("web").packets - before == 16 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "traffic does not get through:\n{}",
                self.log()
            );
        }
    }

    /// `flows` source ports, `each` datagrams from each, to `vip`.
    fn send(&self, vip: Ipv4Addr, flows: usize, each: usize) {
        self.client
            .run_in(|| {
                for _ in 0..flows {
                    let socket = UdpSocket::bind((CLIENT, 0)).expect("binding");
                    for _ in 0..each {
                        socket.send_to(b"ping", (vip, PORT)).expect("sending");
                    }
                }
            })
            .expect("entering the client");
    }

    fn vip_traffic(&self, name: &str) -> Traffic {
        let id = self
            .status()
            .vips
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.id)
            .expect("a programmed VIP");
        per_cpu_traffic(&self.pin_dir, map_names::VIP_STATS, id)
    }

    fn close(mut self) {
        self.prometheus.take();
        if self.daemon.is_some() {
            self.stop();
        }
        let prefix = self.topology.prefix().to_owned();
        drop(self);
        assert_eq!(
            Topology::leftovers(&prefix).expect("listing namespaces"),
            Vec::<String>::new()
        );
    }
}

// ---------------------------------------------------------------------------
// The maps, read from the pins; the exposition, parsed.

/// `{family}_packets_total`, `_bytes_total` and `_new_flows_total` with
/// `labels` say exactly `traffic`.
fn assert_traffic(metrics: &Exposition, family: &str, labels: &[(&str, &str)], traffic: Traffic) {
    for (series, value) in [
        ("packets", traffic.packets),
        ("bytes", traffic.bytes),
        ("new_flows", traffic.new_flows),
    ] {
        let name = format!("{family}_{series}_total");
        assert_eq!(metrics.get(&name, labels), value as f64, "{name}{labels:?}");
    }
}

fn per_cpu_traffic(pin_dir: &Path, name: &str, id: u32) -> Traffic {
    let map: PerCpuArray<MapData, Traffic> =
        PerCpuArray::try_from(Map::PerCpuArray(pinned(pin_dir, name))).expect(name);
    let mut total = Traffic::default();
    for value in map.get(&id, 0).expect("reading a traffic map").iter() {
        total.add(value);
    }
    total
}

fn conntrack_entries(pin_dir: &Path) -> u64 {
    let map: Array<MapData, FlowSet> =
        Array::try_from(Map::Array(pinned(pin_dir, map_names::CONNTRACK))).expect("CONNTRACK");
    map.iter()
        .map(|set| {
            let set = set.expect("reading CONNTRACK");
            set.ways.iter().filter(|e| e.fingerprint != 0).count() as u64
        })
        .sum()
}

// ---------------------------------------------------------------------------

#[test]
fn metrics_equal_the_maps_after_known_traffic() {
    if !privileged() {
        return;
    }
    let mut site = Site::build("maps", "");
    site.start(&[]);
    site.wait_until_forwarding();

    let before = site.vip_traffic("web");
    const FLOWS: usize = 20;
    const EACH: usize = 10;
    site.send(VIP, FLOWS, EACH);
    // Until the last datagram has met the balancer.
    let deadline = Instant::now() + DEADLINE;
    while site.vip_traffic("web").packets < before.packets + (FLOWS * EACH) as u64 {
        assert!(
            Instant::now() < deadline,
            "datagrams missing:\n{}",
            site.log()
        );
        thread::sleep(Duration::from_millis(20));
    }

    let text = site.scrape();
    let metrics = Exposition::parse(&text);
    let status = site.status();
    let web = site.vip_traffic("web");
    assert_eq!(web.packets - before.packets, (FLOWS * EACH) as u64);
    assert_eq!(web.new_flows - before.new_flows, FLOWS as u64);
    for (name, traffic) in [("web", web), ("idle", site.vip_traffic("idle"))] {
        assert_traffic(&metrics, "xlb_vip", &[("vip", name)], traffic);
    }
    let mut clusters: BTreeMap<(String, String), u64> = BTreeMap::new();
    for vip in &status.vips {
        for b in &vip.backends {
            let t = per_cpu_traffic(
                &site.pin_dir,
                map_names::BACKEND_STATS,
                b.id.expect("an id"),
            );
            let labels = [
                ("vip", b.vip.as_str()),
                ("cluster", &b.cluster),
                ("backend", &b.name),
            ];
            assert_traffic(&metrics, "xlb_backend", &labels, t);
            assert_eq!(metrics.get("xlb_backend_up", &labels), 1.0);
            assert_eq!(
                metrics.get("xlb_backend_ring_share_ratio", &labels),
                f64::from(b.slots) / f64::from(vip.ring_size)
            );
            *clusters
                .entry((b.vip.clone(), b.cluster.clone()))
                .or_default() += t.packets;
        }
    }
    for ((vip, cluster), packets) in &clusters {
        assert_eq!(
            metrics.get(
                "xlb_cluster_packets_total",
                &[("vip", vip), ("cluster", cluster)]
            ),
            *packets as f64
        );
    }
    // Both web clusters took flows: the per-cluster figures are not trivially 0.
    assert!(
        clusters[&("web".into(), "east".into())] > 0
            && clusters[&("web".into(), "west".into())] > 0
    );
    for (counter, value) in pinned_counters(&site.pin_dir) {
        let sample = match xlb::metrics::verdict_of(counter) {
            Some(program) => metrics.get(
                "xlb_verdict_packets_total",
                &[("program", program), ("verdict", counter.name())],
            ),
            None => metrics.get("xlb_event_packets_total", &[("event", counter.name())]),
        };
        assert_eq!(sample, value as f64, "{}", counter.name());
    }
    assert_eq!(
        metrics.get("xlb_conntrack_entries", &[]),
        conntrack_entries(&site.pin_dir) as f64
    );
    assert!(metrics.get("xlb_conntrack_entries", &[]) >= FLOWS as f64);
    assert_eq!(metrics.get("xlb_conntrack_capacity_entries", &[]), 4096.0);
    assert_eq!(
        metrics.get(
            "xlb_attachment_info",
            &[("interface", "eth0"), ("mode", "native")]
        ),
        1.0
    );
    assert!(metrics.get("xlb_reconcile_duration_seconds_count", &[]) >= 1.0);
    promtool_check(&text);

    // `xlb stats --json`: the same totals (no traffic flows now).
    let out = Command::new(XLB)
        .args(["--socket"])
        .arg(&site.socket)
        .args(["stats", "--json", "--interval", "0.2"])
        .output()
        .expect("xlb stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let vip = json["stats"]["vips"]
        .as_array()
        .expect("vips")
        .iter()
        .find(|v| v["name"] == "web")
        .expect("web");
    assert_eq!(vip["packets"], web.packets);
    assert_eq!(vip["new_flows"], web.new_flows);
    assert_eq!(json["rates"]["vips"][0]["rate"]["packets_per_sec"], 0.0);

    // The human table names the VIP with SI units.
    let out = Command::new(XLB)
        .args(["--socket"])
        .arg(&site.socket)
        .args(["stats", "--interval", "0.2"])
        .output()
        .expect("xlb stats");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("198.18.100.1:5353/udp"),
        "{table}"
    );
    assert!(table.contains(" pps"), "{table}");

    // Not /metrics: 404, said plainly.
    assert_eq!(site.http_get(METRICS, "/").0, 404);
    site.close();
}

#[test]
fn prometheus_scrapes_a_rate_for_the_vip() {
    if !privileged() {
        return;
    }
    let mut site = Site::build("prom", &format!("[metrics]\nlisten = \"{METRICS}\"\n"));
    site.start(&[]);
    site.wait_until_forwarding();

    let data = site.scratch.dir.join("prometheus");
    let prom_config = site.scratch.dir.join("prometheus.yml");
    fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: xlb\n    static_configs:\n      - targets: [\"{METRICS}\"]\n"
        ),
    )
    .expect("writing the Prometheus config");
    let log = fs::File::create(site.scratch.dir.join("prometheus.log")).expect("log");
    let mut command = site.node.command("prometheus");
    command
        .arg(format!("--config.file={}", prom_config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    site.prometheus = Some(site.node.spawn(&mut command).expect(
        "starting prometheus (Debian's prometheus package; `cargo xtask setup` installs it)",
    ));

    let stream = UdpStream::start(
        &site.client,
        CLIENT.into(),
        SocketAddr::from((VIP, PORT)),
        Pacing {
            flows: 8,
            burst: 1,
            pause: Duration::from_millis(2),
        },
    );
    let query = "/api/v1/query?query=rate(xlb_vip_packets_total%5B10s%5D)";
    let deadline = Instant::now() + DEADLINE;
    let rates = loop {
        let answer = site
            .node
            .run_in(|| TcpStream::connect(PROMETHEUS).is_ok())
            .expect("entering the node")
            .then(|| site.http_get(PROMETHEUS, query).1);
        let rates: BTreeMap<String, f64> = answer
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|json| json["data"]["result"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|r| {
                let vip = r["metric"]["vip"].as_str()?.to_owned();
                let value: f64 = r["value"][1].as_str()?.parse().ok()?;
                Some((vip, value))
            })
            .collect();
        if rates.get("web").is_some_and(|r| *r > 0.0) && rates.contains_key("idle") {
            break rates;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has no rate for the VIP: {rates:?}\n{}",
            fs::read_to_string(site.scratch.dir.join("prometheus.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(500));
    };
    let (sent, failed) = stream.stop();
    eprintln!("Prometheus rates: {rates:?}; sent {sent} ({failed} failed)");
    assert!(rates["web"] > 0.0, "{rates:?}");
    assert_eq!(rates["idle"], 0.0, "{rates:?}");
    site.close();
}

/// A pseudo-terminal of `cols` × `rows`: (master, slave).
fn pty(cols: u16, rows: u16) -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the given ints; the name
    // and termios pointers may be null, the winsize is read only.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Runs `xlb top` on a pseudo-terminal until it has drawn `expect`, then
/// types `key`; returns its exit status and what it drew.
fn top_until(socket: &Path, expect: &[&str], key: &[u8]) -> (std::process::ExitStatus, String) {
    let (master, slave) = pty(140, 40);
    let mut command = Command::new(XLB);
    command
        .arg("--socket")
        .arg(socket)
        .args(["top", "--interval", "0.2"])
        .env("TERM", "xterm")
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave));
    // SAFETY: only async-signal-safe calls between fork and exec: a new
    // session, with the pty (its stdin) as controlling terminal, as a
    // login shell would have.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("starting xlb top");
    drop(command);
    let mut reader = fs::File::from(master.try_clone().expect("dup"));
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    // Drains the terminal, so the program never blocks on a full pty.
    let drain = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || seen_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + DEADLINE;
    let mut screen = Vec::new();
    while !expect
        .iter()
        .all(|e| String::from_utf8_lossy(&screen).contains(e))
    {
        match seen_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(bytes) => screen.extend(bytes),
            Err(_) => {
                if let Some(status) = child.try_wait().expect("polling xlb top") {
                    panic!(
                        "xlb top exited early ({status}):\n{}",
                        String::from_utf8_lossy(&screen)
                    );
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "xlb top never drew {expect:?}:\n{}",
            String::from_utf8_lossy(&screen)
        );
    }
    let mut writer = fs::File::from(master.try_clone().expect("dup"));
    writer.write_all(key).expect("typing");
    let status = loop {
        if let Some(status) = child.try_wait().expect("polling xlb top") {
            break status;
        }
        while let Ok(bytes) = seen_rx.try_recv() {
            screen.extend(bytes);
        }
        assert!(Instant::now() < deadline, "xlb top did not quit on {key:?}");
        thread::sleep(Duration::from_millis(20));
    };
    while let Ok(bytes) = seen_rx.recv_timeout(Duration::from_millis(200)) {
        screen.extend(bytes);
    }
    drop(master);
    drop(writer);
    let _ = drain.join();
    (status, String::from_utf8_lossy(&screen).into_owned())
}

#[test]
fn top_draws_rows_and_quits_on_q_or_ctrl_c() {
    if !privileged() {
        return;
    }
    let mut site = Site::build("top", "[metrics]\nenabled = false\n");
    site.start(&[]);
    site.wait_until_forwarding();
    let stream = UdpStream::start(
        &site.client,
        CLIENT.into(),
        SocketAddr::from((VIP, PORT)),
        Pacing {
            flows: 4,
            burst: 1,
            pause: Duration::from_millis(5),
        },
    );
    let rows = [
        "web",
        "198.18.100.1:5353/udp",
        "web/east/e1",
        "web/west/w1",
        "idle",
    ];
    for key in [&b"q"[..], &b"\x03"[..]] {
        let (status, screen) = top_until(&site.socket, &rows, key);
        assert!(status.success(), "xlb top exited {status} on {key:?}");
        // The terminal was restored: the alternate screen left, the cursor shown.
        assert!(screen.contains("\x1b[?1049l"), "alternate screen not left");
        assert!(screen.contains("\x1b[?25h"), "cursor not shown again");
    }
    stream.stop();
    // With [metrics] enabled = false nothing listens.
    assert!(
        site.node
            .run_in(|| TcpStream::connect(METRICS).is_err())
            .expect("entering the node"),
        "/metrics is served although disabled"
    );
    site.close();
}

#[test]
fn xdp_debug_log_reaches_the_daemon_log_when_on() {
    if !privileged() {
        return;
    }
    let mut site = Site::build("log", "");
    site.start(&[]);
    site.wait_until_forwarding();
    site.send(VIP, 4, 1);
    thread::sleep(Duration::from_millis(300));
    assert!(
        !site.log().contains("verdict"),
        "off by default:\n{}",
        site.log()
    );
    site.stop();

    site.start(&["--xdp-log", "debug"]);
    let deadline = Instant::now() + DEADLINE;
    while !site.log().contains("verdict tx") {
        site.send(VIP, 4, 1);
        assert!(
            Instant::now() < deadline,
            "no verdict line in the daemon log:\n{}",
            site.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    site.close();
}

/// Every query of the Grafana dashboard parses (`promtool check rules`)
/// and names only metrics the exporter serves.
#[test]
fn the_dashboard_queries_parse_and_name_exported_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/xlb.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).expect("reading the dashboard"))
            .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().expect("targets").clone())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*")
                .replace("$vip", ".*")
        })
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");

    let scratch = Scratch::new("metrics", "dashboard");
    let rules = scratch.dir.join("rules.yml");
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        yaml.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: '{expr}'\n"
        ));
    }
    fs::write(&rules, yaml).expect("writing the rules");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("running promtool (Debian's prometheus package; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // What the exporter serves for one VIP with one backend, the prober's
    // metrics fed once.
    let telemetry = xlb::metrics::Telemetry::new();
    telemetry.reconciled(Duration::from_millis(1));
    telemetry.probes().probe(
        "198.18.0.11".parse().expect("an address"),
        xlb::metrics::ProbeResult::Timeout,
        Duration::from_millis(5),
    );
    telemetry
        .probes()
        .transition(xlb::state::Health::Down, Duration::from_secs(3));
    let stats: xlb::metrics::Stats = serde_json::from_value(serde_json::json!({
        "taken_at": 1.0, "version": "0", "conntrack": {"entries": 0, "capacity": 4, "sampled_sets": 1, "sets": 1},
        "attachments": [{"interface": "eth0", "mode": "native"}],
        "vips": [{"name": "web", "addr": "198.18.100.1", "port": 80, "proto": "tcp", "packets": 1, "bytes": 2, "new_flows": 1}],
        "clusters": [{"vip": "web", "name": "east", "packets": 1, "bytes": 2, "new_flows": 1}],
        "backends": [{"vip": "web", "cluster": "east", "name": "e1", "addr": "198.18.0.11", "admin": "drained",
                      "health": "up", "health_since": 1.0, "ring_share": 1.0, "packets": 1, "bytes": 2, "new_flows": 1}],
        "counters": [["tx", 1], ["conn_evicted", 0]],
        "last_reconcile_micros": 1000
    }))
    .expect("a snapshot");
    let text = xlb::metrics::exposition(&stats, &telemetry);
    promtool_check(&text);
    let served: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for expr in &exprs {
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("xlb_"))
        {
            let family = name.trim_end_matches("_bucket");
            assert!(
                served.contains(&family),
                "the dashboard queries {name}, not served: {served:?}"
            );
        }
    }
}
