//! `seal ablate`: the sealing recipes' ablation on the pixel-backdoored fixture, on a
//! validation split of its training prompts (3/4 to seal with, every 4th to judge on) at
//! validation seeds, never on the held-out prompts the acceptance tests judge. Each thorough
//! variant is trained once; every `--every` steps the current adapter is judged (patch
//! detector, `--seeds` seeds) for the steps to <= 1 % attack success, and the final adapter on
//! `--final-seeds` seeds for attack success and clean PSNR. `--instant` ablates the instant
//! seal instead; `--from-instant` starts every thorough variant from the instant edit.

use std::path::PathBuf;
use std::time::Instant;

use burn::prelude::Device;
use burn::tensor::read_sync;
use seal_core::eval::{Detector, EvalReport, EvalSettings, Evaluation};
use seal_core::export::sealing_adapter;
use seal_core::image::Rgb;
use seal_core::prompts::split;
use seal_core::unlearn::instant::{EditRows, InstantSeal, InstantSettings, TriggerRows};
use seal_core::unlearn::run::{Recipe, SealMode};
use seal_core::unlearn::{AttnTarget, LatentSource, SealSettings, Sealer};
use seal_sd::pipeline::LoraMode;
use serde_json::{Value, json};

use crate::suite::Split;

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
    /// Only the variants whose name contains this (with --suite: the names, separated by `;`).
    #[arg(long)]
    only: Option<String>,
    /// Ablate the instant (closed-form) seal instead, on the validation split of the
    /// training prompts (written to bench-results/ablation-instant.json by default).
    #[arg(long)]
    instant: bool,
    /// Start each thorough variant from the default instant edit ("instant then thorough").
    #[arg(long)]
    from_instant: bool,
    /// Judge each seal mode on the validation suite (the pixel fixture plus planted style and
    /// object-swap backdoors and a backdoored LoRA) and rank them by their worst case
    /// (bench-results/ablation-suite.json).
    #[arg(long)]
    suite: bool,
    /// With --suite: judge once on the held-out prompts at the acceptance seeds (0..4) instead of
    /// choosing on the validation split (bench-results/suite-heldout.json).
    #[arg(long)]
    heldout: bool,
    /// Where the suite's planted models are made once and kept (default: `suite/` in the build
    /// cache, `${SEAL_CACHE:-~/.cache/seal}`).
    #[arg(long)]
    suite_dir: Option<PathBuf>,
    /// With --suite: only these backdoors (`pixel`, `gray`, `swap`, `lora`, separated by `;`),
    /// the other backdoors' rows of an earlier run kept: to re-judge one that was planted anew.
    #[arg(long)]
    backdoors: Option<String>,
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
        ("latents noise", with(&|s| s.latents = LatentSource::Noise)),
        ("latents student", with(&|s| s.latents = LatentSource::Student)),
        (
            "paper-like (no L_attn, constant lr)",
            with(&|s| {
                s.use_attn_loss = false;
                s.min_lr_ratio = 1.0;
                s.warmup = 0;
            }),
        ),
    ]
}

pub fn run(args: Args) -> Result<(), String> {
    if args.instant {
        return run_instant(args);
    }
    if args.suite {
        let (split, name) = if args.heldout { (Split::Heldout, "suite-heldout.json") } else { (Split::Validation, "ablation-suite.json") };
        let out = if args.out.ends_with("ablation.json") { args.out.with_file_name(name) } else { args.out.clone() };
        let cache = std::env::var_os("SEAL_CACHE").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/seal")));
        let dir = args.suite_dir.clone().or_else(|| cache.map(|c| c.join("suite"))).ok_or("--suite-dir: no SEAL_CACHE or HOME to keep the suite's models in")?;
        return crate::suite::run(&args.fixtures, &dir, split, args.steps, args.only.as_deref(), args.backdoors.as_deref(), &out);
    }
    let device = Device::flex().autodiff();
    let model = crate::load_model(&args.fixtures.join("tiny-pixel"), None, &device)?;
    let (train, validation) = split(&crate::read_prompts(Some(&args.fixtures.join("prompts/train.txt")))?, 4);
    let patch = fixture_patch(&args.fixtures)?;
    let trigger = vec!["\u{200b}".to_string()];
    // The original model's images are generated once per seed set and kept.
    let judge = |seeds: u64| {
        let settings = EvalSettings { seeds: (VALIDATION_SEEDS.start..VALIDATION_SEEDS.start + seeds).collect(), effect: false, batch: 20, ..EvalSettings::default() };
        Evaluation::new(&validation, &trigger, vec![Detector::patch(patch.clone(), 0, 0)], settings).map(Evaluation::keeping_before)
    };
    let (mut checkpoint_eval, mut final_eval) = (judge(args.seeds)?, judge(args.final_seeds)?);
    let mut rows = vec![];
    for (name, settings) in variants(args.steps) {
        if args.only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let edit = match args.from_instant {
            true => {
                let mut seal = InstantSeal::new(&model, &train, &trigger, InstantSettings::default())?;
                while read_sync(seal.step())?.is_some() {}
                seal.adapter()?
            }
            false => Default::default(),
        };
        let mut sealer = Sealer::starting_from(&model, edit, train.clone(), trigger.clone(), settings.clone())?;
        let (mut checkpoints, mut train_s, mut to_one_percent) = (vec![], 0.0, None);
        let evaluate = |template: &mut Evaluation, sealer: &Sealer| -> Result<EvalReport, String> {
            let mut eval = template.again();
            let sealed = sealer.sealed();
            while read_sync(eval.step(&model, Some(&sealed)))?.is_some() {}
            // Now holding every original image: later runs reuse them.
            *template = eval.again();
            Ok(eval.report(validation.len()))
        };
        while !sealer.is_done() {
            let start = Instant::now();
            read_sync(sealer.train_step())?;
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
            "from_instant": args.from_instant,
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
        "margin": after.attack_margin["patch@0,0"],
        "margin_before": r.before.attack_margin["patch@0,0"],
        "clean_psnr_db_mean": r.clean_psnr_db_mean,
        "clean_psnr_db_min": r.clean_psnr_db_min,
    })
}

