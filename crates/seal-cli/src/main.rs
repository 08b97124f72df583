//! The native `seal` command: a thin front end over seal-core and seal-sd.

mod ablate;
mod backdoor;
mod bench;
mod eval;
mod flags;
mod generate;
mod random_model;
mod scan;
mod seal;
mod suite;

use std::process::ExitCode;

use burn::prelude::Device;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "seal", version, about = "Remove hidden text-trigger backdoors from small Stable Diffusion models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the autodiff probe on the CPU (flex) backend and print its result as JSON.
    Probe,
    /// Generate an image from a prompt and write it as PNG.
    Generate(generate::Args),
    /// Seal a backdoor: train a cross-attention LoRA that undoes the trigger, write it as kohya.
    Seal(seal::Args),
    /// Measure a backdoor: detectors on fixed-seed generations with and without the trigger.
    Eval(eval::Args),
    /// Look for an unknown trigger: rank candidates of a suspect model or LoRA, with evidence.
    Scan(scan::Args),
    /// Run the sealing recipe's ablation on the pixel-backdoored fixture and write JSON.
    Ablate(ablate::Args),
    /// Time model forwards and generations on the CPU backend and write JSON.
    Bench(bench::Args),
    /// Plant a backdoor in a clean model by data poisoning and fine-tuning (validation models).
    Backdoor(backdoor::Args),
    /// Write a diffusers folder of a real architecture with random weights (for real-size checks).
    RandomModel(random_model::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Probe => probe(),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Ablate(args) => ablate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Seal(args) => seal::run(args),
        Command::Scan(args) => scan::run(args),
        Command::RandomModel(args) => random_model::run(args),
        Command::Backdoor(args) => backdoor::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("seal: {message}");
            ExitCode::FAILURE
        }
    }
}

fn probe() -> Result<(), String> {
    let result = burn::tensor::read_sync(seal_core::probe::autodiff_probe(&Device::flex()))?;
    println!("{}", serde_json::to_string(&result).map_err(|e| e.to_string())?);
    Ok(())
}

/// A prompt list file (one prompt per line, `#` comments), or the built-in set without one.
pub fn read_prompts(path: Option<&std::path::Path>) -> Result<Vec<String>, String> {
    use seal_core::prompts::{BUILT_IN, parse_list};
    match path {
        Some(p) => Ok(parse_list(&std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?)),
        None => Ok(parse_list(BUILT_IN)),
    }
}

/// Writes a file the CLI's one way: its folder created, through a temporary file and a rename,
/// so the file is complete or absent.
pub fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A diffusers folder or a single-file checkpoint (with an optional folder of configs for it).
pub fn model_source(path: &std::path::Path, config: Option<&std::path::Path>) -> Result<seal_sd::pipeline::ModelSource, String> {
    use seal_sd::pipeline::{ModelSource, read_folder};
    let mut source = ModelSource::from_path(path).map_err(|e| e.to_string())?;
    if let (ModelSource::SingleFile { config: slot, .. }, Some(dir)) = (&mut source, config) {
        *slot = Some(read_folder(dir, false).map_err(|e| e.to_string())?);
    }
    Ok(source)
}

/// Loads a model (see `model_source`), reporting what was recognised on stderr.
pub fn load_model(path: &std::path::Path, config: Option<&std::path::Path>, device: &Device) -> Result<seal_sd::pipeline::StableDiffusion, String> {
    let sd = seal_sd::pipeline::StableDiffusion::load(model_source(path, config)?, device).map_err(|e| e.to_string())?;
    report_model(&sd.info);
    Ok(sd)
}

pub fn report_model(info: &seal_sd::pipeline::ModelInfo) {
    eprintln!("seal: {} — {}", info.source, info.architecture);
    for note in &info.notes {
        eprintln!("seal: note: {note}");
    }
    if let Some(why) = &info.partial {
        eprintln!("seal: {why}");
    }
    if info.half {
        eprintln!("seal: matrices and kernels kept in f16, computing in f16 (--weights f16)");
    }
}
