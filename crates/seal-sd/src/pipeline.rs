//! A whole text-to-image model: loading from a diffusers folder or a single original-layout
//! file (as bytes or paths), prompt encoding, sampling with classifier-free guidance, decoding.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use seal_weights::lora::{LoraComponent, LoraFile, LoraModule, ModelPaths};
use seal_weights::{ByteSource, Component, DType, DiskFile, WeightFile};
use serde::Serialize;

use crate::ModelError;
use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::load::{load_module, parameter_count};
use crate::lora;
use crate::rng::SeededRng;
use crate::scheduler::{NoiseSchedule, Sampler, SamplerKind, SchedulerConfig};
use crate::tokenizer::{ClipTokenizer, TokenizerFiles};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};

/// A model's files by path relative to the model's root (`unet/config.json`, ...), each read
/// only where it is needed (a weights file one tensor at a time).
pub type Files = BTreeMap<String, Box<dyn ByteSource>>;

/// What the user gave us.
pub enum ModelSource {
    /// A diffusers folder.
    Folder(Files),
    /// An original-layout checkpoint, optionally with a diffusers folder whose configs and
    /// tokenizer describe it (as diffusers' `from_single_file(config=...)`); without one, the
    /// SD 1.x configs are inferred from the tensor shapes.
    SingleFile { name: String, bytes: Box<dyn ByteSource>, config: Option<Files> },
}

impl ModelSource {
    /// A diffusers folder or a `.safetensors` file on disk.
    pub fn from_path(path: &Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            Ok(Self::Folder(read_folder(path, true)?))
        } else {
            Ok(Self::SingleFile { name: file_name(path), bytes: Box::new(DiskFile::open(path)?), config: None })
        }
    }

    /// What the files a user gave are (relative paths, as `files_to_read` kept them): a
    /// diffusers folder, or one `.safetensors` checkpoint outside any component folder, with a
    /// diffusers folder beside it for configs and tokenizer.
    pub fn from_files(mut files: Files) -> Result<Self, ModelError> {
        let in_component = |p: &str| p.split('/').rev().nth(1).is_some_and(|dir| COMPONENT_DIRS.contains(&dir));
        let singles: Vec<String> = files.keys().filter(|p| p.ends_with(".safetensors") && !in_component(p)).cloned().collect();
        match singles.as_slice() {
            [] if files.is_empty() => Err(ModelError::Missing("no model files were given".into())),
            [] => Ok(Self::Folder(files)),
            [name] => {
                let bytes = files.remove(name).expect("listed");
                // The folder's own weights are not needed for its configs.
                files.retain(|p, _| !p.ends_with(".safetensors"));
                let config = (!files.is_empty()).then_some(files);
                Ok(Self::SingleFile { name: name.rsplit('/').next().unwrap_or(name).to_string(), bytes, config })
            }
            many => Err(ModelError::Missing(format!("{} checkpoints were given ({}); give one, or a diffusers folder", many.len(), many.join(", ")))),
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// A diffusers folder's subfolders that a Stable Diffusion 1.x model is built from.
const COMPONENT_DIRS: [&str; 5] = ["unet", "text_encoder", "vae", "tokenizer", "scheduler"];

/// Which of the files a user gave (relative paths) loading needs, so nothing else is read:
/// configs, tokenizer files and `.safetensors` weights; inside a diffusers folder only its
/// components (no `safety_checker/`, `feature_extractor/`...), the full-precision weights
/// where an `.fp16` variant sits beside them, and no weights at all when a single-file
/// checkpoint came with the folder (the folder then only describes it).
pub fn files_to_read(paths: &[String]) -> Vec<String> {
    let is_weights = |p: &str| p.ends_with(".safetensors");
    let given: std::collections::BTreeSet<&str> = paths.iter().map(String::as_str).filter(|p| p.ends_with(".json") || p.ends_with(".txt") || is_weights(p)).collect();
    let roots: Vec<&str> = given.iter().filter_map(|p| p.strip_suffix("model_index.json").or_else(|| p.strip_suffix("unet/config.json"))).collect();
    fn in_folder<'a>(roots: &[&str], p: &'a str) -> Option<&'a str> {
        roots.iter().find_map(|r| p.strip_prefix(r))
    }
    let checkpoint_given = given.iter().any(|p| is_weights(p) && in_folder(&roots, p).is_none());
    given
        .iter()
        .filter(|&&p| match in_folder(&roots, p) {
            None => true,
            Some(rel) => {
                let component = rel == "model_index.json" || rel.split_once('/').is_some_and(|(dir, _)| COMPONENT_DIRS.contains(&dir));
                let full_precision_beside = p.strip_suffix(".fp16.safetensors").is_some_and(|stem| given.contains(format!("{stem}.safetensors").as_str()));
                component && !(is_weights(p) && (checkpoint_given || full_precision_beside))
            }
        })
        .map(|p| p.to_string())
        .collect()
}

