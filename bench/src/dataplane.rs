//! `dataplane`: what one packet costs the XDP balancer, through
//! BPF_PROG_TEST_RUN, as a ratio to floor programs measured in the same run.
//!
//! The balancer rewrites the packet it is given (it encapsulates), so every
//! call gets the original frame: many calls with `repeat = 1`, each timed by
//! the kernel. The cases are interleaved, one call each in turn, so that all
//! of them see the same machine state, and each round's mean is kept; the
//! figure reported is the median of the rounds' means. Before anything is
//! timed, every case runs once and its verdict, counters and output packet
//! are checked (a benchmark of the wrong path is worthless), and after each
//! round the global counters must have moved by exactly what the timed calls
//! should have moved them by.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::{Ipv4Header, Ipv6Header, PacketBuilder};
use lb_common::{
    BACKEND_F_UP, Backend, Counter, DEFAULT_CONNTRACK_SIZE, FAMILY_V4, FAMILY_V6, NEXTHOP_F_VALID,
    NextHop, PROTO_TCP, PROTO_UDP, Settings, VipFilter, VipInfo, VipKey, addr_from_ip,
};
use serde::Serialize;
use xlb::{
    dataplane::{Dataplane, FLOOR_OBJECT, Limits, Role, XdpLog},
    maglev::{self, Member},
};

use crate::{
    machine::{self, Machine},
    results::write_json,
};

const DEFAULT_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/dataplane.json");

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rounds; the figure reported per case is the median of the rounds' means.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Timed calls per case per round (each call runs the program once).
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
    /// Untimed calls per case before the first round.
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Distinct SYN frames (source ports) the spread new-flow case cycles
    /// through.
    #[arg(long, default_value_t = 4096)]
    syn_flows: usize,
    /// Connection-table size in flows (the production default unless set):
    /// the spread SYN case's cost depends on it through cache and TLB misses.
    #[arg(long, default_value_t = DEFAULT_CONNTRACK_SIZE)]
    conntrack_size: u32,
    /// CPU to pin the benchmark to (default: the highest one allowed).
    #[arg(long)]
    cpu: Option<usize>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = DEFAULT_JSON)]
    json: PathBuf,
}

// XDP verdicts.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const RING_SIZE: u32 = 65537;
const BACKENDS_PER_FAMILY: u32 = 100;
/// IPv4 backends have ids 0..100, IPv6 backends 100..200.
const V6_BACKEND_BASE: u32 = BACKENDS_PER_FAMILY;
/// The test run's ingress interface: a next hop on it means XDP_TX.
const TEST_RUN_IFINDEX: u32 = 1;
const HASH_SEED: u32 = 0x5eed_f00d;

const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];
const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x30];

const VIP_TCP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_UDP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
const VIP_TCP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x100);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5, 0, 0, 0, 0, 0, 1);
/// New flows come from here, one source port each (then the next address).
const SYN_CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 0);
const SRC_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const SRC_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2);
const CLIENT_PORT: u16 = 40_000;
/// The single SYN case's source port: a flow of its own.
const SYN_PORT: u16 = 40_001;
const HTTP: u16 = 80;
const DNS: u16 = 53;

/// Which program a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Program {
    Balancer,
    FloorDrop,
    FloorTx,
    /// `floor_tx` plus one log statement, loaded with logging off...
    FloorTxLog,
    /// ...and on (debug).
    FloorTxLogOn,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Balancer => lb_common::program_names::BALANCER,
            Program::FloorDrop => "floor_drop",
            Program::FloorTx => "floor_tx",
            Program::FloorTxLog | Program::FloorTxLogOn => "floor_tx_log",
        }
    }
}

/// What the output of a case's single checked run must look like.
#[derive(Clone, Copy, Debug)]
enum Output {
    /// The input frame, IP packet untouched, in an outer header to one of
    /// the backends of this family.
    Encapsulated { backend_family: u8 },
    /// The input frame, byte for byte.
    Unchanged,
    /// The input frame with its MACs swapped (`floor_tx`).
    MacsSwapped,
    /// Not looked at (`floor_drop`).
    Any,
}

/// Targets, as ratios to `floor_tx`, and Katran's ratios measured here by the
/// same method (/work/shared/ENVIRONMENT.md, issue 2).
#[derive(Clone, Copy, Debug, Serialize)]
struct Target {
    max_ratio: f64,
    katran_ratio: f64,
}

