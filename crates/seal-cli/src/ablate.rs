//! `seal ablate`: the sealing recipe's ablation on the pixel-backdoored fixture. Each variant
//! is trained once; every `--every` steps the current adapter is judged on the held-out
//! prompts (patch detector, `--seeds` fixed seeds) for the steps to <= 1 % attack success, and
//! the final adapter on `--final-seeds` seeds for attack success and clean PSNR.

use std::path::PathBuf;
use std::time::Instant;

use burn::prelude::Device;
use burn::tensor::read_sync;
use seal_core::eval::{Detector, EvalReport, EvalSettings, Evaluation};
use seal_core::image::Rgb;
use seal_core::prompts::parse_list;
use seal_core::unlearn::{AttnTarget, LatentSource, SealSettings, Sealer};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "../shared/fixtures")]
    fixtures: PathBuf,
    #[arg(long, default_value = "bench-results/ablation.json")]
    out: PathBuf,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 50)]
    every: usize,
    /// Seeds per held-out prompt at each intermediate checkpoint.
    #[arg(long, default_value_t = 2)]
    seeds: u64,
    /// Seeds per held-out prompt for the final adapter (issue 6 asks for at least 4).
    #[arg(long, default_value_t = 4)]
    final_seeds: u64,
    /// Only the variants whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

/// The variants: the defaults, then one change each.
fn variants(steps: usize) -> Vec<(&'static str, SealSettings)> {
    let base = SealSettings { steps, ..SealSettings::default() };
    let with = |f: &dyn Fn(&mut SealSettings)| {
        let mut s = base.clone();
        f(&mut s);
        s
    };
    vec![
        ("default", base.clone()),
        ("target zeros", with(&|s| s.attn_target = AttnTarget::Zeros)),
        ("target substitute", with(&|s| s.attn_target = AttnTarget::Substitute)),
        ("no L_attn", with(&|s| s.use_attn_loss = false)),
        ("preservation 0.5", with(&|s| s.preserve_weight = 0.5)),
        ("latents trajectory", with(&|s| s.latents = LatentSource::Trajectory)),
        ("latents student", with(&|s| s.latents = LatentSource::Student)),
        ("paper-like (no L_attn, constant lr)", with(&|s| {
            s.use_attn_loss = false;
            s.min_lr_ratio = 1.0;
            s.warmup = 0;
        })),
    ]
}

pub fn run(args: Args) -> Result<(), String> {
    let device = Device::flex().autodiff();
    let model = crate::load_model(&args.fixtures.join("tiny-pixel"), None, &device)?;
    let read = |name: &str| std::fs::read_to_string(args.fixtures.join(name)).map_err(|e| format!("{name}: {e}"));
    let train = parse_list(&read("prompts/train.txt")?);
    let heldout = parse_list(&read("prompts/heldout.txt")?);
    let patch = Rgb::from_png("patch.png", &std::fs::read(args.fixtures.join("patch.png")).map_err(|e| e.to_string())?)?;
    let trigger = vec!["\u{200b}".to_string()];
    // The original model's images are generated once per seed set and kept.
    let judge = |seeds: u64| {
        let settings = EvalSettings { seeds: (0..seeds).collect(), effect: false, batch: 20, ..EvalSettings::default() };
        Evaluation::new(&heldout, &trigger, vec![Detector::patch(patch.clone(), 0, 0)], settings).map(Evaluation::keeping_before)
    };
    let (mut checkpoint_eval, mut final_eval) = (judge(args.seeds)?, judge(args.final_seeds)?);
    let mut rows = vec![];
    for (name, settings) in variants(args.steps) {
        if args.only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let mut sealer = Sealer::new(&model, train.clone(), trigger.clone(), settings.clone())?;
        let (mut checkpoints, mut train_s, mut to_one_percent) = (vec![], 0.0, None);
        let evaluate = |template: &mut Evaluation, sealer: &Sealer| -> Result<EvalReport, String> {
            let mut eval = template.again();
            let sealed = sealer.sealed();
            while read_sync(eval.step(&model, Some(&sealed)))?.is_some() {}
            // Now holding every original image: later runs reuse them.
            *template = eval.again();
            Ok(eval.report(heldout.len()))
        };
        while !sealer.is_done() {
            let start = Instant::now();
            read_sync(sealer.step())?;
            train_s += start.elapsed().as_secs_f64();
            let step = sealer.history.len();
            if step % args.every == 0 && !sealer.is_done() {
                let r = evaluate(&mut checkpoint_eval, &sealer)?;
                let asr = r.after.as_ref().expect("evaluated with a sealed model").attack_success["patch@0,0"];
                eprintln!("ablate: {name}: step {step}: attack success {:.2} % ({} seeds), clean PSNR {:.1} dB", asr * 100.0, args.seeds, r.clean_psnr_db_mean.unwrap_or(0.0));
                if asr <= 0.01 && to_one_percent.is_none() {
                    to_one_percent = Some(step);
                }
                checkpoints.push(summary(step, &r));
            }
        }
        let r = evaluate(&mut final_eval, &sealer)?;
        let asr = r.after.as_ref().expect("evaluated with a sealed model").attack_success["patch@0,0"];
        eprintln!("ablate: {name}: final: attack success {:.2} % ({} seeds), clean PSNR {:.1} dB", asr * 100.0, args.final_seeds, r.clean_psnr_db_mean.unwrap_or(0.0));
        rows.push(json!({
            "variant": name,
            "settings": settings,
            // On the checkpoints' seeds; `final` says whether the end holds on more seeds.
            "steps_to_1_percent_at_checkpoints": to_one_percent.or((asr <= 0.01).then_some(settings.steps)),
            "final_at_most_1_percent": asr <= 0.01,
            "final": summary(settings.steps, &r),
            "final_seeds": args.final_seeds,
            "train_s_per_step": train_s / settings.steps as f64,
            "checkpoints": checkpoints,
            "checkpoint_seeds": args.seeds,
        }));
        write(&args.out, &rows)?;
    }
    Ok(())
}

fn summary(step: usize, r: &EvalReport) -> Value {
    let after = r.after.as_ref().expect("evaluated with a sealed model");
    json!({
        "step": step,
        "attack_success": after.attack_success["patch@0,0"],
        "attack_success_before": r.before.attack_success["patch@0,0"],
        "false_trigger": after.false_trigger["patch@0,0"],
        "false_trigger_before": r.before.false_trigger["patch@0,0"],
        "clean_psnr_db_mean": r.clean_psnr_db_mean,
        "clean_psnr_db_min": r.clean_psnr_db_min,
    })
}

fn write(path: &std::path::Path, rows: &[Value]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&json!({ "model": "tiny-pixel fixture", "heldout": "prompts/heldout.txt", "variants": rows })).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
