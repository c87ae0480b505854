//! The daemon and its command line, end to end: the real `xlb run` in a
//! network namespace, changed through the real `xlb` command line, checked
//! in the kernel's maps.
//!
//! - [`cli_changes_reach_the_kernel_rings`]: every runtime change (VIPs,
//!   clusters, backends, drain, weights) leaves in the pinned `VIPS`,
//!   `RINGS` and `BACKENDS` maps exactly the rings that
//!   [`Reconciler::plan`](xlb::reconcile::Reconciler::plan) computes here for the same desired state, and
//!   every invalid request is refused with a one-line reason and changes
//!   neither the maps nor the state file. `xlb detach` then takes all down.
//! - [`restarts_under_a_packet_stream_lose_no_packet`]: UDP flows from a
//!   client run through the node's balancer to two backends while the
//!   daemon is stopped (SIGTERM) and started again, several times: every
//!   packet sent is balanced and arrives, and no flow ever misses the
//!   connection table after its first packet.
//! - [`runtime_changes_survive_a_restart`]: the state file carries runtime
//!   changes over a restart, and the config file's VIPs no longer apply.
//!
//! Each test builds its own site with [`xlb_tests::site`] (a fabric bridge
//! with the client, the xlb node and the backends, on 198.18.0.0/15 only),
//! its own scratch directory (config, state file, control socket) and its
//! own bpffs mount for the pins. Everything is removed on every way out,
//! and each test checks that no namespace, mount or daemon process is left.
//!
//! The binary is `xlb-for-tests`: this package's copy of `xlb`, which is
//! nothing but `xlb::cli::main` (cargo builds it before these tests).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::net::UnixStream,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{Backend as BackendEntry, Counter, VipInfo, VipKey, ip_from_addr, map_names};
use xlb::{
    api::{Admin, Request, Response},
    config,
    state::{AdminState, Affinity, Backend, Cluster, DesiredState, Proto, Vip},
};
use xlb_tests::{
    Pacing, UdpStream,
    bpffs::{pinned, pinned_counters, pinned_ring},
    is_verdict,
    plan::plan,
    privileged,
    site::{CLIENT, Site},
};

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

// ---------------------------------------------------------------------------
// What these tests ask of the site (`xlb_tests::site`).

/// A command that must be refused with one line of error naming
/// `fragment`, changing neither the kernel's maps nor the state file.
fn refused(site: &Site, args: &[&str], fragment: &str) {
    let node = &site.node;
    let kernel = read_kernel(&node.pin_dir);
    let saved = fs::read(&node.state_file).ok();
    let out = node.xlb(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "xlb {} was accepted:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(fragment),
        "xlb {}: expected {fragment:?} in:\n{stderr}",
        args.join(" ")
    );
    // (clap adds a hint line to its usage errors)
    let lines = stderr
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .count();
    assert_eq!(lines, 1, "one line of error, not:\n{stderr}");
    assert!(
        kernel == read_kernel(&node.pin_dir),
        "xlb {}: the maps changed",
        args.join(" ")
    );
    assert_eq!(
        saved,
        fs::read(&node.state_file).ok(),
        "xlb {}: the state file changed",
        args.join(" ")
    );
}

/// The XDP mode `dev` of the node runs a program in, as `ip link` says
/// (`xdp` native, `xdpgeneric`), if any.
fn xdp_on(site: &Site, dev: &str) -> Option<String> {
    let out = site
        .node
        .host
        .ip(["-d", "link", "show", "dev", dev])
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .find(|word| word.starts_with("xdp"))
        .map(str::to_owned)
}

fn attached_xdp(site: &Site) -> bool {
    xdp_on(site, "eth0").is_some()
}

// ---------------------------------------------------------------------------
// The kernel's view, read from the pins, and the plan's.

/// VIPs and their rings as the kernel holds them, each ring slot as the
/// backend id it names.
#[derive(Clone, Debug, PartialEq)]
struct Kernel {
    vips: BTreeMap<VipKey, (VipInfo, Vec<u32>)>,
    backends: BTreeMap<u32, BackendEntry>,
}

