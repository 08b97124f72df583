use thiserror::Error;

/// Everything that can go wrong between file bytes and f32 tensors. Each message names the file,
/// and the tensor where there is one, so a front end can show it as it is.
#[derive(Error, Debug)]
pub enum WeightError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The file as a whole is not valid safetensors (truncated, bad header length, bad JSON).
    #[error("{file}: not a valid safetensors file: {reason}")]
    Format { file: String, reason: String },
    /// One header entry is malformed or claims bytes the file does not hold.
    #[error("{file}: tensor {tensor}: {reason}")]
    Tensor { file: String, tensor: String, reason: String },
    #[error("{file}: tensor {tensor} has dtype {dtype}; only F32, F16 and BF16 can be loaded")]
    UnsupportedDType { file: String, tensor: String, dtype: String },
    #[error("{file}: no tensor {tensor}")]
    Missing { file: String, tensor: String },
    /// Loading a renamed tensor failed; names the diffusers name and the key in the file.
    #[error("tensor {name} (stored as {key}): {source}")]
    Mapped {
        name: String,
        key: String,
        #[source]
        source: Box<WeightError>,
    },
    /// A single-file checkpoint whose keys do not form a model we can split.
    #[error("{file}: {reason}")]
    Layout { file: String, reason: String },
}

/// Front ends report errors as text (the CLI's message, the page's worker reply).
impl From<WeightError> for String {
    fn from(e: WeightError) -> Self {
        e.to_string()
    }
}
