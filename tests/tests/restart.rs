//! Restart without loss: the maps and the XDP links pinned in bpffs outlive
//! the controller, the next controller takes them over as they are, and the
//! program on an interface is replaced through its link, atomically.
//!
//! Each test mounts a bpffs of its own on a fresh directory (the machine's
//! `/sys/fs/bpf` may not be mounted, and tests run in parallel) and unmounts
//! it on every way out, panics included. A restart is modelled as the
//! process sees it: the [`Dataplane`] is dropped, closing every descriptor
//! it held, and a new one is loaded from the same pin directory.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use aya::{
    maps::{Array, Map, MapData, MapInfo},
    programs::{TestRun, TestRunOptions},
};
use lb_common::{
    BACKEND_F_UP, Backend, Counter, FLOW_WAYS, FlowKey, FlowSet, NEXTHOP_F_VALID, NextHop,
    PROTO_UDP, Settings, VipInfo, VipKey, addr_from_ip, conntrack_sets, map_names, ring_lines,
};
use xlb::dataplane::{
    AttachMode, ConnReads, Dataplane, DataplaneError, Limits, RingWrites, Role, link_pin_path,
    pinned_links, remove_pinned, xdp_attachment,
};
use xlb::topology::{Host, LinkOpts, Topology};
use xlb_tests::{
    bpffs::{self, BpfFs, pinned_ring},
    *,
};

/// Every map of the object: each leaves a pin.
const MAPS: [&str; 14] = [
    map_names::VIPS,
    map_names::VIP_ADDRS,
    map_names::VIP_LIVE,
    map_names::VIP_FILTER,
    map_names::RINGS,
    map_names::BACKENDS,
    map_names::NEXTHOPS,
    map_names::CONNTRACK,
    map_names::SETTINGS,
    map_names::TX_PORTS,
    map_names::COUNTERS,
    map_names::VIP_STATS,
    map_names::BACKEND_STATS,
    map_names::DECAP_ADDRS,
];

/// The names in a directory, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("reading a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    names.sort();
    names
}

fn set_backend(dp: &mut Dataplane, id: u32, addr: IpAddr) {
    let (family, addr) = addr_from_ip(addr);
    dp.backends
        .set(
            id,
            Backend {
                addr,
                family,
                flags: BACKEND_F_UP,
                _pad: [0; 2],
            },
        )
        .expect("writing BACKENDS");
}

/// Programs a VIP of the standard world with its pool, ring and backends.
fn program_vip(dp: &mut Dataplane, vip: &VipDef) {
    for id in vip.pool {
        set_backend(dp, *id, backend(*id).addr);
        dp.nexthops
            .set(*id, standard_nexthop(*id))
            .expect("writing NEXTHOPS");
    }
    dp.rings
        .write(vip.ring_offset(), &ring_for(vip.pool, RING_SIZE))
        .expect("writing RINGS");
    dp.vips.insert(vip.key(), vip.info()).expect("writing VIPS");
}

/// Runs the balancer once on `frame` with BPF_PROG_TEST_RUN.
fn run(dp: &Dataplane, frame: &[u8]) -> (Action, Vec<u8>) {
    let mut out = vec![0; 4096];
    let result = dp
        .program(Role::Balancer)
        .expect("balancer")
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (Action::from(result.return_value), out)
}

fn snapshot(dp: &Dataplane) -> Snapshot {
    Snapshot::read(&dp.counters, LIMITS.max_vips, LIMITS.max_backends)
}

fn mirror(dp: &Dataplane) -> BTreeMap<VipKey, VipInfo> {
    dp.vips.iter().map(|(key, info)| (*key, *info)).collect()
}

fn tracked(dp: &Dataplane, flow: &FlowKey) -> Option<u32> {
    dp.conntrack
        .flow(flow, HASH_SEED)
        .expect("reading CONNTRACK")
}

