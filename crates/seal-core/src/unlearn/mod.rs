//! SKD-CAG sealing: the backdoored model teaches itself. The teacher (the model as loaded,
//! frozen) sees clean prompts; the student (the same weights plus a LoRA on the UNet's
//! cross-attention) sees triggered prompts and learns to predict what the teacher predicts
//! without the trigger, with cross-attention guidance that carries gradient.

pub mod attention;
pub mod instant;
pub mod memory;
pub mod run;
pub mod settings;
pub mod tokens;

use std::collections::BTreeMap;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Tensor, TensorData};
use seal_sd::lora::{self, cross_attention_targets};
use seal_sd::pipeline::{Denoising, LoraMode, StableDiffusion};
use seal_sd::rng::SeededRng;
use seal_sd::scheduler::{Sampler, SamplerKind};
use seal_sd::seal_weights::DType;
use seal_sd::seal_weights::lora::{LoraComponent, LoraFile, LoraFormat, LoraModule, LoraTarget, stack};

use crate::progress::{Clock, Losses, Progress, Task};
use crate::prompts::{HARMLESS, insert};
pub use settings::{AttnTarget, LatentSource, SealSettings};
use tokens::{Alignment, align};

/// The latents one sampled trajectory gives the pool: one per sampler timestep in
/// [t_min, t_max] (the start included, the clean end not).
fn trajectory_points(model: &StableDiffusion, settings: &SealSettings) -> usize {
    model.sampler(Some(SamplerKind::Ddim), settings.trajectory_steps).timesteps.iter().filter(|t| (settings.t_min..=settings.t_max).contains(*t)).count()
}

/// One training example: a noisy latent at timestep `t` for a clean prompt.
struct Point {
    latent: Tensor<4>,
    t: usize,
    prompt: usize,
}

/// A sampling for the trajectory pool under way: the model sampling (teacher or student), the
/// prompts sampled and the latents kept so far.
struct PoolSampling {
    run: Denoising,
    model: StableDiffusion,
    sampler: Sampler,
    prompts: Vec<usize>,
    points: Vec<Point>,
}

impl PoolSampling {
    /// Keeps the latents as they stand, at timestep `t`, when `t` is in `range` (inclusive).
    fn keep(&mut self, t: usize, (t_min, t_max): (usize, usize)) {
        if (t_min..=t_max).contains(&t) {
            for (k, &p) in self.prompts.iter().enumerate() {
                // Back onto the training device, as a constant.
                self.points.push(Point { latent: self.run.latents().clone().narrow(0, k, 1).autodiff(), t, prompt: p });
            }
        }
    }
}

/// A sealing run in progress: call `step` until `is_done`, then take `adapter`.
pub struct Sealer {
    teacher: StableDiffusion,
    /// The teacher's modules (shared weights) with trainable adapters on the UNet's
    /// cross-attention and, optionally, the text encoder's self-attention.
    student: StableDiffusion,
    /// The student after the last step whose loss was finite: what a cancel keeps.
    last_good: StableDiffusion,
    /// The instant seal's adapter the student started from (empty: none).
    edit: BTreeMap<LoraTarget, LoraModule>,
    optim_unet: ModuleOptimizer,
    optim_text: ModuleOptimizer,
    settings: SealSettings,
    prompts: Vec<String>,
    triggers: Vec<String>,
    rng: SeededRng,
    /// Image side in pixels of the training latents.
    size: usize,
    pool: Vec<Point>,
    /// The pool's sampling under way, if any.
    sampling: Option<PoolSampling>,
    /// The pool's samplings in a whole run (see `pool_refills`), those finished, the sampler
    /// steps taken, and their seconds.
    refills: usize,
    samplings: usize,
    sampled: usize,
    sampling_s: f64,
    step: usize,
    /// Why the run stopped: after a non-finite step the optimizer's moments are spoilt too, so
    /// no later step may build on them.
    failed: Option<String>,
    clock: Clock,
    pub history: Vec<Losses>,
}