/// Reads what `files_to_read` keeps of a folder on disk; without `weights`, only its configs
/// and tokenizer (a folder that describes a single-file checkpoint).
pub fn read_folder(root: &Path, weights: bool) -> Result<Files, ModelError> {
    let io = |p: &Path, e: std::io::Error| ModelError::Io { file: p.display().to_string(), message: e.to_string() };
    let mut paths = vec![];
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let path = entry.map_err(|e| io(&dir, e))?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                paths.push(path.strip_prefix(root).expect("inside root").to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut files = Files::new();
    for rel in files_to_read(&paths).into_iter().filter(|p| weights || !p.ends_with(".safetensors")) {
        let path = root.join(&rel);
        let source: Box<dyn ByteSource> = match rel.ends_with(".safetensors") {
            true => Box::new(DiskFile::open(&path)?),
            false => Box::new(std::fs::read(&path).map_err(|e| io(&path, e))?),
        };
        files.insert(rel, source);
    }
    Ok(files)
}

/// Strips a common leading folder (a dropped folder's own name) so paths start at the model root.
pub fn normalize_folder(files: Files) -> Files {
    let root = files.keys().find_map(|k| k.strip_suffix("model_index.json").or_else(|| k.strip_suffix("unet/config.json"))).map(str::to_string);
    match root {
        Some(prefix) if !prefix.is_empty() => files.into_iter().filter_map(|(k, v)| k.strip_prefix(&prefix).map(|s| (s.to_string(), v))).collect(),
        _ => files,
    }
}

/// What was recognised, for the user to see before any heavy work.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub source: String,
    pub architecture: String,
    pub unet_parameters: usize,
    pub text_encoder_parameters: usize,
    pub vae_parameters: usize,
    pub dtype: String,
    pub unet: UNetSummary,
    pub sample_size: usize,
    pub scheduler: String,
    /// Tensors in the files that no module asked for.
    pub unused_keys: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct UNetSummary {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub mid_block: bool,
    pub cross_attention_dim: usize,
    pub heads: usize,
}

#[derive(Clone)]
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub schedule: NoiseSchedule,
    pub info: ModelInfo,
    pub device: Device,
}

struct Configs {
    unet: UNetConfig,
    text: ClipTextConfig,
    vae: VaeConfig,
    scheduler: SchedulerConfig,
    tokenizer: ClipTokenizer,
}

fn text(files: &Files, path: &str) -> Result<String, ModelError> {
    let bytes = read_all(files, path)?.ok_or_else(|| ModelError::Missing(format!("the model folder has no {path}")))?;
    String::from_utf8(bytes).map_err(|_| ModelError::config(path, "not UTF-8 text"))
}

/// A small file's bytes, if it was given.
fn read_all(files: &Files, path: &str) -> Result<Option<Vec<u8>>, ModelError> {
    files.get(path).map(|f| f.read_all().map_err(|e| ModelError::Io { file: path.to_string(), message: e })).transpose()
}

