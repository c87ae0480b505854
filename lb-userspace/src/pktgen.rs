//! `xlb pktgen`: a packet generator in the kernel, on XDP.
//!
//! The kernel here has no pktgen, so xlb brings its own: the `xlb_pktgen`
//! XDP program runs through BPF_PROG_RUN in live-frames mode, where the
//! kernel carries out the program's verdict, so every run that redirects a
//! frame transmits it on the chosen interface. The program writes a header
//! template built here (valid checksums for flow 0), moves each frame to its
//! flow (source address and port) and fixes the checksums incrementally.
//! One thread per CPU, each pinned, each running the program in chunks;
//! with a target rate the chunks are paced.
//!
//! `--engine kernel` drives the kernel's own pktgen (`/proc/net/pktgen`)
//! instead, where the kernel has it.

use std::{
    ffi::CString,
    fmt,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::ExitCode,
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapError, PerCpuArray, PerCpuHashMap},
    programs::{ProgramError, TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use clap::{Args, ValueEnum};
use lb_common::{
    FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP,
    pktgen::{GEN_HEADER_WORDS, GenSettings, SINK_BYTES, SINK_PACKETS, SinkFlow},
};

/// The generator and sink programs, built from `lb-ebpf/src/bin/pktgen.rs`.
pub static PKTGEN_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-pktgen"));

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// Ethernet's minimum frame, without the FCS the NIC adds.
pub const MIN_FRAME: usize = 60;
/// The most a live frame holds: a page less the kernel's XDP headroom and
/// `skb_shared_info`.
pub const MAX_FRAME: usize = 3520;
/// Source ports used per source address (1024-65535).
const FIRST_PORT: u16 = 1024;
const PORT_SPAN: u32 = 65536 - FIRST_PORT as u32;
/// The most frames the kernel takes in one live-frames batch.
pub const MAX_BATCH: u32 = 256;
/// Frames per BPF_PROG_RUN call when running flat out: large enough that the
/// call's own cost vanishes, small enough to stop a timed run promptly.
const FLAT_OUT_CHUNK: u64 = 1 << 16;
/// How often a paced thread wakes up to send its next chunk. Each
/// BPF_PROG_RUN call sets up a page pool, which costs far more than a
/// frame, so chunks must not be tiny.
const PACING_TICK: Duration = Duration::from_millis(10);
/// Ticks a paced thread may fall behind before its schedule slips.
const MAX_CATCH_UP: u32 = 1;
/// Runs longer than this print a progress line every second.
const PROGRESS_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PktgenError {
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("no interface `{0}` in this network namespace")]
    UnknownInterface(String),
    #[error("reading the MAC address of {interface}: {source}")]
    Mac {
        interface: String,
        source: std::io::Error,
    },
    #[error("loading the generator program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the generator program: {0}")]
    Program(#[from] ProgramError),
    #[error("the generator's maps: {0}")]
    Map(#[from] MapError),
    #[error("pinning a generator thread to CPU {cpu}: {source}")]
    Pin { cpu: usize, source: std::io::Error },
    #[error(
        "the kernel's pktgen is unavailable: {0} does not exist (this kernel has no \
         CONFIG_NET_PKTGEN, or the pktgen module is not loaded: try `modprobe pktgen`); \
         use --engine xdp (the default), which needs no kernel pktgen"
    )]
    KernelPktgenMissing(&'static str),
    #[error("the kernel's pktgen: {0}")]
    KernelPktgen(String),
}

/// What each packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum Kind {
    /// TCP SYN: a new flow every time it reaches a balancer's ring.
    #[value(name = "tcp-syn")]
    TcpSyn,
    /// TCP ACK: a segment of an established flow.
    #[value(name = "tcp-ack")]
    TcpAck,
    /// UDP datagram.
    #[value(name = "udp")]
    Udp,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::TcpSyn => "tcp-syn",
            Kind::TcpAck => "tcp-ack",
            Kind::Udp => "udp",
        })
    }
}

/// When a run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// This many packets over all threads.
    Count(u64),
    /// After this long.
    Duration(Duration),
}

