//! `xlb pktgen`'s XDP programs.
//!
//! `xlb_pktgen` is run by userspace through BPF_PROG_RUN in live-frames
//! mode: the kernel hands it one frame per run and carries out its verdict,
//! so each run that ends in XDP_REDIRECT transmits one packet. It writes the
//! header template, moves the frame to its flow (source address and port)
//! and fixes the checksums incrementally from the template's.
//!
//! `xlb_sink` sits on the receiving end in tests and benchmarks: it counts
//! packets and bytes, optionally records the distinct flows it sees, and
//! drops the packet or hands it to the kernel's stack.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, xdp_action},
    helpers::generated::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V4, PROTO_TCP, PROTO_UDP,
    pktgen::{
        GEN_HEADER_WORDS, GenSettings, SINK_BYTES, SINK_COUNTERS, SINK_MAX_FLOWS, SINK_PACKETS,
        SinkFlow, sink_flags,
    },
};
use lb_ebpf::{
    headers::{ETH_P_IPV4, ETH_P_IPV6, EthHdr, Ipv4Hdr, Ipv6Hdr, Ports},
    packet::{frame_len, read_at, write_at},
};

#[map]
static GEN_SETTINGS: Array<GenSettings> = Array::with_max_entries(1, 0);

/// Packets generated so far on each CPU: the flow of the next one.
#[map]
static GEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SINK_SETTINGS: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static SINK_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SINK_COUNTERS, 0);

/// Distinct flows seen, with a packet count each, per CPU: several CPUs
/// may receive one flow, and the tests count exactly. Not preallocated:
/// most runs record nothing.
#[map]
static SINK_FLOWS: PerCpuHashMap<SinkFlow, u32> =
    PerCpuHashMap::with_max_entries(SINK_MAX_FLOWS, BPF_F_NO_PREALLOC);

const ETH_LEN: usize = size_of::<EthHdr>();
const IPV4_LEN: usize = size_of::<Ipv4Hdr>();
const IPV6_LEN: usize = size_of::<Ipv6Hdr>();
/// Where the last 32-bit word of the source address lies.
const V4_SRC_WORD: usize = ETH_LEN + 12;
const V6_SRC_WORD: usize = ETH_LEN + 8 + 12;
const V4_CHECK: usize = ETH_LEN + 10;
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

