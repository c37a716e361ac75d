//! Durable delivery's decisions over time, without I/O: when to retry a
//! failed delivery or give it up, and whether a destination's circuit lets
//! an attempt through. Times are `tokio::time::Instant`, so schedules of
//! hours are tested under paused time.

use std::time::Duration;

use tokio::time::Instant;

use crate::delivery::backoff::Backoff;

/// How long and how often a delivery is tried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub backoff: Backoff,
    pub max_attempts: u32,
    pub max_age: Duration,
}

/// What follows a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    RetryAt(Instant),
    GiveUp(GiveUp),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    Attempts(u32),
    Age(Duration),
}

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GiveUp::Attempts(n) => write!(f, "gave up after {n} attempts (max_attempts)"),
            GiveUp::Age(age) => write!(
                f,
                "gave up after {} (max_age)",
                humantime::format_duration(*age)
            ),
        }
    }
}

impl RetryPolicy {
    /// After attempt number `attempts` (1-based) failed at `now`, for a
    /// delivery first accepted at `first`. The last retry is pulled in to
    /// land at the age limit rather than be skipped.
    pub fn after_failure(
        &self,
        attempts: u32,
        first: Instant,
        now: Instant,
        retry_after: Option<Duration>,
        random: f64,
    ) -> Next {
        if attempts >= self.max_attempts {
            return Next::GiveUp(GiveUp::Attempts(attempts));
        }
        let deadline = first + self.max_age;
        if now >= deadline {
            return Next::GiveUp(GiveUp::Age(self.max_age));
        }
        let wait = self.backoff.next(attempts, retry_after, random);
        Next::RetryAt((now + wait).min(deadline))
    }
}

/// Consecutive failures that open a destination's circuit.
pub const CIRCUIT_THRESHOLD: u32 = 5;
const CIRCUIT_COOLDOWN_MIN: Duration = Duration::from_secs(1);
const CIRCUIT_COOLDOWN_MAX: Duration = Duration::from_secs(60);

/// A circuit breaker per destination. While open, deliveries wait without
/// spending attempts; after a cool-down one probe goes through (half-open),
/// and its result closes the circuit or opens it for twice as long.
#[derive(Debug, Clone)]
pub struct Circuit {
    failures: u32,
    cooldown: Duration,
    state: CircuitState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CircuitState {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Whether an attempt may start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// Open: try again at this time.
    WaitUntil(Instant),
    /// Half-open with its probe in flight: wait for its result.
    WaitForProbe,
}

impl Default for Circuit {
    fn default() -> Self {
        Self {
            failures: 0,
            cooldown: CIRCUIT_COOLDOWN_MIN,
            state: CircuitState::Closed,
        }
    }
}

impl Circuit {
    pub fn is_open(&self) -> bool {
        !matches!(self.state, CircuitState::Closed)
    }

    pub fn gate(&mut self, now: Instant) -> Gate {
        match self.state {
            CircuitState::Closed => Gate::Pass,
            CircuitState::Open { until } if now < until => Gate::WaitUntil(until),
            CircuitState::Open { .. } | CircuitState::HalfOpen { probing: false } => {
                self.state = CircuitState::HalfOpen { probing: true };
                Gate::Pass
            }
            CircuitState::HalfOpen { probing: true } => Gate::WaitForProbe,
        }
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Until when it is open, without moving it to half-open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            CircuitState::Open { until } => Some(until),
            _ => None,
        }
    }

    /// The destination answered (2xx, or a status that says the job, not
    /// the destination, is the problem). True if this closed the circuit.
    pub fn alive(&mut self) -> bool {
        let was_open = self.is_open();
        self.failures = 0;
        self.cooldown = CIRCUIT_COOLDOWN_MIN;
        self.state = CircuitState::Closed;
        was_open
    }

    /// An attempt ended without reaching the destination (its delivery was
    /// gone, or the spool could not be read): if it was the probe, the next
    /// attempt probes instead, rather than the circuit waiting for ever.
    pub fn released(&mut self) {
        if self.state == (CircuitState::HalfOpen { probing: true }) {
            self.state = CircuitState::HalfOpen { probing: false };
        }
    }

    /// The destination failed (timeout, connection, 5xx, 429). Returns the
    /// cool-down when this opened a closed circuit (an outage begins; a
    /// failed probe only reopens it).
    pub fn failed(&mut self, now: Instant) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        match self.state {
            CircuitState::HalfOpen { .. } => {
                self.cooldown = (self.cooldown * 2).min(CIRCUIT_COOLDOWN_MAX);
                self.state = CircuitState::Open {
                    until: now + self.cooldown,
                };
                None
            }
            CircuitState::Closed if self.failures >= CIRCUIT_THRESHOLD => {
                self.state = CircuitState::Open {
                    until: now + self.cooldown,
                };
                Some(self.cooldown)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn policy() -> RetryPolicy {
        RetryPolicy {
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: HOUR,
            },
            max_attempts: 50,
            max_age: 72 * HOUR,
        }
    }

    /// A destination down for good: the defaults spread 50 attempts over
    /// about 38 hours (the backoff caps at an hour), then give up; none is
    /// scheduled past the age limit.
    #[tokio::test(start_paused = true)]
    async fn a_permanent_outage_spends_the_attempts_within_the_age_limit() {
        let p = policy();
        let first = Instant::now();
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            match p.after_failure(attempts, first, Instant::now(), None, 1.0) {
                Next::RetryAt(at) => {
                    assert!(at <= first + p.max_age);
                    tokio::time::sleep_until(at).await;
                }
                Next::GiveUp(reason) => break reason,
            }
        };
        assert_eq!(outcome, GiveUp::Attempts(50));
        let spent = Instant::now() - first;
        // 49 waits: 1+2+...+2048 s, then 37 at the one-hour cap.
        assert_eq!(spent, Duration::from_secs(4095) + 37 * HOUR);
    }

