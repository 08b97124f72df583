//! Noise schedules and samplers, configured like diffusers' `scheduler_config.json`.
//!
//! Schedule arithmetic runs in f64 on the host (it is a handful of scalars per step); only the
//! latent update touches tensors.

use burn::tensor::Tensor;
use serde::Deserialize;

use crate::ModelError;

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default = "ddim")]
    pub class_name: String,
    #[serde(default = "train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "scaled_linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default = "leading")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

fn ddim() -> String {
    "DDIMScheduler".into()
}
fn train_steps() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.00085
}
fn beta_end() -> f64 {
    0.012
}
fn scaled_linear() -> String {
    "scaled_linear".into()
}
fn epsilon() -> String {
    "epsilon".into()
}
fn leading() -> String {
    "leading".into()
}

/// Which sampler to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    Ddim,
    Euler,
}

impl SamplerKind {
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        match name.to_ascii_lowercase().as_str() {
            "ddim" | "ddimscheduler" => Ok(Self::Ddim),
            "euler" | "eulerdiscretescheduler" => Ok(Self::Euler),
            other => Err(ModelError::Unsupported(format!("scheduler {other:?} (supported: ddim, euler)"))),
        }
    }
}

impl SchedulerConfig {
    /// SD 1.x's training schedule, for single-file checkpoints that carry no scheduler config.
    pub fn sd() -> Self {
        serde_json::from_str(r#"{"steps_offset": 1}"#).expect("valid literal")
    }

    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let config: Self = serde_json::from_str(text).map_err(|e| ModelError::config("scheduler/scheduler_config.json", e))?;
        let bad = |what: String| Err(ModelError::Unsupported(format!("scheduler {what}")));
        if config.prediction_type != "epsilon" {
            return bad(format!("prediction_type {:?} (only epsilon)", config.prediction_type));
        }
        if !matches!(config.beta_schedule.as_str(), "scaled_linear" | "linear") {
            return bad(format!("beta_schedule {:?}", config.beta_schedule));
        }
        if !matches!(config.timestep_spacing.as_str(), "leading" | "trailing" | "linspace") {
            return bad(format!("timestep_spacing {:?}", config.timestep_spacing));
        }
        if config.clip_sample || config.thresholding || config.rescale_betas_zero_snr {
            return bad("clip_sample / thresholding / rescale_betas_zero_snr".into());
        }
        Ok(config)
    }

    /// The sampler the config names, as diffusers would instantiate it. Schedulers we do not
    /// implement (PNDM, the SD 1.5 default, among them) map to DDIM, which samples the same
    /// trained model; callers report the substitution.
    pub fn default_sampler(&self) -> (SamplerKind, bool) {
        match SamplerKind::parse(&self.class_name) {
            Ok(kind) => (kind, true),
            Err(_) => (SamplerKind::Ddim, false),
        }
    }
}

/// The training noise schedule: betas and cumulative alpha products.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub config: SchedulerConfig,
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    pub fn new(config: SchedulerConfig) -> Self {
        let n = config.num_train_timesteps;
        let lin = |a: f64, b: f64| (0..n).map(move |i| a + (b - a) * i as f64 / (n - 1) as f64);
        // diffusers computes the betas in float32; rounding each the same way matches it.
        let betas: Vec<f64> = match config.beta_schedule.as_str() {
            "linear" => lin(config.beta_start, config.beta_end).map(|b| b as f32 as f64).collect(),
            _ => lin(config.beta_start.sqrt(), config.beta_end.sqrt()).map(|b| (b as f32 as f64).powi(2) as f32 as f64).collect(),
        };
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Self { config, betas, alphas_cumprod }
    }

    /// `x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise`, per batch element's timestep.
    pub fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, timesteps: &[usize]) -> Tensor<4> {
        let device = x0.device();
        let b = timesteps.len();
        let a: Vec<f32> = timesteps.iter().map(|&t| self.alphas_cumprod[t].sqrt() as f32).collect();
        let s: Vec<f32> = timesteps.iter().map(|&t| (1.0 - self.alphas_cumprod[t]).sqrt() as f32).collect();
        let col = |v: Vec<f32>| Tensor::<1>::from_floats(v.as_slice(), &device).reshape([b, 1, 1, 1]);
        x0 * col(a) + noise * col(s)
    }

    /// The inference timesteps for `steps` steps, in sampling order (diffusers' spacing rules).
    pub fn timesteps(&self, steps: usize) -> Vec<usize> {
        let n = self.config.num_train_timesteps;
        let steps = steps.clamp(1, n);
        let mut ts: Vec<usize> = match self.config.timestep_spacing.as_str() {
            "linspace" => (0..steps).map(|i| ((n - 1) as f64 * i as f64 / (steps - 1).max(1) as f64).round() as usize).collect(),
            "trailing" => {
                let ratio = n as f64 / steps as f64;
                (0..steps).map(|i| ((n as f64 - i as f64 * ratio).round() as usize).saturating_sub(1)).rev().collect()
            }
            _ => (0..steps).map(|i| i * (n / steps) + self.config.steps_offset).collect(),
        };
        ts.sort_unstable();
        ts.reverse();
        ts
    }
}

/// A sampler prepared for a number of steps.
pub struct Sampler {
    pub kind: SamplerKind,
    pub timesteps: Vec<usize>,
    schedule: NoiseSchedule,
    /// Euler only: sigma for each step plus a final 0.
    sigmas: Vec<f64>,
}

