//! The error seal-core's session answers with: the crates' typed errors, requests made out of
//! order, and the engine's own failures (which name the setting, file or step at fault).

use seal_sd::ModelError;
use seal_sd::seal_weights::WeightError;
use seal_sd::seal_weights::lora::LoraError;

#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    /// A request the session cannot answer yet; the message says what comes first.
    #[error("{0}")]
    Order(&'static str),
    /// A setting, input or computation that failed, said in words that name it.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Self::Failed(message)
    }
}

/// Front ends that report errors as text (the CLI, the page's worker).
impl From<Error> for String {
    fn from(e: Error) -> Self {
        e.to_string()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