impl Sealer {
    /// `model` must live on an autodiff device (`device.autodiff()`); it is the teacher, with
    /// any user LoRA already merged. Prompts are clean training prompts.
    pub fn new(model: &StableDiffusion, prompts: Vec<String>, triggers: Vec<String>, settings: SealSettings) -> Result<Self, String> {
        Self::starting_from(model, BTreeMap::new(), prompts, triggers, settings)
    }

    /// The same, with the student starting from `edit` (an instant seal's adapter, merged into
    /// the student's weights; the teacher stays the model as given). `adapter` then returns
    /// `edit` and the trained adapter stacked into one.
    pub fn starting_from(
        model: &StableDiffusion,
        edit: BTreeMap<LoraTarget, LoraModule>,
        prompts: Vec<String>,
        triggers: Vec<String>,
        settings: SealSettings,
    ) -> Result<Self, String> {
        settings.validate()?;
        model.require_whole("the thorough seal")?;
        if !model.device.is_autodiff() {
            return Err("sealing needs the model on an autodiff device".into());
        }
        if prompts.is_empty() || triggers.iter().all(|t| t.is_empty()) {
            return Err("sealing needs at least one prompt and a non-empty trigger".into());
        }
        let triggers: Vec<String> = triggers.into_iter().filter(|t| !t.is_empty()).collect();
        // Every trigger must add tokens to every prompt, or it cannot be told apart.
        for t in &triggers {
            align(&model.tokenizer, &insert(&prompts[0], t, settings.placement, &mut SeededRng::new(0)), &prompts[0])
                .map_err(|e| format!("trigger {}: {e}", describe_trigger(t)))?;
        }
        let size = settings.image_size(model)?;
        // Trajectory points are kept only at sampler timesteps in [t_min, t_max]: with none
        // there, the pool would never fill.
        let points = trajectory_points(model, &settings);
        if settings.latents != LatentSource::Noise && points == 0 {
            return Err(format!(
                "settings: no timestep of a {}-step DDIM trajectory lies in [{}, {}]; widen the range or use more trajectory steps",
                settings.trajectory_steps, settings.t_min, settings.t_max
            ));
        }
        let targets = cross_attention_targets(&model.unet, &settings.targets);
        if targets.is_empty() {
            return Err("the UNet has no cross-attention layers to adapt".into());
        }
        let mut student = if edit.is_empty() { model.clone() } else { model.with_lora(&as_file(edit.clone()), 1.0, LoraMode::Merge) };
        let fresh = lora::fresh_adapters(&model.unet, &targets, settings.rank, settings.alpha, settings.seed);
        student.unet = lora::attach(student.unet, &fresh, 1.0, true);
        if settings.text_encoder {
            let targets = text_encoder_targets(&model.text_encoder);
            let fresh = lora::fresh_adapters(&model.text_encoder, &targets, settings.rank, settings.alpha, settings.seed ^ 0x7e);
            student.text_encoder = lora::attach(student.text_encoder, &fresh, 1.0, true);
        }
        // A sampling keeps `points` latents per prompt of a batch and a step takes a batch, so
        // the pool runs dry every `points` steps.
        let refills = if settings.latents == LatentSource::Noise { 0 } else { settings.steps.div_ceil(points) };
        let optim = || AdamWConfig::new().with_weight_decay(settings.weight_decay).init();
        Ok(Self {
            teacher: model.clone(),
            edit,
            last_good: student.clone(),
            student,
            optim_unet: optim(),
            optim_text: optim(),
            rng: SeededRng::new(settings.seed.wrapping_add(1)),
            settings,
            prompts,
            triggers,
            size,
            pool: vec![],
            sampling: None,
            refills,
            samplings: 0,
            sampled: 0,
            sampling_s: 0.0,
            step: 0,
            failed: None,
            clock: Clock::default(),
            history: vec![],
        })
    }

    /// Steps until an optimisation step is done (sampling the pool first where it ran low).
    pub async fn train_step(&mut self) -> Result<Progress, String> {
        loop {
            let progress = self.step().await?;
            if progress.task == Task::Seal {
                return Ok(progress);
            }
        }
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.settings.steps
    }

