//! What the balancer must send, computed here independently of the XDP
//! program, and checks of what it did send, parsed with etherparse.

use std::{fmt::Write as _, net::IpAddr};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpDscp, IpEcn,
    IpNumber, Ipv4Header, Ipv4HeaderSlice, Ipv6FlowLabel, Ipv6Header, NetHeaders, PacketHeaders,
    SingleVlanHeader, TransportHeader, icmpv4::DestUnreachableHeader,
};
use lb_common::OUTER_TTL;

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const TPID_VLAN: u16 = 0x8100;
const TYPE_V4: u16 = 0x0800;
const TYPE_V6: u16 = 0x86dd;

/// Where a frame's IP packet is, read from the raw bytes the way the
/// balancer reads them (an optional 802.1Q tag, the EtherType, the IP
/// header's own length field), without any validation beyond "the bytes
/// are there".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// 14, or 18 with a VLAN tag.
    pub l2_len: usize,
    /// The tag's TCI bytes, if tagged.
    pub vlan_tci: Option<[u8; 2]>,
    /// EtherType of the IP packet (after the tag).
    pub ether_type: u16,
    /// Length of the IP packet by its header (IPv4 total length, or 40 +
    /// IPv6 payload length).
    pub ip_len: usize,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    pub dst: IpAddr,
}

impl FrameInfo {
    pub fn is_ipv4(&self) -> bool {
        self.ether_type == TYPE_V4
    }
}

/// The layout of an IPv4 or IPv6 frame; `None` when it is not IP or too
/// short for the fixed IP header.
pub fn frame_info(frame: &[u8]) -> Option<FrameInfo> {
    let be16 = |at: usize| Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    let mut ether_type = be16(12)?;
    let mut l2_len = ETH_LEN;
    let mut vlan_tci = None;
    if ether_type == TPID_VLAN {
        vlan_tci = Some([*frame.get(14)?, *frame.get(15)?]);
        ether_type = be16(16)?;
        l2_len += VLAN_LEN;
    }
    let ip = frame.get(l2_len..)?;
    match ether_type {
        TYPE_V4 if ip.len() >= 20 => Some(FrameInfo {
            l2_len,
            vlan_tci,
            ether_type,
            ip_len: usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            tos: ip[1],
            dst: IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap()),
        }),
        TYPE_V6 if ip.len() >= 40 => Some(FrameInfo {
            l2_len,
            vlan_tci,
            ether_type,
            ip_len: 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            tos: (u16::from_be_bytes([ip[0], ip[1]]) >> 4) as u8,
            dst: IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap()),
        }),
        _ => None,
    }
}

/// How an encapsulated packet leaves: the Ethernet addresses and the outer
/// source address of the backend's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Egress {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub outer_src: IpAddr,
}

/// The exact frame the balancer must send for `frame` to `backend`:
///
/// - Ethernet: the egress MACs; a VLAN tag, if the client's frame had one,
///   kept with its TCI; the EtherType of the outer header;
/// - outer IPv4 (IPIP, or 6in4): IHL 5, TOS copied from the inner header,
///   total length = inner length + 20, identification 0, DF, TTL 64,
///   protocol 4 (inner IPv4) or 41 (inner IPv6), a correct checksum;
/// - outer IPv6 (4in6, IP6IP6): traffic class copied, flow label 0, payload
///   length = inner length, next header 4 or 41, hop limit 64;
/// - then every byte of the client's frame after its Ethernet header (and
///   tag), unchanged: the inner packet, and any trailer behind it.
pub fn encapsulated(frame: &[u8], backend: IpAddr, egress: Egress) -> Vec<u8> {
    let info = frame_info(frame).expect("encapsulated(): not an IP frame");
    let inner_proto = if info.is_ipv4() {
        IpNumber::IPV4
    } else {
        IpNumber::IPV6
    };
    let outer_type = if backend.is_ipv4() {
        EtherType::IPV4
    } else {
        EtherType::IPV6
    };
    let eth = Ethernet2Header {
        source: egress.smac,
        destination: egress.dmac,
        ether_type: if info.vlan_tci.is_some() {
            EtherType::VLAN_TAGGED_FRAME
        } else {
            outer_type
        },
    };
    let mut out = eth.to_bytes().to_vec();
    if let Some(tci) = info.vlan_tci {
        out.extend_from_slice(&tci);
        out.extend_from_slice(&outer_type.0.to_be_bytes());
    }
    match (backend, egress.outer_src) {
        (IpAddr::V4(dst), IpAddr::V4(src)) => {
            let mut outer = Ipv4Header {
                dscp: IpDscp::try_new(info.tos >> 2).unwrap(),
                ecn: IpEcn::try_new(info.tos & 3).unwrap(),
                total_len: (info.ip_len + 20) as u16,
                identification: 0,
                dont_fragment: true,
                more_fragments: false,
                time_to_live: OUTER_TTL,
                protocol: inner_proto,
                source: src.octets(),
                destination: dst.octets(),
                ..Default::default()
            };
            outer.header_checksum = outer.calc_header_checksum();
            out.extend_from_slice(&outer.to_bytes());
        }
        (IpAddr::V6(dst), IpAddr::V6(src)) => {
            let outer = Ipv6Header {
                traffic_class: info.tos,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: info.ip_len as u16,
                next_header: inner_proto,
                hop_limit: OUTER_TTL,
                source: src.octets(),
                destination: dst.octets(),
            };
            out.extend_from_slice(&outer.to_bytes());
        }
        (backend, src) => panic!("outer source {src} does not match backend {backend}"),
    }
    out.extend_from_slice(&frame[info.l2_len..]);
    out
}

