//! The balancer's packet path as a specification: for each kind of packet,
//! the exact verdict and frame that leave, and the counters it moves.
//!
//! Every test loads the real XDP object into a fixture with the standard
//! world of `xlb_tests::world` and runs packets with BPF_PROG_TEST_RUN.
//! Outputs are compared byte for byte with the frame `xlb_tests::expect`
//! computes independently, and parsed with etherparse (checksums
//! recomputed, lengths checked).

use std::net::IpAddr;

use lb_common::{
    ConnSlot, Counter::*, FLOW_WAYS, FlowKey, ICMP_REPLIES_PER_SEC, NextHop,
    SETTINGS_F_GATEWAY_MAC, ring_slot,
};
use xlb_tests::*;

/// A fixture, or return (skip) when the test may not run here.
macro_rules! fixture {
    () => {
        match Fixture::new() {
            Some(fixture) => fixture,
            None => return,
        }
    };
}

/// A packet the balancer forwarded: to which backend, the output, and the
/// counters it moved.
struct Forwarded {
    backend: u32,
    out: Outcome,
    moved: Delta,
}

impl Forwarded {
    fn encap(&self) -> Encap<'_> {
        parse_encap(&self.out.bytes).unwrap()
    }
}

/// Runs `frame`, which must leave with XDP_TX for the backend the ring
/// gives `flow` on `vip`, exactly as `expect::encapsulated` builds it, and
/// with an inner packet that is still correct (checksums, lengths).
#[track_caller]
fn assert_forwarded(fx: &mut Fixture, frame: &[u8], vip: &VipDef, flow: &FlowKey) -> Forwarded {
    let backend = fx.expected_backend(vip, flow);
    let (out, moved) = fx.run_counted(frame);
    let encap = out.assert_sent(Action::Tx, &fx.expected_encap(frame, backend));
    check_ip_packet(encap.inner).unwrap_or_else(|e| panic!("inner packet: {e}"));
    Forwarded {
        backend,
        out,
        moved,
    }
}

// Step 1: traffic that is not for a VIP leaves untouched.

#[test]
fn tcp_to_an_address_without_vip_passes_untouched() {
    let mut fx = fixture!();
    for frame in [
        Pkt::tcp_syn(CLIENT_V4, 40000, NOT_VIP_V4, 80).build(),
        Pkt::tcp_syn(CLIENT_V6, 40000, NOT_VIP_V6, 443).build(),
        Pkt::udp(CLIENT_V4, 40000, NOT_VIP_V4, 53)
            .vlan(0, 7)
            .build(),
    ] {
        let moved = fx.assert_passes(&frame, PassNotVip);
        moved.assert_no_traffic();
    }
}

#[test]
fn non_ip_frames_pass_untouched() {
    let mut fx = fixture!();
    let mut lldp = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e];
    lldp.extend_from_slice(&CLIENT_MAC);
    lldp.extend_from_slice(&[0x88, 0xcc, 0x02, 0x07, 0x04, 1, 2, 3, 4, 5, 6, 0, 0]);
    for frame in [arp_request(), lldp] {
        fx.assert_passes(&frame, PassNotIp);
    }
}

#[test]
fn vip_address_on_a_port_or_protocol_without_vip_passes_untouched() {
    let mut fx = fixture!();
    for frame in [
        // 192.0.2.10 has TCP 80 and UDP 53, no wildcard.
        Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 8080).build(),
        Pkt::udp(CLIENT_V4, 40000, WEB_V4.addr, 80).build(),
        Pkt::tcp_syn(CLIENT_V4, 40000, DNS_V4.addr, 53).build(),
        Pkt::tcp_syn(CLIENT_V6, 40000, WEB_V6.addr, 80).build(),
    ] {
        fx.assert_passes(&frame, PassNotVip);
    }
}

#[test]
fn icmp_to_a_vip_passes_untouched() {
    let mut fx = fixture!();
    for frame in [
        Pkt::icmp_echo(CLIENT_V4, WEB_V4.addr)
            .payload(b"ping")
            .build(),
        Pkt::icmp_echo(CLIENT_V4, ANY_TCP_V4.addr).build(),
        Pkt::icmp_echo(CLIENT_V6, WEB_V6.addr)
            .payload(b"ping")
            .build(),
    ] {
        fx.assert_passes(&frame, PassNotVip);
    }
}

// Steps 2-6: new flows take the ring and are encapsulated to the backend.

#[test]
fn tcp_syn_v4_is_sent_in_ipip_to_the_backend_the_ring_gives() {
    let mut fx = fixture!();
    // TOS 0xb9: DSCP EF and an ECN bit, both copied to the outer header.
    let pkt = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80)
        .tos(0xb9)
        .payload(b"hello");
    let frame = pkt.build();
    let forwarded = assert_forwarded(&mut fx, &frame, &WEB_V4, &pkt.flow());
    let (backend, moved) = (forwarded.backend, &forwarded.moved);
    moved.assert_counters(&[ConnMiss, Tx]);
    assert_eq!(moved.vip(WEB_V4.id), traffic(1, frame.len() as u64, 1));
    assert_eq!(moved.backend(backend), traffic(1, frame.len() as u64, 1));
    assert_eq!(moved.vips.len() + moved.backends.len(), 2);
    assert_eq!(
        fx.tracked(&pkt.flow()),
        Some(backend),
        "the SYN records its flow"
    );

    let encap = forwarded.encap();
    assert_eq!(encap.outer.dst(), world::backend(backend).addr);
    assert_eq!(encap.outer.src(), IpAddr::from(OUTER_SRC_V4));
    assert_eq!(
        encap.inner,
        &pkt.ip_packet()[..],
        "the client's packet, byte for byte"
    );
}

#[test]
fn new_flows_spread_over_the_ring_as_predicted() {
    let mut fx = fixture!();
    let mut used = std::collections::BTreeSet::new();
    for sport in 30000..30064 {
        let pkt = Pkt::tcp_syn(CLIENT_V4, sport, WEB_V4.addr, 80);
        let Forwarded { backend, .. } =
            assert_forwarded(&mut fx, &pkt.build(), &WEB_V4, &pkt.flow());
        used.insert(backend);
    }
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        POOL_V4,
        "64 flows reach every backend"
    );
}