struct Case<'a> {
    name: &'static str,
    description: String,
    program: Program,
    xdp: &'a Xdp,
    frames: Vec<Vec<u8>>,
    next_frame: usize,
    verdict: u32,
    /// Global counters one call moves, by one each.
    counters: &'static [Counter],
    output: Output,
    target: Option<Target>,
}

struct Call {
    verdict: u32,
    output_len: usize,
    nanos: u32,
}

impl Case<'_> {
    fn frame(&self) -> &[u8] {
        &self.frames[self.next_frame]
    }

    /// Runs the program once on the next frame (the original bytes, since
    /// each call copies them in afresh) and advances to the following frame.
    fn call(&mut self, out: &mut [u8]) -> Result<Call> {
        let result = self
            .xdp
            .test_run(TestRunOptions {
                data_in: Some(&self.frames[self.next_frame]),
                data_out: Some(out),
                repeat: 1,
                ..Default::default()
            })
            .with_context(|| format!("{}: test run of {}", self.name, self.program.name()))?;
        self.next_frame = (self.next_frame + 1) % self.frames.len();
        Ok(Call {
            verdict: result.return_value,
            output_len: result.data_size_out as usize,
            nanos: u32::try_from(result.duration.as_nanos()).unwrap_or(u32::MAX),
        })
    }
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(args.calls > 0, "--calls must be at least 1");
    ensure!(
        (1..=1 << 20).contains(&args.syn_flows),
        "--syn-flows must be within 1..=1048576"
    );
    // Described before pinning, which narrows what the process may run on.
    let mut machine = Machine::describe();
    let cpu = machine::pin(args.cpu)?;
    machine.pinned_cpu = Some(cpu);

    let limits = Limits {
        max_vips: 16,
        max_backends: 256,
        ring_capacity: RING_SIZE * 16,
        // The production default unless told: the SYN case then measures
        // inserts into a table at a realistic size and load.
        conntrack_size: args.conntrack_size,
    };
    let mut dp = Dataplane::load(limits).context("loading the data plane (are you root?)")?;
    let vips = program(&mut dp)?;
    let floors = load_floors(XdpLog::Off)?;
    // Logging on: its ring buffer is never read, so after the first few
    // thousand records each statement is a failed reservation. That is
    // still the cost of a statement that runs, which "off" must not have.
    let floors_log_on = load_floors(XdpLog::Debug)?;
    let floor = |name: &str| -> Result<&Xdp> { floor_program(&floors, name) };
    let balancer = dp.program(Role::Balancer)?;
    let mut cases = cases(
        balancer,
        floor(Program::FloorDrop.name())?,
        floor(Program::FloorTx.name())?,
        [
            floor(Program::FloorTxLog.name())?,
            floor_program(&floors_log_on, Program::FloorTxLogOn.name())?,
        ],
        &vips,
        args.syn_flows,
    )?;
    let mut out = vec![0u8; 4096];

    // The flows the hit cases measure must be in the connection table.
    prime(balancer, &mut out)?;
    for case in &mut cases {
        verify(case, &dp, &vips, &mut out)?;
    }
    println!(
        "verified: every case takes the intended path (verdict, counters, output packet); \
         pinned to CPU {cpu}"
    );

    for _ in 0..args.warmup {
        for case in &mut cases {
            case.call(&mut out)?;
        }
    }

    let mut rounds: Vec<Vec<RoundStats>> = vec![Vec::with_capacity(args.rounds); cases.len()];
    let mut samples: Vec<Vec<u32>> = vec![Vec::with_capacity(args.calls); cases.len()];
    for round in 0..args.rounds {
        for column in &mut samples {
            column.clear();
        }
        let before = counters(&dp)?;
        for iteration in 0..args.calls {
            // One call per case in turn, starting one case later each time.
            for k in 0..cases.len() {
                let index = (iteration + k) % cases.len();
                let case = &mut cases[index];
                let call = case.call(&mut out)?;
                if call.verdict != case.verdict {
                    bail!(
                        "{}: verdict {} instead of {} during round {round}",
                        case.name,
                        call.verdict,
                        case.verdict
                    );
                }
                samples[index].push(call.nanos);
            }
        }
        check_counters(&dp, &before, &cases, args.calls as u64)
            .with_context(|| format!("after round {}", round + 1))?;
        for (index, column) in samples.iter_mut().enumerate() {
            rounds[index].push(RoundStats::of(column));
        }
        eprintln!("round {}/{} done", round + 1, args.rounds);
    }

    let report = Report::new(args, machine, &cases, rounds, &vips);
    print_table(&report);
    write_json(&args.json, &report)?;
    println!("\nwrote {}", args.json.display());
    Ok(())
}

