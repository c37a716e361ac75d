//! What was accepted and is not yet delivered: the types both backends
//! share, the interface both implement, the embedded spool (one pod's own)
//! and NATS JetStream (shared by every replica).

pub mod embedded;
pub mod nats;

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use self::embedded::SpoolError;
use self::nats::NatsError;

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
    /// A destination name, or [`crate::rules::UNROUTED`]. Only the name:
    /// its URL, headers and limits are taken from the rules in force at
    /// each attempt, so fixing a destination fixes what is queued for it.
    pub destination: String,
    /// The rule that routed the job there (`X-Hookgate-Rule`, and its
    /// headers if it still exists).
    pub rule: String,
    pub attempts: u32,
    pub first_ms: u64,
    pub next_ms: u64,
    pub last_attempt_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Set once given up.
    pub dead_reason: Option<String>,
    pub dead_ms: Option<u64>,
}

/// A part of a job too long to be stored (the ingress bounds each well
/// below this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the job's {what} is {len} bytes, more than the {max} a stored job can hold")]
pub struct TooLong {
    pub what: &'static str,
    pub len: usize,
    pub max: usize,
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
    /// The stored form. Lengths are checked, never truncated: a part
    /// too long for its length field is an error, not a corrupt record.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, TooLong> {
        let sig = self.signature.as_deref().unwrap_or_default();
        let query = self.query.as_deref().unwrap_or_default();
        let fits16 = |what, len: usize| {
            u16::try_from(len).map_err(|_| TooLong {
                what,
                len,
                max: u16::MAX as usize,
            })
        };
        let id_len = fits16("job_id", self.job_id.len())?;
        let sig_len = fits16("signature", sig.len())?;
        let query_len = match &self.query {
            // u32::MAX stands for no query at all.
            Some(_) => u32::try_from(query.len())
                .ok()
                .filter(|&n| n < u32::MAX)
                .ok_or(TooLong {
                    what: "query",
                    len: query.len(),
                    max: u32::MAX as usize - 1,
                })?,
            None => u32::MAX,
        };
        let mut out =
            Vec::with_capacity(16 + self.job_id.len() + sig.len() + query.len() + self.body.len());
        out.extend_from_slice(&id_len.to_le_bytes());
        out.extend_from_slice(self.job_id.as_bytes());
        out.extend_from_slice(&sig_len.to_le_bytes());
        out.extend_from_slice(sig);
        out.extend_from_slice(&query_len.to_le_bytes());
        out.extend_from_slice(query.as_bytes());
        out.extend_from_slice(&self.accepted_ms.to_le_bytes());
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    pub(crate) fn decode(raw: &[u8]) -> Option<Self> {
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
    pub fn matches(&self, r: &Record) -> bool {
        self.destination
            .as_ref()
            .is_none_or(|d| *d == r.destination)
            && self.job_id.as_ref().is_none_or(|j| *j == r.job_id)
    }
}
/// A stored record that could not be decoded, kept aside as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quarantined {
    /// The table it was found in (`deliveries`, `dead` or `jobs`).
    pub table: String,
    pub key: u64,
    pub bytes: usize,
}

/// Why the queue did not take a webhook: the sender is told to retry.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Embedded(#[from] SpoolError),
    #[error(transparent)]
    Nats(#[from] NatsError),
}

impl QueueError {
    /// The queue holds all it may (`spool.max_bytes`): the sender should
    /// slow down. Anything else means it cannot store now.
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            QueueError::Embedded(SpoolError::Full { .. })
                | QueueError::Nats(NatsError::Full { .. })
        )
    }
}

/// What a replay did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReplayReport {
    /// Dead letters pending again for the same destination.
    pub replayed: usize,
    /// Dead letters whose jobs the rules in force routed again.
    pub rerouted: usize,
    /// Dead letters left as they were: the rules in force route their
    /// jobs nowhere.
    pub still_unrouted: usize,
}

/// Where the pipeline hands a routed job (durable once `accept`
/// returns), and what the admin API asks of the dead letters.
pub trait Queue: Send + Sync {
    /// Stores a job's deliveries (and dead letters decided at once);
    /// `Duplicate` for a job id accepted within the dedupe window.
    fn accept(&self, job: NewJob) -> BoxFuture<'_, Result<Accepted, QueueError>>;

    /// True if `job_id` is known to have been accepted within the dedupe
    /// window. Asked only when `accept` failed, which decides otherwise: a
    /// check before every accept would cost each webhook a second lookup.
    fn seen(&self, job_id: &str) -> Result<bool, QueueError>;

    /// Dead letters, oldest first, at most `limit` after id `after`.
    fn dead_letters(
        &self,
        filter: DeadFilter,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(u64, Record)>, QueueError>>;

    /// Puts matching dead letters back in the queue (or, with `reroute`,
    /// routes their jobs again).
    fn replay(
        &self,
        filter: DeadFilter,
        reroute: bool,
    ) -> BoxFuture<'_, Result<ReplayReport, QueueError>>;

    /// Deletes matching dead letters for good; how many.
    fn purge(&self, filter: DeadFilter) -> BoxFuture<'_, Result<usize, QueueError>>;

    /// Records kept aside because they could not be decoded.
    fn quarantined(&self) -> Result<Vec<Quarantined>, QueueError>;

    /// Sets the queue's gauges (on scrape).
    fn refresh_gauges(&self);

    /// Whether webhooks can be taken now; `Err` says why not (for
    /// `/readyz` and the log).
    fn ready(&self) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id_len: usize, sig_len: usize, query: Option<&str>) -> StoredJob {
        StoredJob {
            job_id: "j".repeat(id_len),
            signature: Some(Bytes::from(vec![b's'; sig_len])),
            query: query.map(str::to_owned),
            accepted_ms: 7,
            body: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn a_stored_job_encodes_whole_or_not_at_all() {
        let max = u16::MAX as usize;
        let cases = [
            (job(3, 44, Some("t=1")), None),
            (job(3, 44, None), None),
            (job(max, max, Some("")), None),
            (job(max + 1, 44, None), Some("job_id")),
            (job(3, max + 1, None), Some("signature")),
        ];
        for (stored, too_long) in cases {
            match stored.encode() {
                Ok(raw) => {
                    assert_eq!(too_long, None);
                    assert_eq!(StoredJob::decode(&raw), Some(stored));
                }
                Err(e) => assert_eq!(Some(e.what), too_long),
            }
        }
    }
}
