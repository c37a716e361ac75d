//! Delivery from NATS JetStream: every replica pulls from one durable
//! consumer per destination. JetStream hands each message to one replica,
//! bounds the messages in flight across all of them (`max_ack_pending` =
//! the destination's concurrency), and redelivers a message `nak`ed with
//! a delay: the backoff lives in JetStream, not in a replica's memory.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::delivery::attempt::{Attempts, Outcome};
use crate::delivery::lane::instant_of;
use crate::delivery::lanes::{removed_reason, request};
use crate::delivery::schedule::{Next, RetryPolicy};
use crate::metrics::Metrics;
use crate::queue::embedded::{Record, unix_ms};
use crate::queue::nats::{NatsError, NatsQueue, decode};
use crate::rules::RuleSet;

/// What the replicas' delivery workers share.
pub struct Workers {
    pub rules: watch::Receiver<Arc<RuleSet>>,
    pub attempts: Arc<Attempts>,
    pub metrics: Arc<Metrics>,
    pub max_age: Duration,
    pub stop: CancellationToken,
}

impl Workers {
    /// Delivers what the deliveries stream holds for `destination`, from
    /// its durable consumer, shared with every other replica: JetStream
    /// hands each message to one of them, bounds the deliveries in flight
    /// across all (`max_ack_pending`), and redelivers after a `nak` delay.
    pub async fn drain(self: Arc<Self>, queue: Arc<NatsQueue>, destination: String) {
        let concurrency = {
            let rules = self.rules.borrow().clone();
            rules
                .destination(&destination)
                .map_or(1, |d| self.attempts.policy(d).concurrency)
        };
        let permits = Arc::new(Semaphore::new(concurrency));
        // Pulls until stopped; a pull that ends (NATS restarted, the
        // consumer lost with its stream's quorum) starts again.
        while !self.stop.is_cancelled() {
            if let Err(e) = self.pull(&queue, &destination, concurrency, &permits).await {
                tracing::warn!(%destination, "pulling from JetStream stopped, starting again in 1 s: {e}");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    /// One pull subscription: messages are attempted as permits allow,
    /// until the subscription ends.
    async fn pull(
        self: &Arc<Self>,
        queue: &Arc<NatsQueue>,
        destination: &str,
        concurrency: usize,
        permits: &Arc<Semaphore>,
    ) -> Result<(), NatsError> {
        let consumer = queue.consumer(destination, concurrency).await?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))?;
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return Ok(()) },
                () = self.stop.cancelled() => return Ok(()),
            };
            let message = tokio::select! {
                m = messages.next() => m,
                () = self.stop.cancelled() => return Ok(()),
            };
            let message = match message {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!(%destination, "pulling from JetStream: {e}");
                    continue;
                }
                None => return Err(NatsError::Publish("the pull subscription ended".into())),
            };
            let (me, queue) = (self.clone(), queue.clone());
            tokio::spawn(async move {
                me.attempt(&queue, message).await;
                drop(permit);
            });
        }
    }

    /// One attempt of one message: acknowledged once delivered or dead,
    /// `nak`ed with the backoff otherwise.
    async fn attempt(&self, queue: &NatsQueue, message: jetstream::Message) {
        let Some((mut record, job)) = decode(&message.payload) else {
            tracing::error!(subject = %message.subject, "an undecodable message in the deliveries stream: terminated");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let attempts = message.info().map_or(1, |i| i.delivered.max(1) as u32);
        let rules = self.rules.borrow().clone();
        let Some(destination) = rules.destination(&record.destination) else {
            let reason = removed_reason(&record.destination);
            bury(queue, &message, record, reason).await;
            return;
        };
        let policy = self.attempts.policy(destination);
        let delivery = match request(&rules, destination, &record, job) {
            Ok(d) => d,
            Err(reason) => {
                bury(queue, &message, record, reason).await;
                return;
            }
        };
        drop(rules);
        let outcome = self.attempts.attempt(&delivery, policy.timeout).await;
        record.attempts = attempts;
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
                bury(queue, &message, record, reason).await;
            }
            failed => {
                record.last_error = Some(failed.to_string());
                let now = Instant::now();
                let retry = RetryPolicy {
                    backoff: self.attempts.backoff(),
                    max_attempts: policy.max_attempts,
                    max_age: self.max_age,
                };
                match retry.after_failure(
                    attempts,
                    instant_of(record.first_ms),
                    now,
                    failed.retry_after(),
                    fastrand::f64(),
                ) {
                    Next::RetryAt(at) => {
                        let _ = message
                            .ack_with(AckKind::Nak(Some(at.saturating_duration_since(now))))
                            .await;
                    }
                    Next::GiveUp(reason) => bury(queue, &message, record, reason.to_string()).await,
                }
            }
        }
    }
}

impl Workers {
    /// Every few seconds, the queue's truth for every replica alike: each
    /// destination's depth from its consumer (waiting plus in flight), and
    /// whether JetStream answers.
    pub async fn report(self: Arc<Self>, queue: Arc<NatsQueue>) {
        self.metrics.register_queue_backend();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stop.cancelled() => return,
            }
            let names: Vec<String> = self
                .rules
                .borrow()
                .destinations
                .iter()
                .map(|d| d.name.to_string())
                .collect();
            let mut up = true;
            for name in names {
                match queue.depth(&name).await {
                    Ok(depth) => self
                        .metrics
                        .queue_depth
                        .with_label_values(&[name.as_str()])
                        .set(depth as i64),
                    Err(e) => {
                        up = false;
                        tracing::debug!(destination = %name, "cannot read the consumer's state: {e}");
                    }
                }
            }
            self.metrics.queue.backend_up.set(i64::from(
                up && crate::queue::Queue::ready(queue.as_ref()).is_ok(),
            ));
        }
    }
}

/// Keeps a delivery as a dead letter, then acknowledges its message; if
/// it cannot be kept, the message is left for JetStream to deliver again.
async fn bury(queue: &NatsQueue, message: &jetstream::Message, mut record: Record, reason: String) {
    tracing::warn!(job_id = %record.job_id, destination = %record.destination, attempts = record.attempts, "dead letter: {reason}");
    record.dead_reason = Some(reason);
    record.dead_ms = Some(unix_ms());
    match queue.keep_dead(message, &record).await {
        Ok(()) => {
            let _ = message.double_ack().await;
        }
        Err(e) => tracing::error!("cannot keep a dead letter, retried later: {e}"),
    }
}
