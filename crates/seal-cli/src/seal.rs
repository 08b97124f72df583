//! `seal seal`: train the sealing adapter and write it (and the sealed LoRA) as files.

use std::path::{Path, PathBuf};

use burn::prelude::Device;
use seal_core::export::{check_lora_weight, sealed_lora, sealing_adapter, trigger_hash};
use seal_core::prompts::{BUILT_IN, Placement, parse_list};
use seal_core::unlearn::instant::{EditRows, InstantSettings, TriggerRows};
use seal_core::unlearn::run::{SealMode, SealRun};
use seal_core::unlearn::{AttnTarget, LatentSource, SealSettings, describe_trigger};
use seal_sd::lora::Projection;
use seal_sd::pipeline::{LoraMode, StableDiffusion};
use seal_sd::seal_weights::WeightFile;
use seal_sd::seal_weights::lora::{LoraFile, parse_lora, write_in_format, write_kohya};

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
    /// Also write what was done (mode, settings, per-layer fit, losses) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Instant seal: λ, how strongly the edited weights stay near the original ones.
    #[arg(long)]
    lambda: Option<f64>,
    /// Instant seal: weight of keeping clean prompts' rows (s_p).
    #[arg(long)]
    keep_weight: Option<f64>,
    /// Instant seal: which rows are mapped (all or words).
    #[arg(long, value_parser = parse_enum::<EditRows>)]
    edit_rows: Option<EditRows>,
    /// Instant seal: what the trigger's rows map to (bos or drop).
    #[arg(long, value_parser = parse_enum::<TriggerRows>)]
    trigger_rows: Option<TriggerRows>,
    /// Instant seal: the adapter's largest rank (higher-rank edits are truncated).
    #[arg(long)]
    max_rank: Option<usize>,
    /// Instant seal settings as JSON (fields of InstantSettings); flags override it.
    #[arg(long)]
    instant_settings: Option<PathBuf>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    rank: Option<usize>,
    #[arg(long)]
    alpha: Option<f32>,
    #[arg(long)]
    lr: Option<f64>,
    /// Weight a of the attention loss in L = a L_attn + (1 - a) L_pred.
    #[arg(long)]
    attn_weight: Option<f32>,
    /// Train on L_pred alone (no cross-attention guidance).
    #[arg(long)]
    no_attn_loss: bool,
    /// zeros, noise or substitute.
    #[arg(long, value_parser = parse_target)]
    attn_target: Option<AttnTarget>,
    /// noise, trajectory or student.
    #[arg(long, value_parser = parse_latents)]
    latents: Option<LatentSource>,
    /// Weight of the clean-prompt preservation term.
    #[arg(long)]
    preserve: Option<f32>,
    #[arg(long)]
    placement: Option<Placement>,
    /// Adapt the text encoder's self-attention projections too (default true; false: the
    /// UNet's cross-attention only).
    #[arg(long)]
    text_encoder: Option<bool>,
    /// Cross-attention projections to adapt, e.g. to_k,to_v.
    #[arg(long, value_delimiter = ',', value_parser = parse_projection)]
    targets: Option<Vec<Projection>>,
    /// Image side in pixels to train at (default: the model's own, at most 256); smaller is faster.
    #[arg(long)]
    resolution: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Settings as JSON (fields of SealSettings); flags override it.
    #[arg(long)]
    settings: Option<PathBuf>,
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
}

/// A lowercase serde enum value from the command line.
fn parse_enum<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_target(s: &str) -> Result<AttnTarget, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| format!("{s:?}: expected zeros, noise or substitute"))
}
fn parse_latents(s: &str) -> Result<LatentSource, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| format!("{s:?}: expected noise, trajectory or student"))
}
fn parse_projection(s: &str) -> Result<Projection, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| format!("{s:?}: expected to_q, to_k, to_v or to_out.0"))
}

/// Reads a LoRA file against the model, refusing files that do not fit it.
pub fn read_lora(path: &Path, sd: &StableDiffusion) -> Result<LoraFile, String> {
    let file = WeightFile::open(path).map_err(|e| e.to_string())?;
    let lora = parse_lora(&file, &sd.model_paths()).map_err(|e| e.to_string())?;
    eprintln!("seal: {}: {:?} LoRA, {} layers, rank {}", path.display(), lora.format, lora.modules.len(), lora.modules.values().map(|m| m.rank()).max().unwrap_or(0));
    Ok(lora)
}

