//! Sealing settings. Most defaults come from the first runs on the pixel-backdoored fixture
//! (`seal ablate`): pure-noise latents beat the teacher's and the student's trajectories, lr
//! 2e-3 over 300 steps with a preservation weight of 1 keeps clean PSNR above 25 dB, uniform
//! noise as the trigger tokens' attention target. Adapters on the text encoder too were chosen
//! on the validation suite (`seal ablate --suite`: the pixel fixture and planted style and
//! object-swap backdoors, validation prompts and seeds), as the best worst case: the style
//! backdoor at 17.5 % attack success where UNet-only adapters left 22.5 %, clean PSNR 27.1 dB
//! where they kept 24.3.

use seal_sd::lora::Projection;
use seal_sd::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

use crate::prompts::Placement;

/// Where the student's noisy latents come from.
/// The largest side sealing trains at by default: a 512-px model (SD 1.5, BK-SDM) seals at
/// 256 px, a quarter of the pixels (its self-attention scores a sixteenth).
pub const SEAL_SIZE_AT_MOST: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatentSource {
    /// Pure Gaussian noise at a uniform timestep (the paper's code).
    Noise,
    /// Points on the teacher's own DDIM sampling trajectory for the clean prompt.
    Trajectory,
    /// Points on the student's own DDIM sampling trajectory for the triggered prompt (on
    /// policy: where the sealed model actually goes when it sees the trigger).
    Student,
}

/// What the trigger tokens' normalised cross-attention maps are pushed towards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttnTarget {
    /// All zeros ("black"): the trigger draws no localised attention.
    Zeros,
    /// Uniform noise in [0, 1].
    Noise,
    /// The teacher's maps of a random substitute word placed where the trigger was.
    Substitute,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct SealSettings {
    pub steps: usize,
    /// Prompts per step.
    pub batch: usize,
    pub rank: usize,
    pub alpha: f32,
    /// Cross-attention projections that get the adapter.
    pub targets: Vec<Projection>,
    /// Also adapt the text encoder's self-attention (q/k/v/out_proj).
    pub text_encoder: bool,
    /// Peak learning rate (AdamW).
    pub lr: f64,
    /// Linear warm-up steps, then cosine decay to `min_lr_ratio * lr` (1: constant).
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub weight_decay: f32,
    /// `a` in L = a L_attn + (1 - a) L_pred.
    pub attn_weight: f32,
    /// Switches the attention loss off (for measuring its effect).
    pub use_attn_loss: bool,
    pub attn_target: AttnTarget,
    pub latents: LatentSource,
    /// Training timesteps are drawn from [t_min, t_max].
    pub t_min: usize,
    pub t_max: usize,
    /// Trajectory source: DDIM steps per teacher trajectory and its guidance scale.
    pub trajectory_steps: usize,
    pub guidance: f64,
    /// Weight of the preservation term: student(clean prompt) vs teacher(clean prompt).
    pub preserve_weight: f32,
    pub placement: Placement,
    /// Image side in pixels that training latents stand for (`None`: the model's own, at most
    /// 256). Smaller is faster; the sealed adapter applies at any size.
    pub resolution: Option<usize>,
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
            latents: LatentSource::Noise,
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

    pub fn validate(&self) -> Result<(), String> {
        let bad = |m: &str| Err(format!("settings: {m}"));
        if self.steps == 0 || self.batch == 0 || self.rank == 0 {
            return bad("steps, batch and rank must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && (0.0..=1.0).contains(&self.attn_weight)) {
            return bad("lr must be positive; attn_weight in [0, 1]");
        }
        if self.t_min > self.t_max || self.t_max > 999 {
            return bad("timestep range must satisfy t_min <= t_max <= 999");
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return bad("alpha must be positive (the adapter's scale is alpha / rank; 0 would train nothing)");
        }
        if self.latents != LatentSource::Noise && self.trajectory_steps == 0 {
            return bad("trajectory_steps must be at least 1 for trajectory or student latents");
        }
        if self.targets.is_empty() {
            return bad("at least one cross-attention projection must be trained");
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
