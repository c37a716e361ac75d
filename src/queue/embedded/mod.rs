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
//! - `seen`, `seen_by_age`: job ids within the dedupe window;
//! - `quarantine`: (table, key) → the raw bytes of a record that could not
//!   be decoded, kept for inspection instead of stopping the spool;
//! - `meta`: the record format (`FORMAT`), for migrations.
//!
//! The spool never stops the gateway. A commit that fails (a full disk)
//! turns the spool *unwritable*: webhooks are refused at once, deliveries
//! go on from what is on disk, and their outcomes are kept in memory; the
//! writer reopens the file and probes it every second, and once a write
//! goes through again it saves those outcomes and takes webhooks again.
//! A file the engine cannot open, or that fails its integrity check, is
//! moved aside at start-up (`open.rs`), and a record that cannot be decoded
//! is quarantined.

mod open;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, mpsc};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::queue::{
    Accepted, DeadFilter, NewJob, Quarantined, Record, StoredJob, TooLong, unix_ms,
};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const JOB_REFS: TableDefinition<u64, u32> = TableDefinition::new("job_refs");
const DELIVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("deliveries");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
const SEEN_BY_AGE: TableDefinition<(u64, &str), ()> = TableDefinition::new("seen_by_age");
const QUARANTINE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("quarantine");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The layout of the records, under `format` in the `meta` table. 1 (no
/// entry): records carried the URL and headers resolved at accept; 2:
/// only the destination's name. A format-1 spool is rewritten at open.
const FORMAT: u64 = 2;

/// The spool file inside `spool.path`.
pub const FILE_NAME: &str = "spool.redb";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(transparent)]
    TooLong(#[from] TooLong),
    #[error("the spool is full ({used} of {limit} bytes)")]
    Full { used: u64, limit: u64 },
    #[error("spool storage error: {0}")]
    Storage(String),
    /// A commit failed (a full disk, an I/O error): nothing is written
    /// until a probe write goes through again.
    #[error("the spool cannot write ({0}); it retries by itself")]
    Unwritable(String),
    /// The file is being reopened after a failed commit.
    #[error("the spool is being reopened after a failed write")]
    Reopening,
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
    pub moved_aside: Option<MovedAside>,
    /// Set when the engine found the file damaged and rolled it back to
    /// its last intact commit.
    pub repaired: bool,
    /// Records quarantined at this start because they could not be decoded.
    pub quarantined: Vec<Quarantined>,
    /// Records rewritten at this start from an older format.
    pub migrated: u64,
}

/// A spool file that could not be used, and where it went.
#[derive(Debug, Clone)]
pub struct MovedAside {
    pub path: PathBuf,
    pub bytes: u64,
    pub reason: String,
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
        reroute: bool,
        now_ms: u64,
        reply: oneshot::Sender<Result<Vec<Replayed>, SpoolError>>,
    },
    Purge {
        filter: DeadFilter,
        reply: oneshot::Sender<Result<Vec<Record>, SpoolError>>,
    },
    Reroute {
        dead_ids: Vec<u64>,
        job: u64,
        records: Vec<Record>,
        reply: oneshot::Sender<Result<Stored, SpoolError>>,
    },
    /// Nothing to write: answered once what was sent before it is
    /// committed (see [`Spool::settled`]).
    Settle {
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// A write that proves the spool can write again (see the writer).
    Probe,
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

/// A dead letter a replay took up.
#[derive(Debug)]
pub enum Replayed {
    /// Pending again, under a new id.
    Pending(u64, Record),
    /// Left in place for the caller to route again: its id and record.
    ToRoute(u64, Record),
}

/// Records stored for a job: pending with their ids, and dead letters.
type Stored = (Vec<(u64, Record)>, Vec<Record>);

/// What the spool's own health looks like to an operator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// False from a failed commit until a probe write goes through.
    pub writable: bool,
    /// Failures since start, by what failed.
    pub open_errors: u64,
    pub commit_errors: u64,
    pub read_errors: u64,
    /// Records in quarantine.
    pub quarantined: u64,
}

/// What the writer and the readers share: the open database (absent while
/// it is being reopened) and the spool's health.
struct Shared {
    path: PathBuf,
    db: RwLock<Option<Arc<Database>>>,
    writable: AtomicBool,
    bytes: AtomicU64,
    open_errors: AtomicU64,
    commit_errors: AtomicU64,
    read_errors: AtomicU64,
    quarantined: AtomicU64,
    /// Why writes fail, while they do.
    cause: std::sync::Mutex<String>,
}

