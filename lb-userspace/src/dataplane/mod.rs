//! Owns the loaded XDP object: load, attach, detach, and one typed owner per
//! map (see [`maps`]). Nothing else in xlb touches a BPF map.
//!
//! # Restart without loss
//!
//! [`Dataplane::load_pinned`] pins every map, and every XDP link it creates,
//! in a directory on a BPF filesystem:
//!
//! - `<pin_dir>/<MAP>` for each map of the object (`VIPS`, `RINGS`,
//!   `CONNTRACK`, ...: the names of `lb_common::map_names`);
//! - `<pin_dir>/link_<interface>` for each interface a program is attached
//!   to (see [`link_pin_path`]).
//!
//! When the process exits, the pins keep the maps and the links, so the
//! program stays attached and keeps balancing with the maps as they were. The
//! next [`Dataplane::load_pinned`] on the same directory reuses every pinned
//! map as it is (after checking that its type, key and value sizes and
//! entries match this build and these [`Limits`]: a mismatch is an error that
//! says which map and to run `xlb detach`), loads the new programs against
//! them, and rebuilds the controller's mirrors from them (see
//! [`VipTable`]; a `CONNTRACK` pinned before it was mmapable is kept,
//! slower; a `COUNTERS` pinned before some counters were added is kept, and
//! those read 0, see [`CounterReader`]). One exception to "as it is": a
//! `RINGS` of `u32` slots, pinned by an xlb from before the rings were
//! packed, is upgraded without loss (see [`RingTable`]): its rings are
//! copied into a new map before the new program can read it, and the new
//! map takes the pin once the pinned links run the new program.
//! [`Dataplane::attach`] to an
//! interface that has a pinned link then swaps the program inside that
//! link (`BPF_LINK_UPDATE`): the kernel replaces it atomically, so no
//! packet meets the interface without a program. [`Dataplane::detach_all`]
//! and [`remove_pinned`] take the programs off and delete the pins.
//!
//! The maps are pinned through the loader's per-map pin paths rather than by
//! declaring them `pinned` in the XDP object: a map declared `pinned` is
//! pinned under `/sys/fs/bpf` even when no directory is given, so the
//! unpinned [`Dataplane::load`] of the tests and benchmarks would share (or,
//! without a bpffs there, fail on) one set of maps. Both ways take the same
//! path through the loader: an existing pin is opened and reused, a missing
//! one is created and pinned.

mod egress;
mod mapped_sets;
pub mod maps;
pub mod nexthop;
mod slots;

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs, io,
    mem::size_of,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapInfo, MapType},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        loaded_programs,
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    AddrKey, Backend, Counter, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS,
    DEFAULT_RING_CAPACITY, FlowSet, MAX_DECAP_ADDRS, MAX_IDS, MAX_TX_PORTS, NextHop,
    RING_LINE_SLOTS, RingLine, Settings, Traffic, VipFilter, VipInfo, VipKey, map_names,
    program_names, ring_lines,
};

pub use self::maps::{
    BackendTable, ConnGeometry, ConnReader, ConnReads, ConnTable, CounterReader, DecapTable,
    NextHopTable, RingTable, RingWrites, SettingsTable, TxPorts, VipTable,
};

/// The XDP object built from `lb-ebpf` by this crate's build script.
pub static XDP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-dataplane"));

/// Floor programs for the benchmarks, built alongside the data plane.
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-floor"));

/// What `xlb detach` says to do about pins it cannot use.
const START_FRESH: &str = "run `xlb detach` to remove the pinned maps and links and start fresh \
                           (this empties the connection table)";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("reading the XDP programs' log: {0}")]
    Logger(#[source] aya_log::Error),
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
    #[error("map {name}: mapping it into memory: {source}")]
    MapMmap {
        name: &'static str,
        #[source]
        source: io::Error,
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
    #[error("pin directory {}: {source}", dir.display())]
    PinDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pin directory {} is not on a BPF filesystem: mount one there or above it \
         (mount -t bpf bpf /sys/fs/bpf)",
        dir.display()
    )]
    NotBpffs { dir: PathBuf },
    #[error("pinned map {name} ({}) {detail}: {START_FRESH}", path.display())]
    PinnedMapMismatch {
        name: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("removing the pin {}: {source}", path.display())]
    RemovePin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinned link {}: {detail}", path.display())]
    PinnedLink { path: PathBuf, detail: String },
    #[error(
        "{interface}: the kernel attached the program through netlink, which gives no link to \
         pin, so it would not outlive this process (it may still be attached: \
         `ip link set dev {interface} xdp off` takes it off)"
    )]
    NotPinnable { interface: String },
    #[error("asking the kernel which XDP program {interface} runs: {source}")]
    Netlink {
        interface: String,
        #[source]
        source: io::Error,
    },
}

impl DataplaneError {
    pub(crate) fn map(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| Self::Map {
            name,
            source: Box::new(source),
        }
    }

    fn pin_dir(dir: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::PinDir {
            dir: dir.to_owned(),
            source,
        }
    }

