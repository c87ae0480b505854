//! The one definition of everything xlb's XDP programs and its controller
//! exchange: map keys and values, counter indices, limits, and the flow hash.
//!
//! Every type is `#[repr(C)]` with its padding spelled out, so the kernel and
//! userspace cannot disagree on a layout. Addresses are stored as four `u32`
//! words holding the address bytes in network order (an IPv4 address uses the
//! first word only, the rest is zero), so that the XDP program copies them
//! straight from the packet without byte swapping.
#![no_std]

pub mod hash;
pub mod pktgen;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use hash::{ConnSlot, FlowHasher, ring_hash, ring_slot};

/// Address family tags used in keys and values (not the kernel's AF_* values:
/// these only need to be distinct and non-zero, so that zeroed memory means
/// "unset").
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Encapsulation overhead per outer family (no options, no extension headers).
pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;

/// TTL / hop limit of the outer header. The inner header is left as the client
/// sent it: the tunnel is one hop from the backend's point of view.
pub const OUTER_TTL: u8 = 64;

/// Defaults for the map sizes the controller sets at load time.
pub const DEFAULT_MAX_VIPS: u32 = 512;
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Flat ring storage shared by all VIPs: `max_vips` rings of the default size.
pub const DEFAULT_RING_CAPACITY: u32 = DEFAULT_MAX_VIPS * DEFAULT_RING_SIZE;
/// Connection-table flows.
pub const DEFAULT_CONNTRACK_SIZE: u32 = 1 << 21;
/// Bits in the VIP address prefilter (a one-hash Bloom filter, see
/// [`VipFilter`]).
pub const VIP_FILTER_BITS: u32 = 1 << 16;
pub const VIP_FILTER_WORDS: usize = (VIP_FILTER_BITS / 64) as usize;
/// Decapsulation endpoints a backend host may list.
pub const MAX_DECAP_ADDRS: u32 = 64;
/// Interfaces the balancer may redirect to.
pub const MAX_TX_PORTS: u32 = 64;

/// Map names, as the XDP object defines them.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const RINGS: &str = "RINGS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const NEXTHOPS: &str = "NEXTHOPS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const SETTINGS: &str = "SETTINGS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const VIP_LIVE: &str = "VIP_LIVE";
    pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
}

/// Program names, as the XDP object defines them.
pub mod program_names {
    pub const BALANCER: &str = "xlb_balancer";
    pub const DECAP: &str = "xlb_decap";
    pub const PROBE_EGRESS: &str = "xlb_probe_egress";
}

/// Socket marks of via-VIP health probes: `PROBE_MARK_BASE | backend id`.
/// The tc egress program encapsulates a packet carrying such a mark to that
/// backend, as the balancer would have; no other packet is touched. Backend
/// ids are below [`MAX_IDS`] (16 bits), so the id fills the low half and
/// the high half tells xlb's marks from anyone else's.
pub const PROBE_MARK_BASE: u32 = 0x584c_0000;
pub const PROBE_MARK_MASK: u32 = 0xffff_0000;

/// The mark of a via-VIP probe to `backend_id`.
pub const fn probe_mark(backend_id: u32) -> u32 {
    PROBE_MARK_BASE | (backend_id & !PROBE_MARK_MASK)
}

/// An IPv4 or IPv6 address in the maps' layout (see the crate docs).
pub type Addr = [u32; 4];

/// Converts an address into the maps' layout and family tag.
pub fn addr_from_ip(ip: IpAddr) -> (u8, Addr) {
    match ip {
        IpAddr::V4(v4) => (FAMILY_V4, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (FAMILY_V6, [word(0), word(4), word(8), word(12)])
        }
    }
}

/// The inverse of [`addr_from_ip`]; `None` for an unknown family tag.
pub fn ip_from_addr(family: u8, addr: &Addr) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes()))),
        FAMILY_V6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// Key of the `VIPS` hash map. `port` is in network byte order; 0 is the
/// wildcard that matches any destination port of `proto`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Hash on the client address only, so that every connection of one client
/// reaches the same backend (client affinity).
pub const VIP_F_CLIENT_AFFINITY: u32 = 1 << 0;

