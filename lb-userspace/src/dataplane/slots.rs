//! The slots of an mmapable BPF array of `u32`, shared with the kernel: a
//! store here is what the XDP program reads next, with no syscall between.
//!
//! The kernel lays an array's elements `round_up(value_size, 8)` bytes
//! apart (`elem_size` in `kernel/bpf/arraymap.c`), and an mmap of the map
//! at offset 0 starts at element 0. A `u32` element is therefore 8 bytes:
//! the value in the first 4, padding in the rest; [`Slot`] is that layout.
//!
//! The kernel fills a mapping's page tables when the mapping is made, and
//! they count in the process's resident size: mapping the default ring
//! storage (33.5 M slots, 268 MB of the map's own pages) would show xlb as
//! using that much more memory and take some 30 ms. So the array is mapped
//! in chunks, each when a slot in it is first touched: a node maps about
//! what its rings use (they are placed first fit from slot 0).

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

use memmap2::{MmapOptions, MmapRaw};

/// `BPF_F_MMAPABLE` (`include/uapi/linux/bpf.h`): the map may be mmapped.
pub(super) const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Elements per mapping: 16 MiB, a whole number of pages.
const CHUNK_SLOTS: u32 = 1 << 21;

/// One element of the array as the mapping lays it out.
#[repr(C, align(8))]
struct Slot {
    value: AtomicU32,
}

const _: () = assert!(size_of::<Slot>() == 8);

/// Read-write `MAP_SHARED` mappings of the array's elements, made chunk by
/// chunk as they are used.
pub(super) struct SharedSlots {
    /// The map, for the mappings still to make.
    fd: OwnedFd,
    chunks: Vec<OnceLock<MmapRaw>>,
    len: u32,
}

impl SharedSlots {
    /// Shares the `len` elements of the mmapable `u32` array `fd` refers to.
    /// Maps nothing yet.
    pub(super) fn new(fd: OwnedFd, len: u32) -> Self {
        let chunks = len.div_ceil(CHUNK_SLOTS) as usize;
        Self {
            fd,
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            len,
        }
    }

    /// Stores `value` at `index` in one aligned 4-byte write, so that the
    /// program reads either the old or the new value, never a mix. Release:
    /// whatever this thread wrote before (the backends a slot may now name)
    /// is visible to a reader that sees the new value.
    ///
    /// Panics if `index` is out of range (callers check against `len`).
    pub(super) fn set(&self, index: u32, value: u32) -> io::Result<()> {
        self.slot(index)?.value.store(value, Ordering::Release);
        Ok(())
    }

    /// Panics if `index` is out of range (callers check against `len`).
    pub(super) fn get(&self, index: u32) -> io::Result<u32> {
        Ok(self.slot(index)?.value.load(Ordering::Acquire))
    }

    fn slot(&self, index: u32) -> io::Result<&Slot> {
        assert!(index < self.len, "slot {index} of {}", self.len);
        let chunk = index / CHUNK_SLOTS;
        let map = self.chunk(chunk)?;
        let at = (index % CHUNK_SLOTS) as usize;
        // SAFETY: `map` covers elements `chunk * CHUNK_SLOTS` onwards up to
        // `len`, so `at` is inside it; it starts page-aligned, so every
        // element is 8-byte aligned. The kernel allocated those pages for
        // the map and neither frees nor moves them while a mapping of them
        // exists (the mapping holds the map), and the reference lives no
        // longer than `self`, which holds the mapping. Every access goes
        // through `AtomicU32`, so the other readers and writers of the same
        // memory, the XDP program and the map syscalls, race with nothing
        // Rust assumes exclusive.
        Ok(unsafe { &*map.as_ptr().cast::<Slot>().add(at) })
    }

    fn chunk(&self, chunk: u32) -> io::Result<&MmapRaw> {
        let cell = &self.chunks[chunk as usize];
        if let Some(map) = cell.get() {
            return Ok(map);
        }
        let first = chunk * CHUNK_SLOTS;
        let slots = CHUNK_SLOTS.min(self.len - first);
        let map = MmapOptions::new()
            .offset(u64::from(first) * size_of::<Slot>() as u64)
            .len(slots as usize * size_of::<Slot>())
            .map_raw(self.fd.as_raw_fd())?;
        // The owner writes from one thread at a time; if two ever raced
        // here, the loser's mapping is dropped (unmapped) unused.
        Ok(cell.get_or_init(|| map))
    }
}