    fn pinned_link(path: &Path, detail: impl std::fmt::Display) -> Self {
        Self::PinnedLink {
            path: path.to_owned(),
            detail: detail.to_string(),
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

    fn from_program_name(name: &str) -> Option<Self> {
        [Role::Balancer, Role::Decap]
            .into_iter()
            .find(|role| role.program_name() == name)
    }
}

/// One of this process's attachments.
struct Attachment {
    held: Held,
    mode: AttachMode,
}

enum Held {
    /// Owned by the loaded program: detached when the data plane is dropped.
    Owned(XdpLinkId),
    /// Pinned at this path: outlives the process.
    Pinned(PathBuf),
}

/// How much the XDP programs log (aya-log), fixed when they are loaded:
/// the most detailed level that is on. The value is the program's
/// `AYA_LOG_LEVEL` global (aya-log's level numbers, 0 for none), a
/// read-only constant the verifier sees, so statements above it are dead
/// code it removes: off costs nothing per packet.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum XdpLog {
    #[default]
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// The loaded object and the owners of its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    reused_maps: Vec<&'static str>,
    links: BTreeMap<(Role, String), Attachment>,
    /// The probe egress program's attachments, by interface (see
    /// [`egress`]): wherever the balancer is.
    egress_links: BTreeMap<String, aya::programs::tc::SchedClassifierLinkId>,
    pub vips: VipTable,
    pub rings: RingTable,
    pub backends: BackendTable,
    pub nexthops: NextHopTable,
    pub settings: SettingsTable,
    pub conntrack: ConnTable,
    pub tx_ports: TxPorts,
    pub decap: DecapTable,
    pub counters: CounterReader,
    logger: Option<XdpLogger>,
}

/// Reads the XDP programs' log records (a ring buffer) into `log`.
pub type XdpLogger = aya_log::EbpfLogger<XdpLogRelay>;

/// Hands the XDP programs' records to this process's logger at info level,
/// target `xdp`, their own level leading the text: they were asked for
/// (`xdp_log`), so the process's own level filter should not hide them.
pub struct XdpLogRelay;

impl log::Log for XdpLogRelay {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        log::logger().log(
            &log::Record::builder()
                .args(format_args!("{} {}", record.level(), record.args()))
                .level(log::Level::Info)
                .target("xdp")
                .build(),
        );
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

impl Dataplane {
    /// Loads both programs into the kernel (the verifier runs here) with the
    /// given map sizes, and takes ownership of every map. Nothing is pinned:
    /// the maps, and the programs on the interfaces, go with this value.
    pub fn load(limits: Limits) -> Result<Self, DataplaneError> {
        Self::load_with(limits, None, XdpLog::Off)
    }

    /// Loads both programs with every map pinned in `pin_dir` (created if
    /// missing; it must be on a BPF filesystem), and pins each link
    /// [`Dataplane::attach`] makes there too, so that programs and maps
    /// outlive the process.
    ///
    /// Maps already pinned there (by an earlier xlb) are reused as they are:
    /// VIPs, rings, backends, next hops, settings, the connection table,
    /// redirect ports, decap addresses and all counters carry over. Each one
    /// is first checked against this build and `limits` (map type, key and
    /// value sizes, entries); a mismatch is a
    /// [`DataplaneError::PinnedMapMismatch`] naming the map, e.g. "pinned map
    /// CONNTRACK (<pin_dir>/CONNTRACK) has 524288 entries (2097152 flows),
    /// the configuration (conntrack_size) asks for 262144 entries (1048576
    /// flows): run `xlb detach` ...". A `RINGS` of an earlier xlb's `u32`
    /// slots is upgraded instead (see [`RingTable`]). The one userspace
    /// mirror, the
    /// [`VipTable`]'s, is then rebuilt from the maps: see
    /// [`VipTable::restore`] for exactly what is read back.
    ///
    /// Links are not touched here: [`Dataplane::attach`] to an interface with
    /// a pinned link replaces the program inside it; [`pinned_links`] lists
    /// them.
    pub fn load_pinned(limits: Limits, pin_dir: &Path) -> Result<Self, DataplaneError> {
        Self::load_with(limits, Some(pin_dir), XdpLog::Off)
    }

    /// [`Dataplane::load_pinned`] with the programs' log lines on up to
    /// `log`: [`Dataplane::take_logger`] then gives the reader that relays
    /// them to this process's `log` output.
    pub fn load_pinned_with_log(
        limits: Limits,
        pin_dir: &Path,
        log: XdpLog,
    ) -> Result<Self, DataplaneError> {
        Self::load_with(limits, Some(pin_dir), log)
    }

    /// The reader of the programs' log records, once; `None` when logging
    /// is off (nothing to read) or it was taken already.
    pub fn take_logger(&mut self) -> Option<XdpLogger> {
        self.logger.take()
    }

