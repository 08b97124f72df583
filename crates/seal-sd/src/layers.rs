//! The few building blocks the SD family needs, with PyTorch parameter names and layouts.
//!
//! burn-nn's modules name their parameters `gamma`/`beta` and store Linear weights as
//! `[in, out]`; ours keep diffusers' `weight`/`bias` and `[out, in]`, so loading a file is a
//! pure name map and no tensor is ever transposed on the way in or out.

use burn::module::{Module, Param, ParamId};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, Distribution, Shape, Tensor, activation};

/// How a lazily created parameter is filled when no file provides it (random-weight models).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Init {
    Zeros,
    Ones,
    /// Normal(0, 1/sqrt(fan_in)).
    FanIn(usize),
}

/// A frozen parameter whose memory is only allocated if nothing loads it first.
pub(crate) fn param<const D: usize>(shape: [usize; D], init: Init, device: &Device) -> Param<Tensor<D>> {
    Param::uninitialized(
        ParamId::new(),
        move |device, _| match init {
            Init::Zeros => Tensor::zeros(shape, device),
            Init::Ones => Tensor::ones(shape, device),
            Init::FanIn(n) => Tensor::random(shape, Distribution::Normal(0.0, 1.0 / (n.max(1) as f64).sqrt()), device),
        },
        device.clone(),
        false,
        Shape::new(shape),
    )
}

/// `y = x W^T + b`, W stored `[out, in]` as in PyTorch.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    pub fn new(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Self {
        Self { weight: param([d_out, d_in], Init::FanIn(d_in), device), bias: bias.then(|| param([d_out], Init::Zeros, device)) }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let w = self.weight.val().transpose();
        let bias = self.bias.as_ref().map(|b| b.val());
        if w.dtype() == x.dtype() {
            return burn::tensor::module::linear(x, w, bias);
        }
        let y = in_dtype(w.dtype(), x, |x| burn::tensor::module::linear(x, w, None));
        match bias {
            Some(b) => y + b.unsqueeze(),
            None => y,
        }
    }
}

/// 2-D convolution with PyTorch's `[out, in, k, k]` weight.
#[derive(Module, Debug)]
pub struct Conv2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Option<Param<Tensor<1>>>,
    stride: usize,
    /// (before, after) per spatial dim; the VAE's downsampler pads (0, 1) asymmetrically.
    pad: (usize, usize),
}

impl Conv2d {
    pub fn new(c_in: usize, c_out: usize, kernel: usize, stride: usize, pad: (usize, usize), device: &Device) -> Self {
        Self { weight: param([c_out, c_in, kernel, kernel], Init::FanIn(c_in * kernel * kernel), device), bias: Some(param([c_out], Init::Zeros, device)), stride, pad }
    }

    /// The common "same" convolution: 3x3 with padding 1, or 1x1 with none.
    pub fn same(c_in: usize, c_out: usize, kernel: usize, device: &Device) -> Self {
        let p = kernel / 2;
        Self::new(c_in, c_out, kernel, 1, (p, p), device)
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let options = ConvOptions { stride: [self.stride; 2], padding: [self.pad; 2], dilation: [1; 2], groups: 1 };
        let (w, bias) = (self.weight.val(), self.bias.as_ref().map(|b| b.val()));
        if w.dtype() == x.dtype() {
            return conv2d(x, w, bias, options);
        }
        let y = in_dtype(w.dtype(), x, |x| conv2d(x, w, None, options));
        match bias {
            Some(b) => y + b.reshape([1, -1, 1, 1]),
            None => y,
        }
    }
}

/// GroupNorm over `[B, C, ...]` with affine `weight`/`bias`.
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, device: &Device) -> Self {
        Self { weight: param([channels], Init::Ones, device), bias: param([channels], Init::Zeros, device), groups, eps }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let x = x.reshape([b, self.groups, (c / self.groups) * h * w]);
        let mean = x.clone().mean_dim(2);
        let x = x - mean;
        let var = x.clone().square().mean_dim(2);
        let x = (x / (var + self.eps).sqrt()).reshape([b, c, h, w]);
        x * self.weight.val().reshape([1, c, 1, 1]) + self.bias.val().reshape([1, c, 1, 1])
    }
}

/// LayerNorm over the last dimension with affine `weight`/`bias`.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, device: &Device) -> Self {
        Self { weight: param([dim], Init::Ones, device), bias: param([dim], Init::Zeros, device), eps }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let x = x - mean;
        let var = x.clone().square().mean_dim(2);
        let d = x.dims()[2];
        x / (var + self.eps).sqrt() * self.weight.val().reshape([1, 1, d]) + self.bias.val().reshape([1, 1, d])
    }
}

/// A lookup table `[n, dim]`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    pub fn new(n: usize, dim: usize, device: &Device) -> Self {
        Self { weight: param([n, dim], Init::FanIn(1), device) }
    }

    pub fn forward(&self, ids: Tensor<2, burn::tensor::Int>) -> Tensor<3> {
        let table = self.weight.val();
        let half = table.dtype() != DType::F32;
        let x = burn::tensor::module::embedding(table, ids);
        if half { x.cast(DType::F32) } else { x }
    }
}

/// `f(x)` computed in `dtype` (a half-precision weight's), returned in x's own: matrices and
/// kernels may be stored in f16 while activations, norms, biases and adapters stay f32.
fn in_dtype<const D: usize>(dtype: DType, x: Tensor<D>, f: impl FnOnce(Tensor<D>) -> Tensor<D>) -> Tensor<D> {
    let own = x.dtype();
    f(x.cast(dtype)).cast(own)
}

/// Nearest-neighbour 2x upsampling, as `F.interpolate(scale_factor=2, mode="nearest")`.
pub fn upsample_nearest_2x(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]).reshape([b, c, 2 * h, 2 * w])
}

/// Exact (erf) GELU, as torch's default.
pub fn gelu(x: Tensor<3>) -> Tensor<3> {
    activation::gelu(x)
}

pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation::silu(x)
}
