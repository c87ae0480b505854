//! One owner per BPF map. Each type takes its map(s) out of the loaded
//! object, so no other code can write them, and checks what it writes
//! against the limits the maps were created with.

use std::{collections::BTreeMap, net::IpAddr, ops::Range, os::fd::AsFd as _, path::Path};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap, MapData, PerCpuArray, xdp::DevMapHash},
};
use lb_common::{
    AddrKey, Backend, ConnSlot, Counter, FAMILY_V4, FAMILY_V6, FLOW_WAYS, FlowKey, FlowSet,
    MAX_IDS, NextHop, PROTO_TCP, PROTO_UDP, RingLine, Settings, Traffic, VipFilter, VipInfo,
    VipKey, addr_from_ip, conntrack_sets, map_names, ring_lines,
};

use super::{
    DataplaneError, Limits,
    mapped_sets::MappedSets,
    slots::{BPF_F_MMAPABLE, LineSlots, WordSlots},
};

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(DataplaneError::map(name))
}

/// Whether the array was created `BPF_F_MMAPABLE`, as this xlb creates
/// `RINGS` and `CONNTRACK`; one pinned by an earlier xlb may not be.
fn mmapable(data: &MapData, name: &'static str) -> Result<bool, DataplaneError> {
    let info = data.info().map_err(DataplaneError::map(name))?;
    Ok(info.map_flags() & BPF_F_MMAPABLE != 0)
}

fn check_range(what: &'static str, value: u64, limit: u64) -> Result<(), DataplaneError> {
    if value > limit {
        return Err(DataplaneError::OutOfRange { what, value, limit });
    }
    Ok(())
}

/// The VIP table and the two structures derived from it: the per-address
/// VIP counts and the address prefilter. Writes are ordered so that the
/// packet path never finds a filter bit or address entry without the VIP
/// behind it being programmed first.
///
/// It keeps a mirror of what it programmed (`programmed`, every VIP with
/// its info as written, generation included) and the last generation it
/// gave out. On a start over pinned maps, [`VipTable::restore`] rebuilds
/// both from the maps.
pub struct VipTable {
    vips: HashMap<MapData, VipKey, VipInfo>,
    addrs: HashMap<MapData, AddrKey, u32>,
    filter: Array<MapData, VipFilter>,
    live: Array<MapData, u32>,
    programmed: BTreeMap<VipKey, VipInfo>,
    last_generation: u32,
    limits: Limits,
}

impl VipTable {
    pub(super) fn new(ebpf: &mut Ebpf, limits: Limits) -> Result<Self, DataplaneError> {
        Ok(Self {
            vips: take(ebpf, map_names::VIPS)?,
            addrs: take(ebpf, map_names::VIP_ADDRS)?,
            filter: take(ebpf, map_names::VIP_FILTER)?,
            live: take(ebpf, map_names::VIP_LIVE)?,
            programmed: BTreeMap::new(),
            last_generation: 0,
            limits,
        })
    }

