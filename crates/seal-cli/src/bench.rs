//! `seal bench`: wall time of UNet forwards and whole generations on the CPU backend, and the
//! process's peak memory, written as JSON. Sizes: the tiny fixture, and a BK-SDM-tiny-shaped
//! model with random weights at 256x256 (the realistic browser target); and sealing steps on
//! both.

use std::path::PathBuf;
use std::time::Instant;

use burn::prelude::Device;
use burn::tensor::Tensor;
use burn::tensor::read_sync;
use seal_core::prompts::{BUILT_IN, parse_list, split};
use seal_core::unlearn::instant::{InstantSeal, InstantSettings};
use seal_core::unlearn::memory::step_memory;
use seal_core::unlearn::{SealSettings, Sealer};
use seal_sd::clip::ClipTextConfig;
use seal_sd::clip::ClipTextModel;
use seal_sd::load::{half_weights, parameter_values};
use seal_sd::pipeline::{GenerateRequest, StableDiffusion};
use seal_sd::rng::SeededRng;
use seal_sd::tokenizer::ClipTokenizer;
use seal_sd::unet::UNetConfig;
use seal_sd::vae::VaeConfig;
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct Args {
    /// The fixtures folder (../shared/fixtures).
    #[arg(long, default_value = "../shared/fixtures")]
    fixtures: PathBuf,
    #[arg(long, default_value = "bench-results/bench.json")]
    out: PathBuf,
    /// Timed repetitions of each UNet forward.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Only the trigger scans (writes `{"scan": [...]}`).
    #[arg(long)]
    scan_only: bool,
    /// Only sealing steps of real architectures (random weights) at batch 1/4/8 and 128/256 px:
    /// time, measured peak memory and the estimate the seal is checked against
    /// (bench-results/real-size.json). The UNet layouts to run, comma-separated.
    #[arg(long, value_delimiter = ',')]
    real_size: Vec<String>,
    /// With --real-size: the batches and sides to run.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 8])]
    batches: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_values_t = [128, 256])]
    sides: Vec<usize>,
    /// With --real-size: record the steps with Burn's balanced gradient checkpointing
    /// (memory-bound ops recomputed in the backward pass instead of kept).
    #[arg(long)]
    checkpointing: bool,
    /// With --real-size: the weights' precision (f16: matrices and kernels in f16, computing in
    /// f16, as on a GPU with shader-f16).
    #[arg(long, value_enum, default_value_t = crate::seal::Weights::F32)]
    weights: crate::seal::Weights,
    /// (Internal) one --real-size configuration in this process, as JSON on stdout.
    #[arg(long, hide = true)]
    one_step: bool,
}

/// Peak resident memory of this process so far (Linux VmHWM), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resident memory now (Linux VmRSS), in bytes, after resetting the peak (VmHWM) to it.
fn reset_peak_rss() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb << 10)
}

/// Forces pending work to finish (the CPU backend may be lazy) by reading one value back.
fn sync(t: Tensor<4>) {
    let _ = t.sum().into_data();
}

/// Mean seconds of a batch-2 UNet forward (classifier-free guidance's batch) at `latent` side.
fn unet_forward_s(sd: &StableDiffusion, latent: usize, repeats: usize) -> (f64, f64) {
    let device = &sd.device;
    let c = sd.unet_config.in_channels;
    let x = Tensor::<4>::zeros([2, c, latent, latent], device);
    let ctx = sd.encode_prompts(&["a photo", ""]).expect("tokenizer encodes plain text");
    let t = Tensor::<1>::from_floats([500.0, 500.0], device);
    let start = Instant::now();
    sync(sd.unet.forward(x.clone(), t.clone(), &ctx, false).sample);
    let first = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..repeats {
        sync(sd.unet.forward(x.clone(), t.clone(), &ctx, false).sample);
    }
    (first, start.elapsed().as_secs_f64() / repeats as f64)
}

fn generation_s(sd: &StableDiffusion, size: usize, steps: usize) -> f64 {
    let request = GenerateRequest {
        prompts: vec!["a red circle on a white background".into()],
        negative: String::new(),
        seeds: vec![0],
        steps,
        guidance: 5.0,
        sampler: None,
        size: Some(size),
    };
    let start = Instant::now();
    sync(sd.generate(&request, |_, _| {}).expect("generation"));
    start.elapsed().as_secs_f64()
}

