//! Bad input: truncated headers, inconsistent lengths and fields, and a few
//! hundred thousand random and mutated packets. Whatever comes in, the
//! balancer and the decap program
//!
//! - never answer XDP_ABORTED;
//! - leave every packet they pass byte for byte as it came;
//! - pass every packet whose destination is no VIP address (balancer);
//! - send only well-formed frames: exactly the encapsulation
//!   `expect::encapsulated` computes, to a backend of a VIP on the packet's
//!   destination, whose outer header etherparse parses with a correct
//!   checksum and lengths, and whose inner packet is the one received.
//!
//! Verifier acceptance is covered by loading: every fixture loads the
//! object.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use lb_common::{Counter, Counter::*, addr_from_ip};
use rand::{Rng, SeedableRng, rngs::StdRng};
use xlb::dataplane::Role;
use xlb_tests::*;

macro_rules! fixture {
    () => {
        match Fixture::new() {
            Some(fixture) => fixture,
            None => return,
        }
    };
}

/// Checks the balancer's verdict and output for `input` against the rules
/// in the module docs.
fn check_balancer(input: &[u8], action: Action, out: &[u8]) -> Result<(), String> {
    let info = frame_info(input);
    let to_vip = info.is_some_and(|info| is_vip_address(info.dst));
    match action {
        Action::Pass if out == input => Ok(()),
        Action::Pass => Err("XDP_PASS with a modified frame".into()),
        Action::Drop if to_vip => Ok(()),
        Action::Tx if to_vip => {
            let info = info.unwrap();
            let encap = parse_encap(out).map_err(|e| format!("malformed output: {e}"))?;
            let backend = backend_at(encap.outer.dst())
                .ok_or_else(|| format!("outer destination {} is no backend", encap.outer.dst()))?;
            if !VIPS
                .iter()
                .any(|vip| vip.addr == info.dst && vip.pool.contains(&backend.id))
            {
                return Err(format!(
                    "backend {} serves no VIP on {}",
                    backend.id, info.dst
                ));
            }
            let expected = encapsulated(input, backend.addr, standard_egress(backend.id));
            if out != expected {
                return Err(format!(
                    "output differs from the expected encapsulation\nactual:   {}\nexpected: {}",
                    hex(out),
                    hex(&expected)
                ));
            }
            Ok(())
        }
        action => Err(format!(
            "verdict {action:?} for a packet {} a VIP address",
            if to_vip { "to" } else { "not to" }
        )),
    }
}

/// Checks the decap program: it passes everything untouched but tunnel
/// packets to its endpoints, which it strips exactly as
/// `expect::decapsulated` says or drops when they are malformed.
fn check_decap(input: &[u8], action: Action, out: &[u8]) -> Result<(), String> {
    let info = frame_info(input);
    let ours = info.is_some_and(|info| {
        info.dst == IpAddr::from(DECAP_V4) || info.dst == IpAddr::from(DECAP_V6)
    });
    let tunnel = ours && {
        let info = info.unwrap();
        let ip = &input[info.l2_len..];
        let proto = if info.is_ipv4() { ip[9] } else { ip[6] };
        matches!(proto, 4 | 41)
    };
    match action {
        Action::Pass if out == input => Ok(()),
        Action::Pass if tunnel => {
            let expected = decapsulated(input);
            if out == expected {
                Ok(())
            } else {
                Err(format!(
                    "decap output differs\nactual:   {}\nexpected: {}",
                    hex(out),
                    hex(&expected)
                ))
            }
        }
        Action::Pass => Err("decap modified a packet that is no tunnel packet of ours".into()),
        Action::Drop if tunnel => Ok(()),
        action => Err(format!("decap verdict {action:?}")),
    }
}

/// Runs both programs on `input` and applies both checks.
#[track_caller]
fn run_and_check(fx: &mut Fixture, input: &[u8], what: &dyn Fn() -> String) -> Action {
    let (action, out) = fx
        .run_raw(Role::Balancer, input)
        .unwrap_or_else(|e| panic!("{}: test run: {e}", what()));
    if let Err(e) = check_balancer(input, action, out) {
        panic!("{}: balancer: {e}\ninput: {}", what(), hex(input));
    }
    let (decap_action, out) = fx
        .run_raw(Role::Decap, input)
        .unwrap_or_else(|e| panic!("{}: decap test run: {e}", what()));
    if let Err(e) = check_decap(input, decap_action, out) {
        panic!("{}: decap: {e}\ninput: {}", what(), hex(input));
    }
    action
}

