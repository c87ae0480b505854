//! End to end, in network namespaces: the demo's active-active site (a
//! client with an ECMP route over two xlb nodes, each running the real
//! `xlb run` with the balancer in native XDP, and two clusters of backends
//! running the decap program, all on one bridge) with real packets and real
//! TCP connections and UDP datagrams. The daemons probe every backend
//! (HTTP, TCP and UDP, on the backends' own addresses); the tests fail
//! backends by stopping their servers and nothing else, so it is the
//! daemons' probes that must find them.
//!
//! Every test builds its own site (some shrink it to one backend per
//! cluster) and, through [`close`], checks that tearing it down leaves no
//! namespace, bpffs mount (the daemons' pins), scratch file or daemon
//! process behind; [`teardown_leaves_nothing_even_after_a_panic`] checks the
//! same when a test fails halfway.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread;
use std::time::Duration;

use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, TcpHeader};
use lb_common::{Counter, OUTER_TTL};
use xlb::api::{Admin, BackendView, HealthState, Request, Response};
use xlb::demo::{
    CLIENT_ADDR, CLUSTERS, Detection, FABRIC_MTU, Footprint, Frame, PacketCapture, Round, Site,
    SiteOptions, TCP_VIP_NAME, UDP_VIP_NAME, VIP, VIP_PORT, WEB, WEB6, WEB46, check_round,
};

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");

/// Whether this test may run: as root always; otherwise it skips, unless
/// CI is set, where missing privileges are a failure.
fn may_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "end-to-end tests need root (network namespaces, XDP); under CI they must not skip"
    );
    eprintln!("skipped: needs root");
    false
}

fn build(tag: &str, backends_per_cluster: usize) -> Site {
    Site::build(SiteOptions {
        backends_per_cluster,
        tag: tag.into(),
        ..SiteOptions::new(XLB)
    })
    .expect("building the site")
}

/// Tears the site down and checks that nothing of it is left.
fn close(site: Site) {
    let footprint = site.footprint();
    site.close().expect("tearing the site down");
    assert_nothing_left(&footprint);
}

