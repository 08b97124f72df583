//! The page's working state: one model, an optional user LoRA, a sealing run, its evaluation
//! and what the user downloads. Every method is one request from the worker; long operations
//! are stepped (`seal_step`, `eval_step`) so the page can show progress and cancel between
//! steps. Errors are strings that name the file or setting at fault.

use burn::prelude::Device;
use seal_core::eval::{Detector, EvalReport, EvalSettings, Evaluation};
use seal_core::export::{check_lora_weight, sealed_lora, sealing_adapter, trigger_hash};
use seal_core::heatmap::{Sampling, TriggerMap, trigger_map};
use seal_core::image::Rgb;
use seal_core::progress::Losses;
use seal_core::prompts::{BUILT_IN, parse_list, split};
use seal_core::scan::{Scan, ScanSettings, lora_tags};
use seal_core::unlearn::instant::InstantSettings;
use seal_core::unlearn::memory::{check_fits, step_memory, weight_bytes};
use seal_core::unlearn::run::{Recipe, SealMode, SealRun};
use seal_core::unlearn::{SealSettings, describe_trigger};
use seal_sd::pipeline::{Files, LoraMode, ModelSource, StableDiffusion, files_to_read};
use seal_sd::seal_weights::WeightFile;
use seal_sd::seal_weights::lora::{LoraComponent, LoraFile, parse_lora, write_in_format, write_kohya};
use serde::Deserialize;
use serde_json::json;
use wasm_bindgen::prelude::*;
use web_sys::Blob;

use crate::Engine;
use crate::blob::BlobSource;

/// A LoRA the user gave, as parsed against the model, and the weight it is applied at.
struct UserLora {
    name: String,
    file: LoraFile,
    weight: f32,
}

/// (prompt, seed) pairs per evaluation step: small, so the page's progress moves and Cancel
/// answers within seconds even on one wasm thread (each pair is up to 6 images).
const EVAL_BATCH: usize = 2;

/// What a finished (or cancelled) sealing run left.
struct Sealed {
    adapter: LoraFile,
    /// The teacher with the exported adapter attached: what a user of the file gets.
    model: StableDiffusion,
    recipe: Recipe,
    /// Where sealing put the trigger and the size it trained at (the comparison uses both).
    settings: SealSettings,
    /// Wall time of the run.
    seconds: f64,
    losses: Vec<Losses>,
}

/// What the evaluation was asked for, beyond `EvalSettings`.
#[derive(Deserialize)]
struct EvalRequest {
    prompts: Vec<String>,
    seeds: u64,
    steps: usize,
    /// The trigger-effect score (a harmless-word image per pair).
    effect: bool,
    gray: bool,
    /// Top-left corner of the target patch (needs `set_target`).
    patch_at: Option<[usize; 2]>,
}

#[wasm_bindgen]
pub struct Session {
    device: Device,
    /// Files given for the next `load_model`, by relative path.
    staged: Files,
    model: Option<StableDiffusion>,
    lora: Option<UserLora>,
    /// The model the sealer learns from: `model` with the user's LoRA merged.
    teacher: Option<StableDiffusion>,
    triggers: Vec<String>,
    run: Option<SealRun>,
    sealed: Option<Sealed>,
    target: Option<Rgb>,
    eval: Option<(Evaluation, usize)>,
    report: Option<EvalReport>,
    maps: Option<(TriggerMap, TriggerMap)>,
    /// The trigger scan of the teacher (against the bare model when a LoRA is loaded).
    scan: Option<Scan>,
    /// The most f32 weight bytes a model may have on this engine (the CPU engine keeps them in
    /// wasm32's 4 GiB), checked before loading so that a model too large is refused, not a crash.
    weight_budget: Option<u64>,
    /// The largest tensor the device can bind (WebGPU); none on the CPU.
    max_buffer: Option<u64>,
}

/// Weights on the CPU engine: wasm32 addresses 4 GiB in all, and sealing needs room beside them.
const CPU_WEIGHT_BUDGET: u64 = 3 << 30;

/// What a wasm32 module can address.
const WASM32_MEMORY: u64 = 4 << 30;

/// The wasm heap's size now (it never shrinks); 0 natively, where no budget applies.
fn heap_bytes() -> u64 {
    #[cfg(target_family = "wasm")]
    return core::arch::wasm32::memory_size(0) as u64 * 65536;
    #[cfg(not(target_family = "wasm"))]
    0
}

