//! The `xlb.toml` configuration: schema, parsing and validation.
//!
//! A config file says where the balancer attaches and with which node-wide
//! settings (`[node]`), and which VIPs it serves, by which clusters of
//! backends (`[vip.NAME]`). [`load`] and [`parse`] turn it into a
//! [`Config`]: a [`NodeConfig`] and the [`DesiredState`] every other part of
//! xlb consumes. [`to_toml`] writes a desired state back in the same format
//! (that is how runtime changes are saved), and [`parse_state`] reads such a
//! file.
//!
//! Every error names the file, the line and column, the field and what
//! would be valid:
//!
//! ```text
//! xlb.toml:12:13: vip."web".ring_size: 65536 is not prime; use a prime such as 65537 (the
//!     nearest primes are 65521 and 65537); allowed: a prime of at least 101 (100 slots per
//!     backend, and at least 101); the default is 65537
//! ```
//!
//! (one line; wrapped here). [`validate_state`] applies the same rules to a
//! desired state from any source, such as a control-API request.
//!
//! # Schema
//!
//! `lb-userspace/xlb.example.toml` is a complete, commented example.
//!
//! ## `[node]` (required)
//!
//! | field | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `interfaces` | array of names | required | interfaces the balancer attaches to at start; `[]` attaches nowhere (the daemon then only programs maps and serves the control API until `xlb attach IFACE`) |
//! | `attach_mode` | `"auto"`, `"native"`, `"generic"` | `"auto"` | native XDP, generic XDP, or native where the driver allows and generic otherwise |
//! | `hash_seed` | integer, 0 to 2³²−1 | `0x786c6221` | seed of the flow hash and the Maglev permutations: every node of a fleet must use the same |
//! | `source_v4` | IPv4 address | none | outer source address of IPv4 encapsulation; required when any backend is IPv4 |
//! | `source_v6` | IPv6 address | none | outer source address of IPv6 encapsulation; required when any backend is IPv6 |
//! | `gateway_mac` | `"aa:bb:cc:dd:ee:ff"` | none | last-resort next hop when neither the next-hop table nor the FIB knows the backend's neighbour |
//! | `api_socket` | absolute path | `/run/xlb/xlb.sock` | the control API's Unix socket |
//! | `state_file` | absolute path | `/var/lib/xlb/state.toml` | where runtime changes are saved (see below) |
//! | `pin_path` | absolute path | `/sys/fs/bpf/xlb` | bpffs directory of the pinned maps and XDP links |
//! | `local_cluster` | cluster name | none | the cluster this node prefers while it is healthy enough; must name a cluster of some VIP when any cluster is configured |
//! | `name` | name | the host name | this node's name in a fleet on etcd: its health view is published under `PREFIX/v1/health/<name>/`; unique per node: a node whose name another live node holds refuses to start. A host name that is no valid name stops `xlb run --store` with an error asking for `name` |
//! | `health_lease` | seconds, 2 to 3600 | 10 | on etcd: how long the node's published health view outlives the node (the etcd lease's TTL, kept alive every third of it) |
//!
//! `[node.limits]`: map sizes, fixed when the program is loaded. Each is an
//! integer from 1 to 2³²−1.
//!
//! | field | default | meaning |
//! | --- | --- | --- |
//! | `max_vips` | 512 | VIPs at most |
//! | `max_backends` | 4096 | backends at most, counted per VIP (a backend address in two VIPs counts twice: each has its own counters and state); at most 65536 |
//! | `ring_capacity` | 512 × 65537 | Maglev ring slots of all VIPs together (2 bytes each in the kernel): the sum of the VIPs' `ring_size` must fit |
//! | `conntrack_size` | 2²¹ | connection-table flows (16 bytes each, one table shared by all CPUs) |
//!
//! `[node.policy]`: the multi-cluster traffic policy.
//!
//! | field | default | meaning |
//! | --- | --- | --- |
//! | `overprovisioning` | 1.4 | a priority level keeps all its traffic while its healthy share × this factor ≥ 100%; the rest spills to the next level. A number ≥ 1.0 |
//! | `panic_threshold` | 0.5 | when fewer than this share of a VIP's backends is healthy, balance over all of them. A number from 0.0 (never panic) to 1.0 |
//! | `locality_overprovisioning` | 1.4 | with `local_cluster` set: the local cluster keeps all its level's traffic while its healthy share × this factor ≥ 100%. A number ≥ 1.0 |
//!
//! The ranges are [`PolicyOptions::validate`]'s; [`NodeConfig::policy`]
//! carries these and `local_cluster`.
//!
//! `[node]` also takes `xdp_log` (`"off"`, default, or `"error"`, `"warn"`,
//! `"info"`, `"debug"`, `"trace"`): the most detailed level of the XDP
//! program's own log lines (aya-log), fixed when the program is loaded; the
//! daemon relays them to its log. Off, the program's log statements are
//! dead code the verifier removes (see `lb-ebpf/src/log.rs`).
//!
//! ## `[metrics]` (optional)
//!
//! | field | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `enabled` | boolean | `true` | serve Prometheus metrics over HTTP |
//! | `listen` | `"ADDR:PORT"` | `"127.0.0.1:9730"` | where `GET /metrics` is served: loopback only unless set |
//!
//! ## `[vip.NAME]` (any number)
//!
//! VIPs are tables named by their key, so TOML itself rejects a name used
//! twice, and every error names the VIP (`vip."web".port`) rather than a
//! position in an array. A name is 1 to 63 letters, digits, `.`, `_` or `-`,
//! starting with a letter or digit; names quoted in the path are names, the
//! rest are fields.
//!
//! | field | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `addr` | IPv4 or IPv6 address | required | the virtual address |
//! | `port` | 0 to 65535 | required | the service port; 0 takes every port of `proto` |
//! | `proto` | `"tcp"`, `"udp"` | `"tcp"` | |
//! | `ring_size` | prime | 65537 | Maglev ring slots: a prime of at least 100 × the VIP's backends (all of them, whatever their state) and at least 101, as [`maglev::check_size`] wants, so that shares stay within 1% of the weights. 65537 serves up to 655 backends; 131071, 262147, 524287, 655373 and 1048573 serve more |
//! | `affinity` | `"flow"`, `"client"` | `"flow"` | hash the 5-tuple, or the client address alone (all of a client's connections reach one backend) |
//!
//! `(addr, port, proto)` is unique over all VIPs.
//!
//! ## `[vip.NAME.cluster.NAME]`
//!
//! | field | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `weight` | 0 to 2³²−1 | 1 | the cluster's share of the VIP's traffic relative to the other clusters of its priority |
//! | `priority` | 0 to 2³²−1 | 0 | 0 is served first; higher levels take what lower ones cannot |
//!
//! ## `[vip.NAME.cluster.NAME.backend.NAME]`
//!
//! Or inline in the cluster's table: `backend.b1 = { addr = "198.18.1.1" }`.
//!
//! | field | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `addr` | IPv4 or IPv6 address | required | where encapsulated packets go; also the backend's identity in the ring |
//! | `weight` | 0 to 2³²−1 | 1 | share within the cluster; 0 drains (no new flows) |
//! | `state` | `"enabled"`, `"drained"`, `"disabled"` | `"enabled"` | the operator's word, stronger than any probe |
//!
//! Within a VIP, backend addresses are distinct (over all its clusters) and
//! differ from the VIP's address. Any mix of families works: an IPv4 VIP
//! may have IPv6 backends and the other way round; the outer header takes
//! the backend's family.
//!
//! Unknown fields are errors that list the allowed ones. The names `vip`,
//! `cluster` and `backend` hold only tables of named children, so fields
//! such as `probe` can never collide with a name.
//!
//! ## `probe` (in `[vip.NAME]`, a cluster or a backend)
//!
//! Health probes ([`crate::health`]). A backend is probed when its VIP,
//! its cluster or itself has a `probe` table; each field set at a lower
//! level overrides the level above. Probe tables are read from the config
//! file only (not saved in the state file) and apply by name, also to
//! backends added at run time.
//!
//! | field | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `kind` | `"tcp"`, `"http"`, `"udp"` | the VIP's proto | TCP connect, HTTP/1.1 GET, or a UDP datagram that must be answered |
//! | `via` | `"backend"`, `"vip"` | `"backend"` | connect to the backend's own address, or to the VIP through the balancer's tunnel to this backend (see the README, "Health probes") |
//! | `port` | 1 to 65535 | the VIP's port | required when the VIP's port is 0 |
//! | `interval` | seconds, 0.01 to 3600 | 2 | between probes |
//! | `timeout` | seconds, 0.01 to 3600 | 1 | a probe's whole budget; at most `interval` |
//! | `rise` | 1 to 1000 | 2 | passes in a row that bring a down backend back |
//! | `fall` | 1 to 1000 | 3 | failures in a row that take it down |
//! | `jitter` | 0.0 to 0.5 | 0.1 | each wait is the interval ± this fraction |
//! | `flap_backoff` | seconds, 0 to 86400 | 30 | hold-out of a backend that went down 3 times within 20 intervals; 0: off |
//! | `path` | absolute path | `"/"` | http only |
//! | `host` | string | the backend's address | http only: the Host header |
//! | `status` | array of 100 to 599 | `[200]` | http only: accepted status codes |
//! | `body` | string | none | http only: the body must contain it |
//! | `payload` | string | `"ping"` | udp only: the datagram sent |
//! | `expect` | string | none | udp only: the reply must contain it |
//!
//! A level that sets another `kind` than the level above drops that
//! level's kind fields (`path`, `host`, `status`, `body`, `payload`,
//! `expect`) and keeps the rest. A field of another kind set at the same
//! level (`path` with `kind = "tcp"`), a missing port
//! for a port-0 VIP and a timeout beyond the interval are errors at the
//! level that sets them.
//!
//! ## The state file
//!
//! Runtime changes (`xlb vip add`, `xlb backend drain`, ...) are saved to
//! `state_file` as the whole desired state, in the `[vip.NAME]` format
//! above and nothing else ([`to_toml`]). When that file exists at start it
//! replaces the `vip` tables of the config file ([`load_state`]); delete it
//! to return to the config file's VIPs.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
};

use lb_common::{DEFAULT_RING_SIZE, SETTINGS_F_GATEWAY_MAC, Settings, addr_from_ip};
use serde::Deserialize;
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use crate::{
    dataplane::{AttachMode, Limits, XdpLog},
    health::settings::{ClusterProbes, KindName, ProbeConfig, ProbeSettings, ProbeVia},
    maglev::{self, MaglevError},
    policy::PolicyOptions,
    state::{AdminState, Affinity, Backend, Cluster, DesiredState, Proto, Vip},
};

/// The flow-hash and Maglev seed when the file gives none: the same on
/// every node, so a fleet that never sets it still agrees.
pub const DEFAULT_HASH_SEED: u32 = 0x786c_6221;
pub const DEFAULT_API_SOCKET: &str = "/run/xlb/xlb.sock";
pub const DEFAULT_STATE_FILE: &str = "/var/lib/xlb/state.toml";
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/xlb";
/// `node.health_lease`: default and range, in seconds (etcd grants at
/// least about 2 s with its default timing).
pub const DEFAULT_HEALTH_LEASE: u32 = 10;
const MIN_HEALTH_LEASE: u32 = 2;
const MAX_HEALTH_LEASE: u32 = 3600;

/// Longest VIP, cluster or backend name.
pub const MAX_NAME_LEN: usize = 63;
/// Longest interface name (IFNAMSIZ less the terminating NUL).
const MAX_IFNAME_LEN: usize = 15;

/// A whole config file.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub node: NodeConfig,
    pub state: DesiredState,
    /// The `probe` tables, by VIP, cluster and backend name.
    pub probes: ProbeConfig,
    pub metrics: MetricsConfig,
}

