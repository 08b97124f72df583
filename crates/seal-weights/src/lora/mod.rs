//! LoRA adapter files: kohya / A1111, peft and the older diffusers naming, read into one form
//! ([`LoraFile`]: per target module a `down`, an `up` and an optional alpha) and written back.
//!
//! Names are resolved against the model's real module paths ([`ModelPaths`]): kohya flattens
//! `.` to `_`, which cannot be undone by string replacement (`transformer_blocks`, `to_k`), so
//! every path is flattened the same way and looked up. A file is read whole or refused whole:
//! unknown keys, wrong shapes and non-finite values are errors before anything is returned.
//!
//! Applying and training adapters is the model crate's business; this module only moves data.

mod ldm;
mod names;
mod parse;
mod stack;
mod write;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use crate::{DType, Tensor32, WeightError};

pub use parse::parse_lora;
pub use stack::stack;
pub use write::{kohya_metadata, write_diffusers_legacy, write_in_format, write_kohya, write_peft};

/// Which layout a LoRA file uses; a sealed LoRA is written back in the user's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraFormat {
    /// `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_...`.
    Kohya,
    /// `unet.<path>.lora_A.weight` / `.lora_B.weight`; `text_encoder.<path>...`.
    Peft,
    /// `unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.down.weight` and
    /// the attention-processor names (`...attn1.processor.to_k_lora.down.weight`).
    DiffusersLegacy,
}

/// The model part a LoRA module adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraComponent {
    Unet,
    TextEncoder,
}

impl LoraComponent {
    pub const ALL: [LoraComponent; 2] = [LoraComponent::Unet, LoraComponent::TextEncoder];

    /// The diffusers pipeline attribute, used as key prefix by peft and diffusers files.
    pub fn name(self) -> &'static str {
        match self {
            LoraComponent::Unet => "unet",
            LoraComponent::TextEncoder => "text_encoder",
        }
    }
}

/// A module path in diffusers naming, e.g. (Unet,
/// `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`) or (TextEncoder,
/// `text_model.encoder.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoraTarget {
    pub component: LoraComponent,
    pub path: String,
}

impl LoraTarget {
    pub fn new(component: LoraComponent, path: impl Into<String>) -> Self {
        Self { component, path: path.into() }
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.component.name(), self.path)
    }
}

/// One adapted layer: `W' = W + scale * up @ down` (a convolution: the same over the flattened
/// kernel, `up [out, r, 1, 1]` times `down [r, in * k * k]`).
///
/// Parsed modules have the target weight's rank: `down [r, in]`, `up [out, r]` for a linear
/// weight `[out, in]`; `down [r, in, kh, kw]`, `up [out, r, 1, 1]` for a convolution
/// `[out, in, kh, kw]` (a linear-shaped LoRA on a 1x1 convolution is reshaped, same data).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub down: Tensor32,
    pub up: Tensor32,
    pub alpha: Option<f32>,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.shape.first().copied().unwrap_or(0)
    }

    /// `alpha / rank`, or 1 without an alpha (what every loader does then).
    pub fn scale(&self) -> f32 {
        self.alpha.map_or(1.0, |a| a / self.rank() as f32)
    }

    /// The invariants every writer relies on: ranks agree, data fills the shapes.
    fn check(&self) -> Result<(), String> {
        let (d, u) = (&self.down.shape, &self.up.shape);
        if !matches!(d.len(), 2 | 4) || u.len() != d.len() {
            return Err(format!("down {d:?} and up {u:?} must both be 2-D (linear) or both 4-D (convolution)"));
        }
        if d[0] == 0 || u[1] != d[0] || u[2..].iter().any(|&k| k != 1) {
            return Err(format!(
                "down {d:?} and up {u:?} do not form a LoRA of rank >= 1 (up must be \
                 [out, r] or [out, r, 1, 1] with r = down's first dimension)"
            ));
        }
        for (name, t) in [("down", &self.down), ("up", &self.up)] {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(format!("{name} has {} values for shape {:?}", t.data.len(), t.shape));
            }
        }
        match self.alpha {
            Some(a) if !a.is_finite() => Err(format!("alpha {a} is not finite")),
            _ => Ok(()),
        }
    }
}

