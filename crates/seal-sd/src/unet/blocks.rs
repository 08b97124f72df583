//! The UNet's down, mid and up blocks. Plain and cross-attention variants share one struct
//! each; a plain block simply has no `attentions`.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::transformer::Transformer2DModel;
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

/// What every block needs to know about its surroundings.
#[derive(Clone, Copy)]
pub struct BlockSpec {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub heads: usize,
    pub context_dim: usize,
    pub linear_projection: bool,
    pub cross_attention: bool,
}

impl BlockSpec {
    fn resnet(&self, c_in: usize, c_out: usize, device: &Device) -> ResnetBlock2D {
        ResnetBlock2D::new(c_in, c_out, Some(self.temb), self.groups, self.eps, device)
    }
    fn attention(&self, channels: usize, device: &Device) -> Transformer2DModel {
        Transformer2DModel::new(channels, self.heads, self.context_dim, self.groups, self.linear_projection, device)
    }
}

/// The per-call inputs threaded through every block.
pub struct Conditioning<'a> {
    pub temb: &'a Tensor<2>,
    pub context: &'a Tensor<3>,
    pub capture: bool,
}

/// `CrossAttnDownBlock2D` / `DownBlock2D`.
#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Vec<Downsample2D>,
}

impl DownBlock {
    pub fn new(spec: BlockSpec, c_in: usize, c_out: usize, layers: usize, downsample: Option<usize>, device: &Device) -> Self {
        Self {
            resnets: (0..layers).map(|i| spec.resnet(if i == 0 { c_in } else { c_out }, c_out, device)).collect(),
            attentions: if spec.cross_attention { (0..layers).map(|_| spec.attention(c_out, device)).collect() } else { vec![] },
            downsamplers: downsample.map(|pad| Downsample2D::new(c_out, pad, device)).into_iter().collect(),
        }
    }

    /// Returns the output and the skip connections it contributes.
    pub fn forward(&self, mut x: Tensor<4>, cond: &Conditioning, maps: &mut Vec<Tensor<4>>) -> (Tensor<4>, Vec<Tensor<4>>) {
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(cond.temb));
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x, cond.context, cond.capture, maps);
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        (x, skips)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
#[derive(Module, Debug)]
pub struct MidBlock {
    pub attentions: Vec<Transformer2DModel>,
    pub resnets: Vec<ResnetBlock2D>,
}

impl MidBlock {
    pub fn new(spec: BlockSpec, channels: usize, device: &Device) -> Self {
        Self { attentions: vec![spec.attention(channels, device)], resnets: vec![spec.resnet(channels, channels, device), spec.resnet(channels, channels, device)] }
    }

    pub fn forward(&self, x: Tensor<4>, cond: &Conditioning, maps: &mut Vec<Tensor<4>>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, Some(cond.temb));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attn.forward(x, cond.context, cond.capture, maps);
            x = resnet.forward(x, Some(cond.temb));
        }
        x
    }
}

/// `CrossAttnUpBlock2D` / `UpBlock2D`.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Vec<Upsample2D>,
}

impl UpBlock {
    /// `prev` = channels coming from below, `skip_in` = channels of this level's input
    /// (the last skip it consumes), `c_out` = this level's channels.
    pub fn new(spec: BlockSpec, prev: usize, skip_in: usize, c_out: usize, layers: usize, upsample: bool, device: &Device) -> Self {
        let resnets = (0..layers)
            .map(|i| {
                let skip = if i == layers - 1 { skip_in } else { c_out };
                let c_in = if i == 0 { prev } else { c_out };
                spec.resnet(c_in + skip, c_out, device)
            })
            .collect();
        Self {
            resnets,
            attentions: if spec.cross_attention { (0..layers).map(|_| spec.attention(c_out, device)).collect() } else { vec![] },
            upsamplers: if upsample { vec![Upsample2D::new(c_out, device)] } else { vec![] },
        }
    }

    /// Consumes its skip connections from the end of `skips`.
    pub fn forward(&self, mut x: Tensor<4>, skips: &mut Vec<Tensor<4>>, cond: &Conditioning, maps: &mut Vec<Tensor<4>>) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("one skip connection per up-block resnet");
            x = resnet.forward(Tensor::cat(vec![x, skip], 1), Some(cond.temb));
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x, cond.context, cond.capture, maps);
            }
        }
        for up in &self.upsamplers {
            x = up.forward(x);
        }
        x
    }
}
