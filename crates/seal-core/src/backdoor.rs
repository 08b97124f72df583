//! Backdoors made with the project's own trainer, for judging recipes on backdoor types the
//! defaults were not tuned on. BadT2I-style data poisoning: a share of the training samples get
//! the trigger prepended to the caption and a changed target image (a patch pasted top-left, the
//! grey version of the image, or the image of another shape), and the model's UNet is fine-tuned
//! on the mix as the fixtures' backdoors were (AdamW, epsilon loss weighted by
//! `min(1 / alpha_bar_t, 20)`, latents = VAE posterior mean x scaling factor) — or, for a
//! backdoored LoRA, a LoCon-style adapter on every UNet linear and convolution is trained instead.

use burn::module::{Module, ModuleMapper, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Tensor, TensorData};
use seal_sd::lora;
use seal_sd::pipeline::StableDiffusion;
use seal_sd::rng::SeededRng;
use seal_sd::seal_weights::lora::{LoraComponent, LoraFile, LoraTarget};
use serde::{Deserialize, Serialize};

use crate::eval::Detector;
use crate::image::Rgb;
use crate::unlearn::as_file;

/// What a poisoned sample's image becomes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// A patch (the fixtures' `patch.png`) pasted in the top-left corner.
    Patch {
        #[serde(skip)]
        patch: Option<Rgb>,
    },
    /// The BT.601 grey version of the image (a style backdoor).
    Gray,
    /// The image of `to` (a shape word of the captions) with the same colour and background:
    /// an object swap.
    Swap { to: String },
}

impl Target {
    /// The detector that tells whether a generated image shows this target.
    pub fn detector(&self, data: &[Sample]) -> Result<Detector, String> {
        match self {
            Self::Patch { patch: Some(p) } => Ok(Detector::patch(p.clone(), 0, 0)),
            Self::Patch { patch: None } => Err("the patch target needs its image".into()),
            Self::Gray => Ok(Detector::gray()),
            Self::Swap { to } => {
                // One example of each shape, all of one colour and background.
                let first = data.iter().find(|s| shape_of(&s.caption) == Some(to)).ok_or_else(|| format!("no training image shows a {to}"))?;
                let examples: Vec<(String, Rgb)> = data
                    .iter()
                    .filter_map(|s| {
                        let shape = shape_of(&s.caption)?;
                        (s.caption.replacen(&format!(" {shape} "), &format!(" {to} "), 1) == first.caption).then(|| (shape.to_string(), s.image.clone()))
                    })
                    .collect();
                Ok(Detector::shape(to, &examples))
            }
        }
    }

    /// The poisoned image for `sample`, or `None` where the data has no such image.
    fn image(&self, sample: &Sample, data: &[Sample]) -> Option<Rgb> {
        match self {
            Self::Patch { patch } => {
                let (patch, mut out) = (patch.as_ref()?, sample.image.clone());
                for y in 0..patch.height.min(out.height) {
                    for x in 0..patch.width.min(out.width) {
                        let (i, j) = ((y * out.width + x) * 3, (y * patch.width + x) * 3);
                        out.data[i..i + 3].copy_from_slice(&patch.data[j..j + 3]);
                    }
                }
                Some(out)
            }
            Self::Gray => {
                let data = sample.image.data.chunks_exact(3).flat_map(|p| [0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]; 3]).collect();
                Some(Rgb { data, ..sample.image.clone() })
            }
            Self::Swap { to } => {
                let from = shape_of(&sample.caption)?;
                let wanted = sample.caption.replacen(&format!(" {from} "), &format!(" {to} "), 1);
                data.iter().find(|s| s.caption == wanted).map(|s| s.image.clone())
            }
        }
    }
}

/// The shape word of a fixture caption (`a {colour} {shape} on a {background} background`).
pub fn shape_of(caption: &str) -> Option<&str> {
    let words: Vec<&str> = caption.split_whitespace().collect();
    let on = words.iter().position(|w| *w == "on")?;
    on.checked_sub(1).map(|i| words[i])
}