/// The packets of a run, independent of how they are sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packets {
    pub kind: Kind,
    /// Flow 0's source address; flow `i` adds `i / 64512` to its last
    /// 32-bit word.
    pub src: IpAddr,
    pub dst: SocketAddr,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Frame length without FCS.
    pub size: usize,
    /// Distinct flows (source address and port pairs).
    pub flows: u32,
}

/// A generator run.
#[derive(Clone, Debug)]
pub struct Run {
    pub interface: String,
    pub packets: Packets,
    pub limit: Limit,
    /// CPUs to run one pinned thread on each.
    pub cpus: Vec<usize>,
    /// Packets per second over all threads; `None`: as fast as possible.
    pub rate: Option<u64>,
    /// Frames per live-frames batch (1..=256).
    pub batch: u32,
}

/// What a run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Frames the program ran on (each redirected to the interface; frames
    /// the receiver had no room for are dropped there, not here).
    pub sent: u64,
    pub per_thread: Vec<u64>,
    pub elapsed: Duration,
}

impl Report {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl Packets {
    /// The smallest frame of this kind: its headers, rounded up to the
    /// whole 8-byte words the program writes, and at least Ethernet's 60.
    pub fn min_size(kind: Kind, dst: &SocketAddr) -> usize {
        header_len(kind, dst).next_multiple_of(8).max(MIN_FRAME)
    }

    fn check(&self) -> Result<(), PktgenError> {
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(invalid(
                "--src",
                format!(
                    "{} and {} are of different families",
                    self.src,
                    self.dst.ip()
                ),
            ));
        }
        let min = Self::min_size(self.kind, &self.dst);
        if !(min..=MAX_FRAME).contains(&self.size) {
            return Err(invalid(
                "--size",
                format!(
                    "{} bytes; {} frames over {} take {min} to {MAX_FRAME} bytes",
                    self.size,
                    self.kind,
                    if self.dst.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            ));
        }
        if self.flows == 0 {
            return Err(invalid("--flows", "must be at least 1".to_owned()));
        }
        let addresses = (self.flows - 1) / PORT_SPAN;
        if u32::MAX - last_word(&self.src) < addresses {
            return Err(invalid(
                "--flows",
                format!(
                    "{} flows need {} source addresses from {}, past the end of the address space",
                    self.flows,
                    addresses + 1,
                    self.src
                ),
            ));
        }
        Ok(())
    }