/// The addresses the cases use, worked out while programming.
struct Vips {
    not_a_vip: Ipv4Addr,
    v4_backends: Vec<IpAddr>,
    v6_backends: Vec<IpAddr>,
}

/// Programs 3 VIPs, 100 IPv4 backends (for the IPv4 VIPs) and 100 IPv6
/// backends (for the IPv6 VIP), each with a valid next hop out of the test
/// run's ingress interface, and a Maglev ring of 65537 slots per VIP.
fn program(dp: &mut Dataplane) -> Result<Vips> {
    dp.settings.set(Settings {
        hash_seed: HASH_SEED,
        flags: 0,
        src_v4: addr_from_ip(SRC_V4.into()).1[0],
        src_v6: addr_from_ip(SRC_V6.into()).1,
        gateway_mac: [0; 6],
        ..Settings::default()
    })?;
    let hop = NextHop {
        ifindex: TEST_RUN_IFINDEX,
        mtu: 1500,
        dmac: NEXT_HOP_MAC,
        smac: OUR_MAC,
        flags: NEXTHOP_F_VALID,
    };
    let mut v4_backends = Vec::new();
    let mut v6_backends = Vec::new();
    for n in 0..BACKENDS_PER_FAMILY {
        let v4 = IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + n));
        let v6 = IpAddr::V6(Ipv6Addr::from(
            u128::from(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1)) + u128::from(n),
        ));
        for (id, ip) in [(n, v4), (V6_BACKEND_BASE + n, v6)] {
            let (family, addr) = addr_from_ip(ip);
            dp.backends.set(
                id,
                Backend {
                    addr,
                    family,
                    flags: BACKEND_F_UP,
                    _pad: [0; 2],
                },
            )?;
            dp.nexthops.set(id, hop)?;
        }
        v4_backends.push(v4);
        v6_backends.push(v6);
    }
    let v4_ids: Vec<u32> = (0..BACKENDS_PER_FAMILY).collect();
    let v6_ids: Vec<u32> = (V6_BACKEND_BASE..V6_BACKEND_BASE + BACKENDS_PER_FAMILY).collect();
    let vips: [(IpAddr, u16, u8, &[u32]); 3] = [
        (VIP_TCP4.into(), HTTP, PROTO_TCP, &v4_ids),
        (VIP_UDP4.into(), DNS, PROTO_UDP, &v4_ids),
        (VIP_TCP6.into(), HTTP, PROTO_TCP, &v6_ids),
    ];
    let mut filter = VipFilter::default();
    for (id, (ip, port, proto, backend_ids)) in (0u32..).zip(vips) {
        let ring_offset = id * RING_SIZE;
        dp.rings
            .write(ring_offset, &maglev_ring(backend_ids, RING_SIZE)?)?;
        let (family, addr) = addr_from_ip(ip);
        dp.vips.insert(
            VipKey {
                addr,
                port: port.to_be(),
                proto,
                family,
            },
            VipInfo {
                id,
                ring_offset,
                ring_size: RING_SIZE,
                flags: 0,
                generation: 0,
            },
        )?;
        filter.insert(&addr);
    }
    // The common case of traffic to no VIP: an address the prefilter rules
    // out (the other kind, a VIP address on another port, is its own case).
    let not_a_vip = (200..=254)
        .map(|host| Ipv4Addr::new(198, 18, 0, host))
        .find(|ip| !filter.may_contain(&addr_from_ip((*ip).into()).1))
        .context("every candidate non-VIP address collides in the VIP prefilter")?;
    Ok(Vips {
        not_a_vip,
        v4_backends,
        v6_backends,
    })
}

