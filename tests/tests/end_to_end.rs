//! End to end, in network namespaces: the demo's site (a client, one xlb node
//! running the balancer in native XDP, two clusters of backends running the
//! decap program, all on one bridge) with real packets and real TCP
//! connections. Each test builds its own site and checks that tearing it
//! down leaves no namespace behind.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread;
use std::time::Duration;

use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, TcpHeader};
use lb_common::{Counter, OUTER_TTL};
use xlb::demo::{
    CLIENT_ADDR, Frame, NODE_ADDR, PacketCapture, Round, Site, SiteOptions, VIP, VIP_PORT,
    check_round,
};
use xlb::topology::Topology;

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
        ..SiteOptions::default()
    })
    .expect("building the site")
}

/// Tears the site down and checks that none of its namespaces is left.
fn close(site: Site) {
    let prefix = site.prefix().to_owned();
    site.close().expect("tearing the site down");
    let left = Topology::leftovers(&prefix).expect("listing namespaces");
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn assert_round_ok(site: &Site, round: &Round, label: &str, failed: Option<&str>) {
    let problems = check_round(site, round, label, failed);
    assert!(problems.is_empty(), "{problems:#?}\n{round:#?}");
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

    let mut reached = Vec::new();
    for (backend, capture) in site.backends().iter().zip(&captures) {
        let frames = capture.frames().expect("reading a capture");
        for packet in frames.iter().filter_map(parse_encapsulated) {
            reached.push(backend.name.clone());
            assert_eq!(packet.dmac, backend.mac, "to the backend's MAC");
            assert_eq!(packet.smac, site.node_mac(), "from the xlb node's MAC");
            assert_eq!(Ipv4Addr::from(packet.outer.destination), backend.addr);
            assert_eq!(Ipv4Addr::from(packet.outer.source), NODE_ADDR);
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
    let moved = site.counters().expect("counters").since(&before);
    assert!(moved.global(Counter::Tx) >= 1, "{moved:?}");
    assert!(moved.backend(&reached[0]).packets >= 1, "{moved:?}");

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
    assert_round_ok(&site, &round, "with decap", None);
    assert_eq!(decapped(&site) - decap_before, round.node.vip.packets);
    drop(captures);
    close(site);
}

#[test]
fn connections_are_answered_straight_from_backends_of_both_clusters() {
    if !may_run() {
        return;
    }
    let site = build("e2e-dsr", 2);
    let round = site.connect(40).expect("connecting");
    assert_round_ok(&site, &round, "40 connections", None);
    assert_eq!(round.answered(), 40);
    // Every reply segment came from the answering backend's MAC, none from
    // the xlb node's; the node forwarded exactly what the client sent.
    assert_eq!(round.direct(), 40);
    assert_eq!(round.replies_via_node, 0);
    assert_eq!(round.capture_drops, 0);
    assert_eq!(round.node.vip.packets, round.client_segments_to_vip);
    assert_eq!(round.node.global(Counter::Tx), round.node.vip.packets);
    let clusters = round.by_cluster();
    assert!(
        clusters.contains_key("east") && clusters.contains_key("west"),
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
fn a_failed_backend_gets_no_new_connections() {
    if !may_run() {
        return;
    }
    let mut site = build("e2e-fail", 2);
    let first = site.connect(40).expect("connecting");
    assert_round_ok(&site, &first, "before the failure", None);
    // The backend that took the most connections fails.
    let (victim, _) = first
        .by_backend()
        .into_iter()
        .max_by_key(|(_, count)| *count)
        .expect("some backend answered");
    let moved = site.fail_backend(&victim).expect("failing a backend");
    assert!(moved > 0);
    let id = site.backend(&victim).unwrap().id;
    assert!(!site.ring().contains(&id));

    let second = site.connect(40).expect("connecting");
    assert_round_ok(&site, &second, "after the failure", Some(&victim));
    assert_eq!(second.answered(), 40);
    assert!(!second.by_backend().contains_key(&victim));
    let traffic = second.node.backend(&victim);
    assert_eq!(
        (traffic.packets, traffic.new_flows),
        (0, 0),
        "the xlb node sent nothing to {victim}"
    );
    close(site);
}

#[test]
fn teardown_removes_every_namespace_even_after_a_panic() {
    if !may_run() {
        return;
    }
    let mut prefix = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let site = build("e2e-panic", 1);
        prefix = Some(site.prefix().to_owned());
        assert!(!Topology::leftovers(site.prefix()).unwrap().is_empty());
        panic!("deliberate failure halfway");
    }));
    assert!(result.is_err());
    let left = Topology::leftovers(&prefix.expect("the site was built")).unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
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
    let opened = site.counters().expect("counters").since(&before);
    let (chosen, _) = opened
        .backends
        .iter()
        .find(|(_, t)| t.packets > 0)
        .expect("the handshake went to a backend")
        .clone();
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
    assert!(reply.contains(&chosen), "{reply}");
    close(site);
}