    fn load_with(
        limits: Limits,
        pin_dir: Option<&Path>,
        log: XdpLog,
    ) -> Result<Self, DataplaneError> {
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
        let specs = map_specs(&limits, geometry);
        let mut reused_maps = Vec::new();
        let mut old_rings = None;
        if let Some(dir) = pin_dir {
            prepare_pin_dir(dir)?;
            for spec in &specs {
                let path = dir.join(spec.name);
                if !path.exists() {
                    continue;
                }
                if spec.name == map_names::RINGS && old_rings_layout(&path, &limits)? {
                    old_rings = Some(
                        MapData::from_pin(&path).map_err(DataplaneError::map(map_names::RINGS))?,
                    );
                    continue;
                }
                spec.check(&path, true)?;
                reused_maps.push(spec.name);
            }
        }
        let log_level = log as u8;
        let mut loader = EbpfLoader::new();
        // Must exist: a build without aya-log would otherwise log nothing
        // without a word.
        loader.override_global(aya_log::LEVEL, &log_level, true);
        for spec in &specs {
            if spec.limit.is_some() {
                loader.map_max_entries(spec.name, spec.entries);
            }
            // An old RINGS keeps its pin until the upgrade is over: the new
            // map is created unpinned.
            let upgrading = spec.name == map_names::RINGS && old_rings.is_some();
            if let Some(dir) = pin_dir.filter(|_| !upgrading) {
                loader.map_pin_path(spec.name, dir.join(spec.name));
            }
        }
        let mut ebpf = loader
            .load(XDP_OBJECT)
            .map_err(|err| DataplaneError::Load(Box::new(err)))?;
        let logger = match log {
            XdpLog::Off => None,
            _ => Some(
                aya_log::EbpfLogger::init_with_logger(&mut ebpf, XdpLogRelay)
                    .map_err(DataplaneError::Logger)?,
            ),
        };
        if let Some(dir) = pin_dir {
            // Maps created just now must match too: this checks the table
            // in `map_specs` against the object.
            for spec in specs.iter().filter(|spec| {
                // The new RINGS of an upgrade is not pinned yet.
                let unpinned = spec.name == map_names::RINGS && old_rings.is_some();
                !(reused_maps.contains(&spec.name) || unpinned)
            }) {
                spec.check(&dir.join(spec.name), false)?;
            }
            if reused_maps.is_empty() {
                log::info!("pinned new maps in {}", dir.display());
            } else {
                log::info!(
                    "reusing the maps pinned in {}: {}",
                    dir.display(),
                    reused_maps.join(", ")
                );
            }
        }
        for role in [Role::Balancer, Role::Decap] {
            xdp_program(&mut ebpf, role.program_name())?
                .load()
                .map_err(|source| DataplaneError::Program {
                    name: role.program_name(),
                    source,
                })?;
        }
        egress::load(&mut ebpf)?;
        let mut dataplane = Self {
            vips: VipTable::new(&mut ebpf, limits)?,
            rings: RingTable::new(&mut ebpf, limits, old_rings)?,
            backends: BackendTable::new(&mut ebpf)?,
            nexthops: NextHopTable::new(&mut ebpf)?,
            settings: SettingsTable::new(&mut ebpf, geometry)?,
            conntrack: ConnTable::new(&mut ebpf, geometry)?,
            tx_ports: TxPorts::new(&mut ebpf)?,
            decap: DecapTable::new(&mut ebpf)?,
            counters: CounterReader::new(&mut ebpf)?,
            links: BTreeMap::new(),
            egress_links: BTreeMap::new(),
            logger,
            pin_dir: pin_dir.map(Path::to_owned),
            reused_maps,
            ebpf,
        };
        if !dataplane.reused_maps.is_empty() {
            let newest = dataplane.conntrack.newest_generation()?;
            dataplane.vips.restore(newest)?;
        }
        // Upgrading RINGS: every ring the old program may send a packet to
        // is in the new map before the new program can run.
        let places: Vec<(u32, u32)> = dataplane
            .vips
            .iter()
            .map(|(_, info)| (info.ring_offset, info.ring_size))
            .collect();
        for (offset, size) in places {
            dataplane.rings.copy_old(offset, size)?;
        }
        dataplane.finish_ring_upgrade();
        Ok(dataplane)
    }

    /// Ends an upgrade of `RINGS` (see [`RingTable`]) once no program of a
    /// link pinned in the pin directory reads the old map: at load when no
    /// link does, else after the attach that replaced the last one's
    /// program (or the detach that took it off). Nothing to do otherwise.
    ///
    /// A failure is only a warning: both maps keep being written, so either
    /// program finds every ring, and the next start tries again.
    fn finish_ring_upgrade(&mut self) {
        if let Err(err) = self.try_finish_ring_upgrade() {
            log::warn!(
                "{}: the upgrade to 16-bit slots stays unfinished ({err}); ring writes keep \
                 going to both maps",
                map_names::RINGS
            );
        }
    }