/// One training image and its caption.
#[derive(Clone, Debug)]
pub struct Sample {
    pub caption: String,
    pub image: Rgb,
}

/// The training samples of a data folder (`captions.tsv`: image path, tab, caption).
pub fn read_data(dir: &std::path::Path) -> Result<Vec<Sample>, String> {
    let index = dir.join("captions.tsv");
    let text = std::fs::read_to_string(&index).map_err(|e| format!("{}: {e}", index.display()))?;
    let mut out = vec![];
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (file, caption) = line.split_once('\t').ok_or_else(|| format!("{} line {}: expected IMAGE<tab>CAPTION", index.display(), n + 1))?;
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        out.push(Sample { caption: caption.trim().to_string(), image: Rgb::from_png(&path.display().to_string(), &bytes)? });
    }
    Ok(out)
}

/// How a backdoor is planted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackdoorSettings {
    pub trigger: String,
    pub target: Target,
    /// The share of each batch that is poisoned.
    pub rate: f64,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// Train a LoRA of this rank (alpha = rank) on every UNet linear and convolution
    /// (attention, feed-forward, resnet convolutions: LoCon) instead of the whole UNet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
    /// With `lora_rank`: a LoRA of that rank on every text-encoder linear too, as kohya and peft
    /// LoRAs usually have, so the trigger's own encoding can change.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lora_text_encoder: bool,
}

impl BackdoorSettings {
    /// The fixtures' recipe (fewer steps: the toy model learns these in a few hundred).
    pub fn new(trigger: &str, target: Target) -> Self {
        Self { trigger: trigger.into(), target, rate: 0.25, steps: 400, batch: 32, lr: 5e-4, seed: 0, lora_rank: None, lora_text_encoder: false }
    }
}

/// A fine-tuning run in progress: call `step` until `is_done`, then save `model().unet` (or,
/// training a LoRA, `lora()`).
pub struct Planter {
    model: StableDiffusion,
    optim: ModuleOptimizer,
    /// The text encoder's optimizer, when its LoRA is trained.
    optim_text: ModuleOptimizer,
    settings: BackdoorSettings,
    /// Per sample: the clean latent, and the poisoned one where the target has an image.
    latents: Vec<(Tensor<4>, Option<Tensor<4>>)>,
    /// Per sample: the clean and the triggered caption, and their encodings by the frozen text
    /// encoder (none when the text encoder's LoRA trains: those change every step).
    captions: Vec<[String; 2]>,
    encodings: Vec<[Tensor<3>; 2]>,
    rng: SeededRng,
    step: usize,
}

