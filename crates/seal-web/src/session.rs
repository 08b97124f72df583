//! The page's side of `seal_core::session::Session`: JS values in and out (serde-wasm-bindgen),
//! dropped files as Blobs read a tensor at a time, and the bounds of the page's engine. The
//! workflow itself (what is invalidated when, what a seal needs first) lives in seal-core.

use seal_core::image::Rgb;
use seal_core::progress::Progress;
use seal_core::prompts::{BUILT_IN, parse_list, split};
use seal_core::scan::ScanSettings;
use seal_core::session::{EngineLimits, EvalRequest, SealRequest};
use seal_core::settings::{Field, fields};
use seal_core::unlearn::SealSettings;
use seal_core::unlearn::instant::InstantSettings;
use seal_sd::pipeline::{Files, ModelSource, Precision, files_to_read};
use seal_sd::seal_weights::WeightFile;
use serde::Serialize;
use serde::de::DeserializeOwned;
use wasm_bindgen::prelude::*;
use web_sys::Blob;

use crate::Engine;
use crate::blob::BlobSource;

/// Enlargement of the scan's thumbnails (the page shows them at their pixel size).
const SCAN_THUMBNAIL_SCALE: usize = 2;

/// Weights on the CPU engine: wasm32 addresses 4 GiB in all, and sealing needs room beside them.
const CPU_WEIGHT_BUDGET: u64 = 3 << 30;

/// What a wasm32 module can address.
const WASM32_MEMORY: u64 = 4 << 30;

const CPU_HINT: &str = "the page's CPU engine keeps every weight in the tab's 4 GiB of wasm memory. Open the page in a browser with WebGPU, or use the seal CLI";

/// What wasm32's 4 GiB has left (the heap never shrinks); natively, no bound applies.
fn wasm_free() -> u64 {
    #[cfg(target_family = "wasm")]
    return WASM32_MEMORY.saturating_sub(core::arch::wasm32::memory_size(0) as u64 * 65536);
    #[cfg(not(target_family = "wasm"))]
    WASM32_MEMORY
}

/// A Rust value as a plain JS value (objects for maps, `null` for `None`, as JSON would).
fn to_js<T: Serialize>(value: &T) -> Result<JsValue, String> {
    value.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).map_err(|e| e.to_string())
}

/// A step's progress, or `undefined` once the task is complete.
fn progress_js(progress: Option<Progress>) -> Result<JsValue, String> {
    progress.map_or(Ok(JsValue::UNDEFINED), |p| to_js(&p))
}

/// A JS value as `T`; `what` names it in the message.
fn from_js<T: DeserializeOwned>(value: JsValue, what: &str) -> Result<T, String> {
    serde_wasm_bindgen::from_value(value).map_err(|e| format!("{what}: {e}"))
}

#[wasm_bindgen]
pub struct Session {
    inner: seal_core::session::Session,
    /// Files given for the next `load_model`, by relative path.
    staged: Files,
}

#[wasm_bindgen]
impl Session {
    /// A session on the engine's device, within what the engine can hold: on the CPU engine,
    /// weights up to 3 GiB and a step within what wasm32 has left; on WebGPU, tensors within
    /// the device's binding limit.
    #[wasm_bindgen(constructor)]
    pub fn new(engine: &Engine) -> Session {
        let cpu = engine.backend == "cpu" && cfg!(target_family = "wasm");
        let limits = EngineLimits {
            weights: cpu.then_some((CPU_WEIGHT_BUDGET, CPU_HINT)),
            free: cpu.then_some(wasm_free as fn() -> u64),
            max_buffer: engine.max_buffer,
            precision: if engine.half { Precision::AsStored } else { Precision::F32 },
        };
        Session { inner: seal_core::session::Session::new(&engine.device, limits), staged: Files::new() }
    }

    /// Every setting of the three forms as its type describes it (`seal_core::settings::Field`):
    /// `{thorough, instant, scan}`, each a list in declaration order.
    pub fn settings_fields() -> Result<JsValue, String> {
        #[derive(Serialize)]
        struct Forms {
            thorough: Vec<Field>,
            instant: Vec<Field>,
            scan: Vec<Field>,
        }
        to_js(&Forms { thorough: fields::<SealSettings>(), instant: fields::<InstantSettings>(), scan: fields::<ScanSettings>() })
    }

    /// The built-in prompt set split into `{train, heldout}` (every 4th prompt held out).
    pub fn builtin_prompts() -> Result<JsValue, String> {
        #[derive(Serialize)]
        struct Split {
            train: Vec<String>,
            heldout: Vec<String>,
        }
        let (train, heldout) = split(&parse_list(BUILT_IN), 4);
        to_js(&Split { train, heldout })
    }

    /// Of the relative paths a user picked or dropped, those loading needs: the page reads no
    /// other file.
    pub fn files_to_read(paths: Vec<String>) -> Vec<String> {
        files_to_read(&paths)
    }