impl Sampler {
    pub fn new(kind: SamplerKind, schedule: NoiseSchedule, steps: usize) -> Self {
        let timesteps = schedule.timesteps(steps);
        let sigmas = match kind {
            SamplerKind::Ddim => vec![],
            SamplerKind::Euler => {
                let ac = &schedule.alphas_cumprod;
                timesteps.iter().map(|&t| ((1.0 - ac[t]) / ac[t]).sqrt()).chain([0.0]).collect()
            }
        };
        Self { kind, timesteps, schedule, sigmas }
    }

    /// Scale of the initial noise relative to a unit Gaussian.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.kind {
            SamplerKind::Ddim => 1.0,
            SamplerKind::Euler => {
                let max = self.sigmas[0];
                if self.schedule.config.timestep_spacing == "leading" { (max * max + 1.0).sqrt() } else { max }
            }
        }
    }

    /// The UNet's input at step `i` (Euler divides by sqrt(sigma^2 + 1)).
    pub fn scale_model_input(&self, x: Tensor<4>, i: usize) -> Tensor<4> {
        match self.kind {
            SamplerKind::Ddim => x,
            SamplerKind::Euler => x / (self.sigmas[i].powi(2) + 1.0).sqrt(),
        }
    }

    /// One update from step `i` given the predicted noise; returns (previous sample, predicted x0).
    pub fn step(&self, eps: Tensor<4>, i: usize, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        match self.kind {
            SamplerKind::Ddim => {
                let ac = &self.schedule.alphas_cumprod;
                let t = self.timesteps[i];
                let n = self.schedule.config.num_train_timesteps;
                let prev = t as i64 - (n / self.timesteps.len()) as i64;
                let a_t = ac[t];
                let a_prev = if prev >= 0 {
                    ac[prev as usize]
                } else if self.schedule.config.set_alpha_to_one {
                    1.0
                } else {
                    ac[0]
                };
                let x0 = (x - eps.clone() * (1.0 - a_t).sqrt()) / a_t.sqrt();
                let prev_sample = x0.clone() * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt();
                (prev_sample, x0)
            }
            SamplerKind::Euler => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = x.clone() - eps.clone() * sigma;
                (x + eps * (next - sigma), x0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use super::*;
    use crate::testutil::*;

    fn tiny_schedule() -> NoiseSchedule {
        let text = std::fs::read_to_string(fixtures().join("tiny-clean/scheduler/scheduler_config.json")).unwrap();
        NoiseSchedule::new(SchedulerConfig::from_json(&text).unwrap())
    }

    #[test]
    fn schedule_and_timesteps_match_diffusers() {
        let g = golden();
        let s = tiny_schedule();
        let betas = g.load_f32("scheduler.betas").unwrap().data;
        let ac = g.load_f32("scheduler.alphas_cumprod").unwrap().data;
        for (i, (b, a)) in betas.iter().zip(&ac).enumerate() {
            // torch's f32 linspace rounds differently by an ulp; its f32 cumprod accumulates
            // ~1e-6 relative error over 1000 factors, which our f64 product does not.
            assert!((s.betas[i] / *b as f64 - 1.0).abs() <= 1e-6, "beta {i}: {} vs {b}", s.betas[i]);
            assert!((s.alphas_cumprod[i] / *a as f64 - 1.0).abs() <= 1e-5, "alphas_cumprod {i}: {} vs {a}", s.alphas_cumprod[i]);
        }
        let ts: Vec<usize> = golden_ints("scheduler.timesteps").into_iter().map(|t| t as usize).collect();
        assert_eq!(s.timesteps(10), ts);
    }

    #[test]
    fn ddim_steps_match_diffusers() {
        let g = golden();
        let sampler = Sampler::new(SamplerKind::Ddim, tiny_schedule(), 10);
        let outputs: Tensor<5> = tensor(&g, "scheduler.step.model_outputs");
        let prev: Tensor<5> = tensor(&g, "scheduler.step.prev_samples");
        let x0s: Tensor<5> = tensor(&g, "scheduler.step.pred_original_samples");
        let mut x: Tensor<4> = tensor(&g, "scheduler.step.input_sample");
        for i in 0..10 {
            let eps = outputs.clone().narrow(0, i, 1).squeeze_dim(0);
            let (next, x0) = sampler.step(eps, i, x);
            assert_close(next.clone(), prev.clone().narrow(0, i, 1).squeeze_dim(0), 1e-5, &format!("ddim prev_sample {i}"));
            assert_close(x0, x0s.clone().narrow(0, i, 1).squeeze_dim(0), 1e-5, &format!("ddim pred_original {i}"));
            x = next;
        }
    }

    #[test]
    fn euler_matches_its_closed_form() {
        // Euler's sigma at step i is sqrt((1 - a_t) / a_t); one step with the true noise of a
        // noised x0 must land exactly on x0 scaled to the next sigma (the ODE is exact there).
        let s = tiny_schedule();
        let sampler = Sampler::new(SamplerKind::Euler, s.clone(), 10);
        let t0 = sampler.timesteps[0];
        let sigma0 = ((1.0 - s.alphas_cumprod[t0]) / s.alphas_cumprod[t0]).sqrt();
        assert!((sampler.init_noise_sigma() - (sigma0 * sigma0 + 1.0).sqrt()).abs() < 1e-12);
        let x0 = Tensor::<4>::ones([1, 1, 2, 2], &device()) * 0.3;
        let noise = Tensor::<4>::ones([1, 1, 2, 2], &device()) * -0.7;
        let x = x0.clone() + noise.clone() * sigma0;
        let (next, pred) = sampler.step(noise.clone(), 0, x);
        assert_close(pred, x0.clone(), 1e-6, "euler x0");
        let sigma1 = sampler.sigmas[1];
        assert_close(next, x0 + noise * sigma1, 1e-6, "euler next");
    }
}