impl ModelArgs {
    /// The teacher: the model (on `device`) with the user's LoRA merged in, and that LoRA.
    pub fn load(&self, device: &Device) -> Result<(StableDiffusion, Option<LoraFile>), String> {
        let sd = crate::load_model(&self.model, self.config.as_deref(), device)?;
        match &self.lora {
            None => Ok((sd, None)),
            Some(path) => {
                check_lora_weight(self.lora_weight).map_err(|e| format!("--lora-weight: {e}"))?;
                let lora = read_lora(path, &sd)?;
                Ok((sd.with_lora(&lora, self.lora_weight, LoraMode::Merge), Some(lora)))
            }
        }
    }
}

fn settings(args: &Args) -> Result<SealSettings, String> {
    let mut s = match &args.settings {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?).map_err(|e| format!("{}: {e}", p.display()))?,
        None => SealSettings::default(),
    };
    macro_rules! set {
        ($($f:ident),*) => { $(if let Some(v) = args.$f.clone() { s.$f = v; })* };
    }
    set!(steps, batch, rank, alpha, lr, attn_weight, attn_target, latents, placement, targets, seed, text_encoder);
    if args.resolution.is_some() {
        s.resolution = args.resolution;
    }
    if let Some(p) = args.preserve {
        s.preserve_weight = p;
    }
    if args.no_attn_loss {
        s.use_attn_loss = false;
    }
    s.validate()?;
    Ok(s)
}

fn instant_settings(args: &Args) -> Result<InstantSettings, String> {
    let mut s: InstantSettings = match &args.instant_settings {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?).map_err(|e| format!("{}: {e}", p.display()))?,
        None => InstantSettings::default(),
    };
    if let Some(v) = args.lambda {
        s.lambda = v;
    }
    if let Some(v) = args.keep_weight {
        s.preserve_weight = v;
    }
    if let Some(v) = args.edit_rows {
        s.rows = v;
    }
    if let Some(v) = args.trigger_rows {
        s.trigger_rows = v;
    }
    if let Some(v) = args.max_rank {
        s.max_rank = v;
    }
    if let Some(p) = args.placement {
        s.placements = vec![p];
    }
    s.validate()?;
    Ok(s)
}

pub fn run(args: Args) -> Result<(), String> {
    let settings = settings(&args)?;
    let instant = instant_settings(&args)?;
    let device = Device::flex().autodiff();
    let (teacher, user_lora) = args.model.load(&device)?;
    if args.sealed_lora.is_some() && user_lora.is_none() {
        return Err("--sealed-lora needs --lora (the LoRA to seal)".into());
    }
    let prompts = match &args.prompts {
        Some(p) => parse_list(&std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => parse_list(BUILT_IN),
    };
    let mut run = SealRun::new(&teacher, prompts.clone(), args.trigger.clone(), args.mode, instant, settings)?;
    let triggers = run.triggers().to_vec();
    eprintln!("seal: sealing trigger {} on {} prompts, mode {}", triggers.iter().map(|t| describe_trigger(t)).collect::<Vec<_>>().join(", "), prompts.len(), args.mode.name());
    // A failed step (a non-finite loss) ends the run; the last good adapter is still written.
    let mut failure = None;
    loop {
        match burn::tensor::read_sync(run.step()) {
            Ok(Some(p)) => match p.losses {
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
            },
            Ok(None) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let (adapters, recipe) = burn::tensor::read_sync(run.adapter()).map_err(|e| failure.clone().map_or(e.clone(), |f| format!("{f}; {e}")))?;
    if let Some(instant) = &recipe.instant {
        eprintln!(
            "seal: instant edit: {} rows mapped, {} kept, {} layers, largest relative error {:.2e}, {:.2} s",
            instant.edit_rows,
            instant.keep_rows,
            instant.layers.len(),
            instant.max_relative_error,
            instant.seconds
        );
    }
    let file = sealing_adapter(&adapters, &recipe, &teacher.info, &triggers, args.reveal_trigger);
    write_atomic(&args.out, &write_kohya(&file).map_err(|e| e.to_string())?)?;
    eprintln!("seal: wrote {}", args.out.display());
    if let (Some(path), Some(user)) = (&args.sealed_lora, &user_lora) {
        let sealed = sealed_lora(user, &file, args.model.lora_weight)?;
        write_atomic(path, &write_in_format(&sealed).map_err(|e| e.to_string())?)?;
        eprintln!("seal: wrote {} ({:?} format)", path.display(), sealed.format);
    }
    if let Some(path) = &args.report {
        let report =
            serde_json::json!({ "model": teacher.info, "recipe": recipe, "losses": run.losses(), "trigger_sha256": triggers.iter().map(|t| trigger_hash(t)).collect::<Vec<_>>() });
        write_atomic(path, serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?.as_bytes())?;
    }
    match failure {
        Some(e) => Err(format!("{e}; wrote the adapter of the last good step ({} thorough steps)", recipe.thorough_steps)),
        None => Ok(()),
    }
}

/// Writes through a temporary file and a rename, so a file is complete or absent.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