fn folder_configs(files: &Files) -> Result<Configs, ModelError> {
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
fn folder_component(files: &mut Files, dir: &str, stem: &str) -> Result<Component, ModelError> {
    for name in [format!("{dir}/{stem}.safetensors"), format!("{dir}/{stem}.fp16.safetensors")] {
        if let Some(bytes) = files.remove(&name) {
            return Ok(Component::from_file(Rc::new(WeightFile::from_source(name, bytes)?)));
        }
    }
    Err(ModelError::Missing(format!("the model folder has no {dir}/{stem}.safetensors (only .safetensors weights are read)")))
}

/// SD 1.x configs from a single file's tensor shapes. Head counts are not visible in shapes:
/// SD 1.x and its distillations use 8 UNet heads and 64-wide CLIP heads.
fn infer_configs(unet: &Component, text: &Component, vae: &Component, layers_per_block: usize) -> Result<Configs, ModelError> {
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

impl StableDiffusion {
    pub fn load(source: ModelSource, device: &Device) -> Result<Self, ModelError> {
        Self::load_within(source, device, None)
    }

    /// `load`, refusing before any weight is read a model whose f32 weights exceed
    /// `budget` = (bytes, what to try instead).
    pub fn load_within(source: ModelSource, device: &Device, budget: Option<(u64, &str)>) -> Result<Self, ModelError> {
        let (configs, unet_w, text_w, vae_w, source_name, notes) = match source {
            ModelSource::Folder(files) => {
                let mut files = normalize_folder(files);
                let configs = folder_configs(&files)?;
                let unet = folder_component(&mut files, "unet", "diffusion_pytorch_model")?;
                let text = folder_component(&mut files, "text_encoder", "model")?;
                let vae = folder_component(&mut files, "vae", "diffusion_pytorch_model")?;
                (configs, unet, text, vae, "diffusers folder".to_string(), vec![])
            }
            ModelSource::SingleFile { name, bytes, config } => {
                let file = Rc::new(WeightFile::from_source(name.clone(), bytes)?);
                let split = seal_weights::split_single_file(file)?;
                let mut notes = vec![];
                let configs = match config {
                    Some(files) => folder_configs(&normalize_folder(files))?,
                    None => {
                        notes.push("configs inferred from tensor shapes (SD 1.x: 8 UNet heads, SD scheduler, CLIP tokenizer)".into());
                        infer_configs(&split.unet, &split.text_encoder, &split.vae, split.layers_per_block)?
                    }
                };
                if !split.unused.is_empty() {
                    notes.push(format!("{} tensors of the checkpoint belong to no component", split.unused.len()));
                }
                (configs, split.unet, split.text_encoder, split.vae, format!("single file {name}"), notes)
            }
        };
        let Configs { unet: unet_config, text: text_config, vae: vae_config, scheduler, tokenizer } = configs;
        // SD 2.x's text encoder is OpenCLIP ViT-H (1024 wide, GELU): it would load as a custom
        // size and give nonsense; say what it is instead.
        if unet_config.cross_attention_dim == 1024 || (text_config.hidden_size == 1024 && text_config.hidden_act == "gelu") {
            return Err(ModelError::Unsupported(format!(
                "{source_name}: an SD 2.x model (1024-wide OpenCLIP text context); Seal handles SD 1.x-family models (CLIP ViT-L/14, 768-wide context)"
            )));
        }
        if tokenizer.vocab_size() > text_config.vocab_size {
            return Err(ModelError::Unsupported(format!("tokenizer has {} tokens but the text encoder only {}", tokenizer.vocab_size(), text_config.vocab_size)));
        }
        let dtype = match unet_w.keys().find_map(|k| unet_w.dtype(k)) {
            Some(DType::F16) => "f16",
            Some(DType::BF16) => "bf16",
            _ => "f32",
        };
        if let Some((budget, hint)) = budget {
            let needed: u64 = [&unet_w, &text_w, &vae_w].iter().flat_map(|c| c.keys().filter_map(|k| c.shape(k))).map(|s| 4 * s.iter().product::<usize>() as u64).sum();
            if needed > budget {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                return Err(ModelError::TooLarge { model: source_name, needed_gib: gib(needed), budget_gib: gib(budget), hint: hint.into() });
            }
        }
        let (unet, mut unused) = load_module(UNet2DConditionModel::new(&unet_config, device), &unet_w)?;
        let (text_encoder, unused_text) = load_module(ClipTextModel::new(&text_config, device), &text_w)?;
        let (vae, unused_vae) = load_module(AutoencoderKL::new(&vae_config, device), &vae_w)?;
        // transformers keeps `position_ids` as a buffer in some exports; it is not a weight.
        unused.extend(unused_text.into_iter().filter(|k| !k.ends_with("position_ids")).map(|k| format!("text_encoder: {k}")));
        unused.extend(unused_vae.into_iter().map(|k| format!("vae: {k}")));
        let mut sd = Self::from_parts(tokenizer, text_encoder, unet, vae, unet_config, vae_config, scheduler, source_name, device);
        sd.info.dtype = dtype.into();
        sd.info.unused_keys = unused;
        sd.info.notes.splice(0..0, notes);
        Ok(sd)
    }

    /// A model with random weights of the given shapes (benchmarks, tests); nothing is loaded.
    pub fn random(unet: &UNetConfig, text: &ClipTextConfig, vae: &VaeConfig, tokenizer: ClipTokenizer, device: &Device) -> Self {
        let parts = (UNet2DConditionModel::new(unet, device), ClipTextModel::new(text, device), AutoencoderKL::new(vae, device));
        Self::from_parts(tokenizer, parts.1, parts.0, parts.2, unet.clone(), vae.clone(), SchedulerConfig::sd(), "random weights".into(), device)
    }

    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        unet_config: UNetConfig,
        vae_config: VaeConfig,
        scheduler: SchedulerConfig,
        source: String,
        device: &Device,
    ) -> Self {
        let (sampler, known) = scheduler.default_sampler();
        let notes = if known { vec![] } else { vec![format!("{} is not implemented; sampling uses DDIM with its schedule", scheduler.class_name)] };
        let info = ModelInfo {
            source,
            architecture: describe(&unet_config),
            unet_parameters: parameter_count(&unet),
            text_encoder_parameters: parameter_count(&text_encoder),
            vae_parameters: parameter_count(&vae),
            dtype: "f32".into(),
            unet: UNetSummary {
                block_out_channels: unet_config.block_out_channels.clone(),
                layers_per_block: unet_config.layers_per_block.get(0),
                mid_block: unet_config.mid_block_type.is_some(),
                cross_attention_dim: unet_config.cross_attention_dim,
                heads: unet_config.heads(0),
            },
            sample_size: unet_config.sample_size * vae_config.downscale(),
            scheduler: format!("{sampler:?}"),
            unused_keys: vec![],
            notes,
        };
        Self { tokenizer, text_encoder, unet, vae, unet_config, vae_config, schedule: NoiseSchedule::new(scheduler), info, device: device.clone() }
    }

    /// The same weights (shared, not copied) off the autodiff device, for sampling: on an
    /// autodiff device every op is recorded even when nothing takes gradients, and the record
    /// is only freed by a backward pass (measured: +84 MB of RSS per 12 tiny-model images).
    /// Adapters stay attached.
    pub fn inference(&self) -> Self {
        if !self.device.is_autodiff() {
            return self.clone();
        }
        Self { text_encoder: self.text_encoder.valid(), unet: self.unet.valid(), vae: self.vae.valid(), device: self.device.clone().inner(), ..self.clone() }
    }

    /// Text-encoder hidden states `[B, 77, D]` for prompts.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor<3>, ModelError> {
        self.text_encoder.encode_texts(&self.tokenizer, prompts, &self.device).map_err(|e| ModelError::config("tokenizer", e))
    }

    /// Seeded Gaussian latents `[n, C, h, w]` for an image of `size` pixels.
    pub fn initial_latents(&self, n: usize, size: usize, seed: u64) -> Tensor<4> {
        let side = size / self.vae_config.downscale();
        let c = self.unet_config.in_channels;
        let data = SeededRng::new(seed).normals(n * c * side * side);
        Tensor::from_data(TensorData::new(data, [n, c, side, side]), &self.device)
    }

    /// Classifier-free-guided sampling from `latents`: `uncond` and `cond` contexts `[B, T, D]`.
    /// `on_step(i, latents)` sees each step's result.
    pub fn denoise(&self, latents: Tensor<4>, cond: &Tensor<3>, uncond: &Tensor<3>, sampler: &Sampler, guidance: f64, mut on_step: impl FnMut(usize, &Tensor<4>)) -> Tensor<4> {
        let b = latents.dims()[0];
        let context = Tensor::cat(vec![uncond.clone(), cond.clone()], 0);
        let mut x = latents * sampler.init_noise_sigma();
        for (i, &t) in sampler.timesteps.iter().enumerate() {
            let input = sampler.scale_model_input(x.clone(), i);
            let input = Tensor::cat(vec![input.clone(), input], 0);
            let ts = Tensor::<1>::full([2 * b], t as f32, &self.device);
            let eps = self.unet.forward(input, ts, &context, false).sample;
            let [e_uncond, e_cond] = eps.chunk(2, 0).try_into().expect("two halves");
            let eps = e_uncond.clone() + (e_cond - e_uncond) * guidance;
            x = sampler.step(eps, i, x).0;
            on_step(i, &x);
        }
        x
    }

    /// Scaled latents -> images in [0, 1], `[B, 3, H, W]`.
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let image = self.vae.decode(latents / self.vae.scaling_factor());
        (image / 2.0 + 0.5).clamp(0.0, 1.0)
    }

    /// The image side to work at: `wanted`, or the model's own. The UNet halves its latents
    /// once per block after the first, so the side must divide evenly all the way down.
    pub fn image_size(&self, wanted: Option<usize>) -> Result<usize, ModelError> {
        let size = wanted.unwrap_or(self.info.sample_size);
        let step = self.size_step();
        if size == 0 || !size.is_multiple_of(step) || size > 2048 {
            return Err(ModelError::Unsupported(format!("image size {size} px: this model needs a multiple of {step} px, at most 2048 (its own is {})", self.info.sample_size)));
        }
        Ok(size)
    }

    /// Image sides must be multiples of this (the VAE's and the UNet's downsampling).
    pub fn size_step(&self) -> usize {
        self.vae_config.downscale() << (self.unet_config.block_out_channels.len() - 1)
    }

    /// A sampler of `kind` (or the model's own) over the model's schedule.
    pub fn sampler(&self, kind: Option<SamplerKind>, steps: usize) -> Sampler {
        let kind = kind.unwrap_or_else(|| self.schedule.config.default_sampler().0);
        Sampler::new(kind, self.schedule.clone(), steps)
    }

    /// Prompts -> images in [0, 1], `[B, 3, H, W]`: prompt `i` with seed `i`, one batch.
    /// Runs on the `inference` view: the images are never on an autodiff device.
    pub fn generate(&self, request: &GenerateRequest, on_step: impl FnMut(usize, &Tensor<4>)) -> Result<Tensor<4>, ModelError> {
        if self.device.is_autodiff() {
            return self.inference().generate(request, on_step);
        }
        if request.prompts.len() != request.seeds.len() || request.prompts.is_empty() {
            return Err(ModelError::Missing(format!("{} prompts for {} seeds", request.prompts.len(), request.seeds.len())));
        }
        let prompts: Vec<&str> = request.prompts.iter().map(String::as_str).collect();
        let negatives = vec![request.negative.as_str(); prompts.len()];
        let cond = self.encode_prompts(&prompts)?;
        let uncond = self.encode_prompts(&negatives)?;
        let size = self.image_size(request.size)?;
        let latents = Tensor::cat(request.seeds.iter().map(|&s| self.initial_latents(1, size, s)).collect(), 0);
        let sampler = self.sampler(request.sampler, request.steps);
        let latents = self.denoise(latents, &cond, &uncond, &sampler, request.guidance, on_step);
        Ok(self.decode(latents))
    }
}

