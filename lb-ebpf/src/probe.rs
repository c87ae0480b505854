//! The xlb node's tc egress program: via-VIP health probes.
//!
//! A probe that must reach a backend the way a client does connects to the
//! VIP from a socket marked `PROBE_MARK_BASE | backend id`. The kernel
//! routes it to the VIP like any packet of the node; here, on its way out,
//! it is wrapped in the same outer header the balancer would put around a
//! client's packet for that backend and sent to the backend's next hop.
//! The backend's decapsulator strips the header, its server on the VIP
//! answers the node directly (DSR), and the answer, to no VIP, passes the
//! balancer up to the probe's socket.
//!
//! Steps, as the balancer's: mark lookup, parse, next hop, encapsulate,
//! send. The next hop is the backend's `NEXTHOPS` entry; while it has no
//! valid one (a backend just added, before the controller resolved it),
//! the FIB gives the interface and `bpf_redirect_neigh` lets the kernel
//! find (and if need be resolve) the neighbour, so that even a backend's
//! first probe leaves. The mark is cleared once the packet is
//! encapsulated: where it is sent on, this program runs again (the same
//! interface, or another the balancer is on) and must let it pass.
//! Every marked packet moves exactly one `Probe*` verdict counter;
//! packets without xlb's mark leave untouched and uncounted (this runs on
//! every packet the node itself sends, never on balanced traffic, which
//! XDP transmits without the stack).
//!
//! The packet is read and written with the skb load and store helpers, which
//! bound-check in the kernel: after `bpf_skb_adjust_room` no packet pointer
//! needs revalidating.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_FIB_LOOKUP_SKIP_NEIGH, TC_ACT_OK,
        TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    Backend, Counter, FAMILY_V4, IPV6_HDR_LEN, NEXTHOP_F_VALID, NextHop, PROBE_MARK_BASE,
    PROBE_MARK_MASK, Settings,
};
use lb_ebpf::headers::{ETH_P_IPV4, ETH_P_IPV6, EthHdr, Ipv4Hdr, Ipv6Hdr};

use crate::{
    counters::count,
    encap::{inner_proto, outer_ipv4, outer_ipv6, overhead},
    maps::{BACKENDS, NEXTHOPS, SETTINGS, array_get},
};

const ETH_LEN: usize = size_of::<EthHdr>();

/// The kernel's AF_INET / AF_INET6, which the FIB helper takes.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// How an encapsulated probe leaves.
enum Way {
    /// The backend's `NEXTHOPS` entry: its MACs, out of its interface.
    Hop(NextHop),
    /// Out of the interface the FIB gave, the kernel's neighbour table
    /// filling in the MACs.
    Neighbour { ifindex: u32 },
}

#[classifier]
pub fn xlb_probe_egress(ctx: TcContext) -> i32 {
    // SAFETY: reads a field of the program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & PROBE_MARK_MASK != PROBE_MARK_BASE {
        return TC_ACT_OK;
    }
    match probe(&ctx, mark & !PROBE_MARK_MASK) {
        Ok(action) => {
            count(Counter::ProbeEncap);
            action
        }
        Err(verdict) => {
            count(verdict);
            TC_ACT_SHOT
        }
    }
}

/// What the outer header needs of the probe's own IP packet.
struct Inner {
    family_v4: bool,
    /// IP packet length by its header.
    ip_len: u32,
    tos: u8,
}

/// `Ok` carries the tc action of a packet sent on, `Err` the verdict of
/// one dropped.
#[inline(always)]
fn probe(ctx: &TcContext, backend_id: u32) -> Result<i32, Counter> {
    // A backend is probed whatever its health or admin state: a down
    // backend's probes are what bring it back.
    let backend = array_get(&BACKENDS, backend_id)
        .filter(|backend| backend.family != 0)
        .ok_or(Counter::ProbeDropNoBackend)?;
    let inner = parse(ctx)?;
    let overhead = overhead(&backend);
    let way = next_hop(ctx, backend_id, &backend, inner.ip_len + overhead)?;
    let settings = array_get(&SETTINGS, 0).ok_or(Counter::ProbeDropEncapFailed)?;
    encapsulate(ctx, &inner, &backend, &settings, &way, overhead)?;
    ctx.set_mark(0);
    Ok(send(ctx, &way))
}

