//! Debug log lines (aya-log), off unless the controller turns them on.
//!
//! Every statement is guarded by aya-log's `AYA_LOG_LEVEL`, a read-only
//! global the controller sets when it loads the program (`node.xdp_log`,
//! `xlb run --xdp-log`; 0 = off, the default). The verifier sees its value
//! as a constant and removes the branches it rules out, so a level that is
//! off costs no instruction per packet (`cargo xtask bench dataplane`
//! measures it). On, each line is a ring-buffer record the daemon relays to
//! its own log: for chasing one flow, not for line rate.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::debug;
use lb_common::Counter;

/// The verdict that ended a packet's path.
#[inline(always)]
pub fn verdict(ctx: &XdpContext, verdict: Counter) {
    debug!(ctx, "verdict {}", verdict.name());
}