/// The `[metrics]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where `/metrics` is served; `None`: not served.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(
                crate::metrics::DEFAULT_LISTEN
                    .parse()
                    .expect("the default is an address"),
            ),
        }
    }
}

/// The `[node]` table: everything about this xlb node that is not a VIP.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeConfig {
    /// Where the balancer attaches at start; empty: nowhere yet.
    pub interfaces: Vec<String>,
    pub attach_mode: AttachMode,
    pub hash_seed: u32,
    pub source_v4: Option<Ipv4Addr>,
    pub source_v6: Option<Ipv6Addr>,
    pub gateway_mac: Option<[u8; 6]>,
    pub api_socket: PathBuf,
    pub state_file: PathBuf,
    pub pin_path: PathBuf,
    pub limits: Limits,
    /// `[node.policy]`, with `node.local_cluster` as its `local_cluster`.
    pub policy: PolicyOptions,
    /// The XDP program's log level, fixed at load.
    pub xdp_log: XdpLog,
    /// `node.name`; None: the host name, checked when a fleet needs it.
    pub name: Option<String>,
    /// `node.health_lease`: seconds a published health view outlives the node.
    pub health_lease: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            attach_mode: AttachMode::Auto,
            hash_seed: DEFAULT_HASH_SEED,
            source_v4: None,
            source_v6: None,
            gateway_mac: None,
            api_socket: DEFAULT_API_SOCKET.into(),
            state_file: DEFAULT_STATE_FILE.into(),
            pin_path: DEFAULT_PIN_PATH.into(),
            limits: Limits::default(),
            policy: PolicyOptions::default(),
            xdp_log: XdpLog::Off,
            name: None,
            health_lease: DEFAULT_HEALTH_LEASE,
        }
    }
}

impl NodeConfig {
    /// The data plane's `SETTINGS` entry for this node (the connection
    /// table's geometry is filled in by the map's owner).
    pub fn settings(&self) -> Settings {
        let mut settings = Settings {
            hash_seed: self.hash_seed,
            ..Settings::default()
        };
        if let Some(v4) = self.source_v4 {
            settings.src_v4 = addr_from_ip(v4.into()).1[0];
        }
        if let Some(v6) = self.source_v6 {
            settings.src_v6 = addr_from_ip(v6.into()).1;
        }
        if let Some(mac) = self.gateway_mac {
            settings.gateway_mac = mac;
            settings.flags |= SETTINGS_F_GATEWAY_MAC;
        }
        settings
    }
}

/// An invalid config or state file: where, which field, what is wrong and
/// what would be valid. `line` and `column` count from 1; both are 0 when
/// the file could not be read at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.file, *.line, *.column, .path, .message))]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    /// In characters, not bytes.
    pub column: usize,
    /// The field, e.g. `vip."web".cluster."east".backend."b1".addr`; empty
    /// when the error is about the file as a whole.
    pub path: String,
    pub message: String,
}

fn render(file: &str, line: usize, column: usize, path: &str, message: &str) -> String {
    let mut out = String::from(file);
    if line > 0 {
        out.push_str(&format!(":{line}:{column}"));
    }
    out.push_str(": ");
    if !path.is_empty() {
        out.push_str(path);
        out.push_str(": ");
    }
    out.push_str(message);
    out
}

/// A desired state that xlb cannot serve, found by [`validate_state`]: the
/// field (`vip."web".ring_size`) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct Problem {
    pub path: String,
    pub message: String,
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    parse(&read(path, &origin)?, &origin)
}

/// Parses and validates a config file's text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = deserialize(text, origin)?;
    let mut conv = Converter::default();
    let node = conv.node(&raw.node);
    let state = conv.vips(&raw.vip);
    let metrics = conv.metrics(raw.metrics.as_ref());
    conv.finish(text, origin)?;
    let mut problems = problems(&node, &state);
    if let Some(local) = &node.policy.local_cluster {
        let clusters: Vec<&str> = state
            .vips
            .values()
            .flat_map(|vip| vip.clusters.keys().map(String::as_str))
            .collect();
        if !clusters.is_empty() && !clusters.contains(&local.as_str()) {
            let mut known = clusters;
            known.sort_unstable();
            known.dedup();
            problems.push(Problem {
                path: "node.local_cluster".into(),
                message: format!(
                    "{local:?} names no cluster of any VIP; the clusters are {}",
                    known.join(", ")
                ),
            });
        }
    }
    problems.extend(probe_problems(&conv.probes, &state));
    conv.locate(text, origin, problems)?;
    let probes = conv.probes;
    Ok(Config {
        node,
        state,
        probes,
        metrics,
    })
}

/// Reads and validates a state file (see [`to_toml`]) for this node.
pub fn load_state(path: &Path, node: &NodeConfig) -> Result<DesiredState, ConfigError> {
    let origin = path.display().to_string();
    parse_state(&read(path, &origin)?, &origin, node)
}

/// Parses a state file's text: `[vip.NAME]` tables only, validated as in
/// a config file and against `node` (limits, outer source addresses).
pub fn parse_state(
    text: &str,
    origin: &str,
    node: &NodeConfig,
) -> Result<DesiredState, ConfigError> {
    let raw: RawState = deserialize(text, origin)?;
    let mut conv = Converter::default();
    let state = conv.vips(&raw.vip);
    conv.finish(text, origin)?;
    conv.locate(text, origin, problems(node, &state))?;
    Ok(state)
}

/// Checks a desired state from any source (a file, the control API)
/// against the node: names, addresses, unique VIPs and backend addresses,
/// ring sizes, limits and outer source addresses. Every problem found, in
/// the order of the state's maps.
pub fn validate_state(node: &NodeConfig, state: &DesiredState) -> Result<(), Vec<Problem>> {
    let found = problems(node, state);
    if found.is_empty() { Ok(()) } else { Err(found) }
}

/// Writes a desired state in the config file's `[vip.NAME]` format: what
/// [`parse_state`] reads back into an equal state.
pub fn to_toml(state: &DesiredState) -> String {
    let mut out = String::from(
        "# xlb's desired state, saved on every runtime change; it replaces the\n\
         # config file's [vip] tables at start. Remove it to go back to those.\n",
    );
    for (name, vip) in &state.vips {
        let vip_key = format!("vip.{}", toml_key(name));
        out.push_str(&format!("\n[{vip_key}]\n"));
        out.push_str(&format!("addr = \"{}\"\n", vip.addr));
        out.push_str(&format!("port = {}\n", vip.port));
        out.push_str(&format!("proto = \"{}\"\n", vip.proto));
        out.push_str(&format!("ring_size = {}\n", vip.ring_size));
        let affinity = match vip.affinity {
            Affinity::Flow => "flow",
            Affinity::Client => "client",
        };
        out.push_str(&format!("affinity = \"{affinity}\"\n"));
        for (cname, cluster) in &vip.clusters {
            out.push_str(&format!("\n[{vip_key}.cluster.{}]\n", toml_key(cname)));
            out.push_str(&format!("weight = {}\n", cluster.weight));
            out.push_str(&format!("priority = {}\n", cluster.priority));
            for (bname, backend) in &cluster.backends {
                out.push_str(&format!(
                    "backend.{} = {{ addr = \"{}\", weight = {}, state = \"{}\" }}\n",
                    toml_key(bname),
                    backend.addr,
                    backend.weight,
                    backend.admin
                ));
            }
        }
    }
    out
}

/// A key as TOML wants it: bare when it can be, a quoted string otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_owned()
    } else {
        toml::Value::String(key.to_owned()).to_string()
    }
}

fn read(path: &Path, origin: &str) -> Result<String, ConfigError> {
    fs::read_to_string(path).map_err(|err| ConfigError {
        file: origin.to_owned(),
        line: 0,
        column: 0,
        path: String::new(),
        message: format!("cannot read the file: {err}"),
    })
}

// ---------------------------------------------------------------------------
// The file as serde sees it. Numbers are read as i64 and strings as strings,
// with their spans, so that range and syntax errors can say what is valid.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Spanned<RawNode>,
    #[serde(default)]
    vip: RawVips,
    metrics: Option<Spanned<RawMetrics>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<Spanned<bool>>,
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    #[serde(default)]
    vip: RawVips,
}

type RawVips = BTreeMap<Spanned<String>, Spanned<RawVip>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    interfaces: Spanned<Vec<Spanned<String>>>,
    attach_mode: Option<Spanned<RawAttachMode>>,
    hash_seed: Option<Spanned<i64>>,
    source_v4: Option<Spanned<String>>,
    source_v6: Option<Spanned<String>>,
    gateway_mac: Option<Spanned<String>>,
    api_socket: Option<Spanned<String>>,
    state_file: Option<Spanned<String>>,
    pin_path: Option<Spanned<String>>,
    local_cluster: Option<Spanned<String>>,
    limits: Option<Spanned<RawLimits>>,
    policy: Option<Spanned<RawPolicy>>,
    xdp_log: Option<Spanned<XdpLog>>,
    name: Option<Spanned<String>>,
    health_lease: Option<Spanned<i64>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawAttachMode {
    Auto,
    Native,
    Generic,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_vips: Option<Spanned<i64>>,
    max_backends: Option<Spanned<i64>>,
    ring_capacity: Option<Spanned<i64>>,
    conntrack_size: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    overprovisioning: Option<Spanned<f64>>,
    panic_threshold: Option<Spanned<f64>>,
    locality_overprovisioning: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    addr: Spanned<String>,
    port: Spanned<i64>,
    proto: Option<Spanned<RawProto>>,
    ring_size: Option<Spanned<i64>>,
    affinity: Option<Spanned<RawAffinity>>,
    probe: Option<Spanned<RawProbe>>,
    #[serde(default)]
    cluster: BTreeMap<Spanned<String>, Spanned<RawCluster>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawProto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawAffinity {
    Flow,
    Client,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    weight: Option<Spanned<i64>>,
    priority: Option<Spanned<i64>>,
    probe: Option<Spanned<RawProbe>>,
    #[serde(default)]
    backend: BTreeMap<Spanned<String>, Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    addr: Spanned<String>,
    weight: Option<Spanned<i64>>,
    state: Option<Spanned<RawAdmin>>,
    probe: Option<Spanned<RawProbe>>,
}

/// A `probe` table, at any level.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    kind: Option<Spanned<RawProbeKind>>,
    via: Option<Spanned<RawProbeVia>>,
    port: Option<Spanned<i64>>,
    interval: Option<Spanned<f64>>,
    timeout: Option<Spanned<f64>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    jitter: Option<Spanned<f64>>,
    flap_backoff: Option<Spanned<f64>>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    status: Option<Spanned<Vec<Spanned<i64>>>>,
    body: Option<Spanned<String>>,
    payload: Option<Spanned<String>>,
    expect: Option<Spanned<String>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawProbeKind {
    Tcp,
    Http,
    Udp,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawProbeVia {
    Backend,
    Vip,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawAdmin {
    Enabled,
    Drained,
    Disabled,
}

// ---------------------------------------------------------------------------
// Syntax and type errors: toml gives a span; the field path is found by
// walking the document's spanned tree to the smallest key or value there.

fn deserialize<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let (tree, syntax) = DeTable::parse_recoverable(text);
    let (err, is_syntax) = match syntax.into_iter().next() {
        Some(err) => (err, true),
        None => match toml::from_str(text) {
            Ok(value) => return Ok(value),
            Err(err) => (err, false),
        },
    };
    let span = err.span().unwrap_or(0..0);
    let mut path = path_at(tree.get_ref(), &span);
    let mut message = clean_message(err.message());
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        path.push(Seg::Field(field.to_owned()));
        message = format!("missing field `{field}`, which has no default");
    }
    let mut say_valid = !(is_syntax && path.is_empty());
    if message == "duplicate key" {
        let what = match path.last() {
            Some(Seg::Name(_)) => "this name is already used in the same table",
            _ => "this key is already set in the same table",
        };
        message = format!("duplicate key: {what}");
        say_valid = false;
    }
    // These already list what is valid.
    if message.starts_with("unknown field") || message.starts_with("unknown variant") {
        say_valid = false;
    }
    if say_valid && let Some(hint) = hint(&shape(&path)) {
        message = format!("{message}; valid: {hint}");
    }
    let (line, column) = line_column(text, span.start);
    Err(ConfigError {
        file: origin.to_owned(),
        line,
        column,
        path: render_path(&path),
        message,
    })
}

/// serde's words for types, in the words of a TOML file.
fn clean_message(message: &str) -> String {
    let mut out = message.trim().replace('\n', "; ");
    for (from, to) in [
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
        ("invalid type: sequence", "invalid type: array"),
        ("invalid type: map", "invalid type: table"),
        ("floating point", "float"),
    ] {
        out = out.replace(from, to);
    }
    if let Some(rest) = out.strip_prefix("invalid type: integer `")
        && let Some((number, _)) = rest.split_once("` as i128")
    {
        out = format!("the integer {number} is out of range");
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Field(String),
    Name(String),
    Index(usize),
}

fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Field(field) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(field);
            }
            Seg::Name(name) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&format!("{name:?}"));
            }
            Seg::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// The path with names as `*` and without indices: the key of [`hint`].
