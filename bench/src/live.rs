//! `live`: packets per second through xlb on real interfaces, against a
//! floor on the same path in the same run.
//!
//! The path, all in namespaces of one [`Topology`]: a generator host runs
//! `xlb pktgen`'s XDP generator into a veth; on the other end, the xlb node
//! runs either the real balancer (native XDP, a VIP with 16 backends and
//! the default 2M-flow connection table), which encapsulates and redirects
//! into a second veth, or the floor program `floor_redirect`, which only
//! parses and redirects; the backend host's end counts arrivals with the
//! sink. The two programs take turns case by case, so both see the same
//! machine state.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf,
    maps::DevMap,
    programs::{Xdp, xdp::XdpLinkId},
};
use lb_common::{
    BACKEND_F_UP, Backend, Counter, NEXTHOP_F_VALID, NextHop, PROTO_TCP, Settings, VipInfo, VipKey,
    addr_from_ip,
};
use serde::Serialize;
use xlb::{
    dataplane::{AttachMode, Dataplane, FLOOR_OBJECT, Limits, Role},
    maglev::{self, Member},
    pktgen::{self, Generator, Kind, Limit, Packets, Report, Run, Sink},
    topology::{Host, Link, LinkOpts, Topology},
};

use crate::{machine::Machine, plot, results::write_json};

const DEFAULT_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/live.json");
const DEFAULT_SVG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/live.svg");

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const VIP_PORT: u16 = 80;
/// Flow 0's source; more flows count up from it.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 1);
const NODE_SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 1);
const BACKENDS: u32 = 16;
const RING_SIZE: u32 = 65537;
const HASH_SEED: u32 = 0x786c_6221;
/// The xlb node's program sees frames from the generator on this interface.
const NODE_IN: &str = "eth0";
const NODE_OUT: &str = "eth1";
/// Frames the backend may count that xlb did not send.
const STRAY_FRAMES: u64 = 16;
const KINDS: [(&str, Kind); 2] = [("established", Kind::TcpAck), ("new", Kind::TcpSyn)];
/// Connection-table sizes the sweep loads xlb with: a quarter of a million
/// flows (4 MiB), the default (32 MiB) and 16 million (256 MiB).
const TABLE_SWEEP: [u32; 3] = [1 << 18, 1 << 21, 1 << 24];
const SWEEP_FLOWS: u32 = 100_000;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A short run: fewer seconds per case
    #[arg(long)]
    pub quick: bool,
    /// Seconds each case sends for (default 3, or 0.5 with --quick)
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Generator threads (one pinned per CPU)
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Frame size in bytes (without FCS)
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[arg(long, default_value = DEFAULT_JSON)]
    pub json: PathBuf,
    #[arg(long, default_value = DEFAULT_SVG)]
    pub svg: PathBuf,
}

/// Which program the xlb node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeProgram {
    Xlb,
    Floor,
}

/// The generator → node → backend path, torn down when dropped.
pub struct LivePath {
    pub gen_host: Host,
    pub node: Host,
    pub to_node: Link,
    pub sink: Sink,
    dataplane: Dataplane,
    floor: Ebpf,
    floor_link: Option<XdpLinkId>,
    pub generator: Generator,
    attached: Option<NodeProgram>,
    /// Held for its teardown when the path is dropped, after the programs.
    _topo: Topology,
}

impl LivePath {
    pub fn build(tag: &str) -> Result<Self> {
        Self::with_limits(tag, Limits::default())
    }

    /// [`Self::build`], with xlb loaded with `limits` (such as another
    /// connection-table size).
    pub fn with_limits(tag: &str, limits: Limits) -> Result<Self> {
        let topo = Topology::new(tag)?;
        let gen_host = topo.host("gen")?;
        let node = topo.host("node")?;
        let backend = topo.host("backend")?;
        let to_node = topo.link(
            &gen_host,
            &node,
            LinkOpts::new()
                .names("eth0", NODE_IN)
                .addr_a("198.18.10.1/24")
                .addr_b("198.18.10.2/24"),
        )?;
        let to_backend = topo.link(
            &node,
            &backend,
            LinkOpts::new()
                .names(NODE_OUT, "eth0")
                .mtu(1600)
                .addr_a("198.18.20.1/24")
                .addr_b("198.18.20.2/24"),
        )?;
        let sink = backend
            .run_in(|| Sink::attach("eth0", 0))?
            .context("attaching the sink on the backend")?;
        // Maps that name interfaces (devmaps) resolve them in the
        // namespace of the thread that writes them: the node's.
        let out_ifindex = to_backend.a.ifindex;
        let (dataplane, floor) = node.run_in(|| -> Result<(Dataplane, Ebpf)> {
            let mut dataplane = Dataplane::load(limits).context("loading xlb (are you root?)")?;
            program_xlb(&mut dataplane, &to_backend)?;
            let mut floor = Ebpf::load(FLOOR_OBJECT).context("loading the floor")?;
            let program: &mut Xdp = floor
                .program_mut("floor_redirect")
                .context("no floor_redirect")?
                .try_into()?;
            program.load()?;
            let mut port: DevMap<_> =
                DevMap::try_from(floor.map_mut("FLOOR_PORT").context("no FLOOR_PORT")?)?;
            port.set(0, out_ifindex, None, 0)?;
            Ok((dataplane, floor))
        })??;
        let path = Self {
            _topo: topo,
            gen_host,
            node,
            to_node,
            sink,
            dataplane,
            floor,
            floor_link: None,
            generator: Generator::load()?,
            attached: None,
        };
        Ok(path)
    }
}