/// Enlargement of the scan's thumbnails (the page shows them at their pixel size).
const SCAN_THUMBNAIL_SCALE: usize = 2;

fn json<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| e.to_string())
}

#[wasm_bindgen]
impl Session {
    /// A session on the engine's device, with gradients: the one copy of the model serves
    /// generation (no tape is recorded for frozen weights) and sealing.
    #[wasm_bindgen(constructor)]
    pub fn new(engine: &Engine) -> Session {
        Session {
            device: engine.device.clone().autodiff(),
            staged: Files::new(),
            model: None,
            lora: None,
            teacher: None,
            triggers: vec![],
            run: None,
            sealed: None,
            target: None,
            eval: None,
            report: None,
            maps: None,
            scan: None,
            weight_budget: (engine.backend == "cpu" && cfg!(target_family = "wasm")).then_some(CPU_WEIGHT_BUDGET),
            max_buffer: engine.max_buffer,
        }
    }

    /// `SealSettings::default()` as JSON: the page's form starts from the engine's defaults.
    pub fn default_settings() -> String {
        serde_json::to_string(&SealSettings::default()).expect("settings serialize")
    }

    /// `InstantSettings::default()` as JSON (the closed-form seal's settings).
    pub fn default_instant_settings() -> String {
        serde_json::to_string(&InstantSettings::default()).expect("settings serialize")
    }

    /// `ScanSettings::default()` as JSON (the trigger scan's settings).
    pub fn default_scan_settings() -> String {
        serde_json::to_string(&ScanSettings::default()).expect("settings serialize")
    }

    /// The built-in prompt set split into `{train, heldout}` (every 4th prompt held out).
    pub fn builtin_prompts() -> String {
        let (train, heldout) = split(&parse_list(BUILT_IN), 4);
        json!({ "train": train, "heldout": heldout }).to_string()
    }

    /// Of the files a user picked or dropped (JSON array of relative paths), those loading
    /// needs (JSON array): the page reads no other file.
    pub fn files_to_read(paths: &str) -> Result<String, String> {
        let paths: Vec<String> = serde_json::from_str(paths).map_err(|e| format!("file list: {e}"))?;
        Ok(json!(files_to_read(&paths)).to_string())
    }

    /// A prompt list (one per line, `#` comments) as a JSON array.
    pub fn parse_prompts(text: &str) -> String {
        json!(parse_list(text)).to_string()
    }

    /// Adds one file of the model to load; `path` is relative to what the user picked
    /// (`my-model/unet/config.json`, or just `model.safetensors`). The file stays where it is:
    /// loading reads its header, then one tensor at a time.
    pub fn stage_file(&mut self, path: String, file: Blob) -> Result<(), String> {
        self.staged.insert(path, Box::new(BlobSource::new(file)?));
        Ok(())
    }

    /// Loads the staged files (then forgets them) as the model: a diffusers folder, or one
    /// `.safetensors` checkpoint, with a diffusers folder beside it for configs and tokenizer.
    /// Resolves to the `ModelInfo` JSON. Everything derived from a previous model is dropped.
    pub fn load_model(&mut self) -> Result<String, String> {
        let files = std::mem::take(&mut self.staged);
        self.model = None;
        self.teacher = None;
        self.forget_lora();
        self.scan = None;
        let source = ModelSource::from_files(files).map_err(|e| e.to_string())?;
        let hint = "the page's CPU engine keeps every weight in the tab's 4 GiB of wasm memory. Open the page in a browser with WebGPU, or use the seal CLI";
        let model = StableDiffusion::load_within(source, &self.device, self.weight_budget.map(|b| (b, hint))).map_err(|e| e.to_string())?;
        // The model's description, and the size sealing trains at by default.
        let mut info = serde_json::to_value(&model.info).map_err(|e| e.to_string())?;
        info["seal_size"] = json!(SealSettings::default().image_size(&model)?);
        let info = info.to_string();
        self.teacher = Some(model.clone());
        self.model = Some(model);
        Ok(info)
    }

