//! A destination's lane: the deliveries it holds in memory, when each is
//! due, which wait on disk only, and its origins' state. No I/O: the
//! dispatcher reads the spool and makes the attempts.
//!
//! A lane holds only ids and times (the bodies stay on disk), and only for
//! the first few thousand of its pending deliveries: the rest wait on disk
//! and are read back in id order as those are delivered, so memory stays
//! flat through an outage of any length.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::delivery::origins::{CircuitEvent, Origin, Origins};
use crate::queue::embedded::{OnDisk, ReadBack, SpoolError};
use crate::queue::unix_ms;
use crate::rules::DestinationName;

/// The instant of a stored wall-clock time, for timers.
pub(crate) fn instant_of(ms: u64) -> Instant {
    let now_ms = unix_ms();
    let now = Instant::now();
    if ms >= now_ms {
        now + Duration::from_millis(ms - now_ms)
    } else {
        now.checked_sub(Duration::from_millis(now_ms - ms))
            .unwrap_or(now)
    }
}

/// A delivery held in memory.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) first_ms: u64,
    /// The origin it goes to under the rules with this hash, once known:
    /// with the same rules, it is admitted or held back without reading
    /// it from the spool.
    bound: Option<(u64, Origin)>,
}

/// What an operator is told about a lane, by transition.
#[derive(Debug)]
pub(crate) struct Watch {
    /// The last success, or when deliveries started waiting.
    pub(crate) progress: Instant,
    /// Reported as stalled, not yet delivering again.
    pub(crate) stalled: bool,
    /// Since when an outage (an open circuit, a stall) was reported; the
    /// backlog's draining is reported then.
    pub(crate) outage: Option<Instant>,
}

pub(crate) struct LaneState {
    /// Due times of the held deliveries waiting, soonest first.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    /// The deliveries held in memory, waiting or in flight: about as many
    /// as the lane's capacity at most.
    pub(crate) held: BTreeMap<u64, Held>,
    /// Pending deliveries in all, held or on disk only.
    pub(crate) queued: usize,
    /// Set while some pending deliveries are on disk only: all those with
    /// ids above it, none at or below it.
    on_disk_after: Option<u64>,
    /// While a read-back runs: deliveries offered meanwhile and left on
    /// disk, in case its snapshot came too early to see them.
    reading: Option<Vec<(u64, Instant, u64)>>,
    /// Set by a reload that removed or moved the destination while some
    /// deliveries were on disk only: those are due at once when read back
    /// too, whatever retry time they were stored with.
    hurry: bool,
    pub(crate) origins: Origins,
    pub(crate) watch: Watch,
}

impl LaneState {
    pub(crate) fn new() -> Self {
        Self {
            due: BinaryHeap::new(),
            held: BTreeMap::new(),
            queued: 0,
            on_disk_after: None,
            reading: None,
            hurry: false,
            origins: Origins::default(),
            watch: Watch {
                progress: Instant::now(),
                stalled: false,
                outage: None,
            },
        }
    }

    fn hold(&mut self, id: u64, at: Instant, first_ms: u64) {
        if let std::collections::btree_map::Entry::Vacant(slot) = self.held.entry(id) {
            slot.insert(Held {
                first_ms,
                bound: None,
            });
            self.due.push(Reverse((at, id)));
        }
    }

    fn count_in(&mut self, n: usize) {
        if self.queued == 0 {
            self.watch.progress = Instant::now();
        }
        self.queued += n;
    }
}

/// What a lane's worker does next.
pub(crate) enum Turn {
    Due(u64),
    /// Few deliveries are held and more wait on disk.
    ReadBack,
    Stop,
}

/// What forgetting a held delivery changed, for the log.
#[derive(Debug, Default)]
pub(crate) struct Forgotten {
    /// Its origin was retired with its circuit open.
    pub(crate) event: Option<CircuitEvent>,
    /// It was the last of a backlog reported as an outage, this long ago.
    pub(crate) drained: Option<Duration>,
}

