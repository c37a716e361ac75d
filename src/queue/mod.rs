//! What was accepted and is not yet delivered: the interface both backends
//! implement, the embedded spool (one pod's own) and NATS JetStream
//! (shared by every replica).

pub mod embedded;
pub mod nats;

use futures_util::future::BoxFuture;

use self::embedded::{Accepted, DeadFilter, NewJob, Quarantined, Record, SpoolError};
use self::nats::NatsError;

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
