//! Owns the loaded XDP object: load, attach, detach, and one typed owner per
//! map (see [`maps`]). Nothing else in xlb touches a BPF map.

pub mod maps;
pub mod nexthop;

use std::{collections::BTreeMap, ffi::CString};

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_RING_CAPACITY, MAX_IDS,
    NextHop, map_names, program_names,
};

pub use self::maps::{
    BackendTable, ConnGeometry, ConnTable, CounterReader, DecapTable, NextHopTable, RingTable,
    SettingsTable, TxPorts, VipTable,
};

/// The XDP object built from `lb-ebpf` by this crate's build script.
pub static XDP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-dataplane"));

/// Floor programs for the benchmarks, built alongside the data plane.
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-floor"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("map TX_PORTS: {0}")]
    TxPort(#[source] Box<aya::maps::xdp::XdpMapError>),
    #[error("the XDP object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("VIP id {id} is already used by {by}")]
    VipIdInUse { id: u32, by: String },
    #[error("no interface named {0:?}")]
    UnknownInterface(String),
    #[error("{program} is not attached to {interface}")]
    NotAttached {
        program: &'static str,
        interface: String,
    },
    #[error(
        "attaching to {interface}: native mode refused ({native}), generic mode too ({generic})"
    )]
    AttachRefused {
        interface: String,
        native: Box<ProgramError>,
        generic: Box<ProgramError>,
    },
    #[error("{what}: {value} is out of range (at most {limit})")]
    OutOfRange {
        what: &'static str,
        value: u64,
        limit: u64,
    },
}

impl DataplaneError {
    pub(crate) fn map(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| Self::Map {
            name,
            source: Box::new(source),
        }
    }
}

/// Map sizes fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_vips: u32,
    pub max_backends: u32,
    /// Slots of ring storage shared by all VIPs.
    pub ring_capacity: u32,
    /// Connection-table flows, rounded down to a power of two (see
    /// `lb_common::FlowSet`).
    pub conntrack_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_vips: DEFAULT_MAX_VIPS,
            max_backends: DEFAULT_MAX_BACKENDS,
            ring_capacity: DEFAULT_RING_CAPACITY,
            conntrack_size: DEFAULT_CONNTRACK_SIZE,
        }
    }
}

/// How to attach a program to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// In the driver, before any socket buffer exists: the fast path.
    Native,
    /// In the generic network stack: works on any device, slower.
    Generic,
    /// Native where the driver supports it, generic otherwise.
    Auto,
}

/// Which of the two XDP programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The load balancer, on an xlb node's interfaces.
    Balancer,
    /// The decapsulator, on a backend host's interfaces.
    Decap,
}

impl Role {
    pub fn program_name(self) -> &'static str {
        match self {
            Role::Balancer => program_names::BALANCER,
            Role::Decap => program_names::DECAP,
        }
    }
}

/// The loaded object and the owners of its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    links: BTreeMap<(Role, String), (XdpLinkId, AttachMode)>,
    pub vips: VipTable,
    pub rings: RingTable,
    pub backends: BackendTable,
    pub nexthops: NextHopTable,
    pub settings: SettingsTable,
    pub conntrack: ConnTable,
    pub tx_ports: TxPorts,
    pub decap: DecapTable,
    pub counters: CounterReader,
}