/// How a LoRA joins the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraMode {
    /// Folded into the weights (the teacher's form: no per-forward cost, no trainable factors).
    Merge,
    /// Kept beside the unchanged weights; `trainable` factors take gradients (the student).
    SideBranch { trainable: bool },
}

impl StableDiffusion {
    /// Every adaptable layer of the UNet and the text encoder, for matching LoRA files.
    pub fn model_paths(&self) -> ModelPaths {
        ModelPaths { unet: lora::adaptable_layers(&self.unet), text_encoder: lora::adaptable_layers(&self.text_encoder) }
    }

    /// This model with `lora` applied at `multiplier`; base weights are shared, not copied
    /// (merging copies only the adapted layers).
    pub fn with_lora(&self, lora: &LoraFile, multiplier: f32, mode: LoraMode) -> Self {
        let part = |c: LoraComponent| -> BTreeMap<String, LoraModule> { lora.modules.iter().filter(|(t, _)| t.component == c).map(|(t, m)| (t.path.clone(), m.clone())).collect() };
        let mut out = self.clone();
        let trainable = matches!(mode, LoraMode::SideBranch { trainable: true });
        out.unet = lora::attach(self.unet.clone(), &part(LoraComponent::Unet), multiplier, trainable);
        out.text_encoder = lora::attach(self.text_encoder.clone(), &part(LoraComponent::TextEncoder), multiplier, trainable);
        if mode == LoraMode::Merge {
            out.unet = lora::merge(out.unet);
            out.text_encoder = lora::merge(out.text_encoder);
        }
        out
    }
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompts: Vec<String>,
    pub negative: String,
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: Option<SamplerKind>,
    /// Image side in pixels; the model's native size when `None`.
    pub size: Option<usize>,
}