/// The exact frame the balancer must send back for `frame`, a packet too
/// big for the way to its backend, when `mtu` bytes fit inside the tunnel:
///
/// - Ethernet: back where it came from (the client frame's MACs swapped),
///   its VLAN tag kept;
/// - IPv4: from the VIP to the client, IHL 5, TOS 0, identification 0, no
///   flags, TTL 64, protocol ICMP; then ICMP destination unreachable,
///   fragmentation needed, with `mtu` as the next-hop MTU, quoting the
///   first 68 bytes of the client's IP packet;
/// - IPv6: from the VIP to the client, traffic class and flow label 0, hop
///   limit 64, next header ICMPv6; then ICMPv6 packet too big with `mtu`,
///   quoting the first 128 bytes of the client's IP packet;
/// - correct checksums everywhere.
pub fn icmp_too_big(frame: &[u8], mtu: u32) -> Vec<u8> {
    let info = frame_info(frame).expect("icmp_too_big(): not an IP frame");
    let ip = &frame[info.l2_len..];
    let mut out = frame[6..12].to_vec();
    out.extend_from_slice(&frame[..6]);
    out.extend_from_slice(&frame[12..info.l2_len]);
    if info.is_ipv4() {
        let quote = &ip[..68];
        let kind = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: mtu as u16,
        });
        let icmp = Icmpv4Header::with_checksum(kind, quote);
        let mut hdr = Ipv4Header {
            total_len: (20 + icmp.header_len() + quote.len()) as u16,
            identification: 0,
            dont_fragment: false,
            time_to_live: OUTER_TTL,
            protocol: IpNumber::ICMP,
            source: ip[16..20].try_into().unwrap(),
            destination: ip[12..16].try_into().unwrap(),
            ..Default::default()
        };
        hdr.header_checksum = hdr.calc_header_checksum();
        out.extend_from_slice(&hdr.to_bytes());
        out.extend_from_slice(&icmp.to_bytes());
        out.extend_from_slice(quote);
    } else {
        let quote = &ip[..128];
        let (vip, client): ([u8; 16], [u8; 16]) = (
            ip[24..40].try_into().unwrap(),
            ip[8..24].try_into().unwrap(),
        );
        let icmp =
            Icmpv6Header::with_checksum(Icmpv6Type::PacketTooBig { mtu }, vip, client, quote)
                .unwrap();
        let hdr = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: (icmp.header_len() + quote.len()) as u16,
            next_header: IpNumber::IPV6_ICMP,
            hop_limit: OUTER_TTL,
            source: vip,
            destination: client,
        };
        out.extend_from_slice(&hdr.to_bytes());
        out.extend_from_slice(&icmp.to_bytes());
        out.extend_from_slice(quote);
    }
    out
}

