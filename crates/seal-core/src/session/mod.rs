//! The workflow both front ends drive: one model, an optional user LoRA merged into the
//! teacher, a sealing run, its evaluation and heat maps, the trigger scan, and what the user
//! downloads. Long operations are stepped (`seal_step`, `eval_step`, `scan_step`) so a front end
//! can show progress and cancel between steps. The session owns what is invalidated when: a
//! new model drops everything, a new LoRA or LoRA weight drops the seal and the scan.

mod report;
#[cfg(test)]
mod tests;

use burn::prelude::Device;
use seal_sd::pipeline::{LoraMode, ModelSource, Precision, Scope, StableDiffusion};
use seal_sd::seal_weights::WeightFile;
use seal_sd::seal_weights::lora::{LoraFile, parse_lora, write_in_format, write_kohya};
use serde::Deserialize;

pub use report::{Heatmaps, Loaded, LoraSummary, LoraUse, MapStats, SealDone, SealReport, Sealing, StepPlan, TriggerAttention, TriggerInfo};

use crate::error::{Error, Result};
use crate::eval::{Detector, EvalReport, EvalSettings, Evaluation};
use crate::export::{check_lora_weight, sealed_lora, sealing_adapter};
use crate::heatmap::{Sampling, TriggerMap, trigger_map};
use crate::image::Rgb;
use crate::progress::{Losses, Progress};
use crate::prompts::Placement;
use crate::scan::{Scan, ScanReport, ScanSettings, lora_tags};
use crate::unlearn::instant::InstantSettings;
use crate::unlearn::memory::{check_fits, step_memory, weight_bytes};
use crate::unlearn::run::{Recipe, SealMode, SealRun};
use crate::unlearn::{SealSettings, describe_trigger};

/// What the engine the session runs on can hold, checked before work that would not fit.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineLimits {
    /// The most f32 weight bytes a model may have, and what to do about a larger one.
    pub weights: Option<(u64, &'static str)>,
    /// Bytes still free beside the weights, asked when a sealing step is planned (the page's
    /// CPU engine: what wasm32's 4 GiB has left).
    pub free: Option<fn() -> u64>,
    /// The largest tensor the device can bind (WebGPU's maxStorageBufferBindingSize).
    pub max_buffer: Option<u64>,
    /// How a model's weights are kept: in f16 where the engine computes in f16 (WebGPU with
    /// `shader-f16`), else f32.
    pub precision: Precision,
}

/// A sealing request: the triggers, the clean training prompts, the mode and both seals'
/// settings (missing fields take their defaults).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct SealRequest {
    pub triggers: Vec<String>,
    pub prompts: Vec<String>,
    pub mode: SealMode,
    pub settings: SealSettings,
    pub instant: InstantSettings,
    /// Store the triggers in clear in the adapter's metadata (by default only their SHA-256).
    pub reveal_triggers: bool,
}

/// What the before/after evaluation is asked for, beyond `EvalSettings`.
#[derive(Clone, Debug, Deserialize)]
pub struct EvalRequest {
    pub prompts: Vec<String>,
    pub seeds: u64,
    pub steps: usize,
    /// The trigger-effect score (a harmless-word image per pair).
    pub effect: bool,
    pub gray: bool,
    /// Top-left corner of the target patch (needs `set_target`).
    pub patch_at: Option<[usize; 2]>,
}

/// A LoRA the user gave, as parsed against the model, and the weight it is applied at.
struct UserLora {
    name: String,
    file: LoraFile,
    weight: f32,
}

/// What a finished (or cancelled) sealing run left.
struct Sealed {
    adapter: LoraFile,
    /// The teacher with the exported adapter attached: what a user of the file gets.
    model: StableDiffusion,
    recipe: Recipe,
    /// Where sealing put the trigger and the size it trained at (the comparison uses both).
    settings: SealSettings,
    seconds: f64,
    losses: Vec<Losses>,
}

