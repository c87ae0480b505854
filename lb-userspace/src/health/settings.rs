//! Probe settings: `probe` tables at the VIP, cluster and backend levels of
//! the config file, each field overriding the level above, resolved into
//! one [`ProbeSpec`] per backend.
//!
//! A backend is probed when its VIP, its cluster or itself has a `probe`
//! table; backends of VIPs without any stay up (their health is the
//! operator's word alone). Settings come from the config file and apply by
//! name, so a backend added at run time (`xlb backend add`) is probed with
//! its VIP's and cluster's settings.

use std::{collections::BTreeMap, net::IpAddr, net::SocketAddr, time::Duration};

use lb_common::probe_mark;

use crate::state::{Backend, DesiredState, Proto, Vip};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
/// Each wait between probes is the interval ± this fraction of it.
pub const DEFAULT_JITTER: f64 = 0.1;
pub const DEFAULT_FLAP_BACKOFF: Duration = Duration::from_secs(30);
pub const DEFAULT_HTTP_PATH: &str = "/";
pub const DEFAULT_UDP_PAYLOAD: &str = "ping";

/// What a probe does.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeKind {
    /// A TCP connect: passes when the handshake completes.
    Tcp,
    /// HTTP/1.1 GET `path` with `Host: host`: passes on one of `statuses`
    /// and, with `body` set, when the body contains it.
    Http {
        path: String,
        host: Option<String>,
        statuses: Vec<u16>,
        body: Option<String>,
    },
    /// Sends `payload` in one datagram: passes on a reply (containing
    /// `expect`, when set).
    Udp {
        payload: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
}

impl ProbeKind {
    pub fn name(&self) -> &'static str {
        match self {
            ProbeKind::Tcp => "tcp",
            ProbeKind::Http { .. } => "http",
            ProbeKind::Udp { .. } => "udp",
        }
    }
}

/// Where a probe connects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeVia {
    /// The backend's own address: is the host's service up?
    #[default]
    Backend,
    /// The VIP, carried to the backend in the balancer's tunnel (the node's
    /// tc egress program encapsulates the marked probe socket's packets):
    /// does the backend serve the VIP as a client reaches it?
    Vip,
}

impl ProbeVia {
    pub fn name(self) -> &'static str {
        match self {
            ProbeVia::Backend => "backend",
            ProbeVia::Vip => "vip",
        }
    }
}

/// One backend's resolved probe.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeSpec {
    pub kind: ProbeKind,
    pub via: ProbeVia,
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// In thousandths of the interval (kept integral so specs hash).
    pub jitter_permille: u32,
    pub flap_backoff: Duration,
}

/// What is probed: a backend address with a spec, and for a via-VIP probe
/// the VIP and backend id it goes through. Backends with equal targets
/// share one probe (via the VIP, a target is one VIP's backend).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeTarget {
    /// The backend's own address: whose health the probe decides.
    pub addr: IpAddr,
    pub spec: ProbeSpec,
    /// Set exactly when `spec.via` is [`ProbeVia::Vip`].
    pub via_vip: Option<ViaVip>,
}

/// A via-VIP probe's way: connect to `vip`, marked for `backend_id` (the
/// id the data plane's `BACKENDS` holds the backend under for that VIP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ViaVip {
    pub vip: IpAddr,
    pub backend_id: u32,
}

impl ProbeTarget {
    /// The target of `backend` of `vip` with `spec`; `backend_id` looks up
    /// the backend's id, which a via-VIP probe needs (`None` until the
    /// backend is programmed: no target yet).
    pub fn new(
        vip: &Vip,
        backend: &Backend,
        spec: ProbeSpec,
        backend_id: impl FnOnce() -> Option<u32>,
    ) -> Option<Self> {
        let via_vip = match spec.via {
            ProbeVia::Backend => None,
            ProbeVia::Vip => Some(ViaVip {
                vip: vip.addr,
                backend_id: backend_id()?,
            }),
        };
        Some(Self {
            addr: backend.addr,
            spec,
            via_vip,
        })
    }

    /// Where the probe connects.
    pub fn socket(&self) -> SocketAddr {
        let ip = self.via_vip.map_or(self.addr, |via| via.vip);
        SocketAddr::new(ip, self.spec.port)
    }

