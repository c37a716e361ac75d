//! Opening the spool file: what is damaged is moved aside, what cannot be
//! decoded is quarantined, and the rest is read back.
//!
//! A damaged file is found in three ways: the engine refuses it, its
//! integrity check (every page's checksum) fails beyond repair, or the
//! engine panics on it (caught by [`contain`]). In each case the file is
//! renamed `spool.redb.damaged-<unix ms>` and an empty spool starts: the
//! gateway never crash-loops on its own spool. Failures of the system
//! rather than of the file (permissions, a full disk, a second process
//! holding the lock) are not damage: they are returned, and the file is
//! left alone.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::{
    DEAD, DELIVERIES, FILE_NAME, FORMAT, HELD_PER_DESTINATION, JOB_REFS, JOBS, META, MovedAside,
    OnDisk, OpenError, QUARANTINE, Quarantined, Record, Recovered, SEEN, SEEN_BY_AGE, StoredJob,
    contain, unix_ms,
};

/// Page cache: the spool is read once per attempt, so a small cache keeps
/// memory flat however much is queued.
const CACHE_BYTES: usize = 16 << 20;

/// A spool read back at start-up, ready for the writer.
pub(super) struct Opened {
    pub db: Database,
    pub recovered: Recovered,
    pub bytes: u64,
    pub next_id: u64,
    pub next_job: u64,
    /// Records in quarantine, from this start and earlier ones.
    pub quarantined: u64,
}

/// Why a file could not be used.
enum Failure {
    /// The file itself: moved aside.
    Damaged(String),
    /// The system: left alone, and start-up fails with it.
    System(String),
}

/// Opens (or creates) the spool file in `dir`; a damaged file is moved
/// aside and an empty spool started in its place.
pub(super) fn open(dir: &Path) -> Result<Opened, OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join(FILE_NAME);
    let open_error = |message: String| OpenError::Open {
        path: path.clone(),
        message,
    };
    let reason = match open_checked(&path) {
        Ok(opened) => return Ok(opened),
        Err(Failure::System(message)) => return Err(open_error(message)),
        Err(Failure::Damaged(reason)) => reason,
    };
    let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
    let aside = dir.join(format!("{FILE_NAME}.damaged-{}", unix_ms()));
    std::fs::rename(&path, &aside)
        .map_err(|e| open_error(format!("{reason}; moving it aside failed: {e}")))?;
    let mut opened = open_checked(&path).map_err(|f| match f {
        Failure::Damaged(m) | Failure::System(m) => open_error(m),
    })?;
    opened.recovered.moved_aside = Some(MovedAside {
        path: aside,
        bytes,
        reason,
    });
    Ok(opened)
}

/// What reopening the file after a failed commit gave.
pub(super) enum Reopen {
    Open(Database),
    /// A reader still holds the previous handle, and with it the lock.
    Busy,
    Failed(String),
}

/// Opens a database on `path` for the writer to use again after a failed
/// commit: no integrity check (the file was fine a moment ago) and nothing
/// read back (what is pending is still held in memory).
pub(super) fn reopen(path: &Path) -> Reopen {
    match contain(|| builder().create(path)) {
        Ok(Ok(db)) => Reopen::Open(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Reopen::Busy,
        Ok(Err(e)) => Reopen::Failed(e.to_string()),
        Err(panic) => Reopen::Failed(panic.to_string()),
    }
}

fn builder() -> redb::Builder {
    let mut b = Database::builder();
    b.set_cache_size(CACHE_BYTES);
    b
}

fn open_checked(path: &Path) -> Result<Opened, Failure> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Err(Failure::Damaged("the file is empty (0 bytes)".into()));
    }
    let opened = contain(|| {
        let mut db = builder().create(path).map_err(classify)?;
        // Ok(false): damaged, and rolled back to the last intact commit.
        let repaired = !db.check_integrity().map_err(classify)?;
        let migrated = migrate(&db)?;
        let read = recover(&db).map_err(classify)?;
        Ok(Opened {
            db,
            recovered: Recovered {
                repaired,
                migrated,
                ..read.0
            },
            bytes: read.1,
            next_id: read.2,
            next_job: read.3,
            quarantined: read.4,
        })
    });
    opened.unwrap_or_else(|panic| Err(Failure::Damaged(panic.to_string())))
}