pub(crate) struct Lane {
    pub(crate) name: DestinationName,
    state: Mutex<LaneState>,
    pub(crate) wake: Notify,
    /// How many deliveries it holds in memory before leaving them on disk.
    capacity: usize,
}

impl Lane {
    pub(crate) fn new(name: DestinationName, capacity: usize) -> Self {
        Self {
            name,
            state: Mutex::new(LaneState::new()),
            wake: Notify::new(),
            capacity,
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A delivery newly pending (accepted, replayed, resumed): held, or
    /// left on disk when the lane holds enough.
    pub(crate) fn offer(&self, id: u64, at: Instant, first_ms: u64) {
        let mut state = self.lock();
        state.count_in(1);
        match state.on_disk_after {
            Some(after) if id > after => {
                if let Some(meanwhile) = &mut state.reading {
                    meanwhile.push((id, at, first_ms));
                }
                return;
            }
            // Ids can be offered a little out of order: everything below
            // this one is held, or will be when it is offered. A late one
            // below those held is held too, a few over the capacity.
            None if state.held.len() >= self.capacity
                && state.held.last_key_value().is_none_or(|(&top, _)| id > top) =>
            {
                state.on_disk_after = Some(id - 1);
                return;
            }
            _ => state.hold(id, at, first_ms),
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Deliveries that were pending at start-up beyond those held.
    pub(crate) fn left_on_disk(&self, on_disk: OnDisk) {
        let mut state = self.lock();
        state.count_in(on_disk.count);
        state.on_disk_after = Some(on_disk.first - 1);
    }

    /// A held delivery, due again at `at`.
    pub(crate) fn retry(&self, id: u64, at: Instant) {
        self.lock().due.push(Reverse((at, id)));
        self.wake.notify_one();
    }

    /// A held delivery that is no longer pending.
    pub(crate) fn forget(&self, id: u64) -> Forgotten {
        let mut state = self.lock();
        let Some(held) = state.held.remove(&id) else {
            return Forgotten::default();
        };
        state.queued = state.queued.saturating_sub(1);
        let mut forgotten = Forgotten {
            event: held
                .bound
                .and_then(|(_, origin)| state.origins.unbind(&origin)),
            drained: None,
        };
        if state.queued == 0 {
            state.watch.stalled = false;
            forgotten.drained = state.watch.outage.take().map(|since| since.elapsed());
        }
        forgotten
    }

    /// The origin delivery `id` is bound to under the rules with `hash`.
    pub(crate) fn bound(&self, id: u64, hash: u64) -> Option<Origin> {
        let state = self.lock();
        match &state.held.get(&id)?.bound {
            Some((h, origin)) if *h == hash => Some(origin.clone()),
            _ => None,
        }
    }

    /// Binds delivery `id` to `origin` under the rules with `hash`.
    pub(crate) fn bind(&self, id: u64, hash: u64, origin: &Origin) -> Option<CircuitEvent> {
        let mut state = self.lock();
        let LaneState { held, origins, .. } = &mut *state;
        let held = held.get_mut(&id)?;
        let before = held.bound.replace((hash, origin.clone()));
        origins.bind(origin);
        before.and_then(|(_, before)| origins.unbind(&before))
    }

    /// The rules changed: what the origins held back, and (with
    /// `everything_now`) every delivery waiting for a retry, held or on
    /// disk, is looked at again at once.
    pub(crate) fn revisit(&self, everything_now: bool) {
        let mut state = self.lock();
        let now = Instant::now();
        let released = state.origins.release_waiting();
        if everything_now {
            state.hurry = state.on_disk_after.is_some();
            let due = std::mem::take(&mut state.due);
            state.due = due
                .into_iter()
                .map(|Reverse((at, id))| Reverse((at.min(now), id)))
                .collect();
        }
        state
            .due
            .extend(released.into_iter().map(|id| Reverse((now, id))));
        drop(state);
        self.wake.notify_one();
    }

    /// Where a read-back starts and how much it may bring; `None` if
    /// nothing is on disk.
    pub(crate) fn begin_read_back(&self) -> Option<(u64, usize)> {
        let mut state = self.lock();
        let after = state.on_disk_after?;
        state.reading = Some(Vec::new());
        Some((after, self.capacity.saturating_sub(state.held.len())))
    }

    pub(crate) fn end_read_back(&self, back: Result<ReadBack, SpoolError>) {
        let mut state = self.lock();
        let meanwhile = state.reading.take().unwrap_or_default();
        let back = match back {
            Ok(back) => back,
            // Still on disk, read back on a later turn.
            Err(e) => {
                tracing::error!(destination = %self.name, "cannot read pending deliveries back from the spool: {e}");
                return;
            }
        };
        let now = Instant::now();
        for (id, record) in back.found {
            let at = if state.hurry {
                now
            } else {
                instant_of(record.next_ms)
            };
            state.hold(id, at, record.first_ms);
        }
        if back.exhausted {
            state.hurry = false;
            // Offered during the scan but after its snapshot: not found,
            // so held now.
            for (id, at, first_ms) in meanwhile {
                if id > back.last {
                    state.hold(id, at, first_ms);
                }
            }
            state.on_disk_after = None;
        } else {
            state.on_disk_after = Some(back.last);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Waits for a delivery that is due. Whether its origin takes it now
    /// is decided next ([`Origins::admit`]).
    pub(crate) async fn next(&self, stop: &CancellationToken) -> Turn {
        loop {
            let notified = self.wake.notified();
            let wait = {
                let mut state = self.lock();
                if state.on_disk_after.is_some() && state.held.len() <= self.capacity / 2 {
                    return Turn::ReadBack;
                }
                match state.due.peek().map(|Reverse((at, id))| (*at, *id)) {
                    None => None,
                    Some((at, _)) if at > Instant::now() => Some(at),
                    Some((_, id)) => {
                        state.due.pop();
                        return Turn::Due(id);
                    }
                }
            };
            let sleep = async {
                match wait {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = notified => {}
                () = sleep => {}
                () = stop.cancelled() => return Turn::Stop,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Record;

    fn lane(capacity: usize) -> Lane {
        Lane::new(DestinationName::from("d"), capacity)
    }

    fn offer_all(lane: &Lane, ids: impl IntoIterator<Item = u64>) {
        let now = Instant::now();
        for id in ids {
            lane.offer(id, now, id);
        }
    }

    /// As the worker does with a delivery: takes it, then forgets it.
    fn deliver(lane: &Lane, id: u64) {
        lane.lock().due.retain(|Reverse((_, due))| *due != id);
        let _ = lane.forget(id);
    }

    fn held(lane: &Lane) -> Vec<u64> {
        lane.lock().held.keys().copied().collect()
    }

    fn record(id: u64) -> (u64, Record) {
        let record = Record {
            job: 1,
            job_id: format!("j{id}"),
            destination: "d".into(),
            rule: "r".into(),
            attempts: 0,
            first_ms: id,
            next_ms: 0,
            last_attempt_ms: None,
            last_error: None,
            dead_reason: None,
            dead_ms: None,
        };
        (id, record)
    }

    #[test]
    fn holds_up_to_capacity_and_counts_the_rest() {
        let lane = lane(4);
        offer_all(&lane, 1..=10);
        let state = lane.lock();
        assert_eq!(state.held.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(state.due.len(), 4);
        assert_eq!(state.queued, 10);
        assert_eq!(state.on_disk_after, Some(4));
    }

    #[test]
    fn an_id_offered_late_below_the_spill_is_held() {
        let lane = lane(3);
        // 3 is offered after 4 and 5 (two accepts answered out of order).
        offer_all(&lane, [1, 2, 4, 5, 3]);
        assert_eq!(held(&lane), [1, 2, 3, 4]);
        assert_eq!(lane.lock().on_disk_after, Some(4));
        assert_eq!(lane.lock().queued, 5);
    }

    #[test]
    fn a_late_id_below_those_held_does_not_start_the_spill() {
        let lane = lane(3);
        offer_all(&lane, [1, 2, 4, 3, 5]);
        assert_eq!(held(&lane), [1, 2, 3, 4]);
        assert_eq!(lane.lock().on_disk_after, Some(4));
    }

    #[test]
    fn reading_back_resumes_where_the_disk_part_starts() {
        let lane = lane(4);
        offer_all(&lane, 1..=10);
        for id in 1..=3 {
            deliver(&lane, id);
        }
        assert_eq!(lane.begin_read_back(), Some((4, 3)));
        lane.end_read_back(Ok(ReadBack {
            found: (5..=7).map(record).collect(),
            last: 7,
            exhausted: false,
        }));
        assert_eq!(held(&lane), [4, 5, 6, 7]);
        assert_eq!(lane.lock().on_disk_after, Some(7));
        assert_eq!(lane.lock().queued, 7);
    }

    #[test]
    fn offers_during_a_read_back_are_not_lost() {
        let lane = lane(2);
        offer_all(&lane, 1..=4);
        deliver(&lane, 1);
        deliver(&lane, 2);
        assert_eq!(lane.begin_read_back(), Some((2, 2)));
        // Offered while the scan runs: 5 made it into its snapshot, 6 did not.
        offer_all(&lane, [5, 6]);
        lane.end_read_back(Ok(ReadBack {
            found: [3, 4, 5].into_iter().map(record).collect(),
            last: 5,
            exhausted: true,
        }));
        let state = lane.lock();
        assert_eq!(state.held.keys().copied().collect::<Vec<_>>(), [3, 4, 5, 6]);
        assert_eq!(state.due.len(), 4, "5 is due once, not twice");
        assert_eq!(state.on_disk_after, None);
        assert_eq!(state.queued, 4);
    }

    /// A reload that removed or moved the destination: what is held is due
    /// at once, and so is what is read back from disk afterwards, until
    /// the disk part is exhausted.
    #[test]
    fn after_a_revisit_even_deliveries_read_back_are_due_at_once() {
        let lane = lane(2);
        let later = Instant::now() + Duration::from_secs(3600);
        for id in 1..=4 {
            lane.offer(id, later, id);
        }
        lane.revisit(true);
        let now = Instant::now();
        let due: Vec<Instant> = lane.lock().due.iter().map(|Reverse((at, _))| *at).collect();
        assert!(due.iter().all(|at| *at <= now), "held: due now");
        deliver(&lane, 1);
        deliver(&lane, 2);
        assert!(lane.begin_read_back().is_some());
        let far = |id| {
            let (id, mut r) = record(id);
            r.next_ms = unix_ms() + 3_600_000;
            (id, r)
        };
        lane.end_read_back(Ok(ReadBack {
            found: vec![far(3), far(4)],
            last: 4,
            exhausted: true,
        }));
        let state = lane.lock();
        assert!(
            state
                .due
                .iter()
                .all(|Reverse((at, _))| *at <= Instant::now())
        );
        assert!(!state.hurry, "only until the disk part is read");
    }

    #[test]
    fn a_failed_read_back_leaves_the_disk_part_for_later() {
        let lane = lane(1);
        offer_all(&lane, 1..=3);
        deliver(&lane, 1);
        assert!(lane.begin_read_back().is_some());
        offer_all(&lane, [4]);
        lane.end_read_back(Err(SpoolError::Closed));
        assert!(held(&lane).is_empty());
        assert_eq!(lane.lock().on_disk_after, Some(1));
        assert_eq!(lane.lock().queued, 3);
    }

    #[tokio::test]
    async fn the_worker_reads_back_once_half_the_capacity_is_free() {
        let lane = lane(4);
        let stop = CancellationToken::new();
        offer_all(&lane, 1..=6);
        assert!(matches!(lane.next(&stop).await, Turn::Due(1)));
        let _ = lane.forget(1);
        assert!(matches!(lane.next(&stop).await, Turn::Due(2)));
        let _ = lane.forget(2);
        assert!(matches!(lane.next(&stop).await, Turn::ReadBack));
    }
}
