//! The standard world every fixture programs: who the clients are, which
//! VIPs exist, which backends serve them and how packets leave.
//!
//! Addresses come from the ranges the project keeps for its tests
//! (198.18.0.0/15 and fd00::/8): clients in 198.18.100.0/24 and
//! fd00:db8:c::/48, VIPs in 198.18.2.0/24 and fd00:db8:f::/48, backends in
//! 198.19.1.0/24 and fd00:b::/64, so nothing here can be confused with a
//! real host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VIP_F_CLIENT_AFFINITY, VipFilter, VipInfo, VipKey,
    addr_from_ip,
};

/// The ifindex BPF_PROG_TEST_RUN reports as the ingress interface: the
/// loopback device of the calling thread's network namespace. A next hop on
/// this ifindex makes the balancer answer XDP_TX.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// The client's MAC: source of every client frame.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0x00, 0x00, 0x00, 0x01];
/// The xlb node's MAC: destination of client frames, source of the frames
/// the balancer sends.
pub const NODE_MAC: [u8; 6] = [0x02, 0x1b, 0x00, 0x00, 0x00, 0x01];
/// The gateway MAC some tests configure as the last-resort next hop.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x9a, 0x00, 0x00, 0x00, 0x01];

/// The next hop's MAC for a backend: distinct per backend, so a frame's
/// destination MAC tells which next-hop entry was used.
pub const fn nexthop_mac(backend_id: u32) -> [u8; 6] {
    [0x02, 0xbe, 0x00, 0x00, 0x00, backend_id as u8]
}

/// L3 MTU of every next hop in the standard world.
pub const MTU: u32 = 1500;

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
pub const CLIENT2_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xdb8, 0xc, 0, 0, 0, 0, 0x10);

/// Addresses that carry no VIP at all.
pub const NOT_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 99);
pub const NOT_VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xdb8, 0xf, 0, 0, 0, 0, 0x99);

/// Outer source addresses of encapsulated packets.
pub const OUTER_SRC_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 100);
pub const OUTER_SRC_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, 0x100);

/// The flow hash seed of the standard world.
pub const HASH_SEED: u32 = 0x5eed_0001;

/// A backend of the standard world: its id (index of `BACKENDS`) and
/// address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendDef {
    pub id: u32,
    pub addr: IpAddr,
}

const fn v4_backend(id: u32, last: u8) -> BackendDef {
    BackendDef {
        id,
        addr: IpAddr::V4(Ipv4Addr::new(198, 19, 1, last)),
    }
}

const fn v6_backend(id: u32, last: u16) -> BackendDef {
    BackendDef {
        id,
        addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 0, last)),
    }
}

/// Every backend: 1-4 and 5 are IPv4, 11-14 are IPv6. Id 0 is left
/// unprogrammed on purpose (zeroed memory must never look like a backend).
pub const BACKENDS: [BackendDef; 9] = [
    v4_backend(1, 1),
    v4_backend(2, 2),
    v4_backend(3, 3),
    v4_backend(4, 4),
    v4_backend(5, 5),
    v6_backend(11, 1),
    v6_backend(12, 2),
    v6_backend(13, 3),
    v6_backend(14, 4),
];

/// The IPv4 pool most VIPs use.
pub const POOL_V4: &[u32] = &[1, 2, 3, 4];
/// The IPv6 pool.
pub const POOL_V6: &[u32] = &[11, 12, 13, 14];
/// Backend 5 serves only [`PINNED_V4`].
pub const PINNED_POOL: &[u32] = &[5];
/// A backend id that is never programmed.
pub const UNPROGRAMMED_BACKEND: u32 = 40;

pub fn backend(id: u32) -> BackendDef {
    *BACKENDS
        .iter()
        .find(|backend| backend.id == id)
        .unwrap_or_else(|| panic!("backend {id} is not part of the standard world"))
}

/// The backend with this address, if any.
pub fn backend_at(addr: IpAddr) -> Option<BackendDef> {
    BACKENDS
        .iter()
        .copied()
        .find(|backend| backend.addr == addr)
}

/// Tunnel endpoints the decap program accepts: the addresses of backends 1
/// and 11, as if the decap program ran on those hosts.
pub const DECAP_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
pub const DECAP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 0, 1);

/// Slots of every ring of the standard world (a prime, like a real Maglev
/// table, but small so that fixtures load fast).
pub const RING_SIZE: u32 = 31;
/// Distance between two VIPs' rings in the flat ring storage.
pub const RING_STRIDE: u32 = 1024;

/// A VIP of the standard world.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipDef {
    pub name: &'static str,
    /// Index into the per-VIP counters.
    pub id: u32,
    pub addr: IpAddr,
    /// 0: any port of `proto`.
    pub port: u16,
    pub proto: u8,
    pub flags: u32,
    /// The backends its ring cycles through; empty: the VIP has no ring.
    pub pool: &'static [u32],
}

impl VipDef {
    pub fn key(&self) -> VipKey {
        let (family, addr) = addr_from_ip(self.addr);
        VipKey {
            addr,
            port: self.port.to_be(),
            proto: self.proto,
            family,
        }
    }

    pub fn ring_offset(&self) -> u32 {
        self.id * RING_STRIDE
    }

    pub fn ring_size(&self) -> u32 {
        if self.pool.is_empty() { 0 } else { RING_SIZE }
    }