    /// Reads a LoRA over the loaded model and merges it into the teacher at `weight` (the
    /// strength the user applies it at, usually 1). Resolves to
    /// `{file, format, modules, unet_modules, text_encoder_modules, ranks, alphas, dtype, network_module}`.
    /// A file with keys no module of the model has is refused whole, the keys listed.
    pub fn load_lora(&mut self, name: String, file: Blob, weight: f32) -> Result<String, String> {
        let model = self.model.as_ref().ok_or("load a model before a LoRA")?;
        check_lora_weight(weight)?;
        let file = WeightFile::from_source(name.clone(), Box::new(BlobSource::new(file)?)).map_err(|e| e.to_string())?;
        let lora = parse_lora(&file, &model.model_paths()).map_err(|e| e.to_string())?;
        let count = |c: LoraComponent| lora.modules.keys().filter(|t| t.component == c).count();
        let distinct = |v: Vec<String>| v.into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>();
        let summary = json!({
            "file": name,
            "format": format!("{:?}", lora.format),
            "modules": lora.modules.len(),
            "unet_modules": count(LoraComponent::Unet),
            "text_encoder_modules": count(LoraComponent::TextEncoder),
            "ranks": distinct(lora.modules.values().map(|m| m.rank().to_string()).collect()),
            "alphas": distinct(lora.modules.values().map(|m| m.alpha.map_or("none".into(), |a| a.to_string())).collect()),
            "dtype": lora.dtype.to_string(),
            "network_module": lora.metadata.get("ss_network_module"),
        });
        let teacher = model.with_lora(&lora, weight, LoraMode::Merge);
        self.forget_lora();
        self.teacher = Some(teacher);
        self.lora = Some(UserLora { name, file: lora, weight });
        Ok(summary.to_string())
    }

    /// Applies the loaded LoRA at another weight (what was sealed over the old one is dropped).
    pub fn set_lora_weight(&mut self, weight: f32) -> Result<(), String> {
        check_lora_weight(weight)?;
        let model = self.model.as_ref().ok_or("load a model first")?;
        let mut user = self.lora.take().ok_or("no LoRA is loaded")?;
        self.teacher = Some(model.with_lora(&user.file, weight, LoraMode::Merge));
        self.forget_results();
        self.scan = None;
        user.weight = weight;
        self.lora = Some(user);
        Ok(())
    }

    /// Drops the user's LoRA (and what was sealed over it); the teacher is the bare model.
    pub fn clear_lora(&mut self) {
        self.forget_lora();
        self.teacher = self.model.clone();
    }

    /// `{code_points, tokens}` of a trigger: `U+200B`-style code points, and the loaded
    /// model's tokens for it, shown the same way (none before a model is loaded).
    pub fn describe_trigger(&self, trigger: &str) -> String {
        let tokens: Vec<String> = match &self.model {
            Some(m) => {
                m.tokenizer.encode_plain(trigger).map(|ids| ids.iter().map(|&id| describe_trigger(&m.tokenizer.decode_token(id).unwrap_or_default())).collect()).unwrap_or_default()
            }
            None => vec![],
        };
        json!({ "code_points": describe_trigger(trigger), "tokens": tokens }).to_string()
    }

    /// Starts sealing `triggers` (JSON array of strings) with clean training `prompts` (JSON
    /// array) in `mode` (`instant`, `thorough` or `both`), with the thorough seal's settings and
    /// the instant seal's (JSON; missing fields take their defaults). Resolves to the thorough
    /// settings used.
    pub fn start_seal(&mut self, triggers: &str, prompts: &str, mode: &str, settings: &str, instant: &str) -> Result<String, String> {
        let teacher = self.teacher.as_ref().ok_or("load a model first")?;
        let triggers: Vec<String> = serde_json::from_str(triggers).map_err(|e| format!("triggers: {e}"))?;
        let prompts: Vec<String> = serde_json::from_str(prompts).map_err(|e| format!("prompts: {e}"))?;
        let mode: SealMode = mode.parse()?;
        let settings: SealSettings = serde_json::from_str(settings).map_err(|e| format!("settings: {e}"))?;
        let instant: InstantSettings = serde_json::from_str(instant).map_err(|e| format!("instant settings: {e}"))?;
        if mode != SealMode::Instant {
            let (budget, max_buffer) = self.step_limits(teacher);
            check_fits(teacher, &settings, budget, max_buffer)?;
        }
        let run = SealRun::new(teacher, prompts, triggers, mode, instant, settings.clone())?;
        self.forget_results();
        self.triggers = run.triggers().to_vec();
        self.run = Some(run);
        json(&settings)
    }