/// The frames of the packet-path tests: every kind of packet the balancer
/// and the decap program handle.
fn fixture_frames() -> Vec<(&'static str, Vec<u8>)> {
    let [frag4_first, frag4_rest] = Pkt::udp(CLIENT_V4, 5353, ANY_UDP_V4.addr, 53)
        .payload(&[0x5a; 40])
        .fragments(24);
    let [frag6_first, frag6_rest] = Pkt::udp(CLIENT_V6, 5353, ANY_UDP_V6.addr, 53)
        .payload(&[0x5a; 40])
        .fragments(24);
    let v4_syn = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80).payload(b"hello");
    let v6_syn = Pkt::tcp_syn(CLIENT_V6, 40000, WEB_V6.addr, 443).payload(b"hello");
    let to_v4_backend = standard_egress(1);
    let to_v6_backend = standard_egress(11);
    let backend_v4 = world::backend(1).addr;
    let backend_v6 = world::backend(11).addr;
    vec![
        ("tcp syn v4", v4_syn.build()),
        (
            "tcp ack v4",
            Pkt::tcp_ack(CLIENT_V4, 40000, WEB_V4.addr, 80)
                .payload(b"data")
                .build(),
        ),
        (
            "udp v4",
            Pkt::udp(CLIENT_V4, 5353, DNS_V4.addr, 53)
                .payload(b"query")
                .build(),
        ),
        ("tcp syn v6", v6_syn.build()),
        (
            "udp v6 wildcard",
            Pkt::udp(CLIENT_V6, 5353, ANY_UDP_V6.addr, 9)
                .payload(b"x")
                .build(),
        ),
        ("vlan v4", v4_syn.clone().vlan(1, 100).build()),
        ("vlan v6", v6_syn.clone().vlan(1, 100).build()),
        (
            "ipv4 options",
            v4_syn.clone().ipv4_options(&[0x94, 0x04, 0, 0]).build(),
        ),
        ("ipv4 first fragment", frag4_first),
        ("ipv4 later fragment", frag4_rest),
        ("ipv6 first fragment", frag6_first),
        ("ipv6 later fragment", frag6_rest),
        (
            "4in6 vip",
            Pkt::tcp_syn(CLIENT_V4, 40000, V4_OVER_V6.addr, 80).build(),
        ),
        (
            "wildcard port",
            Pkt::tcp_syn(CLIENT_V4, 40000, ANY_TCP_V4.addr, 22).build(),
        ),
        (
            "client affinity",
            Pkt::tcp_syn(CLIENT_V4, 40000, AFFINITY_V4.addr, 80).build(),
        ),
        (
            "no ring",
            Pkt::tcp_syn(CLIENT_V4, 40000, NO_RING_V4.addr, 80).build(),
        ),
        (
            "icmp to vip",
            Pkt::icmp_echo(CLIENT_V4, WEB_V4.addr).build(),
        ),
        (
            "not a vip v4",
            Pkt::tcp_syn(CLIENT_V4, 40000, NOT_VIP_V4, 80).build(),
        ),
        (
            "not a vip v6",
            Pkt::tcp_syn(CLIENT_V6, 40000, NOT_VIP_V6, 80).build(),
        ),
        ("arp", arp_request()),
        (
            "ipip to decap",
            encapsulated(&v4_syn.build(), backend_v4, to_v4_backend),
        ),
        (
            "ip6ip6 to decap",
            encapsulated(&v6_syn.build(), backend_v6, to_v6_backend),
        ),
        (
            "4in6 to decap",
            encapsulated(&v4_syn.build(), backend_v6, to_v6_backend),
        ),
        (
            "vlan ipip to decap",
            encapsulated(
                &v4_syn.clone().vlan(2, 7).build(),
                backend_v4,
                to_v4_backend,
            ),
        ),
    ]
}