    /// Rebuilds the mirror from maps an earlier xlb left pinned, so that
    /// this process carries on where that one stopped. Read back:
    ///
    /// - `VIPS`, every entry: the mirror of programmed VIPs, exactly as
    ///   stored (id, ring offset and size, flags, generation).
    /// - `VIP_LIVE`, every id: a VIP's entry must hold its generation, an
    ///   id no VIP uses must hold 0. Other values are what a process stopped
    ///   between two writes leaves; they are rewritten (the VIP's own
    ///   generation first, stale ids cleared last).
    /// - The last generation given out: unknown (a deleted VIP's generation
    ///   is in no map), so the largest generation in `VIPS`, `VIP_LIVE` and
    ///   `newest_flow_generation` (the largest in the connection table, see
    ///   [`ConnTable::newest_generation`]): a VIP created after the restart
    ///   cannot take a generation that recorded flows of a deleted VIP still
    ///   carry.
    /// - `VIP_ADDRS` and `VIP_FILTER` are derived from the VIPs: they are
    ///   recomputed from the mirror and only written where they differ
    ///   (missing addresses and bits first, then stale ones removed).
    ///
    /// Returns how many VIPs were found.
    pub fn restore(&mut self, newest_flow_generation: u32) -> Result<usize, DataplaneError> {
        let mut programmed = BTreeMap::new();
        for entry in self.vips.iter() {
            let (key, info) = entry.map_err(DataplaneError::map(map_names::VIPS))?;
            programmed.insert(key, info);
        }
        self.programmed = programmed;
        let mut newest = newest_flow_generation;
        let mut stale_ids = Vec::new();
        for id in 0..self.limits.max_vips {
            let live = self
                .live
                .get(&id, 0)
                .map_err(DataplaneError::map(map_names::VIP_LIVE))?;
            newest = newest.max(live);
            let owner = self.programmed.values().find(|info| info.id == id);
            match owner {
                Some(info) if info.generation != live => {
                    log::warn!(
                        "VIP_LIVE[{id}] = {live}, its VIP has {}: fixed",
                        info.generation
                    );
                    self.live
                        .set(id, info.generation, 0)
                        .map_err(DataplaneError::map(map_names::VIP_LIVE))?;
                }
                None if live != 0 => stale_ids.push(id),
                _ => {}
            }
        }
        for info in self.programmed.values() {
            newest = newest.max(info.generation);
        }
        self.last_generation = newest.min(u32::from(u16::MAX));

        let mut wanted: BTreeMap<AddrKey, u32> = BTreeMap::new();
        for key in self.programmed.keys() {
            *wanted.entry(addr_key(key)).or_default() += 1;
        }
        let mut present = BTreeMap::new();
        for entry in self.addrs.iter() {
            let (addr, count) = entry.map_err(DataplaneError::map(map_names::VIP_ADDRS))?;
            present.insert(addr, count);
        }
        for (addr, count) in &wanted {
            if present.get(addr) != Some(count) {
                self.addrs
                    .insert(addr, count, 0)
                    .map_err(DataplaneError::map(map_names::VIP_ADDRS))?;
            }
        }
        let filter = self
            .filter
            .get(&0, 0)
            .map_err(DataplaneError::map(map_names::VIP_FILTER))?;
        let mut wanted_filter = VipFilter::default();
        for key in self.programmed.keys() {
            wanted_filter.insert(&key.addr);
        }
        if filter.words != wanted_filter.words {
            log::warn!("VIP_FILTER did not match VIPS: rewritten");
            self.write_filter()?;
        }
        for addr in present.keys().filter(|addr| !wanted.contains_key(addr)) {
            self.addrs
                .remove(addr)
                .map_err(DataplaneError::map(map_names::VIP_ADDRS))?;
        }
        for id in stale_ids {
            log::warn!("VIP_LIVE[{id}] was live without a VIP: cleared");
            self.set_dead(id)?;
        }
        Ok(self.programmed.len())
    }

    /// Adds or replaces a VIP. Replacing keeps its established flows unless
    /// the id changes; `info.generation` is the table's to set.
    pub fn insert(&mut self, key: VipKey, info: VipInfo) -> Result<(), DataplaneError> {
        if !matches!(key.proto, PROTO_TCP | PROTO_UDP) {
            return Err(DataplaneError::OutOfRange {
                what: "VIP protocol (6 = TCP, 17 = UDP)",
                value: key.proto.into(),
                limit: PROTO_UDP.into(),
            });
        }
        if !matches!(key.family, FAMILY_V4 | FAMILY_V6) {
            return Err(DataplaneError::OutOfRange {
                what: "VIP address family",
                value: key.family.into(),
                limit: FAMILY_V6.into(),
            });
        }
        check_range(
            "VIP id",
            info.id.into(),
            u64::from(self.limits.max_vips) - 1,
        )?;
        check_range(
            "VIP ring end",
            u64::from(info.ring_offset) + u64::from(info.ring_size),
            self.limits.ring_capacity.into(),
        )?;
        if let Some((other, _)) = self
            .programmed
            .iter()
            .find(|(other, programmed)| **other != key && programmed.id == info.id)
        {
            return Err(DataplaneError::VipIdInUse {
                id: info.id,
                by: format!("{other:?}"),
            });
        }
        let previous = self.programmed.get(&key).copied();
        let generation = match previous {
            Some(previous) if previous.id == info.id => previous.generation,
            _ => {
                // The connection table keeps 16 bits of it; 0 means "none".
                self.last_generation = self.last_generation % u32::from(u16::MAX) + 1;
                self.last_generation
            }
        };
        let info = VipInfo { generation, ..info };
        // Live before visible: a flow recorded from the new entry must find
        // its generation at once.
        self.live
            .set(info.id, generation, 0)
            .map_err(DataplaneError::map(map_names::VIP_LIVE))?;
        self.vips
            .insert(key, info, 0)
            .map_err(DataplaneError::map(map_names::VIPS))?;
        if let Some(previous) = previous
            && previous.id != info.id
        {
            self.set_dead(previous.id)?;
        }
        let is_new = self.programmed.insert(key, info).is_none();
        if is_new {
            let addr = addr_key(&key);
            let count = self.vips_on(&addr);
            self.addrs
                .insert(addr, count, 0)
                .map_err(DataplaneError::map(map_names::VIP_ADDRS))?;
            self.write_filter()?;
        }
        Ok(())
    }

