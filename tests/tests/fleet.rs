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

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use xlb::{
    config,
    dataplane::Limits,
    etcd::StoreStatus,
    fleet_health::{FleetHealth, HealthValue, Holder},
    state::{AdminState, Backend, Cluster, DesiredState, Proto, Vip},
};
use xlb_tests::{
    exposition::{promtool_check, sample},
    fleet::{Fleet, PREFIX, Rings},
    plan::plan,
    privileged,
};

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");
/// The `xlb` arguments that create VIP `web` (a small ring: quick to
/// rebuild on every node).
const ADD_WEB: [&str; 6] = [
    "vip",
    "add",
    "web",
    "198.18.100.1:80",
    "--ring-size",
    "1009",
];
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
    let plan = plan(&node, state);
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

/// Every node's `/metrics` passes promtool, shows its watch up and, once
/// the fleet is quiet, etcd's current revision as the one applied: the
/// fleet has converged, as an operator would see it. (Nodes write their
/// health views into the store too, so the revision is read again after
/// the scrapes; if it moved, everything is measured again.)
fn assert_scraped_revisions(fleet: &Fleet, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let revision = fleet.revision();
        fleet.converge(revision);
        let scraped: Vec<String> = (0..fleet.nodes.len()).map(|i| fleet.scrape(i)).collect();
        if fleet.revision() == revision {
            for (i, text) in scraped.iter().enumerate() {
                promtool_check(text);
                assert_eq!(
                    sample(text, "xlb_store_applied_revision"),
                    Some(revision as f64),
                    "{what}: node {i}:\n{text}"
                );
                assert_eq!(
                    sample(text, "xlb_store_connected"),
                    Some(1.0),
                    "{what}: node {i}"
                );
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the store's revision never held still:\n{}",
            fleet.logs()
        );
    }
}

/// Waits (a minute at most: a guard, not a target) until node `i`'s store
/// status satisfies `done`.
fn wait_until(fleet: &Fleet, i: usize, what: &str, done: impl Fn(&StoreStatus) -> bool) {
    eventually(fleet, || {
        if done(&fleet.status(i).store.expect("store status")) {
            Ok(())
        } else {
            Err(format!("node {i} never {what}"))
        }
    })
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
    let said = fleet.ok(0, &ADD_WEB);
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
    assert_scraped_revisions(&fleet, "after changes through three nodes");

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
        let text = fleet.scrape(i);
        assert!(
            sample(&text, "xlb_store_reconnects_total") >= Some(1.0),
            "node {i}:\n{text}"
        );
        assert!(
            sample(&text, "xlb_store_last_error_timestamp_seconds") > Some(0.0),
            "node {i}:\n{text}"
        );
        assert_eq!(
            sample(&text, "xlb_store_malformed_values"),
            Some(3.0),
            "node {i}:\n{text}"
        );
    }
    assert_scraped_revisions(&fleet, "after etcd came back");

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

/// A TCP server on `addr:port` inside `host` that accepts and drops every
/// connection until the returned flag is set.
fn serve_tcp(
    fleet: &Fleet,
    host: &xlb::topology::Host,
    addr: Ipv4Addr,
    port: u16,
) -> Arc<AtomicBool> {
    let listener = host
        .run_in(|| TcpListener::bind((addr, port)))
        .expect("entering the backend")
        .unwrap_or_else(|err| panic!("listening on {addr}:{port}: {err}\n{}", fleet.logs()));
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok(_) => {}
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    stop
}