/// The verdict counter of a frame cut short inside the IP packet its
/// header announces (or inside its Ethernet or IP header): malformed,
/// dropped when it is aimed at a VIP address, else left to the kernel.
fn truncated_verdict(frame: &[u8]) -> Counter {
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    let (ether_type, l2_len) = match ether_type {
        0x8100 if frame.len() < 18 => return PassMalformed,
        0x8100 => (u16::from_be_bytes([frame[16], frame[17]]), 18),
        other => (other, 14),
    };
    if !matches!(ether_type, 0x0800 | 0x86dd) {
        return PassNotIp;
    }
    let Some(info) = frame_info(frame) else {
        return PassMalformed; // the fixed IP header is incomplete
    };
    assert!(frame.len() < l2_len + info.ip_len, "not truncated");
    if !vip_filter().may_contain(&addr_from_ip(info.dst).1) {
        PassNotVip
    } else if is_vip_address(info.dst) {
        DropMalformed
    } else {
        PassMalformed
    }
}

fn action_of(verdict: Counter) -> Action {
    match verdict {
        PassNotIp | PassNotVip | PassMalformed => Action::Pass,
        Tx => Action::Tx,
        Redirect => Action::Redirect,
        _ => Action::Drop,
    }
}

/// Balancer verdict counters that moved, decap ones left out.
fn balancer_verdicts(moved: &Delta) -> BTreeMap<&'static str, u64> {
    moved
        .global
        .iter()
        .filter(|(c, _)| is_verdict(*c) && !c.name().starts_with("decap"))
        .map(|(c, n)| (c.name(), *n))
        .collect()
}

#[test]
fn every_truncation_of_every_fixture_packet() {
    let mut fx = fixture!();
    let before = fx.counters();
    let mut expected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut runs = 0;
    for (name, frame) in fixture_frames() {
        for len in 0..frame.len() {
            let prefix = &frame[..len];
            if len < 14 {
                // The kernel hands no XDP program less than an Ethernet
                // header: the test run refuses such a frame.
                let err = fx.run_raw(Role::Balancer, prefix).err();
                assert_eq!(
                    err.and_then(|e| e.raw_os_error()),
                    Some(libc::EINVAL),
                    "{name}: a {len}-byte frame"
                );
                continue;
            }
            let verdict = truncated_verdict(prefix);
            let action = run_and_check(&mut fx, prefix, &|| format!("{name} cut to {len} bytes"));
            assert_eq!(
                action,
                action_of(verdict),
                "{name} cut to {len} bytes: expected {}",
                verdict.name()
            );
            *expected.entry(verdict.name()).or_default() += 1;
            runs += 1;
        }
    }
    let moved = fx.counters().since(&before);
    assert_eq!(balancer_verdicts(&moved), expected);
    moved.assert_no_traffic();
    println!("{runs} truncated frames checked");
}

/// Runs `frame`, which must get exactly `verdict`, and checks it.
#[track_caller]
fn expect_verdict(fx: &mut Fixture, frame: &[u8], verdict: Counter, what: &str) {
    let before = fx.counters();
    let action = run_and_check(fx, frame, &|| what.to_owned());
    assert_eq!(action, action_of(verdict), "{what}");
    let moved = fx.counters().since(&before);
    let verdicts: Vec<_> = balancer_verdicts(&moved).into_keys().collect();
    assert_eq!(verdicts, [verdict.name()], "{what}");
}

/// Byte offsets in an untagged IPv4 frame.
const V4_IHL: usize = 14;
const V4_TOT_LEN: usize = 16;
/// Byte offsets in an untagged IPv6 frame.
const V6_PAYLOAD_LEN: usize = 18;

/// Rewrites the IPv4 header checksum after a field was changed, so that
/// only the change under test is wrong.
fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[V4_IHL] & 0x0f) * 4;
    let end = (14 + ihl.max(20)).min(frame.len());
    frame[24] = 0;
    frame[25] = 0;
    let mut sum: u32 = frame[14..end]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[test]
fn bad_ihl_is_malformed() {
    let mut fx = fixture!();
    // A SYN without payload: 20 bytes of IP header, 20 of TCP. Any IHL but
    // 5 leaves no room for the TCP header the packet announces.
    let base = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80).build();
    for ihl in 0..16u8 {
        let mut frame = base.clone();
        frame[V4_IHL] = 0x40 | ihl;
        fix_ipv4_checksum(&mut frame);
        let verdict = if ihl == 5 { Tx } else { DropMalformed };
        expect_verdict(&mut fx, &frame, verdict, &format!("IHL {ihl}"));
    }
    // With a payload the misplaced "TCP header" may be anything: whatever
    // the verdict, the output must be well formed.
    let base = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80)
        .payload(&[0x55; 100])
        .build();
    for ihl in 0..16u8 {
        let mut frame = base.clone();
        frame[V4_IHL] = 0x40 | ihl;
        fix_ipv4_checksum(&mut frame);
        run_and_check(&mut fx, &frame, &|| format!("IHL {ihl} with payload"));
    }
}

