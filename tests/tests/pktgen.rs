//! `xlb pktgen`, end to end: the real command in a generator namespace
//! sends over a veth into a sink namespace, where the counting sink (XDP)
//! records every flow and hands the packets to the kernel's stack, whose
//! sockets and counters judge the checksums.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Output;

use lb_common::{
    FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP,
    pktgen::{SinkFlow, sink_flags},
};
use xlb::pktgen::Sink;
use xlb::topology::{Host, LinkOpts, Topology};

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");
const GEN_V4: &str = "198.18.7.1";
/// Flow 0's source addresses: further flows count up from here, so they
/// must not run into the sink's own address (the kernel drops packets
/// from its own addresses).
const SRC_V4: &str = "198.18.7.100";
const SRC_V6: &str = "fd00:7::100";
const SINK_V4: &str = "198.18.7.2";
const GEN_V6: &str = "fd00:7::1";
const SINK_V6: &str = "fd00:7::2";

/// Whether this test may run: as root always; otherwise it skips, unless
/// CI is set, where missing privileges are a failure.
fn may_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "pktgen tests need root (network namespaces, XDP); under CI they must not skip"
    );
    eprintln!("skipped: needs root");
    false
}

/// A generator host and a sink host on one veth pair, the sink's end
/// carrying the counting sink in native XDP with flow recording, passing
/// packets on to the stack.
struct Bench {
    topo: Topology,
    gen_host: Host,
    sink_host: Host,
    sink_mac: String,
    sink: Sink,
}

impl Bench {
    fn new(tag: &str) -> Self {
        let topo = Topology::new(tag).expect("topology");
        let gen_host = topo.host("gen").expect("gen host");
        let sink_host = topo.host("sink").expect("sink host");
        let link = topo
            .link(
                &gen_host,
                &sink_host,
                LinkOpts::new()
                    .addr_a(format!("{GEN_V4}/24"))
                    .addr_a(format!("{GEN_V6}/64"))
                    .addr_b(format!("{SINK_V4}/24"))
                    .addr_b(format!("{SINK_V6}/64")),
            )
            .expect("veth");
        let dev = link.b.name.clone();
        let sink = sink_host
            .run_in(move || Sink::attach(&dev, sink_flags::RECORD_FLOWS | sink_flags::PASS))
            .expect("entering the sink")
            .expect("attaching the sink");
        let sink_mac = link
            .b
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        Self {
            topo,
            gen_host,
            sink_host,
            sink_mac,
            sink,
        }
    }