#[test]
fn maps_and_the_connection_table_survive_a_restart() {
    if !privileged() {
        return;
    }
    enter_private_netns();
    let bpffs = BpfFs::mount("maps");
    let dir = bpffs.pin_dir();

    let mut dp = Dataplane::load_pinned(LIMITS, &dir).expect("loading pinned");
    assert!(dp.reused_maps().is_empty(), "a fresh directory has no maps");
    assert_eq!(entries(&dir), sorted(&MAPS), "every map pinned");
    dp.settings
        .set(standard_settings())
        .expect("writing SETTINGS");
    program_vip(&mut dp, &WEB_V4);
    program_vip(&mut dp, &WEB_V6);

    // A flow to each VIP; then WEB_V6 is deleted, so the table holds a flow
    // of a deleted VIP, with a generation no map holds any more.
    let web = Pkt::tcp_syn(CLIENT_V4, 40_000, WEB_V4.addr, WEB_V4.port);
    let (action, _) = run(&dp, &web.build());
    assert_eq!(action, Action::Tx, "the SYN is balanced");
    let web_backend = tracked(&dp, &web.flow()).expect("the SYN's flow is recorded");
    let web6 = Pkt::tcp_syn(CLIENT_V6, 40_001, WEB_V6.addr, WEB_V6.port);
    assert_eq!(run(&dp, &web6.build()).0, Action::Tx);
    let web6_generation = dp.vips.get(&WEB_V6.key()).expect("WEB_V6").generation;
    assert!(dp.vips.remove(&WEB_V6.key()).expect("removing WEB_V6"));

    let vips_before = mirror(&dp);
    let ring_before = dp
        .rings
        .read(WEB_V4.ring_offset(), RING_SIZE)
        .expect("reading RINGS");
    let backend_before = dp.backends.get(web_backend).expect("reading BACKENDS");
    let settings_before = dp.settings.get().expect("reading SETTINGS");
    let counters_before = snapshot(&dp);
    assert_eq!(counters_before.vips[WEB_V4.id as usize].new_flows, 1);

    drop(dp);
    assert_eq!(entries(&dir), sorted(&MAPS), "the pins outlive the process");

    let mut dp = Dataplane::load_pinned(LIMITS, &dir).expect("loading again");
    assert_eq!(sorted(dp.reused_maps()), sorted(&MAPS), "every map reused");
    assert_eq!(
        mirror(&dp),
        vips_before,
        "the VIP mirror is rebuilt from VIPS"
    );
    assert_eq!(dp.rings.writes(), RingWrites::Mapped, "the reused RINGS");
    assert_eq!(
        dp.conntrack.reads(),
        ConnReads::Mapped,
        "the reused CONNTRACK"
    );
    assert_eq!(
        dp.conntrack.newest_generation().ok(),
        Some(web6_generation),
        "the deleted VIP's flow carries the newest generation"
    );
    assert_eq!(
        dp.rings
            .read(WEB_V4.ring_offset(), RING_SIZE)
            .expect("reading RINGS"),
        ring_before
    );
    assert_eq!(
        pinned_ring(&dir, WEB_V4.ring_offset(), RING_SIZE),
        ring_before,
        "the kernel's lookups read the same ring"
    );
    assert_eq!(
        dp.backends.get(web_backend).expect("reading BACKENDS"),
        backend_before
    );
    assert_eq!(
        dp.settings.get().expect("reading SETTINGS"),
        settings_before
    );
    assert_eq!(snapshot(&dp), counters_before, "the counters carry over");
    assert_eq!(
        tracked(&dp, &web.flow()),
        Some(web_backend),
        "the connection table carries over"
    );

    // The established flow is still a connection-table hit, to its backend.
    let ack = Pkt::tcp_ack(CLIENT_V4, 40_000, WEB_V4.addr, WEB_V4.port).build();
    let before = snapshot(&dp);
    let (action, out) = run(&dp, &ack);
    let delta = snapshot(&dp).since(&before);
    assert_eq!(action, Action::Tx);
    assert_frame_eq(
        &out,
        &encapsulated(
            &ack,
            backend(web_backend).addr,
            standard_egress(web_backend),
        ),
        "the established flow keeps its backend",
    );
    delta.assert_counters(&[Counter::Tx, Counter::ConnHit]);

    // Ring writes after the restart reach the program too.
    let other = *WEB_V4
        .pool
        .iter()
        .find(|id| **id != web_backend)
        .expect("a pool of two");
    assert_new_flows_go_to(&mut dp, &WEB_V4, other, 41_000);

    // The rebuilt generation counter continues past the deleted VIP's, so
    // re-creating that VIP does not revive its recorded flows.
    program_vip(&mut dp, &WEB_V6);
    let generation = dp.vips.get(&WEB_V6.key()).expect("WEB_V6").generation;
    assert!(
        generation > web6_generation,
        "new generation {generation} must follow the deleted VIP's {web6_generation}"
    );
    let ack6 = Pkt::tcp_ack(CLIENT_V6, 40_001, WEB_V6.addr, WEB_V6.port).build();
    let before = snapshot(&dp);
    assert_eq!(run(&dp, &ack6).0, Action::Tx);
    let delta = snapshot(&dp).since(&before);
    assert_eq!(
        (
            delta.count(Counter::ConnHit),
            delta.count(Counter::ConnMiss)
        ),
        (0, 1),
        "the deleted VIP's flow is not taken for the new VIP's: {delta:?}"
    );

    let unpinned = dp.detach_all().expect("detach_all");
    assert!(unpinned.interfaces.is_empty(), "{unpinned:?}");
    assert_eq!(sorted(&unpinned.maps), sorted(&MAPS));
    assert!(entries(&dir).is_empty(), "left: {:?}", entries(&dir));
}

/// Points every slot of `vip`'s ring at backend `id`, then checks that a new
/// flow (from `client_port`) goes there: the program reads what was written.
fn assert_new_flows_go_to(dp: &mut Dataplane, vip: &VipDef, id: u32, client_port: u16) {
    dp.rings
        .write(vip.ring_offset(), &vec![id; RING_SIZE as usize])
        .expect("writing RINGS");
    let IpAddr::V4(addr) = vip.addr else {
        panic!("an IPv4 VIP")
    };
    let syn = Pkt::tcp_syn(CLIENT_V4, client_port, addr, vip.port);
    assert_eq!(run(dp, &syn.build()).0, Action::Tx, "the SYN is balanced");
    assert_eq!(tracked(dp, &syn.flow()), Some(id), "the new flow's backend");
}

/// Loads the data plane over the pins in `dir` and programs the standard
/// settings and [`WEB_V4`].
fn load_with_web_v4(dir: &Path) -> Dataplane {
    let mut dp = Dataplane::load_pinned(LIMITS, dir).expect("loading over the pins");
    dp.settings
        .set(standard_settings())
        .expect("writing SETTINGS");
    program_vip(&mut dp, &WEB_V4);
    dp
}