    /// For logs: `198.18.1.2:80`, or `198.18.1.2 via VIP 198.18.100.1:80`.
    pub fn label(&self) -> String {
        match self.via_vip {
            None => self.socket().to_string(),
            Some(_) => format!("{} via VIP {}", self.addr, self.socket()),
        }
    }

    /// The probe socket's mark (`SO_MARK`): set for via-VIP probes only.
    pub fn mark(&self) -> Option<u32> {
        self.via_vip.map(|via| probe_mark(via.backend_id))
    }
}

/// One level's `probe` table: every field optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeSettings {
    pub kind: Option<KindName>,
    pub via: Option<ProbeVia>,
    pub port: Option<u16>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub jitter: Option<f64>,
    pub flap_backoff: Option<Duration>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub status: Option<Vec<u16>>,
    pub body: Option<String>,
    pub payload: Option<String>,
    pub expect: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KindName {
    Tcp,
    Http,
    Udp,
}

impl ProbeSettings {
    /// `self` with the fields `over` sets replaced. A level that names
    /// another kind drops the kind's own fields of the levels above (a TCP
    /// cluster under an HTTP VIP keeps no `path`).
    pub fn overlay(&self, over: &ProbeSettings) -> ProbeSettings {
        fn pick<T: Clone>(base: &Option<T>, over: &Option<T>) -> Option<T> {
            over.clone().or_else(|| base.clone())
        }
        if over.kind.is_some() && over.kind != self.kind {
            let general = ProbeSettings {
                kind: self.kind,
                via: self.via,
                port: self.port,
                interval: self.interval,
                timeout: self.timeout,
                rise: self.rise,
                fall: self.fall,
                jitter: self.jitter,
                flap_backoff: self.flap_backoff,
                ..ProbeSettings::default()
            };
            if general != *self {
                return general.overlay(over);
            }
        }
        ProbeSettings {
            kind: pick(&self.kind, &over.kind),
            via: pick(&self.via, &over.via),
            port: pick(&self.port, &over.port),
            interval: pick(&self.interval, &over.interval),
            timeout: pick(&self.timeout, &over.timeout),
            rise: pick(&self.rise, &over.rise),
            fall: pick(&self.fall, &over.fall),
            jitter: pick(&self.jitter, &over.jitter),
            flap_backoff: pick(&self.flap_backoff, &over.flap_backoff),
            path: pick(&self.path, &over.path),
            host: pick(&self.host, &over.host),
            status: pick(&self.status, &over.status),
            body: pick(&self.body, &over.body),
            payload: pick(&self.payload, &over.payload),
            expect: pick(&self.expect, &over.expect),
        }
    }

    /// The spec these merged settings give for a service on `vip_port`;
    /// the error says which field is wrong and why.
    pub fn resolve(
        &self,
        vip_port: u16,
        proto: Proto,
    ) -> Result<ProbeSpec, (&'static str, String)> {
        let kind_name = self.kind.unwrap_or(match proto {
            Proto::Tcp => KindName::Tcp,
            Proto::Udp => KindName::Udp,
        });
        let http_only = [
            ("path", self.path.is_some()),
            ("host", self.host.is_some()),
            ("status", self.status.is_some()),
            ("body", self.body.is_some()),
        ];
        let udp_only = [
            ("payload", self.payload.is_some()),
            ("expect", self.expect.is_some()),
        ];
        let misplaced = match kind_name {
            KindName::Tcp => http_only.iter().chain(&udp_only).find(|(_, set)| *set),
            KindName::Http => udp_only.iter().find(|(_, set)| *set),
            KindName::Udp => http_only.iter().find(|(_, set)| *set),
        };
        if let Some((field, _)) = misplaced {
            return Err((
                field,
                format!(
                    "does not apply to kind = {:?}; path, host, status and body are for \
                     \"http\", payload and expect for \"udp\"",
                    format!("{kind_name:?}").to_lowercase()
                ),
            ));
        }
        let port = match self.port.unwrap_or(vip_port) {
            0 => {
                return Err((
                    "port",
                    "the VIP takes every port (port = 0), so the probe needs its own: \
                     set port to 1-65535"
                        .into(),
                ));
            }
            port => port,
        };
        let interval = self.interval.unwrap_or(DEFAULT_INTERVAL);
        let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout > interval {
            return Err((
                "timeout",
                format!(
                    "{} s is longer than the interval ({} s): a probe must end before the next starts",
                    timeout.as_secs_f64(),
                    interval.as_secs_f64()
                ),
            ));
        }
        let kind = match kind_name {
            KindName::Tcp => ProbeKind::Tcp,
            KindName::Http => ProbeKind::Http {
                path: self
                    .path
                    .clone()
                    .unwrap_or_else(|| DEFAULT_HTTP_PATH.into()),
                host: self.host.clone(),
                statuses: self.status.clone().unwrap_or_else(|| vec![200]),
                body: self.body.clone(),
            },
            KindName::Udp => ProbeKind::Udp {
                payload: self
                    .payload
                    .clone()
                    .unwrap_or_else(|| DEFAULT_UDP_PAYLOAD.into())
                    .into_bytes(),
                expect: self.expect.clone().map(String::into_bytes),
            },
        };
        Ok(ProbeSpec {
            kind,
            via: self.via.unwrap_or_default(),
            port,
            interval,
            timeout,
            rise: self.rise.unwrap_or(DEFAULT_RISE),
            fall: self.fall.unwrap_or(DEFAULT_FALL),
            jitter_permille: (self.jitter.unwrap_or(DEFAULT_JITTER) * 1000.0).round() as u32,
            flap_backoff: self.flap_backoff.unwrap_or(DEFAULT_FLAP_BACKOFF),
        })
    }
}

