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
//!   `dedupe.window`, marked once all its deliveries are stored, read with
//!   a direct get (any replica of the stream answers). (A stream rather
//!   than a key-value bucket: the client's bucket calls do not understand
//!   the answers of the 2.9 servers Debian ships.)

use std::time::Duration;

use async_nats::jetstream::context::{
    CreateStreamError, CreateStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::{self, consumer::pull, stream};
use base64::Engine as _;
use tokio::time::Instant;

use std::collections::HashMap;

use futures_util::TryStreamExt;

use crate::config::NatsConfig;
use crate::queue::{Accepted, DeadFilter, NewJob, Record, StoredJob};

/// How long JetStream may take to acknowledge a publish before the
/// webhook is refused (503), never left hanging.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the queue could not be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("cannot set up the JetStream stream {name}: {message}")]
    Setup { name: String, message: String },
    /// Set-up that no retry can fix (the configuration asks for what the
    /// server cannot do): start-up stops at once with this sentence.
    #[error("{0}")]
    Unsupported(String),
    #[error("JetStream did not take the webhook: {0}")]
    Publish(String),
    /// The stream exists but no server answers for it: its replicas are
    /// electing a leader (a server restarted or was lost).
    #[error(
        "the JetStream stream {stream} has no leader yet; webhooks are refused until one is elected"
    )]
    NoLeader { stream: String },
    /// Connected, yet the stream did not acknowledge in time.
    #[error(
        "the JetStream stream {stream} did not answer within {after:?}: no leader elected yet, or its servers are overloaded"
    )]
    Silent { stream: String, after: Duration },
    #[error("not connected to NATS (the client is reconnecting)")]
    Disconnected,
    #[error("the deliveries stream holds {stored} bytes, spool.max_bytes is {max}")]
    Full { stored: u64, max: u64 },
}

/// Where a queued delivery is: due (its destination's consumer hands it
/// to an attempt, at most `concurrency` at a time across every replica),
/// or waiting for its next attempt (a retry's backoff, an open circuit).
///
/// Waiting deliveries have a subject and a consumer of their own because
/// JetStream counts a message `nak`ed with a delay against its consumer's
/// `max_ack_pending` until it is handed out again: on the due consumer,
/// a destination's retries would take its concurrency from everything
/// else queued for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Due,
    Waiting,
}