/// The controller's Maglev ring of `size` slots over `backend_ids`, all of
/// weight one.
fn maglev_ring(backend_ids: &[u32], size: u32) -> Result<Vec<u32>> {
    let keys: Vec<[u8; 4]> = backend_ids.iter().map(|id| id.to_be_bytes()).collect();
    let members: Vec<Member<'_>> = keys
        .iter()
        .zip(backend_ids)
        .map(|(key, id)| Member::new(key, *id, 1))
        .collect();
    Ok(maglev::build(&members, size, u64::from(HASH_SEED))?)
}

fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, syn: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OUR_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 64_240);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut frame = Vec::with_capacity(builder.size(0));
    builder.write(&mut frame, &[]).expect("writing to a Vec");
    frame
}

fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, syn: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OUR_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 64_240);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut frame = Vec::with_capacity(builder.size(0));
    builder.write(&mut frame, &[]).expect("writing to a Vec");
    frame
}

fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OUR_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport);
    let payload = [0x42u8; 32];
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, &payload)
        .expect("writing to a Vec");
    frame
}

/// The frames of the flows the connection-table cases reuse.
fn established_v4() -> Vec<u8> {
    tcp4(CLIENT4, CLIENT_PORT, VIP_TCP4, HTTP, false)
}

fn established_v6() -> Vec<u8> {
    tcp6(CLIENT6, CLIENT_PORT, VIP_TCP6, HTTP, false)
}

fn udp_v4() -> Vec<u8> {
    udp4(CLIENT4, CLIENT_PORT, VIP_UDP4, DNS)
}