#[test]
fn established_flow_follows_its_syn_through_the_connection_table() {
    let mut fx = fixture!();
    let syn = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let Forwarded { backend, .. } = assert_forwarded(&mut fx, &syn.build(), &WEB_V4, &syn.flow());

    let ack = Pkt::tcp_ack(CLIENT_V4, 40000, WEB_V4.addr, 80).payload(b"GET / HTTP/1.1\r\n\r\n");
    let frame = ack.build();
    let (out, moved) = fx.run_counted(&frame);
    out.assert_sent(Action::Tx, &fx.expected_encap(&frame, backend));
    moved.assert_counters(&[ConnHit, Tx]);
    assert_eq!(moved.vip(WEB_V4.id), traffic(1, frame.len() as u64, 0));
    assert_eq!(moved.backend(backend), traffic(1, frame.len() as u64, 0));
}

#[test]
fn packet_of_an_unknown_flow_takes_the_ring_and_is_recorded() {
    let mut fx = fixture!();
    let ack = Pkt::tcp_ack(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let Forwarded { backend, moved, .. } =
        assert_forwarded(&mut fx, &ack.build(), &WEB_V4, &ack.flow());
    moved.assert_counters(&[ConnMiss, Tx]);
    assert_eq!(moved.vip(WEB_V4.id).new_flows, 1);
    assert_eq!(fx.tracked(&ack.flow()), Some(backend));

    let (_, moved) = fx.run_counted(&ack.build());
    moved.assert_counters(&[ConnHit, Tx]);
}

#[test]
fn udp_v4_is_sent_in_ipip_and_tracked() {
    let mut fx = fixture!();
    let pkt = Pkt::udp(CLIENT_V4, 5353, DNS_V4.addr, 53).payload(b"\x12\x34 query");
    let frame = pkt.build();
    let Forwarded { backend, moved, .. } = assert_forwarded(&mut fx, &frame, &DNS_V4, &pkt.flow());
    moved.assert_counters(&[ConnMiss, Tx]);
    assert_eq!(moved.vip(DNS_V4.id), traffic(1, frame.len() as u64, 1));
    assert_eq!(fx.tracked(&pkt.flow()), Some(backend));

    let (out, moved) = fx.run_counted(&frame);
    out.assert_sent(Action::Tx, &fx.expected_encap(&frame, backend));
    moved.assert_counters(&[ConnHit, Tx]);
}

#[test]
fn ipv6_vip_is_sent_in_ip6ip6() {
    let mut fx = fixture!();
    let pkt = Pkt::tcp_syn(CLIENT_V6, 40000, WEB_V6.addr, 443)
        .tos(0x2a)
        .payload(b"hello");
    let frame = pkt.build();
    let forwarded = assert_forwarded(&mut fx, &frame, &WEB_V6, &pkt.flow());
    let (backend, moved) = (forwarded.backend, &forwarded.moved);
    assert!(POOL_V6.contains(&backend));
    moved.assert_counters(&[ConnMiss, Tx]);
    assert_eq!(moved.vip(WEB_V6.id), traffic(1, frame.len() as u64, 1));

    let encap = forwarded.encap();
    let OuterIp::V6(outer) = &encap.outer else {
        panic!("IP6IP6 has an IPv6 outer header")
    };
    assert_eq!(outer.next_header.0, 41);
    assert_eq!(outer.traffic_class, 0x2a);
    assert_eq!(encap.outer.src(), IpAddr::from(OUTER_SRC_V6));

    let ack = Pkt::tcp_ack(CLIENT_V6, 40000, WEB_V6.addr, 443).build();
    let (out, moved) = fx.run_counted(&ack);
    out.assert_sent(Action::Tx, &fx.expected_encap(&ack, backend));
    moved.assert_counters(&[ConnHit, Tx]);
}

#[test]
fn ipv4_vip_with_ipv6_backends_is_sent_4in6() {
    let mut fx = fixture!();
    let pkt = Pkt::tcp_syn(CLIENT_V4, 40000, V4_OVER_V6.addr, 80).tos(0x10);
    let frame = pkt.build();
    let forwarded = assert_forwarded(&mut fx, &frame, &V4_OVER_V6, &pkt.flow());
    assert!(POOL_V6.contains(&forwarded.backend));
    let moved = &forwarded.moved;
    moved.assert_counters(&[ConnMiss, Tx]);

    let encap = forwarded.encap();
    let OuterIp::V6(outer) = &encap.outer else {
        panic!("4in6 has an IPv6 outer header")
    };
    assert_eq!(outer.next_header.0, 4, "IPv4 inside");
    assert_eq!(usize::from(outer.payload_length), pkt.ip_packet().len());
}

#[test]
fn vlan_tagged_frame_leaves_with_its_tag() {
    let mut fx = fixture!();
    for (pkt, vip) in [
        (
            Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80).vlan(5, 100),
            WEB_V4,
        ),
        (
            Pkt::tcp_syn(CLIENT_V6, 40000, WEB_V6.addr, 443).vlan(0, 4094),
            WEB_V6,
        ),
    ] {
        let frame = pkt.build();
        let forwarded = assert_forwarded(&mut fx, &frame, &vip, &pkt.flow());
        forwarded.moved.assert_counters(&[ConnMiss, Tx]);
        let encap = forwarded.encap();
        let tag = encap.vlan.expect("the tag is kept");
        let (priority, id) = pkt.vlan.unwrap();
        assert_eq!((tag.pcp.value(), tag.vlan_id.value()), (priority, id));
    }
}

#[test]
fn wildcard_vip_takes_every_port_of_its_protocol() {
    let mut fx = fixture!();
    for dport in [1, 22, 80, 8080, 65535] {
        let pkt = Pkt::tcp_syn(CLIENT_V4, 40000, ANY_TCP_V4.addr, dport);
        let frame = pkt.build();
        let Forwarded { moved, .. } = assert_forwarded(&mut fx, &frame, &ANY_TCP_V4, &pkt.flow());
        moved.assert_counters(&[ConnMiss, Tx]);
        assert_eq!(moved.vip(ANY_TCP_V4.id), traffic(1, frame.len() as u64, 1));
    }
    let udp = Pkt::udp(CLIENT_V4, 40000, ANY_UDP_V4.addr, 4789);
    let Forwarded { moved, .. } = assert_forwarded(&mut fx, &udp.build(), &ANY_UDP_V4, &udp.flow());
    assert_eq!(moved.vip(ANY_UDP_V4.id).packets, 1);
}