    /// Removes a VIP; `false` if it was not programmed.
    pub fn remove(&mut self, key: &VipKey) -> Result<bool, DataplaneError> {
        let Some(removed) = self.programmed.remove(key) else {
            return Ok(false);
        };
        self.vips
            .remove(key)
            .map_err(DataplaneError::map(map_names::VIPS))?;
        // Its established flows end here: their entries' generation no
        // longer matches.
        self.set_dead(removed.id)?;
        let addr = addr_key(key);
        let count = self.vips_on(&addr);
        if count == 0 {
            self.addrs
                .remove(&addr)
                .map_err(DataplaneError::map(map_names::VIP_ADDRS))?;
            self.write_filter()?;
        } else {
            self.addrs
                .insert(addr, count, 0)
                .map_err(DataplaneError::map(map_names::VIP_ADDRS))?;
        }
        Ok(true)
    }

    pub fn get(&self, key: &VipKey) -> Option<&VipInfo> {
        self.programmed.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&VipKey, &VipInfo)> {
        self.programmed.iter()
    }

    fn set_dead(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.live
            .set(id, 0, 0)
            .map_err(DataplaneError::map(map_names::VIP_LIVE))
    }

    fn vips_on(&self, addr: &AddrKey) -> u32 {
        self.programmed
            .keys()
            .filter(|key| addr_key(key) == *addr)
            .count() as u32
    }

    fn write_filter(&mut self) -> Result<(), DataplaneError> {
        let mut filter = VipFilter::default();
        for key in self.programmed.keys() {
            filter.insert(&key.addr);
        }
        self.filter
            .set(0, filter, 0)
            .map_err(DataplaneError::map(map_names::VIP_FILTER))
    }
}

fn addr_key(key: &VipKey) -> AddrKey {
    AddrKey {
        addr: key.addr,
        family: key.family,
        _pad: [0; 3],
    }
}

/// The flat ring storage all VIPs' rings live in, counted in slots: `RINGS`
/// holds 32 slots per element (see [`RingLine`]).
///
/// Slots are written through a shared mapping of `RINGS` (see
/// [`LineSlots`]): one aligned 2-byte store each, so a change costs
/// memory-copy time, not a syscall per slot. Each store is atomic, so a
/// packet reads a slot's old backend or its new one, as with one map update
/// per slot. Stores are ordered after everything written before them
/// (backends), and the VIP write that follows a ring (a syscall) is ordered
/// after them.
///
/// # Upgrade from `u32` slots
///
/// An xlb from before the rings were packed pinned a `RINGS` of one `u32`
/// per element (mmapable or, older still, not). Its programs, still
/// attached through their pinned links, read that map until they are
/// replaced. So [`Dataplane::load_pinned`] leaves it pinned, creates the
/// new map unpinned, and this table copies every programmed VIP's ring into
/// it ([`RingTable::copy_old`]) before the new program can run; until the
/// links run the new program, every write goes to both maps (the old one by
/// stores if it is mmapable, else one syscall per slot), so either program
/// finds every ring it may be sent to. Once no pinned link's program reads
/// the old map, [`RingTable::finish_upgrade`] pins the new map in its place.
///
/// [`Dataplane::load_pinned`]: super::Dataplane::load_pinned
pub struct RingTable {
    lines: Array<MapData, RingLine>,
    shared: LineSlots,
    old: Option<OldRings>,
    capacity: u32,
}

/// Where [`RingTable::finish_upgrade`] pins the new `RINGS` before renaming
/// it over the old one.
pub(super) const RINGS_STAGED: &str = "RINGS_upgrading";

/// The `RINGS` of `u32` slots an earlier xlb pinned, during an upgrade.
struct OldRings {
    slots: Array<MapData, u32>,
    shared: Option<WordSlots>,
    id: u32,
}

/// How [`RingTable`] writes slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingWrites {
    /// Stores into a shared mapping of the map.
    Mapped,
    /// Upgrading: also into the `RINGS` of `u32` slots an earlier xlb
    /// pinned, by stores (it is mmapable) or one syscall per slot (it is
    /// not).
    AlsoToOld { old_mapped: bool },
}

impl RingTable {
    /// Takes `RINGS` from the object; `old`, the map an earlier xlb pinned
    /// with `u32` slots, when upgrading from one.
    pub(super) fn new(
        ebpf: &mut Ebpf,
        limits: Limits,
        old: Option<MapData>,
    ) -> Result<Self, DataplaneError> {
        let name = map_names::RINGS;
        let lines: Array<MapData, RingLine> = take(ebpf, name)?;
        let data = IterableMap::map(&lines);
        if !mmapable(data, name)? {
            // Every xlb that packs rings creates them mmapable.
            return Err(DataplaneError::MapMmap {
                name,
                source: std::io::Error::other("the map is not BPF_F_MMAPABLE"),
            });
        }
        let fd = data.fd().as_fd().try_clone_to_owned().map_err(mmap_error)?;
        let shared = LineSlots::new(fd, ring_lines(limits.ring_capacity));
        let old = old.map(OldRings::new).transpose()?;
        Ok(Self {
            lines,
            shared,
            old,
            capacity: limits.ring_capacity,
        })
    }

