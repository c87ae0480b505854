//! xlb's XDP programs. The balancer reads as its steps: parse, the
//! connection table (a known flow needs nothing else), else look the VIP up
//! and take its ring; then find the next hop (or answer a packet too big
//! for it with ICMP), encapsulate, count, send. Each step lives in its own
//! module and returns either its result or the verdict counter that ends
//! the packet's path.
//! The object also holds the backends' decapsulator (`decap.rs`) and the
//! node's tc egress program for via-VIP health probes (`probe.rs`).
#![no_std]
#![no_main]

mod conntrack;
mod counters;
mod decap;
mod encap;
mod icmp;
mod log;
mod maps;
mod nexthop;
mod parse;
mod probe;
mod select;
mod vip;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::Counter;
use lb_ebpf::packet::frame_len;

use crate::{
    counters::count,
    maps::{SETTINGS, TX_PORTS, array_get},
    nexthop::{Exit, Route},
    parse::TransportError,
};

#[xdp]
pub fn xlb_balancer(ctx: XdpContext) -> u32 {
    let verdict = match balance(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    count(verdict);
    log::verdict(&ctx, verdict);
    match verdict {
        Counter::Tx | Counter::IcmpTooBig => xdp_action::XDP_TX,
        Counter::Redirect => xdp_action::XDP_REDIRECT,
        Counter::PassNotIp | Counter::PassNotVip | Counter::PassMalformed => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

/// `Ok` carries the verdict of a forwarded packet, `Err` that of one that
/// stops here; either way exactly one verdict counter.
#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<Counter, Counter> {
    let l2 = parse::ethernet(ctx).ok_or(Counter::PassMalformed)?;
    let l3 = parse::ip(ctx, &l2)?;
    if !vip::may_be_vip(&l3.dst()) {
        return Err(Counter::PassNotVip);
    }
    let pkt = parse::transport(ctx, &l3).map_err(|err| match err {
        TransportError::NotTransport => Counter::PassNotVip,
        TransportError::Malformed => vip::malformed_verdict(&l3),
    })?;
    let settings = array_get(&SETTINGS, 0).ok_or(Counter::DropNoBackend)?;
    let flow_hash = pkt.flow.hash64(settings.hash_seed);
    let tracking = select::tracking(&pkt, flow_hash, &settings);
    let chosen = match select::established(tracking, &pkt) {
        Some(known) => known,
        None => {
            let vip = vip::lookup(&pkt.flow).ok_or_else(|| vip::miss_verdict(&pkt))?;
            if pkt.fragment {
                count(Counter::Fragment);
            }
            select::from_ring(&vip, &pkt, flow_hash, tracking, &settings)?
        }
    };
    if pkt.ipv4_options {
        count(Counter::Ipv4Options);
    }
    let outer_len = pkt.ip_len + encap::overhead(&chosen.backend);
    if outer_len > u32::from(u16::MAX) {
        return Err(Counter::DropTooBig);
    }
    let route = match nexthop::resolve(
        ctx,
        chosen.backend_id,
        &chosen.backend,
        outer_len,
        &settings,
        l2.eth.dst,
    )? {
        Exit::Via(route) => route,
        Exit::TooBig { mtu } => {
            return icmp::too_big(ctx, &l2, &pkt, mtu, encap::overhead(&chosen.backend));
        }
    };
    let bytes = frame_len(ctx) as u64;
    encap::encapsulate(ctx, &l2, &pkt, &chosen.backend, &settings, &route)?;
    counters::forwarded(chosen.vip_id, chosen.backend_id, bytes, chosen.new_flow);
    send(ctx, &route)
}

/// Out of the ingress interface with XDP_TX, else through the devmap.
#[inline(always)]
fn send(ctx: &XdpContext, route: &Route) -> Result<Counter, Counter> {
    if route.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(Counter::Tx);
    }
    TX_PORTS
        .redirect(route.ifindex, 0)
        .map(|_| Counter::Redirect)
        .map_err(|_| Counter::DropNoRoute)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