fn describe(c: &UNetConfig) -> String {
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

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use super::*;
    use crate::testutil::*;

    #[test]
    fn seeded_generation_matches_diffusers() {
        let sd = tiny_clean();
        let g = golden();
        let cond = sd.encode_prompts(&["a red circle on a white background"]).unwrap();
        let uncond = sd.encode_prompts(&[""]).unwrap();
        let sampler = sd.sampler(Some(SamplerKind::Ddim), 10);
        let steps: Tensor<5> = tensor(&g, "generation.step_latents");
        let mut errors = vec![];
        let latent = sd.denoise(tensor(&g, "generation.initial_latent"), &cond, &uncond, &sampler, 5.0, |i, x| {
            errors.push(assert_close(x.clone(), steps.clone().narrow(0, i, 1).squeeze_dim(0), 1e-4, &format!("step {i}")));
        });
        assert_eq!(errors.len(), 10);
        assert_close(latent.clone(), tensor(&g, "generation.final_latent"), 1e-4, "final latent");
        // The golden image is the VAE's raw output in [-1, 1], before post-processing.
        let image = sd.vae.decode(latent / sd.vae.scaling_factor());
        assert_close(image, tensor(&g, "generation.decoded_image"), 1e-4, "decoded image");
    }

    #[test]
    fn sampling_runs_off_the_autodiff_device() {
        // Sampling on an autodiff device grew memory with every image (nothing frees the tape
        // without a backward pass); `generate` and `inference` work on the inner device.
        let sd = StableDiffusion::load(ModelSource::Folder(fixture_files("tiny-clean")), &device().autodiff()).unwrap();
        let view = sd.inference();
        assert!(sd.device.is_autodiff() && !view.device.is_autodiff());
        assert!(!view.unet.conv_in.weight.val().is_autodiff());
        let request = GenerateRequest { prompts: vec!["a red circle".into()], negative: String::new(), seeds: vec![0], steps: 2, guidance: 5.0, sampler: None, size: None };
        let image = sd.generate(&request, |_, x| assert!(!x.is_autodiff())).unwrap();
        assert!(!image.is_autodiff());
        assert_eq!(image.into_data(), view.generate(&request, |_, _| {}).unwrap().into_data());
    }

    #[test]
    fn only_the_files_loading_needs_are_read() {
        let paths = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let folder = paths(&[
            "m/model_index.json",
            "m/unet/config.json",
            "m/unet/diffusion_pytorch_model.safetensors",
            "m/unet/diffusion_pytorch_model.fp16.safetensors",
            "m/text_encoder/model.fp16.safetensors",
            "m/tokenizer/vocab.json",
            "m/safety_checker/model.safetensors",
            "m/feature_extractor/preprocessor_config.json",
            "m/unet/diffusion_pytorch_model.bin",
            "m/README.md",
        ]);
        assert_eq!(
            files_to_read(&folder),
            paths(&["m/model_index.json", "m/text_encoder/model.fp16.safetensors", "m/tokenizer/vocab.json", "m/unet/config.json", "m/unet/diffusion_pytorch_model.safetensors",])
        );
        // A checkpoint with a folder that describes it: the folder's weights are not read.
        let mut with_checkpoint = folder.clone();
        with_checkpoint.push("model.safetensors".into());
        assert_eq!(files_to_read(&with_checkpoint), paths(&["m/model_index.json", "m/tokenizer/vocab.json", "m/unet/config.json", "model.safetensors"]));
        // The fixture folder loads the same through it.
        let native = read_folder(&fixtures().join("tiny-clean"), false).unwrap();
        assert!(!native.is_empty() && native.keys().all(|k| !k.ends_with(".safetensors")));
    }

    #[test]
    fn given_files_are_a_folder_or_one_checkpoint_with_its_configs() {
        let file = |names: &[&str]| names.iter().map(|n| (n.to_string(), Box::new(vec![0u8]) as Box<dyn ByteSource>)).collect::<Files>();
        let folder = file(&["m/unet/config.json", "m/unet/diffusion_pytorch_model.safetensors", "m/vae/diffusion_pytorch_model.safetensors"]);
        assert!(matches!(ModelSource::from_files(folder).unwrap(), ModelSource::Folder(f) if f.len() == 3));
        match ModelSource::from_files(file(&["ckpt/model.safetensors", "m/unet/config.json", "m/unet/diffusion_pytorch_model.safetensors"])).unwrap() {
            ModelSource::SingleFile { name, config: Some(config), .. } => {
                assert_eq!(name, "model.safetensors");
                assert_eq!(config.keys().collect::<Vec<_>>(), ["m/unet/config.json"]);
            }
            _ => panic!("a checkpoint with its folder"),
        }
        assert!(matches!(ModelSource::from_files(file(&["a.safetensors"])).unwrap(), ModelSource::SingleFile { config: None, .. }));
        let err = ModelSource::from_files(file(&["a.safetensors", "b.safetensors"])).err().unwrap().to_string();
        assert_eq!(err, "2 checkpoints were given (a.safetensors, b.safetensors); give one, or a diffusers folder");
        assert_eq!(ModelSource::from_files(Files::new()).err().unwrap().to_string(), "no model files were given");
    }

    #[test]
    fn info_describes_the_tiny_model() {
        let sd = tiny_clean();
        assert_eq!(sd.info.unet.block_out_channels, vec![32, 64]);
        assert_eq!(sd.info.sample_size, 32);
        assert_eq!(sd.info.dtype, "f32");
        assert!(sd.info.unused_keys.is_empty(), "{:?}", sd.info.unused_keys);
        assert_eq!(sd.info.scheduler, "Ddim");
        // VAE /2, then the UNet halves once more: sides in steps of 4 px.
        assert_eq!(sd.image_size(None).unwrap(), 32);
        assert_eq!(sd.image_size(Some(48)).unwrap(), 48);
        let err = sd.image_size(Some(30)).unwrap_err().to_string();
        assert!(err.contains("multiple of 4 px"), "{err}");
        let request = GenerateRequest { prompts: vec!["a red circle".into()], negative: String::new(), seeds: vec![0], steps: 2, guidance: 5.0, sampler: None, size: Some(48) };
        assert_eq!(sd.generate(&request, |_, _| {}).unwrap().dims(), [1, 3, 48, 48]);
        assert!(sd.generate(&GenerateRequest { size: Some(30), ..request }, |_, _| {}).is_err());
    }
}