#[test]
fn bad_ip_version_is_malformed() {
    let mut fx = fixture!();
    let mut v4 = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80).build();
    v4[V4_IHL] = 0x65;
    expect_verdict(&mut fx, &v4, DropMalformed, "IPv4 EtherType, version 6");
    let mut v6 = Pkt::tcp_syn(CLIENT_V6, 40000, WEB_V6.addr, 443).build();
    v6[14] = 0x40 | (v6[14] & 0x0f);
    expect_verdict(&mut fx, &v6, DropMalformed, "IPv6 EtherType, version 4");
}

#[test]
fn every_ipv4_total_length() {
    let mut fx = fixture!();
    // 20 bytes of IP header, 20 of TCP, 20 of payload: 60 in the frame.
    let base = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80)
        .payload(&[0x33; 20])
        .build();
    let before = fx.counters();
    let mut expected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut frame = base.clone();
    for tot_len in 0..=u16::MAX {
        frame.copy_from_slice(&base);
        frame[V4_TOT_LEN..V4_TOT_LEN + 2].copy_from_slice(&tot_len.to_be_bytes());
        fix_ipv4_checksum(&mut frame);
        // Shorter than the IP and TCP headers, or longer than the frame:
        // malformed. In between, the packet is the first tot_len bytes and
        // the rest rides along as a trailer.
        let verdict = if (40..=60).contains(&tot_len) {
            Tx
        } else {
            DropMalformed
        };
        let action = run_and_check(&mut fx, &frame, &|| format!("total length {tot_len}"));
        assert_eq!(action, action_of(verdict), "total length {tot_len}");
        *expected.entry(verdict.name()).or_default() += 1;
    }
    assert_eq!(balancer_verdicts(&fx.counters().since(&before)), expected);
}

#[test]
fn every_ipv6_payload_length() {
    let mut fx = fixture!();
    // 20 bytes of TCP header and 20 of payload: 40 in the frame.
    let base = Pkt::tcp_syn(CLIENT_V6, 40000, WEB_V6.addr, 443)
        .payload(&[0x33; 20])
        .build();
    let before = fx.counters();
    let mut expected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut frame = base.clone();
    for payload_len in 0..=u16::MAX {
        frame.copy_from_slice(&base);
        frame[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2].copy_from_slice(&payload_len.to_be_bytes());
        let verdict = if (20..=40).contains(&payload_len) {
            Tx
        } else {
            DropMalformed
        };
        let action = run_and_check(&mut fx, &frame, &|| format!("payload length {payload_len}"));
        assert_eq!(action, action_of(verdict), "payload length {payload_len}");
        *expected.entry(verdict.name()).or_default() += 1;
    }
    assert_eq!(balancer_verdicts(&fx.counters().since(&before)), expected);
}

#[test]
fn every_tcp_data_offset() {
    let mut fx = fixture!();
    for (base, doff_at) in [
        // 40 bytes of TCP segment behind the IP header: offsets 5 to 10 fit.
        (
            Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80)
                .payload(&[0; 20])
                .build(),
            14 + 20 + 12,
        ),
        (
            Pkt::tcp_syn(CLIENT_V6, 40000, WEB_V6.addr, 443)
                .payload(&[0; 20])
                .build(),
            14 + 40 + 12,
        ),
    ] {
        for doff in 0..16u8 {
            let mut frame = base.clone();
            frame[doff_at] = doff << 4;
            let verdict = if (5..=10).contains(&doff) {
                Tx
            } else {
                DropMalformed
            };
            expect_verdict(&mut fx, &frame, verdict, &format!("data offset {doff}"));
        }
    }
}

