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
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use lb_common::{FlowSet, Traffic, map_names};
use xlb::dataplane::Limits;
use xlb_tests::{
    Pacing, UdpStream,
    bpffs::{pinned, pinned_counters},
    exposition::{Exposition, promtool_check},
    privileged,
    scratch::Scratch,
    site::{CLIENT, METRICS, Site},
};

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const IDLE_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const PORT: u16 = 5353;
/// A connection table of 1024 sets: fewer than the exporter samples, so its
/// entry count is exact.
const LIMITS: Limits = Limits {
    max_vips: 4,
    max_backends: 16,
    ring_capacity: 4 * 65537,
    conntrack_size: 4096,
};
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
// bridge (`xlb_tests::site`), and what these tests do with it.

fn site(tag: &str, extra_config: &str) -> Site {
    Site::builder(&format!("metrics-{tag}"), XLB)
        .vip(VIP)
        .vip(IDLE_VIP)
        .backend("b1", "198.18.0.11")
        .backend("b2", "198.18.0.12")
        .limits(LIMITS)
        .config(&format!("{extra_config}\n{VIPS}"))
        .build()
}

trait Metered {
    fn wait_until_forwarding(&self);
    fn send(&self, vip: Ipv4Addr, flows: usize, each: usize);
    fn vip_traffic(&self, name: &str) -> Traffic;
}

impl Metered for Site {
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
                self.node.log()
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
            .node
            .status()
            .vips
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.id)
            .expect("a programmed VIP");
        per_cpu_traffic(&self.node.pin_dir, map_names::VIP_STATS, id)
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
    let mut site = site("maps", "");
    site.node.start(&[]);
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
            site.node.log()
        );
        thread::sleep(Duration::from_millis(20));
    }

    let text = site.node.scrape();
    let metrics = Exposition::parse(&text);
    let status = site.node.status();
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
                &site.node.pin_dir,
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
    for (counter, value) in pinned_counters(&site.node.pin_dir) {
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
        conntrack_entries(&site.node.pin_dir) as f64
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
    let out = site.node.xlb(&["stats", "--json", "--interval", "0.2"]);
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
    let out = site.node.xlb(&["stats", "--interval", "0.2"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("198.18.100.1:5353/udp"),
        "{table}"
    );
    assert!(table.contains(" pps"), "{table}");

    // Not /metrics: 404, said plainly.
    assert_eq!(site.node.http_get(METRICS, "/").0, 404);
    site.close();
}

#[test]
fn prometheus_scrapes_a_rate_for_the_vip() {
    if !privileged() {
        return;
    }
    let mut site = site("prom", &format!("[metrics]\nlisten = \"{METRICS}\"\n"));
    site.node.start(&[]);
    site.wait_until_forwarding();

    let data = site.dir().join("prometheus");
    let prom_config = site.dir().join("prometheus.yml");
    fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: xlb\n    static_configs:\n      - targets: [\"{METRICS}\"]\n"
        ),
    )
    .expect("writing the Prometheus config");
    let log = fs::File::create(site.dir().join("prometheus.log")).expect("log");
    let mut command = site.node.host.command("prometheus");
    command
        .arg(format!("--config.file={}", prom_config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    let prometheus = site.node.host.spawn(&mut command).expect(
        "starting prometheus (Debian's prometheus package; `cargo xtask setup` installs it)",
    );

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
            .host
            .run_in(|| TcpStream::connect(PROMETHEUS).is_ok())
            .expect("entering the node")
            .then(|| site.node.http_get(PROMETHEUS, query).1);
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
            fs::read_to_string(site.dir().join("prometheus.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(500));
    };
    let (sent, failed) = stream.stop();
    eprintln!("Prometheus rates: {rates:?}; sent {sent} ({failed} failed)");
    assert!(rates["web"] > 0.0, "{rates:?}");
    assert_eq!(rates["idle"], 0.0, "{rates:?}");
    drop(prometheus);
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
    let mut site = site("top", "[metrics]\nenabled = false\n");
    site.node.start(&[]);
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
        let (status, screen) = top_until(&site.node.socket, &rows, key);
        assert!(status.success(), "xlb top exited {status} on {key:?}");
        // The terminal was restored: the alternate screen left, the cursor shown.
        assert!(screen.contains("\x1b[?1049l"), "alternate screen not left");
        assert!(screen.contains("\x1b[?25h"), "cursor not shown again");
    }
    stream.stop();
    // With [metrics] enabled = false nothing listens.
    assert!(
        site.node
            .host
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
    let mut site = site("log", "");
    site.node.start(&[]);
    site.wait_until_forwarding();
    site.send(VIP, 4, 1);
    thread::sleep(Duration::from_millis(300));
    assert!(
        !site.node.log().contains("verdict"),
        "off by default:\n{}",
        site.node.log()
    );
    let (status, log) = site.node.stop();
    assert!(status.success(), "xlb run exited {status}:\n{log}");

    site.node.start(&["--xdp-log", "debug"]);
    let deadline = Instant::now() + DEADLINE;
    while !site.node.log().contains("verdict tx") {
        site.send(VIP, 4, 1);
        assert!(
            Instant::now() < deadline,
            "no verdict line in the daemon log:\n{}",
            site.node.log()
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
