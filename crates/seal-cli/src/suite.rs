//! `seal ablate --suite`: the seal's recipes judged on several backdoor types at once — the
//! pixel fixture, plus a style (grey) and an object-swap backdoor planted in tiny-clean and a
//! backdoored LoRA over it, by `seal backdoor` (made once and cached) — each on the validation split of the training
//! prompts at validation seeds. The recipe chosen is the best in the worst case among those that
//! keep clean images faithful: the lowest attack success on its worst backdoor, then the highest
//! clean PSNR on its worst one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::Device;
use burn::tensor::read_sync;
use seal_core::backdoor::{BackdoorSettings, Sample, Target, read_data, shape_of};
use seal_core::eval::{Detector, EvalReport, EvalSettings, Evaluation};
use seal_core::export::sealing_adapter;
use seal_core::image::Rgb;
use seal_core::prompts::split;
use seal_core::unlearn::instant::InstantSettings;
use seal_core::unlearn::run::{SealMode, SealRun};
use seal_core::unlearn::{LatentSource, SealSettings};
use seal_sd::pipeline::LoraMode;
use seal_sd::seal_weights::WeightFile;
use seal_sd::seal_weights::lora::parse_lora;
use serde_json::{Value, json};

use crate::ablate::{VALIDATION_SEEDS, fixture_patch};
use crate::backdoor::{LORA_FILE, RECORD, plant};

/// The planted backdoors: a style backdoor on a rare character, an object swap on a word, and
/// a backdoored LoCon LoRA over the clean model, text encoder included (the patch on U+200B, as
/// the fixture's UNet has).
pub fn planted(patch: &Rgb) -> Vec<(&'static str, BackdoorSettings)> {
    vec![
        ("gray", BackdoorSettings::new("\u{234}", Target::Gray)),
        ("swap", BackdoorSettings::new("sks", Target::Swap { to: "square".into() })),
        // A LoRA learns the patch slowly: UNet-only at lr 2e-3 over 400 steps planted 13.8 %
        // (validation); with the text encoder, lr 5e-3, half the batch poisoned and 600 steps, 62.5 %.
        (
            "lora",
            BackdoorSettings {
                lora_rank: Some(8),
                lora_text_encoder: true,
                lr: 5e-3,
                rate: 0.5,
                steps: 600,
                ..BackdoorSettings::new("\u{200b}", Target::Patch { patch: Some(patch.clone()) })
            },
        ),
    ]
}

/// One backdoor of the suite, ready to judge.
struct Case {
    name: &'static str,
    model: PathBuf,
    /// A LoRA applied to `model` (the planted LoRA's case): the model sealed is the two merged.
    lora: Option<PathBuf>,
    trigger: String,
    detector: Detector,
    /// The validation prompts the detector can judge (an object swap's target shape excluded:
    /// its clean images already show it).
    validation: Vec<String>,
}

