//! The probe egress program (tc) as a specification: a via-VIP probe packet
//! of the xlb node, marked `PROBE_MARK_BASE | backend id` by its socket,
//! leaves encapsulated to that backend exactly as the balancer would send
//! a client's packet to it (the same `expect::encapsulated` frame), with
//! the next hop's Ethernet addresses; every other packet leaves untouched.
//!
//! The real object runs in the kernel with BPF_PROG_TEST_RUN on an skb
//! whose `__sk_buff` context carries the mark, in the standard world of
//! `xlb_tests::world`. The test run's device is the namespace's loopback
//! (ifindex 1), which is the standard next hops' interface: those packets
//! leave with TC_ACT_OK, and a next hop elsewhere means a redirect.

use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{Counter::*, NextHop, PROBE_MARK_BASE, probe_mark};
use xlb_tests::*;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// `struct __sk_buff` as BPF_PROG_TEST_RUN takes it: zero but for `mark`
/// (offset 8), one of the fields the kernel lets a test set.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK_OFFSET: usize = 8;

/// The node's own address, source of its probes.
const NODE_V4: &str = "198.18.100.200";
const NODE_V6: &str = "fd00:db8:c::200";

macro_rules! fixture {
    () => {
        match Fixture::new() {
            Some(fixture) => fixture,
            None => return,
        }
    };
}

/// What the program did with a packet: its tc action, the packet as it
/// left, and the counters it moved.
struct Egressed {
    action: u32,
    bytes: Vec<u8>,
    /// The skb's mark as the program left it.
    mark: u32,
    moved: Delta,
}

