//! Step 6, when the packet will not fit: tell the client. The outer header
//! makes a packet that fit the client's path too big for the way to the
//! backend; dropping it silently would black-hole every connection whose
//! packets are full-sized. Like a router, the balancer answers with ICMP
//! "fragmentation needed" (IPv4, RFC 1191) or ICMPv6 "packet too big"
//! (RFC 4443), from the VIP, carrying the MTU the client must fit inside
//! the tunnel; the client's path MTU discovery then sends smaller packets.
//!
//! The reply is built in the packet itself: room for the new IP and ICMP
//! headers is made in front of the client's IP packet, which is cut after
//! the bytes the message quotes, and the frame goes back the way it came
//! (XDP_TX). Like a router's, the replies are rate-limited: each CPU sends
//! at most `ICMP_REPLIES_PER_SEC` a second; past that the packet is only
//! dropped.

use aya_ebpf::{
    helpers::generated::{
        bpf_csum_diff, bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
        bpf_xdp_get_buff_len,
    },
    programs::XdpContext,
};
use lb_common::{Counter, FAMILY_V4, ICMP_REPLIES_PER_SEC, IPV4_HDR_LEN, IPV6_HDR_LEN, OUTER_TTL};
use lb_ebpf::{
    headers::{
        ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMPV6_PACKET_TOO_BIG, IPPROTO_ICMP, IPPROTO_ICMPV6,
        IcmpHdr, Ipv4Hdr, Ipv6Hdr,
    },
    packet::{ptr_at, write_at},
};

use crate::{
    counters::count,
    maps::ICMP_BUDGET,
    parse::{L2, Packet},
};

/// Bytes of the client's IP packet an IPv4 reply quotes: the longest IPv4
/// header and the 8 bytes after it, which hold the ports the client needs
/// to find the connection (RFC 792 asks for no more).
const QUOTE_V4: usize = 68;
/// The same for IPv6: the fixed header, 80 bytes of extension headers and
/// 8 bytes of transport header.
const QUOTE_V6: usize = 128;
const ICMP_HDR_LEN: usize = size_of::<IcmpHdr>();

/// Answers a packet too big for an `mtu`-byte way out that adds `overhead`
/// bytes of outer header. `Err` when it may not or cannot be answered: an
/// IPv4 packet that allows fragmenting (xlb does not fragment), or one
/// shorter than the quote.
#[inline(always)]
pub fn too_big(
    ctx: &XdpContext,
    l2: &L2,
    pkt: &Packet,
    mtu: u32,
    overhead: u32,
) -> Result<Counter, Counter> {
    if !pkt.dont_fragment {
        return Err(Counter::DropTooBig);
    }
    if !within_budget() {
        count(Counter::IcmpLimited);
        return Err(Counter::DropTooBig);
    }
    let inner_mtu = mtu.saturating_sub(overhead);
    if pkt.flow.family == FAMILY_V4 {
        reply::<QUOTE_V4, { IPV4_HDR_LEN + ICMP_HDR_LEN }>(ctx, l2, pkt, |ip, quote_sum| {
            let icmp = icmp_hdr(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, inner_mtu & 0xffff);
            let hdr = Ipv4Hdr {
                version_ihl: 0x45,
                tos: 0,
                tot_len: ((IPV4_HDR_LEN + ICMP_HDR_LEN + QUOTE_V4) as u16).to_be(),
                id: 0,
                frag_off: 0,
                ttl: OUTER_TTL,
                proto: IPPROTO_ICMP,
                check: 0,
                src: pkt.flow.dst[0],
                dst: pkt.flow.src[0],
            };
            write_at(
                ctx,
                ip,
                Ipv4Hdr {
                    check: hdr.checksum(),
                    ..hdr
                },
            )?;
            // ICMP's checksum covers the message alone.
            finish_icmp(ctx, ip + IPV4_HDR_LEN, icmp, quote_sum)
        })
    } else {
        reply::<QUOTE_V6, { IPV6_HDR_LEN + ICMP_HDR_LEN }>(ctx, l2, pkt, |ip, quote_sum| {
            let icmp = icmp_hdr(ICMPV6_PACKET_TOO_BIG, 0, inner_mtu);
            let length = (ICMP_HDR_LEN + QUOTE_V6) as u32;
            write_at(
                ctx,
                ip,
                Ipv6Hdr {
                    vcf: (6u32 << 28).to_be(),
                    payload_len: (length as u16).to_be(),
                    next_hdr: IPPROTO_ICMPV6,
                    hop_limit: OUTER_TTL,
                    src: pkt.flow.dst,
                    dst: pkt.flow.src,
                },
            )?;
            // ICMPv6's covers a pseudo-header of addresses, length and
            // protocol too.
            let pseudo = sum_words(&pkt.flow.dst)
                + sum_words(&pkt.flow.src)
                + u64::from(length.to_be())
                + u64::from(u32::from(IPPROTO_ICMPV6).to_be());
            finish_icmp(ctx, ip + IPV6_HDR_LEN, icmp, quote_sum + pseudo)
        })
    }?;
    Ok(Counter::IcmpTooBig)
}