#[test]
fn port_specific_vip_wins_over_the_wildcard_on_its_address() {
    let mut fx = fixture!();
    let pkt = Pkt::tcp_syn(CLIENT_V4, 40000, PINNED_V4.addr, 8443);
    let frame = pkt.build();
    let Forwarded { backend, moved, .. } =
        assert_forwarded(&mut fx, &frame, &PINNED_V4, &pkt.flow());
    assert_eq!(backend, 5);
    assert_eq!(moved.vip(PINNED_V4.id).packets, 1);
    assert_eq!(moved.vip(ANY_TCP_V4.id).packets, 0);
}

#[test]
fn client_affinity_sends_every_connection_of_a_client_to_one_backend() {
    let mut fx = fixture!();
    let mut backends = std::collections::BTreeSet::new();
    for sport in 40000..40016 {
        let pkt = Pkt::tcp_syn(CLIENT_V4, sport, AFFINITY_V4.addr, 80);
        let Forwarded { backend, .. } =
            assert_forwarded(&mut fx, &pkt.build(), &AFFINITY_V4, &pkt.flow());
        backends.insert(backend);
    }
    assert_eq!(
        backends.len(),
        1,
        "16 connections of one client: {backends:?}"
    );
    // The same ports on a plain VIP spread: the hash really ignores ports.
    let spread: std::collections::BTreeSet<u32> = (40000..40016)
        .map(|sport| {
            fx.expected_backend(
                &WEB_V4,
                &Pkt::tcp_syn(CLIENT_V4, sport, WEB_V4.addr, 80).flow(),
            )
        })
        .collect();
    assert!(spread.len() > 1);
}

#[test]
fn ipv4_options_are_forwarded_as_received_and_counted() {
    let mut fx = fixture!();
    // Router Alert, then three NOPs and End of Options: 8 bytes of options.
    let pkt = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80)
        .ipv4_options(&[0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00])
        .payload(b"opt");
    let frame = pkt.build();
    let forwarded = assert_forwarded(&mut fx, &frame, &WEB_V4, &pkt.flow());
    forwarded
        .moved
        .assert_counters(&[Ipv4Options, ConnMiss, Tx]);
    assert_eq!(forwarded.encap().inner, &pkt.ip_packet()[..]);
}

// Step 7: fragments are hashed on (source, destination, protocol).

#[test]
fn ipv4_fragments_of_a_datagram_reach_one_backend() {
    let mut fx = fixture!();
    for pkt in [
        Pkt::udp(CLIENT_V4, 5353, ANY_UDP_V4.addr, 53).payload(&[0x5a; 100]),
        Pkt::tcp_ack(CLIENT_V4, 40000, ANY_TCP_V4.addr, 80).payload(&[0xa5; 100]),
    ] {
        let vip = if pkt.proto() == 17 {
            ANY_UDP_V4
        } else {
            ANY_TCP_V4
        };
        let expected = fx.expected_backend(&vip, &pkt.fragment_flow());
        for fragment in pkt.fragments(48) {
            let Forwarded { backend, moved, .. } =
                assert_forwarded(&mut fx, &fragment, &vip, &pkt.fragment_flow());
            assert_eq!(backend, expected);
            moved.assert_counters(&[Fragment, ConnMiss, Tx]);
            assert_eq!(moved.vip(vip.id), traffic(1, fragment.len() as u64, 1));
        }
        assert_eq!(
            fx.tracked(&pkt.fragment_flow()),
            None,
            "fragments are not tracked"
        );
        assert_eq!(fx.tracked(&pkt.flow()), None);
    }
}

#[test]
fn ipv6_fragments_of_a_datagram_reach_one_backend() {
    let mut fx = fixture!();
    let pkt = Pkt::udp(CLIENT_V6, 5353, ANY_UDP_V6.addr, 53).payload(&[0x5a; 100]);
    let expected = fx.expected_backend(&ANY_UDP_V6, &pkt.fragment_flow());
    for fragment in pkt.fragments(64) {
        let Forwarded { backend, moved, .. } =
            assert_forwarded(&mut fx, &fragment, &ANY_UDP_V6, &pkt.fragment_flow());
        assert_eq!(backend, expected);
        moved.assert_counters(&[Fragment, ConnMiss, Tx]);
    }
}

#[test]
fn fragments_to_an_address_with_only_port_specific_vips_are_dropped() {
    let mut fx = fixture!();
    let datagrams = [
        Pkt::udp(CLIENT_V4, 5353, DNS_V4.addr, 53).payload(&[1; 64]),
        Pkt::tcp_ack(CLIENT_V4, 40000, WEB_V4.addr, 80).payload(&[1; 64]),
        Pkt::tcp_ack(CLIENT_V6, 40000, WEB_V6.addr, 443).payload(&[1; 64]),
    ];
    for pkt in datagrams {
        for fragment in pkt.fragments(32) {
            let (out, moved) = fx.run_counted(&fragment);
            assert_eq!(out.action, Action::Drop, "{pkt:?}");
            moved.assert_counters(&[DropFragment]);
            moved.assert_no_traffic();
        }
    }
    // A fragment to no VIP address at all is none of the balancer's business.
    for fragment in Pkt::udp(CLIENT_V4, 5353, NOT_VIP_V4, 53)
        .payload(&[1; 64])
        .fragments(32)
    {
        fx.assert_passes(&fragment, PassNotVip);
    }
}

// Drops: no backend, too big.

#[test]
fn vip_without_a_ring_drops() {
    let mut fx = fixture!();
    let frame = Pkt::tcp_syn(CLIENT_V4, 40000, NO_RING_V4.addr, 80).build();
    let (out, moved) = fx.run_counted(&frame);
    assert_eq!(out.action, Action::Drop);
    moved.assert_counters(&[ConnMiss, DropNoBackend]);
    moved.assert_no_traffic();
}

