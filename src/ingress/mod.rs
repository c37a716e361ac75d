//! The webhook port: HTTP, then one webhook through the pipeline.

pub mod pipeline;
pub mod server;