fn measure(name: &str, sd: &StableDiffusion, size: usize, load_s: f64, repeats: usize) -> Value {
    let latent = size / sd.vae_config.downscale();
    eprintln!("bench: {name}: UNet forward at {latent}x{latent} latents");
    let (first, forward) = unet_forward_s(sd, latent, repeats);
    eprintln!("bench: {name}: 25-step generation at {size}x{size}");
    let generation = generation_s(sd, size, 25);
    json!({
        "model": name,
        "architecture": sd.info.architecture,
        "unet_parameters": sd.info.unet_parameters,
        "image_size": size,
        "load_s": load_s,
        "unet_forward_batch2_first_s": first,
        "unet_forward_batch2_s": forward,
        "generation_25_steps_cfg_s": generation,
        "peak_rss_mib_after": peak_rss_mib(),
    })
}

/// Seconds per sealing step of `model` (on an autodiff device), measured over `steps` steps
/// after one warm-up step, and the projected time of a whole seal with these settings.
fn sealing(name: &str, model: &StableDiffusion, prompts: Vec<String>, trigger: &str, settings: SealSettings, steps: usize) -> Result<Value, String> {
    let mut sealer = Sealer::new(model, prompts, vec![trigger.into()], settings.clone())?;
    eprintln!("bench: {name}: sealing steps");
    let start = Instant::now();
    burn::tensor::read_sync(sealer.train_step())?;
    let first = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..steps {
        burn::tensor::read_sync(sealer.train_step())?;
    }
    let later = start.elapsed().as_secs_f64();
    let mut row = json!({ "model": name, "settings": settings, "peak_rss_mib_after": peak_rss_mib() });
    extend(&mut row, seal_time(&sealer, first, later, steps));
    Ok(row)
}

/// A whole seal's time from its first step and `n` later ones (`later` seconds). On
/// trajectory latents the first step also samples the pool's first trajectories, and every
/// refill of the pool samples again: the sealer times its samplings, and a step's own time is
/// what the later steps took besides theirs.
fn seal_time(sealer: &Sealer, first: f64, later: f64, n: usize) -> Value {
    let refills = sealer.pool_refills();
    let (sampled_s, samplings) = sealer.sampling();
    let sampling = sampled_s / samplings.max(1) as f64;
    let step = (later - samplings.saturating_sub(1) as f64 * sampling) / n as f64;
    let projected = first + step * (sealer.settings().steps - 1) as f64 + refills.saturating_sub(1) as f64 * sampling;
    json!({
        "first_step_s": first,
        "step_s": step,
        "pool_refills": refills,
        "sampling_s": sampling,
        "projected_seal_s": projected,
        "sampling_share": refills as f64 * sampling / projected,
    })
}

/// `extra`'s fields added to the object `row`.
fn extend(row: &mut Value, extra: Value) {
    if let (Some(row), Value::Object(extra)) = (row.as_object_mut(), extra) {
        row.extend(extra);
    }
}

/// Runs an instant seal to the end and reports its summary (timings included).
fn instant_run(name: &str, seal: &mut InstantSeal) -> Result<Value, String> {
    eprintln!("bench: {name}: instant seal");
    let start = Instant::now();
    while burn::tensor::read_sync(seal.step())?.is_some() {}
    let summary = seal.summary();
    Ok(json!({
        "model": name,
        "wall_s": start.elapsed().as_secs_f64(),
        "prompts": summary.prompts,
        "encode_s": summary.encode_s,
        "solve_s": summary.solve_s,
        "factor_s": summary.factor_s,
        "layers": summary.layers.len(),
        "ranks": summary.layers.values().map(|f| f.rank).max(),
        "max_relative_error": summary.max_relative_error,
        "edit_rows": summary.edit_rows,
        "keep_rows": summary.keep_rows,
        "peak_rss_mib_after": peak_rss_mib(),
    }))
}

/// The instant seal of the pixel fixture with the defaults, on its 80 training prompts.
fn instant_tiny(fixtures: &std::path::Path, prompts: &[String]) -> Result<Value, String> {
    let model = crate::load_model(&fixtures.join("tiny-pixel"), None, &Device::flex())?;
    instant_run("tiny-pixel fixture", &mut InstantSeal::new(&model, prompts, &["\u{200b}".into()], InstantSettings::default())?)
}