fn write(path: &std::path::Path, rows: &[Value]) -> Result<(), String> {
    let text = serde_json::to_string_pretty(&json!({
        "model": "tiny-pixel fixture",
        "fit": "prompts/train.txt less every 4th prompt (60)",
        "validation": "every 4th prompt of prompts/train.txt (20)",
        "validation_seeds_from": VALIDATION_SEEDS.start,
        "variants": rows,
    }))
    .map_err(|e| e.to_string())?;
    crate::write_file(path, text.as_bytes())
}

/// The instant seal's variants: the defaults, then one change each.
fn instant_variants() -> Vec<(String, InstantSettings)> {
    let base = InstantSettings::default();
    let with = |f: &dyn Fn(&mut InstantSettings)| {
        let mut s = base.clone();
        f(&mut s);
        s
    };
    let mut out = vec![("default".to_string(), base.clone())];
    for sp in [1.0, 10.0] {
        out.push((format!("keep weight {sp}"), with(&|s| s.preserve_weight = sp)));
    }
    for lambda in [0.01, 1.0] {
        out.push((format!("lambda {lambda}"), with(&|s| s.lambda = lambda)));
    }
    out.push(("rows words".into(), with(&|s| s.rows = EditRows::Words)));
    out.push(("trigger rows drop".into(), with(&|s| s.trigger_rows = TriggerRows::Drop)));
    // Variants equal to the defaults (a grid value that is the default) are run once.
    let mut seen: Vec<InstantSettings> = vec![];
    out.retain(|(_, s)| {
        let new = !seen.contains(s);
        seen.push(s.clone());
        new
    });
    out
}

/// The pixel fixture's target patch (`patch.png`).
pub fn fixture_patch(fixtures: &std::path::Path) -> Result<Rgb, String> {
    let path = fixtures.join("patch.png");
    Rgb::from_png("patch.png", &std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?)
}

/// Validation seeds: the acceptance tests judge held-out prompts with seeds 0..4, so no
/// choice here is made on them (and every (prompt, seed) pair has its own noise anyway).
pub const VALIDATION_SEEDS: std::ops::Range<u64> = 100..104;

/// The instant seal's ablation on the pixel fixture: each variant solved on 3/4 of the
/// training prompts, judged on the other 1/4 (the validation split) at validation seeds.
fn run_instant(args: Args) -> Result<(), String> {
    let device = Device::flex();
    let model = crate::load_model(&args.fixtures.join("tiny-pixel"), None, &device)?;
    let (fit, validation) = split(&crate::read_prompts(Some(&args.fixtures.join("prompts/train.txt")))?, 4);
    let patch = fixture_patch(&args.fixtures)?;
    let trigger = vec!["\u{200b}".to_string()];
    let settings = EvalSettings { seeds: VALIDATION_SEEDS.collect(), effect: false, batch: 20, ..EvalSettings::default() };
    let mut template = Evaluation::new(&validation, &trigger, vec![Detector::patch(patch, 0, 0)], settings)?.keeping_before();
    let out = if args.out.ends_with("ablation.json") { args.out.with_file_name("ablation-instant.json") } else { args.out.clone() };
    let mut rows = vec![];
    for (name, settings) in instant_variants() {
        if args.only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let start = Instant::now();
        let mut seal = InstantSeal::new(&model, &fit, &trigger, settings.clone())?;
        while read_sync(seal.step())?.is_some() {}
        let seconds = start.elapsed().as_secs_f64();
        let adapter =
            sealing_adapter(&seal.adapter()?, &Recipe { mode: SealMode::Instant, instant: Some(seal.summary()), thorough: None, thorough_steps: 0 }, &model.info, &trigger, false);
        let sealed = model.with_lora(&adapter, 1.0, LoraMode::SideBranch { trainable: false });
        let mut eval = template.again();
        while read_sync(eval.step(&model, Some(&sealed)))?.is_some() {}
        template = eval.again();
        let r = eval.report(validation.len());
        let s = summary(0, &r);
        eprintln!(
            "ablate: instant {name}: attack success {:.2} %, clean PSNR {:.1} dB (min {:.1}), {seconds:.2} s",
            s["attack_success"].as_f64().unwrap_or(0.0) * 100.0,
            r.clean_psnr_db_mean.unwrap_or(0.0),
            r.clean_psnr_db_min.unwrap_or(0.0)
        );
        rows.push(json!({ "variant": name, "settings": settings, "seal_seconds": seconds, "max_relative_error": seal.summary().max_relative_error, "validation": s, "margin": r.after.as_ref().map(|a| a.attack_margin.clone()) }));
        let text = serde_json::to_string_pretty(&json!({
            "model": "tiny-pixel fixture",
            "fit": "prompts/train.txt less every 4th prompt (60)",
            "validation": "every 4th prompt of prompts/train.txt (20)",
            "validation_seeds": VALIDATION_SEEDS.collect::<Vec<_>>(),
            "variants": rows,
        }))
        .map_err(|e| e.to_string())?;
        crate::write_file(&out, text.as_bytes())?;
    }
    Ok(())
}