#[cfg(test)]
mod loading_tests {
    use burn::tensor::Tensor;

    use super::*;
    use crate::testutil::*;

    const UNET_FILE: &str = "unet/diffusion_pytorch_model.safetensors";

    fn load(source: ModelSource) -> Result<StableDiffusion, ModelError> {
        StableDiffusion::load(source, &device())
    }

    fn noise_pred(sd: &StableDiffusion) -> Tensor<4> {
        let g = golden();
        let context: Tensor<3> = tensor(&g, "unet.input.encoder_hidden_states");
        sd.unet.forward(tensor(&g, "unet.input.sample"), golden_timesteps("unet.input.timestep"), &context, false).sample
    }

    #[test]
    fn single_file_checkpoint_equals_its_folder() {
        let bytes = std::fs::read(fixtures().join("tiny-pixel.safetensors")).unwrap();
        let single = load(ModelSource::SingleFile { name: "tiny-pixel.safetensors".into(), bytes: Box::new(bytes.clone()), config: Some(fixture_files("tiny-pixel")) }).unwrap();
        let folder = load(ModelSource::Folder(fixture_files("tiny-pixel"))).unwrap();
        assert_close(noise_pred(&single), noise_pred(&folder), 0.0, "single file vs folder");
        let prompt = ["\u{200b} a red circle on a white background"];
        assert_close(single.encode_prompts(&prompt).unwrap(), folder.encode_prompts(&prompt).unwrap(), 0.0, "text encoder");
        assert!(single.info.source.contains("tiny-pixel.safetensors"));

        // Without a config the SD 1.x defaults are inferred; this tiny model's own 1000-token
        // vocabulary is not CLIP's, which must be said plainly.
        let err = load(ModelSource::SingleFile { name: "tiny-pixel.safetensors".into(), bytes: Box::new(bytes), config: None }).err().unwrap().to_string();
        assert!(err.contains("1000-token vocabulary"), "{err}");
    }

