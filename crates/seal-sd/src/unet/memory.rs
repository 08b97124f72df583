//! What a UNet forward holds in memory, estimated from the built model's shapes: the plan that
//! sealing's batch and resolution are checked against before any work (a browser tab that runs
//! out of memory dies without a message).

use super::UNet2DConditionModel;
use super::transformer::Transformer2DModel;
use crate::attention::{SCORE_BYTES, query_chunk};
use crate::resnet::ResnetBlock2D;

/// Bytes of one UNet forward's activations (f32).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ForwardMemory {
    /// What a forward with a gradient tape keeps for its backward pass.
    pub saved: u64,
    /// The largest single tensor it makes (what one device buffer must hold).
    pub largest: u64,
    /// The down blocks' outputs, held for the up blocks' skip connections.
    pub skips: u64,
}

impl ForwardMemory {
    fn add(&mut self, elements: usize) {
        self.saved += 4 * elements as u64;
        self.largest = self.largest.max(4 * elements as u64);
    }
}

impl UNet2DConditionModel {
    /// The activations of one forward at `batch` latents of `side` x `side` with `tokens` text
    /// tokens. Counted per layer from the shapes: what each op keeps for its backward (norm and
    /// activation inputs, conv and projection outputs, attention probabilities), as Burn's
    /// autodiff does; the inputs of linear ops are shared with the op before them.
    pub fn forward_memory(&self, batch: usize, side: usize, tokens: usize) -> ForwardMemory {
        let mut m = ForwardMemory::default();
        let c0 = self.conv_in.weight.lazy_shape()[0];
        m.add(batch * c0 * side * side);
        m.skips += 4 * (batch * c0 * side * side) as u64;
        let mut s = side;
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                resnet_memory(&mut m, resnet, batch, s);
                if let Some(attn) = block.attentions.get(j) {
                    transformer_memory(&mut m, attn, batch, s, tokens);
                }
                m.skips += 4 * (batch * out_channels(resnet) * s * s) as u64;
            }
            if !block.downsamplers.is_empty() {
                s /= 2;
                let c = out_channels(&block.resnets[block.resnets.len() - 1]);
                m.add(batch * c * s * s);
                m.skips += 4 * (batch * c * s * s) as u64;
            }
        }
        if let Some(mid) = &self.mid_block {
            for resnet in &mid.resnets {
                resnet_memory(&mut m, resnet, batch, s);
            }
            for attn in &mid.attentions {
                transformer_memory(&mut m, attn, batch, s, tokens);
            }
        }
        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                // The concatenation of the skip connection is a new tensor.
                m.add(batch * in_channels(resnet) * s * s);
                resnet_memory(&mut m, resnet, batch, s);
                if let Some(attn) = block.attentions.get(j) {
                    transformer_memory(&mut m, attn, batch, s, tokens);
                }
            }
            if !block.upsamplers.is_empty() {
                s *= 2;
                // Nearest upsampling, then its conv.
                let c = out_channels(&block.resnets[block.resnets.len() - 1]);
                m.add(batch * c * s * s);
                m.add(batch * c * s * s);
            }
        }
        m
    }
}

fn in_channels(r: &ResnetBlock2D) -> usize {
    r.conv1.weight.lazy_shape()[1]
}

fn out_channels(r: &ResnetBlock2D) -> usize {
    r.conv1.weight.lazy_shape()[0]
}

/// norm1 and its SiLU on the input, then conv1, norm2, SiLU, conv2 on the output width (a
/// shortcut conv's output too).
fn resnet_memory(m: &mut ForwardMemory, r: &ResnetBlock2D, batch: usize, s: usize) {
    let (cin, cout, px) = (in_channels(r), out_channels(r), batch * s * s);
    for c in [cin, cin, cout, cout, cout, cout] {
        m.add(px * c);
    }
    if r.conv_shortcut.is_some() {
        m.add(px * cout);
    }
}

/// The norm and projections around the blocks; per block three layer norms, the attention
/// projections and probabilities (self-attention in query chunks, but every chunk is kept
/// for the backward), and the GEGLU feed-forward (its 8x-wide projection is the largest).
fn transformer_memory(m: &mut ForwardMemory, t: &Transformer2DModel, batch: usize, s: usize, tokens: usize) {
    let (tq, px) = (s * s, batch * s * s);
    let c = t.norm.weight.lazy_shape()[0];
    for _ in 0..4 {
        m.add(px * c);
    }
    for block in &t.transformer_blocks {
        let heads = block.attn1.heads();
        for _ in 0..6 {
            m.add(px * c); // norm1 in/out, q, k, v, attention output
        }
        let chunk = query_chunk(batch, heads, tq, tq, SCORE_BYTES);
        for start in (0..tq).step_by(chunk) {
            m.add(batch * heads * chunk.min(tq - start) * tq);
        }
        for _ in 0..5 {
            m.add(px * c); // to_out, norm2 in/out, cross q, cross output
        }
        m.add(2 * batch * tokens * c); // cross k, v
        m.add(batch * heads * tq * tokens);
        m.add(px * c * 8); // GEGLU projection
        m.add(px * c * 4); // GELU of the gate
        m.add(px * c * 4); // hidden * gate
        for _ in 0..3 {
            m.add(px * c); // to_out, norm3 in/out
        }
    }
}

impl ForwardMemory {
    /// The peak of a forward without a tape (the teacher's): the skip connections held for the
    /// up blocks, plus a layer's input, output and one temporary at the largest size.
    pub fn untaped_peak(&self) -> u64 {
        self.skips + 3 * self.largest
    }
}
