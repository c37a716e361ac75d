//! Sending a job to a destination: one HTTP attempt, classified, and the
//! retry loop around it.
//!
//! The client ([`crate::delivery::client`], hyper under a pool of its own) keeps
//! keep-alive connections per origin. Redirects are never followed (a
//! downstream must not be able to point hookgate elsewhere), and a
//! response body is read only as far as needed to reuse the connection,
//! never buffered whole.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::DeliveryConfig;
use crate::delivery::backoff::{self, Backoff};
use crate::delivery::client::{Client, ClientError, Response, Settings};
use crate::delivery::origins::Origin;
use crate::metrics::Metrics;
use crate::rules::{Destination, DestinationName, Route};
use crate::transport::Transport;
use crate::webhook::verify::Verified;

pub const HEADER_RULE: HeaderName = HeaderName::from_static("x-hookgate-rule");
pub const HEADER_JOB_ID: HeaderName = HeaderName::from_static("x-hookgate-job-id");
pub const HEADER_SIGNATURE: HeaderName = HeaderName::from_static("x-hub-signature-256");

/// One job on its way to one destination, with every header it will carry
/// besides those the client adds (`Host`, `User-Agent`, `Content-Length`).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub destination: DestinationName,
    pub url: Uri,
    /// How to reach it: HTTP/2, the destination's own TLS files.
    pub transport: Transport,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Delivery {
    /// A delivery of a job routed just now (direct mode).
    pub fn new(verified: &Verified, job_id: &str, route: &Route<'_>, url: Uri) -> Self {
        Self::build(
            route.destination,
            url,
            route.headers().map(|(n, v)| (n.clone(), v.clone())),
            route.rule.name.as_str(),
            job_id,
            verified.signature().cloned(),
            verified.body().clone(),
        )
    }

    /// Every forwarded request carries the original body and signature,
    /// the rule that sent it and the job id, after the configured headers.
    pub(crate) fn build(
        destination: &Destination,
        url: Uri,
        configured: impl Iterator<Item = (HeaderName, HeaderValue)>,
        rule: &str,
        job_id: &str,
        signature: Option<HeaderValue>,
        body: Bytes,
    ) -> Self {
        let mut headers = HeaderMap::with_capacity(8);
        for (name, value) in configured {
            headers.insert(name, value);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(signature) = signature {
            headers.insert(HEADER_SIGNATURE, signature);
        }
        // Rule names and job ids are checked to be header-safe when they
        // are read; skipping a bad one only keeps this path panic-free.
        if let Ok(rule) = HeaderValue::from_str(rule) {
            headers.insert(HEADER_RULE, rule);
        }
        if let Ok(id) = HeaderValue::from_str(job_id) {
            headers.insert(HEADER_JOB_ID, id);
        }
        Self {
            destination: destination.name.clone(),
            url,
            transport: destination.transport.clone(),
            headers,
            body,
        }
    }
}

/// Limits for one destination: its own overrides, else the defaults.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub timeout: Duration,
    pub max_attempts: u32,
    pub concurrency: usize,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(StatusCode),
    /// A status that will not change on retry: 3xx (not followed) or a 4xx
    /// other than 408 and 429.
    Refused(StatusCode),
    /// 408, 429 or 5xx, with the downstream's `Retry-After` if it sent one.
    Failed {
        status: StatusCode,
        retry_after: Option<Duration>,
    },
    Timeout,
    Connect(String),
}

impl Outcome {
    fn from_status(status: StatusCode, retry_after: Option<&HeaderValue>) -> Self {
        if status.is_success() {
            return Self::Delivered(status);
        }
        let retryable = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        if retryable {
            Self::Failed {
                status,
                retry_after: retry_after.and_then(|v| backoff::retry_after(v, SystemTime::now())),
            }
        } else {
            Self::Refused(status)
        }
    }

    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Delivered(_) | Self::Refused(_))
    }

    /// The `outcome` label of `hookgate_forward_attempts_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Delivered(_) => "success",
            Self::Refused(s) | Self::Failed { status: s, .. } if s.is_redirection() => "http_3xx",
            Self::Refused(s) | Self::Failed { status: s, .. } if s.is_server_error() => "http_5xx",
            Self::Refused(_) | Self::Failed { .. } => "http_4xx",
            Self::Timeout => "timeout",
            Self::Connect(_) => "connect_error",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Failed { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Delivered(s) => write!(f, "delivered ({s})"),
            Self::Refused(s) => write!(f, "refused with {s}, not retried"),
            Self::Failed { status, .. } => write!(f, "failed with {status}"),
            Self::Timeout => f.write_str("timed out"),
            Self::Connect(e) => write!(f, "connection failed: {e}"),
        }
    }
}

/// Makes attempts to destinations: the HTTP client, each destination's
/// limits and the backoff; in direct mode, also the retries of one
/// webhook within its deadline.
pub struct Attempts {
    client: Client,
    defaults: Policy,
    backoff: Backoff,
    metrics: Arc<Metrics>,
    /// Direct mode's concurrency limits, per destination and origin.
    limits: Arc<Mutex<OriginLimits>>,
}

type OriginLimits = HashMap<(DestinationName, Origin), Arc<Semaphore>>;

