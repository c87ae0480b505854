//! The reconcile step against the real kernel: what the plan says is what
//! the maps hold, and a change writes only the difference. Rings are
//! written through a shared mapping of `RINGS`; the kernel's own lookups
//! must read back exactly what was written.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use lb_common::{BACKEND_F_UP, addr_from_ip};
use xlb::{
    dataplane::{Dataplane, Limits, RingWrites},
    reconcile::{NodeOptions, Plan, Reconciler},
    state::{Backend, Cluster, DesiredState, Health, Proto, Vip},
};
use xlb_tests::{
    bpffs::{BpfFs, pinned_ring},
    privileged,
};

const RING: u32 = 65537;
const LIMITS: Limits = Limits {
    max_vips: 8,
    max_backends: 64,
    ring_capacity: RING * 4,
    conntrack_size: 4096,
};

fn backend_addr(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 1, last))
}

fn site(west_weight: u32) -> DesiredState {
    let mut vip = Vip::new(
        "web",
        IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1)),
        80,
        Proto::Tcp,
    );
    for (name, weight, backends) in [
        ("east", 1, [1u8, 2, 3]),
        ("west", west_weight, [11, 12, 13]),
    ] {
        let mut cluster = Cluster::new(name, weight, 0);
        for last in backends {
            let b = Backend::new(format!("b{last}"), backend_addr(last), 1);
            cluster.backends.insert(b.name.clone(), b);
        }
        vip.clusters.insert(name.to_owned(), cluster);
    }
    DesiredState {
        vips: BTreeMap::from([("web".to_owned(), vip)]),
    }
}

/// Every VIP's ring, VIP entry and backend entry in the kernel equals the
/// plan's; rings both as the ring table reads them and as map lookups on
/// the pinned `RINGS` do.
fn assert_kernel_holds(dp: &Dataplane, pin_dir: &Path, plan: &Plan) {
    for (name, vip) in &plan.vips {
        let programmed = dp.vips.get(&vip.key).expect("VIP programmed");
        assert_eq!(programmed.id, vip.info.id, "{name}");
        assert_eq!(programmed.ring_offset, vip.info.ring_offset, "{name}");
        assert_eq!(programmed.ring_size, vip.info.ring_size, "{name}");
        let ring = dp
            .rings
            .read(vip.info.ring_offset, vip.ring.len() as u32)
            .expect("reading RINGS");
        assert!(
            ring == *vip.ring,
            "{name}: the ring table's ring differs from the plan's"
        );
        let looked_up = pinned_ring(pin_dir, vip.info.ring_offset, vip.ring.len() as u32);
        assert!(
            looked_up == *vip.ring,
            "{name}: the kernel's lookups of RINGS differ from the plan's ring"
        );
    }
    for (id, backend) in &plan.backends {
        let entry = dp.backends.get(*id).expect("reading BACKENDS");
        assert_eq!(entry.addr, addr_from_ip(backend.addr).1, "backend {id}");
        assert_eq!(entry.flags & BACKEND_F_UP != 0, backend.up, "backend {id}");
    }
}

#[test]
fn the_kernel_holds_the_plan_and_changes_write_only_the_difference() {
    if !privileged() {
        return;
    }
    let bpffs = BpfFs::mount("reconcile");
    let dir = bpffs.pin_dir();
    let mut dp = Dataplane::load_pinned(LIMITS, &dir).expect("loading the data plane");
    assert_eq!(dp.rings.writes(), RingWrites::Mapped);
    let mut reconciler = Reconciler::new(NodeOptions::default(), &LIMITS);
    let healthy = BTreeMap::new();

    let plan = reconciler.plan(&site(1), &healthy).expect("plan");
    let applied = reconciler.apply(plan.clone(), &mut dp).expect("apply");
    assert_eq!(applied.ring_slots_written, RING as usize);
    assert_eq!(applied.backends_written, 6);
    assert_kernel_holds(&dp, &dir, &plan);

    // Nothing changed: nothing is written.
    let same = reconciler.plan(&site(1), &healthy).expect("plan");
    let applied = reconciler.apply(same, &mut dp).expect("apply");
    assert_eq!(applied, Default::default());

    // West's weight doubles: about a sixth of the slots move (east 1/2 →
    // 1/3), and only those are written.
    let plan = reconciler.plan(&site(2), &healthy).expect("plan");
    let applied = reconciler.apply(plan.clone(), &mut dp).expect("apply");
    let moved = applied.ring_slots_written as f64 / f64::from(RING);
    assert!(
        (0.16..0.20).contains(&moved),
        "{moved} of the ring rewritten"
    );
    assert_kernel_holds(&dp, &dir, &plan);

    // A backend goes down: out of the ring, not up, same id.
    let down = BTreeMap::from([(backend_addr(1), Health::Down)]);
    let plan = reconciler.plan(&site(2), &down).expect("plan");
    reconciler.apply(plan.clone(), &mut dp).expect("apply");
    assert_kernel_holds(&dp, &dir, &plan);

    // The VIP goes: its entry is removed and its backends cleared.
    let plan = reconciler
        .plan(&DesiredState::default(), &healthy)
        .expect("plan");
    let applied = reconciler.apply(plan, &mut dp).expect("apply");
    assert_eq!((applied.vips_removed, applied.backends_removed), (1, 6));
    assert_eq!(dp.vips.iter().count(), 0);
    for id in 0..6 {
        assert_eq!(dp.backends.get(id).expect("reading BACKENDS").family, 0);
    }
    dp.detach_all().expect("removing the pins");
}
