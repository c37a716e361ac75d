//! Durable delivery: the workers that take pending deliveries out of the
//! [`Spool`] and forward them, one lane per destination.
//!
//! A lane holds only ids and times in memory (the bodies stay on disk), and
//! only for the first few thousand of its pending deliveries: the rest wait
//! on disk and are read back in id order as those are delivered, so memory
//! stays flat through an outage of any length. Each lane has its own
//! concurrency limit and circuit breaker, so a slow or dead destination
//! never delays another. Outcomes go back to the spool: done, retry at a
//! time, or dead letter.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tokio::runtime::Handle;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::deliver::{Delivery, Forwarder, Outcome};
use crate::metrics::{Metrics, SPOOL_OPS};
use crate::query::Query;
use crate::rules::{DestinationName, Input, RuleSet, UNROUTED};
use crate::schedule::{Circuit, Gate, Next, RetryPolicy};
use crate::spool::{
    Accepted, DeadFilter, HELD_PER_DESTINATION, NewJob, OnDisk, ReadBack, Record, Recovered, Spool,
    SpoolError, StoredJob, unix_ms,
};
use crate::throttle::LogThrottle;

/// The instant of a stored wall-clock time, for timers.
fn instant_of(ms: u64) -> Instant {
    let now_ms = unix_ms();
    let now = Instant::now();
    if ms >= now_ms {
        now + Duration::from_millis(ms - now_ms)
    } else {
        now.checked_sub(Duration::from_millis(now_ms - ms))
            .unwrap_or(now)
    }
}

#[derive(Default)]
struct LaneState {
    /// Due times of the held deliveries waiting, soonest first.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    /// The deliveries held in memory, waiting or in flight, with their
    /// first-accepted time: about as many as the lane's capacity at most.
    held: BTreeMap<u64, u64>,
    /// Pending deliveries in all, held or on disk only.
    queued: usize,
    /// Set while some pending deliveries are on disk only: all those with
    /// ids above it, none at or below it.
    on_disk_after: Option<u64>,
    /// While a read-back runs: deliveries offered meanwhile and left on
    /// disk, in case its snapshot came too early to see them.
    reading: Option<Vec<(u64, Instant, u64)>>,
    circuit: Circuit,
}

impl LaneState {
    fn hold(&mut self, id: u64, at: Instant, first_ms: u64) {
        if self.held.insert(id, first_ms).is_none() {
            self.due.push(Reverse((at, id)));
        }
    }
}

/// What a lane's worker does next.
enum Turn {
    Deliver(u64),
    /// Few deliveries are held and more wait on disk.
    ReadBack,
    Stop,
}

struct Lane {
    name: DestinationName,
    state: Mutex<LaneState>,
    wake: Notify,
    permits: Arc<Semaphore>,
    /// How many deliveries it holds in memory before leaving them on disk.
    capacity: usize,
}