fn cases<'a>(
    balancer: &'a Xdp,
    floor_drop: &'a Xdp,
    floor_tx: &'a Xdp,
    [floor_tx_log, floor_tx_log_on]: [&'a Xdp; 2],
    vips: &Vips,
    syn_flows: usize,
) -> Result<Vec<Case<'a>>> {
    let spread_syn_frames = (0..syn_flows)
        .map(|n| {
            let per_addr = 64_000;
            let src = Ipv4Addr::from(u32::from(SYN_CLIENT4) + (n / per_addr) as u32);
            let sport = 1024 + (n % per_addr) as u16;
            tcp4(src, sport, VIP_TCP4, HTTP, true)
        })
        .collect();
    let tx_v4 = Output::Encapsulated {
        backend_family: FAMILY_V4,
    };
    let balancer_case = |name, description: String, frames, counters, output, target| Case {
        name,
        description,
        program: Program::Balancer,
        xdp: balancer,
        frames,
        next_frame: 0,
        verdict: if matches!(output, Output::Unchanged) {
            XDP_PASS
        } else {
            XDP_TX
        },
        counters,
        output,
        target,
    };
    Ok(vec![
        balancer_case(
            "established_v4",
            format!(
                "TCP ACK of a known flow {CLIENT4}:{CLIENT_PORT} -> {VIP_TCP4}:{HTTP} (connection-table hit, IPIP)"
            ),
            vec![established_v4()],
            &[Counter::Tx, Counter::ConnHit],
            tx_v4,
            Some(Target {
                max_ratio: 2.0,
                katran_ratio: 2.9,
            }),
        ),
        // Katran's 5.9 was measured with one SYN frame sent again and again,
        // so the target is judged on the same: the new-flow path's work
        // (VIP lookup, ring, insert) with its lines in the caches.
        balancer_case(
            "syn_v4",
            format!(
                "TCP SYN {CLIENT4}:{SYN_PORT} -> {VIP_TCP4}:{HTTP}, the same frame every call \
                 (ring lookup and connection-table insert, IPIP)"
            ),
            vec![tcp4(CLIENT4, SYN_PORT, VIP_TCP4, HTTP, true)],
            &[Counter::Tx, Counter::ConnMiss],
            tx_v4,
            Some(Target {
                max_ratio: 4.0,
                katran_ratio: 5.9,
            }),
        ),
        // What new flows from many clients add: each takes a random line of
        // the ring and of the connection table, which the caches may or may
        // not still hold when its turn comes again.
        balancer_case(
            "syn_v4_spread",
            format!(
                "TCP SYN of a new flow to {VIP_TCP4}:{HTTP}, {syn_flows} source ports in turn \
                 (ring lookup and connection-table insert in random lines, IPIP)"
            ),
            spread_syn_frames,
            &[Counter::Tx, Counter::ConnMiss],
            tx_v4,
            None,
        ),
        balancer_case(
            "udp_v4",
            format!(
                "UDP datagram of a known flow {CLIENT4}:{CLIENT_PORT} -> {VIP_UDP4}:{DNS} (connection-table hit, IPIP)"
            ),
            vec![udp_v4()],
            &[Counter::Tx, Counter::ConnHit],
            tx_v4,
            None,
        ),
        balancer_case(
            "established_v6",
            format!(
                "TCP ACK of a known flow [{CLIENT6}]:{CLIENT_PORT} -> [{VIP_TCP6}]:{HTTP} (connection-table hit, IP6IP6)"
            ),
            vec![established_v6()],
            &[Counter::Tx, Counter::ConnHit],
            Output::Encapsulated {
                backend_family: FAMILY_V6,
            },
            None,
        ),
        balancer_case(
            "not_a_vip",
            format!(
                "TCP to {}:{HTTP}, no VIP (ruled out by the VIP prefilter)",
                vips.not_a_vip
            ),
            vec![tcp4(CLIENT4, CLIENT_PORT, vips.not_a_vip, HTTP, false)],
            &[Counter::PassNotVip],
            Output::Unchanged,
            Some(Target {
                max_ratio: 1.3,
                katran_ratio: 1.7,
            }),
        ),
        balancer_case(
            "vip_addr_other_port",
            format!(
                "TCP to {VIP_TCP4}:443, a VIP's address but no VIP's port \
                 (passes the prefilter, misses the VIP table twice)"
            ),
            vec![tcp4(CLIENT4, CLIENT_PORT, VIP_TCP4, 443, false)],
            &[Counter::PassNotVip],
            Output::Unchanged,
            None,
        ),
        Case {
            name: "floor_drop",
            description: "floor: returns XDP_DROP (the fixed cost of a test run)".into(),
            program: Program::FloorDrop,
            xdp: floor_drop,
            frames: vec![established_v4()],
            next_frame: 0,
            verdict: XDP_DROP,
            counters: &[],
            output: Output::Any,
            target: None,
        },
        Case {
            name: "floor_tx",
            description: "floor: parses Ethernet/IPv4/TCP, swaps MACs, XDP_TX".into(),
            program: Program::FloorTx,
            xdp: floor_tx,
            frames: vec![established_v4()],
            next_frame: 0,
            verdict: XDP_TX,
            counters: &[],
            output: Output::MacsSwapped,
            target: None,
        },
        Case {
            name: "floor_tx_log_off",
            description: "floor_tx with an aya-log debug statement, logging off (as xlb ships)"
                .into(),
            program: Program::FloorTxLog,
            xdp: floor_tx_log,
            frames: vec![established_v4()],
            next_frame: 0,
            verdict: XDP_TX,
            counters: &[],
            output: Output::MacsSwapped,
            target: None,
        },
        Case {
            name: "floor_tx_log_on",
            description: "floor_tx with an aya-log debug statement, logging on (debug)".into(),
            program: Program::FloorTxLogOn,
            xdp: floor_tx_log_on,
            frames: vec![established_v4()],
            next_frame: 0,
            verdict: XDP_TX,
            counters: &[],
            output: Output::MacsSwapped,
            target: None,
        },
    ])
}

/// The floor programs, loaded with the log level `log`.
fn load_floors(log: XdpLog) -> Result<aya::Ebpf> {
    let mut floors = aya::EbpfLoader::new()
        .override_global(aya_log::LEVEL, &(log as u8), true)
        .load(FLOOR_OBJECT)
        .context("loading the floor object")?;
    for name in [
        Program::FloorDrop.name(),
        Program::FloorTx.name(),
        Program::FloorTxLog.name(),
    ] {
        let xdp: &mut Xdp = floors
            .program_mut(name)
            .with_context(|| format!("the floor object has no program {name}"))?
            .try_into()
            .with_context(|| format!("{name} is not an XDP program"))?;
        xdp.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(floors)
}

fn floor_program<'a>(floors: &'a aya::Ebpf, name: &str) -> Result<&'a Xdp> {
    floors
        .program(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))
}