    /// Slots of ring storage.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn writes(&self) -> RingWrites {
        match &self.old {
            None => RingWrites::Mapped,
            Some(old) => RingWrites::AlsoToOld {
                old_mapped: old.shared.is_some(),
            },
        }
    }

    /// Writes a whole ring at `offset`; nothing if a slot's backend id
    /// does not fit 16 bits.
    pub fn write(&mut self, offset: u32, slots: &[u32]) -> Result<(), DataplaneError> {
        self.check(offset, slots.len())?;
        if let Some(&id) = slots.iter().max() {
            check_backend_id(id)?;
        }
        for (index, backend_id) in (offset..).zip(slots) {
            self.set(index, *backend_id)?;
        }
        Ok(())
    }

    /// Rewrites a ring from `old` to `new` (same length), writing only the
    /// slots that differ. Returns how many were written. A backend id that
    /// does not fit 16 bits stops it there, with an error (the slots before
    /// it are written).
    pub fn update(
        &mut self,
        offset: u32,
        old: &[u32],
        new: &[u32],
    ) -> Result<usize, DataplaneError> {
        self.check(offset, new.len())?;
        if old.len() != new.len() {
            self.write(offset, new)?;
            return Ok(new.len());
        }
        let mut written = 0;
        for ((index, before), after) in (offset..).zip(old).zip(new) {
            if before != after {
                check_backend_id(*after)?;
                self.set(index, *after)?;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Reads `len` slots at `offset`, as the packet path sees them.
    pub fn read(&self, offset: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
        self.check(offset, len as usize)?;
        (offset..offset + len)
            .map(|index| self.shared.get(index).map(u32::from).map_err(mmap_error))
            .collect()
    }

    /// Upgrading: copies `len` slots at `offset` from the old map into the
    /// new one (a VIP's ring, where the old program finds it).
    pub(super) fn copy_old(&mut self, offset: u32, len: u32) -> Result<(), DataplaneError> {
        let Some(old) = &self.old else {
            return Ok(());
        };
        self.check(offset, len as usize)?;
        for index in offset..offset + len {
            let backend_id = old.get(index)?;
            check_backend_id(backend_id)?;
            self.shared
                .set(index, backend_id as u16)
                .map_err(mmap_error)?;
        }
        Ok(())
    }

    /// Upgrading: the kernel's id of the old map, which the programs an
    /// earlier xlb attached name.
    pub(super) fn old_id(&self) -> Option<u32> {
        self.old.as_ref().map(|old| old.id)
    }

    /// Ends an upgrade once no program reads the old map: pins the new map
    /// at `path`, in the old one's place (a rename over it, so the path
    /// never lacks a map), and stops writing the old one.
    pub(super) fn finish_upgrade(&mut self, path: &Path) -> Result<(), DataplaneError> {
        let name = map_names::RINGS;
        let staged = path.with_file_name(RINGS_STAGED);
        // Left by a process stopped between the two steps below.
        super::remove_pin(&staged)?;
        IterableMap::map(&self.lines)
            .pin(&staged)
            .map_err(|error| {
                DataplaneError::map(name)(aya::maps::MapError::PinError {
                    name: Some(name.to_owned()),
                    error,
                })
            })?;
        std::fs::rename(&staged, path).map_err(|source| DataplaneError::PinDir {
            dir: path.to_owned(),
            source,
        })?;
        self.old = None;
        log::info!("{name}: upgraded to 16-bit slots; the old map is unpinned");
        Ok(())
    }

    fn check(&self, offset: u32, len: usize) -> Result<(), DataplaneError> {
        check_range(
            "ring end",
            u64::from(offset) + len as u64,
            self.capacity.into(),
        )
    }

    fn set(&mut self, index: u32, backend_id: u32) -> Result<(), DataplaneError> {
        // The old map first: a packet the new program sends to a slot finds
        // what the old one would, whichever runs.
        if let Some(old) = &mut self.old {
            old.set(index, backend_id)?;
        }
        self.shared
            .set(index, backend_id as u16)
            .map_err(mmap_error)
    }
}

impl OldRings {
    fn new(data: MapData) -> Result<Self, DataplaneError> {
        let name = map_names::RINGS;
        let info = data.info().map_err(DataplaneError::map(name))?;
        let shared = if info.map_flags() & BPF_F_MMAPABLE != 0 {
            let fd = data.fd().as_fd().try_clone_to_owned().map_err(mmap_error)?;
            Some(WordSlots::new(fd, info.max_entries()))
        } else {
            None
        };
        log::info!(
            "{name} was pinned by an earlier xlb with 32-bit slots{}: upgrading to 16-bit slots \
             (its rings are copied; it stays in use until the programs read the new map)",
            if shared.is_some() {
                ""
            } else {
                ", not mmapable"
            }
        );
        Ok(Self {
            slots: Array::try_from(aya::maps::Map::Array(data))
                .map_err(DataplaneError::map(name))?,
            shared,
            id: info.id(),
        })
    }

    fn get(&self, index: u32) -> Result<u32, DataplaneError> {
        match &self.shared {
            Some(shared) => shared.get(index).map_err(mmap_error),
            None => self
                .slots
                .get(&index, 0)
                .map_err(DataplaneError::map(map_names::RINGS)),
        }
    }

    fn set(&mut self, index: u32, backend_id: u32) -> Result<(), DataplaneError> {
        match &self.shared {
            Some(shared) => shared.set(index, backend_id).map_err(mmap_error),
            None => self
                .slots
                .set(index, backend_id, 0)
                .map_err(DataplaneError::map(map_names::RINGS)),
        }
    }
}

/// A ring slot holds 16 bits.
fn check_backend_id(id: u32) -> Result<(), DataplaneError> {
    check_range("ring backend id", id.into(), u64::from(MAX_IDS) - 1)
}

fn mmap_error(source: std::io::Error) -> DataplaneError {
    DataplaneError::MapMmap {
        name: map_names::RINGS,
        source,
    }
}

/// Backends by id: what ring slots point at.
pub struct BackendTable {
    backends: Array<MapData, Backend>,
}

impl BackendTable {
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            backends: take(ebpf, map_names::BACKENDS)?,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.backends.len()
    }

    pub fn set(&mut self, id: u32, backend: Backend) -> Result<(), DataplaneError> {
        check_range("backend id", id.into(), u64::from(self.capacity()) - 1)?;
        self.backends
            .set(id, backend, 0)
            .map_err(DataplaneError::map(map_names::BACKENDS))
    }

    /// Unprograms a backend: slots still pointing at it drop packets, flows
    /// recorded to it take the ring again.
    pub fn clear(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.set(id, Backend::default())
    }

    pub fn get(&self, id: u32) -> Result<Backend, DataplaneError> {
        self.backends
            .get(&id, 0)
            .map_err(DataplaneError::map(map_names::BACKENDS))
    }
}

/// Backends' next hops, kept current by the next-hop resolver.
pub struct NextHopTable {
    nexthops: Array<MapData, NextHop>,
}

impl NextHopTable {
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            nexthops: take(ebpf, map_names::NEXTHOPS)?,
        })
    }

    pub fn set(&mut self, backend_id: u32, hop: NextHop) -> Result<(), DataplaneError> {
        check_range(
            "backend id",
            backend_id.into(),
            u64::from(self.nexthops.len()) - 1,
        )?;
        self.nexthops
            .set(backend_id, hop, 0)
            .map_err(DataplaneError::map(map_names::NEXTHOPS))
    }

    /// Marks the entry stale: the packet path asks the FIB instead.
    pub fn invalidate(&mut self, backend_id: u32) -> Result<(), DataplaneError> {
        self.set(backend_id, NextHop::default())
    }
}

