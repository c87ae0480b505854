//! Step 1: parse Ethernet (one optional 802.1Q tag), IPv4 or IPv6 (with
//! extension and fragment headers), and the TCP or UDP ports.
//!
//! Parsing is split where the balancer must decide early: after the fixed IP
//! header the destination is known, so traffic to no VIP leaves before the
//! rest is read.

use aya_ebpf::programs::XdpContext;
use lb_common::{Addr, Counter, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP};
use lb_ebpf::{
    headers::{
        ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, EthHdr, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
        IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPV4_DF, IPV4_MF, IPV4_OFFSET_MASK, Ipv4Hdr, Ipv6ExtHdr,
        Ipv6FragHdr, Ipv6Hdr, Ports, TCP_FLAG_ACK, TCP_FLAG_SYN, TcpHdr, UdpHdr, VlanHdr,
    },
    packet::{frame_len, read_at, write_at},
};

/// IPv6 extension headers walked before giving up on finding TCP or UDP.
const MAX_IPV6_EXT_HEADERS: usize = 4;

pub struct L2 {
    /// Ethernet header length: 14, or 18 with a VLAN tag.
    pub len: usize,
    /// EtherType of what follows the header (and tag).
    pub ether_type: u16,
    /// The header as received. Its destination is our MAC, so a usable
    /// source MAC when no next-hop entry names one.
    pub eth: EthHdr,
    /// Whether the frame has an 802.1Q tag, and its TCI: what the frame
    /// leaves with too. (Not an `Option`: LLVM may copy the undefined
    /// payload of a `None`, a register the verifier refuses to read.)
    pub tagged: bool,
    pub tci: u16,
}

impl L2 {
    /// Writes at `at` an Ethernet header from `src` to `dst` carrying this
    /// frame's VLAN tag, if it had one, and `ether_type` for what follows.
    #[inline(always)]
    pub fn write_header(
        &self,
        ctx: &XdpContext,
        at: usize,
        dst: [u8; 6],
        src: [u8; 6],
        ether_type: u16,
    ) -> Option<()> {
        if !self.tagged {
            return write_at(
                ctx,
                at,
                EthHdr {
                    dst,
                    src,
                    ether_type,
                },
            );
        }
        let eth = EthHdr {
            dst,
            src,
            ether_type: ETH_P_8021Q,
        };
        write_at(ctx, at, eth)?;
        let tag = VlanHdr {
            tci: self.tci,
            ether_type,
        };
        write_at(ctx, at + size_of::<EthHdr>(), tag)
    }
}

pub fn ethernet(ctx: &XdpContext) -> Option<L2> {
    let eth: EthHdr = read_at(ctx, 0)?;
    if eth.ether_type != ETH_P_8021Q {
        return Some(L2 {
            len: size_of::<EthHdr>(),
            ether_type: eth.ether_type,
            eth,
            tagged: false,
            tci: 0,
        });
    }
    let vlan: VlanHdr = read_at(ctx, size_of::<EthHdr>())?;
    Some(L2 {
        len: size_of::<EthHdr>() + size_of::<VlanHdr>(),
        ether_type: vlan.ether_type,
        eth,
        tagged: true,
        tci: vlan.tci,
    })
}

/// The fixed IP header: enough to tell whether the packet may be for a VIP.
pub enum L3 {
    V4 { off: usize, hdr: Ipv4Hdr },
    V6 { off: usize, hdr: Ipv6Hdr },
}

impl L3 {
    #[inline(always)]
    pub fn dst(&self) -> Addr {
        match self {
            L3::V4 { hdr, .. } => [hdr.dst, 0, 0, 0],
            L3::V6 { hdr, .. } => hdr.dst,
        }
    }

    #[inline(always)]
    pub fn family(&self) -> u8 {
        match self {
            L3::V4 { .. } => FAMILY_V4,
            L3::V6 { .. } => FAMILY_V6,
        }
    }
}

pub fn ip(ctx: &XdpContext, l2: &L2) -> Result<L3, Counter> {
    let off = l2.len;
    if l2.ether_type == ETH_P_IPV4 {
        let hdr = read_at(ctx, off).ok_or(Counter::PassMalformed)?;
        Ok(L3::V4 { off, hdr })
    } else if l2.ether_type == ETH_P_IPV6 {
        let hdr = read_at(ctx, off).ok_or(Counter::PassMalformed)?;
        Ok(L3::V6 { off, hdr })
    } else {
        Err(Counter::PassNotIp)
    }
}

/// A packet the balancer may forward.
pub struct Packet {
    pub flow: FlowKey,
    /// Length of the IP packet, from its header (the frame may carry
    /// Ethernet padding behind it).
    pub ip_len: u32,
    pub tos: u8,
    /// A TCP SYN without ACK: a new connection, whatever the table says.
    pub syn: bool,
    /// Ports are unknown or ignored: hashed on (source, destination,
    /// protocol) so every fragment of a datagram agrees.
    pub fragment: bool,
    /// The sender forbids fragmenting it on the way: IPv4 with DF, and
    /// all of IPv6 (only its source fragments). Too big for the way out,
    /// such a packet is answered with ICMP.
    pub dont_fragment: bool,
    pub ipv4_options: bool,
}

