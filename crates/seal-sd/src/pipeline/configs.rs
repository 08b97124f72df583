//! A model's configs: read from a diffusers folder, or inferred from a single checkpoint's
//! tensor shapes; and the one-line description of what was recognised.

use std::rc::Rc;

use seal_weights::{Component, WeightFile};

use super::source::Files;
use crate::ModelError;
use crate::clip::ClipTextConfig;
use crate::scheduler::SchedulerConfig;
use crate::tokenizer::{ClipTokenizer, TokenizerFiles};
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;

pub(super) struct Configs {
    pub unet: UNetConfig,
    pub text: ClipTextConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
    pub tokenizer: ClipTokenizer,
}

pub(super) fn text(files: &Files, path: &str) -> Result<String, ModelError> {
    let bytes = read_all(files, path)?.ok_or_else(|| ModelError::Missing(format!("the model folder has no {path}")))?;
    String::from_utf8(bytes).map_err(|_| ModelError::config(path, "not UTF-8 text"))
}

/// A small file's bytes, if it was given.
pub(super) fn read_all(files: &Files, path: &str) -> Result<Option<Vec<u8>>, ModelError> {
    files.get(path).map(|f| f.read_all().map_err(|e| ModelError::Io { file: path.to_string(), message: e })).transpose()
}

pub(super) fn folder_configs(files: &Files) -> Result<Configs, ModelError> {
    let tok = |name: &str| read_all(files, &format!("tokenizer/{name}"));
    let tokenizer_files = TokenizerFiles {
        tokenizer_json: tok("tokenizer.json")?,
        vocab_json: tok("vocab.json")?,
        merges_txt: tok("merges.txt")?,
        tokenizer_config_json: tok("tokenizer_config.json")?,
        special_tokens_map_json: tok("special_tokens_map.json")?,
    };
    let scheduler = match files.get("scheduler/scheduler_config.json") {
        Some(_) => SchedulerConfig::from_json(&text(files, "scheduler/scheduler_config.json")?)?,
        None => SchedulerConfig::sd(),
    };
    Ok(Configs {
        unet: UNetConfig::from_json(&text(files, "unet/config.json")?)?,
        text: ClipTextConfig::from_json(&text(files, "text_encoder/config.json")?)?,
        vae: VaeConfig::from_json(&text(files, "vae/config.json")?)?,
        scheduler,
        tokenizer: ClipTokenizer::from_folder_files(&tokenizer_files).map_err(|e| ModelError::config("tokenizer/", e))?,
    })
}

/// A component's weights file in a folder: the full-precision file, else the `.fp16` variant.
pub(super) fn folder_component(files: &mut Files, dir: &str, stem: &str) -> Result<Component, ModelError> {
    for name in [format!("{dir}/{stem}.safetensors"), format!("{dir}/{stem}.fp16.safetensors")] {
        if let Some(bytes) = files.remove(&name) {
            return Ok(Component::from_file(Rc::new(WeightFile::from_source(name, bytes)?)));
        }
    }
    Err(ModelError::Missing(format!("the model folder has no {dir}/{stem}.safetensors (only .safetensors weights are read)")))
}