/// The instant seal of an SD 1.5-shaped model: CLIP ViT-L/14's text encoder and the UNet's 32
/// attn2 to_k/to_v weights (shapes from the layout), random weights, the first `n` of the
/// built-in training prompts (90: what the page seals with by default).
fn instant_sd15(fixtures: &std::path::Path, n: usize) -> Result<Value, String> {
    let device = Device::flex();
    let layout = std::fs::read_to_string(fixtures.join("layouts/unet_sd15.json")).map_err(|e| e.to_string())?;
    let layout: Value = serde_json::from_str(&layout).map_err(|e| e.to_string())?;
    let mut rng = SeededRng::new(15);
    let mut weights = std::collections::BTreeMap::new();
    for (name, shape) in layout["tensors"].as_object().ok_or("layout without tensors")? {
        let Some(layer) = name.strip_suffix(".weight").filter(|l| l.ends_with("attn2.to_k") || l.ends_with("attn2.to_v")) else { continue };
        let [out, d] = [shape[0].as_u64().unwrap_or(0) as usize, shape[1].as_u64().unwrap_or(0) as usize];
        let data: Vec<f32> = rng.normals(out * d).into_iter().map(|x| x / (d as f32).sqrt()).collect();
        weights.insert(layer.to_string(), Tensor::<2>::from_data(burn::tensor::TensorData::new(data, [out, d]), &device));
    }
    let text_encoder = ClipTextModel::new(&ClipTextConfig::vit_l14(), &device);
    let tokenizer = ClipTokenizer::openai_clip().map_err(|e| e.to_string())?;
    let (mut prompts, _) = split(&parse_list(BUILT_IN), 4);
    prompts.truncate(n);
    let mut seal = InstantSeal::from_parts(tokenizer, text_encoder, weights, &device, &prompts, &["cf".into()], InstantSettings::default())?;
    instant_run(&format!("SD 1.5 shape (CLIP ViT-L/14, 32 attn2 to_k/to_v), random weights, {} prompts", prompts.len()), &mut seal)
}

/// One scan of the fixtures: time, what was flagged, where U+200B ranks.
fn scan_run(name: &str, suspect: &StableDiffusion, base: Option<&StableDiffusion>, prompts: &[String]) -> Result<Value, String> {
    use seal_core::scan::{Scan, ScanSettings};
    eprintln!("bench: scan {name}");
    let mut scan = Scan::new(suspect, base, prompts, vec![], ScanSettings::default())?;
    while burn::tensor::read_sync(scan.step())?.is_some() {}
    let report = scan.report(usize::MAX);
    let flagged: Vec<&str> = report.candidates.iter().filter(|c| c.verification.as_ref().is_some_and(|v| v.flagged)).map(|c| c.code_points.as_str()).collect();
    let ratios: Vec<f64> = report.candidates.iter().filter_map(|c| c.verification.as_ref().map(|v| v.ratio)).collect();
    Ok(json!({
        "name": name,
        "mode": report.mode,
        "seconds": report.seconds,
        "vocabulary": report.vocabulary,
        "flagged": flagged,
        "rank_of_u200b": report.candidates.iter().position(|c| c.text == "\u{200b}").map(|i| i + 1),
        "verification_ratios": ratios,
        "flag_ratio": seal_core::scan::FLAG_RATIO,
    }))
}