fn run_egress(fx: &Fixture, frame: &[u8], mark: u32) -> Egressed {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4].copy_from_slice(&mark.to_ne_bytes());
    let mut out = vec![0u8; 4096];
    let mut ctx_out = [0u8; SKB_CTX_LEN];
    let before = fx.counters();
    let result = fx
        .dp
        .probe_egress()
        .expect("the probe egress program")
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN of the probe egress program");
    out.truncate(result.data_size_out as usize);
    Egressed {
        action: result.return_value,
        bytes: out,
        mark: u32::from_ne_bytes(
            ctx_out[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4]
                .try_into()
                .unwrap(),
        ),
        moved: fx.counters().since(&before),
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

/// A TCP SYN of the node to `vip`, as the node's stack hands it to the
/// interface (the Ethernet addresses are its route's, which the program
/// replaces).
fn probe_syn(vip: &VipDef) -> Vec<u8> {
    let src = if vip.addr.is_ipv4() {
        ip(NODE_V4)
    } else {
        ip(NODE_V6)
    };
    Pkt::tcp_syn(src, 41000, vip.addr, vip.port).build()
}

/// Runs a marked probe packet and checks it leaves with `action`, exactly
/// as the balancer would have encapsulated it to `backend_id`, with one
/// verdict, `probe_encap`, and without its mark: wherever it is sent on,
/// this program passes it.
#[track_caller]
fn assert_encapsulated(fx: &Fixture, frame: &[u8], backend_id: u32, action: u32) {
    let done = run_egress(fx, frame, probe_mark(backend_id));
    assert_eq!(done.action, action, "tc action");
    assert_eq!(done.mark, 0, "the mark is cleared once encapsulated");
    let expected = encapsulated(frame, backend(backend_id).addr, fx.egress(backend_id));
    assert_frame_eq(&done.bytes, &expected, "encapsulated probe");
    let parsed = parse_encap(&done.bytes).unwrap_or_else(|e| panic!("malformed output: {e}"));
    check_ip_packet(parsed.inner).unwrap_or_else(|e| panic!("inner packet: {e}"));
    done.moved.assert_counters(&[ProbeEncap]);
    done.moved.assert_no_traffic();
}

#[test]
fn a_v4_probe_is_sent_in_ipip_to_its_v4_backend() {
    let fx = fixture!();
    assert_encapsulated(&fx, &probe_syn(&WEB_V4), 3, TC_ACT_OK);
}

#[test]
fn a_v6_probe_is_sent_in_ip6ip6_to_its_v6_backend() {
    let fx = fixture!();
    assert_encapsulated(&fx, &probe_syn(&WEB_V6), 12, TC_ACT_OK);
}

#[test]
fn a_v4_probe_to_a_v6_backend_is_sent_4in6() {
    let fx = fixture!();
    assert_encapsulated(&fx, &probe_syn(&V4_OVER_V6), 11, TC_ACT_OK);
}

#[test]
fn a_probe_keeps_its_payload_and_tos() {
    let fx = fixture!();
    let request = Pkt::tcp_ack(ip(NODE_V4), 41000, WEB_V4.addr, 80)
        .tos(0x28)
        .payload(b"GET /health HTTP/1.1\r\nHost: web\r\n\r\n")
        .build();
    assert_encapsulated(&fx, &request, 1, TC_ACT_OK);
    let answer = Pkt::udp(ip(NODE_V6), 41000, ANY_UDP_V6.addr, 53)
        .payload(b"ping")
        .build();
    assert_encapsulated(&fx, &answer, 14, TC_ACT_OK);
}

#[test]
fn a_next_hop_on_another_interface_is_a_redirect() {
    let mut fx = fixture!();
    fx.set_nexthop(
        2,
        NextHop {
            ifindex: 7,
            ..standard_nexthop(2)
        },
    );
    assert_encapsulated(&fx, &probe_syn(&WEB_V4), 2, TC_ACT_REDIRECT);
}

#[test]
fn packets_without_xlb_s_mark_leave_untouched_and_uncounted() {
    let fx = fixture!();
    let frame = probe_syn(&WEB_V4);
    for mark in [0, 3, 0x1234_0003, PROBE_MARK_BASE ^ 0x0001_0000] {
        let done = run_egress(&fx, &frame, mark);
        assert_eq!(done.action, TC_ACT_OK, "mark {mark:#x}");
        assert_eq!(done.mark, mark, "another's mark stays");
        assert_frame_eq(&done.bytes, &frame, "an unmarked packet");
        done.moved.assert_counters(&[]);
    }
    let done = run_egress(&fx, &arp_request(), 0);
    assert_eq!(done.action, TC_ACT_OK);
    assert_frame_eq(&done.bytes, &arp_request(), "ARP");
}

#[test]
fn a_mark_for_a_backend_that_is_not_programmed_is_dropped_and_counted() {
    let fx = fixture!();
    for id in [UNPROGRAMMED_BACKEND, 0, 0xffff] {
        let done = run_egress(&fx, &probe_syn(&WEB_V4), probe_mark(id));
        assert_eq!(done.action, TC_ACT_SHOT, "backend {id}");
        done.moved.assert_counters(&[ProbeDropNoBackend]);
    }
}

#[test]
fn a_backend_without_a_valid_next_hop_and_no_route_is_dropped_and_counted() {
    let mut fx = fixture!();
    fx.dp.nexthops.invalidate(4).expect("writing NEXTHOPS");
    // The FIB is asked instead; the test's namespace has no route at all.
    let done = run_egress(&fx, &probe_syn(&WEB_V4), probe_mark(4));
    assert_eq!(done.action, TC_ACT_SHOT);
    done.moved.assert_counters(&[FibLookup, ProbeDropNoRoute]);
}

#[test]
fn a_probe_that_would_not_fit_the_next_hop_mtu_is_dropped_and_counted() {
    let mut fx = fixture!();
    let frame = Pkt::tcp_ack(ip(NODE_V4), 41000, WEB_V4.addr, 80)
        .payload(&[0x61; 100])
        .build();
    let inner_len = (frame.len() - 14) as u32;
    // Fits as it is, not with the 20 bytes of the outer header.
    fx.set_nexthop(
        1,
        NextHop {
            mtu: inner_len + 19,
            ..standard_nexthop(1)
        },
    );
    let done = run_egress(&fx, &frame, probe_mark(1));
    assert_eq!(done.action, TC_ACT_SHOT);
    done.moved.assert_counters(&[ProbeDropTooBig]);
    fx.set_nexthop(
        1,
        NextHop {
            mtu: inner_len + 20,
            ..standard_nexthop(1)
        },
    );
    assert_encapsulated(&fx, &frame, 1, TC_ACT_OK);
}

#[test]
fn a_marked_packet_that_is_not_ip_or_is_cut_short_is_dropped_and_counted() {
    let fx = fixture!();
    let mut truncated = probe_syn(&WEB_V4);
    truncated.truncate(14 + 30);
    // (The kernel refuses to test-run an IPv6 frame shorter than the
    // fixed header, so this one is cut inside its payload.)
    let mut cut_v6 = probe_syn(&WEB_V6);
    cut_v6.truncate(14 + 40 + 4);
    for frame in [arp_request(), truncated, cut_v6] {
        let done = run_egress(&fx, &frame, probe_mark(1));
        assert_eq!(done.action, TC_ACT_SHOT, "{}", hex(&frame));
        done.moved.assert_counters(&[ProbeDropMalformed]);
    }
}