fn shape(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        let part = match seg {
            Seg::Field(field) => field.as_str(),
            Seg::Name(_) => "*",
            Seg::Index(_) => continue,
        };
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(part);
    }
    out
}

/// What a field takes, by shape.
fn hint(shape: &str) -> Option<&'static str> {
    Some(match shape {
        "" => "top-level tables [node] and [vip.NAME]",
        "node" => "a table [node] with at least interfaces = [\"eth0\"]",
        "node.interfaces" => {
            "an array of interface names such as [\"eth0\"], or [] to attach nowhere at start"
        }
        "node.attach_mode" => "\"auto\", \"native\" or \"generic\"",
        "node.hash_seed" => {
            "an integer from 0 to 4294967295 such as 0x786c6221, the same on every node of a fleet"
        }
        "node.source_v4" => "an IPv4 address of this node such as \"198.18.0.1\"",
        "node.source_v6" => "an IPv6 address of this node such as \"fd00::1\"",
        "node.gateway_mac" => "a unicast MAC address such as \"02:00:5e:00:00:01\"",
        "node.api_socket" => "an absolute path such as \"/run/xlb/xlb.sock\"",
        "node.state_file" => "an absolute path such as \"/var/lib/xlb/state.toml\"",
        "node.pin_path" => "an absolute path in bpffs such as \"/sys/fs/bpf/xlb\"",
        "node.local_cluster" => "the name of a cluster such as \"east\"",
        "node.name" => "this node's name in a fleet such as \"lb1\" (default: the host name)",
        "node.health_lease" => "an integer from 2 to 3600 (seconds; default 10)",
        "node.limits" => {
            "a table [node.limits] with max_vips, max_backends, ring_capacity, conntrack_size"
        }
        "node.limits.max_vips" => "an integer from 1 to 4294967295 (default 512)",
        "node.limits.max_backends" => "an integer from 1 to 4294967295 (default 4096)",
        "node.limits.ring_capacity" => "an integer from 1 to 4294967295 (default 33554944)",
        "node.limits.conntrack_size" => "an integer from 1 to 4294967295 (default 2097152)",
        "node.policy" => {
            "a table [node.policy] with overprovisioning, panic_threshold, locality_overprovisioning"
        }
        "node.policy.overprovisioning" | "node.policy.locality_overprovisioning" => {
            "a number of at least 1.0 such as 1.4 (the default)"
        }
        "node.policy.panic_threshold" => "a number from 0.0 to 1.0 such as 0.5 (the default)",
        "vip" => "tables named by VIP: [vip.NAME] (not [[vip]])",
        "vip.*" => "a table [vip.NAME] with addr, port and optionally proto, ring_size, affinity",
        "vip.*.addr" | "vip.*.cluster.*.backend.*.addr" => {
            "an IPv4 or IPv6 address such as \"198.18.100.1\" or \"fd00::100\""
        }
        "vip.*.port" => "a port from 0 to 65535 (0: every port)",
        "vip.*.proto" => "\"tcp\" (the default) or \"udp\"",
        "vip.*.ring_size" => {
            "a prime such as 65537 (the default), at least 100 × the VIP's backends and at least 101"
        }
        "vip.*.affinity" => "\"flow\" (the default) or \"client\"",
        "vip.*.cluster" => "tables named by cluster: [vip.NAME.cluster.NAME]",
        "vip.*.cluster.*" => "a table [vip.NAME.cluster.NAME] with weight, priority and backends",
        "vip.*.cluster.*.weight" => "an integer from 0 to 4294967295 (default 1)",
        "vip.*.cluster.*.priority" => "an integer from 0 to 4294967295 (default 0, served first)",
        "vip.*.cluster.*.backend" => {
            "tables named by backend: [vip.NAME.cluster.NAME.backend.NAME] or backend.NAME = { addr = \"...\" }"
        }
        "vip.*.cluster.*.backend.*" => "a backend table with addr and optionally weight, state",
        "vip.*.cluster.*.backend.*.weight" => {
            "an integer from 0 to 4294967295 (default 1; 0 drains)"
        }
        "vip.*.cluster.*.backend.*.state" => {
            "\"enabled\" (the default), \"drained\" or \"disabled\""
        }
        "vip.*.probe" | "vip.*.cluster.*.probe" | "vip.*.cluster.*.backend.*.probe" => {
            "a table probe = { kind = \"tcp\" | \"http\" | \"udp\", via = \"backend\" | \"vip\", port, interval, timeout, rise, fall, jitter, flap_backoff, ... }"
        }
        s if s.ends_with(".probe.via") => {
            "\"backend\" (the default: the backend's own address) or \"vip\" (the VIP, through the balancer's tunnel)"
        }
        s if s.ends_with(".probe.kind") => {
            "\"tcp\", \"http\" or \"udp\" (default: the VIP's proto)"
        }
        s if s.ends_with(".probe.port") => "a port from 1 to 65535 (default: the VIP's port)",
        s if s.ends_with(".probe.interval")
            || s.ends_with(".probe.timeout")
            || s.ends_with(".probe.flap_backoff") =>
        {
            "a number of seconds such as 2 or 0.5"
        }
        s if s.ends_with(".probe.rise") || s.ends_with(".probe.fall") => {
            "an integer from 1 to 1000"
        }
        s if s.ends_with(".probe.jitter") => "a fraction of the interval from 0.0 to 0.5",
        s if s.ends_with(".probe.status") => "an array of HTTP status codes such as [200, 204]",
        s if s.ends_with(".probe.path") => "an absolute HTTP path such as \"/health\"",
        s if s.ends_with(".probe.host")
            || s.ends_with(".probe.body")
            || s.ends_with(".probe.payload")
            || s.ends_with(".probe.expect") =>
        {
            "a string"
        }
        _ => return None,
    })
}

/// Where the tree walk is, to tell names (quoted in paths) from fields.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Root,
    Vips,
    Vip,
    Clusters,
    Cluster,
    Backends,
    Other,
}

impl Level {
    /// The segment for `key` at this level and the level of its value.
    fn step(self, key: &str) -> (Seg, Level) {
        let field = |next| (Seg::Field(key.to_owned()), next);
        let name = |next| (Seg::Name(key.to_owned()), next);
        match (self, key) {
            (Level::Root, "vip") => field(Level::Vips),
            (Level::Vips, _) => name(Level::Vip),
            (Level::Vip, "cluster") => field(Level::Clusters),
            (Level::Clusters, _) => name(Level::Cluster),
            (Level::Cluster, "backend") => field(Level::Backends),
            (Level::Backends, _) => name(Level::Other),
            _ => field(Level::Other),
        }
    }
}

/// The path of the smallest key or value whose span holds `span`; the
/// deeper one on a tie.
fn path_at(root: &DeTable<'_>, span: &Range<usize>) -> Vec<Seg> {
    let mut best = None;
    walk(root, Level::Root, &mut Vec::new(), span, &mut best);
    best.map(|(_, _, path)| path).unwrap_or_default()
}

type Best = Option<(usize, usize, Vec<Seg>)>;

fn consider(candidate: &Range<usize>, span: &Range<usize>, path: &[Seg], best: &mut Best) {
    if candidate.start <= span.start && span.end <= candidate.end {
        let len = candidate.end - candidate.start;
        let better = match best {
            None => true,
            Some((best_len, best_depth, _)) => {
                len < *best_len || (len == *best_len && path.len() > *best_depth)
            }
        };
        if better {
            *best = Some((len, path.len(), path.to_vec()));
        }
    }
}

fn walk(
    table: &DeTable<'_>,
    level: Level,
    path: &mut Vec<Seg>,
    span: &Range<usize>,
    best: &mut Best,
) {
    for (key, value) in table {
        let (seg, next) = level.step(key.get_ref());
        path.push(seg);
        consider(&key.span(), span, path, best);
        walk_value(value, next, path, span, best);
        path.pop();
    }
}