/// A LoRA file as data. `format`, `metadata` and `dtype` are what the file had, and what
/// [`write_in_format`] writes back (the caller may change them first).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFile {
    pub format: LoraFormat,
    pub modules: BTreeMap<LoraTarget, LoraModule>,
    /// The safetensors `__metadata__` as read (`ss_*` for kohya files).
    pub metadata: BTreeMap<String, String>,
    /// The element type of the `down`/`up` tensors; F32 if the file mixed types.
    pub dtype: DType,
}

/// Every adaptable module of the model (Linear and Conv2d layers) per component, with its
/// weight shape `[out, in]` or `[out, in, kh, kw]`, e.g. `down_blocks.1.attentions.0.proj_in`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelPaths {
    pub unet: BTreeMap<String, Vec<usize>>,
    pub text_encoder: BTreeMap<String, Vec<usize>>,
}

impl ModelPaths {
    pub fn get(&self, component: LoraComponent) -> &BTreeMap<String, Vec<usize>> {
        match component {
            LoraComponent::Unet => &self.unet,
            LoraComponent::TextEncoder => &self.text_encoder,
        }
    }
}

/// A tensor whose shape does not fit its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub key: String,
    /// The accepted shape, `r` standing for any rank >= 1.
    pub expected: String,
    pub found: Vec<usize>,
}

impl fmt::Display for ShapeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is {:?}, expected {}", self.key, self.found, self.expected)
    }
}

/// How many keys an error message lists before summarising; the error value holds them all.
const LISTED: usize = 20;

fn list<T: fmt::Display>(items: &[T]) -> String {
    let mut s: Vec<String> = items.iter().take(LISTED).map(T::to_string).collect();
    if items.len() > LISTED {
        s.push(format!("... and {} more", items.len() - LISTED));
    }
    s.join(", ")
}

/// Why a LoRA file was refused or could not be written. Messages name the file (or the
/// module) and the tensor keys as they are in the file, so a front end can show them as they are.
#[derive(Error, Debug)]
pub enum LoraError {
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("{file}: no LoRA tensors")]
    Empty { file: String },
    /// Keys that name no module of this model, or are no LoRA tensor we read (LoHa, DoRA,
    /// biases, another architecture's layers). All of them, sorted.
    #[error(
        "{file}: {} keys match no module of this model (a LoRA for another model?): {}",
        keys.len(),
        list(keys)
    )]
    Unmatched { file: String, keys: Vec<String> },
    /// Several keys give the same tensor of one module (mixed namings).
    #[error("{file}: {} all give the same tensor of {target}", keys.join(" and "))]
    Conflict { file: String, target: String, keys: Vec<String> },
    #[error("{file}: {key} has no matching {missing}")]
    Incomplete { file: String, key: String, missing: String },
    /// Every tensor whose shape does not fit its target layer or its partner.
    #[error("{file}: wrong shapes: {}", list(mismatches))]
    Shape { file: String, mismatches: Vec<ShapeMismatch> },
    #[error("{file}: tensor {tensor} holds NaN or infinite values")]
    NonFinite { file: String, tensor: String },
    /// diffusers' `lora_adapter_metadata` JSON (which sets peft alphas) is malformed.
    #[error("{file}: metadata lora_adapter_metadata: {reason}")]
    Metadata { file: String, reason: String },
    /// A module given to a writer or to [`stack`] is inconsistent or does not fit the dtype.
    #[error("LoRA module {target}: {reason}")]
    Module { target: String, reason: String },
}

/// Front ends report errors as text (the CLI's message, the page's worker reply).
impl From<LoraError> for String {
    fn from(e: LoraError) -> Self {
        e.to_string()
    }
}
