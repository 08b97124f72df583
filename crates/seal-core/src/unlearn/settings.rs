//! Sealing settings. Most defaults come from the first runs on the pixel-backdoored fixture
//! (`seal ablate`): pure-noise latents beat the teacher's and the student's trajectories, lr
//! 2e-3 over 300 steps with a preservation weight of 1 keeps clean PSNR above 25 dB, uniform
//! noise as the trigger tokens' attention target. Adapters on the text encoder too were chosen
//! on the validation suite (`seal ablate --suite`: the pixel fixture and planted style and
//! object-swap backdoors, validation prompts and seeds), as the best worst case: the style
//! backdoor at 17.5 % attack success where UNet-only adapters left 22.5 %, clean PSNR 27.1 dB
//! where they kept 24.3.

use schemars::JsonSchema;
use seal_sd::lora::Projection;
use seal_sd::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

use crate::prompts::Placement;

/// The largest side sealing trains at by default: a 512-px model (SD 1.5, BK-SDM) seals at
/// 256 px, a quarter of the pixels (its self-attention scores a sixteenth).
pub const SEAL_SIZE_AT_MOST: usize = 256;

/// Where the student's noisy latents come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LatentSource {
    /// Pure Gaussian noise at a uniform timestep (the paper's code).
    Noise,
    /// Points on the teacher's own DDIM sampling trajectory for the clean prompt (the default:
    /// on the validation suite it halved the style backdoor's residue; `seal ablate --suite`).
    Trajectory,
    /// Points on the student's own DDIM sampling trajectory for the triggered prompt (on
    /// policy: where the sealed model actually goes when it sees the trigger).
    Student,
}

/// What the trigger tokens' normalised cross-attention maps are pushed towards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttnTarget {
    /// All zeros ("black"): the trigger draws no localised attention.
    Zeros,
    /// Uniform noise in [0, 1].
    Noise,
    /// The teacher's maps of a random substitute word placed where the trigger was.
    Substitute,
}

/// The thorough seal's settings. Each field's doc is its label, a blank line, then its help:
/// the page's form and the CLI's flags are made from this schema (`crate::settings`).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct SealSettings {
    /// Steps
    ///
    /// Optimisation steps; more steps seal more thoroughly.
    #[schemars(range(min = 1), extend("x-place" = "basic"))]
    pub steps: usize,
    /// Prompts per step
    ///
    /// Larger batches give steadier steps, but each takes longer and needs more memory.
    #[schemars(range(min = 1), extend("x-place" = "basic"))]
    pub batch: usize,
    /// Adapter rank
    ///
    /// Capacity of the sealing LoRA.
    #[schemars(range(min = 1), extend("x-place" = "basic"))]
    pub rank: usize,
    /// Adapter alpha
    ///
    /// LoRA scale = alpha / rank.
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub alpha: f32,
    /// Adapted projections
    ///
    /// UNet cross-attention projections that get the adapter.
    #[schemars(length(min = 1))]
    pub targets: Vec<Projection>,
    /// Text-encoder adapter
    ///
    /// Also adapt the text encoder's self-attention (q, k, v, out).
    pub text_encoder: bool,
    /// Learning rate
    ///
    /// Peak AdamW learning rate (linear warm-up, then cosine decay).
    #[schemars(extend("exclusiveMinimum" = 0, "x-place" = "basic"))]
    pub lr: f64,
    /// Warm-up steps
    ///
    /// Linear learning-rate warm-up.
    pub warmup: usize,
    /// Final learning rate
    ///
    /// Where the cosine decay ends, as a share of the peak (1: constant).
    #[schemars(range(min = 0, max = 1))]
    pub min_lr_ratio: f64,
    /// Weight decay
    ///
    /// AdamW weight decay.
    #[schemars(range(min = 0))]
    pub weight_decay: f32,
    /// Attention weight
    ///
    /// a in L = a·L_attn + (1 − a)·L_pred.
    #[schemars(range(min = 0, max = 1), extend("x-place" = "basic"))]
    pub attn_weight: f32,
    /// Attention guidance
    ///
    /// Off: train on the prediction loss alone (for comparison).
    pub use_attn_loss: bool,
    /// Trigger attention target
    ///
    /// What the trigger tokens' attention maps are pushed towards.
    #[schemars(extend("x-place" = "basic"))]
    pub attn_target: AttnTarget,
    /// Training latents
    ///
    /// Where the student's noisy latents come from.
    pub latents: LatentSource,
    /// Lowest timestep
    ///
    /// Training timesteps are drawn from [lowest, highest].
    #[schemars(range(max = 999))]
    pub t_min: usize,
    /// Highest timestep
    ///
    /// At most 999.
    #[schemars(range(max = 999))]
    pub t_max: usize,
    /// Trajectory steps
    ///
    /// DDIM steps of each teacher or student trajectory (trajectory and student latents).
    #[schemars(range(min = 1))]
    pub trajectory_steps: usize,
    /// Trajectory guidance
    ///
    /// Classifier-free guidance scale of those trajectories.
    #[schemars(range(min = 0))]
    pub guidance: f64,
    /// Preservation weight
    ///
    /// Keeps clean prompts' predictions unchanged (student vs teacher on clean prompts).
    #[schemars(range(min = 0))]
    pub preserve_weight: f32,
    /// Trigger placement
    ///
    /// Where the trigger goes in training prompts (and in the comparison's).
    pub placement: Placement,
    /// Resolution
    ///
    /// Image side in pixels for training and the comparison; empty: the model's own, at most
    /// 256. Smaller is faster; the adapter works at any size.
    #[schemars(extend("x-place" = "basic"))]
    pub resolution: Option<usize>,
    /// Seed
    ///
    /// For the adapter's initialisation and the sampling of training points.
    pub seed: u64,
}

