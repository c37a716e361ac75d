//! Isolation by origin, without I/O: a destination's deliveries share a
//! queue, but each filled-in origin (scheme, host, port) of its URL has its
//! own concurrency limit and circuit breaker. With a templated URL
//! (`http://archive-{query.tenant}…`) one tenant's dead host opens only its
//! own circuit; the other tenants' deliveries go on.
//!
//! An origin exists while some delivery held in memory is bound to it, so
//! their number never exceeds the deliveries held: values put into a URL
//! by whoever calls the gateway cannot grow memory without limit.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use tokio::time::Instant;

use crate::delivery::schedule::{Circuit, Gate};

/// The scheme, host and port a delivery goes to: `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin(Arc<str>);

impl Origin {
    pub fn of(url: &Uri) -> Self {
        let scheme = url.scheme_str().unwrap_or("http");
        let host = url.host().unwrap_or_default();
        let port = url
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        Self(format!("{scheme}://{host}:{port}").into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a due delivery may start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Counted in flight: report its end with [`Origins::finish`].
    Start,
    /// The origin's circuit is open: due again at this time.
    WaitUntil(Instant),
    /// Kept by the origin until a slot frees or its probe answers; handed
    /// back by [`Origins::finish`].
    Queued,
}

/// How an attempt that [`Admit::Start`]ed ended, for the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// The origin answered (2xx, or a status about the job itself).
    Alive,
    /// Timeout, connection error, 5xx, 429.
    Failed,
    /// Nothing was sent (the delivery was gone or unreadable).
    Nothing,
}

/// A change of an origin's circuit that operators hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CircuitEvent {
    Opened {
        origin: Origin,
        failures: u32,
        cooldown: Duration,
    },
    Closed {
        origin: Origin,
        /// False when it closed because nothing is left to deliver there.
        answered: bool,
    },
}

/// What an attempt's end changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Finished {
    /// Deliveries the origin kept that may go now.
    pub now: Vec<u64>,
    /// Deliveries the origin kept that wait for its circuit, and until when.
    pub later: Option<(Instant, Vec<u64>)>,
    pub event: Option<CircuitEvent>,
}

#[derive(Debug, Default)]
struct State {
    circuit: Circuit,
    in_flight: usize,
    /// Deliveries due but held back: the origin was full, or its probe
    /// was in flight.
    waiting: VecDeque<u64>,
    /// Held deliveries bound to this origin (waiting or not).
    bound: usize,
}

/// The origins of one destination.
#[derive(Debug, Default)]
pub struct Origins {
    map: HashMap<Origin, State>,
}

impl Origins {
    /// A held delivery now goes to `origin` (first seen, or after the rules
    /// changed its URL).
    pub fn bind(&mut self, origin: &Origin) {
        self.map.entry(origin.clone()).or_default().bound += 1;
    }

    /// A held delivery bound to `origin` no longer is (delivered, dead,
    /// bound elsewhere). Retires the origin once nothing uses it.
    pub fn unbind(&mut self, origin: &Origin) -> Option<CircuitEvent> {
        let state = self.map.get_mut(origin)?;
        state.bound = state.bound.saturating_sub(1);
        self.retire(origin)
    }

    /// May delivery `id`, due now and bound to `origin`, start?
    pub fn admit(&mut self, origin: &Origin, id: u64, limit: usize, now: Instant) -> Admit {
        let state = self.map.entry(origin.clone()).or_default();
        if state.in_flight >= limit.max(1) {
            state.waiting.push_back(id);
            return Admit::Queued;
        }
        match state.circuit.gate(now) {
            Gate::Pass => {
                state.in_flight += 1;
                Admit::Start
            }
            Gate::WaitUntil(until) => Admit::WaitUntil(until),
            Gate::WaitForProbe => {
                state.waiting.push_back(id);
                Admit::Queued
            }
        }
    }

