//! What was accepted and is not yet delivered: the interface both backends
//! implement, the embedded spool (one pod's own) and NATS JetStream
//! (shared by every replica).

pub mod embedded;
pub mod nats;

use futures_util::future::BoxFuture;

use self::embedded::{Accepted, NewJob, SpoolError};
use self::nats::NatsError;

/// Why the queue did not take a webhook: the sender is told to retry.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Embedded(#[from] SpoolError),
    #[error(transparent)]
    Nats(#[from] NatsError),
}

/// Where the pipeline hands a routed job: durable once `accept` returns.
pub trait Queue: Send + Sync {
    /// Stores a job's deliveries (and dead letters decided at once);
    /// `Duplicate` for a job id accepted within the dedupe window.
    fn accept(&self, job: NewJob) -> BoxFuture<'_, Result<Accepted, QueueError>>;

    /// A cheap check before routing: true if `job_id` is known to have been
    /// accepted within the dedupe window. `accept` decides in the end.
    fn seen(&self, job_id: &str) -> Result<bool, QueueError>;

    /// Whether webhooks can be taken now; `Err` says why not (for
    /// `/readyz` and the log).
    fn ready(&self) -> Result<(), String>;
}