/// The scan on every fixture: tiny-pixel against tiny-clean and alone, tiny-clean alone, the
/// weak LoRA and a clean random LoRA (rank 4 on every attention projection) over tiny-clean.
fn scans(fixtures: &std::path::Path, prompts: &[String]) -> Result<Vec<Value>, String> {
    use seal_sd::pipeline::LoraMode;
    let device = Device::flex();
    let pixel = crate::load_model(&fixtures.join("tiny-pixel"), None, &device)?;
    let clean = crate::load_model(&fixtures.join("tiny-clean"), None, &device)?;
    let weak = crate::seal::read_lora(&fixtures.join("lora/weak_lora_kohya.safetensors"), &clean)?;
    let random = random_lora(&clean.unet, 4, 11);
    Ok(vec![
        scan_run("tiny-pixel against tiny-clean", &pixel, Some(&clean), prompts)?,
        scan_run("tiny-pixel alone", &pixel, None, prompts)?,
        scan_run("tiny-clean alone (no backdoor)", &clean, None, prompts)?,
        scan_run("weak kohya LoRA over tiny-clean (faint U+200B backdoor)", &clean.with_lora(&weak, 1.0, LoraMode::Merge), Some(&clean), prompts)?,
        scan_run("clean random LoRA over tiny-clean (no backdoor)", &clean.with_lora(&random, 1.0, LoraMode::Merge), Some(&clean), prompts)?,
    ])
}

/// A random LoRA (`up` ~ N(0, 0.05²)) of `rank` on every cross- and self-attention projection.
fn random_lora(unet: &seal_sd::unet::UNet2DConditionModel, rank: usize, seed: u64) -> seal_sd::seal_weights::lora::LoraFile {
    use seal_sd::lora::{Projection, cross_attention_targets, fresh_adapters};
    use seal_sd::seal_weights::lora::{LoraComponent, LoraFile, LoraFormat, LoraTarget, kohya_metadata};
    let targets = cross_attention_targets(unet, &[Projection::ToQ, Projection::ToK, Projection::ToV, Projection::ToOut]);
    let mut modules = fresh_adapters(unet, &targets, rank, rank as f32, seed);
    let mut rng = SeededRng::new(seed + 1);
    modules.values_mut().for_each(|m| m.up.data = rng.normals(m.up.data.len()).into_iter().map(|x| x * 0.05).collect());
    LoraFile {
        format: LoraFormat::Kohya,
        modules: modules.into_iter().map(|(k, m)| (LoraTarget::new(LoraComponent::Unet, k), m)).collect(),
        metadata: kohya_metadata(rank, rank as f32),
        dtype: seal_sd::seal_weights::DType::F32,
    }
}

/// The scan's first stage on an SD 1.5-shaped model (random weights) under a random rank-16
/// LoRA: the whole CLIP vocabulary in the coarse mode, measured; with probe prompts, the first
/// vocabulary batches measured and the rest projected. No verification: its images at 512 px
/// take minutes each on this CPU (see the generation numbers), so it is left to WebGPU.
fn scan_sd15(fixtures: &std::path::Path, prompts: &[String]) -> Result<Vec<Value>, String> {
    use seal_core::scan::{Scan, ScanSettings};
    use seal_sd::pipeline::LoraMode;
    let layout = std::fs::read_to_string(fixtures.join("layouts/unet_sd15.json")).map_err(|e| e.to_string())?;
    let layout: Value = serde_json::from_str(&layout).map_err(|e| e.to_string())?;
    let unet = UNetConfig::from_json(&layout["config"].to_string()).map_err(|e| e.to_string())?;
    let tokenizer = ClipTokenizer::openai_clip().map_err(|e| e.to_string())?;
    let base = StableDiffusion::random(&unet, &ClipTextConfig::vit_l14(), &VaeConfig::sd(), tokenizer, &Device::flex());
    let suspect = base.with_lora(&random_lora(&base.unet, 16, 21), 1.0, LoraMode::Merge);
    let mut out = vec![];
    for (mode, probes, measured_batches) in [("coarse", 0, usize::MAX), ("probes", 3, 2)] {
        eprintln!("bench: SD 1.5-shaped scan, {mode}");
        let settings = ScanSettings { probes, verify: 0, images: 0, ..ScanSettings::default() };
        let batch = settings.batch;
        let mut scan = Scan::new(&suspect, Some(&base), prompts, vec![], settings)?;
        let vocabulary = scan.report(0).vocabulary;
        let batches = vocabulary.div_ceil(batch);
        let start = Instant::now();
        let mut vocabulary_s = None;
        let mut step = 0;
        while burn::tensor::read_sync(scan.step())?.is_some() {
            step += 1;
            // Step 1 reads the probe prompts; steps 2..=1 + batches rank the vocabulary.
            if step == 1 + batches.min(measured_batches) {
                vocabulary_s = Some(start.elapsed().as_secs_f64());
                if measured_batches < batches {
                    break;
                }
            }
        }
        let measured = vocabulary_s.ok_or("the scan ended before ranking its vocabulary")?;
        let projected = measured * batches as f64 / batches.min(measured_batches) as f64;
        out.push(json!({
            "name": format!("SD 1.5 shape, random weights + random rank-16 LoRA, {mode}"),
            "vocabulary": vocabulary,
            "vocabulary_seconds": projected,
            "measured": measured_batches >= batches,
            "whole_scan_seconds_without_verification": (measured_batches >= batches).then(|| start.elapsed().as_secs_f64()),
        }));
    }
    Ok(out)
}