    /// An attempt that started ended. Hands back the deliveries the origin
    /// kept that may go now (as many as there are free slots; one, as the
    /// next probe, when the probe sent nothing), or all of them with the
    /// time its circuit opens again.
    pub fn finish(
        &mut self,
        origin: &Origin,
        reached: Reached,
        limit: usize,
        now: Instant,
    ) -> Finished {
        let Some(state) = self.map.get_mut(origin) else {
            return Finished::default();
        };
        state.in_flight = state.in_flight.saturating_sub(1);
        let mut finished = Finished::default();
        match reached {
            Reached::Alive => {
                if state.circuit.alive() {
                    finished.event = Some(CircuitEvent::Closed {
                        origin: origin.clone(),
                        answered: true,
                    });
                }
            }
            Reached::Failed => {
                if let Some(cooldown) = state.circuit.failed(now) {
                    finished.event = Some(CircuitEvent::Opened {
                        origin: origin.clone(),
                        failures: state.circuit.failures(),
                        cooldown,
                    });
                }
            }
            Reached::Nothing => state.circuit.released(),
        }
        if let Some(until) = state.circuit.open_until() {
            if !state.waiting.is_empty() {
                finished.later = Some((until, state.waiting.drain(..).collect()));
            }
        } else {
            let free = if state.circuit.is_open() {
                // Half-open: only the probe goes.
                usize::from(state.in_flight == 0)
            } else {
                limit.max(1).saturating_sub(state.in_flight)
            };
            let n = free.min(state.waiting.len());
            finished.now = state.waiting.drain(..n).collect();
        }
        finished
    }

    /// Every delivery the origins keep back, given back (the rules changed:
    /// they are looked at again).
    pub fn release_waiting(&mut self) -> Vec<u64> {
        self.map
            .values_mut()
            .flat_map(|s| s.waiting.drain(..))
            .collect()
    }

