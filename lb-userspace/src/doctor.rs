//! `xlb doctor`: checks the settings direct server return needs on this host
//! and says, for each problem, what is wrong and the command that fixes it.
//!
//! On a backend host: a decapsulator (xlb's decap program, or the kernel's
//! `tunl0`/`ip6tnl0`), every VIP on `lo`, `arp_ignore` / `arp_announce` so
//! the host never answers ARP for a VIP, a reverse-path filter that lets the
//! client's packets in, and room for the encapsulation overhead (MTU or MSS).
//! On an xlb node: the balancer attached (and in which mode), forwarding on
//! its interfaces, a route and a resolved neighbour for every backend, an
//! MTU toward them that fits an encapsulated full-size packet, and for
//! every VIP with via-VIP probes a route to the VIP out of a balancer
//! interface (where the probe egress program encapsulates them).
//!
//! Everything is read from the kernel of the namespace it runs in, through
//! `ip -json` and `/proc/sys/net`, so it checks exactly what the packets
//! will meet. Nothing is changed.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::config;

/// The sysctls a backend needs for direct server return over IPv4, as
/// `(key, value)`; `{dev}` stands for its interface to the fabric. The demo
/// sets exactly these, and [`check_backend`] checks them.
pub const BACKEND_SYSCTLS_V4: [(&str, &str); 8] = [
    ("net.ipv4.conf.all.arp_ignore", "1"),
    ("net.ipv4.conf.all.arp_announce", "2"),
    ("net.ipv4.conf.{dev}.arp_ignore", "1"),
    ("net.ipv4.conf.{dev}.arp_announce", "2"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.conf.{dev}.rp_filter", "0"),
    ("net.ipv4.conf.lo.rp_filter", "0"),
];

/// The largest packet a client sends, by default: Ethernet's 1500.
pub const DEFAULT_CLIENT_MTU: u32 = 1500;
/// Bytes the outer header adds: IPv4 and IPv6 outer headers.
const OVERHEAD_V4: u32 = 20;
const OVERHEAD_V6: u32 = 40;
/// TCP and IPv4 headers without options, for the MSS arithmetic.
const TCP_IPV4_HEADERS: u32 = 40;

const BALANCER_PROGRAM: &str = "xlb_balancer";
const DECAP_PROGRAM: &str = "xlb_decap";

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("running `ip {args}`: {message}")]
    Ip { args: String, message: String },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(
        "cannot tell whether this host is an xlb node or a backend (no xlb program attached, \
         no config given, no address on lo but 127.0.0.1/::1): pass --role node --config FILE, \
         or --role backend --vip ADDR"
    )]
    UnknownRole,
    #[error("--role node needs --config FILE (the node's xlb.toml: its interfaces and backends)")]
    NodeNeedsConfig,
}

/// What this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRole {
    /// Runs the balancer (`xlb run`).
    Node,
    /// Serves a VIP behind xlb, answering clients directly.
    Backend,
}

impl fmt::Display for HostRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostRole::Node => "xlb node",
            HostRole::Backend => "backend",
        })
    }
}

/// What to check.
#[derive(Clone, Debug, Default)]
pub struct DoctorOptions {
    /// `None`: detected from what is attached and configured.
    pub role: Option<HostRole>,
    /// The node's config (interfaces, backends, outer sources).
    pub config: Option<PathBuf>,
    /// The VIPs a backend serves; none: the addresses on `lo` (other than
    /// loopback ones).
    pub vips: Vec<IpAddr>,
    /// The largest packet clients send (default 1500).
    pub client_mtu: Option<u32>,
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// What was checked, e.g. "arp_ignore on eth0".
    pub check: String,
    /// `None`: fine. Otherwise what is wrong and why it matters.
    pub problem: Option<String>,
    /// The commands that fix it.
    pub fix: Vec<String>,
    /// A problem that slows traffic down but does not stop it.
    pub warning: bool,
}