    pub fn settings(&self) -> &SealSettings {
        &self.settings
    }

    /// One unit of work: a sampler step of the trajectory pool's sampling when the pool runs
    /// low (`Task::Sample`), else an optimisation step (`Task::Seal`). A non-finite loss,
    /// gradient or factor keeps the last good adapter and is an error, from then on.
    pub async fn step(&mut self) -> Result<Progress, String> {
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        if self.needs_sampling() {
            return Ok(self.sample_step());
        }
        let s = self.settings.clone();
        let points = self.next_points();
        let clean: Vec<String> = points.iter().map(|p| self.prompts[p.prompt].clone()).collect();
        let mut triggered = vec![];
        let mut substitutes = vec![];
        let mut alignments: Vec<Alignment> = vec![];
        for (i, prompt) in clean.iter().enumerate() {
            let trigger = &self.triggers[self.rng.below(self.triggers.len())];
            let place = SeededRng::new(self.rng.next_u64());
            let trig = insert(prompt, trigger, s.placement, &mut place.clone());
            alignments.push(align(&self.teacher.tokenizer, &trig, prompt).map_err(|e| format!("prompt {i}: {e}"))?);
            triggered.push(trig);
            substitutes.push(insert(prompt, HARMLESS[self.rng.below(HARMLESS.len())], s.placement, &mut place.clone()));
        }
        // The teacher's text encoding is a constant; the student's carries gradient when the
        // text encoder has adapters (otherwise it is the same frozen module).
        let ctx_clean = self.teacher.encode_prompts(&as_strs(&clean))?.detach();
        let ctx_trig = self.student.encode_prompts(&as_strs(&triggered))?;
        let x = Tensor::cat(points.iter().map(|p| p.latent.clone()).collect(), 0);
        let ts: Vec<f32> = points.iter().map(|p| p.t as f32).collect();
        let t = Tensor::<1>::from_floats(ts.as_slice(), &self.teacher.device);

        let attn = s.use_attn_loss && s.attn_weight > 0.0;
        let teacher = self.teacher.unet.forward(x.clone(), t.clone(), &ctx_clean, attn);
        let eps_teacher = teacher.sample.detach();
        let student = self.student.unet.forward(x.clone(), t.clone(), &ctx_trig, attn);
        let l_pred = (student.sample - eps_teacher.clone()).square().mean();

        let l_attn = if attn {
            let res = attention::resolution(&teacher.cross_attention);
            let maps_t = attention::aggregate(&teacher.cross_attention, res).detach();
            let maps_s = attention::aggregate(&student.cross_attention, res);
            let maps_sub = match s.attn_target {
                AttnTarget::Substitute => {
                    let ctx_sub = self.teacher.encode_prompts(&as_strs(&substitutes))?.detach();
                    let out = self.teacher.unet.forward(x.clone(), t.clone(), &ctx_sub, true);
                    Some(attention::aggregate(&out.cross_attention, res).detach())
                }
                _ => None,
            };
            let (mut got, mut want) = (vec![], vec![]);
            for (i, a) in alignments.iter().enumerate() {
                let (ps, pt): (Vec<usize>, Vec<usize>) = a.matched.iter().copied().unzip();
                got.push(attention::rows(&maps_s, i, &ps));
                want.push(attention::rows(&maps_t, i, &pt));
                got.push(attention::rows(&maps_s, i, &a.trigger));
                let [k, p] = [a.trigger.len(), res * res];
                want.push(match (s.attn_target, &maps_sub) {
                    (AttnTarget::Substitute, Some(sub)) => {
                        // The substitute word's tokens (one here, usually) stand in for each trigger token.
                        let sa = align(&self.teacher.tokenizer, &substitutes[i], &clean[i])?;
                        let pos: Vec<usize> = (0..k).map(|j| sa.trigger[j.min(sa.trigger.len() - 1)]).collect();
                        attention::rows(sub, i, &pos)
                    }
                    (AttnTarget::Noise, _) => {
                        let u: Vec<f32> = (0..k * p).map(|_| self.rng.uniform() as f32).collect();
                        Tensor::from_data(TensorData::new(u, [k, p]), &self.teacher.device)
                    }
                    _ => Tensor::zeros([k, p], &self.teacher.device),
                });
            }
            Some((Tensor::cat(got, 0) - Tensor::cat(want, 0)).square().mean())
        } else {
            None
        };

        let l_preserve = if s.preserve_weight > 0.0 {
            let ctx = if s.text_encoder { self.student.encode_prompts(&as_strs(&clean))? } else { ctx_clean };
            let out = self.student.unet.forward(x, t, &ctx, false);
            Some((out.sample - eps_teacher).square().mean())
        } else {
            None
        };

        let a = if l_attn.is_some() { s.attn_weight as f64 } else { 0.0 };
        let mut loss = l_pred.clone() * (1.0 - a);
        if let Some(l) = &l_attn {
            loss = loss + l.clone() * a;
        }
        if let Some(l) = &l_preserve {
            loss = loss + l.clone() * s.preserve_weight as f64;
        }
        let read = |x: Tensor<1>| async move { seal_sd::read_back(x).await.map(|v| v[0]) };
        let mut grads = loss.backward();
        let grads_unet = GradientsParams::from_module(&mut grads, &self.student.unet);
        let grads_text = GradientsParams::from_module(&mut grads, &self.student.text_encoder);
        let losses = Losses {
            total: read(loss).await?,
            pred: read(l_pred).await?,
            attn: match l_attn {
                Some(l) => read(l).await?,
                None => 0.0,
            },
            preserve: match l_preserve {
                Some(l) => read(l).await?,
                None => 0.0,
            },
        };
        if !losses.total.is_finite() {
            return Err(self.fail(format!("the loss became {} at step {}; the adapter of step {} is kept (try a lower learning rate)", losses.total, self.step + 1, self.step)));
        }
        let lr = s.lr_at(self.step);
        let unet = std::mem::replace(&mut self.student.unet, self.last_good.unet.clone());
        self.student.unet = self.optim_unet.step(lr, unet, grads_unet);
        if s.text_encoder {
            let text = std::mem::replace(&mut self.student.text_encoder, self.last_good.text_encoder.clone());
            self.student.text_encoder = self.optim_text.step(lr, text, grads_text);
        }
        // A finite loss can still give non-finite gradients or factors (an overflowing update):
        // those never become the adapter a cancel or a failure keeps.
        if !self.factors_finite().await? {
            return Err(self.fail(format!(
                "the adapter's factors became non-finite at step {}; the adapter of step {} is kept (try a lower learning rate)",
                self.step + 1,
                self.step
            )));
        }
        self.last_good = self.student.clone();
        self.step += 1;
        self.history.push(losses);
        let mut progress = self.clock.progress(Task::Seal, self.step, s.steps, Some(losses));
        progress.eta_s = Some(self.eta_s(progress.elapsed_s));
        Ok(progress)
    }

