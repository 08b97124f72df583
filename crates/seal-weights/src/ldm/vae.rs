//! LDM `AutoencoderKL` names -> diffusers `AutoencoderKL` names.
//!
//! The structure matches one to one; the differences are naming, the decoder's level order
//! (LDM's `decoder.up.0` is the last level applied, diffusers' `up_blocks.0` the first) and the
//! mid-block attention, whose q/k/v/proj_out are 1x1 convs in LDM but linear layers in diffusers
//! (flagged for squeezing to 2-D; the data is the same).

use super::{Mapped, split_index};

/// Resnet sub-modules: LDM's `nin_shortcut` is diffusers' `conv_shortcut`.
fn resnet(rest: &str) -> Option<String> {
    ["norm1.", "conv1.", "norm2.", "conv2."]
        .iter()
        .find(|p| rest.starts_with(*p))
        .map(|_| rest.to_owned())
        .or_else(|| rest.strip_prefix("nin_shortcut.").map(|r| format!("conv_shortcut.{r}")))
}

/// `rest` within `encoder.`/`decoder.` -> (diffusers name within it, squeeze to 2-D).
fn side(rest: &str, decoder_levels: usize, is_decoder: bool) -> Option<(String, bool)> {
    let plain = |name: String| Some((name, false));
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return plain(rest.to_owned());
    }
    if let Some(r) = rest.strip_prefix("norm_out.") {
        return plain(format!("conv_norm_out.{r}"));
    }
    if let Some(r) = rest.strip_prefix("mid.block_1.") {
        return plain(format!("mid_block.resnets.0.{}", resnet(r)?));
    }
    if let Some(r) = rest.strip_prefix("mid.block_2.") {
        return plain(format!("mid_block.resnets.1.{}", resnet(r)?));
    }
    if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (module, param) = r.split_once('.')?;
        let new = match module {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        let squeeze = module != "norm" && param == "weight";
        return Some((format!("mid_block.attentions.0.{new}.{param}"), squeeze));
    }
    let (levels, blocks, sample) = if is_decoder { ("up.", "up_blocks", "upsample.conv.") } else { ("down.", "down_blocks", "downsample.conv.") };
    let (i, r) = split_index(rest.strip_prefix(levels)?)?;
    // The decoder's LDM levels run in reverse.
    let level = if is_decoder { decoder_levels.checked_sub(i + 1)? } else { i };
    if let Some(r) = r.strip_prefix(sample) {
        let kind = if is_decoder { "upsamplers" } else { "downsamplers" };
        return plain(format!("{blocks}.{level}.{kind}.0.conv.{r}"));
    }
    let (j, r) = split_index(r.strip_prefix("block.")?)?;
    plain(format!("{blocks}.{level}.resnets.{j}.{}", resnet(r)?))
}

/// Maps VAE keys (without `first_stage_model.`).
pub(super) fn map<'a>(keys: &[&'a str]) -> Mapped<'a> {
    let decoder_levels = keys.iter().filter_map(|k| split_index(k.strip_prefix("decoder.up.")?)).map(|(i, _)| i + 1).max().unwrap_or(0);
    let mut out = Mapped::default();
    for &key in keys {
        let mapped = if key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.") {
            Some((key.to_owned(), false))
        } else if let Some(rest) = key.strip_prefix("encoder.") {
            side(rest, decoder_levels, false).map(|(n, s)| (format!("encoder.{n}"), s))
        } else if let Some(rest) = key.strip_prefix("decoder.") {
            side(rest, decoder_levels, true).map(|(n, s)| (format!("decoder.{n}"), s))
        } else {
            None
        };
        match mapped {
            Some((name, squeeze)) => out.renames.push((key, name, squeeze)),
            None => out.unused.push(key),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_and_reverses_decoder_levels() {
        let keys = [
            "encoder.down.0.block.1.nin_shortcut.weight",
            "encoder.down.0.downsample.conv.bias",
            "encoder.norm_out.weight",
            "decoder.up.0.block.0.conv1.weight",
            "decoder.up.2.upsample.conv.weight",
            "decoder.mid.attn_1.q.weight",
            "decoder.mid.attn_1.q.bias",
            "decoder.mid.attn_1.norm.weight",
            "decoder.mid.attn_1.proj_out.weight",
            "decoder.mid.block_2.norm1.bias",
            "post_quant_conv.weight",
            "decoder.mid.attn_1.qkv.weight",
            "encoder.down.0.block.0.odd.weight",
        ];
        let m = map(&keys);
        let got: Vec<(&str, &str, bool)> = m.renames.iter().map(|(k, n, s)| (*k, n.as_str(), *s)).collect();
        assert_eq!(
            got,
            [
                ("encoder.down.0.block.1.nin_shortcut.weight", "encoder.down_blocks.0.resnets.1.conv_shortcut.weight", false),
                ("encoder.down.0.downsample.conv.bias", "encoder.down_blocks.0.downsamplers.0.conv.bias", false),
                ("encoder.norm_out.weight", "encoder.conv_norm_out.weight", false),
                ("decoder.up.0.block.0.conv1.weight", "decoder.up_blocks.2.resnets.0.conv1.weight", false),
                ("decoder.up.2.upsample.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight", false),
                ("decoder.mid.attn_1.q.weight", "decoder.mid_block.attentions.0.to_q.weight", true),
                ("decoder.mid.attn_1.q.bias", "decoder.mid_block.attentions.0.to_q.bias", false),
                ("decoder.mid.attn_1.norm.weight", "decoder.mid_block.attentions.0.group_norm.weight", false),
                ("decoder.mid.attn_1.proj_out.weight", "decoder.mid_block.attentions.0.to_out.0.weight", true),
                ("decoder.mid.block_2.norm1.bias", "decoder.mid_block.resnets.1.norm1.bias", false),
                ("post_quant_conv.weight", "post_quant_conv.weight", false),
            ]
        );
        assert_eq!(m.unused, ["decoder.mid.attn_1.qkv.weight", "encoder.down.0.block.0.odd.weight"]);
    }
}