#[test]
fn udp_shorter_than_its_header_is_malformed() {
    let mut fx = fixture!();
    let base = Pkt::udp(CLIENT_V4, 5353, DNS_V4.addr, 53)
        .payload(&[1; 10])
        .build();
    for tot_len in 20..=38u16 {
        let mut frame = base.clone();
        frame[V4_TOT_LEN..V4_TOT_LEN + 2].copy_from_slice(&tot_len.to_be_bytes());
        fix_ipv4_checksum(&mut frame);
        let verdict = if tot_len >= 28 { Tx } else { DropMalformed };
        expect_verdict(
            &mut fx,
            &frame,
            verdict,
            &format!("UDP, total length {tot_len}"),
        );
    }
}

/// Inserts `count` IPv6 hop-by-hop-style extension headers of 8 bytes
/// (PadN options) between the IPv6 header and the transport header of an
/// untagged frame, each with the given kind (0 hop-by-hop, 43 routing, 60
/// destination options).
fn with_ext_headers(frame: &[u8], kinds: &[u8]) -> Vec<u8> {
    let mut out = frame[..14 + 40].to_vec();
    let mut next = frame[14 + 6];
    for kind in kinds.iter().rev() {
        let mut ext = vec![next, 0, 0x01, 0x04, 0, 0, 0, 0];
        ext.extend_from_slice(&out[14 + 40..]);
        out.truncate(14 + 40);
        out.extend_from_slice(&ext);
        next = *kind;
    }
    out[14 + 6] = next;
    out.extend_from_slice(&frame[14 + 40..]);
    let payload_len = (out.len() - 14 - 40) as u16;
    out[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2].copy_from_slice(&payload_len.to_be_bytes());
    out
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut fx = fixture!();
    let pkt = Pkt::tcp_syn(CLIENT_V6, 40000, WEB_V6.addr, 443).payload(b"ext");
    let frame = with_ext_headers(&pkt.build(), &[0, 60, 43]);
    // Three extension headers: the TCP header behind them is found, the
    // flow is balanced on its ports, and the packet goes as it came.
    let backend = fx.expected_backend(&WEB_V6, &pkt.flow());
    let (out, moved) = fx.run_counted(&frame);
    out.assert_sent(Action::Tx, &fx.expected_encap(&frame, backend));
    moved.assert_counters(&[ConnMiss, Tx]);

    // An extension header longer than the payload: malformed.
    let mut long = frame.clone();
    long[14 + 40 + 1] = 200;
    expect_verdict(&mut fx, &long, DropMalformed, "extension header too long");

    // A chain longer than the four headers the balancer walks is dropped,
    // not handed to the node's stack as if it were no VIP's.
    let chain = with_ext_headers(&pkt.build(), &[60; 5]);
    expect_verdict(&mut fx, &chain, DropMalformed, "five extension headers");

    // Whatever the chain, nothing goes out malformed.
    for count in 0..8 {
        let kinds = vec![60u8; count];
        let frame = with_ext_headers(&pkt.build(), &kinds);
        run_and_check(&mut fx, &frame, &|| format!("{count} extension headers"));
    }
}

#[test]
fn double_tagged_frame_is_not_ip() {
    let mut fx = fixture!();
    let tagged = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80)
        .vlan(0, 10)
        .build();
    let mut qinq = tagged[..16].to_vec();
    qinq.extend_from_slice(&[0x81, 0x00, 0x00, 0x14]);
    qinq.extend_from_slice(&tagged[16..]);
    expect_verdict(&mut fx, &qinq, PassNotIp, "802.1Q inside 802.1Q");
}

