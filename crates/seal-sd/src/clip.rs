//! CLIP text encoder (transformers' `CLIPTextModel`), returning `last_hidden_state`.

use burn::module::Module;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData, activation::sigmoid};
use serde::Deserialize;

use crate::ModelError;
use crate::attention::attend;
use crate::layers::{Embedding, LayerNorm, Linear, gelu};
use crate::tokenizer::{ClipTokenizer, TokenizerError};

/// The fields of transformers' `CLIPTextConfig` that shape the model.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// CLIP ViT-L/14's text tower, used by SD 1.x and its distilled variants.
    pub fn vit_l14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: quick_gelu(),
            layer_norm_eps: 1e-5,
        }
    }

    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let config: Self = serde_json::from_str(text).map_err(|e| ModelError::config("text_encoder/config.json", e))?;
        if !matches!(config.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(ModelError::Unsupported(format!("text_encoder hidden_act {:?}", config.hidden_act)));
        }
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(ModelError::Unsupported("text_encoder hidden_size not divisible by num_attention_heads".into()));
        }
        Ok(config)
    }
}

#[derive(Module, Debug)]
pub struct ClipTextModel {
    pub text_model: ClipTextTransformer,
}

#[derive(Module, Debug)]
pub struct ClipTextTransformer {
    pub embeddings: ClipEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    heads: usize,
}

#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    quick_gelu: bool,
}

impl ClipTextModel {
    /// The most tokens a prompt encodes to (77 for CLIP): the cross-attention's key length.
    pub fn max_tokens(&self) -> usize {
        self.text_model.embeddings.position_embedding.weight.lazy_shape()[0]
    }

    /// Bytes one taped forward of `sequences` prompts keeps for its backward (f32): per layer,
    /// the norms', projections' and MLP's activations, and the attention's scores and
    /// probabilities.
    pub fn forward_memory(&self, sequences: usize) -> u64 {
        let t = self.max_tokens() as u64;
        let per_layer = |l: &ClipEncoderLayer| {
            let (width, inner) = (l.self_attn.q_proj.weight.lazy_shape()[0] as u64, l.mlp.fc1.weight.lazy_shape()[0] as u64);
            t * (8 * width + 3 * inner) + 2 * l.self_attn.heads as u64 * t * t
        };
        4 * sequences as u64 * self.text_model.encoder.layers.iter().map(per_layer).sum::<u64>()
    }

    pub fn new(config: &ClipTextConfig, device: &Device) -> Self {
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let layer = || ClipEncoderLayer {
            self_attn: ClipAttention {
                q_proj: Linear::new(d, d, true, device),
                k_proj: Linear::new(d, d, true, device),
                v_proj: Linear::new(d, d, true, device),
                out_proj: Linear::new(d, d, true, device),
                heads: config.num_attention_heads,
            },
            layer_norm1: LayerNorm::new(d, eps, device),
            mlp: ClipMlp {
                fc1: Linear::new(d, config.intermediate_size, true, device),
                fc2: Linear::new(config.intermediate_size, d, true, device),
                quick_gelu: config.hidden_act == "quick_gelu",
            },
            layer_norm2: LayerNorm::new(d, eps, device),
        };
        Self {
            text_model: ClipTextTransformer {
                embeddings: ClipEmbeddings {
                    token_embedding: Embedding::new(config.vocab_size, d, device),
                    position_embedding: Embedding::new(config.max_position_embeddings, d, device),
                },
                encoder: ClipEncoder { layers: (0..config.num_hidden_layers).map(|_| layer()).collect() },
                final_layer_norm: LayerNorm::new(d, eps, device),
            },
        }
    }

    /// `last_hidden_state [B, 77, hidden]` of `texts`, tokenized by `tokenizer` as
    /// `CLIPTokenizer(padding="max_length", truncation=True)` does.
    pub fn encode_texts(&self, tokenizer: &ClipTokenizer, texts: &[&str], device: &Device) -> Result<Tensor<3>, TokenizerError> {
        let mut ids = Vec::with_capacity(texts.len() * tokenizer.max_length());
        for text in texts {
            ids.extend(tokenizer.encode(text)?.into_iter().map(i64::from));
        }
        Ok(self.forward(Tensor::from_data(TensorData::new(ids, [texts.len(), tokenizer.max_length()]), device)))
    }

    /// `ids [B, T]` -> `last_hidden_state [B, T, hidden]` (causal self-attention, final layer norm).
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let m = &self.text_model;
        let [b, t] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..t as i64, &device).reshape([1, t]).expand([b, t]);
        let mut x = m.embeddings.token_embedding.forward(ids) + m.embeddings.position_embedding.forward(positions);
        // `tril_mask` is true strictly above the diagonal: the future positions each token must not see.
        let causal = Tensor::<2, Bool>::tril_mask([t, t], 0, &device).reshape([1, 1, t, t]);
        for layer in &m.encoder.layers {
            x = layer.forward(x, causal.clone());
        }
        m.final_layer_norm.forward(x)
    }
}

impl ClipEncoderLayer {
    fn forward(&self, x: Tensor<3>, causal: Tensor<4, Bool>) -> Tensor<3> {
        let h = self.layer_norm1.forward(x.clone());
        let a = &self.self_attn;
        let h = attend(a.q_proj.forward(h.clone()), a.k_proj.forward(h.clone()), a.v_proj.forward(h), a.heads, Some(causal));
        let x = x + a.out_proj.forward(h);
        let h = self.mlp.fc1.forward(self.layer_norm2.forward(x.clone()));
        let h = if self.mlp.quick_gelu { h.clone() * sigmoid(h * 1.702) } else { gelu(h) };
        x + self.mlp.fc2.forward(h)
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::*;

    #[test]
    fn text_encoder_matches_transformers() {
        let sd = tiny_clean();
        let g = golden();
        let prompts = ["a red circle on a white background", "\u{200b} a blue square on a gray background", "\u{0231} a green triangle on a black background"];
        let hidden = sd.encode_prompts(&prompts).unwrap();
        assert_close(hidden, tensor(&g, "text_encoder.last_hidden_state"), 1e-5, "last_hidden_state");
        let uncond = sd.encode_prompts(&[""]).unwrap();
        assert_close(uncond, tensor(&g, "text_encoder.uncond_last_hidden_state"), 1e-5, "uncond last_hidden_state");
    }
}
