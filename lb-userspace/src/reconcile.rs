//! The one step that changes what the kernel does: (desired state, health)
//! → effective weights ([`policy`]) → rings ([`maglev`]) → the difference
//! against what is programmed → ordered map writes.
//!
//! [`Reconciler::plan`] is pure: it computes what should be programmed and
//! can run without a kernel. [`Reconciler::apply`] writes the difference
//! in an order that keeps every reader of the maps consistent:
//!
//! 1. backends that are new or changed are written first, so no ring slot
//!    can point at a backend that is not programmed yet;
//! 2. rings: only the slots that changed, at the VIP's place in the ring
//!    storage (a VIP whose ring moves gets its whole new ring written at
//!    its new place before the VIP points there);
//! 3. VIPs: added or updated once their ring is in place;
//! 4. VIPs that are gone are removed (their flows end: see `VIP_LIVE`);
//! 5. backends no ring points at any more are cleared last.
//!
//! Backend ids are per (VIP, backend address): a backend shared by two
//! VIPs has two ids, so draining it in one VIP leaves the other alone, and
//! its counters are per VIP. Ids and ring places are stable across
//! reconciles, so established flows (which the connection table records by
//! backend id) keep their backend.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    BACKEND_F_UP, Backend as BackendEntry, VIP_F_CLIENT_AFFINITY, VipInfo, VipKey, addr_from_ip,
};

use crate::{
    config::NodeConfig,
    dataplane::{Dataplane, DataplaneError, Limits},
    maglev::{self, MaglevError, Member},
    policy::{self, PolicyOptions, Shares},
    state::{AdminState, Affinity, DesiredState, Health},
};

/// Integer weights handed to Maglev per unit of share: fine enough that a
/// 1 % share difference is 10 000 units.
const WEIGHT_SCALE: u32 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("VIP {vip}: {source}")]
    Ring {
        vip: String,
        #[source]
        source: MaglevError,
    },
    #[error("VIP {vip}: no room for a ring of {size} slots (ring storage holds {capacity} in all)")]
    RingSpace {
        vip: String,
        size: u32,
        capacity: u32,
    },
    #[error("too many VIPs: the data plane was loaded for {limit}")]
    TooManyVips { limit: u32 },
    #[error("too many backends: the data plane was loaded for {limit} (one per VIP and backend)")]
    TooManyBackends { limit: u32 },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// What one VIP is programmed as.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedVip {
    pub key: VipKey,
    pub info: VipInfo,
    /// Slot → backend id; empty when no backend can take new flows.
    pub ring: Arc<Vec<u32>>,
    /// The split the ring was built from, for status.
    pub shares: Shares,
}

/// What one backend id is programmed as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedBackend {
    pub vip_id: u32,
    pub addr: IpAddr,
    /// May keep its established flows (not disabled, not down).
    pub up: bool,
}

impl PlannedBackend {
    fn entry(&self) -> BackendEntry {
        let (family, addr) = addr_from_ip(self.addr);
        BackendEntry {
            addr,
            family,
            flags: if self.up { BACKEND_F_UP } else { 0 },
            _pad: [0; 2],
        }
    }
}

/// Everything programmed, by VIP name and by backend id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub vips: BTreeMap<String, PlannedVip>,
    pub backends: BTreeMap<u32, PlannedBackend>,
}

impl Plan {
    /// Backend id → address, the next-hop resolver's targets.
    pub fn next_hop_targets(&self) -> BTreeMap<u32, IpAddr> {
        self.backends
            .iter()
            .map(|(id, backend)| (*id, backend.addr))
            .collect()
    }
}

/// What an apply wrote, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub vips_written: usize,
    pub vips_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    pub ring_slots_written: usize,
}

/// Node-wide inputs of the plan.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeOptions {
    /// The data plane's hash seed; also seeds the Maglev permutations, so
    /// every node with the same seed builds the same rings.
    pub hash_seed: u32,
    pub policy: PolicyOptions,
}

/// Keeps the ids and ring places it has handed out, and what is programmed.
pub struct Reconciler {
    options: NodeOptions,
    max_vips: u32,
    max_backends: u32,
    ring_capacity: u32,
    vip_ids: BTreeMap<String, u32>,
    backend_ids: BTreeMap<(String, IpAddr), u32>,
    ring_places: BTreeMap<String, (u32, u32)>,
    programmed: Plan,
}