/// (prompt, seed) pairs per evaluation step: small, so progress moves and Cancel answers
/// within seconds even on one wasm thread (each pair is up to 6 images).
const EVAL_BATCH: usize = 2;

pub struct Session {
    device: Device,
    limits: EngineLimits,
    model: Option<StableDiffusion>,
    lora: Option<UserLora>,
    /// The model the sealer learns from: `model` with the user's LoRA merged.
    teacher: Option<StableDiffusion>,
    triggers: Vec<String>,
    reveal_triggers: bool,
    run: Option<SealRun>,
    sealed: Option<Sealed>,
    target: Option<Rgb>,
    eval: Option<(Evaluation, usize)>,
    report: Option<EvalReport>,
    maps: Option<(TriggerMap, TriggerMap)>,
    /// The trigger scan of the teacher (against the bare model when a LoRA is loaded).
    scan: Option<Scan>,
}

impl Session {
    /// A session on `device`, with gradients: the one copy of the model serves generation (no
    /// tape is recorded for frozen weights) and sealing.
    pub fn new(device: &Device, limits: EngineLimits) -> Self {
        Session {
            device: device.clone().autodiff(),
            limits,
            model: None,
            lora: None,
            teacher: None,
            triggers: vec![],
            reveal_triggers: false,
            run: None,
            sealed: None,
            target: None,
            eval: None,
            report: None,
            maps: None,
            scan: None,
        }
    }

    /// Loads `source` as the model; everything derived from a previous one is dropped first
    /// (its weights are freed before the new ones are read).
    pub fn load_model(&mut self, source: ModelSource) -> Result<Loaded> {
        let scope = match self.limits.weights {
            Some((budget, hint)) => Scope::Within { budget, hint },
            None => Scope::Whole,
        };
        self.load_model_within(source, scope)
    }

    /// The same, loading only what the instant seal needs (`Scope::InstantSeal`): for a run
    /// known to be an instant seal alone, which never touches the rest.
    pub fn load_model_for_instant_seal(&mut self, source: ModelSource) -> Result<Loaded> {
        self.load_model_within(source, Scope::InstantSeal)
    }

    fn load_model_within(&mut self, source: ModelSource, scope: Scope) -> Result<Loaded> {
        self.model = None;
        self.teacher = None;
        self.forget_lora();
        let model = StableDiffusion::load_within(source, &self.device, scope, self.limits.precision)?;
        let loaded = Loaded { seal_size: SealSettings::default().image_size(&model)?, info: model.info.clone() };
        self.teacher = Some(model.clone());
        self.model = Some(model);
        Ok(loaded)
    }

    /// Parses a LoRA over the loaded model and merges it into the teacher at `weight` (the
    /// strength the user applies it at, usually 1). A file with keys no module of the model
    /// has is refused whole, the keys listed.
    pub fn load_lora(&mut self, file: &WeightFile, weight: f32) -> Result<LoraSummary> {
        let model = self.model.as_ref().ok_or(Error::Order("load a model before a LoRA"))?;
        check_lora_weight(weight)?;
        let lora = parse_lora(file, &model.model_paths())?;
        let summary = LoraSummary::new(file.name(), &lora);
        let teacher = model.with_lora(&lora, weight, LoraMode::Merge);
        self.forget_lora();
        self.teacher = Some(teacher);
        self.lora = Some(UserLora { name: file.name().into(), file: lora, weight });
        Ok(summary)
    }

    /// Applies the loaded LoRA at another weight (what was sealed or scanned over the old one
    /// is dropped).
    pub fn set_lora_weight(&mut self, weight: f32) -> Result<()> {
        check_lora_weight(weight)?;
        let model = self.model.as_ref().ok_or(Error::Order("load a model first"))?;
        let user = self.lora.as_mut().ok_or(Error::Order("no LoRA is loaded"))?;
        self.teacher = Some(model.with_lora(&user.file, weight, LoraMode::Merge));
        user.weight = weight;
        self.forget_results();
        self.scan = None;
        Ok(())
    }

