//! The queue in NATS JetStream, shared by every replica: any replica
//! accepts, any replica delivers, and losing a pod or a node loses nothing
//! a quorum acknowledged.
//!
//! - Deliveries: one message per (job, destination) on
//!   `{prefix}.deliver.{destination}` in the work-queue stream
//!   `{prefix}_deliveries`, published with `Nats-Msg-Id` = `{job_id}/{destination}`,
//!   so that a retried accept stores nothing twice.
//! - Seen job ids: the stream `{prefix}_seen`, one subject per job id
//!   (`{prefix}.seen.{id in base64url}`, its last message kept) for
//!   `dedupe.window`. A job is `pending` from before its deliveries are
//!   published until they all are (`stored`): a sender that retries after
//!   a failed accept publishes again (deduplicated by message id) instead
//!   of being told "duplicate" for a job that was never stored. (A stream
//!   rather than a key-value bucket: the client's bucket calls do not
//!   understand the answers of the 2.9 servers Debian ships.)

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use base64::Engine as _;
use tokio::time::Instant;

use crate::config::NatsConfig;
use futures_util::future::BoxFuture;

use crate::queue::ReplayReport;
use crate::queue::embedded::{Accepted, DeadFilter, NewJob, Record, StoredJob};

/// Why the queue could not be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("cannot set up the JetStream {what} {name}: {message}")]
    Setup {
        what: &'static str,
        name: String,
        message: String,
    },
    #[error("JetStream did not take the webhook: {0}")]
    Publish(String),
}

/// The names of everything a deployment keeps in NATS, from its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn dead(&self) -> String {
        format!("{}_dead", self.prefix)
    }

    pub fn dead_subject(&self, destination: &str) -> String {
        format!("{}.dead.{}", self.prefix, destination.replace('.', "~"))
    }

    /// The durable consumer every replica shares for a destination.
    pub fn consumer(&self, destination: &str) -> String {
        format!("{}_{}", self.prefix, destination.replace('.', "~"))
    }

    pub fn deliveries(&self) -> String {
        format!("{}_deliveries", self.prefix)
    }

    pub fn seen(&self) -> String {
        format!("{}_seen", self.prefix)
    }

    /// A destination's subject. Names may hold `.`, which separates subject
    /// tokens; it becomes `~`, which names may not hold.
    pub fn deliver(&self, destination: &str) -> String {
        format!("{}.deliver.{}", self.prefix, destination.replace('.', "~"))
    }

    /// A job id's subject in the seen stream: the id in URL-safe base64,
    /// so that any id is a valid subject token.
    pub fn seen_subject(&self, job_id: &str) -> String {
        format!(
            "{}.seen.{}",
            self.prefix,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(job_id)
        )
    }
}

const PENDING: &[u8] = b"pending";
const STORED: &[u8] = b"stored";

pub struct NatsQueue {
    client: async_nats::Client,
    js: jetstream::Context,
    seen: stream::Stream,
    names: Names,
    /// Since when accepts have failed, while they do.
    failing_since: std::sync::Mutex<Option<Instant>>,
    /// Since when the client has been disconnected, as last seen.
    disconnected_since: std::sync::Mutex<Option<Instant>>,
    /// How long that may last before readiness turns 503.
    unavailable_after: Duration,
}