impl Reconciler {
    /// Ids and ring places are handed out within the data plane's `limits`.
    pub fn new(options: NodeOptions, limits: &Limits) -> Self {
        Self {
            options,
            max_vips: limits.max_vips,
            max_backends: limits.max_backends,
            ring_capacity: limits.ring_capacity,
            vip_ids: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            ring_places: BTreeMap::new(),
            programmed: Plan::default(),
        }
    }

    /// The reconciler of a node configured as `node`: every node given the
    /// same configuration plans the same rings.
    pub fn for_node(node: &NodeConfig) -> Self {
        let options = NodeOptions {
            hash_seed: node.hash_seed,
            policy: node.policy.clone(),
        };
        Self::new(options, &node.limits)
    }

    /// What is programmed now.
    pub fn programmed(&self) -> &Plan {
        &self.programmed
    }

    /// The id of `vip`'s backend at `addr`, once a plan handed one out.
    pub fn known_backend_id(&self, vip: &str, addr: IpAddr) -> Option<u32> {
        self.backend_ids.get(&(vip.to_owned(), addr)).copied()
    }

    /// Takes over what an earlier process programmed (the caller reads it
    /// back from pinned maps): `programmed` becomes what is programmed, and
    /// the ids and ring places in it stay with their VIPs (by name) and
    /// backends (by VIP name and address) for as long as the desired state
    /// keeps them. A restart then rewrites only what changed, and flows the
    /// connection table recorded by backend id keep their backend. Backends
    /// whose `vip_id` is no VIP of `programmed`, and VIPs the next desired
    /// state lacks, keep their ids taken until the next apply clears them.
    pub fn resume(&mut self, programmed: Plan) {
        let names: BTreeMap<u32, &String> = programmed
            .vips
            .iter()
            .map(|(name, vip)| (vip.info.id, name))
            .collect();
        self.vip_ids = programmed
            .vips
            .iter()
            .map(|(name, vip)| (name.clone(), vip.info.id))
            .collect();
        self.ring_places = programmed
            .vips
            .iter()
            .filter(|(_, vip)| !vip.ring.is_empty())
            .map(|(name, vip)| (name.clone(), (vip.info.ring_offset, vip.ring.len() as u32)))
            .collect();
        self.backend_ids = programmed
            .backends
            .iter()
            .filter_map(|(id, backend)| {
                let name = names.get(&backend.vip_id)?;
                Some((((*name).clone(), backend.addr), *id))
            })
            .collect();
        self.programmed = programmed;
    }

    /// What should be programmed for `state` and `health` (a backend
    /// missing from `health` counts as up). Hands out ids and ring places
    /// for new VIPs and backends, and frees those of the ones gone.
    pub fn plan(
        &mut self,
        state: &DesiredState,
        health: &BTreeMap<IpAddr, Health>,
    ) -> Result<Plan, ReconcileError> {
        self.forget_gone(state);
        let mut plan = Plan::default();
        for (name, vip) in &state.vips {
            let vip_id = self.vip_id(name)?;
            let backend_health = |backend: &crate::state::Backend| {
                health.get(&backend.addr).copied().unwrap_or_default()
            };
            let shares = policy::shares(vip, backend_health, &self.options.policy);
            for (_, backend) in vip.backends() {
                let id = self.backend_id(name, backend.addr)?;
                let up =
                    backend.admin != AdminState::Disabled && backend_health(backend) == Health::Up;
                plan.backends.insert(
                    id,
                    PlannedBackend {
                        vip_id,
                        addr: backend.addr,
                        up,
                    },
                );
            }
            let ring = self.ring(name, &shares, vip.ring_size)?;
            let (ring_offset, _) = self.ring_place(name, vip.ring_size)?;
            plan.vips.insert(
                name.clone(),
                PlannedVip {
                    key: vip.key(),
                    info: VipInfo {
                        id: vip_id,
                        ring_offset,
                        ring_size: if ring.is_empty() { 0 } else { vip.ring_size },
                        flags: match vip.affinity {
                            Affinity::Flow => 0,
                            Affinity::Client => VIP_F_CLIENT_AFFINITY,
                        },
                        generation: 0,
                    },
                    ring: Arc::new(ring),
                    shares,
                },
            );
        }
        Ok(plan)
    }