/// A private network namespace and a pin directory `tag` on a bpffs of its
/// own, where `pin` leaves what an earlier xlb left.
fn pins_of_an_earlier_xlb(tag: &str, pin: impl FnOnce(&Path)) -> (BpfFs, PathBuf) {
    enter_private_netns();
    let bpffs = BpfFs::mount(tag);
    let dir = bpffs.pin_dir();
    fs::create_dir_all(&dir).expect("creating the pin directory");
    pin(&dir);
    (bpffs, dir)
}

/// `BPF_F_MMAPABLE` (`include/uapi/linux/bpf.h`).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// bpf(2) with `attr`, a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> libc::c_long {
    // SAFETY: `attr` is live for the call and the kernel reads at most its
    // size; pointers inside it point at memory the caller keeps alive.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) }
}

/// Pins `fd` at `path` (`BPF_OBJ_PIN`).
fn pin_fd(fd: &OwnedFd, path: &Path) {
    const BPF_OBJ_PIN: libc::c_long = 6;
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(path.as_os_str().as_bytes()).expect("pin path");
    let pinned = bpf(
        BPF_OBJ_PIN,
        &ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            file_flags: 0,
        },
    );
    assert_eq!(pinned, 0, "BPF_OBJ_PIN: {}", io::Error::last_os_error());
}

/// BPF map types (`enum bpf_map_type`).
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;

/// Pins at `path` a map as an earlier xlb pinned `RINGS` (one `u32` per
/// slot, mmapable or, older still, not), `CONNTRACK` (not mmapable) and
/// `COUNTERS` (before its last counters were added): `map_flags` and the
/// sizes say which.
fn pin_old_map(path: &Path, map_type: u32, value_size: usize, entries: u32, map_flags: u32) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let fd = bpf(
        BPF_MAP_CREATE,
        &MapCreate {
            map_type,
            key_size: 4,
            value_size: value_size as u32,
            max_entries: entries,
            map_flags,
        },
    );
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
    // SAFETY: the kernel returned a new descriptor, owned only here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    pin_fd(&fd, path);
}

/// Attaches to `interface` (of the calling thread's namespace), through an
/// XDP link pinned at `path`, a program that names the map pinned at `map`
/// as an earlier xlb's balancer names its `RINGS`, and passes every packet.
fn pin_link_of_a_program_reading(map: &Path, interface: &str, path: &Path) {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    #[repr(C)]
    struct Insn {
        code: u8,
        regs: u8,
        off: i16,
        imm: i32,
    }
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    let map = bpffs::pinned(
        map.parent().expect("a pin directory"),
        &map.file_name().expect("a map name").to_string_lossy(),
    );
    let map_fd = map.fd().as_fd().as_raw_fd();
    // r1 = the map (BPF_PSEUDO_MAP_FD); r0 = XDP_PASS; exit.
    let insns = [
        Insn {
            code: 0x18,
            regs: 0x11,
            off: 0,
            imm: map_fd,
        },
        Insn {
            code: 0,
            regs: 0,
            off: 0,
            imm: 0,
        },
        Insn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: 2,
        },
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let mut prog_name = [0; 16];
    prog_name[..12].copy_from_slice(b"xlb_balancer");
    let prog = bpf(
        BPF_PROG_LOAD,
        &ProgLoad {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: c"GPL".as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
            prog_ifindex: 0,
            expected_attach_type: BPF_XDP,
        },
    );
    assert!(prog >= 0, "BPF_PROG_LOAD: {}", io::Error::last_os_error());
    // SAFETY: the kernel returned a new descriptor, owned only here.
    let prog = unsafe { OwnedFd::from_raw_fd(prog as i32) };
    let ifindex = xlb::dataplane::interface_index(interface).expect("the interface");
    let link = bpf(
        BPF_LINK_CREATE,
        &LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: 0,
        },
    );
    assert!(link >= 0, "BPF_LINK_CREATE: {}", io::Error::last_os_error());
    // SAFETY: as above.
    let link = unsafe { OwnedFd::from_raw_fd(link as i32) };
    pin_fd(&link, path);
}

/// The `u32` slots of an earlier xlb's `RINGS`, through the map syscalls.
fn old_rings(dir: &Path) -> Array<MapData, u32> {
    Array::try_from(Map::Array(bpffs::pinned(dir, map_names::RINGS))).expect("the old RINGS")
}

fn old_ring(rings: &Array<MapData, u32>, offset: u32, len: u32) -> Vec<u32> {
    (offset..offset + len)
        .map(|slot| rings.get(&slot, 0).expect("reading the old RINGS"))
        .collect()
}

