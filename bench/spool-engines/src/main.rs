//! What one webhook costs the durable spool's writer thread, engine by
//! engine, with hookgate's write pattern: in each commit (one fsync), the
//! accepts of a batch of webhooks (a ~700-byte job, a ~220-byte delivery
//! record, its job id in the dedupe index) and the completions of the batch
//! before (delivery and job removed). Job ids are random UUIDs: the dedupe
//! index's inserts land where they fall, as in production.
//!
//! `spool-engines ENGINE WEBHOOKS BATCH [IDS]`, ENGINE one of
//! - `redb-spool`: the tables hookgate's spool (format 2) writes;
//! - `redb-lean`: job and deliveries in one table keyed (job, index), the
//!   dedupe index keyed by a 128-bit hash of the id;
//! - `fjall`: an LSM tree (journal + memtables), the same records, one
//!   atomic batch and one `fdatasync` of the journal per commit.
//!
//! `IDS` job ids are put in the dedupe index first (the 24 h window at
//! production size). Prints wall time, the writer thread's CPU and the
//! process's CPU (background flushes and compactions) per webhook.

use std::path::Path;
use std::time::Instant;

const JOB: [u8; 700] = [7; 700];
const RECORD: [u8; 220] = [9; 220];

/// One commit: accept `accepts` (job sequence, job id), complete `completes`.
trait Spool {
    fn commit(&mut self, accepts: &[(u64, String)], completes: &[u64], now: u64);
}

fn cpu_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn job_id() -> String {
    let hex = |n: usize| (0..n).map(|_| fastrand::alphanumeric()).collect::<String>();
    format!("{}-{}-{}-{}-{}", hex(8), hex(4), hex(4), hex(4), hex(12))
}

mod redb_spool {
    use redb::{Database, Durability, ReadableTable, TableDefinition};
    const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
    const JOB_REFS: TableDefinition<u64, u32> = TableDefinition::new("job_refs");
    const DELIVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("deliveries");
    const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
    const SEEN_BY_AGE: TableDefinition<(u64, &str), ()> = TableDefinition::new("seen_by_age");

    pub struct Spool(pub Database);

    impl super::Spool for Spool {
        fn commit(&mut self, accepts: &[(u64, String)], completes: &[u64], now: u64) {
            let mut txn = self.0.begin_write().unwrap();
            txn.set_durability(Durability::Immediate).unwrap();
            {
                let mut jobs = txn.open_table(JOBS).unwrap();
                let mut refs = txn.open_table(JOB_REFS).unwrap();
                let mut deliveries = txn.open_table(DELIVERIES).unwrap();
                let mut seen = txn.open_table(SEEN).unwrap();
                let mut by_age = txn.open_table(SEEN_BY_AGE).unwrap();
                for (seq, id) in accepts {
                    if seen.get(id.as_str()).unwrap().is_some() {
                        continue;
                    }
                    seen.insert(id.as_str(), now).unwrap();
                    by_age.insert((now, id.as_str()), ()).unwrap();
                    jobs.insert(*seq, super::JOB.as_slice()).unwrap();
                    refs.insert(*seq, 1).unwrap();
                    deliveries.insert(*seq, super::RECORD.as_slice()).unwrap();
                }
                for seq in completes {
                    deliveries.remove(*seq).unwrap();
                    let left = refs.get(*seq).unwrap().map_or(0, |r| r.value()) - 1;
                    if left == 0 {
                        refs.remove(*seq).unwrap();
                        jobs.remove(*seq).unwrap();
                    }
                }
            }
            txn.commit().unwrap();
        }
    }
}

mod redb_lean {
    use redb::{Database, Durability, ReadableTable, TableDefinition};
    use std::hash::{Hash, Hasher};
    /// (job, 0) is the job, (job, n) its n-th delivery.
    const ITEMS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("items");
    const SEEN: TableDefinition<u128, u64> = TableDefinition::new("seen");
    const SEEN_BY_AGE: TableDefinition<(u64, u128), ()> = TableDefinition::new("seen_by_age");

    pub struct Spool(pub Database);

    fn key(id: &str) -> u128 {
        let half = |salt: u8| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (id, salt).hash(&mut h);
            h.finish() as u128
        };
        (half(0) << 64) | half(1)
    }

    impl super::Spool for Spool {
        fn commit(&mut self, accepts: &[(u64, String)], completes: &[u64], now: u64) {
            let mut txn = self.0.begin_write().unwrap();
            txn.set_durability(Durability::Immediate).unwrap();
            {
                let mut items = txn.open_table(ITEMS).unwrap();
                let mut seen = txn.open_table(SEEN).unwrap();
                let mut by_age = txn.open_table(SEEN_BY_AGE).unwrap();
                for (seq, id) in accepts {
                    let k = key(id);
                    if seen.get(k).unwrap().is_some() {
                        continue;
                    }
                    seen.insert(k, now).unwrap();
                    by_age.insert((now, k), ()).unwrap();
                    items.insert((*seq, 0), super::JOB.as_slice()).unwrap();
                    items.insert((*seq, 1), super::RECORD.as_slice()).unwrap();
                }
                for seq in completes {
                    items.remove((*seq, 1)).unwrap();
                    let more = items
                        .range((*seq, 1)..(*seq + 1, 0))
                        .unwrap()
                        .next()
                        .is_some();
                    if !more {
                        items.remove((*seq, 0)).unwrap();
                    }
                }
            }
            txn.commit().unwrap();
        }
    }
}

