//! Step 3: the connection table, so that a flow keeps its backend when the
//! ring changes under it.

use lb_common::{FlowKey, FlowState};

use crate::maps::CONNTRACK;

#[inline(always)]
pub fn lookup(flow: &FlowKey) -> Option<u32> {
    let state = CONNTRACK.get_ptr(flow)?;
    // SAFETY: a non-null pointer from a map lookup points at a live value of
    // the map's value type until the program returns.
    Some(unsafe { (*state).backend_id })
}

/// Records the flow's backend; `false` when the table refused the entry.
#[inline(always)]
pub fn record(flow: &FlowKey, backend_id: u32) -> bool {
    CONNTRACK.insert(flow, FlowState { backend_id }, 0).is_ok()
}
