//! `xlb doctor` against deliberately broken namespaces: the real binary run
//! inside a backend's and a node's namespace (`ip netns exec`), reading the
//! real kernel settings.
//!
//! - [`a_backend_is_checked_and_every_fix_it_prints_works`]: a correctly set
//!   up backend passes; each DSR setting broken on its own is the one
//!   problem found, with its fix command, and running that command (as
//!   printed, in the namespace) makes the doctor pass again.
//! - [`a_node_is_checked_and_every_fix_it_prints_works`]: the same for an
//!   xlb node: balancer attached, forwarding, route, neighbour and MTU
//!   toward each backend of its config.
//! - [`a_host_that_is_neither_is_refused_with_the_reason`].

use std::fs;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use xlb::dataplane::{AttachMode, Dataplane, Limits, Role};
use xlb::topology::{Host, LinkOpts, Topology};
use xlb_tests::privileged;

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
/// In the fabric's subnet, but no host has it: its neighbour never resolves.
const ABSENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
/// Outside every route of the node.
const UNROUTED: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 1);
const LIMITS: Limits = Limits {
    max_vips: 4,
    max_backends: 16,
    ring_capacity: 4 * 65537,
    conntrack_size: 256,
};

/// Runs `xlb doctor ARGS` in `host`'s namespace: exit success and output.
fn doctor(host: &Host, args: &[&str]) -> (bool, String) {
    let out: Output = host
        .command(XLB)
        .arg("doctor")
        .args(args)
        .output()
        .expect("running xlb doctor");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn fail_lines(report: &str) -> Vec<&str> {
    report.lines().filter(|l| l.starts_with("FAIL")).collect()
}

/// The fix lines of the one failing check, as printed (comments cut off).
fn fixes(report: &str) -> Vec<String> {
    report
        .lines()
        .skip_while(|l| !l.starts_with("FAIL"))
        .skip(1)
        .take_while(|l| l.starts_with("      fix: "))
        .map(|l| l.trim_start_matches("      fix: "))
        .map(|l| l.split('#').next().unwrap_or_default().trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Breaks one setting, expects exactly that problem with `fix` among its
/// fixes, then runs the printed first fix in the namespace (when `apply`)
/// and expects a clean report.
fn expect_problem(host: &Host, args: &[&str], check: &str, fix: &str, apply: bool) {
    let (ok, report) = doctor(host, args);
    assert!(!ok, "{check}: the doctor passed:\n{report}");
    let fails = fail_lines(&report);
    assert_eq!(fails.len(), 1, "{check}: one problem expected:\n{report}");
    assert!(
        fails[0].starts_with(&format!("FAIL  {check}")),
        "{check}:\n{report}"
    );
    let printed = fixes(&report);
    assert!(
        printed.iter().any(|f| f == fix),
        "{check}: expected the fix `{fix}`, got {printed:?}:\n{report}"
    );
    if apply {
        let out = host
            .command("sh")
            .args(["-c", fix])
            .output()
            .expect("running the fix");
        assert!(
            out.status.success(),
            "{fix}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (ok, report) = doctor(host, args);
        assert!(ok, "{check}: still failing after `{fix}`:\n{report}");
    }
}

fn sh(host: &Host, script: &str) {
    let out = host
        .command("sh")
        .args(["-c", script])
        .output()
        .expect("running sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fabric with an xlb node and one backend, both set up as the demo sets
/// them up, each with its XDP program loaded by this test.
struct Site {
    node_dp: Dataplane,
    backend_dp: Dataplane,
    node: Host,
    backend: Host,
    topology: Topology,
    dir: PathBuf,
}

impl Site {
    fn build(tag: &str) -> Site {
        let topology = Topology::new(tag).expect("topology");
        let dir = std::env::temp_dir().join(topology.prefix());
        fs::create_dir_all(&dir).expect("scratch directory");
        let fabric = topology.bridge("fabric").expect("fabric");
        let node = topology.host("node").expect("node");
        topology
            .link(
                &node,
                &fabric,
                LinkOpts::new().addr_a(format!("{NODE}/24")).mtu(1600),
            )
            .expect("linking the node");
        for key in ["net.ipv4.ip_forward", "net.ipv4.conf.eth0.forwarding"] {
            node.sysctl(key, "1").expect("forwarding");
        }
        let node_dp = node
            .run_in(|| {
                let mut dp = Dataplane::load(LIMITS).expect("loading");
                dp.attach(Role::Balancer, "eth0", AttachMode::Native)
                    .expect("attaching the balancer");
                dp
            })
            .expect("entering the node");

        let backend = topology.host("backend").expect("backend");
        topology
            .link(
                &backend,
                &fabric,
                LinkOpts::new().addr_a(format!("{BACKEND}/24")).mtu(1600),
            )
            .expect("linking the backend");
        backend
            .add_addr("lo", &format!("{VIP}/32"))
            .expect("VIP on lo");
        for (key, value) in xlb::doctor::BACKEND_SYSCTLS_V4 {
            backend
                .sysctl(&key.replace("{dev}", "eth0"), value)
                .expect("DSR sysctl");
        }
        let backend_dp = backend
            .run_in(|| {
                let mut dp = Dataplane::load(LIMITS).expect("loading");
                dp.decap.add(BACKEND.into()).expect("tunnel endpoint");
                dp.attach(Role::Decap, "eth0", AttachMode::Native)
                    .expect("attaching decap");
                dp
            })
            .expect("entering the backend");
        Site {
            node_dp,
            backend_dp,
            node,
            backend,
            topology,
            dir,
        }
    }

    /// A node config whose VIP has these backends.
    fn config(&self, name: &str, backends: &[Ipv4Addr]) -> PathBuf {
        let path = self.dir.join(format!("{name}.toml"));
        let mut text = format!(
            "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"{NODE}\"\n\
             [vip.web]\naddr = \"{VIP}\"\nport = 80\n[vip.web.cluster.c]\n"
        );
        for (i, b) in backends.iter().enumerate() {
            text.push_str(&format!("backend.b{i} = {{ addr = \"{b}\" }}\n"));
        }
        fs::write(&path, text).expect("writing a config");
        path
    }

    /// Makes the node resolve the backend's MAC, as the daemon's resolver
    /// would, and waits for it.
    fn resolve_backend(&self) {
        self.node
            .run_in(|| {
                let socket = UdpSocket::bind((NODE, 0))?;
                socket.send_to(b"arp", (BACKEND, 9))
            })
            .expect("entering the node")
            .expect("sending to the backend");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = self
                .node
                .ip(["neigh", "show", &BACKEND.to_string()])
                .expect("ip neigh");
            if String::from_utf8_lossy(&out.stdout).contains("lladdr") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the backend's MAC never resolved"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn close(self) {
        let prefix = self.topology.prefix().to_owned();
        let dir = self.dir.clone();
        drop(self.node_dp);
        drop(self.backend_dp);
        self.topology.close().expect("teardown");
        fs::remove_dir_all(&dir).expect("removing the scratch directory");
        assert!(Topology::leftovers(&prefix).unwrap().is_empty());
        assert!(!Path::new(&dir).exists());
    }
}

#[test]
fn a_backend_is_checked_and_every_fix_it_prints_works() {
    if !privileged() {
        return;
    }
    let mut site = Site::build("doctor-backend");
    let args = ["--role", "backend", "--vip", "198.18.100.1"];
    let host = site.backend.clone();
    let (ok, report) = doctor(&host, &args);
    assert!(ok, "a correct backend fails:\n{report}");
    assert!(
        report.contains("ok    decapsulation: xlb_decap on eth0"),
        "{report}"
    );
    // Detected as a backend without --role: the decap program is attached.
    let (ok, report) = doctor(&host, &[]);
    assert!(ok && report.contains("backend:"), "{report}");

    sh(&host, "ip addr del 198.18.100.1/32 dev lo");
    expect_problem(
        &host,
        &args,
        "VIP 198.18.100.1 on lo",
        "ip addr add 198.18.100.1/32 dev lo",
        true,
    );

    sh(
        &host,
        "sysctl -qw net.ipv4.conf.all.arp_ignore=0 net.ipv4.conf.eth0.arp_ignore=0",
    );
    expect_problem(
        &host,
        &args,
        "arp_ignore on eth0",
        "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.eth0.arp_ignore=1",
        true,
    );

    sh(
        &host,
        "sysctl -qw net.ipv4.conf.all.arp_announce=0 net.ipv4.conf.eth0.arp_announce=0",
    );
    expect_problem(
        &host,
        &args,
        "arp_announce on eth0",
        "sysctl -w net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.eth0.arp_announce=2",
        true,
    );

    // `all` alone breaks it (eth0 stays 0): the kernel applies the larger.
    sh(&host, "sysctl -qw net.ipv4.conf.all.rp_filter=1");
    expect_problem(
        &host,
        &args,
        "rp_filter on eth0",
        "sysctl -w net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0",
        true,
    );

    sh(&host, "ip link set dev eth0 mtu 1500");
    expect_problem(
        &host,
        &args,
        "MTU/MSS on eth0",
        "ip link set dev eth0 mtu 1520",
        true,
    );
    // A clamped MSS is the other way to make room.
    sh(
        &host,
        "ip link set dev eth0 mtu 1500 && ip route change 198.18.0.0/24 dev eth0 advmss 1440",
    );
    let (ok, report) = doctor(&host, &args);
    assert!(ok, "advmss 1440 leaves room:\n{report}");
    sh(&host, "ip link set dev eth0 mtu 1600");

    // Without a decapsulator; the kernel's tunl0 cannot exist here (no
    // ipip module), so the fix is checked as printed and decap reattached.
    site.backend_dp
        .detach(Role::Decap, "eth0")
        .expect("detaching decap");
    expect_problem(
        &host,
        &args,
        "decapsulation",
        "modprobe ipip && ip link set dev tunl0 up && sysctl -w net.ipv4.conf.tunl0.rp_filter=0",
        false,
    );
    let decap = &mut site.backend_dp;
    host.run_in(|| decap.attach(Role::Decap, "eth0", AttachMode::Native))
        .expect("entering the backend")
        .expect("attaching decap again");
    let (ok, report) = doctor(&host, &args);
    assert!(ok, "{report}");
    site.close();
}

#[test]
fn a_node_is_checked_and_every_fix_it_prints_works() {
    if !privileged() {
        return;
    }
    let mut site = Site::build("doctor-node");
    site.resolve_backend();
    let host = site.node.clone();
    let good = site.config("good", &[BACKEND]);
    let good = good.to_str().unwrap();
    let args = ["--role", "node", "--config", good];
    let (ok, report) = doctor(&host, &args);
    assert!(ok, "a correct node fails:\n{report}");
    assert!(
        report.contains("ok    balancer on eth0 (native XDP)"),
        "{report}"
    );
    assert!(
        report.contains("ok    neighbour 198.18.0.11 on eth0"),
        "{report}"
    );
    // Detected as a node from --config alone.
    let (ok, report) = doctor(&host, &["--config", good]);
    assert!(ok && report.contains("xlb node:"), "{report}");

    sh(&host, "sysctl -qw net.ipv4.conf.eth0.forwarding=0");
    expect_problem(
        &host,
        &args,
        "ipv4 forwarding on eth0",
        "sysctl -w net.ipv4.conf.eth0.forwarding=1",
        true,
    );

    sh(&host, "ip link set dev eth0 mtu 1500");
    expect_problem(
        &host,
        &args,
        "MTU toward 198.18.0.11",
        "ip link set dev eth0 mtu 1520",
        true,
    );

    let unrouted = site.config("unrouted", &[BACKEND, UNROUTED]);
    expect_problem(
        &host,
        &["--role", "node", "--config", unrouted.to_str().unwrap()],
        "route to backend 198.18.50.1",
        "ip route add 198.18.50.1/32 dev eth0",
        false,
    );

    let absent = site.config("absent", &[BACKEND, ABSENT]);
    expect_problem(
        &host,
        &["--role", "node", "--config", absent.to_str().unwrap()],
        "neighbour 198.18.0.99 on eth0",
        "ping -c 1 -I eth0 198.18.0.99",
        false,
    );

    // Via-VIP probes connect to the VIP: the node needs a route to it out
    // of the balancer's interface.
    let via_vip = site.dir.join("via-vip.toml");
    let text = fs::read_to_string(good).expect("reading a config");
    fs::write(
        &via_vip,
        text.replacen("port = 80\n", "port = 80\nprobe = { via = \"vip\" }\n", 1),
    )
    .expect("writing a config");
    let via_args = ["--role", "node", "--config", via_vip.to_str().unwrap()];
    expect_problem(
        &host,
        &via_args,
        "route to VIP 198.18.100.1 for via-VIP probes",
        "ip route add 198.18.100.1/32 via GATEWAY dev eth0",
        false,
    );
    sh(&host, "ip route add 198.18.100.1/32 dev lo");
    expect_problem(
        &host,
        &via_args,
        "route to VIP 198.18.100.1 for via-VIP probes",
        "ip route add 198.18.100.1/32 via GATEWAY dev eth0",
        false,
    );
    sh(
        &host,
        "ip route replace 198.18.100.1/32 via 198.18.0.11 dev eth0",
    );
    let (ok, report) = doctor(&host, &via_args);
    assert!(ok, "{report}");
    assert!(
        report.contains("ok    route to VIP 198.18.100.1 for via-VIP probes: dev eth0"),
        "{report}"
    );

    site.node_dp
        .detach(Role::Balancer, "eth0")
        .expect("detaching the balancer");
    expect_problem(&host, &args, "balancer on eth0", "xlb attach eth0", false);
    site.close();
}

#[test]
fn a_host_that_is_neither_is_refused_with_the_reason() {
    if !privileged() {
        return;
    }
    let topology = Topology::new("doctor-none").expect("topology");
    let host = topology.host("plain").expect("host");
    let (ok, report) = doctor(&host, &[]);
    assert!(!ok);
    assert!(
        report.contains("cannot tell whether this host is an xlb node or a backend"),
        "{report}"
    );
    let (ok, report) = doctor(&host, &["--role", "node"]);
    assert!(
        !ok && report.contains("--role node needs --config FILE"),
        "{report}"
    );
    let prefix = topology.prefix().to_owned();
    topology.close().expect("teardown");
    assert!(Topology::leftovers(&prefix).unwrap().is_empty());
}
