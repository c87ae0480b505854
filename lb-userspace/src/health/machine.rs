//! The health state machine of one probe target: pure, no I/O, no clock of
//! its own (every call says what time it is), so tests drive it step by step.
//!
//! - `fall` failures in a row take an up target down; `rise` passes in a
//!   row bring a down target back (HAProxy's rule).
//! - A target starts up: a restarted daemon must not take backends out of
//!   the rings before their first probes came back.
//! - Flapping: a target that goes down [`FLAP_DOWNS`] times within
//!   [`FLAP_WINDOW_INTERVALS`] probe intervals is held out (kept down,
//!   whatever its probes say) for the configured back-off; after it, `rise`
//!   passes in a row bring it back as usual.

use std::{
    collections::VecDeque,
    fmt,
    time::{Duration, Instant},
};

use super::Reason;

/// Downs within the flap window that start a hold-out.
pub const FLAP_DOWNS: usize = 3;
/// The flap window, in probe intervals.
pub const FLAP_WINDOW_INTERVALS: u32 = 20;

/// What a target's probes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeState {
    Up,
    Down,
}

impl fmt::Display for ProbeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeState::Up => "up",
            ProbeState::Down => "down",
        })
    }
}

/// Why a target changed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// `fall` failures in a row; the last one's reason.
    Failed(Reason),
    /// `rise` passes in a row.
    Passed,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Failed(reason) => write!(f, "{reason}"),
            Cause::Passed => f.write_str("passed"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub to: ProbeState,
    pub cause: Cause,
    /// When the deciding probe result came in.
    pub at: Instant,
    /// Set when this down starts a flapping hold-out: kept down until then.
    pub held_until: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
    pub interval: Duration,
    /// Hold-out of a flapping target; zero turns flap protection off.
    pub flap_backoff: Duration,
}

#[derive(Clone, Debug)]
pub struct Machine {
    limits: Thresholds,
    state: ProbeState,
    passes: u32,
    failures: u32,
    /// When it went down, within the flap window.
    downs: VecDeque<Instant>,
    held_until: Option<Instant>,
}

impl Machine {
    pub fn new(limits: Thresholds) -> Self {
        Self {
            limits,
            state: ProbeState::Up,
            passes: 0,
            failures: 0,
            downs: VecDeque::new(),
            held_until: None,
        }
    }

    pub fn state(&self) -> ProbeState {
        self.state
    }

    /// The end of the flapping hold-out, while one lasts at `now`.
    pub fn held_until(&self, now: Instant) -> Option<Instant> {
        self.held_until.filter(|until| *until > now)
    }

    /// Passes (or failures) in a row so far.
    pub fn streak(&self) -> (u32, u32) {
        (self.passes, self.failures)
    }

    /// Takes one probe result; returns the transition it decides, if any.
    pub fn observe(&mut self, result: Result<(), Reason>, now: Instant) -> Option<Transition> {
        match result {
            Ok(()) => {
                self.failures = 0;
                self.passes = self.passes.saturating_add(1);
                let held = self.held_until(now).is_some();
                if self.state == ProbeState::Down && self.passes >= self.limits.rise && !held {
                    self.state = ProbeState::Up;
                    self.held_until = None;
                    return Some(Transition {
                        to: ProbeState::Up,
                        cause: Cause::Passed,
                        at: now,
                        held_until: None,
                    });
                }
                None
            }
            Err(reason) => {
                self.passes = 0;
                self.failures = self.failures.saturating_add(1);
                if self.state == ProbeState::Up && self.failures >= self.limits.fall {
                    self.state = ProbeState::Down;
                    let held_until = self.note_down(now);
                    return Some(Transition {
                        to: ProbeState::Down,
                        cause: Cause::Failed(reason),
                        at: now,
                        held_until,
                    });
                }
                None
            }
        }
    }