#[test]
fn ring_slot_naming_an_unprogrammed_backend_drops() {
    let mut fx = fixture!();
    fx.set_pool(&WEB_V4, &[UNPROGRAMMED_BACKEND]);
    let pkt = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let (out, moved) = fx.run_counted(&pkt.build());
    assert_eq!(out.action, Action::Drop);
    moved.assert_counters(&[ConnMiss, DropNoBackend]);
    assert_eq!(fx.tracked(&pkt.flow()), None);
}

/// Gives the backend that `fits` goes to a next hop whose MTU the packet
/// fills exactly once encapsulated; returns that MTU.
fn fill_the_mtu(fx: &mut Fixture, vip: &VipDef, fits: &Pkt) -> u32 {
    let backend = fx.expected_backend(vip, &fits.flow());
    let overhead = if world::backend(backend).addr.is_ipv4() {
        20
    } else {
        40
    };
    let mtu = fits.ip_packet().len() as u32 + overhead;
    fx.set_nexthop(
        backend,
        NextHop {
            mtu,
            ..standard_nexthop(backend)
        },
    );
    mtu
}

#[test]
fn packet_too_big_for_the_next_hop_is_answered_with_icmp_from_the_vip() {
    let mut fx = fixture!();
    // IPIP, 4in6, IP6IP6; tagged frames are answered on their VLAN.
    for (vip, client, overhead, vlan) in [
        (WEB_V4, IpAddr::from(CLIENT_V4), 20, None),
        (V4_OVER_V6, CLIENT_V4.into(), 40, None),
        (WEB_V6, CLIENT_V6.into(), 40, Some((3, 42))),
    ] {
        let mut fits = Pkt::tcp_ack(client, 40000, vip.addr, vip.port).payload(&[7; 1300]);
        fits.vlan = vlan;
        let mtu = fill_the_mtu(&mut fx, &vip, &fits);
        let Forwarded { moved, .. } = assert_forwarded(&mut fx, &fits.build(), &vip, &fits.flow());
        moved.assert_counters(&[ConnMiss, Tx]);

        // The same flow, one byte more: the client learns what fits inside
        // the tunnel.
        let frame = fits.clone().payload(&[7; 1301]).build();
        let (out, moved) = fx.run_counted(&frame);
        assert_eq!(out.action, Action::Tx, "{}", vip.name);
        assert_frame_eq(&out.bytes, &icmp_too_big(&frame, mtu - overhead), vip.name);
        moved.assert_counters(&[ConnHit, IcmpTooBig]);
        moved.assert_no_traffic();
    }
}

#[test]
fn icmp_replies_are_limited_per_cpu_as_a_router_limits_its_own() {
    let mut fx = fixture!();
    let fits = Pkt::tcp_ack(CLIENT_V4, 40000, WEB_V4.addr, 80).payload(&[7; 200]);
    fill_the_mtu(&mut fx, &WEB_V4, &fits);
    let too_big = fits.payload(&[7; 201]).build();
    // More than this machine's CPUs may answer within the second the
    // calls take (a few milliseconds): a fresh data plane's budget is a
    // full second's worth per CPU, and the thread may move between CPUs.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let sent = (cpus + 2) * ICMP_REPLIES_PER_SEC;
    let before = fx.counters();
    for _ in 0..sent {
        let action = fx.run(&too_big).action;
        assert!(matches!(action, Action::Tx | Action::Drop), "{action:?}");
    }
    let moved = fx.counters().since(&before);
    let (answered, limited) = (moved.count(IcmpTooBig), moved.count(IcmpLimited));
    assert_eq!(answered + limited, sent, "{moved:?}");
    assert_eq!(moved.count(DropTooBig), limited, "{moved:?}");
    assert!(
        answered >= ICMP_REPLIES_PER_SEC,
        "a full burst answered: {moved:?}"
    );
    assert!(limited > 0, "the rest limited: {moved:?}");
}

#[test]
fn packet_too_big_that_may_not_be_answered_drops() {
    let mut fx = fixture!();
    let syn =
        |payload: usize| Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80).payload(&vec![7; payload]);
    for (fits, too_big, why) in [
        (
            syn(200),
            syn(201).may_fragment(),
            // "Fragmentation needed" would be wrong: the client allowed
            // fragmenting, which xlb does not do.
            "IPv4 without DF",
        ),
        (
            syn(20),
            syn(21),
            // A reply quotes 68 bytes of IPv4: a next hop that leaves less
            // room is a configuration error, not a reason for a malformed
            // reply.
            "shorter than the quote",
        ),
    ] {
        fill_the_mtu(&mut fx, &WEB_V4, &fits);
        let (out, moved) = fx.run_counted(&too_big.build());
        assert_eq!(out.action, Action::Drop, "{why}");
        moved.assert_counters(&[ConnMiss, DropTooBig]);
        moved.assert_no_traffic();
    }
}

// Step 6: where the packet leaves when the next-hop entry is not valid.

#[test]
fn no_valid_next_hop_and_no_route_uses_the_gateway_mac() {
    let mut fx = fixture!();
    let pkt = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let frame = pkt.build();
    let backend = fx.expected_backend(&WEB_V4, &pkt.flow());
    fx.set_nexthop(backend, NextHop::default());
    fx.update_settings(|s| {
        s.flags |= SETTINGS_F_GATEWAY_MAC;
        s.gateway_mac = GATEWAY_MAC;
    });
    let (out, moved) = fx.run_counted(&frame);
    // Out of the ingress interface: our MAC (the frame's destination) as
    // source, the gateway's as destination.
    let egress = Egress {
        smac: NODE_MAC,
        dmac: GATEWAY_MAC,
        outer_src: OUTER_SRC_V4.into(),
    };
    out.assert_sent(
        Action::Tx,
        &encapsulated(&frame, world::backend(backend).addr, egress),
    );
    moved.assert_counters(&[ConnMiss, FibLookup, GatewayFallback, Tx]);
}

#[test]
fn no_valid_next_hop_no_route_and_no_gateway_drops() {
    let mut fx = fixture!();
    let pkt = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let backend = fx.expected_backend(&WEB_V4, &pkt.flow());
    fx.set_nexthop(backend, NextHop::default());
    let (out, moved) = fx.run_counted(&pkt.build());
    assert_eq!(out.action, Action::Drop);
    moved.assert_counters(&[ConnMiss, FibLookup, DropNoRoute]);
    moved.assert_no_traffic();
}