impl NatsQueue {
    /// Connects and creates (or updates) the streams and the bucket.
    pub async fn connect(
        config: &NatsConfig,
        max_bytes: u64,
        window: Duration,
    ) -> Result<Self, NatsError> {
        let servers = config
            .servers
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NatsError::Connect(e.to_string()))?;
        let client = options(config)
            .await?
            .retry_on_initial_connect()
            .connect(servers)
            .await
            .map_err(|e| NatsError::Connect(e.to_string()))?;
        // A publish that JetStream does not acknowledge within this is
        // refused (503), never left hanging.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client.clone());
        let names = Names::new(&config.prefix);
        // A cluster that has just started elects its JetStream leader
        // first: set-up is tried again until `unavailable_after`.
        let deadline = tokio::time::Instant::now() + config.unavailable_after;
        loop {
            match setup(&js, &names, config, max_bytes, window).await {
                Ok(seen) => {
                    return Ok(Self {
                        client,
                        js,
                        seen,
                        names,
                        failing_since: std::sync::Mutex::new(None),
                        disconnected_since: std::sync::Mutex::new(None),
                        unavailable_after: config.unavailable_after,
                    });
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!("JetStream not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores a job's deliveries; returns once JetStream acknowledged each
    /// (with 3 replicas, once a quorum has it).
    pub async fn accept(&self, job: NewJob) -> Result<Accepted, NatsError> {
        let seen = self.names.seen_subject(&job.job.job_id);
        let publish = |e: &dyn std::fmt::Display| NatsError::Publish(e.to_string());
        match self.seen.get_last_raw_message_by_subject(&seen).await {
            Ok(last) if last.payload.as_ref() == STORED => return Ok(Accepted::Duplicate),
            // Pending: an earlier accept failed half way; this one goes on.
            Ok(_) => {}
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                self.js
                    .publish(seen.clone(), PENDING.into())
                    .await
                    .map_err(|e| publish(&e))?
                    .await
                    .map_err(|e| publish(&e))?;
            }
            Err(e) => return Err(publish(&e)),
        }
        let body = job.job.encode();
        let mut pending = Vec::new();
        let mut dead = Vec::new();
        for record in job.records {
            if record.dead_reason.is_some() {
                dead.push(record);
                continue;
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("{}/{}", job.job.job_id, record.destination).as_str(),
            );
            let payload = encode(&record, &body);
            let ack = self
                .js
                .publish_with_headers(
                    self.names.deliver(&record.destination),
                    headers,
                    payload.into(),
                )
                .await
                .map_err(|e| publish(&e))?
                .await
                .map_err(|e| publish(&e))?;
            pending.push((ack.sequence, record));
        }
        self.js
            .publish(seen, STORED.into())
            .await
            .map_err(|e| publish(&e))?
            .await
            .map_err(|e| publish(&e))?;
        Ok(Accepted::New { pending, dead })
    }
}

/// The connection's credentials and TLS, read from where the config
/// names them (never the config file itself).
async fn options(config: &NatsConfig) -> Result<async_nats::ConnectOptions, NatsError> {
    let unreadable = |what: &str, e: &dyn std::fmt::Display| {
        NatsError::Connect(format!("cannot read {what}: {e}"))
    };
    let mut options = async_nats::ConnectOptions::new();
    if let Some(path) = &config.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| unreadable(&path.display().to_string(), &e))?;
    }
    if let Some(path) = &config.nkey_file {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| unreadable(&path.display().to_string(), &e))?;
        options = options.nkey(seed.trim().to_owned());
    }
    let token = match (&config.token_env, &config.token_file) {
        (Some(var), _) => Some(std::env::var(var).map_err(|e| unreadable(var, &e))?),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| unreadable(&path.display().to_string(), &e))?,
        ),
        (None, None) => None,
    };
    if let Some(token) = token {
        options = options.token(token.trim().to_owned());
    }
    if let Some(tls) = &config.tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.client_cert_file, &tls.client_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    Ok(options)
}

