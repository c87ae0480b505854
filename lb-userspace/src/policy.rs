//! Traffic policy: from one VIP's desired state and its backends' health,
//! each backend's share of the VIP's **new** flows — the weights the Maglev
//! ring is built from. Pure: no I/O, no clock, no kernel; the same inputs
//! always give the same shares.
//!
//! The model follows Envoy's priority levels, overprovisioning factor and
//! panic threshold (see `ANCHORS.md`), with xlb's clusters in the place of
//! Envoy's localities.
//!
//! # Definitions
//!
//! * A backend is **usable** when its weight is nonzero, the operator has
//!   it [`Enabled`](AdminState::Enabled) and its probes say
//!   [`Up`](Health::Up). Only usable backends take new flows, except in
//!   panic (below).
//! * A cluster's **capacity** is the weight of its usable backends over the
//!   weight of *all* its backends, whatever their admin state. A
//!   [`Drained`](AdminState::Drained) or [`Disabled`](AdminState::Disabled)
//!   backend therefore counts as capacity lost, exactly like a failed one:
//!   the operator took it out, so the cluster can carry less and its share
//!   shrinks, spilling to its neighbours or to the standby level. (To shrink
//!   a cluster's nominal size for good, delete the backend.) A cluster with
//!   no backends, or only weight-0 ones, has capacity 0.
//! * A cluster's **healthy fraction** is the weight of its usable backends
//!   over the weight of its *enabled* ones: how many of the backends in
//!   service pass their probes. Only the panic threshold looks at it, so
//!   draining backends never throws a VIP into panic.
//! * Clusters of weight 0 take no traffic and are left out of every sum; a
//!   **priority level** is the set of clusters of nonzero weight that share
//!   a priority number. Level 0 is served first.
//!
//! # Priority levels: how much each level takes
//!
//! A level's capacity is its clusters' capacities averaged by cluster
//! weight, `cap(P) = Σ wᶜ·cap(c) / Σ wᶜ`, and its **health** is
//! `h(P) = min(1, overprovisioning × cap(P))`. With the default factor 1.4 a
//! level keeps all its traffic while at least 1/1.4 ≈ 71.4 % of it is
//! usable: the factor is the headroom the operator provisioned.
//!
//! Levels are then served in priority order, each taking its health out of
//! what is left: `load(P) = min(remaining, h(P) / T)` with
//! `T = min(1, Σ h)`. While the levels together are healthy enough (`T` = 1)
//! this is plain spill-over: a primary at 50 % has health 0.7 and takes 70 %,
//! the standby takes the other 30 %. When even all levels together fall
//! short (`T` < 1), the loads are normalised — each level takes `h(P)/T` —
//! so that all traffic still goes somewhere, in proportion to health, instead
//! of being dropped (Envoy's "normalized total health").
//!
//! # Clusters within a level, backends within a cluster
//!
//! Within a level, cluster `c` takes the level's load in proportion to
//! `wᶜ × cap(c)`: its configured weight scaled by the capacity it has left.
//! Two clusters 1:1 split 50/50; when one loses half its backends it
//! carries half as much (2/3 vs 1/3), and a cluster with nothing usable
//! carries nothing. Within a cluster, each usable backend takes the
//! cluster's share in proportion to its weight.
//!
//! # Locality
//!
//! An xlb node may prefer one cluster, its own
//! ([`PolicyOptions::local_cluster`]). Let
//! `k = min(1, locality_overprovisioning × cap(local))`. When `k` = 1 the
//! local cluster takes **all** of its level's load; otherwise it takes the
//! fraction `k` of it and the other clusters of the level share the rest as
//! above (at `k` = 1 both rules agree, so the share never jumps). If no
//! other cluster of the level can take anything, the local cluster keeps
//! all. Locality never overrides priorities: a local cluster on a standby
//! level only takes what spills to that level. A name the VIP does not have
//! (or a cluster of weight 0) is ignored.
//!
//! # Panic
//!
//! The VIP's healthy fraction is the sum over levels of each level's
//! healthy fraction (its clusters' healthy fractions averaged by cluster
//! weight), capped at 1 — the healthy share of the backends in service,
//! counted in units of one level. With one level (the active-active case)
//! that is simply the healthy share of its enabled backends; with a standby
//! level a healthy standby counts fully, so a dead primary with a healthy
//! standby is a failover, not a panic.
//!
//! When that fraction is **below** [`PolicyOptions::panic_threshold`] (0.5 by
//! default; 0 turns panic off), the health signal is taken to be too
//! pessimistic to trust or the survivors too few to carry the load, and the
//! levels that take traffic balance it over **all their enabled backends**,
//! healthy or not, by weights: within a level clusters split by
//! `wᶜ × (enabled weight / all weight)` and backends by weight. Drained and
//! Disabled backends never take new flows, in panic or not.
//!
//! Which levels take traffic, and how much stays local, is still decided on
//! real health, so that panic spreads load over a level that has survivors
//! and does not send half of everything to a dead primary or a dead local
//! cluster. Only when no backend at all is up is health ignored there too:
//! levels and locality are then computed as if every enabled backend were
//! up (fail open, as Envoy does).
//!
//! # Nothing to send to
//!
//! When no backend can take new flows — every one drained, disabled or of
//! weight 0, or all down with panic turned off — the result has no backends
//! and [`Mode::Empty`]; the caller decides what an empty ring means.
//!
//! # Examples (defaults: overprovisioning 1.4, panic below 0.5)
//!
//! | clusters (priority: healthy / backends)   | shares                  |
//! |-------------------------------------------|-------------------------|
//! | a 1:1 b, both all healthy                 | a 50 %, b 50 %          |
//! | a 1:1 b, b lost half                      | a 66.7 %, b 33.3 %      |
//! | a 1:1 b, b all down                       | a 100 %                 |
//! | primary (0): 8/10, standby (1): all       | primary 100 %           |
//! | primary (0): 5/10, standby (1): all       | primary 70 %, standby 30 % |
//! | one cluster, 4/10 healthy                 | panic: all 10, 10 % each |
//!
//! The unit tests below are the full specification, as tables.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use crate::state::{AdminState, Backend, Cluster, Health, Vip};

/// Envoy's default: a level keeps all its traffic while ≥ 1/1.4 of it is up.
pub const DEFAULT_OVERPROVISIONING: f64 = 1.4;
/// Envoy's default: panic when fewer than half the backends are healthy.
pub const DEFAULT_PANIC_THRESHOLD: f64 = 0.5;

