//! Step 2: is the packet for a VIP, and which one.

use lb_common::{Addr, AddrKey, Counter, FlowKey, VipInfo, VipKey};

use crate::{
    maps::{VIP_ADDRS, VIP_FILTER, VIPS, hash_get},
    parse::{L3, Packet},
};

/// The prefilter: `false` proves the address carries no VIP. One inlined
/// array lookup, so traffic to other hosts pays almost nothing.
#[inline(always)]
pub fn may_be_vip(addr: &Addr) -> bool {
    VIP_FILTER
        .get(0)
        .is_some_and(|filter| filter.may_contain(addr))
}

/// The VIP for (address, port, protocol), else the address's port wildcard.
/// A fragment carries no port, so only a wildcard can match it.
#[inline(always)]
pub fn lookup(flow: &FlowKey) -> Option<VipInfo> {
    let mut key = VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    };
    if key.port != 0
        && let Some(vip) = hash_get(&VIPS, &key)
    {
        return Some(vip);
    }
    key.port = 0;
    hash_get(&VIPS, &key)
}

/// Verdict for a packet the VIP table does not take.
#[inline(always)]
pub fn miss_verdict(pkt: &Packet) -> Counter {
    if pkt.fragment && is_vip_address(&pkt.flow.dst, pkt.flow.family) {
        Counter::DropFragment
    } else {
        Counter::PassNotVip
    }
}

/// Verdict for a packet whose headers do not add up: dropped when it is
/// aimed at a VIP (it must not reach the node's stack as if routed through),
/// left to the kernel otherwise.
#[inline(always)]
pub fn malformed_verdict(l3: &L3) -> Counter {
    if is_vip_address(&l3.dst(), l3.family()) {
        Counter::DropMalformed
    } else {
        Counter::PassMalformed
    }
}

#[inline(always)]
fn is_vip_address(addr: &Addr, family: u8) -> bool {
    let key = AddrKey {
        addr: *addr,
        family,
        _pad: [0; 3],
    };
    hash_get(&VIP_ADDRS, &key).is_some()
}
