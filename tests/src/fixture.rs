//! The fixture: the real XDP object loaded into the kernel with small
//! limits, programmed with the standard world of [`crate::world`], and run
//! on packets with BPF_PROG_TEST_RUN.

use std::{io, net::IpAddr, process::Command};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    BACKEND_F_UP, Backend, Counter, FlowKey, NEXTHOP_F_VALID, NextHop, Settings,
    VIP_F_CLIENT_AFFINITY, addr_from_ip, ring_slot,
};
use xlb::dataplane::{Dataplane, Limits, Role};

use crate::{
    counters::{Delta, Snapshot},
    expect::{Egress, Encap, assert_frame_eq, encapsulated, parse_encap},
    packet::Pkt,
    world::*,
};

/// Map sizes of the fixture: small, so that many fixtures load in
/// parallel, but with room for two full-size (65537-slot) rings.
pub const LIMITS: Limits = Limits {
    max_vips: 16,
    max_backends: 64,
    ring_capacity: 2 * 65537,
    conntrack_size: 4096,
};

/// Whether this test may touch the kernel. Root: yes. Not root: the test
/// is skipped (with a message) on a developer's machine, but when the
/// environment variable `CI` is set a missing privilege is a failure, so
/// that CI can never pass by skipping.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test} needs root (it loads XDP programs); CI is set, so this fails instead of skipping"
        );
    }
    eprintln!("SKIPPED {test}: needs root (it loads XDP programs); run the tests as root");
    false
}

/// Moves the calling thread into a network namespace of its own, so that a
/// test sees a fixed network (only a loopback device, down, no routes)
/// whatever the machine has, and so that what it sets up disappears with
/// the thread. BPF_PROG_TEST_RUN takes the loopback device of the calling
/// thread's namespace as the ingress interface: its ifindex is 1 in every
/// namespace, so [`TEST_RUN_IFINDEX`] holds here too.
pub fn enter_private_netns() {
    // SAFETY: unshare only changes the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
    }
}

/// Runs `ip ARGS` in the calling thread's network namespace.
pub fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(status.success(), "ip {args:?}: {status}");
}

/// Writes a sysctl under /proc/sys of the calling thread's namespace.
pub fn sysctl(path: &str, value: &str) {
    let file = format!("/proc/sys/{}", path.replace('.', "/"));
    std::fs::write(&file, value).unwrap_or_else(|e| panic!("writing {file}: {e}"));
}

/// An XDP verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    Unknown(u32),
}

impl From<u32> for Action {
    fn from(value: u32) -> Self {
        match value {
            0 => Action::Aborted,
            1 => Action::Drop,
            2 => Action::Pass,
            3 => Action::Tx,
            4 => Action::Redirect,
            other => Action::Unknown(other),
        }
    }
}

/// What a program did with a packet: its verdict and the frame as it left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: Action,
    pub bytes: Vec<u8>,
}

impl Outcome {
    /// Asserts XDP_PASS with the frame exactly as it came in.
    #[track_caller]
    pub fn assert_passed_unchanged(&self, input: &[u8]) {
        assert_eq!(self.action, Action::Pass, "verdict");
        assert_frame_eq(&self.bytes, input, "a passed frame must be untouched");
    }

    /// Asserts the verdict and the exact output frame, and that etherparse
    /// finds its outer header well formed. Returns the parsed frame.
    #[track_caller]
    pub fn assert_sent(&self, action: Action, expected: &[u8]) -> Encap<'_> {
        assert_eq!(self.action, action, "verdict");
        assert_frame_eq(&self.bytes, expected, "encapsulated frame");
        parse_encap(&self.bytes).unwrap_or_else(|e| panic!("malformed output: {e}"))
    }
}

/// A loaded data plane with the standard world programmed.
pub struct Fixture {
    pub dp: Dataplane,
    /// Output buffer of test runs: a page, more than any frame the kernel
    /// accepts for a test run.
    out: Vec<u8>,
}

impl Fixture {
    /// A fixture in a private network namespace; `None` when the test must
    /// be skipped (see [`privileged`]).
    pub fn new() -> Option<Self> {
        if !privileged() {
            return None;
        }
        enter_private_netns();
        let dp = Dataplane::load(LIMITS).expect("loading the XDP object (the verifier runs here)");
        let mut fixture = Self {
            dp,
            out: vec![0; 4096],
        };
        fixture.program_world();
        Some(fixture)
    }