/// Below this, a fraction is zero and above `1 - EPSILON` it is one:
/// `5/7 × 1.4` must keep a level whole however the floats round.
const EPSILON: f64 = 1e-9;

/// The node's policy knobs; the same for every VIP on the node.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyOptions {
    /// A level (and its spill-over) keeps all its traffic while
    /// `overprovisioning × capacity ≥ 1`. At least 1.
    pub overprovisioning: f64,
    /// Panic when the VIP's healthy fraction is below this: balance over
    /// every enabled backend of the levels taking traffic. 0 to 1; 0 turns
    /// panic off.
    pub panic_threshold: f64,
    /// The cluster this node prefers (its own), if any.
    pub local_cluster: Option<String>,
    /// The local cluster keeps all its level's traffic while
    /// `locality_overprovisioning × its capacity ≥ 1`, and the fraction
    /// `locality_overprovisioning × capacity` of it below that. At least 1;
    /// 1.4 (the default) keeps traffic local while ≥ 71.4 % is up.
    pub locality_overprovisioning: f64,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        Self {
            overprovisioning: DEFAULT_OVERPROVISIONING,
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
            local_cluster: None,
            locality_overprovisioning: DEFAULT_OVERPROVISIONING,
        }
    }
}

/// An option out of its range; says which and what would be valid.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field} = {value}: must be {expected}")]
pub struct InvalidOption {
    pub field: &'static str,
    pub value: f64,
    pub expected: &'static str,
}

impl PolicyOptions {
    /// Checks the ranges. [`shares`] never panics whatever the options, but
    /// outside these ranges its results mean nothing; config loading should
    /// reject them with this error.
    pub fn validate(&self) -> Result<(), InvalidOption> {
        let at_least_one = |field, value: f64| {
            if value.is_finite() && value >= 1.0 {
                Ok(())
            } else {
                Err(InvalidOption {
                    field,
                    value,
                    expected: "a number ≥ 1 (1.4 by default; below 1 a fully healthy group would shed traffic)",
                })
            }
        };
        at_least_one("overprovisioning", self.overprovisioning)?;
        at_least_one("locality_overprovisioning", self.locality_overprovisioning)?;
        if !(0.0..=1.0).contains(&self.panic_threshold) {
            return Err(InvalidOption {
                field: "panic_threshold",
                value: self.panic_threshold,
                expected: "between 0 (never panic) and 1 (0.5 by default)",
            });
        }
        Ok(())
    }
}

/// One VIP's traffic split, with what `xlb status` needs to explain it.
#[derive(Clone, Debug, PartialEq)]
pub struct Shares {
    /// Every backend that takes new flows (share > 0), by priority, cluster
    /// name, backend name. Shares sum to 1, or the list is empty.
    pub backends: Vec<BackendShare>,
    /// Every cluster of the VIP, by priority then name, whether it takes
    /// traffic or not.
    pub clusters: Vec<ClusterShare>,
    /// Every priority level (clusters of nonzero weight), in order.
    pub levels: Vec<LevelShare>,
    pub mode: Mode,
    pub locality: Locality,
    /// The VIP's healthy fraction, as compared with the panic threshold.
    pub healthy: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendShare {
    pub cluster: String,
    pub backend: String,
    pub addr: IpAddr,
    /// Fraction of the VIP's new flows, in (0, 1].
    pub share: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterShare {
    pub name: String,
    pub priority: u32,
    pub weight: u32,
    /// Fraction of the VIP's new flows, in [0, 1].
    pub share: f64,
    /// Usable weight over the weight of all its backends (drained and
    /// disabled ones count as lost capacity).
    pub capacity: f64,
    /// Usable weight over enabled weight; `None` when nothing is enabled.
    pub healthy: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LevelShare {
    pub priority: u32,
    /// Fraction of the VIP's new flows the level takes.
    pub share: f64,
    /// Its clusters' capacities averaged by cluster weight.
    pub capacity: f64,
    /// `min(1, overprovisioning × capacity)`.
    pub health: f64,
}

/// Why the traffic goes where it goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// The first priority level takes every new flow.
    Normal,
    /// The first level could not take everything: levels `from_priority`
    /// to `to_priority` share the new flows (see [`Shares::levels`]).
    Spilled {
        from_priority: u32,
        to_priority: u32,
    },
    /// Too few healthy backends: the levels taking traffic balance it over
    /// every enabled backend, healthy or not.
    Panic,
    /// No backend can take new flows.
    Empty,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Normal => f.write_str("normal"),
            Mode::Spilled {
                from_priority,
                to_priority,
            } => write!(f, "spilled from priority {from_priority} to {to_priority}"),
            Mode::Panic => f.write_str("panic"),
            Mode::Empty => f.write_str("empty"),
        }
    }
}

/// What the locality preference did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Locality {
    /// No local cluster configured.
    Off,
    /// The VIP has no cluster of that name, or it has weight 0.
    Absent,
    /// The local cluster's level takes no new flows (a standby level that
    /// nothing spills to, or nothing at all can take traffic).
    Idle,
    /// The local cluster takes all of its level's new flows.
    Local,
    /// The local cluster keeps only this fraction of its level's new flows;
    /// the other clusters of the level take the rest.
    Partial { kept: f64 },
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Locality::Off => f.write_str("off"),
            Locality::Absent => f.write_str("local cluster not in this VIP"),
            Locality::Idle => f.write_str("local cluster's level idle"),
            Locality::Local => f.write_str("all local"),
            Locality::Partial { kept } => write!(f, "{:.1}% kept local", kept * 100.0),
        }
    }
}

/// Which backends count as taking traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Basis {
    /// Enabled and up: the normal case.
    Healthy,
    /// Enabled, up or not: panic.
    Enabled,
}

/// One cluster's backends (weight > 0 only) and their sums.
struct Tally<'a> {
    cluster: &'a Cluster,
    /// Backend, enabled, up (up only meaningful when enabled).
    backends: Vec<(&'a Backend, bool, bool)>,
    total: f64,
    enabled: f64,
    up: f64,
}

impl<'a> Tally<'a> {
    fn new(cluster: &'a Cluster, health: &impl Fn(&Backend) -> Health) -> Self {
        let mut tally = Tally {
            cluster,
            backends: Vec::new(),
            total: 0.0,
            enabled: 0.0,
            up: 0.0,
        };
        for backend in cluster.backends.values().filter(|b| b.weight > 0) {
            let weight = f64::from(backend.weight);
            let enabled = backend.admin == AdminState::Enabled;
            let up = enabled && health(backend) == Health::Up;
            tally.total += weight;
            if enabled {
                tally.enabled += weight;
            }
            if up {
                tally.up += weight;
            }
            tally.backends.push((backend, enabled, up));
        }
        tally
    }

