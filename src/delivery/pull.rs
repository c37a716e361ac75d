//! Delivery from NATS JetStream: every replica pulls from one durable
//! consumer per destination. JetStream hands each message to one replica,
//! bounds the messages in flight across all of them (`max_ack_pending` =
//! the destination's concurrency), and redelivers a message `nak`ed with
//! a delay: the backoff lives in JetStream, not in a replica's memory.
//!
//! A message's attempt number is the attempts its record carries (made
//! before it was queued again) plus the times JetStream handed it out,
//! less the one hand-out of a deferred message that only waited. An
//! origin whose circuit is open on this replica defers its messages: each
//! is queued again, due when the circuit lets a probe through, so waiting
//! spends no attempt and holds no slot of the destination's concurrency.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::attempt::{Attempts, Outcome};
use crate::delivery::follow::{removed_reason, request, route_again, same_target};
use crate::delivery::lane::instant_of;
use crate::delivery::origins::Origin;
use crate::delivery::schedule::{Circuit, Gate, Next, RetryPolicy};
use crate::metrics::Metrics;
use crate::queue::nats::{NatsError, NatsQueue, Queued, decode, job_bytes};
use crate::queue::{
    Accepted, DeadFilter, NewJob, Quarantined, Queue, QueueError, Record, ReplayReport, StoredJob,
    unix_ms,
};
use crate::rules::{RuleSet, UNROUTED};

/// What handling a message may take beyond its attempt's timeout (keeping
/// a dead letter, deferring, acknowledging): JetStream hands a message out
/// again once its attempt has had its timeout plus this.
const HANDLING: Duration = Duration::from_secs(5);

/// Origins whose circuit state one replica keeps, at most: past this, a
/// new origin goes without a circuit until others close.
const MAX_CIRCUITS: usize = 1024;

/// Waiting deliveries one replica moves at a time.
const WAITING_BATCH: usize = 256;

/// The message id of the one copy that replaces message `sequence` (made
/// by a worker, or by a reload's sweep): should both make one, JetStream
/// keeps the first, so a delivery is never queued twice.
fn copy_id(record: &Record, sequence: u64) -> String {
    format!("{}/{}/copy-{sequence}", record.job_id, record.destination)
}

/// The message id of the dead letter that replaces message `sequence`.
fn dead_id(record: &Record, sequence: u64) -> String {
    format!("{}/{}/dead-{sequence}", record.job_id, record.destination)
}

/// What a reload does to a destination's queued deliveries.
#[derive(Debug, Clone, Copy)]
enum Sweep {
    /// Its URL, headers or transport changed: due now.
    Requeue,
    /// It left the rules: dead letters.
    Bury,
}

/// The replica's side of the shared queue: its delivery workers, its
/// circuits, and the queue interface the pipeline and admin API use.
pub struct Workers {
    pub queue: Arc<NatsQueue>,
    pub rules: watch::Receiver<Arc<RuleSet>>,
    pub attempts: Arc<Attempts>,
    pub metrics: Arc<Metrics>,
    pub max_age: Duration,
    pub stop: CancellationToken,
    /// Per (destination, origin): this replica's circuit breakers. Only
    /// origins that failed lately are kept.
    circuits: Mutex<HashMap<(String, Origin), Circuit>>,
    /// The attempts in flight, for a shutdown's grace.
    tasks: TaskTracker,
    /// Destinations whose gauges were set: kept up to date (to zero) once
    /// they leave the rules.
    reported: Mutex<std::collections::BTreeSet<String>>,
}

impl Workers {
    pub fn new(
        queue: Arc<NatsQueue>,
        rules: watch::Receiver<Arc<RuleSet>>,
        attempts: Arc<Attempts>,
        metrics: Arc<Metrics>,
        max_age: Duration,
    ) -> Self {
        Self {
            queue,
            rules,
            attempts,
            metrics,
            max_age,
            stop: CancellationToken::new(),
            circuits: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            reported: Mutex::default(),
        }
    }

    /// Delivers what the deliveries stream holds for `destination`: its
    /// due deliveries through a consumer shared with every other replica,
    /// and its waiting ones back to due when their time comes.
    pub async fn drain(self: Arc<Self>, destination: String) {
        tokio::join!(
            self.clone().keep_pulling(Queued::Due, &destination),
            self.clone().keep_pulling(Queued::Waiting, &destination),
        );
    }