#[test]
fn the_checks_themselves_reject_any_damaged_output() {
    // The oracle of these tests must see every corruption: take real
    // outputs of the balancer and the decap program and damage them.
    let mut fx = fixture!();
    for pkt in [
        Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80).vlan(1, 9),
        Pkt::tcp_syn(CLIENT_V6, 40000, WEB_V6.addr, 443),
        Pkt::tcp_syn(CLIENT_V4, 40000, V4_OVER_V6.addr, 80),
    ] {
        let input = pkt.build();
        let out = fx.run(&input);
        assert_eq!(out.action, Action::Tx);
        check_balancer(&input, Action::Tx, &out.bytes).unwrap();
        for at in 0..out.bytes.len() {
            let mut damaged = out.bytes.clone();
            damaged[at] ^= 0x01;
            assert!(
                check_balancer(&input, Action::Tx, &damaged).is_err(),
                "a flipped bit at {at} of {pkt:?} went unnoticed"
            );
        }
        assert!(check_balancer(&input, Action::Tx, &out.bytes[..out.bytes.len() - 1]).is_err());
        let mut longer = out.bytes.clone();
        longer.push(0);
        assert!(check_balancer(&input, Action::Tx, &longer).is_err());
        assert!(check_balancer(&input, Action::Pass, &out.bytes).is_err());
        assert!(check_balancer(&input, Action::Aborted, &input).is_err());

        // The decap program's output of that frame.
        let tunnelled = out.bytes;
        let decap_out = fx.run_decap(&tunnelled);
        check_decap(&tunnelled, decap_out.action, &decap_out.bytes).unwrap();
        if decap_out.bytes != tunnelled {
            for at in 0..decap_out.bytes.len() {
                let mut damaged = decap_out.bytes.clone();
                damaged[at] ^= 0x01;
                assert!(check_decap(&tunnelled, Action::Pass, &damaged).is_err());
            }
        }
    }
    // Not to a VIP: only an untouched pass is right.
    let input = Pkt::tcp_syn(CLIENT_V4, 40000, NOT_VIP_V4, 80).build();
    assert!(check_balancer(&input, Action::Pass, &input).is_ok());
    assert!(check_balancer(&input, Action::Drop, &input).is_err());
    let mut changed = input.clone();
    changed[20] ^= 1;
    assert!(check_balancer(&input, Action::Pass, &changed).is_err());
}

// Random and mutated packets.

/// Valid packets to VIPs, from one of 16 clients and 16 ports (so that
/// flows recur and meet the connection table): the material the mutations
/// start from.
fn random_vip_packet(rng: &mut StdRng) -> Vec<u8> {
    let client = rng.random_range(1..=16);
    let v4_client = IpAddr::from([198, 18, 100, client as u8]);
    let v6_client = IpAddr::from([0xfd00, 0xdb8, 0xc, 0, 0, 0, 0, client]);
    let sport = 40000 + rng.random_range(0..16);
    let mut payload = vec![0u8; rng.random_range(0..64)];
    rng.fill(&mut payload[..]);
    let pkt = match rng.random_range(0..12) {
        0 => Pkt::tcp_syn(v4_client, sport, WEB_V4.addr, 80),
        1 => Pkt::tcp_ack(v4_client, sport, WEB_V4.addr, 80),
        2 => Pkt::udp(v4_client, sport, DNS_V4.addr, 53),
        3 => Pkt::tcp_syn(v6_client, sport, WEB_V6.addr, 443),
        4 => Pkt::tcp_ack(v6_client, sport, WEB_V6.addr, 443),
        5 => Pkt::udp(v6_client, sport, ANY_UDP_V6.addr, rng.random()),
        6 => Pkt::tcp_syn(v4_client, sport, ANY_TCP_V4.addr, rng.random()),
        7 => Pkt::udp(v4_client, sport, ANY_UDP_V4.addr, rng.random()),
        8 => Pkt::tcp_ack(v4_client, sport, AFFINITY_V4.addr, 80),
        9 => Pkt::tcp_ack(v4_client, sport, V4_OVER_V6.addr, 80),
        10 => Pkt::tcp_syn(v4_client, sport, PINNED_V4.addr, 8443),
        _ => Pkt::tcp_syn(v4_client, sport, NO_RING_V4.addr, 80),
    }
    .payload(&payload)
    .tos(rng.random());
    let pkt = if rng.random_bool(0.2) {
        pkt.vlan(rng.random_range(0..8), rng.random_range(1..4095))
    } else {
        pkt
    };
    let pkt = if pkt.src.is_ipv4() && rng.random_bool(0.1) {
        pkt.ipv4_options(&[0x94, 0x04, 0, 0])
    } else {
        pkt
    };
    if payload.len() >= 16 && rng.random_bool(0.15) {
        let [first, rest] = pkt.fragments(8);
        return if rng.random_bool(0.5) { first } else { rest };
    }
    pkt.build()
}

