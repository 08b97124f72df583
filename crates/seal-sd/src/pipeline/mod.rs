//! A whole text-to-image model: loading from a diffusers folder or a single original-layout
//! file (as bytes or paths), prompt encoding, sampling with classifier-free guidance, decoding,
//! and LoRA application. Where the files come from is `source`; the configs, `configs`.

mod configs;
mod source;

use std::collections::BTreeMap;
use std::rc::Rc;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use seal_weights::lora::{LoraComponent, LoraFile, LoraModule, ModelPaths};
use seal_weights::{DType, WeightFile};
use serde::Serialize;

use crate::ModelError;
use crate::clip::{ClipTextConfig, ClipTextModel};
pub use crate::load::Precision;
use crate::load::{load_module, load_module_where, parameter_count, valid_loaded};
use crate::lora;
use crate::rng::SeededRng;
use crate::scheduler::{NoiseSchedule, Sampler, SamplerKind, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};

use configs::{Configs, describe, folder_component, folder_configs, infer_configs};
pub use source::{Files, ModelSource, files_to_read, normalize_folder, read_folder};

/// What was recognised, for the user to see before any heavy work.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub source: String,
    pub architecture: String,
    pub unet_parameters: usize,
    pub text_encoder_parameters: usize,
    pub vae_parameters: usize,
    pub dtype: String,
    /// Its matrices and kernels are kept in f16 on the device, and compute in f16 (`Precision`).
    pub half: bool,
    pub unet: UNetSummary,
    pub sample_size: usize,
    pub scheduler: String,
    /// Tensors in the files that no module asked for.
    pub unused_keys: Vec<String>,
    pub notes: Vec<String>,
    /// Set, with the reason, when only what the instant seal needs was loaded: the whole
    /// model would not fit the engine.
    pub partial: Option<String>,
}

impl ModelInfo {
    /// The bytes a weight takes on the device (its few f32 biases and norms aside).
    pub fn weight_size(&self) -> u64 {
        if self.half { 2 } else { 4 }
    }
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

impl StableDiffusion {
    pub fn load(source: ModelSource, device: &Device) -> Result<Self, ModelError> {
        Self::load_within(source, device, Scope::Whole, Precision::F32)
    }