    fn try_finish_ring_upgrade(&mut self) -> Result<(), DataplaneError> {
        let (Some(old_id), Some(dir)) = (self.rings.old_id(), self.pin_dir.clone()) else {
            return Ok(());
        };
        let mut waiting = Vec::new();
        for link in pinned_links(&dir)? {
            let program = loaded_programs()
                .filter_map(Result::ok)
                .find(|program| program.id() == link.program_id);
            let reads_old = match program.map(|program| program.map_ids()) {
                Some(Ok(Some(ids))) => ids.contains(&old_id),
                // Unknown: assume it does.
                Some(_) => true,
                None => false,
            };
            if reads_old {
                waiting.push(link.interface);
            }
        }
        if waiting.is_empty() {
            self.rings.finish_upgrade(&dir.join(map_names::RINGS))
        } else {
            log::info!(
                "{}: still read by the earlier program on {}; ring writes go to both maps until \
                 it is replaced",
                map_names::RINGS,
                waiting.join(", ")
            );
            Ok(())
        }
    }

    /// Where maps and links are pinned; `None` for [`Dataplane::load`].
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The maps this load found pinned and reused (empty: a fresh start).
    pub fn reused_maps(&self) -> &[&'static str] {
        &self.reused_maps
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
    ///
    /// With a pin directory, the link is pinned at
    /// [`link_pin_path`]`(pin_dir, interface)`. If a link is pinned there
    /// already (from an earlier xlb process, or an earlier call), the program
    /// is swapped inside that link atomically instead: the interface never
    /// goes without a program, the link (and its id) stays, and so does its
    /// mode, which is returned (`mode` is then only compared, with a
    /// warning: changing the mode takes a detach). A pinned link whose
    /// interface has gone is removed and a new one made.
    ///
    /// The balancer brings the probe egress program along (see [`egress`]),
    /// attached to the interface's tc egress for as long as this process
    /// holds the data plane.
    pub fn attach(
        &mut self,
        role: Role,
        interface: &str,
        mode: AttachMode,
    ) -> Result<AttachMode, DataplaneError> {
        let got = self.attach_xdp(role, interface, mode)?;
        if role == Role::Balancer {
            self.attach_egress(interface)?;
        }
        self.finish_ring_upgrade();
        Ok(got)
    }

    fn attach_xdp(
        &mut self,
        role: Role,
        interface: &str,
        mode: AttachMode,
    ) -> Result<AttachMode, DataplaneError> {
        let ifindex = interface_index(interface)?;
        let Some(pin_dir) = self.pin_dir.clone() else {
            let (id, got) = self.attach_new(role, interface, ifindex, mode)?;
            self.links.insert(
                (role, interface.to_owned()),
                Attachment {
                    held: Held::Owned(id),
                    mode: got,
                },
            );
            return Ok(got);
        };
        let path = link_pin_path(&pin_dir, interface);
        if path.exists()
            && let Some(got) = self.replace_in_link(role, interface, ifindex, mode, &path)?
        {
            return Ok(got);
        }
        let (id, got) = self.attach_new(role, interface, ifindex, mode)?;
        let name = role.program_name();
        let link = xdp_program(&mut self.ebpf, name)?
            .take_link(id)
            .map_err(|source| DataplaneError::Program { name, source })?;
        let link = FdLink::try_from(link).map_err(|_| DataplaneError::NotPinnable {
            interface: interface.to_owned(),
        })?;
        // On failure the link is dropped here, which detaches the program.
        link.pin(&path)
            .map_err(|err| DataplaneError::pinned_link(&path, format!("pinning: {err}")))?;
        self.forget_interface(interface);
        self.links.insert(
            (role, interface.to_owned()),
            Attachment {
                held: Held::Pinned(path),
                mode: got,
            },
        );
        Ok(got)
    }

    /// Swaps `role`'s program into the link pinned at `path`. `None` when
    /// that link has lost its interface (its pin is removed then).
    fn replace_in_link(
        &mut self,
        role: Role,
        interface: &str,
        ifindex: u32,
        mode: AttachMode,
        path: &Path,
    ) -> Result<Option<AttachMode>, DataplaneError> {
        let name = role.program_name();
        let pinned = PinnedLink::from_pin(path).map_err(|err| {
            DataplaneError::pinned_link(path, format!("opening: {err}; {START_FRESH}"))
        })?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|err| {
            DataplaneError::pinned_link(path, format!("not an XDP link ({err}); {START_FRESH}"))
        })?;
        let program = xdp_program(&mut self.ebpf, name)?;
        match program.attach_to_link(link) {
            Ok(id) => {
                // The pin holds the link; this process needs no handle.
                drop(program.take_link(id));
            }
            Err(ProgramError::SyscallError(err))
                if err.io_error.raw_os_error() == Some(libc::ENOLINK) =>
            {
                log::warn!(
                    "{}: the pinned link's interface is gone; attaching anew to {interface}",
                    path.display()
                );
                remove_pin(path)?;
                return Ok(None);
            }
            Err(source) => return Err(DataplaneError::Program { name, source }),
        }
        let program_id = self
            .program(role)?
            .info()
            .map_err(|source| DataplaneError::Program { name, source })?
            .id();
        let running = query_xdp(ifindex).map_err(|source| DataplaneError::Netlink {
            interface: interface.to_owned(),
            source,
        })?;
        let got = match running {
            Some(running) if running.program_id == program_id => running.mode,
            other => {
                return Err(DataplaneError::pinned_link(
                    path,
                    format!(
                        "its link runs on another interface than {interface} (which runs {}); \
                         {START_FRESH}",
                        other.map_or("no XDP program".to_owned(), |running| format!(
                            "program {}",
                            running.program_id
                        ))
                    ),
                ));
            }
        };
        if mode != AttachMode::Auto && mode != got {
            log::warn!(
                "{interface}: kept {got:?} mode of the pinned link ({mode:?} asked); \
                 detach first to change the mode"
            );
        }
        log::info!("{interface}: replaced the program through the pinned link");
        self.forget_interface(interface);
        self.links.insert(
            (role, interface.to_owned()),
            Attachment {
                held: Held::Pinned(path.to_owned()),
                mode: got,
            },
        );
        Ok(Some(got))
    }