/// Value of the `VIPS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into `VIP_STATS`; unique among the programmed VIPs.
    pub id: u32,
    /// First slot of this VIP's ring in the flat ring storage (a slot
    /// index, not a `RINGS` element: see [`RingLine`]).
    pub ring_offset: u32,
    /// Number of slots of the ring (a prime); 0 means the VIP has no ring yet.
    pub ring_size: u32,
    pub flags: u32,
    /// Tells this VIP's connection-table entries from those of an earlier
    /// VIP with the same id: see `VIP_LIVE`. Filled in by the map's owner.
    pub generation: u32,
}

/// The backend may keep its established flows. Cleared when a backend is
/// declared dead, so that the connection table stops pinning flows to it;
/// left set while it drains (weight 0: out of the ring, flows kept).
pub const BACKEND_F_UP: u8 = 1 << 0;

/// Value of the `BACKENDS` array, indexed by backend id. A ring slot holds a
/// backend id; an entry with `family == 0` is not programmed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    pub family: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// The entry is current. Userspace clears it when the route or neighbour
/// behind it goes away; the packet path then asks the kernel's FIB itself.
pub const NEXTHOP_F_VALID: u32 = 1 << 0;

/// Value of the `NEXTHOPS` array, indexed by backend id: where an
/// encapsulated packet for that backend leaves, resolved by userspace from
/// the kernel's routes and neighbours.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    /// L3 MTU of the egress interface: the outer packet must fit in it.
    pub mtu: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub flags: u32,
}

/// The gateway MAC in [`Settings`] is set.
pub const SETTINGS_F_GATEWAY_MAC: u32 = 1 << 0;

/// The single entry of the `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Seed of the flow hash: every xlb node of one fleet uses the same.
    pub hash_seed: u32,
    pub flags: u32,
    /// Outer source address of IPv4 encapsulation.
    pub src_v4: u32,
    /// Outer source address of IPv6 encapsulation.
    pub src_v6: Addr,
    /// Last-resort next hop when neither the `NEXTHOPS` entry nor the FIB
    /// gives a neighbour: the packet leaves through the ingress interface.
    pub gateway_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Sets in `CONNTRACK`, minus one. Filled in by the map's owner from
    /// the table's geometry, never by hand.
    pub conntrack_mask: u32,
}

/// Key of the connection table. Ports in network
/// byte order, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// One remembered flow of the connection table: 16 bytes, so that a set of
/// four is one cache line. The flow is known by its 64-bit fingerprint (see
/// `ConnSlot`) rather than its 40-byte key; two live flows of one set would
/// need the same 64-bit hash to be confused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// 0: the way is empty.
    pub fingerprint: u64,
    pub backend_id: u16,
    /// The VIP the flow was balanced for, and its generation then: an entry
    /// counts only while `VIP_LIVE[vip_id]` still holds that generation, so
    /// deleting a VIP ends its flows without touching the table.
    pub vip_id: u16,
    pub vip_generation: u16,
    pub _pad: u16,
}

/// Ways per connection-table set: with four, a set only evicts a live flow
/// when five flows hash to it, rare until the table is nearly full.
pub const FLOW_WAYS: usize = 4;

/// Backend and VIP ids must fit the connection table's 16-bit fields.
pub const MAX_IDS: u32 = 1 << 16;

/// Value of the `CONNTRACK` array: one set of a set-associative table
/// shared by all CPUs, the set picked by the flow hash. The ways are kept
/// in order of use, most recent first: a hit moves its entry to the front,
/// a new flow enters at the front and pushes the least recently used one
/// out of the back. Shared rather than per CPU because a flow's packets do
/// not always arrive on one CPU (veth, RSS changes): a per-CPU table would
/// forget the flow exactly when its ring has changed.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSet {
    pub ways: [FlowEntry; FLOW_WAYS],
}

/// Connection-table geometry: the number of sets (a power of two, so the
/// set is `hash & (sets - 1)`) for at most `entries` flows.
pub fn conntrack_sets(entries: u32) -> u32 {
    let sets = entries / FLOW_WAYS as u32;
    if sets <= 1 {
        1
    } else {
        1 << (31 - sets.leading_zeros())
    }
}

/// ICMP too-big replies each CPU may send per second, and at once: what
/// Linux allows its own ICMP errors by default (`icmp_msgs_per_sec`), so
/// that a flood of oversized packets (perhaps from forged sources) draws
/// no more replies from a node than from a router.
pub const ICMP_REPLIES_PER_SEC: u64 = 1000;