/// The exact frame the decap program must pass up for an encapsulated
/// `frame`: its Ethernet header (and tag) with the EtherType of the inner
/// packet, then everything behind the outer header.
pub fn decapsulated(frame: &[u8]) -> Vec<u8> {
    let info = frame_info(frame).expect("decapsulated(): not an IP frame");
    let ip = &frame[info.l2_len..];
    let (outer_len, proto) = if info.is_ipv4() {
        (usize::from(ip[0] & 0x0f) * 4, ip[9])
    } else {
        (40, ip[6])
    };
    let inner_type = match proto {
        4 => TYPE_V4,
        41 => TYPE_V6,
        other => panic!("decapsulated(): outer protocol {other} is no tunnel"),
    };
    let mut out = frame[..info.l2_len].to_vec();
    out[info.l2_len - 2..info.l2_len].copy_from_slice(&inner_type.to_be_bytes());
    out.extend_from_slice(&ip[outer_len..]);
    out
}

/// The outer IP header of an encapsulated frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OuterIp {
    V4(Ipv4Header),
    V6(Ipv6Header),
}

impl OuterIp {
    pub fn src(&self) -> IpAddr {
        match self {
            OuterIp::V4(h) => h.source.into(),
            OuterIp::V6(h) => h.source.into(),
        }
    }

    pub fn dst(&self) -> IpAddr {
        match self {
            OuterIp::V4(h) => h.destination.into(),
            OuterIp::V6(h) => h.destination.into(),
        }
    }
}

/// An encapsulated frame taken apart by [`parse_encap`].
#[derive(Clone, Debug)]
pub struct Encap<'a> {
    pub eth: Ethernet2Header,
    pub vlan: Option<SingleVlanHeader>,
    pub outer: OuterIp,
    /// The inner IP packet, as long as the outer header says.
    pub inner: &'a [u8],
    /// Bytes behind the outer packet (Ethernet padding the client's frame
    /// carried).
    pub trailer: &'a [u8],
}

/// Parses a frame the balancer sent with etherparse and checks that its
/// outer header is well formed: the EtherType matches the outer version;
/// IPv4: IHL 5, checksum correct (recomputed and compared), total length
/// within the frame, DF set, not a fragment, TTL 64; IPv6: payload length
/// within the frame, hop limit 64; protocol 4 or 41 and the inner header of
/// that version, whose own length field equals what the outer header
/// leaves for it.
pub fn parse_encap(out: &[u8]) -> Result<Encap<'_>, String> {
    let (eth, rest) = Ethernet2Header::from_slice(out).map_err(|e| format!("Ethernet: {e}"))?;
    let (vlan, ether_type, rest) = if eth.ether_type == EtherType::VLAN_TAGGED_FRAME {
        let (tag, rest) = SingleVlanHeader::from_slice(rest).map_err(|e| format!("VLAN: {e}"))?;
        (Some(tag.clone()), tag.ether_type, rest)
    } else {
        (None, eth.ether_type, rest)
    };
    let (outer, proto, body) = match ether_type {
        EtherType::IPV4 => {
            let slice =
                Ipv4HeaderSlice::from_slice(rest).map_err(|e| format!("outer IPv4: {e}"))?;
            let hdr = slice.to_header();
            if hdr.ihl() != 5 {
                return Err(format!("outer IPv4 IHL {} (options?)", hdr.ihl()));
            }
            if hdr.header_checksum != hdr.calc_header_checksum() {
                return Err(format!(
                    "outer IPv4 checksum {:#06x}, correct would be {:#06x}",
                    hdr.header_checksum,
                    hdr.calc_header_checksum()
                ));
            }
            let total = usize::from(hdr.total_len);
            if total < 20 || total > rest.len() {
                return Err(format!(
                    "outer IPv4 total length {total}, frame has {}",
                    rest.len()
                ));
            }
            if !hdr.dont_fragment || hdr.more_fragments || hdr.fragment_offset.value() != 0 {
                return Err(format!("outer IPv4 fragment bits: {hdr:?}"));
            }
            if hdr.time_to_live != OUTER_TTL {
                return Err(format!("outer TTL {}", hdr.time_to_live));
            }
            let proto = hdr.protocol;
            (OuterIp::V4(hdr), proto, &rest[20..total])
        }
        EtherType::IPV6 => {
            let (hdr, body) =
                Ipv6Header::from_slice(rest).map_err(|e| format!("outer IPv6: {e}"))?;
            let len = usize::from(hdr.payload_length);
            if len > body.len() {
                return Err(format!(
                    "outer IPv6 payload length {len}, frame has {}",
                    body.len()
                ));
            }
            if hdr.hop_limit != OUTER_TTL {
                return Err(format!("outer hop limit {}", hdr.hop_limit));
            }
            let proto = hdr.next_header;
            (OuterIp::V6(hdr), proto, &body[..len])
        }
        other => return Err(format!("outer EtherType {other:?} is not IP")),
    };
    let inner_len = match (proto, body.first().map(|b| b >> 4)) {
        (IpNumber::IPV4, Some(4)) if body.len() >= 4 => {
            usize::from(u16::from_be_bytes([body[2], body[3]]))
        }
        (IpNumber::IPV6, Some(6)) if body.len() >= 40 => {
            40 + usize::from(u16::from_be_bytes([body[4], body[5]]))
        }
        (proto, version) => {
            return Err(format!(
                "outer protocol {proto:?} with inner version {version:?}"
            ));
        }
    };
    if inner_len != body.len() {
        return Err(format!(
            "the outer header leaves {} bytes for an inner packet of {inner_len}",
            body.len()
        ));
    }
    let end = body.as_ptr() as usize + body.len() - out.as_ptr() as usize;
    Ok(Encap {
        eth,
        vlan,
        outer,
        inner: body,
        trailer: &out[end..],
    })
}