/// Every `probe` table of a config file, by VIP, cluster and backend name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeConfig {
    pub vips: BTreeMap<String, VipProbes>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct VipProbes {
    pub probe: Option<ProbeSettings>,
    pub clusters: BTreeMap<String, ClusterProbes>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterProbes {
    pub probe: Option<ProbeSettings>,
    pub backends: BTreeMap<String, ProbeSettings>,
}

/// (VIP, cluster, backend) names.
pub type BackendPath = (String, String, String);

/// Where a backend's merged settings were found wrong: the deepest level
/// that has a `probe` table, and the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeProblem {
    pub vip: String,
    pub cluster: Option<String>,
    pub backend: Option<String>,
    pub field: &'static str,
    pub message: String,
}

impl ProbeConfig {
    pub fn is_empty(&self) -> bool {
        self.vips.is_empty()
    }

    /// The merged settings of one backend, `None` when nothing probes it.
    pub fn settings(&self, vip: &str, cluster: &str, backend: &str) -> Option<ProbeSettings> {
        let v = self.vips.get(vip)?;
        let c = v.clusters.get(cluster);
        let levels = [
            v.probe.as_ref(),
            c.and_then(|c| c.probe.as_ref()),
            c.and_then(|c| c.backends.get(backend)),
        ];
        let mut merged: Option<ProbeSettings> = None;
        for level in levels.into_iter().flatten() {
            merged = Some(merged.unwrap_or_default().overlay(level));
        }
        merged
    }

    /// Every backend's target: `(vip, cluster, backend) -> target`, and the
    /// backends whose settings do not resolve. `backend_id` gives a
    /// backend's data-plane id by VIP name and backend address; a via-VIP
    /// probe of a backend without one is left out until it has one.
    pub fn targets(
        &self,
        state: &DesiredState,
        backend_id: impl Fn(&str, IpAddr) -> Option<u32>,
    ) -> (BTreeMap<BackendPath, ProbeTarget>, Vec<ProbeProblem>) {
        let mut targets = BTreeMap::new();
        let mut problems = Vec::new();
        for (vname, vip) in &state.vips {
            for (cluster, backend) in vip.backends() {
                let Some(settings) = self.settings(vname, &cluster.name, &backend.name) else {
                    continue;
                };
                match settings.resolve(vip.port, vip.proto) {
                    Ok(spec) => {
                        let id = || backend_id(vname, backend.addr);
                        if let Some(target) = ProbeTarget::new(vip, backend, spec, id) {
                            targets.insert(
                                (vname.clone(), cluster.name.clone(), backend.name.clone()),
                                target,
                            );
                        }
                    }
                    Err((field, message)) => {
                        let (cluster, backend) = self.deepest(vname, &cluster.name, &backend.name);
                        problems.push(ProbeProblem {
                            vip: vname.clone(),
                            cluster,
                            backend,
                            field,
                            message,
                        });
                    }
                }
            }
        }
        (targets, problems)
    }

