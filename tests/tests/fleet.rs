//! A fleet of xlb nodes on one etcd, end to end: a real etcd (started by
//! the test in a namespace of its own, on a temporary data directory) and
//! three real `xlb run --store etcd://...` daemons, each in its own
//! namespace with the balancer attached to its `eth0` (see
//! [`xlb_tests::fleet`]).
//!
//! [`a_fleet_on_etcd_agrees_through_changes_bad_values_and_a_store_outage`]
//! checks, in order:
//! - changes made through *different* nodes' command lines reach every node,
//!   and every node's kernel maps then hold, slot for slot, the rings
//!   Maglev computes for the expected state;
//! - three operators editing different backends at once, through three
//!   nodes, lose none of their edits;
//! - values written into etcd by hand: a malformed one, one the node cannot
//!   serve and one with an unknown field are reported (status, log) and
//!   skipped, while a good one written beside them is applied;
//! - etcd killed: every node says so in its status, keeps its rings, and a
//!   change through the command line is refused with nothing changed;
//!   etcd started again on its data: every node reconnects, nothing is
//!   lost, and the next change reaches every node;
//! - one node cut off the network while the others change things and etcd
//!   compacts its history: back on the network, it reads everything again
//!   and serves what the others do.

use std::{collections::BTreeMap, net::IpAddr, thread, time::Duration};