    fn weight(&self) -> f64 {
        f64::from(self.cluster.weight)
    }

    fn usable(&self, basis: Basis) -> f64 {
        match basis {
            Basis::Healthy => self.up,
            Basis::Enabled => self.enabled,
        }
    }

    fn capacity(&self, basis: Basis) -> f64 {
        ratio(self.usable(basis), self.total)
    }

    fn healthy(&self) -> Option<f64> {
        (self.enabled > 0.0).then(|| self.up / self.enabled)
    }

    fn takes(&self, basis: Basis, enabled: bool, up: bool) -> bool {
        match basis {
            Basis::Healthy => up,
            Basis::Enabled => enabled,
        }
    }
}

fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

/// Clamps to [0, 1], snapping float noise at both ends.
fn saturate(x: f64) -> f64 {
    if x >= 1.0 - EPSILON {
        1.0
    } else if x > EPSILON {
        x
    } else {
        0.0
    }
}

/// A priority level: indices into the tallies, all of nonzero weight.
struct Level {
    priority: u32,
    clusters: Vec<usize>,
}

impl Level {
    /// Capacity averaged by cluster weight.
    fn capacity(&self, tallies: &[Tally], basis: Basis) -> f64 {
        let (sum, weights) = self.clusters.iter().fold((0.0, 0.0), |(sum, weights), &i| {
            let t = &tallies[i];
            (sum + t.weight() * t.capacity(basis), weights + t.weight())
        });
        ratio(sum, weights)
    }

    /// Healthy fraction averaged by cluster weight, over clusters with
    /// enabled backends; 0 when there are none.
    fn healthy(&self, tallies: &[Tally]) -> f64 {
        let (sum, weights) = self.clusters.iter().fold((0.0, 0.0), |(sum, weights), &i| {
            let t = &tallies[i];
            match t.healthy() {
                Some(h) => (sum + t.weight() * h, weights + t.weight()),
                None => (sum, weights),
            }
        });
        ratio(sum, weights)
    }
}

/// Envoy's priority loads: each level takes `h/T` of what is left, with
/// `T = min(1, Σh)`. `None` when no level has any health.
fn level_loads(healths: &[f64]) -> Option<Vec<f64>> {
    let total = healths.iter().sum::<f64>().min(1.0);
    if total <= EPSILON {
        return None;
    }
    let mut remaining = 1.0_f64;
    Some(
        healths
            .iter()
            .map(|h| {
                let load = saturate((h / total).min(remaining));
                remaining = (remaining - load).max(0.0);
                load
            })
            .collect(),
    )
}

/// Each backend's share of `vip`'s new flows; see the module docs for the
/// rules. `health` is asked only about enabled backends of nonzero weight.
pub fn shares(vip: &Vip, health: impl Fn(&Backend) -> Health, options: &PolicyOptions) -> Shares {
    // Clusters in (priority, name) order; BTreeMap already orders by name.
    let mut tallies: Vec<Tally> = vip
        .clusters
        .values()
        .map(|c| Tally::new(c, &health))
        .collect();
    tallies.sort_by_key(|t| t.cluster.priority);

    let mut by_priority: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, t) in tallies.iter().enumerate() {
        if t.cluster.weight > 0 {
            by_priority.entry(t.cluster.priority).or_default().push(i);
        }
    }
    let levels: Vec<Level> = by_priority
        .into_iter()
        .map(|(priority, clusters)| Level { priority, clusters })
        .collect();

    let of = options.overprovisioning;
    let level_health = |basis| -> Vec<f64> {
        levels
            .iter()
            .map(|l| saturate(of * l.capacity(&tallies, basis)))
            .collect()
    };
    let real_health = level_health(Basis::Healthy);

    let healthy = saturate(levels.iter().map(|l| l.healthy(&tallies)).sum());
    let panic = healthy < options.panic_threshold;
    let spread = if panic {
        Basis::Enabled
    } else {
        Basis::Healthy
    };

    // Which levels take how much, and how much the local cluster keeps, on
    // real health; failing open when nothing at all is up.
    let (loads, decide) = match level_loads(&real_health) {
        Some(loads) => (Some(loads), Basis::Healthy),
        None if panic => (level_loads(&level_health(Basis::Enabled)), Basis::Enabled),
        None => (None, Basis::Healthy),
    };

    let local = options.local_cluster.as_deref().and_then(|name| {
        tallies
            .iter()
            .position(|t| t.cluster.name == name && t.cluster.weight > 0)
    });

    let mut cluster_shares = vec![0.0_f64; tallies.len()];
    let mut kept_local = None;
    if let Some(loads) = &loads {
        for (level, &load) in levels.iter().zip(loads) {
            let raw = |i: usize| tallies[i].weight() * tallies[i].capacity(spread);
            let local_here = local.filter(|l| level.clusters.contains(l));
            let others: f64 = level
                .clusters
                .iter()
                .filter(|&&i| Some(i) != local_here)
                .map(|&i| raw(i))
                .sum();
            // The fraction of the level's load the local cluster keeps.
            let kept = match local_here {
                Some(l) => {
                    let k =
                        saturate(options.locality_overprovisioning * tallies[l].capacity(decide));
                    let kept = if others <= 0.0 { 1.0 } else { k };
                    if load > 0.0 {
                        kept_local = Some(kept);
                    }
                    cluster_shares[l] = load * kept;
                    kept
                }
                None => 0.0,
            };
            for &i in level.clusters.iter().filter(|&&i| Some(i) != local_here) {
                cluster_shares[i] = load * (1.0 - kept) * ratio(raw(i), others);
            }
        }
    }

    let mut backends = Vec::new();
    for (tally, &share) in tallies.iter().zip(&cluster_shares) {
        if share <= 0.0 {
            continue;
        }
        let usable = tally.usable(spread);
        for &(backend, enabled, up) in &tally.backends {
            if tally.takes(spread, enabled, up) {
                backends.push(BackendShare {
                    cluster: tally.cluster.name.clone(),
                    backend: backend.name.clone(),
                    addr: backend.addr,
                    share: share * f64::from(backend.weight) / usable,
                });
            }
        }
    }

    let level_shares: Vec<f64> = match &loads {
        Some(loads) => loads.clone(),
        None => vec![0.0; levels.len()],
    };
    let mode = if backends.is_empty() {
        Mode::Empty
    } else if panic {
        Mode::Panic
    } else if level_shares.first().is_some_and(|&s| s >= 1.0 - EPSILON) {
        Mode::Normal
    } else {
        let last = levels
            .iter()
            .zip(&level_shares)
            .rev()
            .find(|(_, s)| **s > 0.0)
            .map_or(levels[0].priority, |(l, _)| l.priority);
        Mode::Spilled {
            from_priority: levels[0].priority,
            to_priority: last,
        }
    };
    let locality = match (&options.local_cluster, local) {
        (None, _) => Locality::Off,
        (Some(_), None) => Locality::Absent,
        (Some(_), Some(_)) => match kept_local {
            None => Locality::Idle,
            Some(kept) if kept >= 1.0 => Locality::Local,
            Some(kept) => Locality::Partial { kept },
        },
    };

    Shares {
        backends,
        clusters: tallies
            .iter()
            .zip(&cluster_shares)
            .map(|(t, &share)| ClusterShare {
                name: t.cluster.name.clone(),
                priority: t.cluster.priority,
                weight: t.cluster.weight,
                share,
                capacity: t.capacity(Basis::Healthy),
                healthy: t.healthy(),
            })
            .collect(),
        levels: levels
            .iter()
            .zip(&real_health)
            .zip(&level_shares)
            .map(|((l, &health), &share)| LevelShare {
                priority: l.priority,
                share,
                capacity: l.capacity(&tallies, Basis::Healthy),
                health,
            })
            .collect(),
        mode,
        locality,
        healthy,
    }
}

