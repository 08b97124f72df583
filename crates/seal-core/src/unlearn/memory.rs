//! The memory a sealing step needs, estimated before any work, so that a seal that cannot fit
//! is refused with a size to try instead of taking the tab (or the GPU) down.

use seal_sd::pipeline::StableDiffusion;
use serde::Serialize;

use super::{AttnTarget, LatentSource, SealSettings};

/// Measured on the CPU backend (`seal bench --real-size`, BK-SDM-tiny shape; peak above the
/// loaded weights) with UNet adapters only: 1127 / 1056 MiB at 128 px, batch 1 / 4; 1935 / 4919
/// MiB at 256 px. The per-layer count gave 182 / 727 / 923 / 3693 MiB: the peak is about one
/// UNet weight copy (1233 MiB here) above it, and grows ~8 % faster per image than counted.
const MEASURED_SLACK: f64 = 1.1;

/// With text-encoder adapters too, the same 128-px steps peaked at 1929 / 1744 MiB: about
/// 800 MiB more at batch 1, more than one copy of the text encoder's weights (470 MiB for
/// CLIP ViT-L/14), which the tape holds beside its activations.
const TEXT_ENCODER_WEIGHT_COPIES: f64 = 1.5;

/// Bytes a sealing step needs (f32 weights and activations).
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct StepMemory {
    /// The model's weights (teacher and student share them).
    pub weights: u64,
    /// The step's peak beyond the weights: the student's taped forwards (one, two with the
    /// preservation term) and their backward, or the teacher's untaped forwards if larger.
    pub activations: u64,
    /// The largest single tensor (one device buffer).
    pub largest: u64,
    pub total: u64,
}

/// The estimate for `settings` on `model` (the resolution as `settings` resolves it).
pub fn step_memory(model: &StableDiffusion, settings: &SealSettings) -> Result<StepMemory, String> {
    model.require_whole("a thorough sealing step")?;
    let size = settings.image_size(model)?;
    let side = size / model.vae_config.downscale();
    let forward = model.unet.forward_memory(settings.batch, side, model.text_encoder.max_tokens());
    let taped = 1 + u64::from(settings.preserve_weight > 0.0);
    let unet_weights = model.info.weight_size() * model.info.unet_parameters as u64;
    // The backward holds a gradient of the largest activation beside its input and output; the
    // tape also holds about one more copy of the UNet's weights, and the per-layer count runs
    // under the measured peak (see `MEASURED_SLACK`).
    let student = (MEASURED_SLACK * (taped * forward.saved) as f64) as u64 + 3 * forward.largest + unet_weights + text_encoder_memory(model, settings);
    // Sampling trajectories runs the teacher on twice the batch (classifier-free guidance).
    let teacher = match settings.latents {
        LatentSource::Noise => forward.untaped_peak(),
        _ => model.unet.forward_memory(2 * settings.batch, side, model.text_encoder.max_tokens()).untaped_peak(),
    };
    let substitute = if settings.attn_target == AttnTarget::Substitute { forward.untaped_peak() } else { 0 };
    let weights = weight_bytes(model);
    let activations = student.max(teacher).max(substitute);
    Ok(StepMemory { weights, activations, largest: forward.largest, total: weights + activations })
}

/// What training the text encoder's adapters adds to a step: its taped encodings (two with the
/// preservation term) and the tape's copies of its weights (see `TEXT_ENCODER_WEIGHT_COPIES`).
fn text_encoder_memory(model: &StableDiffusion, settings: &SealSettings) -> u64 {
    if !settings.text_encoder {
        return 0;
    }
    let taped = 1 + u64::from(settings.preserve_weight > 0.0);
    let weights = TEXT_ENCODER_WEIGHT_COPIES * (model.info.weight_size() * model.info.text_encoder_parameters as u64) as f64;
    taped * model.text_encoder.forward_memory(settings.batch) + weights as u64
}