/// Ring slots per [`RingLine`].
pub const RING_LINE_SLOTS: u32 = 32;

/// Value of the `RINGS` array: one cache line of 32 ring slots, each a
/// backend id (they fit 16 bits, see [`MAX_IDS`]). All VIPs' rings lie back
/// to back in one flat storage of slots; slot `i` is lane `i % 32` of
/// element `i / 32` (see [`RingPlace`]).
///
/// Why lines of `u16` rather than one `u32` per element: the kernel stores
/// an array element in `round_up(value_size, 8)` bytes, so a `u32` slot
/// costs 8 bytes and a 65 537-slot ring 512 KiB; packed, 2 bytes and
/// 128 KiB, and four times as many slots share each cache line a lookup
/// pulls in. `RINGS` is mmapable, which starts its values on a page, so
/// each element is exactly one cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingLine {
    pub slots: [u16; RING_LINE_SLOTS as usize],
}

/// Where a slot of the flat ring storage lives in `RINGS`: the one mapping
/// from slots to elements, used by the XDP program and the controller alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingPlace {
    /// The `RINGS` element (line).
    pub line: u32,
    /// The slot within the line, below [`RING_LINE_SLOTS`].
    pub lane: usize,
}

impl RingPlace {
    #[inline(always)]
    pub const fn of(slot: u32) -> Self {
        Self {
            line: slot / RING_LINE_SLOTS,
            lane: (slot % RING_LINE_SLOTS) as usize,
        }
    }
}

/// `RINGS` elements for a storage of `slots` ring slots.
pub const fn ring_lines(slots: u32) -> u32 {
    slots.div_ceil(RING_LINE_SLOTS)
}

/// Per-CPU traffic counters of one VIP or backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    /// Flows that took the ring (SYN or connection-table miss).
    pub new_flows: u64,
}

impl Traffic {
    /// Adds another CPU's share.
    pub fn add(&mut self, other: &Traffic) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
    }
}

/// An address alone: key of `VIP_ADDRS` (every address some VIP is on) and
/// of `DECAP_ADDRS` (outer destinations the decap program accepts).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrKey {
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The VIP address prefilter, the single value of `VIP_FILTER`: one bit per
/// hash of a VIP address. A clear bit proves the destination is no VIP, which
/// lets most non-VIP traffic pass after one inlined array lookup instead of
/// two hash-map lookups.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipFilter {
    pub words: [u64; VIP_FILTER_WORDS],
}

impl Default for VipFilter {
    fn default() -> Self {
        Self {
            words: [0; VIP_FILTER_WORDS],
        }
    }
}

impl VipFilter {
    /// The bit an address maps to.
    #[inline(always)]
    pub fn bit(addr: &Addr) -> u32 {
        let folded = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
        folded.wrapping_mul(0x9e37_79b1) >> (32 - VIP_FILTER_BITS.trailing_zeros())
    }

    pub fn insert(&mut self, addr: &Addr) {
        let bit = Self::bit(addr);
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }

    pub fn may_contain(&self, addr: &Addr) -> bool {
        let bit = Self::bit(addr);
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }
}

