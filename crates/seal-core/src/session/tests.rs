//! The session's invalidation rules, natively, on the tiny fixtures.

use burn::prelude::Device;
use burn::tensor::read_sync;
use seal_sd::pipeline::{ModelSource, Precision};
use seal_sd::seal_weights::WeightFile;

use super::*;
use crate::fixtures;
use crate::linalg::Mat;

fn session_with(model: &str) -> Session {
    let mut s = Session::new(&Device::flex(), EngineLimits::default());
    s.load_model(ModelSource::from_path(&fixtures().join(model)).unwrap()).unwrap();
    s
}

/// A short instant-then-thorough request on two prompts.
fn request(steps: usize) -> SealRequest {
    SealRequest {
        triggers: vec!["\u{200b}".into()],
        prompts: vec!["a red circle".into(), "a blue square".into()],
        mode: SealMode::Both,
        settings: SealSettings { steps, batch: 2, ..SealSettings::default() },
        ..SealRequest::default()
    }
}

fn seal(s: &mut Session, steps: usize) -> SealDone {
    s.start_seal(request(steps)).unwrap();
    while read_sync(s.seal_step()).unwrap().is_some() {}
    read_sync(s.finish_seal()).unwrap()
}

fn weak_lora() -> WeightFile {
    WeightFile::open(&fixtures().join("lora/weak_lora_kohya.safetensors")).unwrap()
}

/// The first element of the teacher's first UNet cross-attention key weight.
fn teacher_weight(s: &Session) -> f32 {
    let unet = &s.teacher().unwrap().unet;
    unet.down_blocks.iter().find_map(|b| b.attentions.first()).unwrap().transformer_blocks[0].attn2.to_k.weight.val().into_data().try_to_vec::<f32>().unwrap()[0]
}

#[test]
fn a_new_model_drops_the_seal_and_the_lora() {
    let mut s = session_with("tiny-pixel");
    s.load_lora(&weak_lora(), 1.0).unwrap();
    seal(&mut s, 1);
    assert!(s.adapter_file().is_ok() && s.sealed_lora_file().is_ok());
    s.load_model(ModelSource::from_path(&fixtures().join("tiny-clean")).unwrap()).unwrap();
    assert!(s.user_lora().is_none());
    assert_eq!(s.adapter_file().unwrap_err().to_string(), "seal first");
    assert!(matches!(s.report(), Err(Error::Order(_))));
}

#[test]
fn a_new_lora_weight_re_merges_the_teacher_and_drops_the_seal() {
    let mut s = session_with("tiny-pixel");
    let bare = teacher_weight(&s);
    let summary = s.load_lora(&weak_lora(), 1.0).unwrap();
    assert_eq!((summary.format.as_str(), summary.modules), ("Kohya", summary.unet_modules + summary.text_encoder_modules));
    let at_one = teacher_weight(&s);
    seal(&mut s, 1);
    s.set_lora_weight(2.0).unwrap();
    let at_two = teacher_weight(&s);
    // to_k is in the weak LoRA: the teacher moves twice as far from the bare model.
    assert!((at_one - bare).abs() > 1e-6, "the LoRA changed nothing");
    assert!(((at_two - bare) - 2.0 * (at_one - bare)).abs() < 1e-5, "{bare} {at_one} {at_two}");
    assert_eq!(s.user_lora().unwrap().1, 2.0);
    assert!(s.adapter_file().is_err(), "the seal over weight 1 must be dropped");
    assert!(s.set_lora_weight(0.0).unwrap_err().to_string().contains("non-zero"));
    s.clear_lora();
    assert_eq!(teacher_weight(&s), bare);
    assert!(s.sealed_lora_file().is_err());
}

#[test]
fn cancel_keeps_the_last_finished_step_and_the_report_says_so() {
    let mut s = session_with("tiny-pixel");
    s.start_seal(request(50)).unwrap();
    // Through the instant edit's steps and two thorough ones; then the user cancels.
    let mut thorough = 0;
    while thorough < 2 {
        let progress = read_sync(s.seal_step()).unwrap().expect("the run is not over");
        thorough += usize::from(progress.task == crate::progress::Task::Seal);
    }
    let done = read_sync(s.finish_seal()).unwrap();
    assert_eq!((done.mode, done.thorough_steps), (SealMode::Both, 2));
    let report = s.report().unwrap();
    assert_eq!(report.sealing.thorough_steps_done, 2);
    assert_eq!(report.sealing.losses.len(), 2);
    assert_eq!(report.trigger_sha256, vec![crate::export::trigger_hash("\u{200b}")]);
    assert_eq!(report.sealing.adapter_modules.len(), done.modules);
    let adapter = WeightFile::from_bytes("adapter", s.adapter_file().unwrap()).unwrap();
    assert!(adapter.keys().count() > 0);
    assert!(matches!(read_sync(s.seal_step()), Err(Error::Order(_))), "the run is over");
}