fn assert_nothing_left(footprint: &Footprint) {
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

fn assert_round_ok(site: &Site, round: &Round, label: &str, down: &[String]) {
    let problems = check_round(site, round, label, down);
    assert!(problems.is_empty(), "{problems:#?}\n{round:#?}");
}

/// The largest deviation from `n * p` a fair count of `n` draws with
/// probability `p` shows with probability below 1e-4 (about 4 standard
/// deviations of the binomial): a tolerance that fits the sample size.
fn binomial_bound(n: usize, p: f64) -> f64 {
    4.0 * (n as f64 * p * (1.0 - p)).sqrt()
}

fn assert_share(count: usize, n: usize, p: f64, what: &str) {
    let expected = n as f64 * p;
    let bound = binomial_bound(n, p);
    assert!(
        (count as f64 - expected).abs() <= bound,
        "{what}: {count} of {n}, expected {expected:.1} ± {bound:.1}"
    );
}

/// An IPIP frame as the balancer must send it: what the backend's interface
/// received, parsed and checked with etherparse.
struct Encapsulated {
    dmac: [u8; 6],
    smac: [u8; 6],
    outer: Ipv4Header,
    inner: Ipv4Header,
    tcp: TcpHeader,
}

fn parse_encapsulated(frame: &Frame) -> Option<Encapsulated> {
    let (eth, rest) = Ethernet2Header::from_slice(&frame.data).ok()?;
    if eth.ether_type != EtherType::IPV4 {
        return None;
    }
    let (outer, rest) = Ipv4Header::from_slice(rest).ok()?;
    if outer.protocol != IpNumber::IPV4 {
        return None;
    }
    let rest = &rest[..usize::from(outer.total_len) - outer.header_len()];
    let (inner, rest) = Ipv4Header::from_slice(rest).expect("inner IPv4 header");
    assert_eq!(
        usize::from(outer.total_len),
        outer.header_len() + usize::from(inner.total_len),
        "outer length = outer header + inner packet"
    );
    let rest = &rest[..usize::from(inner.total_len) - inner.header_len()];
    let (tcp, payload) = TcpHeader::from_slice(rest).expect("inner TCP header");
    assert_eq!(
        outer.header_checksum,
        outer.calc_header_checksum(),
        "outer checksum"
    );
    assert_eq!(
        inner.header_checksum,
        inner.calc_header_checksum(),
        "inner checksum"
    );
    assert_eq!(
        tcp.checksum,
        tcp.calc_checksum_ipv4(&inner, payload).unwrap(),
        "TCP checksum"
    );
    Some(Encapsulated {
        dmac: eth.destination,
        smac: eth.source,
        outer,
        inner,
        tcp,
    })
}

#[test]
fn a_packet_to_the_vip_reaches_a_backend_encapsulated() {
    if !may_run() {
        return;
    }
    let mut site = build("e2e-encap", 1);
    // Without the decap program the backend's interface shows the packet as
    // it arrived; its stack cannot use IPIP here, so nothing answers.
    site.set_decap(false).expect("detaching decap");
    let dev = site.interface_name();
    let captures: Vec<PacketCapture> = site
        .backends()
        .iter()
        .map(|b| PacketCapture::open(&b.host, dev).expect("capturing on a backend"))
        .collect();
    let before = site.counters().expect("counters");

    let vip = SocketAddr::from(site.vip());
    let attempt = site
        .client()
        .run_in(move || TcpStream::connect_timeout(&vip, Duration::from_millis(300)))
        .expect("entering the client");
    assert!(attempt.is_err(), "no backend can answer without decap");
    thread::sleep(Duration::from_millis(50));

    let node_of = |mac: [u8; 6]| site.nodes().iter().find(|n| n.mac == mac);
    let mut reached = Vec::new();
    for (backend, capture) in site.backends().iter().zip(&captures) {
        let frames = capture.frames().expect("reading a capture");
        for packet in frames.iter().filter_map(parse_encapsulated) {
            reached.push(backend.name.clone());
            assert_eq!(packet.dmac, backend.mac, "to the backend's MAC");
            let node = node_of(packet.smac).expect("from an xlb node's MAC");
            assert_eq!(Ipv4Addr::from(packet.outer.destination), backend.addr);
            assert_eq!(Ipv4Addr::from(packet.outer.source), node.addr);
            assert_eq!(packet.outer.time_to_live, OUTER_TTL);
            assert_eq!(Ipv4Addr::from(packet.inner.source), CLIENT_ADDR);
            assert_eq!(Ipv4Addr::from(packet.inner.destination), VIP);
            assert_eq!(packet.tcp.destination_port, VIP_PORT);
            assert!(packet.tcp.syn && !packet.tcp.ack, "the client's SYN");
        }
    }
    assert!(!reached.is_empty(), "no encapsulated SYN reached a backend");
    reached.dedup();
    assert_eq!(reached.len(), 1, "one flow, one backend: {reached:?}");
    let after = site.counters().expect("counters");
    let moved = xlb::demo::NodeCounters::sum(
        after
            .iter()
            .map(|(name, c)| c.since(&before[name]))
            .collect::<Vec<_>>()
            .iter(),
    );
    assert!(moved.global(Counter::Tx) >= 1, "{moved:?}");
    assert!(moved.backend(&reached[0]) >= 1, "{moved:?}");

    // With decap back, the same packets are stripped and served: every
    // packet the node forwarded was decapsulated by some backend.
    site.set_decap(true).expect("attaching decap");
    let decapped = |site: &Site| -> u64 {
        site.backends()
            .iter()
            .map(|b| b.decap_counter(Counter::DecapOk).expect("decap counter"))
            .sum()
    };
    let decap_before = decapped(&site);
    let round = site.connect(10).expect("connecting");
    assert_round_ok(&site, &round, "with decap", &[]);
    assert_eq!(
        decapped(&site) - decap_before,
        round.total().vip(TCP_VIP_NAME)
    );
    drop(captures);
    close(site);
}

#[test]
fn connections_are_answered_straight_from_backends_through_both_nodes() {
    if !may_run() {
        return;
    }
    let site = build("e2e-dsr", 2);
    let round = site.connect(40).expect("connecting");
    assert_round_ok(&site, &round, "40 connections", &[]);
    assert_eq!(round.answered(), 40);
    // Every reply segment came from the answering backend's MAC, none from
    // an xlb node's.
    assert_eq!(round.direct(), 40);
    assert_eq!(round.replies_via_node, 0);
    assert_eq!(round.capture_drops, 0);
    // The return path, from the nodes' side: together they forwarded
    // exactly what the client sent, so no reply passed through them.
    let total = round.total();
    assert_eq!(total.vip(TCP_VIP_NAME), round.client_segments_to_vip);
    assert_eq!(total.global(Counter::Tx), total.vip(TCP_VIP_NAME));
    // Active-active: the ECMP route gave each node some of the connections
    // (all 40 on one of two paths has probability 2^-39), and each node
    // forwarded packets.
    let by_node = round.by_node();
    assert_eq!(by_node.len(), 2, "{by_node:?}");
    for node in site.nodes() {
        assert!(round.nodes[node.name].vip(TCP_VIP_NAME) > 0, "{round:#?}");
    }
    let clusters = round.by_cluster();
    assert!(
        CLUSTERS.iter().all(|c| clusters.contains_key(*c)),
        "{clusters:?}"
    );
    // Each answer's cluster is the one its backend belongs to.
    for answer in round
        .connections
        .iter()
        .filter_map(|c| c.outcome.as_ref().ok())
    {
        let backend = site.backend(&answer.backend).expect("a known backend");
        assert_eq!(backend.cluster, answer.cluster);
    }
    close(site);
}

#[test]
fn both_nodes_pick_the_same_backend_for_the_same_flow() {
    if !may_run() {
        return;
    }
    let site = build("e2e-same", 3);
    // The same 60 UDP flows (the client's port is the only difference),
    // first through the first node alone, then through the second alone.
    let ports: Vec<u16> = (41000..41060).collect();
    let through = |node: usize| -> Vec<String> {
        site.route_via(&[node]).expect("routing via one node");
        let before = site.counters().expect("counters");
        let answers: Vec<String> = ports
            .iter()
            .map(|p| site.udp_ask(*p).expect("a UDP answer").backend)
            .collect();
        let after = site.counters().expect("counters");
        // Only that node carried them.
        for n in site.nodes() {
            let moved = after[n.name].since(&before[n.name]).vip(UDP_VIP_NAME);
            if n.name == site.nodes()[node].name {
                assert_eq!(moved, ports.len() as u64, "{}", n.name);
            } else {
                assert_eq!(moved, 0, "{}", n.name);
            }
        }
        answers
    };
    let first = through(0);
    let second = through(1);
    assert_eq!(first, second, "the nodes disagree on some flows");
    let distinct: std::collections::BTreeSet<&String> = first.iter().collect();
    assert!(distinct.len() > 1, "the flows spread: {distinct:?}");
    close(site);
}

#[test]
fn shares_follow_the_weights_and_a_weight_change_at_run_time() {
    if !may_run() {
        return;
    }
    let site = build("e2e-share", 3);
    let n = 300;
    let round = connect_through_steady_rings(&site, n, "equal weights");
    let clusters = round.by_cluster();
    for cluster in CLUSTERS {
        let count = clusters.get(cluster).copied().unwrap_or(0);
        assert_share(count, n, 0.5, &format!("cluster {cluster}, weights 1:1"));
    }
    let backends = round.by_backend();
    for b in site.backends() {
        let count = backends.get(&b.name).copied().unwrap_or(0);
        assert_share(
            count,
            n,
            1.0 / 6.0,
            &format!("{} of six equal backends", b.name),
        );
    }

    // West now weighs three times east, on both nodes: 1/4 and 3/4.
    for response in site
        .call_all(&Request::ClusterWeight {
            vip: TCP_VIP_NAME.into(),
            name: "west".into(),
            weight: 3,
        })
        .expect("changing the weight")
    {
        assert!(matches!(response, Response::Changed { .. }), "{response:?}");
    }
    let round = connect_through_steady_rings(&site, n, "west weighs 3");
    let clusters = round.by_cluster();
    assert_share(
        clusters.get("east").copied().unwrap_or(0),
        n,
        0.25,
        "east, weights 1:3",
    );
    assert_share(
        clusters.get("west").copied().unwrap_or(0),
        n,
        0.75,
        "west, weights 1:3",
    );
    close(site);
}

/// When each backend's probe last changed state, as every node saw it.
fn probe_transitions(site: &Site) -> Vec<Option<f64>> {
    (0..site.nodes().len())
        .flat_map(|node| {
            let status = site.nodes()[node].status().expect("status");
            status
                .vips
                .into_iter()
                .flat_map(|vip| vip.backends)
                .map(|b| b.probe.and_then(|probe| probe.last_transition_unix))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `n` connections through rings that no probe changed meanwhile: the
/// shares they show are the rings'. Under a loaded CI machine a probe can
/// time out and briefly take a backend out, which shifts its share to the
/// others; such a round is measured again (at most three times).
fn connect_through_steady_rings(site: &Site, n: usize, label: &str) -> Round {
    for _ in 0..3 {
        let before = probe_transitions(site);
        let round = site.connect(n).expect("connecting");
        assert_round_ok(site, &round, label, &[]);
        if probe_transitions(site) == before {
            return round;
        }
        eprintln!("{label}: a probe changed state during the round; measuring again");
    }
    panic!("{label}: probes changed state during three rounds in a row");
}

/// How every node's daemon sees a backend in every VIP: its views (one per
/// VIP), none of them missing.
fn views(site: &Site, node: usize, name: &str) -> Vec<BackendView> {
    let status = site.nodes()[node].status().expect("status");
    let views: Vec<BackendView> = status
        .vips
        .into_iter()
        .flat_map(|v| v.backends)
        .filter(|b| b.name == name)
        .collect();
    assert_eq!(views.len(), 4, "{name} is in the four VIPs: {views:#?}");
    views
}

/// Nobody told the daemons: the backend is still enabled, its own probes
/// found it down, and the rings left it out. Health is per address, and an
/// address is down as soon as one of its probes (HTTP and UDP for the IPv4
/// one, HTTP and TCP for the IPv6 one) is: on each node, each address has a
/// probe that saw a closed port.
fn assert_taken_out_by_probes(site: &Site, name: &str) {
    for (k, node) in site.nodes().iter().enumerate() {
        let views = views(site, k, name);
        for view in &views {
            let at = format!("{name} in {} on {}", view.vip, node.name);
            assert_eq!(view.admin, Admin::Enabled, "{at}: nobody drained it");
            assert_eq!(view.health, HealthState::Down, "{at}");
            assert_eq!(view.slots, 0, "{at}: still has ring slots");
        }
        let addrs: BTreeSet<IpAddr> = views.iter().map(|v| v.addr).collect();
        for addr in addrs {
            let probes: Vec<_> = views
                .iter()
                .filter(|v| v.addr == addr)
                .map(|v| v.probe.clone().expect("every backend is probed"))
                .collect();
            assert!(
                probes.iter().any(|p| p.state == "down"
                    && p.last_transition
                        .as_deref()
                        .is_some_and(|t| t.starts_with("down ("))),
                "{name} at {addr} on {}: no probe found it down: {probes:#?}",
                node.name
            );
        }
    }
}

fn assert_back_in_service(site: &Site, name: &str) {
    for (k, node) in site.nodes().iter().enumerate() {
        for view in views(site, k, name) {
            let at = format!("{name} in {} on {}", view.vip, node.name);
            assert_eq!(view.health, HealthState::Up, "{at}");
            assert!(view.slots > 0, "{at}: no ring slots");
            assert_eq!(view.probe.expect("probed").state, "up", "{at}");
        }
    }
}

fn assert_noticed_by_both_nodes(detection: &Detection) {
    let nodes: Vec<&str> = detection.noticed.iter().map(|(n, _)| *n).collect();
    assert_eq!(nodes, ["xlb1", "xlb2"], "{detection:?}");
}

/// The daemons' own probes find a backend whose server stopped: from then
/// on no new connection reaches it; when its server is back, so is its
/// share.
#[test]
fn probes_take_a_stopped_backend_out_and_bring_it_back() {
    if !may_run() {
        return;
    }
    let mut site = build("e2e-fail", 2);
    let first = site.connect(40).expect("connecting");
    assert_round_ok(&site, &first, "before the failure", &[]);
    // The backend that took the most connections fails.
    let (victim, _) = first
        .by_backend()
        .into_iter()
        .max_by_key(|(_, count)| *count)
        .expect("some backend answered");
    let detection = site.fail_backend(&victim).expect("failing a backend");
    assert_noticed_by_both_nodes(&detection);
    assert!(
        detection.slots > 0,
        "{victim} had ring slots: {detection:?}"
    );
    assert_taken_out_by_probes(&site, &victim);

    let down = [victim.clone()];
    let second = site.connect(40).expect("connecting");
    assert_round_ok(&site, &second, "after the failure", &down);
    assert_eq!(second.answered(), 40);
    assert!(!second.by_backend().contains_key(&victim));
    assert_eq!(
        second.total().backend(&victim),
        0,
        "the xlb nodes sent nothing to {victim}"
    );
    // Its IPv6 address is out too: of the IPv6 VIP and of IPv4 in IPv6.
    for service in [WEB6, WEB46] {
        let round = site.connect_to(service, 20).expect("connecting");
        assert_round_ok(&site, &round, service.name, &down);
        assert_eq!(round.answered(), 20, "{round:#?}");
    }
    let udp: Vec<String> = (44000..44020)
        .map(|port| site.udp_ask(port).expect("a UDP answer").backend)
        .collect();
    assert!(!udp.contains(&victim), "{udp:?}");

    let detection = site.recover_backend(&victim).expect("recovering");
    assert_noticed_by_both_nodes(&detection);
    assert_back_in_service(&site, &victim);
    let n = 120;
    let third = connect_through_steady_rings(&site, n, "after the recovery");
    let count = third.by_backend().get(&victim).copied().unwrap_or(0);
    assert_share(count, n, 0.25, &format!("{victim}, back among four"));
    close(site);
}

#[test]
fn probes_move_traffic_off_a_failed_cluster_and_back() {
    if !may_run() {
        return;
    }
    let mut site = build("e2e-cluster", 2);
    let detection = site.fail_cluster("west").expect("failing west");
    assert_noticed_by_both_nodes(&detection);
    let down: Vec<String> = site
        .backends()
        .iter()
        .filter(|b| b.cluster == "west")
        .map(|b| b.name.clone())
        .collect();
    for name in &down {
        assert_taken_out_by_probes(&site, name);
    }
    let round = site.connect(30).expect("connecting");
    assert_round_ok(&site, &round, "west down", &down);
    assert_eq!(round.by_cluster().get("east"), Some(&30), "{round:#?}");
    // UDP follows the same health.
    let answers: Vec<String> = (43000..43020)
        .map(|port| site.udp_ask(port).expect("a UDP answer").cluster)
        .collect();
    assert!(answers.iter().all(|c| c == "east"), "{answers:?}");

    let detection = site.recover_cluster("west").expect("west back");
    assert_noticed_by_both_nodes(&detection);
    for name in &down {
        assert_back_in_service(&site, name);
    }
    let n = 80;
    let round = connect_through_steady_rings(&site, n, "west back");
    let west = round.by_cluster().get("west").copied().unwrap_or(0);
    assert_share(west, n, 0.5, "west, back at weights 1:1");
    close(site);
}

/// A connection that stays open keeps its backend through everything that
/// must not move it: an ECMP change to the other node while the ring is the
/// same, a ring change, the failure of another backend, and a restart of the
/// daemon on the node that carries it.
#[test]
fn a_long_lived_connection_survives_node_moves_ring_changes_failures_and_restarts() {
    if !may_run() {
        return;
    }
    let mut site = build("e2e-long", 2);
    site.route_via(&[0]).expect("routing via xlb1");
    let mut held = site.hold().expect("opening a held connection");
    let chosen = held.backend.clone();
    let still = |what: &str, held: &mut xlb::demo::Held| {
        let answer = held
            .ask()
            .unwrap_or_else(|err| panic!("after {what}: {err}"));
        assert_eq!(answer, chosen, "after {what}");
    };
    still("opening", &mut held);

    // The router moves the flow to the other node, which has never seen it:
    // the same ring gives it the same backend.
    let before = site.counters().expect("counters");
    site.route_via(&[1]).expect("routing via xlb2");
    still("moving to xlb2", &mut held);
    let moved = site.counters().expect("counters")["xlb2"].since(&before["xlb2"]);
    assert!(
        moved.backend(&chosen.backend) > 0,
        "xlb2 carried it: {moved:?}"
    );
    site.route_via(&[0]).expect("routing via xlb1 again");
    still("moving back to xlb1", &mut held);

    let other = site
        .backends()
        .iter()
        .find(|b| b.name != chosen.backend)
        .map(|b| (b.cluster, b.name.clone()))
        .expect("another backend");
    site.call_all(&Request::BackendWeight {
        vip: TCP_VIP_NAME.into(),
        cluster: other.0.into(),
        name: other.1.clone(),
        weight: 5,
    })
    .expect("changing the ring");
    still("a ring change", &mut held);

    site.fail_backend(&other.1)
        .expect("failing another backend");
    still("the failure of another backend", &mut held);

    site.stop_daemon(0).expect("stopping xlb1's daemon");
    still("xlb1's daemon stopped", &mut held);
    site.start_daemon(0).expect("starting xlb1's daemon");
    still("xlb1's daemon restarted", &mut held);
    drop(held);
    close(site);
}

#[test]
fn a_udp_service_is_answered_through_the_vip() {
    if !may_run() {
        return;
    }
    let site = build("e2e-udp", 2);
    let before = site.counters().expect("counters");
    let answers: Vec<_> = (42000..42040)
        .map(|port| site.udp_ask(port).expect("a UDP answer"))
        .collect();
    let clusters: std::collections::BTreeSet<&str> =
        answers.iter().map(|a| a.cluster.as_str()).collect();
    assert_eq!(clusters.len(), 2, "{answers:?}");
    let after = site.counters().expect("counters");
    let forwarded: u64 = site
        .nodes()
        .iter()
        .map(|n| after[n.name].since(&before[n.name]).vip(UDP_VIP_NAME))
        .sum();
    assert_eq!(forwarded, 40, "one datagram each, balanced by the nodes");
    close(site);
}

/// The same checks as for the IPv4 VIP (answered, replies straight from
/// the backend, forwarded exactly what the client sent) for an IPv6 VIP
/// served by the backends' IPv6 addresses (IPv6 in IPv6) and an IPv4 VIP
/// served by them too (IPv4 in IPv6).
#[test]
fn ipv6_backends_serve_an_ipv6_vip_and_an_ipv4_vip() {
    if !may_run() {
        return;
    }
    let site = build("e2e-ipv6", 2);
    for service in [WEB6, WEB46] {
        let before: u64 = site
            .backends()
            .iter()
            .map(|b| b.decap_counter(Counter::DecapOk).expect("decap counter"))
            .sum();
        let round = site.connect_to(service, 30).expect("connecting");
        assert_round_ok(&site, &round, service.name, &[]);
        assert_eq!((round.answered(), round.direct()), (30, 30), "{round:#?}");
        assert_eq!(round.replies_via_node, 0);
        let forwarded = round.total().vip(service.name);
        assert!(forwarded > 0);
        assert_eq!(forwarded, round.client_segments_to_vip);
        let decapsulated: u64 = site
            .backends()
            .iter()
            .map(|b| b.decap_counter(Counter::DecapOk).expect("decap counter"))
            .sum();
        assert_eq!(decapsulated - before, forwarded, "{}", service.name);
        assert_eq!(round.by_node().len(), 2, "{round:#?}");
    }
    close(site);
}

/// The sum of `counter` over the site's nodes.
fn site_global(site: &Site, counter: Counter) -> u64 {
    let counters = site.counters().expect("reading the nodes' counters");
    counters.values().map(|node| node.global(counter)).sum()
}

/// Sends an HTTP request padded to `len` bytes to `service` from the client;
/// returns the answer and the path MTU the connection ended with.
fn upload(site: &Site, service: SocketAddr, len: usize) -> (String, u32) {
    site.client()
        .run_in(move || {
            let mut stream =
                TcpStream::connect_timeout(&service, Duration::from_secs(5)).expect("connecting");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            let head = "GET / HTTP/1.0\r\nX-Pad: ";
            let pad = "x".repeat(len - head.len() - 4);
            write!(stream, "{head}{pad}\r\n\r\n").expect("sending the request");
            let mut answer = String::new();
            stream
                .read_to_string(&mut answer)
                .expect("reading the answer");
            (answer, path_mtu(&stream))
        })
        .expect("entering the client")
}

/// The path MTU of a connected socket's route, as its kernel knows it now.
fn path_mtu(stream: &TcpStream) -> u32 {
    let (level, name) = if stream.peer_addr().expect("connected").is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    };
    let mut mtu: libc::c_int = 0;
    let mut size = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the socket is open; `mtu` and `size` are live locals of the
    // sizes passed.
    let got = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&raw mut mtu).cast(),
            &mut size,
        )
    };
    assert_eq!(got, 0, "IP(V6)_MTU: {}", std::io::Error::last_os_error());
    mtu as u32
}

