//! The sets of the connection table (`CONNTRACK`, an mmapable array of
//! [`FlowSet`]), read through a read-only shared mapping: a scan of the
//! table costs memory reads, not one `bpf_map_lookup_elem` per set.
//!
//! # Mapped for a scan, a chunk at a time
//!
//! The kernel fills a mapping's page tables when the mapping is made
//! (`remap_vmalloc_range`), and those pages count in the process's resident
//! size. A mapping kept for the process's life would show xlb as using the
//! table's size more (32 MiB for the default 2^21 flows, 256 MiB for 2^24)
//! although it never reads most of it between two scans. So a scan maps
//! [`CHUNK_SETS`] sets (4 MiB) at a time and unmaps them before mapping the
//! next: resident size grows by at most one chunk, and only during a scan.
//! Making and removing a mapping is a fixed cost of a few microseconds plus
//! a page-table entry per page, which the memory reads of the same pages
//! outweigh (see the `conntrack` benchmark).
//!
//! # What a reader sees
//!
//! The XDP program writes the sets on other CPUs while they are read, with
//! no lock (see `lb-ebpf/src/conntrack.rs`): each entry is stored payload
//! first and fingerprint last, each field in one aligned store. Here each
//! field is read with one aligned atomic load, the fingerprint first with
//! `Acquire`, so:
//!
//! - no field is torn: each holds a value the program stored there;
//! - a way whose fingerprint is read as 0 is empty; otherwise the payload
//!   read is the one stored with that fingerprint, or one stored later into
//!   the same way (on x86-64 the program's stores become visible in program
//!   order, and `Acquire` keeps the payload loads after the fingerprint's);
//! - a set is not a snapshot: a flow the program moves within its set while
//!   the set is read can be missed or seen twice, and a way refilled between
//!   the fingerprint's load and the payload's can pair the old flow's
//!   fingerprint with the new flow's payload fields.
//!
//! This is no weaker than a `bpf_map_lookup_elem` of the set, which copies
//! the value with a plain `memcpy` under no lock either. The scans need no
//! more: the newest generation and the occupancy count over the whole
//! table, where a flow moved at that instant changes the count by one.

use std::{
    io,
    mem::{offset_of, size_of},
    ops::Range,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::atomic::{AtomicU16, AtomicU64, Ordering},
};

use lb_common::{FLOW_WAYS, FlowEntry, FlowSet};
use memmap2::MmapOptions;

/// Sets per mapping: 4 MiB, a whole number of pages.
const CHUNK_SETS: u32 = 1 << 16;

/// A [`FlowEntry`] as the shared memory holds it, each field read atomically.
#[repr(C)]
struct SharedEntry {
    fingerprint: AtomicU64,
    backend_id: AtomicU16,
    vip_id: AtomicU16,
    vip_generation: AtomicU16,
    _pad: AtomicU16,
}

/// A [`FlowSet`] as the shared memory holds it.
#[repr(C, align(64))]
struct SharedSet {
    ways: [SharedEntry; FLOW_WAYS],
}

const _: () = {
    assert!(size_of::<SharedEntry>() == size_of::<FlowEntry>());
    assert!(offset_of!(SharedEntry, fingerprint) == offset_of!(FlowEntry, fingerprint));
    assert!(offset_of!(SharedEntry, backend_id) == offset_of!(FlowEntry, backend_id));
    assert!(offset_of!(SharedEntry, vip_id) == offset_of!(FlowEntry, vip_id));
    assert!(offset_of!(SharedEntry, vip_generation) == offset_of!(FlowEntry, vip_generation));
    // The kernel lays elements `round_up(value_size, 8)` bytes apart: 64,
    // the set's size, so the mapping is an array of sets.
    assert!(size_of::<SharedSet>() == size_of::<FlowSet>());
    assert!(size_of::<FlowSet>() == 64);
};

impl SharedEntry {
    fn load(&self) -> FlowEntry {
        let fingerprint = self.fingerprint.load(Ordering::Acquire);
        if fingerprint == 0 {
            return FlowEntry::default();
        }
        FlowEntry {
            fingerprint,
            backend_id: self.backend_id.load(Ordering::Relaxed),
            vip_id: self.vip_id.load(Ordering::Relaxed),
            vip_generation: self.vip_generation.load(Ordering::Relaxed),
            _pad: 0,
        }
    }
}

impl SharedSet {
    fn load(&self) -> FlowSet {
        FlowSet {
            ways: std::array::from_fn(|way| self.ways[way].load()),
        }
    }
}

/// Read access to the sets of an mmapable `CONNTRACK`; maps nothing until
/// a scan.
pub(super) struct MappedSets {
    /// The map, for the mappings of each scan.
    fd: OwnedFd,
    sets: u32,
}

impl MappedSets {
    /// Reads the `sets` sets of the mmapable array `fd` refers to.
    pub(super) fn new(fd: OwnedFd, sets: u32) -> Self {
        Self { fd, sets }
    }

    /// Calls `visit` with each set of `range` and its index, in order.
    ///
    /// Panics if `range` reaches past the table (callers check).
    pub(super) fn scan(
        &self,
        range: Range<u32>,
        mut visit: impl FnMut(u32, &FlowSet),
    ) -> io::Result<()> {
        assert!(range.end <= self.sets, "sets {range:?} of {}", self.sets);
        let mut first = range.start;
        while first < range.end {
            let len = CHUNK_SETS.min(range.end - first);
            // memmap2 maps from the page that holds `first` and points past
            // the part before it; the kernel lays set 0 at offset 0.
            let map = MmapOptions::new()
                .offset(u64::from(first) * size_of::<FlowSet>() as u64)
                .len(len as usize * size_of::<FlowSet>())
                .map_raw_read_only(self.fd.as_raw_fd())?;
            let base = map.as_ptr().cast::<SharedSet>();
            for at in 0..len {
                // SAFETY: the mapping covers `len` sets from `first`, and
                // `at < len`; the kernel starts the array's values on a
                // page and lays them 64 bytes apart, so every set is
                // aligned for `SharedSet`. The pages belong to the map,
                // which the mapping holds, so they stay while `map` lives,
                // and the reference does not outlive this iteration. Every
                // read goes through atomics (see the module docs), so the
                // XDP program's concurrent stores race with nothing Rust
                // assumes unchanging.
                let set = unsafe { &*base.add(at as usize) };
                visit(first + at, &set.load());
            }
            // `map` is unmapped here, before the next chunk is mapped.
            first += len;
        }
        Ok(())
    }
}