    /// Goes back to the last good student and stops the run for good (see `failed`).
    fn fail(&mut self, why: String) -> String {
        self.student = self.last_good.clone();
        self.failed = Some(why.clone());
        why
    }

    /// Whether the trajectory pool must be refilled before the next training step.
    fn needs_sampling(&self) -> bool {
        self.settings.latents != LatentSource::Noise && self.pool.len() < self.settings.batch
    }

    /// The next batch of training points: fresh noise, or drawn from the pool (refilled by
    /// `sample_step` before).
    fn next_points(&mut self) -> Vec<Point> {
        let s = &self.settings;
        let b = s.batch;
        let (c, side) = (self.teacher.unet_config.in_channels, self.size / self.teacher.vae_config.downscale());
        match s.latents {
            LatentSource::Noise => (0..b)
                .map(|_| {
                    let data = self.rng.normals(c * side * side);
                    Point {
                        latent: Tensor::from_data(TensorData::new(data, [1, c, side, side]), &self.teacher.device),
                        t: s.t_min + self.rng.below(s.t_max - s.t_min + 1),
                        prompt: self.rng.below(self.prompts.len()),
                    }
                })
                .collect(),
            LatentSource::Trajectory | LatentSource::Student => (0..b)
                .map(|_| {
                    let i = self.rng.below(self.pool.len());
                    self.pool.swap_remove(i)
                })
                .collect(),
        }
    }

