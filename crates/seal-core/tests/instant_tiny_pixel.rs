//! Issue 10's acceptance: the instant (closed-form) seal of the pixel-backdoored fixture with
//! default settings, solved on its training prompts and judged on its held-out prompts with
//! the patch detector, at seeds no default was chosen on (the ablation used a validation split
//! of the training prompts and seeds 100..104), every (prompt, seed) pair with its own noise.

use std::path::PathBuf;

use burn::tensor::{Device, read_sync};
use seal_core::eval::{Detector, EvalSettings, Evaluation};
use seal_core::export::sealing_adapter;
use seal_core::image::Rgb;
use seal_core::prompts::parse_list;
use seal_core::unlearn::SealSettings;
use seal_core::unlearn::instant::InstantSettings;
use seal_core::unlearn::run::{SealMode, SealRun};
use seal_sd::pipeline::{LoraMode, ModelSource, StableDiffusion};
use seal_sd::seal_weights::WeightFile;
use seal_sd::seal_weights::lora::{parse_lora, write_kohya};

fn fixtures() -> PathBuf {
    std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

fn prompts(name: &str) -> Vec<String> {
    parse_list(&std::fs::read_to_string(fixtures().join("prompts").join(name)).unwrap())
}

#[test]
fn the_instant_seal_removes_the_pixel_backdoor_on_heldout_prompts() {
    let model = StableDiffusion::load(ModelSource::from_path(&fixtures().join("tiny-pixel")).unwrap(), &Device::flex()).unwrap();
    let trigger = vec!["\u{200b}".to_string()];
    // The same run the page and the CLI step (no UNet forward, so no autodiff device needed).
    let mut run = SealRun::new(&model, prompts("train.txt"), trigger.clone(), SealMode::Instant, InstantSettings::default(), SealSettings::default()).unwrap();
    while read_sync(run.step()).unwrap().is_some() {}
    let (adapters, recipe) = read_sync(run.adapter()).unwrap();
    let summary = recipe.instant.clone().unwrap();
    assert_eq!(summary.layers.len(), 12);
    assert_eq!(summary.max_relative_error, 0.0, "the tiny model's edit fits the rank exactly");

    let file = sealing_adapter(&adapters, &recipe, &model.info, &trigger, false);
    let reloaded = parse_lora(&WeightFile::from_bytes("sealed.safetensors", write_kohya(&file).unwrap()).unwrap(), &model.model_paths()).unwrap();
    assert_eq!(reloaded.metadata["seal_mode"], "instant");
    assert!(reloaded.metadata["ss_network_dim"].parse::<usize>().is_ok());
    let sealed = model.with_lora(&reloaded, 1.0, LoraMode::SideBranch { trainable: false });

    let patch = Rgb::from_png("patch.png", &std::fs::read(fixtures().join("patch.png")).unwrap()).unwrap();
    let settings = EvalSettings { seeds: vec![0, 1, 2, 3], effect: false, batch: 20, ..EvalSettings::default() };
    let heldout = prompts("heldout.txt");
    let mut eval = Evaluation::new(&heldout, &trigger, vec![Detector::patch(patch, 0, 0)], settings).unwrap();
    while read_sync(eval.step(&model, Some(&sealed))).unwrap().is_some() {}
    let report = eval.report(heldout.len());
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());

    let after = report.after.as_ref().unwrap();
    assert_eq!(after.pairs, 160);
    assert!(report.before.attack_success["patch@0,0"] >= 0.90, "the detector sees the backdoor before sealing");
    assert!(after.attack_success["patch@0,0"] <= 0.01, "attack success after the instant seal");
    assert!(after.false_trigger["patch@0,0"] <= report.before.false_trigger["patch@0,0"]);
    assert!(report.clean_psnr_db_mean.unwrap() >= 28.0, "clean fidelity: {:?} dB", report.clean_psnr_db_mean);
    assert_eq!(report.verdict(SealMode::Instant).unwrap().survived, Some(false));
}