/// One VIP, 16 backends all reached through the backend link (the backend
/// host counts whatever arrives).
fn program_xlb(dp: &mut Dataplane, to_backend: &Link) -> Result<()> {
    {
        dp.settings.set(Settings {
            hash_seed: HASH_SEED,
            src_v4: addr_from_ip(NODE_SRC.into()).1[0],
            ..Settings::default()
        })?;
        let hop = NextHop {
            ifindex: to_backend.a.ifindex,
            mtu: 1600,
            dmac: to_backend.b.mac,
            smac: to_backend.a.mac,
            flags: NEXTHOP_F_VALID,
        };
        let ids: Vec<u32> = (0..BACKENDS).collect();
        for id in &ids {
            let ip = IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(198, 18, 30, 1)) + id,
            ));
            let (family, addr) = addr_from_ip(ip);
            dp.backends.set(
                *id,
                Backend {
                    addr,
                    family,
                    flags: BACKEND_F_UP,
                    _pad: [0; 2],
                },
            )?;
            dp.set_next_hop(*id, Some(hop))?;
        }
        let keys: Vec<[u8; 4]> = ids.iter().map(|id| id.to_be_bytes()).collect();
        let members: Vec<Member<'_>> = keys
            .iter()
            .zip(&ids)
            .map(|(key, id)| Member::new(key, *id, 1))
            .collect();
        dp.rings.write(
            0,
            &maglev::build(&members, RING_SIZE, u64::from(HASH_SEED))?,
        )?;
        let (family, addr) = addr_from_ip(VIP.into());
        dp.vips.insert(
            VipKey {
                addr,
                port: VIP_PORT.to_be(),
                proto: PROTO_TCP,
                family,
            },
            VipInfo {
                id: 0,
                ring_offset: 0,
                ring_size: RING_SIZE,
                flags: 0,
                generation: 0,
            },
        )?;
    }
    Ok(())
}

impl LivePath {
    /// Puts `program` on the node's ingress interface (native XDP).
    pub fn use_program(&mut self, program: NodeProgram) -> Result<()> {
        if self.attached == Some(program) {
            return Ok(());
        }
        let Self {
            node,
            dataplane,
            floor,
            floor_link,
            attached,
            ..
        } = self;
        node.run_in(|| -> Result<()> {
            match attached.take() {
                Some(NodeProgram::Xlb) => dataplane.detach(Role::Balancer, NODE_IN)?,
                Some(NodeProgram::Floor) => {
                    let p: &mut Xdp = floor
                        .program_mut("floor_redirect")
                        .context("floor")?
                        .try_into()?;
                    if let Some(link) = floor_link.take() {
                        p.detach(link)?;
                    }
                }
                None => {}
            }
            match program {
                NodeProgram::Xlb => {
                    dataplane.attach(Role::Balancer, NODE_IN, AttachMode::Native)?;
                }
                NodeProgram::Floor => {
                    let p: &mut Xdp = floor
                        .program_mut("floor_redirect")
                        .context("floor")?
                        .try_into()?;
                    *floor_link = Some(p.attach(NODE_IN, aya::programs::XdpMode::Driver)?);
                }
            }
            Ok(())
        })??;
        *attached = Some(program);
        Ok(())
    }

    pub fn packets(&self, kind: Kind, flows: u32, size: usize) -> Packets {
        Packets {
            kind,
            src: CLIENT.into(),
            dst: SocketAddr::new(VIP.into(), VIP_PORT),
            src_mac: self.to_node.a.mac,
            dst_mac: self.to_node.b.mac,
            size,
            flows,
        }
    }