fn walk_value(
    value: &Spanned<DeValue<'_>>,
    level: Level,
    path: &mut Vec<Seg>,
    span: &Range<usize>,
    best: &mut Best,
) {
    consider(&value.span(), span, path, best);
    match value.get_ref() {
        DeValue::Table(table) => walk(table, level, path, span, best),
        DeValue::Array(array) => {
            for (index, item) in array.iter().enumerate() {
                path.push(Seg::Index(index));
                walk_value(item, level, path, span, best);
                path.pop();
            }
        }
        _ => {}
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    (line, before[line_start..].chars().count() + 1)
}

// ---------------------------------------------------------------------------
// From the raw file to the model: ranges, addresses, paths. Problems are
// collected with their spans and the one earliest in the file is reported.

struct Located {
    span: Range<usize>,
    path: String,
    message: String,
}

#[derive(Default)]
struct Converter {
    problems: Vec<Located>,
    probes: ProbeConfig,
    /// Span of every path the model's problems may name.
    spans: HashMap<String, Range<usize>>,
}

fn vip_path(vip: &str) -> String {
    format!("vip.{vip:?}")
}

fn cluster_path(vip: &str, cluster: &str) -> String {
    format!("vip.{vip:?}.cluster.{cluster:?}")
}

fn backend_path(vip: &str, cluster: &str, backend: &str) -> String {
    format!("vip.{vip:?}.cluster.{cluster:?}.backend.{backend:?}")
}

impl Converter {
    fn problem(&mut self, span: Range<usize>, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Located {
            span,
            path: path.into(),
            message: message.into(),
        });
    }

    fn note<T>(&mut self, path: &str, value: &Spanned<T>) {
        self.spans.insert(path.to_owned(), value.span());
    }

    /// An integer field in `min..=max`.
    fn int(
        &mut self,
        value: &Spanned<i64>,
        path: &str,
        min: i64,
        max: i64,
        what: &str,
    ) -> Option<i64> {
        self.note(path, value);
        let n = *value.get_ref();
        if (min..=max).contains(&n) {
            Some(n)
        } else {
            self.problem(
                value.span(),
                path,
                format!("expected {what} from {min} to {max}; got {n}"),
            );
            None
        }
    }

    fn u32_or(
        &mut self,
        value: Option<&Spanned<i64>>,
        path: &str,
        min: i64,
        what: &str,
        default: u32,
    ) -> u32 {
        value
            .and_then(|value| self.int(value, path, min, u32::MAX.into(), what))
            .map_or(default, |n| n as u32)
    }

    fn ip(&mut self, value: &Spanned<String>, path: &str) -> Option<IpAddr> {
        self.note(path, value);
        let text = value.get_ref().trim();
        match text.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.problem(
                    value.span(),
                    path,
                    format!(
                        "expected an IPv4 or IPv6 address such as \"198.18.100.1\" or \"fd00::100\"; got {text:?}"
                    ),
                );
                None
            }
        }
    }

    fn abs_path(&mut self, value: Option<&Spanned<String>>, path: &str, default: &str) -> PathBuf {
        let Some(value) = value else {
            return default.into();
        };
        let given = Path::new(value.get_ref());
        if given.is_absolute() {
            given.to_owned()
        } else {
            self.problem(
                value.span(),
                path,
                format!(
                    "expected an absolute path such as {default:?}; got {:?}",
                    value.get_ref()
                ),
            );
            default.into()
        }
    }

    fn node(&mut self, raw: &Spanned<RawNode>) -> NodeConfig {
        let raw = raw.get_ref();
        let mut node = NodeConfig::default();

        let mut seen = HashSet::new();
        for (index, name) in raw.interfaces.get_ref().iter().enumerate() {
            let path = format!("node.interfaces[{index}]");
            let text = name.get_ref();
            let valid = !text.is_empty()
                && text.len() <= MAX_IFNAME_LEN
                && text != "."
                && text != ".."
                && !text
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace());
            if !valid {
                self.problem(
                    name.span(),
                    path,
                    format!(
                        "expected an interface name such as \"eth0\": 1 to {MAX_IFNAME_LEN} bytes, \
                         no '/', ':' or spaces; got {text:?}"
                    ),
                );
            } else if !seen.insert(text.clone()) {
                self.problem(
                    name.span(),
                    path,
                    format!("{text:?} is listed twice; list each interface once"),
                );
            } else {
                node.interfaces.push(text.clone());
            }
        }

        if let Some(mode) = &raw.attach_mode {
            node.attach_mode = match mode.get_ref() {
                RawAttachMode::Auto => AttachMode::Auto,
                RawAttachMode::Native => AttachMode::Native,
                RawAttachMode::Generic => AttachMode::Generic,
            };
        }
        node.hash_seed = self.u32_or(
            raw.hash_seed.as_ref(),
            "node.hash_seed",
            0,
            "a hash seed",
            DEFAULT_HASH_SEED,
        );

        if let Some(value) = &raw.source_v4 {
            match self.ip(value, "node.source_v4") {
                Some(IpAddr::V4(v4)) if usable(v4.into()) => node.source_v4 = Some(v4),
                Some(ip) => self.problem(
                    value.span(),
                    "node.source_v4",
                    format!(
                        "expected a unicast IPv4 address of this node such as \"198.18.0.1\"; got {ip}{}",
                        if ip.is_ipv6() { " (an IPv6 address belongs in source_v6)" } else { "" }
                    ),
                ),
                None => {}
            }
        }
        if let Some(value) = &raw.source_v6 {
            match self.ip(value, "node.source_v6") {
                Some(IpAddr::V6(v6)) if usable(v6.into()) => node.source_v6 = Some(v6),
                Some(ip) => self.problem(
                    value.span(),
                    "node.source_v6",
                    format!(
                        "expected a unicast IPv6 address of this node such as \"fd00::1\"; got {ip}{}",
                        if ip.is_ipv4() { " (an IPv4 address belongs in source_v4)" } else { "" }
                    ),
                ),
                None => {}
            }
        }
        if let Some(value) = &raw.gateway_mac {
            match parse_mac(value.get_ref()) {
                Ok(mac) => node.gateway_mac = Some(mac),
                Err(why) => self.problem(
                    value.span(),
                    "node.gateway_mac",
                    format!(
                        "expected a unicast MAC address such as \"02:00:5e:00:00:01\"; got {:?} ({why})",
                        value.get_ref()
                    ),
                ),
            }
        }

        node.api_socket = self.abs_path(
            raw.api_socket.as_ref(),
            "node.api_socket",
            DEFAULT_API_SOCKET,
        );
        node.state_file = self.abs_path(
            raw.state_file.as_ref(),
            "node.state_file",
            DEFAULT_STATE_FILE,
        );
        node.pin_path = self.abs_path(raw.pin_path.as_ref(), "node.pin_path", DEFAULT_PIN_PATH);

        if let Some(local) = &raw.local_cluster {
            self.note("node.local_cluster", local);
            match check_name(local.get_ref()) {
                Ok(()) => node.policy.local_cluster = Some(local.get_ref().clone()),
                Err(why) => self.problem(local.span(), "node.local_cluster", why),
            }
        }

        if let Some(level) = &raw.xdp_log {
            self.note("node.xdp_log", level);
            node.xdp_log = *level.get_ref();
        }

        if let Some(name) = &raw.name {
            self.note("node.name", name);
            match check_name(name.get_ref()) {
                Ok(()) => node.name = Some(name.get_ref().clone()),
                Err(why) => self.problem(name.span(), "node.name", why),
            }
        }
        if let Some(lease) = &raw.health_lease
            && let Some(secs) = self.int(
                lease,
                "node.health_lease",
                MIN_HEALTH_LEASE.into(),
                MAX_HEALTH_LEASE.into(),
                "a lease in seconds",
            )
        {
            node.health_lease = secs as u32;
        }

        if let Some(limits) = &raw.limits {
            let limits = limits.get_ref();
            let defaults = Limits::default();
            let mut limit = |value: &Option<Spanned<i64>>, field: &str, default: u32| {
                self.u32_or(
                    value.as_ref(),
                    &format!("node.limits.{field}"),
                    1,
                    "a limit",
                    default,
                )
            };
            node.limits = Limits {
                max_vips: limit(&limits.max_vips, "max_vips", defaults.max_vips),
                max_backends: limit(&limits.max_backends, "max_backends", defaults.max_backends),
                ring_capacity: limit(
                    &limits.ring_capacity,
                    "ring_capacity",
                    defaults.ring_capacity,
                ),
                conntrack_size: limit(
                    &limits.conntrack_size,
                    "conntrack_size",
                    defaults.conntrack_size,
                ),
            };
        }

        if let Some(policy) = &raw.policy {
            let policy = policy.get_ref();
            let fields = [
                ("overprovisioning", &policy.overprovisioning),
                ("panic_threshold", &policy.panic_threshold),
                (
                    "locality_overprovisioning",
                    &policy.locality_overprovisioning,
                ),
            ];
            for (field, value) in fields {
                let Some(value) = value else { continue };
                let mut options = node.policy.clone();
                let x = *value.get_ref();
                match field {
                    "overprovisioning" => options.overprovisioning = x,
                    "panic_threshold" => options.panic_threshold = x,
                    _ => options.locality_overprovisioning = x,
                }
                // The policy module owns the ranges.
                match options.validate() {
                    Ok(()) => node.policy = options,
                    Err(invalid) => self.problem(
                        value.span(),
                        format!("node.policy.{field}"),
                        format!("must be {}; got {x}", invalid.expected),
                    ),
                }
            }
        }
        node
    }

    fn metrics(&mut self, raw: Option<&Spanned<RawMetrics>>) -> MetricsConfig {
        let mut metrics = MetricsConfig::default();
        let Some(raw) = raw else {
            return metrics;
        };
        self.note("metrics", raw);
        let raw = raw.get_ref();
        if let Some(listen) = &raw.listen {
            self.note("metrics.listen", listen);
            match listen.get_ref().trim().parse::<SocketAddr>() {
                Ok(addr) => metrics.listen = Some(addr),
                Err(_) => self.problem(
                    listen.span(),
                    "metrics.listen",
                    format!(
                        "expected ADDR:PORT such as {:?} or \"[::1]:9730\"; got {:?}",
                        crate::metrics::DEFAULT_LISTEN,
                        listen.get_ref()
                    ),
                ),
            }
        }
        if raw.enabled.as_ref().is_some_and(|on| !*on.get_ref()) {
            metrics.listen = None;
        }
        metrics
    }

    fn vips(&mut self, raw: &RawVips) -> DesiredState {
        let mut state = DesiredState::default();
        for (name, vip) in raw {
            if let Some(vip) = self.vip(name, vip) {
                state.vips.insert(vip.name.clone(), vip);
            }
        }
        state
    }

    fn vip(&mut self, name: &Spanned<String>, raw: &Spanned<RawVip>) -> Option<Vip> {
        let vname = name.get_ref();
        let path = vip_path(vname);
        self.note(&path, name);
        let raw = raw.get_ref();
        let addr = self.ip(&raw.addr, &format!("{path}.addr"));
        let port = self.int(
            &raw.port,
            &format!("{path}.port"),
            0,
            u16::MAX.into(),
            "a port",
        );
        let mut vip = Vip::new(vname.clone(), addr?, port? as u16, Proto::Tcp);
        if let Some(proto) = &raw.proto {
            self.note(&format!("{path}.proto"), proto);
            vip.proto = match proto.get_ref() {
                RawProto::Tcp => Proto::Tcp,
                RawProto::Udp => Proto::Udp,
            };
        }
        if let Some(size) = &raw.ring_size {
            let rpath = format!("{path}.ring_size");
            self.note(&rpath, size);
            match u32::try_from(*size.get_ref()) {
                Ok(size) => vip.ring_size = size,
                Err(_) => self.problem(
                    size.span(),
                    rpath,
                    format!(
                        "expected a prime ring size such as {DEFAULT_RING_SIZE}, at most 4294967291; got {}",
                        size.get_ref()
                    ),
                ),
            }
        }
        if let Some(affinity) = &raw.affinity {
            vip.affinity = match affinity.get_ref() {
                RawAffinity::Flow => Affinity::Flow,
                RawAffinity::Client => Affinity::Client,
            };
        }
        let mut vip_probes = self.probes.vips.remove(vname).unwrap_or_default();
        vip_probes.probe = raw.probe.as_ref().map(|p| self.probe(p, &path));
        for (cname, craw) in &raw.cluster {
            let cpath = cluster_path(vname, cname.get_ref());
            self.note(&cpath, cname);
            let craw = craw.get_ref();
            let mut cluster = Cluster::new(
                cname.get_ref().clone(),
                self.u32_or(
                    craw.weight.as_ref(),
                    &format!("{cpath}.weight"),
                    0,
                    "a weight",
                    1,
                ),
                self.u32_or(
                    craw.priority.as_ref(),
                    &format!("{cpath}.priority"),
                    0,
                    "a priority",
                    0,
                ),
            );
            let mut cluster_probes = ClusterProbes {
                probe: craw.probe.as_ref().map(|p| self.probe(p, &cpath)),
                ..ClusterProbes::default()
            };
            for (bname, braw) in &craw.backend {
                let bpath = backend_path(vname, cname.get_ref(), bname.get_ref());
                self.note(&bpath, bname);
                let braw = braw.get_ref();
                if let Some(p) = &braw.probe {
                    let settings = self.probe(p, &bpath);
                    cluster_probes
                        .backends
                        .insert(bname.get_ref().clone(), settings);
                }
                let Some(addr) = self.ip(&braw.addr, &format!("{bpath}.addr")) else {
                    continue;
                };
                let weight = self.u32_or(
                    braw.weight.as_ref(),
                    &format!("{bpath}.weight"),
                    0,
                    "a weight",
                    1,
                );
                let mut backend = Backend::new(bname.get_ref().clone(), addr, weight);
                if let Some(admin) = &braw.state {
                    backend.admin = match admin.get_ref() {
                        RawAdmin::Enabled => AdminState::Enabled,
                        RawAdmin::Drained => AdminState::Drained,
                        RawAdmin::Disabled => AdminState::Disabled,
                    };
                }
                cluster.backends.insert(backend.name.clone(), backend);
            }
            if cluster_probes != ClusterProbes::default() {
                vip_probes
                    .clusters
                    .insert(cluster.name.clone(), cluster_probes);
            }
            vip.clusters.insert(cluster.name.clone(), cluster);
        }
        if vip_probes.probe.is_some() || !vip_probes.clusters.is_empty() {
            self.probes.vips.insert(vname.clone(), vip_probes);
        }
        Some(vip)
    }

    /// A `probe` table under `parent`: each field in its range.
    fn probe(&mut self, raw: &Spanned<RawProbe>, parent: &str) -> ProbeSettings {
        let path = format!("{parent}.probe");
        self.note(&path, raw);
        let raw = raw.get_ref();
        let mut out = ProbeSettings {
            kind: raw.kind.as_ref().map(|kind| {
                self.note(&format!("{path}.kind"), kind);
                match kind.get_ref() {
                    RawProbeKind::Tcp => KindName::Tcp,
                    RawProbeKind::Http => KindName::Http,
                    RawProbeKind::Udp => KindName::Udp,
                }
            }),
            via: raw.via.as_ref().map(|via| {
                self.note(&format!("{path}.via"), via);
                match via.get_ref() {
                    RawProbeVia::Backend => ProbeVia::Backend,
                    RawProbeVia::Vip => ProbeVia::Vip,
                }
            }),
            ..ProbeSettings::default()
        };
        if let Some(port) = &raw.port {
            out.port = self
                .int(port, &format!("{path}.port"), 1, u16::MAX.into(), "a port")
                .map(|n| n as u16);
        }
        for (field, value) in [("rise", &raw.rise), ("fall", &raw.fall)] {
            let Some(value) = value else { continue };
            let n = self
                .int(value, &format!("{path}.{field}"), 1, 1000, "a count")
                .map(|n| n as u32);
            match field {
                "rise" => out.rise = n,
                _ => out.fall = n,
            }
        }
        let fields = [
            ("interval", &raw.interval, 0.01, 3600.0),
            ("timeout", &raw.timeout, 0.01, 3600.0),
            ("flap_backoff", &raw.flap_backoff, 0.0, 86400.0),
        ];
        for (field, value, min, max) in fields {
            let Some(value) = value else { continue };
            let fpath = format!("{path}.{field}");
            self.note(&fpath, value);
            let secs = *value.get_ref();
            if !(min..=max).contains(&secs) {
                self.problem(
                    value.span(),
                    fpath,
                    format!("expected a number of seconds from {min} to {max}; got {secs}"),
                );
                continue;
            }
            let duration = Some(std::time::Duration::from_secs_f64(secs));
            match field {
                "interval" => out.interval = duration,
                "timeout" => out.timeout = duration,
                _ => out.flap_backoff = duration,
            }
        }
        if let Some(jitter) = &raw.jitter {
            let jpath = format!("{path}.jitter");
            self.note(&jpath, jitter);
            let x = *jitter.get_ref();
            if (0.0..=0.5).contains(&x) {
                out.jitter = Some(x);
            } else {
                self.problem(
                    jitter.span(),
                    jpath,
                    format!("expected a fraction of the interval from 0.0 to 0.5; got {x}"),
                );
            }
        }
        if let Some(status) = &raw.status {
            let spath = format!("{path}.status");
            self.note(&spath, status);
            let codes: Vec<u16> = status
                .get_ref()
                .iter()
                .enumerate()
                .filter_map(|(i, code)| {
                    self.int(
                        code,
                        &format!("{spath}[{i}]"),
                        100,
                        599,
                        "an HTTP status code",
                    )
                    .map(|n| n as u16)
                })
                .collect();
            if status.get_ref().is_empty() {
                self.problem(
                    status.span(),
                    spath,
                    "expected at least one HTTP status code such as [200]",
                );
            }
            out.status = Some(codes);
        }
        if let Some(p) = &raw.path {
            let ppath = format!("{path}.path");
            self.note(&ppath, p);
            let text = p.get_ref();
            if text.starts_with('/') && !text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                out.path = Some(text.clone());
            } else {
                self.problem(
                    p.span(),
                    ppath,
                    format!("expected an absolute HTTP path without spaces such as \"/health\"; got {text:?}"),
                );
            }
        }
        let texts = [
            ("host", &raw.host),
            ("body", &raw.body),
            ("payload", &raw.payload),
            ("expect", &raw.expect),
        ];
        for (field, value) in texts {
            let Some(value) = value else { continue };
            let fpath = format!("{path}.{field}");
            self.note(&fpath, value);
            let text = value.get_ref();
            let bad_header =
                field == "host" && text.chars().any(|c| c.is_whitespace() || c.is_control());
            if text.is_empty() || bad_header {
                self.problem(
                    value.span(),
                    fpath,
                    format!(
                        "expected a non-empty string{}; got {text:?}",
                        if field == "host" {
                            " without spaces"
                        } else {
                            ""
                        }
                    ),
                );
                continue;
            }
            let text = Some(text.clone());
            match field {
                "host" => out.host = text,
                "body" => out.body = text,
                "payload" => out.payload = text,
                _ => out.expect = text,
            }
        }
        out
    }

    /// The earliest conversion problem, if any.
    fn finish(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        match self.problems.iter().min_by_key(|p| p.span.start) {
            Some(first) => Err(located_error(text, origin, first)),
            None => Ok(()),
        }
    }

    /// The model's problems placed in the file; the earliest is reported.
    fn locate(&self, text: &str, origin: &str, problems: Vec<Problem>) -> Result<(), ConfigError> {
        let located = problems.into_iter().map(|problem| {
            // The field itself, else the nearest table that was written.
            let mut at = problem.path.as_str();
            let span = loop {
                if let Some(span) = self.spans.get(at) {
                    break span.clone();
                }
                match at.rfind('.') {
                    Some(dot) => at = &at[..dot],
                    None => break 0..0,
                }
            };
            Located {
                span,
                path: problem.path,
                message: problem.message,
            }
        });
        match located.min_by_key(|p| p.span.start) {
            Some(first) => Err(located_error(text, origin, &first)),
            None => Ok(()),
        }
    }
}