impl Finding {
    fn ok(check: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            problem: None,
            fix: Vec::new(),
            warning: false,
        }
    }

    fn problem(check: impl Into<String>, problem: impl Into<String>, fix: Vec<String>) -> Self {
        Self {
            check: check.into(),
            problem: Some(problem.into()),
            fix,
            warning: false,
        }
    }
}

/// All findings for one host.
#[derive(Clone, Debug)]
pub struct Report {
    pub role: HostRole,
    pub findings: Vec<Finding>,
}

impl Report {
    /// Problems that stop traffic (warnings excluded).
    pub fn problems(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.problem.is_some() && !f.warning)
    }

    pub fn healthy(&self) -> bool {
        self.problems().next().is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let problems = self.problems().count();
        let warnings = self
            .findings
            .iter()
            .filter(|x| x.problem.is_some() && x.warning)
            .count();
        writeln!(
            f,
            "xlb doctor, {}: {} checks, {problems} problem(s), {warnings} warning(s)",
            self.role,
            self.findings.len()
        )?;
        for finding in &self.findings {
            match &finding.problem {
                None => writeln!(f, "ok    {}", finding.check)?,
                Some(problem) => {
                    let tag = if finding.warning { "WARN" } else { "FAIL" };
                    writeln!(f, "{tag}  {}: {problem}", finding.check)?;
                    for fix in &finding.fix {
                        writeln!(f, "      fix: {fix}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs every check that applies to this host.
pub fn diagnose(opts: &DoctorOptions) -> Result<Report, DoctorError> {
    let links = links()?;
    let role = match opts.role {
        Some(role) => role,
        None => detect_role(opts, &links)?,
    };
    let client_mtu = opts.client_mtu.unwrap_or(DEFAULT_CLIENT_MTU);
    let findings = match role {
        HostRole::Backend => check_backend(&links, &opts.vips, client_mtu)?,
        HostRole::Node => {
            let path = opts.config.as_deref().ok_or(DoctorError::NodeNeedsConfig)?;
            check_node(&links, path, client_mtu)?
        }
    };
    Ok(Report { role, findings })
}

fn detect_role(opts: &DoctorOptions, links: &[Link]) -> Result<HostRole, DoctorError> {
    if opts.config.is_some() || links.iter().any(|l| l.xdp_prog() == Some(BALANCER_PROGRAM)) {
        return Ok(HostRole::Node);
    }
    if !opts.vips.is_empty()
        || links.iter().any(|l| l.xdp_prog() == Some(DECAP_PROGRAM))
        || !lo_vips()?.is_empty()
    {
        return Ok(HostRole::Backend);
    }
    Err(DoctorError::UnknownRole)
}

// ---------------------------------------------------------------------------
// Backend host.

/// The checks of a backend host: decapsulation, VIPs on `lo`, ARP, reverse
/// path filter, MTU or MSS.
pub fn check_backend(
    links: &[Link],
    vips: &[IpAddr],
    client_mtu: u32,
) -> Result<Vec<Finding>, DoctorError> {
    let mut findings = Vec::new();
    let fabric: Vec<&Link> = links.iter().filter(|l| l.is_fabric()).collect();
    let on_lo = lo_vips()?;
    let vips: Vec<IpAddr> = if vips.is_empty() {
        on_lo.iter().copied().collect()
    } else {
        vips.to_vec()
    };

    // Decapsulation: xlb's program on an interface, or the kernel's tunnel
    // fallback devices, which take IPIP / IP6IP6 to any local address.
    let decap_on: Vec<&str> = links
        .iter()
        .filter(|l| l.xdp_prog() == Some(DECAP_PROGRAM))
        .map(|l| l.name.as_str())
        .collect();
    let tunnels: Vec<&str> = links
        .iter()
        .filter(|l| matches!(l.name.as_str(), "tunl0" | "ip6tnl0") && l.up)
        .map(|l| l.name.as_str())
        .collect();
    if !decap_on.is_empty() {
        findings.push(Finding::ok(format!(
            "decapsulation: {DECAP_PROGRAM} on {}",
            decap_on.join(", ")
        )));
    } else if !tunnels.is_empty() {
        findings.push(Finding::ok(format!(
            "decapsulation: kernel tunnel {}",
            tunnels.join(", ")
        )));
    } else {
        findings.push(Finding::problem(
            "decapsulation",
            "nothing strips the outer header: neither xlb's decap program is attached nor \
             the kernel's tunl0 (IPIP) is up, so encapsulated packets from the xlb nodes are \
             dropped",
            vec!["modprobe ipip && ip link set dev tunl0 up && sysctl -w net.ipv4.conf.tunl0.rp_filter=0".into()],
        ));
    }

    if vips.is_empty() {
        findings.push(Finding::problem(
            "VIPs on lo",
            "no VIP given (--vip) and none on lo: the backend's stack would drop the \
             decapsulated packets, which are addressed to the VIP",
            vec!["ip addr add VIP/32 dev lo   # for each VIP this backend serves".into()],
        ));
    }
    for vip in &vips {
        let len = if vip.is_ipv4() { 32 } else { 128 };
        if on_lo.contains(vip) {
            findings.push(Finding::ok(format!("VIP {vip} on lo")));
        } else {
            findings.push(Finding::problem(
                format!("VIP {vip} on lo"),
                format!("{vip} is not a local address: the decapsulated packets to it are dropped"),
                vec![format!("ip addr add {vip}/{len} dev lo")],
            ));
        }
    }

    // Without a known VIP, the IPv4 settings are checked all the same.
    if vips.is_empty() || vips.iter().any(IpAddr::is_ipv4) {
        for link in &fabric {
            let dev = &link.name;
            // The kernel applies the larger of `all` and the device's value.
            let ignore = effective(dev, "arp_ignore", u32::max);
            if ignore >= 1 {
                findings.push(Finding::ok(format!("arp_ignore on {dev} ({ignore})")));
            } else {
                findings.push(Finding::problem(
                    format!("arp_ignore on {dev}"),
                    format!(
                        "is 0: {dev} answers ARP for the VIP held on lo, so the network may \
                         send VIP traffic here instead of to the xlb nodes"
                    ),
                    vec![format!(
                        "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.{dev}.arp_ignore=1"
                    )],
                ));
            }
            let announce = effective(dev, "arp_announce", u32::max);
            if announce >= 2 {
                findings.push(Finding::ok(format!("arp_announce on {dev} ({announce})")));
            } else {
                findings.push(Finding::problem(
                    format!("arp_announce on {dev}"),
                    format!(
                        "is {announce}: ARP requests from {dev} may carry the VIP as sender \
                         address and teach neighbours that the VIP lives here"
                    ),
                    vec![format!(
                        "sysctl -w net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.{dev}.arp_announce=2"
                    )],
                ));
            }
        }
        // Packets arrive on the fabric interface (xlb's decap) or on
        // tunl0, from client addresses a strict filter may reject.
        let mut rp_devs: Vec<&str> = fabric.iter().map(|l| l.name.as_str()).collect();
        rp_devs.extend(tunnels.iter().filter(|t| **t == "tunl0"));
        for dev in rp_devs {
            let rp = effective(dev, "rp_filter", u32::max);
            if rp == 1 {
                findings.push(Finding::problem(
                    format!("rp_filter on {dev}"),
                    format!(
                        "is strict (1): decapsulated packets from clients whose route does not \
                         point back through {dev} are dropped"
                    ),
                    vec![format!(
                        "sysctl -w net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.{dev}.rp_filter=0"
                    )],
                ));
            } else {
                findings.push(Finding::ok(format!("rp_filter on {dev} ({rp})")));
            }
        }
    }

    // A client's full-size packet plus the outer header must fit the link
    // it arrives on, or the backend must ask clients for smaller segments.
    let overhead = if vips.iter().any(IpAddr::is_ipv6) {
        OVERHEAD_V6
    } else {
        OVERHEAD_V4
    };
    let need = client_mtu + overhead;
    let mss_fits = client_mtu - TCP_IPV4_HEADERS - overhead;
    for link in &fabric {
        let dev = &link.name;
        if link.mtu >= need {
            findings.push(Finding::ok(format!(
                "MTU of {dev} ({}) fits {client_mtu} + {overhead} bytes of encapsulation",
                link.mtu
            )));
            continue;
        }
        match route_advmss(dev)? {
            Some(mss) if mss <= mss_fits => findings.push(Finding::ok(format!(
                "MSS of the routes on {dev} ({mss}) leaves room for the encapsulation"
            ))),
            found => findings.push(Finding::problem(
                format!("MTU/MSS on {dev}"),
                format!(
                    "MTU {} < {need} ({client_mtu} from clients + {overhead} of encapsulation) \
                     and {}: full-size segments from clients cannot reach this host",
                    link.mtu,
                    found.map_or("no route advertises a smaller MSS".to_owned(), |m| format!(
                        "the advertised MSS {m} is above {mss_fits}"
                    ))
                ),
                vec![
                    format!("ip link set dev {dev} mtu {need}"),
                    format!(
                        "# or, where the path cannot carry {need}: for each route on {dev}, ip route change ROUTE dev {dev} advmss {mss_fits}"
                    ),
                ],
            )),
        }
    }
    Ok(findings)
}

fn lo_vips() -> Result<BTreeSet<IpAddr>, DoctorError> {
    let addrs = ip_json(&["addr", "show", "dev", "lo"])?;
    Ok(addrs
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()))
        .filter(|a| !a.is_loopback())
        .collect())
}

/// The advmss of the routes out of `dev`, the largest if several.
fn route_advmss(dev: &str) -> Result<Option<u32>, DoctorError> {
    let routes = ip_json(&["-4", "route", "show", "dev", dev])?;
    Ok(routes
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["metrics"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m["advmss"].as_u64())
        .map(|m| m as u32)
        .max())
}

// ---------------------------------------------------------------------------
// xlb node.

/// The checks of an xlb node, for the interfaces and backends of its config.
pub fn check_node(
    links: &[Link],
    config_path: &Path,
    client_mtu: u32,
) -> Result<Vec<Finding>, DoctorError> {
    let config = config::load(config_path)?;
    let node = &config.node;
    let mut findings = Vec::new();
    let config_arg = config_path.display();

    for name in &node.interfaces {
        let Some(link) = links.iter().find(|l| &l.name == name) else {
            findings.push(Finding::problem(
                format!("interface {name}"),
                "is in node.interfaces but does not exist here",
                vec![format!(
                    "# fix node.interfaces in {config_arg}, or create {name}; `ip link` lists what exists"
                )],
            ));
            continue;
        };
        match (link.xdp_prog(), link.xdp_mode.as_deref()) {
            (Some(BALANCER_PROGRAM), Some("generic")) => findings.push(Finding {
                warning: true,
                ..Finding::problem(
                    format!("balancer on {name}"),
                    "attached in generic (skb) mode: it works, several times slower than native",
                    vec![format!(
                        "xlb attach {name} --mode native   # needs a driver with native XDP"
                    )],
                )
            }),
            (Some(BALANCER_PROGRAM), mode) => findings.push(Finding::ok(format!(
                "balancer on {name} ({} XDP)",
                mode.unwrap_or("?")
            ))),
            (other, _) => findings.push(Finding::problem(
                format!("balancer on {name}"),
                match other {
                    Some(prog) => format!("another XDP program ({prog}) is attached, not xlb's"),
                    None => "no XDP program attached: VIP traffic is not balanced".into(),
                },
                vec![
                    format!("xlb run --config {config_arg}   # when the daemon is not running"),
                    format!("xlb attach {name}   # when it runs"),
                ],
            )),
        }
        // bpf_fib_lookup refuses to answer without forwarding on the
        // ingress device.
        let mut families = vec!["ipv4"];
        if node.source_v6.is_some() {
            families.push("ipv6");
        }
        for family in families {
            let key = format!("net.{family}.conf.{name}.forwarding");
            if read_sysctl(&key) == Some(1) {
                findings.push(Finding::ok(format!("{family} forwarding on {name}")));
            } else {
                findings.push(Finding::problem(
                    format!("{family} forwarding on {name}"),
                    "is off: the balancer's FIB lookups fail (BPF_FIB_LKUP_RET_FWD_DISABLED) \
                     and it cannot find the backends' next hops",
                    vec![format!("sysctl -w {key}=1")],
                ));
            }
        }
    }

    let backends: BTreeSet<IpAddr> = config
        .state
        .vips
        .values()
        .flat_map(|v| v.clusters.values())
        .flat_map(|c| c.backends.values())
        .map(|b| b.addr)
        .collect();
    for addr in backends {
        findings.extend(check_backend_path(
            links,
            addr,
            client_mtu,
            node.interfaces.first(),
        )?);
    }
    findings.extend(check_probe_routes(&config)?);
    Ok(findings)
}

/// A via-VIP probe connects to the VIP from the node: the node needs a
/// route to it (the default route will do) out of an interface the
/// balancer, and so the probe egress program, is on. Anywhere else the
/// probe leaves unencapsulated, or not at all.
fn check_probe_routes(config: &config::Config) -> Result<Vec<Finding>, DoctorError> {
    let (targets, _) = config.probes.targets(&config.state, |_, _| Some(0));
    let vips: BTreeSet<IpAddr> = targets
        .values()
        .filter_map(|target| target.via_vip.map(|via| via.vip))
        .collect();
    let interfaces = &config.node.interfaces;
    let dev_hint = interfaces.first().map_or("IFACE", String::as_str);
    let mut findings = Vec::new();
    for vip in vips {
        let family = if vip.is_ipv4() { "-4" } else { "-6" };
        let len = if vip.is_ipv4() { 32 } else { 128 };
        let mark = lb_common::PROBE_MARK_BASE.to_string();
        let route = ip_json(&[family, "route", "get", &vip.to_string(), "mark", &mark]).ok();
        let route = route
            .as_ref()
            .and_then(|r| r.as_array())
            .and_then(|r| r.first())
            .cloned();
        let check = format!("route to VIP {vip} for via-VIP probes");
        let fix = vec![format!(
            "ip route add {vip}/{len} via GATEWAY dev {dev_hint}   # or a default route out of {dev_hint}"
        )];
        let Some(route) = route else {
            findings.push(Finding::problem(
                check,
                "none: via-VIP probes cannot leave and fail as unreachable",
                fix,
            ));
            continue;
        };
        let dev = route["dev"].as_str().unwrap_or_default();
        let kind = route["type"].as_str().unwrap_or("unicast");
        if kind != "unicast" {
            findings.push(Finding::problem(
                check,
                format!(
                    "a {kind} route: the probes never leave this node (is the VIP an address here?)"
                ),
                fix,
            ));
        } else if !interfaces.iter().any(|i| i == dev) {
            findings.push(Finding::problem(
                check,
                format!(
                    "leaves by {dev}, where the balancer (and its probe egress program) is not: \
                     the probes go out unencapsulated"
                ),
                fix,
            ));
        } else {
            findings.push(Finding::ok(format!("{check}: dev {dev}")));
        }
    }
    Ok(findings)
}

/// Route, neighbour and MTU toward one backend.
fn check_backend_path(
    links: &[Link],
    addr: IpAddr,
    client_mtu: u32,
    iface: Option<&String>,
) -> Result<Vec<Finding>, DoctorError> {
    let family = if addr.is_ipv4() { "-4" } else { "-6" };
    let len = if addr.is_ipv4() { 32 } else { 128 };
    let dev_hint = iface.map_or("IFACE", String::as_str);
    let route = ip_json(&[family, "route", "get", &addr.to_string()]).ok();
    let route = route
        .as_ref()
        .and_then(|r| r.as_array())
        .and_then(|r| r.first())
        .filter(|r| r["type"].as_str().is_none_or(|t| t == "unicast"));
    let Some(route) = route.filter(|r| r["dev"].is_string()) else {
        return Ok(vec![Finding::problem(
            format!("route to backend {addr}"),
            "the FIB has no route to it: the balancer drops its packets (drop_no_route)",
            vec![format!(
                "ip route add {addr}/{len} dev {dev_hint}   # or: via GATEWAY dev {dev_hint}"
            )],
        )]);
    };
    let dev = route["dev"].as_str().unwrap_or_default().to_owned();
    let hop = route["gateway"]
        .as_str()
        .and_then(|g| g.parse::<IpAddr>().ok())
        .unwrap_or(addr);
    let mut findings = vec![Finding::ok(format!(
        "route to backend {addr}: dev {dev}{}",
        if hop == addr {
            String::new()
        } else {
            format!(" via {hop}")
        }
    ))];

    let neigh = ip_json(&["neigh", "show", "to", &hop.to_string(), "dev", &dev])?;
    let entry = neigh.as_array().and_then(|n| n.first()).cloned();
    let states: Vec<String> = entry
        .as_ref()
        .and_then(|e| e["state"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect();
    let usable = entry.as_ref().is_some_and(|e| e["lladdr"].is_string())
        && !states.iter().any(|s| s == "FAILED" || s == "INCOMPLETE");
    if usable {
        findings.push(Finding::ok(format!(
            "neighbour {hop} on {dev} ({})",
            states.join(",")
        )));
    } else {
        let ping = if hop.is_ipv4() { "ping" } else { "ping -6" };
        findings.push(Finding::problem(
            format!("neighbour {hop} on {dev}"),
            format!(
                "{}: the balancer has no MAC to send to; the daemon asks the kernel to resolve \
                 it, so a lasting FAILED means {hop} does not answer ARP/ND on {dev}",
                if states.is_empty() {
                    "not resolved".to_owned()
                } else {
                    states.join(",")
                }
            ),
            vec![
                format!("{ping} -c 1 -I {dev} {hop}   # must answer; then the entry resolves"),
                format!(
                    "ip neigh replace {hop} lladdr MAC dev {dev} nud permanent   # if it never will"
                ),
            ],
        ));
    }

    let overhead = if addr.is_ipv4() {
        OVERHEAD_V4
    } else {
        OVERHEAD_V6
    };
    let need = client_mtu + overhead;
    if let Some(link) = links.iter().find(|l| l.name == dev) {
        if link.mtu >= need {
            findings.push(Finding::ok(format!(
                "MTU toward {addr} ({dev}: {}) fits {client_mtu} + {overhead}",
                link.mtu
            )));
        } else {
            findings.push(Finding::problem(
                format!("MTU toward {addr}"),
                format!(
                    "{dev} has MTU {} < {need}: full-size client packets do not fit \
                     once encapsulated; xlb answers them with ICMP too-big \
                     (icmp_too_big), so clients whose ICMP gets through retry smaller, \
                     and IPv4 packets without DF are dropped (drop_too_big)",
                    link.mtu
                ),
                vec![
                    format!("ip link set dev {dev} mtu {need}   # and on the path to the backend"),
                    format!(
                        "# or on each backend: ip route change ROUTE advmss {}",
                        client_mtu - TCP_IPV4_HEADERS - overhead
                    ),
                ],
            ));
        }
    }
    Ok(findings)
}

// ---------------------------------------------------------------------------
// The kernel's view.

/// An interface as `ip -details -json link` shows it.
#[derive(Clone, Debug)]
pub struct Link {
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
    /// `native`, `generic` or `offload`.
    pub xdp_mode: Option<String>,
    pub xdp_prog_name: Option<String>,
}

impl Link {
    fn xdp_prog(&self) -> Option<&str> {
        self.xdp_prog_name.as_deref()
    }

    /// An interface packets from the fabric arrive on: up, not loopback,
    /// not a tunnel device.
    fn is_fabric(&self) -> bool {
        self.up && !self.loopback && !matches!(self.name.as_str(), "tunl0" | "ip6tnl0" | "sit0")
    }
}

/// Every interface of this namespace.
pub fn links() -> Result<Vec<Link>, DoctorError> {
    let all = ip_json(&["-details", "link", "show"])?;
    Ok(all
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            let flags: Vec<&str> = l["flags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let xdp = &l["xdp"];
            let mode = match xdp["mode"].as_u64() {
                Some(1) => Some("native"),
                Some(2) => Some("generic"),
                Some(3) => Some("offload"),
                _ => None,
            };
            Link {
                name: l["ifname"].as_str().unwrap_or_default().to_owned(),
                mtu: l["mtu"].as_u64().unwrap_or(0) as u32,
                up: flags.contains(&"UP"),
                loopback: flags.contains(&"LOOPBACK"),
                xdp_mode: mode.map(str::to_owned),
                xdp_prog_name: xdp["prog"]["name"].as_str().map(str::to_owned),
            }
        })
        .collect())
}

/// The value the kernel applies for `conf.{all,dev}.name`: `combine` of the
/// two (max for arp_ignore, arp_announce and rp_filter).
fn effective(dev: &str, name: &str, combine: fn(u32, u32) -> u32) -> u32 {
    let all = read_sysctl(&format!("net.ipv4.conf.all.{name}")).unwrap_or(0);
    let own = read_sysctl(&format!("net/ipv4/conf/{dev}/{name}")).unwrap_or(0);
    combine(all, own)
}

fn read_sysctl(key: &str) -> Option<u32> {
    // Dotted keys name the path with dots as slashes; interface names with
    // dots are passed in the slash form already.
    let path = if key.contains('/') {
        format!("/proc/sys/{key}")
    } else {
        format!("/proc/sys/{}", key.replace('.', "/"))
    };
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn ip_json(args: &[&str]) -> Result<Value, DoctorError> {
    let error = |message: String| DoctorError::Ip {
        args: args.join(" "),
        message,
    };
    let out = Command::new("ip")
        .arg("-json")
        .args(args)
        .output()
        .map_err(|err| error(err.to_string()))?;
    if !out.status.success() {
        return Err(error(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out.stdout).map_err(|err| error(format!("unreadable output: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_fails_only_on_problems_and_shows_each_fix() {
        let report = Report {
            role: HostRole::Backend,
            findings: vec![
                Finding::ok("VIP 198.18.100.1 on lo"),
                Finding {
                    warning: true,
                    ..Finding::problem("balancer on eth0", "generic", vec!["a".into()])
                },
            ],
        };
        assert!(report.healthy());
        let mut broken = report.clone();
        broken.findings.push(Finding::problem(
            "arp_ignore on eth0",
            "is 0",
            vec!["sysctl -w net.ipv4.conf.all.arp_ignore=1".into()],
        ));
        assert!(!broken.healthy());
        let text = broken.to_string();
        assert!(text.contains("1 problem(s), 1 warning(s)"), "{text}");
        assert!(
            text.contains("FAIL  arp_ignore on eth0: is 0\n      fix: sysctl -w net.ipv4.conf.all.arp_ignore=1"),
            "{text}"
        );
    }
}