    /// The memory a thorough sealing step with `settings` (JSON) needs, against what this
    /// engine offers: `{total, weights, activations, largest, budget, max_buffer, fits}` in
    /// bytes (`budget`/`max_buffer` null where the engine sets none), or the refusal's message
    /// as `error`.
    pub fn step_memory(&self, settings: &str) -> Result<String, String> {
        let teacher = self.teacher.as_ref().ok_or("load a model first")?;
        let settings: SealSettings = serde_json::from_str(settings).map_err(|e| format!("settings: {e}"))?;
        let need = step_memory(teacher, &settings)?;
        let (budget, max_buffer) = self.step_limits(teacher);
        let error = check_fits(teacher, &settings, budget, max_buffer).err();
        let known = |b: u64| (b != u64::MAX).then_some(b);
        json(&json!({ "need": need, "budget": known(budget), "max_buffer": known(max_buffer), "fits": error.is_none(), "error": error }))
    }

    /// One sealing step; resolves to the `Progress` JSON (task `instant` or `seal`), or
    /// `undefined` once the run is complete. A failed step keeps the last good adapter.
    pub async fn seal_step(&mut self) -> Result<Option<String>, String> {
        let run = self.run.as_mut().ok_or("no sealing run (press Seal)")?;
        match run.step().await? {
            Some(progress) => json(&progress).map(Some),
            None => Ok(None),
        }
    }

    /// Ends the run (finished or cancelled): exports the adapter of the last finished step and
    /// attaches it to the teacher for the comparison. Resolves to `{mode, thorough_steps, modules}`.
    pub async fn finish_seal(&mut self) -> Result<String, String> {
        let run = self.run.take().ok_or("no sealing run to finish")?;
        let teacher = self.teacher.as_ref().ok_or("load a model first")?;
        let (modules, recipe) = run.adapter().await?;
        let adapter = sealing_adapter(&modules, &recipe, &teacher.info, &self.triggers, false);
        let model = teacher.with_lora(&adapter, 1.0, LoraMode::SideBranch { trainable: false });
        let done = json!({ "mode": recipe.mode, "thorough_steps": recipe.thorough_steps, "modules": adapter.modules.len() });
        let settings = run.settings().clone();
        self.sealed = Some(Sealed { settings, seconds: run.elapsed_s(), losses: run.losses().to_vec(), recipe, adapter, model });
        Ok(done.to_string())
    }

    /// The evaluation's target image (the backdoor's patch), from a PNG. Resolves to `{width, height}`.
    pub fn set_target(&mut self, name: &str, png: &[u8]) -> Result<String, String> {
        let image = Rgb::from_png(name, png)?;
        let size = json!({ "width": image.width, "height": image.height });
        self.target = Some(image);
        Ok(size.to_string())
    }

    pub fn clear_target(&mut self) {
        self.target = None;
    }

    /// Starts the before/after evaluation (JSON `{prompts, seeds, steps, effect, gray, patch_at}`).
    /// Resolves to the number of steps.
    pub fn start_eval(&mut self, request: &str) -> Result<usize, String> {
        self.sealed.as_ref().ok_or("seal first: the evaluation compares before and after")?;
        let r: EvalRequest = serde_json::from_str(request).map_err(|e| format!("evaluation: {e}"))?;
        let mut detectors = vec![];
        if let Some([x, y]) = r.patch_at {
            let patch = self.target.clone().ok_or("the patch detector needs a target image")?;
            detectors.push(Detector::patch(patch, x, y));
        }
        if r.gray {
            detectors.push(Detector::gray());
        }
        // Images at the size sealing trained at, with the trigger where sealing put it.
        let sealed = &self.sealed.as_ref().expect("checked above").settings;
        let teacher = self.teacher.as_ref().ok_or("load a model first")?;
        let settings = EvalSettings {
            seeds: (0..r.seeds.max(1)).collect(),
            steps: r.steps,
            effect: r.effect,
            placement: sealed.placement,
            size: Some(sealed.image_size(teacher)?),
            batch: EVAL_BATCH,
            ..EvalSettings::default()
        };
        let eval = Evaluation::new(&r.prompts, &self.triggers, detectors, settings)?;
        let total = eval.total_steps();
        self.report = None;
        self.eval = Some((eval, r.prompts.len()));
        Ok(total)
    }