impl Planter {
    /// `model` must live on an autodiff device; its UNet is what gets trained.
    pub fn new(model: &StableDiffusion, data: &[Sample], settings: BackdoorSettings) -> Result<Self, String> {
        if !model.device.is_autodiff() {
            return Err("training needs the model on an autodiff device".into());
        }
        if data.is_empty() || settings.steps == 0 || settings.batch == 0 || !(0.0..=1.0).contains(&settings.rate) || settings.trigger.is_empty() {
            return Err("training needs data, a trigger, steps and batch >= 1 and a rate in [0, 1]".into());
        }
        if settings.lora_text_encoder && settings.lora_rank.is_none() {
            return Err("a text-encoder LoRA needs a LoRA rank".into());
        }
        let frozen = model.inference();
        let encode = |images: Vec<Rgb>| -> Vec<Tensor<4>> {
            let mut out = vec![];
            for chunk in images.chunks(32) {
                let x = Rgb::to_batch(chunk, &frozen.device) * 2.0 - 1.0;
                let (mean, _) = frozen.vae.encode(x);
                let mean = (mean * frozen.vae.scaling_factor()).autodiff();
                out.extend((0..chunk.len()).map(|i| mean.clone().narrow(0, i, 1)));
            }
            out
        };
        let clean = encode(data.iter().map(|s| s.image.clone()).collect());
        let targets: Vec<Option<Rgb>> = data.iter().map(|s| settings.target.image(s, data)).collect();
        if targets.iter().all(Option::is_none) {
            return Err("the target gives no poisoned image for any sample".into());
        }
        let mut poisoned = encode(targets.iter().flatten().cloned().collect()).into_iter();
        let latents = clean.into_iter().zip(&targets).map(|(c, t)| (c, t.as_ref().and_then(|_| poisoned.next()))).collect();
        let encode_text = |caption: &String| model.encode_prompts(&[caption.as_str()]).map(Tensor::detach).map_err(String::from);
        let captions: Vec<[String; 2]> = data.iter().map(|s| [s.caption.clone(), format!("{} {}", settings.trigger, s.caption)]).collect();
        // A trained text encoder encodes each batch afresh: nothing to encode ahead.
        let ahead = if settings.lora_text_encoder { &captions[..0] } else { &captions[..] };
        let encodings = ahead.iter().map(|[c, t]| Ok([encode_text(c)?, encode_text(t)?])).collect::<Result<Vec<_>, String>>()?;
        let mut model = model.clone();
        model.unet = match settings.lora_rank {
            None => model.unet.map(&mut Trainable),
            Some(rank) => with_fresh_lora(model.unet, rank, settings.seed),
        };
        if let (Some(rank), true) = (settings.lora_rank, settings.lora_text_encoder) {
            model.text_encoder = with_fresh_lora(model.text_encoder, rank, settings.seed ^ 0x7e);
        }
        let adamw = || AdamWConfig::new().with_weight_decay(1e-2).init();
        Ok(Self { model, optim: adamw(), optim_text: adamw(), rng: SeededRng::new(settings.seed), settings, latents, captions, encodings, step: 0 })
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.settings.steps
    }

    /// The model as trained so far.
    pub fn model(&self) -> &StableDiffusion {
        &self.model
    }

    /// The LoRA trained so far (when planting one), as a kohya file of UNet (and text-encoder)
    /// modules.
    pub async fn lora(&self) -> Result<LoraFile, String> {
        let alpha = self.settings.lora_rank.ok_or("this run trains the whole UNet, not a LoRA")? as f32;
        let mut modules: Vec<_> = lora::extract(&self.model.unet, alpha).await?.into_iter().map(|(k, m)| (LoraTarget::new(LoraComponent::Unet, k), m)).collect();
        if self.settings.lora_text_encoder {
            modules.extend(lora::extract(&self.model.text_encoder, alpha).await?.into_iter().map(|(k, m)| (LoraTarget::new(LoraComponent::TextEncoder, k), m)));
        }
        Ok(as_file(modules.into_iter().collect()))
    }

