//! diffusers' `AutoencoderKL`: images in [-1, 1] <-> latents, with the config's scaling factor.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::Deserialize;

use crate::ModelError;
use crate::attention::attend;
use crate::layers::{Conv2d, GroupNorm, Linear, silu};
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "scale")]
    pub scaling_factor: f64,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn groups() -> usize {
    32
}
fn scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// The SD 1.x VAE.
    pub fn sd() -> Self {
        serde_json::from_str(r#"{"block_out_channels":[128,256,512,512],"layers_per_block":2}"#).expect("valid literal")
    }

    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let config: Self = serde_json::from_str(text).map_err(|e| ModelError::config("vae/config.json", e))?;
        if config.block_out_channels.is_empty() || config.block_out_channels.iter().any(|c| c % config.norm_num_groups != 0) {
            return Err(ModelError::Unsupported("VAE block_out_channels".into()));
        }
        if config.shift_factor.is_some_and(|s| s != 0.0) {
            return Err(ModelError::Unsupported("VAE shift_factor (SD3/Flux-style latents)".into()));
        }
        Ok(config)
    }

    /// How many times the VAE halves the image side.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

const EPS: f64 = 1e-6;

#[derive(Module, Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    scaling_factor: f64,
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<EncoderBlock>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct EncoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Vec<Downsample2D>,
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<DecoderBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct DecoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Vec<Upsample2D>,
}

#[derive(Module, Debug)]
pub struct VaeMidBlock {
    pub attentions: Vec<VaeAttention>,
    pub resnets: Vec<ResnetBlock2D>,
}

/// Single-head self-attention over pixels, with its own group norm and a residual.
#[derive(Module, Debug)]
pub struct VaeAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
}

impl AutoencoderKL {
    pub fn new(config: &VaeConfig, device: &Device) -> Self {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let g = config.norm_num_groups;
        let lat = config.latent_channels;
        let resnet = |c_in, c_out| ResnetBlock2D::new(c_in, c_out, None, g, EPS, device);
        let mid =
            |c| VaeMidBlock { attentions: if config.mid_block_add_attention { vec![VaeAttention::new(c, g, device)] } else { vec![] }, resnets: vec![resnet(c, c), resnet(c, c)] };
        let encoder = Encoder {
            conv_in: Conv2d::same(config.in_channels, ch[0], 3, device),
            down_blocks: (0..n)
                .map(|i| {
                    let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                    EncoderBlock {
                        resnets: (0..config.layers_per_block).map(|j| resnet(if j == 0 { c_in } else { ch[i] }, ch[i])).collect(),
                        downsamplers: if i + 1 < n { vec![Downsample2D::new(ch[i], 0, device)] } else { vec![] },
                    }
                })
                .collect(),
            mid_block: mid(ch[n - 1]),
            conv_norm_out: GroupNorm::new(g, ch[n - 1], EPS, device),
            conv_out: Conv2d::same(ch[n - 1], 2 * lat, 3, device),
        };
        let decoder = Decoder {
            conv_in: Conv2d::same(lat, ch[n - 1], 3, device),
            mid_block: mid(ch[n - 1]),
            up_blocks: (0..n)
                .map(|i| {
                    let c_out = ch[n - 1 - i];
                    let c_in = if i == 0 { ch[n - 1] } else { ch[n - i] };
                    DecoderBlock {
                        resnets: (0..=config.layers_per_block).map(|j| resnet(if j == 0 { c_in } else { c_out }, c_out)).collect(),
                        upsamplers: if i + 1 < n { vec![Upsample2D::new(c_out, device)] } else { vec![] },
                    }
                })
                .collect(),
            conv_norm_out: GroupNorm::new(g, ch[0], EPS, device),
            conv_out: Conv2d::same(ch[0], config.out_channels, 3, device),
        };
        Self {
            encoder,
            decoder,
            quant_conv: config.use_quant_conv.then(|| Conv2d::same(2 * lat, 2 * lat, 1, device)),
            post_quant_conv: config.use_post_quant_conv.then(|| Conv2d::same(lat, lat, 1, device)),
            scaling_factor: config.scaling_factor,
        }
    }

    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// Image `[B, 3, H, W]` in [-1, 1] -> (mean, logvar) of the latent distribution, unscaled.
    pub fn encode(&self, image: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let e = &self.encoder;
        let mut x = e.conv_in.forward(image);
        for block in &e.down_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            for d in &block.downsamplers {
                x = d.forward(x);
            }
        }
        x = e.mid_block.forward(x);
        let mut moments = e.conv_out.forward(silu(e.conv_norm_out.forward(x)));
        if let Some(q) = &self.quant_conv {
            moments = q.forward(moments);
        }
        let [mean, logvar] = moments.chunk(2, 1).try_into().expect("two halves");
        (mean, logvar.clamp(-30.0, 20.0))
    }

    /// Unscaled latent `[B, 4, h, w]` -> image in [-1, 1] (not clamped, as diffusers' `decode`).
    pub fn decode(&self, latent: Tensor<4>) -> Tensor<4> {
        let d = &self.decoder;
        let mut x = match &self.post_quant_conv {
            Some(p) => p.forward(latent),
            None => latent,
        };
        x = d.mid_block.forward(d.conv_in.forward(x));
        for block in &d.up_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            for u in &block.upsamplers {
                x = u.forward(x);
            }
        }
        d.conv_out.forward(silu(d.conv_norm_out.forward(x)))
    }
}

impl VaeMidBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        for attn in &self.attentions {
            x = attn.forward(x);
        }
        self.resnets[1].forward(x, None)
    }
}

impl VaeAttention {
    fn new(c: usize, groups: usize, device: &Device) -> Self {
        Self {
            group_norm: GroupNorm::new(groups, c, EPS, device),
            to_q: Linear::new(c, c, true, device),
            to_k: Linear::new(c, c, true, device),
            to_v: Linear::new(c, c, true, device),
            to_out: vec![Linear::new(c, c, true, device)],
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let t = self.group_norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let out = attend(self.to_q.forward(t.clone()), self.to_k.forward(t.clone()), self.to_v.forward(t), 1, None);
        x + self.to_out[0].forward(out).swap_dims(1, 2).reshape([b, c, h, w])
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::*;

    #[test]
    fn decode_and_encode_match_diffusers() {
        let sd = tiny_clean();
        let g = golden();
        let image = sd.vae.decode(tensor(&g, "vae.decode.input_latent_unscaled"));
        assert_close(image, tensor(&g, "vae.decode.output"), 1e-4, "vae decode");
        let (mean, logvar) = sd.vae.encode(tensor(&g, "vae.encode.input_image"));
        assert_close(mean.clone(), tensor(&g, "vae.encode.output_mean"), 1e-4, "vae encode mean");
        assert_close(logvar, tensor(&g, "vae.encode.output_logvar"), 1e-4, "vae encode logvar");
        assert_close(sd.vae.decode(mean), tensor(&g, "vae.decode.from_encode_mean"), 1e-4, "decode(encode mean)");
    }
}
