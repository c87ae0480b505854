//! The connection table read from userspace two ways: through a read-only
//! shared mapping of `CONNTRACK` (how xlb reads a whole table: on a restart
//! and for `/metrics`) and one map lookup per set (how it reads a table
//! pinned before it was mmapable, see `restart.rs`). On a table filled by
//! the real program from real packets, both must read the same sets, and
//! what the controller derives from them must be the same and right.

use lb_common::{ConnSlot, Counter, FlowKey, FlowSet};
use xlb::dataplane::{ConnReader, ConnReads, Dataplane};
use xlb_tests::*;

/// Every set of the table, as `reader` reads it.
fn all_sets(dp: &Dataplane, reader: &ConnReader<'_>) -> Vec<FlowSet> {
    let mut sets = Vec::new();
    reader
        .scan(0..dp.conntrack.geometry().sets, |index, set| {
            assert_eq!(index as usize, sets.len(), "sets come in order");
            sets.push(*set);
        })
        .expect("reading CONNTRACK");
    sets
}

fn flows_in(sets: &[FlowSet]) -> u64 {
    sets.iter()
        .flat_map(|set| set.ways.iter())
        .filter(|entry| entry.fingerprint != 0)
        .count() as u64
}

/// The backend `sets` hold for `flow`, looked up as the program does.
fn backend_in(sets: &[FlowSet], flow: &FlowKey) -> Option<u32> {
    let slot = ConnSlot::of(flow.hash64(HASH_SEED), sets.len() as u32 - 1);
    sets[slot.set as usize]
        .ways
        .iter()
        .find(|entry| entry.fingerprint == slot.fingerprint)
        .map(|entry| u32::from(entry.backend_id))
}

#[test]
fn mapped_and_per_syscall_reads_agree_on_a_table_filled_by_packets() {
    let Some(mut fx) = Fixture::new() else {
        return;
    };
    assert_eq!(fx.dp.conntrack.reads(), ConnReads::Mapped, "a fresh table");

    // Nearly as many flows as the table holds (4096), over three VIPs of
    // both families: most sets fill, some overflow and evict.
    let mut sent = Vec::new();
    for sport in 1024..2524 {
        sent.push(Pkt::tcp_syn(CLIENT_V4, sport, WEB_V4.addr, WEB_V4.port));
        sent.push(Pkt::tcp_syn(CLIENT_V6, sport, WEB_V6.addr, WEB_V6.port));
    }
    for sport in 1024..2024 {
        sent.push(Pkt::udp(CLIENT_V4, sport, DNS_V4.addr, DNS_V4.port));
    }
    let before = fx.counters();
    for pkt in &sent {
        assert_eq!(fx.run(&pkt.build()).action, Action::Tx, "{pkt:?}");
    }
    let evicted = fx.counters().since(&before).count(Counter::ConnEvicted);
    assert!(evicted > 0, "the table overflowed somewhere");

    let mapped = fx.dp.conntrack.reader(ConnReads::Mapped).expect("mmapable");
    let syscall = fx
        .dp
        .conntrack
        .reader(ConnReads::PerSetSyscall)
        .expect("any table can be read per syscall");
    let sets = all_sets(&fx.dp, &mapped);
    assert_eq!(sets, all_sets(&fx.dp, &syscall), "the same sets either way");

    // What the program recorded: every flow it did not evict, to the
    // backend its lookup finds.
    let stored = flows_in(&sets);
    assert_eq!(stored, sent.len() as u64 - evicted);
    for pkt in &sent {
        assert_eq!(backend_in(&sets, &pkt.flow()), fx.tracked(&pkt.flow()));
    }

    let newest = [WEB_V4, WEB_V6, DNS_V4]
        .iter()
        .map(|vip| fx.dp.vips.get(&vip.key()).expect("programmed").generation)
        .max();
    assert_eq!(mapped.newest_generation().ok(), newest);
    assert_eq!(syscall.newest_generation().ok(), newest);
    assert_eq!(fx.dp.conntrack.newest_generation().ok(), newest);

    let sets_in_table = fx.dp.conntrack.geometry().sets;
    for reader in [&mapped, &syscall] {
        let all = reader.occupancy(sets_in_table).expect("counting");
        assert_eq!(
            (all.used, all.sampled_sets, all.estimate()),
            (stored, sets_in_table, stored),
            "{:?} reads count every flow",
            reader.reads()
        );
        // A sample reads fewer sets, and says how many.
        let sample = reader.occupancy(sets_in_table / 4).expect("sampling");
        assert_eq!(sample.sampled_sets, sets_in_table / 4);
        assert!(sample.used <= stored);
    }
}

#[test]
fn an_empty_table_reads_as_empty_either_way() {
    let Some(fx) = Fixture::new() else {
        return;
    };
    for reads in [ConnReads::Mapped, ConnReads::PerSetSyscall] {
        let reader = fx.dp.conntrack.reader(reads).expect("a reader");
        assert_eq!(flows_in(&all_sets(&fx.dp, &reader)), 0);
        assert_eq!(reader.newest_generation().ok(), Some(0));
        assert_eq!(reader.occupancy(u32::MAX).expect("counting").used, 0);
    }
}

#[test]
fn a_scan_past_the_table_is_refused() {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let sets = fx.dp.conntrack.geometry().sets;
    for reads in [ConnReads::Mapped, ConnReads::PerSetSyscall] {
        let reader = fx.dp.conntrack.reader(reads).expect("a reader");
        let err = reader
            .scan(sets - 1..sets + 1, |_, _| {})
            .expect_err("a set past the end");
        assert!(
            err.to_string().contains("connection-table set"),
            "{reads:?}: {err}"
        );
    }
}