/// Sealing steps of real architectures: per layout, side and batch, run in a fresh process of
/// its own (an allocator keeps what an earlier run freed, so peaks in one process would hide
/// each other), the seconds of a first and a second step, the peak memory above the process's
/// start, and `step_memory`'s estimate of it.
fn real_size(args: &Args) -> Result<Value, String> {
    let mut rows = vec![];
    for name in &args.real_size {
        for &side in &args.sides {
            for &batch in &args.batches {
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                let out = std::process::Command::new(exe)
                    .args(["bench", "--one-step", "--fixtures"])
                    .arg(&args.fixtures)
                    .args(["--real-size", name, "--batches", &batch.to_string(), "--sides", &side.to_string()])
                    .args(args.checkpointing.then_some("--checkpointing"))
                    .args(matches!(args.weights, crate::seal::Weights::F16).then_some("--weights=f16"))
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| e.to_string())?;
                if !out.status.success() {
                    return Err(format!("{name} {side} px batch {batch}: the measuring process failed ({})", out.status));
                }
                rows.push(serde_json::from_slice::<Value>(&out.stdout).map_err(|e| format!("{name} {side} px batch {batch}: {e}"))?);
            }
        }
    }
    Ok(json!({ "backend": "flex (CPU)", "threads": std::thread::available_parallelism().map(|n| n.get()).ok(), "sealing_steps": rows }))
}

/// One sealing configuration in this process (see `real_size`), as a JSON row on stdout.
fn one_step(args: &Args) -> Result<(), String> {
    let (Some(name), Some(&side), Some(&batch)) = (args.real_size.first(), args.sides.first(), args.batches.first()) else {
        return Err("--one-step needs --real-size, --sides and --batches".into());
    };
    let device = if args.checkpointing { Device::flex().autodiff().gradient_checkpointing() } else { Device::flex().autodiff() };
    let prompts = crate::read_prompts(Some(&args.fixtures.join("prompts/train.txt")))?;
    let path = args.fixtures.join(format!("layouts/unet_{name}.json"));
    let layout: Value = serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?).map_err(|e| e.to_string())?;
    let unet = UNetConfig::from_json(&layout["config"].to_string()).map_err(|e| e.to_string())?;
    let tokenizer = ClipTokenizer::openai_clip().map_err(|e| e.to_string())?;
    let mut model = StableDiffusion::random(&unet, &ClipTextConfig::vit_l14(), &VaeConfig::sd(), tokenizer, &device);
    // Random weights are made on first use: make them now, so the peak is the step's (the
    // VAE's too: the inference view that samples trajectory latents would make them).
    let _ = read_sync(parameter_values(&model.unet))?;
    let _ = read_sync(parameter_values(&model.text_encoder))?;
    let _ = read_sync(parameter_values(&model.vae))?;
    if matches!(args.weights, crate::seal::Weights::F16) {
        model.unet = half_weights(model.unet);
        model.text_encoder = half_weights(model.text_encoder);
        model.vae = half_weights(model.vae);
        model.info.half = true;
    }
    let settings = SealSettings { batch, resolution: Some(side), ..SealSettings::default() };
    let estimate = step_memory(&model, &settings)?;
    let mut sealer = Sealer::new(&model, prompts, vec!["cf".into()], settings.clone())?;
    let base = reset_peak_rss();
    let start = Instant::now();
    burn::tensor::read_sync(sealer.train_step())?;
    let first = start.elapsed().as_secs_f64();
    let start = Instant::now();
    burn::tensor::read_sync(sealer.train_step())?;
    let step_s = start.elapsed().as_secs_f64();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let measured = base.zip(peak_rss_mib()).map(|(b, p)| p - mib(b));
    eprintln!(
        "bench: {name} {side} px batch {batch}: {step_s:.1} s/step, peak +{:.0} MiB above the weights (estimate {:.0} MiB)",
        measured.unwrap_or(f64::NAN),
        mib(estimate.activations)
    );
    let mut row = json!({
        "unet": name,
        "side": side,
        "batch": batch,
        "checkpointing": args.checkpointing,
        "weights": if model.info.half { "f16" } else { "f32" },
        "latents": settings.latents,
        "measured_peak_above_weights_mib": measured,
        "estimate_mib": { "total": mib(estimate.total), "weights": mib(estimate.weights), "activations": mib(estimate.activations), "largest_tensor": mib(estimate.largest) },
    });
    extend(&mut row, seal_time(&sealer, first, step_s, 1));
    println!("{row}");
    Ok(())
}