/// Creates, or updates to this configuration, the deliveries stream and
/// the seen bucket.
async fn setup(
    js: &jetstream::Context,
    names: &Names,
    config: &NatsConfig,
    max_bytes: u64,
    window: Duration,
) -> Result<stream::Stream, NatsError> {
    let failed = |what: &'static str, name: &str, e: &dyn std::fmt::Display| NatsError::Setup {
        what,
        name: name.to_owned(),
        message: e.to_string(),
    };
    let deliveries = names.deliveries();
    js.get_or_create_stream(stream::Config {
        name: deliveries.clone(),
        subjects: vec![format!("{}.deliver.*", config.prefix)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
        duplicate_window: window.min(Duration::from_secs(3600)),
        ..Default::default()
    })
    .await
    .map_err(|e| failed("stream", &deliveries, &e))?;
    let dead = names.dead();
    js.get_or_create_stream(stream::Config {
        name: dead.clone(),
        subjects: vec![format!("{}.dead.*", config.prefix)],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| failed("stream", &dead, &e))?;
    let seen = names.seen();
    js.get_or_create_stream(stream::Config {
        name: seen.clone(),
        subjects: vec![format!("{}.seen.*", config.prefix)],
        max_messages_per_subject: 1,
        max_age: window,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| failed("stream", &seen, &e))
}

impl NatsQueue {
    /// The durable pull consumer every replica shares for `destination`;
    /// JetStream lets at most `concurrency` of its messages be in flight
    /// across all of them.
    pub async fn consumer(
        &self,
        destination: &str,
        concurrency: usize,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, NatsError> {
        let stream = self
            .js
            .get_stream(self.names.deliveries())
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))?;
        let name = self.names.consumer(destination);
        stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: self.names.deliver(destination),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(120),
                    max_ack_pending: i64::try_from(concurrency).unwrap_or(i64::MAX),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))
    }

    /// Deliveries of `destination` waiting or in flight, across every
    /// replica (from its consumer: the same number on each).
    pub async fn depth(&self, destination: &str) -> Result<u64, NatsError> {
        let stream = self
            .js
            .get_stream(self.names.deliveries())
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))?;
        let mut consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_consumer(&self.names.consumer(destination))
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    /// Keeps `record` (its `dead_reason` set) with the job of `message` as
    /// a dead letter; the caller then acknowledges the message.
    pub async fn keep_dead(
        &self,
        message: &jetstream::Message,
        record: &Record,
    ) -> Result<(), NatsError> {
        let job = &message.payload[4 + record_len(&message.payload).unwrap_or(0)..];
        let payload = encode(record, job);
        self.js
            .publish(self.names.dead_subject(&record.destination), payload.into())
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))?
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))?;
        Ok(())
    }
}

impl NatsQueue {
    async fn dead_stream(&self) -> Result<stream::Stream, NatsError> {
        self.js
            .get_stream(self.names.dead())
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))
    }

    /// Dead letters matching `filter` with sequences above `after`, oldest
    /// first, at most `limit`: sequence, record and the stored job's bytes.
    async fn matching_dead(
        &self,
        filter: &DeadFilter,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Record, Vec<u8>)>, NatsError> {
        let mut dead = self.dead_stream().await?;
        let state = dead
            .info()
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))?
            .state
            .clone();
        let mut out = Vec::new();
        let from = after.map_or(state.first_sequence, |a| (a + 1).max(state.first_sequence));
        for seq in from..=state.last_sequence {
            if out.len() >= limit {
                break;
            }
            // Deleted (replayed, purged) sequences leave gaps.
            let Ok(message) = dead.get_raw_message(seq).await else {
                continue;
            };
            let Some(len) = record_len(&message.payload) else {
                continue;
            };
            let Some(record) = message
                .payload
                .get(4..4 + len)
                .and_then(|r| serde_json::from_slice::<Record>(r).ok())
            else {
                continue;
            };
            if filter.matches(&record) {
                out.push((seq, record, message.payload[4 + len..].to_vec()));
            }
        }
        Ok(out)
    }
}

fn record_len(payload: &[u8]) -> Option<usize> {
    Some(u32::from_le_bytes(payload.get(..4)?.try_into().ok()?) as usize)
}

/// A delivery message's record and job.
pub fn decode(payload: &[u8]) -> Option<(Record, StoredJob)> {
    let len = record_len(payload)?;
    let record = serde_json::from_slice(payload.get(4..4 + len)?).ok()?;
    let job = StoredJob::decode(payload.get(4 + len..)?)?;
    Some((record, job))
}

