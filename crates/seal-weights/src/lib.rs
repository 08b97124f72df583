//! File bytes -> named f32 tensors under diffusers names: the first step of Seal's data path.
//!
//! [`WeightFile`] parses one safetensors file's header (from any [`ByteSource`]: bytes, a file
//! on disk, a browser Blob) and checks every size it claims against the file's length; tensors
//! are read one at a time when loaded.
//! [`Component`] is one model part's tensors under their diffusers names: either a diffusers
//! folder's file as it is ([`Component::from_file`]) or one part of an original-layout (LDM)
//! single-file checkpoint, split and renamed by [`split_single_file`]. [`lora`] reads and writes
//! LoRA adapter files (kohya, peft and older diffusers layouts) and stacks two into one.
//!
//! Plain Rust on purpose (no Burn): the model crate decides how tensors become parameters.

mod component;
mod dtype;
mod error;
mod file;
mod header;
mod ldm;
pub mod lora;
#[cfg(test)]
mod testutil;

pub use component::Component;
pub use dtype::DType;
pub use error::WeightError;
pub use file::{ByteSource, DiskFile, Tensor32, TensorInfo, WeightFile, safetensors_head};
pub use ldm::{SingleFile, split_single_file};

/// `../shared/fixtures` beside the repository: the one place every crate's tests find the
/// fixtures. Read at run time (the test's own crate dir): a build cache shared by clones in
/// other places must not send tests to another clone's fixtures.
#[doc(hidden)]
pub fn test_fixtures() -> std::path::PathBuf {
    std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}