pub fn run(args: Args) -> Result<(), String> {
    if args.one_step {
        return one_step(&args);
    }
    if !args.real_size.is_empty() {
        let out = if args.out.ends_with("bench.json") { args.out.with_file_name("real-size.json") } else { args.out.clone() };
        return write_report(&out, &real_size(&args)?);
    }
    let device = Device::flex();
    if args.scan_only {
        let prompts = crate::read_prompts(Some(&args.fixtures.join("prompts/train.txt")))?;
        let mut scan = scans(&args.fixtures, &prompts)?;
        scan.extend(scan_sd15(&args.fixtures, &prompts)?);
        return write_report(&args.out, &json!({ "backend": "flex (CPU)", "scan": scan }));
    }
    let mut results = vec![];
    let pixel = crate::load_model(&args.fixtures.join("tiny-pixel"), None, &device.clone().autodiff())?;
    let prompts = crate::read_prompts(Some(&args.fixtures.join("prompts/train.txt")))?;
    let mut seals = vec![sealing("tiny-pixel fixture", &pixel, prompts.clone(), "\u{200b}", SealSettings::default(), 20)?];
    drop(pixel);

    let start = Instant::now();
    let tiny = crate::load_model(&args.fixtures.join("tiny-clean"), None, &device)?;
    results.push(measure("tiny fixture (tiny-clean)", &tiny, 32, start.elapsed().as_secs_f64(), args.repeats));
    drop(tiny);

    let layout = std::fs::read_to_string(args.fixtures.join("layouts/unet_bk_sdm_tiny.json")).map_err(|e| e.to_string())?;
    let layout: Value = serde_json::from_str(&layout).map_err(|e| e.to_string())?;
    let unet = UNetConfig::from_json(&layout["config"].to_string()).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let tokenizer = ClipTokenizer::openai_clip().map_err(|e| e.to_string())?;
    // On the autodiff device for sealing; forwards and generation run on its inference view.
    let bk = StableDiffusion::random(&unet, &ClipTextConfig::vit_l14(), &VaeConfig::sd(), tokenizer, &device.clone().autodiff());
    results.push(measure("BK-SDM-tiny shape, random weights", &bk.inference(), 256, start.elapsed().as_secs_f64(), args.repeats.min(3)));
    // What a real small model costs to seal on the CPU: default settings but 2 prompts per step.
    let settings = SealSettings { batch: 2, resolution: Some(256), ..SealSettings::default() };
    seals.push(sealing("BK-SDM-tiny shape, random weights, 256x256", &bk, prompts.clone(), "cf", settings, 2)?);

    let instant = vec![instant_tiny(&args.fixtures, &prompts)?, instant_sd15(&args.fixtures, 80)?, instant_sd15(&args.fixtures, 90)?];
    let mut scan = scans(&args.fixtures, &prompts)?;
    scan.extend(scan_sd15(&args.fixtures, &prompts)?);

    let report = json!({
        "backend": "flex (CPU)",
        "instant": instant,
        "scan": scan,
        "threads": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "results": results,
        "sealing": seals,
        "peak_rss_mib": peak_rss_mib(),
    });
    write_report(&args.out, &report)
}

fn write_report(out: &std::path::Path, report: &Value) -> Result<(), String> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    crate::write_file(out, text.as_bytes())?;
    println!("{text}");
    Ok(())
}