/// Checks a client's IP packet the way its receiver would: parses with
/// etherparse, recomputes the IPv4 header checksum and (unless it is a
/// fragment) the TCP or UDP checksum, and checks that the packet is exactly
/// as long as its header says.
pub fn check_ip_packet(ip: &[u8]) -> Result<(), String> {
    let headers = PacketHeaders::from_ip_slice(ip).map_err(|e| format!("IP: {e}"))?;
    let payload = headers.payload.slice();
    let payload_end = payload.as_ptr() as usize + payload.len() - ip.as_ptr() as usize;
    if payload_end != ip.len() {
        return Err(format!(
            "IP packet of {} bytes says it has {payload_end}",
            ip.len()
        ));
    }
    let transport = headers.transport.clone();
    match headers.net {
        Some(NetHeaders::Ipv4(hdr, _)) => {
            if hdr.header_checksum != hdr.calc_header_checksum() {
                return Err("IPv4 header checksum".into());
            }
            let sum = match &transport {
                Some(TransportHeader::Tcp(tcp)) => {
                    Some((tcp.checksum, tcp.calc_checksum_ipv4(&hdr, payload)))
                }
                Some(TransportHeader::Udp(udp)) => {
                    Some((udp.checksum, udp.calc_checksum_ipv4(&hdr, payload)))
                }
                _ => None,
            };
            check_sum(sum)
        }
        Some(NetHeaders::Ipv6(hdr, _)) => {
            let sum = match &transport {
                Some(TransportHeader::Tcp(tcp)) => {
                    Some((tcp.checksum, tcp.calc_checksum_ipv6(&hdr, payload)))
                }
                Some(TransportHeader::Udp(udp)) => {
                    Some((udp.checksum, udp.calc_checksum_ipv6(&hdr, payload)))
                }
                _ => None,
            };
            check_sum(sum)
        }
        other => Err(format!("not IP: {other:?}")),
    }
}

fn check_sum<E: std::fmt::Debug>(sum: Option<(u16, Result<u16, E>)>) -> Result<(), String> {
    match sum {
        Some((found, Ok(correct))) if found != correct => Err(format!(
            "transport checksum {found:#06x}, correct would be {correct:#06x}"
        )),
        Some((_, Err(e))) => Err(format!("transport checksum: {e:?}")),
        _ => Ok(()),
    }
}

/// Asserts two frames are equal, showing where they differ.
#[track_caller]
pub fn assert_frame_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    panic!(
        "{what}: frames differ at byte {first} (lengths: actual {}, expected {})\n\
         actual:   {}\nexpected: {}",
        actual.len(),
        expected.len(),
        hex(actual),
        hex(expected)
    );
}

/// Bytes as space-separated hex, a line break every 16 bytes.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, byte) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(if i % 16 == 0 { '\n' } else { ' ' });
            if i % 16 == 0 {
                out.push_str("          ");
            }
        }
        let _ = write!(out, "{byte:02x}");
    }
    out
}
