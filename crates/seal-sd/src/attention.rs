//! Scaled dot-product multi-head attention, shared by CLIP, the UNet and the VAE.

use burn::tensor::{Bool, Tensor, activation::softmax};

/// The most bytes one chunk's f32 score tensor `[B, heads, chunk, Tk]` may take. A 512-px
/// SD 1.5 self-attention is `[B, 8, 4096, 4096]`, 512 MiB per image: past WebGPU's default
/// 128 MiB storage-binding limit and a large share of a browser's memory. Softmax rows are
/// independent, so taking the queries in chunks gives the same result.
pub const SCORE_BYTES: usize = 128 << 20;

/// Attention of `q [B, Tq, C]` over `k, v [B, Tk, C]` with `heads` heads: the output `[B, Tq, C]`,
/// queries taken in chunks whose scores fit [`SCORE_BYTES`]. `mask` (true = hidden)
/// broadcasts over `[B, heads, Tq, Tk]`.
pub fn attend(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, mask: Option<Tensor<4, Bool>>) -> Tensor<3> {
    attend_within(q, k, v, heads, mask, SCORE_BYTES)
}

fn attend_within(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, mask: Option<Tensor<4, Bool>>, budget: usize) -> Tensor<3> {
    let [b, tq, _] = q.dims();
    let chunk = query_chunk(b, heads, tq, k.dims()[1], budget);
    if chunk >= tq {
        return multi_head(q, k, v, heads, mask).0;
    }
    let outs = (0..tq)
        .step_by(chunk)
        .map(|start| {
            let n = chunk.min(tq - start);
            // A mask with a row per query is cut with its queries; a broadcast one is kept.
            let mask = mask.clone().map(|m| if m.dims()[2] == tq { m.narrow(2, start, n) } else { m });
            multi_head(q.clone().narrow(1, start, n), k.clone(), v.clone(), heads, mask).0
        })
        .collect();
    Tensor::cat(outs, 1)
}

/// Queries per chunk so that `[b, heads, chunk, tk]` f32 scores fit `budget` bytes (at least 1).
pub fn query_chunk(b: usize, heads: usize, tq: usize, tk: usize, budget: usize) -> usize {
    (budget / (4 * b * heads * tk).max(1)).clamp(1, tq.max(1))
}

/// Attention as [`attend`], unchunked, also returning the probabilities `[B, heads, Tq, Tk]`
/// (for cross-attention, whose `Tk` is the 77 text tokens, so its scores stay small).
pub fn multi_head(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, mask: Option<Tensor<4, Bool>>) -> (Tensor<3>, Tensor<4>) {
    let [b, tq, c] = q.dims();
    let tk = k.dims()[1];
    let d = c / heads;
    let split = |x: Tensor<3>, t: usize| x.reshape([b, t, heads, d]).swap_dims(1, 2);
    let (q, k, v) = (split(q, tq), split(k, tk), split(v, tk));
    let mut scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
    if let Some(mask) = mask {
        let rows = mask.dims()[2];
        // A large finite value rather than -inf keeps every backend's softmax NaN-free.
        scores = scores.mask_fill(mask.expand([b, heads, rows.max(tq), tk]), -1.0e9);
    }
    let probs = softmax(scores, 3);
    let out = probs.clone().matmul(v).swap_dims(1, 2).reshape([b, tq, c]);
    (out, probs)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, TensorData, Tolerance};

    use super::*;
    use crate::testutil::device;

    #[test]
    fn chunked_attention_equals_the_whole() {
        // A 512-px SD 1.5 self-attention at batch 2 (1 GiB of scores) goes in 8 chunks.
        assert_eq!(query_chunk(2, 8, 4096, 4096, SCORE_BYTES), 512);
        let device = device();
        let (b, heads, t, c) = (2, 4, 100, 16);
        let x = || <Tensor<3>>::random([b, t, c], Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v) = (x(), x(), x());
        // 2 x 4 x 100 x 100 x 4 bytes = 320 kB: a 40 kB budget takes 12 queries at a time (9 chunks, the last of 4).
        assert_eq!(query_chunk(b, heads, t, t, 40_000), 12);
        let chunked = attend_within(q.clone(), k.clone(), v.clone(), heads, None, 40_000);
        let whole = multi_head(q.clone(), k.clone(), v.clone(), heads, None).0;
        chunked.into_data().assert_approx_eq::<f32>(&whole.into_data(), Tolerance::absolute(1e-6));
        // A causal mask with a row per query is cut with them.
        let causal = Tensor::<2, Bool>::from_data(TensorData::new((0..t * t).map(|i| i % t > i / t).collect::<Vec<_>>(), [t, t]), &device).reshape([1, 1, t, t]);
        let chunked = attend_within(q.clone(), k.clone(), v.clone(), heads, Some(causal.clone()), 40_000);
        let (whole, probs) = multi_head(q, k, v, heads, Some(causal));
        chunked.into_data().assert_approx_eq::<f32>(&whole.into_data(), Tolerance::absolute(1e-6));
        let p: Vec<f32> = probs.narrow(2, 0, 1).into_data().try_to_vec().unwrap();
        assert!((p[0] - 1.0).abs() < 1e-6 && p[1..t].iter().all(|&x| x < 1e-6), "the first query sees only itself");
    }
}