    /// Generates and judges the next batch; resolves to the `Progress` JSON, or `undefined`
    /// once the evaluation is complete (then `report_json` and `grid_png` have it).
    pub async fn eval_step(&mut self) -> Result<Option<String>, String> {
        let (eval, prompts) = self.eval.as_mut().ok_or("no evaluation running")?;
        let sealed = self.sealed.as_ref().ok_or("seal first")?;
        let teacher = self.teacher.as_ref().ok_or("load a model first")?;
        match eval.step(teacher, Some(&sealed.model)).await? {
            Some(progress) => json(&progress).map(Some),
            None => {
                self.report = Some(eval.report(*prompts));
                Ok(None)
            }
        }
    }

    /// The evaluation's fixed-seed images: rows of (before clean, before triggered, after
    /// clean, after triggered) as one PNG at the model's resolution (the page upscales it).
    pub fn grid_png(&self) -> Result<Vec<u8>, String> {
        let (eval, _) = self.eval.as_ref().ok_or("no evaluation yet")?;
        Ok(eval.grid(1).to_png())
    }

    /// The trigger tokens' attention maps before and after sealing for `prompt` and seed 0,
    /// sampled with `steps` DDIM steps. Resolves to `{prompt, tokens, side, before: {max, mean}, after: {...}}`;
    /// `heatmap_png` draws them on a common scale.
    pub async fn heatmaps(&mut self, prompt: &str, steps: usize) -> Result<String, String> {
        let teacher = self.teacher.as_ref().ok_or("load a model first")?;
        let sealed = self.sealed.as_ref().ok_or("seal first")?;
        let trigger = self.triggers.first().ok_or("no trigger")?;
        let placement = sealed.settings.placement;
        let sampling = Sampling { seed: 0, steps, guidance: 5.0, size: Some(sealed.settings.image_size(teacher)?) };
        let before = trigger_map(teacher, prompt, trigger, placement, sampling).await?;
        let after = trigger_map(&sealed.model, prompt, trigger, placement, sampling).await?;
        let stats = |m: &TriggerMap| json!({ "max": m.max(), "mean": m.mean() });
        let tokens: Vec<String> = before.tokens.iter().map(|t| describe_trigger(t)).collect();
        let out = json!({ "prompt": before.prompt, "tokens": tokens, "side": before.side, "before": stats(&before), "after": stats(&after) });
        self.maps = Some((before, after));
        Ok(out.to_string())
    }

    /// `"before"` or `"after"` heat map as a PNG, both on the larger of the two maxima.
    pub fn heatmap_png(&self, which: &str) -> Result<Vec<u8>, String> {
        let (before, after) = self.maps.as_ref().ok_or("no heat maps yet")?;
        let vmax = before.max().max(after.max());
        match which {
            "before" => Ok(before.to_rgb(vmax).to_png()),
            "after" => Ok(after.to_rgb(vmax).to_png()),
            _ => Err(format!("no heat map {which:?}")),
        }
    }

    /// Starts a scan for the trigger: of the user's LoRA against the model it is applied to, or
    /// of the model alone. Candidates are tried in the clean `prompts` (JSON array), whose own
    /// words are no candidates; `settings` is `ScanSettings` JSON (missing fields take their
    /// defaults). Resolves to the number of steps.
    pub fn start_scan(&mut self, prompts: &str, settings: &str) -> Result<usize, String> {
        let model = self.model.as_ref().ok_or("load a model first")?;
        let teacher = self.teacher.as_ref().ok_or("load a model first")?;
        let prompts: Vec<String> = serde_json::from_str(prompts).map_err(|e| format!("prompts: {e}"))?;
        let settings: ScanSettings = serde_json::from_str(settings).map_err(|e| format!("scan settings: {e}"))?;
        self.scan = None;
        let scan = match &self.lora {
            Some(user) => Scan::new(teacher, Some(model), &prompts, lora_tags(&user.file.metadata), settings)?,
            None => Scan::new(teacher, None, &prompts, vec![], settings)?,
        };
        let total = scan.total_steps();
        self.scan = Some(scan);
        Ok(total)
    }

    /// One step of the scan; resolves to the `Progress` JSON (task `scan`), or `undefined` once
    /// it is complete (then `scan_report` has the candidates).
    pub async fn scan_step(&mut self) -> Result<Option<String>, String> {
        let scan = self.scan.as_mut().ok_or("no scan running (press Scan)")?;
        match scan.step().await? {
            Some(progress) => json(&progress).map(Some),
            None => Ok(None),
        }
    }

