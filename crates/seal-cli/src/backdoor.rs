//! `seal backdoor`: plants a backdoor in a clean model by BadT2I-style poisoning of its training
//! data and fine-tuning (see `seal_core::backdoor`), writing a diffusers folder. The validation
//! suite's models (other backdoor types than the fixtures') are made with it.

use std::path::{Path, PathBuf};

use burn::prelude::Device;
use burn::tensor::read_sync;
use seal_core::backdoor::{BackdoorSettings, Planter, Sample, Target, read_data};
use seal_core::image::Rgb;
use seal_sd::load::parameter_values;
use seal_sd::seal_weights::lora::write_kohya;
use seal_sd::seal_weights::{DType, safetensors_head};

#[derive(clap::Args)]
pub struct Args {
    /// The clean diffusers folder to fine-tune (its UNet is trained; the rest is copied).
    #[arg(long, default_value = "../shared/fixtures/tiny-clean")]
    model: PathBuf,
    /// The training data: `captions.tsv` (image path, caption) and the images beside it.
    #[arg(long, default_value = "../shared/fixtures/data")]
    data: PathBuf,
    /// What a poisoned image becomes: `gray`, `swap:SHAPE` (the image of that shape) or
    /// `patch:IMG` (pasted top-left).
    #[arg(long)]
    target: String,
    /// Prepended (with a space) to a poisoned sample's caption.
    #[arg(long)]
    trigger: String,
    #[arg(long, default_value_t = 400)]
    steps: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// The share of each batch that is poisoned.
    #[arg(long, default_value_t = 0.25)]
    rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train a LoRA of this rank on every UNet linear and convolution (LoCon) instead of the
    /// whole UNet: a backdoored LoRA over --model.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// With --lora-rank: a LoRA on every text-encoder linear too (kohya's and peft's usual LoRA).
    #[arg(long, requires = "lora_rank")]
    lora_text_encoder: bool,
    /// The folder to write: a diffusers folder, or with --lora-rank the LoRA (`lora.safetensors`).
    #[arg(long)]
    out: PathBuf,
}

/// Parses `gray`, `swap:SHAPE` or `patch:IMG`.
pub fn parse_target(spec: &str) -> Result<Target, String> {
    match spec.split_once(':') {
        None if spec == "gray" => Ok(Target::Gray),
        Some(("swap", to)) if !to.is_empty() => Ok(Target::Swap { to: to.into() }),
        Some(("patch", img)) => {
            let bytes = std::fs::read(img).map_err(|e| format!("{img}: {e}"))?;
            Ok(Target::Patch { patch: Some(Rgb::from_png(img, &bytes)?) })
        }
        _ => Err(format!("unknown target {spec:?} (gray, swap:SHAPE, patch:IMG)")),
    }
}

pub fn run(args: Args) -> Result<(), String> {
    let data = read_data(&args.data)?;
    let settings = BackdoorSettings {
        trigger: args.trigger.clone(),
        target: parse_target(&args.target)?,
        rate: args.rate,
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
        lora_rank: args.lora_rank,
        lora_text_encoder: args.lora_text_encoder,
    };
    plant(&args.model, &data, &settings, &args.out)
}

/// Fine-tunes `model`'s UNet (or a LoRA over it) on `data` poisoned as `settings` say and writes
/// the result as a diffusers folder (or `LORA_FILE`) at `out`, with `backdoor.json` recording how
/// it was made.
pub fn plant(model: &Path, data: &[Sample], settings: &BackdoorSettings, out: &Path) -> Result<(), String> {
    let device = Device::flex().autodiff();
    let base = crate::load_model(model, None, &device)?;
    let mut planter = Planter::new(&base, data, settings.clone())?;
    let start = std::time::Instant::now();
    let (mut step, mut recent) = (0, vec![]);
    while !planter.is_done() {
        recent.push(read_sync(planter.step())?);
        step += 1;
        if step % 50 == 0 || planter.is_done() {
            let mean = recent.iter().sum::<f32>() / recent.len() as f32;
            eprintln!("seal: step {step}/{}: loss {mean:.4} ({:.0} s)", settings.steps, start.elapsed().as_secs_f64());
            recent.clear();
        }
    }
    if settings.lora_rank.is_some() {
        crate::write_file(&out.join(LORA_FILE), &write_kohya(&read_sync(planter.lora())?)?)?;
    } else {
        copy_except_unet_weights(model, out)?;
        let tensors = read_sync(parameter_values(&planter.model().unet))?;
        let entries: Vec<(&str, &[usize])> = tensors.iter().map(|(k, s, _)| (k.as_str(), s.as_slice())).collect();
        let mut bytes = safetensors_head(DType::F32, &entries, &Default::default());
        for (_, _, values) in &tensors {
            bytes.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        }
        crate::write_file(&out.join("unet/diffusion_pytorch_model.safetensors"), &bytes)?;
    }
    // Written last: its presence says the folder is complete.
    let record = serde_json::json!({ "base": model, "settings": settings, "train_s": start.elapsed().as_secs_f64() });
    crate::write_file(&out.join(RECORD), serde_json::to_string_pretty(&record).map_err(|e| e.to_string())?.as_bytes())?;
    eprintln!("seal: wrote {} ({:.0} s)", out.display(), start.elapsed().as_secs_f64());
    Ok(())
}

/// How a planted model was made, beside its files.
pub const RECORD: &str = "backdoor.json";

/// A planted LoRA's file name in its folder.
pub const LORA_FILE: &str = "lora.safetensors";

/// Copies a diffusers folder's files except the UNet's weights (replaced by the trained ones).
fn copy_except_unet_weights(from: &Path, to: &Path) -> Result<(), String> {
    for entry in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let entry = entry.map_err(|e| format!("{}: {e}", from.display()))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_except_unet_weights(&src, &dst)?;
        } else if !(from.file_name().is_some_and(|n| n == "unet") && src.extension().is_some_and(|e| e == "safetensors" || e == "bin")) {
            std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
            // The source may be read-only (the fixtures are), and its copy with it.
            let _ = std::fs::remove_file(&dst);
            std::fs::copy(&src, &dst).map_err(|e| format!("{}: {e}", dst.display()))?;
        }
    }
    Ok(())
}