/// Which failures are the file's, and which the system's.
fn classify(e: impl Into<redb::Error>) -> Failure {
    use redb::Error as E;
    let e: redb::Error = e.into();
    let message = e.to_string();
    match &e {
        E::Io(io)
            if !matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            Failure::System(message)
        }
        E::DatabaseAlreadyOpen
        | E::LockProtocolMismatch
        | E::PreviousIo
        | E::Backend(_)
        | E::WouldBlock
        | E::DatabaseClosed
        | E::LockPoisoned(_) => Failure::System(message),
        _ => Failure::Damaged(message),
    }
}

/// Records rewritten per transaction while migrating: a large spool is
/// migrated in steps, each committed, never held in memory whole.
const MIGRATE_STEP: usize = 10_000;

/// Brings the records to [`FORMAT`]; returns how many were rewritten. A
/// format-1 record carries `url` and `headers`, which decoding ignores:
/// encoding it again drops them. Interrupted, it starts over harmlessly
/// (a rewritten record encodes to itself). Records that do not decode are
/// left for [`recover`] to quarantine. A spool from a newer release is
/// refused, not rewritten, and left alone.
fn migrate(db: &Database) -> Result<u64, Failure> {
    let format = {
        let txn = db.begin_write().map_err(classify)?;
        let format = txn
            .open_table(META)
            .map_err(classify)?
            .get("format")
            .map_err(classify)?
            .map(|v| v.value());
        txn.commit().map_err(classify)?;
        format
    };
    match format {
        Some(FORMAT) => return Ok(0),
        Some(newer) if newer > FORMAT => {
            return Err(Failure::System(format!(
                "the spool has format {newer}, written by a newer release; this one reads up to \
                 format {FORMAT}. Run the newer release, or move the file away to start empty"
            )));
        }
        _ => {}
    }
    let mut migrated = 0;
    for table in [DELIVERIES, DEAD] {
        let mut after = 0;
        loop {
            let (rewritten, last) = migrate_step(db, table, after).map_err(classify)?;
            migrated += rewritten;
            match last {
                Some(last) => after = last,
                None => break,
            }
        }
    }
    let txn = db.begin_write().map_err(classify)?;
    txn.open_table(META)
        .map_err(classify)?
        .insert("format", FORMAT)
        .map_err(classify)?;
    txn.commit().map_err(classify)?;
    Ok(migrated)
}

/// Rewrites up to [`MIGRATE_STEP`] records of `table` with keys from
/// `after`: how many it rewrote, and the last key looked at if there may
/// be more.
fn migrate_step(
    db: &Database,
    table: redb::TableDefinition<u64, &[u8]>,
    after: u64,
) -> Result<(u64, Option<u64>), redb::Error> {
    let txn = db.begin_write()?;
    let mut rewritten = 0;
    let last;
    {
        let mut records = txn.open_table(table)?;
        let mut step = Vec::new();
        for entry in records.range(after..)? {
            let (id, raw) = entry?;
            if let Ok(record) = serde_json::from_slice::<Record>(raw.value()) {
                if let Ok(encoded) = serde_json::to_vec(&record) {
                    if encoded != raw.value() {
                        step.push((id.value(), encoded));
                    }
                }
            }
            if step.len() >= MIGRATE_STEP {
                break;
            }
        }
        last = step
            .last()
            .map(|(id, _)| id + 1)
            .filter(|_| step.len() >= MIGRATE_STEP);
        for (id, encoded) in &step {
            records.insert(*id, encoded.as_slice())?;
        }
        rewritten += step.len() as u64;
    }
    txn.commit()?;
    Ok((rewritten, last))
}

