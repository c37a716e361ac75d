//! The embedded, crash-safe spool (redb): what was accepted, what is still
//! to deliver, what gave up, and which job ids were seen.
//!
//! Every write goes through one writer thread that drains whatever is
//! queued into a single write transaction and commits it with an fsync:
//! concurrent webhooks share a commit (group commit), so throughput is not
//! one fsync per request. A webhook is answered only after the commit that
//! holds it returned.
//!
//! Tables:
//! - `jobs`: job sequence → the original body, signature and query;
//! - `job_refs`: job sequence → deliveries and dead letters still using it;
//! - `deliveries`: delivery id → [`Record`] (pending);
//! - `dead`: delivery id → [`Record`] (given up, waiting for replay);
//! - `seen`, `seen_by_age`: job ids within the dedupe window.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const JOB_REFS: TableDefinition<u64, u32> = TableDefinition::new("job_refs");
const DELIVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("deliveries");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
const SEEN_BY_AGE: TableDefinition<(u64, &str), ()> = TableDefinition::new("seen_by_age");

/// The spool file inside `spool.path`.
pub const FILE_NAME: &str = "spool.redb";
/// Page cache: the spool is read once per attempt, so a small cache keeps
/// memory flat however much is queued.
const CACHE_BYTES: usize = 16 << 20;
/// Operations merged into one transaction at most.
const MAX_BATCH: usize = 4096;
/// Expired dedupe entries removed per transaction at most.
const SWEEP_BATCH: usize = 1024;

/// Milliseconds since the Unix epoch: what the spool stores, so that times
/// survive restarts.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// One delivery of one job to one destination.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub job: u64,
    pub job_id: String,
    /// A destination name, or [`crate::rules::UNROUTED`].
    pub destination: String,
    pub rule: String,
    /// Resolved when the job was accepted, from the rules in force then.
    pub url: String,
    /// The destination's and the rule's headers.
    pub headers: Vec<(String, String)>,
    pub attempts: u32,
    pub first_ms: u64,
    pub next_ms: u64,
    pub last_attempt_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Set once given up.
    pub dead_reason: Option<String>,
    pub dead_ms: Option<u64>,
}

/// A job as stored: everything needed to forward it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJob {
    pub job_id: String,
    pub signature: Option<Bytes>,
    pub query: Option<String>,
    pub accepted_ms: u64,
    pub body: Bytes,
}

impl StoredJob {
    /// `[u16 id][id][u16 sig][sig][u32 query][query][u64 ms][body]`, little
    /// endian: the body stays a plain byte slice at the end.
    fn encode(&self) -> Vec<u8> {
        let sig = self.signature.as_deref().unwrap_or_default();
        let query = self.query.as_deref().unwrap_or_default();
        let mut out =
            Vec::with_capacity(16 + self.job_id.len() + sig.len() + query.len() + self.body.len());
        out.extend_from_slice(&(self.job_id.len() as u16).to_le_bytes());
        out.extend_from_slice(self.job_id.as_bytes());
        out.extend_from_slice(&(sig.len() as u16).to_le_bytes());
        out.extend_from_slice(sig);
        let query_len = if self.query.is_some() {
            query.len() as u32
        } else {
            u32::MAX
        };
        out.extend_from_slice(&query_len.to_le_bytes());
        out.extend_from_slice(query.as_bytes());
        out.extend_from_slice(&self.accepted_ms.to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let mut at = 0;
        let mut take = |n: usize| {
            let part = raw.get(at..at + n)?;
            at += n;
            Some(part)
        };
        let id_len = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let job_id = std::str::from_utf8(take(id_len)?).ok()?.to_owned();
        let sig_len = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let sig = take(sig_len)?;
        let query_len = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let query = match query_len {
            u32::MAX => None,
            n => Some(std::str::from_utf8(take(n as usize)?).ok()?.to_owned()),
        };
        let accepted_ms = u64::from_le_bytes(take(8)?.try_into().ok()?);
        Some(Self {
            job_id,
            signature: (sig_len > 0).then(|| Bytes::copy_from_slice(sig)),
            query,
            accepted_ms,
            body: Bytes::copy_from_slice(raw.get(at..)?),
        })
    }
}

/// A job to store, with one entry per destination it goes to.
#[derive(Debug)]
pub struct NewJob {
    pub job: StoredJob,
    /// Pending deliveries, and dead letters decided at once (unrouted, an
    /// unsafe template value): their `dead_reason` is set.
    pub records: Vec<Record>,
}

#[derive(Debug)]
pub enum Accepted {
    /// Stored: the pending deliveries with their ids, then the dead letters.
    New {
        pending: Vec<(u64, Record)>,
        dead: Vec<Record>,
    },
    /// The job id was accepted within the dedupe window: nothing stored.
    Duplicate,
}

/// Which dead letters an admin call is about.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadFilter {
    pub destination: Option<String>,
    pub job_id: Option<String>,
}

