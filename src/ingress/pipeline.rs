//! One webhook's way through hookgate: verify → parse → route → deliver
//! (inline, or to the durable spool), and the answer the sender gets. The
//! HTTP layer only reads the request (within its limits) and writes the
//! [`Reply`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderValue, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::delivery::attempt::{Attempts, Delivery, Outcome};
use crate::delivery::follow::records_for;
use crate::metrics::Metrics;
use crate::queue::{Accepted, NewJob, StoredJob, unix_ms};
use crate::queue::{Queue, QueueError};
use crate::rules::{Decision, Input, RuleSet, UNROUTED};
use crate::throttle::LogThrottle;
use crate::webhook::job::{Job, JobError};
use crate::webhook::query::Query;
use crate::webhook::verify::{SignatureError, Verified, Verifier};

/// A webhook request as read off the wire.
#[derive(Debug)]
pub struct Webhook {
    pub body: Bytes,
    pub signature: Option<HeaderValue>,
    /// The raw query string, without `?`.
    pub query: Option<String>,
}

/// Why a webhook was refused; each maps to a status and a `reason` label.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    NotAJob(#[from] JobError),
    /// The body did not arrive within `server.body_read_timeout`.
    #[error("the request body was not received within {0:?}")]
    SlowBody(std::time::Duration),
    /// The body's framing was broken (a bad chunk, a connection cut short).
    #[error("the request body is malformed: {0}")]
    BadBody(String),
    /// The queue did not take it: full (`overloaded`), or unable to store
    /// anything now (`queue_unavailable`: a failing disk, JetStream down
    /// or without a leader).
    #[error("not accepted, retry later: {0}")]
    Queue(#[from] QueueError),
    #[error("the gateway is shutting down")]
    Draining,
}

impl Rejection {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Signature(e) => e.reason(),
            Self::TooLarge { .. } => "too_large",
            Self::NotAJob(_) | Self::SlowBody(_) | Self::BadBody(_) => "malformed",
            Self::Queue(e) if e.is_full() => "overloaded",
            Self::Queue(_) => "queue_unavailable",
            Self::Draining => "draining",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Signature(_) => StatusCode::UNAUTHORIZED,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotAJob(_) | Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Queue(_) | Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Refusals the sender should retry come with `Retry-After`.
    pub fn retry_after(&self) -> Option<&'static str> {
        match self {
            Self::Queue(_) => Some("10"),
            Self::Draining => Some("5"),
            _ => None,
        }
    }
}

/// The answer to a webhook.
#[derive(Debug)]
pub enum Reply {
    /// Delivered (direct), stored (durable: 202), or dropped by a rule.
    Done {
        status: StatusCode,
        job_id: String,
    },
    /// A job id accepted within the dedupe window: 202, and not forwarded
    /// again (the answer says so, for whoever re-sent it on purpose).
    Duplicate {
        job_id: String,
    },
    Rejected(Rejection),
    /// Direct mode: a destination did not take it; the sender should retry.
    NotDelivered {
        status: StatusCode,
        job_id: String,
    },
}

/// Where a routed webhook goes next.
pub enum Onward {
    /// Forward inline within `deadline`; answer 200 only if every
    /// destination took it.
    Direct {
        attempts: Box<Attempts>,
        deadline: Duration,
    },
    /// Store durably, answer 202, deliver from the spool.
    Durable(Arc<dyn Queue>),
}

/// How often a warning that repeats (a refusal, an unsafe query value)
/// is written, with the count of those left out.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One webhook's way through the gateway: verify, parse, route, then
/// onward (queued or forwarded), and the answer it gets.
pub struct Pipeline {
    verifier: watch::Receiver<Arc<Verifier>>,
    rules: watch::Receiver<Arc<RuleSet>>,
    onward: Onward,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
    /// Shared by every server worker's gateway.
    warnings: Arc<LogThrottle>,
}

impl Pipeline {
    pub fn new(
        verifier: watch::Receiver<Arc<Verifier>>,
        rules: watch::Receiver<Arc<RuleSet>>,
        onward: Onward,
        metrics: Arc<Metrics>,
        draining: CancellationToken,
    ) -> Self {
        Self {
            verifier,
            rules,
            onward,
            metrics,
            draining,
            warnings: Arc::new(LogThrottle::new(WARN_EVERY)),
        }
    }

