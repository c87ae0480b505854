//! What the controller's own reconcile step makes of a desired state, for
//! tests that compare it with what a daemon put in the kernel.

use std::collections::BTreeMap;

use xlb::{
    config::NodeConfig,
    reconcile::{Plan, Reconciler},
    state::DesiredState,
};

/// The Maglev rings of the Maglev module over the policy's weights, for
/// `state` on a node configured as `node`, every backend healthy.
pub fn plan(node: &NodeConfig, state: &DesiredState) -> Plan {
    Reconciler::for_node(node)
        .plan(state, &BTreeMap::new())
        .expect("planning the model state")
}
