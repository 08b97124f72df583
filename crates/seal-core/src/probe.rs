//! A tiny, fixed forward + backward pass through Burn's autodiff.
//!
//! Both front ends run it to prove a device works end to end: the page (WebGPU or CPU in a
//! Web Worker) shows the numbers, `seal probe` prints the same numbers natively, and the
//! browser test compares the two.

use burn::prelude::*;
use burn::tensor::TensorData;
use seal_sd::read_back as read;
use serde::{Deserialize, Serialize};

/// Shapes of the probe: a batch of 4 inputs with 3 features, 5 hidden units, 2 outputs.
const N: usize = 4;
const IN: usize = 3;
const HIDDEN: usize = 5;
const OUT: usize = 2;

/// The most `half_probe` may be off for a device's f16 to be used: f16 keeps 11 significant
/// bits (about 5e-4 per rounding); a working device lands near 1e-3.
pub const HALF_PROBE_TOLERANCE: f32 = 1e-2;

/// The loss and its gradients with respect to every parameter (row-major, Burn's `[in, out]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub loss: f32,
    pub grad_w1: Vec<f32>,
    pub grad_b1: Vec<f32>,
    pub grad_w2: Vec<f32>,
    pub grad_b2: Vec<f32>,
}

/// The fixed inputs and parameters of the probe.
#[derive(Debug, Clone)]
pub struct ProbeInputs {
    pub x: Vec<f32>,
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
    pub target: Vec<f32>,
}

impl ProbeInputs {
    /// Deterministic values in [-0.5, 0.5), exact in f32 on every platform.
    pub fn fixed() -> Self {
        let values = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| ((i * 7 + seed) % 11) as f32 / 11.0 - 0.5).collect() };
        Self { x: values(N * IN, 1), w1: values(IN * HIDDEN, 2), b1: values(HIDDEN, 3), w2: values(HIDDEN * OUT, 4), b2: values(OUT, 5), target: values(N * OUT, 6) }
    }
}

/// Runs `loss = mean((tanh(x·W1 + b1)·W2 + b2 - target)²)` and its backward pass on `device`.
pub async fn autodiff_probe(device: &Device) -> Result<ProbeResult, String> {
    let device = device.clone().autodiff();
    let p = ProbeInputs::fixed();
    let tensor = |values: Vec<f32>, shape: [usize; 2]| Tensor::<2>::from_data(TensorData::new(values, shape), &device);
    let x = tensor(p.x, [N, IN]);
    let target = tensor(p.target, [N, OUT]);
    let w1 = tensor(p.w1, [IN, HIDDEN]).require_grad();
    let b1 = tensor(p.b1, [1, HIDDEN]).require_grad();
    let w2 = tensor(p.w2, [HIDDEN, OUT]).require_grad();
    let b2 = tensor(p.b2, [1, OUT]).require_grad();

    let hidden = (x.matmul(w1.clone()) + b1.clone()).tanh();
    let output = hidden.matmul(w2.clone()) + b2.clone();
    let loss = (output - target).powi_scalar(2).mean();
    let grads = loss.backward();

    let grad = |t: &Tensor<2>, name: &str| t.grad(&grads).ok_or(format!("no gradient for {name}"));
    let (gw1, gb1, gw2, gb2) = (grad(&w1, "w1")?, grad(&b1, "b1")?, grad(&w2, "w2")?, grad(&b2, "b2")?);
    Ok(ProbeResult { loss: read(loss).await?[0], grad_w1: read(gw1).await?, grad_b1: read(gb1).await?, grad_w2: read(gw2).await?, grad_b2: read(gb2).await? })
}