/// What [`recover`] reads: the recovered state, the bytes in use, the next
/// free delivery id and job sequence, the records in quarantine.
type Read = (Recovered, u64, u64, u64, u64);

/// A record found undecodable: its table, key and bytes.
type Undecodable = (&'static str, u64, Vec<u8>);

/// Reads what the spool holds, in one pass: pending deliveries, dead letter
/// counts, the bytes in use and the next free ids. Records that cannot be
/// decoded are then moved to the quarantine table.
fn recover(db: &Database) -> Result<Read, redb::Error> {
    let txn = db.begin_write()?;
    // Create every table, so that readers never meet a missing one.
    {
        txn.open_table(JOBS)?;
        txn.open_table(JOB_REFS)?;
        txn.open_table(DELIVERIES)?;
        txn.open_table(DEAD)?;
        txn.open_table(SEEN)?;
        txn.open_table(SEEN_BY_AGE)?;
        txn.open_table(QUARANTINE)?;
        txn.open_table(META)?;
    }
    txn.commit()?;
    let txn = db.begin_read()?;
    let mut recovered = Recovered::default();
    let mut undecodable: Vec<Undecodable> = Vec::new();
    let mut bytes = 0;
    let mut next_id = 1;
    let mut next_job = 1;
    let mut held: HashMap<String, usize> = HashMap::new();
    for entry in txn.open_table(DELIVERIES)?.iter()? {
        let (id, raw) = entry?;
        let id = id.value();
        next_id = next_id.max(id + 1);
        let Ok(record) = serde_json::from_slice::<Record>(raw.value()) else {
            undecodable.push(("deliveries", id, raw.value().to_vec()));
            continue;
        };
        bytes += raw.value().len() as u64;
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
        next_id = next_id.max(id.value() + 1);
        let Ok(record) = serde_json::from_slice::<Record>(raw.value()) else {
            undecodable.push(("dead", id.value(), raw.value().to_vec()));
            continue;
        };
        bytes += raw.value().len() as u64;
        *recovered
            .dead_by_destination
            .entry(record.destination)
            .or_default() += 1;
    }
    for entry in txn.open_table(JOBS)?.iter()? {
        let (seq, raw) = entry?;
        next_job = next_job.max(seq.value() + 1);
        if StoredJob::decode(raw.value()).is_none() {
            undecodable.push(("jobs", seq.value(), raw.value().to_vec()));
            continue;
        }
        bytes += raw.value().len() as u64;
    }
    let mut in_quarantine = undecodable.len() as u64;
    for entry in txn.open_table(QUARANTINE)?.iter()? {
        let (key, _) = entry?;
        // Quarantined keys are never handed out again: a new job must not
        // take the sequence of one whose deliveries are still stored.
        let (table, key) = key.value();
        if table == "jobs" {
            next_job = next_job.max(key + 1);
        } else {
            next_id = next_id.max(key + 1);
        }
        in_quarantine += 1;
    }
    drop(txn);
    recovered.quarantined = quarantine(db, undecodable)?;
    Ok((recovered, bytes, next_id, next_job, in_quarantine))
}

/// Moves undecodable records, as they were, into the quarantine table.
fn quarantine(db: &Database, found: Vec<Undecodable>) -> Result<Vec<Quarantined>, redb::Error> {
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let txn = db.begin_write()?;
    {
        let mut quarantine = txn.open_table(QUARANTINE)?;
        let mut deliveries = txn.open_table(DELIVERIES)?;
        let mut dead = txn.open_table(DEAD)?;
        let mut jobs = txn.open_table(JOBS)?;
        for (table, key, raw) in &found {
            quarantine.insert((*table, *key), raw.as_slice())?;
            match *table {
                "deliveries" => deliveries.remove(*key)?,
                "dead" => dead.remove(*key)?,
                _ => jobs.remove(*key)?,
            };
        }
    }
    txn.commit()?;
    Ok(found
        .into_iter()
        .map(|(table, key, raw)| Quarantined {
            table: table.to_owned(),
            key,
            bytes: raw.len(),
        })
        .collect())
}
