//! One webhook's way through hookgate: verify → parse → route → deliver,
//! and the answer the sender gets. The HTTP layer only reads the request
//! (within its limits) and writes the [`Reply`].

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderValue, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::DeliveryConfig;
use crate::deliver::{Delivery, Forwarder, Outcome};
use crate::job::{Job, JobError};
use crate::metrics::Metrics;
use crate::query::Query;
use crate::rules::{Input, RuleSet, UNROUTED};
use crate::verify::{SignatureError, Verifier};

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
    #[error("the request body was not received: {0}")]
    Incomplete(String),
    #[error("the gateway is shutting down")]
    Draining,
}

impl Rejection {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Signature(e) => e.reason(),
            Self::TooLarge { .. } => "too_large",
            Self::NotAJob(_) | Self::Incomplete(_) => "malformed",
            Self::Draining => "draining",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Signature(_) => StatusCode::UNAUTHORIZED,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotAJob(_) => StatusCode::BAD_REQUEST,
            Self::Incomplete(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The answer to a webhook.
#[derive(Debug)]
pub enum Reply {
    /// Delivered (direct mode), dropped by a rule, or a duplicate.
    Done {
        status: StatusCode,
        job_id: String,
    },
    Rejected(Rejection),
    /// Direct mode: a destination did not take it; the sender should retry.
    NotDelivered {
        status: StatusCode,
        job_id: String,
    },
}

pub struct Gateway {
    verifier: Verifier,
    rules: watch::Receiver<Arc<RuleSet>>,
    forwarder: Forwarder,
    metrics: Arc<Metrics>,
    delivery: DeliveryConfig,
    draining: CancellationToken,
}

impl Gateway {
    pub fn new(
        verifier: Verifier,
        rules: watch::Receiver<Arc<RuleSet>>,
        forwarder: Forwarder,
        metrics: Arc<Metrics>,
        delivery: DeliveryConfig,
        draining: CancellationToken,
    ) -> Self {
        Self {
            verifier,
            rules,
            forwarder,
            metrics,
            delivery,
            draining,
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
        tracing::warn!(reason = rejection.reason(), "webhook rejected: {rejection}");
        Reply::Rejected(rejection)
    }

    pub async fn handle(&self, webhook: Webhook) -> Reply {
        if self.draining.is_cancelled() {
            return self.reject(Rejection::Draining);
        }
        let verified = match self
            .verifier
            .verify(webhook.body, webhook.signature.as_ref())
        {
            Ok(v) => v,
            Err(e) => return self.reject(e.into()),
        };
        if let Some(index) = verified.secret() {
            let name = self.verifier.secrets()[index].name();
            self.metrics.verified.with_label_values(&[name]).inc();
        }
        let job = match Job::parse(&verified) {
            Ok(job) => job,
            Err(e) => return self.reject(e.into()),
        };
        self.metrics.observe_job(&job);
        let query = Query::new(webhook.query.as_deref(), job.callback_url.as_deref());
        // One version of the rules for the whole webhook, even if a reload
        // lands while it is being delivered.
        let rules = self.rules.borrow().clone();
        let decision = rules.decide(Input {
            job: &job,
            query: &query,
        });
        let job_id = job.job_id.to_string();
        if decision.is_unrouted() {
            self.metrics.routed.with_label_values(&[UNROUTED]).inc();
            tracing::error!(
                job_id,
                "no rule matched: not forwarded (add a catch-all rule)"
            );
            return Reply::NotDelivered {
                status: StatusCode::BAD_GATEWAY,
                job_id,
            };
        }
        for rule in &decision.matched {
            self.metrics
                .routed
                .with_label_values(&[rule.name.as_str()])
                .inc();
        }
        let deadline = Instant::now() + self.delivery.direct_deadline;
        let mut deliveries = Vec::with_capacity(decision.routes.len());
        let mut failed: Option<Outcome> = None;
        for route in &decision.routes {
            match &route.url {
                Ok(url) => {
                    let policy = self.forwarder.policy(route.destination);
                    deliveries.push((
                        Delivery::new(&verified, &job_id, route, url.clone()),
                        policy,
                    ));
                }
                Err(e) => {
                    tracing::error!(job_id, destination = %route.destination.name, rule = %route.rule.name, "not forwarded: {e}");
                    failed = Some(Outcome::Refused(StatusCode::BAD_REQUEST));
                }
            }
        }
        let results = join_all(deliveries.iter().map(|(d, policy)| async move {
            (d, self.forwarder.deliver_before(d, *policy, deadline).await)
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
        match failed {
            None => Reply::Done {
                status: StatusCode::OK,
                job_id,
            },
            Some(Outcome::Timeout) => Reply::NotDelivered {
                status: StatusCode::GATEWAY_TIMEOUT,
                job_id,
            },
            Some(_) => Reply::NotDelivered {
                status: StatusCode::BAD_GATEWAY,
                job_id,
            },
        }
    }
}
