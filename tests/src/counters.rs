//! Counter snapshots and the deltas a test asserts on: which global verdict
//! and reason counters a packet moved, and what it added to its VIP's and
//! backend's traffic.

use std::collections::BTreeMap;

use lb_common::{Counter, Traffic};
use xlb::dataplane::CounterReader;

/// Whether the counter is a verdict (every packet moves exactly one) rather
/// than a reason.
pub fn is_verdict(counter: Counter) -> bool {
    xlb::metrics::verdict_of(counter).is_some()
}

pub fn traffic(packets: u64, bytes: u64, new_flows: u64) -> Traffic {
    Traffic {
        packets,
        bytes,
        new_flows,
    }
}

/// Every counter at one moment, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub global: Vec<(Counter, u64)>,
    pub vips: Vec<Traffic>,
    pub backends: Vec<Traffic>,
}

impl Snapshot {
    pub fn read(reader: &CounterReader, max_vips: u32, max_backends: u32) -> Self {
        let global = reader.all_global().expect("reading COUNTERS");
        let vips = (0..max_vips)
            .map(|id| reader.vip(id).expect("reading VIP_STATS"))
            .collect();
        let backends = (0..max_backends)
            .map(|id| reader.backend(id).expect("reading BACKEND_STATS"))
            .collect();
        Self {
            global,
            vips,
            backends,
        }
    }

    /// What moved between `before` and this snapshot.
    pub fn since(&self, before: &Snapshot) -> Delta {
        let global = self
            .global
            .iter()
            .zip(&before.global)
            .map(|((counter, now), (_, then))| (*counter, now - then))
            .filter(|(_, moved)| *moved != 0)
            .collect();
        let diff = |now: &[Traffic], then: &[Traffic]| -> BTreeMap<u32, Traffic> {
            now.iter()
                .zip(then)
                .enumerate()
                .map(|(id, (now, then))| {
                    let moved = traffic(
                        now.packets - then.packets,
                        now.bytes - then.bytes,
                        now.new_flows - then.new_flows,
                    );
                    (id as u32, moved)
                })
                .filter(|(_, moved)| *moved != Traffic::default())
                .collect()
        };
        Delta {
            global,
            vips: diff(&self.vips, &before.vips),
            backends: diff(&self.backends, &before.backends),
        }
    }
}

/// Counters that moved, and by how much; counters that did not move are
/// left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// In `Counter::ALL` order.
    pub global: Vec<(Counter, u64)>,
    pub vips: BTreeMap<u32, Traffic>,
    pub backends: BTreeMap<u32, Traffic>,
}

impl Delta {
    pub fn count(&self, counter: Counter) -> u64 {
        self.global
            .iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, n)| *n)
    }

    pub fn vip(&self, id: u32) -> Traffic {
        self.vips.get(&id).copied().unwrap_or_default()
    }

    pub fn backend(&self, id: u32) -> Traffic {
        self.backends.get(&id).copied().unwrap_or_default()
    }

    /// Packets that got a verdict.
    pub fn verdicts(&self) -> u64 {
        self.global
            .iter()
            .filter(|(c, _)| is_verdict(*c))
            .map(|(_, n)| n)
            .sum()
    }

    /// Asserts that exactly these global counters moved, each by the number
    /// of times it is listed, and no other.
    #[track_caller]
    pub fn assert_counters(&self, expected: &[Counter]) {
        let mut want: BTreeMap<Counter, u64> = BTreeMap::new();
        for counter in expected {
            *want.entry(*counter).or_default() += 1;
        }
        let got: BTreeMap<Counter, u64> = self.global.iter().copied().collect();
        assert_eq!(
            named(&got),
            named(&want),
            "global counters moved (left) differ from the expected (right)"
        );
    }

    /// Asserts that no VIP or backend traffic counter moved.
    #[track_caller]
    pub fn assert_no_traffic(&self) {
        assert!(
            self.vips.is_empty() && self.backends.is_empty(),
            "traffic counters moved: VIPs {:?}, backends {:?}",
            self.vips,
            self.backends
        );
    }
}

fn named(counters: &BTreeMap<Counter, u64>) -> Vec<(&'static str, u64)> {
    counters.iter().map(|(c, n)| (c.name(), *n)).collect()
}