impl Queued {
    fn token(self) -> &'static str {
        match self {
            Queued::Due => "deliver",
            Queued::Waiting => "wait",
        }
    }
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

    /// The durable consumer every replica shares for a destination's
    /// due or waiting deliveries.
    pub fn consumer(&self, queued: Queued, destination: &str) -> String {
        format!(
            "{}_{}_{}",
            self.prefix,
            queued.token(),
            destination.replace('.', "~")
        )
    }

    pub fn deliveries(&self) -> String {
        format!("{}_deliveries", self.prefix)
    }

    pub fn seen(&self) -> String {
        format!("{}_seen", self.prefix)
    }

    /// A destination's subject for due or waiting deliveries. Names may
    /// hold `.`, which separates subject tokens; it becomes `~`, which
    /// names may not hold.
    pub fn subject(&self, queued: Queued, destination: &str) -> String {
        format!(
            "{}.{}.{}",
            self.prefix,
            queued.token(),
            destination.replace('.', "~")
        )
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

/// A seen job id's message: its presence is what counts.
const SEEN: &[u8] = b"stored";

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
    /// `spool.max_bytes`: past it, webhooks are refused.
    max_bytes: u64,
    /// The deliveries stream's size, as last read (every second).
    stored_bytes: std::sync::atomic::AtomicU64,
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
            .timeout(PUBLISH_TIMEOUT)
            .build(client.clone());
        let names = Names::new(&config.prefix);
        // A cluster that has just started elects its JetStream leader
        // first: set-up is tried again until `unavailable_after`.
        // On a new cluster, and with replicas starting together, the
        // first request to create each R3 stream often goes unanswered
        // (measured: two replicas at once were ready after 2.6-3.1 s, each
        // stream created on a second try): a set-up that succeeds within
        // 10 s is no news. One that keeps failing (too little storage,
        // say) is a WARN then, and every 5 s after.
        let deadline = tokio::time::Instant::now() + config.unavailable_after;
        let mut next_warning = tokio::time::Instant::now() + Duration::from_secs(10);
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
                        max_bytes,
                        stored_bytes: std::sync::atomic::AtomicU64::new(0),
                    });
                }
                Err(e @ NatsError::Unsupported(_)) => return Err(e),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    if tokio::time::Instant::now() >= next_warning {
                        tracing::warn!(
                            "JetStream set-up failed, trying again until spool.nats.unavailable_after: {e}"
                        );
                        next_warning += Duration::from_secs(5);
                    } else {
                        tracing::debug!("JetStream set-up failed, trying again: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores a job's deliveries; returns once JetStream acknowledged each
    /// (with 3 replicas, once a quorum has it). Three round trips: is the
    /// job id seen; its deliveries (and dead letters decided at once),
    /// published together; then the job id marked seen. An accept that
    /// fails half way leaves the job id unmarked: the sender's retry
    /// publishes again, and the message ids store nothing twice.
    pub async fn accept(&self, job: NewJob) -> Result<Accepted, NatsError> {
        let seen = self.names.seen_subject(&job.job.job_id);
        let (deliveries, seen_stream) = (self.names.deliveries(), self.names.seen());
        // Asked first: a duplicate is acknowledged even while intake is full.
        match self.seen.direct_get_last_for_subject(&seen).await {
            Ok(_) => return Ok(Accepted::Duplicate),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {}
            Err(e) => return Err(self.lookup_failed(&seen_stream, &e)),
        }
        let stored = self.stored_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if stored >= self.max_bytes {
            return Err(NatsError::Full {
                stored,
                max: self.max_bytes,
            });
        }
        let body = job
            .job
            .encode()
            .map_err(|e| NatsError::Publish(e.to_string()))?;
        let mut acks = Vec::with_capacity(job.records.len());
        for record in &job.records {
            let queued = match record.dead_reason {
                Some(_) => self.names.dead_subject(&record.destination),
                None => self.names.subject(Queued::Due, &record.destination),
            };
            let mut headers = async_nats::HeaderMap::new();
            let id = format!("{}/{}", job.job.job_id, record.destination);
            headers.insert("Nats-Msg-Id", id.as_str());
            let payload = encode(record, &body);
            // Counted at once: this replica stops at `max_bytes` without
            // waiting for the next read of the stream's size.
            self.stored_bytes
                .fetch_add(payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
            acks.push(
                self.js
                    .publish_with_headers(queued, headers, payload.into())
                    .await
                    .map_err(|e| self.publish_failed(&deliveries, &e))?,
            );
        }
        let mut pending = Vec::new();
        let mut dead = Vec::new();
        for (record, ack) in job.records.into_iter().zip(acks) {
            let ack = ack
                .await
                .map_err(|e| self.publish_failed(&deliveries, &e))?;
            match record.dead_reason {
                Some(_) => dead.push(record),
                None => pending.push((ack.sequence, record)),
            }
        }
        self.js
            .publish(seen, SEEN.into())
            .await
            .map_err(|e| self.publish_failed(&seen_stream, &e))?
            .await
            .map_err(|e| self.publish_failed(&seen_stream, &e))?;
        Ok(Accepted::New { pending, dead })
    }

    /// A publish to `stream` that failed, said as what it means.
    fn publish_failed(&self, stream: &str, e: &PublishError) -> NatsError {
        match e.kind() {
            // No server answered for a stream set up at start: it has lost
            // its leader (the client says "no stream found").
            PublishErrorKind::StreamNotFound => NatsError::NoLeader {
                stream: stream.to_owned(),
            },
            PublishErrorKind::BrokenPipe => NatsError::Disconnected,
            PublishErrorKind::TimedOut => self.timed_out(stream),
            _ => NatsError::Publish(e.to_string()),
        }
    }

    /// The dedupe lookup in `stream` that failed, said as what it means.
    fn lookup_failed(&self, stream: &str, e: &stream::DirectGetError) -> NatsError {
        match e.kind() {
            stream::DirectGetErrorKind::ErrorResponse(status, _)
                if status == async_nats::StatusCode::NO_RESPONDERS =>
            {
                NatsError::NoLeader {
                    stream: stream.to_owned(),
                }
            }
            stream::DirectGetErrorKind::TimedOut => self.timed_out(stream),
            _ => NatsError::Publish(e.to_string()),
        }
    }

    /// A request to `stream` that was not answered: the connection is
    /// gone, or the stream is silent.
    fn timed_out(&self, stream: &str) -> NatsError {
        if self.client.connection_state() == async_nats::connection::State::Connected {
            NatsError::Silent {
                stream: stream.to_owned(),
                after: PUBLISH_TIMEOUT,
            }
        } else {
            NatsError::Disconnected
        }
    }

    /// Publishes `payload` with message id `id` (JetStream stores it once
    /// within the duplicate window); its stream sequence once acknowledged.
    async fn publish(&self, subject: String, id: &str, payload: Vec<u8>) -> Result<u64, NatsError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let publish = |e: &dyn std::fmt::Display| NatsError::Publish(e.to_string());
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| publish(&e))?
            .await
            .map_err(|e| publish(&e))?;
        Ok(ack.sequence)
    }

    /// Queues `record` for its destination again, due or waiting (until
    /// its `next_ms`), with the job's stored bytes `job`, under message id
    /// `id`.
    pub async fn requeue(
        &self,
        queued: Queued,
        record: &Record,
        job: &[u8],
        id: &str,
    ) -> Result<(), NatsError> {
        let subject = self.names.subject(queued, &record.destination);
        self.publish(subject, id, encode(record, job))
            .await
            .map(drop)
    }

    /// Whether JetStream has been taking webhooks, for readiness.
    pub fn note_accept(&self, ok: bool) {
        let mut failing = self.failing_since.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            *failing = None;
        } else {
            failing.get_or_insert_with(Instant::now);
        }
    }

    /// Ready while NATS takes webhooks, and for `unavailable_after` once it
    /// does not (a blip does not take every replica out of the Service):
    /// the client disconnected, or accepts failing while connected (a
    /// stream without its quorum).
    pub fn ready(&self) -> Result<(), String> {
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

/// Why creating stream `name` failed, in one sentence: [`NatsError::Unsupported`]
/// for a refusal no retry can fix, else [`NatsError::Setup`] (no leader
/// yet, a timeout, too little storage for now; `asks` is the storage the
/// stream asks for, named when that is what JetStream refused). JetStream's
/// own description is used once, without the client's repetition of it.
fn stream_failed(
    name: &str,
    e: &CreateStreamError,
    config: &NatsConfig,
    asks: Option<&str>,
) -> NatsError {
    use async_nats::jetstream::ErrorCode;
    let message = match e.kind() {
        CreateStreamErrorKind::JetStream(js)
            if js.error_code() == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED =>
        {
            return NatsError::Unsupported(format!(
                "spool.nats.replicas is {} but the NATS server at {} runs JetStream alone, not in a cluster: \
                 set spool.nats.replicas = 1, or run a cluster of 3 (deploy/nats/)",
                config.replicas,
                config.servers.join(", ")
            ));
        }
        CreateStreamErrorKind::JetStream(js)
            if [
                ErrorCode::STORAGE_RESOURCES_EXCEEDED,
                ErrorCode::INSUFFICIENT_RESOURCES,
            ]
            .contains(&js.error_code()) =>
        {
            match asks {
                Some(asks) => format!("{js} ({asks})"),
                None => js.to_string(),
            }
        }
        CreateStreamErrorKind::JetStream(js) => js.to_string(),
        CreateStreamErrorKind::TimedOut => "JetStream did not answer in time".to_owned(),
        other => other.to_string(),
    };
    NatsError::Setup {
        name: name.to_owned(),
        message,
    }
}

/// Creates, or updates to this configuration, the deliveries, dead-letter
/// and seen streams; returns the seen stream.
async fn setup(
    js: &jetstream::Context,
    names: &Names,
    config: &NatsConfig,
    max_bytes: u64,
    window: Duration,
) -> Result<stream::Stream, NatsError> {
    let deliveries = names.deliveries();
    let room = max_bytes.saturating_mul(4);
    js.create_or_update_stream(stream::Config {
        name: deliveries.clone(),
        subjects: vec![
            format!("{}.deliver.*", config.prefix),
            format!("{}.wait.*", config.prefix),
        ],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        // Webhooks are refused at `max_bytes` (see `accept`). Four times
        // that leaves deliveries moving between due and waiting room they
        // never run out of. With the stream at its limit, every copy was
        // refused for room, and nats-server 2.9.10 lost 1-3 of 35-72
        // deliveries in 1 run of 4 under load: a waiting message `nak`ed
        // with a delay after its copy was refused was never handed out
        // again and left the stream unacknowledged. JetStream refuses
        // (never drops) new messages past the limit.
        max_bytes: i64::try_from(room).unwrap_or(i64::MAX),
        discard: stream::DiscardPolicy::New,
        duplicate_window: window.min(Duration::from_secs(3600)),
        ..Default::default()
    })
    .await
    .map_err(|e| {
        let asks = format!("it asks for {room} bytes of storage: 4 x spool.max_bytes");
        stream_failed(&deliveries, &e, config, Some(&asks))
    })?;
    let dead = names.dead();
    js.create_or_update_stream(stream::Config {
        name: dead.clone(),
        subjects: vec![format!("{}.dead.*", config.prefix)],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| stream_failed(&dead, &e, config, None))?;
    let seen = names.seen();
    js.create_or_update_stream(stream::Config {
        name: seen.clone(),
        subjects: vec![format!("{}.seen.*", config.prefix)],
        max_messages_per_subject: 1,
        max_age: window,
        allow_direct: true,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| stream_failed(&seen, &e, config, None))?;
    js.get_stream(&seen).await.map_err(|e| NatsError::Setup {
        name: seen.clone(),
        message: e.to_string(),
    })
}

impl NatsQueue {
    /// The durable pull consumer every replica shares for `destination`;
    /// JetStream lets at most `concurrency` of its messages be in flight
    /// across all of them, and hands a message out again when it has not
    /// been acknowledged within `ack_wait` (its replica died).
    pub async fn consumer(
        &self,
        queued: Queued,
        destination: &str,
        concurrency: Option<usize>,
        ack_wait: Duration,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, NatsError> {
        let stream = self
            .js
            .get_stream(self.names.deliveries())
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))?;
        let name = self.names.consumer(queued, destination);
        // Created, or updated to the destination's concurrency now.
        stream
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: self.names.subject(queued, destination),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                // -1: no limit.
                max_ack_pending: concurrency.map_or(-1, |c| i64::try_from(c).unwrap_or(i64::MAX)),
                ..Default::default()
            })
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))
    }

    /// The deliveries stream, without the round trip for its info.
    async fn deliveries_stream(&self) -> Result<stream::Stream<()>, NatsError> {
        self.js
            .get_stream_no_info(self.names.deliveries())
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))
    }

    /// The destinations that have a consumer (some replica delivered to
    /// them once), whether the rules still name them or not.
    pub async fn consumed_destinations(&self) -> Result<Vec<String>, NatsError> {
        let failed = |e: &dyn std::fmt::Display| NatsError::Publish(e.to_string());
        let stream = self.deliveries_stream().await?;
        let from = self.names.consumer(Queued::Due, "");
        let names: Vec<String> = stream
            .consumer_names()
            .try_collect()
            .await
            .map_err(|e| failed(&e))?;
        Ok(names
            .iter()
            .filter_map(|n| n.strip_prefix(&from))
            .map(|d| d.replace('~', "."))
            .collect())
    }

    /// Deliveries waiting or in flight, by destination: the messages on
    /// each destination's subject (a work queue keeps a message until it is
    /// acknowledged), the same number on every replica.
    pub async fn depths(&self) -> Result<HashMap<String, u64>, NatsError> {
        let mut depths = self.counts(self.names.deliveries(), "deliver").await?;
        for (destination, n) in self.counts(self.names.deliveries(), "wait").await? {
            *depths.entry(destination).or_default() += n;
        }
        Ok(depths)
    }

    /// Keeps `record` (its `dead_reason` set) with the job of `message` as
    /// a dead letter; the caller then acknowledges the message.
    pub async fn keep_dead(
        &self,
        message: &jetstream::Message,
        record: &Record,
    ) -> Result<(), NatsError> {
        // Kept once, should its message come again before it is acknowledged.
        let sequence = message.info().map_or(0, |i| i.stream_sequence);
        let id = format!("{}/{}/dead-{sequence}", record.job_id, record.destination);
        self.keep_dead_record(record, job_bytes(&message.payload), &id)
            .await
    }

    /// Keeps `record` (its `dead_reason` set) with the stored job `job` as
    /// a dead letter, under message id `id`.
    pub async fn keep_dead_record(
        &self,
        record: &Record,
        job: &[u8],
        id: &str,
    ) -> Result<(), NatsError> {
        let subject = self.names.dead_subject(&record.destination);
        self.publish(subject, id, encode(record, job))
            .await
            .map(drop)
    }

    /// Dead letters by destination, as JetStream counts them.
    pub async fn dead_counts(&self) -> Result<HashMap<String, u64>, NatsError> {
        self.counts(self.names.dead(), "dead").await
    }

    /// The messages of `stream` by destination, from its subjects
    /// `{prefix}.{kind}.{destination}`.
    async fn counts(&self, stream: String, kind: &str) -> Result<HashMap<String, u64>, NatsError> {
        let failed = |e: &dyn std::fmt::Display| NatsError::Publish(e.to_string());
        let stream = self
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| failed(&e))?;
        let from = format!("{}.{kind}.", self.names.prefix);
        let mut subjects = stream
            .info_with_subjects(format!("{from}>"))
            .await
            .map_err(|e| failed(&e))?;
        let mut counts = HashMap::new();
        while let Some((subject, n)) = subjects.try_next().await.map_err(|e| failed(&e))? {
            if let Some(token) = subject.strip_prefix(&from) {
                counts.insert(token.replace('~', "."), n as u64);
            }
        }
        Ok(counts)
    }

    /// When the oldest delivery still queued for `destination` was
    /// accepted (Unix ms), if any is.
    pub async fn oldest_ms(&self, destination: &str) -> Result<Option<u64>, NatsError> {
        let mut firsts = Vec::new();
        for queued in [Queued::Due, Queued::Waiting] {
            if let Some((_, first)) = self.queued(queued, destination, 0, 1).await?.first() {
                firsts.extend(decode(first).map(|(record, _)| record.first_ms));
            }
        }
        Ok(firsts.into_iter().min())
    }

    /// Reads the deliveries stream's state: notes its size (what intake
    /// compares with `spool.max_bytes`) and returns its last sequence.
    pub async fn read_state(&self) -> Result<u64, NatsError> {
        let stream = self.deliveries_stream().await?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| NatsError::Publish(e.to_string()))?;
        self.stored_bytes
            .store(info.state.bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(info.state.last_sequence)
    }

    /// Up to `limit` deliveries of `destination`, due or waiting, from
    /// stream sequence `from` on, oldest first: (sequence, payload).
    pub async fn queued(
        &self,
        queued: Queued,
        destination: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, bytes::Bytes)>, NatsError> {
        let failed = |e: &dyn std::fmt::Display| NatsError::Publish(e.to_string());
        let stream = self.deliveries_stream().await?;
        let subject = self.names.subject(queued, destination);
        let mut out = Vec::new();
        let mut next = from;
        while out.len() < limit {
            match stream
                .get_first_raw_message_by_subject(&subject, next)
                .await
            {
                Ok(message) => {
                    next = message.sequence + 1;
                    out.push((message.sequence, message.payload));
                }
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(failed(&e)),
            }
        }
        Ok(out)
    }

    /// Deletes a queued delivery (queued again or buried in its place);
    /// one already gone is no error.
    pub async fn delete_delivery(&self, sequence: u64) -> Result<(), NatsError> {
        let stream = self.deliveries_stream().await?;
        match stream.delete_message(sequence).await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(e.kind(), stream::DeleteMessageErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND) =>
            {
                Ok(())
            }
            Err(e) => Err(NatsError::Publish(e.to_string())),
        }
    }

    /// Deletes dead letter `sequence` (replayed or purged).
    pub async fn delete_dead(&self, sequence: u64) -> Result<(), NatsError> {
        self.dead_stream()
            .await?
            .delete_message(sequence)
            .await
            .map(drop)
            .map_err(|e| NatsError::Publish(e.to_string()))
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
    pub async fn matching_dead(
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

/// The stored job's bytes in a message's payload.
pub fn job_bytes(payload: &[u8]) -> &[u8] {
    payload
        .get(4 + record_len(payload).unwrap_or(0)..)
        .unwrap_or_default()
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
        assert_eq!(
            n.subject(Queued::Due, "trust-safety"),
            "hg.deliver.trust-safety"
        );
        assert_eq!(n.subject(Queued::Waiting, "a.b"), "hg.wait.a~b");
        assert_eq!(n.consumer(Queued::Waiting, "a.b"), "hg_wait_a~b");
        assert_eq!(n.seen_subject("job/1 ü"), "hg.seen.am9iLzEgw7w");
    }
}