    /// A gateway for one more server worker thread: the same secrets,
    /// rules, spool and metrics; in direct mode a connection pool of its own.
    pub fn fork(&self) -> Self {
        let onward = match &self.onward {
            Onward::Direct { attempts, deadline } => Onward::Direct {
                attempts: Box::new(attempts.fork()),
                deadline: *deadline,
            },
            Onward::Durable(queue) => Onward::Durable(queue.clone()),
        };
        Self {
            verifier: self.verifier.clone(),
            rules: self.rules.clone(),
            onward,
            metrics: self.metrics.clone(),
            draining: self.draining.clone(),
            warnings: self.warnings.clone(),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Counts and logs a refusal, wherever it was decided.
    pub fn reject(&self, rejection: Rejection) -> Reply {
        self.metrics
            .rejected
            .with_label_values(&[rejection.reason()])
            .inc();
        if let Some(left_out) = self.warnings.allow(rejection.reason(), Instant::now()) {
            tracing::warn!(
                reason = rejection.reason(),
                similar_left_out = left_out,
                "webhook rejected: {rejection}"
            );
        }
        Reply::Rejected(rejection)
    }

    /// Called when a request arrives, before its body is read: once
    /// draining starts new webhooks are refused, while those that arrived
    /// before are finished.
    pub fn admit(&self) -> Result<(), Reply> {
        if self.draining.is_cancelled() {
            return Err(self.reject(Rejection::Draining));
        }
        Ok(())
    }

    pub async fn handle(&self, webhook: Webhook) -> Reply {
        // One version of the secrets per webhook, as for the rules.
        let verifier = self.verifier.borrow().clone();
        let verified = match verifier.verify(webhook.body, webhook.signature.as_ref()) {
            Ok(v) => v,
            Err(e) => return self.reject(e.into()),
        };
        if let Some(index) = verified.secret() {
            let name = verifier.secrets()[index].name();
            self.metrics.verified.with_label_values(&[name]).inc();
        }
        let job = match Job::parse(&verified) {
            Ok(job) => job,
            Err(e) => return self.reject(e.into()),
        };
        let query = Query::new(webhook.query.as_deref(), job.callback_url.as_deref());
        // One version of the rules for the whole webhook, even if a reload
        // lands while it is being delivered.
        let rules = self.rules.borrow().clone();
        let decision = rules.decide(Input {
            job: &job,
            query: &query,
        });
        match &self.onward {
            Onward::Direct { attempts, deadline } => {
                self.observe(&job, &decision);
                self.forward(
                    attempts,
                    Instant::now() + *deadline,
                    &verified,
                    &job,
                    &decision,
                )
                .await
            }
            Onward::Durable(queue) => {
                self.store(queue.as_ref(), &verified, &job, webhook.query, &decision)
                    .await
            }
        }
    }

    /// Counts and logs a job taken for delivery: once, not again for a
    /// duplicate or for a webhook the queue refused (its sender retries).
    fn observe(&self, job: &Job<'_>, decision: &Decision<'_>) {
        self.metrics.observe_job(job);
        if decision.is_unrouted() {
            self.metrics.routed.with_label_values(&[UNROUTED]).inc();
            tracing::error!(job_id = %job.job_id, "no rule matched: not forwarded (add a catch-all rule)");
        }
        for rule in &decision.matched {
            self.metrics
                .routed
                .with_label_values(&[rule.name.as_str()])
                .inc();
        }
        for route in &decision.routes {
            if let Err(e) = &route.url {
                if let Some(left_out) = self.warnings.allow("url_template", Instant::now()) {
                    tracing::warn!(
                        job_id = %job.job_id,
                        destination = %route.destination.name,
                        rule = %route.rule.name,
                        similar_left_out = left_out,
                        "not forwarded there: {e}"
                    );
                }
            }
        }
    }

    fn duplicate(&self, job: &Job<'_>) -> Reply {
        self.metrics.duplicate.inc();
        tracing::info!(job_id = %job.job_id, "duplicate job id within the dedupe window: acknowledged, not forwarded again");
        Reply::Duplicate {
            job_id: job.job_id.to_string(),
        }
    }

    async fn store(
        &self,
        queue: &dyn Queue,
        verified: &Verified,
        job: &Job<'_>,
        query: Option<String>,
        decision: &Decision<'_>,
    ) -> Reply {
        let now = unix_ms();
        let new = NewJob {
            job: StoredJob {
                job_id: job.job_id.to_string(),
                signature: verified
                    .signature()
                    .map(|s| Bytes::copy_from_slice(s.as_bytes())),
                query,
                accepted_ms: now,
                body: verified.body().clone(),
            },
            records: records_for(decision, &job.job_id, now),
        };
        match queue.accept(new).await {
            Ok(Accepted::New { .. }) => {
                self.observe(job, decision);
                Reply::Done {
                    status: StatusCode::ACCEPTED,
                    job_id: job.job_id.to_string(),
                }
            }
            Ok(Accepted::Duplicate) => self.duplicate(job),
            // A queue that cannot store (full, or its disk failing) may still
            // know the job: its sender's retry is acknowledged, not refused.
            Err(e) => match queue.seen(&job.job_id) {
                Ok(true) => self.duplicate(job),
                _ => self.reject(e.into()),
            },
        }
    }

    async fn forward(
        &self,
        attempts: &Attempts,
        deadline: Instant,
        verified: &Verified,
        job: &Job<'_>,
        decision: &Decision<'_>,
    ) -> Reply {
        let job_id = job.job_id.to_string();
        if decision.is_unrouted() {
            return Reply::NotDelivered {
                status: StatusCode::BAD_GATEWAY,
                job_id,
            };
        }
        let mut deliveries = Vec::with_capacity(decision.routes.len());
        let mut failed: Option<Outcome> = None;
        for route in &decision.routes {
            match &route.url {
                Ok(url) => {
                    let policy = attempts.policy(route.destination);
                    deliveries.push((Delivery::new(verified, &job_id, route, url.clone()), policy));
                }
                // Logged when routed.
                Err(_) => failed = Some(Outcome::Refused(StatusCode::BAD_REQUEST)),
            }
        }
        let results = join_all(deliveries.iter().map(|(d, policy)| async move {
            (d, attempts.deliver_before(d, *policy, deadline).await)
        }))
        .await;
        for (delivery, result) in results {
            if let Err(outcome) = result {
                tracing::warn!(job_id, destination = %delivery.destination, "delivery failed: {outcome}");
                if failed.as_ref().is_none_or(|f| *f != Outcome::Timeout) {
                    failed = Some(outcome);
                }
            }
        }
        let status = match failed {
            None => {
                return Reply::Done {
                    status: StatusCode::OK,
                    job_id,
                };
            }
            Some(Outcome::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            Some(_) => StatusCode::BAD_GATEWAY,
        };
        Reply::NotDelivered { status, job_id }
    }
}
