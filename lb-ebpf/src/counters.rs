//! Per-CPU counters: no atomics, no sharing; userspace sums the CPUs.

use lb_common::{Counter, Traffic};

use crate::maps::{BACKEND_STATS, COUNTERS, VIP_STATS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; nothing
        // else writes it while this program runs on this CPU.
        unsafe { *value += 1 };
    }
}

/// Adds a forwarded packet to its VIP's and backend's traffic.
#[inline(always)]
pub fn forwarded(vip_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    add(VIP_STATS.get_ptr_mut(vip_id), bytes, new_flow);
    add(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_flow);
}

#[inline(always)]
fn add(slot: Option<*mut Traffic>, bytes: u64, new_flow: bool) {
    if let Some(slot) = slot {
        // SAFETY: as in `count`, this CPU's own slot.
        let traffic = unsafe { &mut *slot };
        traffic.packets += 1;
        traffic.bytes += bytes;
        traffic.new_flows += u64::from(new_flow);
    }
}
