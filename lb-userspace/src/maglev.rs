//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016): the lookup table, or ring,
//! whose slot `ring_slot(flow hash)` names a flow's backend. Pure: no I/O,
//! no clock, no global state; [`build`] is a function of its arguments.
//!
//! # Population
//! Every member (backend) has a preference list over the `M` slots (`M`
//! prime): `offset = h1(key) mod M`, `skip = h2(key) mod (M - 1) + 1`, and
//! its `j`-th preference is `(offset + j·skip) mod M`, a permutation of all
//! slots because `M` is prime. Members take turns; on its turn a member
//! claims its next preferred slot that is still free, until all `M` slots
//! are taken. Turns go in the order of the members' keys, so the ring
//! depends on the set of members, never on the order they are given in.
//!
//! # Weights
//! Weights are ratios. The `M` slots are first apportioned exactly: member
//! `i` gets `⌊M·wᵢ/W⌋` slots (`W` the sum of the weights) and the slots left
//! over go one each to the largest remainders (ties: key order), so every
//! member's slot count is within one slot of `M·wᵢ/W` (1:10 gives 1:10 to
//! within 0.02 % at `M = 65537`). The turns then spread each member's quota
//! `qᵢ` evenly over `q_max` rounds: a member takes a turn in round `r` when
//! `⌈r·qᵢ/q_max⌉` grows, i.e. every round for the largest quota, and for a
//! member with half of it every other round. With equal weights this is the
//! paper's round robin exactly, the first `M mod N` members (key order)
//! taking the one extra turn of the last round. A weight of 0 takes the
//! member out of the ring (drain: the connection table keeps its flows). A
//! member whose share is below one slot may get none: its share rounds down.
//!
//! # The contract: identical rings everywhere
//! Two xlb nodes with the same members (key, id, weight), size and seed
//! build identical rings, in every release. What fixes the ring, and so must
//! never change without a new ring version:
//! - `h1(key) = XXH64(key, seed)` and `h2(key) = XXH64(key, seed ^
//!   0x9e3779b97f4a7c15)` ([`SKIP_SEED_XOR`]), XXH64 being the 64-bit
//!   xxHash of the xxHash specification (frozen since 2014; the tests pin it
//!   with reference vectors);
//! - keys compared as byte strings (lexicographically) for the turn order;
//! - the apportionment and the turn rule above.
//!
//! The tests pin all three with vectors and whole rings computed by an
//! independent implementation (`golden_*` tests): a change that moves any
//! slot fails them.
//!
//! # Sizes
//! [`build`] takes any prime size at least as large as the number of
//! members. Configuration should use [`check_size`], which also wants at
//! least [`SLOTS_PER_BACKEND`] (100) slots per backend, the paper's bound for
//! shares within 1 % of their due, and at least [`MIN_SIZE`].
//!
//! # Disruption (measured)
//! Removing `k` of `N` equal members changes the removed members' slots
//! (`k/N` of the ring, unavoidable) plus an excess: slots that move between
//! the survivors, whose turns now reach further down their preference
//! lists. Measured by the `measure_disruption` test (100 seeds; mean, and
//! the largest excess seen):
//!
//! |    N |  k |      M | minimum | changed | excess | excess, largest |
//! |------|----|--------|---------|---------|--------|-----------------|
//! |    3 |  1 |  65537 |  33.33% |  33.40% |  0.06% |  2.2%           |
//! |   10 |  1 |  65537 |  10%    |  10.24% |  0.24% |  0.56%          |
//! |  100 |  1 |  65537 |   1%    |   1.56% |  0.56% |  0.65%          |
//! |  100 | 10 |  65537 |  10%    |  11.02% |  1.02% |  1.23%          |
//! |   10 |  1 |   1009 |  10%    |  12.40% |  2.40% |  5.55%          |
//! |  100 |  1 |  10007 |   1%    |   2.59% |  1.59% |  1.87%          |
//! | 1000 |  1 | 100003 |   0.1%  |   0.67% |  0.57% |  0.62%          |
//! | 1000 |  1 | 655373 |   0.1%  |   0.43% |  0.33% |  0.34%          |
//!
//! The paper reports 33.4% for 1 of 3 and about 1.6% for 1 of 100 at
//! `M = 65537`: the same (with equal weights this is its algorithm, turn
//! for turn). The excess shrinks as the slots per backend grow, on average
//! about 0.1 to 0.25 × √(N/M) of the ring; the property test bounds its
//! mean over 8 seeds by `k/(4N) + √(N/M)`.
//!
//! The tail: when two members draw the same skip (or skips in a small
//! integer ratio), their preference lists are one sequence, shifted, and
//! removing a third member can move much of the ring between those two:
//! up to 90% of the ring with N = 3 at M = 307, 16% with N = 5 at
//! M = 26947, in samples of 40,000 random rings. Equal skips occur with
//! probability about N²/(2M), so this is a risk of small rings with few
//! backends, rare at the default size.
//!
//! Adding the removed members back restores the original ring exactly (the
//! ring is a function of the member set).
//!
//! # Cost
//! Offsets and skips are computed once per member (with `j·skip mod M` for
//! j = 1..4). The fill walks each preference list four entries at a time,
//! each an add and a conditional subtract from the first (no division),
//! tests them in a bitmap of taken slots (`M/8` bytes, in cache) and picks
//! the first free one without a branch. When only about √(M/3) slots are
//! left, the end game replaces probing (about M/F probes for one of F free
//! slots) with computing each free slot's place in the member's list
//! (`(slot - pos)·skip⁻¹ mod M`, Barrett-reduced). Skewed weights use a
//! heap of next turns instead of visiting every member every round. The
//! result is the same either way (tests). `cargo xtask bench maglev`
//! measures it: on a 2-core EPYC VM, median 0.64 to 0.71 ms at M = 65537
//! and 7.2 to 8.5 ms at M = 655373 for N = 10 to 1000 equal backends (the
//! paper: 1.8 ms and 22.9 ms, N not given).

use std::{cmp::Reverse, collections::BinaryHeap, fmt};

use xxhash_rust::xxh64::xxh64;