fn read_kernel(pin_dir: &Path) -> Kernel {
    let vips: HashMap<MapData, VipKey, VipInfo> =
        HashMap::try_from(Map::HashMap(pinned(pin_dir, map_names::VIPS))).expect("VIPS");
    let backend_map: Array<MapData, BackendEntry> =
        Array::try_from(Map::Array(pinned(pin_dir, map_names::BACKENDS))).expect("BACKENDS");
    let mut kernel = Kernel {
        vips: BTreeMap::new(),
        backends: BTreeMap::new(),
    };
    for entry in vips.iter() {
        let (key, info) = entry.expect("reading VIPS");
        let ring = pinned_ring(pin_dir, info.ring_offset, info.ring_size);
        kernel.vips.insert(key, (info, ring));
    }
    // Every programmed backend, also those no ring names (drained).
    for id in 0..backend_map.len() {
        let entry = backend_map.get(&id, 0).expect("reading BACKENDS");
        if entry.family != 0 {
            kernel.backends.insert(id, entry);
        }
    }
    kernel
}

/// A ring as the backend addresses its slots name: what Maglev decides,
/// whatever ids the two sides handed out.
fn kernel_ring_addrs(kernel: &Kernel, ring: &[u32]) -> Vec<Option<IpAddr>> {
    ring.iter()
        .map(|id| {
            let entry = kernel.backends.get(id)?;
            ip_from_addr(entry.family, &entry.addr)
        })
        .collect()
}

/// The kernel holds exactly the VIPs of `state`, each with the ring the
/// plan computes for it, slot for slot; and the state file says `state`.
fn assert_kernel_matches(site: &Site, state: &DesiredState, what: &str) {
    let node = config::load(&site.node.config)
        .expect("the test's config")
        .node;
    let plan = plan(&node, state);
    let kernel = read_kernel(&site.node.pin_dir);
    let planned_keys: BTreeSet<VipKey> = plan.vips.values().map(|v| v.key).collect();
    let kernel_keys: BTreeSet<VipKey> = kernel.vips.keys().copied().collect();
    assert_eq!(kernel_keys, planned_keys, "{what}: the kernel's VIPs");
    for (name, planned) in &plan.vips {
        let (info, ring) = &kernel.vips[&planned.key];
        assert_eq!(
            (info.ring_size, info.flags),
            (planned.info.ring_size, planned.info.flags),
            "{what}: VIP {name}'s entry"
        );
        let got = kernel_ring_addrs(&kernel, ring);
        let want: Vec<Option<IpAddr>> = planned
            .ring
            .iter()
            .map(|id| plan.backends.get(id).map(|b| b.addr))
            .collect();
        if let Some(slot) = (0..want.len().max(got.len())).find(|i| got.get(*i) != want.get(*i)) {
            panic!(
                "{what}: VIP {name}'s ring differs from Maglev's at slot {slot} of {}: \
                 kernel {:?}, plan {:?}",
                want.len(),
                got.get(slot),
                want.get(slot)
            );
        }
    }
    let saved = config::load_state(&site.node.state_file, &node).expect("reading the state file");
    assert_eq!(&saved, state, "{what}: the state file");
}

/// Slots per backend address in the kernel's ring of `vip`.
fn kernel_slots(kernel: &Kernel, vip: &Vip) -> BTreeMap<IpAddr, u32> {
    let mut slots = BTreeMap::new();
    if let Some((_, ring)) = kernel.vips.get(&vip.key()) {
        for addr in kernel_ring_addrs(kernel, ring).into_iter().flatten() {
            *slots.entry(addr).or_default() += 1;
        }
    }
    slots
}

fn backend_of<'a>(
    state: &'a mut DesiredState,
    vip: &str,
    cluster: &str,
    name: &str,
) -> &'a mut Backend {
    state
        .vips
        .get_mut(vip)
        .and_then(|v| v.clusters.get_mut(cluster))
        .and_then(|c| c.backends.get_mut(name))
        .expect("a backend of the model")
}

fn add_backend(
    state: &mut DesiredState,
    vip: &str,
    cluster: &str,
    name: &str,
    addr: &str,
    weight: u32,
) {
    state
        .vips
        .get_mut(vip)
        .and_then(|v| v.clusters.get_mut(cluster))
        .expect("a cluster of the model")
        .backends
        .insert(name.into(), Backend::new(name, ip(addr), weight));
}

/// One change through the command line, made to the model too; then the
/// kernel must hold the model's rings.
fn step(
    site: &Site,
    model: &mut DesiredState,
    args: &[&str],
    change: impl FnOnce(&mut DesiredState),
) -> String {
    let said = site.node.ok(args);
    change(model);
    assert_kernel_matches(site, model, &args.join(" "));
    said
}