    /// Writes the difference between what is programmed and `plan`, in the
    /// order the module docs give.
    pub fn apply(
        &mut self,
        plan: Plan,
        dataplane: &mut Dataplane,
    ) -> Result<Applied, ReconcileError> {
        let mut applied = Applied::default();
        let old = &self.programmed;

        for (id, backend) in &plan.backends {
            if old.backends.get(id) != Some(backend) {
                dataplane.backends.set(*id, backend.entry())?;
                applied.backends_written += 1;
            }
        }
        for (name, vip) in &plan.vips {
            let before = old.vips.get(name);
            let same_place = before.is_some_and(|b| {
                b.info.ring_offset == vip.info.ring_offset && b.ring.len() == vip.ring.len()
            });
            applied.ring_slots_written += match before {
                Some(before) if same_place => {
                    dataplane
                        .rings
                        .update(vip.info.ring_offset, &before.ring, &vip.ring)?
                }
                _ => {
                    dataplane.rings.write(vip.info.ring_offset, &vip.ring)?;
                    vip.ring.len()
                }
            };
            let moved_key = before.is_some_and(|b| b.key != vip.key);
            if let Some(before) = before
                && moved_key
            {
                dataplane.vips.remove(&before.key)?;
                applied.vips_removed += 1;
            }
            if moved_key || before.is_none_or(|b| b.info != vip.info) {
                dataplane.vips.insert(vip.key, vip.info)?;
                applied.vips_written += 1;
            }
        }
        for (name, vip) in &old.vips {
            if !plan.vips.contains_key(name) {
                dataplane.vips.remove(&vip.key)?;
                applied.vips_removed += 1;
            }
        }
        for id in old.backends.keys() {
            if !plan.backends.contains_key(id) {
                dataplane.backends.clear(*id)?;
                dataplane.nexthops.invalidate(*id)?;
                applied.backends_removed += 1;
            }
        }
        self.programmed = plan;
        Ok(applied)
    }

    /// Frees the ids and ring places of VIPs and backends no longer wanted.
    /// Their map entries are cleared by the next apply; an id is only
    /// handed out again after that, since a plan never reuses an id that
    /// the programmed state still holds.
    fn forget_gone(&mut self, state: &DesiredState) {
        let wanted: BTreeSet<(String, IpAddr)> = state
            .vips
            .iter()
            .flat_map(|(name, vip)| vip.backends().map(move |(_, b)| (name.clone(), b.addr)))
            .collect();
        self.backend_ids.retain(|key, _| wanted.contains(key));
        self.vip_ids.retain(|name, _| state.vips.contains_key(name));
        self.ring_places.retain(|name, (_, size)| {
            state
                .vips
                .get(name)
                .is_some_and(|vip| vip.ring_size == *size)
        });
    }

    fn vip_id(&mut self, name: &str) -> Result<u32, ReconcileError> {
        if let Some(id) = self.vip_ids.get(name) {
            return Ok(*id);
        }
        let taken: BTreeSet<u32> = self
            .vip_ids
            .values()
            .copied()
            .chain(self.programmed.vips.values().map(|vip| vip.info.id))
            .collect();
        let id = (0..self.max_vips).find(|id| !taken.contains(id)).ok_or(
            ReconcileError::TooManyVips {
                limit: self.max_vips,
            },
        )?;
        self.vip_ids.insert(name.to_owned(), id);
        Ok(id)
    }

    fn backend_id(&mut self, vip: &str, addr: IpAddr) -> Result<u32, ReconcileError> {
        let key = (vip.to_owned(), addr);
        if let Some(id) = self.backend_ids.get(&key) {
            return Ok(*id);
        }
        let taken: BTreeSet<u32> = self
            .backend_ids
            .values()
            .copied()
            .chain(self.programmed.backends.keys().copied())
            .collect();
        let id = (0..self.max_backends)
            .find(|id| !taken.contains(id))
            .ok_or(ReconcileError::TooManyBackends {
                limit: self.max_backends,
            })?;
        self.backend_ids.insert(key, id);
        Ok(id)
    }

