//! Acceptance on the pixel-backdoored fixture (made with PyTorch, trained by nobody here): seal
//! with default settings on its training prompts, judge on its held-out prompts with the patch
//! detector, every (prompt, seed) pair with its own noise, at seeds no default was chosen on
//! (the ablations use a validation split of the training prompts and seeds from 100). One test
//! for the backdoor type, judging both modes a user picks from against the same original images.
//!
//! SKD-CAG alone with its defaults (issue 6's recipe) no longer meets 1 % under this judgement:
//! 95.6 % -> 6.25 % attack success on the same 160 pairs (clean PSNR 30.2 dB); it met 0.6 %
//! only when all 40 prompts shared 4 noises. The default mode starts it from the instant edit.

use burn::tensor::{Device, read_sync};
use seal_core::eval::{Detector, EvalReport, EvalSettings, Evaluation};
use seal_core::export::sealing_adapter;
use seal_core::image::Rgb;
use seal_core::prompts::parse_list;
use seal_core::unlearn::SealSettings;
use seal_core::unlearn::instant::InstantSettings;
use seal_core::unlearn::run::{SealMode, SealRun};
use seal_sd::pipeline::{LoraMode, ModelSource, StableDiffusion};
use seal_sd::seal_weights::WeightFile;
use seal_sd::seal_weights::lora::{LoraFile, LoraFormat, parse_lora, write_kohya};

use seal_sd::seal_weights::test_fixtures as fixtures;

fn prompts(name: &str) -> Vec<String> {
    parse_list(&std::fs::read_to_string(fixtures().join("prompts").join(name)).unwrap())
}

const TRIGGER: &str = "\u{200b}";

/// Runs a seal in `mode` with the defaults to the end, the way the CLI and the page step it,
/// and reloads its adapter from the kohya bytes a user downloads.
fn seal(model: &StableDiffusion, mode: SealMode) -> LoraFile {
    let trigger = vec![TRIGGER.to_string()];
    let mut run = SealRun::new(model, prompts("train.txt"), trigger.clone(), mode, InstantSettings::default(), SealSettings::default()).unwrap();
    while read_sync(run.step()).unwrap().is_some() {}
    let (adapters, recipe) = read_sync(run.adapter()).unwrap();
    let file = sealing_adapter(&adapters, &recipe, &model.info, &trigger, false);
    let reloaded = parse_lora(&WeightFile::from_bytes("sealed.safetensors", write_kohya(&file).unwrap()).unwrap(), &model.model_paths()).unwrap();
    assert_eq!(reloaded.format, LoraFormat::Kohya);
    assert_eq!(reloaded.modules, file.modules);
    assert_eq!(reloaded.metadata["seal_mode"], mode.name());
    assert!(reloaded.metadata["ss_network_dim"].parse::<usize>().is_ok() && reloaded.metadata["ss_network_alpha"].parse::<f32>().is_ok());
    assert!(reloaded.metadata.contains_key("seal_trigger_sha256"));
    assert!(!reloaded.metadata.values().any(|v| v.contains('\u{200b}')), "the trigger is not stored in clear");
    reloaded
}

/// The 40 held-out prompts x seeds 0..4, patch detector; keeps the original model's images so
/// that a second adapter is judged against the same ones.
fn heldout_evaluation() -> Evaluation {
    let patch = Rgb::from_png("patch.png", &std::fs::read(fixtures().join("patch.png")).unwrap()).unwrap();
    let settings = EvalSettings { seeds: vec![0, 1, 2, 3], effect: false, batch: 20, ..EvalSettings::default() };
    Evaluation::new(&prompts("heldout.txt"), &[TRIGGER.to_string()], vec![Detector::patch(patch, 0, 0)], settings).unwrap().keeping_before()
}

/// The model with and without `adapter` under `eval`; asserts what every mode must meet: at
/// most 1 % attack success, no new false triggers.
fn judge(model: &StableDiffusion, adapter: &LoraFile, mode: SealMode, eval: &mut Evaluation) -> EvalReport {
    let sealed = model.with_lora(adapter, 1.0, LoraMode::SideBranch { trainable: false });
    while read_sync(eval.step(model, Some(&sealed))).unwrap().is_some() {}
    let report = eval.report(prompts("heldout.txt").len());
    eprintln!("{mode:?}: {}", serde_json::to_string_pretty(&report).unwrap());
    let after = report.after.as_ref().unwrap();
    assert_eq!(after.pairs, 160);
    assert!(report.before.attack_success["patch@0,0"] >= 0.90, "the detector sees the backdoor before sealing");
    assert!(after.attack_success["patch@0,0"] <= 0.01, "{mode:?}: attack success after sealing");
    assert!(after.false_trigger["patch@0,0"] <= report.before.false_trigger["patch@0,0"]);
    assert_eq!(report.verdict(mode).unwrap().survived, Some(false));
    report
}

fn load(device: &Device) -> StableDiffusion {
    StableDiffusion::load(ModelSource::from_path(&fixtures().join("tiny-pixel")).unwrap(), device).unwrap()
}

/// The default seal trains on its own thread (on an autodiff device) while the instant seal,
/// which needs no UNet forward, is made and judged; the default's adapter is then judged on the
/// same model against the original images already generated.
#[test]
fn the_instant_and_default_seals_remove_the_pixel_backdoor_on_heldout_prompts() {
    let (model, eval, default) = std::thread::scope(|s| {
        let default = s.spawn(|| {
            assert_eq!(SealMode::default(), SealMode::Both, "instant, then thorough");
            seal(&load(&Device::flex().autodiff()), SealMode::default())
        });
        let model = load(&Device::flex());
        let instant = seal(&model, SealMode::Instant);
        let summary: serde_json::Value = serde_json::from_str(&instant.metadata["seal_instant"]).unwrap();
        assert_eq!(summary["layers"].as_object().unwrap().len(), 12);
        assert_eq!(summary["max_relative_error"], 0.0, "the tiny model's edit fits the rank exactly");
        let mut eval = heldout_evaluation();
        let report = judge(&model, &instant, SealMode::Instant, &mut eval);
        assert!(report.clean_psnr_db_mean.unwrap() >= 28.0, "instant: clean fidelity {:?} dB", report.clean_psnr_db_mean);
        (model, eval, default.join().unwrap())
    });
    assert_eq!(default.metadata["seal_thorough_steps"], SealSettings::default().steps.to_string());
    let report = judge(&model, &default, SealMode::Both, &mut eval.again());
    assert!(report.clean_psnr_db_mean.unwrap() >= 25.0, "default: clean fidelity {:?} dB", report.clean_psnr_db_mean);
}
