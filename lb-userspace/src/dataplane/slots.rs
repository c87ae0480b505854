//! The ring slots of an mmapable BPF array, shared with the kernel: a store
//! here is what the XDP program reads next, with no syscall between.
//!
//! The kernel lays an array's elements `round_up(value_size, 8)` bytes
//! apart (`elem_size` in `kernel/bpf/arraymap.c`), and an mmap of the map
//! at offset 0 starts at element 0, on a page. Two layouts of `RINGS` exist:
//!
//! - [`LineSlots`], this xlb's: 64-byte [`RingLine`]s of 32 `u16` slots,
//!   slot `i` at lane `i % 32` of element `i / 32` ([`RingPlace`]);
//! - [`WordSlots`], that of an earlier xlb: one `u32` slot per element, so
//!   8 bytes each (the value in the first 4, padding in the rest). Only
//!   written while an upgrade moves its rings into a [`LineSlots`] map.
//!
//! The kernel fills a mapping's page tables when the mapping is made, and
//! they count in the process's resident size: mapping all of the default
//! ring storage (67 MB of the map's own pages) would show xlb as using that
//! much more memory. So the array is mapped in chunks, each when a slot in
//! it is first touched: a node maps about what its rings use (they are
//! placed first fit from slot 0).

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        OnceLock,
        atomic::{AtomicU16, AtomicU32, Ordering},
    },
};

use lb_common::{RING_LINE_SLOTS, RingLine, RingPlace};
use memmap2::{MmapOptions, MmapRaw};

/// `BPF_F_MMAPABLE` (`include/uapi/linux/bpf.h`): the map may be mmapped.
pub(super) const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Bytes per mapping: 16 MiB, a whole number of pages.
const CHUNK_BYTES: usize = 1 << 24;

/// Read-write `MAP_SHARED` mappings of an array's elements, made chunk by
/// chunk as they are used.
struct SharedArray {
    /// The map, for the mappings still to make.
    fd: OwnedFd,
    chunks: Vec<OnceLock<MmapRaw>>,
    /// Elements of the array.
    len: u32,
    /// Bytes per element, as the kernel lays them out: a power of two.
    stride: usize,
    /// log2 of the elements per chunk: every slot write finds its chunk,
    /// so a shift rather than a division.
    chunk_shift: u32,
}

impl SharedArray {
    fn new(fd: OwnedFd, len: u32, stride: usize) -> Self {
        assert!(stride.is_power_of_two() && stride <= CHUNK_BYTES);
        let chunk_shift = (CHUNK_BYTES / stride).trailing_zeros();
        Self {
            fd,
            chunks: (0..len.div_ceil(1 << chunk_shift))
                .map(|_| OnceLock::new())
                .collect(),
            len,
            stride,
            chunk_shift,
        }
    }

    /// The first byte of element `index`, which is `stride`-aligned.
    ///
    /// Panics if `index` is out of range (callers check their slots).
    fn element(&self, index: u32) -> io::Result<*mut u8> {
        assert!(index < self.len, "element {index} of {}", self.len);
        let map = self.chunk(index >> self.chunk_shift)?;
        let at = (index & ((1 << self.chunk_shift) - 1)) as usize * self.stride;
        // SAFETY: the chunk maps its elements from `chunk << chunk_shift`
        // on, up to `len`, so the byte offset of `index` is inside it.
        Ok(unsafe { map.as_mut_ptr().add(at) })
    }

    fn chunk(&self, chunk: u32) -> io::Result<&MmapRaw> {
        let cell = &self.chunks[chunk as usize];
        if let Some(map) = cell.get() {
            return Ok(map);
        }
        let first = chunk << self.chunk_shift;
        let elements = (1 << self.chunk_shift).min(self.len - first);
        let map = MmapOptions::new()
            .offset(u64::from(first) * self.stride as u64)
            .len(elements as usize * self.stride)
            .map_raw(self.fd.as_raw_fd())?;
        // The owner writes from one thread at a time; if two ever raced
        // here, the loser's mapping is dropped (unmapped) unused.
        Ok(cell.get_or_init(|| map))
    }
}

// SAFETY (for the two `unsafe` dereferences below): the pointer comes from
// `SharedArray::element`, inside a live mapping that starts on a page, so
// it is aligned for the element and for each of its lanes. The kernel
// allocated those pages for the map and neither frees nor moves them while
// a mapping of them exists (the mapping holds the map), and the reference
// lives no longer than `self`, which holds the mapping. Every access goes
// through atomics, so the other readers and writers of the same memory, the
// XDP program and the map syscalls, race with nothing Rust assumes
// exclusive.

/// The slots of an mmapable array of [`RingLine`]s.
pub(super) struct LineSlots(SharedArray);

const _: () = assert!(size_of::<RingLine>() == 64);
const _: () = assert!(size_of::<[AtomicU16; RING_LINE_SLOTS as usize]>() == 64);

impl LineSlots {
    /// Shares the `lines` elements of the mmapable `RingLine` array `fd`
    /// refers to. Maps nothing yet.
    pub(super) fn new(fd: OwnedFd, lines: u32) -> Self {
        Self(SharedArray::new(fd, lines, size_of::<RingLine>()))
    }

    /// Stores `value` in `slot` in one aligned 2-byte write, so that the
    /// program reads either the old or the new value, never a mix. Release:
    /// whatever this thread wrote before (the backends a slot may now name)
    /// is visible to a reader that sees the new value.
    ///
    /// Panics if `slot` is out of range (callers check against capacity).
    pub(super) fn set(&self, slot: u32, value: u16) -> io::Result<()> {
        self.lane(slot)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Panics if `slot` is out of range (callers check against capacity).
    pub(super) fn get(&self, slot: u32) -> io::Result<u16> {
        Ok(self.lane(slot)?.load(Ordering::Acquire))
    }

    fn lane(&self, slot: u32) -> io::Result<&AtomicU16> {
        let place = RingPlace::of(slot);
        let line = self.0.element(place.line)?;
        // SAFETY: see above; a line is 32 lanes of 2 bytes.
        let lanes = unsafe { &*line.cast::<[AtomicU16; RING_LINE_SLOTS as usize]>() };
        Ok(&lanes[place.lane])
    }
}

/// The slots of an mmapable array of `u32`: the `RINGS` of an earlier xlb.
pub(super) struct WordSlots(SharedArray);

/// One element of a `u32` array as the mapping lays it out.
#[repr(C, align(8))]
struct Word {
    value: AtomicU32,
}

const _: () = assert!(size_of::<Word>() == 8);

impl WordSlots {
    pub(super) fn new(fd: OwnedFd, len: u32) -> Self {
        Self(SharedArray::new(fd, len, size_of::<Word>()))
    }

    /// As [`LineSlots::set`], in one aligned 4-byte write.
    pub(super) fn set(&self, slot: u32, value: u32) -> io::Result<()> {
        self.word(slot)?.value.store(value, Ordering::Release);
        Ok(())
    }

    pub(super) fn get(&self, slot: u32) -> io::Result<u32> {
        Ok(self.word(slot)?.value.load(Ordering::Acquire))
    }

    fn word(&self, slot: u32) -> io::Result<&Word> {
        let word = self.0.element(slot)?;
        // SAFETY: see above.
        Ok(unsafe { &*word.cast::<Word>() })
    }
}