    /// Pulls until stopped; a pull that ends (NATS restarted, the consumer
    /// lost with its stream's quorum) starts again, as does one whose
    /// destination's limits a reload changed.
    async fn keep_pulling(self: Arc<Self>, queued: Queued, destination: &str) {
        while !self.stop.is_cancelled() {
            let pause = match self.pull(queued, destination).await {
                Ok(()) => Duration::ZERO,
                Err(e) => {
                    tracing::warn!(%destination, "pulling from JetStream stopped, starting again in 1 s: {e}");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    /// The destination's concurrency and attempt timeout in force (a
    /// destination gone from the rules: one at a time, to bury them).
    fn limits(&self, destination: &str) -> (usize, Duration) {
        let rules = self.rules.borrow().clone();
        rules
            .destination(destination)
            .map_or((1, Duration::from_secs(10)), |d| {
                let policy = self.attempts.policy(d);
                (policy.concurrency, policy.timeout)
            })
    }

    /// Pull requests, each for as many messages as there are free
    /// permits, so that no message waits in this replica's buffers (where
    /// a stop or a crash would hold it until JetStream's `ack_wait`).
    /// Returns when the worker stops or the destination's limits changed.
    async fn pull(self: &Arc<Self>, queued: Queued, destination: &str) -> Result<(), NatsError> {
        let mut rules = self.rules.clone();
        rules.borrow_and_update();
        let limits = self.limits(destination);
        let (concurrency, timeout) = limits;
        let consumer = match queued {
            Queued::Due => {
                self.queue
                    .consumer(queued, destination, Some(concurrency), timeout + HANDLING)
                    .await?
            }
            // Any number may wait; moving one back takes a moment.
            Queued::Waiting => {
                self.queue
                    .consumer(queued, destination, None, HANDLING)
                    .await?
            }
        };
        let permits = Arc::new(Semaphore::new(match queued {
            Queued::Due => concurrency,
            Queued::Waiting => WAITING_BATCH,
        }));
        loop {
            // Every permit may be held by attempts that hang until their
            // timeout: a reload that changes the limits is seen meanwhile.
            let first = loop {
                if queued == Queued::Due && self.limits(destination) != limits {
                    return Ok(());
                }
                tokio::select! {
                    p = permits.clone().acquire_owned() => {
                        break p.map_err(|_| NatsError::Publish("stopped".into()))?;
                    }
                    changed = rules.changed() => if changed.is_err() { return Ok(()) },
                    () = self.stop.cancelled() => return Ok(()),
                }
            };
            let mut held = vec![first];
            while let Ok(p) = permits.clone().try_acquire_owned() {
                held.push(p);
            }
            let mut batch = consumer
                .batch()
                .max_messages(held.len())
                .expires(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| NatsError::Publish(e.to_string()))?;
            loop {
                let next = tokio::select! {
                    m = batch.next() => m,
                    () = self.stop.cancelled() => {
                        // Hands back what is already on its way here, not
                        // to wait for `ack_wait` on another replica.
                        let until = Instant::now() + Duration::from_millis(200);
                        while let Ok(Some(m)) = tokio::time::timeout_at(until, batch.next()).await {
                            if let Ok(m) = m {
                                let _ = m.ack_with(AckKind::Nak(None)).await;
                            }
                        }
                        return Ok(());
                    }
                };
                match next {
                    Some(Ok(message)) => {
                        let Some(permit) = held.pop() else {
                            // More than asked for: handed out again later.
                            let _ = message.ack_with(AckKind::Nak(None)).await;
                            continue;
                        };
                        let me = self.clone();
                        self.tasks.spawn(async move {
                            match queued {
                                Queued::Due => me.handle(message).await,
                                Queued::Waiting => me.release(message).await,
                            }
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::debug!(%destination, "pulling from JetStream: {e}");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    /// A waiting delivery handed out: back to due once its time has come,
    /// or handed out again by JetStream when it will have.
    async fn release(&self, message: jetstream::Message) {
        let Some((record, _)) = decode(&message.payload) else {
            tracing::error!(subject = %message.subject, "an undecodable message in the deliveries stream: terminated");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let left = record.next_ms.saturating_sub(unix_ms());
        if left > 0 {
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_millis(left))))
                .await;
            return;
        }
        self.move_to(&message, Queued::Due, &record, Duration::from_secs(1))
            .await;
    }

    /// Replaces `message` by a copy of `record` in `queued` (the copy
    /// first, then the acknowledgement); if the copy cannot be stored,
    /// JetStream hands the message out again after `otherwise`.
    async fn move_to(
        &self,
        message: &jetstream::Message,
        queued: Queued,
        record: &Record,
        otherwise: Duration,
    ) {
        let sequence = message.info().map_or(0, |i| i.stream_sequence);
        let id = copy_id(record, sequence);
        let job = job_bytes(&message.payload);
        match self.queue.requeue(queued, record, job, &id).await {
            Ok(()) => {
                let _ = message.double_ack().await;
            }
            Err(e) => {
                tracing::debug!(
                    ?queued,
                    "cannot move a delivery, handed out again in {otherwise:?}: {e}"
                );
                let _ = message.ack_with(AckKind::Nak(Some(otherwise))).await;
            }
        }
    }

    /// Follows the rules: starts a worker for each destination (those
    /// that have a consumer from before, too, so that deliveries to a
    /// destination gone from the rules become dead letters), and on each
    /// reload makes the deliveries of a destination whose URL, headers or
    /// transport changed due at once, and those of a removed one dead
    /// letters at once, as the embedded spool does. Every replica does
    /// this on its reload; message ids make the second one store nothing.
    pub async fn follow(self: Arc<Self>) -> Result<(), NatsError> {
        let mut started = std::collections::HashSet::new();
        for name in self.queue.consumed_destinations().await? {
            if started.insert(name.clone()) {
                tokio::spawn(self.clone().drain(name));
            }
        }
        let mut rules = self.rules.clone();
        let mut before = rules.borrow_and_update().clone();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let now = rules.borrow_and_update().clone();
                for d in &now.destinations {
                    if started.insert(d.name.to_string()) {
                        tokio::spawn(me.clone().drain(d.name.to_string()));
                    }
                }
                for old in &before.destinations {
                    let name = old.name.as_str();
                    let sweep = match now.destination(name) {
                        None => Sweep::Bury,
                        Some(new) if !same_target(old, new) => Sweep::Requeue,
                        Some(_) => continue,
                    };
                    me.circuits
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|(d, _), _| d != name);
                    if let Err(e) = me.sweep(name, sweep).await {
                        tracing::warn!(destination = %name, "cannot go through the destination's queued deliveries after the reload; they follow the new rules at their next attempt: {e}");
                    }
                }
                before = now;
                tokio::select! {
                    changed = rules.changed() => if changed.is_err() { return },
                    () = me.stop.cancelled() => return,
                }
            }
        });
        Ok(())
    }

    /// Goes through the deliveries queued for `destination`: with
    /// `Requeue`, the waiting ones become due now; with `Bury`, due and
    /// waiting ones become dead letters, in place of their messages.
    async fn sweep(&self, destination: &str, sweep: Sweep) -> Result<(), NatsError> {
        // Not the copies it makes itself.
        let end = self.queue.read_state().await?;
        let kinds: &[Queued] = match sweep {
            Sweep::Requeue => &[Queued::Waiting],
            Sweep::Bury => &[Queued::Due, Queued::Waiting],
        };
        for &queued in kinds {
            let mut from = 0;
            'pages: loop {
                let page = self.queue.queued(queued, destination, from, 256).await?;
                let Some((last, _)) = page.last() else {
                    break;
                };
                from = last + 1;
                for (sequence, payload) in page {
                    if sequence > end {
                        break 'pages;
                    }
                    let Some((mut record, _)) = decode(&payload) else {
                        continue;
                    };
                    let job = job_bytes(&payload);
                    match sweep {
                        Sweep::Requeue => {
                            record.next_ms = unix_ms();
                            let id = copy_id(&record, sequence);
                            self.queue.requeue(Queued::Due, &record, job, &id).await?;
                        }
                        Sweep::Bury => {
                            record.dead_reason = Some(removed_reason(&record.destination));
                            record.dead_ms = Some(unix_ms());
                            // The id a worker burying the same message uses.
                            let id = dead_id(&record, sequence);
                            self.queue.keep_dead_record(&record, job, &id).await?;
                            self.metrics
                                .deliveries
                                .with_label_values(&[record.destination.as_str(), "dead_lettered"])
                                .inc();
                        }
                    }
                    self.queue.delete_delivery(sequence).await?;
                }
            }
        }
        Ok(())
    }

    /// Lets the attempts in flight finish for up to `grace`; those that do
    /// not are handed out again by JetStream once their `ack_wait` ends.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(grace, self.tasks.wait()).await;
    }

    /// One hand-out of one message: waited out if deferred, deferred if
    /// its origin's circuit is open, attempted otherwise.
    async fn handle(&self, message: jetstream::Message) {
        let Some((mut record, job)) = decode(&message.payload) else {
            tracing::error!(subject = %message.subject, "an undecodable message in the deliveries stream: terminated");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        // Every hand-out of a due delivery is an attempt (or, after a
        // replica died, stands for one).
        let delivered = message.info().map_or(1, |i| i.delivered.max(1) as u32);
        let attempt = record.attempts + delivered;
        let rules = self.rules.borrow().clone();
        let Some(destination) = rules.destination(&record.destination) else {
            let reason = removed_reason(&record.destination);
            self.bury(&message, record, reason).await;
            return;
        };
        let policy = self.attempts.policy(destination);
        let delivery = match request(&rules, destination, &record, job) {
            Ok(d) => d,
            Err(reason) => {
                self.bury(&message, record, reason).await;
                return;
            }
        };
        drop(rules);
        let origin = Origin::of(&delivery.url);
        let key = (record.destination.clone(), origin);
        let now = Instant::now();
        let wait = match self.gate(&key, now) {
            Gate::Pass => None,
            Gate::WaitUntil(until) => Some(until.saturating_duration_since(now)),
            // The probe ends within the timeout, one way or the other.
            Gate::WaitForProbe => Some(policy.timeout),
        };
        if let Some(wait) = wait {
            record.attempts = attempt - 1;
            self.park(&message, record, wait).await;
            return;
        }
        let outcome = self.attempts.attempt(&delivery, policy.timeout).await;
        self.finished(&key, &outcome);
        record.attempts = attempt;
        record.last_attempt_ms = Some(unix_ms());
        match &outcome {
            Outcome::Delivered(_) => {
                self.metrics
                    .deliveries
                    .with_label_values(&[record.destination.as_str(), "delivered"])
                    .inc();
                if let Err(e) = message.double_ack().await {
                    tracing::warn!(
                        "a delivered message's acknowledgement failed (it may be delivered again): {e}"
                    );
                }
            }
            Outcome::Refused(status) => {
                record.last_error = Some(outcome.to_string());
                let reason = format!("refused with {status}");
                self.bury(&message, record, reason).await;
            }
            failed => {
                record.last_error = Some(failed.to_string());
                let retry = RetryPolicy {
                    backoff: self.attempts.backoff(),
                    max_attempts: policy.max_attempts,
                    max_age: self.max_age,
                };
                let now = Instant::now();
                match retry.after_failure(
                    attempt,
                    instant_of(record.first_ms),
                    now,
                    failed.retry_after(),
                    fastrand::f64(),
                ) {
                    Next::RetryAt(at) => {
                        self.park(&message, record, at.saturating_duration_since(now))
                            .await;
                    }
                    Next::GiveUp(reason) => self.bury(&message, record, reason.to_string()).await,
                }
            }
        }
    }

    /// May an attempt to this origin start now? (This replica's view.)
    fn gate(&self, key: &(String, Origin), now: Instant) -> Gate {
        let mut circuits = self.circuits.lock().unwrap_or_else(|p| p.into_inner());
        circuits.get_mut(key).map_or(Gate::Pass, |c| c.gate(now))
    }

    /// Tells the origin's circuit how an attempt ended.
    fn finished(&self, key: &(String, Origin), outcome: &Outcome) {
        let mut circuits = self.circuits.lock().unwrap_or_else(|p| p.into_inner());
        let (destination, origin) = key;
        match outcome {
            Outcome::Delivered(_) | Outcome::Refused(_) => {
                if circuits.remove(key).is_some_and(|mut c| c.alive()) {
                    tracing::info!(%destination, %origin, "circuit closed: the origin answers again");
                }
            }
            _ => {
                if circuits.len() >= MAX_CIRCUITS && !circuits.contains_key(key) {
                    return;
                }
                let circuit = circuits.entry(key.clone()).or_default();
                if let Some(cooldown) = circuit.failed(Instant::now()) {
                    tracing::warn!(%destination, %origin, consecutive_failures = circuit.failures(), ?cooldown, "circuit opened: deliveries there wait on this replica");
                }
            }
        }
    }

    /// Moves the message's delivery to waiting, due again in `wait`; if
    /// that fails, JetStream hands the message out again after the same
    /// wait (holding one of the destination's slots meanwhile).
    async fn park(&self, message: &jetstream::Message, mut record: Record, wait: Duration) {
        record.next_ms = unix_ms() + wait.as_millis() as u64;
        self.move_to(message, Queued::Waiting, &record, wait).await;
    }

    /// Keeps a delivery as a dead letter, then acknowledges its message; if
    /// it cannot be kept, the message is left for JetStream to hand out
    /// again.
    async fn bury(&self, message: &jetstream::Message, mut record: Record, reason: String) {
        tracing::warn!(job_id = %record.job_id, destination = %record.destination, attempts = record.attempts, "dead letter: {reason}");
        record.dead_reason = Some(reason);
        record.dead_ms = Some(unix_ms());
        match self.queue.keep_dead(message, &record).await {
            Ok(()) => {
                self.metrics
                    .deliveries
                    .with_label_values(&[record.destination.as_str(), "dead_lettered"])
                    .inc();
                let _ = message.double_ack().await;
            }
            Err(e) => tracing::error!("cannot keep a dead letter, retried later: {e}"),
        }
    }

    /// Every second, the queue's truth for every replica alike, from the
    /// engine: each destination's depth (waiting plus in flight, from its
    /// consumer), the age of its oldest delivery, the dead letters, and
    /// whether JetStream answers.
    pub async fn report(self: Arc<Self>) {
        self.metrics.register_queue_backend();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stop.cancelled() => return,
            }
            let up = self.read_gauges().await.is_ok() && self.queue.ready().is_ok();
            self.metrics.queue.backend_up.set(i64::from(up));
        }
    }

    async fn read_gauges(&self) -> Result<(), NatsError> {
        let mut names: std::collections::BTreeSet<String> = self
            .rules
            .borrow()
            .destinations
            .iter()
            .map(|d| d.name.to_string())
            .collect();
        // Also what intake compares with spool.max_bytes.
        self.queue.read_state().await?;
        let mut dead = self.queue.dead_counts().await?;
        let depths = self.queue.depths().await?;
        names.extend(dead.keys().filter(|d| *d != UNROUTED).cloned());
        names.extend(depths.keys().cloned());
        names.extend(
            self.reported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        let now_ms = unix_ms();
        for name in &names {
            let depth = depths.get(name).copied().unwrap_or_default();
            let oldest = match depth {
                0 => None,
                _ => self.queue.oldest_ms(name).await?,
            };
            let age = oldest.map_or(0, |ms| now_ms.saturating_sub(ms));
            self.metrics
                .queue_depth
                .with_label_values(&[name.as_str()])
                .set(depth as i64);
            self.metrics
                .queue_oldest_age
                .with_label_values(&[name.as_str()])
                .set(age as f64 / 1000.0);
        }
        for name in names.iter().cloned().chain([UNROUTED.to_owned()]) {
            dead.entry(name).or_default();
        }
        for (destination, n) in dead {
            self.metrics
                .dead_letters
                .with_label_values(&[destination.as_str()])
                .set(n as i64);
        }
        names.remove(UNROUTED);
        *self.reported.lock().unwrap_or_else(|p| p.into_inner()) = names;
        Ok(())
    }

    /// Routes a dead letter's job again under the rules in force: its new
    /// deliveries are queued (and its new dead letters kept) under message
    /// ids derived from the dead letter's, so a replay that is repeated
    /// after a failure stores nothing twice. False if the rules route it
    /// nowhere.
    async fn reroute(&self, sequence: u64, stored: &[u8]) -> Result<bool, NatsError> {
        let Some(job) = StoredJob::decode(stored) else {
            return Ok(false);
        };
        let rules = self.rules.borrow().clone();
        let Some(records) = route_again(&rules, &job, unix_ms()) else {
            return Ok(false);
        };
        drop(rules);
        for record in records {
            let id = format!(
                "{}/{}/reroute-{sequence}",
                record.job_id, record.destination
            );
            if record.dead_reason.is_some() {
                self.queue.keep_dead_record(&record, stored, &id).await?;
            } else {
                self.queue
                    .requeue(Queued::Due, &record, stored, &id)
                    .await?;
            }
        }
        Ok(true)
    }
}

impl Queue for Workers {
    fn accept(&self, job: NewJob) -> BoxFuture<'_, Result<Accepted, QueueError>> {
        Box::pin(async move {
            let accepted = self.queue.accept(job).await;
            self.queue.note_accept(accepted.is_ok());
            if let Ok(Accepted::New { dead, .. }) = &accepted {
                for record in dead.iter().filter(|r| r.destination != UNROUTED) {
                    self.metrics
                        .deliveries
                        .with_label_values(&[record.destination.as_str(), "dead_lettered"])
                        .inc();
                }
            }
            Ok(accepted?)
        })
    }

    /// JetStream's record of seen job ids is read in `accept`; when that
    /// failed, JetStream is not answering this either.
    fn seen(&self, _job_id: &str) -> Result<bool, QueueError> {
        Ok(false)
    }

    fn dead_letters(
        &self,
        filter: DeadFilter,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(u64, Record)>, QueueError>> {
        Box::pin(async move {
            let found = self.queue.matching_dead(&filter, after, limit).await?;
            Ok(found
                .into_iter()
                .map(|(seq, record, _)| (seq, record))
                .collect())
        })
    }

    /// Each matching dead letter goes back to its destination with its
    /// attempts reset, under a message id of its own (not taken for the
    /// original); unrouted ones, and with `reroute` all of them, have their
    /// jobs routed again, once per job. Then the dead letter is deleted.
    fn replay(
        &self,
        filter: DeadFilter,
        reroute: bool,
    ) -> BoxFuture<'_, Result<ReplayReport, QueueError>> {
        Box::pin(async move {
            let mut report = ReplayReport::default();
            let mut to_route: BTreeMap<String, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
            for (seq, mut record, job) in
                self.queue.matching_dead(&filter, None, usize::MAX).await?
            {
                if reroute || record.destination == UNROUTED {
                    to_route
                        .entry(record.job_id.clone())
                        .or_default()
                        .push((seq, job));
                    continue;
                }
                let now = unix_ms();
                record.attempts = 0;
                record.first_ms = now;
                record.next_ms = now;
                record.dead_reason = None;
                record.dead_ms = None;
                let id = format!("{}/{}/replay-{seq}", record.job_id, record.destination);
                self.queue.requeue(Queued::Due, &record, &job, &id).await?;
                self.queue.delete_dead(seq).await?;
                report.replayed += 1;
            }
            for dead in to_route.into_values() {
                let (first, job) = &dead[0];
                if self.reroute(*first, job).await? {
                    for (seq, _) in &dead {
                        self.queue.delete_dead(*seq).await?;
                    }
                    report.rerouted += dead.len();
                } else {
                    report.still_unrouted += dead.len();
                }
            }
            Ok(report)
        })
    }

    fn purge(&self, filter: DeadFilter) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move {
            let mut purged = 0;
            for (seq, _, _) in self.queue.matching_dead(&filter, None, usize::MAX).await? {
                self.queue.delete_dead(seq).await?;
                purged += 1;
            }
            Ok(purged)
        })
    }

    /// Nothing is quarantined: an undecodable message is terminated, and
    /// logged, when pulled.
    fn quarantined(&self) -> Result<Vec<Quarantined>, QueueError> {
        Ok(Vec::new())
    }

    /// The engine's gauges are read every second by [`Workers::report`];
    /// the circuits are this replica's own.
    fn refresh_gauges(&self) {
        let mut open: HashMap<String, i64> = self
            .rules
            .borrow()
            .destinations
            .iter()
            .map(|d| (d.name.to_string(), 0))
            .collect();
        let circuits = self.circuits.lock().unwrap_or_else(|p| p.into_inner());
        for ((destination, _), circuit) in circuits.iter() {
            if circuit.is_open() {
                *open.entry(destination.clone()).or_default() += 1;
            }
        }
        for (destination, n) in open {
            self.metrics
                .circuit_open
                .with_label_values(&[destination.as_str()])
                .set(n);
        }
    }

    fn ready(&self) -> Result<(), String> {
        self.queue.ready()
    }
}
