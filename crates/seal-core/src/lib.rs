//! Seal's engine: sealing (SKD-CAG unlearning), evaluation, images and progress — the API both
//! front ends (the `seal` CLI and the page's worker) call.

pub mod backdoor;
pub mod error;
pub mod eval;
pub mod export;
pub mod heatmap;
pub mod image;
pub mod linalg;
pub mod probe;
pub mod progress;
pub mod prompts;
pub mod scan;
pub mod session;
pub mod settings;
pub mod unlearn;

pub use error::{Error, Result};

#[cfg(test)]
pub(crate) use seal_sd::seal_weights::test_fixtures as fixtures;
