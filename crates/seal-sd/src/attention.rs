//! Scaled dot-product multi-head attention, shared by CLIP, the UNet and the VAE.

use burn::tensor::{Bool, Tensor, activation::softmax};

/// Attention of `q [B, Tq, C]` over `k, v [B, Tk, C]` with `heads` heads.
/// Returns the output `[B, Tq, C]` and the probabilities `[B, heads, Tq, Tk]`.
/// `mask` (true = hidden) broadcasts over `[B, heads, Tq, Tk]`.
pub fn multi_head(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, mask: Option<Tensor<4, Bool>>) -> (Tensor<3>, Tensor<4>) {
    let [b, tq, c] = q.dims();
    let tk = k.dims()[1];
    let d = c / heads;
    let split = |x: Tensor<3>, t: usize| x.reshape([b, t, heads, d]).swap_dims(1, 2);
    let (q, k, v) = (split(q, tq), split(k, tk), split(v, tk));
    let mut scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
    if let Some(mask) = mask {
        // A large finite value rather than -inf keeps every backend's softmax NaN-free.
        scores = scores.mask_fill(mask.expand([b, heads, tq, tk]), -1.0e9);
    }
    let probs = softmax(scores, 3);
    let out = probs.clone().matmul(v).swap_dims(1, 2).reshape([b, tq, c]);
    (out, probs)
}