/// One backend of a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Member<'a> {
    /// Stable identity: what the preference list is hashed from, e.g. the
    /// backend's address bytes (not its name, not its id, which may change
    /// while the backend stays the same). Unique within a ring.
    pub key: &'a [u8],
    /// What the ring's slots hold for this member: its backend id. Unique
    /// within a ring.
    pub id: u32,
    /// Share of the ring relative to the other members; 0: not in the ring.
    pub weight: u32,
}

impl<'a> Member<'a> {
    pub fn new(key: &'a [u8], id: u32, weight: u32) -> Self {
        Self { key, id, weight }
    }
}

/// The smallest size [`check_size`] allows: the smallest prime ≥ 100, the
/// 100-slots-per-backend bound for one backend.
pub const MIN_SIZE: u32 = 101;

/// [`check_size`] wants at least this many slots per backend: the paper's
/// bound for every backend's share to be within 1 % of its due.
pub const SLOTS_PER_BACKEND: u32 = 100;

/// Ring sizes to offer, smallest first: the default (65537), then primes
/// near powers of two and the paper's 655373. Each allows
/// `size / 100` backends under [`check_size`].
pub const SUGGESTED_SIZES: &[u32] = &[65537, 131071, 262147, 524287, 655373, 1048573];

/// `h2`'s seed is the ring's seed XOR this (the 64-bit golden ratio), so
/// that `h1` and `h2` are independent hashes of the same key.
pub const SKIP_SEED_XOR: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// No member has a weight above 0.
    #[error("no backend with a weight above 0: a ring needs at least one")]
    NoBackends,
    #[error("ring size {size} is not a prime; {}", Allowed(*minimum))]
    NotPrime {
        size: u32,
        /// The smallest size that would be large enough.
        minimum: u64,
    },
    #[error(
        "ring size {size} is too small for {backends} backend(s): {why}, so at least {minimum}; {}",
        Allowed(*minimum)
    )]
    TooSmall {
        size: u32,
        backends: usize,
        minimum: u64,
        why: &'static str,
    },
    #[error("two backends have the same key {}", Hex(key))]
    DuplicateKey { key: Vec<u8> },
    #[error("two backends have the same id {id}")]
    DuplicateId { id: u32 },
}

/// Says which sizes are allowed given the smallest one that is large
/// enough.
struct Allowed(u64);

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let minimum = self.0;
        let Some(smallest) = u32::try_from(minimum)
            .ok()
            .and_then(smallest_prime_at_least)
        else {
            return write!(f, "no 32-bit size is at least {minimum}");
        };
        write!(
            f,
            "allowed: a prime ≥ {minimum}, the smallest being {smallest}"
        )?;
        let mut common = SUGGESTED_SIZES
            .iter()
            .filter(|&&size| u64::from(size) >= minimum)
            .peekable();
        if common.peek().is_some() {
            f.write_str("; commonly used: ")?;
            for (n, size) in common.enumerate() {
                if n > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{size}")?;
                if *size == lb_common::DEFAULT_RING_SIZE {
                    f.write_str(" (the default)")?;
                }
            }
        }
        Ok(())
    }
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Whether `size` is a valid ring size for `backends` backends in a
/// configuration: a prime, at least [`MIN_SIZE`] and at least
/// [`SLOTS_PER_BACKEND`] × `backends`. The error says which sizes are
/// allowed.
pub fn check_size(size: u32, backends: usize) -> Result<(), MaglevError> {
    let minimum = (u64::from(SLOTS_PER_BACKEND))
        .saturating_mul(backends as u64)
        .max(u64::from(MIN_SIZE));
    if !is_prime(size) {
        return Err(MaglevError::NotPrime { size, minimum });
    }
    if u64::from(size) < minimum {
        return Err(MaglevError::TooSmall {
            size,
            backends,
            minimum,
            why: "it needs 100 slots per backend for shares within 1% of their weights, \
                  and at least 101",
        });
    }
    Ok(())
}

/// The smallest of [`SUGGESTED_SIZES`] that [`check_size`] accepts for
/// `backends` backends; beyond the list, the smallest prime that it accepts
/// (saturating at the largest 32-bit prime).
pub fn smallest_size_for(backends: usize) -> u32 {
    let minimum = u64::from(SLOTS_PER_BACKEND)
        .saturating_mul(backends as u64)
        .max(u64::from(MIN_SIZE));
    if let Some(&size) = SUGGESTED_SIZES
        .iter()
        .find(|&&size| u64::from(size) >= minimum)
    {
        return size;
    }
    u32::try_from(minimum)
        .ok()
        .and_then(smallest_prime_at_least)
        .unwrap_or(LARGEST_U32_PRIME)
}

const LARGEST_U32_PRIME: u32 = 4_294_967_291;

/// Whether `n` is prime (trial division by 6k ± 1: at most ~22k steps).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The smallest prime ≥ `n`, if one fits in a `u32`.
pub fn smallest_prime_at_least(n: u32) -> Option<u32> {
    (n..=u32::MAX).find(|&candidate| is_prime(candidate))
}

/// A member's preference list in `size` slots: `(offset, skip)`, its `j`-th
/// preference being `(offset + j·skip) mod size`. Part of the ring contract
/// (see the module docs). `size` must be at least 2.
pub fn preference(key: &[u8], size: u32, seed: u64) -> (u32, u32) {
    debug_assert!(size >= 2);
    let m = u64::from(size);
    let offset = xxh64(key, seed) % m;
    let skip = xxh64(key, seed ^ SKIP_SEED_XOR) % (m - 1) + 1;
    (offset as u32, skip as u32)
}

/// Builds the ring of `size` slots (a prime, at least the number of members
/// with a weight above 0) for `members`. Each slot holds a member's `id`;
/// members of weight 0 hold none. Depends only on the set of members (their
/// key, id and weight), `size` and `seed`: see the module docs.
pub fn build(members: &[Member<'_>], size: u32, seed: u64) -> Result<Vec<u32>, MaglevError> {
    build_with(members, size, seed, None)
}

/// How the turns are scheduled; both give the same ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Schedule {
    Rounds,
    Heap,
}

