//! Step 4: pick the backend, from the connection table if it knows the flow
//! and the backend is up, else from the VIP's Maglev ring.

use lb_common::{BACKEND_F_UP, Backend, Counter, VIP_F_CLIENT_AFFINITY, VipInfo, ring_slot};

use crate::{
    conntrack,
    counters::count,
    maps::{BACKENDS, RINGS, array_get},
    parse::Packet,
};

pub struct Selection {
    pub backend_id: u32,
    pub backend: Backend,
    /// The flow took the ring rather than the connection table.
    pub new_flow: bool,
}

#[inline(always)]
pub fn pick_backend(vip: &VipInfo, pkt: &Packet, seed: u32) -> Result<Selection, Counter> {
    // Fragments skip the table: their key lacks ports, and the ring alone
    // already sends every fragment of a datagram to one backend. A SYN skips
    // the lookup: it starts a new connection whatever an old entry says.
    let track = !pkt.fragment;
    if track
        && !pkt.syn
        && let Some(backend_id) = conntrack::lookup(&pkt.flow)
    {
        if let Some(backend) = programmed_backend(backend_id)
            && backend.flags & BACKEND_F_UP != 0
        {
            count(Counter::ConnHit);
            return Ok(Selection {
                backend_id,
                backend,
                new_flow: false,
            });
        }
        count(Counter::ConnBackendDown);
    }
    count(Counter::ConnMiss);
    let backend_id = from_ring(vip, pkt, seed).ok_or(Counter::DropNoBackend)?;
    let backend = programmed_backend(backend_id).ok_or(Counter::DropNoBackend)?;
    if track && !conntrack::record(&pkt.flow, backend_id) {
        count(Counter::ConnInsertFailed);
    }
    Ok(Selection {
        backend_id,
        backend,
        new_flow: true,
    })
}

#[inline(always)]
fn from_ring(vip: &VipInfo, pkt: &Packet, seed: u32) -> Option<u32> {
    if vip.ring_size == 0 {
        return None;
    }
    let hash = if vip.flags & VIP_F_CLIENT_AFFINITY != 0 {
        pkt.flow.source_hash(seed)
    } else {
        pkt.flow.hash(seed)
    };
    let slot = vip.ring_offset + ring_slot(hash, vip.ring_size);
    array_get(&RINGS, slot)
}

#[inline(always)]
fn programmed_backend(backend_id: u32) -> Option<Backend> {
    array_get(&BACKENDS, backend_id).filter(|backend| backend.family != 0)
}
