//! Durable delivery: the workers that take pending deliveries out of the
//! [`Spool`] and forward them, one lane per destination.
//!
//! A delivery is *job J to destination D*, by name: every attempt takes
//! D's URL (its template filled in again from the job's stored query),
//! headers, timeout, concurrency and attempt limit from the rules in force
//! at that attempt. Fixing a destination in the rules fixes what is queued
//! for it; a destination gone from the rules turns its deliveries into
//! dead letters, replayable once it is back.
//!
//! Each destination's lane (`lane.rs`) holds its due deliveries, a
//! bounded number in memory and the rest on disk. Within a lane each origin
//! of the destination's URL (one, unless it is templated) has its own
//! concurrency limit and circuit breaker ([`crate::delivery::origins`]), so a slow or dead
//! destination, or one tenant's host, never delays another. Outcomes go
//! back to the spool: done, retry at a time, or dead letter.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::attempt::{Attempts, Delivery, Outcome, Policy};
use crate::delivery::follow::{removed_reason, request, route_again, same_target};
use crate::delivery::lane::{Lane, Turn, instant_of};
use crate::delivery::origins::{Admit, CircuitEvent, Origin, Reached};
use crate::delivery::schedule::{Next, RetryPolicy};
use crate::metrics::{Metrics, SPOOL_OPS};
use crate::queue::embedded::{HELD_PER_DESTINATION, Recovered, Replayed, Spool, SpoolError};
use crate::queue::{Accepted, DeadFilter, NewJob, Record, ReplayReport, unix_ms};
use crate::rules::{Destination, DestinationName, RuleSet, UNROUTED};
use crate::throttle::LogThrottle;

/// The limits of durable delivery that are not per destination.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_age: Duration,
    /// Deliveries waiting and no success for this long: a WARN line.
    pub stalled_after: Duration,
}

/// A delivery read from the spool and made into a request with the rules
/// in force.
struct Prepared {
    record: Record,
    delivery: Delivery,
    origin: Origin,
    /// The rules it was made with.
    rules: Arc<RuleSet>,
}

/// The lanes that drain the queue, one per destination, and what they
/// share: the queue, the rules in force, the dead-letter counts.
pub struct Lanes {
    spool: Arc<Spool>,
    forwarder: Arc<Attempts>,
    metrics: Arc<Metrics>,
    rules: watch::Receiver<Arc<RuleSet>>,
    limits: Limits,
    lanes: Mutex<HashMap<DestinationName, Arc<Lane>>>,
    dead: Mutex<HashMap<String, i64>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Where the lanes run: a thread of their own with a single-threaded
    /// runtime, so an attempt, its connection and its lane never wake one
    /// another across threads (as for the server workers).
    runtime: Handle,
    /// Lets the lanes' thread end once they have.
    lanes_done: CancellationToken,
    /// Bursts of the same event (a spool that cannot be read, many
    /// circuits or dead letters at once) are one line per period and
    /// destination, with the count of those left out.
    warnings: LogThrottle,
}

impl Lanes {
    /// Starts the lanes' thread; lanes start as deliveries arrive.
    pub fn new(
        spool: Arc<Spool>,
        forwarder: Arc<Attempts>,
        metrics: Arc<Metrics>,
        rules: watch::Receiver<Arc<RuleSet>>,
        limits: Limits,
    ) -> std::io::Result<Arc<Self>> {
        metrics.register_spool();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let lanes_done = CancellationToken::new();
        let handle = runtime.handle().clone();
        let done = lanes_done.clone();
        std::thread::Builder::new()
            .name("hookgate-lanes".into())
            .spawn(move || runtime.block_on(done.cancelled()))?;
        let dispatcher = Arc::new(Self {
            spool,
            forwarder,
            metrics,
            rules,
            limits,
            lanes: Mutex::new(HashMap::new()),
            dead: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            runtime: handle,
            lanes_done,
            warnings: LogThrottle::new(Duration::from_secs(10)),
        });
        let me = dispatcher.clone();
        dispatcher
            .tasks
            .spawn_on(async move { me.watch().await }, &dispatcher.runtime);
        Ok(dispatcher)
    }