    /// `load` of what `scope` asks for, decided before any weight is read (`info.partial` says
    /// when the model was loaded in part), its weights stored in `precision`.
    pub fn load_within(source: ModelSource, device: &Device, scope: Scope, precision: Precision) -> Result<Self, ModelError> {
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
        let bytes = |c: &seal_weights::Component, wanted: &dyn Fn(&str) -> bool, precision: Precision| -> u64 {
            c.keys()
                .filter(|k| wanted(k))
                .filter_map(|k| Some((c.shape(k)?, c.dtype(k)?)))
                .map(|(shape, dtype)| precision.bytes(dtype, shape.len()) * shape.iter().product::<usize>() as u64)
                .sum()
        };
        let whole = |precision| bytes(&unet_w, &|_| true, precision) + bytes(&text_w, &|_| true, precision) + bytes(&vae_w, &|_| true, precision);
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        // An engine that computes in f16 rounds an f32 (or bf16) model to f16 rather than load
        // it in part.
        let mut notes = notes;
        let precision = match scope {
            Scope::Within { budget, .. } if precision == Precision::AsStored && whole(precision) > budget && whole(Precision::F16) <= budget => {
                notes.push(format!(
                    "{dtype} weights rounded to f16: as stored they take {:.1} GiB, more than the {:.1} GiB this engine can hold",
                    gib(whole(precision)),
                    gib(budget)
                ));
                Precision::F16
            }
            _ => precision,
        };
        let needed = whole(precision);
        let instant = bytes(&unet_w, &is_instant_seal_weight, precision) + bytes(&text_w, &|_| true, precision);
        let half = unet_w.keys().any(|k| unet_w.shape(k).zip(unet_w.dtype(k)).is_some_and(|(shape, dtype)| precision.bytes(dtype, shape.len()) == 2));
        let stored = if half { "with matrices in f16" } else { "as f32" };
        let loaded =
            format!("only the text encoder and the UNet's cross-attention keys and values were loaded ({:.2} GiB {stored}), which is all the instant seal needs", gib(instant));
        let whole = format!("the whole model takes {:.1} GiB", gib(needed));
        let partial = match scope {
            Scope::Whole => None,
            Scope::InstantSeal => Some(format!("{loaded} ({whole})")),
            // Over the budget, the instant seal's weights alone may still fit: load those.
            Scope::Within { budget, hint } if instant > budget => {
                return Err(ModelError::TooLarge { model: source_name, needed_gib: gib(needed), budget_gib: gib(budget), hint: hint.into() });
            }
            Scope::Within { budget, hint } if needed > budget => Some(format!("{loaded}: {whole}, more than the {:.1} GiB this engine can hold; {hint}", gib(budget))),
            Scope::Within { .. } => None,
        };
        let unet = UNet2DConditionModel::new(&unet_config, device);
        let (unet, mut unused) = if partial.is_some() { load_module_where(unet, &unet_w, &is_instant_seal_weight, precision)? } else { load_module(unet, &unet_w, precision)? };
        let (text_encoder, unused_text) = load_module(ClipTextModel::new(&text_config, device), &text_w, precision)?;
        let vae = AutoencoderKL::new(&vae_config, device);
        let (vae, unused_vae) = if partial.is_some() { (vae, vec![]) } else { load_module(vae, &vae_w, precision)? };
        // transformers keeps `position_ids` as a buffer in some exports; it is not a weight.
        unused.extend(unused_text.into_iter().filter(|k| !k.ends_with("position_ids")).map(|k| format!("text_encoder: {k}")));
        unused.extend(unused_vae.into_iter().map(|k| format!("vae: {k}")));
        let mut sd = Self::from_parts(tokenizer, text_encoder, unet, vae, unet_config, vae_config, scheduler, source_name, device);
        sd.info.dtype = dtype.into();
        sd.info.half = half;
        sd.info.unused_keys = unused;
        sd.info.notes.splice(0..0, notes);
        sd.info.partial = partial;
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
            half: false,
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
            partial: None,
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
        if self.info.partial.is_some() {
            let unet = valid_loaded(self.unet.clone());
            return Self { text_encoder: self.text_encoder.valid(), unet, device: self.device.clone().inner(), ..self.clone() };
        }
        Self { text_encoder: self.text_encoder.valid(), unet: self.unet.valid(), vae: self.vae.valid(), device: self.device.clone().inner(), ..self.clone() }
    }

