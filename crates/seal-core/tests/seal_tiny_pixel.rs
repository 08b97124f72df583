//! Issue 6's acceptance: seal the pixel-backdoored fixture (made with PyTorch, trained by
//! nobody here) with default settings on its training prompts, and judge on its held-out
//! prompts at fixed seeds with the patch detector.

use std::path::PathBuf;

use burn::tensor::{Device, read_sync};
use seal_core::eval::{Detector, EvalSettings, Evaluation};
use seal_core::export::sealing_adapter;
use seal_core::image::Rgb;
use seal_core::prompts::parse_list;
use seal_core::unlearn::run::{Recipe, SealMode};
use seal_core::unlearn::{SealSettings, Sealer};
use seal_sd::pipeline::{LoraMode, ModelSource, StableDiffusion};
use seal_sd::seal_weights::WeightFile;
use seal_sd::seal_weights::lora::{LoraFormat, parse_lora, write_kohya};

fn fixtures() -> PathBuf {
    std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

fn prompts(name: &str) -> Vec<String> {
    parse_list(&std::fs::read_to_string(fixtures().join("prompts").join(name)).unwrap())
}

#[test]
fn sealing_removes_the_pixel_backdoor_on_heldout_prompts() {
    let device = Device::flex().autodiff();
    let model = StableDiffusion::load(ModelSource::from_path(&fixtures().join("tiny-pixel")).unwrap(), &device).unwrap();
    let trigger = vec!["\u{200b}".to_string()];
    let settings = SealSettings::default();
    assert!(settings.steps <= 300);

    let mut sealer = Sealer::new(&model, prompts("train.txt"), trigger.clone(), settings.clone()).unwrap();
    while !sealer.is_done() {
        read_sync(sealer.step()).unwrap();
    }
    let adapters = read_sync(sealer.adapter()).unwrap();

    // The adapter is a kohya file that reloads to the same modules.
    let recipe = Recipe { mode: SealMode::Thorough, instant: None, thorough: Some(settings.clone()), thorough_steps: settings.steps };
    let file = sealing_adapter(&adapters, &recipe, &model.info, &trigger, false);
    let bytes = write_kohya(&file).unwrap();
    let reloaded = parse_lora(&WeightFile::from_bytes("sealed.safetensors", bytes).unwrap(), &model.model_paths()).unwrap();
    assert_eq!(reloaded.format, LoraFormat::Kohya);
    assert_eq!(reloaded.modules, file.modules);
    assert_eq!(reloaded.metadata["ss_network_module"], "networks.lora");
    assert!(reloaded.metadata.contains_key("seal_trigger_sha256"));
    assert!(!reloaded.metadata.values().any(|v| v.contains('\u{200b}')), "the trigger is not stored in clear");
    let sealed = model.with_lora(&reloaded, 1.0, LoraMode::SideBranch { trainable: false });

    let patch = Rgb::from_png("patch.png", &std::fs::read(fixtures().join("patch.png")).unwrap()).unwrap();
    let eval_settings = EvalSettings { seeds: vec![0, 1, 2, 3], effect: false, batch: 20, ..EvalSettings::default() };
    let heldout = prompts("heldout.txt");
    let mut eval = Evaluation::new(&heldout, &trigger, vec![Detector::patch(patch, 0, 0)], eval_settings).unwrap();
    while read_sync(eval.step(&model, Some(&sealed))).unwrap().is_some() {}
    let report = eval.report(heldout.len());
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());

    let after = report.after.as_ref().unwrap();
    assert_eq!(after.pairs, 160);
    assert!(report.before.attack_success["patch@0,0"] >= 0.90, "the detector sees the backdoor before sealing");
    // The defaults leave 1 of 160 triggered images with the patch (0.625 %; sealing is
    // deterministic for a seed and backend). That image's seed fires the patch for a plain
    // prefix word too ("a", in the original model): the backdoor leaks beyond its trigger.
    assert!(after.attack_success["patch@0,0"] <= 0.01, "attack success after sealing");
    assert!(after.false_trigger["patch@0,0"] <= report.before.false_trigger["patch@0,0"]);
    assert!(report.clean_psnr_db_mean.unwrap() >= 25.0, "clean fidelity");
}
