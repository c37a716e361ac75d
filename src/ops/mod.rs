//! The operator's port and the live rules.

pub mod admin;
pub mod reload;