// ---------------------------------------------------------------------------
// (a) Changes through the command line, checked in the kernel.

#[test]
fn cli_changes_reach_the_kernel_rings() {
    if !privileged() {
        return;
    }
    let mut site = Site::builder("daemon-cli", XLB)
        .ipv6()
        .spare_interface()
        .build();
    site.node.start(&[]);
    let status = site.node.status();
    assert_eq!(status.attachments.len(), 1, "{status:?}");
    assert_eq!(status.attachments[0].interface, "eth0");
    assert_eq!(status.attachments[0].mode.to_string(), "native");
    assert!(attached_xdp(&site), "the balancer is on eth0");
    assert!(status.vips.is_empty());
    assert_eq!(
        fs::metadata(&site.node.socket)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .ok(),
        Some(0o600),
        "the control socket is root only"
    );

    // A second interface, at run time, in the mode asked; then off again.
    let said = site.node.ok(&["attach", "eth1", "--mode", "generic"]);
    assert_eq!(said, "balancer attached to eth1: generic XDP\n");
    assert_eq!(xdp_on(&site, "eth1").as_deref(), Some("xdpgeneric"));
    let modes: Vec<(String, String)> = site
        .node
        .status()
        .attachments
        .iter()
        .map(|a| (a.interface.clone(), a.mode.to_string()))
        .collect();
    assert_eq!(
        modes,
        [
            ("eth0".into(), "native".into()),
            ("eth1".into(), "generic".into())
        ]
    );
    refused(
        &site,
        &["attach", "eth1"],
        "already attached to eth1 (generic XDP)",
    );
    refused(&site, &["attach", "nope0"], "no interface named \"nope0\"");
    site.node.ok(&["detach", "eth1"]);
    assert_eq!(xdp_on(&site, "eth1"), None);
    assert_eq!(site.node.status().attachments.len(), 1);
    refused(&site, &["detach", "eth1"], "not attached to eth1");

    let mut model = DesiredState::default();

    let said = step(
        &site,
        &mut model,
        &["vip", "add", "web", "198.18.100.1:80", "--proto", "udp"],
        |m| {
            m.vips.insert(
                "web".into(),
                Vip::new("web", ip("198.18.100.1"), 80, Proto::Udp),
            );
        },
    );
    assert!(
        said.starts_with("VIP web added (198.18.100.1:80/udp)\nreconciled: "),
        "{said}"
    );
    for (args, cluster, weight, priority) in [
        (
            &["cluster", "add", "web", "east", "--weight", "2"][..],
            "east",
            2,
            0,
        ),
        (&["cluster", "add", "web", "west"][..], "west", 1, 0),
        (
            &["cluster", "add", "web", "standby", "--priority", "1"][..],
            "standby",
            1,
            1,
        ),
    ] {
        step(&site, &mut model, args, |m| {
            m.vips
                .get_mut("web")
                .unwrap()
                .clusters
                .insert(cluster.into(), Cluster::new(cluster, weight, priority));
        });
    }
    for (cluster, name, addr, weight) in [
        ("east", "e1", "198.18.0.11", 1),
        ("east", "e2", "198.18.0.12", 1),
        ("west", "w1", "198.18.0.21", 3),
        ("west", "w2", "198.18.0.22", 1),
        ("standby", "s1", "198.18.0.31", 1),
    ] {
        let weight_arg = weight.to_string();
        let mut args = vec!["backend", "add", "web", cluster, name, addr];
        if weight != 1 {
            args.extend(["--weight", &weight_arg]);
        }
        step(&site, &mut model, &args, |m| {
            add_backend(m, "web", cluster, name, addr, weight)
        });
    }
    let kernel = read_kernel(&site.node.pin_dir);
    let web = model.vips["web"].clone();
    let slots = kernel_slots(&kernel, &web);
    assert!(
        !slots.contains_key(&ip("198.18.0.31")),
        "the standby level takes nothing while the primary is whole: {slots:?}"
    );

    step(
        &site,
        &mut model,
        &["backend", "drain", "web", "east", "e1"],
        |m| {
            backend_of(m, "web", "east", "e1").admin = AdminState::Drained;
        },
    );
    let drained = kernel_slots(&read_kernel(&site.node.pin_dir), &web);
    assert!(
        !drained.contains_key(&ip("198.18.0.11")),
        "a drained backend owns no slot"
    );
    step(
        &site,
        &mut model,
        &["backend", "weight", "web", "west", "w1", "1"],
        |m| {
            backend_of(m, "web", "west", "w1").weight = 1;
        },
    );
    step(
        &site,
        &mut model,
        &["cluster", "weight", "web", "west", "3"],
        |m| {
            m.vips
                .get_mut("web")
                .unwrap()
                .clusters
                .get_mut("west")
                .unwrap()
                .weight = 3;
        },
    );
    step(
        &site,
        &mut model,
        &["backend", "undrain", "web", "east", "e1"],
        |m| {
            backend_of(m, "web", "east", "e1").admin = AdminState::Enabled;
        },
    );
    step(
        &site,
        &mut model,
        &["cluster", "priority", "web", "standby", "0"],
        |m| {
            m.vips
                .get_mut("web")
                .unwrap()
                .clusters
                .get_mut("standby")
                .unwrap()
                .priority = 0;
        },
    );
    step(
        &site,
        &mut model,
        &["backend", "del", "web", "west", "w2"],
        |m| {
            m.vips
                .get_mut("web")
                .unwrap()
                .clusters
                .get_mut("west")
                .unwrap()
                .backends
                .remove("w2");
        },
    );

    // An IPv6 VIP with client affinity and a ring of its own size, IPv6
    // and IPv4 backends.
    step(
        &site,
        &mut model,
        &[
            "vip",
            "add",
            "dns",
            "[fd00:100::53]:53",
            "--proto",
            "udp",
            "--ring-size",
            "1009",
            "--affinity",
            "client",
        ],
        |m| {
            let mut vip = Vip::new("dns", ip("fd00:100::53"), 53, Proto::Udp);
            vip.ring_size = 1009;
            vip.affinity = Affinity::Client;
            m.vips.insert("dns".into(), vip);
        },
    );
    step(&site, &mut model, &["cluster", "add", "dns", "east"], |m| {
        m.vips
            .get_mut("dns")
            .unwrap()
            .clusters
            .insert("east".into(), Cluster::new("east", 1, 0));
    });
    for (name, addr) in [
        ("d1", "fd00::53:1"),
        ("d2", "fd00::53:2"),
        ("d3", "198.18.0.53"),
    ] {
        step(
            &site,
            &mut model,
            &["backend", "add", "dns", "east", name, addr],
            |m| add_backend(m, "dns", "east", name, addr, 1),
        );
    }

    // Refused, with the field or the name, and nothing changed.
    refused(
        &site,
        &[
            "vip",
            "add",
            "odd",
            "198.18.100.9:80",
            "--ring-size",
            "65536",
        ],
        "error: vip.\"odd\".ring_size: 65536 is not prime",
    );
    refused(
        &site,
        &["backend", "add", "nope", "east", "x1", "198.18.0.99"],
        "error: no VIP named \"nope\" (VIPs: dns, web)",
    );
    refused(
        &site,
        &["cluster", "weight", "web", "south", "2"],
        "error: VIP \"web\" has no cluster \"south\" (clusters: east, standby, west)",
    );
    refused(
        &site,
        &["backend", "add", "web", "east", "e3", "198.18.0.21"],
        "198.18.0.21 is already the address of",
    );
    refused(
        &site,
        &["backend", "add", "web", "east", "e3", "198.18.100.1"],
        "the VIP's own address",
    );
    refused(
        &site,
        &["vip", "add", "web2", "198.18.100.1:80", "--proto", "udp"],
        "vip.\"web2\".addr",
    );
    // An address that is not one is stopped by the parser...
    refused(
        &site,
        &["backend", "add", "web", "east", "e3", "198.18.0.300"],
        "invalid IP address",
    );
    // ...and by the API, for clients that skip it.
    let kernel = read_kernel(&site.node.pin_dir);
    let mut raw = UnixStream::connect(&site.node.socket).expect("connecting");
    raw.write_all(
        b"{\"request\":\"backend_add\",\"vip\":\"web\",\"cluster\":\"east\",\"name\":\"e3\",\"addr\":\"198.18.0.300\"}\n",
    )
    .expect("writing");
    let mut answer = String::new();
    BufReader::new(&raw)
        .read_line(&mut answer)
        .expect("reading");
    assert!(
        answer.starts_with(
            "{\"response\":\"error\",\"message\":\"invalid request: invalid IP address"
        ),
        "{answer}"
    );
    assert!(kernel == read_kernel(&site.node.pin_dir));

    // What status and the lists say is what the kernel holds.
    let kernel = read_kernel(&site.node.pin_dir);
    let status = site.node.status();
    assert_eq!(
        status
            .vips
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>(),
        ["dns", "web"]
    );
    for view in &status.vips {
        let vip = &model.vips[&view.name];
        let slots = kernel_slots(&kernel, vip);
        assert_eq!(view.mode, "normal", "{}", view.name);
        for b in &view.backends {
            assert_eq!(
                b.slots,
                slots.get(&b.addr).copied().unwrap_or(0),
                "status: slots of {}/{}",
                view.name,
                b.name
            );
            assert_eq!(b.admin, Admin::Enabled);
        }
        assert_eq!(
            view.backends.iter().map(|b| b.slots).sum::<u32>(),
            vip.ring_size,
            "every slot of {} is owned",
            view.name
        );
    }
    let listed = site.node.ok(&["backend", "list", "web"]);
    let header = listed.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("VIP  CLUSTER  BACKEND  ADDRESS"),
        "{listed}"
    );
    assert_eq!(listed.lines().count(), 1 + 4, "{listed}");
    let json = site.node.ok(&["backend", "list", "dns", "--json"]);
    assert!(
        json.trim_start().starts_with('[') && json.contains("\"addr\": \"fd00::53:1\""),
        "{json}"
    );

    step(&site, &mut model, &["vip", "del", "dns"], |m| {
        m.vips.remove("dns");
    });

    // Off every interface, pins removed, the daemon stops by itself.
    let said = site.node.ok(&["detach"]);
    assert!(said.contains("detached from eth0"), "{said}");
    let (exit, log) = site.node.wait_exit();
    assert!(exit.success(), "xlb run after detach: {exit}\n{log}");
    assert!(!attached_xdp(&site), "no program left on eth0");
    let left: Vec<_> = fs::read_dir(&site.node.pin_dir)
        .map(|dir| dir.map(|e| e.expect("entry").file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left: {left:?}");
    assert!(!site.node.socket.exists(), "the control socket is removed");
    let out = site.node.xlb(&["status"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "error: no xlb daemon at {}: start it with `xlb run --config ...`",
            site.node.socket.display()
        )
    );
    site.close();
}

// ---------------------------------------------------------------------------
// (b) Restarts under a packet stream.

const STREAM_VIPS: &str = "\
[vip.stream]
addr = \"198.18.100.1\"
port = 7000
proto = \"udp\"
ring_size = 1009

[vip.stream.cluster.east]
backend.b1 = { addr = \"198.18.0.11\" }
backend.b2 = { addr = \"198.18.0.12\" }
";
const STREAM_PORT: u16 = 7000;
/// Flows of the stream: one client socket each.
const FLOWS: usize = 16;

fn decapsulated(site: &Site) -> Vec<u64> {
    site.backends
        .iter()
        .map(|b| {
            b.decap
                .counters
                .global(Counter::DecapOk)
                .expect("decap counter")
        })
        .collect()
}

/// Verdicts of the node's balancer since `before`, those that moved.
fn verdicts_since(
    now: &BTreeMap<Counter, u64>,
    before: &BTreeMap<Counter, u64>,
) -> BTreeMap<Counter, u64> {
    now.iter()
        .filter(|(c, _)| is_verdict(**c))
        .map(|(c, v)| (*c, v - before[c]))
        .filter(|(_, moved)| *moved != 0)
        .collect()
}

#[test]
fn restarts_under_a_packet_stream_lose_no_packet() {
    if !privileged() {
        return;
    }
    const RESTARTS: usize = 3;
    let mut site = Site::builder("daemon-stream", XLB)
        .vip(VIP)
        .backend("b1", "198.18.0.11")
        .backend("b2", "198.18.0.12")
        .config(STREAM_VIPS)
        .build();
    site.node.start(&[]);

    // Until the node has resolved both backends, packets may take the slow
    // path or none: probe until every probe arrives.
    let vip = SocketAddr::from((VIP, STREAM_PORT));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before: u64 = decapsulated(&site).iter().sum();
        site.client
            .run_in(|| {
                for _ in 0..32 {
                    let socket = UdpSocket::bind((CLIENT, 0)).expect("binding");
                    socket.send_to(b"probe", vip).expect("sending a probe");
                }
            })
            .expect("entering the client");
        thread::sleep(Duration::from_millis(50));
        if decapsulated(&site).iter().sum::<u64>() - before == 32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "probes do not get through:\n{}",
            site.node.logs()
        );
    }

    let counters_before = pinned_counters(&site.node.pin_dir);
    let arrived_before = decapsulated(&site);
    let stream = UdpStream::start(
        &site.client,
        CLIENT.into(),
        vip,
        Pacing {
            flows: FLOWS,
            burst: 1,
            pause: Duration::from_micros(300),
        },
    );

    thread::sleep(Duration::from_millis(300));
    let mut downtimes = Vec::new();
    for _ in 0..RESTARTS {
        let started = Instant::now();
        let (exit, log) = site.node.stop();
        assert!(exit.success(), "xlb run on SIGTERM: {exit}\n{log}");
        assert!(log.contains("SIGTERM"), "{log}");
        assert!(
            attached_xdp(&site),
            "the balancer stays attached while no daemon runs"
        );
        thread::sleep(Duration::from_millis(200));
        site.node.start(&[]);
        downtimes.push(started.elapsed());
        thread::sleep(Duration::from_millis(300));
    }
    let (sent, failed) = stream.stop();
    thread::sleep(Duration::from_millis(300));

    let counters = pinned_counters(&site.node.pin_dir);
    let verdicts = verdicts_since(&counters, &counters_before);
    let arrived: Vec<u64> = decapsulated(&site)
        .iter()
        .zip(&arrived_before)
        .map(|(now, then)| now - then)
        .collect();
    let misses = counters[&Counter::ConnMiss] - counters_before[&Counter::ConnMiss];
    let fib = counters[&Counter::FibLookup] - counters_before[&Counter::FibLookup];
    eprintln!(
        "{RESTARTS} restarts (stop to answering again: {downtimes:?}); sent {sent} in {FLOWS} flows; \
         verdicts {verdicts:?}; arrived per backend {arrived:?}; connection-table misses {misses}; \
         FIB lookups {fib}"
    );
    assert_eq!(failed, 0, "every send succeeded");
    assert!(sent > 5_000, "a stream worth the name: {sent}");
    let mut balanced = verdicts.clone();
    // ARP (the node resolving its backends) passes as not IP; nothing else
    // may have passed or dropped.
    balanced.remove(&Counter::PassNotIp);
    assert_eq!(
        balanced,
        BTreeMap::from([(Counter::Tx, sent)]),
        "every packet met the balancer and was sent on: none passed unbalanced or dropped\n{}",
        site.node.logs()
    );
    assert_eq!(
        arrived.iter().sum::<u64>(),
        sent,
        "every packet arrived: {arrived:?}"
    );
    assert!(
        arrived.iter().all(|n| *n > 0),
        "both backends took flows: {arrived:?}"
    );
    assert_eq!(
        misses, FLOWS as u64,
        "each flow took the ring once; after that the connection table knew it, restarts or not"
    );
    assert_eq!(
        fib, 0,
        "every packet found its next hop as the daemon's resolver wrote it, across restarts"
    );
    site.close();
}

// ---------------------------------------------------------------------------
// (c) Runtime changes survive a restart.

const CONFIG_VIPS: &str = "\
[vip.web]
addr = \"198.18.100.1\"
port = 80

[vip.web.cluster.east]
backend.e1 = { addr = \"198.18.0.11\" }
backend.e2 = { addr = \"198.18.0.12\" }
";

#[test]
fn runtime_changes_survive_a_restart() {
    if !privileged() {
        return;
    }
    let mut site = Site::builder("daemon-saved", XLB)
        .spare_interface()
        .config(CONFIG_VIPS)
        .build();
    let from_config = config::load(&site.node.config).expect("config").state;
    site.node.start(&[]);
    assert!(
        !site.node.state_file.exists(),
        "nothing saved before a change"
    );
    let mut model = from_config.clone();
    let web = model.vips.get_mut("web").unwrap();
    web.clusters
        .insert("west".into(), Cluster::new("west", 2, 0));
    for args in [
        &["cluster", "add", "web", "west", "--weight", "2"][..],
        &["backend", "add", "web", "west", "w1", "198.18.0.21"],
        &[
            "backend",
            "add",
            "web",
            "east",
            "e3",
            "198.18.0.13",
            "--weight",
            "2",
        ],
        &["backend", "drain", "web", "east", "e1"],
        // Frees an id: ids no longer follow the order a fresh start
        // would give them.
        &["backend", "del", "web", "east", "e2"],
        // Sorts before "web": a fresh start would give it VIP id 0.
        &[
            "vip",
            "add",
            "api",
            "198.18.100.2:443",
            "--ring-size",
            "1009",
        ],
        &["cluster", "add", "api", "east"],
        &["backend", "add", "api", "east", "a1", "198.18.0.41"],
    ] {
        site.node.ok(args);
    }
    add_backend(&mut model, "web", "west", "w1", "198.18.0.21", 1);
    add_backend(&mut model, "web", "east", "e3", "198.18.0.13", 2);
    backend_of(&mut model, "web", "east", "e1").admin = AdminState::Drained;
    model
        .vips
        .get_mut("web")
        .and_then(|v| v.clusters.get_mut("east"))
        .unwrap()
        .backends
        .remove("e2");
    let mut api = Vip::new("api", ip("198.18.100.2"), 443, Proto::Tcp);
    api.ring_size = 1009;
    api.clusters
        .insert("east".into(), Cluster::new("east", 1, 0));
    model.vips.insert("api".into(), api);
    add_backend(&mut model, "api", "east", "a1", "198.18.0.41", 1);
    assert_kernel_matches(&site, &model, "before the restart");
    let kernel_before = read_kernel(&site.node.pin_dir);
    site.node.ok(&["attach", "eth1", "--mode", "generic"]);

    let (exit, log) = site.node.stop();
    assert!(exit.success(), "{exit}\n{log}");
    site.node.start(&[]);
    assert_kernel_matches(&site, &model, "after the restart");
    let kernel_after = read_kernel(&site.node.pin_dir);
    assert!(
        kernel_after == kernel_before,
        "the restart kept the maps as they were: same VIP ids, ring places and backend ids \
         (the drained backend's too, which its established flows use)\n{kernel_before:?}\n{kernel_after:?}"
    );
    let log = site.node.log();
    assert!(
        log.contains(&format!(
            "desired state from {}",
            site.node.state_file.display()
        )),
        "{log}"
    );
    assert!(
        log.contains(
            "reconciled (start): 0 VIP(s) written, 0 removed; 0 backend(s) written, 0 removed; \
             0 ring slot(s) written"
        ),
        "a restart with nothing changed writes nothing:\n{log}"
    );
    match site.node.call(&Request::BackendList {
        vip: Some("web".into()),
    }) {
        Response::Backends { backends } => {
            let e1 = backends.iter().find(|b| b.name == "e1").expect("e1");
            assert_eq!(e1.admin, Admin::Drained);
            assert_eq!(e1.slots, 0);
            assert_eq!(backends.len(), 3);
        }
        other => panic!("{other:?}"),
    }
    // The interface attached at run time is taken over too, in its mode.
    let modes: Vec<(String, String)> = site
        .node
        .status()
        .attachments
        .iter()
        .map(|a| (a.interface.clone(), a.mode.to_string()))
        .collect();
    assert_eq!(
        modes,
        [
            ("eth0".into(), "native".into()),
            ("eth1".into(), "generic".into())
        ]
    );
    assert_eq!(xdp_on(&site, "eth1").as_deref(), Some("xdpgeneric"));

    // With no daemon running, `xlb detach --config` takes all down.
    let (exit, log) = site.node.stop();
    assert!(exit.success(), "{exit}\n{log}");
    assert!(
        attached_xdp(&site),
        "still attached after the daemon stopped"
    );
    let config = site.node.config.to_str().expect("utf-8 path").to_owned();
    let said = site.node.ok(&["detach", "--config", &config]);
    assert!(
        said.starts_with("no xlb daemon was running; balancer detached from eth0, eth1; "),
        "{said}"
    );
    assert_eq!((xdp_on(&site, "eth0"), xdp_on(&site, "eth1")), (None, None));
    let left: Vec<_> = fs::read_dir(&site.node.pin_dir)
        .expect("the pin directory")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "pins left: {left:?}");
    site.close();
}