fn located_error(text: &str, origin: &str, problem: &Located) -> ConfigError {
    let (line, column) = line_column(text, problem.span.start);
    ConfigError {
        file: origin.to_owned(),
        line,
        column,
        path: problem.path.clone(),
        message: problem.message.clone(),
    }
}

fn parse_mac(text: &str) -> Result<[u8; 6], &'static str> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err("six hexadecimal octets separated by ':'");
    }
    let mut mac = [0u8; 6];
    for (octet, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return Err("each octet is two hexadecimal digits");
        }
        *octet =
            u8::from_str_radix(part, 16).map_err(|_| "each octet is two hexadecimal digits")?;
    }
    if mac == [0; 6] {
        return Err("all zeros is no address");
    }
    if mac[0] & 1 != 0 {
        return Err("a multicast address cannot be a next hop");
    }
    Ok(mac)
}

/// An address a packet can be sent to or received at, one host's.
fn usable(ip: IpAddr) -> bool {
    !ip.is_unspecified()
        && !ip.is_multicast()
        && match ip {
            IpAddr::V4(v4) => !v4.is_broadcast(),
            IpAddr::V6(_) => true,
        }
}

/// Whether `name` may name a VIP, a cluster, a backend or a node.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = (1..=MAX_NAME_LEN).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "expected a name of 1 to {MAX_NAME_LEN} letters, digits, '.', '_' or '-', \
             starting with a letter or digit, such as \"web\"; got {name:?}"
        ))
    }
}

// ---------------------------------------------------------------------------
// The model's own rules, for every source of desired state.

/// Probe settings that are valid field by field but not merged: a field
/// of the wrong kind, no port for a port-0 VIP, a timeout beyond the
/// interval. Reported at the deepest level that has a `probe` table.
fn probe_problems(probes: &ProbeConfig, state: &DesiredState) -> Vec<Problem> {
    let mut problems: Vec<Problem> = probes
        .problems(state)
        .into_iter()
        .map(|p| {
            let at = match (&p.cluster, &p.backend) {
                (Some(c), Some(b)) => backend_path(&p.vip, c, b),
                (Some(c), None) => cluster_path(&p.vip, c),
                _ => vip_path(&p.vip),
            };
            Problem {
                path: format!("{at}.probe.{}", p.field),
                message: p.message,
            }
        })
        .collect();
    problems.dedup();
    problems
}

fn problems(node: &NodeConfig, state: &DesiredState) -> Vec<Problem> {
    let mut found = Vec::new();
    let mut push = |path: String, message: String| found.push(Problem { path, message });
    let limits = node.limits;
    let mut vip_keys: HashMap<(IpAddr, u16, Proto), &str> = HashMap::new();
    let mut backends_seen: u64 = 0;
    let mut ring_slots: u64 = 0;
    let (mut need_v4, mut need_v6) = (node.source_v4.is_none(), node.source_v6.is_none());

    for (count, (key, vip)) in state.vips.iter().enumerate() {
        let path = vip_path(key);
        if let Err(why) = check_name(key) {
            push(path.clone(), why);
        }
        if vip.name != *key {
            push(
                path.clone(),
                format!(
                    "holds a VIP named {:?}; the key and the name must agree",
                    vip.name
                ),
            );
        }
        if count as u64 == u64::from(limits.max_vips) {
            push(
                path.clone(),
                format!(
                    "one VIP more than node.limits.max_vips = {} allows; raise the limit or remove VIPs",
                    limits.max_vips
                ),
            );
        }
        if !usable(vip.addr) {
            push(
                format!("{path}.addr"),
                format!(
                    "expected a unicast address such as \"198.18.100.1\"; got {}",
                    vip.addr
                ),
            );
        }
        if let Some(other) = vip_keys.insert((vip.addr, vip.port, vip.proto), key) {
            push(
                format!("{path}.addr"),
                format!(
                    "{} port {} {} is already served by vip.{other:?}; each (addr, port, proto) belongs to one VIP",
                    vip.addr, vip.port, vip.proto
                ),
            );
        }

        let backend_count = vip.backends().count();
        let ring = u64::from(vip.ring_size);
        if let Err(err) = maglev::check_size(vip.ring_size, backend_count) {
            push(format!("{path}.ring_size"), ring_size_message(&err));
        }
        ring_slots += ring;
        if ring_slots > u64::from(limits.ring_capacity) {
            push(
                format!("{path}.ring_size"),
                format!(
                    "the rings of the VIPs up to this one take {ring_slots} slots, more than \
                     node.limits.ring_capacity = {}; raise the limit or use smaller rings",
                    limits.ring_capacity
                ),
            );
            // Reported once: the sum only grows.
            ring_slots = 0;
        }

        let mut addrs: HashMap<IpAddr, String> = HashMap::new();
        for (ckey, cluster) in &vip.clusters {
            let cpath = cluster_path(key, ckey);
            if let Err(why) = check_name(ckey) {
                push(cpath.clone(), why);
            }
            if cluster.name != *ckey {
                push(
                    cpath.clone(),
                    format!(
                        "holds a cluster named {:?}; the key and the name must agree",
                        cluster.name
                    ),
                );
            }
            for (bkey, backend) in &cluster.backends {
                let bpath = backend_path(key, ckey, bkey);
                if let Err(why) = check_name(bkey) {
                    push(bpath.clone(), why);
                }
                if backend.name != *bkey {
                    push(
                        bpath.clone(),
                        format!(
                            "holds a backend named {:?}; the key and the name must agree",
                            backend.name
                        ),
                    );
                }
                let apath = format!("{bpath}.addr");
                if !usable(backend.addr) {
                    push(
                        apath.clone(),
                        format!(
                            "expected a unicast address such as \"198.18.1.10\"; got {}",
                            backend.addr
                        ),
                    );
                }
                if backend.addr == vip.addr {
                    push(
                        apath.clone(),
                        format!(
                            "{} is the VIP's own address; a backend needs an address of its own",
                            backend.addr
                        ),
                    );
                }
                if let Some(other) = addrs.insert(backend.addr, bpath.clone()) {
                    push(
                        apath.clone(),
                        format!(
                            "{} is already the address of {other}; a VIP's backends need distinct addresses",
                            backend.addr
                        ),
                    );
                }
                backends_seen += 1;
                if backends_seen == u64::from(limits.max_backends) + 1 {
                    push(
                        apath.clone(),
                        format!(
                            "one backend more than node.limits.max_backends = {} allows (backends \
                             count per VIP); raise the limit or remove backends",
                            limits.max_backends
                        ),
                    );
                }
                match backend.addr {
                    IpAddr::V4(_) if need_v4 => {
                        need_v4 = false;
                        push(
                            apath,
                            format!(
                                "{} is an IPv4 backend, and IPv4 encapsulation needs node.source_v4: \
                                 set it to an IPv4 address of this node such as \"198.18.0.1\"",
                                backend.addr
                            ),
                        );
                    }
                    IpAddr::V6(_) if need_v6 => {
                        need_v6 = false;
                        push(
                            apath,
                            format!(
                                "{} is an IPv6 backend, and IPv6 encapsulation needs node.source_v6: \
                                 set it to an IPv6 address of this node such as \"fd00::1\"",
                                backend.addr
                            ),
                        );
                    }
                    _ => {}
                }
            }
        }
    }
    found
}