/// SD 1.x configs from a single file's tensor shapes. Head counts are not visible in shapes:
/// SD 1.x and its distillations use 8 UNet heads and 64-wide CLIP heads.
pub(super) fn infer_configs(unet: &Component, text: &Component, vae: &Component, layers_per_block: usize) -> Result<Configs, ModelError> {
    let shape = |c: &Component, k: &str| c.shape(k).ok_or_else(|| ModelError::Unsupported(format!("{}: no tensor {k}; not an SD 1.x checkpoint", c.file_name())));
    let mut channels = vec![];
    while let Some(s) = unet.shape(&format!("down_blocks.{}.resnets.0.conv1.weight", channels.len())) {
        channels.push(s[0]);
    }
    if channels.is_empty() {
        return Err(ModelError::Unsupported(format!("{}: no UNet down blocks found", unet.file_name())));
    }
    let cross = |kind: &str, i: usize| unet.keys().any(|k| k.starts_with(&format!("{kind}.{i}.attentions.")));
    let n = channels.len();
    let context = shape(unet, &format!("down_blocks.{}.attentions.0.transformer_blocks.0.attn2.to_k.weight", (0..n).find(|&i| cross("down_blocks", i)).unwrap_or(0)))?[1];
    let unet_config = serde_json::json!({
        "block_out_channels": channels,
        "down_block_types": (0..n).map(|i| if cross("down_blocks", i) { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect::<Vec<_>>(),
        "up_block_types": (0..n).map(|i| if cross("up_blocks", i) { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect::<Vec<_>>(),
        "mid_block_type": unet.shape("mid_block.resnets.0.conv1.weight").map(|_| "UNetMidBlock2DCrossAttn"),
        "layers_per_block": layers_per_block,
        "cross_attention_dim": context,
        "attention_head_dim": 8,
        "use_linear_projection": unet.shape("down_blocks.0.attentions.0.proj_in.weight").or_else(|| unet.shape("down_blocks.1.attentions.0.proj_in.weight")).is_some_and(|s| s.len() == 2),
        "in_channels": shape(unet, "conv_in.weight")?[1],
        "out_channels": shape(unet, "conv_out.weight")?[0],
        "sample_size": 64,
    });
    let unet_config: UNetConfig = serde_json::from_value(unet_config).map_err(|e| ModelError::config(unet.file_name(), e))?;
    unet_config.validate()?;

    let [vocab, hidden] = shape(text, "text_model.embeddings.token_embedding.weight")?[..] else { unreachable!("2-D embedding") };
    let layers = (0..).take_while(|i| text.shape(&format!("text_model.encoder.layers.{i}.mlp.fc1.weight")).is_some()).count();
    let text_config = ClipTextConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: shape(text, "text_model.encoder.layers.0.mlp.fc1.weight")?[0],
        num_hidden_layers: layers,
        num_attention_heads: (hidden / 64).max(1),
        max_position_embeddings: shape(text, "text_model.embeddings.position_embedding.weight")?[0],
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
    };
    let mut vae_channels = vec![];
    while let Some(s) = vae.shape(&format!("encoder.down_blocks.{}.resnets.0.conv1.weight", vae_channels.len())) {
        vae_channels.push(s[0]);
    }
    let vae_layers = (0..).take_while(|i| vae.shape(&format!("encoder.down_blocks.0.resnets.{i}.conv1.weight")).is_some()).count();
    let vae_config: VaeConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": vae_channels,
        "layers_per_block": vae_layers,
        "latent_channels": shape(vae, "decoder.conv_in.weight")?[1],
    }))
    .map_err(|e| ModelError::config(vae.file_name(), e))?;
    let tokenizer = ClipTokenizer::openai_clip().map_err(|e| ModelError::config("built-in CLIP tokenizer", e))?;
    if tokenizer.vocab_size() != vocab {
        return Err(ModelError::Unsupported(format!(
            "{}: the text encoder has a {vocab}-token vocabulary, not CLIP's {}; give the model's diffusers folder as its config (for its tokenizer)",
            text.file_name(),
            tokenizer.vocab_size()
        )));
    }
    Ok(Configs { unet: unet_config, text: text_config, vae: vae_config, scheduler: SchedulerConfig::sd(), tokenizer })
}

pub(super) fn describe(c: &UNetConfig) -> String {
    let family = match (c.block_out_channels.as_slice(), c.cross_attention_dim, c.mid_block_type.is_some(), c.layers_per_block.get(0)) {
        ([320, 640, 1280, 1280], 768, true, 2) => "SD 1.x",
        ([320, 640, 1280], 768, false, 1) => "BK-SDM tiny / segmind tiny-sd",
        ([320, 640, 1280, 1280], 768, false, 1) => "BK-SDM small / segmind small-sd",
        (_, 768, _, _) => "SD 1.x-family",
        _ => "SD 1.x-layout (custom size)",
    };
    format!(
        "{family} UNet: channels {:?}, {} layers/block, {}, {} heads, context {}",
        c.block_out_channels,
        c.layers_per_block.get(0),
        if c.mid_block_type.is_some() { "mid block" } else { "no mid block" },
        c.heads(0),
        c.cross_attention_dim
    )
}
