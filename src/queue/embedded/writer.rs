//! The spool's one writer: group commit, and what it does when a commit
//! fails.
//!
//! Every write goes through this thread, which drains whatever is queued
//! into one write transaction and commits it with an fsync: concurrent
//! webhooks share a commit, so throughput is not one fsync per request.
//!
//! When a commit fails (a full disk, an I/O error) the engine must be
//! reopened before it is used again. The writer then turns *failing*:
//! every op that waits for an answer gets one at once (webhooks a 503,
//! never a hang), the outcomes of deliveries (done, dead letter) are kept
//! in memory, and a fresh handle lets deliveries go on reading. Once a
//! second it probes with a real write of [`PROBE_BYTES`]; the first that
//! goes through saves the kept outcomes, and the spool takes webhooks
//! again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::open::{Reopen, reopen};
use super::{
    Accepted, DEAD, DELIVERIES, DeadFilter, JOB_REFS, JOBS, NewJob, Op, Record, Replayed, SEEN,
    SEEN_BY_AGE, Shared, SpoolError, Stored, contain, unix_ms,
};

/// Operations merged into one transaction at most.
const MAX_BATCH: usize = 4096;
/// Expired dedupe entries removed per transaction at most.
const SWEEP_BATCH: usize = 1024;
/// How often a failing spool tries a write again.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How much a probe writes: about what a few webhooks need.
const PROBE_BYTES: usize = 64 * 1024;
/// How often a spool that stays unwritable says so again.
const REMIND_EVERY: Duration = Duration::from_secs(30);
const PROBE: TableDefinition<(), &[u8]> = TableDefinition::new("probe");

pub(super) struct Writer {
    shared: Arc<Shared>,
    /// `None` while the engine must be reopened.
    db: Option<Arc<Database>>,
    next_id: u64,
    next_job: u64,
    window_ms: u64,
    last_sweep_ms: u64,
    failing: Option<Failing>,
    /// Outcomes of deliveries whose commit failed, saved by the first
    /// write that goes through: forgetting them would deliver again.
    unsaved: VecDeque<Op>,
}

/// Since when writes fail, and when to try again.
struct Failing {
    since: Instant,
    next_probe: Instant,
    reminded: Instant,
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
            Err(e) => Err(SpoolError::Unwritable(e.to_string())),
        };
        // A requester that went away (its connection closed) is not an error.
        let _ = tx.send(result);
    })
}

impl Op {
    /// A copy of a delivery's outcome, kept in case its commit fails.
    fn outcome(&self) -> Option<Op> {
        match self {
            Op::Complete { id, job } => Some(Op::Complete { id: *id, job: *job }),
            Op::Bury { id, record } => Some(Op::Bury {
                id: *id,
                record: record.clone(),
            }),
            _ => None,
        }
    }