    /// Every `probe` table whose settings, merged with the levels above,
    /// do not resolve for its VIP: checked level by level, so that a
    /// cluster without backends is checked too.
    pub fn problems(&self, state: &DesiredState) -> Vec<ProbeProblem> {
        let mut found = Vec::new();
        for (vname, probes) in &self.vips {
            let Some(vip) = state.vips.get(vname) else {
                continue;
            };
            let mut check =
                |settings: ProbeSettings, cluster: Option<&String>, backend: Option<&String>| {
                    if let Err((field, message)) = settings.resolve(vip.port, vip.proto) {
                        found.push(ProbeProblem {
                            vip: vname.clone(),
                            cluster: cluster.cloned(),
                            backend: backend.cloned(),
                            field,
                            message,
                        });
                    }
                };
            let base = probes.probe.clone();
            if let Some(settings) = &base {
                check(settings.clone(), None, None);
            }
            for (cname, cluster) in &probes.clusters {
                let merged = match (&base, &cluster.probe) {
                    (Some(b), Some(c)) => Some(b.overlay(c)),
                    (b, c) => b.clone().or_else(|| c.clone()),
                };
                if let Some(c) = &cluster.probe {
                    check(
                        merged.clone().unwrap_or_else(|| c.clone()),
                        Some(cname),
                        None,
                    );
                }
                for (bname, b) in &cluster.backends {
                    let settings = merged.clone().unwrap_or_default().overlay(b);
                    check(settings, Some(cname), Some(bname));
                }
            }
        }
        found
    }