    fn program_world(&mut self) {
        self.dp
            .settings
            .set(standard_settings())
            .expect("writing SETTINGS");
        for backend in BACKENDS {
            self.set_backend(backend.id, backend.addr, BACKEND_F_UP);
            self.dp
                .nexthops
                .set(backend.id, standard_nexthop(backend.id))
                .expect("writing NEXTHOPS");
        }
        for vip in VIPS {
            if !vip.pool.is_empty() {
                self.set_pool(&vip, vip.pool);
            }
            self.dp
                .vips
                .insert(vip.key(), vip.info())
                .expect("writing VIPS");
        }
        self.dp
            .decap
            .add(DECAP_V4.into())
            .expect("writing DECAP_ADDRS");
        self.dp
            .decap
            .add(DECAP_V6.into())
            .expect("writing DECAP_ADDRS");
    }

    /// Runs `role`'s program once on `frame`; the output frame is in the
    /// returned slice (valid until the next run). No allocation: for loops
    /// over many packets.
    pub fn run_raw(&mut self, role: Role, frame: &[u8]) -> io::Result<(Action, &[u8])> {
        let program = self.dp.program(role).expect("program");
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut self.out),
            repeat: 1,
            ..TestRunOptions::default()
        });
        match result {
            Ok(result) => Ok((
                Action::from(result.return_value),
                &self.out[..result.data_size_out as usize],
            )),
            Err(aya::programs::ProgramError::SyscallError(e)) => Err(e.io_error),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// Runs the balancer on `frame`.
    pub fn run(&mut self, frame: &[u8]) -> Outcome {
        self.run_role(Role::Balancer, frame)
    }

    /// Runs the decap program on `frame`.
    pub fn run_decap(&mut self, frame: &[u8]) -> Outcome {
        self.run_role(Role::Decap, frame)
    }

    fn run_role(&mut self, role: Role, frame: &[u8]) -> Outcome {
        let (action, bytes) = self
            .run_raw(role, frame)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {role:?}: {e}"));
        Outcome {
            action,
            bytes: bytes.to_vec(),
        }
    }

    /// Runs the balancer and returns what the packet moved.
    pub fn run_counted(&mut self, frame: &[u8]) -> (Outcome, Delta) {
        let before = self.counters();
        let outcome = self.run(frame);
        (outcome, self.counters().since(&before))
    }

    /// Runs the balancer and asserts that the packet passed byte for byte
    /// with exactly the `verdict` counter moved; returns what it moved.
    pub fn assert_passes(&mut self, frame: &[u8], verdict: Counter) -> Delta {
        let (out, moved) = self.run_counted(frame);
        out.assert_passed_unchanged(frame);
        moved.assert_counters(&[verdict]);
        moved
    }

    /// Runs the decap program and returns what the packet moved.
    pub fn run_decap_counted(&mut self, frame: &[u8]) -> (Outcome, Delta) {
        let before = self.counters();
        let outcome = self.run_decap(frame);
        (outcome, self.counters().since(&before))
    }

    pub fn counters(&self) -> Snapshot {
        Snapshot::read(&self.dp.counters, LIMITS.max_vips, LIMITS.max_backends)
    }

    /// The VIP's ring as the packet path sees it: where the programmed VIP
    /// entry says, read back from the map.
    pub fn ring(&self, vip: &VipDef) -> Vec<u32> {
        let info = self.dp.vips.get(&vip.key()).expect("VIP not programmed");
        self.dp
            .rings
            .read(info.ring_offset, info.ring_size)
            .expect("reading RINGS")
    }

    /// The backend the ring gives a new flow: the flow hash (or the
    /// client-address hash for a client-affinity VIP) with the programmed
    /// seed, mapped onto the ring by `ring_slot`: the same code the kernel
    /// runs, from lb-common. Fragments: pass [`Pkt::fragment_flow`].
    pub fn expected_backend(&self, vip: &VipDef, flow: &FlowKey) -> u32 {
        let seed = self.dp.settings.get().expect("reading SETTINGS").hash_seed;
        let hash = if vip.flags & VIP_F_CLIENT_AFFINITY != 0 {
            flow.source_hash(seed)
        } else {
            flow.hash(seed)
        };
        let ring = self.ring(vip);
        ring[ring_slot(hash, ring.len() as u32) as usize]
    }

    /// A copy of `pkt` from the first source port (counting up from its
    /// own) whose flow the ring sends to a backend `want` accepts.
    pub fn pick_sport(&self, vip: &VipDef, pkt: &Pkt, want: impl Fn(u32) -> bool) -> Pkt {
        let start = match pkt.flow().sport {
            0 => 1024,
            port => u16::from_be(port),
        };
        (start..=u16::MAX)
            .map(|port| pkt.clone().sport(port))
            .find(|candidate| want(self.expected_backend(vip, &candidate.flow())))
            .expect("no source port gives a wanted backend")
    }

    /// How a packet to `backend_id` leaves in the standard world: next hop's
    /// MACs and the outer source address of the backend's family.
    pub fn egress(&self, backend_id: u32) -> Egress {
        standard_egress(backend_id)
    }

    /// The exact frame the balancer must send for `frame` when it picks
    /// `backend_id` (see [`encapsulated`]).
    pub fn expected_encap(&self, frame: &[u8], backend_id: u32) -> Vec<u8> {
        encapsulated(frame, backend(backend_id).addr, self.egress(backend_id))
    }

    /// Rewrites the VIP's ring over `pool` (see [`ring_for`]).
    pub fn set_pool(&mut self, vip: &VipDef, pool: &[u32]) {
        self.dp
            .rings
            .write(vip.ring_offset(), &ring_for(pool, RING_SIZE))
            .expect("writing RINGS");
    }

    pub fn set_backend(&mut self, id: u32, addr: IpAddr, flags: u8) {
        let (family, addr) = addr_from_ip(addr);
        let backend = Backend {
            addr,
            family,
            flags,
            _pad: [0; 2],
        };
        self.dp.backends.set(id, backend).expect("writing BACKENDS");
    }

    pub fn set_nexthop(&mut self, backend_id: u32, hop: NextHop) {
        self.dp
            .nexthops
            .set(backend_id, hop)
            .expect("writing NEXTHOPS");
    }

    pub fn update_settings(&mut self, change: impl FnOnce(&mut Settings)) {
        let mut settings = self.dp.settings.get().expect("reading SETTINGS");
        change(&mut settings);
        self.dp.settings.set(settings).expect("writing SETTINGS");
    }

    /// The backend the connection table holds for a flow.
    pub fn tracked(&self, flow: &FlowKey) -> Option<u32> {
        self.dp
            .conntrack
            .flow(flow, HASH_SEED)
            .expect("reading CONNTRACK")
    }
}