    /// Answers an op that cannot be written now; outcomes are kept.
    fn refuse(self, cause: &str, unsaved: &mut VecDeque<Op>) {
        let error = || SpoolError::Unwritable(cause.to_owned());
        // Requesters that went away are not an error.
        match self {
            Op::Accept { reply, .. } => drop(reply.send(Err(error()))),
            Op::Update { reply, .. } => drop(reply.send(Err(error()))),
            Op::Replay { reply, .. } => drop(reply.send(Err(error()))),
            Op::Purge { reply, .. } => drop(reply.send(Err(error()))),
            Op::Reroute { reply, .. } => drop(reply.send(Err(error()))),
            Op::Settle { reply } => drop(reply.send(Err(error()))),
            outcome @ (Op::Complete { .. } | Op::Bury { .. }) => unsaved.push_back(outcome),
            Op::Probe | Op::Close => {}
        }
    }
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        db: Arc<Database>,
        next_id: u64,
        next_job: u64,
        window_ms: u64,
    ) -> Self {
        Self {
            shared,
            db: Some(db),
            next_id,
            next_job,
            window_ms,
            last_sweep_ms: 0,
            failing: None,
            unsaved: VecDeque::new(),
        }
    }

    pub(super) fn run(&mut self, rx: Receiver<Op>) {
        let mut batch = VecDeque::new();
        loop {
            let probe_at = self.failing.as_ref().map(|f| f.next_probe);
            if probe_at.is_some_and(|at| at <= Instant::now()) {
                self.probe();
                continue;
            }
            let first = match probe_at {
                None => rx.recv().ok(),
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => None,
                },
            };
            // Every sender is gone: the spool was dropped without close.
            let Some(first) = first else { return };
            let mut closing = matches!(first, Op::Close);
            batch.push_back(first);
            while !closing && batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => {
                        closing |= matches!(op, Op::Close);
                        batch.push_back(op);
                    }
                    Err(_) => break,
                }
            }
            if closing && self.failing.is_some() {
                // A last chance to save what was delivered.
                self.probe();
            }
            match (&self.failing, self.db.clone()) {
                (None, Some(db)) => self.commit(db, &mut batch),
                _ => self.refuse_all(&mut batch),
            }
            if closing {
                if !self.unsaved.is_empty() {
                    tracing::error!(
                        unsaved = self.unsaved.len(),
                        "closing the spool while it cannot write: these deliveries were made \
                         but not recorded, and will be made again after the restart"
                    );
                }
                return;
            }
        }
    }

    /// Answers every op of `batch` with the failure; outcomes are kept.
    fn refuse_all(&mut self, batch: &mut VecDeque<Op>) {
        let cause = self.shared.cause();
        for op in batch.drain(..) {
            op.refuse(&cause, &mut self.unsaved);
        }
    }

    fn commit(&mut self, db: Arc<Database>, batch: &mut VecDeque<Op>) {
        let before = (
            self.next_id,
            self.next_job,
            self.shared.bytes.load(Ordering::Relaxed),
        );
        let outcomes: Vec<Op> = batch.iter().filter_map(Op::outcome).collect();
        let mut replies = Vec::with_capacity(batch.len());
        let result = contain(|| self.apply(&db, batch, &mut replies)).and_then(|r| r);
        // The engine's file lock goes with the last handle: ours must not
        // hold it while [`Writer::fail`] reopens the file.
        drop(db);
        if let Err(e) = &result {
            // Nothing of the batch is on disk: ids and accounting roll back.
            (self.next_id, self.next_job) = (before.0, before.1);
            self.shared.bytes.store(before.2, Ordering::Relaxed);
            self.unsaved.extend(outcomes);
            self.fail(e);
            // What the failed transaction did not reach: its outcomes are
            // kept already.
            batch.retain(|op| op.outcome().is_none());
            self.refuse_all(batch);
        }
        for send in replies {
            send(result.as_ref().map(|_| ()));
        }
    }

    /// A commit failed: refuse writes, reopen for the readers, probe.
    fn fail(&mut self, error: &SpoolError) {
        self.shared.commit_errors.fetch_add(1, Ordering::Relaxed);
        self.shared.set_cause(error.to_string());
        self.shared.writable.store(false, Ordering::Relaxed);
        let now = Instant::now();
        match &mut self.failing {
            None => {
                tracing::error!(
                    path = %self.shared.path.display(),
                    "the spool cannot write: {error}. Webhooks are refused with 503 and \
                     Retry-After until a write goes through again (tried every second); \
                     deliveries go on from what is on disk"
                );
                self.failing = Some(Failing {
                    since: now,
                    next_probe: now + PROBE_EVERY,
                    reminded: now,
                });
            }
            Some(failing) => {
                failing.next_probe = now + PROBE_EVERY;
                if now.duration_since(failing.reminded) >= REMIND_EVERY {
                    failing.reminded = now;
                    tracing::error!(
                        for_seconds = now.duration_since(failing.since).as_secs(),
                        unsaved = self.unsaved.len(),
                        "the spool still cannot write: {error}"
                    );
                }
            }
        }
        // The engine refuses every use after an I/O error until it is
        // reopened; readers see `Reopening` meanwhile.
        self.db = None;
        self.shared.publish(None);
        self.reopen();
    }

    /// Opens the file again. Readers still holding the old handle keep it
    /// locked for a moment: wait for them, briefly.
    fn reopen(&mut self) {
        for _ in 0..100 {
            match reopen(&self.shared.path) {
                Reopen::Open(db) => {
                    let db = Arc::new(db);
                    self.shared.publish(Some(db.clone()));
                    self.db = Some(db);
                    return;
                }
                Reopen::Busy => std::thread::sleep(Duration::from_millis(10)),
                Reopen::Failed(e) => {
                    self.shared.open_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("reopening the spool failed: {e}");
                    return;
                }
            }
        }
    }

    /// Tries a real write, with the outcomes kept meanwhile. While the
    /// file system says there is no room, it does not: a failed write
    /// costs a reopen, and reopening a large file after a failed commit
    /// means the engine checks it whole.
    fn probe(&mut self) {
        if let Some(failing) = &mut self.failing {
            failing.next_probe = Instant::now() + PROBE_EVERY;
        }
        if self.db.is_some() && !self.has_room() {
            return;
        }
        if self.db.is_none() {
            self.reopen();
        }
        let mut batch = std::mem::take(&mut self.unsaved);
        let kept: VecDeque<Op> = batch.iter().filter_map(Op::outcome).collect();
        let saved = batch.len();
        let bytes = self.shared.bytes.load(Ordering::Relaxed);
        batch.push_back(Op::Probe);
        let result = match self.db.clone() {
            Some(db) => contain(|| self.apply(&db, &mut batch, &mut Vec::new())).and_then(|r| r),
            None => Err(SpoolError::Reopening),
        };
        match result {
            Ok(()) => {
                let since = self.failing.take().map(|f| f.since.elapsed());
                self.shared.writable.store(true, Ordering::Relaxed);
                tracing::info!(
                    after = ?since.unwrap_or_default(),
                    saved,
                    "the spool writes again: webhooks are accepted"
                );
            }
            Err(e) => {
                // Nothing was written: the accounting of what was tried
                // rolls back.
                self.shared.bytes.store(bytes, Ordering::Relaxed);
                self.unsaved = kept;
                self.fail(&e);
            }
        }
    }

    /// False when the file system holding the spool has less free space
    /// than a probe needs; true when it has, or cannot say.
    fn has_room(&self) -> bool {
        let dir = self.shared.path.parent().unwrap_or(&self.shared.path);
        rustix::fs::statvfs(dir).map_or(true, |fs| {
            fs.f_bavail.saturating_mul(fs.f_frsize) >= 4 * PROBE_BYTES as u64
        })
    }

    /// Applies `batch` in one transaction and commits it. Ops it did not
    /// reach before an error stay in `batch`.
    fn apply(
        &mut self,
        db: &Database,
        batch: &mut VecDeque<Op>,
        replies: &mut Vec<Reply>,
    ) -> Result<(), SpoolError> {
        let mut txn = db.begin_write()?;
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
            while let Some(op) = batch.pop_front() {
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
                        reroute,
                        now_ms,
                        reply: tx,
                    } => {
                        let result = self.replay(&mut t, &filter, reroute, now_ms);
                        replies.push(reply(tx, result));
                    }
                    Op::Purge { filter, reply: tx } => {
                        let result = self.purge(&mut t, &filter);
                        replies.push(reply(tx, result));
                    }
                    Op::Reroute {
                        dead_ids,
                        job,
                        records,
                        reply: tx,
                    } => {
                        let result = self.reroute(&mut t, &dead_ids, job, records);
                        replies.push(reply(tx, result));
                    }
                    Op::Settle { reply: tx } => replies.push(reply(tx, Ok(()))),
                    Op::Probe => {
                        // Rewritten whole each time: the commit must find
                        // room for new pages, as an accept would.
                        txn.open_table(PROBE)?
                            .insert((), [0xA5u8; PROBE_BYTES].as_slice())?;
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
        self.shared.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        // Saturating: accounting is an estimate and must never wrap.
        let _ = self
            .shared
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
        // Before anything is written: a job that cannot be stored is not
        // marked seen either.
        let encoded = job.job.encode()?;
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
        dead_ids: &[u64],
        seq: u64,
        records: Vec<Record>,
    ) -> Result<Stored, SpoolError> {
        let mut removed = 0;
        for &id in dead_ids {
            // Gone if replayed or purged meanwhile.
            if let Some(raw) = t.dead.remove(id)? {
                self.sub(raw.value().len());
                removed += 1;
            }
        }
        if removed == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        // One of the dead letters' references passes to the new records
        // (through `store`), the others are released.
        for _ in 1..removed {
            self.release(t, seq)?;
        }
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
        reroute: bool,
        now_ms: u64,
    ) -> Result<Vec<Replayed>, SpoolError> {
        let chosen = matching_dead(t, filter)?;
        let mut out = Vec::with_capacity(chosen.len());
        for (old_id, size, mut record) in chosen {
            if reroute || record.destination == crate::rules::UNROUTED {
                // Routed again by the caller, with the rules in force now.
                out.push(Replayed::ToRoute(old_id, record));
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
            out.push(Replayed::Pending(id, record));
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
