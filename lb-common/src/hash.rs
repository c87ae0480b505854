//! The flow hash, the ring-slot mapping and the connection-table slot.
//!
//! All run in the XDP program and in userspace (tests, tools that predict a
//! flow's backend), so they live here once. The hash is the 4-byte-tail and
//! avalanche stages of xxHash64: a multiply and a rotate per 32-bit word, no
//! tables, no loops the verifier must bound. One 64-bit hash per packet
//! serves three purposes: its high half picks the ring slot, its low bits
//! the connection-table set, and the whole of it is the flow's fingerprint
//! in that set.

use crate::{FAMILY_V6, FlowKey};

const PRIME_1: u64 = 0x9e37_79b1_85eb_ca87;
const PRIME_2: u64 = 0xc2b2_ae3d_27d4_eb4f;
const PRIME_3: u64 = 0x1656_67b1_9e37_79f9;
const PRIME_5: u64 = 0x27d4_eb2f_1656_67c5;

/// Incremental hash over 32-bit words.
#[derive(Clone, Copy, Debug)]
pub struct FlowHasher(u64);

impl FlowHasher {
    #[inline(always)]
    pub fn new(seed: u32) -> Self {
        Self(u64::from(seed).wrapping_add(PRIME_5))
    }

    #[inline(always)]
    pub fn write(self, word: u32) -> Self {
        Self(
            (self.0 ^ u64::from(word).wrapping_mul(PRIME_1))
                .rotate_left(23)
                .wrapping_mul(PRIME_2)
                .wrapping_add(PRIME_3),
        )
    }

    #[inline(always)]
    pub fn write_addr(self, family: u8, addr: &[u32; 4]) -> Self {
        let hasher = self.write(addr[0]);
        if family == FAMILY_V6 {
            hasher.write(addr[1]).write(addr[2]).write(addr[3])
        } else {
            hasher
        }
    }

    #[inline(always)]
    pub fn finish(self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(PRIME_2);
        h ^= h >> 29;
        h = h.wrapping_mul(PRIME_3);
        h ^ (h >> 32)
    }
}

impl FlowKey {
    /// The flow's 64-bit hash. Ports that are zero (a fragment) simply hash
    /// as zero, which makes it a hash of (source, destination, protocol).
    #[inline(always)]
    pub fn hash64(&self, seed: u32) -> u64 {
        FlowHasher::new(seed)
            .write_addr(self.family, &self.src)
            .write_addr(self.family, &self.dst)
            .write(u32::from(self.sport) << 16 | u32::from(self.dport))
            .write(u32::from(self.proto))
            .finish()
    }

    /// The hash that picks this flow's ring slot.
    #[inline(always)]
    pub fn hash(&self, seed: u32) -> u32 {
        ring_hash(self.hash64(seed))
    }

    /// The client-affinity ring hash: the source address alone.
    #[inline(always)]
    pub fn source_hash(&self, seed: u32) -> u32 {
        ring_hash(
            FlowHasher::new(seed)
                .write_addr(self.family, &self.src)
                .finish(),
        )
    }
}

/// The ring hash: the 64-bit hash's high half.
#[inline(always)]
pub fn ring_hash(hash64: u64) -> u32 {
    (hash64 >> 32) as u32
}

/// Where a flow lives in the connection table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnSlot {
    /// Index of its set: the hash's low bits.
    pub set: u32,
    /// What its entry holds instead of the 40-byte key; never 0, which
    /// marks an empty way.
    pub fingerprint: u64,
}

impl ConnSlot {
    /// `mask`: the number of sets minus one (a power of two minus one).
    #[inline(always)]
    pub fn of(hash64: u64, mask: u32) -> Self {
        Self {
            set: hash64 as u32 & mask,
            fingerprint: if hash64 == 0 { 1 } else { hash64 },
        }
    }
}

/// Maps a 32-bit hash onto `0..ring_size` with a multiply and a shift
/// (Lemire's reduction) instead of a division.
#[inline(always)]
pub fn ring_slot(hash: u32, ring_size: u32) -> u32 {
    ((u64::from(hash) * u64::from(ring_size)) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, PROTO_TCP};

    fn key(src: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: [src, 0, 0, 0],
            dst: [0x0100_12c6, 0, 0, 0],
            sport,
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn seed_and_every_field_change_the_hash() {
        let base = key(1, 1000);
        assert_ne!(base.hash(0), base.hash(1));
        assert_ne!(base.hash(0), key(2, 1000).hash(0));
        assert_ne!(base.hash(0), key(1, 1001).hash(0));
        assert_eq!(base.source_hash(7), key(1, 2000).source_hash(7));
        assert_eq!(base.hash(3), ring_hash(base.hash64(3)));
    }

    #[test]
    fn conn_slots_take_the_low_bits_and_never_a_zero_fingerprint() {
        assert_eq!(ConnSlot::of(0x1234_5678_9abc_def5, 0xff).set, 0xf5);
        assert_eq!(ConnSlot::of(0, 0xff).fingerprint, 1);
        assert_eq!(ConnSlot::of(7, 0).fingerprint, 7);
    }

    #[test]
    fn slots_spread_evenly() {
        const SIZE: u32 = 65537;
        const FLOWS: u32 = 200_000;
        let mut buckets = [0u32; 16];
        for i in 0..FLOWS {
            let slot = ring_slot(key(i.wrapping_mul(2_654_435_761), i as u16).hash(42), SIZE);
            assert!(slot < SIZE);
            buckets[(slot * 16 / SIZE) as usize] += 1;
        }
        let expected = FLOWS / 16;
        for count in buckets {
            assert!(count.abs_diff(expected) < expected / 20, "{buckets:?}");
        }
    }
}
