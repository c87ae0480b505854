//! Step 3: the connection table, so that a flow keeps its backend when the
//! ring changes under it, and an established flow is forwarded without
//! looking its VIP up at all.
//!
//! A set-associative table in one array (see `lb_common::FlowSet`): each CPU
//! owns its own range of sets, so lookups and inserts are an inlined array
//! access and a few stores, with no lock and no contention. (An LRU hash map
//! costs a lock-taking allocation per new flow, several times the rest of
//! the packet path.)

use aya_ebpf::helpers::generated::bpf_get_smp_processor_id;
use lb_common::{FLOW_WAYS, FlowEntry, FlowKey, FlowSet, VipInfo};

use crate::maps::{CONNTRACK, VIP_LIVE, array_get};

/// This CPU's set for a flow hash; `None` if the table has no sets for this
/// CPU (more CPUs than the table was sized for).
#[inline(always)]
pub fn set_for(hash: u32, mask: u32) -> Option<*mut FlowSet> {
    // SAFETY: a helper without arguments or side effects.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    CONNTRACK.get_ptr_mut(
        cpu.wrapping_mul(mask.wrapping_add(1))
            .wrapping_add(hash & mask),
    )
}

/// A flow the table knows, for a VIP that is still programmed.
pub struct Known {
    pub backend_id: u32,
    pub vip_id: u32,
}

/// The entry for `flow` in `set`, marked most recently used.
#[inline(always)]
pub fn lookup(set: *mut FlowSet, flow: &FlowKey) -> Option<Known> {
    // SAFETY: `set` points into this CPU's own range of the array, which no
    // other CPU writes; userspace only ever clears whole sets.
    let set = unsafe { &mut *set };
    let mut way = 0;
    while way < FLOW_WAYS {
        if set.ways[way].key == *flow {
            set.clock = set.clock.wrapping_add(1);
            let entry = &mut set.ways[way];
            entry.last_used = set.clock;
            let live = array_get(&VIP_LIVE, entry.vip_id)?;
            if live == 0 || live != entry.vip_generation {
                return None;
            }
            return Some(Known {
                backend_id: entry.backend_id,
                vip_id: entry.vip_id,
            });
        }
        way += 1;
    }
    None
}

/// Records `flow` in `set`: over its own old entry, else in an empty way,
/// else over the least recently used one. Returns whether a live flow was
/// evicted.
#[inline(always)]
pub fn record(set: *mut FlowSet, flow: &FlowKey, vip: &VipInfo, backend_id: u32) -> bool {
    // SAFETY: as in `lookup`.
    let set = unsafe { &mut *set };
    let mut victim = 0;
    let mut way = 0;
    while way < FLOW_WAYS {
        let entry = &set.ways[way];
        if entry.key == *flow || entry.key.family == 0 {
            victim = way;
            break;
        }
        if entry.last_used.wrapping_sub(set.ways[victim].last_used) > u32::MAX / 2 {
            victim = way;
        }
        way += 1;
    }
    let old = &set.ways[victim].key;
    let evicted = old.family != 0 && *old != *flow;
    set.clock = set.clock.wrapping_add(1);
    set.ways[victim] = FlowEntry {
        key: *flow,
        backend_id,
        vip_id: vip.id,
        vip_generation: vip.generation,
        last_used: set.clock,
    };
    evicted
}