/// The MAC of [`backend_link`]'s interface.
const LINK_MAC: [u8; 6] = [0x02, 0x1b, 0x00, 0x00, 0x00, 0x02];

/// A veth pair in the fixture's namespace, the first end (MAC [`LINK_MAC`])
/// up with 198.19.1.254/24, the backends' subnet, and in TX_PORTS. Returns its
/// ifindex.
fn backend_link(fx: &mut Fixture) -> u32 {
    ip(&[
        "link",
        "add",
        "xlbt0",
        "address",
        "02:1b:00:00:00:02",
        "type",
        "veth",
        "peer",
        "name",
        "xlbt1",
    ]);
    ip(&["link", "set", "xlbt0", "up"]);
    ip(&["link", "set", "xlbt1", "up"]);
    ip(&["addr", "add", "198.19.1.254/24", "dev", "xlbt0"]);
    let ifindex = xlb::dataplane::interface_index("xlbt0").unwrap();
    fx.dp.tx_ports.add(ifindex).unwrap();
    ifindex
}

#[test]
fn next_hop_on_another_interface_is_redirected_through_the_devmap() {
    let mut fx = fixture!();
    let ifindex = backend_link(&mut fx);
    let pkt = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let frame = pkt.build();
    let backend = fx.expected_backend(&WEB_V4, &pkt.flow());
    fx.set_nexthop(
        backend,
        NextHop {
            ifindex,
            ..standard_nexthop(backend)
        },
    );
    let (out, moved) = fx.run_counted(&frame);
    out.assert_sent(Action::Redirect, &fx.expected_encap(&frame, backend));
    moved.assert_counters(&[ConnMiss, Redirect]);

    // An interface missing from the devmap: dropped, never XDP_ABORTED.
    fx.set_nexthop(
        backend,
        NextHop {
            ifindex: ifindex + 1,
            ..standard_nexthop(backend)
        },
    );
    let (out, moved) = fx.run_counted(&frame);
    assert_eq!(out.action, Action::Drop);
    moved.assert_counters(&[ConnMiss, DropNoRoute]);
}

#[test]
fn fib_lookup_gives_the_route_and_neighbour_when_the_entry_is_stale() {
    let mut fx = fixture!();
    let ifindex = backend_link(&mut fx);
    // bpf_fib_lookup forwards only from an interface with forwarding on:
    // here the test run's ingress interface, the loopback device.
    sysctl("net.ipv4.conf.lo.forwarding", "1");
    let pkt = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let frame = pkt.build();
    let backend = fx.expected_backend(&WEB_V4, &pkt.flow());
    let backend_ip = world::backend(backend).addr.to_string();
    fx.set_nexthop(backend, NextHop::default());

    // A route but no neighbour: the FIB cannot give a MAC, no gateway MAC.
    let (out, moved) = fx.run_counted(&frame);
    assert_eq!(out.action, Action::Drop);
    moved.assert_counters(&[ConnMiss, FibLookup, DropNoRoute]);

    let neighbour = "02:be:ee:ee:ee:01";
    ip(&[
        "neigh",
        "add",
        &backend_ip,
        "lladdr",
        neighbour,
        "dev",
        "xlbt0",
        "nud",
        "permanent",
    ]);
    let (out, moved) = fx.run_counted(&frame);
    let egress = Egress {
        smac: LINK_MAC,
        dmac: [0x02, 0xbe, 0xee, 0xee, 0xee, 0x01],
        outer_src: OUTER_SRC_V4.into(),
    };
    out.assert_sent(
        Action::Redirect,
        &encapsulated(&frame, world::backend(backend).addr, egress),
    );
    moved.assert_counters(&[ConnMiss, FibLookup, Redirect]);
    assert_ne!(ifindex, TEST_RUN_IFINDEX);

    // The FIB knows the egress MTU too: 160 bytes encapsulated, MTU 100.
    ip(&["link", "set", "xlbt0", "mtu", "100"]);
    let too_big = pkt.clone().payload(&[0; 100]).build();
    let (out, moved) = fx.run_counted(&too_big);
    assert_eq!(out.action, Action::Tx);
    assert_frame_eq(&out.bytes, &icmp_too_big(&too_big, 100 - 20), "ICMP reply");
    moved.assert_counters(&[ConnMiss, FibLookup, IcmpTooBig]);
}

// Steps 3 and 4: the connection table keeps flows where they are.

#[test]
fn established_flow_keeps_its_backend_after_the_ring_drops_it() {
    let mut fx = fixture!();
    let syn = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let Forwarded { backend: a, .. } =
        assert_forwarded(&mut fx, &syn.build(), &WEB_V4, &syn.flow());

    let without_a: Vec<u32> = POOL_V4.iter().copied().filter(|b| *b != a).collect();
    fx.set_pool(&WEB_V4, &without_a);
    assert!(!fx.ring(&WEB_V4).contains(&a));

    // The established flow stays on A.
    let ack = Pkt::tcp_ack(CLIENT_V4, 40000, WEB_V4.addr, 80).payload(b"more");
    let frame = ack.build();
    let (out, moved) = fx.run_counted(&frame);
    out.assert_sent(Action::Tx, &fx.expected_encap(&frame, a));
    moved.assert_counters(&[ConnHit, Tx]);

    // A new flow takes the new ring.
    let other = Pkt::tcp_syn(CLIENT_V4, 40001, WEB_V4.addr, 80);
    let Forwarded {
        backend: b, moved, ..
    } = assert_forwarded(&mut fx, &other.build(), &WEB_V4, &other.flow());
    assert_ne!(b, a);
    moved.assert_counters(&[ConnMiss, Tx]);

    // So does a new connection on the old flow's 5-tuple: a SYN never
    // trusts the table.
    let Forwarded { backend: c, .. } =
        assert_forwarded(&mut fx, &syn.build(), &WEB_V4, &syn.flow());
    assert_ne!(c, a);
    assert_eq!(fx.tracked(&syn.flow()), Some(c));
}