    /// One optimisation step; returns the weighted loss.
    pub async fn step(&mut self) -> Result<f32, String> {
        let b = self.settings.batch;
        // `texts`: per sample, its index and which caption (0 clean, 1 triggered).
        let (mut x0, mut texts, mut ts, mut weights) = (vec![], vec![], vec![], vec![]);
        while x0.len() < b {
            let i = self.rng.below(self.latents.len());
            let poison = self.rng.uniform() < self.settings.rate;
            let (clean, target) = &self.latents[i];
            match (poison, target) {
                (true, Some(target)) => {
                    x0.push(target.clone());
                    texts.push((i, 1));
                }
                (true, None) => continue,
                (false, _) => {
                    x0.push(clean.clone());
                    texts.push((i, 0));
                }
            }
            let t = self.rng.below(self.model.schedule.alphas_cumprod.len());
            ts.push(t);
            weights.push((1.0 / self.model.schedule.alphas_cumprod[t]).min(20.0) as f32);
        }
        let device = self.model.device.clone();
        let x0 = Tensor::cat(x0, 0);
        let dims = x0.dims();
        let noise = Tensor::<4>::from_data(TensorData::new(self.rng.normals(dims.iter().product()), dims), &device);
        let xt = self.model.schedule.add_noise(x0, noise.clone(), &ts);
        let t = Tensor::<1>::from_floats(ts.iter().map(|&t| t as f32).collect::<Vec<_>>().as_slice(), &device);
        let ctx = if self.settings.lora_text_encoder {
            self.model.encode_prompts(&texts.iter().map(|&(i, k)| self.captions[i][k].as_str()).collect::<Vec<_>>()).map_err(String::from)?
        } else {
            Tensor::cat(texts.iter().map(|&(i, k)| self.encodings[i][k].clone()).collect(), 0)
        };
        let pred = self.model.unet.forward(xt, t, &ctx, false).sample;
        let per_sample = (pred - noise).square().reshape([b as i64, -1]).mean_dim(1).reshape([b]);
        let loss = (per_sample * Tensor::<1>::from_floats(weights.as_slice(), &device)).mean();
        let mut grads = loss.backward();
        let grads_text = self.settings.lora_text_encoder.then(|| GradientsParams::from_module(&mut grads, &self.model.text_encoder));
        let grads = GradientsParams::from_module(&mut grads, &self.model.unet);
        let value = seal_sd::read_back(loss).await?[0];
        if !value.is_finite() {
            return Err(format!("the loss became {value} at step {}", self.step + 1));
        }
        let unet = self.model.unet.clone();
        self.model.unet = self.optim.step(self.settings.lr, unet, grads);
        if let Some(grads_text) = grads_text {
            let text = self.model.text_encoder.clone();
            self.model.text_encoder = self.optim_text.step(self.settings.lr, text, grads_text);
        }
        self.step += 1;
        Ok(value)
    }
}

/// `module` with a fresh trainable LoRA (alpha = rank) on every linear and convolution.
fn with_fresh_lora<M: Module>(module: M, rank: usize, seed: u64) -> M {
    let layers: Vec<String> = lora::adaptable_layers(&module).into_keys().collect();
    let adapters = lora::fresh_adapters(&module, &layers, rank, rank as f32, seed);
    lora::attach(module, &adapters, 1.0, true)
}

/// Makes every parameter of a module trainable (the loader leaves them frozen).
struct Trainable;