/// An upgrade from an xlb whose `RINGS` held one `u32` per slot (and was
/// mmapable, or not, as `old_flags` says) loses nothing: the program that
/// xlb attached keeps reading the old map until the new program replaces
/// it in its link, the new program finds every ring in the new map before
/// it can run, established flows keep their backends, and new flows keep
/// going where the old rings sent them.
fn upgrade_from_u32_slots(test: &str, old_flags: u32) {
    let bpffs = BpfFs::mount(test);
    let dir = bpffs.pin_dir();
    let topo = Topology::new(test).expect("topology");
    let node = topo.host("node").expect("host");
    let peer = topo.host("peer").expect("host");
    topo.link(&node, &peer, LinkOpts::new()).expect("veth");
    let dev = "eth0";
    let (offset, size) = (WEB_V4.ring_offset(), RING_SIZE);
    let [established, ringed, ..] = WEB_V4.pool[..] else {
        panic!("a pool of at least two")
    };

    // What the earlier xlb leaves: its maps (written here by this xlb, the
    // other maps' layouts are the same), with a flow to `established` in
    // the connection table; its RINGS of u32 slots, whose ring sends every
    // new flow to `ringed`; and its program, attached through the pinned
    // link, reading that RINGS.
    let mut dp = load_with_web_v4(&dir);
    assert_new_flows_go_to(&mut dp, &WEB_V4, established, 40_000);
    drop(dp);
    let rings_pin = dir.join(map_names::RINGS);
    fs::remove_file(&rings_pin).expect("unpinning RINGS");
    pin_old_map(
        &rings_pin,
        BPF_MAP_TYPE_ARRAY,
        size_of::<u32>(),
        LIMITS.ring_capacity,
        old_flags,
    );
    let mut old = old_rings(&dir);
    for slot in offset..offset + size {
        old.set(slot, ringed, 0).expect("writing the old RINGS");
    }
    let old_id = MapInfo::from_pin(&rings_pin).expect("the old RINGS").id();
    node.run_in(|| pin_link_of_a_program_reading(&rings_pin, dev, &link_pin_path(&dir, dev)))
        .expect("entering the namespace");

    // Loading: the new RINGS holds the rings before any program reads it;
    // the old one keeps its pin, since the program attached reads it.
    let mut dp = node
        .run_in(|| Dataplane::load_pinned(LIMITS, &dir))
        .expect("entering the namespace")
        .expect("loading over the old RINGS");
    assert!(!dp.reused_maps().contains(&map_names::RINGS));
    assert_eq!(
        dp.rings.writes(),
        RingWrites::AlsoToOld {
            old_mapped: old_flags & BPF_F_MMAPABLE != 0
        }
    );
    assert_eq!(
        MapInfo::from_pin(&rings_pin).expect("RINGS").id(),
        old_id,
        "the old map keeps its pin while a program reads it"
    );
    assert_eq!(
        dp.rings.read(offset, size).expect("reading RINGS"),
        vec![ringed; size as usize],
        "the old ring, copied"
    );
    let ack = Pkt::tcp_ack(CLIENT_V4, 40_000, WEB_V4.addr, WEB_V4.port).build();
    let (action, out) = run(&dp, &ack);
    assert_eq!(action, Action::Tx);
    assert_frame_eq(
        &out,
        &encapsulated(
            &ack,
            backend(established).addr,
            standard_egress(established),
        ),
        "the established flow keeps its backend",
    );
    let syn = Pkt::tcp_syn(CLIENT_V4, 40_001, WEB_V4.addr, WEB_V4.port);
    assert_eq!(run(&dp, &syn.build()).0, Action::Tx);
    assert_eq!(
        tracked(&dp, &syn.flow()),
        Some(ringed),
        "a new flow goes where the old ring sends it"
    );

    // Until the program is replaced, ring writes reach both maps: whichever
    // program a packet meets, it finds the same ring.
    let ring = ring_for(WEB_V4.pool, size);
    dp.rings.write(offset, &ring).expect("writing RINGS");
    assert_eq!(old_ring(&old, offset, size), ring, "the old map");
    assert_eq!(dp.rings.read(offset, size).expect("RINGS"), ring);

    // Attaching replaces the program in the link; then no program reads
    // the old map and the new one takes its pin.
    node.run_in(|| dp.attach(Role::Balancer, dev, AttachMode::Native))
        .expect("entering the namespace")
        .expect("attaching");
    assert_eq!(dp.rings.writes(), RingWrites::Mapped);
    let info = MapInfo::from_pin(&rings_pin).expect("RINGS");
    assert_ne!(info.id(), old_id, "the new map is pinned");
    assert_eq!(
        (info.value_size(), info.max_entries()),
        (64, ring_lines(LIMITS.ring_capacity)),
        "lines of 32 slots"
    );
    assert_ne!(info.map_flags() & BPF_F_MMAPABLE, 0, "mmapable");
    let mut pins = MAPS.to_vec();
    let link_pin = format!("link_{dev}");
    pins.push(&link_pin);
    assert_eq!(entries(&dir), sorted(&pins), "nothing else left");
    assert_eq!(pinned_ring(&dir, offset, size), ring);
    let later = ring_for(&WEB_V4.pool[1..], size);
    dp.rings.write(offset, &later).expect("writing RINGS");
    assert_eq!(old_ring(&old, offset, size), ring, "the old map is left");
    assert_eq!(pinned_ring(&dir, offset, size), later);
    let (action, out) = run(&dp, &ack);
    assert_eq!(action, Action::Tx);
    assert_frame_eq(
        &out,
        &encapsulated(
            &ack,
            backend(established).addr,
            standard_egress(established),
        ),
        "the established flow still keeps its backend",
    );

    // The next start reuses the new map as it is.
    drop(dp);
    let dp = Dataplane::load_pinned(LIMITS, &dir).expect("loading again");
    assert!(dp.reused_maps().contains(&map_names::RINGS));
    assert_eq!(dp.rings.writes(), RingWrites::Mapped);
    assert_eq!(dp.rings.read(offset, size).expect("RINGS"), later);
    node.run_in(|| dp.detach_all())
        .expect("entering the namespace")
        .expect("detach_all");
    assert!(entries(&dir).is_empty(), "left: {:?}", entries(&dir));
    drop(topo);
}