/// A random frame: random bytes behind an IPv4, IPv6, VLAN or random
/// EtherType, with a VIP address as destination half of the time.
fn random_frame(rng: &mut StdRng) -> Vec<u8> {
    let mut frame = vec![0u8; rng.random_range(14..=160)];
    rng.fill(&mut frame[..]);
    let ether_type: u16 = match rng.random_range(0..4) {
        0 => 0x0800,
        1 => 0x86dd,
        2 => 0x8100,
        _ => rng.random(),
    };
    frame[12..14].copy_from_slice(&ether_type.to_be_bytes());
    let vip = VIPS[rng.random_range(0..VIPS.len())];
    match (ether_type, vip.addr) {
        (0x0800, IpAddr::V4(addr)) if frame.len() >= 34 && rng.random_bool(0.5) => {
            frame[14] = 0x40 | (frame[14] & 0x0f);
            frame[30..34].copy_from_slice(&addr.octets());
        }
        (0x86dd, IpAddr::V6(addr)) if frame.len() >= 54 && rng.random_bool(0.5) => {
            frame[14] = 0x60 | (frame[14] & 0x0f);
            frame[38..54].copy_from_slice(&addr.octets());
        }
        _ => {}
    }
    frame
}

/// A valid VIP packet, damaged: bytes flipped (mostly in the headers),
/// cut short, extended, or a header field set to a random value.
fn mutated_frame(rng: &mut StdRng) -> Vec<u8> {
    let mut frame = random_vip_packet(rng);
    match rng.random_range(0..4) {
        0 => {
            for _ in 0..rng.random_range(1..=4) {
                let limit = frame.len().min(80);
                let at = rng.random_range(0..limit);
                frame[at] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let len = rng.random_range(14..frame.len());
            frame.truncate(len);
            if rng.random_bool(0.3) {
                let at = rng.random_range(0..len);
                frame[at] = rng.random();
            }
        }
        2 => {
            let extra = rng.random_range(1..64);
            frame.extend((0..extra).map(|_| rng.random::<u8>()));
        }
        _ => {
            // One field of the IP or transport header, at random.
            let info = frame_info(&frame).unwrap();
            let at = info.l2_len + rng.random_range(0..info.ip_len.min(frame.len() - info.l2_len));
            let value: u8 = match rng.random_range(0..3) {
                0 => 0,
                1 => 0xff,
                _ => rng.random(),
            };
            frame[at] = value;
        }
    }
    frame
}

#[test]
fn random_and_mutated_packets() {
    let mut fx = fixture!();
    let seed = std::env::var("XLB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let count: u64 = std::env::var("XLB_FUZZ_PACKETS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    println!("fuzz seed {seed} (rerun with XLB_FUZZ_SEED={seed}), {count} packets");
    let mut rng = StdRng::seed_from_u64(seed);
    let before = fx.counters();
    let mut actions: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    for i in 0..count {
        let frame = match rng.random_range(0..10) {
            0 => random_frame(&mut rng),
            1 => random_vip_packet(&mut rng),
            _ => mutated_frame(&mut rng),
        };
        let action = run_and_check(&mut fx, &frame, &|| {
            format!("packet {i} of seed {seed} (XLB_FUZZ_SEED={seed})")
        });
        *actions.entry(format!("{action:?}")).or_default() += 1;
    }
    let elapsed = started.elapsed();
    let moved = fx.counters().since(&before);
    println!(
        "{count} packets in {:.2} s: balancer verdicts {actions:?}; counters {:?}",
        elapsed.as_secs_f64(),
        balancer_verdicts(&moved)
    );
    // Every packet got exactly one verdict counter, matching its action.
    let verdicts = balancer_verdicts(&moved);
    let sum = |names: &[Counter]| -> u64 {
        names
            .iter()
            .map(|c| verdicts.get(c.name()).copied().unwrap_or(0))
            .sum()
    };
    assert_eq!(
        sum(&[PassNotIp, PassNotVip, PassMalformed]),
        actions.get("Pass").copied().unwrap_or(0)
    );
    assert_eq!(sum(&[Tx]), actions.get("Tx").copied().unwrap_or(0));
    assert_eq!(verdicts.values().sum::<u64>(), count);
    let decap_runs: u64 = [DecapOk, DecapPassNotTunnel, DecapDropMalformed]
        .iter()
        .map(|c| moved.count(*c))
        .sum();
    assert_eq!(decap_runs, count, "every packet also ran through decap");
    // The run exercised the interesting paths, not just the easy rejects.
    for wanted in [
        Tx,
        DropMalformed,
        PassMalformed,
        PassNotVip,
        DropFragment,
        Fragment,
        ConnHit,
    ] {
        assert!(
            moved.count(wanted) > 0,
            "no packet reached {}",
            wanted.name()
        );
    }
}
