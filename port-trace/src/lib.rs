//! port-trace: follow every local port from allocation to release with eBPF.
//!
//! Pure logic (decoding, the lifecycle tracker, filters, formatting) lives in
//! modules with no kernel dependency; [`kernel`] is the thin part that loads
//! and attaches the programs.

#![warn(missing_docs)]

pub mod analysis;
pub mod btf;
pub mod churn;
pub mod cli;
pub mod clock;
pub mod decode;
pub mod doctor;
pub mod filter;
pub mod kernel;
pub mod live;
pub mod metrics;
pub mod model;
pub mod notices;
pub mod offsets;
pub mod output;
pub mod owner;
pub mod pipeline;
pub mod pressure;
pub mod privileges;
pub mod reader_priority;
pub mod record;
pub mod recording;
pub mod report;
pub mod system;
pub mod top;
pub mod tracker;
pub mod watch;
pub mod who;

/// A mistake in how port-trace was called: reported in one line, exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