#[test]
fn a_rings_map_of_u32_slots_is_upgraded_with_its_rings() {
    if !privileged() {
        return;
    }
    upgrade_from_u32_slots("upgrade-mmap", BPF_F_MMAPABLE);
}

#[test]
fn a_rings_map_of_u32_slots_pinned_before_it_was_mmapable_is_upgraded_too() {
    if !privileged() {
        return;
    }
    upgrade_from_u32_slots("upgrade-old", 0);
}

#[test]
fn an_old_rings_map_no_program_reads_is_replaced_at_load() {
    if !privileged() {
        return;
    }
    let (_bpffs, dir) = pins_of_an_earlier_xlb("upgrade-unread", |dir| {
        let rings = dir.join(map_names::RINGS);
        pin_old_map(
            &rings,
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            LIMITS.ring_capacity,
            BPF_F_MMAPABLE,
        );
    });
    let rings_pin = dir.join(map_names::RINGS);
    let dp = Dataplane::load_pinned(LIMITS, &dir).expect("loading over the old RINGS");
    assert_eq!(dp.rings.writes(), RingWrites::Mapped);
    assert_eq!(
        MapInfo::from_pin(&rings_pin).expect("RINGS").value_size(),
        64
    );
    assert_eq!(entries(&dir), sorted(&MAPS));
    dp.detach_all().expect("detach_all");

    // One of another capacity is refused, as any pinned map that does not
    // fit, and left as it is.
    pin_old_map(&rings_pin, BPF_MAP_TYPE_ARRAY, size_of::<u32>(), 1000, 0);
    match Dataplane::load_pinned(LIMITS, &dir) {
        Err(err @ DataplaneError::PinnedMapMismatch { name, .. }) => {
            assert_eq!(name, map_names::RINGS);
            let message = err.to_string();
            for part in [
                "has 1000 slots of 32 bits".to_owned(),
                format!("(ring_capacity) asks for {}", LIMITS.ring_capacity),
                "xlb detach".to_owned(),
            ] {
                assert!(message.contains(&part), "{message:?} lacks {part:?}");
            }
        }
        Err(err) => panic!("{err}"),
        Ok(_) => panic!("an old RINGS of another size must be refused"),
    }
    assert_eq!(
        MapInfo::from_pin(&rings_pin).expect("RINGS").max_entries(),
        1000
    );
    remove_pinned(&dir).expect("removing the pins");
}

#[test]
fn a_connection_table_pinned_before_it_was_mmapable_is_kept_with_its_flows() {
    if !privileged() {
        return;
    }
    let (_bpffs, dir) = pins_of_an_earlier_xlb("old-conntrack", |dir| {
        let sets = conntrack_sets(LIMITS.conntrack_size);
        let conntrack = dir.join(map_names::CONNTRACK);
        pin_old_map(
            &conntrack,
            BPF_MAP_TYPE_ARRAY,
            size_of::<FlowSet>(),
            sets,
            0,
        );
    });

    // Kept as it is (only slower): the programs attached by the older xlb
    // read it, and its flows are connections in flight.
    let mut dp = load_with_web_v4(&dir);
    assert_eq!(dp.reused_maps(), [map_names::CONNTRACK]);
    let [first, second, ..] = WEB_V4.pool[..] else {
        panic!("a pool of at least two")
    };
    assert_new_flows_go_to(&mut dp, &WEB_V4, first, 40_000);

    // After a restart the flow still goes to its backend, whatever the ring
    // says now. The table is read one lookup per set, and read right: its
    // one flow, of WEB_V4's generation.
    let generation = dp.vips.get(&WEB_V4.key()).expect("WEB_V4").generation;
    drop(dp);
    let mut dp = Dataplane::load_pinned(LIMITS, &dir).expect("loading again");
    assert_eq!(sorted(dp.reused_maps()), sorted(&MAPS));
    assert_eq!(dp.conntrack.reads(), ConnReads::PerSetSyscall);
    assert!(dp.conntrack.reader(ConnReads::Mapped).is_none());
    assert_eq!(dp.conntrack.newest_generation().ok(), Some(generation));
    let occupancy = dp.conntrack.occupancy(u32::MAX).expect("counting");
    assert_eq!((occupancy.used, occupancy.estimate()), (1, 1));
    dp.rings
        .write(WEB_V4.ring_offset(), &vec![second; RING_SIZE as usize])
        .expect("writing RINGS");
    let ack = Pkt::tcp_ack(CLIENT_V4, 40_000, WEB_V4.addr, WEB_V4.port).build();
    let (action, out) = run(&dp, &ack);
    assert_eq!(action, Action::Tx);
    assert_frame_eq(
        &out,
        &encapsulated(&ack, backend(first).addr, standard_egress(first)),
        "the established flow keeps its backend",
    );

    // What the warning says to do: detach, start again, mmapable, so that
    // each set is one cache line.
    dp.detach_all().expect("detach_all");
    let dp = Dataplane::load_pinned(LIMITS, &dir).expect("loading afresh");
    assert!(dp.reused_maps().is_empty());
    assert_eq!(dp.conntrack.reads(), ConnReads::Mapped);
    let info = MapInfo::from_pin(dir.join(map_names::CONNTRACK)).expect("the pinned CONNTRACK");
    assert_ne!(
        info.map_flags() & BPF_F_MMAPABLE,
        0,
        "CONNTRACK is mmapable"
    );
    dp.detach_all().expect("detach_all");
}