#[test]
fn requests_out_of_order_say_what_comes_first() {
    let mut s = Session::new(&Device::flex(), EngineLimits::default());
    assert_eq!(s.load_lora(&weak_lora(), 1.0).unwrap_err().to_string(), "load a model before a LoRA");
    assert!(s.start_seal(request(1)).unwrap_err().to_string().contains("load a model"));
    let s = session_with("tiny-clean");
    assert!(s.sealed_lora_file().is_err());
    assert_eq!(s.describe_trigger("\u{200b}").code_points, "U+200B");
}

#[test]
fn a_step_too_big_for_the_engine_is_refused_before_the_run() {
    let mut s = Session::new(&Device::flex(), EngineLimits { free: Some(|| 1 << 20), ..EngineLimits::default() });
    s.load_model(ModelSource::from_path(&fixtures().join("tiny-clean")).unwrap()).unwrap();
    let plan = s.step_memory(&request(1).settings).unwrap();
    assert!(!plan.fits && plan.budget.is_some());
    let refused = s.start_seal(request(1)).unwrap_err().to_string();
    assert_eq!(Some(refused), plan.error);
    // The instant seal needs no step: it still runs.
    s.start_seal(SealRequest { mode: SealMode::Instant, ..request(1) }).unwrap();
}

#[test]
fn a_model_over_the_weight_budget_loads_for_the_instant_seal_alone_and_seals_the_same() {
    let whole_info = session_with("tiny-pixel").model().unwrap().info.clone();
    let whole_bytes = 4 * (whole_info.unet_parameters + whole_info.text_encoder_parameters + whole_info.vae_parameters) as u64;
    let load = |budget: u64| {
        let mut s = Session::new(&Device::flex(), EngineLimits { weights: Some((budget, "try WebGPU")), ..EngineLimits::default() });
        s.load_model(ModelSource::from_path(&fixtures().join("tiny-pixel")).unwrap()).map(|_| s)
    };
    // Even the text encoder alone is over this budget: refused, as before.
    let refused = load(4 * whole_info.text_encoder_parameters as u64).err().unwrap().to_string();
    assert!(refused.contains("more than the") && refused.contains("try WebGPU"), "{refused}");

    let mut whole = session_with("tiny-pixel");
    let mut part = load(whole_bytes - 1).unwrap();
    let why = part.model().unwrap().info.partial.clone().expect("loaded in part");
    assert!(why.contains("cross-attention keys and values") && why.contains("try WebGPU"), "{why}");
    // The same part, asked for (the CLI's `seal --mode instant`), whatever the budget.
    let mut asked = Session::new(&Device::flex(), EngineLimits::default());
    asked.load_model_for_instant_seal(ModelSource::from_path(&fixtures().join("tiny-pixel")).unwrap()).unwrap();
    assert!(asked.model().unwrap().info.partial.as_ref().is_some_and(|why| why.contains("cross-attention keys and values") && !why.contains("WebGPU")));
    // Nothing but the text encoder and the K/V weights was read or allocated.
    assert!(!part.model().unwrap().unet.conv_in.weight.is_initialized());
    assert!(!part.model().unwrap().inference().unet.conv_in.weight.is_initialized(), "the inference view must not fill what was not loaded");
    // The user's LoRA joins the layers the part holds (its other layers stay unread).
    for s in [&mut whole, &mut part, &mut asked] {
        s.load_lora(&weak_lora(), 1.0).unwrap();
    }
    assert_eq!(teacher_weight(&part), teacher_weight(&whole));
    assert_eq!(teacher_weight(&asked), teacher_weight(&whole));
    assert!(!part.teacher().unwrap().unet.conv_in.weight.is_initialized());

    let instant = SealRequest { mode: SealMode::Instant, ..request(1) };
    let mut adapters = vec![];
    for s in [&mut whole, &mut part, &mut asked] {
        s.start_seal(instant.clone()).unwrap();
        while read_sync(s.seal_step()).unwrap().is_some() {}
        read_sync(s.finish_seal()).unwrap();
        adapters.push(WeightFile::from_bytes("adapter", s.adapter_file().unwrap()).unwrap());
        assert!(s.sealed_lora_file().is_ok());
    }
    let keys: Vec<&str> = adapters[0].keys().collect();
    assert!(!keys.is_empty());
    for other in &adapters[1..] {
        assert_eq!(keys, other.keys().collect::<Vec<_>>());
        for key in keys.iter().filter(|k| !k.ends_with(".alpha")) {
            let [a, b] = [&adapters[0], other].map(|f| f.load_f32(key).unwrap().data);
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + x.abs())), "{key}");
        }
    }

    // What needs the UNet or the VAE is refused, saying why.
    let needs = |e: String, what: &str| assert!(e.starts_with(&format!("{what} needs the whole model, but only the text encoder")), "{e}");
    needs(part.start_seal(request(1)).unwrap_err().to_string(), "a thorough sealing step");
    needs(part.step_memory(&SealSettings::default()).unwrap_err().to_string(), "a thorough sealing step");
    let eval = EvalRequest { prompts: vec!["a red circle".into()], seeds: 1, steps: 2, effect: false, gray: true, patch_at: None };
    part.start_seal(instant).unwrap();
    while read_sync(part.seal_step()).unwrap().is_some() {}
    read_sync(part.finish_seal()).unwrap();
    part.start_eval(eval).unwrap();
    needs(read_sync(part.eval_step()).unwrap_err().to_string(), "the comparison");
    needs(read_sync(part.heatmaps("a red circle", 2)).unwrap_err().to_string(), "the trigger's attention maps");
    needs(part.start_scan(&["a red circle".into(), "a blue square".into()], crate::scan::ScanSettings::default()).unwrap_err().to_string(), "the trigger scan");
    assert!(!part.teacher().unwrap().unet.conv_in.weight.is_initialized(), "a refusal must come before any UNet work");
}