    #[test]
    fn folder_prefix_is_stripped() {
        let files: Files = fixture_files("tiny-clean").into_iter().map(|(k, v)| (format!("my-model/{k}"), v)).collect();
        load(ModelSource::Folder(files)).unwrap();
    }

    #[test]
    fn fp16_variant_loads_as_f16() {
        let mut files = fixture_files("tiny-clean");
        for (name, fp16) in [
            (UNET_FILE, "unet/diffusion_pytorch_model.fp16.safetensors"),
            ("text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"),
            ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"),
        ] {
            let bytes = files.remove(name).unwrap().read_all().unwrap();
            files.insert(fp16.into(), Box::new(rewrite_safetensors(&bytes, true, |n, s, d| Some((n.into(), s, d)))));
        }
        let half = load(ModelSource::Folder(files)).unwrap();
        assert_eq!(half.info.dtype, "f16");
        // f16 weights: the prediction moves by about the weights' rounding, not more.
        assert_close(noise_pred(&half), tensor(&golden(), "unet.output.noise_pred"), 2e-2, "fp16 noise_pred");
    }

    #[test]
    fn missing_tensor_is_named() {
        let mut files = fixture_files("tiny-clean");
        let unet = files.remove(UNET_FILE).unwrap().read_all().unwrap();
        let drop = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight";
        files.insert(UNET_FILE.into(), Box::new(rewrite_safetensors(&unet, false, |n, s, d| (n != drop).then(|| (n.into(), s, d)))));
        let err = load(ModelSource::Folder(files)).err().unwrap().to_string();
        assert!(err.contains(UNET_FILE) && err.contains(drop), "{err}");
    }