#[test]
fn counters_pinned_before_the_last_counters_were_added_are_kept() {
    if !privileged() {
        return;
    }
    // As the xlb before the ICMP counters pinned it: no slot for them.
    let newest = Counter::IcmpTooBig;
    assert_eq!(
        Counter::ALL[newest as usize..],
        [Counter::IcmpTooBig, Counter::IcmpLimited]
    );
    let (_bpffs, dir) = pins_of_an_earlier_xlb("old-counters", |dir| {
        let counters = dir.join(map_names::COUNTERS);
        let slots = newest as u32;
        pin_old_map(
            &counters,
            BPF_MAP_TYPE_PERCPU_ARRAY,
            size_of::<u64>(),
            slots,
            0,
        );
    });

    // Kept: the running program counts in it, and the counts are what
    // the operator's graphs continue from.
    let mut dp = load_with_web_v4(&dir);
    assert_eq!(dp.reused_maps(), [map_names::COUNTERS]);
    let [first, ..] = WEB_V4.pool[..] else {
        panic!("a pool")
    };
    assert_new_flows_go_to(&mut dp, &WEB_V4, first, 40_000);
    assert_eq!(dp.counters.global(Counter::Tx).expect("tx"), 1);
    assert_eq!(dp.counters.global(Counter::ConnMiss).expect("conn_miss"), 1);

    // A packet too big for the next hop: answered; the counter without a
    // slot reads 0 rather than failing every read.
    dp.nexthops
        .set(
            first,
            NextHop {
                mtu: 100,
                ..standard_nexthop(first)
            },
        )
        .expect("writing NEXTHOPS");
    let big = Pkt::tcp_ack(CLIENT_V4, 40_000, WEB_V4.addr, WEB_V4.port).payload(&[7; 100]);
    assert_eq!(run(&dp, &big.build()).0, Action::Tx);
    assert_eq!(dp.counters.global(newest).expect("icmp_too_big"), 0);
    assert_eq!(
        dp.counters
            .global(Counter::IcmpLimited)
            .expect("icmp_limited"),
        0
    );
    assert_eq!(dp.counters.global(Counter::ConnHit).expect("conn_hit"), 1);
    dp.detach_all().expect("detach_all");
}

#[test]
fn a_pinned_map_that_does_not_fit_is_refused_with_what_to_do() {
    if !privileged() {
        return;
    }
    let bpffs = BpfFs::mount("mismatch");
    let dir = bpffs.pin_dir();
    drop(Dataplane::load_pinned(LIMITS, &dir).expect("loading pinned"));

    let bigger = Limits {
        ring_capacity: 2 * LIMITS.ring_capacity,
        ..LIMITS
    };
    let err = match Dataplane::load_pinned(bigger, &dir) {
        Ok(_) => panic!("a pinned RINGS of another size must be refused"),
        Err(err) => err,
    };
    assert!(
        matches!(err, DataplaneError::PinnedMapMismatch { name, .. } if name == map_names::RINGS),
        "{err:?}"
    );
    let message = err.to_string();
    for part in [
        "pinned map RINGS",
        &format!(
            "has {} entries ({} slots)",
            ring_lines(LIMITS.ring_capacity),
            ring_lines(LIMITS.ring_capacity) * 32
        ),
        &format!(
            "(ring_capacity) asks for {} entries",
            ring_lines(bigger.ring_capacity)
        ),
        "xlb detach",
    ] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
    eprintln!("the error reads: {message}");
    let smaller_table = Limits {
        conntrack_size: LIMITS.conntrack_size / 2,
        ..LIMITS
    };
    match Dataplane::load_pinned(smaller_table, &dir) {
        Err(err @ DataplaneError::PinnedMapMismatch { name, .. }) => {
            assert_eq!(name, map_names::CONNTRACK);
            let message = err.to_string();
            let flows =
                |flows: u32| format!("{} entries ({flows} flows)", flows / FLOW_WAYS as u32);
            for part in [
                format!("has {}", flows(LIMITS.conntrack_size)),
                format!(
                    "(conntrack_size) asks for {}",
                    flows(smaller_table.conntrack_size)
                ),
            ] {
                assert!(message.contains(&part), "{message:?} lacks {part:?}");
            }
        }
        Err(err) => panic!("{err}"),
        Ok(_) => panic!("a pinned CONNTRACK of another size must be refused"),
    }

    // The way out the message gives: remove the pins, load afresh.
    let unpinned = remove_pinned(&dir).expect("removing the pins");
    assert_eq!(sorted(&unpinned.maps), sorted(&MAPS));
    assert!(entries(&dir).is_empty());
    let dp = Dataplane::load_pinned(bigger, &dir).expect("loading with the new size");
    assert!(dp.reused_maps().is_empty());
    dp.detach_all().expect("detach_all");

    // Pinning needs a bpffs.
    let plain = std::env::temp_dir().join(format!("xlb-restart-plain-{}", std::process::id()));
    match Dataplane::load_pinned(LIMITS, &plain) {
        Err(err @ DataplaneError::NotBpffs { .. }) => {
            assert!(err.to_string().contains("mount -t bpf"), "{err}")
        }
        Err(err) => panic!("{err}"),
        Ok(_) => panic!("{} is no bpffs", plain.display()),
    }
    assert!(!plain.exists(), "the directory it created is removed again");
}