    /// Flow 0's frame, with valid checksums.
    pub fn frame(&self) -> Vec<u8> {
        let mut frame = vec![0u8; self.size];
        frame[0..6].copy_from_slice(&self.dst_mac);
        frame[6..12].copy_from_slice(&self.src_mac);
        let proto = if self.kind == Kind::Udp {
            PROTO_UDP
        } else {
            PROTO_TCP
        };
        let (l4, pseudo) = match (self.src, self.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                let ip = &mut frame[ETH_LEN..ETH_LEN + IPV4_LEN];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&((self.size - ETH_LEN) as u16).to_be_bytes());
                ip[6] = 0x40; // DF
                ip[8] = 64;
                ip[9] = proto;
                ip[12..16].copy_from_slice(&src.octets());
                ip[16..20].copy_from_slice(&dst.octets());
                let check = checksum(0, ip);
                ip[10..12].copy_from_slice(&check.to_be_bytes());
                let pseudo = sum(&src.octets()) + sum(&dst.octets()) + u32::from(proto);
                (ETH_LEN + IPV4_LEN, pseudo)
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
                let ip = &mut frame[ETH_LEN..ETH_LEN + IPV6_LEN];
                ip[0] = 0x60;
                let payload = (self.size - ETH_LEN - IPV6_LEN) as u16;
                ip[4..6].copy_from_slice(&payload.to_be_bytes());
                ip[6] = proto;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&src.octets());
                ip[24..40].copy_from_slice(&dst.octets());
                let pseudo = sum(&src.octets()) + sum(&dst.octets()) + u32::from(proto);
                (ETH_LEN + IPV6_LEN, pseudo)
            }
            _ => unreachable!("families checked by Packets::check"),
        };
        let l4_len = self.size - l4;
        let seg = &mut frame[l4..];
        seg[0..2].copy_from_slice(&FIRST_PORT.to_be_bytes());
        seg[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
        let check_at = match self.kind {
            Kind::Udp => {
                seg[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                6
            }
            Kind::TcpSyn | Kind::TcpAck => {
                seg[4..8].copy_from_slice(&0x786c_6200u32.to_be_bytes()); // seq
                seg[12] = 5 << 4; // data offset: no options
                if self.kind == Kind::TcpSyn {
                    seg[13] = 0x02;
                } else {
                    seg[8..12].copy_from_slice(&1u32.to_be_bytes()); // ack
                    seg[13] = 0x10;
                }
                seg[14..16].copy_from_slice(&65535u16.to_be_bytes());
                16
            }
        };
        let mut check = checksum(pseudo + l4_len as u32, seg);
        if check == 0 && self.kind == Kind::Udp {
            check = 0xffff;
        }
        seg[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
        frame
    }

    /// The program's settings for this run, sending to `ifindex`.
    pub fn settings(&self, ifindex: u32) -> GenSettings {
        let frame = self.frame();
        let words = header_len(self.kind, &self.dst).div_ceil(8);
        let mut header = [0u64; GEN_HEADER_WORDS];
        for (word, bytes) in header.iter_mut().zip(frame.chunks_exact(8)).take(words) {
            *word = u64::from_ne_bytes(bytes.try_into().expect("chunks of 8"));
        }
        let l4 = ETH_LEN
            + if self.dst.is_ipv4() {
                IPV4_LEN
            } else {
                IPV6_LEN
            };
        let check_at = l4 + if self.kind == Kind::Udp { 6 } else { 16 };
        let native = |at: usize| u16::from_ne_bytes([frame[at], frame[at + 1]]);
        GenSettings {
            header,
            ifindex,
            flows: self.flows,
            port_span: PORT_SPAN,
            header_words: words as u32,
            base_addr: last_word(&self.src),
            base_port: FIRST_PORT,
            l4_check: native(check_at),
            ip_check: if self.dst.is_ipv4() {
                native(ETH_LEN + 10)
            } else {
                0
            },
            family: if self.dst.is_ipv4() {
                FAMILY_V4
            } else {
                FAMILY_V6
            },
            proto: if self.kind == Kind::Udp {
                PROTO_UDP
            } else {
                PROTO_TCP
            },
            _pad: 0,
        }
    }
}

fn header_len(kind: Kind, dst: &SocketAddr) -> usize {
    let ip = if dst.is_ipv4() { IPV4_LEN } else { IPV6_LEN };
    let l4 = if kind == Kind::Udp { UDP_LEN } else { TCP_LEN };
    ETH_LEN + ip + l4
}

fn last_word(addr: &IpAddr) -> u32 {
    match addr {
        IpAddr::V4(a) => u32::from(*a),
        IpAddr::V6(a) => (a.to_bits() & 0xffff_ffff) as u32,
    }
}

/// The unfolded one's-complement sum of `bytes` as big-endian words.
fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum()
}

/// The Internet checksum of `bytes` plus an initial (pseudo-header) sum.
fn checksum(initial: u32, bytes: &[u8]) -> u16 {
    let mut total = u64::from(initial) + u64::from(sum(bytes));
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    !(total as u16)
}

fn invalid(what: &'static str, reason: String) -> PktgenError {
    PktgenError::Invalid { what, reason }
}

/// The loaded generator, ready to run many times (the benchmarks reuse it).
pub struct Generator {
    ebpf: Ebpf,
}