impl Shared {
    fn cause(&self) -> String {
        self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_cause(&self, cause: String) {
        *self.cause.lock().unwrap_or_else(|p| p.into_inner()) = cause;
    }

    /// The database for one read; counts a failure to get it.
    fn db(&self) -> Result<Arc<Database>, SpoolError> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner()).clone();
        db.ok_or_else(|| {
            self.read_errors.fetch_add(1, Ordering::Relaxed);
            SpoolError::Reopening
        })
    }

    fn publish(&self, db: Option<Arc<Database>>) {
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = db;
    }

    /// Runs a read, counting its failure; a panic inside the storage
    /// engine becomes an error, not the end of the process.
    fn read<T>(
        &self,
        read: impl FnOnce(&Database) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        let db = self.db()?;
        let result = contain(|| read(&db)).and_then(|r| r);
        if result.is_err() {
            self.read_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

/// Runs `f`, turning a panic inside it into an error. The storage engine
/// is the one part of the gateway that reads bytes it does not control (a
/// file damaged on disk) in ways that may panic; the release profile
/// unwinds so that this holds there too.
fn contain<T>(f: impl FnOnce() -> T) -> Result<T, SpoolError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        SpoolError::Storage(format!("the storage engine panicked: {message}"))
    })
}

pub struct Spool {
    shared: Arc<Shared>,
    ops: mpsc::Sender<Op>,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    max_bytes: u64,
    window: Duration,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. A file that is damaged is
    /// moved aside and an empty spool started, and undecodable records are
    /// quarantined, so the gateway never crash-loops on its spool; the
    /// caller logs both loudly.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        window: Duration,
    ) -> Result<(Self, Recovered), OpenError> {
        let opened = open::open(dir)?;
        let path = dir.join(FILE_NAME);
        let db = Arc::new(opened.db);
        let shared = Arc::new(Shared {
            path: path.clone(),
            db: RwLock::new(Some(db.clone())),
            writable: AtomicBool::new(true),
            bytes: AtomicU64::new(opened.bytes),
            open_errors: AtomicU64::new(u64::from(opened.recovered.moved_aside.is_some())),
            commit_errors: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            quarantined: AtomicU64::new(opened.quarantined),
            cause: std::sync::Mutex::new(String::new()),
        });
        let (tx, rx) = mpsc::channel();
        let mut writer = writer::Writer::new(
            shared.clone(),
            db,
            opened.next_id,
            opened.next_job,
            window.as_millis() as u64,
        );
        let handle = std::thread::Builder::new()
            .name("hookgate-spool".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OpenError::Open {
                path,
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok((
            Self {
                shared,
                ops: tx,
                writer: std::sync::Mutex::new(Some(handle)),
                max_bytes,
                window,
            },
            opened.recovered,
        ))
    }

    /// False from a failed commit until a write goes through again.
    pub fn is_healthy(&self) -> bool {
        self.shared.writable.load(Ordering::Relaxed)
    }

    pub fn health(&self) -> Health {
        let s = &self.shared;
        Health {
            writable: s.writable.load(Ordering::Relaxed),
            open_errors: s.open_errors.load(Ordering::Relaxed),
            commit_errors: s.commit_errors.load(Ordering::Relaxed),
            read_errors: s.read_errors.load(Ordering::Relaxed),
            quarantined: s.quarantined.load(Ordering::Relaxed),
        }
    }

    /// Logical bytes in use: stored jobs and records.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// A cheap read-only check, before routing: true if `job_id` was
    /// accepted within the dedupe window. [`Spool::accept`] checks again
    /// inside its transaction.
    pub fn seen(&self, job_id: &str) -> Result<bool, SpoolError> {
        let cutoff = unix_ms().saturating_sub(self.window.as_millis() as u64);
        self.shared.read(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(SEEN)?;
            Ok(table.get(job_id)?.is_some_and(|at| at.value() >= cutoff))
        })
    }

    /// Stores a job durably; returns once the commit holding it is on disk.
    pub async fn accept(&self, job: NewJob) -> Result<Accepted, SpoolError> {
        if !self.is_healthy() {
            return Err(SpoolError::Unwritable(self.shared.cause()));
        }
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
        self.shared.read(|db| {
            // Records of other destinations are skipped, a bounded number
            // per call, so one call never scans a whole long queue.
            let mut budget = limit.saturating_mul(16).max(1024);
            let txn = db.begin_read()?;
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
                back.last = id.value();
                // Undecodable records were quarantined at start-up.
                let Ok(record) = serde_json::from_slice::<Record>(raw.value()) else {
                    continue;
                };
                if record.destination == destination {
                    back.found.push((id.value(), record));
                }
            }
            Ok(back)
        })
    }

    /// The record of a pending delivery and its job (`None` when the job
    /// was quarantined as undecodable); `None` if the delivery is gone
    /// (delivered, or purged by an operator).
    pub fn load(&self, id: u64) -> Result<Option<(Record, Option<StoredJob>)>, SpoolError> {
        self.shared.read(|db| {
            let txn = db.begin_read()?;
            let deliveries = txn.open_table(DELIVERIES)?;
            let Some(raw) = deliveries.get(id)? else {
                return Ok(None);
            };
            let record: Record = serde_json::from_slice(raw.value())?;
            let jobs = txn.open_table(JOBS)?;
            let job = jobs
                .get(record.job)?
                .and_then(|raw| StoredJob::decode(raw.value()));
            Ok(Some((record, job)))
        })
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
    /// unused). Kept in memory until written if the spool cannot write.
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

    /// Returns once everything sent to the spool before this call is
    /// committed, or has failed to be: a read after it sees, for example,
    /// every dead letter already counted.
    pub async fn settled(&self) -> Result<(), SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Settle { reply })?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Dead letters, oldest first, at most `limit` after id `after`.
    pub fn dead_letters(
        &self,
        filter: &DeadFilter,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, SpoolError> {
        self.shared.read(|db| {
            let txn = db.begin_read()?;
            let dead = txn.open_table(DEAD)?;
            let start = after.map_or(0, |a| a.saturating_add(1));
            let mut out = Vec::new();
            for entry in dead.range(start..)? {
                let (id, raw) = entry?;
                let Ok(record) = serde_json::from_slice::<Record>(raw.value()) else {
                    continue;
                };
                if filter.matches(&record) {
                    out.push((id.value(), record));
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
    }

    /// The records kept aside because they could not be decoded.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, SpoolError> {
        self.shared.read(|db| {
            let txn = db.begin_read()?;
            let mut out = Vec::new();
            for entry in txn.open_table(QUARANTINE)?.iter()? {
                let (key, raw) = entry?;
                let (table, key) = key.value();
                out.push(Quarantined {
                    table: table.to_owned(),
                    key,
                    bytes: raw.value().len(),
                });
            }
            Ok(out)
        })
    }

    /// Moves matching dead letters back to pending, to the same
    /// destination, with fresh attempts and new ids. Unrouted ones, and
    /// all of them with `reroute`, are returned as they are (their ids
    /// those of the dead letters), for routing again.
    pub async fn replay(
        &self,
        filter: DeadFilter,
        reroute: bool,
    ) -> Result<Vec<Replayed>, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Replay {
            filter,
            reroute,
            now_ms: unix_ms(),
            reply,
        })?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// The stored job `seq` (re-routing an unrouted dead letter reads it).
    pub fn job(&self, seq: u64) -> Result<Option<StoredJob>, SpoolError> {
        self.shared.read(|db| {
            let txn = db.begin_read()?;
            let jobs = txn.open_table(JOBS)?;
            Ok(jobs
                .get(seq)?
                .and_then(|raw| StoredJob::decode(raw.value())))
        })
    }

    /// Replaces the dead letters `dead_ids` of job `job` by `records` (the
    /// job routed again). Dead letters replayed or purged meanwhile are
    /// skipped; if none is left, nothing is stored.
    pub async fn reroute(
        &self,
        dead_ids: Vec<u64>,
        job: u64,
        records: Vec<Record>,
    ) -> Result<Stored, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Reroute {
            dead_ids,
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
        // The file lock goes with the last handle.
        self.shared.publish(None);
    }

    fn send(&self, op: Op) -> Result<(), SpoolError> {
        self.ops.send(op).map_err(|_| SpoolError::Closed)
    }
}
