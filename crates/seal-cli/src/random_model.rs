//! `seal random-model`: a model of a real architecture with random weights, written as a
//! diffusers folder a tensor at a time from the layouts in `../shared/fixtures/layouts` (key
//! names, shapes and configs made by diffusers/transformers). Real-size checks and benchmarks
//! use it instead of downloading or committing gigabytes; the same arguments give the same bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use seal_sd::rng::SeededRng;
use seal_sd::seal_weights::lora::{LoraComponent, LoraFile, LoraFormat, LoraModule, LoraTarget, kohya_metadata, write_kohya};
use seal_sd::seal_weights::{DType, Tensor32, safetensors_head};
use seal_sd::tokenizer::ClipTokenizer;
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct Args {
    /// The folder of layout files (unet_*.json, text_encoder_clip_vit_l14.json, vae_sd15.json).
    #[arg(long, default_value = "../shared/fixtures/layouts")]
    layouts: PathBuf,
    /// The UNet's layout: bk_sdm_tiny, bk_sdm_small or sd15 (file unet_<name>.json).
    #[arg(long)]
    unet: String,
    /// Weights dtype: F16 (as most published checkpoints), F32 or BF16.
    #[arg(long, default_value = "F16")]
    dtype: String,
    /// The diffusers folder to write (created; its files are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Also write `lora-rank<N>.safetensors` beside the folder's files: a kohya LoRA of this
    /// rank (alpha = rank) on every UNet attention projection, random as a trained one would be.
    #[arg(long)]
    lora_rank: Option<usize>,
}

/// DDIM with SD 1.x's training schedule.
const SCHEDULER: &str = r#"{"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1, "prediction_type": "epsilon"}"#;

pub fn run(args: Args) -> Result<(), String> {
    let dtype = DType::from_name(&args.dtype.to_uppercase()).ok_or_else(|| format!("--dtype {}: F16, F32 or BF16", args.dtype))?;
    let (vocab, merges) = ClipTokenizer::openai_clip_files().map_err(|e| e.to_string())?;
    let files: [(&str, String); 5] = [
        ("model_index.json", json!({ "_class_name": "StableDiffusionPipeline" }).to_string()),
        ("scheduler/scheduler_config.json", SCHEDULER.to_string()),
        ("tokenizer/vocab.json", vocab),
        ("tokenizer/merges.txt", merges.to_string()),
        ("tokenizer/tokenizer_config.json", json!({ "model_max_length": 77 }).to_string()),
    ];
    for (path, text) in files {
        crate::write_file(&args.out.join(path), text.as_bytes())?;
    }
    let mut bytes = 0;
    for (dir, file, layout) in [
        ("unet", "diffusion_pytorch_model.safetensors", format!("unet_{}.json", args.unet)),
        ("text_encoder", "model.safetensors", "text_encoder_clip_vit_l14.json".into()),
        ("vae", "diffusion_pytorch_model.safetensors", "vae_sd15.json".into()),
    ] {
        let path = args.layouts.join(&layout);
        let layout: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?).map_err(|e| format!("{}: {e}", path.display()))?;
        crate::write_file(&args.out.join(dir).join("config.json"), layout["config"].to_string().as_bytes())?;
        let shapes = layout["tensors"].as_object().ok_or_else(|| format!("{}: no tensors", path.display()))?;
        let shapes: Vec<(String, Vec<usize>)> =
            shapes.iter().map(|(k, s)| (k.clone(), s.as_array().into_iter().flatten().filter_map(Value::as_u64).map(|d| d as usize).collect())).collect();
        bytes += write_weights(&args.out.join(dir).join(file), dtype, &shapes)?;
        if let (Some(rank), "unet") = (args.lora_rank, dir) {
            let lora = write_kohya(&random_lora(&shapes, rank, dtype)).map_err(|e| e.to_string())?;
            crate::write_file(&args.out.join(format!("lora-rank{rank}.safetensors")), &lora)?;
        }
    }
    eprintln!("seal: wrote {} ({:.0} MiB of {dtype} weights)", args.out.display(), bytes as f64 / (1 << 20) as f64);
    Ok(())
}

/// Writes one safetensors file tensor by tensor; returns its size. Matrices and kernels are
/// uniform with the variance of PyTorch's default init scale (1 / fan-in), so activations stay
/// finite through the network; 1-D weights (norms) are 1 and biases 0.
fn write_weights(path: &Path, dtype: DType, shapes: &[(String, Vec<usize>)]) -> Result<u64, String> {
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let entries: Vec<(&str, &[usize])> = shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())).collect();
    let head = safetensors_head(dtype, &entries, &BTreeMap::from([("format".to_string(), "pt".to_string())]));
    out.write_all(&head).map_err(io)?;
    let mut size = head.len() as u64;
    for (key, shape) in shapes {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if shape.len() >= 2 {
            let bound = (3.0 / shape[1..].iter().product::<usize>() as f64).sqrt();
            let mut rng = SeededRng::new(name_seed(key));
            (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
        } else {
            vec![if key.ends_with("weight") { 1.0 } else { 0.0 }; n]
        };
        let bytes = dtype.encode(&data).ok_or_else(|| format!("{key}: not finite in {dtype}"))?;
        out.write_all(&bytes).map_err(io)?;
        size += bytes.len() as u64;
    }
    out.flush().map_err(io)?;
    Ok(size)
}

/// A kohya LoRA of `rank` on every attention projection of a UNet with these tensor shapes.
fn random_lora(unet: &[(String, Vec<usize>)], rank: usize, dtype: DType) -> LoraFile {
    let projection = |k: &str| ["to_q", "to_k", "to_v", "to_out.0"].iter().any(|p| k.ends_with(&format!(".{p}.weight")));
    let modules = unet
        .iter()
        .filter(|(k, s)| projection(k) && s.len() == 2)
        .map(|(k, s)| {
            let path = k.strip_suffix(".weight").expect("filtered");
            let mut rng = SeededRng::new(name_seed(path));
            let mut factor =
                |shape: [usize; 2], scale: f64| Tensor32 { shape: shape.to_vec(), data: (0..shape[0] * shape[1]).map(|_| ((rng.uniform() * 2.0 - 1.0) * scale) as f32).collect() };
            let down = factor([rank, s[1]], (3.0 / s[1] as f64).sqrt());
            let up = factor([s[0], rank], 0.01);
            (LoraTarget::new(LoraComponent::Unet, path), LoraModule { down, up, alpha: Some(rank as f32) })
        })
        .collect();
    LoraFile { format: LoraFormat::Kohya, modules, metadata: kohya_metadata(rank, rank as f32), dtype }
}

/// FNV-1a of the tensor's name: each tensor its own stream, whatever the order.
fn name_seed(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}