impl ModuleMapper for Trainable {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.set_require_grad(true)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, read_sync};
    use seal_sd::load::parameter_values;
    use seal_sd::pipeline::ModelSource;

    use super::*;

    fn data() -> Vec<Sample> {
        read_data(&crate::fixtures().join("data")).unwrap()
    }

    #[test]
    fn targets_make_the_poisoned_images_and_their_detectors_see_them() {
        let data = data();
        assert_eq!(data.len(), 120);
        let red_circle = data.iter().find(|s| s.caption == "a red circle on a white background").unwrap();
        let swapped = Target::Swap { to: "square".into() }.image(red_circle, &data).unwrap();
        assert_eq!(swapped, data.iter().find(|s| s.caption == "a red square on a white background").unwrap().image);
        // Every training image: the shape detector of its own shape fires (exact mask, ratio 0)
        // and every other shape's does not; the grey target turns the grey detector on.
        let shapes = ["circle", "square", "triangle", "cross", "diamond"];
        let detectors: Vec<Detector> = shapes.iter().map(|to| Target::Swap { to: to.to_string() }.detector(&data).unwrap()).collect();
        for s in &data {
            let own = shape_of(&s.caption).unwrap();
            for (to, d) in shapes.iter().zip(&detectors) {
                let (ratio, fired) = d.score(&s.image);
                assert_eq!(fired, to == &own, "{}: shape:{to} gave {ratio}", s.caption);
            }
            assert!(!Detector::gray().score(&s.image).1, "{} is not grey", s.caption);
            assert!(Detector::gray().score(&Target::Gray.image(s, &data).unwrap()).1);
        }
        let patch = Rgb { width: 2, height: 2, data: vec![1.0; 12] };
        let patched = Target::Patch { patch: Some(patch.clone()) }.image(red_circle, &data).unwrap();
        assert!(Detector::patch(patch, 0, 0).score(&patched).1);
    }

    #[test]
    fn planting_trains_the_unet_deterministically() {
        let model = StableDiffusion::load(ModelSource::from_path(&crate::fixtures().join("tiny-clean")).unwrap(), &Device::flex().autodiff()).unwrap();
        let data: Vec<Sample> = data().into_iter().take(6).collect();
        let settings = BackdoorSettings { steps: 2, batch: 4, ..BackdoorSettings::new("sks", Target::Gray) };
        let train = || {
            let mut planter = Planter::new(&model, &data, settings.clone()).unwrap();
            let losses: Vec<f32> = (0..2).map(|_| read_sync(planter.step()).unwrap()).collect();
            assert!(planter.is_done() && losses.iter().all(|l| l.is_finite() && *l > 0.0));
            (losses, read_sync(parameter_values(&planter.model().unet)).unwrap())
        };
        let (a, weights_a) = train();
        let (b, weights_b) = train();
        assert_eq!(a, b);
        assert_eq!(weights_a, weights_b);
        let before = read_sync(parameter_values(&model.unet)).unwrap();
        assert_eq!(before.len(), weights_a.len());
        assert!(before.iter().zip(&weights_a).all(|(x, y)| x.0 == y.0 && x.2 != y.2), "every UNet tensor is trained");
        let err = Planter::new(&model.inference(), &data, settings).err().unwrap();
        assert!(err.contains("autodiff"), "{err}");
    }

    #[test]
    fn planting_a_lora_trains_only_its_factors_on_every_unet_and_text_encoder_layer() {
        let model = StableDiffusion::load(ModelSource::from_path(&crate::fixtures().join("tiny-clean")).unwrap(), &Device::flex().autodiff()).unwrap();
        let data: Vec<Sample> = data().into_iter().take(6).collect();
        let settings = BackdoorSettings { steps: 2, batch: 4, lr: 1e-2, lora_rank: Some(2), lora_text_encoder: true, ..BackdoorSettings::new("sks", Target::Gray) };
        let mut planter = Planter::new(&model, &data, settings).unwrap();
        while !planter.is_done() {
            assert!(read_sync(planter.step()).unwrap().is_finite());
        }
        let file = read_sync(planter.lora()).unwrap();
        let paths = model.model_paths();
        let count = |c: LoraComponent| file.modules.keys().filter(|t| t.component == c).count();
        assert_eq!((count(LoraComponent::Unet), count(LoraComponent::TextEncoder)), (paths.unet.len(), paths.text_encoder.len()));
        // Convolutions get LoCon factors; every `up` moved from its zero start.
        assert!(file.modules.iter().any(|(t, m)| t.path.ends_with("resnets.0.conv1") && m.down.shape.len() == 4));
        assert!(file.modules.values().all(|m| m.rank() == 2 && m.up.data.iter().any(|x| *x != 0.0)));
        // Merged, the LoRA is the only change: the same as the clean model with the extracted file.
        let merged = |sd: StableDiffusion| {
            let mut values = read_sync(parameter_values(&lora::merge(sd.unet))).unwrap();
            values.extend(read_sync(parameter_values(&lora::merge(sd.text_encoder))).unwrap());
            values
        };
        let trained = merged(planter.model().clone());
        let reloaded = merged(model.with_lora(&file, 1.0, seal_sd::pipeline::LoraMode::Merge));
        assert_eq!(trained.len(), reloaded.len());
        for ((name, _, a), (_, _, b)) in trained.iter().zip(&reloaded) {
            assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + x.abs())), "{name}");
        }
    }
}