pub struct SettingsTable {
    settings: Array<MapData, Settings>,
    geometry: ConnGeometry,
}

impl SettingsTable {
    pub(super) fn new(ebpf: &mut Ebpf, geometry: ConnGeometry) -> Result<Self, DataplaneError> {
        Ok(Self {
            settings: take(ebpf, map_names::SETTINGS)?,
            geometry,
        })
    }

    /// Writes the settings; the connection-table geometry is the table's,
    /// whatever `settings` says.
    pub fn set(&mut self, settings: Settings) -> Result<(), DataplaneError> {
        let settings = Settings {
            conntrack_mask: self.geometry.sets - 1,
            ..settings
        };
        self.settings
            .set(0, settings, 0)
            .map_err(DataplaneError::map(map_names::SETTINGS))
    }

    pub fn get(&self) -> Result<Settings, DataplaneError> {
        self.settings
            .get(&0, 0)
            .map_err(DataplaneError::map(map_names::SETTINGS))
    }
}

/// Interfaces the balancer may redirect to, besides the ingress one.
pub struct TxPorts {
    ports: DevMapHash<MapData>,
}

impl TxPorts {
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            ports: take(ebpf, map_names::TX_PORTS)?,
        })
    }

    pub fn add(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|err| DataplaneError::TxPort(Box::new(err)))
    }

    pub fn remove(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.ports
            .remove(ifindex)
            .map_err(DataplaneError::map(map_names::TX_PORTS))
    }
}