/// A client whose full-size packets do not fit the tunnel (its MTU is the
/// fabric's, so the outer header makes them too big for the nodes' way to
/// the backends) is told so by xlb's ICMP, from the VIP; its kernel lowers
/// the path MTU, and the upload goes through instead of stalling.
#[test]
fn a_client_learns_the_path_mtu_from_xlb_and_its_upload_completes() {
    if !may_run() {
        return;
    }
    let site = Site::build(SiteOptions {
        backends_per_cluster: 1,
        tag: "e2e-pmtu".into(),
        client_mtu: Some(FABRIC_MTU),
        ..SiteOptions::new(XLB)
    })
    .expect("building the site");
    // IPIP adds 20 bytes, IP6IP6 40.
    for (service, outer) in [(WEB, 20), (WEB6, 40)] {
        let before = site_global(&site, Counter::IcmpTooBig);
        let (answer, mtu) = upload(&site, service.addr, 8000);
        assert!(
            answer.starts_with("HTTP/1.0 200 OK") && answer.contains("backend "),
            "{}: {answer:?}",
            service.name
        );
        assert!(
            site_global(&site, Counter::IcmpTooBig) > before,
            "{}: the nodes answered with ICMP",
            service.name
        );
        assert_eq!(
            mtu,
            FABRIC_MTU - outer,
            "{}: the client learnt the MTU inside the tunnel",
            service.name
        );
    }
    close(site);
}