/// `ip -d link show dev DEV` in `host`.
fn ip_link(host: &Host, dev: &str) -> String {
    let out = host
        .ip(["-d", "link", "show", "dev", dev])
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn attached(host: &Host, dev: &str) -> Option<xlb::dataplane::XdpAttachment> {
    let dev = dev.to_owned();
    host.run_in(move || xdp_attachment(&dev))
        .expect("entering the namespace")
        .expect("asking rtnetlink")
}

fn load_and_attach(host: &Host, dir: &Path, dev: &str, mode: AttachMode) -> Dataplane {
    host.run_in(|| {
        let mut dp = Dataplane::load_pinned(LIMITS, dir).expect("loading pinned");
        let got = dp.attach(Role::Balancer, dev, mode).expect("attaching");
        assert_eq!(got, AttachMode::Native, "veth takes native XDP");
        dp
    })
    .expect("entering the namespace")
}

#[test]
fn the_program_stays_attached_and_is_replaced_through_its_link() {
    if !privileged() {
        return;
    }
    let bpffs = BpfFs::mount("link");
    let dir = bpffs.pin_dir();
    let topo = Topology::new("restart-link").expect("topology");
    let node = topo.host("node").expect("host");
    let peer = topo.host("peer").expect("host");
    topo.link(&node, &peer, LinkOpts::new()).expect("veth");
    let dev = "eth0";
    assert_eq!(attached(&node, dev), None, "nothing attached yet");

    let dp = load_and_attach(&node, &dir, dev, AttachMode::Native);
    let links = pinned_links(&dir).expect("listing pinned links");
    assert_eq!(links.len(), 1, "{links:?}");
    let link = links[0].clone();
    assert_eq!(link.interface, dev);
    assert_eq!(link.role, Some(Role::Balancer));
    let first_program = link.program_id;
    assert_eq!(
        attached(&node, dev).map(|a| (a.mode, a.program_id)),
        Some((AttachMode::Native, first_program))
    );
    assert_eq!(
        dp.attachments().collect::<Vec<_>>(),
        vec![(Role::Balancer, dev, AttachMode::Native)]
    );

    drop(dp);
    let shown = ip_link(&node, dev);
    assert!(
        shown.contains(&format!("prog/xdp id {first_program}")),
        "still attached after the process let go:\n{shown}"
    );
    assert_eq!(
        pinned_links(&dir).expect("pinned links"),
        vec![link.clone()]
    );

    // The next process replaces the program through the same link.
    let mut dp = load_and_attach(&node, &dir, dev, AttachMode::Native);
    let links = pinned_links(&dir).expect("pinned links");
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0].link_id, link.link_id, "the same link");
    let second_program = links[0].program_id;
    assert_ne!(second_program, first_program, "a new program in it");
    assert_eq!(
        attached(&node, dev).map(|a| (a.mode, a.program_id)),
        Some((AttachMode::Native, second_program))
    );
    let shown = ip_link(&node, dev);
    assert!(
        shown.contains(&format!("prog/xdp id {second_program}")),
        "{shown}"
    );

    // The link keeps its mode: asking another one changes nothing.
    let got = node
        .run_in(|| dp.attach(Role::Balancer, dev, AttachMode::Generic))
        .expect("entering the namespace")
        .expect("attaching again");
    assert_eq!(got, AttachMode::Native);
    assert_eq!(
        pinned_links(&dir).expect("pinned links")[0].link_id,
        link.link_id
    );

    let unpinned = dp.detach_all().expect("detach_all");
    assert_eq!(unpinned.interfaces, vec![dev.to_owned()]);
    assert_eq!(sorted(&unpinned.maps), sorted(&MAPS));
    assert_eq!(attached(&node, dev), None, "the program is off");
    let shown = ip_link(&node, dev);
    assert!(!shown.contains("prog/xdp"), "{shown}");
    assert!(entries(&dir).is_empty(), "left: {:?}", entries(&dir));

    drop(topo);
}

/// The VIP of the live test, and what the balancer needs to send its
/// packets back out to the sender, encapsulated.
const LIVE_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 61, 10);
const LIVE_PORT: u16 = 5000;
const SENDER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 60, 1);
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 60, 2);
const LIVE_BACKEND: u32 = 1;
const LIVE_BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 62, 1);

fn live_vip() -> (VipKey, VipInfo) {
    let (family, addr) = addr_from_ip(LIVE_VIP.into());
    (
        VipKey {
            addr,
            port: LIVE_PORT.to_be(),
            proto: PROTO_UDP,
            family,
        },
        VipInfo {
            id: 0,
            ring_offset: 0,
            ring_size: RING_SIZE,
            flags: 0,
            generation: 0,
        },
    )
}

/// Programs the node: every packet to the VIP goes to one backend whose
/// next hop is the sender, out of the ingress interface (XDP_TX).
fn program_node(dp: &mut Dataplane, node_if: (u32, [u8; 6]), sender_mac: [u8; 6]) {
    let (_, src_v4) = addr_from_ip(NODE_ADDR.into());
    dp.settings
        .set(Settings {
            hash_seed: HASH_SEED,
            src_v4: src_v4[0],
            ..Settings::default()
        })
        .expect("writing SETTINGS");
    set_backend(dp, LIVE_BACKEND, LIVE_BACKEND_ADDR.into());
    dp.nexthops
        .set(
            LIVE_BACKEND,
            NextHop {
                ifindex: node_if.0,
                mtu: 1500,
                dmac: sender_mac,
                smac: node_if.1,
                flags: NEXTHOP_F_VALID,
            },
        )
        .expect("writing NEXTHOPS");
    dp.rings
        .write(0, &[LIVE_BACKEND; RING_SIZE as usize])
        .expect("writing RINGS");
    let (key, info) = live_vip();
    dp.vips.insert(key, info).expect("writing VIPS");
}