/// Opens the flows that the hit cases reuse: a TCP SYN for each, the first
/// datagram for UDP.
fn prime(balancer: &Xdp, out: &mut [u8]) -> Result<()> {
    let openers = [
        (
            "established_v4",
            tcp4(CLIENT4, CLIENT_PORT, VIP_TCP4, HTTP, true),
        ),
        (
            "established_v6",
            tcp6(CLIENT6, CLIENT_PORT, VIP_TCP6, HTTP, true),
        ),
        ("udp_v4", udp_v4()),
    ];
    for (name, frame) in openers {
        let result = balancer.test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut *out),
            repeat: 1,
            ..Default::default()
        })?;
        ensure!(
            result.return_value == XDP_TX,
            "{name}: opening the flow gave verdict {} instead of XDP_TX ({XDP_TX})",
            result.return_value
        );
    }
    Ok(())
}

/// Runs a case once and checks that it took the path it is meant to measure.
fn verify(case: &mut Case, dp: &Dataplane, vips: &Vips, out: &mut [u8]) -> Result<()> {
    let before = counters(dp)?;
    let frame = case.frame().to_vec();
    let call = case.call(out)?;
    ensure!(
        call.verdict == case.verdict,
        "{}: verdict {} instead of {}: the benchmark would time the wrong path",
        case.name,
        call.verdict,
        case.verdict
    );
    check_counters(dp, &before, std::slice::from_ref(case), 1)
        .with_context(|| format!("{}: checking its single run", case.name))?;
    let output = &out[..call.output_len];
    match case.output {
        Output::Encapsulated { backend_family } => {
            let backends = if backend_family == FAMILY_V4 {
                &vips.v4_backends
            } else {
                &vips.v6_backends
            };
            check_encapsulated(output, &frame, backends)
                .with_context(|| format!("{}: the encapsulated packet", case.name))?;
        }
        Output::Unchanged => ensure!(
            output == frame.as_slice(),
            "{}: a passed packet was modified",
            case.name
        ),
        Output::MacsSwapped => ensure!(
            output.len() == frame.len()
                && output[..6] == frame[6..12]
                && output[6..12] == frame[..6]
                && output[12..] == frame[12..],
            "{}: expected the frame with its MACs swapped",
            case.name
        ),
        Output::Any => {}
    }
    Ok(())
}

/// The output is the input's IP packet, untouched, behind a valid outer IP
/// header from our source address to one of `backends`, in a frame to the
/// next hop.
fn check_encapsulated(output: &[u8], input: &[u8], backends: &[IpAddr]) -> Result<()> {
    ensure!(output.len() > 14, "{} bytes", output.len());
    ensure!(
        output[..6] == NEXT_HOP_MAC && output[6..12] == OUR_MAC,
        "wrong MACs"
    );
    let ether_type = u16::from_be_bytes([output[12], output[13]]);
    let (source, destination, payload) = match ether_type {
        0x0800 => {
            let (ip, payload) = Ipv4Header::from_slice(&output[14..])?;
            ensure!(
                ip.header_checksum == ip.calc_header_checksum(),
                "bad outer header checksum"
            );
            ensure!(
                usize::from(ip.total_len) == output.len() - 14,
                "outer total length {} for {} bytes",
                ip.total_len,
                output.len() - 14
            );
            (
                IpAddr::from(ip.source),
                IpAddr::from(ip.destination),
                payload,
            )
        }
        0x86dd => {
            let (ip, payload) = Ipv6Header::from_slice(&output[14..])?;
            ensure!(
                usize::from(ip.payload_length) == payload.len(),
                "outer payload length {} for {} bytes",
                ip.payload_length,
                payload.len()
            );
            (
                IpAddr::from(ip.source),
                IpAddr::from(ip.destination),
                payload,
            )
        }
        other => bail!("outer ether type {other:#06x}"),
    };
    let expected_source: IpAddr = if destination.is_ipv4() {
        SRC_V4.into()
    } else {
        SRC_V6.into()
    };
    ensure!(source == expected_source, "outer source {source}");
    ensure!(
        backends.contains(&destination),
        "outer destination {destination} is not one of this VIP's backends"
    );
    ensure!(payload == &input[14..], "the inner packet was modified");
    Ok(())
}