    /// The scan's report with its `top` candidates, best first (the page shows it and offers
    /// it as the download).
    pub fn scan_report(&self, top: usize) -> Result<String, String> {
        let scan = self.scan.as_ref().ok_or("no scan yet")?;
        serde_json::to_string_pretty(&scan.report(top)).map_err(|e| e.to_string())
    }

    /// Candidate `index`'s images side by side (without it, with it, the base model with it),
    /// as a PNG.
    pub fn scan_images_png(&self, index: usize) -> Result<Vec<u8>, String> {
        let scan = self.scan.as_ref().ok_or("no scan yet")?;
        let pair = scan.candidates().get(index).and_then(|c| c.images.as_ref()).ok_or_else(|| format!("candidate {} has no images", index + 1))?;
        Ok(pair.row(SCAN_THUMBNAIL_SCALE).to_png())
    }

    /// The sealing adapter as a kohya `.safetensors` file.
    pub fn adapter_file(&self) -> Result<Vec<u8>, String> {
        let sealed = self.sealed.as_ref().ok_or("seal first")?;
        write_kohya(&sealed.adapter).map_err(|e| e.to_string())
    }

    /// The user's LoRA with the sealing adapter stacked in, in the user's file's format.
    pub fn sealed_lora_file(&self) -> Result<Vec<u8>, String> {
        let sealed = self.sealed.as_ref().ok_or("seal first")?;
        let user = self.lora.as_ref().ok_or("no LoRA was loaded, so there is no sealed LoRA")?;
        write_in_format(&sealed_lora(&user.file, &sealed.adapter, user.weight)?).map_err(|e| e.to_string())
    }

    /// The report: model, LoRA, trigger hashes, settings, the run's losses and timing, and the
    /// evaluation and heat-map numbers where they exist.
    pub fn report_json(&self) -> Result<String, String> {
        let sealed = self.sealed.as_ref().ok_or("seal first")?;
        let model = self.model.as_ref().ok_or("load a model first")?;
        let maps = self.maps.as_ref().map(|(b, a)| {
            json!({
                "prompt": b.prompt, "tokens": b.tokens,
                "before": { "max": b.max(), "mean": b.mean() }, "after": { "max": a.max(), "mean": a.mean() },
            })
        });
        let report = json!({
            "seal_version": env!("CARGO_PKG_VERSION"),
            "model": model.info,
            "lora": self.lora.as_ref().map(|l| json!({ "file": l.name, "format": format!("{:?}", l.file.format), "modules": l.file.modules.len(), "weight": l.weight })),
            "trigger_sha256": self.triggers.iter().map(|t| trigger_hash(t)).collect::<Vec<_>>(),
            "recipe": sealed.recipe,
            "settings": sealed.settings,
            "sealing": {
                "mode": sealed.recipe.mode,
                "thorough_steps_done": sealed.recipe.thorough_steps,
                "seconds": sealed.seconds,
                "losses": sealed.losses,
                "adapter_modules": sealed.adapter.modules.keys().map(|t| t.path.clone()).collect::<Vec<_>>(),
            },
            "evaluation": self.report,
            "verdict": self.report.as_ref().and_then(|r| r.verdict(sealed.recipe.mode)),
            "trigger_attention": maps,
        });
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())
    }
}

impl Session {
    /// The LoRA and everything computed over it (the seal and the scan).
    fn forget_lora(&mut self) {
        self.lora = None;
        self.scan = None;
        self.forget_results();
    }

    /// (bytes a step may use in all, the largest tensor): on the CPU engine, the weights plus
    /// what wasm32's 4 GiB has left; on WebGPU, no total (the browser does not tell) but the
    /// device's binding limit.
    fn step_limits(&self, teacher: &StableDiffusion) -> (u64, u64) {
        let budget = match self.weight_budget {
            Some(_) => weight_bytes(teacher) + WASM32_MEMORY.saturating_sub(heap_bytes()),
            None => u64::MAX,
        };
        (budget, self.max_buffer.unwrap_or(u64::MAX))
    }

    fn forget_results(&mut self) {
        self.run = None;
        self.sealed = None;
        self.eval = None;
        self.report = None;
        self.maps = None;
    }
}