/// Tunnel endpoints the decap program accepts on a backend host.
pub struct DecapTable {
    addrs: HashMap<MapData, AddrKey, u32>,
}

impl DecapTable {
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            addrs: take(ebpf, map_names::DECAP_ADDRS)?,
        })
    }

    pub fn add(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        self.addrs
            .insert(decap_key(addr), 1, 0)
            .map_err(DataplaneError::map(map_names::DECAP_ADDRS))
    }

    pub fn remove(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        self.addrs
            .remove(&decap_key(addr))
            .map_err(DataplaneError::map(map_names::DECAP_ADDRS))
    }
}

fn decap_key(ip: IpAddr) -> AddrKey {
    let (family, addr) = addr_from_ip(ip);
    AddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// How the connection table is laid out: `sets` sets of `FLOW_WAYS` ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnGeometry {
    pub sets: u32,
}

impl ConnGeometry {
    /// For at most `flows` flows.
    pub fn for_flows(flows: u32) -> Self {
        Self {
            sets: conntrack_sets(flows),
        }
    }

    /// Flows the table holds at most.
    pub fn capacity(&self) -> u64 {
        u64::from(self.sets) * FLOW_WAYS as u64
    }
}

/// The connection table, read from userspace.
///
/// Whole-table reads (the newest generation on a restart, the occupancy for
/// metrics) go through a read-only shared mapping of `CONNTRACK` (see
/// [`MappedSets`]): memory reads instead of one `bpf_map_lookup_elem` per
/// set, 30 to 50 times faster (the `conntrack` benchmark). A `CONNTRACK` pinned by an xlb from before
/// the table was mmapable cannot be mapped: it is read one lookup per set,
/// as before, and a warning says so. One flow ([`ConnTable::flow`]) is
/// always one lookup: cheaper than making a mapping for one set.
pub struct ConnTable {
    sets: Array<MapData, FlowSet>,
    mapped: Option<MappedSets>,
    geometry: ConnGeometry,
}

/// How [`ConnTable`] reads many sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnReads {
    /// Through a read-only shared mapping of the map.
    Mapped,
    /// One map-lookup syscall per set: a pinned map that is not mmapable.
    PerSetSyscall,
}

impl ConnTable {
    pub(super) fn new(ebpf: &mut Ebpf, geometry: ConnGeometry) -> Result<Self, DataplaneError> {
        let name = map_names::CONNTRACK;
        let sets: Array<MapData, FlowSet> = take(ebpf, name)?;
        let data = IterableMap::map(&sets);
        let mapped = if mmapable(data, name)? {
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| DataplaneError::MapMmap { name, source })?;
            Some(MappedSets::new(fd, geometry.sets))
        } else {
            log::warn!(
                "{name} was pinned by an earlier xlb without BPF_F_MMAPABLE: its sets straddle \
                 cache lines, which slows every lookup, and it is read one syscall per set \
                 (slower restarts and metrics); `xlb detach` and a restart fix it (this empties \
                 the connection table)"
            );
            None
        };
        Ok(Self {
            sets,
            mapped,
            geometry,
        })
    }

    pub fn geometry(&self) -> ConnGeometry {
        self.geometry
    }

    /// How this table reads many sets: mapped unless the pinned map is not
    /// mmapable.
    pub fn reads(&self) -> ConnReads {
        match self.mapped {
            Some(_) => ConnReads::Mapped,
            None => ConnReads::PerSetSyscall,
        }
    }

    /// A reader of the table that reads the way `reads` says, or `None` if
    /// this table cannot be read that way (`Mapped` on a map that is not
    /// mmapable). Every table can be read per syscall: the benchmarks and
    /// tests compare the two ways on one table.
    pub fn reader(&self, reads: ConnReads) -> Option<ConnReader<'_>> {
        match reads {
            ConnReads::Mapped => self
                .mapped
                .as_ref()
                .map(|_| ConnReader { table: self, reads }),
            ConnReads::PerSetSyscall => Some(ConnReader { table: self, reads }),
        }
    }

    fn best_reader(&self) -> ConnReader<'_> {
        ConnReader {
            table: self,
            reads: self.reads(),
        }
    }

    /// The largest VIP generation any entry of the table carries (0: the
    /// table is empty). Reads every set; done once, on a restart, while the
    /// program keeps running. On the test machine, for the default 2^21
    /// flows (2^19 sets): 13 to 18 ms mapped, 0.6 to 0.85 s per syscall;
    /// for 2^24 flows, 0.1 to 0.15 s against 4.5 s.
    pub fn newest_generation(&self) -> Result<u32, DataplaneError> {
        self.best_reader().newest_generation()
    }

    /// Counts the flows in at most `max_sets` sets spread evenly over the
    /// table (see [`ConnReader::occupancy`]).
    pub fn occupancy(&self, max_sets: u32) -> Result<ConnOccupancy, DataplaneError> {
        self.best_reader().occupancy(max_sets)
    }

    /// The backend the table holds for `flow`, hashed with `seed` (the
    /// settings' hash seed, as the packet path uses).
    pub fn flow(&self, flow: &FlowKey, seed: u32) -> Result<Option<u32>, DataplaneError> {
        let slot = ConnSlot::of(flow.hash64(seed), self.geometry.sets - 1);
        let set = self
            .sets
            .get(&slot.set, 0)
            .map_err(DataplaneError::map(map_names::CONNTRACK))?;
        Ok(set
            .ways
            .iter()
            .find(|entry| entry.fingerprint == slot.fingerprint)
            .map(|entry| u32::from(entry.backend_id)))
    }
}