#[test]
fn deleting_a_vip_ends_its_established_flows() {
    let mut fx = fixture!();
    let syn = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80);
    assert_forwarded(&mut fx, &syn.build(), &WEB_V4, &syn.flow());
    let ack = Pkt::tcp_ack(CLIENT_V4, 40000, WEB_V4.addr, 80).build();

    // Rewriting the VIP (same id) keeps the flow in the table.
    fx.dp
        .vips
        .insert(WEB_V4.key(), WEB_V4.info())
        .expect("rewriting the VIP");
    let (_, moved) = fx.run_counted(&ack);
    moved.assert_counters(&[ConnHit, Tx]);

    // Once the VIP is gone, its flows are no longer balanced, although the
    // table still holds them: the packet goes to the node's stack.
    assert!(fx.dp.vips.remove(&WEB_V4.key()).expect("removing the VIP"));
    fx.assert_passes(&ack, PassNotVip);

    // A VIP programmed again is a new VIP: the flow takes its ring anew.
    fx.dp
        .vips
        .insert(WEB_V4.key(), WEB_V4.info())
        .expect("programming the VIP again");
    let (_, moved) = fx.run_counted(&ack);
    moved.assert_counters(&[ConnMiss, Tx]);
}

#[test]
fn a_full_set_evicts_its_least_recently_used_flow() {
    let mut fx = fixture!();
    let sets = fx.dp.conntrack.geometry().sets;
    let set_of = |pkt: &Pkt| ConnSlot::of(pkt.flow().hash64(HASH_SEED), sets - 1).set;
    let first = Pkt::tcp_syn(CLIENT_V4, 10000, WEB_V4.addr, 80);
    let same_set: Vec<Pkt> = (10000..u16::MAX)
        .map(|port| Pkt::tcp_syn(CLIENT_V4, port, WEB_V4.addr, 80))
        .filter(|pkt| set_of(pkt) == set_of(&first))
        .take(FLOW_WAYS + 1)
        .collect();
    let (newcomer, residents) = same_set.split_last().expect("enough flows");
    for pkt in residents {
        let (_, moved) = fx.run_counted(&pkt.build());
        moved.assert_counters(&[ConnMiss, Tx]);
    }
    // The oldest resident is used again, so the second one is now the
    // least recently used.
    let again = Pkt::tcp_ack(
        CLIENT_V4,
        u16::from_be(residents[0].flow().sport),
        WEB_V4.addr,
        80,
    );
    let (_, moved) = fx.run_counted(&again.build());
    moved.assert_counters(&[ConnHit, Tx]);

    let (_, moved) = fx.run_counted(&newcomer.build());
    moved.assert_counters(&[ConnMiss, ConnEvicted, Tx]);
    assert!(fx.tracked(&newcomer.flow()).is_some());
    assert!(fx.tracked(&residents[0].flow()).is_some());
    assert_eq!(fx.tracked(&residents[1].flow()), None, "the LRU flow left");
    for pkt in &residents[2..] {
        assert!(fx.tracked(&pkt.flow()).is_some());
    }
}

