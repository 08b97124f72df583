//! LDM (`openaimodel.UNetModel`) UNet names -> diffusers `UNet2DConditionModel` names.
//!
//! LDM numbers its blocks flatly: `input_blocks.i` runs over every resnet (+ attention) and every
//! downsampler of every level, `output_blocks.i` over every up resnet (+ attention)
//! (+ upsampler). Level boundaries are not in the names, so we recover them by walking the blocks
//! in order: a downsampler (`input_blocks.i.0.op`) closes a down level, which gives
//! layers_per_block, and every up level holds layers_per_block + 1 resnets. diffusers instead
//! divides the index by a configured layers_per_block + 1; the walk gives the same answer on
//! LDM's own numbering, needs no config, and also reads the gapped numbering that diffusers'
//! diffusers->LDM script writes for BK-SDM-like models (it hard-codes 3 slots per level, leaving
//! empty slots and, in output_blocks, a block holding only the upsampler). A missing
//! `middle_block` (BK-SDM) simply yields no `mid_block` names.

use std::collections::BTreeMap;

use super::{Mapped, split_index};

/// LDM resnet sub-modules -> diffusers names.
const RESNET: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

/// Tensors outside the numbered blocks.
const TOP: [(&str, &str); 5] = [
    ("input_blocks.0.0.", "conv_in."),
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
];

fn replace_prefix(table: &[(&str, &str)], key: &str) -> Option<String> {
    table.iter().find_map(|(old, new)| key.strip_prefix(old).map(|rest| format!("{new}{rest}")))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Resnet,
    Attention,
    Downsample,
    Upsample,
}

/// (full key within the UNet, rest after `blocks.i.j.`) of one sub-block.
type Sub<'a> = Vec<(&'a str, &'a str)>;

fn kind(sub: &Sub) -> Kind {
    let mut rests = sub.iter().map(|&(_, rest)| rest);
    if rests.clone().any(|r| r.starts_with("op.")) {
        Kind::Downsample
    } else if rests.clone().any(|r| r.starts_with("conv.")) {
        Kind::Upsample
    } else if rests.any(|r| replace_prefix(&RESNET, r).is_some()) {
        Kind::Resnet
    } else {
        Kind::Attention
    }
}

fn resnet<'a>(out: &mut Mapped<'a>, sub: &Sub<'a>, prefix: &str) {
    for &(key, rest) in sub {
        match replace_prefix(&RESNET, rest) {
            Some(name) => out.rename(key, format!("{prefix}.{name}")),
            None => out.unused.push(key),
        }
    }
}

fn keep<'a>(out: &mut Mapped<'a>, sub: &Sub<'a>, prefix: &str) {
    for &(key, rest) in sub {
        out.rename(key, format!("{prefix}.{rest}"));
    }
}

fn strip<'a>(out: &mut Mapped<'a>, sub: &Sub<'a>, strip: &str, prefix: &str) {
    for &(key, rest) in sub {
        match rest.strip_prefix(strip) {
            Some(rest) => out.rename(key, format!("{prefix}.{rest}")),
            None => out.unused.push(key),
        }
    }
}