    /// Records a down; starts a hold-out when it makes the target a flapper.
    fn note_down(&mut self, now: Instant) -> Option<Instant> {
        if self.limits.flap_backoff.is_zero() {
            return None;
        }
        let window = self.limits.interval * FLAP_WINDOW_INTERVALS;
        while let Some(first) = self.downs.front() {
            if now.duration_since(*first) > window {
                self.downs.pop_front();
            } else {
                break;
            }
        }
        self.downs.push_back(now);
        if self.downs.len() >= FLAP_DOWNS {
            self.downs.clear();
            let until = now + self.limits.flap_backoff;
            self.held_until = Some(until);
            return Some(until);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn limits(rise: u32, fall: u32, backoff: Duration) -> Thresholds {
        Thresholds {
            rise,
            fall,
            interval: SEC,
            flap_backoff: backoff,
        }
    }

    /// Feeds `script` ('+' pass, '-' timeout), one per second from `start`;
    /// returns the states after each result.
    fn run(machine: &mut Machine, start: Instant, script: &str) -> String {
        script
            .chars()
            .enumerate()
            .map(|(i, c)| {
                let result = if c == '+' {
                    Ok(())
                } else {
                    Err(Reason::Timeout)
                };
                machine.observe(result, start + SEC * i as u32);
                match machine.state() {
                    ProbeState::Up => 'U',
                    ProbeState::Down => 'D',
                }
            })
            .collect()
    }

    #[test]
    fn starts_up_and_falls_after_fall_failures_in_a_row() {
        let mut m = Machine::new(limits(2, 3, Duration::ZERO));
        assert_eq!(m.state(), ProbeState::Up);
        assert_eq!(run(&mut m, Instant::now(), "--+---"), "UUUUUD");
    }

    #[test]
    fn rises_after_rise_passes_in_a_row() {
        let mut m = Machine::new(limits(2, 1, Duration::ZERO));
        assert_eq!(run(&mut m, Instant::now(), "-+-++"), "DDDDU");
    }

    #[test]
    fn the_deciding_result_gives_reason_and_time() {
        let mut m = Machine::new(limits(1, 2, Duration::ZERO));
        let t0 = Instant::now();
        assert_eq!(m.observe(Err(Reason::Refused), t0), None);
        let down = m.observe(Err(Reason::BadStatus(503)), t0 + SEC).unwrap();
        assert_eq!(down.to, ProbeState::Down);
        assert_eq!(down.cause, Cause::Failed(Reason::BadStatus(503)));
        assert_eq!(down.at, t0 + SEC);
        let up = m.observe(Ok(()), t0 + 2 * SEC).unwrap();
        assert_eq!((up.to, up.cause), (ProbeState::Up, Cause::Passed));
    }

    #[test]
    fn a_flapping_target_is_held_out_for_the_backoff() {
        let backoff = 10 * SEC;
        let mut m = Machine::new(limits(1, 1, backoff));
        let t0 = Instant::now();
        // Down, up, down, up, down: the third down within the window.
        assert_eq!(run(&mut m, t0, "-+-+-"), "DUDUD");
        assert_eq!(m.held_until(t0 + 4 * SEC), Some(t0 + 14 * SEC));
        // Passing all along, but held out until the back-off ends.
        let held = run(&mut m, t0 + 5 * SEC, "+++++++++");
        assert_eq!(held, "DDDDDDDDD");
        assert_eq!(run(&mut m, t0 + 14 * SEC, "+"), "U");
        assert_eq!(m.held_until(t0 + 14 * SEC), None);
    }

    #[test]
    fn downs_far_apart_are_not_flapping() {
        let mut m = Machine::new(limits(1, 1, 10 * SEC));
        let t0 = Instant::now();
        run(&mut m, t0, "-+");
        run(&mut m, t0 + 15 * SEC, "-+");
        // 30 s after the first down: outside the 20-interval window.
        run(&mut m, t0 + 30 * SEC, "-+");
        assert_eq!(m.state(), ProbeState::Up);
        assert_eq!(m.held_until(t0 + 31 * SEC), None);
    }

    #[test]
    fn zero_backoff_turns_flap_protection_off() {
        let mut m = Machine::new(limits(1, 1, Duration::ZERO));
        assert_eq!(run(&mut m, Instant::now(), "-+-+-+-+"), "DUDUDUDU");
    }
}