/// [`build`], with the schedule forced (tests) or chosen by cost (`None`).
fn build_with(
    members: &[Member<'_>],
    size: u32,
    seed: u64,
    schedule: Option<Schedule>,
) -> Result<Vec<u32>, MaglevError> {
    let mut sorted: Vec<&Member<'_>> = members.iter().collect();
    sorted.sort_unstable_by(|a, b| a.key.cmp(b.key));
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].key == pair[1].key) {
        return Err(MaglevError::DuplicateKey {
            key: pair[0].key.to_vec(),
        });
    }
    let mut ids: Vec<u32> = members.iter().map(|member| member.id).collect();
    ids.sort_unstable();
    if let Some(pair) = ids.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(MaglevError::DuplicateId { id: pair[0] });
    }
    sorted.retain(|member| member.weight > 0);
    if sorted.is_empty() {
        return Err(MaglevError::NoBackends);
    }
    let minimum = (sorted.len() as u64).max(2);
    if !is_prime(size) {
        return Err(MaglevError::NotPrime { size, minimum });
    }
    if u64::from(size) < minimum {
        return Err(MaglevError::TooSmall {
            size,
            backends: sorted.len(),
            minimum,
            why: "every backend needs a slot",
        });
    }

    let weights: Vec<u32> = sorted.iter().map(|member| member.weight).collect();
    let quotas = apportion(size, &weights);
    let mut turners: Vec<Turner> = sorted
        .iter()
        .zip(&quotas)
        .filter(|(_, quota)| **quota > 0)
        .map(|(member, &quota)| {
            let (offset, skip) = preference(member.key, size, seed);
            Turner {
                id: member.id,
                quota: u64::from(quota),
                pos: u64::from(offset),
                skips: [1, 2, 3, 4].map(|j| j * u64::from(skip) % u64::from(size)),
                credit: 0,
                inverse: 0,
            }
        })
        .collect();
    let mut fill = Fill::new(size);
    let q_max = turners.iter().map(|t| t.quota).max().unwrap_or(0);
    // Visiting every member every round costs `q_max · N` steps besides the
    // claims; past a few per slot, a heap of next turns is cheaper.
    let schedule = schedule.unwrap_or(
        if q_max.saturating_mul(turners.len() as u64)
            <= ROUNDS_MAX_VISITS_PER_SLOT * u64::from(size)
        {
            Schedule::Rounds
        } else {
            Schedule::Heap
        },
    );
    match schedule {
        Schedule::Rounds => fill_by_rounds(&mut turners, q_max, &mut fill),
        Schedule::Heap => fill_by_heap(&mut turners, q_max, &mut fill),
    }
    debug_assert_eq!(fill.claimed, u64::from(size));
    Ok(fill.ring)
}

/// Above this many member visits per slot, [`build`] schedules turns with a
/// heap rather than round by round (both give the same ring).
const ROUNDS_MAX_VISITS_PER_SLOT: u64 = 4;

/// Splits `size` slots in proportion to `weights` (all above 0): the
/// largest-remainder method, ties to the lower index. The result sums to
/// `size`, and each quota is within 1 of `size · w / W`.
fn apportion(size: u32, weights: &[u32]) -> Vec<u32> {
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let m = u128::from(size);
    let mut quotas = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    let mut assigned: u128 = 0;
    for (rank, &weight) in weights.iter().enumerate() {
        let product = m * u128::from(weight);
        let quota = product / total;
        assigned += quota;
        // quota ≤ size, so it fits.
        quotas.push(quota as u32);
        remainders.push((product % total, rank));
    }
    // Fewer than `weights.len()` slots are left over, one per largest remainder.
    let left = (m - assigned) as usize;
    if left > 0 {
        remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, rank) in &remainders[..left] {
            quotas[rank] += 1;
        }
    }
    quotas
}

/// A member in the fill: its preference list as a position and a stride.
struct Turner {
    id: u32,
    /// Slots it gets in all (≥ 1).
    quota: u64,
    /// Its next preference, in `0..M`.
    pos: u64,
    /// `j·skip mod M` for j = 1..=4 (skip in `1..M`).
    skips: [u64; 4],
    /// Turns so far (heap) or turn credit (rounds).
    credit: u64,
    /// `skip⁻¹ mod M`, once the end game needs it; 0 until then.
    inverse: u64,
}

/// The ring being filled, and which of its slots are taken.
struct Fill {
    ring: Vec<u32>,
    /// One bit per slot: 8 KiB for 65537 slots, so that the probes of
    /// taken slots (most of them, late in the fill) stay in L1/L2.
    taken: Vec<u64>,
    size: u64,
    claimed: u64,
    /// When this many slots are left, the end game starts.
    end_game_at: u64,
    /// In the end game: the free slots, in no order.
    free: Vec<u64>,
    /// `⌊(2⁶⁴ - 1) / M⌋`, for Barrett reduction.
    barrett: u64,
}

impl Fill {
    fn new(size: u32) -> Self {
        let m = u64::from(size);
        Self {
            ring: vec![0; size as usize],
            taken: vec![0; (size as usize).div_ceil(64)],
            size: m,
            claimed: 0,
            // Probing for one of F free slots costs about M/F probes; the
            // end game costs F multiplications, about three probes' worth
            // each: they break even near F = √(M/3).
            end_game_at: (m / 3).isqrt().max(1),
            free: Vec::new(),
            barrett: u64::MAX / m,
        }
    }

    /// `turner` takes its next preferred free slot.
    #[inline(always)]
    fn claim(&mut self, turner: &mut Turner) {
        let end_game = !self.free.is_empty();
        let slot = if end_game {
            self.end_game(turner)
        } else {
            self.probe(turner)
        };
        turner.pos = self.wrap(slot + turner.skips[0]);
        self.taken[(slot >> 6) as usize] |= 1 << (slot & 63);
        self.ring[slot as usize] = turner.id;
        self.claimed += 1;
        if !end_game && self.size - self.claimed == self.end_game_at {
            self.start_end_game();
        }
    }

