//! Seal's engine: sealing (SKD-CAG unlearning), evaluation, images and progress — the API both
//! front ends (the `seal` CLI and the page's worker) call.

pub mod eval;
pub mod export;
pub mod heatmap;
pub mod image;
pub mod probe;
pub mod progress;
pub mod prompts;
pub mod unlearn;
