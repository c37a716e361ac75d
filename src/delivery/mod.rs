//! Getting a job to a destination: the lanes that take deliveries from the
//! queue, one attempt, when to retry, and the HTTP client.

pub mod attempt;
pub mod backoff;
pub mod client;
pub mod follow;
pub(crate) mod lane;
pub mod lanes;
pub mod origins;
pub mod pull;
pub mod schedule;