    /// `xlb pktgen ARGS` on the generator's interface, to the sink's MAC.
    fn pktgen(&self, args: &[&str]) -> Output {
        let out = self
            .gen_host
            .command(XLB)
            .args(["pktgen", "--interface", "eth0", "--dst-mac", &self.sink_mac])
            .args(args)
            .output()
            .expect("running xlb pktgen");
        assert!(
            out.status.success(),
            "xlb pktgen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Packets per distinct flow of `proto` and `family` the sink recorded.
    fn flows(&self, proto: u8, family: u8) -> Vec<(SinkFlow, u32)> {
        let mut flows: Vec<_> = self
            .sink
            .flows()
            .expect("reading the sink's flows")
            .into_iter()
            .filter(|(f, _)| f.proto == proto && f.family == family)
            .collect();
        flows.sort();
        flows
    }

    /// One counter of the sink namespace's /proc/net/snmp (`Udp`, `Tcp`).
    fn snmp(&self, group: &str, field: &str) -> u64 {
        let text = self
            .sink_host
            .run_in(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))
            .expect("entering the sink")
            .expect("reading snmp");
        let prefix = format!("{group}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let at = names.split_whitespace().position(|n| n == field).unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    }

    fn close(self) {
        let prefix = self.topo.prefix().to_owned();
        drop(self.sink);
        self.topo.close().expect("teardown");
        assert!(Topology::leftovers(&prefix).unwrap().is_empty());
    }
}

fn sent(out: &Output) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .strip_prefix("sent ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `sent N packets` in {stdout:?}"))
}

/// A UDP socket in the sink namespace with room for every datagram of a
/// run, so that none is lost before it is read.
fn udp_socket(host: &Host, addr: SocketAddr) -> UdpSocket {
    let socket = host
        .run_in(move || UdpSocket::bind(addr))
        .expect("entering the sink")
        .expect("binding");
    let size: libc::c_int = 64 << 20;
    // SAFETY: a valid socket and a pointer to a live int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE");
    socket.set_nonblocking(true).unwrap();
    socket
}

fn drain(socket: &UdpSocket) -> u64 {
    let mut buf = [0u8; 4096];
    let mut n = 0;
    while socket.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn udp_arrives_complete_in_distinct_flows_with_valid_checksums() {
    if !may_run() {
        return;
    }
    let bench = Bench::new("pktgen-udp");
    for (family, src, dst) in [
        (FAMILY_V4, SRC_V4, format!("{SINK_V4}:9000")),
        (FAMILY_V6, SRC_V6, format!("[{SINK_V6}]:9000")),
    ] {
        let socket = udp_socket(&bench.sink_host, dst.parse().unwrap());
        let csum_errors = bench.snmp("Udp", "InCsumErrors");
        // Two pinned threads, each cycling through the 100 flows.
        let out = bench.pktgen(&[
            "--kind",
            "udp",
            "--src",
            src,
            "--dst",
            &dst,
            "--size",
            "128",
            "--flows",
            "100",
            "--count",
            "3000",
            "--threads",
            "2",
            "--rate",
            "10000",
        ]);
        assert_eq!(sent(&out), 3000);

        let flows = bench.flows(PROTO_UDP, family);
        assert_eq!(flows.len(), 100, "distinct flows at the sink");
        let uneven: Vec<_> = flows.iter().filter(|(_, n)| *n != 30).collect();
        assert!(uneven.is_empty(), "30 packets per flow, but: {uneven:?}");
        let ports: Vec<u16> = flows.iter().map(|(f, _)| u16::from_be(f.port)).collect();
        assert_eq!(ports, (1024..1124).collect::<Vec<_>>());

        // The kernel drops a datagram with a bad checksum before any socket
        // sees it.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(drain(&socket), 3000, "datagrams the socket received");
        assert_eq!(bench.snmp("Udp", "InCsumErrors"), csum_errors);
    }
    bench.close();
}

#[test]
fn tcp_syns_and_acks_arrive_with_valid_checksums_from_several_source_addresses() {
    if !may_run() {
        return;
    }
    let bench = Bench::new("pktgen-tcp");
    // 65000 flows need two source addresses (64512 ports each).
    for (family, kind, src, dst, count, addrs) in [
        (
            FAMILY_V4,
            "tcp-syn",
            SRC_V4,
            format!("{SINK_V4}:80"),
            65_000,
            2,
        ),
        (
            FAMILY_V6,
            "tcp-ack",
            SRC_V6,
            format!("[{SINK_V6}]:80"),
            2_000,
            1,
        ),
    ] {
        let in_segs = bench.snmp("Tcp", "InSegs");
        let csum_errors = bench.snmp("Tcp", "InCsumErrors");
        let count_arg = count.to_string();
        let out = bench.pktgen(&[
            "--kind",
            kind,
            "--src",
            src,
            "--dst",
            &dst,
            "--flows",
            &count_arg,
            "--count",
            &count_arg,
            "--threads",
            "1",
            "--rate",
            "20000",
        ]);
        assert_eq!(sent(&out), count);

        let flows = bench.flows(PROTO_TCP, family);
        assert_eq!(flows.len() as u64, count, "{kind}: one packet per flow");
        assert!(flows.iter().all(|(_, n)| *n == 1));
        let mut sources: Vec<_> = flows.iter().map(|(f, _)| f.addr).collect();
        sources.dedup();
        assert_eq!(
            sources.len(),
            addrs,
            "{kind}: source addresses: {sources:x?}"
        );

        // TCP counts every segment in InSegs, then drops those whose
        // checksum is wrong (InCsumErrors) before answering with a reset.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            bench.snmp("Tcp", "InSegs") - in_segs,
            count,
            "{kind}: segments the stack took; {sources:x?}"
        );
        assert_eq!(
            bench.snmp("Tcp", "InCsumErrors"),
            csum_errors,
            "{kind}: checksum errors"
        );
    }
    bench.close();
}

fn xlb(args: &[&str]) -> Output {
    std::process::Command::new(XLB)
        .arg("pktgen")
        .args(args)
        .output()
        .expect("running xlb")
}

#[test]
fn bad_arguments_are_refused_with_the_reason() {
    let base = ["--interface", "eth0"];
    let v4 = ["--src", "198.18.0.1", "--dst", "198.18.0.2:53"];
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--size", "20"],
            1,
            "invalid --size: 20 bytes; udp frames over IPv4 take 60 to 3520 bytes",
        ),
        (
            &[
                "--kind",
                "tcp-syn",
                "--dst",
                "[fd00::2]:80",
                "--src",
                "fd00::1",
                "--size",
                "64",
            ],
            1,
            "tcp-syn frames over IPv6 take 80 to 3520 bytes",
        ),
        (
            &["--src", "fd00::1", "--dst", "198.18.0.2:53"],
            1,
            "198.18.0.2 are of different families",
        ),
        (
            &["--src", "198.18.0.1", "--dst", "198.18.0.2"],
            2,
            "is not ADDR:PORT",
        ),
        (&["--count", "0"], 2, "invalid value '0' for '--count <N>'"),
        (
            &["--count", "5", "--duration", "1"],
            2,
            "cannot be used with",
        ),
        (&["--duration", "soon"], 2, "is not a number of seconds"),
        (
            &["--kind", "icmp"],
            2,
            "invalid value 'icmp' for '--kind <KIND>'",
        ),
        (&["--dst-mac", "02:00"], 2, "is not a MAC address"),
        (&["--threads", "9999"], 1, "invalid --threads: 9999"),
        (&["--interface", "nosuchif0"], 1, "no interface `nosuchif0`"),
    ];
    for (extra, status, message) in cases {
        let mut args = if extra.contains(&"--interface") {
            Vec::new()
        } else {
            base.to_vec()
        };
        // A case's own --src or --dst replaces the IPv4 defaults.
        if !extra.iter().any(|a| *a == "--src" || *a == "--dst") {
            args.extend_from_slice(&v4);
        }
        args.extend_from_slice(extra);
        let out = xlb(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*status), "{extra:?}: {stderr}");
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
    }
}

#[test]
fn the_kernel_engine_says_why_it_is_unavailable() {
    if std::path::Path::new("/proc/net/pktgen").exists() {
        eprintln!("skipped: this kernel has pktgen, so --engine kernel is available");
        return;
    }
    let out = xlb(&[
        "--engine",
        "kernel",
        "--interface",
        "eth0",
        "--src",
        "198.18.0.1",
        "--dst",
        "198.18.0.2:53",
        "--count",
        "10",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the kernel's pktgen is unavailable: /proc/net/pktgen does not exist")
            && stderr.contains("use --engine xdp"),
        "{stderr}"
    );
}