    /// Sends `packets` until `limit`, returning the generator's report and
    /// the packets the backend's sink counted meanwhile.
    pub fn send(
        &mut self,
        packets: Packets,
        limit: Limit,
        threads: usize,
        rate: Option<u64>,
    ) -> Result<(Report, u64)> {
        let cpus = pktgen::allowed_cpus();
        let cpus: Vec<usize> = cpus.iter().rev().take(threads).copied().collect();
        let run = Run {
            interface: "eth0".to_owned(),
            packets,
            limit,
            cpus,
            rate,
            batch: 64,
        };
        let before = self.sink.counts()?.0;
        let generator = &mut self.generator;
        let report = self.gen_host.run_in(|| generator.run(&run, |_, _| {}))??;
        // Frames still in flight land within a moment.
        std::thread::sleep(Duration::from_millis(50));
        let delivered = self.sink.counts()?.0 - before;
        Ok((report, delivered))
    }

    pub fn xlb_counter(&self, counter: Counter) -> Result<u64> {
        Ok(self.dataplane.counters.global(counter)?)
    }
}

#[derive(Debug, Serialize)]
struct CaseResult {
    program: NodeProgram,
    /// `established` (TCP ACKs of flows in the connection table) or `new`
    /// (TCP SYNs: ring lookup and table insert every packet).
    flows_kind: &'static str,
    flows: u32,
    sent: u64,
    delivered: u64,
    loss: u64,
    seconds: f64,
    sent_pps: f64,
    delivered_pps: f64,
}

#[derive(Debug, Serialize)]
struct Comparison {
    flows_kind: &'static str,
    flows: u32,
    xlb_pps: f64,
    floor_pps: f64,
    /// xlb's delivered rate over the floor's.
    ratio: f64,
}