/// Reads many sets of a [`ConnTable`] one way (see [`ConnTable::reader`]).
pub struct ConnReader<'a> {
    table: &'a ConnTable,
    reads: ConnReads,
}

/// Sets read in a row per sample window by a mapped reader: 64 KiB, so
/// that a sample maps whole pages it reads all of. A reader per syscall
/// reads single sets.
const MAPPED_SAMPLE_WINDOW: u32 = 1024;

impl ConnReader<'_> {
    pub fn reads(&self) -> ConnReads {
        self.reads
    }

    /// Calls `visit` with each set of `range` and its index, in order, as
    /// read while the program may be writing it (see
    /// [`MappedSets`] for what a reader sees; a lookup per syscall sees no
    /// more).
    pub fn scan(
        &self,
        range: Range<u32>,
        mut visit: impl FnMut(u32, &FlowSet),
    ) -> Result<(), DataplaneError> {
        let name = map_names::CONNTRACK;
        check_range(
            "connection-table set",
            range.end.into(),
            self.table.geometry.sets.into(),
        )?;
        match (self.reads, &self.table.mapped) {
            (ConnReads::Mapped, Some(mapped)) => mapped
                .scan(range, visit)
                .map_err(|source| DataplaneError::MapMmap { name, source }),
            // `reader` gives a mapped reader only to a mapped table.
            (ConnReads::Mapped, None) | (ConnReads::PerSetSyscall, _) => {
                for index in range {
                    let set = self
                        .table
                        .sets
                        .get(&index, 0)
                        .map_err(DataplaneError::map(name))?;
                    visit(index, &set);
                }
                Ok(())
            }
        }
    }

    /// See [`ConnTable::newest_generation`].
    pub fn newest_generation(&self) -> Result<u32, DataplaneError> {
        let mut newest = 0;
        self.scan(0..self.table.geometry.sets, |_, set| {
            for entry in set.ways.iter().filter(|entry| entry.fingerprint != 0) {
                newest = newest.max(u32::from(entry.vip_generation));
            }
        })?;
        Ok(newest)
    }

    /// Counts the flows in at most `max_sets` sets spread evenly over the
    /// table (every set when it has no more), so that a scrape costs about
    /// the same for a table of any size. Flows hash uniformly over the
    /// sets, which makes the scaled count a fair estimate of the whole
    /// table's. A mapped reader reads windows of consecutive sets (whole
    /// pages), a reader per syscall single sets.
    pub fn occupancy(&self, max_sets: u32) -> Result<ConnOccupancy, DataplaneError> {
        let sets = self.table.geometry.sets;
        let window = match self.reads {
            ConnReads::Mapped => MAPPED_SAMPLE_WINDOW,
            ConnReads::PerSetSyscall => 1,
        };
        let mut used = 0;
        let mut sampled_sets = 0;
        for range in sample_windows(sets, max_sets, window) {
            sampled_sets += range.len() as u32;
            self.scan(range, |_, set| {
                used += set.ways.iter().filter(|e| e.fingerprint != 0).count() as u64;
            })?;
        }
        Ok(ConnOccupancy {
            used,
            sampled_sets,
            sets,
            capacity: self.table.geometry.capacity(),
        })
    }
}

/// At most `max_sets` (at least one) of `sets` sets, in runs of `window`
/// sets spread evenly: every set when `max_sets >= sets`.
fn sample_windows(sets: u32, max_sets: u32, window: u32) -> impl Iterator<Item = Range<u32>> {
    let sampled = sets.min(max_sets.max(1));
    let window = window.clamp(1, sampled);
    let windows = sampled / window;
    let stride = sets / windows;
    (0..windows).map(move |k| k * stride..k * stride + window)
}

/// How full the connection table is, counted in some of its sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnOccupancy {
    /// Ways holding a flow in the sets read.
    pub used: u64,
    pub sampled_sets: u32,
    pub sets: u32,
    pub capacity: u64,
}

