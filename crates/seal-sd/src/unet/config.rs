//! diffusers' `UNet2DConditionModel` config, SD 1.x family.

use serde::Deserialize;

use crate::ModelError;

/// A config value that diffusers accepts either as one number or as one per block.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, block: usize) -> usize {
        match self {
            PerBlock::One(n) => *n,
            PerBlock::Each(v) => v[block.min(v.len() - 1)],
        }
    }
    fn len_ok(&self, n: usize) -> bool {
        matches!(self, PerBlock::One(_)) || matches!(self, PerBlock::Each(v) if v.len() == n)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    /// `None` for BK-SDM / segmind tiny and small, which dropped the mid block.
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    pub layers_per_block: PerBlock,
    pub cross_attention_dim: usize,
    /// In SD 1.x configs this is really the number of heads (diffusers keeps the old name).
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "eps")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "one_u")]
    pub downsample_padding: usize,
    #[serde(default = "sample_size")]
    pub sample_size: usize,
    // Options of other families; anything but the SD 1.x value is refused, not ignored.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
}

fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn one() -> PerBlock {
    PerBlock::One(1)
}
fn one_u() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn groups() -> usize {
    32
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn sample_size() -> usize {
    64
}
fn silu() -> String {
    "silu".into()
}
fn default_shift() -> String {
    "default".into()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

pub const CROSS_DOWN: &str = "CrossAttnDownBlock2D";
pub const PLAIN_DOWN: &str = "DownBlock2D";
pub const CROSS_UP: &str = "CrossAttnUpBlock2D";
pub const PLAIN_UP: &str = "UpBlock2D";
pub const CROSS_MID: &str = "UNetMidBlock2DCrossAttn";

impl UNetConfig {
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let config: Self = serde_json::from_str(text).map_err(|e| ModelError::config("unet/config.json", e))?;
        config.validate()?;
        Ok(config)
    }

    /// The number of heads of the attention blocks at level `block` (SD 1.x semantics).
    pub fn heads(&self, block: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(block)
    }

    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// Refuse what this implementation does not build, naming the option.
    pub fn validate(&self) -> Result<(), ModelError> {
        let unsupported = |what: String| Err(ModelError::Unsupported(format!("UNet {what}")));
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return unsupported("block_out_channels, down_block_types and up_block_types differ in length".into());
        }
        for (name, v) in
            [("layers_per_block", &self.layers_per_block), ("attention_head_dim", &self.attention_head_dim), ("transformer_layers_per_block", &self.transformer_layers_per_block)]
        {
            if !v.len_ok(n) {
                return unsupported(format!("{name} has the wrong number of entries"));
            }
        }
        if self.transformer_layers_per_block != PerBlock::One(1) && self.transformer_layers_per_block != PerBlock::Each(vec![1; n]) {
            return unsupported("transformer_layers_per_block other than 1 (SDXL-style)".into());
        }
        for t in &self.down_block_types {
            if t != CROSS_DOWN && t != PLAIN_DOWN {
                return unsupported(format!("down block type {t:?}"));
            }
        }
        for t in &self.up_block_types {
            if t != CROSS_UP && t != PLAIN_UP {
                return unsupported(format!("up block type {t:?}"));
            }
        }
        if let Some(mid) = &self.mid_block_type
            && mid != CROSS_MID
        {
            return unsupported(format!("mid block type {mid:?}"));
        }
        if let Some(c) = &self.class_embed_type {
            return unsupported(format!("class_embed_type {c:?}"));
        }
        if let Some(a) = &self.addition_embed_type {
            return unsupported(format!("addition_embed_type {a:?} (SDXL-style conditioning)"));
        }
        if self.encoder_hid_dim.is_some() || self.time_cond_proj_dim.is_some() {
            return unsupported("encoder_hid_dim / time_cond_proj_dim".into());
        }
        if self.act_fn != "silu" || self.resnet_time_scale_shift != "default" || self.dual_cross_attention || self.center_input_sample {
            return unsupported("act_fn / resnet_time_scale_shift / dual_cross_attention / center_input_sample other than SD 1.x".into());
        }
        if !matches!(self.only_cross_attention, serde_json::Value::Null | serde_json::Value::Bool(false)) {
            return unsupported("only_cross_attention".into());
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            return unsupported("conv_in_kernel / conv_out_kernel other than 3".into());
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let heads = self.heads(i);
            if c % self.norm_num_groups != 0 || heads == 0 || c % heads != 0 {
                return unsupported(format!("block {i}: {c} channels with {} groups and {heads} heads", self.norm_num_groups));
            }
        }
        Ok(())
    }
}