#[test]
fn flow_of_a_backend_marked_down_takes_the_ring_again() {
    let mut fx = fixture!();
    let syn = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let Forwarded { backend: a, .. } =
        assert_forwarded(&mut fx, &syn.build(), &WEB_V4, &syn.flow());

    // The controller declares A dead: out of the ring, and not up.
    let without_a: Vec<u32> = POOL_V4.iter().copied().filter(|b| *b != a).collect();
    fx.set_pool(&WEB_V4, &without_a);
    fx.set_backend(a, world::backend(a).addr, 0);

    let ack = Pkt::tcp_ack(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let Forwarded {
        backend: b, moved, ..
    } = assert_forwarded(&mut fx, &ack.build(), &WEB_V4, &ack.flow());
    assert_ne!(b, a);
    moved.assert_counters(&[ConnBackendDown, ConnMiss, Tx]);
    assert_eq!(moved.backend(b), traffic(1, ack.build().len() as u64, 1));
    assert_eq!(
        fx.tracked(&ack.flow()),
        Some(b),
        "the flow is recorded anew"
    );

    let (_, moved) = fx.run_counted(&ack.build());
    moved.assert_counters(&[ConnHit, Tx]);
}

#[test]
fn flow_of_an_unprogrammed_backend_takes_the_ring_again() {
    let mut fx = fixture!();
    let syn = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let Forwarded { backend: a, .. } =
        assert_forwarded(&mut fx, &syn.build(), &WEB_V4, &syn.flow());

    // The controller removes A altogether: out of the ring, unprogrammed.
    let without_a: Vec<u32> = POOL_V4.iter().copied().filter(|b| *b != a).collect();
    fx.set_pool(&WEB_V4, &without_a);
    fx.dp.backends.clear(a).unwrap();

    let ack = Pkt::tcp_ack(CLIENT_V4, 40000, WEB_V4.addr, 80);
    let Forwarded {
        backend: b, moved, ..
    } = assert_forwarded(&mut fx, &ack.build(), &WEB_V4, &ack.flow());
    assert_ne!(b, a);
    moved.assert_counters(&[ConnBackendDown, ConnMiss, Tx]);
}

// Step 8: traffic counters per VIP and per backend.

#[test]
fn traffic_counters_add_up_per_vip_and_backend() {
    let mut fx = fixture!();
    let before = fx.counters();
    let mut want_vips = std::collections::BTreeMap::<u32, lb_common::Traffic>::new();
    let mut want_backends = std::collections::BTreeMap::<u32, lb_common::Traffic>::new();
    for (i, vip) in [WEB_V4, WEB_V6, V4_OVER_V6, AFFINITY_V4].iter().enumerate() {
        for sport in 0..5u16 {
            let client: IpAddr = if vip.addr.is_ipv4() {
                CLIENT_V4.into()
            } else {
                CLIENT_V6.into()
            };
            let syn = Pkt::tcp_syn(client, 41000 + sport, vip.addr, vip.port).payload(&vec![0; i]);
            let ack =
                Pkt::tcp_ack(client, 41000 + sport, vip.addr, vip.port).payload(&vec![0; 100 + i]);
            let backend = fx.expected_backend(vip, &syn.flow());
            for (frame, new) in [(syn.build(), 1), (ack.build(), 0)] {
                assert_eq!(fx.run(&frame).action, Action::Tx);
                for (map, id) in [(&mut want_vips, vip.id), (&mut want_backends, backend)] {
                    let t = map.entry(id).or_default();
                    t.add(&traffic(1, frame.len() as u64, new));
                }
            }
        }
    }
    let moved = fx.counters().since(&before);
    assert_eq!(moved.vips, want_vips);
    assert_eq!(moved.backends, want_backends);
    assert_eq!(moved.count(Tx), 40);
    assert_eq!(moved.count(ConnMiss), 20);
    assert_eq!(moved.count(ConnHit), 20);
}

#[test]
fn ethernet_padding_rides_along_but_not_in_the_lengths() {
    let mut fx = fixture!();
    let pkt = Pkt::udp(CLIENT_V4, 5353, DNS_V4.addr, 53).payload(b"q");
    let mut frame = pkt.build();
    frame.resize(60, 0); // the minimum Ethernet frame, padded by the sender
    let forwarded = assert_forwarded(&mut fx, &frame, &DNS_V4, &pkt.flow());
    let (backend, moved) = (forwarded.backend, &forwarded.moved);
    let encap = forwarded.encap();
    assert_eq!(encap.inner, &pkt.ip_packet()[..]);
    assert_eq!(encap.trailer, &frame[14 + pkt.ip_packet().len()..]);
    assert_eq!(
        moved.backend(backend).bytes,
        60,
        "bytes count the frame as received"
    );
}

#[test]
fn full_size_ring_is_followed_slot_for_slot() {
    let mut fx = fixture!();
    const SIZE: u32 = 65537;
    let ring: Vec<u32> = (0..SIZE)
        .map(|slot| POOL_V4[(slot as usize * 7 + slot as usize / 5) % 4])
        .collect();
    fx.dp.rings.write(SIZE, &ring).unwrap();
    fx.dp
        .vips
        .insert(
            WEB_V4.key(),
            lb_common::VipInfo {
                ring_offset: SIZE,
                ring_size: SIZE,
                ..WEB_V4.info()
            },
        )
        .unwrap();
    for sport in 20000..20064 {
        let pkt = Pkt::tcp_syn(CLIENT2_V4, sport, WEB_V4.addr, 80);
        assert_forwarded(&mut fx, &pkt.build(), &WEB_V4, &pkt.flow());
    }
}

// Ring slots are 16-bit lanes of 64-byte lines: slot `i` of the storage is
// lane `i % 32` of line `i / 32`. A flow lands on one slot, and only that
// slot's backend may be read.

/// A packet from `make(port)` for the first source port whose flow hash the
/// ring of `size` slots maps to slot `slot` of its own (`ring_slot`, the
/// code the kernel runs).
fn to_slot(size: u32, slot: u32, make: impl Fn(u16) -> Pkt) -> Pkt {
    (1024..=u16::MAX)
        .map(make)
        .find(|pkt| ring_slot(pkt.flow().hash(HASH_SEED), size) == slot)
        .expect("a source port for the slot")
}

/// Programs `vip` with a ring of `size` slots at `offset` of the storage.
fn place_ring(fx: &mut Fixture, vip: &VipDef, offset: u32, ring: &[u32]) {
    fx.dp.rings.write(offset, ring).expect("writing RINGS");
    fx.dp
        .vips
        .insert(
            vip.key(),
            lb_common::VipInfo {
                ring_offset: offset,
                ring_size: ring.len() as u32,
                ..vip.info()
            },
        )
        .expect("writing VIPS");
}

fn assert_sent_to(fx: &mut Fixture, pkt: &Pkt, backend: u32, why: &str) {
    let frame = pkt.build();
    let (out, _) = fx.run_counted(&frame);
    out.assert_sent(Action::Tx, &fx.expected_encap(&frame, backend));
    assert_eq!(fx.tracked(&pkt.flow()), Some(backend), "{why}");
}

#[test]
fn each_slot_at_a_line_edge_is_read_from_its_own_lane() {
    let mut fx = fixture!();
    let [plain, marked, ..] = POOL_V4[..] else {
        panic!("a pool of two")
    };
    // 67 slots from slot 0: lines 0 and 1 whole, line 2 up to lane 2.
    const SIZE: u32 = 67;
    for (slot, what) in [
        (0, "the first lane of a line"),
        (31, "the last lane of a line"),
        (32, "the first lane of the next line"),
        (SIZE - 1, "the last slot of a ring that ends mid-line"),
    ] {
        let mut ring = vec![plain; SIZE as usize];
        ring[slot as usize] = marked;
        place_ring(&mut fx, &WEB_V4, 0, &ring);
        for (at, backend) in [(slot, marked), ((slot + 1) % SIZE, plain)] {
            let pkt = to_slot(SIZE, at, |port| {
                Pkt::tcp_syn(CLIENT2_V4, port, WEB_V4.addr, WEB_V4.port)
            });
            assert_sent_to(
                &mut fx,
                &pkt,
                backend,
                &format!("slot {at} ({what}: {slot})"),
            );
        }
    }
}

#[test]
fn two_vips_whose_rings_share_a_line_each_read_their_own_slots() {
    let mut fx = fixture!();
    let [web, dns, other, ..] = POOL_V4[..] else {
        panic!("a pool of three")
    };
    // Rings lie back to back in slots, as the reconciler places them: web's
    // ends at lane 30 of line 0, dns's starts at lane 31 of the same line.
    const SIZE: u32 = 31;
    place_ring(&mut fx, &WEB_V4, 0, &[web; SIZE as usize]);
    place_ring(&mut fx, &DNS_V4, SIZE, &[dns; SIZE as usize]);
    let web_last = || {
        to_slot(SIZE, SIZE - 1, |port| {
            Pkt::tcp_syn(CLIENT2_V4, port, WEB_V4.addr, WEB_V4.port)
        })
    };
    let dns_first = to_slot(SIZE, 0, |port| {
        Pkt::udp(CLIENT2_V4, port, DNS_V4.addr, DNS_V4.port).payload(b"q")
    });
    assert_sent_to(&mut fx, &web_last(), web, "web's last slot");
    assert_sent_to(&mut fx, &dns_first, dns, "dns's first slot, in web's line");

    // Rewriting one VIP's ring leaves the other's lanes of the line alone.
    let written = fx
        .dp
        .rings
        .update(SIZE, &[dns; SIZE as usize], &[other; SIZE as usize])
        .expect("updating RINGS");
    assert_eq!(written, SIZE as usize);
    assert_eq!(fx.ring(&WEB_V4), vec![web; SIZE as usize]);
    assert_sent_to(
        &mut fx,
        &web_last(),
        web,
        "web's last slot, dns's ring changed",
    );
    let dns_new = to_slot(SIZE, 0, |port| {
        Pkt::udp(CLIENT_V4, port, DNS_V4.addr, DNS_V4.port).payload(b"q")
    });
    assert_sent_to(&mut fx, &dns_new, other, "a new flow on dns's first slot");
}

// The backend side: decapsulation.

/// A client packet for `vip`, from a source port the ring sends to the
/// decapsulating backend (`backend`), and the frame the balancer sends.
fn tunnel_frame(fx: &Fixture, vip: &VipDef, client: IpAddr, backend: u32) -> (Pkt, Vec<u8>) {
    let pkt = fx.pick_sport(
        vip,
        &Pkt::tcp_syn(client, 40000, vip.addr, vip.port).payload(b"inner"),
        |b| b == backend,
    );
    let frame = pkt.build();
    let sent = fx.expected_encap(&frame, backend);
    (pkt, sent)
}

#[test]
fn decap_strips_ipip_ip6ip6_and_4in6_to_this_host() {
    let mut fx = fixture!();
    for (vip, client, backend) in [
        (WEB_V4, IpAddr::from(CLIENT_V4), 1),
        (WEB_V6, IpAddr::from(CLIENT_V6), 11),
        (V4_OVER_V6, IpAddr::from(CLIENT_V4), 11),
    ] {
        let (pkt, tunnelled) = tunnel_frame(&fx, &vip, client, backend);
        let (out, moved) = fx.run_decap_counted(&tunnelled);
        assert_eq!(out.action, Action::Pass);
        assert_frame_eq(&out.bytes, &decapsulated(&tunnelled), "decapsulated frame");
        // The Ethernet addresses stay, the EtherType is the inner packet's.
        assert_eq!(&out.bytes[..12], &tunnelled[..12]);
        let inner_type: u16 = if client.is_ipv4() { 0x0800 } else { 0x86dd };
        assert_eq!(out.bytes[12..14], inner_type.to_be_bytes());
        assert_eq!(&out.bytes[14..], &pkt.ip_packet()[..]);
        check_ip_packet(&out.bytes[14..]).unwrap();
        moved.assert_counters(&[DecapOk]);
    }
}

#[test]
fn balancer_output_decapsulates_to_the_clients_packet() {
    let mut fx = fixture!();
    for pkt in [
        Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80).payload(b"round trip"),
        Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80)
            .vlan(3, 42)
            .payload(b"tagged"),
        Pkt::udp(CLIENT_V6, 40000, ANY_UDP_V6.addr, 9).payload(b"v6"),
    ] {
        let vip = if pkt.src.is_ipv4() {
            WEB_V4
        } else {
            ANY_UDP_V6
        };
        let decap_host = if pkt.src.is_ipv4() { 1 } else { 11 };
        let pkt = fx.pick_sport(&vip, &pkt, |b| b == decap_host);
        let frame = pkt.build();
        let sent = fx.run(&frame);
        assert_eq!(sent.action, Action::Tx);
        let received = fx.run_decap(&sent.bytes);
        assert_eq!(received.action, Action::Pass);
        // The client's frame again, but with the next hop's Ethernet
        // addresses.
        let mut expected = frame.clone();
        expected[..12].copy_from_slice(&sent.bytes[..12]);
        assert_frame_eq(&received.bytes, &expected, "after the round trip");
    }
}