impl DeadFilter {
    fn matches(&self, r: &Record) -> bool {
        self.destination
            .as_ref()
            .is_none_or(|d| *d == r.destination)
            && self.job_id.as_ref().is_none_or(|j| *j == r.job_id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool is full ({used} of {limit} bytes)")]
    Full { used: u64, limit: u64 },
    #[error("spool storage error: {0}")]
    Storage(String),
    #[error("the spool is closed")]
    Closed,
}

macro_rules! storage_error {
    ($($t:ty),*) => {$(
        impl From<$t> for SpoolError {
            fn from(e: $t) -> Self {
                SpoolError::Storage(e.to_string())
            }
        }
    )*};
}
storage_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
    serde_json::Error
);

/// Why the spool could not be opened at all.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the spool directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the spool {path}: {message}")]
    Open { path: PathBuf, message: String },
}

/// How many pending deliveries per destination are held in memory; the
/// rest are read back from disk in id order as those are delivered, so
/// memory stays flat however long an outage makes the queue.
pub const HELD_PER_DESTINATION: usize = 4096;

/// What was in the spool at start-up.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The first [`HELD_PER_DESTINATION`] pending deliveries of each
    /// destination, in id order.
    pub pending: Vec<(u64, Record)>,
    /// The pending deliveries beyond those, by destination.
    pub on_disk: HashMap<String, OnDisk>,
    pub dead_by_destination: HashMap<String, i64>,
    /// Set when a damaged file was moved aside.
    pub moved_aside: Option<PathBuf>,
}

enum Op {
    Accept {
        job: NewJob,
        reply: oneshot::Sender<Result<Accepted, SpoolError>>,
    },
    Update {
        id: u64,
        record: Box<Record>,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// `job` is the record's, known to the caller: the record need not
    /// be read back and decoded to release it.
    Complete {
        id: u64,
        job: u64,
    },
    Bury {
        id: u64,
        record: Box<Record>,
    },
    Replay {
        filter: DeadFilter,
        now_ms: u64,
        reply: oneshot::Sender<Result<Vec<(u64, Record)>, SpoolError>>,
    },
    Purge {
        filter: DeadFilter,
        reply: oneshot::Sender<Result<Vec<Record>, SpoolError>>,
    },
    Reroute {
        dead_id: u64,
        job: u64,
        records: Vec<Record>,
        reply: oneshot::Sender<Result<Stored, SpoolError>>,
    },
    /// Commit what came before, then stop.
    Close,
}

/// A destination's pending deliveries left on disk only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnDisk {
    pub count: usize,
    /// The lowest id among them.
    pub first: u64,
}

/// Pending deliveries read back from disk for one destination.
#[derive(Debug, Default)]
pub struct ReadBack {
    pub found: Vec<(u64, Record)>,
    /// The highest id looked at: every match up to it is in `found`.
    pub last: u64,
    /// True when the scan reached the end of the table.
    pub exhausted: bool,
}

/// Records stored for a job: pending with their ids, and dead letters.
type Stored = (Vec<(u64, Record)>, Vec<Record>);