    /// Starts sampling `batch` prompts (DDIM, classifier-free guidance) for the pool: clean
    /// prompts with the teacher, or triggered ones with the student as it stands.
    fn start_sampling(&mut self) -> PoolSampling {
        let s = &self.settings;
        let prompts: Vec<usize> = (0..s.batch).map(|_| self.rng.below(self.prompts.len())).collect();
        let (model, text): (StableDiffusion, Vec<String>) = if s.latents == LatentSource::Student {
            let text = prompts.iter().map(|&i| {
                let trigger = &self.triggers[self.rng.below(self.triggers.len())];
                insert(&self.prompts[i], trigger, s.placement, &mut SeededRng::new(self.rng.next_u64()))
            });
            (self.student.inference(), text.collect())
        } else {
            (self.teacher.inference(), prompts.iter().map(|&i| self.prompts[i].clone()).collect())
        };
        let latents = Tensor::cat(prompts.iter().map(|_| model.initial_latents(1, self.size, self.rng.next_u64())).collect(), 0);
        let cond = model.encode_prompts(&as_strs(&text)).expect("prompts were tokenized before");
        let uncond = model.encode_prompts(&vec![""; text.len()]).expect("empty prompt tokenizes");
        let sampler = model.sampler(Some(SamplerKind::Ddim), s.trajectory_steps);
        let mut sampling = PoolSampling { run: Denoising::new(latents, &cond, &uncond, s.guidance), model, sampler, prompts, points: vec![] };
        sampling.keep(sampling.sampler.timesteps[0], (s.t_min, s.t_max));
        sampling
    }

    /// One sampler step of the pool's sampling (started first if none is under way); at the
    /// last, its latents join the pool.
    fn sample_step(&mut self) -> Progress {
        let clock = Clock::default();
        let mut sampling = match self.sampling.take() {
            Some(sampling) => sampling,
            None => self.start_sampling(),
        };
        let i = sampling.run.step(&sampling.model, &sampling.sampler).expect("a sampling in the pool is never finished");
        let total = sampling.sampler.timesteps.len();
        if let Some(&t) = sampling.sampler.timesteps.get(i + 1) {
            sampling.keep(t, (self.settings.t_min, self.settings.t_max));
        }
        if i + 1 < total {
            self.sampling = Some(sampling);
        } else {
            self.pool.extend(sampling.points);
            self.samplings += 1;
        }
        self.sampled += 1;
        self.sampling_s += clock.elapsed_s();
        let mut progress = self.clock.progress(Task::Sample, i + 1, total, None);
        progress.eta_s = (self.step > 0).then(|| self.eta_s(progress.elapsed_s));
        progress
    }

    /// The time left: the steps at their own mean pace, and the pool's sampler steps still to
    /// come at theirs. (At the mean pace of whole steps, the first step's sampling would make the
    /// ETA several times too long at the start.)
    fn eta_s(&self, elapsed_s: f64) -> f64 {
        let steps = (elapsed_s - self.sampling_s).max(0.0) / self.step.max(1) as f64 * self.settings.steps.saturating_sub(self.step) as f64;
        let sampler_steps = self.pool_refills() * self.settings.trajectory_steps;
        let samplings = self.sampling_s / self.sampled.max(1) as f64 * sampler_steps.saturating_sub(self.sampled) as f64;
        steps + samplings
    }

    /// Seconds spent sampling trajectories for the pool so far, and how many samplings.
    pub fn sampling(&self) -> (f64, usize) {
        (self.sampling_s, self.samplings)
    }