    /// Origins whose circuit is not closed.
    pub fn open(&self) -> usize {
        self.map.values().filter(|s| s.circuit.is_open()).count()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn retire(&mut self, origin: &Origin) -> Option<CircuitEvent> {
        let state = self.map.get(origin)?;
        if state.bound > 0 || state.in_flight > 0 {
            return None;
        }
        let was_open = state.circuit.is_open();
        self.map.remove(origin);
        was_open.then(|| CircuitEvent::Closed {
            origin: origin.clone(),
            answered: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::schedule::CIRCUIT_THRESHOLD;

    fn origin(s: &str) -> Origin {
        Origin::of(&Uri::try_from(s).unwrap())
    }

    #[test]
    fn origin_is_scheme_host_and_port() {
        let cases = [
            ("http://a.svc/x?y=1", "http://a.svc:80"),
            ("https://a.svc/x", "https://a.svc:443"),
            ("http://a.svc:8080/x", "http://a.svc:8080"),
            ("http://127.0.0.1:9/a/b", "http://127.0.0.1:9"),
        ];
        for (url, want) in cases {
            assert_eq!(origin(url).as_str(), want, "{url}");
        }
        assert_eq!(origin("http://a.svc/x"), origin("http://a.svc:80/y"));
    }

    /// One origin failing opens only its own circuit: the other's
    /// deliveries start as before.
    #[test]
    fn a_failing_origin_does_not_hold_back_another() {
        let (bad, good) = (origin("http://t2.svc/"), origin("http://t1.svc/"));
        let mut o = Origins::default();
        let now = Instant::now();
        let mut opened = None;
        for id in 0..u64::from(CIRCUIT_THRESHOLD) {
            o.bind(&bad);
            assert_eq!(o.admit(&bad, id, 8, now), Admit::Start);
            let f = o.finish(&bad, Reached::Failed, 8, now);
            opened = opened.or(f.event);
        }
        assert!(matches!(
            opened,
            Some(CircuitEvent::Opened { failures, .. }) if failures == CIRCUIT_THRESHOLD
        ));
        assert!(matches!(o.admit(&bad, 99, 8, now), Admit::WaitUntil(_)));
        o.bind(&good);
        assert_eq!(o.admit(&good, 100, 8, now), Admit::Start);
        assert_eq!(o.open(), 1);
    }

    #[test]
    fn a_full_origin_keeps_deliveries_and_hands_them_back_as_slots_free() {
        let a = origin("http://a/");
        let mut o = Origins::default();
        let now = Instant::now();
        assert_eq!(o.admit(&a, 1, 2, now), Admit::Start);
        assert_eq!(o.admit(&a, 2, 2, now), Admit::Start);
        assert_eq!(o.admit(&a, 3, 2, now), Admit::Queued);
        assert_eq!(o.admit(&a, 4, 2, now), Admit::Queued);
        let f = o.finish(&a, Reached::Alive, 2, now);
        assert_eq!((f.now, f.later, f.event), (vec![3], None, None));
        // A lower limit after a reload: nothing frees until below it.
        assert_eq!(o.admit(&a, 3, 2, now), Admit::Start);
        let f = o.finish(&a, Reached::Alive, 1, now);
        assert!(f.now.is_empty());
    }

    /// Opened: what waits goes back with the time it may try again; the
    /// probe that follows is alone, and its success closes the circuit
    /// and lets the rest go.
    #[test]
    fn the_circuit_holds_back_then_probes_alone() {
        let a = origin("http://a/");
        let mut o = Origins::default();
        let t0 = Instant::now();
        for id in 0..u64::from(CIRCUIT_THRESHOLD) {
            assert_eq!(o.admit(&a, id, 100, t0), Admit::Start);
        }
        for _ in 1..CIRCUIT_THRESHOLD {
            assert_eq!(o.finish(&a, Reached::Failed, 100, t0), Finished::default());
        }
        assert_eq!(o.admit(&a, 50, 1, t0), Admit::Queued, "full");
        let f = o.finish(&a, Reached::Failed, 1, t0);
        assert!(matches!(f.event, Some(CircuitEvent::Opened { .. })));
        let later = f.later;
        let (until, ids) = later.expect("handed back with a time");
        assert_eq!(ids, [50]);
        assert!(until > t0);
        assert_eq!(o.admit(&a, 50, 5, until), Admit::Start, "the probe");
        assert_eq!(o.admit(&a, 51, 5, until), Admit::Queued);
        assert_eq!(o.admit(&a, 52, 5, until), Admit::Queued);
        let f = o.finish(&a, Reached::Alive, 5, until);
        assert_eq!(f.now, [51, 52]);
        assert!(matches!(
            f.event,
            Some(CircuitEvent::Closed { answered: true, .. })
        ));
    }

    #[test]
    fn a_probe_that_sent_nothing_lets_one_other_probe() {
        let a = origin("http://a/");
        let mut o = Origins::default();
        let t0 = Instant::now();
        for id in 0..u64::from(CIRCUIT_THRESHOLD) {
            o.admit(&a, id, 10, t0);
            o.finish(&a, Reached::Failed, 10, t0);
        }
        let Admit::WaitUntil(until) = o.admit(&a, 7, 10, t0) else {
            panic!("not open")
        };
        assert_eq!(o.admit(&a, 7, 10, until), Admit::Start);
        assert_eq!(o.admit(&a, 8, 10, until), Admit::Queued);
        assert_eq!(o.admit(&a, 9, 10, until), Admit::Queued);
        let f = o.finish(&a, Reached::Nothing, 10, until);
        assert_eq!(f.now, [8], "one, as the next probe");
    }

    /// An origin lives while a delivery is bound to it: bounded by the
    /// deliveries held, whatever values fill the URLs.
    #[test]
    fn origins_are_retired_once_unused() {
        let mut o = Origins::default();
        let now = Instant::now();
        for tenant in 0..1000 {
            let t = origin(&format!("http://t{tenant}.svc/"));
            o.bind(&t);
            assert_eq!(o.admit(&t, tenant, 4, now), Admit::Start);
            o.finish(&t, Reached::Alive, 4, now);
            assert_eq!(o.unbind(&t), None);
        }
        assert!(o.is_empty());
    }

    #[test]
    fn retiring_an_open_circuit_says_so() {
        let a = origin("http://a/");
        let mut o = Origins::default();
        let now = Instant::now();
        o.bind(&a);
        for id in 0..u64::from(CIRCUIT_THRESHOLD) {
            o.admit(&a, id, 10, now);
            o.finish(&a, Reached::Failed, 10, now);
        }
        assert_eq!(o.open(), 1);
        assert_eq!(
            o.unbind(&a),
            Some(CircuitEvent::Closed {
                origin: a,
                answered: false
            })
        );
        assert_eq!((o.len(), o.open()), (0, 0));
    }
}