    /// A prompt list (one per line, `#` comments).
    pub fn parse_prompts(text: &str) -> Vec<String> {
        parse_list(text)
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
    /// Resolves to `Loaded` (the model's description and the size sealing trains at).
    pub fn load_model(&mut self) -> Result<JsValue, String> {
        let source = ModelSource::from_files(std::mem::take(&mut self.staged))?;
        to_js(&self.inner.load_model(source)?)
    }

    /// Reads a LoRA over the loaded model and merges it into the teacher at `weight`.
    /// Resolves to its `LoraSummary`.
    pub fn load_lora(&mut self, name: String, file: Blob, weight: f32) -> Result<JsValue, String> {
        let file = WeightFile::from_source(name, Box::new(BlobSource::new(file)?))?;
        to_js(&self.inner.load_lora(&file, weight)?)
    }

    pub fn set_lora_weight(&mut self, weight: f32) -> Result<(), String> {
        self.inner.set_lora_weight(weight).map_err(String::from)
    }

    pub fn clear_lora(&mut self) {
        self.inner.clear_lora();
    }

    /// `{code_points, tokens}` of a trigger.
    pub fn describe_trigger(&self, trigger: &str) -> Result<JsValue, String> {
        to_js(&self.inner.describe_trigger(trigger))
    }

    /// Starts sealing (a `SealRequest`: `{triggers, prompts, mode, settings, instant}`).
    pub fn start_seal(&mut self, request: JsValue) -> Result<(), String> {
        self.inner.start_seal(from_js::<SealRequest>(request, "seal request")?).map_err(String::from)
    }

    /// The memory a thorough sealing step with `settings` needs, against what this engine
    /// offers (a `StepPlan`).
    pub fn step_memory(&self, settings: JsValue) -> Result<JsValue, String> {
        to_js(&self.inner.step_memory(&from_js(settings, "settings")?)?)
    }

    /// One sealing step; resolves to its `Progress`, or `undefined` once the run is complete.
    pub async fn seal_step(&mut self) -> Result<JsValue, String> {
        progress_js(self.inner.seal_step().await?)
    }

    /// Ends the run (finished or cancelled); resolves to `SealDone`.
    pub async fn finish_seal(&mut self) -> Result<JsValue, String> {
        to_js(&self.inner.finish_seal().await?)
    }

    /// The evaluation's target image (the backdoor's patch), from a PNG. Resolves to `{width, height}`.
    pub fn set_target(&mut self, name: &str, png: &[u8]) -> Result<JsValue, String> {
        #[derive(Serialize)]
        struct Size {
            width: usize,
            height: usize,
        }
        let image = Rgb::from_png(name, png)?;
        let size = Size { width: image.width, height: image.height };
        self.inner.set_target(Some(image));
        to_js(&size)
    }

    pub fn clear_target(&mut self) {
        self.inner.set_target(None);
    }

    /// Starts the before/after evaluation (an `EvalRequest`); resolves to the number of steps.
    pub fn start_eval(&mut self, request: JsValue) -> Result<usize, String> {
        self.inner.start_eval(from_js::<EvalRequest>(request, "evaluation")?).map_err(String::from)
    }

    /// One step of the evaluation (a sampler step or one image's decoding); resolves to its
    /// `Progress`, or `undefined` once complete (then `report` and `grid_png` have it).
    pub async fn eval_step(&mut self) -> Result<JsValue, String> {
        progress_js(self.inner.eval_step().await?)
    }

    /// The evaluation's fixed-seed images as one PNG at the model's resolution (the page upscales it).
    pub fn grid_png(&self) -> Result<Vec<u8>, String> {
        Ok(self.inner.grid(1)?.to_png())
    }

    /// The trigger tokens' attention maps before and after sealing; resolves to `Heatmaps`.
    pub async fn heatmaps(&mut self, prompt: &str, steps: usize) -> Result<JsValue, String> {
        to_js(&self.inner.heatmaps(prompt, steps).await?)
    }

    /// `"before"` or `"after"` heat map as a PNG.
    pub fn heatmap_png(&self, which: &str) -> Result<Vec<u8>, String> {
        let after = match which {
            "before" => false,
            "after" => true,
            _ => return Err(format!("no heat map {which:?}")),
        };
        Ok(self.inner.heatmap(after)?.to_png())
    }

    /// Starts a scan for the trigger in the clean `prompts` with `ScanSettings`; resolves to
    /// the number of steps.
    pub fn start_scan(&mut self, prompts: Vec<String>, settings: JsValue) -> Result<usize, String> {
        let settings: ScanSettings = from_js(settings, "scan settings")?;
        self.inner.start_scan(&prompts, settings).map_err(String::from)
    }

    /// One step of the scan; resolves to its `Progress`, or `undefined` once complete.
    pub async fn scan_step(&mut self) -> Result<JsValue, String> {
        progress_js(self.inner.scan_step().await?)
    }

    /// The scan's `ScanReport` with its `top` candidates, best first.
    pub fn scan_report(&self, top: usize) -> Result<JsValue, String> {
        to_js(&self.inner.scan_report(top)?)
    }

    /// Candidate `index`'s images side by side, as a PNG.
    pub fn scan_images_png(&self, index: usize) -> Result<Vec<u8>, String> {
        Ok(self.inner.scan_images(index, SCAN_THUMBNAIL_SCALE)?.to_png())
    }

    /// The sealing adapter as a kohya `.safetensors` file.
    pub fn adapter_file(&self) -> Result<Vec<u8>, String> {
        self.inner.adapter_file().map_err(String::from)
    }

    /// The user's LoRA with the sealing adapter stacked in, in the user's file's format.
    pub fn sealed_lora_file(&self) -> Result<Vec<u8>, String> {
        self.inner.sealed_lora_file().map_err(String::from)
    }

    /// The `SealReport` (the same as `seal seal --report` writes).
    pub fn report(&self) -> Result<JsValue, String> {
        to_js(&self.inner.report()?)
    }
}
