//! The session's invalidation rules, natively, on the tiny fixtures.

use burn::prelude::Device;
use burn::tensor::read_sync;
use seal_sd::pipeline::ModelSource;
use seal_sd::seal_weights::WeightFile;

use super::*;
use crate::fixtures;

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
        thorough += usize::from(progress.task != crate::progress::Task::Instant);
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