pub fn standard_settings() -> Settings {
    let (_, src_v4) = addr_from_ip(OUTER_SRC_V4.into());
    let (_, src_v6) = addr_from_ip(OUTER_SRC_V6.into());
    Settings {
        hash_seed: HASH_SEED,
        flags: 0,
        src_v4: src_v4[0],
        src_v6,
        gateway_mac: [0; 6],
        ..Settings::default()
    }
}

/// A valid next hop out of the test run's ingress interface (so: XDP_TX).
pub fn standard_nexthop(backend_id: u32) -> NextHop {
    NextHop {
        ifindex: TEST_RUN_IFINDEX,
        mtu: MTU,
        dmac: nexthop_mac(backend_id),
        smac: NODE_MAC,
        flags: NEXTHOP_F_VALID,
    }
}

/// How a packet to `backend_id` leaves with [`standard_nexthop`] and
/// [`standard_settings`].
pub fn standard_egress(backend_id: u32) -> Egress {
    let hop = standard_nexthop(backend_id);
    Egress {
        smac: hop.smac,
        dmac: hop.dmac,
        outer_src: outer_src_for(backend(backend_id).addr),
    }
}

/// The configured outer source address of the backend's family.
pub fn outer_src_for(backend: IpAddr) -> IpAddr {
    if backend.is_ipv4() {
        OUTER_SRC_V4.into()
    } else {
        OUTER_SRC_V6.into()
    }
}