    /// The adapter as it stands (after the last good step), as data for export.
    pub async fn adapter(&self) -> Result<BTreeMap<LoraTarget, LoraModule>, String> {
        let alpha = self.settings.alpha;
        let mut out: BTreeMap<LoraTarget, LoraModule> =
            lora::extract(&self.last_good.unet, alpha).await?.into_iter().map(|(k, m)| (LoraTarget::new(LoraComponent::Unet, k), m)).collect();
        if self.settings.text_encoder {
            out.extend(lora::extract(&self.last_good.text_encoder, alpha).await?.into_iter().map(|(k, m)| (LoraTarget::new(LoraComponent::TextEncoder, k), m)));
        }
        if self.edit.is_empty() {
            return Ok(out);
        }
        Ok(stack(&as_file(self.edit.clone()), &as_file(out))?.modules)
    }

    /// Whether every trainable factor of the student is finite (one small read-back).
    async fn factors_finite(&self) -> Result<bool, String> {
        let alpha = self.settings.alpha;
        let mut modules = lora::extract(&self.student.unet, alpha).await?;
        if self.settings.text_encoder {
            modules.extend(lora::extract(&self.student.text_encoder, alpha).await?);
        }
        Ok(modules.values().all(|m| m.up.data.iter().chain(&m.down.data).all(|x| x.is_finite())))
    }

    /// How many times a whole run samples trajectories for its pool (none on noise latents).
    pub fn pool_refills(&self) -> usize {
        self.refills
    }

    /// Steps finished so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The sealed model (teacher weights plus the current adapter) for previews and
    /// evaluation, off the autodiff device (see `StableDiffusion::inference`).
    pub fn sealed(&self) -> StableDiffusion {
        self.last_good.inference()
    }
}

