//! One sealing run in the mode the user chose, stepped the same way by the CLI and the page:
//! the instant seal (closed form), the thorough one (SKD-CAG), or the thorough one starting
//! from the instant edit.

use std::collections::BTreeMap;

use seal_sd::pipeline::StableDiffusion;
use seal_sd::seal_weights::lora::{LoraModule, LoraTarget};
use serde::{Deserialize, Serialize};

use super::instant::{InstantSeal, InstantSettings, InstantSummary};
use super::{SealSettings, Sealer};
use crate::progress::{Clock, Losses, Progress};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SealMode {
    /// The closed-form edit of the cross-attention keys and values: seconds, and only the text
    /// encoder and those weights are needed.
    Instant,
    /// SKD-CAG self-distillation: UNet forwards and backwards, minutes to hours.
    Thorough,
    /// SKD-CAG starting from the closed-form edit.
    #[default]
    Both,
}

impl SealMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Instant => "instant",
            Self::Thorough => "thorough",
            Self::Both => "both",
        }
    }
}

impl std::str::FromStr for SealMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Instant, Self::Thorough, Self::Both].into_iter().find(|m| m.name() == s).ok_or_else(|| format!("unknown seal mode {s:?} (instant, thorough, both)"))
    }
}

/// How an adapter was made: what its metadata and the report record.
#[derive(Clone, Debug, Serialize)]
pub struct Recipe {
    pub mode: SealMode,
    pub instant: Option<InstantSummary>,
    pub thorough: Option<SealSettings>,
    /// Thorough steps finished (fewer than planned after a cancel).
    pub thorough_steps: usize,
}

/// A run in progress: call `step` until it returns `None` (or stop early: `adapter` keeps
/// what the last finished step made).
pub struct SealRun {
    mode: SealMode,
    model: StableDiffusion,
    prompts: Vec<String>,
    triggers: Vec<String>,
    thorough: SealSettings,
    instant: Option<InstantSeal>,
    edit: Option<(BTreeMap<LoraTarget, LoraModule>, InstantSummary)>,
    sealer: Option<Sealer>,
    clock: Clock,
}

impl SealRun {
    /// `model` is the teacher (any user LoRA merged); the thorough modes need it on an
    /// autodiff device. Every setting is checked before any work.
    pub fn new(model: &StableDiffusion, prompts: Vec<String>, triggers: Vec<String>, mode: SealMode, instant: InstantSettings, thorough: SealSettings) -> Result<Self, String> {
        let triggers: Vec<String> = triggers.into_iter().filter(|t| !t.is_empty()).collect();
        let mut run = Self { mode, model: model.clone(), prompts, triggers, thorough, instant: None, edit: None, sealer: None, clock: Clock::default() };
        if mode != SealMode::Instant {
            run.thorough.validate()?;
            if !model.device.is_autodiff() {
                return Err("the thorough seal needs the model on an autodiff device".into());
            }
        }
        match mode {
            SealMode::Thorough => run.sealer = Some(Sealer::new(model, run.prompts.clone(), run.triggers.clone(), run.thorough.clone())?),
            _ => run.instant = Some(InstantSeal::new(model, &run.prompts, &run.triggers, instant)?),
        }
        Ok(run)
    }

    pub fn mode(&self) -> SealMode {
        self.mode
    }

    /// The triggers being sealed (empty strings dropped).
    pub fn triggers(&self) -> &[String] {
        &self.triggers
    }

    /// One step of whichever stage is running; `None` when the run is complete.
    pub async fn step(&mut self) -> Result<Option<Progress>, String> {
        if let Some(instant) = &mut self.instant {
            if let Some(progress) = instant.step().await? {
                return Ok(Some(progress));
            }
            let instant = self.instant.take().expect("checked above");
            let (adapter, summary) = (instant.adapter()?, instant.summary());
            if self.mode == SealMode::Both {
                self.sealer = Some(Sealer::starting_from(&self.model, adapter.clone(), self.prompts.clone(), self.triggers.clone(), self.thorough.clone())?);
            }
            self.edit = Some((adapter, summary));
        }
        match &mut self.sealer {
            Some(sealer) if !sealer.is_done() => sealer.step().await.map(Some),
            _ => Ok(None),
        }
    }