/// The probe's IP header, right behind the Ethernet header the stack gave
/// it for its route to the VIP.
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Inner, Counter> {
    let eth: EthHdr = ctx.load(0).map_err(|_| Counter::ProbeDropMalformed)?;
    let inner = if eth.ether_type == ETH_P_IPV4 {
        let hdr: Ipv4Hdr = ctx.load(ETH_LEN).map_err(|_| Counter::ProbeDropMalformed)?;
        if hdr.version_ihl >> 4 != 4 {
            return Err(Counter::ProbeDropMalformed);
        }
        Inner {
            family_v4: true,
            ip_len: u32::from(u16::from_be(hdr.tot_len)),
            tos: hdr.tos,
        }
    } else if eth.ether_type == ETH_P_IPV6 {
        let hdr: Ipv6Hdr = ctx.load(ETH_LEN).map_err(|_| Counter::ProbeDropMalformed)?;
        Inner {
            family_v4: false,
            ip_len: IPV6_HDR_LEN as u32 + u32::from(u16::from_be(hdr.payload_len)),
            tos: hdr.traffic_class(),
        }
    } else {
        return Err(Counter::ProbeDropMalformed);
    };
    if inner.ip_len as usize + ETH_LEN > ctx.len() as usize {
        return Err(Counter::ProbeDropMalformed);
    }
    Ok(inner)
}

/// The backend's next-hop entry, as the controller resolved it, else the
/// FIB's way to the backend. A probe that cannot leave fails like one the
/// backend does not answer.
#[inline(always)]
fn next_hop(
    ctx: &TcContext,
    backend_id: u32,
    backend: &Backend,
    outer_len: u32,
) -> Result<Way, Counter> {
    // SAFETY: reads a field of the program's own context.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    // A GSO packet is cut to the MTU later, its segments shrunk by the
    // outer header (`bpf_skb_adjust_room` without FIXED_GSO).
    let checked_len = if gso { 0 } else { outer_len };
    if let Some(hop) = array_get(&NEXTHOPS, backend_id)
        && hop.flags & NEXTHOP_F_VALID != 0
    {
        if checked_len > hop.mtu {
            return Err(Counter::ProbeDropTooBig);
        }
        return Ok(Way::Hop(hop));
    }
    count(Counter::FibLookup);
    // SAFETY: `bpf_fib_lookup` is a plain C struct of integers and unions
    // of integers, for which all-zero bytes are a valid value.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    if backend.family == FAMILY_V4 {
        params.family = AF_INET;
        params.__bindgen_anon_4.ipv4_dst = backend.addr[0];
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_4.ipv6_dst = backend.addr;
    }
    // SAFETY: reads a field of the program's own context.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_1.tot_len = checked_len as u16;
    // SAFETY: the helper reads and writes `params`, a live local of the
    // size passed; the context is the program's own.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT | BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(Way::Neighbour {
            ifindex: params.ifindex,
        }),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Counter::ProbeDropTooBig),
        _ => Err(Counter::ProbeDropNoRoute),
    }
}

/// Inserts the outer header between the Ethernet header and the probe's
/// IP packet, then writes both headers: the same outer header the balancer
/// writes (`encap.rs`), the Ethernet addresses of the next hop.
#[inline(always)]
fn encapsulate(
    ctx: &TcContext,
    inner: &Inner,
    backend: &Backend,
    settings: &Settings,
    way: &Way,
    overhead: u32,
) -> Result<(), Counter> {
    let outer_v4 = backend.family == FAMILY_V4;
    let flags = if outer_v4 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    };
    ctx.adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, u64::from(flags))
        .map_err(|_| Counter::ProbeDropEncapFailed)?;
    let inner_proto = inner_proto(inner.family_v4);
    // Without a next-hop entry the kernel writes the addresses when it
    // sends the packet; it only asks that the destination not be multicast.
    let (dst, src) = match way {
        Way::Hop(hop) => (hop.dmac, hop.smac),
        Way::Neighbour { .. } => ([0; 6], [0; 6]),
    };
    let eth = EthHdr {
        dst,
        src,
        ether_type: if outer_v4 { ETH_P_IPV4 } else { ETH_P_IPV6 },
    };
    ctx.store(0, &eth, 0)
        .map_err(|_| Counter::ProbeDropEncapFailed)?;
    let written = if outer_v4 {
        let hdr = outer_ipv4(inner.tos, inner.ip_len, backend, settings, inner_proto);
        ctx.store(ETH_LEN, &hdr, 0)
    } else {
        let hdr = outer_ipv6(inner.tos, inner.ip_len, backend, settings, inner_proto);
        ctx.store(ETH_LEN, &hdr, 0)
    };
    written.map_err(|_| Counter::ProbeDropEncapFailed)
}

/// Out of this interface when the next hop is on it, else redirected to
/// the next hop's; without an entry, to the FIB's interface through the
/// neighbour table.
#[inline(always)]
fn send(ctx: &TcContext, way: &Way) -> i32 {
    match way {
        Way::Hop(hop) => {
            // SAFETY: reads a field of the program's own context.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            if hop.ifindex == ifindex {
                return TC_ACT_OK;
            }
            // SAFETY: a helper call with plain integer arguments; it only
            // records the target for when the program returns.
            unsafe { bpf_redirect(hop.ifindex, 0) as i32 }
        }
        // SAFETY: as above; no parameters: the kernel routes the packet's
        // (outer) destination out of `ifindex` and resolves its neighbour.
        Way::Neighbour { ifindex } => unsafe {
            bpf_redirect_neigh(*ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
    }
}