/// Maps UNet keys (without `model.diffusion_model.`); returns the renames and layers_per_block.
pub(super) fn map<'a>(keys: &[&'a str]) -> Result<(Mapped<'a>, usize), String> {
    let mut out = Mapped::default();
    let mut input: BTreeMap<usize, BTreeMap<usize, Sub>> = BTreeMap::new();
    let mut output: BTreeMap<usize, BTreeMap<usize, Sub>> = BTreeMap::new();
    let mut middle: BTreeMap<usize, Sub> = BTreeMap::new();
    for &key in keys {
        let nested = |prefix| {
            let (i, rest) = split_index(key.strip_prefix(prefix)?)?;
            let (j, rest) = split_index(rest)?;
            Some((i, j, rest))
        };
        if let Some(name) = replace_prefix(&TOP, key) {
            out.rename(key, name);
        } else if let Some((i, j, rest)) = nested("input_blocks.") {
            input.entry(i).or_default().entry(j).or_default().push((key, rest));
        } else if let Some((i, j, rest)) = nested("output_blocks.") {
            output.entry(i).or_default().entry(j).or_default().push((key, rest));
        } else if let Some((j, rest)) = key.strip_prefix("middle_block.").and_then(split_index) {
            middle.entry(j).or_default().push((key, rest));
        } else {
            out.unused.push(key);
        }
    }

    // Down: count the resnets of each level; a downsampler closes the level.
    let mut per_level = vec![0usize];
    for (&i, subs) in &input {
        if i == 0 {
            // Only `input_blocks.0.0` (conv_in, handled above) belongs here.
            out.unused.extend(subs.values().flatten().map(|(k, _)| *k));
            continue;
        }
        let level = per_level.len() - 1;
        let layer = per_level[level];
        if subs.values().any(|s| kind(s) == Kind::Downsample) {
            for (&j, sub) in subs {
                match (j, kind(sub)) {
                    (0, Kind::Downsample) => strip(&mut out, sub, "op.", &format!("down_blocks.{level}.downsamplers.0.conv")),
                    _ => out.unused.extend(sub.iter().map(|(k, _)| *k)),
                }
            }
            per_level.push(0);
            continue;
        }
        for (&j, sub) in subs {
            match (j, kind(sub)) {
                (0, Kind::Resnet) => resnet(&mut out, sub, &format!("down_blocks.{level}.resnets.{layer}")),
                (1, Kind::Attention) => keep(&mut out, sub, &format!("down_blocks.{level}.attentions.{layer}")),
                _ => out.unused.extend(sub.iter().map(|(k, _)| *k)),
            }
        }
        per_level[level] += 1;
    }
    let layers_per_block = per_level[0];
    if layers_per_block == 0 || per_level.iter().any(|&n| n != layers_per_block) {
        return Err(format!(
            "cannot read the UNet's levels: input_blocks hold {per_level:?} resnets per level \
             (expected the same non-zero count in every level)"
        ));
    }
    let levels = per_level.len();

    let (mut resnets, mut attentions) = (0, 0);
    for sub in middle.values() {
        match kind(sub) {
            Kind::Resnet => {
                resnet(&mut out, sub, &format!("mid_block.resnets.{resnets}"));
                resnets += 1;
            }
            Kind::Attention => {
                keep(&mut out, sub, &format!("mid_block.attentions.{attentions}"));
                attentions += 1;
            }
            _ => out.unused.extend(sub.iter().map(|(k, _)| *k)),
        }
    }

    // Up: every level holds layers_per_block + 1 resnets; an upsampler belongs to the level of
    // the resnet before it (in its own block, or in an earlier one under gapped numbering).
    let slots = layers_per_block + 1;
    let mut seen = 0usize;
    for subs in output.values() {
        let has_resnet = subs.get(&0).is_some_and(|s| kind(s) == Kind::Resnet);
        if has_resnet {
            seen += 1;
        }
        let Some(position) = seen.checked_sub(1) else {
            out.unused.extend(subs.values().flatten().map(|(k, _)| *k));
            continue;
        };
        let (level, layer) = (position / slots, position % slots);
        for (&j, sub) in subs {
            match (j, kind(sub), has_resnet) {
                (0, Kind::Resnet, _) => resnet(&mut out, sub, &format!("up_blocks.{level}.resnets.{layer}")),
                (1, Kind::Attention, true) => keep(&mut out, sub, &format!("up_blocks.{level}.attentions.{layer}")),
                (1.., Kind::Upsample, _) => strip(&mut out, sub, "conv.", &format!("up_blocks.{level}.upsamplers.0.conv")),
                _ => out.unused.extend(sub.iter().map(|(k, _)| *k)),
            }
        }
    }
    if seen != levels * slots {
        return Err(format!(
            "cannot read the UNet's levels: output_blocks hold {seen} resnets, but {levels} levels \
             with layers_per_block {layers_per_block} need {}",
            levels * slots
        ));
    }
    Ok((out, layers_per_block))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(keys: &[&str]) -> (BTreeMap<String, String>, Vec<String>, usize) {
        let (m, lpb) = map(keys).unwrap();
        let renames = m.renames.iter().map(|(k, n, _)| (k.to_string(), n.clone())).collect();
        (renames, m.unused.iter().map(|k| k.to_string()).collect(), lpb)
    }

    /// Two levels, one layer per block, no middle block, with LDM's compact numbering.
    #[test]
    fn walks_levels_without_a_middle_block() {
        let keys = [
            "input_blocks.0.0.weight",
            "input_blocks.1.0.in_layers.2.weight",
            "input_blocks.1.1.proj_in.weight",
            "input_blocks.2.0.op.weight",
            "input_blocks.3.0.skip_connection.bias",
            "output_blocks.0.0.out_layers.3.weight",
            "output_blocks.1.0.emb_layers.1.weight",
            "output_blocks.1.1.conv.bias",
            "output_blocks.2.0.in_layers.0.bias",
            "output_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
            "output_blocks.3.0.in_layers.0.bias",
            "label_emb.0.0.weight",
            "input_blocks.0.1.weight",
        ];
        let (renames, unused, lpb) = names(&keys);
        assert_eq!(lpb, 1);
        let expect = [
            ("input_blocks.0.0.weight", "conv_in.weight"),
            ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
            ("input_blocks.1.1.proj_in.weight", "down_blocks.0.attentions.0.proj_in.weight"),
            ("input_blocks.2.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
            ("input_blocks.3.0.skip_connection.bias", "down_blocks.1.resnets.0.conv_shortcut.bias"),
            ("output_blocks.0.0.out_layers.3.weight", "up_blocks.0.resnets.0.conv2.weight"),
            ("output_blocks.1.0.emb_layers.1.weight", "up_blocks.0.resnets.1.time_emb_proj.weight"),
            ("output_blocks.1.1.conv.bias", "up_blocks.0.upsamplers.0.conv.bias"),
            ("output_blocks.2.0.in_layers.0.bias", "up_blocks.1.resnets.0.norm1.bias"),
            ("output_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
            ("output_blocks.3.0.in_layers.0.bias", "up_blocks.1.resnets.1.norm1.bias"),
        ];
        let expect: BTreeMap<String, String> = expect.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(renames, expect);
        assert_eq!(unused, ["label_emb.0.0.weight", "input_blocks.0.1.weight"]);
    }

    #[test]
    fn a_middle_block_maps_resnets_and_attention_in_order() {
        let keys = [
            "input_blocks.1.0.in_layers.0.weight",
            "middle_block.0.in_layers.0.weight",
            "middle_block.1.norm.weight",
            "middle_block.2.out_layers.0.weight",
            "output_blocks.0.0.in_layers.0.weight",
            "output_blocks.1.0.in_layers.0.weight",
        ];
        let (renames, _, _) = names(&keys);
        assert_eq!(renames["middle_block.0.in_layers.0.weight"], "mid_block.resnets.0.norm1.weight");
        assert_eq!(renames["middle_block.1.norm.weight"], "mid_block.attentions.0.norm.weight");
        assert_eq!(renames["middle_block.2.out_layers.0.weight"], "mid_block.resnets.1.norm2.weight");
    }

    #[test]
    fn inconsistent_levels_are_an_error() {
        let uneven = ["input_blocks.1.0.in_layers.0.weight", "input_blocks.2.0.in_layers.0.weight", "input_blocks.3.0.op.weight", "input_blocks.4.0.in_layers.0.weight"];
        let e = map(&uneven).err().unwrap();
        assert!(e.contains("[2, 1] resnets per level"), "{e}");
        let short_output = ["input_blocks.1.0.in_layers.0.weight", "output_blocks.0.0.in_layers.0.weight"];
        let e = map(&short_output).err().unwrap();
        assert!(e.contains("output_blocks hold 1 resnets, but 1 levels with layers_per_block 1 need 2"), "{e}");
        assert!(map(&["time_embed.0.weight"]).is_err());
    }
}
