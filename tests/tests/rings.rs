//! The ring storage as the kernel reads it. The ring table stores 16-bit
//! slots, 32 to a line, into shared mappings of `RINGS`, made piece by piece
//! (16 MiB, 2^18 lines or 2^23 slots, each) as slots are first used:
//! wherever a ring lies, across a piece's edge or at the very end of the
//! storage, map lookups return what was written, and so does the ring table
//! of the next process.

use lb_common::map_names;
use xlb::dataplane::{Dataplane, Limits, RingWrites};
use xlb_tests::{
    bpffs::{BpfFs, pinned_ring},
    privileged,
};

/// Slots in one mapped piece (`CHUNK_BYTES` in the ring table).
const PIECE: u32 = 1 << 23;
const LIMITS: Limits = Limits {
    max_vips: 8,
    max_backends: 64,
    ring_capacity: 2 * PIECE + 4099,
    conntrack_size: 4096,
};

/// A ring of `len` slots whose values tell slots apart.
fn ring(len: u32, salt: u32) -> Vec<u32> {
    (0..len).map(|i| (i * 7 + salt) % 64).collect()
}

#[test]
fn every_slot_written_anywhere_in_the_storage_is_what_the_kernel_reads() {
    if !privileged() {
        return;
    }
    let bpffs = BpfFs::mount("rings");
    let dir = bpffs.pin_dir();
    let mut dp = Dataplane::load_pinned(LIMITS, &dir).expect("loading the data plane");
    assert_eq!(dp.rings.writes(), RingWrites::Mapped);
    let end = LIMITS.ring_capacity;
    // (offset, length): the first slots, across the first and the second
    // piece's end, and the last slots of the storage.
    let places = [
        (0, 1000),
        (PIECE - 500, 1000),
        (2 * PIECE - 1, 2),
        (end - 1000, 1000),
    ];
    for (salt, (offset, len)) in (0..).zip(places) {
        dp.rings
            .write(offset, &ring(len, salt))
            .expect("writing RINGS");
    }
    for (salt, (offset, len)) in (0..).zip(places) {
        assert_eq!(
            pinned_ring(&dir, offset, len),
            ring(len, salt),
            "at {offset}"
        );
    }
    // One past the end is refused, not written anywhere; so is a backend
    // id that does not fit a slot's 16 bits.
    assert!(dp.rings.write(end - 1, &[1, 2]).is_err());
    assert!(dp.rings.write(0, &[1, 1 << 16]).is_err());
    assert_eq!(pinned_ring(&dir, 0, 2), ring(2, 0), "nothing written");

    // A slot-by-slot update across a piece's edge.
    let (offset, len) = places[1];
    let mut changed = ring(len, 1);
    for slot in changed.iter_mut().step_by(3) {
        *slot = 63;
    }
    let written = dp
        .rings
        .update(offset, &ring(len, 1), &changed)
        .expect("updating RINGS");
    assert_eq!(
        written,
        ring(len, 1)
            .iter()
            .zip(&changed)
            .filter(|(a, b)| a != b)
            .count()
    );
    assert_eq!(pinned_ring(&dir, offset, len), changed);

    // The next process reads the same rings through its own mappings.
    drop(dp);
    let dp = Dataplane::load_pinned(LIMITS, &dir).expect("loading again");
    assert!(dp.reused_maps().contains(&map_names::RINGS));
    assert_eq!(dp.rings.writes(), RingWrites::Mapped);
    for (salt, (offset, len)) in (0..).zip(places) {
        let expected = if offset == places[1].0 {
            changed.clone()
        } else {
            ring(len, salt)
        };
        assert_eq!(
            dp.rings.read(offset, len).expect("reading RINGS"),
            expected,
            "at {offset}"
        );
    }
    dp.detach_all().expect("removing the pins");
}
