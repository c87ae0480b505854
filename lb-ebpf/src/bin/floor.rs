//! Floor programs for the data-plane benchmark: what the balancer's cost is
//! measured against in the same run. `floor_drop` is the fixed cost of a
//! test run; `floor_tx` parses Ethernet, IPv4 and TCP, swaps the MACs and
//! bounces the frame, the least any forwarding XDP program does;
//! `floor_tx_log` is `floor_tx` with a log statement, for the cost of
//! logging that is compiled in but off.
//! `floor_redirect` is the live benchmark's floor: the same parse, then out
//! of another interface through a devmap, as the balancer sends.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::DevMap,
    programs::XdpContext,
};
use lb_ebpf::{
    headers::{ETH_P_IPV4, EthHdr, Ipv4Hdr, TcpHdr},
    packet::{read_at, write_at},
};

#[xdp]
pub fn floor_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[xdp]
pub fn floor_tx(ctx: XdpContext) -> u32 {
    parse_and_bounce(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// `floor_tx` with one aya-log statement per packet: loaded with logging
/// off, the benchmark finds it costs what `floor_tx` costs, which shows the
/// verifier prunes a disabled log statement.
#[xdp]
pub fn floor_tx_log(ctx: XdpContext) -> u32 {
    let action = parse_and_bounce(&ctx).unwrap_or(xdp_action::XDP_PASS);
    aya_log_ebpf::debug!(&ctx, "floor_tx_log: action {}", action);
    action
}

/// Slot 0: the interface `floor_redirect` sends to.
#[map]
static FLOOR_PORT: DevMap = DevMap::with_max_entries(1, 0);

#[xdp]
pub fn floor_redirect(ctx: XdpContext) -> u32 {
    match parse_and_bounce(&ctx) {
        Some(_) => FLOOR_PORT.redirect(0, 0).unwrap_or(xdp_action::XDP_DROP),
        None => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn parse_and_bounce(ctx: &XdpContext) -> Option<u32> {
    let eth: EthHdr = read_at(ctx, 0)?;
    if eth.ether_type != ETH_P_IPV4 {
        return None;
    }
    let ip: Ipv4Hdr = read_at(ctx, size_of::<EthHdr>())?;
    let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
    if ip.proto != lb_common::PROTO_TCP || header_len < size_of::<Ipv4Hdr>() {
        return None;
    }
    let _tcp: TcpHdr = read_at(ctx, size_of::<EthHdr>() + header_len)?;
    let swapped = EthHdr {
        dst: eth.src,
        src: eth.dst,
        ether_type: eth.ether_type,
    };
    write_at(ctx, 0, swapped)?;
    Some(xdp_action::XDP_TX)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