#[test]
fn teardown_leaves_nothing_even_after_a_panic() {
    if !may_run() {
        return;
    }
    let mut footprint = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let site = build("e2e-panic", 1);
        footprint = Some(site.footprint());
        let fp = footprint.as_ref().unwrap();
        assert!(!fp.leftovers().is_empty(), "the site exists while it runs");
        assert_eq!(fp.pids.len(), 2, "two daemons");
        panic!("deliberate failure halfway");
    }));
    assert!(result.is_err());
    assert_nothing_left(&footprint.expect("the site was built"));
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain old data; sched_setaffinity only changes
    // the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "pinning to CPU {cpu}");
}

/// On veth the CPU that runs the balancer for a packet is the sender's, so
/// one flow's packets can meet different CPUs. A flow established through
/// CPU 0 must keep its backend when its next packet, after a ring change,
/// is carried by CPU 1.
///
/// A connection table private to each CPU failed this: CPU 1 did not know
/// the flow, took the new ring, and the other backend answered with a reset.
#[test]
fn an_established_flow_keeps_its_backend_when_another_cpu_carries_it() {
    if !may_run() {
        return;
    }
    if thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let mut site = build("e2e-cpu", 1);
    let vip = SocketAddr::from(site.vip());
    site.route_via(&[0]).expect("routing via one node");
    let before = site.counters().expect("counters");
    let mut stream = site
        .client()
        .run_in(move || {
            pin_to_cpu(0);
            TcpStream::connect(vip)
        })
        .expect("entering the client")
        .expect("connecting");
    thread::sleep(Duration::from_millis(50));
    let opened = site.counters().expect("counters")["xlb1"].since(&before["xlb1"]);
    let chosen = opened
        .backends
        .iter()
        .find(|(_, packets)| **packets > 0)
        .map(|(name, _)| name.clone())
        .expect("the handshake went to a backend");
    // Out of the ring, still up and serving: its flows must stay with it.
    site.drain_backend(&chosen).expect("draining");
    let reply = thread::scope(|scope| {
        scope
            .spawn(|| {
                pin_to_cpu(1);
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                stream.write_all(b"who\n")?;
                let mut reply = String::new();
                stream.read_to_string(&mut reply).map(|_| reply)
            })
            .join()
            .expect("the sender thread")
    });
    let reply = reply.expect("the established connection survives the ring change");
    assert!(reply.contains(chosen.as_str()), "{reply}");
    close(site);
}
