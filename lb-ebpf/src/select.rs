//! Step 4: pick the backend: the connection table's, if it knows the flow
//! and the backend is up, else the VIP's Maglev ring's (and record it).

use lb_common::{
    BACKEND_F_UP, Backend, ConnSlot, Counter, FlowSet, RingPlace, Settings, VIP_F_CLIENT_AFFINITY,
    VipInfo, ring_hash, ring_slot,
};

use crate::{
    conntrack,
    counters::count,
    maps::{BACKENDS, RINGS, array_get},
    parse::Packet,
};

pub struct Selection {
    pub backend_id: u32,
    pub backend: Backend,
    pub vip_id: u32,
    /// The flow took the ring rather than the connection table.
    pub new_flow: bool,
}

/// Where the flow lives in the connection table. Fragments have no place:
/// their key lacks ports, and the ring alone already sends every fragment
/// of a datagram to one backend.
#[derive(Clone, Copy)]
pub struct Tracking {
    set: *mut FlowSet,
    fingerprint: u64,
}

#[inline(always)]
pub fn tracking(pkt: &Packet, flow_hash: u64, settings: &Settings) -> Option<Tracking> {
    if pkt.fragment {
        return None;
    }
    let slot = ConnSlot::of(flow_hash, settings.conntrack_mask);
    let set = conntrack::set_at(slot.set)?;
    Some(Tracking {
        set,
        fingerprint: slot.fingerprint,
    })
}

/// The backend of a flow the table knows. A SYN skips the lookup: it
/// starts a new connection whatever an old entry says.
#[inline(always)]
pub fn established(tracking: Option<Tracking>, pkt: &Packet) -> Option<Selection> {
    if pkt.syn {
        return None;
    }
    let tracking = tracking?;
    let known = conntrack::lookup(tracking.set, tracking.fingerprint)?;
    match programmed_backend(known.backend_id) {
        Some(backend) if backend.flags & BACKEND_F_UP != 0 => {
            count(Counter::ConnHit);
            Some(Selection {
                backend_id: known.backend_id,
                backend,
                vip_id: known.vip_id,
                new_flow: false,
            })
        }
        _ => {
            count(Counter::ConnBackendDown);
            None
        }
    }
}

/// The backend the VIP's ring gives the flow, recorded in its set.
#[inline(always)]
pub fn from_ring(
    vip: &VipInfo,
    pkt: &Packet,
    flow_hash: u64,
    tracking: Option<Tracking>,
    settings: &Settings,
) -> Result<Selection, Counter> {
    count(Counter::ConnMiss);
    let hash = if vip.flags & VIP_F_CLIENT_AFFINITY != 0 {
        pkt.flow.source_hash(settings.hash_seed)
    } else {
        ring_hash(flow_hash)
    };
    if vip.ring_size == 0 {
        return Err(Counter::DropNoBackend);
    }
    // The ring slot and a new flow's set are both random lines of large
    // arrays: loading the set now makes the two cache misses overlap.
    if let Some(tracking) = tracking {
        conntrack::prefetch(tracking.set);
    }
    let backend_id = ring_backend(vip.ring_offset + ring_slot(hash, vip.ring_size))
        .ok_or(Counter::DropNoBackend)?;
    let backend = programmed_backend(backend_id).ok_or(Counter::DropNoBackend)?;
    match tracking {
        Some(tracking) => {
            if conntrack::record(tracking.set, tracking.fingerprint, vip, backend_id) {
                count(Counter::ConnEvicted);
            }
        }
        None if !pkt.fragment => count(Counter::ConnInsertFailed),
        None => {}
    }
    Ok(Selection {
        backend_id,
        backend,
        vip_id: vip.id,
        new_flow: true,
    })
}

/// The backend id in one slot of the ring storage: one lane of one line.
/// The lane is below 32 by construction, so the array access needs no
/// runtime check and the verifier sees an offset within the 64-byte value.
#[inline(always)]
fn ring_backend(slot: u32) -> Option<u32> {
    let place = RingPlace::of(slot);
    let line = RINGS.get(place.line)?;
    line.slots.get(place.lane).map(|id| u32::from(*id))
}

#[inline(always)]
fn programmed_backend(backend_id: u32) -> Option<Backend> {
    array_get(&BACKENDS, backend_id).filter(|backend| backend.family != 0)
}