    /// Drops the user's LoRA (and what was sealed or scanned over it); the teacher is the bare model.
    pub fn clear_lora(&mut self) {
        self.forget_lora();
        self.teacher = self.model.clone();
    }

    /// The loaded model, without the user's LoRA.
    pub fn model(&self) -> Option<&StableDiffusion> {
        self.model.as_ref()
    }

    /// The model sealing learns from: the loaded model with the user's LoRA merged.
    pub fn teacher(&self) -> Option<&StableDiffusion> {
        self.teacher.as_ref()
    }

    /// The user's LoRA as parsed, and its weight.
    pub fn user_lora(&self) -> Option<(&LoraFile, f32)> {
        self.lora.as_ref().map(|l| (&l.file, l.weight))
    }

    /// A trigger's code points, and the loaded model's tokens for it shown the same way.
    pub fn describe_trigger(&self, trigger: &str) -> TriggerInfo {
        let tokens = match &self.model {
            Some(m) => {
                m.tokenizer.encode_plain(trigger).map(|ids| ids.iter().map(|&id| describe_trigger(&m.tokenizer.decode_token(id).unwrap_or_default())).collect()).unwrap_or_default()
            }
            None => vec![],
        };
        TriggerInfo { code_points: describe_trigger(trigger), tokens }
    }

    /// Starts sealing. A thorough step that would not fit the engine is refused here, with a
    /// smaller size or batch to try, rather than failing mid-run.
    pub fn start_seal(&mut self, request: SealRequest) -> Result<()> {
        let teacher = self.teacher.as_ref().ok_or(Error::Order("load a model first"))?;
        if request.mode != SealMode::Instant {
            let (budget, max_buffer) = self.step_limits(teacher);
            check_fits(teacher, &request.settings, budget, max_buffer)?;
        }
        let run = SealRun::new(teacher, request.prompts, request.triggers, request.mode, request.instant, request.settings)?;
        self.forget_results();
        self.triggers = run.triggers().to_vec();
        self.reveal_triggers = request.reveal_triggers;
        self.run = Some(run);
        Ok(())
    }

    /// The memory a thorough sealing step with `settings` needs, against what the engine offers.
    pub fn step_memory(&self, settings: &SealSettings) -> Result<StepPlan> {
        let teacher = self.teacher.as_ref().ok_or(Error::Order("load a model first"))?;
        let need = step_memory(teacher, settings)?;
        let (budget, max_buffer) = self.step_limits(teacher);
        let error = check_fits(teacher, settings, budget, max_buffer).err();
        let known = |b: u64| (b != u64::MAX).then_some(b);
        Ok(StepPlan { need, budget: known(budget), max_buffer: known(max_buffer), fits: error.is_none(), error })
    }

    /// One sealing step; `None` once the run is complete. A failed step ends the run but keeps
    /// the last good adapter for `finish_seal`.
    pub async fn seal_step(&mut self) -> Result<Option<Progress>> {
        let run = self.run.as_mut().ok_or(Error::Order("no sealing run (start one first)"))?;
        Ok(run.step().await?)
    }

    /// Ends the run (finished, cancelled or failed): exports the adapter of the last finished
    /// step and attaches it to the teacher for the comparison.
    pub async fn finish_seal(&mut self) -> Result<SealDone> {
        let teacher = self.teacher.as_ref().ok_or(Error::Order("load a model first"))?;
        let run = self.run.take().ok_or(Error::Order("no sealing run to finish"))?;
        let (modules, recipe) = run.adapter().await?;
        let adapter = sealing_adapter(&modules, &recipe, &teacher.info, &self.triggers, self.reveal_triggers);
        let model = teacher.with_lora(&adapter, 1.0, LoraMode::SideBranch { trainable: false });
        let done = SealDone { mode: recipe.mode, thorough_steps: recipe.thorough_steps, modules: adapter.modules.len(), recipe: recipe.clone() };
        let settings = run.settings().clone();
        self.sealed = Some(Sealed { settings, seconds: run.elapsed_s(), losses: run.losses().to_vec(), recipe, adapter, model });
        Ok(done)
    }

