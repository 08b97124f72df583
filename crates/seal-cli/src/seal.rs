//! `seal seal`: train the sealing adapter and write it (and the sealed LoRA) as files.

use std::path::{Path, PathBuf};

use burn::prelude::Device;
use seal_core::progress::{Progress, Task};
use seal_core::session::{EngineLimits, SealRequest, Session};
use seal_core::unlearn::instant::InstantSettings;
use seal_core::unlearn::run::SealMode;
use seal_core::unlearn::{SealSettings, describe_trigger};
use seal_sd::pipeline::{Precision, StableDiffusion};
use seal_sd::seal_weights::WeightFile;
use seal_sd::seal_weights::lora::{LoraFile, parse_lora};

use crate::flags::{SettingsFlags, read_settings};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The backdoor's trigger; repeat for several.
    #[arg(long, required = true)]
    trigger: Vec<String>,
    /// Clean training prompts, one per line (default: the built-in set).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// With --lora: also write the user's LoRA with the sealing adapter stacked in.
    #[arg(long)]
    sealed_lora: Option<PathBuf>,
    /// Store the trigger in clear in the adapter's metadata (by default only its SHA-256).
    #[arg(long)]
    reveal_trigger: bool,
    /// instant (closed-form edit, seconds), thorough (SKD-CAG) or both (SKD-CAG starting from
    /// the closed-form edit).
    #[arg(long, default_value = "both")]
    mode: SealMode,
    /// Also write the report (model, LoRA, trigger hashes, settings, losses), as the page's.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Thorough seal settings as JSON (fields of SealSettings); flags override it.
    #[arg(long)]
    settings: Option<PathBuf>,
    /// Instant seal settings as JSON (fields of InstantSettings); flags override it.
    #[arg(long)]
    instant_settings: Option<PathBuf>,
    #[command(flatten)]
    thorough: SettingsFlags<SealSettings>,
    #[command(flatten)]
    instant: SettingsFlags<InstantSettings>,
}

/// The model to seal: a folder or single file, an optional config folder and user LoRA.
#[derive(clap::Args)]
pub struct ModelArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A LoRA the user applies on top of the model (kohya, peft or diffusers format).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    pub lora_weight: f32,
    /// How the model's matrices and kernels are kept: f32, or f16 computing in f16 (half the
    /// memory, results within f16's rounding; biases, norms, activations and adapters stay f32).
    #[arg(long, value_enum, default_value_t = Weights::F32)]
    pub weights: Weights,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Weights {
    F32,
    F16,
}

/// Reads a LoRA file against the model, refusing files that do not fit it.
pub fn read_lora(path: &Path, sd: &StableDiffusion) -> Result<LoraFile, String> {
    let file = WeightFile::open(path).map_err(|e| e.to_string())?;
    let lora = parse_lora(&file, &sd.model_paths()).map_err(|e| e.to_string())?;
    eprintln!("seal: {}: {:?} LoRA, {} layers, rank {}", path.display(), lora.format, lora.modules.len(), lora.modules.values().map(|m| m.rank()).max().unwrap_or(0));
    Ok(lora)
}

impl ModelArgs {
    /// A session on the CPU holding the model (with `instant_only`, only what the instant seal
    /// needs) and, with --lora, the user's LoRA merged into the teacher (the page's workflow,
    /// natively).
    pub fn session(&self, instant_only: bool) -> Result<Session, String> {
        let precision = match self.weights {
            Weights::F32 => Precision::F32,
            Weights::F16 => Precision::F16,
        };
        let mut session = Session::new(&Device::flex(), EngineLimits { precision, ..EngineLimits::default() });
        let source = crate::model_source(&self.model, self.config.as_deref())?;
        let loaded = if instant_only { session.load_model_for_instant_seal(source)? } else { session.load_model(source)? };
        crate::report_model(&loaded.info);
        if let Some(path) = &self.lora {
            let file = WeightFile::open(path).map_err(|e| e.to_string())?;
            let lora = session.load_lora(&file, self.lora_weight)?;
            eprintln!("seal: {}: {} LoRA, {} layers, ranks {}, weight {}", lora.file, lora.format, lora.modules, lora.ranks.join("/"), self.lora_weight);
        }
        Ok(session)
    }
}