#[xdp]
pub fn xlb_pktgen(ctx: XdpContext) -> u32 {
    generate(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Option<u32> {
    let settings = GEN_SETTINGS.get(0)?;
    let flow = next_flow(settings)?;
    write_template(ctx, settings)?;
    move_to_flow(ctx, settings, flow)?;
    // SAFETY: a helper call with plain integer arguments.
    Some(unsafe { bpf_redirect(settings.ifindex, 0) } as u32)
}

/// This CPU's next flow index.
#[inline(always)]
fn next_flow(settings: &GenSettings) -> Option<u32> {
    let seq = GEN_SEQ.get_ptr_mut(0)?;
    // SAFETY: this CPU's own slot of a per-CPU array; BPF_PROG_RUN keeps the
    // program on one CPU for the whole run.
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        n
    };
    Some((n % u64::from(settings.flows.max(1))) as u32)
}

#[inline(always)]
fn write_template(ctx: &XdpContext, settings: &GenSettings) -> Option<()> {
    let mut i = 0;
    while i < GEN_HEADER_WORDS {
        if i as u32 >= settings.header_words {
            break;
        }
        write_at(ctx, i * 8, settings.header[i])?;
        i += 1;
    }
    Some(())
}

/// Sets flow `flow`'s source address and port and updates the checksums
/// that cover them (RFC 1624: HC' = ~(~HC + ~m + m')).
#[inline(always)]
fn move_to_flow(ctx: &XdpContext, settings: &GenSettings, flow: u32) -> Option<()> {
    let span = settings.port_span.max(1);
    let old_addr = settings.base_addr.to_be();
    let new_addr = settings.base_addr.wrapping_add(flow / span).to_be();
    let old_port = settings.base_port.to_be();
    let new_port = settings
        .base_port
        .wrapping_add((flow % span) as u16)
        .to_be();
    let addr_delta = replace(old_addr as u16, new_addr as u16)
        + replace((old_addr >> 16) as u16, (new_addr >> 16) as u16);
    let port_delta = replace(old_port, new_port);

    let (src_word, l4) = if settings.family == FAMILY_V4 {
        write_at(ctx, V4_CHECK, updated(settings.ip_check, addr_delta))?;
        (V4_SRC_WORD, ETH_LEN + IPV4_LEN)
    } else {
        (V6_SRC_WORD, ETH_LEN + IPV6_LEN)
    };
    write_at(ctx, src_word, new_addr)?;
    write_at(ctx, l4, new_port)?;
    let l4_check = updated(settings.l4_check, addr_delta + port_delta);
    if settings.proto == PROTO_TCP {
        write_at(ctx, l4 + TCP_CHECK, l4_check)
    } else {
        // In UDP a zero checksum means "none"; its one's-complement twin
        // says the same sum.
        let l4_check = if l4_check == 0 { 0xffff } else { l4_check };
        write_at(ctx, l4 + UDP_CHECK, l4_check)
    }
}

/// ~m + m' of one 16-bit word, unfolded.
#[inline(always)]
fn replace(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

#[inline(always)]
fn updated(check: u16, delta: u32) -> u16 {
    let mut sum = u32::from(!check) + delta;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[xdp]
pub fn xlb_sink(ctx: XdpContext) -> u32 {
    add(SINK_PACKETS, 1);
    add(SINK_BYTES, frame_len(&ctx) as u64);
    let flags = SINK_SETTINGS.get(0).copied().unwrap_or(0);
    if flags & sink_flags::RECORD_FLOWS != 0
        && let Some(flow) = source_flow(&ctx)
    {
        record(&flow);
    }
    if flags & sink_flags::PASS != 0 {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[inline(always)]
fn add(counter: u32, value: u64) {
    if let Some(slot) = SINK_COUNTS.get_ptr_mut(counter) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { *slot += value };
    }
}

/// The source of a plain (not tunnelled) IPv4 or IPv6 TCP / UDP packet.
#[inline(always)]
fn source_flow(ctx: &XdpContext) -> Option<SinkFlow> {
    let eth: EthHdr = read_at(ctx, 0)?;
    let (addr, proto, l4, family) = if eth.ether_type == ETH_P_IPV4 {
        let ip: Ipv4Hdr = read_at(ctx, ETH_LEN)?;
        let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
        ([ip.src, 0, 0, 0], ip.proto, ETH_LEN + header_len, FAMILY_V4)
    } else if eth.ether_type == ETH_P_IPV6 {
        let ip: Ipv6Hdr = read_at(ctx, ETH_LEN)?;
        (
            ip.src,
            ip.next_hdr,
            ETH_LEN + IPV6_LEN,
            lb_common::FAMILY_V6,
        )
    } else {
        return None;
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let ports: Ports = read_at(ctx, l4)?;
    Some(SinkFlow {
        addr,
        port: ports.src,
        proto,
        family,
    })
}

#[inline(always)]
fn record(flow: &SinkFlow) {
    if let Some(packets) = SINK_FLOWS.get_ptr_mut(flow) {
        // SAFETY: this CPU's own value of a live entry.
        unsafe { *packets += 1 };
        return;
    }
    // The entry starts at 1 on this CPU and 0 on the others. BPF_NOEXIST:
    // a CPU that lost the race to create it counts in its own value of the
    // winner's. When the map is full the flow goes unrecorded, which the
    // distinct count shows.
    if SINK_FLOWS.insert(flow, 1, u64::from(BPF_NOEXIST)).is_err()
        && let Some(packets) = SINK_FLOWS.get_ptr_mut(flow)
    {
        // SAFETY: as above.
        unsafe { *packets += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