    fn deepest(&self, vip: &str, cluster: &str, backend: &str) -> (Option<String>, Option<String>) {
        let c = self.vips.get(vip).and_then(|v| v.clusters.get(cluster));
        match c {
            Some(c) if c.backends.contains_key(backend) => {
                (Some(cluster.into()), Some(backend.into()))
            }
            Some(c) if c.probe.is_some() => (Some(cluster.into()), None),
            _ => (None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Backend, Cluster, Vip};

    fn state(port: u16) -> DesiredState {
        let mut vip = Vip::new("web", "198.18.100.1".parse().unwrap(), port, Proto::Tcp);
        for (c, backends) in [("east", ["e1", "e2"]), ("west", ["w1", "w2"])] {
            let mut cluster = Cluster::new(c, 1, 0);
            for (i, b) in backends.iter().enumerate() {
                let addr = format!("198.18.{}.{}", if c == "east" { 1 } else { 2 }, i + 1);
                cluster
                    .backends
                    .insert(b.to_string(), Backend::new(*b, addr.parse().unwrap(), 1));
            }
            vip.clusters.insert(c.into(), cluster);
        }
        DesiredState {
            vips: [("web".to_string(), vip)].into(),
        }
    }

    fn no_ids(_: &str, _: IpAddr) -> Option<u32> {
        None
    }

    fn key(c: &str, b: &str) -> (String, String, String) {
        ("web".into(), c.into(), b.into())
    }

    #[test]
    fn no_probe_table_probes_nothing() {
        let (targets, problems) = ProbeConfig::default().targets(&state(80), no_ids);
        assert!(targets.is_empty() && problems.is_empty());
    }

    #[test]
    fn a_vip_table_gives_defaults_and_lower_levels_override_by_field() {
        let mut config = ProbeConfig::default();
        let vip = config.vips.entry("web".into()).or_default();
        vip.probe = Some(ProbeSettings::default());
        let west = vip.clusters.entry("west".into()).or_default();
        west.probe = Some(ProbeSettings {
            kind: Some(KindName::Http),
            path: Some("/health".into()),
            interval: Some(Duration::from_secs(5)),
            ..Default::default()
        });
        west.backends.insert(
            "w2".into(),
            ProbeSettings {
                port: Some(8080),
                ..Default::default()
            },
        );
        let (targets, problems) = config.targets(&state(80), no_ids);
        assert!(problems.is_empty(), "{problems:?}");
        let e1 = &targets[&key("east", "e1")].spec;
        assert_eq!(
            (&e1.kind, e1.port, e1.interval, e1.timeout, e1.rise, e1.fall),
            (&ProbeKind::Tcp, 80, DEFAULT_INTERVAL, DEFAULT_TIMEOUT, 2, 3)
        );
        let w1 = &targets[&key("west", "w1")].spec;
        assert_eq!(w1.interval, Duration::from_secs(5));
        assert!(matches!(&w1.kind, ProbeKind::Http { path, statuses, .. }
            if path == "/health" && statuses == &[200]));
        let w2 = &targets[&key("west", "w2")].spec;
        assert_eq!(
            (w2.port, w2.interval, w2.kind.name()),
            (8080, Duration::from_secs(5), "http")
        );
    }

    #[test]
    fn a_level_that_changes_the_kind_drops_the_kind_fields_above() {
        let mut config = ProbeConfig::default();
        let vip = config.vips.entry("web".into()).or_default();
        vip.probe = Some(ProbeSettings {
            kind: Some(KindName::Http),
            path: Some("/health".into()),
            rise: Some(5),
            ..Default::default()
        });
        vip.clusters.entry("west".into()).or_default().probe = Some(ProbeSettings {
            kind: Some(KindName::Tcp),
            ..Default::default()
        });
        let (targets, problems) = config.targets(&state(80), no_ids);
        assert!(problems.is_empty(), "{problems:?}");
        let w1 = &targets[&key("west", "w1")].spec;
        assert_eq!((w1.kind.name(), w1.rise), ("tcp", 5));
        assert_eq!(targets[&key("east", "e1")].spec.kind.name(), "http");
    }

    #[test]
    fn a_via_vip_probe_connects_to_the_vip_marked_for_its_backend_id() {
        let mut config = ProbeConfig::default();
        let vip = config.vips.entry("web".into()).or_default();
        vip.probe = Some(ProbeSettings {
            via: Some(ProbeVia::Vip),
            ..Default::default()
        });
        vip.clusters
            .entry("west".into())
            .or_default()
            .backends
            .insert(
                "w2".into(),
                ProbeSettings {
                    via: Some(ProbeVia::Backend),
                    port: Some(8080),
                    ..Default::default()
                },
            );
        let ids = |vip: &str, addr: IpAddr| {
            assert_eq!(vip, "web");
            (addr != "198.18.1.2".parse::<IpAddr>().unwrap())
                .then(|| u32::from(addr.to_string().ends_with(".1")) + 20)
        };
        let (targets, problems) = config.targets(&state(80), ids);
        assert!(problems.is_empty(), "{problems:?}");
        let e1 = &targets[&key("east", "e1")];
        assert_eq!(e1.addr, "198.18.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(e1.socket(), "198.18.100.1:80".parse().unwrap());
        assert_eq!(e1.mark(), Some(probe_mark(21)));
        assert_eq!(e1.label(), "198.18.1.1 via VIP 198.18.100.1:80");
        assert!(
            !targets.contains_key(&key("east", "e2")),
            "no backend id yet: not probed through the VIP yet"
        );
        let w2 = &targets[&key("west", "w2")];
        assert_eq!(w2.socket(), "198.18.2.2:8080".parse().unwrap());
        assert_eq!((w2.mark(), w2.via_vip), (None, None));
        assert_eq!(targets[&key("west", "w1")].mark(), Some(probe_mark(21)));
    }

    #[test]
    fn a_cluster_table_alone_probes_only_that_cluster() {
        let mut config = ProbeConfig::default();
        let vip = config.vips.entry("web".into()).or_default();
        vip.clusters.entry("east".into()).or_default().probe = Some(ProbeSettings::default());
        let (targets, _) = config.targets(&state(80), no_ids);
        let probed: Vec<_> = targets.keys().map(|(_, _, b)| b.as_str()).collect();
        assert_eq!(probed, ["e1", "e2"]);
    }

    #[test]
    fn wrong_merged_settings_name_the_field() {
        let mut config = ProbeConfig::default();
        config.vips.entry("web".into()).or_default().probe = Some(ProbeSettings {
            path: Some("/".into()),
            ..Default::default()
        });
        let (_, problems) = config.targets(&state(80), no_ids);
        assert_eq!(problems[0].field, "path");
        config.vips.get_mut("web").unwrap().probe = Some(ProbeSettings::default());
        let (_, problems) = config.targets(&state(0), no_ids);
        assert_eq!(problems[0].field, "port");
        config.vips.get_mut("web").unwrap().probe = Some(ProbeSettings {
            timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        });
        let (_, problems) = config.targets(&state(80), no_ids);
        assert_eq!(problems[0].field, "timeout");
    }
}