    pub fn info(&self) -> VipInfo {
        VipInfo {
            id: self.id,
            ring_offset: self.ring_offset(),
            ring_size: self.ring_size(),
            flags: self.flags,
            generation: 0,
        }
    }

    pub fn family(&self) -> u8 {
        if self.addr.is_ipv4() {
            FAMILY_V4
        } else {
            FAMILY_V6
        }
    }
}

/// The ring the standard world writes for a pool: every backend gets
/// about the same share of slots, in a scrambled order so that a test
/// cannot pass by accident with `slot % pool.len()`.
pub fn ring_for(pool: &[u32], size: u32) -> Vec<u32> {
    (0..size)
        .map(|slot| pool[((slot * 17 + 3) % size) as usize % pool.len()])
        .collect()
}

const VIP_A_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 2, 10));
const VIP_B_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 2, 20));
const VIP_A_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0xdb8, 0xf, 0, 0, 0, 0, 0x10));
const VIP_B_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0xdb8, 0xf, 0, 0, 0, 0, 0x20));

/// TCP port 80 on 198.18.2.10, IPv4 backends.
pub const WEB_V4: VipDef = VipDef {
    name: "web-v4",
    id: 0,
    addr: VIP_A_V4,
    port: 80,
    proto: PROTO_TCP,
    flags: 0,
    pool: POOL_V4,
};
/// UDP port 53 on the same address as [`WEB_V4`].
pub const DNS_V4: VipDef = VipDef {
    name: "dns-v4",
    id: 1,
    addr: VIP_A_V4,
    port: 53,
    proto: PROTO_UDP,
    flags: 0,
    pool: POOL_V4,
};
/// TCP port 443 on fd00:db8:f::10, IPv6 backends.
pub const WEB_V6: VipDef = VipDef {
    name: "web-v6",
    id: 2,
    addr: VIP_A_V6,
    port: 443,
    proto: PROTO_TCP,
    flags: 0,
    pool: POOL_V6,
};
/// Every TCP port of 198.18.2.20 (port 0: the wildcard).
pub const ANY_TCP_V4: VipDef = VipDef {
    name: "any-tcp-v4",
    id: 3,
    addr: VIP_B_V4,
    port: 0,
    proto: PROTO_TCP,
    flags: 0,
    pool: POOL_V4,
};
/// Every UDP port of 198.18.2.20.
pub const ANY_UDP_V4: VipDef = VipDef {
    name: "any-udp-v4",
    id: 4,
    addr: VIP_B_V4,
    port: 0,
    proto: PROTO_UDP,
    flags: 0,
    pool: POOL_V4,
};
/// TCP port 8443 of 198.18.2.20: a port-specific VIP on a wildcard's address,
/// served by backend 5 alone.
pub const PINNED_V4: VipDef = VipDef {
    name: "pinned-v4",
    id: 5,
    addr: VIP_B_V4,
    port: 8443,
    proto: PROTO_TCP,
    flags: 0,
    pool: PINNED_POOL,
};
/// Every UDP port of fd00:db8:f::20.
pub const ANY_UDP_V6: VipDef = VipDef {
    name: "any-udp-v6",
    id: 6,
    addr: VIP_B_V6,
    port: 0,
    proto: PROTO_UDP,
    flags: 0,
    pool: POOL_V6,
};
/// TCP port 80 on 198.18.2.30, hashed on the client address only.
pub const AFFINITY_V4: VipDef = VipDef {
    name: "affinity-v4",
    id: 7,
    addr: IpAddr::V4(Ipv4Addr::new(198, 18, 2, 30)),
    port: 80,
    proto: PROTO_TCP,
    flags: VIP_F_CLIENT_AFFINITY,
    pool: POOL_V4,
};
/// TCP port 80 on 198.18.2.40, without a ring.
pub const NO_RING_V4: VipDef = VipDef {
    name: "no-ring-v4",
    id: 8,
    addr: IpAddr::V4(Ipv4Addr::new(198, 18, 2, 40)),
    port: 80,
    proto: PROTO_TCP,
    flags: 0,
    pool: &[],
};
/// TCP port 80 on 198.18.2.50, served by the IPv6 backends (4in6).
pub const V4_OVER_V6: VipDef = VipDef {
    name: "v4-over-v6",
    id: 9,
    addr: IpAddr::V4(Ipv4Addr::new(198, 18, 2, 50)),
    port: 80,
    proto: PROTO_TCP,
    flags: 0,
    pool: POOL_V6,
};

pub const VIPS: [VipDef; 10] = [
    WEB_V4,
    DNS_V4,
    WEB_V6,
    ANY_TCP_V4,
    ANY_UDP_V4,
    PINNED_V4,
    ANY_UDP_V6,
    AFFINITY_V4,
    NO_RING_V4,
    V4_OVER_V6,
];

/// Whether some VIP of the standard world is on this address.
pub fn is_vip_address(addr: IpAddr) -> bool {
    VIPS.iter().any(|vip| vip.addr == addr)
}

/// The VIP address prefilter the controller derives from the standard
/// world (the same `VipFilter` code the kernel reads): a destination whose
/// bit is clear is rejected before its transport header is looked at.
pub fn vip_filter() -> VipFilter {
    let mut filter = VipFilter::default();
    for vip in VIPS {
        filter.insert(&addr_from_ip(vip.addr).1);
    }
    filter
}