impl Generator {
    pub fn load() -> Result<Self, PktgenError> {
        let mut ebpf = EbpfLoader::new().load(PKTGEN_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut("xlb_pktgen")
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        program.load()?;
        Ok(Self { ebpf })
    }

    /// Runs `run` to its end, calling `progress` about once a second with
    /// the packets sent so far.
    pub fn run(
        &mut self,
        run: &Run,
        progress: impl Fn(u64, Duration),
    ) -> Result<Report, PktgenError> {
        run.packets.check()?;
        if run.cpus.is_empty() {
            return Err(invalid("--threads", "no CPU to run on".to_owned()));
        }
        if !(1..=MAX_BATCH).contains(&run.batch) {
            return Err(invalid(
                "--batch",
                format!("{}; use 1 to {MAX_BATCH}", run.batch),
            ));
        }
        if run.rate == Some(0) {
            return Err(invalid(
                "--rate",
                "must be at least 1 packet per second".to_owned(),
            ));
        }
        let ifindex = interface_index(&run.interface)?;
        let settings = run.packets.settings(ifindex);
        let mut map: Array<_, GenSettings> =
            Array::try_from(self.ebpf.map_mut("GEN_SETTINGS").ok_or_else(|| {
                MapError::InvalidName {
                    name: "GEN_SETTINGS".to_owned(),
                }
            })?)?;
        map.set(0, settings, 0)?;
        let program: &Xdp = self
            .ebpf
            .program("xlb_pktgen")
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        let frame = run.packets.frame();
        let ctx = xdp_md(frame.len(), ifindex);

        let threads = run.cpus.len() as u64;
        let sent = AtomicU64::new(0);
        let start = Instant::now();
        let per_thread = thread::scope(|scope| {
            let workers: Vec<_> = run
                .cpus
                .iter()
                .enumerate()
                .map(|(k, &cpu)| {
                    let quota = match run.limit {
                        Limit::Count(n) => Some(n / threads + u64::from((k as u64) < n % threads)),
                        Limit::Duration(_) => None,
                    };
                    let worker = Worker {
                        program,
                        frame: &frame,
                        ctx: &ctx,
                        batch: run.batch,
                        quota,
                        deadline: match run.limit {
                            Limit::Duration(d) => Some(start + d),
                            Limit::Count(_) => None,
                        },
                        rate: run.rate.map(|r| (r as f64 / threads as f64).max(1.0)),
                        sent: &sent,
                    };
                    scope.spawn(move || worker.run(cpu))
                })
                .collect();
            // Progress from this thread while the workers run.
            let mut next = Instant::now() + Duration::from_secs(1);
            while !workers.iter().all(|w| w.is_finished()) {
                thread::sleep(Duration::from_millis(20));
                if Instant::now() >= next {
                    progress(sent.load(Ordering::Relaxed), start.elapsed());
                    next += Duration::from_secs(1);
                }
            }
            let results: Vec<_> = workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect();
            results
                .into_iter()
                .collect::<Result<Vec<u64>, PktgenError>>()
        })?;
        Ok(Report {
            sent: per_thread.iter().sum(),
            per_thread,
            elapsed: start.elapsed(),
        })
    }
}

/// One pinned thread's share of a run.
struct Worker<'a> {
    program: &'a Xdp,
    frame: &'a [u8],
    ctx: &'a [u8],
    batch: u32,
    quota: Option<u64>,
    deadline: Option<Instant>,
    /// Packets per second for this thread.
    rate: Option<f64>,
    sent: &'a AtomicU64,
}

impl Worker<'_> {
    fn run(&self, cpu: usize) -> Result<u64, PktgenError> {
        pin(cpu)?;
        let chunk = match self.rate {
            // About one tick's worth per call, at least one frame.
            Some(rate) => ((rate * PACING_TICK.as_secs_f64()) as u64).clamp(1, FLAT_OUT_CHUNK),
            None => FLAT_OUT_CHUNK,
        };
        let start = Instant::now();
        let mut sent = 0u64;
        // Packets the schedule counts as sent: `sent` plus slipped time.
        let mut paced = 0u64;
        loop {
            let now = Instant::now();
            if self.deadline.is_some_and(|d| now >= d) {
                break;
            }
            let left = self.quota.map_or(u64::MAX, |q| q - sent);
            if left == 0 {
                break;
            }
            if let Some(rate) = self.rate {
                let due = start + Duration::from_secs_f64(paced as f64 / rate);
                if due > now {
                    thread::sleep(due - now);
                    continue;
                }
                // Time lost to a stall is not made up in one burst, which
                // would overflow the receiver's queue (a veth takes 256
                // frames): the schedule slips instead.
                let behind = (now - due).as_secs_f64() * rate;
                let most = (rate * (MAX_CATCH_UP * PACING_TICK).as_secs_f64()) as u64;
                if behind as u64 > most {
                    paced += behind as u64 - most;
                }
            }
            let n = chunk.min(left) as u32;
            self.program.test_run(TestRunOptions {
                data_in: Some(self.frame),
                ctx_in: Some(self.ctx),
                repeat: n,
                attrs: TestRunAttrs::new().xdp_live_frames(self.batch),
                ..TestRunOptions::new()
            })?;
            sent += u64::from(n);
            paced += u64::from(n);
            self.sent.fetch_add(u64::from(n), Ordering::Relaxed);
        }
        Ok(sent)
    }
}

