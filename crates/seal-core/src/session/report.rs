//! What the session answers with: typed, serialisable summaries and the seal's report (the
//! same JSON from the page's download and `seal seal --report`).

use std::collections::BTreeSet;

use seal_sd::pipeline::{ModelInfo, StableDiffusion};
use seal_sd::seal_weights::lora::{LoraComponent, LoraFile};
use serde::Serialize;

use super::Sealed;
use crate::eval::{EvalReport, Verdict};
use crate::export::trigger_hash;
use crate::heatmap::TriggerMap;
use crate::progress::Losses;
use crate::unlearn::SealSettings;
use crate::unlearn::describe_trigger;
use crate::unlearn::memory::StepMemory;
use crate::unlearn::run::{Recipe, SealMode};

/// A model as loaded: what was recognised, and the size sealing trains at by default.
#[derive(Clone, Debug, Serialize)]
pub struct Loaded {
    #[serde(flatten)]
    pub info: ModelInfo,
    pub seal_size: usize,
}

/// A user LoRA as parsed against the model.
#[derive(Clone, Debug, Serialize)]
pub struct LoraSummary {
    pub file: String,
    pub format: String,
    pub modules: usize,
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
    /// The distinct ranks and alphas ("none" where a module has no alpha).
    pub ranks: Vec<String>,
    pub alphas: Vec<String>,
    pub dtype: String,
    /// kohya's `ss_network_module` (e.g. `lycoris.kohya` for LoCon), where the file says.
    pub network_module: Option<String>,
}

impl LoraSummary {
    pub(super) fn new(file: &str, lora: &LoraFile) -> Self {
        let count = |c: LoraComponent| lora.modules.keys().filter(|t| t.component == c).count();
        let distinct = |v: BTreeSet<String>| v.into_iter().collect();
        LoraSummary {
            file: file.into(),
            format: format!("{:?}", lora.format),
            modules: lora.modules.len(),
            unet_modules: count(LoraComponent::Unet),
            text_encoder_modules: count(LoraComponent::TextEncoder),
            ranks: distinct(lora.modules.values().map(|m| m.rank().to_string()).collect()),
            alphas: distinct(lora.modules.values().map(|m| m.alpha.map_or("none".into(), |a| a.to_string())).collect()),
            dtype: lora.dtype.to_string(),
            network_module: lora.metadata.get("ss_network_module").cloned(),
        }
    }
}

/// A trigger as `U+200B`-style code points, and the model's tokens for it shown the same way.
#[derive(Clone, Debug, Serialize)]
pub struct TriggerInfo {
    pub code_points: String,
    pub tokens: Vec<String>,
}

/// A thorough step's memory against the engine's bounds (`None`: the engine sets none), and
/// the refusal's message where it does not fit.
#[derive(Clone, Debug, Serialize)]
pub struct StepPlan {
    pub need: StepMemory,
    pub budget: Option<u64>,
    pub max_buffer: Option<u64>,
    pub fits: bool,
    pub error: Option<String>,
}

/// A finished (or cancelled) run.
#[derive(Clone, Debug, Serialize)]
pub struct SealDone {
    pub mode: SealMode,
    pub thorough_steps: usize,
    /// Modules in the exported adapter.
    pub modules: usize,
    pub recipe: Recipe,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct MapStats {
    pub max: f32,
    pub mean: f32,
}

impl MapStats {
    fn of(map: &TriggerMap) -> Self {
        MapStats { max: map.max(), mean: map.mean() }
    }
}

/// The trigger's attention maps before and after sealing, summarised (tokens as code points).
#[derive(Clone, Debug, Serialize)]
pub struct Heatmaps {
    pub prompt: String,
    pub tokens: Vec<String>,
    pub side: usize,
    pub before: MapStats,
    pub after: MapStats,
}

impl Heatmaps {
    pub(super) fn new(before: &TriggerMap, after: &TriggerMap) -> Self {
        let tokens = before.tokens.iter().map(|t| describe_trigger(t)).collect();
        Heatmaps { prompt: before.prompt.clone(), tokens, side: before.side, before: MapStats::of(before), after: MapStats::of(after) }
    }
}

/// The user's LoRA as the seal used it.
#[derive(Clone, Debug, Serialize)]
pub struct LoraUse {
    pub file: String,
    pub format: String,
    pub modules: usize,
    pub weight: f32,
}

/// The run itself.
#[derive(Clone, Debug, Serialize)]
pub struct Sealing {
    pub mode: SealMode,
    pub thorough_steps_done: usize,
    pub seconds: f64,
    pub losses: Vec<Losses>,
    pub adapter_modules: Vec<String>,
}

/// The trigger tokens' attention before and after, as in the heat maps.
#[derive(Clone, Debug, Serialize)]
pub struct TriggerAttention {
    pub prompt: String,
    pub tokens: Vec<String>,
    pub before: MapStats,
    pub after: MapStats,
}

/// Everything about one seal: what a user keeps beside the adapter.
#[derive(Clone, Debug, Serialize)]
pub struct SealReport {
    pub seal_version: &'static str,
    pub model: ModelInfo,
    pub lora: Option<LoraUse>,
    /// The triggers as SHA-256 (the report may travel; the trigger stays with the user).
    pub trigger_sha256: Vec<String>,
    pub recipe: Recipe,
    pub settings: SealSettings,
    pub sealing: Sealing,
    pub evaluation: Option<EvalReport>,
    pub verdict: Option<Verdict>,
    pub trigger_attention: Option<TriggerAttention>,
}

impl SealReport {
    pub(super) fn new(
        model: &StableDiffusion,
        lora: Option<LoraUse>,
        triggers: &[String],
        sealed: &Sealed,
        eval: Option<&EvalReport>,
        maps: Option<&(TriggerMap, TriggerMap)>,
    ) -> Self {
        SealReport {
            seal_version: env!("CARGO_PKG_VERSION"),
            model: model.info.clone(),
            lora,
            trigger_sha256: triggers.iter().map(|t| trigger_hash(t)).collect(),
            recipe: sealed.recipe.clone(),
            settings: sealed.settings.clone(),
            sealing: Sealing {
                mode: sealed.recipe.mode,
                thorough_steps_done: sealed.recipe.thorough_steps,
                seconds: sealed.seconds,
                losses: sealed.losses.clone(),
                adapter_modules: sealed.adapter.modules.keys().map(|t| t.path.clone()).collect(),
            },
            evaluation: eval.cloned(),
            verdict: eval.and_then(|r| r.verdict(sealed.recipe.mode)),
            trigger_attention: maps.map(|(b, a)| TriggerAttention { prompt: b.prompt.clone(), tokens: b.tokens.clone(), before: MapStats::of(b), after: MapStats::of(a) }),
        }
    }
}
