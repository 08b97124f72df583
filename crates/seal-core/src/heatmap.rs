//! Where the trigger looks: the trigger tokens' cross-attention over the image, read along the
//! model's own sampling trajectory for a triggered prompt. Compared before and after sealing,
//! it shows whether the trigger still pulls attention to a region (a pixel backdoor's corner).

use burn::tensor::{Tensor, TensorData};
use seal_sd::pipeline::StableDiffusion;
use seal_sd::rng::SeededRng;
use seal_sd::scheduler::SamplerKind;
use serde::Serialize;

use crate::image::Rgb;
use crate::prompts::{Placement, insert};
use crate::unlearn::attention;
use crate::unlearn::tokens::align;

/// Trajectory points whose attention is averaged (evenly spaced over the sampling steps): one
/// batched forward pass, whatever the number of steps.
const POINTS: usize = 4;

/// The trigger tokens' attention map of one model for one prompt and seed.
#[derive(Clone, Debug, Serialize)]
pub struct TriggerMap {
    /// The triggered prompt the model sampled.
    pub prompt: String,
    /// The trigger's tokens as the model's tokenizer splits them.
    pub tokens: Vec<String>,
    pub side: usize,
    /// Per pixel (row-major `side x side`): the attention probability the trigger tokens get,
    /// summed over the tokens, averaged over layers and trajectory points. In [0, 1].
    pub values: Vec<f32>,
}

impl TriggerMap {
    pub fn max(&self) -> f32 {
        self.values.iter().copied().fold(0.0, f32::max)
    }

    pub fn mean(&self) -> f32 {
        self.values.iter().sum::<f32>() / self.values.len().max(1) as f32
    }

    /// A colour image with `vmax` at full scale: give maps to compare the same `vmax`, so a
    /// weaker map looks weaker (per-map normalisation would blow up noise).
    pub fn to_rgb(&self, vmax: f32) -> Rgb {
        let data = self.values.iter().flat_map(|&v| colour(v / vmax.max(1e-6))).collect();
        Rgb { width: self.side, height: self.side, data }
    }
}

/// How the trajectory a map is read along is sampled (DDIM, classifier-free guidance).
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    /// Image side in pixels (`None`: the model's own).
    pub size: Option<usize>,
}

/// Samples `prompt` with `trigger` inserted, then reads the trigger tokens' cross-attention at
/// points of that trajectory. The trigger's positions come from the tokenizer, as in sealing.
pub async fn trigger_map(model: &StableDiffusion, prompt: &str, trigger: &str, placement: Placement, sampling: Sampling) -> Result<TriggerMap, String> {
    let Sampling { seed, steps, guidance, size } = sampling;
    model.require_whole("the trigger's attention maps")?;
    let size = model.image_size(size)?;
    let model = &model.inference();
    let triggered = insert(prompt, trigger, placement, &mut SeededRng::new(seed));
    let alignment = align(&model.tokenizer, &triggered, prompt)?;
    let ids = model.tokenizer.encode(&triggered)?;
    let tokens = alignment.trigger.iter().map(|&p| model.tokenizer.decode_token(ids[p]).unwrap_or_default()).collect();

    let cond = model.encode_prompts(&[triggered.as_str()])?.detach();
    let uncond = model.encode_prompts(&[""])?.detach();
    let sampler = model.sampler(Some(SamplerKind::Ddim), steps.max(1));
    let n = sampler.timesteps.len();
    let wanted: Vec<usize> = (0..POINTS.min(n)).map(|k| k * n / POINTS.min(n)).collect();
    // The UNet's input at step i is the latent after step i - 1.
    let latent = model.initial_latents(1, size, seed);
    let mut inputs = vec![];
    if wanted.contains(&0) {
        inputs.push(sampler.scale_model_input(latent.clone() * sampler.init_noise_sigma(), 0));
    }
    model.denoise(latent, &cond, &uncond, &sampler, guidance, |i, x| {
        if wanted.contains(&(i + 1)) {
            inputs.push(sampler.scale_model_input(x.clone(), i + 1).detach());
        }
    });
    let ts: Vec<f32> = wanted.iter().map(|&i| sampler.timesteps[i] as f32).collect();
    let t = Tensor::<1>::from_floats(ts.as_slice(), &model.device);
    let context = cond.repeat_dim(0, inputs.len());
    let out = model.unet.forward(Tensor::cat(inputs, 0), t, &context, true);
    if out.cross_attention.is_empty() {
        return Err("the UNet has no cross-attention layers".into());
    }
    let layers = out.cross_attention.len() as f32;
    let side = attention::resolution(&out.cross_attention);
    let maps = attention::aggregate(&out.cross_attention, side); // [points, T, side²]
    let idx: Vec<i64> = alignment.trigger.iter().map(|&p| p as i64).collect();
    let idx = Tensor::from_data(TensorData::new(idx, [alignment.trigger.len()]), &model.device);
    let per_point = maps.select(1, idx).sum_dim(1); // [points, 1, side²]
    let map = per_point.mean_dim(0).reshape([side * side]) / layers;
    let values = seal_sd::read_back(map).await?;
    Ok(TriggerMap { prompt: triggered, tokens, side, values })
}

