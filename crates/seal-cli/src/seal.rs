//! `seal seal`: train the sealing adapter and write it (and the sealed LoRA) as files.

use std::path::{Path, PathBuf};

use burn::prelude::Device;
use seal_core::progress::Progress;
use seal_core::prompts::{BUILT_IN, Placement, parse_list};
use seal_core::session::{EngineLimits, SealRequest, Session};
use seal_core::unlearn::instant::{EditRows, InstantSettings, TriggerRows};
use seal_core::unlearn::run::SealMode;
use seal_core::unlearn::{AttnTarget, LatentSource, SealSettings, describe_trigger};
use seal_sd::lora::Projection;
use seal_sd::pipeline::StableDiffusion;
use seal_sd::seal_weights::WeightFile;
use seal_sd::seal_weights::lora::{LoraFile, parse_lora};

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
    /// A session on the CPU holding the model and, with --lora, the user's LoRA merged into
    /// the teacher (the page's workflow, natively).
    pub fn session(&self) -> Result<Session, String> {
        let mut session = Session::new(&Device::flex(), EngineLimits::default());
        let loaded = session.load_model(crate::model_source(&self.model, self.config.as_deref())?)?;
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
    let mut session = args.model.session()?;
    if args.sealed_lora.is_some() && session.user_lora().is_none() {
        return Err("--sealed-lora needs --lora (the LoRA to seal)".into());
    }
    let prompts = match &args.prompts {
        Some(p) => parse_list(&std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => parse_list(BUILT_IN),
    };
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
    write_atomic(&args.out, &session.adapter_file()?)?;
    eprintln!("seal: wrote {}", args.out.display());
    if let Some(path) = &args.sealed_lora {
        write_atomic(path, &session.sealed_lora_file()?)?;
        eprintln!("seal: wrote {} (the LoRA's own format)", path.display());
    }
    if let Some(path) = &args.report {
        write_atomic(path, serde_json::to_string_pretty(&session.report()?).map_err(|e| e.to_string())?.as_bytes())?;
    }
    match failure {
        Some(e) => Err(format!("{e}; wrote the adapter of the last good step ({} thorough steps)", done.thorough_steps)),
        None => Ok(()),
    }
}

fn report_progress(p: &Progress) {
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

/// Writes through a temporary file and a rename, so a file is complete or absent.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