/// Polls `check` every 50 ms until it gives a value, for a minute at most
/// (a guard, not a target); then fails with what it last said and the
/// nodes' logs.
fn eventually<T>(fleet: &Fleet, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) => assert!(Instant::now() < deadline, "{why}\n{}", fleet.logs()),
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (a minute at most: a guard, not a target) until the health views
/// in etcd satisfy `done`.
fn wait_for_views(
    fleet: &Fleet,
    what: &str,
    done: impl Fn(&BTreeMap<String, HealthValue>) -> bool,
) {
    let root = format!("{PREFIX}/v1/health/");
    eventually(fleet, || {
        let views: BTreeMap<String, HealthValue> = fleet
            .get_prefix(&root)
            .into_iter()
            // Views only: `health/<node>` itself says who holds the name.
            .filter(|(k, _)| k[root.len()..].contains('/'))
            .map(|(k, v)| {
                let value = serde_json::from_str(&v).unwrap_or_else(|e| panic!("{k}: {v}: {e}"));
                (k, value)
            })
            .collect();
        if done(&views) {
            Ok(())
        } else {
            Err(format!("the health views never {what}: {views:#?}"))
        }
    })
}

/// Waits (a minute at most: a guard, not a target) until node `i`'s
/// `/metrics` shows `value` for the unlabelled `name`.
fn wait_for_metric(fleet: &Fleet, i: usize, name: &str, value: f64) {
    let text = eventually(fleet, || {
        let text = fleet.scrape(i);
        if sample(&text, name) == Some(value) {
            Ok(text)
        } else {
            Err(format!("node {i} never showed {name} {value}:\n{text}"))
        }
    });
    promtool_check(&text);
}

