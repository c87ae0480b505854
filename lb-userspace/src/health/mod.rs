//! Health probes: xlb checks every backend itself and feeds the result to
//! the reconcile loop, which takes failed backends out of the rings.
//!
//! - [`settings`]: the `probe` tables of a VIP, a cluster or a backend
//!   (each overriding the one above) resolved into one [`ProbeSpec`] per
//!   backend.
//! - [`machine`]: the rise / fall / flapping state machine (pure).
//! - [`probe`]: one TCP, HTTP or UDP probe with its failure [`Reason`].
//! - [`prober`]: the scheduler on tokio (one task per target, a semaphore
//!   bounding the probes in flight, jitter) and the [`HealthBoard`] that
//!   status and metrics read.
//!
//! A probe connects to the backend's own address, or (`via = "vip"`) to
//! the VIP from a socket marked for the backend, which the node's tc
//! egress program (`lb-ebpf/src/probe.rs`) sends through the balancer's
//! tunnel to exactly that backend: the path a client's packets take.
//!
//! Health is keyed by backend address, as the data plane's health channel
//! is: a backend address in several VIPs is one host. Backends with equal
//! probe settings share one probe; when VIPs probe the same address
//! differently, each distinct probe runs, and the address is down while
//! any of them says down (a host that fails one of its checks is taken out
//! everywhere; manual state stays per VIP).

pub mod machine;
pub mod probe;
pub mod prober;
pub mod settings;

use std::fmt;

pub use machine::{Cause, Machine, ProbeState, Thresholds, Transition};
pub use prober::{HealthBoard, HealthSnapshot, LatencyStats, Prober, TargetStatus};
pub use settings::{
    ProbeConfig, ProbeKind, ProbeSettings, ProbeSpec, ProbeTarget, ProbeVia, ViaVip,
};

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// No answer within the probe's timeout (connect, request or reply).
    Timeout,
    /// The connection was refused (TCP RST to the SYN, ICMP port
    /// unreachable for UDP).
    Refused,
    /// The connection was reset after it was established.
    Reset,
    /// No route or no neighbour for the target (ICMP host unreachable).
    Unreachable,
    /// HTTP: a status code outside the accepted ones.
    BadStatus(u16),
    /// HTTP: the body lacks the expected text; UDP: the reply lacks it.
    BodyMismatch,
    /// The server closed the connection without a reply.
    NoReply,
    /// HTTP: the reply is not HTTP/1.x.
    Malformed,
    /// Any other socket error, by its kind.
    Error(String),
}

impl Reason {
    /// A short, stable name, for counters and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Reason::Timeout => "timeout",
            Reason::Refused => "refused",
            Reason::Reset => "reset",
            Reason::Unreachable => "unreachable",
            Reason::BadStatus(_) => "bad_status",
            Reason::BodyMismatch => "body_mismatch",
            Reason::NoReply => "no_reply",
            Reason::Malformed => "malformed",
            Reason::Error(_) => "error",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::BadStatus(code) => write!(f, "bad status {code}"),
            Reason::BodyMismatch => f.write_str("body mismatch"),
            Reason::NoReply => f.write_str("no reply"),
            Reason::Error(kind) => write!(f, "error: {kind}"),
            other => f.write_str(other.name()),
        }
    }
}
