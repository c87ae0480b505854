//! Step 6: where the encapsulated packet leaves. The controller keeps each
//! backend's next hop in `NEXTHOPS`, resolved from the kernel's routes and
//! neighbours; asking the FIB from here costs more than the rest of the
//! packet path, so it is only the fallback for a missing or stale entry.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{Backend, Counter, FAMILY_V4, NEXTHOP_F_VALID, SETTINGS_F_GATEWAY_MAC, Settings};

use crate::{
    counters::count,
    maps::{NEXTHOPS, array_get},
};

/// The kernel's AF_INET / AF_INET6, which the FIB helper takes.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

pub struct Route {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

pub enum Exit {
    Via(Route),
    /// The way out takes outer packets of at most `mtu` bytes.
    TooBig {
        mtu: u32,
    },
}

/// The way out for `outer_len` bytes of IP packet to `backend`.
/// `our_mac` is the frame's destination MAC, the source of last resort.
#[inline(always)]
pub fn resolve(
    ctx: &XdpContext,
    backend_id: u32,
    backend: &Backend,
    outer_len: u32,
    settings: &Settings,
    our_mac: [u8; 6],
) -> Result<Exit, Counter> {
    if let Some(hop) = array_get(&NEXTHOPS, backend_id)
        && hop.flags & NEXTHOP_F_VALID != 0
    {
        if outer_len > hop.mtu {
            return Ok(Exit::TooBig { mtu: hop.mtu });
        }
        return Ok(Exit::Via(Route {
            ifindex: hop.ifindex,
            smac: hop.smac,
            dmac: hop.dmac,
        }));
    }
    count(Counter::FibLookup);
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: `bpf_fib_lookup` is a plain C struct of integers and unions
    // of integers, for which all-zero bytes are a valid value.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = if backend.family == FAMILY_V4 {
        AF_INET
    } else {
        AF_INET6
    };
    params.ifindex = ingress;
    params.__bindgen_anon_1.tot_len = outer_len as u16;
    if backend.family == FAMILY_V4 {
        params.__bindgen_anon_4.ipv4_dst = backend.addr[0];
    } else {
        params.__bindgen_anon_4.ipv6_dst = backend.addr;
    }
    // SAFETY: the helper reads and writes `params`, a live local of the
    // size passed; `ctx.ctx` is the program's own context.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut params,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(Exit::Via(Route {
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
        })),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Ok(Exit::TooBig {
            // SAFETY: on FRAG_NEEDED the helper stores the route's MTU in
            // this member of the union it read `tot_len` from.
            mtu: u32::from(unsafe { params.__bindgen_anon_1.mtu_result }),
        }),
        _ if settings.flags & SETTINGS_F_GATEWAY_MAC != 0 => {
            count(Counter::GatewayFallback);
            Ok(Exit::Via(Route {
                ifindex: ingress,
                smac: our_mac,
                dmac: settings.gateway_mac,
            }))
        }
        _ => Err(Counter::DropNoRoute),
    }
}