/// Global verdict and reason counters, the indices of the per-CPU `COUNTERS`
/// array. Every packet the balancer sees moves exactly one verdict counter
/// (`Pass*`, `Drop*`, `Tx`, `Redirect`) and any number of reason counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// Verdict: not IPv4/IPv6 (ARP, LLDP, ...), passed untouched.
    PassNotIp,
    /// Verdict: IP, but not to a VIP (or not TCP/UDP), passed untouched.
    PassNotVip,
    /// Verdict: headers too short or inconsistent to tell whether the packet
    /// is for a VIP, and its destination address is no VIP's: left to the
    /// kernel, which drops what it cannot parse either.
    PassMalformed,
    /// Verdict: headers truncated or inconsistent, to a VIP address.
    DropMalformed,
    /// Verdict: a fragment to an address with no port-wildcard VIP for its
    /// protocol. Only the first fragment carries ports, so no port-specific
    /// VIP can claim all fragments of a datagram.
    DropFragment,
    /// Verdict: the VIP has no ring, or the slot's backend is not programmed.
    DropNoBackend,
    /// Verdict: the encapsulated packet would exceed the egress MTU, and
    /// ICMP may not or cannot say so (see `IcmpTooBig`): an IPv4 packet
    /// without DF (it would need fragmenting, which xlb does not do), or
    /// one shorter than the quote an ICMP reply carries.
    DropTooBig,
    /// Verdict: neither the next-hop map, the FIB nor a gateway MAC gave a
    /// way out.
    DropNoRoute,
    /// Verdict: the kernel refused to grow the packet head.
    DropEncapFailed,
    /// Verdict: encapsulated and sent back out of the ingress interface.
    Tx,
    /// Verdict: encapsulated and redirected to another interface.
    Redirect,
    /// Reason: a fragment, hashed on (source, destination, protocol).
    Fragment,
    /// Reason: IPv4 with options, balanced as any other packet.
    Ipv4Options,
    /// Reason: the connection table knew the flow.
    ConnHit,
    /// Reason: the flow took the ring (SYN, new or forgotten flow).
    ConnMiss,
    /// Reason: the new flow could not be recorded (the table has no set for
    /// it: only if it was sized inconsistently with the settings).
    ConnInsertFailed,
    /// Reason: recording the new flow replaced another live flow of its set:
    /// the table is too small for the number of concurrent flows.
    ConnEvicted,
    /// Reason: the flow's recorded backend is down; it took the ring again.
    ConnBackendDown,
    /// Reason: no valid `NEXTHOPS` entry; the FIB was asked.
    FibLookup,
    /// Reason: the FIB gave no neighbour; the gateway MAC was used.
    GatewayFallback,
    /// Decap verdict: outer header stripped, inner packet passed up.
    DecapOk,
    /// Decap verdict: not a tunnel packet for this host, passed untouched.
    DecapPassNotTunnel,
    /// Decap verdict: a tunnel packet too short or inconsistent.
    DecapDropMalformed,
    /// Probe egress verdict: a via-VIP probe packet encapsulated to its
    /// backend and sent.
    ProbeEncap,
    /// Probe egress verdict: the mark names a backend id that is not
    /// programmed.
    ProbeDropNoBackend,
    /// Probe egress verdict: the backend has no valid next-hop entry.
    ProbeDropNoRoute,
    /// Probe egress verdict: the marked packet is not IPv4/IPv6 behind an
    /// Ethernet header, or its IP header is cut short.
    ProbeDropMalformed,
    /// Probe egress verdict: the encapsulated packet would exceed the
    /// next hop's MTU.
    ProbeDropTooBig,
    /// Probe egress verdict: the kernel refused to make room for the outer
    /// header, or to write it.
    ProbeDropEncapFailed,
    /// Verdict: the encapsulated packet would exceed the egress MTU; an
    /// ICMP "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too
    /// big" went back to the client with the MTU inside the tunnel. (Last,
    /// like every counter added later: a counter keeps its index across
    /// versions, so the pinned map of a running xlb stays readable.)
    IcmpTooBig,
    /// Reason: a packet too big for the tunnel went unanswered (and counts
    /// as `DropTooBig`): its CPU had already sent `ICMP_REPLIES_PER_SEC`
    /// replies in the last second.
    IcmpLimited,
}

