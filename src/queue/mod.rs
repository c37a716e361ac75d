//! What was accepted and is not yet delivered.

pub mod embedded;
pub mod nats;
