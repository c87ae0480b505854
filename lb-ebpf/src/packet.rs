//! The only place that turns a packet offset into a pointer.
//!
//! The verifier accepts a packet access only after a comparison against
//! `data_end` that covers it; doing that comparison here, once, keeps every
//! other step free of bounds arithmetic.

use aya_ebpf::programs::XdpContext;

/// A pointer to a `T` at `offset` bytes into the packet, or `None` if the
/// packet is too short. The pointer is valid until the packet is resized
/// (`bpf_xdp_adjust_head`), after which callers must ask again.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads a `T` at `offset`.
///
/// Header types have naturally aligned fields so that LLVM loads a 32-bit
/// address with one instruction instead of four byte loads and shifts (what
/// an unaligned read compiles to on BPF). Behind a 14-byte Ethernet header
/// those fields are only 2-byte aligned in memory; BPF loads and stores do
/// not fault on that, and the verifier only enforces alignment on
/// architectures without efficient unaligned access, where XDP load
/// balancing is not run.
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let ptr = ptr_at::<T>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `ptr` lie
    // inside the packet; `T: Copy` has no drop glue; alignment: see above.
    Some(unsafe { ptr.read() })
}

/// Writes a `T` at `offset`; `None` if it does not fit. Alignment as for
/// [`read_at`].
#[inline(always)]
pub fn write_at<T>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    let ptr = ptr_at::<T>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `ptr` lie
    // inside the packet, which the program may write; alignment: see
    // `read_at`.
    unsafe { ptr.write(value) };
    Some(())
}

/// Length of the frame as it is now.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}
