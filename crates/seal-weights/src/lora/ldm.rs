//! diffusers UNet module paths -> original-layout (LDM) module paths, for kohya files whose
//! names come from the LDM model (`lora_unet_input_blocks_1_1_proj_in`): SDXL tooling names
//! this way, and some SD 1.x files do too.
//!
//! LDM numbers blocks flatly, `slots` = layers_per_block + 1 per level (see `crate::ldm::unet`
//! for the forward direction, against which the tests check this one).

use std::collections::{BTreeMap, BTreeSet};

/// What the numbering depends on, read from the model's own paths.
pub(super) struct UnetLayout {
    slots: usize,
    /// Up levels with attentions, whose upsampler is the block's third module, not its second.
    up_with_attention: BTreeSet<usize>,
}

/// `"12.rest"` -> `(12, "rest")`.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (index, rest) = s.split_once('.')?;
    if !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((index.parse().ok()?, rest))
}

impl UnetLayout {
    /// None for a UNet without the SD down/up block structure.
    pub(super) fn of(paths: &BTreeMap<String, Vec<usize>>) -> Option<Self> {
        let layers_per_block = paths.keys().filter_map(|p| split_index(p.strip_prefix("down_blocks.0.resnets.")?)).map(|(j, _)| j + 1).max()?;
        let up_with_attention =
            paths.keys().filter_map(|p| split_index(p.strip_prefix("up_blocks.")?)).filter(|(_, rest)| rest.starts_with("attentions.")).map(|(b, _)| b).collect();
        Some(Self { slots: layers_per_block + 1, up_with_attention })
    }

    /// The LDM path of a diffusers Linear/Conv2d path, if it has one.
    pub(super) fn ldm_path(&self, path: &str) -> Option<String> {
        let top = [("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"), ("conv_out", "out.2")];
        if let Some((_, ldm)) = top.iter().find(|(name, _)| *name == path) {
            return Some((*ldm).to_owned());
        }
        let slots = self.slots;
        let (group, rest) = path.split_once('.')?;
        if group == "mid_block" {
            let (kind, rest) = rest.split_once('.')?;
            let (k, sub) = split_index(rest)?;
            return match kind {
                "resnets" => Some(format!("middle_block.{}.{}", 2 * k, resnet(sub)?)),
                "attentions" => Some(format!("middle_block.{}.{sub}", 2 * k + 1)),
                _ => None,
            };
        }
        let (b, rest) = split_index(rest)?;
        let (kind, rest) = rest.split_once('.')?;
        let (l, sub) = split_index(rest)?;
        Some(match (group, kind, sub) {
            ("down_blocks", "resnets", _) => {
                format!("input_blocks.{}.0.{}", 1 + b * slots + l, resnet(sub)?)
            }
            ("down_blocks", "attentions", _) => {
                format!("input_blocks.{}.1.{sub}", 1 + b * slots + l)
            }
            ("down_blocks", "downsamplers", "conv") => {
                format!("input_blocks.{}.0.op", (b + 1) * slots)
            }
            ("up_blocks", "resnets", _) => {
                format!("output_blocks.{}.0.{}", b * slots + l, resnet(sub)?)
            }
            ("up_blocks", "attentions", _) => format!("output_blocks.{}.1.{sub}", b * slots + l),
            ("up_blocks", "upsamplers", "conv") => {
                let j = if self.up_with_attention.contains(&b) { 2 } else { 1 };
                format!("output_blocks.{}.{j}.conv", b * slots + slots - 1)
            }
            _ => return None,
        })
    }
}

/// A resnet's layer -> its LDM name (norms carry no LoRA).
fn resnet(sub: &str) -> Option<&'static str> {
    Some(match sub {
        "conv1" => "in_layers.2",
        "conv2" => "out_layers.3",
        "time_emb_proj" => "emb_layers.1",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::testutil::{f32_bytes, layout, safetensors_file};
    use crate::{WeightFile, split_single_file};

    /// Linear and Conv2d weights of a layout file: path -> shape.
    fn layout_paths(file: &str) -> BTreeMap<String, Vec<usize>> {
        layout(file).into_iter().filter_map(|(k, shape)| matches!(shape.len(), 2 | 4).then(|| k.strip_suffix(".weight").map(|p| (p.to_owned(), shape))).flatten()).collect()
    }

    /// Checks the inverse against the forward map the single-file loader uses: a checkpoint
    /// with every layer under its LDM name (one value each, the layer's number) must split
    /// back into the same diffusers names with the same values.
    fn agrees_with_the_loader(layout: &str) {
        let paths = layout_paths(layout);
        let unet = UnetLayout::of(&paths).unwrap();
        let mut tensors: Vec<(String, Vec<u8>)> = paths
            .keys()
            .enumerate()
            .map(|(i, p)| {
                let ldm = unet.ldm_path(p).unwrap_or_else(|| panic!("{p}"));
                (format!("model.diffusion_model.{ldm}.weight"), f32_bytes(&[i as f32]))
            })
            .collect();
        tensors.push(("cond_stage_model.transformer.text_model.final_layer_norm.weight".into(), f32_bytes(&[0.0])));
        tensors.push(("first_stage_model.encoder.conv_in.weight".into(), f32_bytes(&[0.0])));
        let spec: Vec<_> = tensors.iter().map(|(k, b)| (k.as_str(), "F32", &[1usize][..], b.clone())).collect();
        let file = WeightFile::from_bytes(layout, safetensors_file(&spec, None)).unwrap();
        let split = split_single_file(Rc::new(file)).unwrap();
        assert!(split.unused.is_empty(), "{layout}: {:?}", split.unused);
        assert_eq!(split.unet.keys().count(), paths.len(), "{layout}");
        for (i, p) in paths.keys().enumerate() {
            let t = split.unet.load_f32(&format!("{p}.weight")).unwrap();
            assert_eq!(t.data, [i as f32], "{layout}: {p}");
        }
    }

    #[test]
    fn sd15_and_bk_sdm_names_agree_with_the_single_file_loader() {
        for layout in ["unet_sd15.json", "unet_bk_sdm_tiny.json", "unet_bk_sdm_small.json"] {
            agrees_with_the_loader(layout);
        }
    }

    #[test]
    fn layers_without_an_ldm_name() {
        let unet = UnetLayout::of(&layout_paths("unet_sd15.json")).unwrap();
        for p in ["down_blocks.0.resnets.0.norm1", "mid_block.x.0.y", "add_embedding.linear_1"] {
            assert_eq!(unet.ldm_path(p), None, "{p}");
        }
        assert!(UnetLayout::of(&BTreeMap::new()).is_none());
    }
}