/// Why a ring size is refused and which sizes would do, in the file's terms.
fn ring_size_message(err: &MaglevError) -> String {
    match *err {
        MaglevError::NotPrime { size, minimum } => {
            let floor = u32::try_from(minimum.max(size.into())).unwrap_or(u32::MAX);
            let mut message = match maglev::smallest_prime_at_least(floor) {
                Some(prime) => format!("{size} is not prime; use a prime such as {prime}"),
                None => format!("{size} is not prime, and no 32-bit prime is at least {floor}"),
            };
            let below = (2..size).rev().find(|&n| maglev::is_prime(n));
            let above = maglev::smallest_prime_at_least(size);
            if let (Some(below), Some(above)) = (below, above) {
                message.push_str(&format!(" (the nearest primes are {below} and {above})"));
            }
            message.push_str(&format!(
                "; allowed: a prime of at least {minimum} ({} slots per backend, and at least {}); \
                 the default is {DEFAULT_RING_SIZE}",
                maglev::SLOTS_PER_BACKEND,
                maglev::MIN_SIZE
            ));
            message
        }
        MaglevError::TooSmall {
            size,
            backends,
            minimum,
            ..
        } => format!(
            "{size} slots are too few for the VIP's {backends} backends: Maglev needs {} slots per \
             backend for shares within 1% of their weights (and at least {}); use a prime of at \
             least {minimum} such as {}",
            maglev::SLOTS_PER_BACKEND,
            maglev::MIN_SIZE,
            maglev::smallest_size_for(backends)
        ),
        ref other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{
        DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_RING_CAPACITY,
        ip_from_addr,
    };

    use super::*;
    use crate::health::ProbeKind;
    use crate::policy::{DEFAULT_OVERPROVISIONING, DEFAULT_PANIC_THRESHOLD};

    const EXAMPLE: &str = include_str!("../xlb.example.toml");

    /// A node that can carry backends of both families.
    const NODE: &str =
        "[node]\ninterfaces = [\"eth0\"]\nsource_v4 = \"198.18.0.1\"\nsource_v6 = \"fd00::1\"\n";

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn metrics_and_xdp_log_are_read_and_checked() {
        let config = parse("[node]\ninterfaces = []\n", "x.toml").unwrap();
        assert_eq!(
            config.metrics.listen,
            Some("127.0.0.1:9730".parse().unwrap()),
            "loopback by default"
        );
        assert_eq!(config.node.xdp_log, XdpLog::Off, "off by default");
        let config = parse(
            "[node]\ninterfaces = []\nxdp_log = \"debug\"\n[metrics]\nlisten = \"[::]:9100\"\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(config.metrics.listen, Some("[::]:9100".parse().unwrap()));
        assert_eq!(config.node.xdp_log, XdpLog::Debug);
        let off = parse(
            "[node]\ninterfaces = []\n[metrics]\nenabled = false\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(off.metrics.listen, None);

        let err = parse(
            "[node]\ninterfaces = []\n[metrics]\nlisten = \"9100\"\n",
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(
            (err.line, err.column, err.path.as_str()),
            (4, 10, "metrics.listen")
        );
        assert!(err.message.contains("expected ADDR:PORT"), "{err}");
        let err = parse("[node]\ninterfaces = []\nxdp_log = \"loud\"\n", "x.toml").unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(
            err.to_string().contains("debug"),
            "names the valid levels: {err}"
        );
    }

    #[test]
    fn a_node_name_and_health_lease_are_read_and_checked() {
        let config = parse("[node]\ninterfaces = []\n", "x.toml").unwrap();
        assert_eq!(
            config.node.name, None,
            "the host name, when a fleet needs it"
        );
        assert_eq!(config.node.health_lease, DEFAULT_HEALTH_LEASE);
        let config = parse(
            "[node]\ninterfaces = []\nname = \"lb-1.east\"\nhealth_lease = 3\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(config.node.name.as_deref(), Some("lb-1.east"));
        assert_eq!(config.node.health_lease, 3);

        let err = parse("[node]\ninterfaces = []\nname = \"lb 1\"\n", "x.toml").unwrap_err();
        assert_eq!((err.line, err.path.as_str()), (3, "node.name"), "{err}");
        assert!(err.message.contains("letters, digits"), "{err}");
        let err = parse("[node]\ninterfaces = []\nhealth_lease = 1\n", "x.toml").unwrap_err();
        assert_eq!(
            (err.line, err.path.as_str()),
            (3, "node.health_lease"),
            "{err}"
        );
        assert!(err.message.contains("from 2 to 3600"), "{err}");
    }

    #[test]
    fn the_example_parses_with_every_field() {
        let config = parse(EXAMPLE, "xlb.example.toml").unwrap_or_else(|err| panic!("{err}"));
        let node = &config.node;
        assert_eq!(node.interfaces, ["eth0"]);
        assert_eq!(node.attach_mode, AttachMode::Auto);
        assert_eq!(node.hash_seed, DEFAULT_HASH_SEED);
        assert_eq!(node.source_v4, Some("198.18.0.1".parse().unwrap()));
        assert_eq!(node.source_v6, Some("fd00::1".parse().unwrap()));
        assert_eq!(node.gateway_mac, Some([0x02, 0, 0x5e, 0, 0, 1]));
        assert_eq!(node.api_socket, Path::new(DEFAULT_API_SOCKET));
        assert_eq!(node.state_file, Path::new(DEFAULT_STATE_FILE));
        assert_eq!(node.pin_path, Path::new(DEFAULT_PIN_PATH));
        assert_eq!(node.limits, Limits::default());
        assert_eq!(node.policy.local_cluster.as_deref(), Some("east"));
        assert_eq!(node.policy.overprovisioning, 1.4);
        assert_eq!(node.xdp_log, XdpLog::Off);
        assert_eq!(config.metrics, MetricsConfig::default());

        let web = &config.state.vips["web"];
        assert_eq!(
            (web.addr, web.port, web.proto),
            (ip("198.18.100.1"), 80, Proto::Tcp)
        );
        assert_eq!(web.ring_size, 65537);
        assert_eq!(web.affinity, Affinity::Flow);
        let east = &web.clusters["east"];
        assert_eq!((east.weight, east.priority), (2, 0));
        assert_eq!(
            east.backends["e2"],
            Backend::new("e2", ip("198.18.1.11"), 1)
        );
        let west = &web.clusters["west"];
        assert_eq!((west.weight, west.priority), (1, 0));
        assert_eq!(west.backends["w2"].weight, 2);
        assert_eq!(west.backends["w3"].admin, AdminState::Drained);
        assert_eq!(west.backends["w3"].addr, ip("fd00:2::12"));
        assert_eq!(web.clusters["standby"].priority, 1);

        let dns = &config.state.vips["dns"];
        assert_eq!((dns.port, dns.proto, dns.ring_size), (53, Proto::Udp, 4099));
        assert_eq!(dns.affinity, Affinity::Client);
        assert_eq!(dns.backends().count(), 3);

        let (targets, problems) = config.probes.targets(&config.state, |_, _| Some(7));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(targets.len(), 9, "every backend is probed");
        let target = |v: &str, c: &str, b: &str| {
            let key = (v.to_owned(), c.to_owned(), b.to_owned());
            targets[&key].spec.clone()
        };
        let e1 = target("web", "east", "e1");
        assert_eq!(
            (e1.port, e1.rise, e1.fall, e1.jitter_permille),
            (8080, 2, 3, 100)
        );
        assert!(matches!(&e1.kind, ProbeKind::Http { statuses, body, .. }
            if statuses == &[200, 204] && body.as_deref() == Some("ok")));
        assert_eq!(e1.via, ProbeVia::Backend);
        let s1 = target("web", "standby", "s1");
        assert_eq!((s1.port, s1.fall, s1.kind.name()), (8081, 2, "http"));
        assert_eq!(s1.via, ProbeVia::Vip);
        let s1 = &targets[&("web".into(), "standby".into(), "s1".into())];
        assert_eq!(s1.socket(), "198.18.100.1:8081".parse().unwrap());
        assert_eq!(s1.mark(), Some(lb_common::probe_mark(7)));
        let d1 = target("dns", "east", "d1");
        assert_eq!((d1.kind.name(), d1.port), ("udp", 53));
    }

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let text = "[node]\ninterfaces = []\nsource_v4 = \"198.18.0.1\"\n\
                    [vip.web]\naddr = \"198.18.100.1\"\nport = 0\n\
                    [vip.web.cluster.c]\nbackend.b = { addr = \"198.18.1.1\" }\n";
        let config = parse(text, "t.toml").unwrap_or_else(|err| panic!("{err}"));
        let expected_node = NodeConfig {
            source_v4: Some("198.18.0.1".parse().unwrap()),
            ..NodeConfig::default()
        };
        assert_eq!(config.node, expected_node);
        assert!(config.node.interfaces.is_empty());
        assert_eq!(config.node.attach_mode, AttachMode::Auto);
        assert_eq!(config.node.hash_seed, 0x786c_6221);
        assert_eq!(config.node.api_socket, Path::new("/run/xlb/xlb.sock"));
        assert_eq!(config.node.state_file, Path::new("/var/lib/xlb/state.toml"));
        assert_eq!(config.node.pin_path, Path::new("/sys/fs/bpf/xlb"));
        assert_eq!(
            config.node.policy.overprovisioning,
            DEFAULT_OVERPROVISIONING
        );
        assert_eq!(config.node.policy.panic_threshold, DEFAULT_PANIC_THRESHOLD);
        assert_eq!(config.node.policy.local_cluster, None);
        assert_eq!(
            config.node.limits,
            Limits {
                max_vips: DEFAULT_MAX_VIPS,
                max_backends: DEFAULT_MAX_BACKENDS,
                ring_capacity: DEFAULT_RING_CAPACITY,
                conntrack_size: DEFAULT_CONNTRACK_SIZE,
            }
        );

        let mut vip = Vip::new("web", ip("198.18.100.1"), 0, Proto::Tcp);
        let mut cluster = Cluster::new("c", 1, 0);
        cluster
            .backends
            .insert("b".into(), Backend::new("b", ip("198.18.1.1"), 1));
        vip.clusters.insert("c".into(), cluster);
        assert_eq!(config.state.vips["web"], vip);
        assert_eq!(vip.ring_size, DEFAULT_RING_SIZE);
        assert_eq!(vip.affinity, Affinity::Flow);
        assert_eq!(vip.clusters["c"].backends["b"].admin, AdminState::Enabled);
    }

    #[test]
    fn partial_tables_keep_the_other_defaults() {
        let text = format!(
            "{NODE}[node.limits]\nmax_vips = 8\n[node.policy]\npanic_threshold = 0\n\
             locality_overprovisioning = 2\n"
        );
        let node = parse(&text, "t.toml").unwrap().node;
        assert_eq!(
            node.limits,
            Limits {
                max_vips: 8,
                ..Limits::default()
            }
        );
        assert_eq!(node.policy.panic_threshold, 0.0);
        assert_eq!(node.policy.locality_overprovisioning, 2.0);
        assert_eq!(node.policy.overprovisioning, DEFAULT_OVERPROVISIONING);
    }

    /// Bad files: `@@` marks where the error must point (it is removed
    /// before parsing), then the field path and fragments of the message.
    const BAD: &[(&str, &str, &[&str])] = &[
        // TOML syntax.
        (
            "[node]\ninterfaces = [\"eth0\"]\n[vip.web@@\naddr = \"198.18.100.1\"\n",
            "",
            &["expected"],
        ),
        (
            "[node]\ninterfaces = [\"eth0\"]\nhash_seed = @@\n",
            "node.hash_seed",
            &[""],
        ),
        // The file's structure.
        (
            "[@@nodes]\ninterfaces = []\n",
            "nodes",
            &["unknown field `nodes`", "`node`", "`vip`"],
        ),
        (
            "vip = @@1\n[node]\ninterfaces = []\n",
            "vip",
            &["expected a table", "[vip.NAME]"],
        ),
        (
            "@@# empty\n",
            "node",
            &["missing field `node`", "interfaces = [\"eth0\"]"],
        ),
        (
            "@@[node]\nattach_mode = \"auto\"\n",
            "node.interfaces",
            &["missing field `interfaces`", "[\"eth0\"]"],
        ),
        (
            "[node]\ninterfaces = []\n@@[[vip]]\naddr = \"198.18.100.1\"\n",
            "vip[0]",
            &["expected a table", "[vip.NAME] (not [[vip]])"],
        ),
        // [node]
        (
            "[node]\ninterfaces = [\"eth0\"]\n@@bogus = 1\n",
            "node.bogus",
            &[
                "unknown field `bogus`",
                "`interfaces`",
                "`attach_mode`",
                "`policy`",
            ],
        ),
        (
            "[node]\ninterfaces = @@\"eth0\"\n",
            "node.interfaces",
            &["expected an array", "[\"eth0\"]"],
        ),
        (
            "[node]\ninterfaces = [\"eth0\", @@7]\n",
            "node.interfaces[1]",
            &["expected a string"],
        ),
        (
            "[node]\ninterfaces = [\"eth0\", @@\"eth0/1\"]\n",
            "node.interfaces[1]",
            &["interface name such as \"eth0\"", "\"eth0/1\""],
        ),
        (
            "[node]\ninterfaces = [@@\"a-very-long-interface\"]\n",
            "node.interfaces[0]",
            &["1 to 15 bytes"],
        ),
        (
            "[node]\ninterfaces = [\"eth0\", @@\"eth0\"]\n",
            "node.interfaces[1]",
            &["listed twice"],
        ),
        (
            "[node]\ninterfaces = []\nattach_mode = @@\"fast\"\n",
            "node.attach_mode",
            &["unknown variant `fast`", "`auto`", "`native`", "`generic`"],
        ),
        (
            "[node]\ninterfaces = []\nhash_seed = @@-1\n",
            "node.hash_seed",
            &["from 0 to 4294967295", "got -1"],
        ),
        (
            "[node]\ninterfaces = []\nhash_seed = @@0x100000000\n",
            "node.hash_seed",
            &["from 0 to 4294967295", "got 4294967296"],
        ),
        (
            "[node]\ninterfaces = []\nhash_seed = @@\"x\"\n",
            "node.hash_seed",
            &["expected an integer", "from 0 to 4294967295"],
        ),
        (
            "[node]\ninterfaces = []\nhash_seed = @@99999999999999999999\n",
            "node.hash_seed",
            &["out of range", "from 0 to 4294967295"],
        ),
        (
            "[node]\ninterfaces = []\nsource_v4 = @@\"fd00::1\"\n",
            "node.source_v4",
            &["IPv4 address", "belongs in source_v6"],
        ),
        (
            "[node]\ninterfaces = []\nsource_v4 = @@\"198.18.0\"\n",
            "node.source_v4",
            &["expected an IPv4 or IPv6 address", "\"198.18.0\""],
        ),
        (
            "[node]\ninterfaces = []\nsource_v4 = @@\"0.0.0.0\"\n",
            "node.source_v4",
            &["unicast IPv4 address"],
        ),
        (
            "[node]\ninterfaces = []\nsource_v6 = @@\"198.18.0.1\"\n",
            "node.source_v6",
            &["IPv6 address", "belongs in source_v4"],
        ),
        (
            "[node]\ninterfaces = []\ngateway_mac = @@\"02:00:00:00:00\"\n",
            "node.gateway_mac",
            &["such as \"02:00:5e:00:00:01\"", "six hexadecimal octets"],
        ),
        (
            "[node]\ninterfaces = []\ngateway_mac = @@\"01:00:5e:00:00:01\"\n",
            "node.gateway_mac",
            &["multicast"],
        ),
        (
            "[node]\ninterfaces = []\napi_socket = @@\"xlb.sock\"\n",
            "node.api_socket",
            &[
                "absolute path such as \"/run/xlb/xlb.sock\"",
                "\"xlb.sock\"",
            ],
        ),
        (
            "[node]\ninterfaces = []\nstate_file = @@\"state.toml\"\n",
            "node.state_file",
            &["absolute path"],
        ),
        (
            "[node]\ninterfaces = []\npin_path = @@\"\"\n",
            "node.pin_path",
            &["absolute path such as \"/sys/fs/bpf/xlb\""],
        ),
        (
            "[node]\ninterfaces = []\nsource_v4 = \"198.18.0.1\"\nlocal_cluster = @@\"nrth\"\n\
             [vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.north]\nbackend.b = { addr = \"198.18.1.1\" }\n",
            "node.local_cluster",
            &["\"nrth\" names no cluster", "the clusters are north"],
        ),
        (
            "[node]\ninterfaces = []\nlocal_cluster = @@\"no spaces\"\n",
            "node.local_cluster",
            &["expected a name", "\"no spaces\""],
        ),
        (
            "[node]\ninterfaces = []\n[node.limits]\nmax_vips = @@0\n",
            "node.limits.max_vips",
            &["from 1 to 4294967295", "got 0"],
        ),
        (
            "[node]\ninterfaces = []\n[node.limits]\n@@max_flows = 1\n",
            "node.limits.max_flows",
            &["unknown field `max_flows`", "`conntrack_size`"],
        ),
        (
            "[node]\ninterfaces = []\n[node.policy]\noverprovisioning = @@0.9\n",
            "node.policy.overprovisioning",
            &["≥ 1", "got 0.9"],
        ),
        (
            "[node]\ninterfaces = []\n[node.policy]\npanic_threshold = @@1.5\n",
            "node.policy.panic_threshold",
            &["must be between 0", "and 1", "got 1.5"],
        ),
        (
            "[node]\ninterfaces = []\n[node.policy]\nlocality_overprovisioning = @@0\n",
            "node.policy.locality_overprovisioning",
            &["≥ 1", "got 0"],
        ),
        // [vip.NAME]
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n@@adr = \"x\"\n",
            "vip.\"web\".adr",
            &["unknown field `adr`", "`addr`", "`ring_size`", "`cluster`"],
        ),
        (
            "NODE@@[vip.web]\nport = 80\n",
            "vip.\"web\".addr",
            &["missing field `addr`", "such as \"198.18.100.1\""],
        ),
        (
            "NODE@@[vip.web]\naddr = \"198.18.100.1\"\n",
            "vip.\"web\".port",
            &["missing field `port`", "0: every port"],
        ),
        (
            "NODE[vip.web]\naddr = @@\"198.18.100.300\"\nport = 80\n",
            "vip.\"web\".addr",
            &["expected an IPv4 or IPv6 address", "\"198.18.100.300\""],
        ),
        (
            "NODE[vip.web]\naddr = @@\"255.255.255.255\"\nport = 80\n",
            "vip.\"web\".addr",
            &["unicast address"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = @@70000\n",
            "vip.\"web\".port",
            &["expected a port from 0 to 65535", "got 70000"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = @@\"80\"\n",
            "vip.\"web\".port",
            &["expected an integer", "0: every port"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\nproto = @@\"sctp\"\n",
            "vip.\"web\".proto",
            &["unknown variant `sctp`", "`tcp`", "`udp`"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\nring_size = @@65536\n",
            "vip.\"web\".ring_size",
            &[
                "65536 is not prime; use a prime such as 65537",
                "the nearest primes are 65521 and 65537",
            ],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\nring_size = @@101\n\
             [vip.web.cluster.c]\nbackend.a = { addr = \"198.18.1.1\" }\n\
             backend.b = { addr = \"198.18.1.2\" }\n",
            "vip.\"web\".ring_size",
            &[
                "101 slots are too few for the VIP's 2 backends",
                "at least 200 such as 65537",
            ],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\nring_size = @@-5\n",
            "vip.\"web\".ring_size",
            &["expected a prime ring size such as 65537", "got -5"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\naffinity = @@\"sticky\"\n",
            "vip.\"web\".affinity",
            &["unknown variant `sticky`", "`flow`", "`client`"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.@@web]\naddr = \"198.18.100.2\"\nport = 80\n",
            "vip.\"web\"",
            &["duplicate key", "name is already used"],
        ),
        (
            "NODE[vip.@@\"we b\"]\naddr = \"198.18.100.1\"\nport = 80\n",
            "vip.\"we b\"",
            &["expected a name of 1 to 63 letters", "\"we b\""],
        ),
        (
            "NODE[vip.a]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.b]\naddr = @@\"198.18.100.1\"\nport = 80\n",
            "vip.\"b\".addr",
            &["198.18.100.1 port 80 tcp is already served by vip.\"a\""],
        ),
        (
            "NODE[node.limits]\nmax_vips = 1\n[vip.a]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.@@b]\naddr = \"198.18.100.2\"\nport = 80\n",
            "vip.\"b\"",
            &["node.limits.max_vips = 1", "raise the limit"],
        ),
        (
            "NODE[node.limits]\nring_capacity = 100000\n\
             [vip.a]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.@@b]\naddr = \"198.18.100.2\"\nport = 80\n",
            "vip.\"b\".ring_size",
            &["131074 slots", "node.limits.ring_capacity = 100000"],
        ),
        // Clusters and backends.
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\n@@wieght = 2\n",
            "vip.\"web\".cluster.\"east\".wieght",
            &[
                "unknown field `wieght`",
                "`weight`",
                "`priority`",
                "`backend`",
            ],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nweight = @@-1\n",
            "vip.\"web\".cluster.\"east\".weight",
            &["expected a weight from 0 to 4294967295", "got -1"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\npriority = @@1.5\n",
            "vip.\"web\".cluster.\"east\".priority",
            &["expected an integer", "served first"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.b1 = @@{ weight = 2 }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b1\".addr",
            &["missing field `addr`"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east.backend.b1]\naddr = @@\"backend-1\"\n",
            "vip.\"web\".cluster.\"east\".backend.\"b1\".addr",
            &["expected an IPv4 or IPv6 address", "\"backend-1\""],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.b1 = { addr = \"198.18.1.1\", weight = @@4294967296 }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b1\".weight",
            &["from 0 to 4294967295", "got 4294967296"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.b1 = { addr = \"198.18.1.1\", state = @@\"down\" }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b1\".state",
            &[
                "unknown variant `down`",
                "`enabled`",
                "`drained`",
                "`disabled`",
            ],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.b1 = { addr = \"198.18.1.1\", probe = { rise = @@0 } }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b1\".probe.rise",
            &["expected a count from 1 to 1000; got 0"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n[vip.web.probe]\n@@intervall = 2\n",
            "vip.\"web\".probe.intervall",
            &["unknown field `intervall`", "`interval`", "`flap_backoff`"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\nprobe = { kind = @@\"icmp\" }\n",
            "vip.\"web\".probe.kind",
            &["unknown variant `icmp`", "`tcp`", "`http`", "`udp`"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n[vip.web.probe]\nvia = @@\"client\"\n",
            "vip.\"web\".probe.via",
            &["unknown variant `client`", "`backend`", "`vip`"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.b1 = { addr = \"198.18.1.1\", probe = { via = @@1 } }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b1\".probe.via",
            &["\"backend\" (the default", "or \"vip\""],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n[vip.web.probe]\ninterval = @@0\n",
            "vip.\"web\".probe.interval",
            &["expected a number of seconds from 0.01 to 3600; got 0"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n[vip.web.probe]\nkind = \"http\"\nstatus = [200, @@99]\n",
            "vip.\"web\".probe.status[1]",
            &["expected an HTTP status code from 100 to 599; got 99"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n[vip.web.probe]\npath = @@\"/health\"\n",
            "vip.\"web\".probe.path",
            &[
                "does not apply to kind = \"tcp\"",
                "path, host, status and body are for \"http\"",
            ],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n[vip.web.probe]\ninterval = 1\ntimeout = @@2\n",
            "vip.\"web\".probe.timeout",
            &["2 s is longer than the interval (1 s)"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nprobe = { kind = \"udp\", payload = \"hi\" }\n\
             backend.b1 = { addr = \"198.18.1.1\", probe = { kind = \"tcp\", jitter = @@0.9 } }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b1\".probe.jitter",
            &["expected a fraction of the interval from 0.0 to 0.5; got 0.9"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.b1 = { addr = \"198.18.1.1\" }\n\
             [vip.web.cluster.west]\nbackend.b2 = { addr = @@\"198.18.1.1\" }\n",
            "vip.\"web\".cluster.\"west\".backend.\"b2\".addr",
            &["198.18.1.1 is already the address of vip.\"web\".cluster.\"east\".backend.\"b1\""],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.b1 = { addr = @@\"198.18.100.1\" }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b1\".addr",
            &["the VIP's own address"],
        ),
        (
            "NODE[vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.@@\"b 1\" = { addr = \"198.18.1.1\" }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b 1\"",
            &["expected a name"],
        ),
        (
            "[node]\ninterfaces = []\nsource_v6 = \"fd00::1\"\n\
             [vip.web]\naddr = \"fd00:100::1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.b6 = { addr = \"fd00:1::1\" }\n\
             backend.b4 = { addr = @@\"198.18.1.1\" }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b4\".addr",
            &[
                "IPv4 backend",
                "needs node.source_v4",
                "such as \"198.18.0.1\"",
            ],
        ),
        (
            "[node]\ninterfaces = []\nsource_v4 = \"198.18.0.1\"\n\
             [vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.b6 = { addr = @@\"fd00:1::1\" }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b6\".addr",
            &[
                "IPv6 backend",
                "needs node.source_v6",
                "such as \"fd00::1\"",
            ],
        ),
        (
            "NODE[node.limits]\nmax_backends = 1\n\
             [vip.web]\naddr = \"198.18.100.1\"\nport = 80\n\
             [vip.web.cluster.east]\nbackend.b1 = { addr = \"198.18.1.1\" }\n\
             backend.b2 = { addr = @@\"198.18.1.2\" }\n",
            "vip.\"web\".cluster.\"east\".backend.\"b2\".addr",
            &["node.limits.max_backends = 1"],
        ),
    ];

    #[test]
    fn every_error_names_the_line_the_field_and_what_is_valid() {
        let mut failures = Vec::new();
        for (marked, path, fragments) in BAD {
            let marked = marked.replace("NODE", NODE);
            let at = marked.find("@@").expect("every case marks its spot");
            let text = marked.replacen("@@", "", 1);
            let (line, column) = line_column(&text, at);
            let err = match parse(&text, "test.toml") {
                Ok(_) => {
                    failures.push(format!("accepted:\n{text}"));
                    continue;
                }
                Err(err) => err,
            };
            let shown = err.to_string();
            let mut wrong = Vec::new();
            if (err.line, err.column) != (line, column) {
                wrong.push(format!(
                    "at {}:{}, expected {line}:{column}",
                    err.line, err.column
                ));
            }
            if err.path != *path {
                wrong.push(format!("path {:?}, expected {path:?}", err.path));
            }
            for fragment in *fragments {
                if !err.message.contains(fragment) {
                    wrong.push(format!("message lacks {fragment:?}"));
                }
            }
            let prefix = if path.is_empty() {
                format!("test.toml:{line}:{column}: ")
            } else {
                format!("test.toml:{line}:{column}: {path}: ")
            };
            if !shown.starts_with(&prefix) {
                wrong.push(format!("display does not start with {prefix:?}"));
            }
            if !wrong.is_empty() {
                failures.push(format!(
                    "{}\n  got: {shown}\n  file:\n{text}",
                    wrong.join("; ")
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} case(s) failed:\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }

    #[test]
    fn the_display_reads_file_line_column_field_message() {
        let text =
            format!("{NODE}[vip.web]\naddr = \"198.18.100.1\"\nport = 80\nring_size = 65536\n");
        let err = parse(&text, "xlb.toml").unwrap_err();
        assert!(
            err.to_string().starts_with(
                "xlb.toml:8:13: vip.\"web\".ring_size: 65536 is not prime; use a prime such as 65537"
            ),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let err = load(Path::new("/nonexistent/xlb.toml")).unwrap_err();
        assert_eq!((err.line, err.column), (0, 0));
        assert!(
            err.to_string()
                .starts_with("/nonexistent/xlb.toml: cannot read the file: "),
            "{err}"
        );
    }

    #[test]
    fn load_reads_a_file() {
        let dir = std::env::temp_dir().join(format!("xlb-config-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("xlb.toml");
        fs::write(&file, EXAMPLE).unwrap();
        let loaded = load(&file);
        fs::write(&file, "[node]\ninterfaces = 3\n").unwrap();
        let bad = load(&file);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.unwrap(), parse(EXAMPLE, "x").unwrap());
        let bad = bad.unwrap_err();
        assert_eq!(bad.file, file.display().to_string());
        assert_eq!(
            (bad.line, bad.column, bad.path.as_str()),
            (2, 14, "node.interfaces")
        );
    }

    /// A state with every kind of value the format has to carry.
    fn odd_state() -> DesiredState {
        let mut state = DesiredState::default();
        let mut vip = Vip::new("a.b-c_d", ip("fd00:100::1"), 0, Proto::Udp);
        vip.ring_size = 131071;
        vip.affinity = Affinity::Client;
        let mut cluster = Cluster::new("zone.1", u32::MAX, 7);
        for (n, admin) in [
            AdminState::Enabled,
            AdminState::Drained,
            AdminState::Disabled,
        ]
        .into_iter()
        .enumerate()
        {
            let mut backend =
                Backend::new(format!("b.{n}"), ip(&format!("198.18.1.{n}")), n as u32);
            backend.admin = admin;
            cluster.backends.insert(backend.name.clone(), backend);
        }
        vip.clusters.insert(cluster.name.clone(), cluster);
        vip.clusters
            .insert("empty".into(), Cluster::new("empty", 0, 0));
        state.vips.insert(vip.name.clone(), vip);
        let bare = Vip::new("bare", ip("198.18.100.9"), 65535, Proto::Tcp);
        state.vips.insert(bare.name.clone(), bare);
        state
    }

    #[test]
    fn to_toml_round_trips() {
        let node = parse(EXAMPLE, "x").unwrap().node;
        for state in [
            parse(EXAMPLE, "x").unwrap().state,
            odd_state(),
            DesiredState::default(),
        ] {
            let text = to_toml(&state);
            let back = parse_state(&text, "state.toml", &node)
                .unwrap_or_else(|err| panic!("{err}\n{text}"));
            assert_eq!(back, state, "{text}");
            // And it is a valid [vip] section of a config file too.
            let config = parse(&format!("{NODE}{text}"), "x").unwrap();
            assert_eq!(config.state, state);
        }
    }

    #[test]
    fn a_state_file_is_checked_against_the_node() {
        let text = to_toml(&odd_state());
        let v6_only = NodeConfig {
            source_v6: Some("fd00::1".parse().unwrap()),
            ..NodeConfig::default()
        };
        let err = parse_state(&text, "state.toml", &v6_only).unwrap_err();
        assert_eq!(
            err.path,
            "vip.\"a.b-c_d\".cluster.\"zone.1\".backend.\"b.0\".addr"
        );
        assert!(err.message.contains("node.source_v4"), "{err}");
        assert!(err.line > 0);
        let err = parse_state("[node]\ninterfaces = []\n", "state.toml", &v6_only).unwrap_err();
        assert_eq!(err.path, "node");
        assert!(err.message.contains("unknown field `node`"), "{err}");
    }

    #[test]
    fn validate_state_reports_every_problem_by_path() {
        let mut state = parse(EXAMPLE, "x").unwrap().state;
        let web = state.vips.get_mut("web").unwrap();
        web.ring_size = 1000;
        let east = web.clusters.get_mut("east").unwrap();
        east.backends.get_mut("e2").unwrap().addr = ip("198.18.1.10");
        let mut dup = state.vips["dns"].clone();
        dup.name = "dns2".into();
        state.vips.insert("dns2".into(), dup);
        let problems = validate_state(&NodeConfig::default(), &state).unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"vip.\"dns2\".addr"), "{problems:?}");
        assert!(paths.contains(&"vip.\"web\".ring_size"), "{problems:?}");
        assert!(
            paths.contains(&"vip.\"web\".cluster.\"east\".backend.\"e2\".addr"),
            "{problems:?}"
        );
        // No source addresses on the default node: one problem per family.
        let sources = problems
            .iter()
            .filter(|p| p.message.contains("node.source_v"))
            .count();
        assert_eq!(sources, 2, "{problems:?}");
        assert_eq!(
            problems[0].to_string(),
            format!("{}: {}", problems[0].path, problems[0].message)
        );

        let node = parse(EXAMPLE, "x").unwrap().node;
        assert_eq!(
            validate_state(&node, &parse(EXAMPLE, "x").unwrap().state),
            Ok(())
        );
    }

    #[test]
    fn settings_carry_the_node() {
        let node = parse(EXAMPLE, "x").unwrap().node;
        let settings = node.settings();
        assert_eq!(settings.hash_seed, DEFAULT_HASH_SEED);
        assert_eq!(
            ip_from_addr(lb_common::FAMILY_V4, &[settings.src_v4, 0, 0, 0]),
            Some(ip("198.18.0.1"))
        );
        assert_eq!(
            ip_from_addr(lb_common::FAMILY_V6, &settings.src_v6),
            Some(ip("fd00::1"))
        );
        assert_eq!(settings.gateway_mac, [0x02, 0, 0x5e, 0, 0, 1]);
        assert_eq!(
            settings.flags & SETTINGS_F_GATEWAY_MAC,
            SETTINGS_F_GATEWAY_MAC
        );
        assert_eq!(NodeConfig::default().settings().flags, 0);
    }

    #[test]
    fn keys_are_quoted_only_when_needed() {
        assert_eq!(toml_key("web-1_a"), "web-1_a");
        assert_eq!(toml_key("a.b"), "\"a.b\"");
        assert_eq!(toml_key(""), "\"\"");
    }

    #[test]
    fn columns_count_characters() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("é=\nx", 2), (1, 2));
    }
}