impl crate::queue::Queue for NatsQueue {
    fn accept(
        &self,
        job: NewJob,
    ) -> futures_util::future::BoxFuture<'_, Result<Accepted, crate::queue::QueueError>> {
        Box::pin(async move {
            let accepted = NatsQueue::accept(self, job).await;
            let mut failing = self.failing_since.lock().unwrap_or_else(|p| p.into_inner());
            match &accepted {
                Ok(_) => *failing = None,
                Err(_) => {
                    failing.get_or_insert_with(Instant::now);
                }
            }
            Ok(accepted?)
        })
    }

    /// JetStream decides in `accept`, where a seen job id costs one read.
    fn seen(&self, _job_id: &str) -> Result<bool, crate::queue::QueueError> {
        Ok(false)
    }

    fn dead_letters(
        &self,
        filter: DeadFilter,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(u64, Record)>, crate::queue::QueueError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for (seq, record, _) in self.matching_dead(&filter, after, limit).await? {
                out.push((seq, record));
            }
            Ok(out)
        })
    }

    /// Each matching dead letter goes back to its destination's subject
    /// with its attempts reset (and a message id of its own, so that it is
    /// not taken for the original), then leaves the dead-letter stream.
    fn replay(
        &self,
        filter: DeadFilter,
        reroute: bool,
    ) -> BoxFuture<'_, Result<ReplayReport, crate::queue::QueueError>> {
        Box::pin(async move {
            if reroute {
                return Err(NatsError::Publish(
                    "reroute=true is not available with the nats backend yet".into(),
                )
                .into());
            }
            let mut report = ReplayReport::default();
            let dead = self.dead_stream().await?;
            for (seq, mut record, job) in self.matching_dead(&filter, None, usize::MAX).await? {
                let now = crate::queue::embedded::unix_ms();
                record.attempts = 0;
                record.first_ms = now;
                record.next_ms = now;
                record.dead_reason = None;
                record.dead_ms = None;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(
                    "Nats-Msg-Id",
                    format!("{}/{}/replay-{seq}", record.job_id, record.destination).as_str(),
                );
                let publish = |e: &dyn std::fmt::Display| NatsError::Publish(e.to_string());
                self.js
                    .publish_with_headers(
                        self.names.deliver(&record.destination),
                        headers,
                        encode(&record, &job).into(),
                    )
                    .await
                    .map_err(|e| publish(&e))?
                    .await
                    .map_err(|e| publish(&e))?;
                dead.delete_message(seq).await.map_err(|e| publish(&e))?;
                report.replayed += 1;
            }
            Ok(report)
        })
    }

    fn purge(&self, filter: DeadFilter) -> BoxFuture<'_, Result<usize, crate::queue::QueueError>> {
        Box::pin(async move {
            let dead = self.dead_stream().await?;
            let mut purged = 0;
            for (seq, _, _) in self.matching_dead(&filter, None, usize::MAX).await? {
                dead.delete_message(seq)
                    .await
                    .map_err(|e| NatsError::Publish(e.to_string()))?;
                purged += 1;
            }
            Ok(purged)
        })
    }

    /// Nothing is quarantined: an undecodable message is terminated, and
    /// logged, when pulled.
    fn quarantined(
        &self,
    ) -> Result<Vec<crate::queue::embedded::Quarantined>, crate::queue::QueueError> {
        Ok(Vec::new())
    }

    /// Set every few seconds from the engine by the delivery workers.
    fn refresh_gauges(&self) {}

    /// Ready while NATS takes webhooks, and for `unavailable_after` once it
    /// does not (a blip does not take every replica out of the Service):
    /// the client disconnected, or accepts failing while connected (a
    /// stream without its quorum).
    fn ready(&self) -> Result<(), String> {
        let now = Instant::now();
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        let mut disconnected = self
            .disconnected_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if connected {
            *disconnected = None;
        } else {
            disconnected.get_or_insert(now);
        }
        let failing = *self.failing_since.lock().unwrap_or_else(|p| p.into_inner());
        match failing.into_iter().chain(*disconnected).min() {
            Some(since) if now.duration_since(since) >= self.unavailable_after => Err(format!(
                "JetStream has not been taking webhooks for {:?}",
                now.duration_since(since)
            )),
            _ => Ok(()),
        }
    }
}

/// `[u32 record length][record JSON][stored job]`, little endian.
fn encode(record: &Record, job: &[u8]) -> Vec<u8> {
    let record = serde_json::to_vec(record).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + record.len() + job.len());
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    out.extend_from_slice(&record);
    out.extend_from_slice(job);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = Names::new("hg");
        assert_eq!(n.deliveries(), "hg_deliveries");
        assert_eq!(n.deliver("trust-safety"), "hg.deliver.trust-safety");
        assert_eq!(n.deliver("a.b"), "hg.deliver.a~b");
        assert_eq!(n.seen_subject("job/1 ü"), "hg.seen.am9iLzEgw7w");
    }
}
