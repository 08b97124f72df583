pub mod image;
pub mod probe;