    /// With max_age shorter than the attempts would take, the last retry
    /// lands on the age limit and the delivery is then given up.
    #[tokio::test(start_paused = true)]
    async fn the_age_limit_ends_a_long_outage() {
        let p = RetryPolicy {
            max_age: 6 * HOUR,
            ..policy()
        };
        let first = Instant::now();
        let mut attempts = 0;
        let reason = loop {
            attempts += 1;
            match p.after_failure(attempts, first, Instant::now(), None, 1.0) {
                Next::RetryAt(at) => tokio::time::sleep_until(at).await,
                Next::GiveUp(reason) => break reason,
            }
        };
        assert_eq!(reason, GiveUp::Age(6 * HOUR));
        assert_eq!(Instant::now() - first, 6 * HOUR);
        assert!(attempts < 20, "{attempts}");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_and_capped() {
        let p = policy();
        let now = Instant::now();
        let asked = Some(Duration::from_secs(120));
        assert_eq!(
            p.after_failure(1, now, now, asked, 0.0),
            Next::RetryAt(now + Duration::from_secs(120))
        );
        let days = Some(Duration::from_secs(5 * 86_400));
        assert_eq!(
            p.after_failure(1, now, now, days, 0.0),
            Next::RetryAt(now + HOUR)
        );
    }

    /// Closed → open after the threshold → half-open probe → open for
    /// twice as long → probe succeeds → closed.
    #[tokio::test(start_paused = true)]
    async fn circuit_opens_probes_and_closes() {
        let mut c = Circuit::default();
        for _ in 0..CIRCUIT_THRESHOLD - 1 {
            assert_eq!(c.failed(Instant::now()), None);
            assert_eq!(c.gate(Instant::now()), Gate::Pass);
        }
        assert_eq!(
            c.failed(Instant::now()),
            Some(CIRCUIT_COOLDOWN_MIN),
            "opening is reported"
        );
        let Gate::WaitUntil(until) = c.gate(Instant::now()) else {
            panic!("not open")
        };
        assert_eq!(until - Instant::now(), CIRCUIT_COOLDOWN_MIN);
        tokio::time::sleep_until(until).await;
        assert_eq!(c.gate(Instant::now()), Gate::Pass, "one probe");
        assert_eq!(c.gate(Instant::now()), Gate::WaitForProbe, "only one");
        assert_eq!(
            c.failed(Instant::now()),
            None,
            "a failed probe reopens quietly"
        );
        let Gate::WaitUntil(until) = c.gate(Instant::now()) else {
            panic!("not reopened")
        };
        assert_eq!(until - Instant::now(), 2 * CIRCUIT_COOLDOWN_MIN);
        tokio::time::sleep_until(until).await;
        assert_eq!(c.gate(Instant::now()), Gate::Pass);
        assert!(c.alive(), "closing is reported");
        assert!(!c.is_open());
        assert!(!c.alive(), "once");
        assert_eq!(c.gate(Instant::now()), Gate::Pass);
    }

    #[tokio::test(start_paused = true)]
    async fn circuit_cooldown_is_capped() {
        let mut c = Circuit::default();
        for _ in 0..CIRCUIT_THRESHOLD {
            c.failed(Instant::now());
        }
        for _ in 0..20 {
            let Gate::WaitUntil(until) = c.gate(Instant::now()) else {
                panic!()
            };
            assert!(until - Instant::now() <= CIRCUIT_COOLDOWN_MAX);
            tokio::time::sleep_until(until).await;
            assert_eq!(c.gate(Instant::now()), Gate::Pass);
            c.failed(Instant::now());
        }
    }

    #[test]
    fn a_probe_that_never_reached_the_destination_lets_another_probe() {
        let mut c = Circuit::default();
        let t0 = Instant::now();
        for _ in 0..CIRCUIT_THRESHOLD {
            c.failed(t0);
        }
        let after = t0 + CIRCUIT_COOLDOWN_MIN;
        assert_eq!(c.gate(after), Gate::Pass, "the probe");
        assert_eq!(c.gate(after), Gate::WaitForProbe);
        c.released();
        assert_eq!(c.gate(after), Gate::Pass, "the next probe");
        c.alive();
        c.released();
        assert!(!c.is_open(), "released changes nothing when closed");
    }
}
