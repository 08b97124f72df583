//! diffusers' `Transformer2DModel` with `BasicTransformerBlock`s: self-attention (`attn1`),
//! cross-attention to the text (`attn2`) and a GEGLU feed-forward.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::attention::{attend, multi_head};
use crate::layers::{Conv2d, GroupNorm, LayerNorm, Linear, gelu};

/// `proj_in`/`proj_out`: 1x1 convolutions in SD 1.x, linear layers with `use_linear_projection`.
#[derive(Module, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

#[derive(Module, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

#[derive(Module, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
    heads: usize,
}

/// `ff.net.0` (GEGLU) and `ff.net.2` (Linear); `net.1` is a parameterless dropout. The loader
/// maps the field names `net_0`/`net_2` to `net.0`/`net.2`.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub net_0: Geglu,
    pub net_2: Linear,
}

#[derive(Module, Debug)]
pub struct Geglu {
    pub proj: Linear,
}

impl Transformer2DModel {
    pub fn new(channels: usize, heads: usize, context_dim: usize, groups: usize, linear_projection: bool, device: &Device) -> Self {
        let proj = || {
            if linear_projection { Projection::Linear(Linear::new(channels, channels, true, device)) } else { Projection::Conv(Conv2d::same(channels, channels, 1, device)) }
        };
        Self {
            norm: GroupNorm::new(groups, channels, 1e-6, device),
            proj_in: proj(),
            transformer_blocks: vec![BasicTransformerBlock::new(channels, heads, context_dim, device)],
            proj_out: proj(),
        }
    }

    /// Returns the output and, when `capture`, each block's cross-attention probabilities
    /// averaged over heads, shaped `[B, H, W, tokens]`.
    pub fn forward(&self, x: Tensor<4>, context: &Tensor<3>, capture: bool, maps: &mut Vec<Tensor<4>>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = self.norm.forward(x);
        let to_tokens = |x: Tensor<4>| x.reshape([b, c, h * w]).swap_dims(1, 2);
        let mut x = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(x)),
            Projection::Linear(lin) => lin.forward(to_tokens(x)),
        };
        for block in &self.transformer_blocks {
            let (out, probs) = block.forward(x, context, capture);
            x = out;
            if let Some(p) = probs {
                let tokens = p.dims()[3];
                maps.push(p.mean_dim(1).reshape([b, h, w, tokens]));
            }
        }
        let to_image = |x: Tensor<3>| x.swap_dims(1, 2).reshape([b, c, h, w]);
        let x = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(to_image(x)),
            Projection::Linear(lin) => to_image(lin.forward(x)),
        };
        x + residual
    }
}

impl BasicTransformerBlock {
    fn new(dim: usize, heads: usize, context_dim: usize, device: &Device) -> Self {
        let inner = dim * 4;
        Self {
            norm1: LayerNorm::new(dim, 1e-5, device),
            attn1: Attention::new(dim, dim, heads, device),
            norm2: LayerNorm::new(dim, 1e-5, device),
            attn2: Attention::new(dim, context_dim, heads, device),
            norm3: LayerNorm::new(dim, 1e-5, device),
            ff: FeedForward { net_0: Geglu { proj: Linear::new(dim, inner * 2, true, device) }, net_2: Linear::new(inner, dim, true, device) },
        }
    }

    /// `[B, HW, C]` -> same; with `capture`, also attn2's probabilities `[B, heads, HW, tokens]`.
    fn forward(&self, x: Tensor<3>, context: &Tensor<3>, capture: bool) -> (Tensor<3>, Option<Tensor<4>>) {
        let h = self.norm1.forward(x.clone());
        let x = x + self.attn1.forward(h.clone(), h, false).0;
        let (a, probs) = self.attn2.forward(self.norm2.forward(x.clone()), context.clone(), capture);
        let x = x + a;
        let x = x.clone() + self.ff.forward(self.norm3.forward(x));
        (x, probs)
    }
}

impl Attention {
    pub fn new(dim: usize, context_dim: usize, heads: usize, device: &Device) -> Self {
        Self {
            to_q: Linear::new(dim, dim, false, device),
            to_k: Linear::new(context_dim, dim, false, device),
            to_v: Linear::new(context_dim, dim, false, device),
            to_out: vec![Linear::new(dim, dim, true, device)],
            heads,
        }
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    /// With `capture`, also the probabilities (whole); without, the output in query chunks.
    fn forward(&self, x: Tensor<3>, context: Tensor<3>, capture: bool) -> (Tensor<3>, Option<Tensor<4>>) {
        let (q, k, v) = (self.to_q.forward(x), self.to_k.forward(context.clone()), self.to_v.forward(context));
        let (out, probs) = if capture {
            let (out, probs) = multi_head(q, k, v, self.heads, None);
            (out, Some(probs))
        } else {
            (attend(q, k, v, self.heads, None), None)
        };
        (self.to_out[0].forward(out), probs)
    }
}

impl FeedForward {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [hidden, gate] = self.net_0.proj.forward(x).chunk(2, 2).try_into().expect("GEGLU halves");
        self.net_2.forward(hidden * gelu(gate))
    }
}