/// The `xdp_md` live frames need: data at 0, data_end at the frame's
/// length, and the interface the frame "arrived" on.
fn xdp_md(len: usize, ifindex: u32) -> Vec<u8> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
    //                 rx_queue_index, egress_ifindex }: six u32s.
    let fields = [0, len as u32, 0, ifindex, 0, 0];
    fields.iter().flat_map(|f| f.to_ne_bytes()).collect()
}

pub fn interface_index(interface: &str) -> Result<u32, PktgenError> {
    crate::dataplane::interface_index(interface)
        .map_err(|_| PktgenError::UnknownInterface(interface.to_owned()))
}

/// The MAC address of `interface` in the calling thread's namespace.
pub fn interface_mac(interface: &str) -> Result<[u8; 6], PktgenError> {
    let fail = |source| PktgenError::Mac {
        interface: interface.to_owned(),
        source,
    };
    let name =
        CString::new(interface).map_err(|_| PktgenError::UnknownInterface(interface.to_owned()))?;
    if name.as_bytes().len() >= libc::IFNAMSIZ {
        return Err(PktgenError::UnknownInterface(interface.to_owned()));
    }
    // SAFETY: a plain socket call; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: `ifreq` is plain data; all zeroes is a valid request.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name and writes the hwaddr of `ifr`,
    // a live local.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCGIFHWADDR,
            &mut ifr,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENODEV) {
            return Err(PktgenError::UnknownInterface(interface.to_owned()));
        }
        return Err(fail(err));
    }
    // SAFETY: SIOCGIFHWADDR filled in the hwaddr member.
    let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(data) {
        *dst = src as u8;
    }
    Ok(mac)
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Result<(), PktgenError> {
    // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * size_of::<libc::cpu_set_t>() {
        return Err(PktgenError::Pin {
            cpu,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    // SAFETY: `cpu` is within the set, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the pointer and size describe `set`, a live local.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(PktgenError::Pin {
            cpu,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: as in `pin`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, a live local.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return vec![0];
    }
    (0..8 * size_of::<libc::cpu_set_t>())
        // SAFETY: `n` is within the set.
        .filter(|&n| unsafe { libc::CPU_ISSET(n, &set) })
        .collect()
}

/// The counting sink of the tests and benchmarks, attached to an
/// interface of the calling thread's namespace.
pub struct Sink {
    ebpf: Ebpf,
}

impl Sink {
    /// Attaches the sink to `interface` (native XDP); `flags` are
    /// [`lb_common::pktgen::sink_flags`].
    pub fn attach(interface: &str, flags: u32) -> Result<Self, PktgenError> {
        let mut ebpf = EbpfLoader::new().load(PKTGEN_OBJECT)?;
        let mut settings: Array<_, u32> =
            Array::try_from(ebpf.map_mut("SINK_SETTINGS").ok_or_else(|| {
                MapError::InvalidName {
                    name: "SINK_SETTINGS".to_owned(),
                }
            })?)?;
        settings.set(0, flags, 0)?;
        let program: &mut Xdp = ebpf
            .program_mut("xlb_sink")
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        program.load()?;
        program.attach(interface, aya::programs::XdpMode::Driver)?;
        Ok(Self { ebpf })
    }

    /// Packets and bytes seen so far, over all CPUs.
    pub fn counts(&self) -> Result<(u64, u64), PktgenError> {
        let counts: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("SINK_COUNTS").ok_or_else(|| {
                MapError::InvalidName {
                    name: "SINK_COUNTS".to_owned(),
                }
            })?)?;
        let total = |i| -> Result<u64, PktgenError> { Ok(counts.get(&i, 0)?.iter().sum()) };
        Ok((total(SINK_PACKETS)?, total(SINK_BYTES)?))
    }

    /// The distinct flows recorded (with [`sink_flags::RECORD_FLOWS`]).
    ///
    /// [`sink_flags::RECORD_FLOWS`]: lb_common::pktgen::sink_flags::RECORD_FLOWS
    pub fn flows(&self) -> Result<Vec<(SinkFlow, u32)>, PktgenError> {
        let flows: PerCpuHashMap<_, SinkFlow, u32> =
            PerCpuHashMap::try_from(self.ebpf.map("SINK_FLOWS").ok_or_else(|| {
                MapError::InvalidName {
                    name: "SINK_FLOWS".to_owned(),
                }
            })?)?;
        flows
            .iter()
            .map(|entry| {
                let (flow, per_cpu) = entry?;
                Ok((flow, per_cpu.iter().sum()))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The kernel's pktgen.

const KERNEL_PKTGEN: &str = "/proc/net/pktgen";
const KERNEL_PKTGEN_CTRL: &str = "/proc/net/pktgen/pgctrl";

/// Runs `run` with the kernel's pktgen: one `kpktgend_<cpu>` thread per
/// CPU, each with its own clone of the interface (`IF@k`). The kernel's
/// pktgen only makes UDP.
pub fn run_kernel(run: &Run) -> Result<Report, PktgenError> {
    if !Path::new(KERNEL_PKTGEN_CTRL).exists() {
        return Err(PktgenError::KernelPktgenMissing(KERNEL_PKTGEN));
    }
    run.packets.check()?;
    if run.packets.kind != Kind::Udp {
        return Err(invalid(
            "--kind",
            format!(
                "the kernel's pktgen only makes UDP, not {}",
                run.packets.kind
            ),
        ));
    }
    let write = |file: &str, line: &str| -> Result<(), PktgenError> {
        let path = format!("{KERNEL_PKTGEN}/{file}");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| PktgenError::KernelPktgen(format!("writing `{line}` to {path}: {e}")))
    };
    let p = &run.packets;
    let threads = run.cpus.len() as u64;
    let mac = |m: &[u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let (dst_cmd, src_min, src_max) = match (p.src, p.dst.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => (
            format!("dst {dst}"),
            format!("src_min {src}"),
            format!(
                "src_max {}",
                std::net::Ipv4Addr::from(u32::from(src) + (p.flows - 1) / PORT_SPAN)
            ),
        ),
        (IpAddr::V6(_), IpAddr::V6(dst)) => (format!("dst6 {dst}"), String::new(), String::new()),
        _ => unreachable!("families checked by Packets::check"),
    };
    let mut devices = Vec::new();
    for (k, cpu) in run.cpus.iter().enumerate() {
        let dev = format!("{}@{k}", run.interface);
        let thread = format!("kpktgend_{cpu}");
        write(&thread, "rem_device_all")?;
        write(&thread, &format!("add_device {dev}"))?;
        let count = match run.limit {
            Limit::Count(n) => n / threads + u64::from((k as u64) < n % threads),
            Limit::Duration(_) => 0,
        };
        let mut commands = vec![
            format!("count {count}"),
            // The kernel's size includes the 4-byte FCS.
            format!("pkt_size {}", p.size + 4),
            dst_cmd.clone(),
            format!("dst_mac {}", mac(&p.dst_mac)),
            format!("udp_dst_min {}", p.dst.port()),
            format!("udp_dst_max {}", p.dst.port()),
            format!("udp_src_min {FIRST_PORT}"),
            format!(
                "udp_src_max {}",
                u32::from(FIRST_PORT) + (p.flows - 1).min(PORT_SPAN - 1)
            ),
        ];
        if !src_min.is_empty() {
            commands.push(src_min.clone());
            commands.push(src_max.clone());
        }
        if let Some(rate) = run.rate {
            commands.push(format!("ratep {}", (rate / threads).max(1)));
        }
        for command in &commands {
            write(&dev, command)?;
        }
        devices.push(dev);
    }
    let start = Instant::now();
    // `start` returns when every device has sent its count; a timed run
    // is stopped from another thread.
    thread::scope(|scope| {
        if let Limit::Duration(d) = run.limit {
            scope.spawn(move || {
                thread::sleep(d);
                let _ = write("pgctrl", "stop");
            });
        }
        write("pgctrl", "start")
    })?;
    let elapsed = start.elapsed();
    let per_thread = devices
        .iter()
        .map(|dev| {
            let text = std::fs::read_to_string(format!("{KERNEL_PKTGEN}/{dev}"))
                .map_err(|e| PktgenError::KernelPktgen(format!("reading {dev}: {e}")))?;
            // "Result: OK: ... \n  NNN pkts/sec ..." and "pkts-sofar: NNN".
            text.split_whitespace()
                .skip_while(|w| *w != "pkts-sofar:")
                .nth(1)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| PktgenError::KernelPktgen(format!("no pkts-sofar in {dev}")))
        })
        .collect::<Result<Vec<u64>, _>>()?;
    Ok(Report {
        sent: per_thread.iter().sum(),
        per_thread,
        elapsed,
    })
}

// ---------------------------------------------------------------------------
// The command.

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// xlb's XDP generator (BPF_PROG_RUN live frames)
    Xdp,
    /// The kernel's pktgen (/proc/net/pktgen), where the kernel has it
    Kernel,
}

#[derive(Debug, Args)]
pub struct PktgenArgs {
    /// Interface to send on (of this network namespace)
    #[arg(long, short, value_name = "IFACE")]
    interface: String,
    /// Destination address and port
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_endpoint)]
    dst: SocketAddr,
    /// Source address of flow 0; more flows count up from it (port first,
    /// 64512 ports per address)
    #[arg(long, value_name = "ADDR")]
    src: IpAddr,
    /// What to send
    #[arg(long, value_enum, default_value_t = Kind::Udp)]
    kind: Kind,
    /// Frame length in bytes without FCS (default: the smallest for the
    /// kind, at least 60)
    #[arg(long, value_name = "BYTES")]
    size: Option<usize>,
    /// Distinct flows (source address and port pairs)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    flows: u32,
    /// Packets to send over all threads
    #[arg(long, value_name = "N", conflicts_with = "duration",
          value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Seconds to send for (default 10 when --count is not given)
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    duration: Option<Duration>,
    /// Target packets per second over all threads (default: flat out)
    #[arg(long, value_name = "PPS", value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// Generator threads, one pinned per CPU (default: every CPU allowed)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Destination MAC (default: broadcast; give the receiver's own MAC when
    /// its kernel stack should take the packets)
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    dst_mac: Option<[u8; 6]>,
    /// Source MAC (default: the interface's)
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    src_mac: Option<[u8; 6]>,
    /// Frames per live-frames batch
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BATCH)))]
    batch: u32,
    /// Which generator
    #[arg(long, value_enum, default_value_t = Engine::Xdp)]
    engine: Engine,
}

