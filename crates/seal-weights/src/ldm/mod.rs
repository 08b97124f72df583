//! Original-layout (LDM / CompVis) single-file checkpoints -> diffusers-named components.
//!
//! The key mapping works on names alone ([`plan_keys`]), so it can be checked against the
//! real-architecture layouts without multi-GB files; [`split_single_file`] applies it to a file.

mod text;
mod unet;
mod vae;

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::component::{Component, Source};
use crate::{WeightError, WeightFile};

const UNET: &str = "model.diffusion_model.";
const TEXT: &str = "cond_stage_model.transformer.";
const VAE: &str = "first_stage_model.";

/// LatentDiffusion's noise-schedule buffers: saved with the model, not weights.
const SCHEDULE: [&str; 12] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
];

/// Keys known not to be inference weights, skipped without being reported as unused.
fn is_ignored(key: &str) -> bool {
    SCHEDULE.contains(&key)
        // EMA bookkeeping and the EMA copy of the UNet; like diffusers we use the live weights.
        || key.starts_with("model_ema.")
        // The VAE's training loss (LPIPS and discriminator weights).
        || key.starts_with("first_stage_model.loss.")
        // CLIP's int64 buffer 0..77, which the model recomputes.
        || (key.starts_with(TEXT) && key.ends_with("embeddings.position_ids"))
}

/// An LDM single-file checkpoint split into diffusers-named components (sharing its bytes).
#[derive(Debug)]
pub struct SingleFile {
    pub unet: Component,
    pub text_encoder: Component,
    pub vae: Component,
    /// Inferred from the UNet's block numbering: 2 for SD 1.x, 1 for BK-SDM.
    pub layers_per_block: usize,
    /// Keys that are neither mapped nor known non-weights (schedule buffers, EMA, VAE loss,
    /// position ids), sorted, so a front end can show what was left out.
    pub unused: Vec<String>,
}

/// Splits an original-layout (LDM / CompVis) checkpoint: UNet `model.diffusion_model.*`, text
/// encoder `cond_stage_model.transformer.[text_model.]*`, VAE `first_stage_model.*`.
pub fn split_single_file(file: Rc<WeightFile>) -> Result<SingleFile, WeightError> {
    let keys = file.keys().chain(file.unsupported_tensors().map(|(k, _)| k));
    let plan = plan_keys(keys).map_err(|reason| WeightError::Layout { file: file.name().to_owned(), reason })?;
    let mut parts: [BTreeMap<String, Source>; 3] = Default::default();
    for (key, (part, name, squeeze)) in plan.renames {
        let Some(info) = file.info(&key) else {
            let dtype = file.unsupported_tensors().find(|&(k, _)| k == key).map(|(_, d)| d.to_owned());
            return Err(WeightError::UnsupportedDType { file: file.name().to_owned(), tensor: key, dtype: dtype.unwrap_or_default() });
        };
        let shape = if squeeze {
            squeeze_1x1(&info.shape).ok_or_else(|| WeightError::Tensor {
                file: file.name().to_owned(),
                tensor: key.clone(),
                reason: format!("{name} must be a 1x1 convolution or linear weight, found shape {:?}", info.shape),
            })?
        } else {
            info.shape.clone()
        };
        parts[part as usize].insert(name, Source { key, shape });
    }
    let [unet, text_encoder, vae] = parts.map(|tensors| Component::new(file.clone(), tensors));
    Ok(SingleFile { unet, text_encoder, vae, layers_per_block: plan.layers_per_block, unused: plan.unused })
}

/// `[out, in, 1, 1]` (a 1x1 convolution) or `[out, in]` -> `[out, in]`: same data, linear shape.
fn squeeze_1x1(shape: &[usize]) -> Option<Vec<usize>> {
    match shape {
        [out, inp, rest @ ..] if rest.iter().all(|&d| d == 1) => Some(vec![*out, *inp]),
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Part {
    Unet = 0,
    TextEncoder = 1,
    Vae = 2,
}

struct KeyPlan {
    /// Source key -> (component, diffusers name, squeeze a 1x1 conv to a linear weight).
    renames: BTreeMap<String, (Part, String, bool)>,
    unused: Vec<String>,
    layers_per_block: usize,
}

/// One component's renames, keys relative to the component's prefix.
#[derive(Default)]
struct Mapped<'a> {
    renames: Vec<(&'a str, String, bool)>,
    unused: Vec<&'a str>,
}

impl<'a> Mapped<'a> {
    fn rename(&mut self, key: &'a str, name: String) {
        self.renames.push((key, name, false));
    }
}

/// `"12.rest"` -> `(12, "rest")`; digits only, so `+1` or `1e2` are not read as indices.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (index, rest) = s.split_once('.')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((index.parse().ok()?, rest))
}

fn plan_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<KeyPlan, String> {
    let (mut unet, mut text, mut vae, mut unused) = (vec![], vec![], vec![], vec![]);
    for key in keys {
        if is_ignored(key) {
            continue;
        }
        if let Some(rest) = key.strip_prefix(UNET) {
            unet.push(rest);
        } else if let Some(rest) = key.strip_prefix(TEXT) {
            text.push(rest);
        } else if let Some(rest) = key.strip_prefix(VAE) {
            vae.push(rest);
        } else {
            unused.push(key.to_owned());
        }
    }
    // Later families are named before anything else is said about them.
    if unused.iter().any(|k| k.starts_with("conditioner.embedders.")) {
        return Err("an SDXL checkpoint (conditioner.embedders.*): not supported; Seal handles SD 1.x-family models (CLIP ViT-L/14, 768-wide context)".into());
    }
    if text.is_empty() && unused.iter().any(|k| k.starts_with("cond_stage_model.model.")) {
        return Err(
            "an SD 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.*): not supported; Seal handles SD 1.x-family models (CLIP ViT-L/14, 768-wide context)".into()
        );
    }
    for (keys, what, prefix) in [(&unet, "UNet", UNET), (&text, "text encoder", TEXT), (&vae, "VAE", VAE)] {
        if keys.is_empty() {
            return Err(format!(
                "no {what} tensors ({prefix}*): not a Stable Diffusion 1.x checkpoint in the \
                 original (LDM) layout"
            ));
        }
    }
    let (unet_map, layers_per_block) = unet::map(&unet)?;
    let mut plan = KeyPlan { renames: BTreeMap::new(), unused, layers_per_block };
    let mut taken = BTreeMap::new();
    let parts = [(Part::Unet, UNET, unet_map), (Part::TextEncoder, TEXT, text::map(&text)), (Part::Vae, VAE, vae::map(&vae))];
    for (part, prefix, mapped) in parts {
        plan.unused.extend(mapped.unused.iter().map(|k| format!("{prefix}{k}")));
        for (key, name, squeeze) in mapped.renames {
            let source = format!("{prefix}{key}");
            if let Some(other) = taken.insert((part, name.clone()), source.clone()) {
                return Err(format!("{other} and {source} would both be {name}"));
            }
            plan.renames.insert(source, (part, name, squeeze));
        }
    }
    plan.unused.sort();
    Ok(plan)
}

#[cfg(test)]
mod tests;