    /// The VIP's place in the ring storage: kept while its size is, else
    /// the first gap that fits (first fit), never overlapping a place still
    /// programmed. Places are in slots and rings lie back to back, so two
    /// VIPs' rings may share a 32-slot line of `RINGS`: aligning each ring
    /// to a line would waste up to 31 slots per VIP, so that `max_vips`
    /// rings of 65 537 slots no longer fit the default storage, and would
    /// move the rings an earlier xlb placed (the running program reads
    /// them where they are). Sharing costs nothing: a lookup reads one
    /// lane, and each slot is written with its own 2-byte store.
    fn ring_place(&mut self, name: &str, size: u32) -> Result<(u32, u32), ReconcileError> {
        if let Some(place) = self.ring_places.get(name) {
            return Ok(*place);
        }
        let mut taken: Vec<(u32, u32)> = self
            .ring_places
            .values()
            .copied()
            .chain(
                self.programmed
                    .vips
                    .values()
                    .map(|vip| (vip.info.ring_offset, vip.ring.len() as u32)),
            )
            .collect();
        taken.sort_unstable();
        let mut start = 0u32;
        for (offset, len) in taken {
            if offset.saturating_sub(start) >= size {
                break;
            }
            start = start.max(offset.saturating_add(len));
        }
        if u64::from(start) + u64::from(size) > u64::from(self.ring_capacity) {
            return Err(ReconcileError::RingSpace {
                vip: name.to_owned(),
                size,
                capacity: self.ring_capacity,
            });
        }
        self.ring_places.insert(name.to_owned(), (start, size));
        Ok((start, size))
    }

    fn ring(&self, name: &str, shares: &Shares, size: u32) -> Result<Vec<u32>, ReconcileError> {
        let weights = policy::to_weights(shares, WEIGHT_SCALE);
        if weights.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<(Vec<u8>, u32, u32)> = weights
            .iter()
            .map(|(addr, weight)| {
                let id = self.backend_ids[&(name.to_owned(), *addr)];
                (addr_bytes(*addr), id, *weight)
            })
            .collect();
        let members: Vec<Member<'_>> = keys
            .iter()
            .map(|(key, id, weight)| Member::new(key, *id, *weight))
            .collect();
        maglev::build(&members, size, u64::from(self.options.hash_seed)).map_err(|source| {
            ReconcileError::Ring {
                vip: name.to_owned(),
                source,
            }
        })
    }
}