use xlb::{
    config,
    dataplane::Limits,
    etcd::StoreStatus,
    reconcile::{NodeOptions, Reconciler},
    state::{AdminState, Backend, Cluster, DesiredState, Proto, Vip},
};
use xlb_tests::{
    fleet::{Fleet, PREFIX, Rings},
    privileged,
};

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");
const LIMITS: Limits = Limits {
    max_vips: 8,
    max_backends: 64,
    ring_capacity: 3 * 65537,
    conntrack_size: 4096,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

fn backend(name: &str, addr: &str, weight: u32, admin: AdminState) -> Backend {
    Backend {
        admin,
        ..Backend::new(name, ip(addr), weight)
    }
}

/// What Maglev makes of `state` on these nodes, as [`Fleet::rings`] reads
/// the kernel.
fn planned(fleet: &Fleet, state: &DesiredState) -> Rings {
    let node = config::load(&fleet.nodes[0].config)
        .expect("the fleet's config")
        .node;
    let plan = Reconciler::new(
        NodeOptions {
            hash_seed: node.hash_seed,
            policy: node.policy.clone(),
        },
        node.limits.max_vips,
        node.limits.max_backends,
        node.limits.ring_capacity,
    )
    .plan(state, &BTreeMap::new())
    .expect("planning the expected state");
    plan.vips
        .values()
        .map(|vip| {
            let ring = vip
                .ring
                .iter()
                .map(|id| plan.backends.get(id).map(|b| b.addr))
                .collect();
            (vip.key, (vip.info.ring_size, vip.info.flags, ring))
        })
        .collect()
}

/// Every node has programmed the store's current revision, is connected,
/// and holds exactly Maglev's rings for `state`.
fn assert_fleet_serves(fleet: &Fleet, state: &DesiredState, what: &str) {
    let revision = fleet.revision();
    fleet.converge(revision);
    let want = planned(fleet, state);
    for i in 0..fleet.nodes.len() {
        let status = fleet.status(i);
        let store = status.store.expect("a node on etcd shows its store");
        assert!(store.connected, "{what}: node {i}: {store:?}");
        assert!(
            store.applied_revision >= revision,
            "{what}: node {i}: {store:?}"
        );
        let got = fleet.rings(i);
        assert!(
            got == want,
            "{what}: node {i}'s kernel rings differ from Maglev's for the expected state \
             ({} VIPs there, {} expected)\n{}",
            got.len(),
            want.len(),
            fleet.logs()
        );
    }
}

/// Waits (a minute at most: a guard, not a target) until node `i`'s store
/// status satisfies `done`.
fn wait_until(fleet: &Fleet, i: usize, what: &str, done: impl Fn(&StoreStatus) -> bool) {
    let mut waited = Duration::ZERO;
    while !done(&fleet.status(i).store.expect("store status")) {
        assert!(
            waited < Duration::from_secs(60),
            "node {i} never {what}:\n{}",
            fleet.logs()
        );
        thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
    }
}

#[test]
fn a_fleet_on_etcd_agrees_through_changes_bad_values_and_a_store_outage() {
    if !privileged() {
        return;
    }
    let mut fleet = Fleet::new("agree", &[XLB.into()], 3, LIMITS);
    for i in 0..3 {
        let store = fleet.status(i).store.expect("store status");
        assert_eq!(store.url, fleet.store_url());
        assert!(store.connected && store.malformed.is_empty(), "{store:?}");
    }

    // -- Changes through different nodes' command lines.
    let said = fleet.ok(
        0,
        &[
            "vip",
            "add",
            "web",
            "198.18.100.1:80",
            "--ring-size",
            "1009",
        ],
    );
    assert!(said.contains("etcd revision"), "{said}");
    fleet.ok(1, &["cluster", "add", "web", "east", "--weight", "2"]);
    fleet.ok(2, &["cluster", "add", "web", "west"]);
    for (node, cluster, name, addr) in [
        (0, "east", "e1", "198.18.0.21"),
        (1, "east", "e2", "198.18.0.22"),
        (2, "east", "e3", "198.18.0.23"),
        (0, "west", "w1", "198.18.0.31"),
        (1, "west", "w2", "198.18.0.32"),
    ] {
        fleet.ok(node, &["backend", "add", "web", cluster, name, addr]);
    }
    fleet.ok(1, &["backend", "drain", "web", "east", "e1"]);
    fleet.ok(2, &["backend", "weight", "web", "west", "w1", "3"]);
    fleet.ok(0, &["backend", "del", "web", "west", "w2"]);

    let mut web = Vip::new("web", ip("198.18.100.1"), 80, Proto::Tcp);
    web.ring_size = 1009;
    let mut east = Cluster::new("east", 2, 0);
    for b in [
        backend("e1", "198.18.0.21", 1, AdminState::Drained),
        backend("e2", "198.18.0.22", 1, AdminState::Enabled),
        backend("e3", "198.18.0.23", 1, AdminState::Enabled),
    ] {
        east.backends.insert(b.name.clone(), b);
    }
    let mut west = Cluster::new("west", 1, 0);
    let w1 = backend("w1", "198.18.0.31", 3, AdminState::Enabled);
    west.backends.insert(w1.name.clone(), w1);
    web.clusters.insert("east".into(), east);
    web.clusters.insert("west".into(), west);
    let mut expected = DesiredState::default();
    expected.vips.insert("web".into(), web);
    assert_fleet_serves(&fleet, &expected, "after changes through three nodes");

    // -- Three operators at once, on different backends, through three
    //    nodes: every edit lands.
    thread::scope(|scope| {
        for (node, name) in [(0, "e2"), (1, "e3"), (2, "w1")] {
            let fleet = &fleet;
            let cluster = if name == "w1" { "west" } else { "east" };
            scope.spawn(move || {
                for weight in 2..=6 {
                    let weight = weight.to_string();
                    fleet.ok(node, &["backend", "weight", "web", cluster, name, &weight]);
                }
            });
        }
    });
    for (cluster, name) in [("east", "e2"), ("east", "e3"), ("west", "w1")] {
        let b = expected
            .vips
            .get_mut("web")
            .unwrap()
            .clusters
            .get_mut(cluster)
            .unwrap();
        b.backends.get_mut(name).unwrap().weight = 6;
    }
    assert_fleet_serves(&fleet, &expected, "after concurrent edits");

    // -- Values written by hand: three bad ones skipped, a good one applied.
    let key = |name: &str| format!("{PREFIX}/v1/backends/web/east/{name}");
    fleet.put(&[
        (key("garbled"), "{\"addr\": \"198.18.0.41\", ".to_owned()),
        (key("vipself"), "{\"addr\": \"198.18.100.1\"}".to_owned()),
        (
            key("typo"),
            "{\"addr\": \"198.18.0.43\", \"wieght\": 2}".to_owned(),
        ),
        (
            key("e4"),
            "{\"addr\": \"198.18.0.24\", \"weight\": 2}".to_owned(),
        ),
    ]);
    let e4 = backend("e4", "198.18.0.24", 2, AdminState::Enabled);
    let web = expected.vips.get_mut("web").unwrap();
    web.clusters
        .get_mut("east")
        .unwrap()
        .backends
        .insert("e4".into(), e4);
    assert_fleet_serves(&fleet, &expected, "after bad values beside a good one");
    for i in 0..3 {
        let store = fleet.status(i).store.expect("store status");
        let skipped: Vec<&str> = store.malformed.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(
            skipped,
            [key("garbled"), key("typo"), key("vipself")],
            "node {i}: {store:?}"
        );
        assert!(store.malformed_total >= 3, "node {i}: {store:?}");
        let why = |k: &str| {
            let found = store.malformed.iter().find(|m| m.key == key(k));
            found.map(|m| m.problem.clone()).unwrap_or_default()
        };
        assert!(why("garbled").contains("EOF"), "{}", why("garbled"));
        assert!(
            why("typo").contains("unknown field `wieght`"),
            "{}",
            why("typo")
        );
        assert!(
            why("vipself").contains("VIP's own address"),
            "{}",
            why("vipself")
        );
        let shown = fleet.ok(i, &["status"]);
        assert!(
            shown.contains(&format!("skipped {}", key("typo"))),
            "{shown}"
        );
    }
    assert!(
        fleet
            .logs()
            .contains(&format!("skipping {}", key("garbled")))
    );

    // -- etcd killed: every node keeps its rings and says so.
    let before: Vec<Rings> = (0..3).map(|i| fleet.rings(i)).collect();
    fleet.kill_etcd();
    for i in 0..3 {
        wait_until(&fleet, i, "noticed etcd is gone", |s| !s.connected);
        let shown = fleet.ok(i, &["status"]);
        assert!(shown.contains("UNREACHABLE"), "{shown}");
    }
    let refused = fleet.xlb(0, &["backend", "undrain", "web", "east", "e1"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a change without a store was accepted"
    );
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    for (i, rings) in before.iter().enumerate() {
        assert!(
            fleet.rings(i) == *rings,
            "node {i}'s rings changed without a store"
        );
    }

    // -- etcd back on its data: nothing lost, and changes flow again.
    fleet.start_etcd();
    assert_fleet_serves(&fleet, &expected, "after etcd came back");
    fleet.ok(2, &["backend", "undrain", "web", "east", "e1"]);
    let web = expected.vips.get_mut("web").unwrap();
    web.clusters
        .get_mut("east")
        .unwrap()
        .backends
        .get_mut("e1")
        .unwrap()
        .admin = AdminState::Enabled;
    assert_fleet_serves(&fleet, &expected, "after a change once etcd came back");
    for i in 0..3 {
        let store = fleet.status(i).store.expect("store status");
        assert!(store.reconnects >= 1, "node {i}: {store:?}");
        assert_eq!(store.last_error, None, "node {i}: {store:?}");
    }

    // -- One node cut off while the others change things and etcd compacts
    //    its history: back on the network, it reads everything again.
    fleet.cut_off(2, true);
    wait_until(&fleet, 2, "noticed it is cut off", |s| !s.connected);
    fleet.ok(0, &["backend", "drain", "web", "east", "e2"]);
    fleet.ok(1, &["backend", "del", "web", "east", "e3"]);
    let east = expected
        .vips
        .get_mut("web")
        .unwrap()
        .clusters
        .get_mut("east")
        .unwrap();
    east.backends.get_mut("e2").unwrap().admin = AdminState::Drained;
    east.backends.remove("e3");
    fleet.compact();
    fleet.cut_off(2, false);
    assert_fleet_serves(
        &fleet,
        &expected,
        "after a cut-off node came back past a compaction",
    );
    assert!(
        fleet.logs().contains("compacted away"),
        "node 2 did not read everything again:\n{}",
        fleet.logs()
    );
    fleet.close();
}