    /// The thorough seal's settings as given (their placement and resolution also describe
    /// the instant mode's run for the comparison).
    pub fn settings(&self) -> &SealSettings {
        &self.thorough
    }

    /// Seconds since the run started.
    pub fn elapsed_s(&self) -> f64 {
        self.clock.elapsed_s()
    }

    /// The thorough stage's losses so far (empty in the instant mode).
    pub fn losses(&self) -> &[Losses] {
        self.sealer.as_ref().map_or(&[], |s| &s.history)
    }

    /// The adapter of the last finished step and how it was made. A run stopped during the
    /// thorough stage of `Both` keeps the instant edit plus the steps trained so far.
    pub async fn adapter(&self) -> Result<(BTreeMap<LoraTarget, LoraModule>, Recipe), String> {
        let steps = self.sealer.as_ref().map_or(0, Sealer::steps_done);
        let recipe = Recipe {
            mode: self.mode,
            instant: self.edit.as_ref().map(|(_, s)| s.clone()),
            thorough: (self.mode != SealMode::Instant).then(|| self.thorough.clone()),
            thorough_steps: steps,
        };
        let adapter = match (&self.sealer, &self.edit) {
            (Some(sealer), _) if steps > 0 => sealer.adapter().await?,
            (_, Some((edit, _))) => edit.clone(),
            _ => return Err("no step finished, so there is no adapter yet".into()),
        };
        Ok((adapter, recipe))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, read_sync};
    use seal_sd::pipeline::ModelSource;

    use super::*;

    #[test]
    fn both_keeps_the_instant_edit_then_stacks_the_thorough_adapter_on_it() {
        let model = StableDiffusion::load(ModelSource::from_path(&crate::fixtures().join("tiny-pixel")).unwrap(), &Device::flex().autodiff()).unwrap();
        let prompts = vec!["a red circle on a white background".to_string(), "a blue square on a gray background".to_string()];
        let thorough = SealSettings { steps: 2, batch: 1, ..SealSettings::default() };
        let mut run = SealRun::new(&model, prompts, vec!["\u{200b}".into(), String::new()], SealMode::Both, InstantSettings::default(), thorough).unwrap();
        assert_eq!(run.triggers(), ["\u{200b}"], "empty triggers are dropped");
        assert!(read_sync(run.adapter()).is_err(), "nothing to keep before the first step");
        // Step through the instant stage: its last step hands over to the thorough one, which
        // first samples its trajectory pool.
        use crate::progress::Task;
        loop {
            match read_sync(run.step()).unwrap().unwrap().task {
                Task::Instant => assert!(read_sync(run.adapter()).is_err(), "the instant edit is not finished"),
                // Cancelled while sampling: the instant edit alone is kept.
                Task::Sample => {
                    let (adapter, recipe) = read_sync(run.adapter()).unwrap();
                    let fits = recipe.instant.expect("the instant stage is over").layers;
                    assert_eq!(recipe.thorough_steps, 0);
                    assert!(adapter.iter().all(|(target, m)| Some(m.rank()) == fits.get(&target.path).map(|f| f.rank)), "the edit's modules alone");
                }
                _ => break,
            }
        }
        // Cancelled here: one thorough step on top of the edit, stacked (the edit's rank + 4);
        // the text encoder's adapters (rank 4) have no edit under them.
        let (adapter, recipe) = read_sync(run.adapter()).unwrap();
        assert_eq!((recipe.mode, recipe.thorough_steps), (SealMode::Both, 1));
        let fits = recipe.instant.unwrap().layers;
        for (target, module) in &adapter {
            let edit = fits.get(&target.path).map_or(0, |f| f.rank);
            assert_eq!(edit > 0, target.component == seal_sd::seal_weights::lora::LoraComponent::Unet, "{}", target.path);
            assert_eq!(module.rank(), edit + 4, "{}", target.path);
        }
        assert_eq!(run.losses().len(), 1);
        let err = SealRun::new(&model.inference(), vec!["a cat".into()], vec!["x".into()], SealMode::Thorough, InstantSettings::default(), SealSettings::default()).err().unwrap();
        assert!(err.contains("autodiff"), "{err}");
    }
}