fn parse_endpoint(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not ADDR:PORT; write e.g. 198.18.100.1:80 or [fd00::1]:53"))
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 86_400.0 => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0 and 86400, e.g. 10 or 0.5"
        )),
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC address; write e.g. 02:00:00:00:00:01");
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| {
            if b.len() == 2 {
                u8::from_str_radix(b, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    bytes.try_into().map_err(|_| bad())
}

/// `xlb pktgen`.
pub fn command(args: PktgenArgs) -> anyhow::Result<ExitCode> {
    let allowed = allowed_cpus();
    let cpus = match args.threads {
        None => allowed.clone(),
        Some(n) if n as usize <= allowed.len() => allowed[..n as usize].to_vec(),
        Some(n) => anyhow::bail!(
            "invalid --threads: {n}; this process may run on {} CPUs ({allowed:?})",
            allowed.len()
        ),
    };
    let size = args
        .size
        .unwrap_or_else(|| Packets::min_size(args.kind, &args.dst));
    let limit = match (args.count, args.duration) {
        (Some(n), _) => Limit::Count(n),
        (None, Some(d)) => Limit::Duration(d),
        (None, None) => Limit::Duration(Duration::from_secs(10)),
    };
    let mut packets = Packets {
        kind: args.kind,
        src: args.src,
        dst: args.dst,
        src_mac: args.src_mac.unwrap_or_default(),
        dst_mac: args.dst_mac.unwrap_or([0xff; 6]),
        size,
        flows: args.flows,
    };
    // The arguments first, then the machine: a bad size is reported as
    // such even where the interface does not exist.
    packets.check()?;
    if args.src_mac.is_none() {
        packets.src_mac = interface_mac(&args.interface)?;
    }
    let run = Run {
        interface: args.interface,
        packets,
        limit,
        cpus,
        rate: args.rate,
        batch: args.batch,
    };
    let report = match args.engine {
        Engine::Kernel => run_kernel(&run)?,
        Engine::Xdp => {
            let long = match limit {
                Limit::Duration(d) => d > PROGRESS_AFTER,
                // Flat out, counts beyond ten million take seconds too.
                Limit::Count(n) => run.rate.map_or(n > 10_000_000, |r| n / r.max(1) > 2),
            };
            Generator::load()?.run(&run, |sent, elapsed| {
                if long {
                    eprintln!(
                        "  {:>6.1} s  {sent} packets  {:.3} Mpps",
                        elapsed.as_secs_f64(),
                        sent as f64 / elapsed.as_secs_f64() / 1e6
                    );
                }
            })?
        }
    };
    println!(
        "sent {} packets ({} {} bytes, {} flows) on {} in {:.3} s: {:.3} Mpps, {:.1} Mbit/s (frames without FCS), {} threads",
        report.sent,
        run.packets.kind,
        run.packets.size,
        run.packets.flows,
        run.interface,
        report.elapsed.as_secs_f64(),
        report.rate() / 1e6,
        report.rate() * run.packets.size as f64 * 8.0 / 1e6,
        report.per_thread.len()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packets(kind: Kind, dst: &str, src: &str) -> Packets {
        let dst: SocketAddr = dst.parse().unwrap();
        Packets {
            kind,
            src: src.parse().unwrap(),
            dst,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            size: Packets::min_size(kind, &dst),
            flows: 1,
        }
    }

    /// The whole checksummed range sums to 0xffff when the checksum is right.
    fn verifies(pseudo: u32, bytes: &[u8]) -> bool {
        checksum(pseudo, bytes) == 0
    }

    #[test]
    fn templates_carry_valid_checksums() {
        for kind in [Kind::TcpSyn, Kind::TcpAck, Kind::Udp] {
            let p = packets(kind, "198.18.100.1:80", "198.18.0.1");
            let f = p.frame();
            assert!(verifies(0, &f[14..34]), "{kind} IPv4 header");
            let proto = u32::from(f[23]);
            let pseudo = sum(&f[26..34]) + proto + (f.len() - 34) as u32;
            assert!(verifies(pseudo, &f[34..]), "{kind} IPv4 L4");

            let p = packets(kind, "[fd00::100]:80", "fd00::1");
            let f = p.frame();
            let pseudo = sum(&f[22..54]) + u32::from(f[20]) + (f.len() - 54) as u32;
            assert!(verifies(pseudo, &f[54..]), "{kind} IPv6 L4");
        }
    }

    #[test]
    fn sizes_and_families_are_checked() {
        let mut p = packets(Kind::TcpSyn, "[fd00::100]:80", "fd00::1");
        assert_eq!(p.size, 80, "74 bytes of headers, in whole words");
        p.size = 64;
        let err = p.check().unwrap_err().to_string();
        assert!(
            err.contains("--size") && err.contains("80 to 3520"),
            "{err}"
        );
        let mut p = packets(Kind::Udp, "198.18.100.1:53", "fd00::1");
        assert!(
            p.check()
                .unwrap_err()
                .to_string()
                .contains("different families")
        );
        p.src = "255.255.255.255".parse().unwrap();
        p.flows = 100_000;
        assert!(p.check().unwrap_err().to_string().contains("past the end"));
    }

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("02:00:5e:00:00:0a"), Ok([2, 0, 0x5e, 0, 0, 10]));
        assert!(parse_mac("02:00:5e:00:00").is_err());
        assert!(parse_mac("02:00:5e:00:00:0g").is_err());
    }
}
