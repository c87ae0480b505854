//! The slots of an mmapable BPF array of `u32`, shared with the kernel: a
//! store here is what the XDP program reads next, with no syscall between.
//!
//! The kernel lays an array's elements `round_up(value_size, 8)` bytes
//! apart (`elem_size` in `kernel/bpf/arraymap.c`), and an mmap of the map
//! starts at element 0. A `u32` element is therefore 8 bytes: the value in
//! the first 4, padding in the rest; [`Slot`] is that layout.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
    sync::atomic::{AtomicU32, Ordering},
};

use memmap2::{MmapOptions, MmapRaw};

/// `BPF_F_MMAPABLE` (`include/uapi/linux/bpf.h`): the map may be mmapped.
pub(super) const BPF_F_MMAPABLE: u32 = 1 << 10;

/// One element of the array as the mapping lays it out.
#[repr(C, align(8))]
struct Slot {
    value: AtomicU32,
}

const _: () = assert!(size_of::<Slot>() == 8);

/// A read-write `MAP_SHARED` mapping of every element of the array.
pub(super) struct SharedSlots {
    map: MmapRaw,
    len: u32,
}

impl SharedSlots {
    /// Maps the `len` elements of the mmapable `u32` array behind `fd`.
    /// The mapping holds its own reference to the map: it stays valid
    /// after `fd` is closed, until this value is dropped.
    pub(super) fn map(fd: BorrowedFd<'_>, len: u32) -> io::Result<Self> {
        let bytes = len as usize * size_of::<Slot>();
        let map = MmapOptions::new().len(bytes).map_raw(fd.as_raw_fd())?;
        Ok(Self { map, len })
    }

    fn slots(&self) -> &[Slot] {
        // SAFETY: the mapping covers `len` elements of 8 bytes and starts
        // page-aligned; the kernel allocated those pages for the map and
        // neither frees nor moves them while a mapping of them exists (the
        // mapping keeps the map alive), and this slice lives no longer than
        // `self.map`. Every access goes through `AtomicU32`, so the other
        // readers and writers of the same memory, the XDP program and the
        // map syscalls, race with nothing Rust assumes exclusive.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<Slot>(), self.len as usize) }
    }

    /// Stores `value` at `index` in one aligned 4-byte write, so that the
    /// program reads either the old or the new value, never a mix. Release:
    /// whatever this thread wrote before (the backends a slot may now name)
    /// is visible to a reader that sees the new value.
    ///
    /// Panics if `index` is out of range (callers check against `len`).
    pub(super) fn set(&self, index: u32, value: u32) {
        self.slots()[index as usize]
            .value
            .store(value, Ordering::Release);
    }

    /// Panics if `index` is out of range (callers check against `len`).
    pub(super) fn get(&self, index: u32) -> u32 {
        self.slots()[index as usize].value.load(Ordering::Acquire)
    }
}