mod lsm {
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

    pub struct Spool {
        db: Database,
        items: Keyspace,
        seen: Keyspace,
        by_age: Keyspace,
    }

    impl Spool {
        pub fn open(dir: &std::path::Path) -> Self {
            let db = Database::builder(dir).open().unwrap();
            let keyspace = |name| db.keyspace(name, KeyspaceCreateOptions::default).unwrap();
            let (items, seen, by_age) = (keyspace("items"), keyspace("seen"), keyspace("by_age"));
            Self {
                db,
                items,
                seen,
                by_age,
            }
        }
    }

    fn item(seq: u64, index: u8) -> [u8; 9] {
        let mut k = [index; 9];
        k[..8].copy_from_slice(&seq.to_be_bytes());
        k
    }

    impl super::Spool for Spool {
        fn commit(&mut self, accepts: &[(u64, String)], completes: &[u64], now: u64) {
            let mut batch = self.db.batch();
            for (seq, id) in accepts {
                if self.seen.get(id.as_bytes()).unwrap().is_some() {
                    continue;
                }
                batch.insert(&self.seen, id.as_bytes(), now.to_be_bytes());
                let mut by_age = now.to_be_bytes().to_vec();
                by_age.extend_from_slice(id.as_bytes());
                batch.insert(&self.by_age, by_age, []);
                batch.insert(&self.items, item(*seq, 0), super::JOB);
                batch.insert(&self.items, item(*seq, 1), super::RECORD);
            }
            for seq in completes {
                batch.remove(&self.items, item(*seq, 1));
                batch.remove(&self.items, item(*seq, 0));
            }
            batch.commit().unwrap();
            self.db.persist(PersistMode::SyncData).unwrap();
        }
    }
}

fn open(engine: &str, dir: &Path) -> Box<dyn Spool> {
    match engine {
        "redb-spool" => Box::new(redb_spool::Spool(
            redb::Database::create(dir.join("spool.redb")).unwrap(),
        )),
        "redb-lean" => Box::new(redb_lean::Spool(
            redb::Database::create(dir.join("spool.redb")).unwrap(),
        )),
        "fjall" => Box::new(lsm::Spool::open(dir)),
        other => panic!("unknown engine {other}: redb-spool, redb-lean or fjall"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, engine, webhooks, batch, rest @ ..] = args.as_slice() else {
        panic!("usage: spool-engines ENGINE WEBHOOKS BATCH [IDS]");
    };
    let batch: u64 = batch.parse().unwrap();
    let webhooks = webhooks.parse::<u64>().unwrap() / batch * batch;
    let ids: u64 = rest.first().map_or(0, |n| n.parse().unwrap());
    let dir = std::env::temp_dir().join(format!("spool-engines-{engine}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut spool = open(engine, &dir);

    let (mut seq, mut now) = (0u64, 1_700_000_000_000u64);
    let mut previous: Vec<u64> = Vec::new();
    let mut run = |spool: &mut Box<dyn Spool>, ids: Vec<String>| {
        let accepts: Vec<(u64, String)> = (seq..).zip(ids).collect();
        seq += accepts.len() as u64;
        spool.commit(&accepts, &previous, now);
        previous = accepts.iter().map(|(s, _)| *s).collect();
        now += 1;
    };
    for _ in 0..ids.div_ceil(2000) {
        run(&mut spool, (0..2000).map(|_| job_id()).collect());
    }
    let measured: Vec<String> = (0..webhooks).map(|_| job_id()).collect();
    let (wall, thread, process) = (
        Instant::now(),
        cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID),
        cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID),
    );
    for chunk in measured.chunks(batch as usize) {
        run(&mut spool, chunk.to_vec());
    }
    let per = |seconds: f64| seconds / webhooks as f64 * 1e6;
    let elapsed = wall.elapsed().as_secs_f64();
    println!(
        "{engine:<10} batch {batch:>3}, {ids} ids before: {:5.1} µs writer CPU, {:5.1} µs process CPU, {:5.1} µs wall per webhook ({:.0} webhooks/s)",
        per(cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID) - thread),
        per(cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID) - process),
        per(elapsed),
        webhooks as f64 / elapsed,
    );
    drop(spool);
    let _ = std::fs::remove_dir_all(&dir);
}
