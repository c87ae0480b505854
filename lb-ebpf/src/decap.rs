//! The backend side: strips the outer header of IPIP, IPv6-in-IPv4,
//! IPv4-in-IPv6 and IP6IP6 packets addressed to one of this host's tunnel
//! endpoints (`DECAP_ADDRS`) and passes the client's packet up the stack, so
//! that a backend needs no tunnel device.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_head, macros::xdp,
    programs::XdpContext,
};
use lb_common::{AddrKey, Counter, FAMILY_V4, FAMILY_V6};
use lb_ebpf::{
    headers::{
        ETH_P_IPV4, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_MF, IPV4_OFFSET_MASK, Ipv4Hdr,
        Ipv6Hdr,
    },
    packet::read_at,
};

use crate::{
    counters::count,
    maps::{DECAP_ADDRS, hash_get},
    parse,
};

#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    let verdict = match decap(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    count(verdict);
    match verdict {
        Counter::DecapDropMalformed => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

struct Tunnel {
    /// Outer header length.
    outer_len: usize,
    /// EtherType of the inner packet.
    inner_type: u16,
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Result<Counter, Counter> {
    let l2 = parse::ethernet(ctx).ok_or(Counter::DecapPassNotTunnel)?;
    let tunnel = outer_header(ctx, &l2)?;
    // The inner header must be there: a backend must not receive half a
    // packet dressed as a whole one.
    let inner_ok = if tunnel.inner_type == ETH_P_IPV4 {
        read_at::<Ipv4Hdr>(ctx, l2.len + tunnel.outer_len).is_some_and(|h| h.version_ihl >> 4 == 4)
    } else {
        read_at::<Ipv6Hdr>(ctx, l2.len + tunnel.outer_len)
            .is_some_and(|h| u32::from_be(h.vcf) >> 28 == 6)
    };
    if !inner_ok {
        return Err(Counter::DecapDropMalformed);
    }
    // The Ethernet header moves forward over the outer IP header, then the
    // head follows it.
    let new_start = tunnel.outer_len;
    l2.write_header(ctx, new_start, l2.eth.dst, l2.eth.src, tunnel.inner_type)
        .ok_or(Counter::DecapDropMalformed)?;
    // SAFETY: `ctx.ctx` is the program's own context; no packet pointer is
    // used after the head moves.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, new_start as i32) } != 0 {
        return Err(Counter::DecapDropMalformed);
    }
    Ok(Counter::DecapOk)
}

/// The outer header, if this is a tunnel packet to one of our endpoints.
#[inline(always)]
fn outer_header(ctx: &XdpContext, l2: &parse::L2) -> Result<Tunnel, Counter> {
    let (key, proto, outer_len, fragment) = if l2.ether_type == ETH_P_IPV4 {
        let hdr: Ipv4Hdr = read_at(ctx, l2.len).ok_or(Counter::DecapPassNotTunnel)?;
        let header_len = usize::from(hdr.version_ihl & 0x0f) * 4;
        if header_len < size_of::<Ipv4Hdr>() {
            return Err(Counter::DecapPassNotTunnel);
        }
        (
            AddrKey {
                addr: [hdr.dst, 0, 0, 0],
                family: FAMILY_V4,
                _pad: [0; 3],
            },
            hdr.proto,
            header_len,
            u16::from_be(hdr.frag_off) & (IPV4_MF | IPV4_OFFSET_MASK) != 0,
        )
    } else if l2.ether_type == ETH_P_IPV6 {
        let hdr: Ipv6Hdr = read_at(ctx, l2.len).ok_or(Counter::DecapPassNotTunnel)?;
        (
            AddrKey {
                addr: hdr.dst,
                family: FAMILY_V6,
                _pad: [0; 3],
            },
            hdr.next_hdr,
            size_of::<Ipv6Hdr>(),
            false,
        )
    } else {
        return Err(Counter::DecapPassNotTunnel);
    };
    let inner_type = match proto {
        IPPROTO_IPIP => ETH_P_IPV4,
        IPPROTO_IPV6 => ETH_P_IPV6,
        _ => return Err(Counter::DecapPassNotTunnel),
    };
    if hash_get(&DECAP_ADDRS, &key).is_none() {
        return Err(Counter::DecapPassNotTunnel);
    }
    // A fragment holds part of an inner packet at most, and this host has
    // no tunnel device to reassemble it for.
    if fragment {
        return Err(Counter::DecapDropMalformed);
    }
    Ok(Tunnel {
        outer_len,
        inner_type,
    })
}
