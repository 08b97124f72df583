//! The one progress event every long operation reports (sealing, evaluation, generation), to
//! the CLI's terminal and the page's worker alike. Long operations are state machines with a
//! `step()` method: the caller reports progress and checks for cancellation between steps.

use serde::Serialize;
use web_time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Prepare,
    /// The closed-form (instant) seal: encoding prompts, the solve, factoring layers.
    Instant,
    /// SKD-CAG training steps.
    Seal,
    /// Sampling the trajectories the next sealing steps train on (steps of one sampling).
    Sample,
    Evaluate,
    Generate,
    /// Looking for an unknown trigger.
    Scan,
}

/// The losses of one sealing step (each the batch mean).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Losses {
    pub total: f32,
    pub pred: f32,
    pub attn: f32,
    pub preserve: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub task: Task,
    /// Steps done so far (1-based after the first step) out of `total`.
    pub step: usize,
    pub total: usize,
    pub losses: Option<Losses>,
    pub elapsed_s: f64,
    /// Remaining time at the mean pace so far.
    pub eta_s: Option<f64>,
}

/// Measures elapsed time and turns a step count into an ETA (works in the browser too).
#[derive(Clone, Debug)]
pub struct Clock(Instant);

impl Default for Clock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock {
    pub fn elapsed_s(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }

    pub fn progress(&self, task: Task, step: usize, total: usize, losses: Option<Losses>) -> Progress {
        let elapsed_s = self.elapsed_s();
        let eta_s = (step > 0).then(|| elapsed_s / step as f64 * total.saturating_sub(step) as f64);
        Progress { task, step, total, losses, elapsed_s, eta_s }
    }
}