    /// Attaches with a new link, owned by the program.
    fn attach_new(
        &mut self,
        role: Role,
        interface: &str,
        ifindex: u32,
        mode: AttachMode,
    ) -> Result<(XdpLinkId, AttachMode), DataplaneError> {
        let name = role.program_name();
        let program = xdp_program(&mut self.ebpf, name)?;
        match mode {
            AttachMode::Native | AttachMode::Generic => {
                let xdp_mode = if mode == AttachMode::Native {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                program
                    .attach_to_if_index(ifindex, xdp_mode)
                    .map(|link| (link, mode))
                    .map_err(|source| DataplaneError::Program { name, source })
            }
            AttachMode::Auto => match program.attach_to_if_index(ifindex, XdpMode::Driver) {
                Ok(link) => Ok((link, AttachMode::Native)),
                Err(native) => match program.attach_to_if_index(ifindex, XdpMode::Skb) {
                    Ok(link) => {
                        log::warn!(
                            "{interface}: native XDP refused ({native}); attached in generic mode"
                        );
                        Ok((link, AttachMode::Generic))
                    }
                    Err(generic) => Err(DataplaneError::AttachRefused {
                        interface: interface.to_owned(),
                        native: Box::new(native),
                        generic: Box::new(generic),
                    }),
                },
            },
        }
    }

    /// Drops this process's record of a pinned link on `interface`, whatever
    /// the role: one link per interface, which the caller now records anew.
    fn forget_interface(&mut self, interface: &str) {
        self.links.retain(|(_, name), attachment| {
            name != interface || !matches!(attachment.held, Held::Pinned(_))
        });
    }

    /// Takes `role`'s program off `interface`. With a pin directory this
    /// also takes off a program left attached by an earlier xlb process
    /// (whose link is pinned there), and removes the link's pin.
    pub fn detach(&mut self, role: Role, interface: &str) -> Result<(), DataplaneError> {
        if role == Role::Balancer {
            self.detach_egress(interface)?;
        }
        let name = role.program_name();
        let not_attached = || DataplaneError::NotAttached {
            program: name,
            interface: interface.to_owned(),
        };
        match self.links.remove(&(role, interface.to_owned())) {
            Some(Attachment {
                held: Held::Owned(link),
                ..
            }) => xdp_program(&mut self.ebpf, name)?
                .detach(link)
                .map_err(|source| DataplaneError::Program { name, source }),
            Some(Attachment {
                held: Held::Pinned(path),
                ..
            }) => detach_pinned_link(&path),
            None => {
                let path = self
                    .pin_dir
                    .as_deref()
                    .map(|dir| link_pin_path(dir, interface))
                    .filter(|path| path.exists())
                    .ok_or_else(not_attached)?;
                detach_pinned_link(&path)
            }
        }?;
        self.finish_ring_upgrade();
        Ok(())
    }

    /// Takes every program this data plane attached off its interface and,
    /// with a pin directory, also every program whose link is pinned there,
    /// then deletes every pin of the directory (links and maps; the
    /// directory itself stays). The maps disappear once the last program
    /// and process using them let go. What `xlb detach` does.
    pub fn detach_all(mut self) -> Result<Unpinned, DataplaneError> {
        let mut unpinned = Unpinned::default();
        let attached: Vec<(Role, String)> = self.links.keys().cloned().collect();
        for (role, interface) in attached {
            self.detach(role, &interface)?;
            unpinned.interfaces.push(interface);
        }
        if let Some(dir) = self.pin_dir.take() {
            let rest = remove_pinned(&dir)?;
            unpinned.interfaces.extend(rest.interfaces);
            unpinned.maps = rest.maps;
        }
        Ok(unpinned)
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

    /// Where each program is attached by this process (including links
    /// taken over from a pin), and in which mode. [`pinned_links`] lists
    /// every pinned link, also those not attached again since a restart.
    pub fn attachments(&self) -> impl Iterator<Item = (Role, &str, AttachMode)> {
        self.links
            .iter()
            .map(|((role, interface), attachment)| (*role, interface.as_str(), attachment.mode))
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

/// What one map must be: the kernel's view of it as the XDP object declares
/// it, with the limits applied.
struct MapSpec {
    name: &'static str,
    kind: MapType,
    key_size: usize,
    value_size: usize,
    entries: u32,
    /// The [`Limits`] field that sets `entries`; `None`: fixed by the object.
    limit: Option<&'static str>,
    /// A pin of another size is still this map: `COUNTERS`, whose entries
    /// are counters, and new counters are only ever appended. A pin made
    /// before some were added has no slot for them; the program skips
    /// them and `CounterReader` reads them as 0.
    any_size: bool,
}

impl MapSpec {
    /// Checks the map pinned at `path`. A pin left by an earlier xlb that
    /// does not fit is the user's to clear; a map just created that does
    /// not fit means `map_specs` has fallen behind the object.
    fn check(&self, path: &Path, reused: bool) -> Result<(), DataplaneError> {
        let mismatch = |detail: String| DataplaneError::PinnedMapMismatch {
            name: self.name,
            path: path.to_owned(),
            detail: if reused {
                detail
            } else {
                format!("{detail} (just created: xlb's map table is out of date, a bug)")
            },
        };
        let info = MapInfo::from_pin(path)
            .map_err(|err| mismatch(format!("cannot be opened as a map ({err})")))?;
        let kind = info
            .map_type()
            .map_err(|err| mismatch(format!("has a map type unknown to aya ({err})")))?;
        if kind != self.kind {
            return Err(mismatch(format!(
                "is a {kind:?} map, this xlb expects {:?}",
                self.kind
            )));
        }
        for (what, pinned, wanted) in [
            ("key size", info.key_size(), self.key_size),
            ("value size", info.value_size(), self.value_size),
        ] {
            if pinned as usize != wanted {
                return Err(mismatch(format!(
                    "has {what} {pinned}, this xlb expects {wanted} (the map's layout changed)"
                )));
            }
        }
        if info.max_entries() != self.entries && !(reused && self.any_size) {
            // The connection table's entries are sets of flows, the
            // rings' lines of slots.
            let entries = |entries: u32| match self.name {
                map_names::CONNTRACK => format!(
                    "{entries} entries ({} flows)",
                    ConnGeometry { sets: entries }.capacity()
                ),
                map_names::RINGS => format!(
                    "{entries} entries ({} slots)",
                    u64::from(entries) * u64::from(RING_LINE_SLOTS)
                ),
                _ => format!("{entries} entries"),
            };
            let (pinned, wanted) = (entries(info.max_entries()), entries(self.entries));
            return Err(mismatch(match self.limit {
                Some(limit) => {
                    format!("has {pinned}, the configuration ({limit}) asks for {wanted}")
                }
                None => format!("has {pinned}, this xlb expects {wanted}"),
            }));
        }
        Ok(())
    }
}

/// Every map of the object, as `limits` sizes it.
fn map_specs(limits: &Limits, geometry: ConnGeometry) -> [MapSpec; 14] {
    fn spec<K, V>(
        name: &'static str,
        kind: MapType,
        entries: u32,
        limit: Option<&'static str>,
    ) -> MapSpec {
        MapSpec {
            name,
            kind,
            key_size: size_of::<K>(),
            value_size: size_of::<V>(),
            entries,
            limit,
            any_size: name == map_names::COUNTERS,
        }
    }
    /// `struct bpf_devmap_val`: an ifindex and a program fd or id.
    type DevMapValue = [u32; 2];
    use MapType::{Array, DevMapHash, Hash, PerCpuArray};
    let vips = Some("max_vips");
    let backends = Some("max_backends");
    [
        spec::<VipKey, VipInfo>(map_names::VIPS, Hash, limits.max_vips, vips),
        spec::<AddrKey, u32>(map_names::VIP_ADDRS, Hash, limits.max_vips, vips),
        spec::<u32, u32>(map_names::VIP_LIVE, Array, limits.max_vips, vips),
        spec::<u32, VipFilter>(map_names::VIP_FILTER, Array, 1, None),
        spec::<u32, RingLine>(
            map_names::RINGS,
            Array,
            ring_lines(limits.ring_capacity),
            Some("ring_capacity"),
        ),
        spec::<u32, Backend>(map_names::BACKENDS, Array, limits.max_backends, backends),
        spec::<u32, NextHop>(map_names::NEXTHOPS, Array, limits.max_backends, backends),
        spec::<u32, FlowSet>(
            map_names::CONNTRACK,
            Array,
            geometry.sets,
            Some("conntrack_size"),
        ),
        spec::<u32, Settings>(map_names::SETTINGS, Array, 1, None),
        spec::<u32, DevMapValue>(map_names::TX_PORTS, DevMapHash, MAX_TX_PORTS, None),
        spec::<u32, u64>(map_names::COUNTERS, PerCpuArray, Counter::COUNT, None),
        spec::<u32, Traffic>(map_names::VIP_STATS, PerCpuArray, limits.max_vips, vips),
        spec::<u32, Traffic>(
            map_names::BACKEND_STATS,
            PerCpuArray,
            limits.max_backends,
            backends,
        ),
        spec::<AddrKey, u32>(map_names::DECAP_ADDRS, Hash, MAX_DECAP_ADDRS, None),
    ]
}

/// Whether the `RINGS` pinned at `path` is one of `u32` slots, as an xlb
/// from before the rings were packed made it: then it is upgraded rather
/// than refused. One of another capacity is refused, as any map that does
/// not fit.
fn old_rings_layout(path: &Path, limits: &Limits) -> Result<bool, DataplaneError> {
    let Ok(info) = MapInfo::from_pin(path) else {
        // `MapSpec::check` says what is wrong with it.
        return Ok(false);
    };
    let old = matches!(info.map_type(), Ok(MapType::Array))
        && info.key_size() as usize == size_of::<u32>()
        && info.value_size() as usize == size_of::<u32>();
    if old && info.max_entries() != limits.ring_capacity {
        return Err(DataplaneError::PinnedMapMismatch {
            name: map_names::RINGS,
            path: path.to_owned(),
            detail: format!(
                "has {} slots of 32 bits (an earlier xlb's layout), the configuration \
                 (ring_capacity) asks for {}",
                info.max_entries(),
                limits.ring_capacity
            ),
        });
    }
    Ok(old)
}

/// Every map name of the object: the pins [`remove_pinned`] deletes.
fn pinned_map_names() -> [&'static str; 14] {
    map_specs(&Limits::default(), ConnGeometry::for_flows(0)).map(|spec| spec.name)
}

/// Creates the pin directory if needed and checks it is on a bpffs.
fn prepare_pin_dir(dir: &Path) -> Result<(), DataplaneError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let created = !dir.exists();
    fs::create_dir_all(dir).map_err(DataplaneError::pin_dir(dir))?;
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(|_| DataplaneError::PinDir {
        dir: dir.to_owned(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: statfs only writes into `stat`, a plain C struct, and reads
    // `path`, a NUL-terminated string; both outlive the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(DataplaneError::pin_dir(dir)(io::Error::last_os_error()));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between targets"
    )]
    if stat.f_type as i64 != BPF_FS_MAGIC {
        if created {
            let _ = fs::remove_dir(dir);
        }
        return Err(DataplaneError::NotBpffs {
            dir: dir.to_owned(),
        });
    }
    Ok(())
}

/// Where the link of the program on `interface` is pinned.
pub fn link_pin_path(pin_dir: &Path, interface: &str) -> PathBuf {
    pin_dir.join(format!("{LINK_PREFIX}{interface}"))
}

const LINK_PREFIX: &str = "link_";

/// A link pinned in a pin directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedXdpLink {
    pub interface: String,
    pub path: PathBuf,
    /// The kernel's id of the link: it stays the same across program
    /// replacements.
    pub link_id: u32,
    /// The program the link runs now.
    pub program_id: u32,
    /// Which of xlb's programs that is, by its name (`None`: another one).
    pub role: Option<Role>,
}

/// The links pinned in `pin_dir` (none if it does not exist).
pub fn pinned_links(pin_dir: &Path) -> Result<Vec<PinnedXdpLink>, DataplaneError> {
    let mut links = Vec::new();
    for (interface, path) in link_pins(pin_dir)? {
        let link = FdLink::from(
            PinnedLink::from_pin(&path)
                .map_err(|err| DataplaneError::pinned_link(&path, format!("opening: {err}")))?,
        );
        let info = link
            .info()
            .map_err(|err: LinkError| DataplaneError::pinned_link(&path, err))?;
        let program_id = info.program_id();
        let role = loaded_programs()
            .filter_map(Result::ok)
            .find(|program| program.id() == program_id)
            .and_then(|program| program.name_as_str().and_then(Role::from_program_name));
        links.push(PinnedXdpLink {
            interface,
            path,
            link_id: info.id(),
            program_id,
            role,
        });
    }
    Ok(links)
}

/// The `link_*` pins of a directory: (interface, path), sorted.
fn link_pins(pin_dir: &Path) -> Result<Vec<(String, PathBuf)>, DataplaneError> {
    let entries = match fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(DataplaneError::pin_dir(pin_dir)(err)),
    };
    let mut pins = Vec::new();
    for entry in entries {
        let entry = entry.map_err(DataplaneError::pin_dir(pin_dir))?;
        if let Some(interface) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.strip_prefix(LINK_PREFIX))
        {
            pins.push((interface.to_owned(), entry.path()));
        }
    }
    pins.sort();
    Ok(pins)
}

/// What [`remove_pinned`] or [`Dataplane::detach_all`] took away.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unpinned {
    /// Interfaces whose program was taken off.
    pub interfaces: Vec<String>,
    /// Maps whose pin was deleted.
    pub maps: Vec<&'static str>,
}

/// Takes off every program whose link is pinned in `pin_dir` and deletes
/// every pin xlb made there (links first, then maps). Needs no loaded data
/// plane: `xlb detach` with no xlb running. Other entries of the directory,
/// and the directory itself, stay. A missing directory is nothing to do.
pub fn remove_pinned(pin_dir: &Path) -> Result<Unpinned, DataplaneError> {
    let mut unpinned = Unpinned::default();
    for (interface, path) in link_pins(pin_dir)? {
        detach_pinned_link(&path)?;
        unpinned.interfaces.push(interface);
    }
    for name in pinned_map_names() {
        let path = pin_dir.join(name);
        if path.exists() {
            remove_pin(&path)?;
            unpinned.maps.push(name);
        }
    }
    // Left by an upgrade of RINGS that stopped half way.
    remove_pin(&pin_dir.join(maps::RINGS_STAGED))?;
    Ok(unpinned)
}

/// Takes the program of the link pinned at `path` off its interface at
/// once (`BPF_LINK_DETACH`: even if some process still holds the link) and
/// deletes the pin.
fn detach_pinned_link(path: &Path) -> Result<(), DataplaneError> {
    let link = sys::obj_get(path)
        .map_err(|err| DataplaneError::pinned_link(path, format!("opening: {err}")))?;
    sys::link_detach(&link)
        .map_err(|err| DataplaneError::pinned_link(path, format!("detaching: {err}")))?;
    remove_pin(path)
}

fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::RemovePin {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Which XDP program an interface runs, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpAttachment {
    /// `Native` or `Generic` (never `Auto`).
    pub mode: AttachMode,
    pub program_id: u32,
}

/// The XDP program `interface` (in the calling thread's network namespace)
/// runs, if any, asked of the kernel over rtnetlink: the truth whatever
/// process attached it.
pub fn xdp_attachment(interface: &str) -> Result<Option<XdpAttachment>, DataplaneError> {
    let ifindex = interface_index(interface)?;
    query_xdp(ifindex).map_err(|source| DataplaneError::Netlink {
        interface: interface.to_owned(),
        source,
    })
}

fn query_xdp(ifindex: u32) -> io::Result<Option<XdpAttachment>> {
    use rtnetlink::packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use rtnetlink::packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
    };
    use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = LinkMessage::default();
    request.header.index = ifindex;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(request)),
    );
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    let (reply, _) = socket.recv_from_full()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?;
    let link = match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => link,
        NetlinkPayload::Error(err) => return Err(err.to_io()),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected rtnetlink reply {other:?}"),
            ));
        }
    };
    let Some(xdp) = link.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::Xdp(xdp) => Some(xdp),
        _ => None,
    }) else {
        return Ok(None);
    };
    let find = |want: fn(&LinkXdp) -> Option<u32>| xdp.iter().find_map(want);
    let attached = xdp.iter().find_map(|attr| match attr {
        LinkXdp::Attached(attached) => Some(attached),
        _ => None,
    });
    let prog = find(|attr| match attr {
        LinkXdp::ProgId(id) => Some(*id),
        _ => None,
    });
    let drv = find(|attr| match attr {
        LinkXdp::DrvProgId(id) => Some(*id),
        _ => None,
    });
    let skb = find(|attr| match attr {
        LinkXdp::SkbProgId(id) => Some(*id),
        _ => None,
    });
    Ok(match attached {
        Some(XdpAttached::Driver | XdpAttached::Hardware) => {
            prog.or(drv).map(|program_id| XdpAttachment {
                mode: AttachMode::Native,
                program_id,
            })
        }
        Some(XdpAttached::SocketBuffer) => prog.or(skb).map(|program_id| XdpAttachment {
            mode: AttachMode::Generic,
            program_id,
        }),
        Some(XdpAttached::Multiple) => drv
            .map(|program_id| XdpAttachment {
                mode: AttachMode::Native,
                program_id,
            })
            .or(skb.map(|program_id| XdpAttachment {
                mode: AttachMode::Generic,
                program_id,
            })),
        _ => None,
    })
}

/// The two bpf(2) commands aya 0.14 does not offer on a pinned link.
mod sys {
    use super::*;

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;

    fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for
        // `cmd`, live for the call; the kernel reads at most its size and
        // treats the missing tail as zero.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *const T,
                size_of::<T>() as libc::c_uint,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// `BPF_OBJ_GET`: opens a pinned object.
    pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        #[repr(C)]
        struct ObjGet {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let fd = bpf(
            BPF_OBJ_GET,
            &ObjGet {
                pathname: path.as_ptr() as u64,
                bpf_fd: 0,
                file_flags: 0,
            },
        )?;
        // SAFETY: the kernel returned a new descriptor, now owned only here.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// `BPF_LINK_DETACH`: detaches a link's program from its hook now.
    pub(super) fn link_detach(link: &OwnedFd) -> io::Result<()> {
        #[repr(C)]
        struct LinkDetach {
            link_fd: u32,
        }
        let fd: BorrowedFd<'_> = std::os::fd::AsFd::as_fd(link);
        bpf(
            BPF_LINK_DETACH,
            &LinkDetach {
                link_fd: fd.as_raw_fd() as u32,
            },
        )
        .map(drop)
    }
}