    /// Refuses `what` on a model loaded in part (for the instant seal only), saying why.
    pub fn require_whole(&self, what: &str) -> Result<(), ModelError> {
        match &self.info.partial {
            Some(why) => Err(ModelError::Partial { what: what.into(), why: why.clone() }),
            None => Ok(()),
        }
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
        let mut run = Denoising::new(latents, cond, uncond, guidance);
        while let Some(i) = run.step(self, sampler) {
            on_step(i, run.latents());
        }
        run.latents
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
    pub fn generate(&self, request: &GenerateRequest, mut on_step: impl FnMut(usize, &Tensor<4>)) -> Result<Tensor<4>, ModelError> {
        let mut run = Generation::new(self, request)?;
        let mut images = vec![];
        while let Some(unit) = run.step() {
            match unit {
                Unit::Sampled(i) => on_step(i, run.latents()),
                Unit::Decoded(image) => images.push(image),
            }
        }
        Ok(Tensor::cat(images, 0))
    }
}

/// What one `Generation::step` did.
#[allow(clippy::large_enum_variant)] // returned and matched at once, never stored
pub enum Unit {
    /// Sampler step `i` of the whole batch.
    Sampled(usize),
    /// Decoded the batch's next image (in order), `[1, 3, H, W]` in [0, 1].
    Decoded(Tensor<4>),
}

/// A generation in progress, one unit of work at a time: each sampler step of the batch, then
/// each image's decoding (one at a time: at 512 px a batch of decoder activations takes GiBs).
/// A caller reports progress and can be cancelled between units, which matters where one
/// generation takes minutes (the page's CPU engine on an SD 1.5-size model).
pub struct Generation {
    /// The inference view of the model generating.
    model: StableDiffusion,
    sampler: Sampler,
    run: Denoising,
    /// Images decoded so far.
    decoded: usize,
}

impl Generation {
    /// Encodes the prompts and draws the initial latents (prompt `i` with seed `i`).
    pub fn new(model: &StableDiffusion, request: &GenerateRequest) -> Result<Self, ModelError> {
        model.require_whole("generating images")?;
        if request.prompts.len() != request.seeds.len() || request.prompts.is_empty() {
            return Err(ModelError::Missing(format!("{} prompts for {} seeds", request.prompts.len(), request.seeds.len())));
        }
        let model = model.inference();
        let prompts: Vec<&str> = request.prompts.iter().map(String::as_str).collect();
        let negatives = vec![request.negative.as_str(); prompts.len()];
        let cond = model.encode_prompts(&prompts)?;
        let uncond = model.encode_prompts(&negatives)?;
        let size = model.image_size(request.size)?;
        let latents = Tensor::cat(request.seeds.iter().map(|&s| model.initial_latents(1, size, s)).collect(), 0);
        let sampler = model.sampler(request.sampler, request.steps);
        let run = Denoising::new(latents, &cond, &uncond, request.guidance);
        Ok(Self { model, sampler, run, decoded: 0 })
    }

    /// The units a generation of `request` takes: its sampler steps (at least one), then one
    /// decoding per image.
    pub fn units(request: &GenerateRequest) -> usize {
        request.steps.max(1) + request.prompts.len()
    }

    /// Does the next unit; `None` once every image is decoded.
    pub fn step(&mut self) -> Option<Unit> {
        if let Some(i) = self.run.step(&self.model, &self.sampler) {
            return Some(Unit::Sampled(i));
        }
        let i = self.decoded;
        if i == self.run.latents.dims()[0] {
            return None;
        }
        self.decoded += 1;
        Some(Unit::Decoded(self.model.decode(self.run.latents.clone().narrow(0, i, 1))))
    }