    #[inline(always)]
    fn wrap(&self, pos: u64) -> u64 {
        if pos >= self.size {
            pos - self.size
        } else {
            pos
        }
    }

    /// The first free slot of `turner`'s preferences, from `turner.pos` on.
    /// Most preferences are taken late in the fill, so it looks at four at
    /// a time, each computed from the first (`pos + j·skip`, with
    /// `j·skip mod M` precomputed): one add-and-wrap on the loop's critical
    /// path per four probes, and one branch.
    #[inline(always)]
    fn probe(&self, turner: &Turner) -> u64 {
        let [s1, s2, s3, s4] = turner.skips;
        let taken = |slot: u64| (self.taken[(slot >> 6) as usize] >> (slot & 63)) & 1;
        let mut p0 = turner.pos;
        loop {
            let (p1, p2, p3) = (self.wrap(p0 + s1), self.wrap(p0 + s2), self.wrap(p0 + s3));
            // Bit j set: preference j is free. No branch on which one.
            let free = (taken(p0) | taken(p1) << 1 | taken(p2) << 2 | taken(p3) << 3) ^ 0b1111;
            if free != 0 {
                return [p0, p1, p2, p3][free.trailing_zeros() as usize];
            }
            p0 = self.wrap(p0 + s4);
        }
    }

    /// The end game: with only F slots free, finding one by probing takes
    /// about M/F probes, so instead every free slot's place in `turner`'s
    /// preference list is computed (`(slot - pos)·skip⁻¹ mod M` steps from
    /// its next preference) and the nearest one taken: the same slot,
    /// because every slot before it in the list is taken.
    fn end_game(&mut self, turner: &mut Turner) -> u64 {
        if turner.inverse == 0 {
            turner.inverse = inverse_mod(turner.skips[0], self.size);
        }
        let (m, barrett, inverse, pos) = (self.size, self.barrett, turner.inverse, turner.pos);
        let mut best = (u64::MAX, 0);
        for (index, &slot) in self.free.iter().enumerate() {
            let distance = if slot >= pos {
                slot - pos
            } else {
                slot + m - pos
            };
            let steps = mul_mod(distance, inverse, m, barrett);
            if steps < best.0 {
                best = (steps, index);
            }
        }
        self.free.swap_remove(best.1)
    }

    fn start_end_game(&mut self) {
        let m = self.size;
        for (word_index, &word) in self.taken.iter().enumerate() {
            let mut free = !word;
            while free != 0 {
                let slot = word_index as u64 * 64 + u64::from(free.trailing_zeros());
                if slot < m {
                    self.free.push(slot);
                }
                free &= free - 1;
            }
        }
        debug_assert_eq!(self.free.len() as u64, self.end_game_at);
    }
}

/// `a·b mod m` for `a, b < m < 2³²` by Barrett reduction (`barrett` =
/// `⌊(2⁶⁴ - 1)/m⌋`): a multiplication instead of a division.
#[inline(always)]
fn mul_mod(a: u64, b: u64, m: u64, barrett: u64) -> u64 {
    let x = a * b;
    let q = ((u128::from(x) * u128::from(barrett)) >> 64) as u64;
    // q is ⌊x/m⌋ or at most two less.
    let mut r = x - q * m;
    if r >= m {
        r -= m;
    }
    if r >= m {
        r -= m;
    }
    r
}

/// `a⁻¹ mod m` for `0 < a < m`, `m` prime (extended Euclid).
fn inverse_mod(a: u64, m: u64) -> u64 {
    let (mut old_r, mut r) = (a as i64, m as i64);
    let (mut old_s, mut s) = (1i64, 0i64);
    while r != 0 {
        let q = old_r / r;
        (old_r, r) = (r, old_r - q * r);
        (old_s, s) = (s, old_s - q * s);
    }
    debug_assert_eq!(old_r, 1);
    old_s.rem_euclid(m as i64) as u64
}

/// Round `r` (1-based) gives a turn to every member whose `⌈r·q/q_max⌉`
/// grows, in key order; `q_max` rounds make every quota. The credit starts
/// at `q_max - 1`, which turns the floor of the credit scheme into the
/// ceiling: every member has a turn in round 1.
fn fill_by_rounds(turners: &mut [Turner], q_max: u64, fill: &mut Fill) {
    for turner in turners.iter_mut() {
        turner.credit = q_max - 1;
    }
    for _round in 0..q_max {
        for turner in turners.iter_mut() {
            turner.credit += turner.quota;
            if turner.credit >= q_max {
                turner.credit -= q_max;
                fill.claim(turner);
            }
        }
    }
}