pub enum TransportError {
    /// Not TCP or UDP: not ours to balance.
    NotTransport,
    Malformed,
}

pub fn transport(ctx: &XdpContext, l3: &L3) -> Result<Packet, TransportError> {
    match l3 {
        L3::V4 { off, hdr } => ipv4_transport(ctx, *off, hdr),
        L3::V6 { off, hdr } => ipv6_transport(ctx, *off, hdr),
    }
}

fn ipv4_transport(ctx: &XdpContext, off: usize, hdr: &Ipv4Hdr) -> Result<Packet, TransportError> {
    let header_len = usize::from(hdr.version_ihl & 0x0f) * 4;
    let ip_len = usize::from(u16::from_be(hdr.tot_len));
    if hdr.version_ihl >> 4 != 4
        || header_len < size_of::<Ipv4Hdr>()
        || ip_len < header_len
        || off + ip_len > frame_len(ctx)
    {
        return Err(TransportError::Malformed);
    }
    let proto = transport_proto(hdr.proto)?;
    let frag_off = u16::from_be(hdr.frag_off);
    let fragment = frag_off & (IPV4_MF | IPV4_OFFSET_MASK) != 0;
    let mut flow = FlowKey {
        src: [hdr.src, 0, 0, 0],
        dst: [hdr.dst, 0, 0, 0],
        proto,
        family: FAMILY_V4,
        ..FlowKey::default()
    };
    let mut syn = false;
    if !fragment {
        syn = read_ports(ctx, off + header_len, ip_len - header_len, &mut flow)?;
    }
    Ok(Packet {
        flow,
        ip_len: ip_len as u32,
        tos: hdr.tos,
        syn,
        fragment,
        dont_fragment: frag_off & IPV4_DF != 0,
        ipv4_options: header_len > size_of::<Ipv4Hdr>(),
    })
}

fn ipv6_transport(ctx: &XdpContext, off: usize, hdr: &Ipv6Hdr) -> Result<Packet, TransportError> {
    let payload_len = usize::from(u16::from_be(hdr.payload_len));
    let fixed_len = size_of::<Ipv6Hdr>();
    if u32::from_be(hdr.vcf) >> 28 != 6 || off + fixed_len + payload_len > frame_len(ctx) {
        return Err(TransportError::Malformed);
    }
    let mut next_hdr = hdr.next_hdr;
    let mut header_len = fixed_len;
    let mut fragment = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next_hdr {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext: Ipv6ExtHdr =
                    read_at(ctx, off + header_len).ok_or(TransportError::Malformed)?;
                next_hdr = ext.next_hdr;
                header_len += (usize::from(ext.len) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let frag: Ipv6FragHdr =
                    read_at(ctx, off + header_len).ok_or(TransportError::Malformed)?;
                next_hdr = frag.next_hdr;
                header_len += size_of::<Ipv6FragHdr>();
                fragment = true;
            }
            _ => break,
        }
    }
    // A chain longer than we walk is not read as "not TCP/UDP": that would
    // hand a VIP's packet to the node's own stack.
    if header_len > fixed_len + payload_len
        || matches!(
            next_hdr,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT
        )
    {
        return Err(TransportError::Malformed);
    }
    let proto = transport_proto(next_hdr)?;
    let mut flow = FlowKey {
        src: hdr.src,
        dst: hdr.dst,
        proto,
        family: FAMILY_V6,
        ..FlowKey::default()
    };
    let mut syn = false;
    if !fragment {
        let l4_len = fixed_len + payload_len - header_len;
        syn = read_ports(ctx, off + header_len, l4_len, &mut flow)?;
    }
    Ok(Packet {
        flow,
        ip_len: (fixed_len + payload_len) as u32,
        tos: hdr.traffic_class(),
        syn,
        fragment,
        dont_fragment: true,
        ipv4_options: false,
    })
}

#[inline(always)]
fn transport_proto(proto: u8) -> Result<u8, TransportError> {
    match proto {
        PROTO_TCP | PROTO_UDP => Ok(proto),
        _ => Err(TransportError::NotTransport),
    }
}

/// Fills the flow's ports from the TCP or UDP header at `off`, which the IP
/// header says is `l4_len` bytes long. Returns whether it is a TCP SYN.
#[inline(always)]
fn read_ports(
    ctx: &XdpContext,
    off: usize,
    l4_len: usize,
    flow: &mut FlowKey,
) -> Result<bool, TransportError> {
    let (ports, syn): (Ports, bool) = if flow.proto == PROTO_TCP {
        let tcp: TcpHdr = read_at(ctx, off).ok_or(TransportError::Malformed)?;
        let data_off = usize::from(tcp.doff >> 4) * 4;
        if data_off < size_of::<TcpHdr>() || data_off > l4_len {
            return Err(TransportError::Malformed);
        }
        let syn = tcp.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
        (tcp.ports, syn)
    } else {
        let udp: UdpHdr = read_at(ctx, off).ok_or(TransportError::Malformed)?;
        if size_of::<UdpHdr>() > l4_len {
            return Err(TransportError::Malformed);
        }
        (udp.ports, false)
    };
    flow.sport = ports.src;
    flow.dport = ports.dst;
    Ok(syn)
}
