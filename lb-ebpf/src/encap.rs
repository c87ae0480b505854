//! Step 5: wrap the client's IP packet in an outer IP header to the backend
//! (IPIP, IPv6-in-IPv4, IPv4-in-IPv6 or IP6IP6, by the two families) and
//! give it the next hop's Ethernet header. The inner packet is not touched.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Backend, Counter, FAMILY_V4, IPV4_HDR_LEN, IPV6_HDR_LEN, OUTER_TTL, Settings};
use lb_ebpf::{
    headers::{ETH_P_IPV4, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_DF, Ipv4Hdr, Ipv6Hdr},
    packet::write_at,
};

use crate::{
    nexthop::Route,
    parse::{L2, Packet},
};

/// Bytes the outer header adds for a backend of this family.
#[inline(always)]
pub fn overhead(backend: &Backend) -> u32 {
    if backend.family == FAMILY_V4 {
        IPV4_HDR_LEN as u32
    } else {
        IPV6_HDR_LEN as u32
    }
}

#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    l2: &L2,
    pkt: &Packet,
    backend: &Backend,
    settings: &Settings,
    route: &Route,
) -> Result<(), Counter> {
    let overhead = overhead(backend);
    // SAFETY: `ctx.ctx` is the program's own context; growing the head
    // invalidates earlier packet pointers, and none is used afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err(Counter::DropEncapFailed);
    }
    let inner_proto = inner_proto(pkt.flow.family == FAMILY_V4);
    let outer_type = if backend.family == FAMILY_V4 {
        ETH_P_IPV4
    } else {
        ETH_P_IPV6
    };
    // A tagged frame leaves with its tag: the backend is on the VLAN the
    // client's packet came in on.
    l2.write_header(ctx, 0, route.dmac, route.smac, outer_type)
        .ok_or(Counter::DropEncapFailed)?;
    let written = if backend.family == FAMILY_V4 {
        write_at(
            ctx,
            l2.len,
            outer_ipv4(pkt.tos, pkt.ip_len, backend, settings, inner_proto),
        )
    } else {
        write_at(
            ctx,
            l2.len,
            outer_ipv6(pkt.tos, pkt.ip_len, backend, settings, inner_proto),
        )
    };
    written.ok_or(Counter::DropEncapFailed)
}

/// The outer header's protocol: what it carries.
#[inline(always)]
pub fn inner_proto(inner_v4: bool) -> u8 {
    if inner_v4 { IPPROTO_IPIP } else { IPPROTO_IPV6 }
}

/// The outer IPv4 header around an inner packet of `ip_len` bytes; the
/// balancer and the probe egress program both write it.
#[inline(always)]
pub fn outer_ipv4(
    tos: u8,
    ip_len: u32,
    backend: &Backend,
    settings: &Settings,
    inner_proto: u8,
) -> Ipv4Hdr {
    let mut hdr = Ipv4Hdr {
        version_ihl: 0x45,
        tos,
        tot_len: ((ip_len + IPV4_HDR_LEN as u32) as u16).to_be(),
        id: 0,
        // Never fragment the outer packet: the MTU check already
        // dropped what would not fit.
        frag_off: IPV4_DF.to_be(),
        ttl: OUTER_TTL,
        proto: inner_proto,
        check: 0,
        src: settings.src_v4,
        dst: backend.addr[0],
    };
    hdr.check = hdr.checksum();
    hdr
}

/// The outer IPv6 header, as [`outer_ipv4`].
#[inline(always)]
pub fn outer_ipv6(
    tos: u8,
    ip_len: u32,
    backend: &Backend,
    settings: &Settings,
    inner_proto: u8,
) -> Ipv6Hdr {
    Ipv6Hdr {
        vcf: (6u32 << 28 | u32::from(tos) << 20).to_be(),
        payload_len: (ip_len as u16).to_be(),
        next_hdr: inner_proto,
        hop_limit: OUTER_TTL,
        src: settings.src_v6,
        dst: backend.addr,
    }
}
