//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`, shared by the UNet and the VAE.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::layers::{Conv2d, GroupNorm, Linear, silu, upsample_nearest_2x};

#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    /// Absent in the VAE, whose resnets take no timestep.
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    output_scale: f64,
}

impl ResnetBlock2D {
    pub fn new(c_in: usize, c_out: usize, temb: Option<usize>, groups: usize, eps: f64, device: &Device) -> Self {
        Self {
            norm1: GroupNorm::new(groups, c_in, eps, device),
            conv1: Conv2d::same(c_in, c_out, 3, device),
            time_emb_proj: temb.map(|t| Linear::new(t, c_out, true, device)),
            norm2: GroupNorm::new(groups, c_out, eps, device),
            conv2: Conv2d::same(c_out, c_out, 3, device),
            conv_shortcut: (c_in != c_out).then(|| Conv2d::same(c_in, c_out, 1, device)),
            output_scale: 1.0,
        }
    }

    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let mut h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let [b, c] = [h.dims()[0], h.dims()[1]];
            h = h + proj.forward(silu(temb.clone())).reshape([b, c, 1, 1]);
        }
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let x = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let out = x + h;
        if self.output_scale == 1.0 { out } else { out / self.output_scale }
    }
}

#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
}

impl Downsample2D {
    /// `padding` 1 in the UNet; 0 in the VAE, which pads (0, 1) on the bottom/right instead.
    pub fn new(channels: usize, padding: usize, device: &Device) -> Self {
        let pad = if padding == 0 { (0, 1) } else { (padding, padding) };
        Self { conv: Conv2d::new(channels, channels, 3, 2, pad, device) }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.forward(x)
    }
}

#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, device: &Device) -> Self {
        Self { conv: Conv2d::same(channels, channels, 3, device) }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.forward(upsample_nearest_2x(x))
    }
}