    /// The evaluation's target image (the backdoor's patch).
    pub fn set_target(&mut self, image: Option<Rgb>) {
        self.target = image;
    }

    /// Starts the before/after evaluation at the size sealing trained at, with the trigger
    /// where sealing put it. Returns the number of steps.
    pub fn start_eval(&mut self, request: EvalRequest) -> Result<usize> {
        let sealed = self.sealed.as_ref().ok_or(Error::Order("seal first: the evaluation compares before and after"))?;
        let teacher = self.teacher.as_ref().ok_or(Error::Order("load a model first"))?;
        let mut detectors = vec![];
        if let Some([x, y]) = request.patch_at {
            let patch = self.target.clone().ok_or(Error::Order("the patch detector needs a target image"))?;
            detectors.push(Detector::patch(patch, x, y));
        }
        if request.gray {
            detectors.push(Detector::gray());
        }
        let settings = EvalSettings {
            seeds: (0..request.seeds.max(1)).collect(),
            steps: request.steps,
            effect: request.effect,
            placement: sealed.settings.placement,
            size: Some(sealed.settings.image_size(teacher)?),
            batch: EVAL_BATCH,
            ..EvalSettings::default()
        };
        let eval = Evaluation::new(&request.prompts, &self.triggers, detectors, settings)?;
        let total = eval.total_steps(true);
        self.report = None;
        self.eval = Some((eval, request.prompts.len()));
        Ok(total)
    }

    /// One step of the evaluation (a sampler step or an image's decoding; see
    /// `Evaluation::step`); `None` once complete (then `report` has it).
    pub async fn eval_step(&mut self) -> Result<Option<Progress>> {
        let (eval, prompts) = self.eval.as_mut().ok_or(Error::Order("no evaluation running"))?;
        let sealed = self.sealed.as_ref().ok_or(Error::Order("seal first"))?;
        let teacher = self.teacher.as_ref().ok_or(Error::Order("load a model first"))?;
        let progress = eval.step(teacher, Some(&sealed.model)).await?;
        if progress.is_none() {
            self.report = Some(eval.report(*prompts));
        }
        Ok(progress)
    }

    /// The evaluation's fixed-seed images: rows of (before clean, before triggered, after
    /// clean, after triggered), each pixel `zoom`-fold.
    pub fn grid(&self, zoom: usize) -> Result<Rgb> {
        let (eval, _) = self.eval.as_ref().ok_or(Error::Order("no evaluation yet"))?;
        Ok(eval.grid(zoom))
    }

    /// The trigger tokens' attention maps before and after sealing for `prompt` and seed 0,
    /// sampled with `steps` DDIM steps; `heatmap` draws them.
    pub async fn heatmaps(&mut self, prompt: &str, steps: usize) -> Result<Heatmaps> {
        let teacher = self.teacher.as_ref().ok_or(Error::Order("load a model first"))?;
        let sealed = self.sealed.as_ref().ok_or(Error::Order("seal first"))?;
        let trigger = self.triggers.first().ok_or(Error::Order("no trigger"))?;
        let placement: Placement = sealed.settings.placement;
        let sampling = Sampling { seed: 0, steps, guidance: 5.0, size: Some(sealed.settings.image_size(teacher)?) };
        let before = trigger_map(teacher, prompt, trigger, placement, sampling).await?;
        let after = trigger_map(&sealed.model, prompt, trigger, placement, sampling).await?;
        let maps = Heatmaps::new(&before, &after);
        self.maps = Some((before, after));
        Ok(maps)
    }

    /// The map before (`after` false) or after sealing, both on the larger of the two maxima.
    pub fn heatmap(&self, after: bool) -> Result<Rgb> {
        let (b, a) = self.maps.as_ref().ok_or(Error::Order("no heat maps yet"))?;
        let vmax = b.max().max(a.max());
        Ok(if after { a } else { b }.to_rgb(vmax))
    }

