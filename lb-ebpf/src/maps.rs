//! Every map of the balancer and decap programs, in one place. Sizes here are
//! defaults: the controller sets the real ones at load time.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
};
use lb_common::{
    AddrKey, Backend, Counter, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS,
    DEFAULT_RING_SIZE, FLOW_WAYS, FlowSet, MAX_DECAP_ADDRS, MAX_TX_PORTS, NextHop, RingLine,
    Settings, Traffic, VipFilter, VipInfo, VipKey, ring_lines,
};

#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Every address some VIP is on, with the number of VIPs on it: tells a
/// malformed packet to a VIP (dropped) from one to another host (passed).
#[map]
pub static VIP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Per VIP id, the generation of the VIP programmed under it (0: none). A
/// connection-table hit is taken without looking the VIP up, so this is
/// how the packet path learns the VIP has gone.
#[map]
pub static VIP_LIVE: Array<u32> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map]
pub static VIP_FILTER: Array<VipFilter> = Array::with_max_entries(1, 0);

/// All VIPs' Maglev rings back to back, 32 slots of 16 bits per element
/// (see `RingLine`); a VIP's `ring_offset` and `ring_size` delimit its own,
/// in slots. Mmapable, so that the controller rewrites slots with plain
/// stores instead of one syscall each, and so that the values start on a
/// page: each element is then exactly one cache line.
#[map]
pub static RINGS: Array<RingLine> =
    Array::with_max_entries(ring_lines(DEFAULT_RING_SIZE), BPF_F_MMAPABLE);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map]
pub static NEXTHOPS: Array<NextHop> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// The connection table, one array of sets shared by all CPUs (see
/// `conntrack.rs`): a flow that moves to another CPU keeps its backend.
/// Mmapable for where that puts the values: an array's values follow the
/// kernel's `struct bpf_array` header (312 bytes on 6.18, so 56 bytes into
/// a cache line), and every 64-byte set would straddle two lines: two
/// misses for a new flow, and split stores. An mmapable array's values
/// start on a page.
#[map]
pub static CONNTRACK: Array<FlowSet> =
    Array::with_max_entries(DEFAULT_CONNTRACK_SIZE / FLOW_WAYS as u32, BPF_F_MMAPABLE);

#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Interfaces other than the ingress one that encapsulated packets may leave
/// by, keyed by ifindex.
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map]
pub static VIP_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<Traffic> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Per CPU, the ICMP too-big replies it may still send (see `icmp.rs`).
/// Program state only: not pinned, so a restart starts with a full budget.
#[map]
pub static ICMP_BUDGET: PerCpuArray<IcmpBudget> = PerCpuArray::with_max_entries(1, 0);

/// A token bucket kept in nanoseconds: `credit_ns` of sending time saved up
/// as of `last_ns`, each reply costing a share of a second.
#[derive(Clone, Copy)]
pub struct IcmpBudget {
    pub credit_ns: u64,
    pub last_ns: u64,
}

#[map]
pub static DECAP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_DECAP_ADDRS, 0);

/// Copies a value out of a hash map. The copy matters: userspace may rewrite
/// the entry while the program runs, and a copy is one consistent read.
#[inline(always)]
pub fn hash_get<K, V: Copy>(map: &HashMap<K, V>, key: &K) -> Option<V> {
    let ptr = map.get_ptr(key)?;
    // SAFETY: a non-null pointer from a map lookup points at a live value of
    // the map's value type until the program returns.
    Some(unsafe { *ptr })
}

#[inline(always)]
pub fn array_get<V: Copy>(map: &Array<V>, index: u32) -> Option<V> {
    map.get(index).copied()
}
