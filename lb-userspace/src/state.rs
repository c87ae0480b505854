//! The desired state: which VIPs exist, which clusters serve them, which
//! backends each cluster has and with what weights and manual states. It
//! says nothing of health (the prober's) or of rings (computed from both).
//!
//! A config file, the control API and, later, a shared store all produce
//! this one model; everything downstream (policy, Maglev, the data plane)
//! consumes it.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use lb_common::{DEFAULT_RING_SIZE, PROTO_TCP, PROTO_UDP, VipKey, addr_from_ip};

/// Everything the operator asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// By VIP name, unique on the node.
    pub vips: BTreeMap<String, Vip>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// What a VIP's flows hash on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Affinity {
    /// The 5-tuple: every connection is balanced on its own.
    #[default]
    Flow,
    /// The client address: every connection of a client reaches one backend.
    Client,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub name: String,
    pub addr: IpAddr,
    /// 0: every port of `proto`.
    pub port: u16,
    pub proto: Proto,
    /// Slots of the Maglev ring: a prime.
    pub ring_size: u32,
    pub affinity: Affinity,
    /// By cluster name.
    pub clusters: BTreeMap<String, Cluster>,
}

impl Vip {
    pub fn new(name: impl Into<String>, addr: IpAddr, port: u16, proto: Proto) -> Self {
        Self {
            name: name.into(),
            addr,
            port,
            proto,
            ring_size: DEFAULT_RING_SIZE,
            affinity: Affinity::Flow,
            clusters: BTreeMap::new(),
        }
    }

    /// The VIP's key in the data plane's VIP table.
    pub fn key(&self) -> VipKey {
        let (family, addr) = addr_from_ip(self.addr);
        VipKey {
            addr,
            port: self.port.to_be(),
            proto: self.proto.number(),
            family,
        }
    }

    /// Every backend of every cluster, with its cluster.
    pub fn backends(&self) -> impl Iterator<Item = (&Cluster, &Backend)> {
        self.clusters
            .values()
            .flat_map(|cluster| cluster.backends.values().map(move |b| (cluster, b)))
    }
}

/// A group of backends that serves a VIP together: a data centre, a
/// Kubernetes cluster, a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    /// The cluster's share of the VIP's traffic, relative to the other
    /// clusters of its priority.
    pub weight: u32,
    /// 0 is served first; higher levels take what lower ones cannot.
    pub priority: u32,
    /// By backend name, unique within the cluster.
    pub backends: BTreeMap<String, Backend>,
}

impl Cluster {
    pub fn new(name: impl Into<String>, weight: u32, priority: u32) -> Self {
        Self {
            name: name.into(),
            weight,
            priority,
            backends: BTreeMap::new(),
        }
    }
}

/// What the operator says of a backend, whatever its probes say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AdminState {
    /// Takes traffic while healthy.
    #[default]
    Enabled,
    /// No new flows; established flows stay until they end.
    Drained,
    /// Out: no new flows, and its established flows move on.
    Disabled,
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdminState::Enabled => "enabled",
            AdminState::Drained => "drained",
            AdminState::Disabled => "disabled",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    /// Where encapsulated packets go; also the backend's identity in the
    /// Maglev ring, so a ring does not change when a backend is renamed.
    pub addr: IpAddr,
    /// Share within its cluster, relative to the cluster's other backends.
    pub weight: u32,
    pub admin: AdminState,
}

impl Backend {
    pub fn new(name: impl Into<String>, addr: IpAddr, weight: u32) -> Self {
        Self {
            name: name.into(),
            addr,
            weight,
            admin: AdminState::Enabled,
        }
    }
}

/// What the prober says of a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    /// Passing its probes (or not probed).
    #[default]
    Up,
    /// Failing its probes.
    Down,
}