/// Two nodes probe the same two backends; one of them has no route to
/// backend b1. Each publishes its own view under `health/<node>/`, written
/// on change only; `xlb fleet health` shows both views and marks b1; a
/// stopped node's view goes away with its lease.
#[test]
fn each_node_publishes_its_view_of_health_and_disagreement_shows() {
    if !privileged() {
        return;
    }
    // Only the config's probe tables are used on etcd; the VIP itself comes
    // from the store.
    let probes = "[vip.web]\n\
                  addr = \"198.18.100.1\"\n\
                  port = 80\n\
                  probe = { kind = \"tcp\", port = 8080, interval = 0.3, timeout = 0.3, \
                  rise = 1, fall = 2, flap_backoff = 0 }\n";
    let mut fleet = Fleet::with_config("health", &[XLB.into()], 2, LIMITS, probes);
    let b1_addr = Ipv4Addr::new(198, 18, 0, 21);
    let b2_addr = Ipv4Addr::new(198, 18, 0, 22);
    let b1 = fleet.host("b1", b1_addr);
    let b2 = fleet.host("b2", b2_addr);
    let stops = [
        serve_tcp(&fleet, &b1, b1_addr, 8080),
        serve_tcp(&fleet, &b2, b2_addr, 8080),
    ];
    // Node 1 alone cannot reach b1: connecting fails at once, "unreachable".
    fleet.nodes[1]
        .host
        .ip(["route", "add", "unreachable", "198.18.0.21/32"])
        .expect("a route only node 1 has");

    add_web_east_b1(&fleet);
    fleet.ok(1, &["backend", "add", "web", "east", "b2", "198.18.0.22"]);

    let key = |node: &str, backend: &str| format!("{PREFIX}/v1/health/{node}/web/east/{backend}");
    wait_for_views(&fleet, "showed node 1 losing b1", |views| {
        views.len() == 4
            && views
                .get(&key("n1", "b1"))
                .is_some_and(|v| v.health == "down")
            && [key("n0", "b1"), key("n0", "b2"), key("n1", "b2")]
                .iter()
                .all(|k| views.get(k).is_some_and(|v| v.health == "up"))
    });
    let views = fleet.get_prefix(&format!("{PREFIX}/v1/health/"));
    let n1b1: HealthValue = serde_json::from_str(&views[&key("n1", "b1")]).expect("a view");
    assert_eq!(n1b1.addr, ip("198.18.0.21"));
    assert_eq!(n1b1.probe.as_deref(), Some("tcp:8080"));
    assert_eq!(n1b1.reason, "unreachable", "{n1b1:?}");
    assert!(n1b1.since.is_some(), "{n1b1:?}");

    // Written on change only: probes go on, the store stays where it is.
    let revision = fleet.revision();
    let probes = || -> u64 {
        (0..2)
            .map(|i| fleet.status(i).health.map_or(0, |h| h.probes))
            .sum()
    };
    let probes_before = probes();
    thread::sleep(Duration::from_secs(2));
    let probes_after = probes();
    assert!(probes_after > probes_before, "the nodes stopped probing");
    assert_eq!(
        fleet.revision(),
        revision,
        "health was written without a change"
    );
    // Never configuration: nothing is skipped as malformed, both nodes serve
    // the same rings (each without the backend it sees down).
    for i in 0..2 {
        let store = fleet.status(i).store.expect("store status");
        assert!(store.malformed.is_empty(), "node {i}: {store:?}");
    }

    // The command line, inside a node (where etcd is), marks b1 and says
    // so in its exit status.
    let out = fleet.xlb_inside(0, &["fleet", "health"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |name: &str| {
        shown
            .lines()
            .find(|l| l.split_whitespace().take(3).eq(["web", "east", name]))
            .unwrap_or_else(|| panic!("no row for {name}:\n{shown}"))
            .to_owned()
    };
    assert!(shown.contains("2 nodes (n0, n1)"), "{shown}");
    for (i, node) in fleet.nodes.iter().enumerate() {
        let holder = format!("\n  n{i}: pid ");
        assert!(shown.contains(&holder), "{shown}");
        assert!(shown.contains(&format!("({})", node.addr)), "{shown}");
    }
    let b1_row = row("b1");
    assert!(
        b1_row.contains("down (unreachable)") && b1_row.ends_with("DISAGREE"),
        "{shown}"
    );
    assert!(!row("b2").contains("DISAGREE"), "{shown}");
    assert!(
        shown.contains("1 of 2 backends seen differently"),
        "{shown}"
    );
    wait_for_metric(&fleet, 0, "xlb_fleet_health_disagreements", 1.0);
    let out = fleet.xlb_inside(1, &["--json", "fleet", "health"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let parsed: FleetHealth = serde_json::from_slice(&out.stdout).expect("fleet health as JSON");
    assert_eq!(parsed.disagreements(), 1, "{parsed:?}");
    assert_eq!(parsed.store, fleet.store_url());

    // A node stopped: its view expires with its lease; the other's stays.
    fleet.stop_node(1);
    wait_for_views(&fleet, "dropped node 1's view", |views| {
        views
            .keys()
            .all(|k| k.starts_with(&format!("{PREFIX}/v1/health/n0/")))
            && views.len() == 2
    });
    wait_for_metric(&fleet, 0, "xlb_fleet_health_disagreements", 0.0);
    let out = fleet.xlb_inside(0, &["fleet", "health"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("1 node (n0)") && !shown.contains("DISAGREE"),
        "{shown}"
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // A check that expects two nodes finds one missing.
    let out = fleet.xlb_inside(0, &["fleet", "health", "--min-nodes", "2"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(shown.contains("1 node publishes, 2 expected"), "{shown}");
    // Not having looked is never a verdict on the fleet: 2, with why.
    for (i, args, why) in [
        (
            0,
            &["fleet", "health", "--store", "etcd://127.0.0.1:9/fleet"][..],
            "etcd at etcd://127.0.0.1:9/fleet",
        ),
        (
            0,
            &["fleet", "health", "--store", "http://127.0.0.1:9/fleet"][..],
            "does not start with etcd://",
        ),
        (1, &["fleet", "health"][..], "no xlb daemon"),
        (
            0,
            &["fleet", "health", "--min-nodes", "two"][..],
            "invalid value",
        ),
    ] {
        let out = fleet.xlb_inside(i, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "xlb {args:?}: {out:?}");
        assert!(stderr.contains(why), "xlb {args:?}: {stderr}");
    }
    assert!(
        fleet.log(1).contains(&format!(
            "publishes its health view under {PREFIX}/v1/health/n1/ (lease"
        )),
        "node 1 never said where it publishes:\n{}",
        fleet.log(1)
    );
    for stop in stops {
        stop.store(true, Ordering::Relaxed);
    }
    fleet.close();
}

/// Who holds node name `node` in the store, if anyone.
fn holder(fleet: &Fleet, node: &str) -> Option<Holder> {
    let key = format!("{PREFIX}/v1/health/{node}");
    let value = fleet.get_prefix(&key).remove(&key)?;
    Some(serde_json::from_str(&value).unwrap_or_else(|e| panic!("{key}: {value}: {e}")))
}

/// Waits (a minute at most: a guard, not a target) until node name `node`
/// is held by the node at `addr` (None: by nobody).
fn wait_for_holder(fleet: &Fleet, node: &str, addr: Option<Ipv4Addr>) {
    eventually(fleet, || {
        let held = holder(fleet, node);
        if held.as_ref().map(|h| h.addrs.clone()) == addr.map(|a| vec![IpAddr::V4(a)]) {
            Ok(())
        } else {
            Err(format!("node name {node} never went to {addr:?}: {held:?}"))
        }
    })
}

/// Node `i`'s config with `from` replaced by `to`.
fn edit_config(fleet: &Fleet, i: usize, from: &str, to: &str) {
    let path = &fleet.nodes[i].config;
    let text = fs::read_to_string(path).expect("a node's config");
    assert!(text.contains(from), "{from:?} not in {text}");
    fs::write(path, text.replace(from, to)).expect("writing a node's config");
}

/// Through node 0: VIP `web` with cluster `east` and its backend `b1`
/// (198.18.0.21), which both nodes then probe.
fn add_web_east_b1(fleet: &Fleet) {
    fleet.ok(0, &ADD_WEB);
    fleet.ok(0, &["cluster", "add", "web", "east"]);
    fleet.ok(0, &["backend", "add", "web", "east", "b1", "198.18.0.21"]);
}

/// Two daemons given one node name (here the same `node.name`; the same
/// host name without one is the same case) never publish under it
/// together:
/// - a node that finds its name held by a live node waits out that node's
///   lease, then refuses to start, naming the holder and what to set;
/// - a node that loses its name while cut off from etcd (its lease ran out
///   and the other node took the name) does not take it back: it stops
///   publishing and says so in its log, status and metrics, until the
///   name is free again;
/// - a later run of the same node takes its name over at once.
#[test]
fn two_nodes_never_publish_under_one_name() {
    if !privileged() {
        return;
    }
    let mut fleet = Fleet::new("names", &[XLB.into()], 2, LIMITS);
    let [a0, a1] = [fleet.nodes[0].addr, fleet.nodes[1].addr];
    add_web_east_b1(&fleet);
    wait_for_holder(&fleet, "n0", Some(a0));
    wait_for_holder(&fleet, "n1", Some(a1));
    let view = |node: &str| format!("{PREFIX}/v1/health/{node}/web/east/b1");
    wait_for_views(&fleet, "showed both nodes' views", |views| {
        views.contains_key(&view("n0")) && views.contains_key(&view("n1"))
    });

    // -- Node 1, renamed n0 by mistake, refuses to start.
    fleet.stop_node(1);
    edit_config(&fleet, 1, "name = \"n1\"", "name = \"n0\"");
    let said = refused_start(&fleet, 1);
    for words in [
        "waiting up to".to_owned(),
        format!(
            "node name \"n0\" is in use in the fleet at {} by another node: pid",
            fleet.store_url()
        ),
        format!("({a0}), pins {}", fleet.nodes[0].pin_dir.display()),
        format!("(key {PREFIX}/v1/health/n0, held for longer than its lease)"),
        "another node.name in its config".to_owned(),
    ] {
        assert!(said.contains(&words), "{words:?} not in:\n{said}");
    }
    let first = holder(&fleet, "n0").expect("a holder");
    assert_eq!(first.addrs, vec![IpAddr::V4(a0)]);
    // So does a second daemon of node 0 itself (same machine, namespace
    // and pins: not an earlier run, since the first one still runs).
    let said = refused_start(&fleet, 0);
    let running = format!("by another node: pid {} on host", first.pid);
    assert!(said.contains(&running), "{said}");
    assert_eq!(holder(&fleet, "n0"), Some(first));

    // -- Node 0 cut off until its lease runs out: node 1 (as n0) may start
    //    and takes the name.
    fleet.cut_off(0, true);
    wait_for_holder(&fleet, "n0", None);
    fleet.start_node(1);
    wait_for_holder(&fleet, "n0", Some(a1));
    wait_for_views(&fleet, "showed node 1's view as n0", |views| {
        views.contains_key(&view("n0"))
    });
    // Back on the network, node 0 finds its name taken: it stops
    // publishing and says so; the name stays node 1's.
    fleet.cut_off(0, false);
    wait_for_metric(&fleet, 0, "xlb_fleet_node_name_held_elsewhere", 1.0);
    let text = fleet.scrape(0);
    assert_eq!(
        sample(&text, "xlb_fleet_node_name_conflicts_total"),
        Some(1.0),
        "{text}"
    );
    let store = fleet.status(0).store.expect("store status");
    assert_eq!(store.node, "n0");
    let held_by = store.name_held_by.expect("the holder, in the status");
    assert!(held_by.contains(&format!("({a1})")), "{held_by}");
    let shown = fleet.ok(0, &["status"]);
    assert!(
        shown.contains("node name:  n0 HELD BY ANOTHER NODE"),
        "{shown}"
    );
    assert!(
        fleet
            .log(0)
            .contains("node name \"n0\" is held by another node: pid"),
        "{}",
        fleet.log(0)
    );
    assert_eq!(
        holder(&fleet, "n0").map(|h| h.addrs),
        Some(vec![IpAddr::V4(a1)])
    );
    let out = fleet.xlb_inside(0, &["fleet", "health"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!(
            "n0: pid {}",
            holder(&fleet, "n0").expect("a holder").pid
        )),
        "{shown}"
    );

    // -- Node 1 stops: once its lease runs out, node 0 takes its name back.
    fleet.stop_node(1);
    wait_for_holder(&fleet, "n0", Some(a0));
    wait_for_metric(&fleet, 0, "xlb_fleet_node_name_held_elsewhere", 0.0);
    assert!(
        fleet
            .log(0)
            .contains("node name \"n0\" is this node's again"),
        "{}",
        fleet.log(0)
    );
    wait_for_views(&fleet, "showed node 0's view again", |views| {
        views.contains_key(&view("n0"))
    });

    // -- A later run of node 0, well within its lease, takes the name over
    //    at once: it is the same node (same machine, namespace and pins).
    edit_config(&fleet, 0, "health_lease = 3", "health_lease = 120");
    fleet.stop_node(0);
    fleet.start_node(0);
    wait_for_holder(&fleet, "n0", Some(a0));
    fleet.stop_node(0);
    let pid_before = holder(&fleet, "n0").expect("a holder").pid;
    let earlier = fleet.log(0).len();
    fleet.start_node(0);
    let log = fleet.log(0)[earlier..].to_owned();
    assert!(
        log.contains("node name \"n0\" taken over from this node's previous run (pid")
            && !log.contains("waiting up to"),
        "{log}"
    );
    let taken = holder(&fleet, "n0").expect("a holder");
    assert_ne!(taken.pid, pid_before, "{taken:?}");
    assert_eq!(taken.addrs, vec![IpAddr::V4(a0)]);
    fleet.close();
}

/// Runs `xlb run` with node `i`'s config in its namespace, which must
/// exit with status 1 (a minute at most: a guard, not a target); returns
/// what it said.
fn refused_start(fleet: &Fleet, i: usize) -> String {
    let node = &fleet.nodes[i];
    let log = node.config.with_file_name("refused.log");
    let stderr = fs::File::create(&log).expect("a log");
    let mut command = node.host.command(XLB);
    command
        .args(["run", "--config"])
        .arg(&node.config)
        .args(["--store", &fleet.store_url()])
        .stderr(stderr);
    let refused = node.host.spawn(&mut command).expect("starting xlb run");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = refused.try_wait().expect("polling xlb run") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "node {i}'s xlb run started:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(50));
    };
    let said = fs::read_to_string(&log).expect("its log");
    assert_eq!(status.code(), Some(1), "{said}");
    said
}