/// Integer weights for the Maglev ring: each address's share × `scale`,
/// rounded, and never 0 for a nonzero share (a backend the policy sends
/// flows to must own ring slots). An address that appears in two clusters
/// gets the sum of its shares, once. Ordered by address, so the ring does
/// not depend on names. Empty when `shares` is.
pub fn to_weights(shares: &Shares, scale: u32) -> Vec<(IpAddr, u32)> {
    let mut by_addr: BTreeMap<IpAddr, f64> = BTreeMap::new();
    for b in &shares.backends {
        *by_addr.entry(b.addr).or_default() += b.share;
    }
    by_addr
        .into_iter()
        .filter(|&(_, share)| share > 0.0)
        // `as` saturates at u32::MAX; `max` also turns NaN into 1.
        .map(|(addr, share)| (addr, (share * f64::from(scale)).round().max(1.0) as u32))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr};

    use super::*;
    use crate::state::Proto;

    const EPS: f64 = 1e-9;

    /// A cluster in a scenario: one letter per backend, in name order
    /// (`a/0`, `a/1`, …): `U` up, `D` down, `R` drained (up), `X` disabled
    /// (up). Backend weights are 1 unless `weights` says otherwise.
    struct Spec {
        name: &'static str,
        weight: u32,
        priority: u32,
        backends: &'static str,
        weights: &'static [u32],
    }

    fn c(name: &'static str, weight: u32, priority: u32, backends: &'static str) -> Spec {
        Spec {
            name,
            weight,
            priority,
            backends,
            weights: &[],
        }
    }

    impl Spec {
        fn weights(mut self, weights: &'static [u32]) -> Self {
            self.weights = weights;
            self
        }
    }

    struct Case {
        name: &'static str,
        clusters: Vec<Spec>,
        options: PolicyOptions,
        /// Every cluster's share, and any backends' (`"a/2"`) worth checking.
        expect: &'static [(&'static str, f64)],
        mode: Mode,
        locality: Locality,
    }

    fn defaults() -> PolicyOptions {
        PolicyOptions::default()
    }

    fn no_panic() -> PolicyOptions {
        PolicyOptions {
            panic_threshold: 0.0,
            ..defaults()
        }
    }

    fn local(name: &str) -> PolicyOptions {
        PolicyOptions {
            local_cluster: Some(name.to_owned()),
            ..defaults()
        }
    }

    const NORMAL: Mode = Mode::Normal;
    const fn spilled(from_priority: u32, to_priority: u32) -> Mode {
        Mode::Spilled {
            from_priority,
            to_priority,
        }
    }

    /// Builds the VIP and its health map: backend `j` of cluster `i` is
    /// 198.18.i.(j+1).
    fn build(specs: &[Spec]) -> (Vip, HashMap<IpAddr, Health>) {
        let mut vip = Vip::new(
            "web",
            IpAddr::V4(Ipv4Addr::new(198, 18, 255, 1)),
            80,
            Proto::Tcp,
        );
        let mut health = HashMap::new();
        for (i, spec) in specs.iter().enumerate() {
            let mut cluster = Cluster::new(spec.name, spec.weight, spec.priority);
            for (j, letter) in spec.backends.chars().enumerate() {
                let addr = IpAddr::V4(Ipv4Addr::new(198, 18, i as u8, j as u8 + 1));
                let weight = spec.weights.get(j).copied().unwrap_or(1);
                let mut backend = Backend::new(format!("{}/{j}", spec.name), addr, weight);
                let (admin, up) = match letter {
                    'U' => (AdminState::Enabled, Health::Up),
                    'D' => (AdminState::Enabled, Health::Down),
                    'R' => (AdminState::Drained, Health::Up),
                    'X' => (AdminState::Disabled, Health::Up),
                    other => panic!("unknown backend letter {other:?}"),
                };
                backend.admin = admin;
                health.insert(addr, up);
                cluster.backends.insert(backend.name.clone(), backend);
            }
            vip.clusters.insert(spec.name.to_owned(), cluster);
        }
        (vip, health)
    }

    fn run(specs: &[Spec], options: &PolicyOptions) -> Shares {
        let (vip, health) = build(specs);
        shares(&vip, |b| health[&b.addr], options)
    }

    fn check(case: &Case) {
        let got = run(&case.clusters, &case.options);
        let name = case.name;
        let cluster_share = |c: &str| got.clusters.iter().find(|s| s.name == c).map(|s| s.share);
        let backend_share = |b: &str| {
            got.backends
                .iter()
                .find(|s| s.backend == b)
                .map_or(0.0, |s| s.share)
        };
        for spec in &case.clusters {
            assert!(
                case.expect.iter().any(|(n, _)| *n == spec.name),
                "{name}: the table must give cluster {}'s share",
                spec.name
            );
        }
        for &(key, want) in case.expect {
            let have = match cluster_share(key) {
                Some(share) => share,
                None => backend_share(key),
            };
            assert!(
                (have - want).abs() < EPS,
                "{name}: {key} has share {have}, want {want}\n{got:#?}"
            );
        }
        assert_eq!(got.mode, case.mode, "{name}: mode\n{got:#?}");
        match (got.locality, case.locality) {
            (Locality::Partial { kept: have }, Locality::Partial { kept: want }) => {
                assert!(
                    (have - want).abs() < EPS,
                    "{name}: kept {have}, want {want}"
                )
            }
            (have, want) => assert_eq!(have, want, "{name}: locality"),
        }
        check_invariants(name, &got);
    }

    /// What holds for every result, whatever the inputs.
    fn check_invariants(name: &str, got: &Shares) {
        let total: f64 = got.backends.iter().map(|b| b.share).sum();
        if got.mode == Mode::Empty {
            assert!(got.backends.is_empty(), "{name}: empty mode with backends");
            assert!(
                got.clusters.iter().all(|c| c.share == 0.0),
                "{name}: empty mode with shares"
            );
        } else {
            assert!(
                (total - 1.0).abs() < EPS,
                "{name}: shares sum to {total}\n{got:#?}"
            );
        }
        for b in &got.backends {
            assert!(b.share > 0.0 && b.share <= 1.0 + EPS, "{name}: {b:?}");
        }
        for c in &got.clusters {
            let sum: f64 = got
                .backends
                .iter()
                .filter(|b| b.cluster == c.name)
                .map(|b| b.share)
                .sum();
            assert!(
                (sum - c.share).abs() < EPS,
                "{name}: cluster {} {} vs backends {sum}",
                c.name,
                c.share
            );
        }
        let levels: f64 = got.levels.iter().map(|l| l.share).sum();
        assert!(
            (levels - total).abs() < EPS,
            "{name}: levels sum to {levels}, backends to {total}"
        );
    }

    #[test]
    fn active_active_clusters_share_by_weight_and_capacity() {
        let cases = [
            Case {
                name: "two clusters 1:1, all healthy: half each",
                clusters: vec![c("a", 1, 0, "UUUU"), c("b", 1, 0, "UUUU")],
                options: defaults(),
                expect: &[("a", 0.5), ("b", 0.5), ("a/0", 0.125), ("b/3", 0.125)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "b loses half its backends: its share halves relative to a",
                clusters: vec![c("a", 1, 0, "UUUU"), c("b", 1, 0, "UUDD")],
                options: defaults(),
                expect: &[
                    ("a", 2.0 / 3.0),
                    ("b", 1.0 / 3.0),
                    ("b/0", 1.0 / 6.0),
                    ("b/2", 0.0),
                ],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "cluster weights 3:1",
                clusters: vec![c("a", 3, 0, "UUUU"), c("b", 1, 0, "UUUU")],
                options: defaults(),
                expect: &[("a", 0.75), ("b", 0.25)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "weights 3:1, a at half capacity: 1.5 against 1",
                clusters: vec![c("a", 3, 0, "UUDD"), c("b", 1, 0, "UUUU")],
                options: defaults(),
                expect: &[("a", 0.6), ("b", 0.4)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "a whole cluster down: all to the other (half healthy is not panic)",
                clusters: vec![c("a", 1, 0, "UUUU"), c("b", 1, 0, "DDDD")],
                options: defaults(),
                expect: &[("a", 1.0), ("b", 0.0), ("a/0", 0.25)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "three clusters, one empty of backends: it counts as no capacity",
                clusters: vec![c("a", 1, 0, "UU"), c("b", 1, 0, "UU"), c("c", 1, 0, "")],
                options: defaults(),
                expect: &[("a", 0.5), ("b", 0.5), ("c", 0.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
        ];
        cases.iter().for_each(check);
    }

    #[test]
    fn priority_levels_spill_with_the_overprovisioning_factor() {
        let cases = [
            Case {
                name: "active-passive, primary 80% healthy: 0.8 × 1.4 ≥ 1, all on primary",
                clusters: vec![c("primary", 1, 0, "UUUUUUUUDD"), c("standby", 1, 1, "UUUU")],
                options: defaults(),
                expect: &[("primary", 1.0), ("standby", 0.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "primary 5 of 7 healthy: exactly on the line (5/7 × 1.4 = 1), nothing spills",
                clusters: vec![c("primary", 1, 0, "UUUUUDD"), c("standby", 1, 1, "UUUU")],
                options: defaults(),
                expect: &[("primary", 1.0), ("standby", 0.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "primary 70% healthy: 0.98, 2% spills",
                clusters: vec![c("primary", 1, 0, "UUUUUUUDDD"), c("standby", 1, 1, "UUUU")],
                options: defaults(),
                expect: &[("primary", 0.98), ("standby", 0.02)],
                mode: spilled(0, 1),
                locality: Locality::Off,
            },
            Case {
                name: "primary 50% healthy: 70% primary, 30% standby",
                clusters: vec![c("primary", 1, 0, "UUUUUDDDDD"), c("standby", 1, 1, "UUUU")],
                options: defaults(),
                expect: &[
                    ("primary", 0.7),
                    ("standby", 0.3),
                    ("primary/0", 0.14),
                    ("standby/0", 0.075),
                ],
                mode: spilled(0, 1),
                locality: Locality::Off,
            },
            Case {
                name: "primary all down, standby healthy: a failover, not a panic",
                clusters: vec![c("primary", 1, 0, "DDDD"), c("standby", 1, 1, "UUUU")],
                options: defaults(),
                expect: &[("primary", 0.0), ("standby", 1.0)],
                mode: spilled(0, 1),
                locality: Locality::Off,
            },
            Case {
                name: "a level of two clusters, one down: level health 0.7, 30% spills",
                clusters: vec![
                    c("a", 1, 0, "UUUU"),
                    c("b", 1, 0, "DDDD"),
                    c("standby", 1, 1, "UU"),
                ],
                options: defaults(),
                expect: &[("a", 0.7), ("b", 0.0), ("standby", 0.3)],
                mode: spilled(0, 1),
                locality: Locality::Off,
            },
            Case {
                name: "three levels: 0.35 + 0.35, the last takes the remaining 0.3",
                clusters: vec![
                    c("p0", 1, 0, "UDDD"),
                    c("p1", 1, 1, "UDDD"),
                    c("p2", 1, 2, "UUUU"),
                ],
                options: defaults(),
                expect: &[("p0", 0.35), ("p1", 0.35), ("p2", 0.3)],
                mode: spilled(0, 2),
                locality: Locality::Off,
            },
            Case {
                name: "all levels together short (0.56 + 0.28 < 1): normalised, 2/3 and 1/3",
                clusters: vec![c("p0", 1, 0, "UUDDD"), c("p1", 1, 1, "UDDDD")],
                options: defaults(),
                expect: &[("p0", 2.0 / 3.0), ("p1", 1.0 / 3.0)],
                mode: spilled(0, 1),
                locality: Locality::Off,
            },
            Case {
                name: "priorities are ordered by number, not name; gaps are fine",
                clusters: vec![c("a-standby", 1, 7, "UU"), c("z-primary", 1, 3, "UUDD")],
                options: defaults(),
                expect: &[("z-primary", 0.7), ("a-standby", 0.3)],
                mode: spilled(3, 7),
                locality: Locality::Off,
            },
            Case {
                name: "overprovisioning 1: any loss spills",
                clusters: vec![c("primary", 1, 0, "UUUUUUUUUD"), c("standby", 1, 1, "UU")],
                options: PolicyOptions {
                    overprovisioning: 1.0,
                    ..defaults()
                },
                expect: &[("primary", 0.9), ("standby", 0.1)],
                mode: spilled(0, 1),
                locality: Locality::Off,
            },
        ];
        cases.iter().for_each(check);
    }

    #[test]
    fn panic_balances_over_every_enabled_backend() {
        let cases = [
            Case {
                name: "4 of 10 healthy: panic, all 10 take 10%",
                clusters: vec![c("a", 1, 0, "UUUUDDDDDD")],
                options: defaults(),
                expect: &[("a", 1.0), ("a/0", 0.1), ("a/9", 0.1)],
                mode: Mode::Panic,
                locality: Locality::Off,
            },
            Case {
                name: "5 of 10 healthy: not below the threshold, the 5 take 20%",
                clusters: vec![c("a", 1, 0, "UUUUUDDDDD")],
                options: defaults(),
                expect: &[("a", 1.0), ("a/0", 0.2), ("a/9", 0.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "4 of 10 healthy, panic off: the 4 take 25%",
                clusters: vec![c("a", 1, 0, "UUUUDDDDDD")],
                options: no_panic(),
                expect: &[("a", 1.0), ("a/0", 0.25), ("a/9", 0.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "a down, b 2 of 4: 25% healthy, panic spreads over both clusters by weight",
                clusters: vec![c("a", 1, 0, "DDDD"), c("b", 1, 0, "UUDD")],
                options: defaults(),
                expect: &[("a", 0.5), ("b", 0.5), ("a/0", 0.125), ("b/3", 0.125)],
                mode: Mode::Panic,
                locality: Locality::Off,
            },
            Case {
                name: "panic keeps priorities: dead primary gets nothing, all of standby shares",
                clusters: vec![c("primary", 1, 0, "DDDD"), c("standby", 1, 1, "UDDD")],
                options: defaults(),
                expect: &[("primary", 0.0), ("standby", 1.0), ("standby/3", 0.25)],
                mode: Mode::Panic,
                locality: Locality::Off,
            },
            Case {
                name: "panic never uses drained or disabled backends",
                clusters: vec![c("a", 1, 0, "UDDDRX")],
                options: defaults(),
                expect: &[
                    ("a", 1.0),
                    ("a/0", 0.25),
                    ("a/3", 0.25),
                    ("a/4", 0.0),
                    ("a/5", 0.0),
                ],
                mode: Mode::Panic,
                locality: Locality::Off,
            },
            Case {
                name: "all down: panic fails open over every enabled backend",
                clusters: vec![c("a", 1, 0, "DDDD"), c("b", 1, 0, "DD")],
                options: defaults(),
                expect: &[("a", 0.5), ("b", 0.5), ("a/0", 0.125), ("b/0", 0.25)],
                mode: Mode::Panic,
                locality: Locality::Off,
            },
            Case {
                name: "all down in active-passive: fail open on the primary",
                clusters: vec![c("primary", 1, 0, "DD"), c("standby", 1, 1, "DD")],
                options: defaults(),
                expect: &[("primary", 1.0), ("standby", 0.0)],
                mode: Mode::Panic,
                locality: Locality::Off,
            },
            Case {
                name: "all down, panic off: nothing takes new flows",
                clusters: vec![c("a", 1, 0, "DDDD"), c("b", 1, 0, "DD")],
                options: no_panic(),
                expect: &[("a", 0.0), ("b", 0.0)],
                mode: Mode::Empty,
                locality: Locality::Off,
            },
        ];
        cases.iter().for_each(check);
    }

    #[test]
    fn drained_and_disabled_backends_are_capacity_removed() {
        let cases = [
            Case {
                name: "b drains half: like losing half, 2/3 and 1/3",
                clusters: vec![c("a", 1, 0, "UUUU"), c("b", 1, 0, "UURR")],
                options: defaults(),
                expect: &[
                    ("a", 2.0 / 3.0),
                    ("b", 1.0 / 3.0),
                    ("b/1", 1.0 / 6.0),
                    ("b/2", 0.0),
                ],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "b disables half: the same",
                clusters: vec![c("a", 1, 0, "UUUU"), c("b", 1, 0, "UUXX")],
                options: defaults(),
                expect: &[("a", 2.0 / 3.0), ("b", 1.0 / 3.0), ("b/3", 0.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "draining half the primary spills 30% to the standby",
                clusters: vec![c("primary", 1, 0, "UUUUURRRRR"), c("standby", 1, 1, "UU")],
                options: defaults(),
                expect: &[("primary", 0.7), ("standby", 0.3)],
                mode: spilled(0, 1),
                locality: Locality::Off,
            },
            Case {
                name: "draining most of a cluster is not a panic: the 2 left take half each",
                clusters: vec![c("a", 1, 0, "RRRRRRUU")],
                options: defaults(),
                expect: &[("a", 1.0), ("a/6", 0.5), ("a/7", 0.5), ("a/0", 0.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "everything drained or disabled: nothing takes new flows, even in panic",
                clusters: vec![c("a", 1, 0, "RRXX"), c("b", 1, 1, "X")],
                options: defaults(),
                expect: &[("a", 0.0), ("b", 0.0)],
                mode: Mode::Empty,
                locality: Locality::Off,
            },
        ];
        cases.iter().for_each(check);
    }

    #[test]
    fn weights_within_a_cluster_and_weight_zero() {
        let cases = [
            Case {
                name: "backend weights 1:3",
                clusters: vec![c("a", 1, 0, "UU").weights(&[1, 3])],
                options: defaults(),
                expect: &[("a", 1.0), ("a/0", 0.25), ("a/1", 0.75)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "the weight-3 backend down: a keeps capacity 1/4 against b's 1",
                clusters: vec![c("a", 1, 0, "UD").weights(&[1, 3]), c("b", 1, 0, "UUUU")],
                options: defaults(),
                expect: &[("a", 0.2), ("b", 0.8), ("a/0", 0.2), ("a/1", 0.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "a cluster of weight 0 takes nothing",
                clusters: vec![c("a", 1, 0, "UU"), c("b", 0, 0, "UU")],
                options: defaults(),
                expect: &[("a", 1.0), ("b", 0.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "a backend of weight 0 takes nothing",
                clusters: vec![c("a", 1, 0, "UU").weights(&[0, 1])],
                options: defaults(),
                expect: &[("a", 1.0), ("a/0", 0.0), ("a/1", 1.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "a backend of weight 0 is no capacity lost when down",
                clusters: vec![
                    c("primary", 1, 0, "UD").weights(&[1, 0]),
                    c("standby", 1, 1, "U"),
                ],
                options: defaults(),
                expect: &[("primary", 1.0), ("standby", 0.0)],
                mode: NORMAL,
                locality: Locality::Off,
            },
            Case {
                name: "only weight-0 clusters: nothing takes new flows",
                clusters: vec![c("a", 0, 0, "UU")],
                options: defaults(),
                expect: &[("a", 0.0)],
                mode: Mode::Empty,
                locality: Locality::Off,
            },
            Case {
                name: "no clusters at all: nothing takes new flows",
                clusters: vec![],
                options: defaults(),
                expect: &[],
                mode: Mode::Empty,
                locality: Locality::Off,
            },
        ];
        cases.iter().for_each(check);
    }

    #[test]
    fn locality_keeps_traffic_local_while_healthy_enough() {
        let cases = [
            Case {
                name: "local cluster healthy: all local",
                clusters: vec![c("a", 1, 0, "UUUU"), c("b", 1, 0, "UUUU")],
                options: local("a"),
                expect: &[("a", 1.0), ("b", 0.0), ("a/0", 0.25)],
                mode: NORMAL,
                locality: Locality::Local,
            },
            Case {
                name: "local 80% healthy: 0.8 × 1.4 ≥ 1, still all local",
                clusters: vec![c("a", 1, 0, "UUUUUUUUDD"), c("b", 1, 0, "UUUU")],
                options: local("a"),
                expect: &[("a", 1.0), ("b", 0.0)],
                mode: NORMAL,
                locality: Locality::Local,
            },
            Case {
                name: "local half healthy: keeps 70%, the other cluster takes 30%",
                clusters: vec![c("a", 1, 0, "UUDD"), c("b", 1, 0, "UUUU")],
                options: local("a"),
                expect: &[("a", 0.7), ("b", 0.3), ("a/0", 0.35)],
                mode: NORMAL,
                locality: Locality::Partial { kept: 0.7 },
            },
            Case {
                name: "local half healthy: the rest goes to the others by weight × capacity",
                clusters: vec![
                    c("a", 1, 0, "UUDD"),
                    c("b", 1, 0, "UUUU"),
                    c("c", 2, 0, "UUUU"),
                ],
                options: local("a"),
                expect: &[("a", 0.7), ("b", 0.1), ("c", 0.2)],
                mode: NORMAL,
                locality: Locality::Partial { kept: 0.7 },
            },
            Case {
                name: "local cluster down: all to the others",
                clusters: vec![c("a", 1, 0, "DDDD"), c("b", 1, 0, "UUUU")],
                options: local("a"),
                expect: &[("a", 0.0), ("b", 1.0)],
                mode: NORMAL,
                locality: Locality::Partial { kept: 0.0 },
            },
            Case {
                name: "locality factor 1: keeps exactly its healthy fraction",
                clusters: vec![c("a", 1, 0, "UUUUUUUUDD"), c("b", 1, 0, "UUUU")],
                options: PolicyOptions {
                    locality_overprovisioning: 1.0,
                    ..local("a")
                },
                expect: &[("a", 0.8), ("b", 0.2)],
                mode: NORMAL,
                locality: Locality::Partial { kept: 0.8 },
            },
            Case {
                name: "local cluster the only one of its level left: keeps its level's 35%",
                clusters: vec![
                    c("a", 1, 0, "UUDD"),
                    c("b", 1, 0, "DDDD"),
                    c("standby", 1, 1, "UUUU"),
                ],
                options: local("a"),
                expect: &[("a", 0.35), ("b", 0.0), ("standby", 0.65)],
                mode: spilled(0, 1),
                locality: Locality::Local,
            },
            Case {
                name: "locality does not override priorities: a local standby stays idle",
                clusters: vec![c("a", 1, 0, "UUUU"), c("mine", 1, 1, "UUUU")],
                options: local("mine"),
                expect: &[("a", 1.0), ("mine", 0.0)],
                mode: NORMAL,
                locality: Locality::Idle,
            },
            Case {
                name: "a local cluster the VIP does not have changes nothing",
                clusters: vec![c("a", 1, 0, "UUUU"), c("b", 1, 0, "UUUU")],
                options: local("elsewhere"),
                expect: &[("a", 0.5), ("b", 0.5)],
                mode: NORMAL,
                locality: Locality::Absent,
            },
            Case {
                name: "panic with locality: the dead local cluster is skipped, b spreads",
                clusters: vec![c("a", 1, 0, "DDDD"), c("b", 1, 0, "UDDD")],
                options: local("a"),
                expect: &[("a", 0.0), ("b", 1.0), ("b/3", 0.25)],
                mode: Mode::Panic,
                locality: Locality::Partial { kept: 0.0 },
            },
            Case {
                name: "nothing can take traffic: locality idle",
                clusters: vec![c("a", 1, 0, "RR"), c("b", 1, 0, "XX")],
                options: local("a"),
                expect: &[("a", 0.0), ("b", 0.0)],
                mode: Mode::Empty,
                locality: Locality::Idle,
            },
        ];
        cases.iter().for_each(check);
    }

    #[test]
    fn status_reports_capacity_health_and_levels() {
        let got = run(
            &[
                c("a", 1, 0, "UDRR"),
                c("b", 1, 0, "UU"),
                c("standby", 1, 1, "UU"),
            ],
            &defaults(),
        );
        let a = &got.clusters[0];
        assert_eq!((a.name.as_str(), a.priority, a.weight), ("a", 0, 1));
        assert!((a.capacity - 0.25).abs() < EPS);
        assert_eq!(a.healthy, Some(0.5));
        // Level 0: capacity (0.25 + 1) / 2 = 0.625, health 0.875.
        assert_eq!(got.levels.len(), 2);
        assert!((got.levels[0].capacity - 0.625).abs() < EPS);
        assert!((got.levels[0].health - 0.875).abs() < EPS);
        assert!((got.levels[0].share - 0.875).abs() < EPS);
        assert!((got.levels[1].share - 0.125).abs() < EPS);
        // Healthy: level 0 (0.5 + 1) / 2 = 0.75, plus the standby's 1, capped.
        assert_eq!(got.healthy, 1.0);

        let drained = run(&[c("a", 1, 0, "RR")], &defaults());
        assert_eq!(drained.clusters[0].healthy, None);
        assert_eq!(drained.clusters[0].capacity, 0.0);
    }

    #[test]
    fn to_weights_scales_and_never_rounds_a_share_away() {
        let got = run(&[c("a", 1, 0, "UU").weights(&[1, 3])], &defaults());
        let a0 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
        let a1 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(
            to_weights(&got, 1_000_000),
            vec![(a0, 250_000), (a1, 750_000)]
        );

        // 1 against 4 billion: far below one part in a million, still 1.
        let tiny = run(
            &[c("a", 1, 0, "UU").weights(&[1, 4_000_000_000])],
            &defaults(),
        );
        assert_eq!(to_weights(&tiny, 1_000_000), vec![(a0, 1), (a1, 1_000_000)]);

        let empty = run(&[c("a", 1, 0, "DD")], &no_panic());
        assert_eq!(to_weights(&empty, 1_000_000), vec![]);
    }

    #[test]
    fn to_weights_merges_an_address_in_two_clusters() {
        let (mut vip, health) = build(&[c("a", 1, 0, "UU"), c("b", 1, 0, "UU")]);
        let shared = vip.clusters["a"].backends["a/0"].addr;
        vip.clusters
            .get_mut("b")
            .unwrap()
            .backends
            .get_mut("b/0")
            .unwrap()
            .addr = shared;
        let got = shares(&vip, |b| health[&b.addr], &defaults());
        let weights = to_weights(&got, 1_000);
        assert_eq!(weights.len(), 3);
        assert_eq!(weights[0], (shared, 500));
        assert!(
            weights.windows(2).all(|w| w[0].0 < w[1].0),
            "ordered by address"
        );
    }

    #[test]
    fn options_validate_their_ranges() {
        assert_eq!(defaults().validate(), Ok(()));
        assert_eq!(no_panic().validate(), Ok(()));
        let bad = |options: PolicyOptions| options.validate().unwrap_err().field;
        assert_eq!(
            bad(PolicyOptions {
                overprovisioning: 0.9,
                ..defaults()
            }),
            "overprovisioning"
        );
        assert_eq!(
            bad(PolicyOptions {
                locality_overprovisioning: f64::NAN,
                ..defaults()
            }),
            "locality_overprovisioning"
        );
        assert_eq!(
            bad(PolicyOptions {
                panic_threshold: 1.5,
                ..defaults()
            }),
            "panic_threshold"
        );
        let message = PolicyOptions {
            panic_threshold: -1.0,
            ..defaults()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            message.starts_with("panic_threshold = -1: must be between 0"),
            "{message}"
        );
    }

    /// Many generated VIPs: the invariants hold, only usable backends take
    /// flows outside panic, and no drained or disabled backend ever does.
    #[test]
    fn invariants_hold_for_generated_vips() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..20_000 {
            let mut vip = Vip::new(
                "v",
                IpAddr::V4(Ipv4Addr::new(198, 18, 255, 1)),
                0,
                Proto::Udp,
            );
            let mut health = HashMap::new();
            for i in 0..next(5) {
                let name = format!("c{i}");
                let mut cluster = Cluster::new(&name, next(4) as u32, next(3) as u32);
                for j in 0..next(6) {
                    let addr = IpAddr::V4(Ipv4Addr::new(198, 18, i as u8, j as u8 + 1));
                    let mut b = Backend::new(format!("b{j}"), addr, next(4) as u32);
                    b.admin = [
                        AdminState::Enabled,
                        AdminState::Enabled,
                        AdminState::Drained,
                        AdminState::Disabled,
                    ][next(4) as usize];
                    health.insert(
                        addr,
                        if next(3) == 0 {
                            Health::Down
                        } else {
                            Health::Up
                        },
                    );
                    cluster.backends.insert(b.name.clone(), b);
                }
                vip.clusters.insert(name, cluster);
            }
            let options = PolicyOptions {
                overprovisioning: [1.0, 1.4, 2.0][next(3) as usize],
                panic_threshold: [0.0, 0.5, 0.8][next(3) as usize],
                local_cluster: [None, Some("c0".to_owned()), Some("c1".to_owned())]
                    [next(3) as usize]
                    .clone(),
                locality_overprovisioning: [1.0, 1.4][next(2) as usize],
            };
            let got = shares(&vip, |b| health[&b.addr], &options);
            let name = format!("round {round}: {vip:?} {options:?}");
            check_invariants(&name, &got);
            for b in &got.backends {
                let backend = &vip.clusters[&b.cluster].backends[&b.backend];
                assert_eq!(backend.admin, AdminState::Enabled, "{name}");
                assert!(backend.weight > 0, "{name}");
                assert!(vip.clusters[&b.cluster].weight > 0, "{name}");
                if got.mode != Mode::Panic {
                    assert_eq!(health[&b.addr], Health::Up, "{name}");
                }
            }
            let any_usable = vip.backends().any(|(c, b)| {
                c.weight > 0
                    && b.weight > 0
                    && b.admin == AdminState::Enabled
                    && health[&b.addr] == Health::Up
            });
            if any_usable {
                assert_ne!(got.mode, Mode::Empty, "{name}");
            }
            let weights = to_weights(&got, 1_000_000);
            assert_eq!(weights.is_empty(), got.backends.is_empty(), "{name}");
            assert!(weights.iter().all(|&(_, w)| w > 0), "{name}");
        }
    }
}