/// How far f16 weights (computing in f16, as `Precision::F16` loads them) land from f32 on
/// `device`: a 3x3 convolution into a linear layer, the model's own layers, forward and the
/// input's gradient (what a sealing step sends back through frozen weights). Returns the
/// largest error relative to the f32 result's largest magnitude; an error if the device
/// cannot run it (a WebGPU device whose f16 kernels fail).
pub async fn half_probe(device: &Device) -> Result<f32, String> {
    use burn::module::Param;
    use burn::tensor::DType;
    use seal_sd::layers::{Conv2d, Linear};
    let device = device.clone().autodiff();
    let values = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| ((i * 7 + seed) % 13) as f32 / 13.0 - 0.5).collect() };
    let mut results = vec![];
    for dtype in [DType::F32, DType::F16] {
        let mut conv = Conv2d::same(8, 16, 3, &device);
        conv.weight = Param::from_tensor(Tensor::<4>::from_data(TensorData::new(values(16 * 8 * 9, 2), [16, 8, 3, 3]), &device).cast(dtype));
        let mut linear = Linear::new(16, 12, true, &device);
        linear.weight = Param::from_tensor(Tensor::<2>::from_data(TensorData::new(values(12 * 16, 3), [12, 16]), &device).cast(dtype));
        let x = Tensor::<4>::from_data(TensorData::new(values(2 * 8 * 6 * 6, 1), [2, 8, 6, 6]), &device).require_grad();
        let hidden = conv.forward(x.clone()).reshape([2, 16, 36]).swap_dims(1, 2);
        let y = linear.forward(hidden);
        let grads = y.clone().square().mean().backward();
        let grad = x.grad(&grads).ok_or("no gradient for the input")?;
        results.push((read(y).await?, read(grad).await?));
    }
    let relative = |a: &[f32], b: &[f32]| {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    };
    let ((y32, g32), (y16, g16)) = (&results[0], &results[1]);
    Ok(relative(y32, y16).max(relative(g32, g16)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_weights_stay_within_f16_rounding_of_f32() {
        let error = burn::tensor::read_sync(half_probe(&Device::flex())).unwrap();
        eprintln!("f16 probe: relative error {error:.2e}");
        assert!(error > 0.0 && error < HALF_PROBE_TOLERANCE, "{error}");
    }

    /// The same loss in plain f64, independent of Burn; parameters as one flat vector.
    fn reference_loss(p: &ProbeInputs, params: &[f64]) -> f64 {
        let (w1, rest) = params.split_at(IN * HIDDEN);
        let (b1, rest) = rest.split_at(HIDDEN);
        let (w2, b2) = rest.split_at(HIDDEN * OUT);
        let mut sum = 0.0;
        for n in 0..N {
            let hidden: Vec<f64> = (0..HIDDEN)
                .map(|h| {
                    let z: f64 = (0..IN).map(|i| p.x[n * IN + i] as f64 * w1[i * HIDDEN + h]).sum();
                    (z + b1[h]).tanh()
                })
                .collect();
            for o in 0..OUT {
                let y: f64 = (0..HIDDEN).map(|h| hidden[h] * w2[h * OUT + o]).sum::<f64>() + b2[o];
                sum += (y - p.target[n * OUT + o] as f64).powi(2);
            }
        }
        sum / (N * OUT) as f64
    }

    #[test]
    fn probe_matches_finite_differences() {
        let result = burn::tensor::read_sync(autodiff_probe(&Device::flex())).unwrap();
        let p = ProbeInputs::fixed();
        let params: Vec<f64> = [&p.w1, &p.b1, &p.w2, &p.b2].into_iter().flatten().map(|&v| v as f64).collect();
        let grads: Vec<f32> = [result.grad_w1, result.grad_b1, result.grad_w2, result.grad_b2].concat();
        assert_eq!(grads.len(), params.len());

        let loss = reference_loss(&p, &params);
        assert!(((result.loss as f64 - loss) / loss).abs() < 1e-5, "loss {} vs {loss}", result.loss);

        let eps = 1e-5;
        for (k, &g) in grads.iter().enumerate() {
            let mut plus = params.clone();
            let mut minus = params.clone();
            plus[k] += eps;
            minus[k] -= eps;
            let expected = (reference_loss(&p, &plus) - reference_loss(&p, &minus)) / (2.0 * eps);
            let error = (g as f64 - expected).abs();
            assert!(error <= 1e-3 * expected.abs().max(1e-3), "param {k}: {g} vs {expected}");
        }
    }
}
