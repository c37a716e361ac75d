//! What arrived: the signature, the moderation result, the query.

pub mod job;
pub mod query;
pub mod verify;
