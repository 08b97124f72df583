//! `seal generate`: one prompt, one seed, one PNG.

use std::path::PathBuf;

use burn::prelude::Device;
use seal_core::image::Rgb;
use seal_sd::pipeline::GenerateRequest;
use seal_sd::scheduler::SamplerKind;

#[derive(clap::Args)]
pub struct Args {
    /// A diffusers folder or a single-file .safetensors checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// For a single-file checkpoint: a diffusers folder whose configs and tokenizer describe it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 25)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// ddim or euler; by default the one the model's scheduler config names.
    #[arg(long)]
    scheduler: Option<String>,
    /// Image side in pixels (a multiple of the VAE's downscale); the model's native size by default.
    #[arg(long)]
    size: Option<usize>,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<(), String> {
    let device = Device::flex();
    let sd = crate::load_model(&args.model, args.config.as_deref(), &device)?;
    let sampler = args.scheduler.as_deref().map(SamplerKind::parse).transpose().map_err(|e| e.to_string())?;
    let request =
        GenerateRequest { prompts: vec![args.prompt], negative: args.negative, seeds: vec![args.seed], steps: args.steps, guidance: args.guidance, sampler, size: args.size };
    let images = sd.generate(&request, |i, _| eprint!("\rseal: step {}/{}", i + 1, request.steps)).map_err(|e| e.to_string())?;
    eprintln!();
    let image = burn::tensor::read_sync(Rgb::from_batch(images))?.remove(0);
    crate::write_file(&args.out, &image.to_png())?;
    eprintln!("seal: wrote {}", args.out.display());
    Ok(())
}