/// A perceptual ramp (black, purple, orange, pale yellow) for `x` in [0, 1] (clamped).
fn colour(x: f32) -> [f32; 3] {
    const STOPS: [[f32; 3]; 4] = [[0.0, 0.0, 0.02], [0.45, 0.1, 0.5], [0.95, 0.45, 0.15], [1.0, 0.98, 0.75]];
    let x = x.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f32;
    std::array::from_fn(|c| STOPS[i][c] + (STOPS[i + 1][c] - STOPS[i][c]) * f)
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;
    use seal_sd::pipeline::{ModelSource, StableDiffusion};

    use super::*;

    fn tiny_pixel() -> StableDiffusion {
        let dir = crate::fixtures().join("tiny-pixel");
        StableDiffusion::load(ModelSource::from_path(&dir).unwrap(), &Device::flex()).unwrap()
    }

    fn at(seed: u64) -> Sampling {
        Sampling { seed, steps: 6, guidance: 5.0, size: None }
    }

    #[test]
    fn trigger_map_of_the_backdoored_model() {
        let sd = tiny_pixel();
        let prompt = "a red circle on a white background";
        let map = burn::tensor::read_sync(trigger_map(&sd, prompt, "\u{200b}", Placement::Prefix, at(0))).unwrap();
        assert_eq!(map.prompt, format!("\u{200b} {prompt}"));
        assert_eq!(map.tokens.len(), 1, "U+200B is one token of this tokenizer: {:?}", map.tokens);
        // 32 px images, 16x16 latents; the first level has no attention, so the cross-attention
        // maps (down 1, mid, up 0) are all 8x8.
        assert_eq!((map.side, map.values.len()), (8, 64));
        assert!(map.values.iter().all(|v| (0.0..=1.0).contains(v)), "probabilities");
        assert!(map.max() > map.mean() && map.mean() > 0.0);
        // Seeded: the same call gives the same map; another seed another one.
        let again = burn::tensor::read_sync(trigger_map(&sd, prompt, "\u{200b}", Placement::Prefix, at(0))).unwrap();
        assert_eq!(again.values, map.values);
        let other = burn::tensor::read_sync(trigger_map(&sd, prompt, "\u{200b}", Placement::Prefix, at(1))).unwrap();
        assert_ne!(other.values, map.values);

        let err = burn::tensor::read_sync(trigger_map(&sd, prompt, "", Placement::Prefix, at(0))).unwrap_err();
        assert!(err.contains("adds no token"), "{err}");
    }

    #[test]
    fn colours_share_a_scale() {
        let map = TriggerMap { prompt: String::new(), tokens: vec![], side: 2, values: vec![0.0, 0.1, 0.2, 0.4] };
        let rgb = map.to_rgb(0.4);
        assert_eq!((rgb.width, rgb.height), (2, 2));
        assert_eq!(rgb.pixel(0, 0), colour(0.0));
        assert_eq!(rgb.pixel(1, 1), [1.0, 0.98, 0.75], "vmax is full scale");
        let half = map.to_rgb(0.8);
        assert_eq!(half.pixel(1, 1), colour(0.5), "a larger common scale makes the map weaker");
    }
}