impl Dataplane {
    /// Loads both programs into the kernel (the verifier runs here) with the
    /// given map sizes, and takes ownership of every map.
    pub fn load(limits: Limits) -> Result<Self, DataplaneError> {
        for (what, value) in [
            ("max_vips", limits.max_vips),
            ("max_backends", limits.max_backends),
        ] {
            if value == 0 || value > MAX_IDS {
                return Err(DataplaneError::OutOfRange {
                    what,
                    value: value.into(),
                    limit: MAX_IDS.into(),
                });
            }
        }
        let geometry = ConnGeometry::for_flows(limits.conntrack_size);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::VIPS, limits.max_vips)
            .map_max_entries(map_names::VIP_ADDRS, limits.max_vips)
            .map_max_entries(map_names::VIP_LIVE, limits.max_vips)
            .map_max_entries(map_names::VIP_STATS, limits.max_vips)
            .map_max_entries(map_names::RINGS, limits.ring_capacity)
            .map_max_entries(map_names::BACKENDS, limits.max_backends)
            .map_max_entries(map_names::NEXTHOPS, limits.max_backends)
            .map_max_entries(map_names::BACKEND_STATS, limits.max_backends)
            .map_max_entries(map_names::CONNTRACK, geometry.sets)
            .load(XDP_OBJECT)
            .map_err(|err| DataplaneError::Load(Box::new(err)))?;
        for role in [Role::Balancer, Role::Decap] {
            xdp_program(&mut ebpf, role.program_name())?
                .load()
                .map_err(|source| DataplaneError::Program {
                    name: role.program_name(),
                    source,
                })?;
        }
        Ok(Self {
            vips: VipTable::new(&mut ebpf, limits)?,
            rings: RingTable::new(&mut ebpf, limits)?,
            backends: BackendTable::new(&mut ebpf)?,
            nexthops: NextHopTable::new(&mut ebpf)?,
            settings: SettingsTable::new(&mut ebpf, geometry)?,
            conntrack: ConnTable::new(&mut ebpf, geometry)?,
            tx_ports: TxPorts::new(&mut ebpf)?,
            decap: DecapTable::new(&mut ebpf)?,
            counters: CounterReader::new(&mut ebpf)?,
            links: BTreeMap::new(),
            ebpf,
        })
    }

    /// The loaded program, e.g. to run it on a test packet.
    pub fn program(&self, role: Role) -> Result<&Xdp, DataplaneError> {
        let name = role.program_name();
        self.ebpf
            .program(name)
            .and_then(|program| program.try_into().ok())
            .ok_or(DataplaneError::Missing {
                kind: "XDP program",
                name,
            })
    }

    /// Attaches `role`'s program to `interface` (in the calling thread's
    /// network namespace) and returns the mode it got: with `Auto`, native
    /// where the driver takes it, generic otherwise.
    pub fn attach(
        &mut self,
        role: Role,
        interface: &str,
        mode: AttachMode,
    ) -> Result<AttachMode, DataplaneError> {
        let ifindex = interface_index(interface)?;
        let name = role.program_name();
        let program = xdp_program(&mut self.ebpf, name)?;
        let attached = match mode {
            AttachMode::Native | AttachMode::Generic => {
                let xdp_mode = if mode == AttachMode::Native {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                program
                    .attach_to_if_index(ifindex, xdp_mode)
                    .map(|link| (link, mode))
                    .map_err(|source| DataplaneError::Program { name, source })?
            }
            AttachMode::Auto => match program.attach_to_if_index(ifindex, XdpMode::Driver) {
                Ok(link) => (link, AttachMode::Native),
                Err(native) => match program.attach_to_if_index(ifindex, XdpMode::Skb) {
                    Ok(link) => {
                        log::warn!(
                            "{interface}: native XDP refused ({native}); attached in generic mode"
                        );
                        (link, AttachMode::Generic)
                    }
                    Err(generic) => {
                        return Err(DataplaneError::AttachRefused {
                            interface: interface.to_owned(),
                            native: Box::new(native),
                            generic: Box::new(generic),
                        });
                    }
                },
            },
        };
        let got = attached.1;
        self.links.insert((role, interface.to_owned()), attached);
        Ok(got)
    }

    /// Takes `role`'s program off `interface`.
    pub fn detach(&mut self, role: Role, interface: &str) -> Result<(), DataplaneError> {
        let name = role.program_name();
        let (link, _) = self
            .links
            .remove(&(role, interface.to_owned()))
            .ok_or_else(|| DataplaneError::NotAttached {
                program: name,
                interface: interface.to_owned(),
            })?;
        xdp_program(&mut self.ebpf, name)?
            .detach(link)
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Applies a next-hop resolution for a backend: a usable hop is written
    /// (and its interface made a redirect target), `None` marks the entry
    /// stale so the packet path falls back to the FIB.
    pub fn set_next_hop(
        &mut self,
        backend_id: u32,
        hop: Option<NextHop>,
    ) -> Result<(), DataplaneError> {
        match hop {
            Some(hop) => {
                self.tx_ports.add(hop.ifindex)?;
                self.nexthops.set(backend_id, hop)
            }
            None => self.nexthops.invalidate(backend_id),
        }
    }

    /// Where each program is attached, and in which mode.
    pub fn attachments(&self) -> impl Iterator<Item = (Role, &str, AttachMode)> {
        self.links
            .iter()
            .map(|((role, interface), (_, mode))| (*role, interface.as_str(), *mode))
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .and_then(|program| program.try_into().ok())
        .ok_or(DataplaneError::Missing {
            kind: "XDP program",
            name,
        })
}

/// The interface's index in the calling thread's network namespace.
pub fn interface_index(interface: &str) -> Result<u32, DataplaneError> {
    let unknown = || DataplaneError::UnknownInterface(interface.to_owned());
    let name = CString::new(interface).map_err(|_| unknown())?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(unknown())
    } else {
        Ok(index)
    }
}