/// Total of the verdict counters: one per packet the program saw.
fn verdicts(snapshot: &Snapshot) -> BTreeMap<Counter, u64> {
    snapshot
        .global
        .iter()
        .filter(|(counter, value)| is_verdict(*counter) && *value != 0)
        .copied()
        .collect()
}

#[test]
fn restarts_under_a_packet_stream_lose_no_packet() {
    if !privileged() {
        return;
    }
    const RESTARTS: usize = 5;
    let bpffs = BpfFs::mount("live");
    let dir = bpffs.pin_dir();
    let topo = Topology::new("restart-live").expect("topology");
    let sender = topo.host("sender").expect("host");
    let node = topo.host("node").expect("host");
    // Only the stream reaches the node: no IPv6 (router and multicast
    // listener messages) and no ARP (static neighbours).
    for host in [&sender, &node] {
        host.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
            .expect("sysctl");
        host.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
            .expect("sysctl");
    }
    let link = topo
        .link(
            &sender,
            &node,
            LinkOpts::new()
                .addr_a(format!("{SENDER_ADDR}/24"))
                .addr_b(format!("{NODE_ADDR}/24")),
        )
        .expect("veth");
    let (sender_if, node_if) = (link.a, link.b);
    let mac = |mac: [u8; 6]| {
        mac.iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    sender
        .ip([
            "neigh",
            "replace",
            &NODE_ADDR.to_string(),
            "lladdr",
            &mac(node_if.mac),
            "dev",
            &sender_if.name,
            "nud",
            "permanent",
        ])
        .expect("static neighbour");
    sender
        .add_route(&format!("{LIVE_VIP}/32"), &[NODE_ADDR.into()])
        .expect("route to the VIP");

    // The sender's interface needs an XDP program to take XDP_TX frames in;
    // the decap program counts them (none is a tunnel packet for it).
    let receiver = sender
        .run_in(|| {
            let mut dp = Dataplane::load(LIMITS).expect("loading the receiver's program");
            dp.attach(Role::Decap, &sender_if.name, AttachMode::Native)
                .expect("attaching the receiver's program");
            dp
        })
        .expect("entering the sender");

    let node_dev = node_if.name.clone();
    let mut dp = node
        .run_in(|| {
            let mut dp = Dataplane::load_pinned(LIMITS, &dir).expect("loading pinned");
            program_node(&mut dp, (node_if.ifindex, node_if.mac), sender_if.mac);
            dp.attach(Role::Balancer, &node_dev, AttachMode::Native)
                .expect("attaching");
            dp
        })
        .expect("entering the node");
    let link_id = pinned_links(&dir).expect("pinned links")[0].link_id;

    // About 50 kpps at most.
    let stream = UdpStream::start(
        &sender,
        SENDER_ADDR.into(),
        SocketAddr::from((LIVE_VIP, LIVE_PORT)),
        Pacing {
            flows: 1,
            burst: 8,
            pause: Duration::from_micros(100),
        },
    );

    thread::sleep(Duration::from_millis(200));
    let mut pauses = Vec::new();
    for _ in 0..RESTARTS {
        let started = Instant::now();
        drop(dp);
        dp = load_and_attach(&node, &dir, &node_dev, AttachMode::Native);
        pauses.push(started.elapsed());
        assert_eq!(
            pinned_links(&dir).expect("pinned links")[0].link_id,
            link_id,
            "replaced through the same link"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let (sent, failed) = stream.stop();
    // Let the last packets through the veths.
    thread::sleep(Duration::from_millis(200));

    let seen = verdicts(&snapshot(&dp));
    let received = verdicts(&Snapshot::read(
        &receiver.counters,
        LIMITS.max_vips,
        LIMITS.max_backends,
    ));
    eprintln!(
        "{RESTARTS} restarts (drop, load, attach: {pauses:?}); sent {sent}, \
         balancer verdicts {seen:?}, back at the sender {received:?}"
    );
    let stats = |host: &Host, dev: &str| {
        String::from_utf8_lossy(
            &host
                .ip(["-s", "link", "show", "dev", dev])
                .expect("ip -s link")
                .stdout,
        )
        .into_owned()
    };
    assert_eq!(failed, 0, "every send succeeded");
    assert!(sent > 10_000, "a stream worth the name: {sent}");
    assert_eq!(
        seen,
        BTreeMap::from([(Counter::Tx, sent)]),
        "every packet sent met the balancer, which sent it on; none passed unbalanced \
         (pass_not_vip) or dropped\nsender:\n{}node:\n{}",
        stats(&sender, &sender_if.name),
        stats(&node, &node_if.name),
    );
    assert_eq!(dp.counters.vip(0).expect("VIP_STATS").packets, sent);
    assert_eq!(
        received.values().sum::<u64>(),
        sent,
        "every packet came back out, encapsulated: {received:?}"
    );

    let unpinned = dp.detach_all().expect("detach_all");
    assert_eq!(unpinned.interfaces, vec![node_dev.clone()]);
    assert_eq!(attached(&node, &node_dev), None);
    assert!(entries(&dir).is_empty(), "left: {:?}", entries(&dir));
    drop(receiver);
    drop(topo);
}