fn counters(dp: &Dataplane) -> Result<BTreeMap<Counter, u64>> {
    Ok(dp.counters.all_global()?.into_iter().collect())
}

/// Every global counter moved by exactly what `calls` calls of each case
/// should have moved it by, and no other counter moved.
fn check_counters(
    dp: &Dataplane,
    before: &BTreeMap<Counter, u64>,
    cases: &[Case],
    calls: u64,
) -> Result<()> {
    let after = counters(dp)?;
    let mut expected: BTreeMap<Counter, u64> = BTreeMap::new();
    for case in cases {
        for counter in case.counters {
            *expected.entry(*counter).or_default() += calls;
        }
    }
    let mut wrong = Vec::new();
    for counter in Counter::ALL {
        let moved = after[&counter] - before[&counter];
        let want = expected.get(&counter).copied().unwrap_or(0);
        if moved != want {
            wrong.push(format!(
                "{} moved by {moved}, expected {want}",
                counter.name()
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "counters show a path other than the intended one: {}",
        wrong.join("; ")
    );
    Ok(())
}

/// One case's figures in one round, in nanoseconds per run.
#[derive(Clone, Debug, Serialize)]
struct RoundStats {
    mean_ns: f64,
    median_ns: f64,
    min_ns: u32,
    p99_ns: u32,
}

impl RoundStats {
    fn of(samples: &mut [u32]) -> Self {
        samples.sort_unstable();
        let sum: u64 = samples.iter().map(|&ns| u64::from(ns)).sum();
        let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
        Self {
            mean_ns: sum as f64 / samples.len() as f64,
            median_ns: median_u32(samples),
            min_ns: samples[0],
            p99_ns: p99,
        }
    }
}

fn median_u32(sorted: &[u32]) -> f64 {
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        f64::from(sorted[mid])
    } else {
        (f64::from(sorted[mid - 1]) + f64::from(sorted[mid])) / 2.0
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    machine: Machine,
    method: Method,
    setup: Setup,
    /// The reference of every ratio: `floor_tx`'s ns per packet.
    floor_tx_ns: f64,
    cases: Vec<CaseReport>,
    targets_met: usize,
    targets_total: usize,
}

#[derive(Debug, Serialize)]
struct Method {
    harness: &'static str,
    repeat_per_call: u32,
    calls_per_case_per_round: usize,
    warmup_calls_per_case: usize,
    rounds: usize,
    interleaving: &'static str,
    statistic: &'static str,
}

#[derive(Debug, Serialize)]
struct Setup {
    vips: Vec<String>,
    backends: String,
    ring_size: u32,
    ring: &'static str,
    next_hops: &'static str,
    conntrack_size: u32,
    syn_flows: usize,
    hash_seed: u32,
}

#[derive(Debug, Serialize)]
struct CaseReport {
    name: &'static str,
    description: String,
    program: &'static str,
    frame_len: usize,
    verdict: u32,
    /// Median over rounds of the round's mean.
    ns_per_packet: f64,
    /// Median over rounds of the round's median.
    median_ns: f64,
    ratio_to_floor_tx: f64,
    /// This case's mean over `floor_tx`'s mean, round by round.
    round_ratios: Vec<f64>,
    target: Option<Target>,
    /// `Some(true)`: at or under the target ratio.
    met: Option<bool>,
    rounds: Vec<RoundStats>,
}

impl Report {
    fn new(
        args: &Args,
        machine: Machine,
        cases: &[Case],
        rounds: Vec<Vec<RoundStats>>,
        vips: &Vips,
    ) -> Self {
        let means = |stats: &[RoundStats]| stats.iter().map(|s| s.mean_ns).collect::<Vec<_>>();
        let floor_index = cases
            .iter()
            .position(|case| case.program == Program::FloorTx)
            .expect("floor_tx is a case");
        let floor_means = means(&rounds[floor_index]);
        let floor_tx_ns = median(&floor_means);
        let cases: Vec<CaseReport> = cases
            .iter()
            .zip(rounds)
            .map(|(case, stats)| {
                let ns_per_packet = median(&means(&stats));
                let ratio = ns_per_packet / floor_tx_ns;
                CaseReport {
                    name: case.name,
                    description: case.description.clone(),
                    program: case.program.name(),
                    frame_len: case.frames[0].len(),
                    verdict: case.verdict,
                    ns_per_packet,
                    median_ns: median(&stats.iter().map(|s| s.median_ns).collect::<Vec<_>>()),
                    ratio_to_floor_tx: ratio,
                    round_ratios: stats
                        .iter()
                        .zip(&floor_means)
                        .map(|(s, floor)| s.mean_ns / floor)
                        .collect(),
                    target: case.target,
                    met: case.target.map(|target| ratio <= target.max_ratio),
                    rounds: stats,
                }
            })
            .collect();
        let targets_total = cases.iter().filter(|case| case.met.is_some()).count();
        let targets_met = cases.iter().filter(|case| case.met == Some(true)).count();
        Self {
            benchmark: "dataplane",
            machine,
            method: Method {
                harness: "BPF_PROG_TEST_RUN (aya TestRun), kernel-measured duration per call",
                repeat_per_call: 1,
                calls_per_case_per_round: args.calls,
                warmup_calls_per_case: args.warmup,
                rounds: args.rounds,
                interleaving: "round-robin, one call per case in turn, rotating start",
                statistic: "median over rounds of the per-round mean ns",
            },
            setup: Setup {
                vips: vec![
                    format!(
                        "{VIP_TCP4}:{HTTP}/tcp -> {} IPv4 backends",
                        vips.v4_backends.len()
                    ),
                    format!(
                        "{VIP_UDP4}:{DNS}/udp -> {} IPv4 backends",
                        vips.v4_backends.len()
                    ),
                    format!(
                        "[{VIP_TCP6}]:{HTTP}/tcp -> {} IPv6 backends",
                        vips.v6_backends.len()
                    ),
                ],
                backends: format!(
                    "{} IPv4 ({}..), {} IPv6 ({}..)",
                    vips.v4_backends.len(),
                    vips.v4_backends[0],
                    vips.v6_backends.len(),
                    vips.v6_backends[0]
                ),
                ring_size: RING_SIZE,
                ring: "the controller's Maglev engine, equal weights",
                next_hops: "valid entry per backend, ifindex 1 (the test run's ingress): XDP_TX",
                conntrack_size: args.conntrack_size,
                syn_flows: args.syn_flows,
                hash_seed: HASH_SEED,
            },
            floor_tx_ns,
            cases,
            targets_met,
            targets_total,
        }
    }
}

fn print_table(report: &Report) {
    let m = &report.machine;
    println!(
        "\nxlb data plane, BPF_PROG_TEST_RUN, repeat=1 per call: {} rounds x {} calls per case, \
         median of round means",
        report.method.rounds, report.method.calls_per_case_per_round
    );
    println!("{}", m.summary());
    println!();
    println!(
        "{:<22} {:>9} {:>10} {:>15} {:>9} {:>8} {:>8}  result",
        "case", "ns/packet", "median ns", "rounds (mean)", "x floor", "target", "Katran"
    );
    println!("{}", "-".repeat(96));
    for case in &report.cases {
        let means: Vec<f64> = case.rounds.iter().map(|r| r.mean_ns).collect();
        let lo = means.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = means.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (target, katran, result) = match (case.target, case.met) {
            (Some(target), Some(met)) => (
                format!("<={:.1}", target.max_ratio),
                format!("{:.1}", target.katran_ratio),
                if met { "pass" } else { "MISS" },
            ),
            _ => ("-".into(), "-".into(), ""),
        };
        println!(
            "{:<22} {:>9.1} {:>10.1} {:>15} {:>9.2} {:>8} {:>8}  {}",
            case.name,
            case.ns_per_packet,
            case.median_ns,
            format!("{lo:.0}-{hi:.0}"),
            case.ratio_to_floor_tx,
            target,
            katran,
            result
        );
    }
    println!();
    println!(
        "ratios are to floor_tx ({:.1} ns); targets met: {}/{}",
        report.floor_tx_ns, report.targets_met, report.targets_total
    );
    for case in &report.cases {
        if case.met == Some(false) {
            let target = case.target.expect("a missed case has a target");
            println!(
                "MISSED TARGET: {} at {:.2}x floor_tx, target <= {:.1}x",
                case.name, case.ratio_to_floor_tx, target.max_ratio
            );
        }
    }
}
