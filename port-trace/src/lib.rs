//! port-trace: follow every local port from allocation to release with eBPF.
//!
//! Pure logic (decoding, the lifecycle tracker, filters, formatting) lives in
//! modules with no kernel dependency; [`kernel`] is the thin part that loads
//! and attaches the programs.

#![warn(missing_docs)]

pub mod btf;
pub mod cli;
pub mod clock;
pub mod decode;
pub mod doctor;
pub mod filter;
pub mod kernel;
pub mod model;
pub mod offsets;
pub mod output;
pub mod pipeline;
pub mod privileges;
pub mod record;
pub mod system;
pub mod tracker;
pub mod watch;

/// A mistake in how port-trace was called: reported in one line, exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