/// The same turns as [`fill_by_rounds`], in the same order, from a heap of
/// (round of the next turn, key rank): the `k`-th turn (from 1) of a member
/// with quota `q` is in round `⌈((k-1)·q_max + 1)/q⌉`.
fn fill_by_heap(turners: &mut [Turner], q_max: u64, fill: &mut Fill) {
    let round_of = |k: u64, quota: u64| ((k - 1) * q_max + quota) / quota;
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> =
        (0..turners.len()).map(|rank| Reverse((1, rank))).collect();
    for turner in turners.iter_mut() {
        turner.credit = 0;
    }
    while let Some(mut next) = heap.peek_mut() {
        let Reverse((_, rank)) = *next;
        let turner = &mut turners[rank];
        fill.claim(turner);
        turner.credit += 1;
        if turner.credit == turner.quota {
            std::collections::binary_heap::PeekMut::pop(next);
        } else {
            *next = Reverse((round_of(turner.credit + 1, turner.quota), rank));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    /// 198.19.0.0 + `n`, as address bytes.
    fn v4(n: u32) -> Vec<u8> {
        (0xc613_0000u32 + n).to_be_bytes().to_vec()
    }

    /// Members over `keys` with ids 0.. in the keys' order.
    fn members<'a>(keys: &'a [Vec<u8>], weights: &[u32]) -> Vec<Member<'a>> {
        assert_eq!(keys.len(), weights.len());
        keys.iter()
            .zip(weights)
            .zip(0u32..)
            .map(|((key, &weight), id)| Member::new(key, id, weight))
            .collect()
    }

    fn counts(ring: &[u32]) -> BTreeMap<u32, u64> {
        let mut counts = BTreeMap::new();
        for &id in ring {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    /// XXH64 of the ring as little-endian `u32`s: a fingerprint.
    fn fingerprint(ring: &[u32]) -> u64 {
        let bytes: Vec<u8> = ring.iter().flat_map(|id| id.to_le_bytes()).collect();
        xxh64(&bytes, 0)
    }

    fn prime(at_least: u32) -> u32 {
        smallest_prime_at_least(at_least).unwrap()
    }

    /// The paper's population, transcribed as it reads (equal weights,
    /// turns in key order, `(offset + j·skip) mod M` recomputed each probe).
    fn paper(members: &[Member<'_>], size: u32, seed: u64) -> Vec<u32> {
        let mut sorted = members.to_vec();
        sorted.sort_by(|a, b| a.key.cmp(b.key));
        let m = u64::from(size);
        let prefs: Vec<(u64, u64)> = sorted
            .iter()
            .map(|member| {
                let (offset, skip) = preference(member.key, size, seed);
                (u64::from(offset), u64::from(skip))
            })
            .collect();
        let mut next = vec![0u64; sorted.len()];
        let mut entry: Vec<Option<u32>> = vec![None; size as usize];
        let mut filled = 0;
        loop {
            for (i, member) in sorted.iter().enumerate() {
                let (offset, skip) = prefs[i];
                let mut c = (offset + next[i] * skip) % m;
                while entry[c as usize].is_some() {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                entry[c as usize] = Some(member.id);
                next[i] += 1;
                filled += 1;
                if filled == size {
                    return entry.into_iter().map(Option::unwrap).collect();
                }
            }
        }
    }

    /// Slots that changed from `before` to `after`, and how many of them
    /// belonged to a backend of `removed` (those had to change).
    fn disruption(before: &[u32], after: &[u32], removed: &BTreeSet<u32>) -> (u64, u64) {
        let mut changed = 0;
        let mut forced = 0;
        for (old, new) in before.iter().zip(after) {
            if old != new {
                changed += 1;
            }
            if removed.contains(old) {
                forced += 1;
            }
        }
        (changed, forced)
    }

    // --- The contract: these values must never change (module docs). ---

    #[test]
    fn golden_xxh64_vectors() {
        // From the xxHash reference implementation (libxxhash).
        assert_eq!(xxh64(b"", 0), 0xef46_db37_51d8_e999);
        assert_eq!(xxh64(b"a", 0), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(xxh64(b"abc", 0), 0x44bc_2cf5_ad77_0999);
        assert_eq!(xxh64(&[198, 19, 0, 1], 0x5eed), 0xa893_fdcb_726f_b65c);
        assert_eq!(
            xxh64(&[198, 19, 0, 1], 0x5eed ^ SKIP_SEED_XOR),
            0x378b_4da8_cf0c_509b
        );
        let bytes: Vec<u8> = (0..16).collect();
        assert_eq!(xxh64(&bytes, 12345), 0x5e7b_3a29_745e_36d0);
    }

    #[test]
    fn golden_preferences() {
        // Computed by an independent implementation over libxxhash.
        assert_eq!(preference(&v4(1), 65537, 0), (37432, 47360));
        assert_eq!(preference(&v4(1), 13, 0x5eed), (0, 12));
        let bytes: Vec<u8> = (0..16).collect();
        assert_eq!(preference(&bytes, 655373, 12345), (257320, 148369));
        assert_eq!(preference(b"", 2, 0), (1, 1));
    }

    #[test]
    fn golden_rings() {
        // Whole rings from an independent implementation of the module
        // docs' rules (Python over libxxhash, naive turn by turn).
        let keys = [v4(1), v4(2), v4(3)];
        let weighted = [
            Member::new(&keys[0], 10, 1),
            Member::new(&keys[1], 20, 2),
            Member::new(&keys[2], 30, 3),
        ];
        assert_eq!(
            build(&weighted, 13, 0x5eed).unwrap(),
            [10, 30, 20, 20, 30, 30, 30, 30, 20, 30, 30, 20, 10]
        );
        let equal = [
            Member::new(&keys[2], 30, 1),
            Member::new(&keys[0], 10, 1),
            Member::new(&keys[1], 20, 1),
        ];
        assert_eq!(
            build(&equal, 17, 0).unwrap(),
            [
                20, 20, 30, 20, 20, 20, 10, 10, 30, 30, 10, 10, 10, 10, 30, 30, 20
            ]
        );

        let keys: Vec<Vec<u8>> = (0..=50).map(v4).collect();
        let equal10: Vec<Member<'_>> = (1..=10)
            .map(|i| Member::new(&keys[i], i as u32, 1))
            .collect();
        let ring = build(&equal10, 65537, 7).unwrap();
        assert_eq!(ring[..8], [9, 5, 2, 7, 4, 5, 7, 3]);
        assert_eq!(fingerprint(&ring), 0x6a34_cc72_339c_3f3f);

        let weighted5: Vec<Member<'_>> = (1..=5)
            .map(|i| Member::new(&keys[i], 100 + i as u32, i as u32))
            .collect();
        let ring = build(&weighted5, 65537, 7).unwrap();
        assert_eq!(ring[..8], [103, 105, 102, 104, 104, 105, 104, 103]);
        assert_eq!(fingerprint(&ring), 0xe3a0_adeb_363d_a16d);

        // Skewed enough for the heap schedule.
        let skewed50: Vec<Member<'_>> = (0..50)
            .map(|i| Member::new(&keys[i], i as u32, if i == 0 { 1000 } else { 1 }))
            .collect();
        let ring = build(&skewed50, 65537, 7).unwrap();
        assert_eq!(fingerprint(&ring), 0x132e_35af_da2c_c2b6);
    }

    // --- Weights, sizes, errors. ---

    #[test]
    fn one_to_ten_is_one_to_ten() {
        let keys = [v4(1), v4(2)];
        for size in [65537, 655373] {
            let ring = build(&members(&keys, &[1, 10]), size, 0).unwrap();
            let counts = counts(&ring);
            let ratio = counts[&1] as f64 / counts[&0] as f64;
            assert!(
                (ratio / 10.0 - 1.0).abs() < 0.001,
                "{counts:?}: ratio {ratio}"
            );
            // Exact apportionment: within one slot of M·w/W.
            assert!((counts[&0] as f64 - f64::from(size) / 11.0).abs() < 1.0);
        }
    }

    #[test]
    fn apportionment_is_exact_and_sums_to_size() {
        assert_eq!(apportion(13, &[1, 2, 3]), [2, 4, 7]);
        assert_eq!(apportion(10, &[1, 1, 1]), [4, 3, 3]);
        assert_eq!(apportion(7, &[1, 1_000_000]), [0, 7]);
        let big = apportion(u32::MAX, &[u32::MAX, u32::MAX, 1]);
        assert_eq!(
            big.iter().map(|&q| u64::from(q)).sum::<u64>(),
            u64::from(u32::MAX)
        );
    }

    #[test]
    fn a_share_far_below_one_slot_gets_none() {
        let keys = [v4(1), v4(2)];
        let ring = build(&members(&keys, &[1, 1_000_000]), 65537, 0).unwrap();
        assert!(ring.iter().all(|&id| id == 1));
    }

    #[test]
    fn tiny_prime_sizes_work() {
        let keys = [v4(1), v4(2), v4(3)];
        assert_eq!(build(&members(&keys[..1], &[1]), 2, 0).unwrap(), [0, 0]);
        let ring = build(&members(&keys[..2], &[1, 1]), 2, 0).unwrap();
        assert_eq!(counts(&ring).len(), 2);
        let ring = build(&members(&keys, &[1, 1, 1]), 3, 9).unwrap();
        assert_eq!(
            counts(&ring).values().copied().collect::<Vec<_>>(),
            [1, 1, 1]
        );
    }

    #[test]
    fn build_errors() {
        let keys = [v4(1), v4(2), v4(3)];
        assert_eq!(build(&[], 65537, 0), Err(MaglevError::NoBackends));
        assert_eq!(
            build(&members(&keys, &[0, 0, 0]), 65537, 0),
            Err(MaglevError::NoBackends)
        );
        let dup_key = [Member::new(&keys[0], 1, 1), Member::new(&keys[0], 2, 0)];
        let err = build(&dup_key, 65537, 0).unwrap_err();
        assert_eq!(err.to_string(), "two backends have the same key 0xc6130001");
        let dup_id = [Member::new(&keys[0], 1, 1), Member::new(&keys[1], 1, 1)];
        assert_eq!(
            build(&dup_id, 65537, 0),
            Err(MaglevError::DuplicateId { id: 1 })
        );
        let err = build(&members(&keys, &[1, 1, 1]), 65536, 0).unwrap_err();
        assert!(matches!(
            err,
            MaglevError::NotPrime {
                size: 65536,
                minimum: 3
            }
        ));
        let err = build(&members(&keys, &[1, 1, 1]), 2, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ring size 2 is too small for 3 backend(s): every backend needs a slot, \
             so at least 3; allowed: a prime ≥ 3, the smallest being 3; commonly used: \
             65537 (the default), 131071, 262147, 524287, 655373, 1048573"
        );
        // Weight 0 members do not count towards the size.
        assert!(build(&members(&keys, &[1, 1, 0]), 2, 0).is_ok());
    }

    #[test]
    fn check_size_messages() {
        assert_eq!(check_size(65537, 10), Ok(()));
        assert_eq!(check_size(65537, 655), Ok(()));
        assert_eq!(check_size(101, 0), Ok(()));
        assert_eq!(check_size(101, 1), Ok(()));
        assert_eq!(check_size(655373, 6553), Ok(()));

        assert_eq!(
            check_size(65536, 10).unwrap_err().to_string(),
            "ring size 65536 is not a prime; allowed: a prime ≥ 1000, the smallest being 1009; \
             commonly used: 65537 (the default), 131071, 262147, 524287, 655373, 1048573"
        );
        assert_eq!(
            check_size(65537, 1000).unwrap_err().to_string(),
            "ring size 65537 is too small for 1000 backend(s): it needs 100 slots per backend \
             for shares within 1% of their weights, and at least 101, so at least 100000; \
             allowed: a prime ≥ 100000, the smallest being 100003; commonly used: 131071, \
             262147, 524287, 655373, 1048573"
        );
        assert_eq!(
            check_size(97, 0).unwrap_err().to_string(),
            "ring size 97 is too small for 0 backend(s): it needs 100 slots per backend \
             for shares within 1% of their weights, and at least 101, so at least 101; \
             allowed: a prime ≥ 101, the smallest being 101; commonly used: 65537 (the \
             default), 131071, 262147, 524287, 655373, 1048573"
        );
        assert_eq!(
            check_size(1_999_993, 20_000).unwrap_err().to_string(),
            "ring size 1999993 is too small for 20000 backend(s): it needs 100 slots per \
             backend for shares within 1% of their weights, and at least 101, so at least \
             2000000; allowed: a prime ≥ 2000000, the smallest being 2000003"
        );
        assert!(matches!(
            check_size(1, 0),
            Err(MaglevError::NotPrime { .. })
        ));
        assert_eq!(
            check_size(4_294_967_291, usize::MAX)
                .unwrap_err()
                .to_string(),
            format!(
                "ring size 4294967291 is too small for {} backend(s): it needs 100 slots per \
                 backend for shares within 1% of their weights, and at least 101, so at \
                 least {}; no 32-bit size is at least {}",
                usize::MAX,
                u64::MAX,
                u64::MAX
            )
        );
    }

    #[test]
    fn suggested_sizes() {
        assert!(SUGGESTED_SIZES.iter().all(|&size| is_prime(size)));
        assert!(SUGGESTED_SIZES.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(SUGGESTED_SIZES[0], lb_common::DEFAULT_RING_SIZE);
        assert!(SUGGESTED_SIZES.contains(&655373), "the paper's size");
        for (backends, size) in [
            (0, 65537),
            (1, 65537),
            (655, 65537),
            (656, 131071),
            (6553, 655373),
            (6554, 1048573),
            (10485, 1048573),
            (10486, 1048601),
            (usize::MAX, LARGEST_U32_PRIME),
        ] {
            assert_eq!(smallest_size_for(backends), size, "{backends} backends");
            if backends < 1 << 20 {
                assert_eq!(check_size(size, backends), Ok(()));
            }
        }
    }

    #[test]
    fn primes() {
        let sieve_limit = 20_000usize;
        let mut composite = vec![false; sieve_limit];
        for n in 2..sieve_limit {
            if !composite[n] {
                for multiple in (n * n..sieve_limit).step_by(n) {
                    composite[multiple] = true;
                }
            }
            assert_eq!(is_prime(n as u32), !composite[n], "{n}");
        }
        assert!(!is_prime(0) && !is_prime(1));
        assert!(is_prime(LARGEST_U32_PRIME));
        assert!(!is_prime(u32::MAX));
        assert!(!is_prime(65521 * 65519));
        assert_eq!(smallest_prime_at_least(100_000), Some(100_003));
        assert_eq!(smallest_prime_at_least(LARGEST_U32_PRIME + 1), None);
    }

    #[test]
    fn modular_arithmetic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for m in [2u64, 3, 13, 65537, 655373, LARGEST_U32_PRIME as u64] {
            let barrett = u64::MAX / m;
            for _ in 0..10_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let (a, b) = (x % m, (x >> 32) % m);
                let expected = (u128::from(a) * u128::from(b) % u128::from(m)) as u64;
                assert_eq!(mul_mod(a, b, m, barrett), expected, "{a}·{b} mod {m}");
                assert_eq!(mul_mod(m - 1, m - 1, m, barrett), 1);
                if a > 0 {
                    let inverse = inverse_mod(a, m);
                    assert_eq!(mul_mod(a, inverse, m, barrett), 1, "{a}⁻¹ mod {m}");
                }
            }
        }
    }

    // --- Properties. ---

    /// A backend's key: IPv4 or IPv6 address bytes.
    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 4),
            prop::collection::vec(any::<u8>(), 16),
        ]
    }

    fn keys(n: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::btree_set(key(), n).prop_map(|set| set.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Equal weights, M > 100·N: every share within 1% of 1/N.
        #[test]
        fn balance(keys in keys(1..=300), extra in 0u32..30_000, seed: u64) {
            let n = keys.len();
            let size = prime(100 * n as u32 + 1 + extra);
            let ring = build(&members(&keys, &vec![1; n]), size, seed).unwrap();
            let counts = counts(&ring);
            prop_assert_eq!(counts.len(), n);
            let due = f64::from(size) / n as f64;
            for (&id, &count) in &counts {
                prop_assert!(
                    (count as f64 - due).abs() <= 0.01 * due,
                    "backend {} has {} slots of {}, due {:.1}", id, count, size, due
                );
            }
        }

        /// Random weights: every share within one slot of M·w/W, so within
        /// 1% of its weight's share wherever that is 100 slots or more.
        #[test]
        fn ratios(
            (keys, weights) in keys(1..=40).prop_flat_map(|keys| {
                let n = keys.len();
                (Just(keys), prop::collection::vec(1u32..=1000, n))
            }),
            size in (1_000u32..200_000).prop_map(prime),
            seed: u64,
        ) {
            let ring = build(&members(&keys, &weights), size, seed).unwrap();
            let counts = counts(&ring);
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            for (id, &weight) in (0u32..).zip(&weights) {
                let count = counts.get(&id).copied().unwrap_or(0);
                let due = f64::from(size) * f64::from(weight) / total as f64;
                prop_assert!(
                    (count as f64 - due).abs() < 1.0,
                    "backend {} (weight {}) has {} slots, due {:.2}", id, weight, count, due
                );
                if due >= 100.0 {
                    prop_assert!((count as f64 / due - 1.0).abs() <= 0.01);
                }
            }
        }

        /// The ring depends on the set of members, not their order, and on
        /// nothing else.
        #[test]
        fn determinism(
            (keys, weights, order) in keys(1..=60).prop_flat_map(|keys| {
                let n = keys.len();
                (
                    Just(keys),
                    prop::collection::vec(0u32..=5, n),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                )
            }),
            size in (0u32..70_000).prop_map(|n| prime(n.max(60))),
            seed: u64,
        ) {
            let mut weights = weights;
            weights[0] = weights[0].max(1);
            let ordered = members(&keys, &weights);
            let shuffled: Vec<Member<'_>> = order.iter().map(|&i| ordered[i]).collect();
            let ring = build(&ordered, size, seed).unwrap();
            prop_assert_eq!(&ring, &build(&ordered, size, seed).unwrap());
            prop_assert_eq!(&ring, &build(&shuffled, size, seed).unwrap());
        }

        /// Removing k of N equal backends moves their slots and few others;
        /// adding them back restores the ring. The excess is a statistical
        /// property with a long tail for tiny N (module docs), so the bound
        /// is on its mean over 8 seeds: at most k/(4N) + √(N/M) of the ring
        /// (the largest mean measured over 28,000 random cases was 0.37 of
        /// that).
        #[test]
        fn disruption_is_near_minimal(
            (keys, order, k) in keys(2..=200).prop_flat_map(|keys| {
                let n = keys.len();
                (
                    Just(keys),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                    1..=(n - 1).min(10),
                )
            }),
            extra in prop_oneof![Just(0u32), 0u32..70_000],
            seed: u64,
        ) {
            let n = keys.len();
            let size = prime(100 * n as u32 + extra);
            let all = members(&keys, &vec![1; n]);
            let removed: BTreeSet<u32> = order[..k].iter().map(|&i| i as u32).collect();
            let rest: Vec<Member<'_>> =
                all.iter().copied().filter(|m| !removed.contains(&m.id)).collect();
            let mut excess = 0.0;
            for seed in (0..DISRUPTION_SEEDS).map(|s| seed.wrapping_add(s)) {
                let before = build(&all, size, seed).unwrap();
                let after = build(&rest, size, seed).unwrap();
                let (changed, forced) = disruption(&before, &after, &removed);
                prop_assert_eq!(forced, before.iter().filter(|id| removed.contains(id)).count() as u64);
                prop_assert!(after.iter().all(|id| !removed.contains(id)));
                excess += (changed - forced) as f64 / f64::from(size);
                prop_assert_eq!(build(&all, size, seed).unwrap(), before, "adding back restores");
            }
            let excess = excess / DISRUPTION_SEEDS as f64;
            let bound = k as f64 / (4 * n) as f64 + (n as f64 / f64::from(size)).sqrt();
            prop_assert!(
                excess <= bound,
                "removing {} of {} (M = {}): mean excess {:.4} of the ring, bound {:.4}",
                k, n, size, excess, bound
            );
        }

        /// Weight 0 is out of the ring, exactly as if the member were absent.
        #[test]
        fn weight_zero_is_absent(
            (keys, weights) in keys(1..=50).prop_flat_map(|keys| {
                let n = keys.len();
                (Just(keys), prop::collection::vec(0u32..=3, n))
            }),
            seed: u64,
        ) {
            prop_assume!(weights.iter().any(|&w| w > 0));
            let all = members(&keys, &weights);
            let ring = build(&all, 65537, seed).unwrap();
            let counts = counts(&ring);
            for member in &all {
                prop_assert_eq!(member.weight > 0, counts.contains_key(&member.id));
            }
            let present: Vec<Member<'_>> = all.iter().copied().filter(|m| m.weight > 0).collect();
            prop_assert_eq!(ring, build(&present, 65537, seed).unwrap());
        }

        /// With equal weights, the population is the paper's, turn for turn.
        #[test]
        fn equal_weights_are_the_papers_algorithm(
            keys in keys(1..=60),
            size in (0u32..20_000).prop_map(|n| prime(n.max(60))),
            seed: u64,
        ) {
            let all = members(&keys, &vec![7; keys.len()]);
            prop_assert_eq!(build(&all, size, seed).unwrap(), paper(&all, size, seed));
        }

        /// Both turn schedules give the same ring.
        #[test]
        fn schedules_agree(
            (keys, weights) in keys(1..=40).prop_flat_map(|keys| {
                let n = keys.len();
                let weight = prop_oneof![1u32..=3, 1u32..=1000, Just(u32::MAX)];
                (Just(keys), prop::collection::vec(weight, n))
            }),
            size in (0u32..20_000).prop_map(|n| prime(n.max(40))),
            seed: u64,
        ) {
            let all = members(&keys, &weights);
            let rounds = build_with(&all, size, seed, Some(Schedule::Rounds)).unwrap();
            let heap = build_with(&all, size, seed, Some(Schedule::Heap)).unwrap();
            prop_assert_eq!(&rounds, &heap);
            prop_assert_eq!(rounds, build(&all, size, seed).unwrap());
        }
    }

    const DISRUPTION_SEEDS: u64 = 8;

    /// The paper's figures (removing 1 of 3 changes 33.4% of the slots, 1
    /// of 100 about 1.6%), at its size, over 40 seeds and addresses in
    /// order. Deterministic.
    #[test]
    fn disruption_matches_the_paper() {
        for (n, at_most) in [(3u32, 0.334), (100, 0.0165)] {
            let keys: Vec<Vec<u8>> = (1..=n).map(v4).collect();
            let all = members(&keys, &vec![1; n as usize]);
            let mut changed_sum = 0;
            let seeds = 40u32;
            for seed in 0..seeds {
                let before = build(&all, 65537, seed.into()).unwrap();
                let gone = seed % n;
                let rest: Vec<Member<'_>> = all.iter().copied().filter(|m| m.id != gone).collect();
                let after = build(&rest, 65537, seed.into()).unwrap();
                changed_sum += disruption(&before, &after, &BTreeSet::from([gone])).0;
            }
            let changed = changed_sum as f64 / f64::from(65537 * seeds);
            assert!(
                changed <= at_most,
                "removing 1 of {n}: {changed:.4} changed"
            );
        }
    }

    /// Prints the measured disruption excess (the module docs' table):
    /// `cargo test --release -p lb-userspace maglev::tests::measure -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn measure_disruption() {
        let seeds: u32 = 100;
        println!("     N   k        M  minimum%  changed%  excess%  excess% (max)");
        for (n, k, size) in [
            (3usize, 1usize, 65537u32),
            (10, 1, 65537),
            (100, 1, 65537),
            (100, 10, 65537),
            (10, 1, 1009),
            (100, 1, 10007),
            (1000, 1, 100003),
            (1000, 1, 655373),
        ] {
            let keys: Vec<Vec<u8>> = (1..=n as u32).map(v4).collect();
            let all = members(&keys, &vec![1; n]);
            let (mut changed_sum, mut forced_sum, mut worst) = (0u64, 0u64, 0u64);
            for seed in 0..seeds {
                let before = build(&all, size, seed.into()).unwrap();
                // k backends spread over the key order, a different set per seed.
                let removed: BTreeSet<u32> = (0..k)
                    .map(|j| ((seed as usize * 7919 + j * n / k) % n) as u32)
                    .collect();
                let rest: Vec<Member<'_>> = all
                    .iter()
                    .copied()
                    .filter(|m| !removed.contains(&m.id))
                    .collect();
                let after = build(&rest, size, seed.into()).unwrap();
                let (changed, forced) = disruption(&before, &after, &removed);
                changed_sum += changed;
                forced_sum += forced;
                worst = worst.max(changed - forced);
            }
            let m = f64::from(size) * f64::from(seeds) / 100.0;
            println!(
                "{n:>6} {k:>3} {size:>8} {:>9.3} {:>9.3} {:>8.3} {:>8.3}",
                forced_sum as f64 / m,
                changed_sum as f64 / m,
                (changed_sum - forced_sum) as f64 / m,
                worst as f64 * 100.0 / f64::from(size),
            );
        }
    }
}