/// The model's weights (teacher and student share them).
pub fn weight_bytes(model: &StableDiffusion) -> u64 {
    model.info.weight_size() * (model.info.unet_parameters + model.info.text_encoder_parameters + model.info.vae_parameters) as u64
}

/// Refuses `settings` when their step needs more than `budget` bytes in all, or a tensor larger
/// than `max_buffer`, naming the largest resolution (then batch) that would fit.
pub fn check_fits(model: &StableDiffusion, settings: &SealSettings, budget: u64, max_buffer: u64) -> Result<StepMemory, String> {
    let need = step_memory(model, settings)?;
    if need.total <= budget && need.largest <= max_buffer {
        return Ok(need);
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let what = if need.total > budget {
        format!("about {:.1} GiB ({:.1} GiB of weights), more than the {:.1} GiB this engine can use", gib(need.total), gib(need.weights), gib(budget))
    } else {
        format!("a {:.0} MiB tensor, more than the device's {:.0} MiB buffer limit", need.largest as f64 / (1 << 20) as f64, max_buffer as f64 / (1 << 20) as f64)
    };
    let fits = |s: &SealSettings| step_memory(model, s).is_ok_and(|m| m.total <= budget && m.largest <= max_buffer);
    let size = settings.image_size(model)?;
    let mut hints = smaller_steps(model, settings, &fits);
    // Text-encoder adapters cost the same at any size: without them, the step itself, or else
    // a smaller one, may fit.
    const UNET_ONLY: &str = "UNet adapters only (no text-encoder adapters)";
    let unet_only = SealSettings { text_encoder: false, ..settings.clone() };
    if settings.text_encoder && fits(&unet_only) {
        hints.push(UNET_ONLY.into());
    } else if settings.text_encoder && hints.is_empty() {
        hints = smaller_steps(model, &unet_only, &fits).into_iter().map(|h| format!("{h} with {UNET_ONLY}")).collect();
    }
    let hint = match hints.as_slice() {
        [] => "even the smallest resolution and a batch of 1 do not fit here; the instant seal needs no UNet training".into(),
        [one] => format!("try {one}"),
        [first @ .., last] => format!("try {}, or {last}", first.join(", ")),
    };
    Err(format!("a sealing step at {size} px, batch {} needs {what}: {hint}", settings.batch))
}

/// Smaller steps than `settings` that `fits`: the largest batch at its resolution, the largest
/// resolution at its batch, or failing both, the largest resolution at batch 1.
fn smaller_steps(model: &StableDiffusion, settings: &SealSettings, fits: &dyn Fn(&SealSettings) -> bool) -> Vec<String> {
    let (Ok(size), step) = (settings.image_size(model), model.size_step()) else { return vec![] };
    let largest_side =
        |s: &SealSettings| (1..).map(|k| size.saturating_sub(k * step)).take_while(|&r| r >= step).find(|&r| fits(&SealSettings { resolution: Some(r), ..s.clone() }));
    let fewer = (1..settings.batch).rev().find(|&b| fits(&SealSettings { batch: b, ..settings.clone() })).map(|b| format!("a batch of {b}"));
    let smaller = largest_side(settings).map(|r| format!("a resolution of {r} px"));
    let hints: Vec<String> = [fewer, smaller].into_iter().flatten().collect();
    if !hints.is_empty() || settings.batch == 1 {
        return hints;
    }
    largest_side(&SealSettings { batch: 1, ..settings.clone() }).map(|r| vec![format!("a batch of 1 at {r} px")]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;
    use seal_sd::clip::ClipTextConfig;
    use seal_sd::tokenizer::ClipTokenizer;
    use seal_sd::unet::UNetConfig;
    use seal_sd::vae::VaeConfig;

    use super::*;

    /// SD 1.5's architecture with lazy (never allocated) random weights.
    fn sd15() -> StableDiffusion {
        let text = std::fs::read_to_string(crate::fixtures().join("layouts/unet_sd15.json")).unwrap();
        let layout: serde_json::Value = serde_json::from_str(&text).unwrap();
        let unet = UNetConfig::from_json(&layout["config"].to_string()).unwrap();
        StableDiffusion::random(&unet, &ClipTextConfig::vit_l14(), &VaeConfig::sd(), ClipTokenizer::openai_clip().unwrap(), &Device::flex())
    }

    #[test]
    fn the_estimate_scales_with_batch_and_pixels_and_refuses_with_a_size_to_try() {
        let model = sd15();
        assert_eq!(SealSettings::default().image_size(&model), Ok(256), "a 512-px model seals at 256 px by default");
        let at = |batch, side| step_memory(&model, &SealSettings { batch, resolution: Some(side), ..SealSettings::default() }).unwrap();
        let (small, batch4, side2x) = (at(1, 256), at(4, 256), at(1, 512));
        assert_eq!(small.weights, 4 * 1_066_235_307);
        // Beyond the tape's copies of the weights, activations grow with images and pixels.
        let copies = 4 * model.info.unet_parameters as u64 + (TEXT_ENCODER_WEIGHT_COPIES * (4 * model.info.text_encoder_parameters) as f64) as u64;
        let per = |m: StepMemory| m.activations - copies;
        assert!(per(batch4) > 3 * per(small) && per(side2x) > 4 * per(small), "{small:?} {batch4:?} {side2x:?}");
        // Self-attention is taken in chunks: no tensor of a 512-px step passes 335 MiB (the
        // feed-forward's 8x projection at batch 8), though its scores would be 4 GiB whole.
        assert!(at(8, 512).largest <= 8 * 4096 * 2560 * 4);

        let gib = 1u64 << 30;
        let settings = SealSettings { batch: 8, resolution: Some(512), ..SealSettings::default() };
        // 512 px at batch 8 with 24 GiB: each hint given (a batch, a resolution) fits.
        let budget = small.weights + 20 * gib;
        let err = check_fits(&model, &settings, budget, u64::MAX).unwrap_err();
        assert!(err.starts_with("a sealing step at 512 px, batch 8 needs about") && err.contains(": try "), "{err}");
        let number = |after: &str| err.split(after).nth(1).map(|t| t.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<usize>().unwrap());
        let (batch, side) = (number("batch of "), number("resolution of "));
        assert!(batch.is_some() && side.is_some(), "{err}");
        assert!(check_fits(&model, &SealSettings { batch: batch.unwrap(), ..settings.clone() }, budget, u64::MAX).is_ok(), "{err}");
        assert!(check_fits(&model, &SealSettings { resolution: side, ..settings.clone() }, budget, u64::MAX).is_ok(), "{err}");
        let err = check_fits(&model, &settings, u64::MAX, 128 << 20).unwrap_err();
        assert!(err.contains("buffer limit"), "{err}");
        let err = check_fits(&model, &settings, small.weights, u64::MAX).unwrap_err();
        assert!(err.contains("instant seal"), "{err}");
        // Training the text encoder's adapters costs its encodings and the tape's weight copies.
        let unet_only = step_memory(&model, &SealSettings { text_encoder: false, resolution: Some(256), batch: 1, ..SealSettings::default() }).unwrap();
        let extra = small.activations - unet_only.activations;
        assert!(extra > 4 * model.info.text_encoder_parameters as u64 && extra < 8 * model.info.text_encoder_parameters as u64, "{extra}");
        let at_256 = SealSettings { resolution: Some(256), batch: 1, ..SealSettings::default() };
        let err = check_fits(&model, &at_256, unet_only.total, u64::MAX).unwrap_err();
        assert!(err.ends_with("or UNet adapters only (no text-encoder adapters)"), "{err}");
        // Where no smaller step fits with them, a smaller one without them is named.
        let tight = step_memory(&model, &SealSettings { text_encoder: false, resolution: Some(128), batch: 1, ..SealSettings::default() }).unwrap().total;
        let err = check_fits(&model, &settings, tight, u64::MAX).unwrap_err();
        assert!(err.ends_with("try a batch of 1 at 128 px with UNet adapters only (no text-encoder adapters)"), "{err}");
    }
}
