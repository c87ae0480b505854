//! Step 3: the connection table, so that a flow keeps its backend when the
//! ring changes under it, and an established flow is forwarded without
//! looking its VIP up at all.
//!
//! A set-associative table in one array (see `lb_common::FlowSet`): a set
//! is one cache line of four 16-byte entries, kept most recently used
//! first. Lookups and inserts are an inlined array access and a few loads
//! and stores, with no lock. (An LRU hash map costs a lock-taking
//! allocation per new flow, several times the rest of the packet path, and
//! a 40-byte key per entry.)
//!
//! Without a lock, two CPUs may write one set at once. Each entry is
//! written payload first and fingerprint last, with volatile stores that
//! keep that order, so a reader that finds a fingerprint also finds the
//! payload stored with it. What remains: a flow being moved within its set
//! can be missed for an instant (it then takes the ring, which gives the
//! same backend unless the ring just changed), and a set may briefly hold
//! a flow twice. Both need two CPUs on one set at the same moment.

use core::ptr::write_volatile;

use lb_common::{FLOW_WAYS, FlowEntry, FlowSet, VipInfo};

use crate::maps::{CONNTRACK, VIP_LIVE, array_get};

#[inline(always)]
pub fn set_at(index: u32) -> Option<*mut FlowSet> {
    CONNTRACK.get_ptr_mut(index)
}

/// Starts loading the set's cache line. A new flow's set is a random line
/// of a large table, so its load misses the caches; issued early, the miss
/// overlaps other work instead of stalling the insert.
#[inline(always)]
pub fn prefetch(set: *mut FlowSet) {
    // SAFETY: `set` is a live map value; a volatile read is never elided.
    unsafe { core::ptr::read_volatile(&(*set).ways[0].fingerprint) };
}

/// A flow the table knows, for a VIP that is still programmed.
pub struct Known {
    pub backend_id: u32,
    pub vip_id: u32,
}

/// The entry with `fingerprint` in `set`, moved to the front.
#[inline(always)]
pub fn lookup(set: *mut FlowSet, fingerprint: u64) -> Option<Known> {
    // SAFETY: `set` is a live map value for the whole program run; other
    // CPUs may write it concurrently (see the module docs).
    let set = unsafe { &mut *set };
    let mut way = 0;
    while way < FLOW_WAYS {
        let entry = set.ways[way];
        if entry.fingerprint == fingerprint {
            if way != 0 {
                shift_back(set, way);
                store(&mut set.ways[0], entry);
            }
            let live = array_get(&VIP_LIVE, u32::from(entry.vip_id))?;
            if live == 0 || live != u32::from(entry.vip_generation) {
                return None;
            }
            return Some(Known {
                backend_id: u32::from(entry.backend_id),
                vip_id: u32::from(entry.vip_id),
            });
        }
        way += 1;
    }
    None
}

/// Records the flow at the front of `set`, replacing its own old entry, or
/// else pushing the least recently used one out of the back if the set is
/// full. Returns whether a live flow was pushed out.
#[inline(always)]
pub fn record(set: *mut FlowSet, fingerprint: u64, vip: &VipInfo, backend_id: u32) -> bool {
    // SAFETY: as in `lookup`.
    let set = unsafe { &mut *set };
    let mut freed = FLOW_WAYS - 1;
    let mut way = 0;
    while way < FLOW_WAYS {
        let old = set.ways[way].fingerprint;
        if old == fingerprint || old == 0 {
            freed = way;
            break;
        }
        way += 1;
    }
    let old = set.ways[freed].fingerprint;
    shift_back(set, freed);
    store(
        &mut set.ways[0],
        FlowEntry {
            fingerprint,
            backend_id: backend_id as u16,
            vip_id: vip.id as u16,
            vip_generation: vip.generation as u16,
            _pad: 0,
        },
    );
    old != 0 && old != fingerprint
}

/// Moves the ways in front of `way` one place back, over `way`.
#[inline(always)]
fn shift_back(set: &mut FlowSet, way: usize) {
    let mut to = way;
    while to > 0 && to < FLOW_WAYS {
        let moved = set.ways[to - 1];
        store(&mut set.ways[to], moved);
        to -= 1;
    }
}

#[inline(always)]
fn store(slot: &mut FlowEntry, entry: FlowEntry) {
    // SAFETY: `slot` is a valid, aligned field of a live map value; the
    // volatile stores keep the fingerprint last.
    unsafe {
        write_volatile(&mut slot.backend_id, entry.backend_id);
        write_volatile(&mut slot.vip_id, entry.vip_id);
        write_volatile(&mut slot.vip_generation, entry.vip_generation);
        write_volatile(&mut slot.fingerprint, entry.fingerprint);
    }
}