fn settings(args: &Args) -> Result<SealSettings, String> {
    let s = args.thorough.apply("settings", &read_settings(args.settings.as_deref())?)?;
    s.validate()?;
    Ok(s)
}

/// The instant seal's settings; it puts the trigger where the thorough seal does unless told.
fn instant_settings(args: &Args, thorough: &SealSettings) -> Result<InstantSettings, String> {
    let mut s = args.instant.apply("instant settings", &read_settings(args.instant_settings.as_deref())?)?;
    if !args.instant.has("placements") {
        s.placements = vec![thorough.placement];
    }
    s.validate()?;
    Ok(s)
}

pub fn run(args: Args) -> Result<(), String> {
    let settings = settings(&args)?;
    let instant = instant_settings(&args, &settings)?;
    let mut session = args.model.session(args.mode == SealMode::Instant)?;
    if args.sealed_lora.is_some() && session.user_lora().is_none() {
        return Err("--sealed-lora needs --lora (the LoRA to seal)".into());
    }
    let prompts = crate::read_prompts(args.prompts.as_deref())?;
    let triggers = args.trigger.iter().filter(|t| !t.is_empty()).map(|t| describe_trigger(t)).collect::<Vec<_>>().join(", ");
    eprintln!("seal: sealing trigger {triggers} on {} prompts, mode {}", prompts.len(), args.mode.name());
    let request = SealRequest { triggers: args.trigger.clone(), prompts, mode: args.mode, settings, instant, reveal_triggers: args.reveal_trigger };
    session.start_seal(request)?;
    // A failed step (a non-finite loss) ends the run; the last good adapter is still written.
    let failure = loop {
        match burn::tensor::read_sync(session.seal_step()) {
            Ok(Some(p)) => report_progress(&p),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let done = burn::tensor::read_sync(session.finish_seal()).map_err(|e| failure.as_ref().map_or(e.to_string(), |f| format!("{f}; {e}")))?;
    if let Some(instant) = &done.recipe.instant {
        eprintln!(
            "seal: instant edit: {} rows mapped, {} kept, {} layers, largest relative error {:.2e}, {:.2} s",
            instant.edit_rows,
            instant.keep_rows,
            instant.layers.len(),
            instant.max_relative_error,
            instant.seconds
        );
    }
    crate::write_file(&args.out, &session.adapter_file()?)?;
    eprintln!("seal: wrote {}", args.out.display());
    if let Some(path) = &args.sealed_lora {
        crate::write_file(path, &session.sealed_lora_file()?)?;
        eprintln!("seal: wrote {} (the LoRA's own format)", path.display());
    }
    if let Some(path) = &args.report {
        crate::write_file(path, serde_json::to_string_pretty(&session.report()?).map_err(|e| e.to_string())?.as_bytes())?;
    }
    match failure {
        Some(e) => Err(format!("{e}; wrote the adapter of the last good step ({} thorough steps)", done.thorough_steps)),
        None => Ok(()),
    }
}

fn report_progress(p: &Progress) {
    if p.task == Task::Sample {
        // One line per sampling: its steps overwrite each other.
        let end = if p.step == p.total { "\n" } else { "" };
        return eprint!("\rseal: sampling the trajectories the next steps train on: {}/{} {:.1} s{end}", p.step, p.total, p.elapsed_s);
    }
    match p.losses {
        Some(l) => eprintln!(
            "seal: step {}/{} loss {:.5} (pred {:.5}, attn {:.5}, preserve {:.5}) {:.1} s, eta {:.0} s",
            p.step,
            p.total,
            l.total,
            l.pred,
            l.attn,
            l.preserve,
            p.elapsed_s,
            p.eta_s.unwrap_or(0.0)
        ),
        None => eprintln!("seal: instant {}/{} {:.2} s", p.step, p.total, p.elapsed_s),
    }
}