    /// Resumes what the spool held at start-up.
    pub fn resume(self: &Arc<Self>, recovered: Recovered) {
        *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = recovered.dead_by_destination;
        for (id, record) in recovered.pending {
            self.enqueue(id, &record);
        }
        for (destination, on_disk) in recovered.on_disk {
            self.lane(&destination).left_on_disk(on_disk);
        }
        // Destinations the rules no longer name: their deliveries become
        // dead letters now, not at their next retry.
        let rules = self.rules.borrow().clone();
        for lane in self.all_lanes() {
            if rules.destination(lane.name.as_str()).is_none() {
                lane.revisit(true);
            }
        }
    }

    /// Stores a routed job; answers once it is on disk.
    pub async fn accept(self: &Arc<Self>, job: NewJob) -> Result<Accepted, SpoolError> {
        let accepted = self.spool.accept(job).await?;
        if let Accepted::New { pending, dead } = &accepted {
            for (id, record) in pending {
                self.enqueue(*id, record);
            }
            for record in dead {
                self.buried(record);
            }
        }
        Ok(accepted)
    }

    fn lane(self: &Arc<Self>, destination: &str) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = lanes.get(destination) {
            return lane.clone();
        }
        let lane = Arc::new(Lane::new(
            DestinationName::from(destination),
            HELD_PER_DESTINATION,
        ));
        lanes.insert(lane.name.clone(), lane.clone());
        let (me, worker) = (self.clone(), lane.clone());
        self.tasks
            .spawn_on(async move { me.run_lane(worker).await }, &self.runtime);
        lane
    }

    fn all_lanes(&self) -> Vec<Arc<Lane>> {
        self.lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn enqueue(self: &Arc<Self>, id: u64, record: &Record) {
        self.lane(&record.destination)
            .offer(id, instant_of(record.next_ms), record.first_ms);
    }

    async fn run_lane(self: Arc<Self>, lane: Arc<Lane>) {
        loop {
            match lane.next(&self.stop).await {
                Turn::Due(id) => self.dispatch(&lane, id),
                Turn::ReadBack => self.read_back(&lane).await,
                Turn::Stop => return,
            }
        }
    }

    /// Follows the rules as they change, and reports stalled lanes. A
    /// reload that removes a destination, or changes its URL or headers,
    /// has its lane look at every delivery at once (dead letters for a
    /// destination gone, the new URL for one fixed); any other reload lets
    /// what the origins held back be looked at again.
    async fn watch(self: Arc<Self>) {
        let mut rules = self.rules.clone();
        let mut before = rules.borrow_and_update().clone();
        let mut tick = tokio::time::interval(
            (self.limits.stalled_after / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(5)),
        );
        loop {
            tokio::select! {
                changed = rules.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    rules.borrow_and_update();
                    for lane in self.all_lanes() {
                        lane.revisit(self.moved(&lane, &before));
                    }
                    before = rules.borrow().clone();
                }
                _ = tick.tick() => self.check_stalls(),
                () = self.stop.cancelled() => return,
            }
        }
    }

    /// Reports, once, each lane whose deliveries wait with no success for
    /// longer than `stalled_after`.
    fn check_stalls(&self) {
        let now = Instant::now();
        for lane in self.all_lanes() {
            let mut state = lane.lock();
            let waited = now.saturating_duration_since(state.watch.progress);
            if state.queued == 0 || state.watch.stalled || waited < self.limits.stalled_after {
                continue;
            }
            state.watch.stalled = true;
            state.watch.outage.get_or_insert(now);
            let oldest = state
                .held
                .first_key_value()
                .map_or(0, |(_, h)| unix_ms().saturating_sub(h.first_ms) / 1000);
            tracing::warn!(
                destination = %lane.name,
                waiting = state.queued,
                oldest_seconds = oldest,
                open_origins = state.origins.open(),
                "no delivery to this destination succeeded for {} while deliveries wait",
                humantime::format_duration(Duration::from_secs(waited.as_secs()))
            );
        }
    }

    /// A delivery is due: its destination and origin in the rules in force
    /// decide whether it starts now, waits, or is a dead letter.
    fn dispatch(self: &Arc<Self>, lane: &Arc<Lane>, id: u64) {
        let rules = self.rules.borrow().clone();
        let Some(destination) = rules.destination(lane.name.as_str()) else {
            self.remove(lane, id);
            return;
        };
        let policy = self.forwarder.policy(destination);
        let (origin, mut prepared) = match lane.bound(id, rules.hash) {
            Some(origin) => (origin, None),
            None => {
                let Some(p) = self.prepare(lane, id, &rules, destination) else {
                    return;
                };
                if let Some(event) = lane.bind(id, rules.hash, &p.origin) {
                    self.announce(lane, event);
                }
                (p.origin.clone(), Some(p))
            }
        };
        let admitted = lane
            .lock()
            .origins
            .admit(&origin, id, policy.concurrency, Instant::now());
        match admitted {
            Admit::Start => {}
            Admit::WaitUntil(at) => return lane.retry(id, at),
            Admit::Queued => return,
        }
        if prepared.is_none() {
            prepared = self.prepare(lane, id, &rules, destination);
        }
        drop(rules);
        let Some(prepared) = prepared else {
            // Nothing reached the origin: if this was its circuit's probe,
            // the next delivery probes instead.
            self.finished(lane, &origin, Reached::Nothing, policy.concurrency);
            return;
        };
        let (me, lane) = (self.clone(), lane.clone());
        self.tasks.spawn(async move {
            me.attempt(&lane, id, prepared, policy).await;
        });
    }

    /// A due delivery whose destination is no longer in the rules.
    fn remove(&self, lane: &Lane, id: u64) {
        match self.spool.load(id) {
            Ok(Some((record, _))) => {
                self.forget(lane, id);
                self.bury(id, record, removed_reason(lane.name.as_str()));
            }
            Ok(None) => self.forget(lane, id),
            Err(e) => self.unreadable(lane, id, &e),
        }
    }

    async fn read_back(&self, lane: &Lane) {
        let Some((after, room)) = lane.begin_read_back() else {
            return;
        };
        let spool = self.spool.clone();
        let name = lane.name.clone();
        let back =
            tokio::task::spawn_blocking(move || spool.pending_after(name.as_str(), after, room))
                .await
                .unwrap_or_else(|e| Err(SpoolError::Storage(e.to_string())));
        let failed = back.is_err();
        lane.end_read_back(back);
        if failed {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                () = self.stop.cancelled() => {}
            }
        }
    }

    /// The spool cannot be read right now: try again later rather than
    /// lose track of the delivery.
    fn unreadable(&self, lane: &Lane, id: u64, e: &SpoolError) {
        if let Some(left_out) = self.warnings.allow("load", Instant::now()) {
            tracing::error!(
                id,
                destination = %lane.name,
                similar_left_out = left_out,
                "cannot load a delivery, retrying in 5 s: {e}"
            );
        }
        lane.retry(id, Instant::now() + Duration::from_secs(5));
    }

    /// The delivery's record, read from the spool, and its request, made
    /// with the rules in force; `None` when there is nothing to send (gone,
    /// unreadable for now, or a dead letter: undecodable, or its URL
    /// template no longer fills in).
    fn prepare(
        &self,
        lane: &Lane,
        id: u64,
        rules: &Arc<RuleSet>,
        destination: &Destination,
    ) -> Option<Prepared> {
        let (record, job) = match self.spool.load(id) {
            Ok(Some(found)) => found,
            Ok(None) => {
                self.forget(lane, id);
                return None;
            }
            Err(e) => {
                self.unreadable(lane, id, &e);
                return None;
            }
        };
        let Some(job) = job else {
            self.forget(lane, id);
            self.bury(
                id,
                record,
                "undecodable: the stored webhook could not be read (see the spool's quarantine)"
                    .into(),
            );
            return None;
        };
        match request(rules, destination, &record, job) {
            Ok(delivery) => Some(Prepared {
                origin: Origin::of(&delivery.url),
                record,
                delivery,
                rules: rules.clone(),
            }),
            Err(reason) => {
                self.forget(lane, id);
                self.bury(id, record, reason);
                None
            }
        }
    }

    async fn attempt(&self, lane: &Lane, id: u64, prepared: Prepared, policy: Policy) {
        let Prepared {
            mut record,
            delivery,
            origin,
            rules,
        } = prepared;
        let outcome = self.forwarder.attempt(&delivery, policy.timeout).await;
        let now = Instant::now();
        record.attempts += 1;
        record.last_attempt_ms = Some(unix_ms());
        let reached = match outcome {
            Outcome::Delivered(_) | Outcome::Refused(_) => Reached::Alive,
            _ => Reached::Failed,
        };
        self.finished(lane, &origin, reached, policy.concurrency);
        match &outcome {
            Outcome::Delivered(_) => {
                self.progressed(lane);
                self.forget(lane, id);
                self.metrics
                    .deliveries
                    .with_label_values(&[lane.name.as_str(), "delivered"])
                    .inc();
                if let Err(e) = self.spool.complete(id, record.job) {
                    tracing::error!(id, "cannot record a delivery: {e}");
                }
            }
            Outcome::Refused(status) => {
                // The destination is up; it is the job it will not take.
                self.forget(lane, id);
                record.last_error = Some(outcome.to_string());
                self.bury(id, record, format!("refused with {status}"));
            }
            failed => {
                record.last_error = Some(failed.to_string());
                let retry = RetryPolicy {
                    backoff: self.forwarder.backoff(),
                    max_attempts: policy.max_attempts,
                    max_age: self.limits.max_age,
                };
                match retry.after_failure(
                    record.attempts,
                    instant_of(record.first_ms),
                    now,
                    failed.retry_after(),
                    fastrand::f64(),
                ) {
                    Next::RetryAt(at) => {
                        record.next_ms =
                            unix_ms() + at.saturating_duration_since(now).as_millis() as u64;
                        tracing::debug!(id, destination = %lane.name, %origin, attempts = record.attempts, "{failed}; retrying in {:?}", at - now);
                        if let Err(e) = self.spool.update(id, record.clone()).await {
                            // Still retried: at worst the attempt is not counted.
                            tracing::error!(id, "cannot record a failed attempt: {e}");
                        }
                        // A reload since the attempt began that removed or
                        // moved the destination: looked at again at once,
                        // as the reload did with the deliveries it found
                        // waiting.
                        let at = if self.moved(lane, &rules) {
                            Instant::now()
                        } else {
                            at
                        };
                        lane.retry(id, at);
                    }
                    Next::GiveUp(reason) => {
                        self.forget(lane, id);
                        self.bury(id, record, reason.to_string());
                    }
                }
            }
        }
    }

    /// Whether the lane's destination was removed or changed its URL or
    /// headers since `then`.
    fn moved(&self, lane: &Lane, then: &Arc<RuleSet>) -> bool {
        let now = self.rules.borrow().clone();
        if Arc::ptr_eq(&now, then) {
            return false;
        }
        let name = lane.name.as_str();
        match (then.destination(name), now.destination(name)) {
            (Some(was), Some(is)) => !same_target(was, is),
            _ => true,
        }
    }

    /// An attempt that its origin admitted ended: what the origin held
    /// back goes now or later.
    fn finished(&self, lane: &Lane, origin: &Origin, reached: Reached, limit: usize) {
        let now = Instant::now();
        let finished = lane.lock().origins.finish(origin, reached, limit, now);
        for id in finished.now {
            lane.retry(id, now);
        }
        if let Some((at, ids)) = finished.later {
            for id in ids {
                lane.retry(id, at);
            }
        }
        if let Some(event) = finished.event {
            self.announce(lane, event);
        }
    }

    /// A delivery succeeded: a stalled lane is delivering again.
    fn progressed(&self, lane: &Lane) {
        let mut state = lane.lock();
        state.watch.progress = Instant::now();
        if std::mem::take(&mut state.watch.stalled) {
            tracing::info!(
                destination = %lane.name,
                waiting = state.queued,
                "deliveries to this destination succeed again"
            );
        }
    }

    /// Forgets a held delivery, telling what that changed.
    fn forget(&self, lane: &Lane, id: u64) {
        let forgotten = lane.forget(id);
        if let Some(event) = forgotten.event {
            self.announce(lane, event);
        }
        if let Some(after) = forgotten.drained {
            tracing::info!(
                destination = %lane.name,
                "backlog drained: nothing is waiting for this destination any more, {} after \
                 the outage was reported",
                humantime::format_duration(Duration::from_secs(after.as_secs()))
            );
        }
    }

    /// Logs a circuit's change, once per transition, at most one line per
    /// destination and kind every 10 s.
    fn announce(&self, lane: &Lane, event: CircuitEvent) {
        let key = match &event {
            CircuitEvent::Opened { .. } => "circuit_opened",
            CircuitEvent::Closed { .. } => "circuit_closed",
        };
        if let CircuitEvent::Opened { .. } = event {
            lane.lock().watch.outage.get_or_insert_with(Instant::now);
        }
        let Some(left_out) = self
            .warnings
            .allow(&format!("{key}:{}", lane.name), Instant::now())
        else {
            return;
        };
        match event {
            CircuitEvent::Opened {
                origin,
                failures,
                cooldown,
            } => tracing::warn!(
                destination = %lane.name,
                %origin,
                consecutive_failures = failures,
                cooldown = %humantime::format_duration(cooldown),
                similar_left_out = left_out,
                "circuit opened: deliveries to this origin wait, without spending attempts, \
                 until a probe after the cool-down succeeds"
            ),
            CircuitEvent::Closed { origin, answered } => tracing::warn!(
                destination = %lane.name,
                %origin,
                similar_left_out = left_out,
                "circuit closed: {}",
                if answered {
                    "the origin answers again"
                } else {
                    "no delivery is left for this origin"
                }
            ),
        }
    }

    fn bury(&self, id: u64, mut record: Record, reason: String) {
        if let Some(left_out) = self.warnings.allow(
            &format!("dead_letter:{}", record.destination),
            Instant::now(),
        ) {
            tracing::warn!(
                id,
                job_id = %record.job_id,
                destination = %record.destination,
                attempts = record.attempts,
                last_error = record.last_error.as_deref().unwrap_or_default(),
                similar_left_out = left_out,
                "dead letter: {reason}"
            );
        }
        record.dead_reason = Some(reason);
        record.dead_ms = Some(unix_ms());
        // Sent before it is counted: a listing after the count finds it.
        if let Err(e) = self.spool.bury(id, record.clone()) {
            tracing::error!(id, "cannot record a dead letter: {e}");
        }
        self.buried(&record);
    }

    /// Counts a new dead letter.
    fn buried(&self, record: &Record) {
        self.count_dead(&record.destination, 1);
        if record.destination != UNROUTED {
            self.metrics
                .deliveries
                .with_label_values(&[record.destination.as_str(), "dead_lettered"])
                .inc();
        }
    }

    /// Puts matching dead letters back in the queue, for the same
    /// destination (whose rules in force then apply). Unrouted ones, and
    /// with `reroute` all of them, have their jobs routed again by the
    /// rules in force now.
    pub async fn replay(
        self: &Arc<Self>,
        filter: DeadFilter,
        reroute: bool,
    ) -> Result<ReplayReport, SpoolError> {
        let mut report = ReplayReport::default();
        let mut to_route: BTreeMap<u64, Vec<(u64, Record)>> = BTreeMap::new();
        for replayed in self.spool.replay(filter, reroute).await? {
            match replayed {
                Replayed::Pending(id, record) => {
                    self.count_dead(&record.destination, -1);
                    self.enqueue(id, &record);
                    report.replayed += 1;
                }
                Replayed::ToRoute(id, record) => {
                    to_route.entry(record.job).or_default().push((id, record));
                }
            }
        }
        for (job, dead) in to_route {
            let n = dead.len();
            if self.reroute(job, dead).await? {
                report.rerouted += n;
            } else {
                report.still_unrouted += n;
            }
        }
        Ok(report)
    }

    /// Routes job `job` again, in place of its dead letters `dead`; false
    /// (and nothing changed) when the rules route it nowhere.
    async fn reroute(
        self: &Arc<Self>,
        job: u64,
        dead: Vec<(u64, Record)>,
    ) -> Result<bool, SpoolError> {
        let Some(stored) = self.spool.job(job)? else {
            return Ok(false);
        };
        let rules = self.rules.borrow().clone();
        let Some(records) = route_again(&rules, &stored, unix_ms()) else {
            return Ok(false);
        };
        let ids = dead.iter().map(|(id, _)| *id).collect();
        let (pending, buried) = self.spool.reroute(ids, job, records).await?;
        for (_, record) in &dead {
            self.count_dead(&record.destination, -1);
        }
        for (id, record) in &pending {
            self.enqueue(*id, record);
        }
        for record in &buried {
            self.buried(record);
        }
        Ok(true)
    }

    /// Deletes matching dead letters for good.
    pub async fn purge(&self, filter: DeadFilter) -> Result<usize, SpoolError> {
        let purged = self.spool.purge(filter).await?;
        for record in &purged {
            self.count_dead(&record.destination, -1);
        }
        Ok(purged.len())
    }

    fn count_dead(&self, destination: &str, by: i64) {
        let mut dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        let n = dead.entry(destination.to_owned()).or_default();
        *n = (*n + by).max(0);
    }

    /// Sets the queue, age, circuit and dead-letter gauges (on scrape).
    /// `hookgate_circuit_open` is the number of the destination's origins
    /// whose circuit is open: per destination, never per host.
    pub fn refresh_gauges(&self) {
        let now_ms = unix_ms();
        for lane in self.all_lanes() {
            let state = lane.lock();
            let name = lane.name.as_str();
            self.metrics
                .queue_depth
                .with_label_values(&[name])
                .set(state.queued as i64);
            let oldest = state
                .held
                .first_key_value()
                .map_or(0, |(_, held)| now_ms.saturating_sub(held.first_ms));
            self.metrics
                .queue_oldest_age
                .with_label_values(&[name])
                .set(oldest as f64 / 1000.0);
            self.metrics
                .circuit_open
                .with_label_values(&[name])
                .set(state.origins.open() as i64);
        }
        let health = self.spool.health();
        let spool = &self.metrics.spool;
        spool.writable.set(i64::from(health.writable));
        spool.quarantined.set(health.quarantined as i64);
        for (op, total) in SPOOL_OPS.into_iter().zip([
            health.open_errors,
            health.commit_errors,
            health.read_errors,
        ]) {
            let counter = spool.errors.with_label_values(&[op]);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        for (destination, n) in self.dead.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            self.metrics
                .dead_letters
                .with_label_values(&[destination])
                .set(*n);
        }
    }

    /// Stops starting attempts, lets those in flight finish for up to
    /// `grace` (the rest stay pending on disk), then flushes the spool.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "delivery attempts still in flight at shutdown stay pending and are retried after restart"
            );
        }
        self.lanes_done.cancel();
        let spool = self.spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.close()).await;
    }
}