fn addr_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::state::{Backend, Cluster, Proto, Vip};

    const TEST_LIMITS: Limits = Limits {
        max_vips: 16,
        max_backends: 64,
        ring_capacity: 65537 * 4,
        conntrack_size: 1024,
    };

    fn addr(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 1, last))
    }

    /// One VIP, clusters east (3 backends) and west (2), weights 1:1.
    fn state() -> DesiredState {
        let mut vip = Vip::new(
            "web",
            IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1)),
            80,
            Proto::Tcp,
        );
        vip.ring_size = 65537;
        for (cluster, backends) in [("east", &[1u8, 2, 3][..]), ("west", &[11, 12][..])] {
            let mut c = Cluster::new(cluster, 1, 0);
            for last in backends {
                c.backends.insert(
                    format!("b{last}"),
                    Backend::new(format!("b{last}"), addr(*last), 1),
                );
            }
            vip.clusters.insert(cluster.to_owned(), c);
        }
        DesiredState {
            vips: BTreeMap::from([("web".to_owned(), vip)]),
        }
    }

    fn reconciler() -> Reconciler {
        Reconciler::new(NodeOptions::default(), &TEST_LIMITS)
    }

    fn slot_share(plan: &Plan, vip: &str, backend: IpAddr) -> f64 {
        let planned = &plan.vips[vip];
        let ids: BTreeSet<u32> = plan
            .backends
            .iter()
            .filter(|(_, b)| b.addr == backend && b.vip_id == planned.info.id)
            .map(|(id, _)| *id)
            .collect();
        let hits = planned.ring.iter().filter(|id| ids.contains(id)).count();
        hits as f64 / planned.ring.len() as f64
    }

    #[test]
    fn ring_follows_the_policy_shares() {
        let plan = reconciler().plan(&state(), &BTreeMap::new()).expect("plan");
        // Clusters 1:1, so each east backend a sixth, each west one a quarter.
        for (last, share) in [
            (1, 1.0 / 6.0),
            (2, 1.0 / 6.0),
            (3, 1.0 / 6.0),
            (11, 0.25),
            (12, 0.25),
        ] {
            let got = slot_share(&plan, "web", addr(last));
            assert!(
                (got - share).abs() < 0.01,
                "backend {last}: {got} of the ring, expected {share}"
            );
        }
    }

    #[test]
    fn a_down_backend_leaves_the_ring_but_keeps_its_id() {
        let mut r = reconciler();
        let before = r.plan(&state(), &BTreeMap::new()).expect("plan");
        let health = BTreeMap::from([(addr(1), Health::Down)]);
        let after = r.plan(&state(), &health).expect("plan");
        assert_eq!(slot_share(&after, "web", addr(1)), 0.0);
        assert_eq!(
            before.backends.keys().collect::<Vec<_>>(),
            after.backends.keys().collect::<Vec<_>>()
        );
        let down = after
            .backends
            .values()
            .find(|b| b.addr == addr(1))
            .expect("still planned");
        assert!(!down.up, "its flows must move");
        assert_eq!(before.vips["web"].info, after.vips["web"].info);
    }

    #[test]
    fn drained_backends_keep_their_flows_disabled_ones_do_not() {
        let mut state = state();
        let east = state
            .vips
            .get_mut("web")
            .expect("vip")
            .clusters
            .get_mut("east")
            .expect("east");
        east.backends.get_mut("b1").expect("b1").admin = AdminState::Drained;
        east.backends.get_mut("b2").expect("b2").admin = AdminState::Disabled;
        let plan = reconciler().plan(&state, &BTreeMap::new()).expect("plan");
        for (last, up) in [(1, true), (2, false)] {
            assert_eq!(slot_share(&plan, "web", addr(last)), 0.0);
            let planned = plan
                .backends
                .values()
                .find(|b| b.addr == addr(last))
                .expect("planned");
            assert_eq!(planned.up, up, "backend {last}");
        }
    }

    #[test]
    fn nothing_healthy_means_an_empty_ring_not_an_error() {
        let health: BTreeMap<_, _> = [1, 2, 3, 11, 12].map(|l| (addr(l), Health::Down)).into();
        let mut options = NodeOptions::default();
        options.policy.panic_threshold = 0.0;
        let plan = Reconciler::new(options, &TEST_LIMITS)
            .plan(&state(), &health)
            .expect("plan");
        assert!(plan.vips["web"].ring.is_empty());
        assert_eq!(plan.vips["web"].info.ring_size, 0);
    }

    #[test]
    fn vips_get_distinct_ids_and_ring_places() {
        let mut r = reconciler();
        let mut two = state();
        let mut api = two.vips["web"].clone();
        api.name = "api".to_owned();
        api.port = 443;
        two.vips.insert("api".to_owned(), api);
        let first = r.plan(&two, &BTreeMap::new()).expect("plan");
        let (web, api) = (&first.vips["web"].info, &first.vips["api"].info);
        assert_ne!(web.id, api.id);
        assert!(
            web.ring_offset + 65537 <= api.ring_offset
                || api.ring_offset + 65537 <= web.ring_offset
        );
        assert_eq!(first.backends.len(), 10, "one id per VIP and backend");

        // A ring too large for the storage is refused with the reason.
        let mut big = two.clone();
        big.vips.get_mut("api").expect("api").ring_size = 655373;
        let err = r.plan(&big, &BTreeMap::new()).expect_err("no room");
        assert!(err.to_string().contains("no room"), "{err}");
    }

    #[test]
    fn every_node_builds_the_same_plan() {
        let a = reconciler().plan(&state(), &BTreeMap::new()).expect("plan");
        let b = reconciler().plan(&state(), &BTreeMap::new()).expect("plan");
        assert_eq!(a, b);
    }
}
