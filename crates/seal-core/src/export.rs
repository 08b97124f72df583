//! What the user downloads: the sealing adapter as a kohya file A1111, ComfyUI and diffusers
//! load, and the "sealed LoRA" (the user's LoRA plus the sealing adapter, stacked exactly).

use std::collections::BTreeMap;

use seal_sd::pipeline::ModelInfo;
use seal_sd::seal_weights::DType;
use seal_sd::seal_weights::lora::{LoraFile, LoraFormat, LoraModule, LoraTarget, kohya_metadata, stack};
use sha2::{Digest, Sha256};

use crate::unlearn::SealSettings;

/// SHA-256 of the trigger's UTF-8 bytes, hex: lets a user check which trigger an adapter
/// seals without the file revealing it.
pub fn trigger_hash(trigger: &str) -> String {
    Sha256::digest(trigger.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The sealing adapter as a kohya-format LoRA with the usual `ss_*` metadata and a `seal_*`
/// record. Triggers are stored as hashes unless `reveal_triggers`.
pub fn sealing_adapter(adapters: &BTreeMap<LoraTarget, LoraModule>, settings: &SealSettings, model: &ModelInfo, triggers: &[String], reveal_triggers: bool) -> LoraFile {
    let mut metadata = kohya_metadata(settings.rank, settings.alpha);
    let mut put = |k: &str, v: String| {
        metadata.insert(k.to_string(), v);
    };
    put("ss_base_model_version", if model.unet.cross_attention_dim == 768 { "sd_v1".into() } else { "custom".into() });
    put("ss_sd_model_name", model.source.clone());
    put("ss_network_args", serde_json::json!({ "targets": settings.targets }).to_string());
    put("ss_training_comment", "Sealing adapter made by Seal (SKD-CAG self-distillation); apply at weight 1.0".into());
    put("seal_version", env!("CARGO_PKG_VERSION").into());
    put("seal_architecture", model.architecture.clone());
    put("seal_settings", serde_json::to_string(settings).expect("settings serialize"));
    put("seal_trigger_sha256", serde_json::to_string(&triggers.iter().map(|t| trigger_hash(t)).collect::<Vec<_>>()).expect("strings serialize"));
    if reveal_triggers {
        put("seal_triggers", serde_json::to_string(triggers).expect("strings serialize"));
    }
    LoraFile {
        format: LoraFormat::Kohya,
        modules: adapters.clone(),
        metadata,
        dtype: DType::F32,
    }
}

/// The user's LoRA with the sealing adapter stacked in, in the user's own format: loading it
/// at weight 1.0 equals loading both.
pub fn sealed_lora(user: &LoraFile, sealing: &LoraFile) -> Result<LoraFile, String> {
    let mut out = stack(user, sealing).map_err(|e| e.to_string())?;
    for (k, v) in &sealing.metadata {
        if k.starts_with("seal_") {
            out.metadata.insert(k.clone(), v.clone());
        }
    }
    // Stacking mixes precisions; a half-precision user file would round the adapter.
    out.dtype = DType::F32;
    if out.format == LoraFormat::Kohya {
        out.metadata.insert("ss_network_dim".into(), "mixed".into());
        out.metadata.insert("ss_network_alpha".into(), "mixed".into());
    }
    Ok(out)
}
