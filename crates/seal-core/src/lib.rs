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
pub mod unlearn;

pub use error::{Error, Result};

/// `../shared/fixtures` beside the repository. Read at run time: a build cache shared by
/// clones in other places must not send tests to another clone's fixtures.
#[cfg(test)]
pub(crate) fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}
