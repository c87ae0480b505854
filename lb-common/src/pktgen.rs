//! What `xlb pktgen`'s XDP programs share with userspace: the generator's
//! settings and the counting sink's keys.
//!
//! The generator writes a whole header template into every frame rather
//! than patching the frame it is given: in live-frames mode the kernel
//! recycles pages without re-initialising them, so a frame may come back
//! as a receiver (say, an encapsulating balancer) left it.

/// Bytes of header template the generator can write: Ethernet, IPv6 and
/// TCP (74 bytes), rounded up to whole 8-byte words.
pub const GEN_HEADER_WORDS: usize = 10;

/// Settings of the generator program, one entry of `GEN_SETTINGS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenSettings {
    /// Ethernet, IP and L4 headers of flow 0 with valid checksums, followed
    /// by zero payload up to `header_words * 8` bytes.
    pub header: [u64; GEN_HEADER_WORDS],
    /// Interface every frame is redirected to.
    pub ifindex: u32,
    /// Distinct flows, at least 1: packet `n` of a CPU belongs to flow
    /// `n % flows`.
    pub flows: u32,
    /// Source ports per source address, at least 1: flow `i` has source
    /// port `base_port + i % port_span` and source address (last 32-bit
    /// word) `base_addr + i / port_span`.
    pub port_span: u32,
    /// Words of `header` to write, at most [`GEN_HEADER_WORDS`].
    pub header_words: u32,
    /// Last 32-bit word of flow 0's source address, host order.
    pub base_addr: u32,
    /// Flow 0's source port, host order.
    pub base_port: u16,
    /// The template's L4 and IPv4 header checksums, as they lie in the
    /// packet (read as native `u16`s).
    pub l4_check: u16,
    pub ip_check: u16,
    /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`].
    pub family: u8,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    pub _pad: u32,
}

/// Indices of the sink's per-CPU `SINK_COUNTS`.
pub const SINK_PACKETS: u32 = 0;
pub const SINK_BYTES: u32 = 1;
pub const SINK_COUNTERS: u32 = 2;

/// Bits of the sink's `SINK_SETTINGS[0]`.
pub mod sink_flags {
    /// Record every distinct (source address, source port, protocol) of
    /// plain IPv4 / IPv6 TCP and UDP packets in `SINK_FLOWS`.
    pub const RECORD_FLOWS: u32 = 1;
    /// Hand packets to the kernel's stack (XDP_PASS) instead of dropping
    /// them, e.g. so that sockets check their checksums.
    pub const PASS: u32 = 2;
}

/// Entries `SINK_FLOWS` holds: distinct flows beyond it go unrecorded.
pub const SINK_MAX_FLOWS: u32 = 1 << 18;

/// A flow as the sink records it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SinkFlow {
    /// Source address, network order; IPv4 uses the first word.
    pub addr: [u32; 4],
    /// Source port, network order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are `#[repr(C)]`, `Copy`, made of integers and
    // integer arrays only, with all padding spelled out as fields.
    unsafe impl aya::Pod for super::GenSettings {}
    unsafe impl aya::Pod for super::SinkFlow {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(
            size_of::<GenSettings>(),
            8 * GEN_HEADER_WORDS + 5 * 4 + 3 * 2 + 2 + 4
        );
        assert_eq!(size_of::<SinkFlow>(), 20);
    }
}