/// Direct mode's limits kept at most: beyond, those not in use are
/// dropped, so that values filling URL templates cannot grow the map.
const LIMITS_KEPT: usize = 1024;

impl Attempts {
    pub fn new(config: &DeliveryConfig, metrics: Arc<Metrics>) -> Result<Self, ClientError> {
        Ok(Self {
            client: Client::new(Settings {
                connect_timeout: config.connect_timeout,
                lifetime: config.connection_lifetime,
            })?,
            defaults: Policy {
                timeout: config.timeout,
                max_attempts: config.max_attempts,
                concurrency: config.concurrency,
            },
            backoff: Backoff {
                initial: config.backoff_initial,
                max: config.backoff_max,
            },
            metrics,
            limits: Arc::default(),
        })
    }

    /// A forwarder with a connection pool of its own that shares the
    /// destinations' concurrency limits: one per server worker thread, so
    /// that a pooled connection is only ever driven by the thread that
    /// uses it.
    pub fn fork(&self) -> Self {
        Self {
            client: self.client.fork(),
            defaults: self.defaults,
            backoff: self.backoff,
            metrics: self.metrics.clone(),
            limits: self.limits.clone(),
        }
    }

    /// The destination's limits, its overrides over the defaults.
    pub fn policy(&self, d: &Destination) -> Policy {
        Policy {
            timeout: d.timeout.unwrap_or(self.defaults.timeout),
            max_attempts: d.max_attempts.unwrap_or(self.defaults.max_attempts),
            concurrency: d.concurrency.unwrap_or(self.defaults.concurrency),
        }
    }

    pub fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// The concurrency limit of the delivery's origin (one per filled-in
    /// origin of a templated URL, as the lanes have in durable mode).
    fn limit(&self, delivery: &Delivery, concurrency: usize) -> Arc<Semaphore> {
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        if limits.len() >= LIMITS_KEPT {
            // A limit in use is held by its permits too.
            limits.retain(|_, limit| Arc::strong_count(limit) > 1);
        }
        limits
            .entry((delivery.destination.clone(), Origin::of(&delivery.url)))
            .or_insert_with(|| Arc::new(Semaphore::new(concurrency)))
            .clone()
    }

    /// One HTTP attempt, counted and timed.
    pub async fn attempt(&self, delivery: &Delivery, timeout: Duration) -> Outcome {
        let started = Instant::now();
        let sent = self.client.post(
            &delivery.url,
            &delivery.transport,
            &delivery.headers,
            delivery.body.clone(),
            // Only the status and `Retry-After` count; the body is read
            // to reuse the connection, not kept.
            0,
            started + timeout,
        );
        let outcome = match sent.await {
            Ok(Response {
                status,
                retry_after,
                ..
            }) => Outcome::from_status(status, retry_after.as_ref()),
            Err(e) if e.is_timeout() => Outcome::Timeout,
            Err(e) => Outcome::Connect(e.to_string()),
        };
        let name = delivery.destination.as_str();
        self.metrics
            .forward_duration
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .forward_attempts
            .with_label_values(&[name, outcome.label()])
            .inc();
        outcome
    }

    /// Direct mode: attempts with backoff until delivered, refused, out of
    /// attempts, or out of time (`deadline`, the webhook request's budget).
    pub async fn deliver_before(
        &self,
        delivery: &Delivery,
        policy: Policy,
        deadline: Instant,
    ) -> Result<(), Outcome> {
        let limit = self.limit(delivery, policy.concurrency);
        let _permit = match tokio::time::timeout_at(deadline, limit.acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(Outcome::Timeout),
        };
        let mut attempt = 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Outcome::Timeout);
            }
            let outcome = self.attempt(delivery, policy.timeout.min(left)).await;
            if let Outcome::Delivered(_) = outcome {
                self.metrics
                    .deliveries
                    .with_label_values(&[delivery.destination.as_str(), "delivered"])
                    .inc();
                return Ok(());
            }
            if !outcome.is_retryable() || attempt >= policy.max_attempts {
                return Err(outcome);
            }
            let wait = self
                .backoff
                .next(attempt, outcome.retry_after(), fastrand::f64());
            if Instant::now() + wait >= deadline {
                return Err(outcome);
            }
            tracing::debug!(destination = %delivery.destination, attempt, %outcome, ?wait, "retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let retry = Some(HeaderValue::from_static("2"));
        let none: Option<HeaderValue> = None;
        let cases = [
            (200, &none, "success", false),
            (204, &none, "success", false),
            (301, &none, "http_3xx", false),
            (400, &none, "http_4xx", false),
            (404, &none, "http_4xx", false),
            (408, &none, "http_4xx", true),
            (429, &retry, "http_4xx", true),
            (500, &none, "http_5xx", true),
            (503, &retry, "http_5xx", true),
        ];
        for (code, headers, label, retryable) in cases {
            let o = Outcome::from_status(StatusCode::from_u16(code).unwrap(), headers.as_ref());
            assert_eq!((o.label(), o.is_retryable()), (label, retryable), "{code}");
        }
        let o = Outcome::from_status(StatusCode::SERVICE_UNAVAILABLE, retry.as_ref());
        assert_eq!(o.retry_after(), Some(Duration::from_secs(2)));
    }
}