#[test]
fn decap_leaves_other_traffic_untouched() {
    let mut fx = fixture!();
    // A tunnel packet for another host (backend 2).
    let (_, to_other) = tunnel_frame(&fx, &WEB_V4, CLIENT_V4.into(), 2);
    // Plain TCP to this host.
    let plain = Pkt::tcp_syn(CLIENT_V4, 40000, DECAP_V4, 22).build();
    let plain_v6 = Pkt::tcp_syn(CLIENT_V6, 40000, DECAP_V6, 22).build();
    for frame in [to_other, plain, plain_v6, arp_request()] {
        let (out, moved) = fx.run_decap_counted(&frame);
        out.assert_passed_unchanged(&frame);
        moved.assert_counters(&[DecapPassNotTunnel]);
    }
}

#[test]
fn decap_drops_a_tunnel_packet_without_an_inner_header() {
    let mut fx = fixture!();
    let (pkt, tunnelled) = tunnel_frame(&fx, &WEB_V4, CLIENT_V4.into(), 1);
    // Outer header, then only half of the inner IPv4 header.
    let cut = &tunnelled[..14 + 20 + 10];
    let (out, moved) = fx.run_decap_counted(cut);
    assert_eq!(out.action, Action::Drop, "{pkt:?}");
    moved.assert_counters(&[DecapDropMalformed]);
}

#[test]
fn decap_drops_a_fragment_of_a_tunnel_packet() {
    let mut fx = fixture!();
    let (_, tunnelled) = tunnel_frame(&fx, &WEB_V4, CLIENT_V4.into(), 1);
    // Mark the outer IPv4 header "more fragments" (and fix its checksum):
    // the inner packet may be incomplete, and nothing here reassembles it.
    let mut fragment = tunnelled.clone();
    fragment[14 + 6] |= 0x20;
    fragment[14 + 10..14 + 12].fill(0);
    let check = etherparse::Ipv4HeaderSlice::from_slice(&fragment[14..])
        .expect("outer header")
        .to_header()
        .calc_header_checksum();
    fragment[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
    let (out, moved) = fx.run_decap_counted(&fragment);
    assert_eq!(out.action, Action::Drop);
    moved.assert_counters(&[DecapDropMalformed]);
}
