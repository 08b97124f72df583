//! `seal eval`: fixed-seed generations with and without the trigger, judged by detectors;
//! with `--adapter`, before and after sealing.

use std::path::PathBuf;

use seal_core::backdoor::Target;
use seal_core::eval::{Detector, EvalSettings, Evaluation};
use seal_core::image::Rgb;
use seal_core::prompts::Placement;
use seal_sd::pipeline::LoraMode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: crate::seal::ModelArgs,
    /// A sealing adapter: evaluates the model before and after it.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The trigger; repeat for several.
    #[arg(long, required = true)]
    trigger: Vec<String>,
    /// Prompts, one per line.
    #[arg(long)]
    prompts: PathBuf,
    /// `patch:IMAGE.png@X,Y`, `gray` or `effect` (the trigger-effect score: a third,
    /// harmless-word image per pair).
    #[arg(long)]
    detector: Vec<String>,
    /// Seeds per prompt: first-seed .. first-seed + N (each (prompt, seed) pair gets its own noise).
    #[arg(long, default_value_t = 4)]
    seeds: u64,
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    #[arg(long, default_value_t = 25)]
    steps: usize,
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    #[arg(long, default_value = "prefix")]
    placement: Placement,
    #[arg(long)]
    report: Option<PathBuf>,
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Image side in pixels (default: the model's own).
    #[arg(long)]
    resolution: Option<usize>,
}

/// Parses `patch:IMG@X,Y`, `gray`, `shape:SHAPE[@DATA]` (the shapes' masks from a training
/// data folder, by default the fixtures') or `effect` (`None`: the effect score needs no detector).
pub fn parse_detector(spec: &str) -> Result<Option<Detector>, String> {
    match spec {
        "gray" => Ok(Some(Detector::gray())),
        "effect" => Ok(None),
        _ if spec.starts_with("shape:") => {
            let rest = &spec["shape:".len()..];
            let (to, data) = rest.split_once('@').unwrap_or((rest, "../shared/fixtures/data"));
            let data = seal_core::backdoor::read_data(std::path::Path::new(data))?;
            Target::Swap { to: to.into() }.detector(&data).map(Some)
        }
        _ => {
            let rest = spec.strip_prefix("patch:").ok_or_else(|| format!("unknown detector {spec:?} (patch:IMG@X,Y, gray, shape:SHAPE[@DATA], effect)"))?;
            let (img, at) = rest.rsplit_once('@').ok_or_else(|| format!("{spec}: expected patch:IMG@X,Y"))?;
            let (x, y) = at.split_once(',').ok_or_else(|| format!("{spec}: expected X,Y after @"))?;
            let bytes = std::fs::read(img).map_err(|e| format!("{img}: {e}"))?;
            let patch = Rgb::from_png(img, &bytes)?;
            let num = |s: &str| s.trim().parse::<usize>().map_err(|_| format!("{spec}: {s:?} is not a pixel position"));
            Ok(Some(Detector::patch(patch, num(x)?, num(y)?)))
        }
    }
}

pub fn run(args: Args) -> Result<(), String> {
    let session = args.model.session(false)?;
    let before = session.teacher().expect("the session holds the loaded model");
    let after = match &args.adapter {
        Some(path) => Some(before.with_lora(&crate::seal::read_lora(path, before)?, 1.0, LoraMode::SideBranch { trainable: false })),
        None => None,
    };
    let prompts = crate::read_prompts(Some(&args.prompts))?;
    let detectors = args.detector.iter().map(|d| parse_detector(d)).collect::<Result<Vec<_>, _>>()?.into_iter().flatten().collect();
    let effect = args.detector.iter().any(|d| d == "effect");
    let settings = EvalSettings {
        seeds: (args.first_seed..args.first_seed + args.seeds).collect(),
        steps: args.steps,
        guidance: args.guidance,
        placement: args.placement,
        effect,
        size: args.resolution,
        ..EvalSettings::default()
    };
    let mut eval = Evaluation::new(&prompts, &args.trigger, detectors, settings)?;
    while let Some(p) = burn::tensor::read_sync(eval.step(before, after.as_ref()))? {
        eprint!("\rseal: evaluating {}/{} (eta {:.0} s)   ", p.step, p.total, p.eta_s.unwrap_or(0.0));
    }
    eprintln!();
    let report = serde_json::to_string_pretty(&eval.report(prompts.len())).map_err(|e| e.to_string())?;
    println!("{report}");
    if let Some(path) = &args.report {
        crate::write_file(path, report.as_bytes())?;
    }
    if let Some(path) = &args.grid {
        crate::write_file(path, &eval.grid(4).to_png())?;
    }
    Ok(())
}