/// A model kept in f16 (computing in f16) seals as in f32, within f16's rounding: the same
/// instant edit, and thorough steps whose adapter stays close.
#[test]
fn weights_in_f16_seal_as_in_f32() {
    let mut adapters = vec![];
    for precision in [Precision::F32, Precision::F16] {
        let mut s = Session::new(&Device::flex(), EngineLimits { precision, ..EngineLimits::default() });
        let loaded = s.load_model(ModelSource::from_path(&fixtures().join("tiny-pixel")).unwrap()).unwrap();
        assert_eq!(loaded.info.half, precision == Precision::F16);
        s.load_lora(&weak_lora(), 1.0).unwrap();
        for mode in [SealMode::Instant, SealMode::Thorough] {
            s.start_seal(SealRequest { mode, ..request(2) }).unwrap();
            while read_sync(s.seal_step()).unwrap().is_some() {}
            read_sync(s.finish_seal()).unwrap();
            adapters.push(WeightFile::from_bytes("adapter", s.adapter_file().unwrap()).unwrap());
        }
    }
    // (instant, thorough) in f32, then in f16.
    for (mode, f32, f16) in [("instant", &adapters[0], &adapters[2]), ("2 thorough steps", &adapters[1], &adapters[3])] {
        assert_eq!(f32.keys().collect::<Vec<_>>(), f16.keys().collect::<Vec<_>>());
        // Factors are one of many factorisations of an update: compare the updates (up @ down).
        let (mut diff, mut norm) = (0f64, 0f64);
        for up in f32.keys().filter(|k| k.ends_with(".lora_up.weight")) {
            let down = up.replace(".lora_up.", ".lora_down.");
            let [a, b] = [f32, f16].map(|f| update(&f.load_f32(up).unwrap(), &f.load_f32(&down).unwrap()));
            diff += a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
            norm += a.iter().map(|x| x.powi(2)).sum::<f64>();
        }
        let rel = (diff / norm).sqrt();
        eprintln!("{mode}: adapter f16 vs f32, relative L2 difference {rel:.2e}");
        assert!(rel < 0.02, "{mode}: {rel}");
    }
}

/// `up @ down` of a linear layer's LoRA factors (`[out, r]`, `[r, in]`), row-major.
fn update(up: &seal_sd::seal_weights::Tensor32, down: &seal_sd::seal_weights::Tensor32) -> Vec<f64> {
    let (out, r) = (up.shape[0], up.shape[1]);
    Mat::from_f32(out, r, &up.data).matmul(&Mat::from_f32(r, down.data.len() / r, &down.data)).data
}