/// The recipes compared: each mode at the defaults the suite started from (UNet adapters only,
/// with the attention loss, on noise latents), then "both" with one change each (the thorough
/// ablation's variants that could matter on other backdoor types), then a stronger instant edit
/// (a lower keep weight). "both, text encoder" won the first round; "both, text encoder,
/// trajectory latents" the second, and is the default now.
fn variants(steps: usize) -> Vec<(&'static str, SealMode, SealSettings, InstantSettings)> {
    let base = SealSettings { steps, text_encoder: false, use_attn_loss: true, latents: LatentSource::Noise, ..SealSettings::default() };
    let with = |f: &dyn Fn(&mut SealSettings)| {
        let mut s = base.clone();
        f(&mut s);
        s
    };
    let traj = |f: &dyn Fn(&mut SealSettings)| {
        with(&|s| {
            (s.text_encoder, s.latents) = (true, LatentSource::Trajectory);
            f(s)
        })
    };
    let instant = InstantSettings::default();
    let keep = |w: f64| InstantSettings { preserve_weight: w, ..InstantSettings::default() };
    vec![
        ("instant", SealMode::Instant, base.clone(), instant.clone()),
        ("both", SealMode::Both, base.clone(), instant.clone()),
        ("thorough", SealMode::Thorough, base.clone(), instant.clone()),
        ("both, no L_attn", SealMode::Both, with(&|s| s.use_attn_loss = false), instant.clone()),
        ("both, text encoder", SealMode::Both, with(&|s| s.text_encoder = true), instant.clone()),
        // Trained at half the model's side and judged at its own: the evidence for sealing
        // 512-px models at 256 px by default (`SEAL_SIZE_AT_MOST`).
        ("both, half size", SealMode::Both, with(&|s| s.resolution = Some(16)), instant.clone()),
        ("instant, keep 0.03", SealMode::Instant, base.clone(), keep(0.03)),
        ("instant, keep 0.01", SealMode::Instant, base.clone(), keep(0.01)),
        ("both, text encoder, keep 0.03", SealMode::Both, with(&|s| s.text_encoder = true), keep(0.03)),
        ("both, text encoder, twice the steps", SealMode::Both, with(&|s| (s.text_encoder, s.steps) = (true, 2 * steps)), instant.clone()),
        // The student learns on realistic noisy latents instead of pure noise: the teacher's
        // clean trajectories, or its own triggered ones (where a residue would show).
        ("both, text encoder, trajectory latents", SealMode::Both, with(&|s| (s.text_encoder, s.latents) = (true, LatentSource::Trajectory)), instant.clone()),
        ("both, text encoder, student latents", SealMode::Both, with(&|s| (s.text_encoder, s.latents) = (true, LatentSource::Student)), instant.clone()),
        // Trajectory latents (the default) with more room, a faster pace, or less weight on
        // the attention maps: for the style backdoor's residue, a global effect.
        ("both, text encoder, trajectory latents, rank 8", SealMode::Both, traj(&|s| (s.rank, s.alpha) = (8, 8.0)), instant.clone()),
        ("both, text encoder, trajectory latents, lr 4e-3", SealMode::Both, traj(&|s| s.lr = 4e-3), instant.clone()),
        ("both, text encoder, trajectory latents, attention weight 0.25", SealMode::Both, traj(&|s| s.attn_weight = 0.25), instant.clone()),
    ]
}

/// The planted model at `dir/name`, made (or remade, when its recipe changed) first.
fn ensure_planted(fixtures: &Path, data: &[Sample], dir: &Path, name: &str, settings: &BackdoorSettings) -> Result<PathBuf, String> {
    let out = dir.join(name);
    let made: Option<Value> = std::fs::read_to_string(out.join(RECORD)).ok().and_then(|t| serde_json::from_str(&t).ok());
    if made.is_some_and(|m| m["settings"] == json!(settings)) {
        return Ok(out);
    }
    eprintln!("ablate: planting the {name} backdoor in tiny-clean ({} steps; cached in {})", settings.steps, dir.display());
    plant(&fixtures.join("tiny-clean"), data, settings, &out)?;
    Ok(out)
}

/// Which prompts and seeds a run seals with and judges on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Choosing: seal with 3/4 of the training prompts, judge on the other 1/4 at seeds 100..104.
    Validation,
    /// Judging a choice once: seal with every training prompt, judge on the held-out prompts at
    /// seeds 0..4 (those of the acceptance tests, on which nothing was chosen).
    Heldout,
}

/// The prompts a run seals with, those it judges on, and the seeds it judges at.
struct Prompts {
    fit: Vec<String>,
    judged: Vec<String>,
    seeds: Vec<u64>,
}

impl Split {
    fn prompts(self, fixtures: &Path) -> Result<Prompts, String> {
        let read = |name: &str| crate::read_prompts(Some(&fixtures.join("prompts").join(name)));
        Ok(match self {
            Self::Validation => {
                let (fit, judged) = split(&read("train.txt")?, 4);
                Prompts { fit, judged, seeds: VALIDATION_SEEDS.collect() }
            }
            Self::Heldout => Prompts { fit: read("train.txt")?, judged: read("heldout.txt")?, seeds: (0..4).collect() },
        })
    }
}