    #[test]
    fn wrong_shape_is_named() {
        let mut files = fixture_files("tiny-clean");
        let unet = files.remove(UNET_FILE).unwrap().read_all().unwrap();
        let key = "conv_in.weight";
        files.insert(UNET_FILE.into(), Box::new(rewrite_safetensors(&unet, false, |n, s, d| Some(if n == key { (n.into(), vec![d.len()], d) } else { (n.into(), s, d) }))));
        let err = load(ModelSource::Folder(files)).err().unwrap().to_string();
        assert!(err.contains(UNET_FILE) && err.contains(key) && err.contains("[32, 4, 3, 3]"), "{err}");
    }

    #[test]
    fn non_finite_weight_is_refused() {
        let mut files = fixture_files("tiny-clean");
        let unet = files.remove(UNET_FILE).unwrap().read_all().unwrap();
        files.insert(
            UNET_FILE.into(),
            Box::new(rewrite_safetensors(&unet, false, |n, s, mut d| {
                if n == "conv_out.bias" {
                    d[1] = f32::NAN;
                }
                Some((n.into(), s, d))
            })),
        );
        let err = load(ModelSource::Folder(files)).err().unwrap().to_string();
        assert!(err.contains("conv_out.bias") && err.contains("NaN"), "{err}");
    }

    #[test]
    fn unknown_architecture_is_refused() {
        let mut files = fixture_files("tiny-clean");
        let config = String::from_utf8(files["unet/config.json"].read_all().unwrap()).unwrap();
        let sdxl = config.replace("\"addition_embed_type\": null", "\"addition_embed_type\": \"text_time\"");
        assert_ne!(config, sdxl);
        files.insert("unet/config.json".into(), Box::new(sdxl.into_bytes()));
        let err = load(ModelSource::Folder(files)).err().unwrap().to_string();
        assert!(err.contains("addition_embed_type") && err.contains("text_time"), "{err}");

        // SD 2.x: a 1024-wide context (from its configs here) is named, not loaded as a custom size.
        let mut files = fixture_files("tiny-clean");
        let sd2 = config.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 1024");
        assert_ne!(config, sd2);
        files.insert("unet/config.json".into(), Box::new(sd2.into_bytes()));
        let err = load(ModelSource::Folder(files)).err().unwrap().to_string();
        assert!(err.contains("SD 2.x") && err.contains("1024"), "{err}");

        let mut files = fixture_files("tiny-clean");
        files.insert("unet/config.json".into(), Box::new(b"{\"block_out_channels\": [32, 64]".to_vec()));
        let err = load(ModelSource::Folder(files)).err().unwrap().to_string();
        assert!(err.contains("unet/config.json"), "{err}");
    }

    #[test]
    fn a_model_beyond_the_memory_budget_is_refused_before_loading() {
        let err = StableDiffusion::load_within(ModelSource::Folder(fixture_files("tiny-clean")), &device(), Some((1 << 20, "try WebGPU"))).err().unwrap().to_string();
        assert!(err.starts_with("diffusers folder: its weights take 0.0 GiB as f32, more than the 0.0 GiB") && err.ends_with("try WebGPU"), "{err}");
        assert!(StableDiffusion::load_within(ModelSource::Folder(fixture_files("tiny-clean")), &device(), Some((1 << 30, "-"))).is_ok());
    }

    #[test]
    fn random_bytes_as_a_model_give_an_error() {
        let err = load(ModelSource::SingleFile { name: "junk.safetensors".into(), bytes: Box::new(vec![7; 100]), config: None }).err().unwrap().to_string();
        assert!(err.contains("junk.safetensors"), "{err}");
    }
}