/// The embedded backend: the lanes take what the spool stored.
impl crate::queue::Queue for Arc<Lanes> {
    fn accept(
        &self,
        job: NewJob,
    ) -> futures_util::future::BoxFuture<'_, Result<Accepted, crate::queue::QueueError>> {
        Box::pin(async move { Ok(Lanes::accept(self, job).await?) })
    }

    fn seen(&self, job_id: &str) -> Result<bool, crate::queue::QueueError> {
        Ok(self.spool.seen(job_id)?)
    }

    fn dead_letters(
        &self,
        filter: DeadFilter,
        after: Option<u64>,
        limit: usize,
    ) -> futures_util::future::BoxFuture<'_, Result<Vec<(u64, Record)>, crate::queue::QueueError>>
    {
        Box::pin(async move {
            // Dead letters counted but still on their way to disk are listed
            // too. A spool that cannot write lists what it holds.
            let _ = self.spool.settled().await;
            Ok(self.spool.dead_letters(&filter, after, limit)?)
        })
    }

    fn replay(
        &self,
        filter: DeadFilter,
        reroute: bool,
    ) -> futures_util::future::BoxFuture<'_, Result<ReplayReport, crate::queue::QueueError>> {
        Box::pin(async move { Ok(Lanes::replay(self, filter, reroute).await?) })
    }

    fn purge(
        &self,
        filter: DeadFilter,
    ) -> futures_util::future::BoxFuture<'_, Result<usize, crate::queue::QueueError>> {
        Box::pin(async move { Ok(Lanes::purge(self, filter).await?) })
    }

    fn quarantined(&self) -> Result<Vec<crate::queue::Quarantined>, crate::queue::QueueError> {
        Ok(self.spool.quarantined()?)
    }

    fn refresh_gauges(&self) {
        Lanes::refresh_gauges(self);
    }

    fn ready(&self) -> Result<(), String> {
        if self.spool.is_healthy() {
            Ok(())
        } else {
            Err("the spool is not writable".into())
        }
    }
}
