//! Wire headers with natural-width fields in network byte order, so that an
//! address or port is one load, copied into map keys without byte swaps.

pub const ETH_P_IPV4: u16 = 0x0800_u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86dd_u16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100_u16.to_be();

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct VlanHdr {
    pub tci: u16,
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_DF: u16 = 0x4000;
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;

impl Ipv4Hdr {
    /// The header checksum over the header as it stands, with `check`
    /// counted as zero; the header has no options.
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        let words: [u16; 10] = [
            u16::from_ne_bytes([self.version_ihl, self.tos]),
            self.tot_len,
            self.id,
            self.frag_off,
            u16::from_ne_bytes([self.ttl, self.proto]),
            0,
            self.src as u16,
            (self.src >> 16) as u16,
            self.dst as u16,
            (self.dst >> 16) as u16,
        ];
        let mut sum = 0u32;
        let mut i = 0;
        while i < words.len() {
            sum += u32::from(words[i]);
            i += 1;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class and flow label.
    pub vcf: u32,
    pub payload_len: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

impl Ipv6Hdr {
    #[inline(always)]
    pub fn traffic_class(&self) -> u8 {
        (u32::from_be(self.vcf) >> 20) as u8
    }
}

/// Hop-by-hop, routing and destination-options headers share this start.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6ExtHdr {
    pub next_hdr: u8,
    /// Length in 8-byte units, not counting the first 8 bytes.
    pub len: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6FragHdr {
    pub next_hdr: u8,
    pub reserved: u8,
    pub frag_off: u16,
    pub id: u32,
}

/// The first 4 bytes of TCP and UDP: the ports.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

/// TCP up to the flags byte.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub ports: Ports,
    pub seq: u32,
    pub ack_seq: u32,
    /// Data offset (high nibble) and reserved bits.
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub ports: Ports,
    pub len: u16,
    pub check: u16,
}

/// The 8 bytes ICMP and ICMPv6 messages start with.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    /// Per message kind; for "too big", the MTU in network byte order
    /// (ICMP: in the low 16 bits, the high 16 unused).
    pub rest: u32,
}

/// ICMP destination unreachable, code fragmentation needed (RFC 1191).
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 packet too big (RFC 4443).
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