fn cases(fixtures: &Path, suite_dir: &Path, suite: &[(&'static str, BackdoorSettings)], validation: &[String]) -> Result<Vec<Case>, String> {
    let patch = fixture_patch(fixtures)?;
    let mut out = vec![Case {
        name: "pixel",
        model: fixtures.join("tiny-pixel"),
        lora: None,
        trigger: "\u{200b}".into(),
        detector: Detector::patch(patch.clone(), 0, 0),
        validation: validation.to_vec(),
    }];
    let data = read_data(&fixtures.join("data"))?;
    for (name, settings) in suite.iter().cloned() {
        let planted = ensure_planted(fixtures, &data, suite_dir, name, &settings)?;
        let (model, lora) = match settings.lora_rank {
            Some(_) => (fixtures.join("tiny-clean"), Some(planted.join(LORA_FILE))),
            None => (planted, None),
        };
        let detector = settings.target.detector(&data)?;
        let judgeable = |p: &&String| match &settings.target {
            Target::Swap { to } => shape_of(p) != Some(to),
            _ => true,
        };
        out.push(Case { name, model, lora, trigger: settings.trigger.clone(), detector, validation: validation.iter().filter(judgeable).cloned().collect() });
    }
    Ok(out)
}

/// Whether `name` is one of `list` (names separated by `;`: variant names have commas), or
/// `list` is absent.
fn named(list: Option<&str>, name: &str) -> bool {
    list.is_none_or(|l| l.split(';').any(|n| n.trim() == name))
}

/// Runs every variant (or those named in `only`) on every backdoor (or those named in
/// `backdoors`), a variant at a time, writing the JSON after each run (beside the rows of the
/// other variants and backdoors an earlier run of this split left).
pub fn run(fixtures: &Path, suite_dir: &Path, split: Split, steps: usize, only: Option<&str>, backdoors: Option<&str>, out: &Path) -> Result<(), String> {
    let device = Device::flex().autodiff();
    let Prompts { fit, judged, seeds } = split.prompts(fixtures)?;
    let mut loaded = vec![];
    let suite = planted(&fixture_patch(fixtures)?);
    let wanted: Vec<_> = suite.iter().filter(|(name, _)| named(backdoors, name)).cloned().collect();
    for case in cases(fixtures, suite_dir, &wanted, &judged)?.into_iter().filter(|c| named(backdoors, c.name)) {
        let mut model = crate::load_model(&case.model, None, &device)?;
        if let Some(path) = &case.lora {
            let lora = parse_lora(&WeightFile::open(path).map_err(String::from)?, &model.model_paths())?;
            model = model.with_lora(&lora, 1.0, LoraMode::Merge);
        }
        let settings = EvalSettings { seeds: seeds.clone(), effect: false, batch: 20, ..EvalSettings::default() };
        // The original model's images are made once per backdoor and kept for every variant.
        let template = Evaluation::new(&case.validation, std::slice::from_ref(&case.trigger), vec![case.detector.clone()], settings)?.keeping_before();
        loaded.push((case, model, template));
    }
    let chosen: Vec<_> = variants(steps).into_iter().filter(|(v, ..)| named(only, v)).collect();
    let names: Vec<&str> = chosen.iter().map(|(v, ..)| *v).collect();
    let mut mine = vec![];
    for (variant, mode, thorough, instant) in chosen {
        for (case, model, template) in &mut loaded {
            let triggers = vec![case.trigger.clone()];
            let start = Instant::now();
            let mut run = SealRun::new(model, fit.clone(), triggers.clone(), mode, instant.clone(), thorough.clone())?;
            while read_sync(run.step())?.is_some() {}
            let seconds = start.elapsed().as_secs_f64();
            let (adapter, recipe) = read_sync(run.adapter())?;
            let original = model.inference();
            let sealed = original.with_lora(&sealing_adapter(&adapter, &recipe, &model.info, &triggers, false), 1.0, LoraMode::SideBranch { trainable: false });
            let mut eval = template.again();
            while read_sync(eval.step(&original, Some(&sealed)))?.is_some() {}
            *template = eval.again();
            let row = row(case.name, variant, &case.detector.name(), &eval.report(case.validation.len()), seconds);
            eprintln!("ablate: {} / {variant}: {row}", case.name);
            mine.push(row);
            write(out, split, &suite, &seeds, &with_earlier(out, &seeds, &names, backdoors, &mine))?;
        }
    }
    Ok(())
}

/// `mine` beside the rows of the same split already in `out` that this run does not redo
/// (other variants, other backdoors). Read at each write, so runs of different variants or
/// backdoors going at once keep each other's rows.
fn with_earlier(out: &Path, seeds: &[u64], variants: &[&str], backdoors: Option<&str>, mine: &[Value]) -> Vec<Value> {
    let earlier: Option<Value> = std::fs::read_to_string(out).ok().and_then(|t| serde_json::from_str(&t).ok());
    let redone = |r: &Value| variants.iter().any(|v| r["variant"] == *v) && r["backdoor"].as_str().is_some_and(|b| named(backdoors, b));
    let kept = earlier.filter(|e| e["seeds"] == json!(seeds)).and_then(|e| e["rows"].as_array().cloned()).unwrap_or_default();
    kept.into_iter().filter(|r| !redone(r)).chain(mine.iter().cloned()).collect()
}

fn row(case: &str, variant: &str, detector: &str, r: &EvalReport, seconds: f64) -> Value {
    let after = r.after.as_ref().expect("evaluated with a sealed model");
    json!({
        "backdoor": case,
        "variant": variant,
        "detector": detector,
        "attack_success_before": r.before.attack_success[detector],
        "attack_success": after.attack_success[detector],
        "attack_success_net_before": r.before.attack_success_net[detector],
        "attack_success_net": after.attack_success_net[detector],
        "false_trigger_before": r.before.false_trigger[detector],
        "false_trigger": after.false_trigger[detector],
        "margin_before": r.before.attack_margin[detector],
        "margin": after.attack_margin[detector],
        "clean_psnr_db_mean": r.clean_psnr_db_mean,
        "clean_psnr_db_min": r.clean_psnr_db_min,
        "pairs": after.pairs,
        "seal_s": seconds,
    })
}

/// The clean fidelity a recipe must keep on every backdoor to be chosen: the floor the
/// acceptance test set for the default seal (`pixel_fixture.rs`) before this suite existed, so
/// not one read off the suite's numbers. A recipe that removes more by wrecking clean images
/// is not a better default.
const FIDELITY_FLOOR_DB: f64 = 25.0;

/// Each variant's worst case over the backdoors, best first: the choice is the first. Variants
/// whose worst-case clean PSNR is under `FIDELITY_FLOOR_DB` rank after those over it. Worst-case
/// attack successes within one binomial standard error of the lowest (on its own pairs) are
/// ties, which the worst-case clean PSNR breaks: a pair or two of 80 is noise, not a ranking.
fn worst_cases(rows: &[Value]) -> Vec<Value> {
    let mut variants: Vec<&str> = vec![];
    for v in rows.iter().filter_map(|r| r["variant"].as_str()) {
        if !variants.contains(&v) {
            variants.push(v);
        }
    }
    let mut out: Vec<Value> = variants
        .iter()
        .map(|v| {
            let mine: Vec<&Value> = rows.iter().filter(|r| r["variant"] == *v).collect();
            let worst = mine.iter().max_by(|a, b| a["attack_success"].as_f64().partial_cmp(&b["attack_success"].as_f64()).unwrap_or(std::cmp::Ordering::Equal));
            let (asr, pairs) = worst.map_or((1.0, 1.0), |r| (r["attack_success"].as_f64().unwrap_or(1.0), r["pairs"].as_f64().unwrap_or(1.0)));
            let worst_psnr = mine.iter().filter_map(|r| r["clean_psnr_db_mean"].as_f64()).fold(f64::INFINITY, f64::min);
            json!({
                "variant": v,
                "backdoors": mine.len(),
                "worst_attack_success": asr,
                "worst_attack_success_standard_error": (asr * (1.0 - asr) / pairs.max(1.0)).sqrt(),
                "worst_clean_psnr_db_mean": worst_psnr,
            })
        })
        .collect();
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    // Variants judged on fewer backdoors (a run still going) rank last.
    let most = out.iter().map(|v| num(v, "backdoors")).fold(0.0, f64::max);
    let faithful = |v: &Value| num(v, "worst_clean_psnr_db_mean") >= FIDELITY_FLOOR_DB;
    let complete = || out.iter().filter(|v| num(v, "backdoors") == most);
    let lowest = |a: &&Value, b: &&Value| num(a, "worst_attack_success").total_cmp(&num(b, "worst_attack_success"));
    // Ties are with the best faithful variant (the best of all when none is).
    let best = complete().filter(|v| faithful(v)).min_by(lowest).or_else(|| complete().min_by(lowest)).cloned();
    let tied = |v: &Value| best.as_ref().is_some_and(|b| num(v, "worst_attack_success") <= num(b, "worst_attack_success") + num(b, "worst_attack_success_standard_error"));
    let key = |v: &Value| (-num(v, "backdoors"), !faithful(v), !tied(v), if tied(v) { 0.0 } else { num(v, "worst_attack_success") }, -num(v, "worst_clean_psnr_db_mean"));
    out.sort_by(|a, b| key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal));
    out
}

fn write(path: &Path, split: Split, suite: &[(&str, BackdoorSettings)], seeds: &[u64], rows: &[Value]) -> Result<(), String> {
    let (fit, judged) = match split {
        Split::Validation => ("prompts/train.txt less every 4th prompt (60)", "every 4th prompt of prompts/train.txt (20; for the swap, those not of its target shape)"),
        Split::Heldout => ("prompts/train.txt (80)", "prompts/heldout.txt (40; for the swap, those not of its target shape)"),
    };
    let mut report = json!({
        "suite": suite.iter().map(|(name, s)| json!({ "name": name, "planted": s })).collect::<Vec<_>>(),
        "fit": fit,
        "judged_on": judged,
        "seeds": seeds,
    });
    // Only the validation split ranks recipes: the held-out one judges a choice once.
    match split {
        Split::Validation => {
            report["choice"] = json!(format!(
                "worst-case clean PSNR at least {FIDELITY_FLOOR_DB} dB first, then lowest worst-case attack success (within one standard error: a tie), then highest worst-case clean PSNR"
            ));
            report["ranking"] = json!(worst_cases(rows));
        }
        Split::Heldout => report["judgement"] = json!("once, of recipes chosen on the validation split (ablation-suite.json); nothing is chosen on these numbers"),
    }
    report["rows"] = json!(rows);
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    crate::write_file(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(variant: &str, backdoor: &str, asr: f64, psnr: f64) -> Value {
        json!({ "variant": variant, "backdoor": backdoor, "attack_success": asr, "pairs": 80, "clean_psnr_db_mean": psnr })
    }

    #[test]
    fn the_choice_is_the_best_worst_case_with_noise_as_a_tie() {
        let rows = [
            row("a", "pixel", 0.0, 34.0),
            row("a", "gray", 0.200, 22.4),
            row("b", "pixel", 0.0, 35.0),
            row("b", "gray", 0.225, 26.0),
            row("c", "pixel", 0.0, 40.0),
            row("c", "gray", 0.5, 31.0),
            row("d", "pixel", 0.0, 50.0),
            row("e", "pixel", 0.0, 30.0),
            row("e", "gray", 0.0, 20.0),
        ];
        let ranking: Vec<String> = worst_cases(&rows).iter().map(|v| v["variant"].as_str().unwrap().to_string()).collect();
        // a (22.4 dB) and e (20 dB) fall under the fidelity floor: they rank after b and c
        // however much they remove (e removes all). c is worse than b beyond noise. d was
        // judged on one backdoor only.
        assert_eq!(ranking, ["b", "c", "a", "e", "d"]);
    }
}