pub struct Spool {
    db: Arc<Database>,
    /// False after a commit failed, until one succeeds: readiness.
    healthy: Arc<AtomicBool>,
    ops: mpsc::UnboundedSender<Op>,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    bytes: Arc<AtomicU64>,
    max_bytes: u64,
    window: Duration,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. A file redb cannot read is
    /// moved aside and an empty spool started, so a damaged file never
    /// crash-loops the gateway; the caller logs it loudly.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        window: Duration,
    ) -> Result<(Self, Recovered), OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let builder = || {
            let mut b = Database::builder();
            b.set_cache_size(CACHE_BYTES);
            b
        };
        let open_error = |message: String| OpenError::Open {
            path: path.clone(),
            message,
        };
        let (db, moved_aside) = match builder().create(&path) {
            Ok(db) => (db, None),
            Err(e) if is_damage(&e) => {
                let aside = dir.join(format!("{FILE_NAME}.damaged-{}", unix_ms()));
                std::fs::rename(&path, &aside)
                    .map_err(|r| open_error(format!("{e}; moving it aside failed: {r}")))?;
                let db = builder()
                    .create(&path)
                    .map_err(|e| open_error(e.to_string()))?;
                (db, Some(aside))
            }
            Err(e) => return Err(open_error(e.to_string())),
        };
        let db = Arc::new(db);
        let (recovered, bytes, next_id, next_job) =
            recover(&db).map_err(|e| open_error(e.to_string()))?;
        let recovered = Recovered {
            moved_aside,
            ..recovered
        };
        let bytes = Arc::new(AtomicU64::new(bytes));
        let healthy = Arc::new(AtomicBool::new(true));
        let (tx, rx) = mpsc::unbounded_channel();
        let mut writer = Writer {
            db: db.clone(),
            healthy: healthy.clone(),
            bytes: bytes.clone(),
            next_id,
            next_job,
            window_ms: window.as_millis() as u64,
            last_sweep_ms: 0,
        };
        let handle = std::thread::Builder::new()
            .name("hookgate-spool".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| open_error(format!("cannot start the writer thread: {e}")))?;
        Ok((
            Self {
                db,
                healthy,
                ops: tx,
                writer: std::sync::Mutex::new(Some(handle)),
                bytes,
                max_bytes,
                window,
            },
            recovered,
        ))
    }

    /// False while writes are failing (the last commit failed).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Logical bytes in use: stored jobs and records.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A cheap read-only check, before routing: true if `job_id` was
    /// accepted within the dedupe window. [`Spool::accept`] checks again
    /// inside its transaction.
    pub fn seen(&self, job_id: &str) -> Result<bool, SpoolError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(SEEN) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let cutoff = unix_ms().saturating_sub(self.window.as_millis() as u64);
        Ok(table.get(job_id)?.is_some_and(|at| at.value() >= cutoff))
    }

    /// Stores a job durably; returns once the commit holding it is on disk.
    pub async fn accept(&self, job: NewJob) -> Result<Accepted, SpoolError> {
        let size = job.job.body.len() as u64 + 512 * job.records.len() as u64;
        let used = self.bytes();
        if used + size > self.max_bytes {
            return Err(SpoolError::Full {
                used,
                limit: self.max_bytes,
            });
        }
        let (reply, answer) = oneshot::channel();
        self.send(Op::Accept { job, reply })?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Up to `limit` pending deliveries of `destination` with ids above
    /// `after`, in id order. Reads a snapshot: a delivery committed after
    /// it has a higher id than any it holds.
    pub fn pending_after(
        &self,
        destination: &str,
        after: u64,
        limit: usize,
    ) -> Result<ReadBack, SpoolError> {
        // Records of other destinations are skipped, a bounded number per
        // call, so one call never scans a whole long queue.
        let mut budget = limit.saturating_mul(16).max(1024);
        let txn = self.db.begin_read()?;
        let deliveries = txn.open_table(DELIVERIES)?;
        let mut back = ReadBack {
            last: after,
            exhausted: true,
            ..ReadBack::default()
        };
        for entry in deliveries.range(after.saturating_add(1)..)? {
            if back.found.len() >= limit || budget == 0 {
                back.exhausted = false;
                break;
            }
            budget -= 1;
            let (id, raw) = entry?;
            let record: Record = serde_json::from_slice(raw.value())?;
            back.last = id.value();
            if record.destination == destination {
                back.found.push((id.value(), record));
            }
        }
        Ok(back)
    }

    /// The job and record of a pending delivery; `None` if it is gone
    /// (delivered, or purged by an operator).
    pub fn load(&self, id: u64) -> Result<Option<(Record, StoredJob)>, SpoolError> {
        let txn = self.db.begin_read()?;
        let deliveries = txn.open_table(DELIVERIES)?;
        let Some(raw) = deliveries.get(id)? else {
            return Ok(None);
        };
        let record: Record = serde_json::from_slice(raw.value())?;
        let jobs = txn.open_table(JOBS)?;
        let job = jobs
            .get(record.job)?
            .and_then(|raw| StoredJob::decode(raw.value()))
            .ok_or_else(|| {
                SpoolError::Storage(format!(
                    "delivery {id} refers to a missing job {}",
                    record.job
                ))
            })?;
        Ok(Some((record, job)))
    }

    /// Records a failed attempt; returns once committed, so that the next
    /// attempt reads the attempt count it wrote.
    pub async fn update(&self, id: u64, record: Record) -> Result<(), SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Update {
            id,
            record: Box::new(record),
            reply,
        })?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Delivery `id` of job `job` succeeded: forget it (and the job once
    /// unused).
    pub fn complete(&self, id: u64, job: u64) -> Result<(), SpoolError> {
        self.send(Op::Complete { id, job })
    }

    /// The delivery gave up: keep it as a dead letter.
    pub fn bury(&self, id: u64, record: Record) -> Result<(), SpoolError> {
        self.send(Op::Bury {
            id,
            record: Box::new(record),
        })
    }

    /// Dead letters, oldest first, at most `limit` after id `after`.
    pub fn dead_letters(
        &self,
        filter: &DeadFilter,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, SpoolError> {
        let txn = self.db.begin_read()?;
        let dead = txn.open_table(DEAD)?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for entry in dead.range(start..)? {
            let (id, raw) = entry?;
            let record: Record = serde_json::from_slice(raw.value())?;
            if filter.matches(&record) {
                out.push((id.value(), record));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Moves matching dead letters back to pending, with fresh attempts and
    /// new ids. Unrouted ones are returned as they are, for re-routing.
    pub async fn replay(&self, filter: DeadFilter) -> Result<Vec<(u64, Record)>, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Replay {
            filter,
            now_ms: unix_ms(),
            reply,
        })?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// The stored job `seq` (re-routing an unrouted dead letter reads it).
    pub fn job(&self, seq: u64) -> Result<Option<StoredJob>, SpoolError> {
        let txn = self.db.begin_read()?;
        let jobs = txn.open_table(JOBS)?;
        Ok(jobs
            .get(seq)?
            .and_then(|raw| StoredJob::decode(raw.value())))
    }

    /// Replaces the dead letter `dead_id` of job `job` by `records` (the
    /// job routed again).
    pub async fn reroute(
        &self,
        dead_id: u64,
        job: u64,
        records: Vec<Record>,
    ) -> Result<Stored, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Reroute {
            dead_id,
            job,
            records,
            reply,
        })?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Deletes matching dead letters; returns them.
    pub async fn purge(&self, filter: DeadFilter) -> Result<Vec<Record>, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Purge { filter, reply })?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Commits what is queued and stops the writer; later writes fail with
    /// [`SpoolError::Closed`]. Blocks until the last commit is on disk.
    pub fn close(&self) {
        let _ = self.send(Op::Close);
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    fn send(&self, op: Op) -> Result<(), SpoolError> {
        self.ops.send(op).map_err(|_| SpoolError::Closed)
    }
}

/// Errors that say the file itself is unreadable, as opposed to the
/// system (permissions, a second process holding the lock).
fn is_damage(e: &redb::DatabaseError) -> bool {
    use redb::{DatabaseError as D, StorageError as S};
    match e {
        D::Storage(S::Corrupted(_)) | D::UpgradeRequired(_) | D::RepairAborted => true,
        D::Storage(S::Io(io)) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

/// Reads what the spool holds: pending deliveries, dead letter counts, the
/// bytes in use and the next free ids.
fn recover(db: &Database) -> Result<(Recovered, u64, u64, u64), SpoolError> {
    let txn = db.begin_write()?;
    // Create every table, so that readers never meet a missing one.
    {
        txn.open_table(JOBS)?;
        txn.open_table(JOB_REFS)?;
        txn.open_table(DELIVERIES)?;
        txn.open_table(DEAD)?;
        txn.open_table(SEEN)?;
        txn.open_table(SEEN_BY_AGE)?;
    }
    txn.commit()?;
    let txn = db.begin_read()?;
    let mut recovered = Recovered::default();
    let mut bytes = 0;
    let mut next_id = 1;
    let mut next_job = 1;
    let mut held: HashMap<String, usize> = HashMap::new();
    for entry in txn.open_table(DELIVERIES)?.iter()? {
        let (id, raw) = entry?;
        let id = id.value();
        bytes += raw.value().len() as u64;
        next_id = next_id.max(id + 1);
        let record: Record = serde_json::from_slice(raw.value())?;
        let n = held.entry(record.destination.clone()).or_default();
        if *n < HELD_PER_DESTINATION {
            *n += 1;
            recovered.pending.push((id, record));
        } else {
            recovered
                .on_disk
                .entry(record.destination)
                .and_modify(|d| d.count += 1)
                .or_insert(OnDisk {
                    count: 1,
                    first: id,
                });
        }
    }
    for entry in txn.open_table(DEAD)?.iter()? {
        let (id, raw) = entry?;
        bytes += raw.value().len() as u64;
        next_id = next_id.max(id.value() + 1);
        let record: Record = serde_json::from_slice(raw.value())?;
        *recovered
            .dead_by_destination
            .entry(record.destination)
            .or_default() += 1;
    }
    for entry in txn.open_table(JOBS)?.iter()? {
        let (seq, raw) = entry?;
        bytes += raw.value().len() as u64;
        next_job = next_job.max(seq.value() + 1);
    }
    Ok((recovered, bytes, next_id, next_job))
}

struct Writer {
    db: Arc<Database>,
    healthy: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    next_id: u64,
    next_job: u64,
    window_ms: u64,
    last_sweep_ms: u64,
}

/// A reply to send once the batch's commit is known: a failed commit
/// turns every result of the batch into that failure.
type Reply = Box<dyn FnOnce(Result<(), &SpoolError>) + Send>;

fn reply<T: Send + 'static>(
    tx: oneshot::Sender<Result<T, SpoolError>>,
    result: Result<T, SpoolError>,
) -> Reply {
    Box::new(move |commit| {
        let result = match commit {
            Ok(()) => result,
            Err(e) => Err(SpoolError::Storage(e.to_string())),
        };
        // A requester that went away (its connection closed) is not an error.
        let _ = tx.send(result);
    })
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut batch = Vec::new();
        let mut closing = false;
        while let Some(op) = rx.blocking_recv() {
            closing |= matches!(op, Op::Close);
            batch.push(op);
            while !closing && batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => {
                        closing |= matches!(op, Op::Close);
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
            if closing {
                return;
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<Op>) {
        let (next_id, next_job, bytes) = (
            self.next_id,
            self.next_job,
            self.bytes.load(Ordering::Relaxed),
        );
        let mut replies = Vec::with_capacity(batch.len());
        let result = self.apply(batch, &mut replies);
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        if result.is_err() {
            // Nothing of the batch is on disk: ids and accounting roll back.
            self.next_id = next_id;
            self.next_job = next_job;
            self.bytes.store(bytes, Ordering::Relaxed);
            tracing::error!(
                "spool commit failed: {}",
                result
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
        }
        for send in replies {
            send(result.as_ref().map(|_| ()));
        }
    }

    fn apply(&mut self, batch: &mut Vec<Op>, replies: &mut Vec<Reply>) -> Result<(), SpoolError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut t = Tables {
                jobs: txn.open_table(JOBS)?,
                refs: txn.open_table(JOB_REFS)?,
                deliveries: txn.open_table(DELIVERIES)?,
                dead: txn.open_table(DEAD)?,
                seen: txn.open_table(SEEN)?,
                seen_by_age: txn.open_table(SEEN_BY_AGE)?,
            };
            let now = unix_ms();
            for op in batch.drain(..) {
                match op {
                    Op::Accept { job, reply: tx } => {
                        let result = self.accept(&mut t, job, now);
                        replies.push(reply(tx, result));
                    }
                    Op::Update {
                        id,
                        record,
                        reply: tx,
                    } => {
                        if t.deliveries.get(id)?.is_some() {
                            t.deliveries
                                .insert(id, serde_json::to_vec(&record)?.as_slice())?;
                        }
                        replies.push(reply(tx, Ok(())));
                    }
                    Op::Complete { id, job } => {
                        let removed = t.deliveries.remove(id)?.map(|raw| raw.value().len());
                        if let Some(size) = removed {
                            self.sub(size);
                            self.release(&mut t, job)?;
                        }
                    }
                    Op::Bury { id, record } => {
                        let removed = t.deliveries.remove(id)?.map(|raw| raw.value().len());
                        if let Some(size) = removed {
                            self.sub(size);
                            let encoded = serde_json::to_vec(&record)?;
                            self.add(encoded.len());
                            t.dead.insert(id, encoded.as_slice())?;
                        }
                    }
                    Op::Replay {
                        filter,
                        now_ms,
                        reply: tx,
                    } => {
                        let result = self.replay(&mut t, &filter, now_ms);
                        replies.push(reply(tx, result));
                    }
                    Op::Purge { filter, reply: tx } => {
                        let result = self.purge(&mut t, &filter);
                        replies.push(reply(tx, result));
                    }
                    Op::Reroute {
                        dead_id,
                        job,
                        records,
                        reply: tx,
                    } => {
                        let result = self.reroute(&mut t, dead_id, job, records);
                        replies.push(reply(tx, result));
                    }
                    Op::Close => {}
                }
            }
            self.sweep(&mut t, now)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        // Saturating: accounting is an estimate and must never wrap.
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n as u64))
            });
    }

    fn accept(
        &mut self,
        t: &mut Tables<'_>,
        job: NewJob,
        now: u64,
    ) -> Result<Accepted, SpoolError> {
        let job_id = job.job.job_id.as_str();
        if let Some(at) = t.seen.get(job_id)?.map(|v| v.value()) {
            if at + self.window_ms >= now {
                return Ok(Accepted::Duplicate);
            }
            t.seen_by_age.remove((at, job_id))?;
        }
        t.seen.insert(job_id, now)?;
        t.seen_by_age.insert((now, job_id), ())?;
        if job.records.is_empty() {
            // Dropped by the rules: remembered as seen, nothing to keep.
            return Ok(Accepted::New {
                pending: Vec::new(),
                dead: Vec::new(),
            });
        }
        let seq = self.next_job;
        self.next_job += 1;
        let encoded = job.job.encode();
        self.add(encoded.len());
        t.jobs.insert(seq, encoded.as_slice())?;
        t.refs.insert(seq, job.records.len() as u32)?;
        let (pending, dead) = self.insert_records(t, seq, job.records)?;
        Ok(Accepted::New { pending, dead })
    }

    /// Stores `records` of job `seq`, which holds one reference that this
    /// hands over to them (and releases if there are none).
    fn store(
        &mut self,
        t: &mut Tables<'_>,
        seq: u64,
        records: Vec<Record>,
    ) -> Result<Stored, SpoolError> {
        let refs = t.refs.get(seq)?.map_or(0, |r| r.value());
        t.refs.insert(seq, refs + records.len() as u32)?;
        let stored = self.insert_records(t, seq, records)?;
        self.release(t, seq)?;
        Ok(stored)
    }

    /// Inserts the records of job `seq`, whose references are counted.
    fn insert_records(
        &mut self,
        t: &mut Tables<'_>,
        seq: u64,
        records: Vec<Record>,
    ) -> Result<Stored, SpoolError> {
        let mut pending = Vec::new();
        let mut dead = Vec::new();
        for mut record in records {
            record.job = seq;
            let id = self.next_id;
            self.next_id += 1;
            let encoded = serde_json::to_vec(&record)?;
            self.add(encoded.len());
            if record.dead_reason.is_some() {
                t.dead.insert(id, encoded.as_slice())?;
                dead.push(record);
            } else {
                t.deliveries.insert(id, encoded.as_slice())?;
                pending.push((id, record));
            }
        }
        Ok((pending, dead))
    }

    fn reroute(
        &mut self,
        t: &mut Tables<'_>,
        dead_id: u64,
        seq: u64,
        records: Vec<Record>,
    ) -> Result<Stored, SpoolError> {
        let removed = t.dead.remove(dead_id)?.map(|raw| raw.value().len());
        let Some(size) = removed else {
            // Replayed or purged meanwhile.
            return Ok((Vec::new(), Vec::new()));
        };
        self.sub(size);
        // The dead letter's reference passes to the new records.
        self.store(t, seq, records)
    }

    /// One fewer delivery or dead letter uses job `seq`.
    fn release(&self, t: &mut Tables<'_>, seq: u64) -> Result<(), SpoolError> {
        let left = t.refs.get(seq)?.map_or(0, |r| r.value()).saturating_sub(1);
        if left == 0 {
            t.refs.remove(seq)?;
            if let Some(raw) = t.jobs.remove(seq)? {
                self.sub(raw.value().len());
            }
        } else {
            t.refs.insert(seq, left)?;
        }
        Ok(())
    }

    fn replay(
        &mut self,
        t: &mut Tables<'_>,
        filter: &DeadFilter,
        now_ms: u64,
    ) -> Result<Vec<(u64, Record)>, SpoolError> {
        let chosen = matching_dead(t, filter)?;
        let mut out = Vec::with_capacity(chosen.len());
        for (old_id, size, mut record) in chosen {
            if record.destination == crate::rules::UNROUTED {
                // Re-routed by the caller, with the rules in force now.
                out.push((old_id, record));
                continue;
            }
            t.dead.remove(old_id)?;
            self.sub(size);
            record.attempts = 0;
            record.first_ms = now_ms;
            record.next_ms = now_ms;
            record.dead_reason = None;
            record.dead_ms = None;
            let id = self.next_id;
            self.next_id += 1;
            let encoded = serde_json::to_vec(&record)?;
            self.add(encoded.len());
            t.deliveries.insert(id, encoded.as_slice())?;
            out.push((id, record));
        }
        Ok(out)
    }

    fn purge(
        &mut self,
        t: &mut Tables<'_>,
        filter: &DeadFilter,
    ) -> Result<Vec<Record>, SpoolError> {
        let chosen = matching_dead(t, filter)?;
        let mut out = Vec::with_capacity(chosen.len());
        for (id, size, record) in chosen {
            t.dead.remove(id)?;
            self.sub(size);
            self.release(t, record.job)?;
            out.push(record);
        }
        Ok(out)
    }

    /// Forgets job ids older than the window, a bounded number at a time
    /// (at most once a second, so it costs nothing under load).
    fn sweep(&mut self, t: &mut Tables<'_>, now: u64) -> Result<(), SpoolError> {
        if now < self.last_sweep_ms + 1000 {
            return Ok(());
        }
        self.last_sweep_ms = now;
        let cutoff = now.saturating_sub(self.window_ms);
        let mut expired: Vec<(u64, String)> = Vec::new();
        for entry in t.seen_by_age.range((0, "")..(cutoff, ""))? {
            let (key, _) = entry?;
            let (at, job_id) = key.value();
            expired.push((at, job_id.to_owned()));
            if expired.len() >= SWEEP_BATCH {
                break;
            }
        }
        for (at, job_id) in expired {
            t.seen_by_age.remove((at, job_id.as_str()))?;
            if t.seen
                .get(job_id.as_str())?
                .is_some_and(|v| v.value() == at)
            {
                t.seen.remove(job_id.as_str())?;
            }
        }
        Ok(())
    }
}

/// The dead letters `filter` selects: id, stored size and record.
fn matching_dead(
    t: &Tables<'_>,
    filter: &DeadFilter,
) -> Result<Vec<(u64, usize, Record)>, SpoolError> {
    let mut chosen = Vec::new();
    for entry in t.dead.iter()? {
        let (id, raw) = entry?;
        let record: Record = serde_json::from_slice(raw.value())?;
        if filter.matches(&record) {
            chosen.push((id.value(), raw.value().len(), record));
        }
    }
    Ok(chosen)
}

struct Tables<'txn> {
    jobs: redb::Table<'txn, u64, &'static [u8]>,
    refs: redb::Table<'txn, u64, u32>,
    deliveries: redb::Table<'txn, u64, &'static [u8]>,
    dead: redb::Table<'txn, u64, &'static [u8]>,
    seen: redb::Table<'txn, &'static str, u64>,
    seen_by_age: redb::Table<'txn, (u64, &'static str), ()>,
}