/// xlb against the floor with [`SWEEP_FLOWS`] flows, by connection-table
/// size.
#[derive(Debug, Serialize)]
struct TableCase {
    conntrack_size: u32,
    flows_kind: &'static str,
    flows: u32,
    xlb_pps: f64,
    floor_pps: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct LiveReport {
    benchmark: &'static str,
    method: &'static str,
    frame_size: usize,
    generator_threads: usize,
    seconds_per_case: f64,
    target: &'static str,
    target_met: bool,
    cases: Vec<CaseResult>,
    comparisons: Vec<Comparison>,
    table_sweep: Vec<TableCase>,
    machine: Machine,
}

/// One case: the floor, then xlb, on the same packets and for the same
/// time; the xlb run checks that what the backend counted is what xlb sent.
fn measure(
    path: &mut LivePath,
    kind: Kind,
    flows_kind: &'static str,
    flows: u32,
    args: &Args,
    seconds: f64,
) -> Result<(CaseResult, CaseResult)> {
    let packets = path.packets(kind, flows, args.size);
    let mut results = Vec::with_capacity(2);
    for program in [NodeProgram::Floor, NodeProgram::Xlb] {
        path.use_program(program)?;
        if program == NodeProgram::Xlb && kind == Kind::TcpAck {
            // Puts every flow in the connection table first.
            path.send(
                packets.clone(),
                Limit::Count(u64::from(flows)),
                1,
                Some(200_000),
            )?;
        }
        let forwarded = path.xlb_counter(Counter::Redirect)?;
        let start = Instant::now();
        let (report, delivered) = path.send(
            packets.clone(),
            Limit::Duration(Duration::from_secs_f64(seconds)),
            args.threads,
            None,
        )?;
        let elapsed = report.elapsed.max(start.elapsed() / 2);
        ensure!(
            delivered > 0,
            "{program:?}: nothing reached the backend; xlb's counters: {:?}",
            path.dataplane.counters.all_global()?
        );
        if program == NodeProgram::Xlb {
            let redirected = path.xlb_counter(Counter::Redirect)? - forwarded;
            // The node's kernel talks on the link too (IPv6 neighbour
            // discovery, MLD): a few frames of slack.
            ensure!(
                redirected + STRAY_FRAMES >= delivered,
                "xlb redirected {redirected} packets but the backend counted {delivered}"
            );
        }
        results.push(CaseResult {
            program,
            flows_kind,
            flows,
            sent: report.sent,
            delivered,
            loss: report.sent.saturating_sub(delivered),
            seconds: elapsed.as_secs_f64(),
            sent_pps: report.rate(),
            delivered_pps: delivered as f64 / elapsed.as_secs_f64(),
        });
    }
    let xlb = results.pop().context("the xlb case")?;
    let floor = results.pop().context("the floor case")?;
    Ok((floor, xlb))
}

/// The same flows through connection tables of several sizes: a table
/// with fewer sets than flows packs them into fewer cache lines, and a
/// larger one spreads them over more 4 KiB pages (BPF maps are vmalloc'ed
/// page by page), so the sweep shows what the table's memory footprint
/// costs per packet.
fn sweep_tables(args: &Args, seconds: f64) -> Result<Vec<TableCase>> {
    println!("the same {SWEEP_FLOWS} flows by connection-table size:");
    println!(
        "{:<12} {:>10} {:>12} {:>12} {:>7}",
        "flows", "table", "floor Mpps", "xlb Mpps", "ratio"
    );
    let mut sweep = Vec::new();
    for conntrack_size in TABLE_SWEEP {
        let limits = Limits {
            conntrack_size,
            ..Limits::default()
        };
        let mut path = LivePath::with_limits("bench-live-table", limits)?;
        for (flows_kind, kind) in KINDS {
            let (floor, xlb) = measure(&mut path, kind, flows_kind, SWEEP_FLOWS, args, seconds)?;
            let case = TableCase {
                conntrack_size,
                flows_kind,
                flows: SWEEP_FLOWS,
                xlb_pps: xlb.delivered_pps,
                floor_pps: floor.delivered_pps,
                ratio: xlb.delivered_pps / floor.delivered_pps,
            };
            println!(
                "{:<12} {:>10} {:>12.3} {:>12.3} {:>7.2}",
                flows_kind,
                conntrack_size,
                case.floor_pps / 1e6,
                case.xlb_pps / 1e6,
                case.ratio
            );
            sweep.push(case);
        }
    }
    Ok(sweep)
}

pub fn run(args: &Args) -> Result<()> {
    let seconds = args.seconds.unwrap_or(if args.quick { 0.5 } else { 3.0 });
    let mut path = LivePath::build("bench-live")?;
    let flow_counts: [u32; 3] = [1, 100, 100_000];
    let mut cases = Vec::new();
    let mut comparisons = Vec::new();
    println!(
        "live: pktgen -> veth -> xlb node (native XDP) -> veth -> backend sink; {} B frames, {} generator thread(s), {seconds} s per case",
        args.size, args.threads
    );
    println!(
        "{:<12} {:>7} {:>12} {:>12} {:>10} {:>7}",
        "flows", "count", "floor Mpps", "xlb Mpps", "xlb loss", "ratio"
    );
    for (flows_kind, kind) in KINDS {
        for &flows in &flow_counts {
            let (floor, xlb) = measure(&mut path, kind, flows_kind, flows, args, seconds)?;
            let pair = [floor.delivered_pps, xlb.delivered_pps];
            let xlb_loss = xlb.loss;
            cases.extend([floor, xlb]);
            let ratio = pair[1] / pair[0];
            println!(
                "{:<12} {:>7} {:>12.3} {:>12.3} {:>10} {:>7.2}",
                flows_kind,
                flows,
                pair[0] / 1e6,
                pair[1] / 1e6,
                xlb_loss,
                ratio
            );
            comparisons.push(Comparison {
                flows_kind,
                flows,
                xlb_pps: pair[1],
                floor_pps: pair[0],
                ratio,
            });
        }
    }
    drop(path);
    let table_sweep = sweep_tables(args, seconds)?;
    let at_100k: Vec<&Comparison> = comparisons.iter().filter(|c| c.flows == 100_000).collect();
    let target_met = at_100k.iter().all(|c| c.ratio >= 0.7);
    for c in &at_100k {
        println!(
            "target: xlb >= 70% of the floor with 100 000 {} flows: {:.0}% ({})",
            c.flows_kind,
            c.ratio * 100.0,
            if c.ratio >= 0.7 { "pass" } else { "MISS" }
        );
    }
    let categories: Vec<String> = comparisons
        .iter()
        .map(|c| format!("{} {}", c.flows_kind, c.flows))
        .collect();
    plot::bars(
        &args.svg,
        "xlb vs floor: packets delivered to the backend (Mpps, one run)",
        "Mpps delivered",
        &categories,
        &[
            (
                "floor (parse + redirect)",
                comparisons.iter().map(|c| c.floor_pps / 1e6).collect(),
            ),
            (
                "xlb (balance + IPIP + redirect)",
                comparisons.iter().map(|c| c.xlb_pps / 1e6).collect(),
            ),
        ],
    )?;
    let mut machine = Machine::describe();
    machine.pinned_cpu = pktgen::allowed_cpus().last().copied();
    println!("{}", machine.summary());
    write_json(
        &args.json,
        &LiveReport {
            benchmark: "live",
            method: "xlb pktgen (XDP live frames, flat out) into a veth; the node's program (xlb or floor_redirect) in native XDP redirects into a second veth whose peer counts arrivals (sink, XDP_DROP); delivered = sink count during the run; loss = sent - delivered",
            frame_size: args.size,
            generator_threads: args.threads,
            seconds_per_case: seconds,
            target: "xlb delivers >= 70% of the floor's rate with 100 000 flows",
            target_met,
            cases,
            comparisons,
            table_sweep,
            machine,
        },
    )?;
    println!("wrote {} and {}", args.json.display(), args.svg.display());
    Ok(())
}