impl Default for SealSettings {
    fn default() -> Self {
        Self {
            steps: 300,
            batch: 8,
            rank: 4,
            alpha: 4.0,
            targets: vec![Projection::ToK, Projection::ToV],
            text_encoder: true,
            lr: 2e-3,
            warmup: 10,
            min_lr_ratio: 0.1,
            weight_decay: 1e-2,
            attn_weight: 0.5,
            use_attn_loss: true,
            attn_target: AttnTarget::Noise,
            latents: LatentSource::Trajectory,
            t_min: 0,
            t_max: 999,
            trajectory_steps: 25,
            guidance: 5.0,
            preserve_weight: 1.0,
            placement: Placement::Prefix,
            resolution: None,
            seed: 0,
        }
    }
}

impl SealSettings {
    /// The learning rate at `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let progress = (step - self.warmup) as f64 / (self.steps.saturating_sub(self.warmup)).max(1) as f64;
        let floor = self.min_lr_ratio;
        self.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()))
    }

    /// The side in pixels sealing trains at: `resolution`, or the model's own size up to
    /// [`SEAL_SIZE_AT_MOST`] (an adapter does not depend on the size it was trained at; see
    /// `seal ablate --suite`, variant "both, half size").
    pub fn image_size(&self, model: &StableDiffusion) -> Result<usize, String> {
        model.image_size(Some(self.resolution.unwrap_or(model.info.sample_size.min(SEAL_SIZE_AT_MOST)))).map_err(|e| format!("settings: {e}"))
    }

    /// The schema's ranges (`crate::settings::check`), then what relates two fields.
    pub fn validate(&self) -> Result<(), String> {
        crate::settings::check("settings", self)?;
        if self.t_min > self.t_max {
            return Err(format!("settings: t_min ({}) must not exceed t_max ({})", self.t_min, self.t_max));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = SealSettings { steps: 110, warmup: 10, lr: 1e-3, min_lr_ratio: 0.1, ..SealSettings::default() };
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55e-3).abs() < 1e-9);
        assert!((s.lr_at(110) - 1e-4).abs() < 1e-12);
        let constant = SealSettings { min_lr_ratio: 1.0, warmup: 0, ..s };
        assert!((0..110).all(|i| (constant.lr_at(i) - 1e-3).abs() < 1e-12));
        assert!(SealSettings { t_min: 500, t_max: 100, ..SealSettings::default() }.validate().is_err());
        assert!(SealSettings::default().validate().is_ok());
        assert!(SealSettings { alpha: 0.0, ..SealSettings::default() }.validate().unwrap_err().contains("alpha"));
        let trajectory = SealSettings { latents: LatentSource::Trajectory, trajectory_steps: 0, ..SealSettings::default() };
        assert!(trajectory.validate().unwrap_err().contains("trajectory_steps"));
    }
}
