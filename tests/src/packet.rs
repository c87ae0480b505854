//! Client packets, built with etherparse: correct lengths and checksums
//! everywhere, so that whatever the balancer gets wrong shows.
//!
//! ```no_run
//! # use xlb_tests::*;
//! let syn = Pkt::tcp_syn(CLIENT_V4, 40000, WEB_V4.addr, 80).payload(b"hi").build();
//! let [first, rest] = Pkt::udp(CLIENT_V4, 5353, ANY_UDP_V4.addr, 53).payload(&[7; 64]).fragments(32);
//! ```

use std::net::IpAddr;

use etherparse::{
    EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type,
    IpDscp, IpEcn, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel,
    Ipv6FragmentHeader, Ipv6Header, SingleVlanHeader, TcpHeader, UdpHeader, VlanId, VlanPcp,
};
use lb_common::{FlowKey, PROTO_TCP, PROTO_UDP, addr_from_ip};

use crate::world::{CLIENT_MAC, NODE_MAC};

/// The transport part of a [`Pkt`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        syn: bool,
        ack: bool,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP (or ICMPv6) echo request: IP, but neither TCP nor UDP.
    IcmpEcho,
}

/// A client packet, described field by field; [`Pkt::build`] turns it into
/// an Ethernet frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    /// An 802.1Q tag: (priority, VLAN id).
    pub vlan: Option<(u8, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub ipv4_options: Vec<u8>,
    /// IPv4 identification / IPv6 fragment identification.
    pub ident: u32,
    /// IPv4's don't-fragment flag (fragments never carry it).
    pub dont_fragment: bool,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Pkt {
    fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "source {src} and destination {dst} differ in family"
        );
        Self {
            eth_src: CLIENT_MAC,
            eth_dst: NODE_MAC,
            vlan: None,
            src,
            dst,
            tos: 0,
            ttl: 64,
            ipv4_options: Vec::new(),
            ident: 0x1234,
            dont_fragment: true,
            l4,
            payload: Vec::new(),
        }
    }

    /// A TCP SYN: the first packet of a connection.
    pub fn tcp_syn(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        let l4 = L4::Tcp {
            sport,
            dport,
            syn: true,
            ack: false,
        };
        Self::new(src.into(), dst.into(), l4)
    }

    /// A TCP segment of an established connection (ACK set, SYN clear).
    pub fn tcp_ack(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        let l4 = L4::Tcp {
            sport,
            dport,
            syn: false,
            ack: true,
        };
        Self::new(src.into(), dst.into(), l4)
    }

    pub fn udp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        Self::new(src.into(), dst.into(), L4::Udp { sport, dport })
    }

    /// An ICMP echo request (ICMPv6 for IPv6 addresses).
    pub fn icmp_echo(src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Self {
        Self::new(src.into(), dst.into(), L4::IcmpEcho)
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Adds an 802.1Q tag.
    pub fn vlan(mut self, priority: u8, id: u16) -> Self {
        self.vlan = Some((priority, id));
        self
    }

    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        assert!(self.src.is_ipv4(), "IPv4 options on an IPv6 packet");
        self.ipv4_options = options.to_vec();
        self
    }

    /// The same packet from another source port (TCP or UDP).
    /// Clears IPv4's don't-fragment flag: routers may fragment it.
    pub fn may_fragment(mut self) -> Self {
        self.dont_fragment = false;
        self
    }

    pub fn sport(mut self, port: u16) -> Self {
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
            L4::IcmpEcho => panic!("ICMP has no ports"),
        }
        self
    }

    pub fn src(mut self, src: impl Into<IpAddr>) -> Self {
        self.src = src.into();
        self
    }

    /// The IP protocol number of the transport.
    pub fn proto(&self) -> u8 {
        match (self.l4, self.src) {
            (L4::Tcp { .. }, _) => PROTO_TCP,
            (L4::Udp { .. }, _) => PROTO_UDP,
            (L4::IcmpEcho, IpAddr::V4(_)) => IpNumber::ICMP.0,
            (L4::IcmpEcho, IpAddr::V6(_)) => IpNumber::IPV6_ICMP.0,
        }
    }

    /// The connection-table key of this packet, as the balancer builds it.
    pub fn flow(&self) -> FlowKey {
        let (sport, dport) = match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
            L4::IcmpEcho => (0, 0),
        };
        let (family, src) = addr_from_ip(self.src);
        let (_, dst) = addr_from_ip(self.dst);
        FlowKey {
            src,
            dst,
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto: self.proto(),
            family,
            _pad: [0; 2],
        }
    }

    /// The key a fragment of this packet hashes on: no ports.
    pub fn fragment_flow(&self) -> FlowKey {
        FlowKey {
            sport: 0,
            dport: 0,
            ..self.flow()
        }
    }

    /// The transport header and payload, with the checksum over all of it.
    pub fn l4_segment(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match (self.l4, self.src, self.dst) {
            (
                L4::Tcp {
                    sport,
                    dport,
                    syn,
                    ack,
                },
                src,
                dst,
            ) => {
                let mut tcp = TcpHeader::new(sport, dport, 0x1000_0000, 64240);
                tcp.syn = syn;
                tcp.ack = ack;
                tcp.acknowledgment_number = if ack { 0x2000_0000 } else { 0 };
                tcp.checksum = match (src, dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        tcp.calc_checksum_ipv4_raw(s.octets(), d.octets(), &self.payload)
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        tcp.calc_checksum_ipv6_raw(s.octets(), d.octets(), &self.payload)
                    }
                    _ => unreachable!(),
                }
                .expect("TCP payload too long");
                tcp.write(&mut out).unwrap();
            }
            (L4::Udp { sport, dport }, src, dst) => {
                let mut udp = UdpHeader::without_ipv4_checksum(sport, dport, self.payload.len())
                    .expect("UDP payload too long");
                udp.checksum = match (src, dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        udp.calc_checksum_ipv4_raw(s.octets(), d.octets(), &self.payload)
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        udp.calc_checksum_ipv6_raw(s.octets(), d.octets(), &self.payload)
                    }
                    _ => unreachable!(),
                }
                .expect("UDP payload too long");
                udp.write(&mut out).unwrap();
            }
            (L4::IcmpEcho, IpAddr::V4(_), _) => {
                let echo = Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 7, seq: 1 });
                Icmpv4Header::with_checksum(echo, &self.payload)
                    .write(&mut out)
                    .unwrap();
            }
            (L4::IcmpEcho, IpAddr::V6(s), IpAddr::V6(d)) => {
                let echo = Icmpv6Type::EchoRequest(IcmpEchoHeader { id: 7, seq: 1 });
                Icmpv6Header::with_checksum(echo, s.octets(), d.octets(), &self.payload)
                    .unwrap()
                    .write(&mut out)
                    .unwrap();
            }
            _ => unreachable!(),
        }
        out.extend_from_slice(&self.payload);
        out
    }

    /// The whole IP packet (no Ethernet header).
    pub fn ip_packet(&self) -> Vec<u8> {
        let segment = self.l4_segment();
        let mut out = self.ip_header(segment.len(), None);
        out.extend_from_slice(&segment);
        out
    }

    /// The Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let mut frame = self.ethernet_header();
        frame.extend_from_slice(&self.ip_packet());
        frame
    }

    /// The packet split into two fragments: the first carries the first
    /// `first_len` bytes (a multiple of 8) of the transport segment, with
    /// more-fragments set; the second the rest, at offset `first_len`.
    /// IPv6 fragments carry a fragment header.
    pub fn fragments(&self, first_len: usize) -> [Vec<u8>; 2] {
        let segment = self.l4_segment();
        assert!(
            first_len.is_multiple_of(8) && first_len < segment.len(),
            "fragment split {first_len} of a {}-byte segment",
            segment.len()
        );
        let (head, tail) = segment.split_at(first_len);
        [(head, 0, true), (tail, first_len, false)].map(|(data, offset, more)| {
            let mut frame = self.ethernet_header();
            frame.extend_from_slice(&self.ip_header(data.len(), Some((offset, more))));
            frame.extend_from_slice(data);
            frame
        })
    }

    fn ethernet_header(&self) -> Vec<u8> {
        let ip_type = if self.src.is_ipv4() {
            EtherType::IPV4
        } else {
            EtherType::IPV6
        };
        let eth = Ethernet2Header {
            source: self.eth_src,
            destination: self.eth_dst,
            ether_type: if self.vlan.is_some() {
                EtherType::VLAN_TAGGED_FRAME
            } else {
                ip_type
            },
        };
        let mut out = eth.to_bytes().to_vec();
        if let Some((priority, id)) = self.vlan {
            let tag = SingleVlanHeader {
                pcp: VlanPcp::try_new(priority).unwrap(),
                drop_eligible_indicator: false,
                vlan_id: VlanId::try_new(id).unwrap(),
                ether_type: ip_type,
            };
            out.extend_from_slice(&tag.to_bytes());
        }
        out
    }

    /// The IP header (with a fragment header for an IPv6 fragment) for
    /// `data_len` bytes of transport data; `frag`: (offset in bytes, more
    /// fragments).
    fn ip_header(&self, data_len: usize, frag: Option<(usize, bool)>) -> Vec<u8> {
        let (offset, more) = frag.unwrap_or((0, false));
        let frag_offset = IpFragOffset::try_new((offset / 8) as u16).unwrap();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut hdr = Ipv4Header {
                    dscp: IpDscp::try_new(self.tos >> 2).unwrap(),
                    ecn: IpEcn::try_new(self.tos & 3).unwrap(),
                    identification: self.ident as u16,
                    dont_fragment: self.dont_fragment && frag.is_none(),
                    more_fragments: more,
                    fragment_offset: frag_offset,
                    time_to_live: self.ttl,
                    protocol: IpNumber(self.proto()),
                    source: src.octets(),
                    destination: dst.octets(),
                    options: Ipv4Options::try_from(&self.ipv4_options[..])
                        .expect("IPv4 options: a multiple of 4 bytes, at most 40"),
                    ..Default::default()
                };
                hdr.set_payload_len(data_len).unwrap();
                hdr.header_checksum = hdr.calc_header_checksum();
                hdr.to_bytes().to_vec()
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let frag_header = frag.map(|_| {
                    Ipv6FragmentHeader::new(IpNumber(self.proto()), frag_offset, more, self.ident)
                });
                let ext_len = frag_header.as_ref().map_or(0, |h| h.header_len());
                let hdr = Ipv6Header {
                    traffic_class: self.tos,
                    flow_label: Ipv6FlowLabel::try_new(0x12345).unwrap(),
                    payload_length: (ext_len + data_len) as u16,
                    next_header: if frag.is_some() {
                        IpNumber::IPV6_FRAGMENTATION_HEADER
                    } else {
                        IpNumber(self.proto())
                    },
                    hop_limit: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                };
                let mut out = hdr.to_bytes().to_vec();
                if let Some(frag_header) = frag_header {
                    out.extend_from_slice(&frag_header.to_bytes());
                }
                out
            }
            _ => unreachable!(),
        }
    }
}

/// An ARP request from the client: not IP at all.
pub fn arp_request() -> Vec<u8> {
    let eth = Ethernet2Header {
        source: CLIENT_MAC,
        destination: [0xff; 6],
        ether_type: EtherType::ARP,
    };
    let mut frame = eth.to_bytes().to_vec();
    // Hardware Ethernet, protocol IPv4, lengths 6 and 4, operation request,
    // sender 02:c1::01 / 198.18.100.10, target ?? / 198.18.2.10.
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&[198, 18, 100, 10]);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&[198, 18, 2, 10]);
    frame
}
