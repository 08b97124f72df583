//! diffusers' `UNet2DConditionModel` for the SD 1.x family (SD 1.4/1.5, BK-SDM, segmind tiny/small,
//! diffusers' tiny test configs), built from its config.

pub mod blocks;
pub mod config;
pub mod memory;
pub mod transformer;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::layers::{Conv2d, GroupNorm, Linear, silu};
use blocks::{BlockSpec, Conditioning, DownBlock, MidBlock, UpBlock};
pub use config::UNetConfig;

#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    time_channels: usize,
    flip_sin_to_cos: bool,
    freq_shift: usize,
}

#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

/// The noise prediction and, when asked for, every cross-attention layer's probabilities
/// (head-averaged, `[B, H, W, tokens]`, in forward order: down, mid, up).
pub struct UNetOutput {
    pub sample: Tensor<4>,
    pub cross_attention: Vec<Tensor<4>>,
}

impl UNet2DConditionModel {
    pub fn new(config: &UNetConfig, device: &Device) -> Self {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb = config.time_embed_dim();
        let spec = |i: usize, cross: bool| BlockSpec {
            temb,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            heads: config.heads(i),
            context_dim: config.cross_attention_dim,
            linear_projection: config.use_linear_projection,
            cross_attention: cross,
        };
        let down_blocks = (0..n)
            .map(|i| {
                let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                let cross = config.down_block_types[i] == config::CROSS_DOWN;
                let down = (i + 1 < n).then_some(config.downsample_padding);
                DownBlock::new(spec(i, cross), c_in, ch[i], config.layers_per_block.get(i), down, device)
            })
            .collect();
        let mid_block = config.mid_block_type.as_ref().map(|_| MidBlock::new(spec(n - 1, true), ch[n - 1], device));
        let up_blocks = (0..n)
            .map(|i| {
                let level = n - 1 - i; // up block i mirrors down block `level`
                let prev = if i == 0 { ch[n - 1] } else { ch[level + 1] };
                let skip_in = ch[level.saturating_sub(1)];
                let cross = config.up_block_types[i] == config::CROSS_UP;
                let layers = config.layers_per_block.get(level) + 1;
                UpBlock::new(spec(level, cross), prev, skip_in, ch[level], layers, i + 1 < n, device)
            })
            .collect();
        Self {
            conv_in: Conv2d::same(config.in_channels, ch[0], 3, device),
            time_embedding: TimestepEmbedding { linear_1: Linear::new(ch[0], temb, true, device), linear_2: Linear::new(temb, temb, true, device) },
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(config.norm_num_groups, ch[0], config.norm_eps, device),
            conv_out: Conv2d::same(ch[0], config.out_channels, 3, device),
            time_channels: ch[0],
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
        }
    }

    /// `sample [B, 4, h, w]`, `timesteps [B]`, `context [B, T, D]` -> noise prediction.
    pub fn forward(&self, sample: Tensor<4>, timesteps: Tensor<1>, context: &Tensor<3>, capture: bool) -> UNetOutput {
        let t = self.time_proj(timesteps);
        let temb = self.time_embedding.linear_2.forward(silu(self.time_embedding.linear_1.forward(t)));
        let cond = Conditioning { temb: &temb, context, capture };
        let mut maps = Vec::new();

        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(x, &cond, &mut maps);
            x = out;
            skips.extend(s);
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(x, &cond, &mut maps);
        }
        for block in &self.up_blocks {
            x = block.forward(x, &mut skips, &cond, &mut maps);
        }
        let sample = self.conv_out.forward(silu(self.conv_norm_out.forward(x)));
        UNetOutput { sample, cross_attention: maps }
    }

    /// Sinusoidal timestep features, as diffusers' `get_timestep_embedding`.
    fn time_proj(&self, timesteps: Tensor<1>) -> Tensor<2> {
        let half = self.time_channels / 2;
        let device = timesteps.device();
        let exponent = Tensor::<1, burn::tensor::Int>::arange(0..half as i64, &device).float() * (-(10000f64.ln()) / (half as f64 - self.freq_shift as f64));
        let args = timesteps.unsqueeze_dim::<2>(1) * exponent.exp().unsqueeze_dim::<2>(0);
        let (sin, cos) = (args.clone().sin(), args.cos());
        if self.flip_sin_to_cos { Tensor::cat(vec![cos, sin], 1) } else { Tensor::cat(vec![sin, cos], 1) }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::testutil::*;

    #[test]
    fn noise_prediction_matches_diffusers() {
        let sd = tiny_clean();
        let g = golden();
        let sample: Tensor<4> = tensor(&g, "unet.input.sample");
        let context: Tensor<3> = tensor(&g, "unet.input.encoder_hidden_states");
        let out = sd.unet.forward(sample.clone(), golden_timesteps("unet.input.timestep"), &context, false);
        assert!(out.cross_attention.is_empty());
        assert_close(out.sample, tensor(&g, "unet.output.noise_pred"), 1e-4, "noise_pred (t = 999, 500, 1)");
        let t500 = Tensor::<1>::full([3], 500.0, &device());
        let out = sd.unet.forward(sample, t500, &context, true);
        assert_close(out.sample, tensor(&g, "unet.output.noise_pred_t500_scalar"), 1e-4, "noise_pred (t = 500)");
        // One head-averaged map per cross-attention layer: 2 down, 1 mid, 3 up at 8x8.
        assert_eq!(out.cross_attention.len(), 6);
        for m in &out.cross_attention {
            assert_eq!(m.dims(), [3, 8, 8, 77]);
            // Probabilities over tokens sum to one at every pixel.
            let sums: Vec<f32> = m.clone().sum_dim(3).into_data().try_to_vec::<f32>().unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-4));
        }
    }
}