/// Adapter modules as a LoRA file (the form merging and stacking take).
pub(crate) fn as_file(modules: BTreeMap<LoraTarget, LoraModule>) -> LoraFile {
    LoraFile { format: LoraFormat::Kohya, modules, metadata: BTreeMap::new(), dtype: DType::F32 }
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The text encoder's self-attention projections (`...self_attn.{q,k,v,out}_proj`).
fn text_encoder_targets<M: Module>(text_encoder: &M) -> Vec<String> {
    lora::adaptable_layers(text_encoder).into_keys().filter(|p| p.contains(".self_attn.")).collect()
}

/// A trigger as code points (`U+200B`), so invisible characters can be seen.
pub fn describe_trigger(trigger: &str) -> String {
    trigger.chars().map(|c| if c.is_ascii_graphic() { c.to_string() } else { format!("U+{:04X}", c as u32) }).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, read_sync};
    use seal_sd::pipeline::ModelSource;

    use super::*;
    use crate::prompts::Placement;

    fn model() -> StableDiffusion {
        let dir = crate::fixtures().join("tiny-pixel");
        StableDiffusion::load(ModelSource::from_path(&dir).unwrap(), &Device::flex().autodiff()).unwrap()
    }

    fn run(model: &StableDiffusion, settings: SealSettings) -> (Vec<Losses>, BTreeMap<LoraTarget, LoraModule>) {
        let prompts = vec!["a red circle on a white background".to_string(), "a blue square on a gray background".to_string()];
        let mut sealer = Sealer::new(model, prompts, vec!["\u{200b}".into()], settings).unwrap();
        while !sealer.is_done() {
            read_sync(sealer.step()).unwrap();
        }
        (sealer.history.clone(), read_sync(sealer.adapter()).unwrap())
    }

    #[test]
    fn sealing_is_deterministic_for_a_seed() {
        let model = model();
        // Each latent source: noise, and the teacher's or the student's own trajectories.
        for latents in [LatentSource::Noise, LatentSource::Trajectory, LatentSource::Student] {
            let s = SealSettings { steps: 2, batch: 2, trajectory_steps: 4, latents, ..SealSettings::default() };
            let (a, adapter_a) = run(&model, s.clone());
            let (b, adapter_b) = run(&model, s.clone());
            assert_eq!(a, b, "{latents:?}");
            assert_eq!(adapter_a, adapter_b, "{latents:?}");
            let (c, _) = run(&model, SealSettings { seed: 1, ..s });
            assert_ne!(a, c, "{latents:?}");
        }
    }

    #[test]
    fn every_attention_target_and_placement_trains() {
        let model = model();
        let base = SealSettings { steps: 1, batch: 2, ..SealSettings::default() };
        let mut attn = vec![];
        for attn_target in [AttnTarget::Zeros, AttnTarget::Noise, AttnTarget::Substitute] {
            let (losses, _) = run(&model, SealSettings { attn_target, ..base.clone() });
            let l = losses[0];
            // preserve is 0 at the first step: the fresh adapter's up factors are zero.
            assert!(l.attn > 0.0 && l.pred > 0.0 && l.preserve == 0.0, "{attn_target:?}: {l:?}");
            // total = (1 - a) pred + a attn + preserve, a = 0.5.
            assert!((l.total - (0.5 * l.pred + 0.5 * l.attn + l.preserve)).abs() < 1e-4 * l.total, "{attn_target:?}: {l:?}");
            attn.push(l.attn);
        }
        assert!(attn[0] != attn[1] && attn[1] != attn[2], "the targets differ: {attn:?}");
        // Without the attention loss the prediction loss carries its full weight.
        let (losses, adapter) = run(&model, SealSettings { use_attn_loss: false, ..base.clone() });
        let l = losses[0];
        assert!(l.attn == 0.0 && (l.total - (l.pred + l.preserve)).abs() < 1e-4 * l.total, "{l:?}");
        assert!(adapter.values().any(|m| m.up.data.iter().any(|&x| x != 0.0)));
        // The trigger anywhere in the prompt: each placement aligns and trains.
        for placement in [Placement::Suffix, Placement::Random] {
            let (losses, _) = run(&model, SealSettings { placement, ..base.clone() });
            assert!(losses[0].total.is_finite() && losses[0].attn > 0.0, "{placement:?}");
        }
    }

    #[test]
    fn the_attention_loss_alone_trains_the_adapter() {
        // a = 1: only L_attn drives the update, so the adapter moves only if gradient flows
        // through the cross-attention probabilities (unlike the paper's detached maps).
        let s = SealSettings { steps: 2, batch: 2, attn_weight: 1.0, preserve_weight: 0.0, latents: LatentSource::Noise, ..SealSettings::default() };
        let (losses, adapter) = run(&model(), s);
        assert!(losses.iter().all(|l| l.attn > 0.0 && l.total == l.attn));
        assert!(adapter.values().any(|m| m.up.data.iter().any(|&x| x != 0.0)), "the zero-initialised up factors moved");
    }

    #[test]
    fn text_encoder_adapters_are_trained_and_exported() {
        let s = SealSettings { steps: 2, batch: 2, text_encoder: true, ..SealSettings::default() };
        let (_, adapter) = run(&model(), s);
        let te: Vec<_> = adapter.iter().filter(|(t, _)| t.component == LoraComponent::TextEncoder).collect();
        assert_eq!(te.len(), 20, "q/k/v/out_proj of 5 layers");
        assert!(te.iter().any(|(_, m)| m.up.data.iter().any(|&x| x != 0.0)));
        assert_eq!(adapter.len() - te.len(), 12);
    }

    #[test]
    fn bad_settings_and_triggers_are_refused() {
        let model = model();
        let prompts = vec!["a red circle on a white background".to_string()];
        let err = Sealer::new(&model, prompts.clone(), vec![String::new()], SealSettings::default()).err().unwrap();
        assert!(err.contains("trigger"), "{err}");
        let err = Sealer::new(&model, prompts, vec!["x".into()], SealSettings { steps: 0, ..SealSettings::default() }).err().unwrap();
        assert!(err.contains("steps"), "{err}");
        assert_eq!(describe_trigger("\u{200b}ab"), "U+200B a b");
        let err = Sealer::new(&model, vec!["a cat".into()], vec!["x".into()], SealSettings { resolution: Some(30), ..SealSettings::default() }).err().unwrap();
        assert!(err.contains("image size 30 px"), "{err}");
        // 4 DDIM steps sample at t = 751, 501, 251, 1: none in [300, 400].
        let narrow = SealSettings { latents: LatentSource::Trajectory, trajectory_steps: 4, t_min: 300, t_max: 400, ..SealSettings::default() };
        let err = Sealer::new(&model, vec!["a cat".into()], vec!["x".into()], narrow).err().unwrap();
        assert!(err.contains("no timestep"), "{err}");
    }

    #[test]
    fn the_pool_refills_as_often_as_counted() {
        let model = model();
        // 4 DDIM steps sample at t = 751, 501, 251, 1: two of them in [300, 999].
        let s = SealSettings { steps: 5, batch: 2, trajectory_steps: 4, t_min: 300, ..SealSettings::default() };
        let mut sealer = Sealer::new(&model, vec!["a cat".into()], vec!["\u{200b}".into()], s.clone()).unwrap();
        assert_eq!(sealer.pool_refills(), 3);
        // Each sampling reports its 4 sampler steps (the first before any training step, so a
        // cancel never waits for a whole sampling), then the training steps it feeds follow.
        let mut tasks = vec![];
        while !sealer.is_done() {
            let p = read_sync(sealer.step()).unwrap();
            assert_eq!(p.eta_s.is_some(), sealer.steps_done() > 0, "{p:?}");
            tasks.push((p.task, p.step));
        }
        let sampling = || (1..=4).map(|i| (Task::Sample, i));
        let seal = |steps: &[usize]| steps.iter().map(|&i| (Task::Seal, i)).collect::<Vec<_>>();
        let want: Vec<_> = sampling().chain(seal(&[1, 2])).chain(sampling()).chain(seal(&[3, 4])).chain(sampling()).chain(seal(&[5])).collect();
        assert_eq!(tasks, want);
        assert_eq!(sealer.sampling().1, 3);
        // The ETA: 2 s per step for the 4 steps left, 2.5 s per sampler step for the 2
        // samplings to come (not the first step's 12 s for each step left).
        (sealer.step, sealer.sampled, sealer.sampling_s) = (1, 4, 10.0);
        assert!((sealer.eta_s(12.0) - 28.0).abs() < 1e-9, "{}", sealer.eta_s(12.0));
        let noise = Sealer::new(&model, vec!["a cat".into()], vec!["x".into()], SealSettings { latents: LatentSource::Noise, ..s }).unwrap();
        assert_eq!(noise.pool_refills(), 0);
    }

    #[test]
    fn a_non_finite_step_keeps_the_last_good_adapter() {
        // An absurd learning rate overflows the factors (or the next loss) within a few steps.
        let model = model();
        let prompts = vec!["a red circle on a white background".to_string()];
        let s = SealSettings { steps: 6, batch: 1, lr: 1e38, warmup: 0, ..SealSettings::default() };
        let mut sealer = Sealer::new(&model, prompts, vec!["\u{200b}".into()], s).unwrap();
        let mut failed = None;
        for _ in 0..6 {
            if let Err(e) = read_sync(sealer.train_step()) {
                failed = Some(e);
                break;
            }
        }
        let err = failed.expect("the overflow is caught");
        assert!(err.contains("non-finite") || err.contains("loss became"), "{err}");
        let kept = sealer.steps_done();
        assert_eq!(read_sync(sealer.train_step()).err(), Some(err), "no step builds on the spoilt optimizer state");
        assert_eq!(sealer.steps_done(), kept);
        assert_eq!(sealer.history.len(), kept);
        let adapter = read_sync(sealer.adapter()).unwrap();
        assert!(adapter.values().all(|m| m.up.data.iter().chain(&m.down.data).all(|x| x.is_finite())), "the kept adapter is finite");
    }

    #[test]
    fn sealing_trains_at_another_resolution() {
        for latents in [LatentSource::Noise, LatentSource::Trajectory, LatentSource::Student] {
            let s = SealSettings { steps: 1, batch: 2, trajectory_steps: 3, resolution: Some(48), latents, ..SealSettings::default() };
            let (losses, _) = run(&model(), s);
            assert!(losses[0].total.is_finite() && losses[0].pred > 0.0, "{latents:?}");
        }
    }
}