    /// The latents as they stand (see `Denoising::latents`).
    pub fn latents(&self) -> &Tensor<4> {
        self.run.latents()
    }
}

/// A UNet layer the instant seal edits (and reads): cross-attention's key and value projections.
pub fn is_instant_seal_layer(path: &str) -> bool {
    lora::is_cross_attention(path, &lora::Projection::FROM_TEXT)
}

fn is_instant_seal_weight(key: &str) -> bool {
    key.strip_suffix(".weight").is_some_and(is_instant_seal_layer)
}

/// How much of a model `StableDiffusion::load_within` loads.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// All of it.
    Whole,
    /// All of it when its weights, stored in the precision asked for, fit `budget` bytes (with
    /// `Precision::AsStored`, also when rounded to f16 they do); else what the instant seal
    /// needs when that fits, else nothing (an error); `hint` says what to try instead.
    Within { budget: u64, hint: &'a str },
    /// What the instant seal needs: the text encoder and the UNet's cross-attention keys and
    /// values (its only work, so the rest need not be read).
    InstantSeal,
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
        // A model loaded in part takes the adapters of the layers it holds; the rest do not
        // change what the instant seal computes.
        let held = |c: LoraComponent, path: &str| c == LoraComponent::TextEncoder || self.info.partial.is_none() || is_instant_seal_layer(path);
        let part = |c: LoraComponent| -> BTreeMap<String, LoraModule> {
            lora.modules.iter().filter(|(t, _)| t.component == c && held(c, &t.path)).map(|(t, m)| (t.path.clone(), m.clone())).collect()
        };
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

/// A classifier-free-guided sampling in progress, one sampler step at a time: long callers
/// (sealing's trajectory pool) report progress and can be cancelled between steps.
pub struct Denoising {
    latents: Tensor<4>,
    /// The unconditional and conditional contexts stacked, `[2B, T, D]`.
    context: Tensor<3>,
    guidance: f64,
    /// Sampler steps done.
    done: usize,
}

impl Denoising {
    /// Starts from initial `latents` (unit variance; scaled here to the sampler's first sigma).
    pub fn new(latents: Tensor<4>, cond: &Tensor<3>, uncond: &Tensor<3>, guidance: f64) -> Self {
        Self { latents, context: Tensor::cat(vec![uncond.clone(), cond.clone()], 0), guidance, done: 0 }
    }

    /// Takes the next step of `sampler` with `model`'s UNet; `None` when all are done, else the
    /// step's index.
    pub fn step(&mut self, model: &StableDiffusion, sampler: &Sampler) -> Option<usize> {
        let i = self.done;
        let &t = sampler.timesteps.get(i)?;
        if i == 0 {
            self.latents = self.latents.clone() * sampler.init_noise_sigma();
        }
        let b = self.latents.dims()[0];
        let input = sampler.scale_model_input(self.latents.clone(), i);
        let input = Tensor::cat(vec![input.clone(), input], 0);
        let ts = Tensor::<1>::full([2 * b], t as f32, &model.device);
        let eps = model.unet.forward(input, ts, &self.context, false).sample;
        let [e_uncond, e_cond] = eps.chunk(2, 0).try_into().expect("two halves");
        let eps = e_uncond.clone() + (e_cond - e_uncond) * self.guidance;
        self.latents = sampler.step(eps, i, self.latents.clone()).0;
        self.done += 1;
        Some(i)
    }

    /// The latents as they stand: after `step` returned `i`, those at the sampler's timestep
    /// `i + 1` (the clean end after the last).
    pub fn latents(&self) -> &Tensor<4> {
        &self.latents
    }
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
    fn a_generation_takes_each_sampler_step_then_decodes_one_image_at_a_time() {
        let sd = tiny_clean();
        let request = GenerateRequest {
            prompts: vec!["a red circle".into(), "a blue square".into()],
            negative: String::new(),
            seeds: vec![0, 1],
            steps: 3,
            guidance: 5.0,
            sampler: None,
            size: None,
        };
        let mut run = Generation::new(&sd, &request).unwrap();
        assert_eq!(Generation::units(&request), 3 + 2);
        let (mut sampled, mut images) = (vec![], vec![]);
        while let Some(unit) = run.step() {
            match unit {
                Unit::Sampled(i) => sampled.push(i),
                Unit::Decoded(image) => images.push(image),
            }
            assert!(images.is_empty() || sampled.len() == 3, "decoding after sampling");
        }
        assert_eq!((sampled, images.len()), (vec![0, 1, 2], 2));
        // One image at a time decodes what the whole batch would.
        assert_close(Tensor::cat(images, 0), sd.decode(run.latents().clone()), 1e-5, "per-image decoding");
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
        let files = || {
            let mut files = fixture_files("tiny-clean");
            for (name, fp16) in [
                (UNET_FILE, "unet/diffusion_pytorch_model.fp16.safetensors"),
                ("text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"),
                ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"),
            ] {
                let bytes = files.remove(name).unwrap().read_all().unwrap();
                files.insert(fp16.into(), Box::new(rewrite_safetensors(&bytes, true, |n, s, d| Some((n.into(), s, d)))));
            }
            ModelSource::Folder(files)
        };
        let half = load(files()).unwrap();
        assert_eq!(half.info.dtype, "f16");
        assert!(!half.info.half, "widened to f32 unless asked");
        // f16 weights: the prediction moves by about the weights' rounding, not more.
        assert_close(noise_pred(&half), tensor(&golden(), "unet.output.noise_pred"), 2e-2, "fp16 noise_pred");
        // Kept as stored: f16 on the device, counted at 2 bytes a weight.
        let kept = StableDiffusion::load_within(files(), &device(), Scope::InstantSeal, Precision::AsStored).unwrap();
        assert!(kept.info.half && kept.info.weight_size() == 2);
        assert!(kept.info.partial.as_ref().is_some_and(|why| why.contains("GiB with matrices in f16")), "{:?}", kept.info.partial);
        let kept = StableDiffusion::load_within(files(), &device(), Scope::Whole, Precision::AsStored).unwrap();
        assert_close(noise_pred(&kept), tensor(&golden(), "unet.output.noise_pred"), 2e-2, "fp16 kept in f16: noise_pred");
    }

    #[test]
    fn a_weight_beyond_f16_is_refused_in_f16() {
        let mut files = fixture_files("tiny-clean");
        let unet = files.remove(UNET_FILE).unwrap().read_all().unwrap();
        let big = |n: &str, s, mut d: Vec<f32>| {
            if n == "conv_in.weight" {
                d[3] = 1e5;
            }
            Some((n.to_string(), s, d))
        };
        files.insert(UNET_FILE.into(), Box::new(rewrite_safetensors(&unet, false, big)));
        let err = StableDiffusion::load_within(ModelSource::Folder(files), &device(), Scope::Whole, Precision::F16).err().unwrap().to_string();
        assert_eq!(err, format!("{UNET_FILE}: tensor conv_in.weight holds 100000, beyond the range of f16; load the model in f32"));
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
    fn a_model_beyond_the_memory_budget_loads_in_part_or_is_refused_before_loading() {
        let load =
            |budget: u64| StableDiffusion::load_within(ModelSource::Folder(fixture_files("tiny-clean")), &device(), Scope::Within { budget, hint: "try WebGPU" }, Precision::F32);
        // Below even the text encoder: refused.
        let err = load(1 << 10).err().unwrap().to_string();
        assert!(err.starts_with("diffusers folder: its weights take 0.0 GiB on this engine, more than the 0.0 GiB") && err.ends_with("try WebGPU"), "{err}");
        // Below the whole model: the instant seal's weights alone, saying so.
        let part = load(1 << 20).unwrap();
        assert!(part.info.partial.as_ref().is_some_and(|why| why.starts_with("only the text encoder") && why.ends_with("try WebGPU")), "{:?}", part.info.partial);
        assert!(part.require_whole("generating images").is_err() && !part.vae.decoder.conv_in.weight.is_initialized());
        assert!(load(1 << 30).unwrap().info.partial.is_none());
        // Asked for: the same part, whatever the budget.
        let part = StableDiffusion::load_within(ModelSource::Folder(fixture_files("tiny-clean")), &device(), Scope::InstantSeal, Precision::F32).unwrap();
        assert!(part.info.partial.as_ref().is_some_and(|why| why.ends_with("which is all the instant seal needs (the whole model takes 0.0 GiB)")), "{:?}", part.info.partial);
        assert!(!part.unet.conv_in.weight.is_initialized() && part.text_encoder.text_model.final_layer_norm.weight.is_initialized());
    }

    #[test]
    fn an_engine_computing_in_f16_rounds_an_f32_model_to_f16_rather_than_load_it_in_part() {
        let load = |budget: u64, precision| {
            StableDiffusion::load_within(ModelSource::Folder(fixture_files("tiny-clean")), &device(), Scope::Within { budget, hint: "try WebGPU" }, precision).unwrap()
        };
        let f32 = load(1 << 30, Precision::AsStored);
        let params = (f32.info.unet_parameters + f32.info.text_encoder_parameters + f32.info.vae_parameters) as u64;
        assert!(!f32.info.half && f32.info.notes.iter().all(|n| !n.contains("rounded")), "fits as stored: kept f32");
        // Between its f16 size (2 bytes a matrix weight, 4 a bias) and its f32 size.
        let rounded = load(3 * params, Precision::AsStored);
        assert!(rounded.info.half && rounded.info.partial.is_none() && rounded.info.dtype == "f32");
        assert!(rounded.info.notes.iter().any(|n| n.starts_with("f32 weights rounded to f16")), "{:?}", rounded.info.notes);
        assert_eq!(rounded.unet.conv_in.weight.val().dtype(), burn::tensor::DType::F16);
        // An engine that computes in f32 only loads the instant seal's part instead.
        assert!(load(3 * params, Precision::F32).info.partial.is_some());
    }

    /// f16 storage: matrices and kernels in f16 computing in f16, everything else f32, within
    /// f16's rounding of diffusers' f32 outputs; a merged LoRA keeps its weights' precision.
    #[test]
    fn weights_kept_in_f16_stay_close_to_diffusers() {
        let files = || ModelSource::Folder(fixture_files("tiny-clean"));
        let sd = StableDiffusion::load_within(files(), &device(), Scope::Whole, Precision::F16).unwrap();
        assert!(sd.info.half);
        assert_eq!(sd.unet.conv_in.weight.val().dtype(), burn::tensor::DType::F16);
        assert_eq!(sd.unet.conv_in.bias.as_ref().unwrap().val().dtype(), burn::tensor::DType::F32);
        let g = golden();
        let hidden =
            sd.encode_prompts(&["a red circle on a white background", "\u{200b} a blue square on a gray background", "\u{0231} a green triangle on a black background"]).unwrap();
        assert_eq!(hidden.dtype(), burn::tensor::DType::F32);
        assert_close(hidden, tensor(&g, "text_encoder.last_hidden_state"), 5e-3, "f16 weights: last_hidden_state");
        let context: Tensor<3> = tensor(&g, "unet.input.encoder_hidden_states");
        let eps = sd.unet.forward(tensor(&g, "unet.input.sample"), golden_timesteps("unet.input.timestep"), &context, false).sample;
        assert_close(eps, tensor(&g, "unet.output.noise_pred"), 5e-3, "f16 weights: noise_pred");
        let image = sd.vae.decode(tensor(&g, "vae.decode.input_latent_unscaled"));
        assert_close(image, tensor(&g, "vae.decode.output"), 5e-3, "f16 weights: vae decode");

        let file = WeightFile::open(&fixtures().join("lora/weak_lora_kohya.safetensors")).unwrap();
        let lora = seal_weights::lora::parse_lora(&file, &sd.model_paths()).unwrap();
        let q = |sd: &StableDiffusion| sd.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight.val();
        let merged = sd.with_lora(&lora, 1.0, LoraMode::Merge);
        assert_eq!(q(&merged).dtype(), burn::tensor::DType::F16);
        let f32 = StableDiffusion::load(files(), &device()).unwrap().with_lora(&lora, 1.0, LoraMode::Merge);
        assert_close(q(&merged).cast(burn::tensor::DType::F32), q(&f32), 1e-3, "f16 weights: merged q_proj");

        // As stored: an f32 file stays f32, and the budget counts 4 bytes a weight.
        let sd = StableDiffusion::load_within(files(), &device(), Scope::Whole, Precision::AsStored).unwrap();
        assert!(!sd.info.half && sd.unet.conv_in.weight.val().dtype() == burn::tensor::DType::F32);
    }

    #[test]
    fn random_bytes_as_a_model_give_an_error() {
        let err = load(ModelSource::SingleFile { name: "junk.safetensors".into(), bytes: Box::new(vec![7; 100]), config: None }).err().unwrap().to_string();
        assert!(err.contains("junk.safetensors"), "{err}");
    }
}