impl Lane {
    fn new(name: DestinationName, concurrency: usize, capacity: usize) -> Self {
        Self {
            name,
            state: Mutex::new(LaneState::default()),
            wake: Notify::new(),
            permits: Arc::new(Semaphore::new(concurrency)),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A delivery newly pending (accepted, replayed, resumed): held, or
    /// left on disk when the lane holds enough.
    fn offer(&self, id: u64, at: Instant, first_ms: u64) {
        let mut state = self.lock();
        state.queued += 1;
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
    fn left_on_disk(&self, on_disk: OnDisk) {
        let mut state = self.lock();
        state.queued += on_disk.count;
        state.on_disk_after = Some(on_disk.first - 1);
    }

    /// A held delivery, due again at `at`.
    fn retry(&self, id: u64, at: Instant) {
        self.lock().due.push(Reverse((at, id)));
        self.wake.notify_one();
    }

    /// A held delivery that is no longer pending.
    fn forget(&self, id: u64) {
        let mut state = self.lock();
        if state.held.remove(&id).is_some() {
            state.queued = state.queued.saturating_sub(1);
        }
    }

    /// Where a read-back starts and how much it may bring; `None` if
    /// nothing is on disk.
    fn begin_read_back(&self) -> Option<(u64, usize)> {
        let mut state = self.lock();
        let after = state.on_disk_after?;
        state.reading = Some(Vec::new());
        Some((after, self.capacity.saturating_sub(state.held.len())))
    }

    fn end_read_back(&self, back: Result<ReadBack, SpoolError>) {
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
        for (id, record) in back.found {
            state.hold(id, instant_of(record.next_ms), record.first_ms);
        }
        if back.exhausted {
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

    /// Waits for a delivery that is due and that the circuit lets through.
    async fn next(&self, stop: &CancellationToken) -> Turn {
        loop {
            let notified = self.wake.notified();
            let wait = {
                let mut state = self.lock();
                if state.on_disk_after.is_some() && state.held.len() <= self.capacity / 2 {
                    return Turn::ReadBack;
                }
                let now = Instant::now();
                match state.due.peek().map(|Reverse((at, id))| (*at, *id)) {
                    None => None,
                    Some((at, _)) if at > now => Some(at),
                    Some((_, id)) => match state.circuit.gate(now) {
                        Gate::Pass => {
                            state.due.pop();
                            return Turn::Deliver(id);
                        }
                        Gate::WaitUntil(until) => Some(until),
                        Gate::WaitForProbe => None,
                    },
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

/// What a replay did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Replayed {
    pub replayed: usize,
    pub rerouted: usize,
    pub still_unrouted: usize,
}

pub struct Dispatcher {
    spool: Arc<Spool>,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    rules: watch::Receiver<Arc<RuleSet>>,
    max_age: Duration,
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
    /// While the spool cannot be read, every held delivery fails to load
    /// in turn: one line per period, not one per delivery.
    warnings: LogThrottle,
}

impl Dispatcher {
    /// Starts the lanes' thread; lanes start as deliveries arrive.
    pub fn new(
        spool: Arc<Spool>,
        forwarder: Arc<Forwarder>,
        metrics: Arc<Metrics>,
        rules: watch::Receiver<Arc<RuleSet>>,
        max_age: Duration,
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
        Ok(Arc::new(Self {
            spool,
            forwarder,
            metrics,
            rules,
            max_age,
            lanes: Mutex::new(HashMap::new()),
            dead: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            runtime: handle,
            lanes_done,
            warnings: LogThrottle::new(Duration::from_secs(10)),
        }))
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
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
        let rules = self.rules.borrow().clone();
        let concurrency = self
            .forwarder
            .policy(rules.destination(destination))
            .concurrency;
        let lane = Arc::new(Lane::new(
            DestinationName::from(destination),
            concurrency,
            HELD_PER_DESTINATION,
        ));
        lanes.insert(lane.name.clone(), lane.clone());
        let (me, worker) = (self.clone(), lane.clone());
        self.tasks
            .spawn_on(async move { me.run_lane(worker).await }, &self.runtime);
        lane
    }

    fn enqueue(self: &Arc<Self>, id: u64, record: &Record) {
        self.lane(&record.destination)
            .offer(id, instant_of(record.next_ms), record.first_ms);
    }

    async fn run_lane(self: Arc<Self>, lane: Arc<Lane>) {
        loop {
            let permit = tokio::select! {
                permit = lane.permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
                () = self.stop.cancelled() => return,
            };
            let id = match lane.next(&self.stop).await {
                Turn::Deliver(id) => id,
                Turn::ReadBack => {
                    self.read_back(&lane).await;
                    continue;
                }
                Turn::Stop => return,
            };
            let (me, lane) = (self.clone(), lane.clone());
            self.tasks.spawn(async move {
                me.attempt(&lane, id).await;
                drop(permit);
                lane.wake.notify_one();
            });
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

    /// The delivery's record and request, read from the spool; `None`
    /// when there is nothing to send (gone, unreadable for now, or
    /// undecodable: dead-lettered).
    fn prepare(&self, lane: &Lane, id: u64) -> Option<(Record, Delivery)> {
        let (record, job) = match self.spool.load(id) {
            Ok(Some(found)) => found,
            Ok(None) => {
                lane.forget(id);
                return None;
            }
            Err(e) => {
                // The spool cannot be read right now: try again later
                // rather than lose track of the delivery.
                if let Some(left_out) = self.warnings.allow("load", Instant::now()) {
                    tracing::error!(
                        id,
                        destination = %lane.name,
                        similar_left_out = left_out,
                        "cannot load a delivery, retrying in 5 s: {e}"
                    );
                }
                lane.retry(id, Instant::now() + Duration::from_secs(5));
                return None;
            }
        };
        let Some(job) = job else {
            lane.forget(id);
            self.bury(
                id,
                record,
                "undecodable: the stored webhook could not be read (see the spool's quarantine)"
                    .into(),
            );
            return None;
        };
        let delivery = match delivery_of(&lane.name, &record, job) {
            Ok(d) => d,
            Err(reason) => {
                lane.forget(id);
                self.bury(id, record, reason);
                return None;
            }
        };
        Some((record, delivery))
    }

    async fn attempt(&self, lane: &Lane, id: u64) {
        let Some((mut record, delivery)) = self.prepare(lane, id) else {
            // Nothing reached the destination: if this was the circuit's
            // probe, the next attempt probes instead.
            lane.lock().circuit.released();
            return;
        };
        let rules = self.rules.borrow().clone();
        let policy = self
            .forwarder
            .policy(rules.destination(&record.destination));
        drop(rules);
        let outcome = self.forwarder.attempt(&delivery, policy.timeout).await;
        let now = Instant::now();
        record.attempts += 1;
        record.last_attempt_ms = Some(unix_ms());
        match &outcome {
            Outcome::Delivered(_) => {
                lane.lock().circuit.alive();
                lane.forget(id);
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
                lane.lock().circuit.alive();
                lane.forget(id);
                record.last_error = Some(outcome.to_string());
                self.bury(id, record, format!("refused with {status}"));
            }
            failed => {
                lane.lock().circuit.failed(now);
                record.last_error = Some(failed.to_string());
                let retry = RetryPolicy {
                    backoff: self.forwarder.backoff(),
                    max_attempts: policy.max_attempts,
                    max_age: self.max_age,
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
                        tracing::debug!(id, destination = %lane.name, attempts = record.attempts, "{failed}; retrying in {:?}", at - now);
                        if let Err(e) = self.spool.update(id, record.clone()).await {
                            // Still retried: at worst the attempt is not counted.
                            tracing::error!(id, "cannot record a failed attempt: {e}");
                        }
                        lane.retry(id, at);
                    }
                    Next::GiveUp(reason) => {
                        lane.forget(id);
                        self.bury(id, record, reason.to_string());
                    }
                }
            }
        }
    }

    fn bury(&self, id: u64, mut record: Record, reason: String) {
        tracing::warn!(
            id,
            job_id = %record.job_id,
            destination = %record.destination,
            attempts = record.attempts,
            last_error = record.last_error.as_deref().unwrap_or_default(),
            "dead letter: {reason}"
        );
        record.dead_reason = Some(reason);
        record.dead_ms = Some(unix_ms());
        self.buried(&record);
        if let Err(e) = self.spool.bury(id, record) {
            tracing::error!(id, "cannot record a dead letter: {e}");
        }
    }

    /// Counts a new dead letter.
    fn buried(&self, record: &Record) {
        *self
            .dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(record.destination.clone())
            .or_default() += 1;
        if record.destination != UNROUTED {
            self.metrics
                .deliveries
                .with_label_values(&[record.destination.as_str(), "dead_lettered"])
                .inc();
        }
    }

    /// Puts matching dead letters back in the queue; unrouted ones are
    /// routed again by the rules in force now.
    pub async fn replay(self: &Arc<Self>, filter: DeadFilter) -> Result<Replayed, SpoolError> {
        let mut report = Replayed::default();
        for (id, record) in self.spool.replay(filter).await? {
            if record.destination == UNROUTED {
                if self.reroute(id, &record).await? {
                    report.rerouted += 1;
                } else {
                    report.still_unrouted += 1;
                }
                continue;
            }
            self.count_dead(&record.destination, -1);
            self.enqueue(id, &record);
            report.replayed += 1;
        }
        Ok(report)
    }

    async fn reroute(self: &Arc<Self>, dead_id: u64, record: &Record) -> Result<bool, SpoolError> {
        let Some(job) = self.spool.job(record.job)? else {
            return Ok(false);
        };
        let rules = self.rules.borrow().clone();
        let Ok(parsed) = crate::job::Job::from_bytes(&job.body) else {
            return Ok(false);
        };
        let query = Query::new(job.query.as_deref(), parsed.callback_url.as_deref());
        let decision = rules.decide(Input {
            job: &parsed,
            query: &query,
        });
        if decision.is_unrouted() {
            return Ok(false);
        }
        let now = unix_ms();
        let records = records_for(&decision, &parsed.job_id, now);
        let (pending, dead) = self.spool.reroute(dead_id, record.job, records).await?;
        self.count_dead(UNROUTED, -1);
        for (id, r) in &pending {
            self.enqueue(*id, r);
        }
        for r in &dead {
            self.buried(r);
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
    pub fn refresh_gauges(&self) {
        let now_ms = unix_ms();
        let lanes: Vec<Arc<Lane>> = self
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for lane in lanes {
            let state = lane.lock();
            let name = lane.name.as_str();
            self.metrics
                .queue_depth
                .with_label_values(&[name])
                .set(state.queued as i64);
            let oldest = state
                .held
                .first_key_value()
                .map_or(0, |(_, first)| now_ms.saturating_sub(*first));
            self.metrics
                .queue_oldest_age
                .with_label_values(&[name])
                .set(oldest as f64 / 1000.0);
            self.metrics
                .circuit_open
                .with_label_values(&[name])
                .set(i64::from(state.circuit.is_open()));
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

/// The spool records for a routing decision: one per destination, dead at
/// once when its URL cannot be filled in, one `unrouted` dead letter when no
/// rule matched, none when a rule dropped the job.
pub fn records_for(
    decision: &crate::rules::Decision<'_>,
    job_id: &str,
    now_ms: u64,
) -> Vec<Record> {
    let record =
        |destination: &str, rule: &str, url: String, headers: Vec<(String, String)>| Record {
            job: 0,
            job_id: job_id.to_owned(),
            destination: destination.to_owned(),
            rule: rule.to_owned(),
            url,
            headers,
            attempts: 0,
            first_ms: now_ms,
            next_ms: now_ms,
            last_attempt_ms: None,
            last_error: None,
            dead_reason: None,
            dead_ms: None,
        };
    if decision.is_unrouted() {
        let mut r = record(UNROUTED, UNROUTED, String::new(), Vec::new());
        r.dead_reason = Some("unrouted: no rule matched; replay once the rules route it".into());
        r.dead_ms = Some(now_ms);
        return vec![r];
    }
    decision
        .routes
        .iter()
        .map(|route| {
            let headers = route
                .headers()
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let name = route.destination.name.as_str();
            match &route.url {
                Ok(url) => record(name, route.rule.name.as_str(), url.to_string(), headers),
                Err(e) => {
                    let mut r = record(name, route.rule.name.as_str(), String::new(), headers);
                    r.dead_reason = Some(format!("not forwarded: {e}"));
                    r.dead_ms = Some(now_ms);
                    r
                }
            }
        })
        .collect()
}

/// Rebuilds the HTTP request of a stored delivery.
fn delivery_of(
    destination: &DestinationName,
    record: &Record,
    job: StoredJob,
) -> Result<Delivery, String> {
    let url = http::Uri::try_from(record.url.as_str())
        .map_err(|e| format!("stored URL {:?} is invalid: {e}", record.url))?;
    let headers = record.headers.iter().filter_map(|(n, v)| {
        Some((
            HeaderName::from_bytes(n.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    });
    let signature = job
        .signature
        .as_ref()
        .and_then(|s| HeaderValue::from_bytes(s).ok());
    Ok(Delivery::build(
        destination.clone(),
        url,
        headers,
        &record.rule,
        &record.job_id,
        signature,
        job.body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(capacity: usize) -> Lane {
        Lane::new(DestinationName::from("d"), 1, capacity)
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
        lane.forget(id);
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
            url: "http://d/".into(),
            headers: Vec::new(),
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
        assert!(matches!(lane.next(&stop).await, Turn::Deliver(1)));
        lane.forget(1);
        assert!(matches!(lane.next(&stop).await, Turn::Deliver(2)));
        lane.forget(2);
        assert!(matches!(lane.next(&stop).await, Turn::ReadBack));
    }
}