    /// Starts a scan for the trigger: of the user's LoRA against the model it is applied to, or
    /// of the model alone, in the clean `prompts` (whose own words are no candidates). Returns
    /// the number of steps.
    pub fn start_scan(&mut self, prompts: &[String], settings: ScanSettings) -> Result<usize> {
        let model = self.model.as_ref().ok_or(Error::Order("load a model first"))?;
        let teacher = self.teacher.as_ref().ok_or(Error::Order("load a model first"))?;
        self.scan = None;
        let scan = match &self.lora {
            Some(user) => Scan::new(teacher, Some(model), prompts, lora_tags(&user.file.metadata), settings)?,
            None => Scan::new(teacher, None, prompts, vec![], settings)?,
        };
        let total = scan.total_steps();
        self.scan = Some(scan);
        Ok(total)
    }

    /// One step of the scan; `None` once complete (then `scan_report` has the candidates).
    pub async fn scan_step(&mut self) -> Result<Option<Progress>> {
        let scan = self.scan.as_mut().ok_or(Error::Order("no scan running (start one first)"))?;
        Ok(scan.step().await?)
    }

    /// The scan's `top` candidates, best first.
    pub fn scan_report(&self, top: usize) -> Result<ScanReport> {
        Ok(self.scan.as_ref().ok_or(Error::Order("no scan yet"))?.report(top))
    }

    /// Candidate `index`'s images side by side (without it, with it, the base model with it),
    /// each pixel `zoom`-fold.
    pub fn scan_images(&self, index: usize, zoom: usize) -> Result<Rgb> {
        let scan = self.scan.as_ref().ok_or(Error::Order("no scan yet"))?;
        let pair = scan.candidates().get(index).and_then(|c| c.images.as_ref()).ok_or_else(|| Error::Failed(format!("candidate {} has no images", index + 1)))?;
        Ok(pair.row(zoom))
    }

    /// The sealing adapter as a kohya `.safetensors` file.
    pub fn adapter_file(&self) -> Result<Vec<u8>> {
        Ok(write_kohya(&self.sealed()?.adapter)?)
    }

    /// The user's LoRA with the sealing adapter stacked in, in the user's file's format.
    pub fn sealed_lora_file(&self) -> Result<Vec<u8>> {
        let sealed = self.sealed()?;
        let user = self.lora.as_ref().ok_or(Error::Order("no LoRA was loaded, so there is no sealed LoRA"))?;
        Ok(write_in_format(&sealed_lora(&user.file, &sealed.adapter, user.weight)?)?)
    }

    /// What was done: model, LoRA, trigger hashes, settings, the run's losses and timing, and
    /// the evaluation and heat-map numbers where they exist.
    pub fn report(&self) -> Result<SealReport> {
        let sealed = self.sealed()?;
        let model = self.model.as_ref().ok_or(Error::Order("load a model first"))?;
        let lora = self.lora.as_ref().map(|l| LoraUse { file: l.name.clone(), format: format!("{:?}", l.file.format), modules: l.file.modules.len(), weight: l.weight });
        Ok(SealReport::new(model, lora, &self.triggers, sealed, self.report.as_ref(), self.maps.as_ref()))
    }

    fn sealed(&self) -> Result<&Sealed> {
        self.sealed.as_ref().ok_or(Error::Order("seal first"))
    }

    /// The LoRA and everything computed over it (the seal and the scan).
    fn forget_lora(&mut self) {
        self.lora = None;
        self.scan = None;
        self.forget_results();
    }

    fn forget_results(&mut self) {
        self.run = None;
        self.sealed = None;
        self.eval = None;
        self.report = None;
        self.maps = None;
    }

    /// (bytes a step may use in all, the largest tensor), `u64::MAX` where the engine sets no bound.
    fn step_limits(&self, teacher: &StableDiffusion) -> (u64, u64) {
        let budget = self.limits.free.map_or(u64::MAX, |free| weight_bytes(teacher) + free());
        (budget, self.limits.max_buffer.unwrap_or(u64::MAX))
    }
}
