//! What the user downloads: the sealing adapter as a kohya file A1111, ComfyUI and diffusers
//! load, and the "sealed LoRA" (the user's LoRA plus the sealing adapter, stacked exactly).

use std::collections::BTreeMap;

use seal_sd::pipeline::ModelInfo;
use seal_sd::seal_weights::DType;
use seal_sd::seal_weights::lora::{LoraFile, LoraFormat, LoraModule, LoraTarget, kohya_metadata, stack};
use sha2::{Digest, Sha256};

use crate::unlearn::run::{Recipe, SealMode};

/// SHA-256 of the trigger's UTF-8 bytes, hex: lets a user check which trigger an adapter
/// seals without the file revealing it.
pub fn trigger_hash(trigger: &str) -> String {
    Sha256::digest(trigger.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The sealing adapter as a kohya-format LoRA with the usual `ss_*` metadata (numbers, as
/// loaders expect) and a `seal_*` record of how it was made. Triggers are stored as hashes
/// unless `reveal_triggers`.
pub fn sealing_adapter(adapters: &BTreeMap<LoraTarget, LoraModule>, recipe: &Recipe, model: &ModelInfo, triggers: &[String], reveal_triggers: bool) -> LoraFile {
    let (dim, alpha) = network_dim_alpha(adapters.values());
    let mut metadata = kohya_metadata(dim, alpha);
    let mut put = |k: &str, v: String| {
        metadata.insert(k.to_string(), v);
    };
    put("ss_base_model_version", if model.unet.cross_attention_dim == 768 { "sd_v1".into() } else { "custom".into() });
    put("ss_sd_model_name", model.source.clone());
    // The UNet cross-attention projections the adapter covers (`to_k`, ..., `to_out.0`).
    let targets: std::collections::BTreeSet<&str> = adapters.keys().filter_map(|t| t.path.split_once(".attn2.").map(|(_, p)| p)).collect();
    put("ss_network_args", serde_json::json!({ "targets": targets }).to_string());
    let how = match recipe.mode {
        SealMode::Instant => "a closed-form edit of the cross-attention keys and values",
        SealMode::Thorough => "SKD-CAG self-distillation",
        SealMode::Both => "a closed-form edit refined by SKD-CAG self-distillation",
    };
    put("ss_training_comment", format!("Sealing adapter made by Seal ({how}); apply at weight 1.0"));
    put("seal_version", env!("CARGO_PKG_VERSION").into());
    put("seal_architecture", model.architecture.clone());
    put("seal_mode", recipe.mode.name().into());
    if let Some(settings) = &recipe.thorough {
        put("seal_settings", to_json(settings));
        put("seal_thorough_steps", recipe.thorough_steps.to_string());
    }
    if let Some(instant) = &recipe.instant {
        put("seal_instant", to_json(instant));
    }
    put("seal_trigger_sha256", to_json(&triggers.iter().map(|t| trigger_hash(t)).collect::<Vec<_>>()));
    if reveal_triggers {
        put("seal_triggers", to_json(&triggers));
    }
    LoraFile { format: LoraFormat::Kohya, modules: adapters.clone(), metadata, dtype: DType::F32 }
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}

/// kohya's `ss_network_dim` / `ss_network_alpha` for modules of possibly different ranks: the
/// largest rank, and the alpha that gives the modules' scale at it (their common scale, or 1).
fn network_dim_alpha<'a>(modules: impl Iterator<Item = &'a LoraModule>) -> (usize, f32) {
    let (mut dim, mut scales) = (0, vec![]);
    for m in modules {
        dim = dim.max(m.rank());
        scales.push(m.scale());
    }
    let common = scales.first().copied().filter(|s| scales.iter().all(|x| (x - s).abs() <= 1e-6 * s.abs())).unwrap_or(1.0);
    (dim, common * dim as f32)
}

/// A user LoRA's weight must be finite and non-zero: sealing merges the LoRA at it, and the
/// sealed LoRA divides the adapter by it.
pub fn check_lora_weight(weight: f32) -> Result<(), String> {
    if weight.is_finite() && weight != 0.0 { Ok(()) } else { Err(format!("LoRA weight {weight}: give a non-zero number (1 applies it as trained)")) }
}

/// The user's LoRA with the sealing adapter stacked in, in the user's own format. `weight` is
/// the strength the user applies their LoRA at (and sealing saw): the adapter is stored
/// divided by it, so loading the file at `weight` equals the user's LoRA at `weight` plus the
/// sealing adapter at 1.
pub fn sealed_lora(user: &LoraFile, sealing: &LoraFile, weight: f32) -> Result<LoraFile, String> {
    check_lora_weight(weight)?;
    let mut sealing = sealing.clone();
    for module in sealing.modules.values_mut() {
        module.up.data.iter_mut().for_each(|x| *x /= weight);
    }
    let mut out = stack(user, &sealing)?;
    out.metadata.insert("seal_apply_weight".into(), weight.to_string());
    for (k, v) in &sealing.metadata {
        if k.starts_with("seal_") {
            out.metadata.insert(k.clone(), v.clone());
        }
    }
    // Stacking mixes precisions; a half-precision user file would round the adapter.
    out.dtype = DType::F32;
    if out.format == LoraFormat::Kohya {
        let (dim, alpha) = network_dim_alpha(out.modules.values());
        out.metadata.insert("ss_network_dim".into(), dim.to_string());
        out.metadata.insert("ss_network_alpha".into(), alpha.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor};
    use seal_sd::lora::{Projection, cross_attention_targets, fresh_adapters};
    use seal_sd::pipeline::{LoraMode, ModelSource, StableDiffusion};
    use seal_sd::seal_weights::WeightFile;
    use seal_sd::seal_weights::lora::{LoraComponent, parse_lora};

    use super::*;
    use crate::unlearn::SealSettings;

    fn noise_pred(sd: &StableDiffusion) -> Vec<f32> {
        let context = sd.encode_prompts(&["a red circle on a white background"]).unwrap();
        let t = Tensor::<1>::from_floats([500.0], &sd.device);
        let out = sd.unet.forward(sd.initial_latents(1, sd.info.sample_size, 0), t, &context, false).sample;
        out.into_data().try_to_vec::<f32>().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn a_sealed_lora_at_the_users_weight_equals_the_lora_plus_the_seal() {
        let fixtures = crate::fixtures();
        let sd = StableDiffusion::load(ModelSource::from_path(&fixtures.join("tiny-clean")).unwrap(), &Device::flex()).unwrap();
        let user = parse_lora(&WeightFile::open(&fixtures.join("lora/weak_lora_kohya.safetensors")).unwrap(), &sd.model_paths()).unwrap();
        let targets = cross_attention_targets(&sd.unet, &[Projection::ToK, Projection::ToV]);
        let mut modules = fresh_adapters(&sd.unet, &targets, 2, 2.0, 1);
        modules.values_mut().for_each(|m| m.up.data.iter_mut().enumerate().for_each(|(i, x)| *x = ((i % 7) as f32 - 3.0) * 0.05));
        let modules = modules.into_iter().map(|(k, m)| (LoraTarget::new(LoraComponent::Unet, k), m)).collect();
        let recipe = Recipe { mode: SealMode::Thorough, instant: None, thorough: Some(SealSettings::default()), thorough_steps: 1 };
        let seal = sealing_adapter(&modules, &recipe, &sd.info, &["\u{200b}".into()], false);
        assert_eq!((seal.metadata["ss_network_dim"].as_str(), seal.metadata["ss_network_alpha"].as_str()), ("2", "2"));
        assert_eq!(seal.metadata["seal_mode"], "thorough");
        assert_eq!(seal.metadata["ss_network_args"], r#"{"targets":["to_k","to_v"]}"#);

        let weight = 0.6;
        let both = noise_pred(&sd.with_lora(&user, weight, LoraMode::Merge).with_lora(&seal, 1.0, LoraMode::SideBranch { trainable: false }));
        let sealed = sealed_lora(&user, &seal, weight).unwrap();
        assert_eq!(sealed.metadata["seal_apply_weight"], "0.6");
        // Loaders read these as numbers: the largest stacked rank (4 + 2) and its alpha at scale 1.
        assert_eq!((sealed.metadata["ss_network_dim"].as_str(), sealed.metadata["ss_network_alpha"].as_str()), ("6", "6"));
        let one = noise_pred(&sd.with_lora(&sealed, weight, LoraMode::SideBranch { trainable: false }));
        assert!(max_diff(&one, &both) < 1e-5, "sealed LoRA at weight {weight}: {}", max_diff(&one, &both));
        // Stacking without the correction would weaken the seal to 0.6 of itself.
        let naive = noise_pred(&sd.with_lora(&stack(&user, &seal).unwrap(), weight, LoraMode::SideBranch { trainable: false }));
        assert!(max_diff(&naive, &both) > 1e-3, "the test's adapter is too weak to tell: {}", max_diff(&naive, &both));
        assert!(sealed_lora(&user, &seal, 0.0).is_err());
    }
}
