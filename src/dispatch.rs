//! Durable delivery: the workers that take pending deliveries out of the
//! [`Spool`] and forward them, one lane per destination.
//!
//! A lane holds only ids and times in memory (the bodies stay on disk) and
//! has its own concurrency limit and circuit breaker, so a slow or dead
//! destination never delays another. Outcomes go back to the spool: done,
//! retry at a time, or dead letter.

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
use crate::metrics::Metrics;
use crate::query::Query;
use crate::rules::{DestinationName, Input, RuleSet, UNROUTED};
use crate::schedule::{Circuit, Gate, Next, RetryPolicy};
use crate::spool::{Accepted, DeadFilter, NewJob, Record, Spool, SpoolError, StoredJob, unix_ms};

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
    /// Due times of the deliveries waiting, soonest first.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Every delivery waiting or in flight, with its first-accepted time.
    pending: BTreeMap<u64, u64>,
    circuit: Circuit,
}

struct Lane {
    name: DestinationName,
    state: Mutex<LaneState>,
    wake: Notify,
    permits: Arc<Semaphore>,
}

impl Lane {
    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, id: u64, at: Instant, first_ms: u64) {
        let mut state = self.lock();
        state.pending.insert(id, first_ms);
        state.due.push(Reverse((at, id)));
        drop(state);
        self.wake.notify_one();
    }

    fn forget(&self, id: u64) {
        self.lock().pending.remove(&id);
    }

    /// Waits for a delivery that is due and that the circuit lets through.
    async fn next(&self, stop: &CancellationToken) -> Option<u64> {
        loop {
            let notified = self.wake.notified();
            let wait = {
                let mut state = self.lock();
                let now = Instant::now();
                match state.due.peek().map(|Reverse((at, id))| (*at, *id)) {
                    None => None,
                    Some((at, _)) if at > now => Some(at),
                    Some((_, id)) => match state.circuit.gate(now) {
                        Gate::Pass => {
                            state.due.pop();
                            return Some(id);
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
                () = stop.cancelled() => return None,
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
    /// Where the lanes run: the main runtime, not the server worker
    /// thread whose webhook happened to open a lane.
    runtime: Handle,
}

impl Dispatcher {
    /// Called on the runtime that is to run the delivery lanes.
    pub fn new(
        spool: Arc<Spool>,
        forwarder: Arc<Forwarder>,
        metrics: Arc<Metrics>,
        rules: watch::Receiver<Arc<RuleSet>>,
        max_age: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            spool,
            forwarder,
            metrics,
            rules,
            max_age,
            lanes: Mutex::new(HashMap::new()),
            dead: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            runtime: Handle::current(),
        })
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Resumes what the spool held at start-up.
    pub fn resume(self: &Arc<Self>, pending: Vec<(u64, Record)>, dead: HashMap<String, i64>) {
        *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = dead;
        for (id, record) in pending {
            self.enqueue(id, &record);
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
        let lane = Arc::new(Lane {
            name: DestinationName::from(destination),
            state: Mutex::new(LaneState::default()),
            wake: Notify::new(),
            permits: Arc::new(Semaphore::new(concurrency)),
        });
        lanes.insert(lane.name.clone(), lane.clone());
        let (me, worker) = (self.clone(), lane.clone());
        self.tasks
            .spawn_on(async move { me.run_lane(worker).await }, &self.runtime);
        lane
    }

    fn enqueue(self: &Arc<Self>, id: u64, record: &Record) {
        self.lane(&record.destination)
            .push(id, instant_of(record.next_ms), record.first_ms);
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
            let Some(id) = lane.next(&self.stop).await else {
                return;
            };
            let (me, lane) = (self.clone(), lane.clone());
            self.tasks.spawn(async move {
                me.attempt(&lane, id).await;
                drop(permit);
                lane.wake.notify_one();
            });
        }
    }

    async fn attempt(&self, lane: &Lane, id: u64) {
        let (mut record, job) = match self.spool.load(id) {
            Ok(Some(found)) => found,
            Ok(None) => {
                lane.forget(id);
                return;
            }
            Err(e) => {
                // The spool cannot be read right now: try again later
                // rather than lose track of the delivery.
                tracing::error!(id, destination = %lane.name, "cannot load a delivery: {e}");
                lane.push(id, Instant::now() + Duration::from_secs(5), unix_ms());
                return;
            }
        };
        let delivery = match delivery_of(&lane.name, &record, job) {
            Ok(d) => d,
            Err(reason) => {
                lane.forget(id);
                self.bury(id, record, reason);
                return;
            }
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
                if let Err(e) = self.spool.complete(id) {
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
                        lane.push(id, at, record.first_ms);
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
                .set(state.pending.len() as i64);
            let oldest = state
                .pending
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