impl ConnOccupancy {
    /// `used` scaled from the sets read to the whole table (exact when
    /// every set was read).
    pub fn estimate(&self) -> u64 {
        if self.sampled_sets == 0 {
            return 0;
        }
        self.used * u64::from(self.sets) / u64::from(self.sampled_sets)
    }
}

/// Reads the per-CPU counters, summed over CPUs.
pub struct CounterReader {
    counters: PerCpuArray<MapData, u64>,
    /// Entries of `counters`, which a pin may hold fewer of than there are
    /// counters.
    slots: u32,
    vip_stats: PerCpuArray<MapData, Traffic>,
    backend_stats: PerCpuArray<MapData, Traffic>,
}

impl CounterReader {
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let name = map_names::COUNTERS;
        let counters: PerCpuArray<MapData, u64> = take(ebpf, name)?;
        // The kernel's size, not the object's: they differ for a pin.
        let slots = IterableMap::map(&counters)
            .info()
            .map_err(DataplaneError::map(name))?
            .max_entries();
        let missing: Vec<&str> = Counter::ALL[slots.min(Counter::COUNT) as usize..]
            .iter()
            .map(|counter| counter.name())
            .collect();
        if !missing.is_empty() {
            log::warn!(
                "{name} was pinned by an earlier xlb with room for {slots} counters: {} stay \
                 0; `xlb detach` and a restart make room (this empties the connection table)",
                missing.join(", ")
            );
        }
        Ok(Self {
            counters,
            slots,
            vip_stats: take(ebpf, map_names::VIP_STATS)?,
            backend_stats: take(ebpf, map_names::BACKEND_STATS)?,
        })
    }

    /// The counter summed over CPUs; 0 for one the pinned map has no slot
    /// for (see [`CounterReader::new`]).
    pub fn global(&self, counter: Counter) -> Result<u64, DataplaneError> {
        if counter as u32 >= self.slots {
            return Ok(0);
        }
        let values = self
            .counters
            .get(&(counter as u32), 0)
            .map_err(DataplaneError::map(map_names::COUNTERS))?;
        Ok(values.iter().sum())
    }

    /// Every global counter, in `Counter::ALL` order.
    pub fn all_global(&self) -> Result<Vec<(Counter, u64)>, DataplaneError> {
        Counter::ALL
            .iter()
            .map(|counter| Ok((*counter, self.global(*counter)?)))
            .collect()
    }

    pub fn vip(&self, vip_id: u32) -> Result<Traffic, DataplaneError> {
        sum_traffic(&self.vip_stats, vip_id, map_names::VIP_STATS)
    }

    pub fn backend(&self, backend_id: u32) -> Result<Traffic, DataplaneError> {
        sum_traffic(&self.backend_stats, backend_id, map_names::BACKEND_STATS)
    }
}

fn sum_traffic(
    map: &PerCpuArray<MapData, Traffic>,
    index: u32,
    name: &'static str,
) -> Result<Traffic, DataplaneError> {
    let values = map.get(&index, 0).map_err(DataplaneError::map(name))?;
    let mut total = Traffic::default();
    for value in values.iter() {
        total.add(value);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::sample_windows;

    /// The windows as (first, end) pairs.
    fn windows(sets: u32, max_sets: u32, window: u32) -> Vec<(u32, u32)> {
        sample_windows(sets, max_sets, window)
            .map(|r| (r.start, r.end))
            .collect()
    }

    #[test]
    fn a_budget_as_large_as_the_table_reads_every_set() {
        assert_eq!(windows(1024, 1024, 1024), [(0, 1024)]);
        assert_eq!(windows(1024, u32::MAX, 1024), [(0, 1024)]);
        assert_eq!(windows(1024, 1024, 1).len(), 1024);
    }

    #[test]
    fn a_sample_spreads_its_windows_evenly_over_the_table() {
        assert_eq!(
            windows(1 << 20, 4096, 1024),
            [
                (0, 1024),
                (262_144, 263_168),
                (524_288, 525_312),
                (786_432, 787_456)
            ]
        );
        // Per syscall: single sets, as evenly.
        let single = windows(1 << 20, 4096, 1);
        assert_eq!(single.len(), 4096);
        assert!(
            single
                .iter()
                .enumerate()
                .all(|(k, r)| *r == (k as u32 * 256, k as u32 * 256 + 1))
        );
    }

    #[test]
    fn a_budget_that_does_not_divide_reads_whole_windows_inside_the_table() {
        let sample = windows(4096, 3000, 1024);
        assert_eq!(sample, [(0, 1024), (2048, 3072)]);
        assert_eq!(windows(4096, 0, 1024), [(0, 1)]);
        assert_eq!(windows(1, 65_536, 1024), [(0, 1)]);
    }
}
