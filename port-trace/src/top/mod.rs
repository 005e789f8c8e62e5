//! `port-trace top`: a full-screen live view of the ports in use, their
//! lifecycles, churn and range pressure.
//!
//! [`view`] holds the state (fed by the trace loop and the keys), [`ui`]
//! draws it with ratatui, [`terminal`] owns the real terminal and the keys.

mod app;
pub mod terminal;
pub mod ui;
pub mod view;

pub use app::run;
pub use terminal::{restore_terminal, Screen};
pub use view::{Action, SortKey, Status, TopOptions, TopView};