impl Counter {
    pub const ALL: [Counter; 31] = [
        Counter::PassNotIp,
        Counter::PassNotVip,
        Counter::PassMalformed,
        Counter::DropMalformed,
        Counter::DropFragment,
        Counter::DropNoBackend,
        Counter::DropTooBig,
        Counter::DropNoRoute,
        Counter::DropEncapFailed,
        Counter::Tx,
        Counter::Redirect,
        Counter::Fragment,
        Counter::Ipv4Options,
        Counter::ConnHit,
        Counter::ConnMiss,
        Counter::ConnInsertFailed,
        Counter::ConnEvicted,
        Counter::ConnBackendDown,
        Counter::FibLookup,
        Counter::GatewayFallback,
        Counter::DecapOk,
        Counter::DecapPassNotTunnel,
        Counter::DecapDropMalformed,
        Counter::ProbeEncap,
        Counter::ProbeDropNoBackend,
        Counter::ProbeDropNoRoute,
        Counter::ProbeDropMalformed,
        Counter::ProbeDropTooBig,
        Counter::ProbeDropEncapFailed,
        Counter::IcmpTooBig,
        Counter::IcmpLimited,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// A stable snake_case name for logs, tables and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PassNotIp => "pass_not_ip",
            Counter::PassNotVip => "pass_not_vip",
            Counter::PassMalformed => "pass_malformed",
            Counter::DropMalformed => "drop_malformed",
            Counter::DropFragment => "drop_fragment",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropTooBig => "drop_too_big",
            Counter::DropNoRoute => "drop_no_route",
            Counter::DropEncapFailed => "drop_encap_failed",
            Counter::Tx => "tx",
            Counter::Redirect => "redirect",
            Counter::Fragment => "fragment",
            Counter::Ipv4Options => "ipv4_options",
            Counter::ConnHit => "conn_hit",
            Counter::ConnMiss => "conn_miss",
            Counter::ConnInsertFailed => "conn_insert_failed",
            Counter::ConnEvicted => "conn_evicted",
            Counter::ConnBackendDown => "conn_backend_down",
            Counter::FibLookup => "fib_lookup",
            Counter::GatewayFallback => "gateway_fallback",
            Counter::DecapOk => "decap_ok",
            Counter::DecapPassNotTunnel => "decap_pass_not_tunnel",
            Counter::DecapDropMalformed => "decap_drop_malformed",
            Counter::ProbeEncap => "probe_encap",
            Counter::ProbeDropNoBackend => "probe_drop_no_backend",
            Counter::ProbeDropNoRoute => "probe_drop_no_route",
            Counter::ProbeDropMalformed => "probe_drop_malformed",
            Counter::ProbeDropTooBig => "probe_drop_too_big",
            Counter::ProbeDropEncapFailed => "probe_drop_encap_failed",
            Counter::IcmpTooBig => "icmp_too_big",
            Counter::IcmpLimited => "icmp_limited",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: every type below is `#[repr(C)]`, `Copy`, made of integers and
    // integer arrays only, with all padding spelled out as fields, so any bit
    // pattern is a valid value.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowSet {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for VipFilter {}
    unsafe impl aya::Pod for RingLine {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<VipInfo>(), 20);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<NextHop>(), 24);
        assert_eq!(size_of::<Settings>(), 40);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Traffic>(), 24);
        assert_eq!(size_of::<FlowSet>(), 64);
        assert_eq!(size_of::<AddrKey>(), 20);
        assert_eq!(size_of::<RingLine>(), 64);
        assert_eq!(core::mem::align_of::<RingLine>(), 64);
    }

    #[test]
    fn ring_slots_fill_lines_in_order() {
        assert_eq!(RingPlace::of(0), RingPlace { line: 0, lane: 0 });
        assert_eq!(RingPlace::of(31), RingPlace { line: 0, lane: 31 });
        assert_eq!(RingPlace::of(32), RingPlace { line: 1, lane: 0 });
        assert_eq!(
            RingPlace::of(u32::MAX),
            RingPlace {
                line: u32::MAX / 32,
                lane: 31
            }
        );
        assert_eq!(ring_lines(1), 1);
        assert_eq!(ring_lines(32), 1);
        assert_eq!(ring_lines(33), 2);
        assert_eq!(ring_lines(DEFAULT_RING_CAPACITY), 1_048_592);
    }

    #[test]
    fn addresses_round_trip() {
        for ip in ["198.18.0.1", "fd00::1:2", "::", "255.255.255.255"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (family, addr) = addr_from_ip(ip);
            assert_eq!(ip_from_addr(family, &addr), Some(ip));
        }
        assert_eq!(ip_from_addr(0, &[0; 4]), None);
    }

    #[test]
    fn counter_table_is_complete_and_in_index_order() {
        for (index, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index, "{}", counter.name());
        }
    }

    #[test]
    fn conntrack_sets_are_a_power_of_two() {
        assert_eq!(conntrack_sets(1 << 21), 1 << 19);
        assert_eq!(conntrack_sets(3000), 512);
        assert_eq!(conntrack_sets(1), 1);
    }

    #[test]
    fn filter_finds_what_was_inserted() {
        let mut filter = VipFilter::default();
        let (_, a) = addr_from_ip("198.18.1.1".parse().unwrap());
        let (_, b) = addr_from_ip("fd00::10".parse().unwrap());
        filter.insert(&a);
        assert!(filter.may_contain(&a));
        filter.insert(&b);
        assert!(filter.may_contain(&b));
        assert_eq!(filter.words.iter().map(|w| w.count_ones()).sum::<u32>(), 2);
    }
}
