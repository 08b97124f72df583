//! The Stable Diffusion 1.x family in Burn: tokenizer, CLIP text encoder, UNet, VAE and
//! schedulers, built from diffusers configs and loaded from diffusers or original-layout files.
//! Module field paths equal the diffusers weight names (see `load`).

pub mod attention;
pub mod clip;
pub mod layers;
pub mod load;
pub mod lora;
pub mod pipeline;
pub mod resnet;
pub mod rng;
pub mod scheduler;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use seal_weights;

/// A tensor's values on the host as f32, whatever its element type: the engine's one
/// read-back, async because WebGPU cannot read synchronously.
pub async fn read_back<const D: usize>(t: burn::tensor::Tensor<D>) -> Result<Vec<f32>, String> {
    let data = t.into_data_async().await.map_err(|e| format!("reading a tensor back: {e:?}"))?;
    data.convert::<f32>().try_to_vec::<f32>().map_err(|e| format!("reading a tensor back: {e:?}"))
}

/// Everything that can go wrong building or loading a model; each names the file and tensor.
#[derive(thiserror::Error, Debug)]
pub enum ModelError {
    #[error(transparent)]
    Weights(#[from] seal_weights::WeightError),
    #[error("{file}: {message}")]
    Config { file: String, message: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("{file}: missing tensors: {}", summarize(names))]
    MissingTensors { file: String, names: Vec<String> },
    #[error("{file}: tensor {tensor} has shape {found:?}, the model expects {expected:?}")]
    Shape { file: String, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{file}: tensor {tensor} holds a NaN or infinite value (element {index})")]
    NonFinite { file: String, tensor: String, index: usize },
    #[error("{file}: tensor {tensor} holds {value}, beyond the range of f16; load the model in f32")]
    HalfRange { file: String, tensor: String, value: f32 },
    #[error("{0}")]
    Missing(String),
    #[error("{file}: {message}")]
    Io { file: String, message: String },
    /// The weights would not fit where they are to live (wasm32's 4 GiB on the page's CPU engine).
    #[error("{model}: its weights take {needed_gib:.1} GiB on this engine, more than the {budget_gib:.1} GiB it can hold; {hint}")]
    TooLarge { model: String, needed_gib: f64, budget_gib: f64, hint: String },
    /// Work that needs the UNet or the VAE, asked of a model loaded for the instant seal only.
    #[error("{what} needs the whole model, but {why}")]
    Partial { what: String, why: String },
}

/// Front ends report errors as text (the CLI's message, the page's worker reply).
impl From<ModelError> for String {
    fn from(e: ModelError) -> Self {
        e.to_string()
    }
}

impl ModelError {
    pub(crate) fn config(file: &str, e: impl std::fmt::Display) -> Self {
        Self::Config { file: file.into(), message: e.to_string() }
    }
}

/// The first few names of a long list, and how many more.
fn summarize(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

#[cfg(test)]
mod testutil;