/// Turns the frame into a reply with `HDRS` bytes of IP and ICMP headers
/// (written by `write`, given their offset and the sum of the quote)
/// followed by the first `QUOTE` bytes of the client's IP packet, addressed
/// back to the MAC it came from.
#[inline(always)]
fn reply<const QUOTE: usize, const HDRS: usize>(
    ctx: &XdpContext,
    l2: &L2,
    pkt: &Packet,
    write: impl FnOnce(usize, u64) -> Option<()>,
) -> Result<(), Counter> {
    if (pkt.ip_len as usize) < QUOTE {
        return Err(Counter::DropTooBig);
    }
    // SAFETY: `ctx.ctx` is the program's own context; resizing invalidates
    // earlier packet pointers, and none is used afterwards. The length
    // comes from the helper rather than `data_end - data`: arithmetic with
    // the end pointer, which the trim needs, is what the verifier forbids.
    let resized = unsafe {
        bpf_xdp_adjust_head(ctx.ctx, -(HDRS as i32)) == 0 && {
            let len = bpf_xdp_get_buff_len(ctx.ctx) as i32;
            bpf_xdp_adjust_tail(ctx.ctx, (l2.len + HDRS + QUOTE) as i32 - len) == 0
        }
    };
    if !resized {
        return Err(Counter::DropEncapFailed);
    }
    l2.write_header(ctx, 0, l2.eth.src, l2.eth.dst, l2.ether_type)
        .ok_or(Counter::DropEncapFailed)?;
    let quote_sum = sum_packet::<QUOTE>(ctx, l2.len + HDRS).ok_or(Counter::DropEncapFailed)?;
    write(l2.len, quote_sum).ok_or(Counter::DropEncapFailed)
}

/// Nanoseconds of budget one reply costs, and the most a CPU saves up: a
/// second's worth, so a burst after a quiet spell is as large as a second.
const NS_PER_REPLY: u64 = 1_000_000_000 / ICMP_REPLIES_PER_SEC;
const MAX_CREDIT_NS: u64 = ICMP_REPLIES_PER_SEC * NS_PER_REPLY;

/// Spends one reply of this CPU's budget, if there is one left.
#[inline(always)]
fn within_budget() -> bool {
    let Some(budget) = ICMP_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it
    // while this program runs on this CPU.
    let budget = unsafe { &mut *budget };
    let credit = budget
        .credit_ns
        .saturating_add(now.saturating_sub(budget.last_ns))
        .min(MAX_CREDIT_NS);
    budget.last_ns = now;
    let spent = credit >= NS_PER_REPLY;
    budget.credit_ns = if spent { credit - NS_PER_REPLY } else { credit };
    spent
}

#[inline(always)]
fn icmp_hdr(kind: u8, code: u8, mtu: u32) -> IcmpHdr {
    IcmpHdr {
        kind,
        code,
        check: 0,
        rest: mtu.to_be(),
    }
}

/// Writes `icmp` at `off` with its checksum over itself plus `sum` (the
/// rest of what the checksum covers).
#[inline(always)]
fn finish_icmp(ctx: &XdpContext, off: usize, icmp: IcmpHdr, sum: u64) -> Option<()> {
    let own = u64::from(u16::from_ne_bytes([icmp.kind, icmp.code])) + u64::from(icmp.rest);
    write_at(
        ctx,
        off,
        IcmpHdr {
            check: fold(sum + own),
            ..icmp
        },
    )
}

/// The ones' complement sum of `N` bytes of packet at `off`, unfolded.
#[inline(always)]
fn sum_packet<const N: usize>(ctx: &XdpContext, off: usize) -> Option<u64> {
    let bytes = ptr_at::<[u8; N]>(ctx, off)?;
    // SAFETY: `ptr_at` checked that the `N` bytes lie in the packet; the
    // helper only reads them (`from` is empty). `N` is a multiple of 4 and
    // at most 512, as the helper requires.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, bytes.cast(), N as u32, 0) };
    u32::try_from(sum).ok().map(u64::from)
}

/// The sum of 32-bit words as they lie in memory: folded to 16 bits, the
/// same as the sum of their 16-bit halves.
#[inline(always)]
fn sum_words(words: &[u32; 4]) -> u64 {
    words.iter().map(|&word| u64::from(word)).sum()
}

/// Folds a sum of memory-order words into the 16-bit checksum field.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
