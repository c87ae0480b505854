//! The flow hash and the ring-slot mapping.
//!
//! Both run in the XDP program and in userspace (tests, tools that predict a
//! flow's backend), so they live here once. The hash is the tail and
//! avalanche stages of xxHash32: a multiply and a rotate per word, no
//! tables, no loops the verifier must bound, and a good spread over the ring.

use crate::{FAMILY_V6, FlowKey};

const PRIME_2: u32 = 0x85eb_ca77;
const PRIME_3: u32 = 0xc2b2_ae3d;
const PRIME_4: u32 = 0x27d4_eb2f;
const PRIME_5: u32 = 0x1656_67b1;

/// Incremental hash over 32-bit words.
#[derive(Clone, Copy, Debug)]
pub struct FlowHasher(u32);

impl FlowHasher {
    #[inline(always)]
    pub fn new(seed: u32) -> Self {
        Self(seed.wrapping_add(PRIME_5))
    }

    #[inline(always)]
    pub fn write(self, word: u32) -> Self {
        Self(
            self.0
                .wrapping_add(word.wrapping_mul(PRIME_3))
                .rotate_left(17)
                .wrapping_mul(PRIME_4),
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
    pub fn finish(self) -> u32 {
        let mut h = self.0;
        h ^= h >> 15;
        h = h.wrapping_mul(PRIME_2);
        h ^= h >> 13;
        h = h.wrapping_mul(PRIME_3);
        h ^ (h >> 16)
    }
}

impl FlowKey {
    /// The hash that picks this flow's ring slot. Ports that are zero (a
    /// fragment) simply hash as zero, which makes it a hash of
    /// (source, destination, protocol).
    #[inline(always)]
    pub fn hash(&self, seed: u32) -> u32 {
        FlowHasher::new(seed)
            .write_addr(self.family, &self.src)
            .write_addr(self.family, &self.dst)
            .write(u32::from(self.sport) << 16 | u32::from(self.dport))
            .write(u32::from(self.proto))
            .finish()
    }

    /// The client-affinity hash: the source address alone.
    #[inline(always)]
    pub fn source_hash(&self, seed: u32) -> u32 {
        FlowHasher::new(seed)
            .write_addr(self.family, &self.src)
            .finish()
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
